"""``quant_matmul``: the one entry point, registered as the custom op ``llmquant::quant_matmul``.

Path chosen per call (host-side, from shapes and devices only: no device sync, graph-capturable):

- ``backend="reference"``, or ``"auto"`` with non-CUDA tensors, or bits not in {2, 4, 8} (3-bit codes
  straddle words; the Triton kernels do not implement that yet): ``quant_matmul_ref`` (PyTorch).
- ``backend="auto"`` with CUDA tensors, or ``backend="triton"`` (also on CPU, under
  ``TRITON_INTERPRET=1``: how the CPU tests run the kernels), by M = rows of x:
  - M <= ``GEMV_MAX_M``: ``gemv`` (CUDA-core GEMV, split-K);
  - M < ``DEQUANT_MATMUL_MIN_M``: ``gemm`` (tensor-core tiles; split-K up to ``SPLIT_K_MAX_M``);
  - otherwise: ``dequant`` once to x's dtype + ``torch.matmul`` (cuBLAS), which wins once the matmul
    is compute-bound and the dequantized copy's traffic is amortized.

The custom op (with a ``register_fake`` giving the output's shape/dtype) keeps ``torch.compile`` from
graph-breaking on the Triton launch; on CPU it runs the reference. Eager calls skip the custom-op
wrapper (its Python dispatch costs more than a decode-sized kernel); compiled code goes through it.
Under CUDA graphs, warm every shape up once before capture (Triton compiles and autotunes on first
use; neither may happen while capturing).
"""

from __future__ import annotations

import functools

import torch

from .layout import SUPPORTED_BITS, effective_group_size, quant_matmul_ref

BACKENDS = ("auto", "triton", "reference")
# Dispatch thresholds, from the H100 runs of scripts/bench_kernels.py (docs/benchmarks.md, Kernels):
# the CUDA-core GEMV lost to the tensor-core GEMM from M = 2 on (4096x11008: GEMV 57.9 us at M = 2,
# GEMM 41.7 us at M = 8), and the GEMM lost to dequantize + cuBLAS from M ~ 64 on (4096x4096: GEMM
# 39.8 us at M = 64, 197 us at M = 128, where dequant + matmul costs about 15 + 22 us).
GEMV_MAX_M = 1  # M above this uses the tensor-core GEMM
DEQUANT_MATMUL_MIN_M = 64  # M at or above this: dequantize once + cuBLAS


@functools.cache
def _triton_ops():  # noqa: ANN202
    """The Triton launchers, imported on first use: the reference path (CPU) never imports Triton."""
    from .dequant import dequant
    from .gemm import gemm
    from .gemv import gemv

    return dequant, gemm, gemv


def _uses_triton(x: torch.Tensor, bits: int, backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference" or bits not in SUPPORTED_BITS:
        return False
    return backend == "triton" or x.device.type == "cuda"


def _dequant_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    perm: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Large-M path: W^T dequantized once in x's dtype, then cuBLAS (fp32 accumulation inside)."""
    k = x.shape[-1]
    dequant, _, _ = _triton_ops()
    w = dequant(qweight, scales, zeros, bits, group_size, k, dtype=x.dtype)  # [K, N]
    if perm is not None:
        x = x[..., perm.long()]
    if bias is None:
        return torch.matmul(x, w)
    return torch.addmm(bias.to(x.dtype), x.reshape(-1, k), w).reshape(*x.shape[:-1], w.shape[1])


def quant_matmul_impl(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    perm: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The dispatch itself (module docstring), without the custom-op wrapper."""
    if not _uses_triton(x, bits, backend):
        return quant_matmul_ref(x, qweight, scales, zeros, bits, group_size, perm, bias)
    rows = x.numel() // max(x.shape[-1], 1)
    _, gemm, gemv = _triton_ops()
    if rows <= GEMV_MAX_M:
        return gemv(x, qweight, scales, zeros, bits, group_size, perm, bias)
    if rows < DEQUANT_MATMUL_MIN_M:
        return gemm(x, qweight, scales, zeros, bits, group_size, perm, bias)
    return _dequant_matmul(x, qweight, scales, zeros, bits, group_size, perm, bias)


@torch.library.custom_op("llmquant::quant_matmul", mutates_args=())
def _quant_matmul_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    perm: torch.Tensor | None,
    bias: torch.Tensor | None,
    backend: str,
) -> torch.Tensor:
    return quant_matmul_impl(x, qweight, scales, zeros, bits, group_size, perm, bias, backend)


@_quant_matmul_op.register_fake
def _(x, qweight, scales, zeros, bits, group_size, perm, bias, backend):  # noqa: ANN001, ANN202
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))


def quant_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int | None,
    perm: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """y [..., N] = x[..., perm] @ W^T (+ bias) for W in the kernel layout (``layout.py``).

    x [..., K] fp16/bf16/fp32; qweight int32 [layout.kernel_rows(K, bits), N]; scales fp16 [G, N]; zeros uint8
    [G, N]; group_size None or K = per-channel; perm int32 [K] (act-order) or None; bias [N] or None.
    Returns x's dtype, accumulated in fp32. ``backend``: "auto" (Triton on CUDA, reference elsewhere),
    "triton" (force the kernels, e.g. on CPU under TRITON_INTERPRET=1) or "reference".
    """
    gs = effective_group_size(group_size, x.shape[-1])
    if torch.compiler.is_compiling():  # keep dynamo from tracing into the Triton launch
        return torch.ops.llmquant.quant_matmul(x, qweight, scales, zeros, int(bits), gs, perm, bias, backend)
    # eager: call the dispatch directly (the custom-op wrapper costs tens of microseconds per call)
    return quant_matmul_impl(x, qweight, scales, zeros, int(bits), gs, perm, bias, backend)
