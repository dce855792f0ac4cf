"""Pure groupwise quantization grids: qparams, quantize, dequantize, fake-quantize.

Shapes follow nn.Linear: ``W`` [N, K]. A group is ``group_size`` consecutive input columns of one
output row; K need not be a multiple of group_size (the last group is then shorter, "ragged").

Grid conventions (identical to GPTQ/AutoGPTQ so checkpoints interoperate):
- asym: range [min(w, 0), max(w, 0)], ``scale = (max - min) / maxq``, ``zero = round(-min / scale)``.
- sym:  ``scale = 2 * absmax / maxq``, ``zero = 2**(bits-1)`` (4-bit: scale = absmax / 7.5, codes
  0..15 around 8, i.e. signed values -8..7).
- codes ``q = clamp(round(w / scale) + zero, 0, maxq)``; ``w_hat = scale * (q - zero)``.
Scales are rounded to float16 *before* the codes are chosen, so that what is stored on disk (fp16)
reproduces the in-memory quantized weight exactly.
"""

from __future__ import annotations

import torch

from .config import QuantScheme
from .qtensor import QuantizedWeight

MIN_SCALE = 2.0**-20  # exactly representable in float16 (subnormal); guards all-zero groups
MSE_GRID = 100
MSE_MAX_SHRINK = 0.8
MSE_NORM = 2.4


def qparams_from_range(
    wmin: torch.Tensor, wmax: torch.Tensor, bits: int, sym: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp16-representable float32) and zero (float32 integer) for ranges [wmin, wmax]."""
    maxq = (1 << bits) - 1
    wmin = torch.minimum(wmin.float(), torch.zeros_like(wmin, dtype=torch.float32))
    wmax = torch.maximum(wmax.float(), torch.zeros_like(wmax, dtype=torch.float32))
    if sym:
        scale = 2 * torch.maximum(-wmin, wmax) / maxq
    else:
        scale = (wmax - wmin) / maxq
    scale = scale.clamp(min=MIN_SCALE).half().float()
    if sym:
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        zero = torch.round(-wmin / scale).clamp(0, maxq)
    return scale, zero


def round_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (float32 holding integers) of ``w`` on the grid; scale/zero broadcast against w."""
    maxq = (1 << bits) - 1
    q = w.float() / scale
    return q.round_().add_(zero).clamp_(0, maxq)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """float32 ``scale * (q - zero)``."""
    return scale * (q.float() - zero)


def group_qparams(
    w: torch.Tensor,
    bits: int,
    sym: bool,
    *,
    mse: bool = False,
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """qparams over the last dim: w [..., g] -> (scale [..., 1], zero [..., 1]).

    With ``mse``, shrink the min-max range by p in (1 - MSE_MAX_SHRINK, 1] and keep, per row, the p
    minimizing sum(importance * |w - w_hat|**MSE_NORM) (importance [g] or broadcastable, e.g. the
    Hessian diagonal; default uniform).
    """
    wmin = w.amin(dim=-1, keepdim=True)
    wmax = w.amax(dim=-1, keepdim=True)
    scale, zero = qparams_from_range(wmin, wmax, bits, sym)
    if not mse:
        return scale, zero
    best = _grid_error(w, scale, zero, bits, importance)
    for i in range(1, int(MSE_MAX_SHRINK * MSE_GRID) + 1):
        p = 1 - i / MSE_GRID
        s, z = qparams_from_range(p * wmin, p * wmax, bits, sym)
        err = _grid_error(w, s, z, bits, importance)
        better = err < best
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
        best = torch.where(better, err, best)
    return scale, zero


def _grid_error(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, importance: torch.Tensor | None
) -> torch.Tensor:
    err = (dequantize_codes(round_to_grid(w, scale, zero, bits), scale, zero) - w.float()).abs()
    err = err.pow(MSE_NORM)
    if importance is not None:
        err = err * importance
    return err.sum(dim=-1, keepdim=True)


def grouped_view(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] -> ([N, G, group_size] padded by repeating each row's last column, mask [G, gs])."""
    n, k = w.shape
    g = -(-k // group_size)
    pad = g * group_size - k
    if pad:
        w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1)
    mask = torch.ones(g * group_size, dtype=w.dtype, device=w.device)
    if pad:
        mask[k:] = 0
    return w.reshape(n, g, group_size), mask.reshape(g, group_size)  # W [N, G*gs] -> [N, G, gs]


def compute_qparams(
    w: torch.Tensor, scheme: QuantScheme, *, mse: bool = False, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group qparams of W [N, K] -> (scales float16 [N, G], zeros uint8 [N, G]).

    ``importance`` [K] weights the MSE search per input column (e.g. diag(H)). Ragged last group:
    its padding columns are excluded from min/max (padding repeats a real value) and from the error.
    """
    n, k = w.shape
    gs = scheme.effective_group_size(k)
    wg, mask = grouped_view(w.float(), gs)
    imp = mask if importance is None else grouped_view(importance.float()[None, :], gs)[0][0] * mask
    scale, zero = group_qparams(wg, scheme.bits, scheme.sym, mse=mse, importance=imp)
    return scale[..., 0].half(), zero[..., 0].to(torch.uint8)  # [N, G, 1] -> [N, G]


def _codes_of_groups(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, g_idx: torch.Tensor
) -> torch.Tensor:
    """uint8 codes [N, K] of W [N, K] given per-group scales/zeros [N, G] and g_idx [K]."""
    s = scales.float()[:, g_idx.long()]  # [N, G] -> [N, K]
    z = zeros.float()[:, g_idx.long()]
    return round_to_grid(w, s, z, bits).to(torch.uint8)


def quantize_weight(
    w: torch.Tensor, scheme: QuantScheme, *, mse: bool = False, importance: torch.Tensor | None = None
) -> QuantizedWeight:
    """Round-to-nearest quantization of W [N, K] (RTN)."""
    from .qtensor import trivial_g_idx

    scales, zeros = compute_qparams(w, scheme, mse=mse, importance=importance)
    g_idx = trivial_g_idx(w.shape[1], scheme.group_size, device=w.device)
    codes = _codes_of_groups(w, scales, zeros, scheme.bits, g_idx)
    return QuantizedWeight(codes, scales, zeros, scheme.bits, scheme.group_size)


def fake_quantize(w: torch.Tensor, scheme: QuantScheme, *, mse: bool = False) -> torch.Tensor:
    """quantize -> dequantize, in W's dtype (bit-identical to ``quantize_weight(...).dequantize()``,
    computed on the grouped view without materializing codes, scales per column or g_idx)."""
    n, k = w.shape
    wg, _mask = grouped_view(w.float(), scheme.effective_group_size(k))  # [N, G, gs]
    scale, zero = group_qparams(wg, scheme.bits, scheme.sym, mse=mse, importance=_mask if mse else None)
    q = round_to_grid(wg, scale, zero, scheme.bits)
    return dequantize_codes(q, scale, zero).reshape(n, -1)[:, :k].to(w.dtype)
