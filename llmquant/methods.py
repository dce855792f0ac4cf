"""Per-layer glue for each method: which statistics to collect, then calls into the pure math.

A method receives one decoder layer (on the compute device, float weights) and a ``LayerContext``
that can run the cached calibration inputs through it. It quantizes the layer's linears, writes the
fake-quantized weights back into the layer (so later groups and the next layer see quantized
outputs), and returns one ``QuantizedWeight`` + ``ModuleLog`` per linear.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from .arch import ArchSpec
from .config import GPTQConfig, MethodConfig, RTNConfig
from .grid import quantize_weight
from .qtensor import QuantizedWeight


@dataclass(frozen=True)
class ModuleLog:
    """One row of the per-module quantization log (``quant_log.json``)."""

    name: str
    loss: float | None  # method objective (GPTQ: Hessian-weighted error); None for RTN
    damp: float | None  # damp fraction actually used (GPTQ)
    seconds: float
    tokens: int  # calibration tokens that entered the statistics (padding excluded)
    fallback: str | None = None


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


LayerResult = dict[str, tuple[QuantizedWeight, ModuleLog]]


class RTNMethod:
    needs_calibration = False

    def __init__(self, config: RTNConfig) -> None:
        self.config = config

    def quantize_layer(self, layer: nn.Module, ctx: LayerContext) -> LayerResult:
        out: LayerResult = {}
        for name in ctx.arch.linear_names:
            t0 = time.perf_counter()
            module = layer.get_submodule(name)
            qw = quantize_weight(module.weight.data.float(), self.config.scheme, mse=self.config.mse_clip)
            # no write-back: RTN propagates nothing, and the pipeline swaps in a QuantLinear next
            out[name] = (qw, ModuleLog(name, None, None, time.perf_counter() - t0, 0))
        return out


class GPTQMethod:
    needs_calibration = True

    def __init__(self, config: GPTQConfig) -> None:
        self.config = config

    def phases(self, arch: ArchSpec) -> list[tuple[tuple[str, ...], ...]]:
        """Groups quantized after one shared forward; true-sequential gives one group per phase."""
        if self.config.true_sequential:
            return [(group,) for group in arch.sequential]
        return [arch.sequential]

    def quantize_layer(self, layer: nn.Module, ctx: LayerContext) -> LayerResult:
        from .gptq import accumulate_hessian, hessian_init

        out: LayerResult = {}
        for phase in self.phases(ctx.arch):
            stats: dict[str, tuple[torch.Tensor, int]] = {}

            def add(name: str, x: torch.Tensor, stats: dict = stats) -> None:
                if name not in stats:
                    stats[name] = hessian_init(x.shape[-1], x.device)
                stats[name] = accumulate_hessian(*stats[name], x)

            ctx.collect_inputs(layer, [group[0] for group in phase], add)
            for group in phase:
                H, n = stats[group[0]]
                out.update(self._quantize_group(layer, group, H / max(n, 1), n))
        return out

    def _quantize_group(
        self, layer: nn.Module, group: Sequence[str], H: torch.Tensor, tokens: int
    ) -> LayerResult:
        """GPTQ on the group's weights stacked along N: they share H (same input), GPTQ treats rows
        independently, and act-order's permutation depends on H only, so one call equals one call per
        module -- with a single Cholesky and a third of the per-column work for q/k/v."""
        from .gptq import gptq_quantize, hessian_weighted_error

        t0 = time.perf_counter()
        modules = [layer.get_submodule(name) for name in group]
        weights = [m.weight.data.float() for m in modules]
        res = gptq_quantize(torch.cat(weights), H, self.config, name="+".join(group))  # [sum N, K]
        seconds = (time.perf_counter() - t0) / len(group)
        out: LayerResult = {}
        start = 0
        for name, module, W in zip(group, modules, weights):
            qw = res.weight.rows(start, start + W.shape[0])
            start += W.shape[0]
            Q = qw.dequantize()
            module.weight.data = Q.to(module.weight.dtype)
            error = hessian_weighted_error(W, Q, H)
            out[name] = (qw, ModuleLog(name, error, res.damp, seconds, tokens, res.fallback))
        return out


def make_method(config: MethodConfig) -> RTNMethod | GPTQMethod:
    if isinstance(config, RTNConfig):
        return RTNMethod(config)
    if isinstance(config, GPTQConfig):
        return GPTQMethod(config)
    raise ValueError(f"method {config.method!r} is not available yet; use rtn or gptq")
