"""Perplexity, and KL divergence against a base model, on a text corpus.

Protocol (GPTQ paper): tokenize the whole corpus at once without special tokens, cut it into
non-overlapping windows of ``seqlen`` tokens (the tail shorter than a window is dropped), run each
window on its own (batch 1, no KV cache), and score every next-token prediction inside the window:
``seqlen - 1`` predicted tokens per window. All windows have the same size, so the mean NLL over all
predicted tokens equals the mean of the per-window means that the GPTQ reference code averages;
``perplexity = exp(mean NLL)``.

KL divergence is ``KL(P_base || P_model)`` of the next-token distributions at the same positions,
averaged over the same predicted tokens. Log-softmax runs in float32 over chunks of positions (a full
[2048, 49152] float32 window is 400 MB per temporary) and per-token terms are summed in float64.
float64 log-softmax was measured 3-4x slower on CPU for a ~1e-9 relative change in the NLL.

:func:`evaluate_models` scores several models on the same windows against one base model: the base's
logits and log-softmax are computed once per window and shared, every window's scores can be streamed
to a callback (a benchmark writes them to a file) and handed back through ``done`` to resume a run.
:func:`evaluate` is that function for one model; both give bitwise the same numbers.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

CHUNK_SIZE = 512  # positions per log-softmax chunk: 512 x 49152 x 4 B = 100 MB for SmolLM2


@dataclass(frozen=True)
class WindowScore:
    """One model's scores on one window: what :func:`evaluate_models` streams to ``on_window``.

    Attributes:
        model: the model's name (its key in ``models``).
        window: index of the window (0-based).
        nll: sum of the next-token NLLs over the window's ``seqlen - 1`` predicted tokens (nats).
        kl: sum of ``KL(P_base || P_model)`` over the same positions (nats); None without a base model,
            0.0 for the base model itself.
        seconds: wall time of the model's forward pass on the window.
    """

    model: str
    window: int
    nll: float
    kl: float | None
    seconds: float


@dataclass(frozen=True)
class EvalResult:
    """Outcome of :func:`evaluate`.

    Attributes:
        perplexity: ``exp`` of the mean next-token NLL over all predicted tokens.
        kl_divergence: mean ``KL(P_base || P_model)`` per predicted token (nats), or None without a
            base model.
        n_windows: number of ``seqlen`` windows evaluated.
        n_tokens: number of predicted (scored) tokens, ``n_windows * (seqlen - 1)``.
        seqlen: window length in tokens.
        per_window: the scores of every window, in order (not part of ``==`` or ``repr``).
    """

    perplexity: float
    kl_divergence: float | None
    n_windows: int
    n_tokens: int
    seqlen: int
    per_window: tuple[WindowScore, ...] = field(default=(), repr=False, compare=False)


def tokenize_corpus(tokenizer: Any, path: str | Path) -> torch.Tensor:
    """Tokenize a whole UTF-8 text file at once, without special tokens.

    Args:
        tokenizer: a Hugging Face tokenizer.
        path: the text file (e.g. ``wikitext-2-raw/wiki.test.raw``).

    Returns:
        LongTensor [T] of token ids.
    """
    text = Path(path).read_text(encoding="utf-8")
    # verbose=False: the corpus is far longer than model_max_length on purpose; it is windowed later.
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _chunks(n: int, chunk_size: int) -> Iterator[slice]:
    for start in range(0, n, chunk_size):
        yield slice(start, min(start + chunk_size, n))


def nll_sum(logits: torch.Tensor, targets: torch.Tensor, *, chunk_size: int = CHUNK_SIZE) -> float:
    """Sum of next-token negative log-likelihoods (nats) of ``targets`` under ``logits``.

    Args:
        logits: [T, V] scores, row t predicting ``targets[t]`` (already shifted).
        targets: [T] token ids.
        chunk_size: rows per float32 log-softmax, to bound memory.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}")
    total = 0.0
    for rows in _chunks(targets.numel(), chunk_size):
        chunk = logits[rows].float()  # [c, V]
        nll = F.cross_entropy(chunk, targets[rows].to(chunk.device), reduction="none")  # [c]
        total += nll.sum(dtype=torch.float64).item()
    return total


def kl_sum(base_logits: torch.Tensor, logits: torch.Tensor, *, chunk_size: int = CHUNK_SIZE) -> float:
    """Sum over rows of ``KL(softmax(base_logits) || softmax(logits))`` in nats.

    Args:
        base_logits: [T, V] reference scores.
        logits: [T, V] scores of the model under test.
        chunk_size: rows per float32 log-softmax, to bound memory.
    """
    if base_logits.shape != logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(base_logits.shape)} vs {tuple(logits.shape)}")
    total = 0.0
    for rows in _chunks(logits.shape[0], chunk_size):
        logq = F.log_softmax(logits[rows].float(), dim=-1)  # [c, V]
        logp = F.log_softmax(base_logits[rows].to(logq.device).float(), dim=-1)  # [c, V]
        total += _kl_terms(logp, logq)
    return total


def _kl_terms(logp: torch.Tensor, logq: torch.Tensor) -> float:
    """Sum over the rows of one chunk of ``sum_v p (log p - log q)``: per-row terms in float64."""
    return (logp.exp() * (logp - logq)).sum(dim=-1, dtype=torch.float64).sum().item()


class _BaseLogProbs:
    """The base model's float32 log-softmax on one window, in the chunks :func:`kl_sum` uses.

    Computed once per window and shared by every model compared against the base; ``kl_sum(logits)``
    is bitwise ``kl_sum(base_logits, logits)`` (same chunks, same operations, same order) when the
    logits live on the base's device. Memory: one float32 [seqlen - 1, V] copy (400 MB for SmolLM2).
    """

    def __init__(self, base_logits: torch.Tensor, chunk_size: int = CHUNK_SIZE) -> None:
        self.shape = base_logits.shape
        self.chunk_size = chunk_size
        self.logp = [
            F.log_softmax(base_logits[rows].float(), dim=-1) for rows in _chunks(self.shape[0], chunk_size)
        ]  # [c, V] each

    def kl_sum(self, logits: torch.Tensor) -> float:
        if logits.shape != self.shape:
            raise ValueError(f"logit shapes differ: {tuple(self.shape)} vs {tuple(logits.shape)}")
        total = 0.0
        for logp, rows in zip(self.logp, _chunks(logits.shape[0], self.chunk_size), strict=True):
            logq = F.log_softmax(logits[rows].float(), dim=-1)  # [c, V]
            total += _kl_terms(logp.to(logq.device), logq)
        return total


def perplexity_from_logits(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Perplexity of a token sequence from the model's (unshifted) logits on it.

    Args:
        logits: [T, V] or [1, T, V]; row t is the prediction for token t + 1.
        ids: [T] or [1, T] the tokens the logits were computed on.

    Returns:
        ``exp(mean NLL)`` over the ``T - 1`` predicted tokens.
    """
    logits, ids = logits.reshape(-1, logits.shape[-1]), ids.reshape(-1)  # [T, V], [T]
    if ids.numel() < 2:
        raise ValueError("need at least 2 tokens to score a next-token prediction")
    return math.exp(nll_sum(logits[:-1], ids[1:]) / (ids.numel() - 1))


def _input_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """Where a model's input ids go: ``device`` if given, else its first parameter's (the embedding's)."""
    return torch.device(device) if device is not None else next(model.parameters()).device


def _window_logits(model: nn.Module, window: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Logits [seqlen, V] of one window [seqlen] (batch 1, no KV cache)."""
    input_ids = window.to(device).unsqueeze(0)  # [seqlen] -> [1, seqlen]
    return model(input_ids=input_ids, use_cache=False).logits[0]  # [seqlen, V]


def _window_blocks(ids: torch.Tensor, seqlen: int, windows: int | None) -> torch.Tensor:
    """The corpus [T] cut into its first ``windows`` non-overlapping windows [n_windows, seqlen]."""
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2 to score a next-token prediction, got {seqlen}")
    if windows is not None and windows < 1:
        raise ValueError(f"windows must be >= 1 or None, got {windows}")
    ids = ids.reshape(-1)
    n_windows = ids.numel() // seqlen
    if n_windows == 0:
        raise ValueError(f"corpus has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    if windows is not None:
        n_windows = min(n_windows, windows)
    return ids[: n_windows * seqlen].view(n_windows, seqlen)  # [T] -> [n_windows, seqlen]


def _timed_logits(model: nn.Module, window: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, float]:
    """Logits [seqlen - 1, V] of the predicting positions of one window, and the forward's wall time."""
    t0 = time.perf_counter()
    logits = _window_logits(model, window, device)[:-1]  # [seqlen - 1, V]
    return logits, time.perf_counter() - t0


def _score_window(
    models: Mapping[str, nn.Module],
    todo: list[str],
    index: int,
    window: torch.Tensor,
    base_model: nn.Module | None,
    devices: Mapping[str, torch.device],
) -> dict[str, WindowScore]:
    """Scores of the models named in ``todo`` on one window; the base model runs once (if given)."""
    targets = window[1:]
    scores, base = {}, None
    if base_model is not None:
        base_logits, seconds = _timed_logits(base_model, window, devices[""])
        for name in todo:
            if models[name] is base_model:  # the base is scored too: from the same logits, KL 0
                scores[name] = WindowScore(name, index, nll_sum(base_logits, targets), 0.0, seconds)
        if len(scores) < len(todo):
            base = _BaseLogProbs(base_logits)
        del base_logits
    for name in todo:
        if name in scores:
            continue
        logits, seconds = _timed_logits(models[name], window, devices[name])
        kl = None if base is None else base.kl_sum(logits)
        scores[name] = WindowScore(name, index, nll_sum(logits, targets), kl, seconds)
        del logits
    return scores


def _result(scores: list[WindowScore], seqlen: int, has_base: bool) -> EvalResult:
    nll = kl = 0.0
    for score in scores:  # window order, as the windows were evaluated
        nll += score.nll
        kl += score.kl or 0.0
    n_tokens = len(scores) * (seqlen - 1)
    return EvalResult(
        perplexity=math.exp(nll / n_tokens),
        kl_divergence=kl / n_tokens if has_base else None,
        n_windows=len(scores),
        n_tokens=n_tokens,
        seqlen=seqlen,
        per_window=tuple(scores),
    )


def evaluate_models(
    models: Mapping[str, nn.Module],
    ids: torch.Tensor,
    *,
    seqlen: int = 2048,
    windows: int | None = None,
    base_model: nn.Module | None = None,
    device: torch.device | str | None = None,
    done: Mapping[tuple[str, int], WindowScore] | None = None,
    on_window: Callable[[WindowScore], None] | None = None,
    progress: bool = True,
) -> dict[str, EvalResult]:
    """:func:`evaluate` for several models on the same windows, against one base model.

    Per window, the base model runs once and its log-softmax is shared by every model's KL; a model
    that *is* ``base_model`` (the same object) is scored from those logits (its KL is 0.0). Each
    model's numbers are bitwise those of ``evaluate(model, ids, base_model=base_model, ...)``.

    Args:
        models: name -> causal LM; the names key the results, ``done`` and the streamed scores.
        ids, seqlen, windows, base_model, device, progress: as for :func:`evaluate`.
        done: scores computed earlier, by (name, window): reused, not recomputed (resuming a run whose
            scores were saved from ``on_window``). A window every model has a score for is skipped.
        on_window: called with each newly computed :class:`WindowScore` as soon as its window is done
            (in the order of ``models``).

    Returns:
        name -> :class:`EvalResult` (with ``per_window``), in the order of ``models``.

    Raises:
        ValueError: if ``models`` is empty, the corpus is shorter than one window, or ``seqlen``/``windows``
            are invalid.
    """
    if not models:
        raise ValueError("evaluate_models needs at least one model")
    blocks = _window_blocks(ids, seqlen, windows)
    done = done or {}
    devices = {name: _input_device(model, device) for name, model in models.items()}
    if base_model is not None:
        devices[""] = _input_device(base_model, device)
    scores: dict[str, list[WindowScore]] = {name: [] for name in models}
    with torch.inference_mode():
        for index, window in enumerate(tqdm(blocks, desc="eval", unit="window", disable=not progress)):
            todo = [name for name in models if (name, index) not in done]
            new = _score_window(models, todo, index, window, base_model, devices) if todo else {}
            for name in models:
                if name in new and on_window is not None:
                    on_window(new[name])
                scores[name].append(new[name] if name in new else done[(name, index)])
    return {name: _result(scores[name], seqlen, base_model is not None) for name in models}


def evaluate(
    model: nn.Module,
    ids: torch.Tensor,
    *,
    seqlen: int = 2048,
    windows: int | None = None,
    base_model: nn.Module | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> EvalResult:
    """Perplexity of ``model`` on ``ids`` (and mean KL vs ``base_model``), GPTQ-paper protocol.

    Args:
        model: a causal LM whose forward returns ``.logits`` [1, T, V].
        ids: LongTensor [T] of the tokenized corpus (see :func:`tokenize_corpus`).
        seqlen: window length; the tail shorter than one window is dropped.
        windows: evaluate only the first ``windows`` windows (None: all).
        base_model: if given, also report mean ``KL(P_base || P_model)`` on the same positions.
        device: where input ids are placed (models are never moved); None: each model's first
            parameter's device, which also suits accelerate-dispatched models.
        progress: show a tqdm progress bar over windows.

    Raises:
        ValueError: if the corpus is shorter than one window, or ``seqlen``/``windows`` are invalid.
    """
    result = evaluate_models(
        {"model": model},
        ids,
        seqlen=seqlen,
        windows=windows,
        base_model=base_model,
        device=device,
        progress=progress,
    )["model"]
    logger.info("evaluated %d windows x %d tokens: %s", result.n_windows, seqlen, result)
    return result
