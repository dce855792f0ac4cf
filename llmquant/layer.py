"""What the pipeline offers a method for one decoder layer, and what a method gives back.

A rounder's ``quantize_layer(layer, ctx)`` returns a ``LayerResult`` (one ``QuantizedWeight`` + ``ModuleLog``
per linear); a transform's ``apply(layer, ctx)`` changes the float layer and returns ``TransformNotes``.
The registry that builds them from configs is ``llmquant.methods``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from .arch import ArchSpec
from .qtensor import QuantizedWeight


@dataclass(frozen=True)
class ModuleLog:
    """One row of the per-module quantization log (``quant_log.json``)."""

    name: str
    hessian_error: float | None  # tr((W - Q) H (W - Q)ᵀ) on the calibration inputs (GPTQ); None for RTN
    damp: float | None  # damp fraction actually used (GPTQ)
    seconds: float
    tokens: int  # calibration tokens that entered the statistics (padding excluded)
    fallback: str | None = None
    transform: dict[str, Any] | None = None  # what a transform did to this linear (AWQ alpha, clip)


@dataclass(frozen=True)
class Call:
    """One captured call of a submodule on one calibration batch (on the compute device)."""

    args: tuple
    kwargs: dict
    output: torch.Tensor  # the float module's output (first element of a tuple output)
    mask: torch.Tensor | None  # [b, S] bool, True = real token; None = no padding


class LayerContext(Protocol):
    """What the pipeline offers a method for one layer."""

    index: int
    arch: ArchSpec

    def collect_inputs(
        self, layer: nn.Module, names: Sequence[str], fn: Callable[[str, torch.Tensor], None]
    ) -> None:
        """Run every calibration batch through ``layer``; call ``fn(name, X [tokens, K])`` with the
        real (unpadded) input tokens of each named submodule."""
        ...

    def capture_calls(self, layer: nn.Module, names: Sequence[str], n_samples: int) -> dict[str, list[Call]]:
        """The positional and keyword arguments and outputs of each named submodule's calls on the first
        ``n_samples`` calibration sequences (whole batches)."""
        ...

    def replay(self, module: nn.Module, calls: Sequence[Call]) -> list[torch.Tensor]:
        """``module`` run again on each captured call's arguments."""
        ...

    def write_back(self, layer: nn.Module, result: LayerResult) -> None:
        """Replace each quantized linear's float weight by its dequantized weight (in place)."""
        ...


LayerResult = dict[str, tuple[QuantizedWeight, ModuleLog]]
TransformNotes = dict[str, dict[str, Any]]  # linear name -> notes merged into its ModuleLog.transform


class Rounder(Protocol):
    needs_calibration: bool

    def quantize_layer(self, layer: nn.Module, ctx: LayerContext) -> LayerResult: ...

    def checkpoint_meta(self, logs: Sequence[ModuleLog]) -> dict[str, Any]: ...


class Transform(Protocol):
    needs_calibration: bool

    def apply(self, layer: nn.Module, ctx: LayerContext) -> TransformNotes: ...
