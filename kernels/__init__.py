"""Quantized matmul kernels (installed as ``llmquant.kernels``).

``quant_matmul`` (custom op ``llmquant::quant_matmul``) dispatches to the Triton kernels on CUDA and to
the plain-PyTorch reference elsewhere (``dispatch.py``). Layout: ``layout.py``. One op per file, each as
``_op_kernel`` (triton.jit) -> ``op`` (launcher) -> ``op_ref`` (PyTorch):

- ``dequant.py``: kernel layout -> dense W^T (bitwise equal to the reference)
- ``gemv.py``: split-K CUDA-core GEMV for M <= 16 rows
- ``gemm.py``: tiled tensor-core GEMM (split-K for skinny M)
- ``configs.py``: autotune configs per regime (built once per process and mode), pruning, interpreter
  configs; ``tuning.py``: the tuned-config JSON cache (dump/load the autotuners' choices)
- ``_jit.py``: the ``@triton.jit`` device helpers the three kernels share; ``_launch.py``: host-side
  checks and launch plumbing; ``bitpack.py``: low-bit codes <-> int32 words (torch only)

Layers, bottom up: ``bitpack`` -> ``layout`` (torch only) -> ``configs`` / ``_jit`` -> ``_launch`` ->
``dequant`` -> ``gemv`` / ``gemm`` -> ``dispatch`` (imports the Triton launchers on first CUDA use) and
``tuning``. Nothing here imports ``llmquant``.

Importing this package compiles nothing and touches no GPU.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule; resolved on first access (PEP 562), so importing the package imports
# neither Triton nor any kernel: the CPU paths (quantize, load, the reference matmul) never do, and
# transformers' probe for the hub-kernels package (``import kernels`` from the repository root) finds
# a package with no version and moves on
# a launcher is imported from its own module (``from llmquant.kernels.gemv import gemv``): a package
# attribute named like a submodule would be replaced by that submodule once anything imports it
_EXPORTS = {
    "concat_layouts": "layout",
    "dequantize_ref": "layout",
    "quant_matmul": "dispatch",
    "quant_matmul_ref": "layout",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
