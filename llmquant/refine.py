"""Learned rounding refinement (``--refine STEPS``): signed-gradient descent on rounding offsets, per layer.

After a rounder (RTN, GPTQ) has chosen each linear's grid (fp16 scales, integer zeros) and codes, the
refinement keeps the grids and tunes the codes of the whole decoder layer together, the AutoRound way
(Cheng et al. 2023): every weight gets an offset ``V`` and its code becomes

    code = clamp(round(W / s + z + V), 0, 2**bits − 1),     ŵ = s · (code − z),

with ``W`` the float (transformed) weight. ``V`` starts where the rounder's codes are (``V0 = code0 −
(W / s + z)`` where the rounder moved a code away from nearest, 0 where it did not) and stays within
``V0 ± 0.5``. The loss is the mean squared error between the layer's output with the fake-quantized
weights on the quantized model's inputs and the float layer's output on the float model's inputs (the
pipeline's two streams), on real tokens only (``loss="relative"``: each token's error divided by the
mean square of its float output); gradients pass the rounding straight through. Each step takes one
cached calibration batch (a seeded permutation of them, so a run is deterministic), and ``V`` moves by
``lr · sign(∇)`` with ``lr`` decaying linearly to zero.

The loss over every calibration batch is measured before and after; when the refined codes do not
lower it, the rounder's codes are kept: the refinement never increases the loss it optimizes.

``refine_codes`` is the pure tensor part (one layer, given its inputs and targets); ``Refiner`` is the
per-layer step the pipeline runs after the rounder (``methods.LayerPlan.refiner``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from .config import RefineConfig
from .layer import LayerResult
from .qtensor import QuantizedWeight

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, dict, torch.Tensor | None]  # (inputs [b, S, H], layer kwargs, mask [b, S])


@dataclass
class _Offsets:
    """One linear's refinement state: its float weight, its grid (group scales [N, G] and zeros
    expanded to [N, K]), the offsets V and, when scales are tuned, their log multipliers [N, G]."""

    weight: torch.Tensor
    group_scale: torch.Tensor
    g: torch.Tensor
    zero: torch.Tensor
    v: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    maxq: int
    log_scale: torch.Tensor | None = None

    @classmethod
    def start(cls, weight: torch.Tensor, qw: QuantizedWeight, tune_scales: bool = False) -> _Offsets:
        """V0 = 0 where the rounder's code is round-to-nearest (AutoRound's start from RTN); elsewhere
        (codes GPTQ moved) ``W/s + z + V0`` sits at the centre of the rounder's code, so noise in the
        first signed steps does not flip it straight back. Scale multipliers start at 1."""
        g = qw.group_index().to(weight.device)
        group_scale = qw.scales.to(weight.device).float()
        zero = qw.zeros.to(weight.device).float()[:, g]  # [N, G] -> [N, K]
        x = weight / group_scale[:, g] + zero
        code = qw.codes.to(weight.device).float()
        v0 = torch.where(torch.round(x).clamp(0, (1 << qw.bits) - 1) == code, 0.0, code - x)
        log_scale = torch.zeros_like(group_scale) if tune_scales else None
        return cls(
            weight, group_scale, g, zero, v0.clone(), v0 - 0.5, v0 + 0.5, (1 << qw.bits) - 1, log_scale
        )

    @property
    def scale(self) -> torch.Tensor:
        """The scales expanded to [N, K] (times their tuned multipliers)."""
        s = self.group_scale if self.log_scale is None else self.group_scale * torch.exp(self.log_scale)
        return s[:, self.g]

    def params(self) -> list[torch.Tensor]:
        return [self.v] if self.log_scale is None else [self.v, self.log_scale]

    def step(self, grads: Sequence[torch.Tensor], rate: float) -> None:
        """One signed-gradient step; V stays within ``V0 ± 0.5``, scales within ``SCALE_RANGE``."""
        with torch.no_grad():
            self.v.sub_(rate * torch.sign(grads[0])).clamp_(min=self.lo, max=self.hi)
            if self.log_scale is not None:
                self.log_scale.sub_(rate * torch.sign(grads[1])).clamp_(-SCALE_RANGE, SCALE_RANGE)

    def settle(self) -> None:
        """Fold tuned scales into exact float16 group scales (what the checkpoint stores)."""
        if self.log_scale is not None:
            with torch.no_grad():
                self.group_scale = (self.group_scale * torch.exp(self.log_scale)).half().float()
            self.log_scale = None

    def fake_quant(self) -> torch.Tensor:
        """``s · (clamp(round(W/s + z + V)) − z)``, rounding passed straight through."""
        scale = self.scale
        x = self.weight / scale + self.zero + self.v
        q = (x + (torch.round(x) - x).detach()).clamp(0, self.maxq)
        return scale * (q - self.zero)

    def codes(self) -> torch.Tensor:
        with torch.no_grad():
            x = self.weight / self.scale + self.zero + self.v
            return torch.round(x).clamp(0, self.maxq).to(torch.uint8)

    def quantized(self, qw: QuantizedWeight) -> QuantizedWeight:
        """``qw`` with these codes (and scales, once settled)."""
        scales = self.group_scale.to(qw.scales.device, torch.float16)
        return QuantizedWeight(
            self.codes().to(qw.codes.device), scales, qw.zeros, qw.bits, qw.group_size, qw.g_idx
        )


SCALE_RANGE = 0.2  # tuned scales stay within exp(±0.2) = ×0.82 .. ×1.22 of the rounder's


def token_weights(targets: Sequence[torch.Tensor], loss: str) -> list[torch.Tensor | None]:
    """Per-token weights [b, S] of the loss, one per batch: None (plain squared error) for ``"mse"``;
    for ``"relative"`` 1 / the mean square of the float output at that token."""
    if loss == "mse":
        return [None] * len(targets)
    return [1.0 / t.detach().float().pow(2).mean(dim=-1).clamp_min(1e-12) for t in targets]


def _layer_loss(
    layer: nn.Module,
    weights: dict[str, torch.Tensor],
    batch: Batch,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean (token-``weight``ed) squared error over the batch's real tokens of ``layer`` (with
    ``weights`` substituted)."""
    x, kwargs, mask = batch
    y = functional_call(layer, weights, (x,), kwargs)
    y = y[0] if isinstance(y, tuple) else y
    err = (y - target).pow(2).sum(dim=-1)  # [b, S]
    if weight is not None:
        err = err * weight
    if mask is not None:
        return err[mask].mean()
    return err.mean()


def _total_loss(
    layer: nn.Module,
    offsets: dict[str, _Offsets],
    batches: Sequence[Batch],
    targets: Sequence[torch.Tensor],
    tokens_weights: Sequence[torch.Tensor | None] | None = None,
) -> float:
    """The loss refinement optimizes, over every batch (mean over real tokens); ``tokens_weights``
    from ``token_weights`` (None: plain squared error)."""
    total, tokens = 0.0, 0
    tokens_weights = tokens_weights or [None] * len(batches)
    with torch.no_grad():
        weights = {f"{n}.weight": o.fake_quant() for n, o in offsets.items()}
        for batch, target, tw in zip(batches, targets, tokens_weights):
            count = int(batch[2].sum()) if batch[2] is not None else batch[0].shape[0] * batch[0].shape[1]
            total += float(_layer_loss(layer, weights, batch, target, tw)) * count
            tokens += count
    return total / max(tokens, 1)


def refine_codes(
    layer: nn.Module,
    weights: dict[str, torch.Tensor],
    result: LayerResult,
    batches: Sequence[Batch],
    targets: Sequence[torch.Tensor],
    config: RefineConfig,
    trace: Callable[[int, dict[str, _Offsets]], None] | None = None,
) -> tuple[dict[str, torch.Tensor], float, float]:
    """Every linear of ``result`` refined (name -> QuantizedWeight: new codes, and with
    ``config.scales`` new float16 scales; zeros and g_idx kept), and the loss before / after.

    ``layer``: the decoder layer (its linears' weights are substituted, never modified); ``weights``:
    name -> float weight [N, K]; ``batches``: the quantized stream's inputs; ``targets``: the float
    layer's outputs on the float stream, one per batch. The rounder's weights come back unchanged (and
    after == before) when refinement does not lower the loss. ``trace(step, offsets)``, if given, is
    called after every step (diagnostics: ``scripts/refine_cost.py --trace``).
    """
    offsets = {n: _Offsets.start(weights[n].float(), qw, config.scales) for n, (qw, _log) in result.items()}
    tw = token_weights(targets, config.loss)
    before = _total_loss(layer, offsets, batches, targets, tw)
    gen = torch.Generator().manual_seed(config.seed)
    epochs = -(-config.steps // len(batches))
    order = torch.cat([torch.randperm(len(batches), generator=gen) for _ in range(epochs)])
    lr = config.lr if config.lr is not None else 1.0 / config.steps
    params = [p for o in offsets.values() for p in o.params()]
    for p in params:
        p.requires_grad_(True)
    for step in range(config.steps):
        j = int(order[step])
        fake = {f"{n}.weight": o.fake_quant() for n, o in offsets.items()}
        loss = _layer_loss(layer, fake, batches[j], targets[j], tw[j])
        grads = iter(torch.autograd.grad(loss, params))
        rate = lr * (1.0 - step / config.steps)
        for o in offsets.values():
            o.step([next(grads) for _ in o.params()], rate)
        if trace is not None:
            trace(step + 1, offsets)
    for o in offsets.values():
        for p in o.params():
            p.requires_grad_(False)
        o.settle()
    after = _total_loss(layer, offsets, batches, targets, tw)
    if not after < before:
        return {n: qw for n, (qw, _log) in result.items()}, before, before
    return {n: offsets[n].quantized(qw) for n, (qw, _log) in result.items()}, before, after


class Refiner:
    """The pipeline's per-layer refinement step (after the rounder, before write-back)."""

    def __init__(self, config: RefineConfig) -> None:
        self.config = config

    def refine(self, layer: nn.Module, result: LayerResult, ctx) -> LayerResult:
        """``result`` with refined codes; ``ctx.float_layer`` holds the float weights and gives the
        targets (on ``ctx.float_inputs``); the loss before/after goes into each linear's log."""
        t0 = time.perf_counter()
        batches = ctx.grad_batches(ctx.inputs)
        targets = ctx.float_targets()
        weights = {n: ctx.float_layer.get_submodule(n).weight.detach() for n in result}
        with torch.enable_grad():
            refined, before, after = refine_codes(layer, weights, result, batches, targets, self.config)
        seconds = time.perf_counter() - t0
        logger.info("refine layer %d: loss %.4g -> %.4g in %.1f s", ctx.index, before, after, seconds)
        note = {"refine_loss_before": before, "refine_loss_after": after, "refine_seconds": seconds}
        return {n: (refined[n], _noted(log, note)) for n, (_qw, log) in result.items()}


def _noted(log, note: dict) -> object:
    return dataclasses.replace(log, transform={**(log.transform or {}), **note})
