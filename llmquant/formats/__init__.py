"""Checkpoint formats behind a registry (see ``base``): gptq, gptq_v2, awq, compressed-tensors."""

from . import awq, compressed_tensors, gptq  # noqa: F401  (registers the built-in formats)
from .base import (
    CheckpointFormat,
    detect_format,
    get_format,
    list_formats,
    register_format,
    stores_permutation,
)

__all__ = [
    "CheckpointFormat",
    "detect_format",
    "get_format",
    "list_formats",
    "register_format",
    "stores_permutation",
]
