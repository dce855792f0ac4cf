"""GPTQ (Frantar et al. 2022) as pure tensor functions: Hessian accumulation and one weight's quantization.

Shapes follow nn.Linear: ``W`` [N=out, K=in], ``X`` [tokens, K], ``H`` [K, K]. Nothing here touches
modules, files or a particular device; everything runs where ``W`` lives.

Hessian. ``accumulate_hessian`` keeps the running SUM of ``2 XᵀX`` in float32 over real (unmasked) tokens
and the token count ``n``; the caller passes the normalised ``H / n`` to ``gptq_quantize``
(llm-compressor style, simpler than the original's running rescale).

Algorithm (IST-DASLab ``fasterquant``, names as in the paper: ``W``, ``H``, ``Hinv``, ``Q``, ``Err1``):
1. dead columns (``H[i, i] == 0``, inputs always zero): ``H[i, i] = 1``, ``W[:, i] = 0``. If EVERY column is
   dead (H == 0: the layer saw no calibration tokens, e.g. an unrouted MoE expert) GPTQ would zero the
   whole weight, so it falls back to RTN instead, with a warning.
2. ``act_order``: permute columns by descending ``diag(H)``.
3. damping + inverse factor: ``Hinv = chol_upper((H + damp · mean(diag H) · I)⁻¹)``. If a factorization
   fails (or is non-finite), damp is multiplied by 10 and retried, with 1.0 as the last try
   (0.01 -> 0.1 -> 1.0); success at a raised damp logs a warning. If even damp = 1.0 fails (e.g. a NaN
   Hessian) the weight falls back to RTN with a warning and ``fallback="rtn"``, never an exception.
4. the column loop, in lazy batches of at most ``block_size`` columns: quantize column ``i``, spread its
   scaled error ``(w - q) / Hinv[i, i]`` over the not-yet-quantized columns of the block immediately and
   over the columns after the block once per block.

Grids. Per-channel (``group_size=None``) and ``static_groups`` grids are fixed up front from the
(dead-zeroed) unpermuted weight with ``grid.compute_qparams``. Otherwise ("dynamic" groups) group ``g``
covers loop positions ``[g·gs, (g+1)·gs)`` (permuted order under ``act_order``, so ``g_idx[k]`` is
``position(k) // gs``) and its grid is computed when the loop reaches it, from the CURRENT error-updated
weights. To make "current" exact, blocks are cut at group boundaries: a group always starts a block, when
every earlier column's lazy update has been applied. Hence results do not depend on ``block_size``
(up to float rounding); ``block_size`` is only an upper bound on the lazy-batch width.

Codes are chosen with the fp16-rounded scales that are stored, so ``result.weight.dequantize()`` is
exactly the ``Q`` whose error was fed back.

Objective. ``GPTQResult.loss`` is the GPTQ objective as the algorithm accounts it,
``Σ_rows Σ_i (w_i - q_i)² / (2 · Hinv[i, i]²)`` with ``w_i`` the error-updated weight when column ``i``
is quantized and ``Hinv`` the upper Cholesky factor of the damped inverse; in exact arithmetic it equals
``½ tr((W - Q) H_damped (W - Q)ᵀ)``. ``GPTQResult.hessian_error`` is ``tr((W - Q) H (W - Q)ᵀ)`` with the
given (undamped) ``H`` and the original ``W``: the output-error proxy to compare methods by.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .config import GPTQConfig
from .grid import compute_qparams, dequantize_codes, group_qparams, quantize_weight, round_to_grid
from .qtensor import QuantizedWeight, trivial_g_idx

logger = logging.getLogger(__name__)

DAMP_GROWTH = 10.0  # damp multiplier after a failed factorization
DAMP_CAP = 1.0  # last damp tried (1.0 = the mean Hessian diagonal) before falling back to RTN


@dataclass(frozen=True, eq=False)
class GPTQResult:
    """Outcome of quantizing one weight.

    weight: the quantized weight (codes in original column order; g_idx set only for dynamic act_order
        groups).
    loss: GPTQ objective ``Σ (w - q)² / (2 · Hinv[i, i]²)`` (see module docstring); for the RTN fallback,
        ``hessian_error / 2``.
    row_errors: ``e_n H e_nᵀ`` per row n of E = W - Q, with the undamped H given [N] (the pipeline sums
        the rows of each module of a stacked group, so the error is computed once).
    damp: damp fraction actually used (> config.damp when raised; the last one tried on fallback).
    dead_columns: columns with ``H[i, i] == 0`` (zeroed).
    fallback: None, or ``"rtn"`` when no damp up to DAMP_CAP gave a usable factorization or H is all zero.
    """

    weight: QuantizedWeight
    loss: float
    row_errors: torch.Tensor
    damp: float
    dead_columns: int
    fallback: str | None = None

    @property
    def hessian_error(self) -> float:
        """``tr((W - Q) H (W - Q)ᵀ)`` with the undamped H given."""
        return float(self.row_errors.sum())


@dataclass
class _Grids:
    """Per-group grids during the loop: scales/zeros float32 [N, G], group of each loop position [K]."""

    scales: torch.Tensor
    zeros: torch.Tensor
    col_group: torch.Tensor
    dynamic_size: int | None  # group_size when grids are computed on the fly, else None


def hessian_init(
    k: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, int]:
    """An empty Hessian sum: (H zeros [K, K], n = 0 tokens)."""
    return torch.zeros(k, k, dtype=dtype, device=device), 0


def accumulate_hessian(
    H: torch.Tensor, n_samples: int, X: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """Add ``2 XᵀX`` over real tokens to the sum ``H`` (updated IN PLACE, no [K, K] temporary) -> (H, n).

    X: [tokens, K] or [..., K], any float dtype (cast once to H's dtype, float32 by default).
    mask: bool [tokens] or [...] matching X's leading dims; False rows (padding) never enter H or n.
    The normalised Hessian is ``H / n``.
    """
    k = H.shape[0]
    X = X.reshape(-1, k)  # X [..., K] -> [tokens, K]
    if mask is not None:
        X = X[mask.reshape(-1).to(device=X.device, dtype=torch.bool)]  # [tokens, K] -> [real, K]
    X = X.to(H.dtype)
    H.addmm_(X.T, X, alpha=2.0)
    return H, n_samples + X.shape[0]


def accumulate_cross(
    D: torch.Tensor, X: torch.Tensor, X_float: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Add ``2 (X̃ − X)ᵀ X`` over real tokens to the sum ``D`` [K, K] (in place; the same scaling and
    token count as :func:`accumulate_hessian`): error-propagation GPTQ's cross term, X the quantized
    model's inputs [tokens, K] and X̃ the float model's on the same tokens."""
    k = D.shape[0]
    X, X_float = X.reshape(-1, k), X_float.reshape(-1, k)
    if mask is not None:
        keep = mask.reshape(-1).to(device=X.device, dtype=torch.bool)
        X, X_float = X[keep], X_float[keep]
    X = X.to(D.dtype)
    return D.addmm_((X_float.to(D.dtype) - X).T, X, alpha=2.0)


def propagation_target(
    W: torch.Tensor, H: torch.Tensor, D: torch.Tensor, alpha: float, damp: float
) -> torch.Tensor:
    """``W + α·W·D·(H + λI)⁻¹``: the weight GPTQ rounds to minimize ‖W·X̃ − Q·X‖ (GPTAQ / QEP).

    With ``H = 2XᵀX/n`` and ``D = 2(X̃ − X)ᵀX/n`` (row-major tokens), ‖Q·X − W·X̃‖² equals
    ``tr((Q − T) H (Q − T)ᵀ)`` plus a constant for ``T = W·(H + D)·H⁻¹ = W + W·D·H⁻¹``: GPTQ on ``T`` under
    ``H`` minimizes it. λ = ``damp`` · mean(diag H), raised ×10 up to the cap like GPTQ's when the
    factorization fails (the unchanged W if even that fails). D = 0 (the streams agree) or α = 0 give W
    exactly. Runs in W's dtype (float64 if given) on W's device.
    """
    dtype = _work_dtype(W, H, D)
    W0 = W.to(dtype)
    if alpha == 0 or not bool(D.any()):
        return W0.clone()
    Hd = H.to(device=W.device, dtype=dtype).clone()
    dead = torch.diagonal(Hd) == 0
    Hd[dead, dead] = 1
    for L, _tried in _damped_choleskys(Hd, damp):
        rhs = (W0 @ D.to(device=W.device, dtype=dtype)).T  # (W·D)ᵀ [K, N]
        shift = torch.cholesky_solve(rhs, L).T  # (H_d⁻¹ (W·D)ᵀ)ᵀ = W·D·H_d⁻¹ (H_d symmetric)
        if bool(torch.isfinite(shift).all()):
            return W0 + alpha * shift
    logger.warning("error propagation: no usable factorization of H; rounding the unshifted weight")
    return W0.clone()


def row_hessian_errors(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``(e_n H e_nᵀ)`` per row n of E = W - Q: [N] (float64 if any input is, else float32)."""
    dtype = _work_dtype(W, Q, H)
    E = W.to(dtype) - Q.to(device=W.device, dtype=dtype)  # [N, K]
    return ((E @ H.to(device=W.device, dtype=dtype)) * E).sum(dim=1)


def hessian_weighted_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)ᵀ)``: the sum of :func:`row_hessian_errors`."""
    return float(row_hessian_errors(W, Q, H).sum())


def gptq_quantize(
    W: torch.Tensor, H: torch.Tensor, config: GPTQConfig, *, name: str = "weight"
) -> GPTQResult:
    """GPTQ-quantize W [N, K] under the normalised Hessian H [K, K] (``name`` only labels log messages).

    Runs in float64 when W or H is float64, else float32, on W's device. Never raises on a bad Hessian:
    see the module docstring for the damp schedule and the RTN fallback.
    """
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"expected W [N, K] and H [K, K], got {tuple(W.shape)} and {tuple(H.shape)}")
    dtype = _work_dtype(W, H)
    W0 = W.to(dtype)
    H0 = H.to(device=W.device, dtype=dtype)
    W1, H1, dead = _mask_dead_columns(W0, H0)
    if bool(dead.all()):
        return _rtn_fallback(W0, H0, config, config.damp, int(dead.sum()), name, "H is all zero")
    importance = torch.diagonal(H1).clone()  # undamped diag(H) weights the grid search
    perm = _column_order(importance, config.act_order)
    if config.act_order:
        H1 = H1[perm[:, None], perm]  # H [K, K] -> [K, K] rows and columns in loop order
    Hinv, damp = _inverse_cholesky(H1, config.damp, name)
    if Hinv is None:
        reason = f"no usable Cholesky factorization up to damp={damp:g}"
        if not bool(torch.isfinite(H0).all()):
            reason += " (H has non-finite entries)"
        return _rtn_fallback(W0, H0, config, damp, int(dead.sum()), name, reason)
    grids = _initial_grids(W1, importance, perm, config)
    # W [N, K] -> [N, K] columns in loop order
    codes, loss = _quantize_columns(W1[:, perm], Hinv, grids, importance[perm], config)
    weight = _pack_result(codes, grids, perm, config)
    return GPTQResult(
        weight=weight,
        loss=loss,
        row_errors=row_hessian_errors(W0, weight.dequantize(dtype), H0),
        damp=damp,
        dead_columns=int(dead.sum()),
    )


def _work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _mask_dead_columns(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Copies of W, H with dead columns (H[i, i] == 0) zeroed in W and H[i, i] = 1; and the dead mask [K]."""
    W = W.clone()
    H = H.clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H, dead


def _inverse_cholesky(H: torch.Tensor, damp: float, name: str) -> tuple[torch.Tensor | None, float]:
    """Upper Cholesky factor of ``(H + damp · mean(diag H) · I)⁻¹`` -> (Hinv [K, K] | None, damp used).

    H is damped IN PLACE (the caller's private copy: no extra [K, K] buffer per try). On failure damp
    grows ×DAMP_GROWTH up to DAMP_CAP; None when even the cap fails.
    """
    for L, tried in _damped_choleskys(H, damp):
        Hinv, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
        if info.item() == 0 and bool(torch.isfinite(Hinv).all()):
            if tried != damp:
                logger.warning(
                    "GPTQ %s: Hessian not positive definite at damp=%g; quantized with damp=%g",
                    name,
                    damp,
                    tried,
                )
            return Hinv, tried
    return None, _damp_schedule(damp)[-1]


def _damped_choleskys(H: torch.Tensor, damp: float) -> Iterator[tuple[torch.Tensor, float]]:
    """Lower Cholesky factors L of ``H + d · mean(diag H) · I`` for d along :func:`_damp_schedule`,
    skipping the d whose factorization fails -> (L, d). H is damped IN PLACE (the caller's copy)."""
    mean_diag, applied = torch.diagonal(H).mean(), 0.0
    for tried in _damp_schedule(damp):
        H.diagonal().add_((tried - applied) * mean_diag)
        applied = tried
        L, info = torch.linalg.cholesky_ex(H)
        if info.item() == 0:
            yield L, tried


def _damp_schedule(damp: float) -> list[float]:
    """damp, damp·10, ... while below DAMP_CAP, then DAMP_CAP (0.01 -> [0.01, 0.1, 1.0])."""
    schedule = []
    while damp < DAMP_CAP:
        schedule.append(damp)
        damp *= DAMP_GROWTH
    return [*schedule, DAMP_CAP]


def _rtn_fallback(
    W: torch.Tensor,
    H: torch.Tensor,
    config: GPTQConfig,
    damp: float,
    dead_columns: int,
    name: str,
    reason: str,
) -> GPTQResult:
    """RTN of the original W (plain grid, no importance), reported as a fallback."""
    logger.warning(
        "GPTQ %s: %s; falling back to RTN for this weight. Check that the layer saw calibration "
        "tokens, use more samples, or raise damp.",
        name,
        reason,
    )
    weight = quantize_weight(W, config.scheme, grid=config.grid)
    rows = row_hessian_errors(W, weight.dequantize(W.dtype), H)
    return GPTQResult(weight, float(rows.sum()) / 2, rows, damp, dead_columns, fallback="rtn")


def _column_order(diag: torch.Tensor, act_order: bool) -> torch.Tensor:
    """Loop order perm [K]: descending diag(H) under act_order (stable), else identity."""
    if act_order:
        return torch.argsort(diag, descending=True, stable=True)
    return torch.arange(diag.shape[0], device=diag.device)


def _initial_grids(
    W: torch.Tensor, importance: torch.Tensor, perm: torch.Tensor, config: GPTQConfig
) -> _Grids:
    """Up-front grids (per-channel, static groups) or empty slots for dynamic groups.

    W [N, K], importance [K] are in ORIGINAL column order; ``col_group`` is indexed by loop position.
    """
    scheme = config.scheme
    n, k = W.shape
    if scheme.group_size is None or config.static_groups:
        scales, zeros = compute_qparams(W, scheme, grid=config.grid, importance=importance)
        col_group = trivial_g_idx(k, scheme.group_size, device=W.device).long()[perm]
        return _Grids(scales.float(), zeros.float(), col_group, dynamic_size=None)
    empty = torch.zeros(n, scheme.num_groups(k), dtype=torch.float32, device=W.device)
    col_group = torch.arange(k, device=W.device) // scheme.group_size
    return _Grids(empty, empty.clone(), col_group, dynamic_size=scheme.group_size)


def _quantize_columns(
    W: torch.Tensor, Hinv: torch.Tensor, grids: _Grids, importance: torch.Tensor, config: GPTQConfig
) -> tuple[torch.Tensor, float]:
    """The lazy-batch column loop over W [N, K] in loop order (W is updated in place).

    Fills dynamic group grids in ``grids``; returns (codes uint8 [N, K] in loop order, loss).
    """
    n, k = W.shape
    gs = grids.dynamic_size
    codes = torch.empty(n, k, dtype=torch.uint8, device=W.device)
    loss = torch.zeros((), dtype=W.dtype, device=W.device)
    i1 = 0
    while i1 < k:
        i2 = min(i1 + config.block_size, k)
        if gs is not None:
            i2 = min(i2, (i1 // gs + 1) * gs)  # a block never straddles a group boundary
            if i1 % gs == 0:  # group start: W[:, i1:] has every earlier column's update
                _fill_group_grid(grids, W, i1, min(i1 + gs, k), importance, config)
        scale1 = grids.scales[:, grids.col_group[i1:i2]]  # [N, G] -> [N, i2 - i1]
        zero1 = grids.zeros[:, grids.col_group[i1:i2]]  # [N, G] -> [N, i2 - i1]
        codes[:, i1:i2], Err1 = _quantize_block(
            W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2], scale1, zero1, config
        )
        loss += Err1.pow(2).sum() / 2
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1.0)  # lazy update of the later columns
        i1 = i2
    return codes, float(loss)


def _quantize_block(
    W1: torch.Tensor, Hinv1: torch.Tensor, scale1: torch.Tensor, zero1: torch.Tensor, config: GPTQConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Column-by-column GPTQ inside one block W1 [N, B] -> (codes uint8 [N, B], Err1 [N, B])."""
    bits = config.scheme.bits
    codes1 = torch.empty_like(scale1)
    Err1 = torch.zeros_like(W1)
    for i in range(W1.shape[1]):
        w = W1[:, i]
        codes1[:, i] = round_to_grid(w, scale1[:, i], zero1[:, i], bits)
        q = dequantize_codes(codes1[:, i], scale1[:, i], zero1[:, i]).to(W1.dtype)
        err1 = (w - q) / Hinv1[i, i]
        W1[:, i + 1 :].addr_(err1, Hinv1[i, i + 1 :], alpha=-1.0)
        Err1[:, i] = err1
    return codes1.to(torch.uint8), Err1


def _fill_group_grid(
    grids: _Grids, W: torch.Tensor, j1: int, j2: int, importance: torch.Tensor, config: GPTQConfig
) -> None:
    """Grid of the group at loop positions [j1, j2) from the current W (ragged last group allowed)."""
    scheme = config.scheme
    scale, zero = group_qparams(
        W[:, j1:j2].contiguous(), scheme.bits, scheme.sym, grid=config.grid, importance=importance[j1:j2]
    )  # [N, j2 - j1] -> [N, 1]
    g = j1 // grids.dynamic_size
    grids.scales[:, g] = scale[:, 0]
    grids.zeros[:, g] = zero[:, 0]


def _pack_result(
    codes: torch.Tensor, grids: _Grids, perm: torch.Tensor, config: GPTQConfig
) -> QuantizedWeight:
    """QuantizedWeight in original column order; g_idx only for dynamic groups under act_order."""
    invperm = torch.argsort(perm)  # original column -> loop position
    g_idx = None
    if config.act_order and grids.dynamic_size is not None:
        g_idx = grids.col_group[invperm].to(torch.int32)
    return QuantizedWeight(
        codes=codes[:, invperm],
        scales=grids.scales.half(),
        zeros=grids.zeros.to(torch.uint8),
        bits=config.scheme.bits,
        group_size=config.scheme.group_size,
        g_idx=g_idx,
    )
