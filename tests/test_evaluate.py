"""Tests for llmquant.evaluate: perplexity and KL divergence as numbers, not shapes."""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from llmquant.evaluate import (
    EvalResult,
    WindowScore,
    evaluate,
    evaluate_models,
    kl_sum,
    nll_sum,
    perplexity_from_logits,
    tokenize_corpus,
)


class ConstantLogits(nn.Module):
    """A 'model' whose logits are the same ``row`` [V] at every position; records its inputs."""

    def __init__(self, row: torch.Tensor) -> None:
        super().__init__()
        self.row = nn.Parameter(row.clone())
        self.seen: list[torch.Tensor] = []

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        self.seen.append(input_ids.clone())
        B, T = input_ids.shape
        return SimpleNamespace(logits=self.row.expand(B, T, -1))  # [B, T, V]


# ---------------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------------


def test_perplexity_from_logits_hand_computed() -> None:
    # Two predictions over V=2: p(token 1 | t0) = e^1 / (e^0 + e^1), p(token 0 | t1) = 1/2.
    logits = torch.tensor([[0.0, 1.0], [3.0, 3.0], [5.0, -5.0]])  # [T=3, V=2]; last row is unused
    ids = torch.tensor([0, 1, 0])
    nll = -math.log(math.e / (1 + math.e)) + math.log(2)
    assert perplexity_from_logits(logits, ids) == pytest.approx(math.exp(nll / 2), rel=1e-6)
    assert perplexity_from_logits(logits.unsqueeze(0), ids.unsqueeze(0)) == pytest.approx(
        math.exp(nll / 2), rel=1e-6
    )


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_nll_sum_matches_cross_entropy_for_any_chunking(chunk_size: int) -> None:
    logits = torch.randn(50, 33) * 3
    targets = torch.randint(0, 33, (50,))
    expected = F.cross_entropy(logits.double(), targets, reduction="sum").item()
    assert nll_sum(logits, targets, chunk_size=chunk_size) == pytest.approx(expected, rel=1e-6)


def test_kl_sum_hand_computed_and_directional() -> None:
    p = torch.tensor([[0.5, 0.25, 0.25]])  # base
    q = torch.tensor([[0.25, 0.25, 0.5]])
    kl_pq = 0.5 * math.log(2) + 0.25 * math.log(0.5)  # sum p log(p/q) = 0.25 ln 2
    assert kl_sum(p.log(), q.log()) == pytest.approx(kl_pq, rel=1e-6)
    # Logits are scores: an additive shift per row does not change the distribution.
    assert kl_sum(p.log() + 7.0, q.log() - 3.0) == pytest.approx(kl_pq, rel=1e-5)
    p2, q2 = torch.tensor([[0.9, 0.1]]), torch.tensor([[0.5, 0.5]])
    forward = 0.9 * math.log(1.8) + 0.1 * math.log(0.2)
    assert kl_sum(p2.log(), q2.log()) == pytest.approx(forward, rel=1e-6)
    assert kl_sum(q2.log(), p2.log()) != pytest.approx(forward, rel=1e-2)  # KL is not symmetric


def test_kl_sum_of_identical_logits_is_zero() -> None:
    logits = torch.randn(40, 100) * 5
    assert abs(kl_sum(logits, logits, chunk_size=9)) < 1e-9


# ---------------------------------------------------------------------------------------------------
# evaluate(): windowing and protocol
# ---------------------------------------------------------------------------------------------------


def test_uniform_model_has_perplexity_vocab_size() -> None:
    V = 97
    result = evaluate(ConstantLogits(torch.zeros(V)), torch.randint(0, V, (300,)), seqlen=32, progress=False)
    assert result.perplexity == pytest.approx(V, rel=1e-6)  # float32 log-softmax: log(V) to ~1e-7
    assert result.kl_divergence is None


def test_windows_and_tail_are_counted_and_fed_exactly() -> None:
    seqlen, tail = 16, 5
    ids = torch.randint(0, 10, (3 * seqlen + tail,))
    model = ConstantLogits(torch.randn(10))
    result = evaluate(model, ids, seqlen=seqlen, progress=False)
    assert result == EvalResult(
        perplexity=result.perplexity, kl_divergence=None, n_windows=3, n_tokens=3 * 15, seqlen=16
    )
    # The model saw exactly the three non-overlapping windows, one at a time (batch 1).
    assert [s.shape for s in model.seen] == [torch.Size([1, seqlen])] * 3
    torch.testing.assert_close(torch.cat(model.seen, dim=1)[0], ids[: 3 * seqlen], rtol=0, atol=0)
    # The dropped tail does not influence the result; `windows` keeps only the first N windows.
    other_tail = torch.cat([ids[: 3 * seqlen], (ids[3 * seqlen :] + 1) % 10])
    assert evaluate(model, other_tail, seqlen=seqlen, progress=False) == result
    assert evaluate(model, ids, seqlen=seqlen, windows=2, progress=False).n_tokens == 2 * 15
    assert evaluate(model, ids, seqlen=seqlen, windows=99, progress=False).n_windows == 3


def test_perplexity_is_mean_nll_over_all_predicted_tokens() -> None:
    # Constant distribution q: every window predicts the same q, so NLL = mean of -log q[target].
    row = torch.tensor([2.0, 0.0, -1.0])
    ids = torch.tensor([0, 1, 2, 0, 0, 0, 1, 1, 2])  # seqlen 4: windows [0 1 2 0], [0 0 1 1], tail [2]
    logq = F.log_softmax(row.double(), dim=-1)
    targets = [1, 2, 0, 0, 1, 1]  # tokens 1..3 of each window
    expected = math.exp(-sum(logq[t].item() for t in targets) / len(targets))
    result = evaluate(ConstantLogits(row), ids, seqlen=4, progress=False)
    assert result.perplexity == pytest.approx(expected, rel=1e-6)


def test_short_corpus_raises() -> None:
    with pytest.raises(ValueError, match="fewer than one window"):
        evaluate(ConstantLogits(torch.zeros(5)), torch.zeros(10, dtype=torch.long), seqlen=16, progress=False)


def test_matches_transformers_loss_on_tiny_llama(tiny_llama: nn.Module) -> None:
    seqlen = 32
    ids = torch.randint(0, tiny_llama.config.vocab_size, (2 * seqlen + 3,))
    result = evaluate(tiny_llama, ids, seqlen=seqlen, progress=False)
    with torch.no_grad():
        blocks = ids[: 2 * seqlen].view(2, seqlen)
        losses = [tiny_llama(input_ids=w[None], labels=w[None]).loss for w in blocks]
    assert result.perplexity == pytest.approx(math.exp(torch.stack(losses).mean().item()), rel=1e-5)


def test_kl_zero_against_itself_positive_against_perturbed_copy(tiny_llama: nn.Module) -> None:
    ids = torch.randint(0, tiny_llama.config.vocab_size, (100,))
    same = evaluate(tiny_llama, ids, seqlen=32, base_model=tiny_llama, progress=False)
    assert same.kl_divergence is not None and abs(same.kl_divergence) < 1e-6

    perturbed = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        w = perturbed.model.layers[0].mlp.down_proj.weight
        w.add_(0.5 * torch.randn_like(w))
    result = evaluate(perturbed, ids, seqlen=32, base_model=tiny_llama, progress=False)
    assert result.kl_divergence is not None and result.kl_divergence > 1e-4
    # Same number as the full-tensor reference: mean over predicted tokens of KL(P_base || P_perturbed).
    with torch.no_grad():
        blocks = ids[:96].view(3, 32)
        logp = F.log_softmax(tiny_llama(input_ids=blocks).logits[:, :-1].double(), dim=-1)
        logq = F.log_softmax(perturbed(input_ids=blocks).logits[:, :-1].double(), dim=-1)
    expected = F.kl_div(logq, logp, log_target=True, reduction="sum").item() / (3 * 31)
    assert result.kl_divergence == pytest.approx(expected, rel=1e-4)


def test_tokenize_corpus_whole_file_without_special_tokens_or_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    caplog.set_level(logging.WARNING, logger="transformers")  # an earlier in-process CLI run may raise it
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "<s>": 1, "a": 2, "b": 3, "é": 4}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", model_max_length=4)
    path = tmp_path / "corpus.txt"
    path.write_text("a b é\nb zz a\n", encoding="utf-8")

    ids = tokenize_corpus(tokenizer, path)
    assert ids.dtype == torch.long and ids.tolist() == [2, 3, 4, 3, 0, 2]  # 6 > model_max_length: no cut
    assert "longer than the specified maximum" not in caplog.text
    tokenizer(path.read_text(encoding="utf-8"))  # control: the plain call does warn
    assert "longer than the specified maximum" in caplog.text


# ---------------------------------------------------------------------------------------------------
# evaluate_models(): several models, one base, streamed and resumable
# ---------------------------------------------------------------------------------------------------


class CountingModel(nn.Module):
    """Wraps a model and counts its forward passes."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, **kwargs):  # noqa: ANN003, ANN201
        self.calls += 1
        return self.inner(**kwargs)


def _perturbed(model: nn.Module, scale: float, seed: int) -> nn.Module:
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return out


def _reference_sums(model: nn.Module, base: nn.Module, ids: torch.Tensor, seqlen: int, windows: int):
    """The evaluation loop as it was before evaluate_models: per window nll_sum of the model's logits
    and kl_sum(base logits, logits) (log-softmax of the base recomputed per call), summed in order."""
    nll = kl = 0.0
    with torch.inference_mode():
        for window in ids[: windows * seqlen].view(windows, seqlen):
            logits = model(input_ids=window[None], use_cache=False).logits[0, :-1]
            nll += nll_sum(logits, window[1:])
            kl += kl_sum(base(input_ids=window[None], use_cache=False).logits[0, :-1], logits)
    n = windows * (seqlen - 1)
    return math.exp(nll / n), kl / n


def test_evaluate_models_bitwise_equals_evaluate_per_model(tiny_llama: nn.Module) -> None:
    ids = torch.randint(0, tiny_llama.config.vocab_size, (3 * 40 + 7,))
    others = {"a": _perturbed(tiny_llama, 0.02, 1), "b": _perturbed(tiny_llama, 0.05, 2)}
    base = CountingModel(tiny_llama)
    results = evaluate_models({"float": base, **others}, ids, seqlen=40, base_model=base, progress=False)
    assert list(results) == ["float", "a", "b"]
    assert base.calls == 3  # the base ran once per window, although it is also scored
    for name, model in others.items():
        single = evaluate(model, ids, seqlen=40, base_model=tiny_llama, progress=False)
        got = results[name]
        assert (got.perplexity, got.kl_divergence) == (single.perplexity, single.kl_divergence)
        assert (got.perplexity, got.kl_divergence) == _reference_sums(model, tiny_llama, ids, 40, 3)
        assert got == single and got.n_windows == 3 and len(got.per_window) == 3
        assert [(s.model, s.window) for s in got.per_window] == [(name, 0), (name, 1), (name, 2)]
    plain = evaluate(tiny_llama, ids, seqlen=40, progress=False)
    assert results["float"].perplexity == plain.perplexity and results["float"].kl_divergence == 0.0
    assert all(s.kl == 0.0 for s in results["float"].per_window)
    assert results["a"].kl_divergence < results["b"].kl_divergence


def test_evaluate_models_streams_and_resumes(tiny_llama: nn.Module) -> None:
    ids = torch.randint(0, tiny_llama.config.vocab_size, (3 * 32,))
    base, other = CountingModel(tiny_llama), CountingModel(_perturbed(tiny_llama, 0.05, 3))
    models = {"float": base, "q": other}
    streamed: list[WindowScore] = []
    full = evaluate_models(models, ids, seqlen=32, base_model=base, on_window=streamed.append, progress=False)
    assert [(s.model, s.window) for s in streamed] == [(m, w) for w in range(3) for m in ("float", "q")]
    assert all(s.seconds >= 0 for s in streamed)

    # resume: window 0 fully done, window 1 done for "q" only, window 2 not done
    done = {(s.model, s.window): s for s in streamed if s.window == 0 or (s.window, s.model) == (1, "q")}
    base.calls = other.calls = 0
    again: list[WindowScore] = []
    resumed = evaluate_models(
        models, ids, seqlen=32, base_model=base, done=done, on_window=again.append, progress=False
    )
    assert [(s.model, s.window) for s in again] == [("float", 1), ("float", 2), ("q", 2)]
    assert (base.calls, other.calls) == (2, 1)  # window 0 skipped entirely; "q" ran on window 2 only
    for name in models:
        assert resumed[name] == full[name]
        scores = [[(s.model, s.window, s.nll, s.kl) for s in r[name].per_window] for r in (resumed, full)]
        assert scores[0] == scores[1]


def test_evaluate_models_without_base_and_errors(tiny_llama: nn.Module) -> None:
    ids = torch.randint(0, tiny_llama.config.vocab_size, (64,))
    results = evaluate_models({"m": tiny_llama}, ids, seqlen=32, progress=False)
    assert results["m"] == evaluate(tiny_llama, ids, seqlen=32, progress=False)
    assert results["m"].kl_divergence is None and results["m"].per_window[0].kl is None
    with pytest.raises(ValueError, match="at least one model"):
        evaluate_models({}, ids, seqlen=32, progress=False)
    with pytest.raises(ValueError, match="fewer than one window"):
        evaluate_models({"m": tiny_llama}, ids, seqlen=128, progress=False)


# ---------------------------------------------------------------------------------------------------
# End to end on the real SmolLM2-135M-Instruct
# ---------------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_smollm2_wikitext_perplexity_and_chat_generation(smollm2_path: Path, shared_data: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    ids = tokenize_corpus(tokenizer, shared_data / "wikitext-2-raw" / "wiki.test.raw")
    assert ids.numel() == 301_948  # the peers' protocol count (docs: peer-results.md)

    result = evaluate(model, ids, seqlen=2048, windows=2, progress=False)
    assert result.n_windows == 2 and result.n_tokens == 2 * 2047
    assert 10 < result.perplexity < 40  # measured 19.02 (float32; float16 gives ~20.4 on 12 windows)

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    prompt_ids = prompt if isinstance(prompt, torch.Tensor) else prompt["input_ids"]
    with torch.inference_mode():
        out = model.generate(prompt_ids, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0, prompt_ids.shape[1] :], skip_special_tokens=True)
    assert text.strip()
