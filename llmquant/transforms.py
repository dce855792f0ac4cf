"""Transforms: per-layer changes to the float layer made before rounding. AWQ is the one built in.

``AWQTransform.apply`` on one decoder layer (the math is in ``awq.py``):
1. one pass over every calibration batch collects, for the input of each mapping's balanced linears and
   of every other linear, the mean |x| per channel and ``H = XᵀX`` (padding excluded);
2. a second, short pass captures the calls of the blocks that need a replay (``self_attn``, ``mlp``)
   with their keyword arguments and float outputs, on the first ``search_samples`` sequences;
3. per mapping, the scale search: a nonlinear block (attention, MLP) is replayed with the balanced
   weights replaced by ``fake_quant(W * s) / s``; a mapping whose block is its single balanced linear
   (v -> o, up -> down) is scored exactly on every token as ``tr(E H Eᵀ)``, ``E = W - fake_quant(W·s)/s``;
   a mapping whose shapes do not allow folding (grouped-query v -> o) is skipped with the reason;
4. the chosen scales are folded (the float layer computes the same function), then each linear's range
   is clipped per group by ``awq.search_clip`` with the Hessian of its (now scaled) input.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from .arch import AWQMapping
from .awq import (
    ScalePlan,
    clip_weight_,
    fold_scales_,
    scaled_fake_quant,
    search_clip,
    search_scales,
    weight_channel_mean,
)
from .config import AWQConfig
from .gptq import accumulate_hessian, hessian_init
from .layer import Call, LayerContext, TransformNotes

logger = logging.getLogger(__name__)


class _InputStats:
    """Running sum of |x| per channel and of 2·XᵀX per named linear input (unpadded tokens)."""

    def __init__(self) -> None:
        self.abs_sum: dict[str, torch.Tensor] = {}
        self.hessian: dict[str, tuple[torch.Tensor, int]] = {}

    def add(self, name: str, x: torch.Tensor) -> None:
        if name not in self.hessian:
            self.hessian[name] = hessian_init(x.shape[-1], x.device)
            self.abs_sum[name] = torch.zeros(x.shape[-1], dtype=torch.float32, device=x.device)
        self.abs_sum[name] += x.float().abs().sum(dim=0)
        self.hessian[name] = accumulate_hessian(*self.hessian[name], x)

    def mean_abs(self, name: str) -> torch.Tensor:
        return self.abs_sum[name] / max(self.hessian[name][1], 1)

    def h(self, name: str) -> torch.Tensor:
        H, n = self.hessian[name]
        return H / max(n, 1)


def _out_features(module: nn.Module) -> int:
    return module.weight.shape[0]


def skip_reason(layer: nn.Module, mapping: AWQMapping) -> str | None:
    """Why ``mapping`` cannot be folded in ``layer`` (None if it can)."""
    smooth = layer.get_submodule(mapping.smooth)
    width = _out_features(smooth)
    for name in mapping.balance:
        k = layer.get_submodule(name).weight.shape[1]
        if k != width:
            return (
                f"{mapping.smooth} outputs {width} channels but {name} reads {k} "
                "(grouped-query attention: scales cannot be folded through the head repetition)"
            )
    return None


def _masked_mse(outs: list[torch.Tensor], calls: list[Call]) -> float:
    total, count = 0.0, 0
    for y, call in zip(outs, calls):
        err = (y.float() - call.output.float()).pow(2).sum(dim=-1)  # [b, S]
        if call.mask is not None:
            err = err[call.mask.to(err.device)]
        total += float(err.sum())
        count += err.numel() * y.shape[-1]
    return total / max(count, 1)


class AWQTransform:
    needs_calibration = True

    def __init__(self, config: AWQConfig) -> None:
        self.config = config
        self.scheme = config.scheme

    def apply(self, layer: nn.Module, ctx: LayerContext) -> TransformNotes:
        t0 = time.perf_counter()
        arch = ctx.arch
        inputs = [group[0] for group in arch.sequential]  # one per distinct linear input
        stats = _InputStats()
        ctx.collect_inputs(layer, inputs, stats.add)
        mappings = [(m, skip_reason(layer, m)) for m in arch.awq]
        replayed = sorted({m.inspect for m, why in mappings if why is None and not self._linear_loss(m)})
        calls = ctx.capture_calls(layer, replayed, self.config.search_samples) if replayed else {}
        notes: TransformNotes = {name: {} for name in arch.linear_names}
        plans: list[ScalePlan] = []
        for mapping, why in mappings:
            if why is not None:
                logger.info(
                    "layer %d: AWQ skips %s -> %s: %s", ctx.index, mapping.smooth, mapping.balance, why
                )
                for name in mapping.balance:
                    notes[name]["awq_skipped"] = why
                continue
            plan = self._search(layer, mapping, stats, calls, ctx)
            plans.append(plan)
            for name in mapping.balance:
                notes[name].update(
                    awq_alpha=plan.alpha,
                    awq_loss=plan.loss,
                    awq_loss_identity=plan.loss_identity,
                    awq_loss_alpha0=plan.losses[0],
                )
        input_scales = self._fold(layer, plans)
        if self.config.clip:
            self._clip(layer, ctx, stats, input_scales, notes)
        logger.debug("layer %d: AWQ transform %.1f s", ctx.index, time.perf_counter() - t0)
        return notes

    @staticmethod
    def _linear_loss(mapping: AWQMapping) -> bool:
        """The block to inspect is the single balanced linear: its output error is tr(E H Eᵀ)."""
        return mapping.balance == (mapping.inspect,)

    def _search(
        self, layer: nn.Module, mapping: AWQMapping, stats: _InputStats, calls: dict, ctx: LayerContext
    ) -> ScalePlan:
        first = mapping.balance[0]
        modules = [layer.get_submodule(n) for n in mapping.balance]
        originals = [m.weight.data for m in modules]
        w_mean = weight_channel_mean(originals, self.scheme.group_size) if self.config.duo_scaling else None
        if self._linear_loss(mapping):
            H = stats.h(first)
            W = originals[0].float()

            def loss_fn(s: torch.Tensor) -> float:
                E = W - scaled_fake_quant(W, s.to(W.device), self.scheme).float()  # [N, K]
                # H holds 2·XᵀX/tokens: this is the mean squared output error, as the replay's loss
                return float(((E @ H) * E).sum()) / (2 * W.shape[0])

        else:
            inspect = layer.get_submodule(mapping.inspect)
            block_calls = calls[mapping.inspect]

            def loss_fn(s: torch.Tensor) -> float:
                try:
                    for m, w in zip(modules, originals):
                        m.weight.data = scaled_fake_quant(w, s.to(w.device), self.scheme)
                    return _masked_mse(ctx.replay(inspect, block_calls), block_calls)
                finally:
                    for m, w in zip(modules, originals):
                        m.weight.data = w

        return search_scales(
            mapping.smooth, mapping.balance, stats.mean_abs(first), w_mean, loss_fn, self.config.n_grid
        )

    @staticmethod
    def _fold(layer: nn.Module, plans: list[ScalePlan]) -> dict[str, torch.Tensor]:
        """Fold every plan (float function unchanged); returns the scale each linear's input now carries."""
        input_scales: dict[str, torch.Tensor] = {}
        for plan in plans:
            if plan.alpha is None:
                continue  # the identity won: nothing to fold
            balance = [layer.get_submodule(n) for n in plan.balance]
            fold_scales_(layer.get_submodule(plan.smooth), balance, plan.scales)
            for name in plan.balance:
                input_scales[name] = plan.scales
        return input_scales

    def _clip(
        self,
        layer: nn.Module,
        ctx: LayerContext,
        stats: _InputStats,
        input_scales: dict[str, torch.Tensor],
        notes: TransformNotes,
    ) -> None:
        sources = {name: group[0] for group in ctx.arch.sequential for name in group}
        for name in ctx.arch.linear_names:
            if name in ctx.arch.awq_no_clip:
                continue
            linear = layer.get_submodule(name)
            H = stats.h(sources[name])
            s = input_scales.get(name)
            if s is not None:  # the input is now x / s: H -> diag(1/s) H diag(1/s)
                s = s.to(H.device)
                H = H / (s[:, None] * s[None, :])
            plan = search_clip(
                name, linear.weight.data, H, self.scheme, self.config.clip_grid, self.config.max_shrink
            )
            clip_weight_(linear, plan, self.scheme.group_size)
            notes[name].update(clip_loss=plan.loss, clip_loss_unclipped=plan.loss_unclipped)
