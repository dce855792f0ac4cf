"""Split-K GEMV for skinny activations (M = 1..16 rows; dispatched for M <= ``GEMV_MAX_M``).

y [M, N] = x[:, perm] [M, K] @ W^T [K, N] (+ bias), W in the kernel layout (``layout.py``), x fp16 /
bf16 / fp32, accumulation in fp32, y in x's dtype. bits in {2, 4, 8}; any K (ragged K and ragged last
group), any N, any group_size (per-channel included).

Decomposition of ``_gemv_kernel``: grid (cdiv(N, BLOCK_N), SPLIT_K). Program (n, s) owns output columns
[n*BLOCK_N, (n+1)*BLOCK_N) for all M rows (BLOCK_M = next_power_of_2(M) <= 16) and the contiguous
K range s*K_SPLIT .. (s+1)*K_SPLIT, K_SPLIT a multiple of BLOCK_K. Per BLOCK_K step it

1. streams the [BLOCK_K / PACK, BLOCK_N] packed words of the tile (``evict_first``: read exactly once;
   one load per word) and, when BLOCK_K divides group_size, the group's one row of scales/zeros,
2. for each of the PACK slices j (bit field j of every word row, ``dequant._slice_rows``): shifts out the
   codes, converts them with the fp32 magic number (bits(0x4B000000 | q) = 2^23 + q, minus 2^23 + z:
   exactly q - z, two integer ops and one FADD per weight, no I2F), loads the matching [BLOCK_M, BLOCK_K /
   PACK] activation columns (``evict_last``: every program re-reads x; act-order gathers them through
   ``perm``, so x is never permuted in memory) and accumulates x * (q - z) with one FFMA per weight and
   row into an fp32 [BLOCK_M, BLOCK_K / PACK, BLOCK_N] tile,
3. reduces that tile over K and multiplies by the group's scales once per tile (scales factored out of
   the inner product). A tile that straddles groups (BLOCK_K not dividing group_size, ragged groups)
   gathers scales per row and applies them per weight instead.

Numerics: y = sum_g s_g * sum_{k in g} x_k (q_k - z_g) in fp32. The weight is never rounded to the
activation dtype, so the result differs from ``quant_matmul_ref`` (which rounds W once to x's dtype)
by at most that rounding (the tests check it is at least as accurate as the reference against the
exact product).

M = 1 (the dispatched case) keeps everything 2-D. When BLOCK_K divides group_size (the usual case) and the
config's ``FAST`` flag is on (default) it runs ``_gemv_one_row_fast``: codes are placed in the mantissa of 1.0
(``dequant._mantissa_codes``: 1 + q / 2^bits, one shift and one LOP3) and the zero point and scale are applied
once per tile and row through the tile's sum of x, 3 ops per weight instead of the 5 of ``_gemv_one_row``
(which handles tiles spanning groups). 2..16 rows use a 3-D broadcast product (``_gemv_rows``).
The fp32 sums are stored directly (SPLIT_K == 1); with SPLIT_K > 1 (lets a
handful of output tiles fill all SMs) the splits write partials to a workspace and the last split of
each tile reduces them, adds the bias and stores y (``dequant._store_tile``): one launch either way.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._jit import (
    _group_params,
    _load_words,
    _load_words_until,
    _magic_f32,
    _mantissa_codes,
    _slice_codes,
    _slice_rows,
    _store_tile,
    _x_cols,
)
from ._launch import finish, kernel_args, prepare
from .configs import autotune_options, check_config, gemv_configs, prune_gemv, tuned_max_split
from .layout import quant_matmul_ref

GEMV_MAX_BLOCK_M = 16


@triton.jit
def _slice_weight(
    words, j, zf, scales_ptr, zeros_ptr, offs_k, offs_n, k0, K, N,
    stride_sg, stride_sn, stride_zg, stride_zn,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr,
):  # fmt: skip
    """fp32 [BLOCK_K / PACK, BLOCK_N] weights of slice j: q - z (exact; the caller applies the tile's one
    scale row) when the tile lies in one group, else (q - z) * s with per-row scales/zeros."""
    qf = _magic_f32(_slice_codes(words, j, BITS))  # 2^23 + q
    if GROUP_SIZE % BLOCK_K == 0:
        return qf - zf  # (2^23 + q) - (2^23 + z) = q - z, exact
    s_j, z_j = _group_params(
        scales_ptr, zeros_ptr, offs_k, offs_n, k0, K, N,
        stride_sg, stride_sn, stride_zg, stride_zn, GROUP_SIZE, BLOCK_K, EVEN_N, "evict_first",
    )  # fmt: skip
    return (qf - _magic_f32(z_j)) * s_j.to(tl.float32)


@triton.jit
def _tile_params(
    qweight_ptr, scales_ptr, zeros_ptr, k0, offs_n, K, N,
    stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
):  # fmt: skip
    """The tile's packed words, its group's scale row and 2^23 + zero row (one group per tile case)."""
    words = _load_words(
        qweight_ptr, k0, offs_n, K, N, stride_qk, stride_qn, BITS, BLOCK_K, EVEN_K, EVEN_N, "evict_first"
    )  # fmt: skip
    scale, zero = _group_params(
        scales_ptr, zeros_ptr, _slice_rows(k0, 0, BITS, BLOCK_K), offs_n, k0, K, N,
        stride_sg, stride_sn, stride_zg, stride_zn, GROUP_SIZE, BLOCK_K, EVEN_N, "evict_first",
    )  # fmt: skip
    zf = _magic_f32(zero)  # 2^23 + z
    return words, scale.to(tl.float32), zf


@triton.jit
def _gemv_one_row(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, perm_ptr, offs_n, k_start, k_end, K, N,
    stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_PERM: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
):  # fmt: skip
    """M = 1: everything stays 2-D in the word tile's layout. A [BLOCK_K / PACK, BLOCK_N] fp32
    accumulator takes one FFMA per weight; the scale row is applied once per tile (scale * tile sum
    over the PACK slices) and the K reduction across threads happens once, after the loop."""
    PACK: tl.constexpr = 32 // BITS
    acc2 = tl.zeros((BLOCK_K // PACK, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        words, scale, zf = _tile_params(
            qweight_ptr, scales_ptr, zeros_ptr, k0, offs_n, K, N, stride_qk, stride_qn,
            stride_sg, stride_sn, stride_zg, stride_zn, BITS, GROUP_SIZE, BLOCK_K, EVEN_K, EVEN_N,
        )  # fmt: skip
        t = tl.zeros((BLOCK_K // PACK, BLOCK_N), dtype=tl.float32)
        for j in tl.static_range(PACK):
            offs_k = _slice_rows(k0, j, BITS, BLOCK_K)
            w = _slice_weight(
                words, j, zf, scales_ptr, zeros_ptr, offs_k, offs_n, k0, K, N,
                stride_sg, stride_sn, stride_zg, stride_zn, BITS, GROUP_SIZE, BLOCK_K, EVEN_N,
            )  # fmt: skip
            x_cols, mask_k = _x_cols(perm_ptr, offs_k, K, HAS_PERM)
            if EVEN_K:
                x = tl.load(x_ptr + x_cols * stride_xk, eviction_policy="evict_last")
            else:
                x = tl.load(x_ptr + x_cols * stride_xk, mask=mask_k, other=0.0, eviction_policy="evict_last")
            t += x.to(tl.float32)[:, None] * w
        if GROUP_SIZE % BLOCK_K == 0:
            acc2 += t * scale
        else:
            acc2 += t
    return tl.sum(acc2, axis=0)[None, :]  # [1, BLOCK_N]


@triton.jit
def _gemv_one_row_fast(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, perm_ptr, offs_n, k_start, k_end, K, N,
    stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_PERM: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, PREFETCH: tl.constexpr,
):  # fmt: skip
    """M = 1, every tile inside one group (GROUP_SIZE % BLOCK_K == 0): ``_gemv_one_row`` with 3 ops per
    weight instead of 5 (``_mantissa_codes``: shift, LOP3, FFMA; the zero point and scale are applied
    once per tile and row through the tile's sum of x). With PREFETCH the next tile's words are loaded
    before this tile is computed (register double buffer), so the load latency overlaps the math."""
    PACK: tl.constexpr = 32 // BITS
    TWO_B: tl.constexpr = 1 << BITS
    acc2 = tl.zeros((BLOCK_K // PACK, BLOCK_N), dtype=tl.float32)
    if PREFETCH:
        nxt = _load_words_until(
            qweight_ptr, k_start, offs_n, k_end, N, stride_qk, stride_qn, BITS, BLOCK_K, EVEN_N, "evict_first"
        )  # fmt: skip
    for k0 in range(k_start, k_end, BLOCK_K):
        if PREFETCH:
            words = nxt
            nxt = _load_words_until(
                qweight_ptr, k0 + BLOCK_K, offs_n, k_end, N, stride_qk, stride_qn,
                BITS, BLOCK_K, EVEN_N, "evict_first",
            )  # fmt: skip
        else:
            words = _load_words_until(
                qweight_ptr, k0, offs_n, k_end, N, stride_qk, stride_qn, BITS, BLOCK_K, EVEN_N, "evict_first"
            )  # fmt: skip
        scale, zero = _group_params(
            scales_ptr, zeros_ptr, _slice_rows(k0, 0, BITS, BLOCK_K), offs_n, k0, K, N,
            stride_sg, stride_sn, stride_zg, stride_zn, GROUP_SIZE, BLOCK_K, EVEN_N, "evict_first",
        )  # fmt: skip
        t = tl.zeros((BLOCK_K // PACK, BLOCK_N), dtype=tl.float32)
        xs = tl.zeros((BLOCK_K // PACK,), dtype=tl.float32)
        for j in tl.static_range(PACK):
            x_cols, mask_k = _x_cols(perm_ptr, _slice_rows(k0, j, BITS, BLOCK_K), K, HAS_PERM)
            if EVEN_K:
                x = tl.load(x_ptr + x_cols * stride_xk, eviction_policy="evict_last").to(tl.float32)
            else:
                x = tl.load(x_ptr + x_cols * stride_xk, mask=mask_k, other=0.0, eviction_policy="evict_last")
                x = x.to(tl.float32)
            t += x[:, None] * _mantissa_codes(words, j, BITS, K)  # x (1 + q / 2^B)
            xs += x
        s = scale.to(tl.float32)
        # s * sum x (q - z) = (2^B s) * sum x (1 + q / 2^B) - ((2^B + z) s) * sum x: two FFMAs per element
        acc2 += t * (s * TWO_B)
        acc2 -= xs[:, None] * (s * (zero.to(tl.float32) + TWO_B))
    return tl.sum(acc2, axis=0)[None, :]  # [1, BLOCK_N]


@triton.jit
def _gemv_rows(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, perm_ptr, offs_m, offs_n, k_start, k_end, M, K, N,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_PERM: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
):  # fmt: skip
    """2 <= M <= 16: a [BLOCK_M, BLOCK_K / PACK, BLOCK_N] broadcast product per slice, reduced per tile."""
    PACK: tl.constexpr = 32 // BITS
    mask_m = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        words, scale, zf = _tile_params(
            qweight_ptr, scales_ptr, zeros_ptr, k0, offs_n, K, N, stride_qk, stride_qn,
            stride_sg, stride_sn, stride_zg, stride_zn, BITS, GROUP_SIZE, BLOCK_K, EVEN_K, EVEN_N,
        )  # fmt: skip
        part = tl.zeros((BLOCK_M, BLOCK_K // PACK, BLOCK_N), dtype=tl.float32)
        for j in tl.static_range(PACK):
            offs_k = _slice_rows(k0, j, BITS, BLOCK_K)
            w = _slice_weight(
                words, j, zf, scales_ptr, zeros_ptr, offs_k, offs_n, k0, K, N,
                stride_sg, stride_sn, stride_zg, stride_zn, BITS, GROUP_SIZE, BLOCK_K, EVEN_N,
            )  # fmt: skip
            x_cols, mask_k = _x_cols(perm_ptr, offs_k, K, HAS_PERM)
            x_ptrs = x_ptr + offs_m[:, None] * stride_xm + x_cols[None, :] * stride_xk
            x_mask = mask_m[:, None] if EVEN_K else mask_m[:, None] & mask_k[None, :]
            x = tl.load(x_ptrs, mask=x_mask, other=0.0, eviction_policy="evict_last").to(tl.float32)
            part += x[:, :, None] * w[None, :, :]
        tile = tl.sum(part, axis=1)  # [BLOCK_M, BLOCK_N]
        if GROUP_SIZE % BLOCK_K == 0:
            tile = tile * scale
        acc += tile
    return acc


@triton.heuristics(
    {
        "EVEN_K": lambda a: a["K"] % (a["BLOCK_K"] * a["SPLIT_K"]) == 0,
        "EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0,
    }
)
@triton.jit
def _gemv_kernel(
    # pointers: x [M, K] (fp16/bf16/fp32), qweight int32 [ceil(K*BITS/32), N], scales fp16 [G, N],
    # zeros uint8 [G, N], perm int [K], bias [N], y [M, N] (x's dtype), ws fp32 [SPLIT_K, M, N],
    # lock int32 [tiles] (zeros; split-K tile counters)
    x_ptr,
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
    perm_ptr,
    bias_ptr,
    y_ptr,
    ws_ptr,
    lock_ptr,
    # sizes
    M,
    N,
    K,
    # strides
    stride_xm,
    stride_xk,
    stride_qk,
    stride_qn,
    stride_sg,
    stride_sn,
    stride_zg,
    stride_zn,
    stride_ym,
    stride_yn,
    # meta-parameters
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    FP16_MATH: tl.constexpr,  # unused here (fp32 math throughout); shared flag set
    FP32_DOT: tl.constexpr,  # unused here (no tl.dot)
    HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    FAST: tl.constexpr = True,  # M = 1, one group per tile: _gemv_one_row_fast
    PREFETCH: tl.constexpr = False,  # its register double buffer (slower on H100: off)
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)

    # ---- this program's columns and contiguous K range --------------------------------------------
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_split = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_start = pid_k * k_split
    k_end = tl.minimum(k_start + k_split, K)

    # ---- stream weights, accumulate in fp32 --------------------------------------------------------
    if BLOCK_M == 1 and FAST and GROUP_SIZE % BLOCK_K == 0:
        acc = _gemv_one_row_fast(
            x_ptr, qweight_ptr, scales_ptr, zeros_ptr, perm_ptr, offs_n, k_start, k_end, K, N,
            stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
            BITS, GROUP_SIZE, HAS_PERM, BLOCK_N, BLOCK_K, EVEN_K, EVEN_N, PREFETCH,
        )  # fmt: skip
    elif BLOCK_M == 1:
        acc = _gemv_one_row(
            x_ptr, qweight_ptr, scales_ptr, zeros_ptr, perm_ptr, offs_n, k_start, k_end, K, N,
            stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
            BITS, GROUP_SIZE, HAS_PERM, BLOCK_N, BLOCK_K, EVEN_K, EVEN_N,
        )  # fmt: skip
    else:
        acc = _gemv_rows(
            x_ptr, qweight_ptr, scales_ptr, zeros_ptr, perm_ptr, offs_m, offs_n, k_start, k_end, M, K, N,
            stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
            BITS, GROUP_SIZE, HAS_PERM, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, EVEN_N,
        )  # fmt: skip

    # ---- epilogue: bias and store (split-K: the last split of the tile reduces first) -------------
    _store_tile(
        acc, y_ptr, ws_ptr, lock_ptr, bias_ptr, offs_m, offs_n, mask_m, mask_n, pid_n, pid_k,
        stride_ym, stride_yn, M, N, HAS_BIAS, SPLIT_K,
    )  # fmt: skip


_gemv_kernel_tuned = triton.autotune(
    configs=gemv_configs(),
    key=["N", "K", "BLOCK_M", "BITS", "GROUP_SIZE"],
    prune_configs_by={"early_config_prune": prune_gemv},
    **autotune_options(),
)(_gemv_kernel)


def gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int | None,
    perm: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """y [..., N] = x[..., perm] @ W^T (+ bias) for x [..., K] with at most 16 rows in total.

    ``config`` pins (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages); default: autotuned on GPU
    (warm it up before CUDA-graph capture), the interpreter config under TRITON_INTERPRET=1.
    """
    check_config(config)
    rows = x.numel() // max(x.shape[-1], 1)
    if rows > GEMV_MAX_BLOCK_M:
        raise ValueError(f"gemv handles at most {GEMV_MAX_BLOCK_M} rows, got {rows}; use gemm")
    max_split = config.kwargs["SPLIT_K"] if config is not None else tuned_max_split("gemv")
    launch = prepare(x, qweight, scales, zeros, bits, group_size, perm, bias, max_split=max_split)
    m, n = launch.m, qweight.shape[1]
    if m == 0 or n == 0 or x.shape[-1] == 0:
        return quant_matmul_ref(x, qweight, scales, zeros, bits, group_size or x.shape[-1], perm, bias)
    args = kernel_args(launch, qweight, scales, zeros, perm, bias)
    meta = {**launch.meta, "BLOCK_M": max(triton.next_power_of_2(m), 1)}

    def grid(c: dict) -> tuple[int, int]:
        return (triton.cdiv(n, c["BLOCK_N"]), c["SPLIT_K"])

    if config is None:
        _gemv_kernel_tuned[grid](*args, **meta)
    else:
        _gemv_kernel[grid](*args, **meta, **config.all_kwargs())
    return finish(launch)


gemv_ref = quant_matmul_ref
