"""AWQ (Lin et al. 2023) as pure tensor functions: scale search, clip search, and folding.

Shapes follow nn.Linear: ``W`` [N, K], activations ``X`` [tokens, K], ``H = X^T X / tokens`` [K, K].
A *mapping* pairs a smooth module (a norm or a linear whose outputs feed the balanced linears) with the
balanced linears (they read the same input). Scaling the balanced linears' input channels by ``s`` and
dividing the smooth module's outputs by ``s`` leaves the float function unchanged, while salient input
channels (large activations) get a finer effective grid.

1. ``search_scales``: per-channel scales ``s = x_mean**a / w_mean**(1 - a)`` (duo scaling) or
   ``x_mean**a`` over ``n_grid`` values of ``a`` in [0, 1), plus the identity ``s = 1``; each candidate
   is scored by a caller-supplied loss (the block-output error of ``fake_quant(W * s) / s``), and the
   lowest wins. Including the identity means AWQ never scores worse than plain rounding on its own loss.
2. ``search_clip``: per (row, group) shrink of the min-max range, scored by the exact output error of the
   group on every calibration token, ``e^T H_gg e`` (the group's diagonal block of the Hessian), instead
   of the reference implementations' error on a few hundred sampled tokens.
3. ``fold_scales_`` / ``clip_weight_``: apply a plan to modules (the only functions here that mutate).

The searches return plans (data); applying them is a separate step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .config import QuantScheme
from .grid import dequantize_codes, fake_quantize, grouped_view, qparams_from_range, round_to_grid

SCALE_FLOOR = 1e-4  # the reference implementations' clamp on candidate scales (and on w_mean's offset)


@dataclass(frozen=True)
class ScalePlan:
    """The chosen input-channel scales of one mapping."""

    smooth: str
    balance: tuple[str, ...]
    scales: torch.Tensor  # [K] float32, > 0
    alpha: float | None  # exponent of the winning candidate; None = the identity (s = 1) won
    loss: float  # search loss of the winning candidate
    loss_identity: float  # search loss of plain rounding (s = 1)
    losses: tuple[float, ...] = ()  # search loss at a = 0, 1/n_grid, ... (in grid order)


@dataclass(frozen=True)
class ClipPlan:
    """Per (row, group) clipping bounds of one linear (already in the scaled weight's units)."""

    name: str
    wmin: torch.Tensor  # [N, G] float32
    wmax: torch.Tensor  # [N, G] float32
    loss: float  # summed output error (sum over groups of e^T H_gg e) after clipping
    loss_unclipped: float


def weight_channel_mean(weights: list[torch.Tensor], group_size: int | None) -> torch.Tensor:
    """Mean over output rows of |w| normalized by its group's max |w|: [K] (float32).

    Groups follow the quantization scheme (a ragged last group is normalized by its own max)."""
    w = torch.cat([x.float() for x in weights])  # [sum N, K]
    n, k = w.shape
    gs = k if group_size is None else group_size
    wg, _mask = grouped_view(w.abs(), gs)  # [N, G, gs]; padding repeats a real value: amax unaffected
    normed = wg / (wg.amax(dim=-1, keepdim=True) + 1e-6)
    return normed.reshape(n, -1)[:, :k].mean(dim=0)


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """``x_mean**a / (w_mean**(1-a) + 1e-4)`` (``w_mean`` None: ``x_mean**a``), clamped to 1e-4 and
    normalized so that ``sqrt(max * min) == 1``."""
    x_mean = x_mean.float()
    if w_mean is None:
        s = x_mean.pow(alpha).clamp(min=SCALE_FLOOR)
    else:
        s = (x_mean.pow(alpha) / (w_mean.float().pow(1 - alpha) + SCALE_FLOOR)).clamp(min=SCALE_FLOOR)
    if s.max() - s.min() <= 1e-6 * s.max():  # a constant scale folds to nothing: exactly the identity
        return torch.ones_like(s)
    return s / (s.max() * s.min()).sqrt()


def search_scales(
    smooth: str,
    balance: tuple[str, ...],
    x_mean: torch.Tensor,
    w_mean: torch.Tensor | None,
    loss_fn: Callable[[torch.Tensor], float],
    n_grid: int,
) -> ScalePlan:
    """Score the identity and ``n_grid`` exponents ``a = i / n_grid``; keep the lowest loss (first on ties).

    ``loss_fn(s)`` is the block-output error with the balanced weights replaced by
    ``fake_quant(W * s) / s``; ``w_mean`` None selects x-only scaling."""
    ones = torch.ones_like(x_mean, dtype=torch.float32)
    loss_identity = float(loss_fn(ones))
    best = (loss_identity, None, ones)
    losses = []
    for i in range(n_grid):
        alpha = i / n_grid
        s = candidate_scales(x_mean, w_mean, alpha)
        losses.append(float(loss_fn(s)))
        if losses[-1] < best[0]:
            best = (losses[-1], alpha, s)
    return ScalePlan(smooth, balance, best[2], best[1], best[0], loss_identity, tuple(losses))


def scaled_fake_quant(w: torch.Tensor, scales: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """``dequant(quant(W * s)) / s`` in W's dtype: what the balanced linear computes on the unscaled input
    once ``s`` is folded and the scaled weight rounded to nearest (min-max grid)."""
    ws = w.float() * scales[None, :]  # W [N, K] * s [1, K]
    return (fake_quantize(ws, scheme) / scales[None, :]).to(w.dtype)


def group_hessian_blocks(h: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Diagonal blocks of H [K, K] per group -> [G, gs, gs]; a ragged last group is zero-padded."""
    k = h.shape[0]
    gs = k if group_size is None else group_size
    g = -(-k // gs)
    padded = torch.zeros(g * gs, g * gs, dtype=torch.float32, device=h.device)
    padded[:k, :k] = h.float()
    blocks = padded.reshape(g, gs, g, gs)  # [G*gs, G*gs] -> [G, gs, G, gs]
    idx = torch.arange(g, device=h.device)
    return blocks[idx, :, idx, :]  # [G, gs, gs]


def _clipped_error(
    wg: torch.Tensor, hb: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, sym: bool
) -> torch.Tensor:
    """Per (row, group) ``e^T H_gg e`` for weights clamped to [lo, hi] and rounded on that range."""
    scale, zero = qparams_from_range(lo, hi, bits, sym)  # [N, G, 1]
    wc = torch.minimum(torch.maximum(wg, lo), hi)
    e = dequantize_codes(round_to_grid(wc, scale, zero, bits), scale, zero) - wg  # [N, G, gs]
    return torch.einsum("ngk,gkl,ngl->ng", e, hb, e)


def search_clip(
    name: str,
    w: torch.Tensor,
    h: torch.Tensor,
    scheme: QuantScheme,
    n_grid: int = 20,
    max_shrink: float = 0.5,
) -> ClipPlan:
    """Per (row, group) range shrink ``p`` in ``{1 - i/n_grid * max_shrink}`` minimizing the group's
    output error ``e^T H_gg e`` (H from every calibration token). Asymmetric grids shrink [min, max]
    towards zero proportionally; symmetric grids shrink the absmax."""
    wg, _mask = grouped_view(w.float(), scheme.effective_group_size(w.shape[1]))  # [N, G, gs]
    hb = group_hessian_blocks(h, scheme.group_size)  # [G, gs, gs] (padding rows/cols are zero)
    wmin = wg.amin(dim=-1, keepdim=True)
    wmax = wg.amax(dim=-1, keepdim=True)
    if scheme.sym:
        absmax = torch.maximum(-wmin, wmax)
        wmin, wmax = -absmax, absmax
    best_lo, best_hi = wmin, wmax
    best = _clipped_error(wg, hb, wmin, wmax, scheme.bits, scheme.sym)
    unclipped = float(best.sum())
    for i in range(1, n_grid):
        p = 1 - max_shrink * i / n_grid
        err = _clipped_error(wg, hb, p * wmin, p * wmax, scheme.bits, scheme.sym)
        better = err < best
        best = torch.where(better, err, best)
        best_lo = torch.where(better[..., None], p * wmin, best_lo)
        best_hi = torch.where(better[..., None], p * wmax, best_hi)
    return ClipPlan(name, best_lo[..., 0], best_hi[..., 0], float(best.sum()), unclipped)


# ---------------------------------------------------------------------------------------------------
# Applying plans (mutating)
# ---------------------------------------------------------------------------------------------------


def fold_scales_(smooth: nn.Module, balance: list[nn.Module], scales: torch.Tensor) -> None:
    """Divide ``smooth``'s outputs by ``scales`` and multiply the balanced linears' input columns by them
    (in place; computed in float32 or the parameter's wider dtype, stored in each parameter's dtype).
    ``smooth`` is a norm (its weight [K], and bias if any) or a linear (its output rows and bias)."""
    weight = smooth.weight.data

    def work(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.promote_types(t.dtype, torch.float32))

    s = work(scales).to(weight.device)
    if weight.dim() == 1:  # RMSNorm / LayerNorm: y = w * x_hat (+ b)
        smooth.weight.data = (work(weight) / s).to(weight.dtype)
    else:  # Linear: rows are output channels
        smooth.weight.data = (work(weight) / s[:, None]).to(weight.dtype)
    bias = getattr(smooth, "bias", None)
    if bias is not None:
        smooth.bias.data = (work(bias.data) / s).to(bias.dtype)
    for linear in balance:
        w = linear.weight.data
        linear.weight.data = (work(w) * s[None, :].to(w.device)).to(w.dtype)


def clip_weight_(linear: nn.Module, plan: ClipPlan, group_size: int | None) -> None:
    """Clamp each (row, group) of ``linear.weight`` to the plan's bounds (in place)."""
    w = linear.weight.data
    n, k = w.shape
    gs = k if group_size is None else group_size
    g_idx = torch.arange(k, device=w.device) // gs
    lo = plan.wmin.to(w.device)[:, g_idx]  # [N, G] -> [N, K]
    hi = plan.wmax.to(w.device)[:, g_idx]
    linear.weight.data = torch.minimum(torch.maximum(w.float(), lo), hi).to(w.dtype)
