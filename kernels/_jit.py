"""Triton device helpers shared by the dequant, GEMV and GEMM kernels (``@triton.jit`` functions only).

They read the blocked kernel layout (``layout.py``) tile by tile: ``load_words`` loads a tile's packed
words once, ``slice_codes`` / ``slice_rows`` shift out one bit field and name its inputs,
``dequantize_tile`` turns codes into exact float values with the magic-number trick, ``group_params``
fetches the scales and zero points of a tile's group, ``store_tile`` writes (or split-K reduces) an
output tile. The decomposition and the exactness argument are in ``dequant.py``'s docstring.
"""

from __future__ import annotations

import triton
import triton.language as tl

_FP32_MAGIC = tl.constexpr(0x4B000000)  # float32 bits of 2^23
_FP16_MAGIC = tl.constexpr(0x6400)  # float16 bits of 1024


@triton.jit
def _runtime_bits(value: tl.constexpr, K):
    """The int32 constant ``value`` in a form the compiler cannot fold (K is a size, >= 0, so
    min(K, 0) == 0; loop-invariant, so computed once per program). An AND with one immediate and an OR
    with another compiles to two LOP3s on sm_90 (a LOP3 takes one 32-bit immediate); with the OR operand
    in a register ptxas fuses mask and OR into one LOP3 per code (``scripts/kernel_sass.py``: the FAST
    GEMV loop 756 -> 628 instructions). The GEMM keeps immediates: there a register constant sent the dot
    operands through shared memory."""
    return tl.minimum(K, 0) + value


@triton.jit
def _magic_f32(v):
    """float32 2^23 + v for int v in [0, 2^23) (bits 0x4B000000 | v): exact, no I2F instruction."""
    return (v.to(tl.int32) | _FP32_MAGIC).to(tl.float32, bitcast=True)


@triton.jit
def _magic_f16(v):
    """float16 1024 + v for int v in [0, 1024) (bits 0x6400 | v): exact, no I2F instruction. The OR
    constant stays an immediate: ptxas packs two codes per register (PRMT) and masks/ORs the pair; a
    register constant here breaks that (offline sm_90 SASS: GEMM loop 613 -> 790, with smem round trips)."""
    return (v.to(tl.int32) | _FP16_MAGIC).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _dequantize_tile(codes, scale, zero, FP16_MATH: tl.constexpr):
    """codes int32 [BK, BN] in [0, 2^bits), scale fp16 and zero uint8 broadcastable to it.

    Returns float16 (FP16_MATH) or float32 scale * (codes - zero), exact before the final rounding.
    """
    if FP16_MATH:
        q = _magic_f16(codes)  # 1024 + q
        zm = _magic_f16(zero)  # 1024 + z
        w = (q - zm) * scale
    else:
        q = _magic_f32(codes)  # 2^23 + q
        zm = _magic_f32(zero)  # 2^23 + z
        w = (q - zm) * scale.to(tl.float32)
    return w


@triton.jit
def _load_words(
    qweight_ptr,
    k0,
    offs_n,
    K,
    N,
    stride_qk,
    stride_qn,
    BITS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    EVICTION: tl.constexpr,
):
    """The packed words [BLOCK_K // PACK, BLOCK_N] holding codes k0 .. k0 + BLOCK_K of columns offs_n.

    Each word is loaded once (no per-code duplicate loads). k0 is a multiple of BLOCK_K, itself a
    multiple of 32, so the tile's word rows hold exactly inputs k0 .. k0 + BLOCK_K (``_slice_rows``).
    Rows past the packed tensor (ragged K, only when not EVEN_K) load as 0 (code 0, finite values).
    """
    PACK: tl.constexpr = 32 // BITS
    offs_w = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
    ptrs = qweight_ptr + offs_w[:, None] * stride_qk + offs_n[None, :] * stride_qn
    if EVEN_K and EVEN_N:
        return tl.load(ptrs, eviction_policy=EVICTION)
    mask = (offs_w < tl.cdiv(K, 32) * BITS)[:, None] & (offs_n < N)[None, :]
    return tl.load(ptrs, mask=mask, other=0, eviction_policy=EVICTION)


@triton.jit
def _load_words_until(
    qweight_ptr, k0, offs_n, k_limit, N, stride_qk, stride_qn,
    BITS: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_N: tl.constexpr, EVICTION: tl.constexpr,
):  # fmt: skip
    """``_load_words`` with the rows masked at ``k_limit`` (a split's end, or K): words of inputs at or
    past it are not read (0). The mask is uniform along N, so loads stay vectorized; prefetching the
    tile after a split's last one costs no memory traffic."""
    PACK: tl.constexpr = 32 // BITS
    offs_w = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
    ptrs = qweight_ptr + offs_w[:, None] * stride_qk + offs_n[None, :] * stride_qn
    mask = (offs_w < tl.cdiv(k_limit, 32) * BITS)[:, None]
    if not EVEN_N:
        mask = mask & (offs_n < N)[None, :]
    return tl.load(ptrs, mask=mask, other=0, eviction_policy=EVICTION)


@triton.jit
def _mantissa_codes(words, j: tl.constexpr, BITS: tl.constexpr, K):
    """float32 1 + q / 2^BITS for the codes q of slice j of a word tile, built by moving each code to the
    top of the mantissa of 1.0 (bits 0x3F800000 | q << (23 - BITS)): one shift and one LOP3 per weight,
    exact, no int->float conversion and no zero subtraction per weight (callers correct with the tile's
    sum of x: sum x (q - z) = 2^BITS * sum x (1 + q / 2^BITS) - (2^BITS + z) * sum x)."""
    SHIFT: tl.constexpr = 23 - BITS - BITS * j  # code j sits at bits [BITS * j, BITS * j + BITS)
    if SHIFT >= 0:
        v = words << SHIFT
    else:
        v = words >> (-SHIFT)
    v = (v & (((1 << BITS) - 1) << (23 - BITS))) | _runtime_bits(0x3F800000, K)  # one LOP3
    return v.to(tl.float32, bitcast=True)


@triton.jit
def _slice_codes(words, j, BITS: tl.constexpr):
    """Codes int32 [BLOCK_K // PACK, BLOCK_N] in bit field j of a word tile (inputs ``_slice_rows``)."""
    return (words >> (j * BITS)) & ((1 << BITS) - 1)


@triton.jit
def _slice_rows(k0, j, BITS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Input indices of slice j (bit field j) of the tile at k0, one per word row r < BLOCK_K // PACK
    (``_tile_inputs``; inputs two apart within a block)."""
    return _tile_inputs(k0, tl.arange(0, BLOCK_K // (32 // BITS)), j, BITS)


@triton.jit
def _tile_inputs(k0, r, j, BITS: tl.constexpr):
    """Input index of word row r (of the tile at k0, a multiple of 32), bit field j (blocked layout:
    field j = h * H + i of word w holds input 32B + 2 * BITS * i + 2w + h, H = 16 // BITS)."""
    H: tl.constexpr = 16 // BITS
    return k0 + (r // BITS) * 32 + (j % H) * (2 * BITS) + (r % BITS) * 2 + j // H


@triton.jit
def _x_cols(perm_ptr, offs_k, K, HAS_PERM: tl.constexpr):
    """Activation columns of inputs offs_k (act-order: gathered through perm) and their mask."""
    mask_k = offs_k < K
    if HAS_PERM:
        return tl.load(perm_ptr + offs_k, mask=mask_k, other=0, eviction_policy="evict_last"), mask_k
    return offs_k, mask_k


@triton.jit
def _group_params(
    scales_ptr,
    zeros_ptr,
    offs_k,
    offs_n,
    k0,
    K,
    N,
    stride_sg,
    stride_sn,
    stride_zg,
    stride_zn,
    GROUP_SIZE: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    EVICTION: tl.constexpr,
):
    """(scale fp16, zero uint8) for rows offs_k x columns offs_n, broadcastable to [len(offs_k), BLOCK_N].

    If GROUP_SIZE % BLOCK_K == 0 the whole tile at k0 lies in group k0 // GROUP_SIZE: one [1, BLOCK_N]
    row each (loaded once per tile). Otherwise they are gathered per row (exact for a ragged last group).
    """
    if GROUP_SIZE % BLOCK_K == 0:
        g = k0 // GROUP_SIZE
        s_ptrs = scales_ptr + g * stride_sg + offs_n * stride_sn
        z_ptrs = zeros_ptr + g * stride_zg + offs_n * stride_zn
        if EVEN_N:
            scale = tl.load(s_ptrs, eviction_policy=EVICTION)[None, :]
            zero = tl.load(z_ptrs, eviction_policy=EVICTION)[None, :]
        else:
            mask_n = offs_n < N
            scale = tl.load(s_ptrs, mask=mask_n, other=0.0, eviction_policy=EVICTION)[None, :]
            zero = tl.load(z_ptrs, mask=mask_n, other=0, eviction_policy=EVICTION)[None, :]
    else:
        g = offs_k // GROUP_SIZE
        s_ptrs = scales_ptr + g[:, None] * stride_sg + offs_n[None, :] * stride_sn
        z_ptrs = zeros_ptr + g[:, None] * stride_zg + offs_n[None, :] * stride_zn
        mask = (offs_k < K)[:, None] & (offs_n < N)[None, :]
        scale = tl.load(s_ptrs, mask=mask, other=0.0, eviction_policy=EVICTION)
        zero = tl.load(z_ptrs, mask=mask, other=0, eviction_policy=EVICTION)
    return scale, zero


@triton.jit
def _store_tile(
    acc,
    y_ptr,
    ws_ptr,
    lock_ptr,
    bias_ptr,
    offs_m,
    offs_n,
    mask_m,
    mask_n,
    tile_id,
    pid_k,
    stride_ym,
    stride_yn,
    M,
    N,
    HAS_BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """Matmul epilogue shared by gemv and gemm, one launch in every case.

    SPLIT_K == 1: add the bias and store the fp32 tile ``acc`` [BLOCK_M, BLOCK_N] into y (x's dtype).
    SPLIT_K > 1: store the partial into slice pid_k of the fp32 workspace [SPLIT_K, M, N] (uninitialised:
    every element a split owns is written), then bump the tile's counter (``lock_ptr[tile_id]``,
    acq_rel); the split that arrives last sums the SPLIT_K partials in a fixed order (deterministic),
    adds the bias, stores y and resets the counter to 0 for the next launch. No zero-fill and no cast
    kernels, so a split-K matmul is a single launch (CUDA-graph friendly).
    """
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K > 1:
        tile_ptrs = offs_m[:, None] * N + offs_n[None, :]
        tl.store(ws_ptr + pid_k * M * N + tile_ptrs, acc, mask=mask, cache_modifier=".cg")
        tl.debug_barrier()  # every thread's partial is written before the counter moves
        count = tl.atomic_add(lock_ptr + tile_id, 1, sem="acq_rel")
        if count == SPLIT_K - 1:
            acc = tl.zeros_like(acc)
            for s in tl.static_range(SPLIT_K):
                acc += tl.load(ws_ptr + s * M * N + tile_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(lock_ptr + tile_id, 0)
            _store_out(acc, y_ptr, bias_ptr, offs_m, offs_n, mask, mask_n, stride_ym, stride_yn, HAS_BIAS)
    else:
        _store_out(acc, y_ptr, bias_ptr, offs_m, offs_n, mask, mask_n, stride_ym, stride_yn, HAS_BIAS)


@triton.jit
def _store_out(
    acc, y_ptr, bias_ptr, offs_m, offs_n, mask, mask_n, stride_ym, stride_yn, HAS_BIAS: tl.constexpr
):
    """acc (+ bias) -> y in y's dtype."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
