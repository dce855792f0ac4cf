"""Quantized matmul kernels (installed as ``llmquant.kernels``).

``quant_matmul`` (custom op ``llmquant::quant_matmul``) dispatches to the Triton kernels on CUDA and to
the plain-PyTorch reference elsewhere (``dispatch.py``). Layout: ``layout.py``. One op per file, each as
``_op_kernel`` (triton.jit) -> ``op`` (launcher) -> ``op_ref`` (PyTorch):

- ``dequant.py``: kernel layout -> dense W^T (bitwise equal to the reference)
- ``gemv.py``: split-K CUDA-core GEMV for M <= 16 rows
- ``gemm.py``: tiled tensor-core GEMM (split-K for skinny M)
- ``configs.py``: autotune configs per regime, pruning, interpreter configs, tuned-config JSON cache

Importing this package compiles nothing and touches no GPU.
"""

from __future__ import annotations

from .dequant import dequant, dequant_ref
from .dispatch import quant_matmul
from .gemm import gemm, gemm_ref
from .gemv import gemv, gemv_ref
from .layout import concat_layouts, dequantize_ref, quant_matmul_ref, to_kernel_layout

__all__ = [
    "concat_layouts",
    "dequant",
    "dequant_ref",
    "dequantize_ref",
    "gemm",
    "gemm_ref",
    "gemv",
    "gemv_ref",
    "quant_matmul",
    "quant_matmul_ref",
    "to_kernel_layout",
]
