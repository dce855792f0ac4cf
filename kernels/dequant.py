"""Dequantize a kernel-layout weight to a dense W^T [K, N]; also the tile helpers the matmuls share.

Layout (``layout.py``, blocked): ``qweight`` int32 [bits * ceil(K / 32), N] packed along K, PACK =
32 // bits codes per word; word row bits * B + w, field h * PACK/2 + i holds input 32B + 2*bits*i + 2w + h;
``scales`` fp16 [G, N]; ``zeros`` uint8 [G, N] (true zero points); group of k = k // group_size, the last
group may be short. Tiles start at multiples of BLOCK_K (a multiple of 32), so a tile's word rows hold
exactly its inputs k0 .. k0 + BLOCK_K.

Decomposition of ``_dequant_kernel``: grid (cdiv(K, BLOCK_K), cdiv(N, BLOCK_N)); each program loads the
[BLOCK_K / PACK, BLOCK_N] packed words of its tile once (``_load_words``: one load per word, not one per
code), then for each of the PACK slices j shifts out the codes of bit field j (inputs ``_slice_rows``),
dequantizes them with ``_dequantize_tile`` and stores those rows (each row contiguous along N). The matmul
kernels walk the same word tiles slice by slice (``_slice_codes`` / ``_slice_rows``), loading the matching
activation columns per slice (inputs two apart; the GEMM pairs fields i and i + PACK/2 into runs of
2 * bits contiguous inputs), so nothing is ever reshaped in memory.

Exactness: ``_dequantize_tile`` computes float32(scale) * (q - zero) exactly (an fp16 scale has 11
significant bits, |q - zero| < 256) and rounds once to the output dtype, so the result is bitwise equal
to ``dequantize_ref``. Integer -> float conversion uses the magic-number trick (no I2F instruction):
- fp32: bits(0x4B000000 | q) is the float 2^23 + q; subtracting 2^23 + z (built the same way) gives
  q - z exactly.
- fp16 output: bits(0x6400 | q) is the half 1024 + q (exact for q < 1024); the half subtraction is
  exact and the half multiply rounds the exact product once, i.e. the same as rounding the fp32
  product -> bitwise equal as well, with packed half2 arithmetic on the GPU.
bits = 3 (codes straddle words) is not supported by the Triton kernels; the launchers fall back to the
reference for it (``SUPPORTED_BITS``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._jit import (
    _dequantize_tile,
    _group_params,
    _load_words,
    _slice_codes,
    _slice_rows,
)
from ._launch import check_interpretable, check_layout, kernel_group_size
from .configs import COMPILE_OPTIONS, autotune_options, check_config, dequant_configs, prune_dequant
from .layout import dequantize_ref as _dequantize_ref
from .layout import effective_group_size


@triton.heuristics(
    {
        "EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0,
        "EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0,
    }
)
@triton.jit
def _dequant_kernel(
    # pointers: qweight int32 [ceil(K*BITS/32), N], scales fp16 [G, N], zeros uint8 [G, N], out [K, N]
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
    out_ptr,
    # sizes
    K,
    N,
    # strides
    stride_qk,
    stride_qn,
    stride_sg,
    stride_sn,
    stride_zg,
    stride_zn,
    stride_ok,
    stride_on,
    # meta-parameters
    BITS: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    FP16_MATH: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    k0 = pid_k * BLOCK_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    words = _load_words(
        qweight_ptr, k0, offs_n, K, N, stride_qk, stride_qn, BITS, BLOCK_K, EVEN_K, EVEN_N, "evict_first"
    )  # fmt: skip
    for j in tl.static_range(32 // BITS):
        offs_k = _slice_rows(k0, j, BITS, BLOCK_K)
        scale, zero = _group_params(
            scales_ptr, zeros_ptr, offs_k, offs_n, k0, K, N, stride_sg, stride_sn, stride_zg, stride_zn,
            GROUP_SIZE, BLOCK_K, EVEN_N, "evict_first",
        )  # fmt: skip
        w = _dequantize_tile(_slice_codes(words, j, BITS), scale, zero, FP16_MATH)
        out_ptrs = out_ptr + offs_k[:, None] * stride_ok + offs_n[None, :] * stride_on
        w = w.to(out_ptr.dtype.element_ty)
        if EVEN_K and EVEN_N:
            tl.store(out_ptrs, w)
        else:
            tl.store(out_ptrs, w, mask=(offs_k < K)[:, None] & (offs_n < N)[None, :])


_dequant_kernel_tuned = triton.autotune(
    configs=dequant_configs(),
    key=["K", "N", "BITS", "GROUP_SIZE"],
    prune_configs_by={"early_config_prune": prune_dequant},
    **autotune_options(),
)(_dequant_kernel)

_TORCH_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def dequant(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int | None,
    in_features: int,
    dtype: torch.dtype = torch.float32,
    *,
    config: triton.Config | None = None,
) -> torch.Tensor:
    """W^T [K, N] in ``dtype`` (permuted input order) from the kernel layout; == ``dequant_ref`` bitwise.

    ``config`` pins the launch configuration (BLOCK_K, BLOCK_N); default: autotuned on GPU, the
    interpreter config under TRITON_INTERPRET=1.
    """
    check_config(config)
    k, n = in_features, qweight.shape[1]
    check_layout(qweight, scales, zeros, bits, k)
    check_interpretable(qweight)
    if dtype not in _TORCH_DTYPES:
        raise ValueError(f"dtype must be one of {_TORCH_DTYPES}, got {dtype}")
    out = torch.empty((k, n), dtype=dtype, device=qweight.device)
    if k == 0 or n == 0:
        return out
    args = (
        qweight, scales, zeros, out, k, n,
        qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
        zeros.stride(0), zeros.stride(1), out.stride(0), out.stride(1),
    )  # fmt: skip
    meta = {
        "BITS": bits,
        "GROUP_SIZE": kernel_group_size(group_size, k),
        "FP16_MATH": dtype == torch.float16,
        **COMPILE_OPTIONS,
    }

    def grid(c: dict) -> tuple[int, int]:
        return (triton.cdiv(k, c["BLOCK_K"]), triton.cdiv(n, c["BLOCK_N"]))

    if config is None:
        _dequant_kernel_tuned[grid](*args, **meta)
    else:
        _dequant_kernel[grid](*args, **meta, **config.all_kwargs())
    return out


def dequant_ref(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int | None,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference (``layout.dequantize_ref``); ``group_size=None`` means per-channel."""
    gs = effective_group_size(group_size, in_features)
    return _dequantize_ref(qweight, scales, zeros, bits, gs, in_features, dtype=dtype)
