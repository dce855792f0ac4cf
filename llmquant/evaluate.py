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
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

CHUNK_SIZE = 512  # positions per log-softmax chunk: 512 x 49152 x 4 B = 100 MB for SmolLM2


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
    """

    perplexity: float
    kl_divergence: float | None
    n_windows: int
    n_tokens: int
    seqlen: int


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
        total += (logp.exp() * (logp - logq)).sum(dim=-1, dtype=torch.float64).sum().item()
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
    blocks = ids[: n_windows * seqlen].view(n_windows, seqlen)  # [T] -> [n_windows, seqlen]
    model_device = _input_device(model, device)
    base_device = _input_device(base_model, device) if base_model is not None else None

    nll, kl = 0.0, 0.0
    with torch.inference_mode():
        for window in tqdm(blocks, desc="eval", unit="window", disable=not progress):
            logits = _window_logits(model, window, model_device)[:-1]  # [seqlen - 1, V]
            nll += nll_sum(logits, window[1:])
            if base_model is not None:
                kl += kl_sum(_window_logits(base_model, window, base_device)[:-1], logits)

    n_tokens = n_windows * (seqlen - 1)
    result = EvalResult(
        perplexity=math.exp(nll / n_tokens),
        kl_divergence=kl / n_tokens if base_model is not None else None,
        n_windows=n_windows,
        n_tokens=n_tokens,
        seqlen=seqlen,
    )
    logger.info("evaluated %d windows x %d tokens: %s", n_windows, seqlen, result)
    return result
