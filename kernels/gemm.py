"""Tiled tensor-core quantized GEMM (M > ``GEMV_MAX_M``), with split-K for skinny M.

y [M, N] = x[:, perm] [M, K] @ W^T [K, N] (+ bias), W in the kernel layout (``layout.py``), x fp16 /
bf16 / fp32, accumulation in fp32, y in x's dtype. bits in {2, 4, 8}; any M, N, K (ragged K and
ragged last group), any group_size (per-channel included).

Decomposition of ``_gemm_kernel``: grid (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K).

- Program order: tiles are visited in groups of GROUP_M rows of M-tiles (Triton matmul tutorial), so
  programs running together share weight tiles in L2 instead of each streaming its own.
- Each program walks its contiguous K range in BLOCK_K steps. Per step it loads the tile's packed words
  once (``dequant._load_words``, [BLOCK_K / PACK, BLOCK_N]: one load per word) and then, by the config's
  ``ONE_DOT`` flag, either
  - shifts all PACK code slices out at once into a [PACK, BLOCK_K / PACK, BLOCK_N] tensor, reshapes it
    to one [BLOCK_K, BLOCK_N] operand in slice-major order (row r is word row r % (BLOCK_K/PACK), bit
    field r // (BLOCK_K/PACK): ``dequant._tile_inputs``), gathers x's columns in that same order and
    issues one ``tl.dot``
    (a dot's K order is free as long as both operands agree), or
  - issues one dot per pair slice i (bit fields i and i + PACK/2 of every word row, interleaved: K extent
    2 BLOCK_K / PACK >= 16, pruned). In the layout those two fields hold inputs 2j and 2j + 1, so a
    pair slice's activation columns are runs of 2 * bits contiguous inputs, staged with asynchronous
    copies like a plain matmul's A tiles, and for fp16 an MMA operand pair (k, k + 1) is decoded from
    one word with one mask (``_pair_q_minus_z_half``) instead of being assembled from two words.
  The autotuner picks whichever is faster. With ``SCALE_AFTER`` (default) and BLOCK_K dividing the group,
  the dots take the exact integers q - z (``_q_minus_z``) and the group's scale row multiplies the fp32 tile
  sum once (``_dot_scaled_tile``); otherwise dequantization uses the magic-number int->float trick, fp16
  math for fp16 activations (bitwise the reference's W), one scale/zero row per tile when BLOCK_K
  divides group_size (gathered per row otherwise); act-order gathers x's columns through ``perm``;
  fp32 activations use exact "ieee" dots. Weights are loaded ``evict_first`` when one M tile covers
  all rows (each weight byte read once), with the default policy otherwise (other M tiles re-read
  them from L2).
- Epilogue (``dequant._store_tile``): bias, then a masked store in x's dtype (SPLIT_K == 1); with
  SPLIT_K > 1 (only for M <= ``SPLIT_K_MAX_M``) fp32 partials go to a workspace and the last split of
  each tile reduces them and stores y, all in the one launch.

Not done (possible follow-ups, see kernels-and-quality.md A.4): persistent/stream-K scheduling, TMA
descriptors, a weight layout in MMA-fragment order. Swapping A/B with ``tl.trans`` so the weights fill the
MMA M dimension was tried and measured 2-3x slower on an H100 (docs/benchmarks.md), so it was removed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._jit import (
    _dequantize_tile,
    _group_params,
    _load_words,
    _magic_f16,
    _magic_f32,
    _slice_codes,
    _slice_rows,
    _store_tile,
    _tile_inputs,
    _x_cols,
)
from ._launch import finish, kernel_args, prepare
from .configs import (
    SPLIT_K_MAX_M,
    autotune_options,
    check_config,
    gemm_configs,
    m_bucket,
    prune_gemm,
    tuned_max_split,
)
from .layout import quant_matmul_ref


@triton.jit
def _dequant_dot(
    acc, codes, x_ptr, perm_ptr, scales_ptr, zeros_ptr, offs_m, offs_k, offs_n, mask_m, k0, K, N,
    stride_xm, stride_xk, stride_sg, stride_sn, stride_zg, stride_zn,
    GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, FP16_MATH: tl.constexpr, FP32_DOT: tl.constexpr,
    HAS_PERM: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, EVICTION: tl.constexpr,
):  # fmt: skip
    """acc + x[:, offs_k] @ dequant(codes): codes [len(offs_k), BLOCK_N] are the weights of inputs offs_k
    (any order), x's matching columns are gathered (through perm for act-order)."""
    scale, zero = _group_params(
        scales_ptr, zeros_ptr, offs_k, offs_n, k0, K, N,
        stride_sg, stride_sn, stride_zg, stride_zn, GROUP_SIZE, BLOCK_K, EVEN_N, EVICTION,
    )  # fmt: skip
    x = _x_tile(x_ptr, perm_ptr, offs_m, offs_k, mask_m, K, stride_xm, stride_xk, HAS_PERM, EVEN_K)
    w = _dequantize_tile(codes, scale, zero, FP16_MATH)  # fp16 (FP16_MATH) or fp32
    if not FP32_DOT:  # FP32_DOT (fp32 x, or bf16 x under the interpreter) keeps W in fp32, unrounded
        w = w.to(x.dtype)
    return _dot(x, w, acc, FP32_DOT)  # fp32 x needs exact "ieee" dots (default: tf32)


@triton.jit
def _x_tile(
    x_ptr, perm_ptr, offs_m, offs_k, mask_m, K, stride_xm, stride_xk,
    HAS_PERM: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    """x [BLOCK_M, len(offs_k)]: the activation columns of inputs offs_k (through perm for act-order)."""
    x_cols, mask_k = _x_cols(perm_ptr, offs_k, K, HAS_PERM)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + x_cols[None, :] * stride_xk
    x_mask = mask_m[:, None] if EVEN_K else mask_m[:, None] & mask_k[None, :]
    return tl.load(x_ptrs, mask=x_mask, other=0.0, eviction_policy="evict_last")


@triton.jit
def _dot(x, w, acc, FP32_DOT: tl.constexpr):
    """x @ w (+ acc) in fp32 accumulation; FP32_DOT: operands as fp32, exact "ieee" products."""
    if FP32_DOT:
        return tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(x, w, acc)


@triton.jit
def _slice_major_codes(words, k0, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """(codes [BLOCK_K, BLOCK_N], offs_k [BLOCK_K]): the tile's codes as one dot operand in slice-major
    order (row r: word row r % (BLOCK_K / PACK), bit field r // (BLOCK_K / PACK)) and each row's input."""
    PACK: tl.constexpr = 32 // BITS
    offs_r = tl.arange(0, BLOCK_K)
    offs_k = _tile_inputs(k0, offs_r % (BLOCK_K // PACK), offs_r // (BLOCK_K // PACK), BITS)
    shifts = tl.arange(0, PACK) * BITS
    codes = (words[None, :, :] >> shifts[:, None, None]) & ((1 << BITS) - 1)
    return tl.reshape(codes, (BLOCK_K, words.shape[1])), offs_k


@triton.jit
def _interleave(lo, hi):
    """[R, N] lo and hi -> [2R, N] with row 2r = lo[r], row 2r + 1 = hi[r]."""
    return tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), (2 * lo.shape[0], lo.shape[1]))


@triton.jit
def _pair_inputs(k0, i, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Inputs of pair slice i of the tile at k0 (fields i and i + PACK/2 of every word row, interleaved):
    row 2r + h is input 32 (r // BITS) + 2 BITS i + 2 (r % BITS) + h, i.e. runs of 2 * BITS contiguous
    inputs (``layout.py``). Written out rather than as ``dequant._tile_inputs(k0, offs // 2, ...)``: Triton
    sees runs of 2 * BITS contiguous offsets only in this form and stages x with cp.async (through
    ``_tile_inputs`` the offline sm_90 main loop went 520 -> 626, plain loads + shared-memory stores)."""
    offs = tl.arange(0, 2 * (BLOCK_K // (32 // BITS)))
    return k0 + (offs // (2 * BITS)) * 32 + (2 * BITS) * i + offs % (2 * BITS)


@triton.jit
def _pair_codes(words, i, BITS: tl.constexpr):
    """Codes int32 [2R, BLOCK_N] of pair slice i (rows as ``_pair_inputs``): fields i and i + PACK/2."""
    return _interleave(_slice_codes(words, i, BITS), _slice_codes(words, i + 16 // BITS, BITS))


@triton.jit
def _pair_q_minus_z_half(words, zero, i, BITS: tl.constexpr, BF16: tl.constexpr, FP32_DOT: tl.constexpr):
    """q - z [2R, BLOCK_N] of pair slice i in fp16 (bf16 with BF16, for BITS < 8), exact, built so that
    ptxas decodes a K-adjacent operand pair from one word. The two codes sit at the same bits of the
    word's two halves, so after a shift (none for the low byte) one mask and one OR give the half pair
    (M + q_lo 2^S, M + q_hi 2^S): M = 2^MANT is the magic number (fp16 1024, MANT = 10; bf16 128,
    MANT = 7) and S is the code's offset inside its byte when S + BITS <= MANT keeps it in the mantissa
    (else the code is shifted down to S = 0). One fused multiply-add (M + q 2^S) 2^-S - (2^(MANT-S) + z)
    = q - z then corrects it exactly (offline sm_90 SASS, fp16 4-bit: no PRMT/SHF pair assembly)."""
    DTYPE: tl.constexpr = tl.bfloat16 if BF16 else tl.float16
    MANT: tl.constexpr = 7 if BF16 else 10
    MAGIC: tl.constexpr = 0x4300 if BF16 else 0x6400  # bits of 2^MANT
    S: tl.constexpr = (BITS * i) % 8 if (BITS * i) % 8 + BITS <= MANT else 0
    SHIFT: tl.constexpr = BITS * i - S
    # words >> SHIFT as a multiply-high: LLVM folds a shift followed by the hi half's >> 16 into a second,
    # separate shift (two shifts and a PRMT per pair); mul.hi stays one op, on the FMA pipe (IMAD.HI)
    v = tl.umulhi(words, 1 << (32 - SHIFT)) if SHIFT > 0 else words
    mask: tl.constexpr = ((1 << BITS) - 1) << S
    lo = (v & mask) | MAGIC
    hi = ((v >> 16) & mask) | MAGIC
    q = _interleave(lo, hi).to(tl.int16).to(DTYPE, bitcast=True)  # 2^MANT + q 2^S
    zs = (zero.to(tl.float32) + (1 << (MANT - S))).to(DTYPE)  # 2^(MANT-S) + z, exact
    if FP32_DOT:  # bf16 under the interpreter, whose bf16 arithmetic is wrong: the same exact math in fp32
        return q.to(tl.float32) * (1.0 / (1 << S)) - zs.to(tl.float32)
    if S == 0:
        return q - zs
    # one HFMA2 per pair through fp fusion, which every launch requests (enable_fp_fusion): tl.fma here
    # made Triton 3.9 split the pair into scalar f16 FMAs (offline sm_90 main loop 520 -> 615)
    return q * tl.full((1, 1), 1.0 / (1 << S), DTYPE) - zs


@triton.jit
def _q_minus_z(codes, zero, FP16_MATH: tl.constexpr, DTYPE: tl.constexpr):
    """q - z, exact, in DTYPE (|q - z| < 2^8 fits every dot dtype): half magic numbers for fp16
    (1024 + q minus 1024 + z, packed half2 math), fp32 magic numbers and one exact cast otherwise."""
    if FP16_MATH:
        return _magic_f16(codes) - _magic_f16(zero)
    return (_magic_f32(codes) - _magic_f32(zero)).to(DTYPE)


@triton.jit
def _dot_scaled_tile(
    acc, words, x_ptr, perm_ptr, scales_ptr, zeros_ptr, offs_m, offs_n, mask_m, k0, K, N,
    stride_xm, stride_xk, stride_sg, stride_sn, stride_zg, stride_zn,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, FP16_MATH: tl.constexpr,
    FP32_DOT: tl.constexpr, HAS_PERM: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    EVICTION: tl.constexpr, ONE_DOT: tl.constexpr,
):  # fmt: skip
    """acc + s * (x @ (q - z)) for a tile inside one group (GROUP_SIZE % BLOCK_K == 0): the dots take the
    exact integers q - z and the group's scale row multiplies the fp32 tile sum once (no per-weight
    multiply, and the sums are more exact than with a rounded W)."""
    PACK: tl.constexpr = 32 // BITS
    scale, zero = _group_params(
        scales_ptr, zeros_ptr, _slice_rows(k0, 0, BITS, BLOCK_K), offs_n, k0, K, N,
        stride_sg, stride_sn, stride_zg, stride_zn, GROUP_SIZE, BLOCK_K, EVEN_N, EVICTION,
    )  # fmt: skip
    if ONE_DOT:
        codes, offs_k = _slice_major_codes(words, k0, BITS, BLOCK_K)
        x = _x_tile(x_ptr, perm_ptr, offs_m, offs_k, mask_m, K, stride_xm, stride_xk, HAS_PERM, EVEN_K)
        w = _q_minus_z(codes, zero, FP16_MATH, x.dtype)
        t = _dot(x, w, None, FP32_DOT)
    else:
        t = tl.zeros((acc.shape[0], acc.shape[1]), dtype=tl.float32)
        for i in tl.static_range(PACK // 2):  # pair slice i: fields i and i + PACK/2, 2 BITS-input runs
            offs_k = _pair_inputs(k0, i, BITS, BLOCK_K)
            x = _x_tile(x_ptr, perm_ptr, offs_m, offs_k, mask_m, K, stride_xm, stride_xk, HAS_PERM, EVEN_K)
            if FP16_MATH:
                w = _pair_q_minus_z_half(words, zero, i, BITS, False, FP32_DOT)
            elif x.dtype == tl.bfloat16 and BITS < 8:  # 8-bit codes do not fit bf16's 7-bit mantissa
                w = _pair_q_minus_z_half(words, zero, i, BITS, True, FP32_DOT)
            else:
                w = _q_minus_z(_pair_codes(words, i, BITS), zero, FP16_MATH, x.dtype)
            t = _dot(x, w, t, FP32_DOT)
    return acc + t * scale.to(tl.float32)


@triton.heuristics(
    {
        "EVEN_K": lambda a: a["K"] % (a["BLOCK_K"] * a["SPLIT_K"]) == 0,
        "EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0,
        "WEIGHT_EVICTION": lambda a: "evict_first" if a["M"] <= a["BLOCK_M"] else "",
    }
)
@triton.jit
def _gemm_kernel(
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
    m_bucket,  # unused in the body: the autotune key's M bucket (configs.m_bucket)
    # meta-parameters
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    FP16_MATH: tl.constexpr,
    FP32_DOT: tl.constexpr,
    HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    WEIGHT_EVICTION: tl.constexpr,
    ONE_DOT: tl.constexpr = False,  # one dot over the tile's reshaped codes, else one dot per slice
    SCALE_AFTER: tl.constexpr = True,  # one group per tile: dots on q - z, scale once per tile
):
    # ---- map program id -> (pid_m, pid_n), grouped for L2 reuse ------------------------------------
    PACK: tl.constexpr = 32 // BITS
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_split = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_start = pid_k * k_split
    k_end = tl.minimum(k_start + k_split, K)

    # ---- main loop: per word tile, dequantize + tensor-core dot(s), fp32 accumulate ------------------
    if SCALE_AFTER and GROUP_SIZE % BLOCK_K == 0:
        acc = _gemm_scaled_loop(
            x_ptr, qweight_ptr, scales_ptr, zeros_ptr, perm_ptr, offs_m, offs_n, mask_m, k_start, k_end, K, N,
            stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
            BITS, GROUP_SIZE, FP16_MATH, FP32_DOT, HAS_PERM, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, EVEN_N,
            WEIGHT_EVICTION, ONE_DOT,
        )  # fmt: skip
        _store_tile(
            acc, y_ptr, ws_ptr, lock_ptr, bias_ptr, offs_m, offs_n, mask_m, mask_n, pid, pid_k,
            stride_ym, stride_yn, M, N, HAS_BIAS, SPLIT_K,
        )  # fmt: skip
        return
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        words = _load_words(
            qweight_ptr, k0, offs_n, K, N, stride_qk, stride_qn,
            BITS, BLOCK_K, EVEN_K, EVEN_N, WEIGHT_EVICTION,
        )  # fmt: skip
        if ONE_DOT:
            codes, offs_k = _slice_major_codes(words, k0, BITS, BLOCK_K)  # x is gathered in that order
            acc = _dequant_dot(
                acc, codes, x_ptr, perm_ptr, scales_ptr, zeros_ptr, offs_m, offs_k, offs_n, mask_m, k0, K, N,
                stride_xm, stride_xk, stride_sg, stride_sn, stride_zg, stride_zn,
                GROUP_SIZE, BLOCK_K, FP16_MATH, FP32_DOT, HAS_PERM, EVEN_K, EVEN_N, WEIGHT_EVICTION,
            )  # fmt: skip
        else:
            for i in tl.static_range(PACK // 2):  # one dot per pair slice i: fields i and i + PACK/2
                acc = _dequant_dot(
                    acc, _pair_codes(words, i, BITS), x_ptr, perm_ptr, scales_ptr, zeros_ptr, offs_m,
                    _pair_inputs(k0, i, BITS, BLOCK_K), offs_n, mask_m, k0, K, N,
                    stride_xm, stride_xk, stride_sg, stride_sn, stride_zg, stride_zn,
                    GROUP_SIZE, BLOCK_K, FP16_MATH, FP32_DOT, HAS_PERM, EVEN_K, EVEN_N, WEIGHT_EVICTION,
                )  # fmt: skip

    # ---- epilogue: bias and store (split-K: the last split of the tile reduces first) -------------
    _store_tile(
        acc, y_ptr, ws_ptr, lock_ptr, bias_ptr, offs_m, offs_n, mask_m, mask_n, pid, pid_k,
        stride_ym, stride_yn, M, N, HAS_BIAS, SPLIT_K,
    )  # fmt: skip


@triton.jit
def _gemm_scaled_loop(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, perm_ptr, offs_m, offs_n, mask_m, k_start, k_end, K, N,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, FP16_MATH: tl.constexpr, FP32_DOT: tl.constexpr,
    HAS_PERM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, EVICTION: tl.constexpr, ONE_DOT: tl.constexpr,
):  # fmt: skip
    """The K loop of the SCALE_AFTER path: the [BLOCK_M, BLOCK_N] fp32 tile sum."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        words = _load_words(
            qweight_ptr, k0, offs_n, K, N, stride_qk, stride_qn, BITS, BLOCK_K, EVEN_K, EVEN_N, EVICTION
        )  # fmt: skip
        acc = _dot_scaled_tile(
            acc, words, x_ptr, perm_ptr, scales_ptr, zeros_ptr, offs_m, offs_n, mask_m, k0, K, N,
            stride_xm, stride_xk, stride_sg, stride_sn, stride_zg, stride_zn,
            BITS, GROUP_SIZE, BLOCK_K, FP16_MATH, FP32_DOT, HAS_PERM, EVEN_K, EVEN_N, EVICTION, ONE_DOT,
        )  # fmt: skip
    return acc


_gemm_kernel_tuned = triton.autotune(
    configs=gemm_configs(),
    key=["N", "K", "m_bucket", "BITS", "GROUP_SIZE"],
    prune_configs_by={"early_config_prune": prune_gemm},
    **autotune_options(),
)(_gemm_kernel)


def gemm(
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
    """y [..., N] = x[..., perm] @ W^T (+ bias) for x [..., K], any number of rows.

    ``config`` pins (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, GROUP_M, num_warps, num_stages); default:
    autotuned on GPU per (N, K, M-bucket) (warm it up before CUDA-graph capture), the interpreter
    config under TRITON_INTERPRET=1. An explicit SPLIT_K > 1 is honoured for any M.
    """
    check_config(config)
    rows = x.numel() // max(x.shape[-1], 1)
    if config is not None:
        max_split = config.kwargs["SPLIT_K"]
    else:
        max_split = tuned_max_split("gemm") if rows <= SPLIT_K_MAX_M else 1
    launch = prepare(x, qweight, scales, zeros, bits, group_size, perm, bias, max_split=max_split)
    m, n = launch.m, qweight.shape[1]
    if m == 0 or n == 0 or x.shape[-1] == 0:
        return quant_matmul_ref(x, qweight, scales, zeros, bits, group_size or x.shape[-1], perm, bias)
    args = kernel_args(launch, qweight, scales, zeros, perm, bias)

    def grid(c: dict) -> tuple[int, int]:
        return (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]), c["SPLIT_K"])

    if config is None:
        _gemm_kernel_tuned[grid](*args, **launch.meta, m_bucket=m_bucket(m))
    else:
        _gemm_kernel[grid](*args, **launch.meta, m_bucket=m_bucket(m), **config.all_kwargs())
    return finish(launch)


gemm_ref = quant_matmul_ref
