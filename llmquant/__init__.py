"""llmquant: one-shot GPTQ / RTN low-bit weight quantization for LLaMA-class Hugging Face models."""

from __future__ import annotations

from .config import AWQConfig, CalibrationConfig, GPTQConfig, QuantScheme, RTNConfig
from .version import __version__

__all__ = [
    "AWQConfig",
    "CalibrationConfig",
    "GPTQConfig",
    "QuantScheme",
    "RTNConfig",
    "__version__",
    "from_pretrained",
    "quantize",
    "save_quantized",
]


def __getattr__(name: str):
    # Lazy re-exports keep `import llmquant` light (no transformers import until needed).
    if name == "quantize":
        from .pipeline import quantize

        return quantize
    if name == "save_quantized":
        from .api import save_quantized

        return save_quantized
    if name == "from_pretrained":
        from .loading import from_pretrained

        return from_pretrained
    raise AttributeError(f"module 'llmquant' has no attribute {name!r}")
