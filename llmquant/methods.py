"""Per-layer method glue behind a registry: *transforms* change the float layer, *rounders* quantize it.

For each decoder layer the pipeline runs the plan's transforms (AWQ: search scales, fold them into the
preceding norm/linear, clip) on the float layer, then its rounder (RTN, GPTQ) quantizes every linear of
the transformed layer. Both are registered on their config types:

- ``register_rounder(RTNConfig)`` / ``register_rounder(GPTQConfig)``: a class whose
  ``quantize_layer(layer, ctx)`` returns one ``QuantizedWeight`` + ``ModuleLog`` per linear;
- ``register_transform(AWQConfig)``: a class whose ``apply(layer, ctx)`` mutates the float layer and
  returns per-linear notes for the log; the config names its rounder (``rounder_config()``).

The pipeline owns write-back (``ctx.write_back``: the rounded weights replace the float ones so later
groups and the next layer see quantized outputs) and propagation; a rounder calls ``write_back`` itself
only between its own sequential groups (GPTQ's true-sequential order).

``METHODS`` lists what the CLI and API offer (``--method`` choices): name -> how to build its config from
options, and its natural checkpoint format.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .arch import ArchSpec
from .config import AWQConfig, GPTQConfig, MethodConfig, QuantScheme, RefineConfig, RTNConfig
from .faults import kill_point
from .grid import quantize_weight
from .layer import Call, LayerContext, LayerResult, ModuleLog, Rounder, Transform, TransformNotes
from .refine import Refiner
from .transforms import AWQTransform

__all__ = [  # the per-layer types are defined in llmquant.layer and offered here too
    "METHODS",
    "Call",
    "LayerContext",
    "LayerPlan",
    "MethodSpec",
    "LayerResult",
    "ModuleLog",
    "TransformNotes",
    "build_method_config",
    "checkpoint_meta",
    "make_plan",
    "register_rounder",
    "register_transform",
    "rounder_config",
]


_ROUNDERS: dict[type, Callable[[Any], Rounder]] = {}
_TRANSFORMS: dict[type, Callable[[Any], Transform]] = {}


def register_rounder(config_type: type) -> Callable[[type], type]:
    """Class decorator: the rounder built from configs of ``config_type``."""

    def deco(cls: type) -> type:
        _ROUNDERS[config_type] = cls
        return cls

    return deco


def register_transform(config_type: type) -> Callable[[type], type]:
    """Class decorator: the transform built from configs of ``config_type`` (which must provide
    ``rounder_config()``)."""

    def deco(cls: type) -> type:
        _TRANSFORMS[config_type] = cls
        return cls

    return deco


register_transform(AWQConfig)(AWQTransform)


@dataclass
class LayerPlan:
    """What runs on every decoder layer: transforms in order, then one rounder."""

    transforms: list[Transform]
    rounder: Rounder
    refiner: Refiner | None = None  # learned rounding after the rounder (``llmquant.refine``)

    @property
    def needs_calibration(self) -> bool:
        transforms = any(t.needs_calibration for t in self.transforms)
        return self.rounder.needs_calibration or transforms or self.refiner is not None

    @property
    def needs_float_stream(self) -> bool:
        """Whether the pipeline carries the float model's activations too (error-propagation GPTQ,
        refinement's targets)."""
        return self.refiner is not None or bool(getattr(self.rounder, "needs_float_stream", False))


def rounder_config(config: MethodConfig) -> RTNConfig | GPTQConfig:
    """The config of the rounder a method config ends in (itself for RTN/GPTQ)."""
    return config.rounder_config() if type(config) in _TRANSFORMS else config  # type: ignore[union-attr]


def make_plan(config: MethodConfig) -> LayerPlan:
    """The transforms + rounder registered for ``config``'s type (and its rounder's)."""
    transforms: list[Transform] = []
    if type(config) in _TRANSFORMS:
        transforms.append(_TRANSFORMS[type(config)](config))
    rcfg = rounder_config(config)
    if type(rcfg) not in _ROUNDERS:
        raise ValueError(f"method {config.method!r} has no registered rounder")
    refiner = Refiner(rcfg.refine) if rcfg.refine is not None else None
    return LayerPlan(transforms, _ROUNDERS[type(rcfg)](rcfg), refiner)


def checkpoint_meta(config: MethodConfig, logs: Sequence[ModuleLog]) -> dict[str, Any]:
    """Metadata a checkpoint records about the method (its config and the rounder's statistics)."""
    meta: dict[str, Any] = {"method_config": config.to_dict() | {"method": config.method}}
    return meta | make_plan(config).rounder.checkpoint_meta(logs)


# ---------------------------------------------------------------------------------------------------
# Rounders
# ---------------------------------------------------------------------------------------------------


@register_rounder(RTNConfig)
class RTNRounder:
    needs_calibration = False

    def __init__(self, config: RTNConfig) -> None:
        self.config = config

    def quantize_layer(self, layer: nn.Module, ctx: LayerContext) -> LayerResult:
        out: LayerResult = {}
        for name in ctx.arch.linear_names:
            t0 = time.perf_counter()
            module = layer.get_submodule(name)
            qw = quantize_weight(module.weight.data.float(), self.config.scheme, grid=self.config.grid)
            out[name] = (qw, ModuleLog(name, None, None, time.perf_counter() - t0, 0))
        return out

    def checkpoint_meta(self, logs: Sequence[ModuleLog]) -> dict[str, Any]:
        return {}


@register_rounder(GPTQConfig)
class GPTQRounder:
    needs_calibration = True

    def __init__(self, config: GPTQConfig) -> None:
        self.config = config
        self.needs_float_stream = config.error_propagation > 0

    def phases(self, arch: ArchSpec) -> list[tuple[tuple[str, ...], ...]]:
        """Groups quantized after one shared forward; true-sequential gives one group per phase."""
        if self.config.true_sequential:
            return [(group,) for group in arch.sequential]
        return [arch.sequential]

    def quantize_layer(self, layer: nn.Module, ctx: LayerContext) -> LayerResult:
        out: LayerResult = {}
        phases = self.phases(ctx.arch)
        for i, phase in enumerate(phases):
            stats = self._statistics(layer, ctx, [group[0] for group in phase])
            done: LayerResult = {}
            for group in phase:
                H, D, n = stats[group[0]]
                cross = None if D is None else D / max(n, 1)
                done.update(self._quantize_group(layer, group, H / max(n, 1), n, cross))
                kill_point("gptq.group")
            if i < len(phases) - 1:  # the next phase sees this phase's quantized outputs (the pipeline
                ctx.write_back(layer, done)  # writes back the last one with every other rounder's)
            out.update(done)
        return out

    def _statistics(
        self, layer: nn.Module, ctx: LayerContext, names: list[str]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None, int]]:
        """name -> (Hessian sum 2XᵀX, cross sum 2(X̃ − X)ᵀX or None, real tokens) over the calibration
        batches; the cross term only with error propagation (``X̃``: the float model's inputs)."""
        from .gptq import accumulate_cross, accumulate_hessian

        stats: dict[str, list] = {}

        def add(name: str, x: torch.Tensor, x_float: torch.Tensor | None = None) -> None:
            if name not in stats:
                k = x.shape[-1]
                cross = None if x_float is None else torch.zeros(k, k, device=x.device)
                stats[name] = [torch.zeros(k, k, device=x.device), cross, 0]
            entry = stats[name]
            entry[0], entry[2] = accumulate_hessian(entry[0], entry[2], x)
            if x_float is not None:
                accumulate_cross(entry[1], x, x_float)

        if self.needs_float_stream:
            ctx.collect_input_pairs(layer, names, add)  # type: ignore[attr-defined]
        else:
            ctx.collect_inputs(layer, names, add)
        return {name: (H, D, n) for name, (H, D, n) in stats.items()}

    def _quantize_group(
        self,
        layer: nn.Module,
        group: Sequence[str],
        H: torch.Tensor,
        tokens: int,
        D: torch.Tensor | None = None,
    ) -> LayerResult:
        """GPTQ on the group's weights stacked along N: they share H (same input), GPTQ treats rows
        independently, and act-order's permutation depends on H only, so one call equals one call per
        module -- with a single Cholesky and a third of the per-column work for q/k/v. With the cross
        term ``D`` (error propagation) GPTQ rounds the shifted target ``gptq.propagation_target``."""
        from .gptq import gptq_quantize, propagation_target

        t0 = time.perf_counter()
        weights = [layer.get_submodule(name).weight.data.float() for name in group]
        W = torch.cat(weights)  # [sum N, K]
        if D is not None:
            W = propagation_target(W, H, D, self.config.error_propagation, self.config.damp)
        res = gptq_quantize(W, H, self.config, name="+".join(group))
        seconds = (time.perf_counter() - t0) / len(group)
        out: LayerResult = {}
        start = 0
        for name, W in zip(group, weights):
            qw = res.weight.rows(start, start + W.shape[0])
            error = float(res.row_errors[start : start + W.shape[0]].sum())  # this module's rows
            start += W.shape[0]
            out[name] = (qw, ModuleLog(name, error, res.damp, seconds, tokens, res.fallback))
        return out

    def checkpoint_meta(self, logs: Sequence[ModuleLog]) -> dict[str, Any]:
        damps = [log.damp for log in logs if log.damp is not None]
        return {
            "damp_percent": self.config.damp,
            "true_sequential": self.config.true_sequential,
            "damp_max_used": max(damps) if damps else None,
            "rtn_fallbacks": sum(1 for log in logs if log.fallback),
        }


# ---------------------------------------------------------------------------------------------------
# What the CLI and API offer
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodSpec:
    """One ``--method`` choice: how to build its config from options, and its natural format."""

    name: str
    help: str
    build: Callable[[QuantScheme, Mapping[str, Any]], MethodConfig]
    natural_format: Callable[[QuantScheme], str] = field(default=lambda s: "gptq" if s.sym else "gptq_v2")
    default_sym: bool = True


def _refine_from(o: Mapping[str, Any]) -> RefineConfig | None:
    """``--refine STEPS`` (seeded by ``--seed``; ``--refine-loss``, ``--refine-scales``), or None."""
    steps, loss, scales = o.get("refine"), o.get("refine_loss"), o.get("refine_scales")
    if steps is None:
        if loss is not None or scales:
            raise ValueError("--refine-loss and --refine-scales tune --refine: add --refine STEPS (e.g. 64)")
        return None
    return RefineConfig(steps=steps, seed=o.get("seed") or 0, loss=loss or "mse", scales=bool(scales))


def _gptq_from(scheme: QuantScheme, o: Mapping[str, Any]) -> GPTQConfig:
    keys = ("damp", "block_size", "act_order", "static_groups", "true_sequential", "grid")
    keys += ("error_propagation",)
    kwargs = {k: o[k] for k in keys if o.get(k) is not None}
    return GPTQConfig(scheme=scheme, refine=_refine_from(o), **kwargs)


def _rtn_from(scheme: QuantScheme, o: Mapping[str, Any]) -> RTNConfig:
    return RTNConfig(scheme, o.get("grid") or "minmax", refine=_refine_from(o))


def _awq_from(scheme: QuantScheme, o: Mapping[str, Any], rounder: RTNConfig | GPTQConfig | None) -> AWQConfig:
    keys = ("n_grid", "duo_scaling", "clip", "search_samples")
    return AWQConfig(scheme=scheme, rounder=rounder, **{k: o[k] for k in keys if o.get(k) is not None})


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("rtn", "round to nearest (no calibration unless --refine)", _rtn_from),
        MethodSpec("gptq", "GPTQ Hessian-based rounding", _gptq_from),
        MethodSpec(
            "awq",
            "AWQ activation-aware scaling, then round to nearest",
            lambda s, o: _awq_from(
                s, o, _rtn_from(s, o) if o.get("grid") not in (None, "minmax") or o.get("refine") else None
            ),
            natural_format=lambda s: "awq",
            default_sym=False,
        ),
        MethodSpec(
            "awq+gptq",
            "AWQ scaling, then GPTQ rounding on the scaled layer",
            lambda s, o: _awq_from(s, o, _gptq_from(s, o)),
            natural_format=lambda s: "awq",
            default_sym=False,
        ),
    )
}


def build_method_config(name: str, scheme: QuantScheme, options: Mapping[str, Any]) -> MethodConfig:
    """The config of ``--method name`` with the given options (None values take the defaults)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name].build(scheme, options)
