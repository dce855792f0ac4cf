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

import torch

from .configs import DEQUANT_MATMUL_MIN_M, GEMV_MAX_M
from .dequant import SUPPORTED_BITS, dequant
from .gemm import gemm
from .gemv import gemv
from .layout import quant_matmul_ref

BACKENDS = ("auto", "triton", "reference")


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
    gs = x.shape[-1] if group_size is None else int(group_size)
    if torch.compiler.is_compiling():  # keep dynamo from tracing into the Triton launch
        return torch.ops.llmquant.quant_matmul(x, qweight, scales, zeros, int(bits), gs, perm, bias, backend)
    # eager: call the dispatch directly (the custom-op wrapper costs tens of microseconds per call)
    return quant_matmul_impl(x, qweight, scales, zeros, int(bits), gs, perm, bias, backend)
