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

Imported as a top-level ``kernels`` (Python started in the repository root puts this folder on
``sys.path`` ahead of site-packages), it is in the way of the hub-kernels library of that name, which
transformers >= 5.25 requires and imports (``from kernels import CUDAProperties, ...``). Then this module
hands over: if that library is installed, it is loaded in this module's place (``sys.modules["kernels"]``
is the library, so every ``kernels.*`` import means what transformers means); if not, this stays a
package with no version, which transformers' probe passes over.
"""

from __future__ import annotations

import importlib
import sys
from importlib import metadata, util
from pathlib import Path
from typing import Any


def _hand_over_to_the_hub_library() -> None:
    """Load the installed hub-kernels library as ``kernels`` in this module's place (module docstring)."""
    try:
        init = Path(str(metadata.distribution("kernels").locate_file("kernels/__init__.py")))
    except metadata.PackageNotFoundError:
        return
    if not init.is_file() or init.resolve() == Path(__file__).resolve():
        return
    spec = util.spec_from_file_location("kernels", init, submodule_search_locations=[str(init.parent)])
    if spec is None or spec.loader is None:
        return
    module = util.module_from_spec(spec)
    sys.modules["kernels"] = module  # what `import kernels` returns once this module has run
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["kernels"]
        raise


if __name__ == "kernels":
    _hand_over_to_the_hub_library()

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
