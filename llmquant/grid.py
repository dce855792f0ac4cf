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

from .config import GRIDS, QuantScheme  # GRIDS: how a group's scale/zero are chosen
from .qtensor import QuantizedWeight

MIN_SCALE = 2.0**-20  # exactly representable in float16 (subnormal); guards all-zero groups
MSE_GRID = 100
MSE_MAX_SHRINK = 0.8
MSE_NORM = 2.4
SEARCH_MIN_RATIO = 0.2  # "search": ranges shrunk down to a fifth of the min-max one are tried
SEARCH_COARSE = 11  # asym: ratios 1.0, 0.92, ..., 0.2 for each end of the range (11 x 11 pairs) ...
SEARCH_FINE = ((-0.04, -0.02, 0.0, 0.02, 0.04), (-0.01, 0.0, 0.01))  # ... then offsets around the best
SEARCH_SYM = 81  # sym: scale ratios 1.0, 0.99, ..., 0.2 of the tight scale (plus the min-max one)
SEARCH_NORM = 3.0  # the error's exponent: sum(importance * |w - w_hat|**SEARCH_NORM) (module docstring)
SEARCH_REFINE = 2  # least-squares refits of scale (and zero) for the chosen codes, kept where better


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
    grid: str = "minmax",
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """qparams over the last dim: w [..., g] -> (scale [..., 1], zero [..., 1]).

    ``grid``: ``"minmax"`` the plain range; ``"mse"`` shrinks the min-max range by p in
    (1 - MSE_MAX_SHRINK, 1] and keeps, per row, the p minimizing sum(importance * |w - w_hat|**MSE_NORM);
    ``"search"`` minimizes the importance-weighted squared error over a wider family
    (:func:`search_qparams`). ``importance`` [g] or broadcastable (e.g. the Hessian diagonal; 0 on
    padding); default uniform.
    """
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    if grid == "search":
        return search_qparams(w, bits, sym, importance)
    wmin = w.amin(dim=-1, keepdim=True)
    wmax = w.amax(dim=-1, keepdim=True)
    scale, zero = qparams_from_range(wmin, wmax, bits, sym)
    if grid == "minmax":
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


def search_qparams(
    w: torch.Tensor, bits: int, sym: bool, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid minimizing ``sum(importance * (w - w_hat)**2)`` per row of w [..., g] -> scale, zero [..., 1].

    Candidates always include the min-max grid, so the result's weighted error is never above it.
    sym: scales ``p * s_tight`` for p in [SEARCH_MIN_RATIO, 1], where the tight scale
    ``max(-min / 2**(b-1), max / (2**(b-1) - 1))`` puts the larger side of the group exactly on the
    extreme code it can use (-8 or +7 at 4 bits: nothing is clipped and, for a group whose largest
    magnitude is negative, the -8 level is used) -- against min-max's ``absmax / 7.5``, which clips a
    positive maximum. asym: each end of the range [min(w, 0), max(w, 0)] shrunk independently (a coarse
    grid, then two finer ones around each row's best pair). Then SEARCH_REFINE least-squares refits of
    the scale (asym: scale and zero) for the chosen codes, each kept only where it lowers the error.
    Scales are rounded to float16 before codes are chosen, as everywhere.
    """
    w = w.float()
    imp = torch.ones_like(w) if importance is None else importance.float().expand_as(w)
    wmin = torch.minimum(w.amin(dim=-1, keepdim=True), torch.zeros((), device=w.device))
    wmax = torch.maximum(w.amax(dim=-1, keepdim=True), torch.zeros((), device=w.device))
    best = _Best(w, imp, bits, *qparams_from_range(wmin, wmax, bits, sym))
    if sym:
        half = float(1 << (bits - 1))
        tight = torch.maximum(-wmin / half, wmax / (half - 1))
        for p in torch.linspace(1.0, SEARCH_MIN_RATIO, SEARCH_SYM).tolist():
            best.offer(_fp16_scale(p * tight), best.zero)
    else:
        ratios = torch.linspace(1.0, SEARCH_MIN_RATIO, SEARCH_COARSE).tolist()
        p_lo = p_hi = torch.ones_like(wmin)
        for a in ratios:
            for b in ratios:
                if best.offer(*qparams_from_range(a * wmin, b * wmax, bits, sym)) is not None:
                    p_lo = torch.where(best.last_better, a, p_lo)
                    p_hi = torch.where(best.last_better, b, p_hi)
        for offsets in SEARCH_FINE:
            centre_lo, centre_hi = p_lo, p_hi
            for da in offsets:
                for db in offsets:
                    a = (centre_lo + da).clamp(SEARCH_MIN_RATIO, 1.0)
                    b = (centre_hi + db).clamp(SEARCH_MIN_RATIO, 1.0)
                    if best.offer(*qparams_from_range(a * wmin, b * wmax, bits, sym)) is not None:
                        p_lo = torch.where(best.last_better, a, p_lo)
                        p_hi = torch.where(best.last_better, b, p_hi)
    for _ in range(SEARCH_REFINE):
        best.offer(*_least_squares_grid(w, imp, best, bits, sym))
    return best.scale, best.zero


class _Best:
    """The lowest-error grid so far per row (scale, zero [..., 1]) for w [..., g] under ``imp``."""

    def __init__(
        self, w: torch.Tensor, imp: torch.Tensor, bits: int, scale: torch.Tensor, zero: torch.Tensor
    ):
        self.w, self.imp, self.bits = w, imp, bits
        self.scale, self.zero = scale, zero
        self.error = self._error(scale, zero)
        self.last_better = torch.zeros_like(self.error, dtype=torch.bool)

    def _error(self, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return _grid_error(self.w, scale, zero, self.bits, self.imp, SEARCH_NORM)

    def offer(self, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor | None:
        """Keep (scale, zero) where they lower the error; the mask of those rows, or None if none."""
        scale = scale.expand_as(self.scale)
        zero = zero.expand_as(self.zero)
        err = self._error(scale, zero)
        better = err < self.error
        self.last_better = better
        if not bool(better.any()):
            return None
        self.scale = torch.where(better, scale, self.scale)
        self.zero = torch.where(better, zero, self.zero)
        self.error = torch.where(better, err, self.error)
        return better

    def codes(self) -> torch.Tensor:
        return round_to_grid(self.w, self.scale, self.zero, self.bits)


def _least_squares_grid(
    w: torch.Tensor, imp: torch.Tensor, best: _Best, bits: int, sym: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted least-squares scale (asym: and zero, rounded to an integer code) for the current codes."""
    q = best.codes()
    maxq = (1 << bits) - 1
    if sym:  # w ~ s * (q - z), z fixed
        d = q - best.zero
        den = (imp * d * d).sum(-1, keepdim=True)
        s = (imp * w * d).sum(-1, keepdim=True) / den.clamp(min=1e-30)
        s = torch.where(den > 0, s, best.scale)
        return _fp16_scale(s), best.zero
    # w ~ a * q + c: weighted linear regression per row; s = a, z = -c / a
    sw = imp.sum(-1, keepdim=True).clamp(min=1e-30)
    mq = (imp * q).sum(-1, keepdim=True) / sw
    mw = (imp * w).sum(-1, keepdim=True) / sw
    dq = q - mq
    var = (imp * dq * dq).sum(-1, keepdim=True)
    a = (imp * dq * (w - mw)).sum(-1, keepdim=True) / var.clamp(min=1e-30)
    ok = (var > 0) & (a > 0)
    s = _fp16_scale(torch.where(ok, a, best.scale))
    z = torch.where(ok, torch.round(mq - mw / s), best.zero).clamp(0, maxq)
    return s, z


def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    return scale.clamp(min=MIN_SCALE).half().float()


def _grid_error(
    w: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    importance: torch.Tensor | None,
    norm: float = MSE_NORM,
) -> torch.Tensor:
    """sum(importance * |w - w_hat|**norm) over the last dim -> [..., 1]."""
    err = (dequantize_codes(round_to_grid(w, scale, zero, bits), scale, zero) - w.float()).abs()
    err = err.pow(norm)
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
    w: torch.Tensor, scheme: QuantScheme, *, grid: str = "minmax", importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group qparams of W [N, K] -> (scales float16 [N, G], zeros uint8 [N, G]).

    ``importance`` [K] weights the ``grid`` search per input column (e.g. diag(H)). Ragged last group:
    its padding columns are excluded from min/max (padding repeats a real value) and from the error.
    """
    n, k = w.shape
    gs = scheme.effective_group_size(k)
    wg, mask = grouped_view(w.float(), gs)
    imp = mask if importance is None else grouped_view(importance.float()[None, :], gs)[0][0] * mask
    scale, zero = group_qparams(wg, scheme.bits, scheme.sym, grid=grid, importance=imp)
    return scale[..., 0].half(), zero[..., 0].to(torch.uint8)  # [N, G, 1] -> [N, G]


def _codes_of_groups(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, g_idx: torch.Tensor
) -> torch.Tensor:
    """uint8 codes [N, K] of W [N, K] given per-group scales/zeros [N, G] and g_idx [K]."""
    s = scales.float()[:, g_idx.long()]  # [N, G] -> [N, K]
    z = zeros.float()[:, g_idx.long()]
    return round_to_grid(w, s, z, bits).to(torch.uint8)


def quantize_weight(
    w: torch.Tensor, scheme: QuantScheme, *, grid: str = "minmax", importance: torch.Tensor | None = None
) -> QuantizedWeight:
    """Round-to-nearest quantization of W [N, K] (RTN)."""
    from .qtensor import trivial_g_idx

    scales, zeros = compute_qparams(w, scheme, grid=grid, importance=importance)
    g_idx = trivial_g_idx(w.shape[1], scheme.group_size, device=w.device)
    codes = _codes_of_groups(w, scales, zeros, scheme.bits, g_idx)
    return QuantizedWeight(codes, scales, zeros, scheme.bits, scheme.group_size)


def fake_quantize(w: torch.Tensor, scheme: QuantScheme, *, grid: str = "minmax") -> torch.Tensor:
    """quantize -> dequantize, in W's dtype (bit-identical to ``quantize_weight(...).dequantize()``,
    computed on the grouped view without materializing codes, scales per column or g_idx)."""
    n, k = w.shape
    wg, _mask = grouped_view(w.float(), scheme.effective_group_size(k))  # [N, G, gs]
    imp = _mask if grid != "minmax" else None
    scale, zero = group_qparams(wg, scheme.bits, scheme.sym, grid=grid, importance=imp)
    q = round_to_grid(wg, scale, zero, scheme.bits)
    return dequantize_codes(q, scale, zero).reshape(n, -1)[:, :k].to(w.dtype)
