"""The model walker on tiny random LLaMAs: streamed == loaded, propagation, padding, resume."""

from __future__ import annotations

import shutil

import pytest
import torch

from llmquant import pipeline
from llmquant.arch import get_arch
from llmquant.calibration import CalibrationBlocks, fingerprint
from llmquant.config import GPTQConfig, QuantScheme, RTNConfig
from llmquant.grid import quantize_weight
from llmquant.methods import LayerPlan
from llmquant.nn import QuantLinear

SCHEME = QuantScheme(bits=4, group_size=32, sym=False)


def _blocks(
    n: int = 6, seqlen: int = 32, vocab: int = 256, pad_tail: int = 0, pad_id: int = 0
) -> CalibrationBlocks:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (n, seqlen), generator=g)
    mask = torch.ones_like(ids)
    if pad_tail:
        mask[::2, seqlen - pad_tail :] = 0  # every other sequence right-padded
        ids[mask == 0] = pad_id
    return CalibrationBlocks(ids, mask, "test", fingerprint(ids, mask))


def interrupt_run(monkeypatch, model_dir, cfg, resume_dir, at_call: int) -> None:
    """Run ``pipeline.quantize`` with resume and interrupt it (KeyboardInterrupt) at the ``at_call``-th
    layer it starts quantizing; the patch is undone afterwards."""
    calls = {"n": 0}
    original = pipeline._quantize_layer

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_quantize_layer", dying)
    with pytest.raises(KeyboardInterrupt):
        pipeline.quantize(model_dir, cfg, _blocks(), resume_dir=resume_dir, progress=False)
    monkeypatch.setattr(pipeline, "_quantize_layer", original)


def _codes(result: pipeline.QuantizationResult) -> dict[str, tuple]:
    return {n: (qw.codes, qw.scales, qw.zeros) for n, qw in result.quantized.items()}


def _assert_same(a: pipeline.QuantizationResult, b: pipeline.QuantizationResult) -> None:
    assert a.quantized.keys() == b.quantized.keys()
    for name in a.quantized:
        for x, y in zip(a.quantized[name].__dict__.values(), b.quantized[name].__dict__.values()):
            if isinstance(x, torch.Tensor):
                assert torch.equal(x, y), name
            else:
                assert x == y, name


def test_rtn_quantizes_every_linear_exactly(tiny_llama) -> None:
    originals = {
        n: m.weight.detach().clone()
        for n, m in tiny_llama.named_modules()
        if n.startswith("model.layers") and isinstance(m, torch.nn.Linear)
    }
    result = pipeline.quantize(tiny_llama, RTNConfig(SCHEME), progress=False)
    assert set(result.quantized) == set(originals) and len(originals) == 14
    for name, w in originals.items():
        assert result.quantized[name].equal(quantize_weight(w, SCHEME))
        assert isinstance(result.model.get_submodule(name), QuantLinear)


def test_streamed_equals_loaded(make_tiny_llama, tmp_path) -> None:
    model = make_tiny_llama()
    model.save_pretrained(tmp_path / "m")
    cfg = GPTQConfig(SCHEME)
    loaded = pipeline.quantize(make_tiny_llama(), cfg, _blocks(), progress=False)
    streamed = pipeline.quantize(tmp_path / "m", cfg, _blocks(), progress=False)
    _assert_same(loaded, streamed)


def test_gptq_pipeline_beats_rtn_on_layer_outputs(make_tiny_llama) -> None:
    blocks = _blocks(n=8, seqlen=64)
    float_model = make_tiny_llama()
    with torch.no_grad():
        ref = float_model(blocks.input_ids).logits
    errs = {}
    for cfg in (RTNConfig(QuantScheme(3, 32, False)), GPTQConfig(QuantScheme(3, 32, False))):
        result = pipeline.quantize(make_tiny_llama(), cfg, blocks, progress=False)
        with torch.no_grad():
            errs[cfg.method] = (result.model(blocks.input_ids).logits - ref).pow(2).mean().item()
    assert errs["gptq"] < 0.8 * errs["rtn"], errs


def test_calibrated_run_keeps_unquantized_dtypes(make_tiny_llama) -> None:
    """Embeddings, norms (and the untied head) keep the checkpoint's dtype although the CPU computes
    the calibration forward in float32 (regression: fp16 embeddings came back float32)."""
    model = make_tiny_llama(tie=False).to(torch.float16)
    result = pipeline.quantize(model, GPTQConfig(SCHEME), _blocks(), device="cpu", progress=False)
    dtypes = {n: p.dtype for n, p in result.model.named_parameters()}
    assert "model.embed_tokens.weight" in dtypes and "lm_head.weight" in dtypes
    assert set(dtypes.values()) == {torch.float16}, dtypes


def test_padding_never_enters_statistics(make_tiny_llama) -> None:
    cfg = GPTQConfig(SCHEME)
    a = pipeline.quantize(make_tiny_llama(), cfg, _blocks(pad_tail=8, pad_id=0), progress=False)
    b = pipeline.quantize(make_tiny_llama(), cfg, _blocks(pad_tail=8, pad_id=7), progress=False)
    _assert_same(a, b)
    c = pipeline.quantize(make_tiny_llama(), cfg, _blocks(pad_tail=0), progress=False)
    assert any(not torch.equal(a.quantized[n].codes, c.quantized[n].codes) for n in a.quantized)


def test_modules_log_has_losses_and_damp(make_tiny_llama) -> None:
    result = pipeline.quantize(make_tiny_llama(), GPTQConfig(SCHEME), _blocks(), progress=False)
    assert len(result.logs) == 14
    assert all(
        log.hessian_error is not None and log.hessian_error >= 0 and log.damp >= 0.01 for log in result.logs
    )
    assert all(log.tokens == 6 * 32 for log in result.logs)


def test_resume_after_interruption_is_bit_identical(make_tiny_llama, tmp_path, monkeypatch) -> None:
    model_dir = tmp_path / "m"
    make_tiny_llama(layers=3).save_pretrained(model_dir)
    cfg = GPTQConfig(SCHEME, act_order=True, static_groups=False)
    full = pipeline.quantize(model_dir, cfg, _blocks(), progress=False)

    original = pipeline._quantize_layer
    interrupt_run(monkeypatch, model_dir, cfg, tmp_path / "r", at_call=3)
    assert (tmp_path / "r" / "state.json").is_file()

    done = []
    monkeypatch.setattr(pipeline, "_quantize_layer", lambda *a, **k: done.append(a[1]) or original(*a, **k))
    resumed = pipeline.quantize(model_dir, cfg, _blocks(), resume_dir=tmp_path / "r", progress=False)
    assert done == [2]  # layers 0 and 1 came from the checkpoint
    _assert_same(full, resumed)
    with torch.no_grad():
        ids = _blocks().input_ids
        assert torch.equal(full.model(ids).logits, resumed.model(ids).logits)


def test_resume_refuses_a_different_run(make_tiny_llama, tmp_path) -> None:
    """A resume directory of another run is refused with the part that differs (never silently discarded
    or mixed in); once it is removed (what --no-resume does), the run equals a fresh one."""
    from llmquant.errors import ResumeMismatchError

    model_dir = tmp_path / "m"
    make_tiny_llama().save_pretrained(model_dir)
    pipeline.quantize(model_dir, GPTQConfig(SCHEME), _blocks(), resume_dir=tmp_path / "r", progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()}
    with pytest.raises(ResumeMismatchError, match=r"\(method config differs\)"):
        pipeline.quantize(
            model_dir, GPTQConfig(SCHEME, damp=0.1), _blocks(), resume_dir=tmp_path / "r", progress=False
        )
    assert {p.name: p.read_bytes() for p in (tmp_path / "r").iterdir()} == before
    shutil.rmtree(tmp_path / "r")
    other = pipeline.quantize(
        model_dir, GPTQConfig(SCHEME, damp=0.1), _blocks(), resume_dir=tmp_path / "r", progress=False
    )
    fresh = pipeline.quantize(model_dir, GPTQConfig(SCHEME, damp=0.1), _blocks(), progress=False)
    _assert_same(other, fresh)


def test_unknown_architecture_is_a_clear_error(tiny_llama) -> None:
    tiny_llama.config.model_type = "gpt_neox"
    with pytest.raises(ValueError, match="add an ArchSpec"):
        pipeline.quantize(tiny_llama, RTNConfig(SCHEME), progress=False)


class _RecordInputs:
    """A calibrated 'method' that quantizes nothing: records each layer's cached inputs and what
    ``collect_inputs`` feeds for every linear, so the walker's activations can be compared with the
    model's own forward (weights stay float)."""

    needs_calibration = True

    def __init__(self) -> None:
        self.layer_inputs: list[torch.Tensor] = []
        self.module_inputs: dict[tuple[int, str], list[torch.Tensor]] = {}

    def quantize_layer(self, layer, ctx) -> dict:
        self.layer_inputs.append(torch.cat([x.clone() for x in ctx.inputs]))
        for group in ctx.arch.sequential:

            def add(name: str, x: torch.Tensor, index: int = ctx.index) -> None:
                self.module_inputs.setdefault((index, name), []).append(x.clone())

            ctx.collect_inputs(layer, [group[0]], add)
        return {}


def _reference_inputs(model, blocks: CalibrationBlocks, names) -> tuple[tuple, dict]:
    """hidden_states and the (unpadded) inputs of every named linear from ONE full-model forward."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(n).register_forward_pre_hook(lambda _m, a, n=n: seen.__setitem__(n, a[0]))
        for n in names
    ]
    try:
        with torch.no_grad():
            out = model(blocks.input_ids, attention_mask=blocks.attention_mask, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    mask = blocks.attention_mask.bool()
    return out.hidden_states, {n: x[mask] for n, x in seen.items()}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("pad_tail", [0, 8])
def test_walker_reproduces_the_model_forward(make_tiny_llama, monkeypatch, attn, pad_tail) -> None:
    """Layer by layer, the cached activations equal the full model's hidden states, and every linear's
    collected input equals its input in the full forward (causal mask, rotary, padding, early stop)."""
    model = make_tiny_llama(layers=3)
    model.set_attn_implementation(attn)
    blocks = _blocks(n=6, seqlen=32, pad_tail=pad_tail)
    arch_names = [g[0] for g in get_arch(model.config).sequential]
    names = [f"model.layers.{i}.{n}" for i in range(3) for n in arch_names]
    hidden, module_ref = _reference_inputs(model, blocks, names)
    recorder = _RecordInputs()
    monkeypatch.setattr(pipeline, "make_plan", lambda _config: LayerPlan([], recorder))
    pipeline.quantize(model, GPTQConfig(SCHEME), blocks, batch_size=4, progress=False)
    mask = blocks.attention_mask.bool()
    assert len(recorder.layer_inputs) == 3
    for i, x in enumerate(recorder.layer_inputs):
        torch.testing.assert_close(x[mask], hidden[i][mask], rtol=1e-5, atol=1e-5)
    for i in range(3):
        for name in arch_names:
            got = torch.cat(recorder.module_inputs[(i, name)])
            torch.testing.assert_close(got, module_ref[f"model.layers.{i}.{name}"], rtol=1e-5, atol=1e-5)


# Error-propagation GPTQ: the float stream ---------------------------------------------------------

PROPAGATION = GPTQConfig(SCHEME, error_propagation=1.0)


def test_error_propagation_first_group_equals_gptq(make_tiny_llama) -> None:
    """Layer 0's q/k/v see the same inputs in both streams (X̃ = X), so their codes equal plain GPTQ's;
    later groups see different streams and change."""
    blocks = _blocks()
    plain_cfg = GPTQConfig(SCHEME, error_propagation=0.0)
    plain = pipeline.quantize(make_tiny_llama(), plain_cfg, blocks, progress=False)
    prop = pipeline.quantize(make_tiny_llama(), PROPAGATION, blocks, progress=False)
    for name in ("q_proj", "k_proj", "v_proj"):
        full = f"model.layers.0.self_attn.{name}"
        assert prop.quantized[full].equal(plain.quantized[full]), full
    later = [n for n in plain.quantized if not n.startswith("model.layers.0.self_attn")]
    assert any(not prop.quantized[n].equal(plain.quantized[n]) for n in later)


def test_error_propagation_lowers_the_output_error(make_tiny_llama) -> None:
    """On the calibration tokens, GPTQ with α = 1 ends closer to the float model's logits."""
    blocks = _blocks(n=8, seqlen=64)
    with torch.no_grad():
        ref = make_tiny_llama(layers=4)(blocks.input_ids).logits
    errs = {}
    scheme = QuantScheme(3, 32, False)
    for cfg in (GPTQConfig(scheme, error_propagation=0.0), GPTQConfig(scheme, error_propagation=1.0)):
        result = pipeline.quantize(make_tiny_llama(layers=4), cfg, blocks, progress=False)
        with torch.no_grad():
            errs[cfg.error_propagation] = (result.model(blocks.input_ids).logits - ref).pow(2).mean().item()
    assert errs[1.0] < errs[0.0], errs


@pytest.mark.parametrize("offload", [False, True])
def test_error_propagation_resume_is_bit_identical(make_tiny_llama, tmp_path, monkeypatch, offload) -> None:
    """The float stream is checkpointed with the quantized one: a resumed run equals an uninterrupted one
    (also with both caches offloaded to mapped files)."""
    model_dir = tmp_path / "m"
    make_tiny_llama(layers=3).save_pretrained(model_dir)
    full = pipeline.quantize(model_dir, PROPAGATION, _blocks(), progress=False)
    interrupt_run(monkeypatch, model_dir, PROPAGATION, tmp_path / "r", at_call=3)
    resumed = pipeline.quantize(
        model_dir,
        PROPAGATION,
        _blocks(),
        resume_dir=tmp_path / "r",
        progress=False,
        offload_activations=offload,
    )
    _assert_same(full, resumed)
