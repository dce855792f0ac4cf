"""Learned rounding refinement: never increases the loss it optimizes, lowers it where there is room,
keeps the grids, is deterministic, and runs in the pipeline after RTN and GPTQ."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from llmquant import pipeline
from llmquant.calibration import CalibrationBlocks, fingerprint
from llmquant.config import GPTQConfig, QuantScheme, RefineConfig, RTNConfig
from llmquant.grid import quantize_weight
from llmquant.layer import ModuleLog
from llmquant.refine import SCALE_RANGE, _Offsets, _total_loss, refine_codes, token_weights

SCHEME = QuantScheme(3, 16, False)


class _Block(nn.Module):
    """A two-linear stand-in for a decoder layer (kwargs accepted and ignored)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.up, self.down = nn.Linear(32, 64, bias=False), nn.Linear(64, 32, bias=False)

    def forward(self, x: torch.Tensor, **_kwargs) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


def _problem(seed: int, rounder: str = "rtn"):
    block = _Block(seed).requires_grad_(False)
    weights = {n: block.get_submodule(n).weight.detach().clone() for n in ("up", "down")}
    result = {
        n: (
            quantize_weight(w, SCHEME, grid="search" if rounder == "search" else "minmax"),
            ModuleLog(n, None, None, 0, 0),
        )
        for n, w in weights.items()
    }
    gen = torch.Generator().manual_seed(100 + seed)
    xs = [torch.randn(4, 16, 32, generator=gen) for _ in range(4)]
    mask = torch.ones(4, 16, dtype=torch.bool)
    mask[0, 12:] = False
    batches = [(x, {}, mask if j == 0 else None) for j, x in enumerate(xs)]
    with torch.no_grad():
        targets = [block(x) for x in xs]
    return block, weights, result, batches, targets


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rounder", ["rtn", "search"])
def test_refinement_lowers_and_never_raises_the_layer_loss(seed: int, rounder: str) -> None:
    block, weights, result, batches, targets = _problem(seed, rounder)
    refined, before, after = refine_codes(block, weights, result, batches, targets, RefineConfig(steps=40))
    start = {n: _Offsets.start(weights[n], qw) for n, (qw, _) in result.items()}
    assert before == pytest.approx(
        _total_loss(block, start, batches, targets)
    )  # starts at the rounder's codes
    assert after <= before
    assert after < 0.9 * before  # measured: 3-bit RTN leaves plenty of room
    assert after == pytest.approx(_loss_of(block, refined, batches, targets, relative=False), rel=1e-5)
    for name, (qw, _) in result.items():
        moved = (refined[name].codes.int() - qw.codes.int()).abs()
        assert int(moved.max()) <= 1 and refined[name].codes.dtype == torch.uint8
        assert torch.equal(refined[name].scales, qw.scales) and torch.equal(refined[name].zeros, qw.zeros)


def _loss_of(block, quantized: dict, batches, targets, relative: bool) -> float:
    """The layer loss of dequantized weights, computed independently of llmquant.refine."""
    w = {f"{n}.weight": qw.dequantize() for n, qw in quantized.items()}
    errs = []
    with torch.no_grad():
        for (x, _kw, mask), t in zip(batches, targets):
            e = (torch.func.functional_call(block, w, (x,)) - t).pow(2).sum(-1)
            e = e / t.pow(2).mean(-1) if relative else e
            errs.append(e[mask] if mask is not None else e.flatten())
    return float(torch.cat(errs).mean())


@pytest.mark.parametrize("seed", [0, 1])
def test_relative_loss_lowers_the_token_normalized_error(seed: int) -> None:
    """``loss="relative"``: before/after are the mean over real tokens of each token's squared error over
    its float output's mean square (computed here independently); refinement lowers it."""
    block, weights, result, batches, targets = _problem(seed)
    targets = [t * torch.linspace(0.1, 30.0, t.shape[1])[None, :, None] for t in targets]  # uneven scales
    cfg = RefineConfig(steps=40, loss="relative")
    refined, before, after = refine_codes(block, weights, result, batches, targets, cfg)
    rounder = {n: qw for n, (qw, _) in result.items()}
    assert before == pytest.approx(_loss_of(block, rounder, batches, targets, relative=True), rel=1e-5)
    assert after == pytest.approx(_loss_of(block, refined, batches, targets, relative=True), rel=1e-5)
    assert after < 0.9 * before
    mse = token_weights(targets, "mse")
    assert mse == [None] * len(targets)


def test_no_improvement_keeps_the_rounder_codes() -> None:
    """A learning rate too small to flip any code leaves the loss equal: the rounder's codes come back."""
    block, weights, result, batches, targets = _problem(0)
    refined, before, after = refine_codes(block, weights, result, batches, targets, RefineConfig(1, lr=1e-9))
    assert after == before
    assert all(refined[n] is qw for n, (qw, _) in result.items())


def test_refinement_is_deterministic_for_a_seed() -> None:
    block, weights, result, batches, targets = _problem(1)
    a = refine_codes(block, weights, result, batches, targets, RefineConfig(20, seed=3))[0]
    b = refine_codes(block, weights, result, batches, targets, RefineConfig(20, seed=3))[0]
    assert all(a[n].equal(b[n]) for n in a)


def test_trace_sees_every_step_and_the_final_offsets() -> None:
    """The diagnostics hook: called once per step, in order; at the last step its offsets give the codes
    returned (when refinement won) and the loss reported."""
    block, weights, result, batches, targets = _problem(1)
    seen: list[int] = []
    last: dict = {}

    def trace(step: int, offsets: dict) -> None:
        seen.append(step)
        last["loss"] = _total_loss(block, offsets, batches, targets)
        last["codes"] = {n: o.codes() for n, o in offsets.items()}

    refined, before, after = refine_codes(
        block, weights, result, batches, targets, RefineConfig(20), trace=trace
    )
    assert seen == list(range(1, 21))
    assert after < before and last["loss"] == pytest.approx(after)
    assert all(torch.equal(refined[n].codes, last["codes"][n]) for n in refined)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tuned_scales_are_exact_float16_in_range_and_lower_the_loss(seed: int) -> None:
    """``scales=True``: the reported loss is that of the returned float16 scales and codes (computed
    independently), below the rounder's; scales moved within the allowed range, zeros kept."""
    block, weights, result, batches, targets = _problem(seed)
    refined, before, after = refine_codes(
        block, weights, result, batches, targets, RefineConfig(40, scales=True)
    )
    assert after < 0.9 * before
    assert after == pytest.approx(_loss_of(block, refined, batches, targets, relative=False), rel=1e-5)
    moved = False
    for name, (qw, _) in result.items():
        new = refined[name]
        assert new.scales.dtype == torch.float16 and torch.equal(new.zeros, qw.zeros)
        ratio = new.scales.float() / qw.scales.float()
        assert float(ratio.min()) >= math.exp(-SCALE_RANGE) * 0.999
        assert float(ratio.max()) <= math.exp(SCALE_RANGE) * 1.001
        moved |= not torch.equal(new.scales, qw.scales)
    assert moved


@pytest.mark.parametrize(
    "bad",
    [{"steps": 0}, {"steps": 2.5}, {"lr": 0.0}, {"lr": 2.0}, {"seed": "x"}, {"loss": "l1"}, {"scales": 1}],
)
def test_refine_config_validation(bad: dict) -> None:
    with pytest.raises(ValueError, match="refine"):
        RefineConfig(**bad)


def test_refine_config_round_trips() -> None:
    from llmquant.config import method_config_from_dict

    cfg = GPTQConfig(SCHEME, refine=RefineConfig(7, lr=0.01, seed=2, loss="relative", scales=True))
    assert method_config_from_dict(cfg.to_dict() | {"method": "gptq"}) == cfg


def _blocks(n: int = 8, seqlen: int = 32) -> CalibrationBlocks:
    ids = torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    return CalibrationBlocks(ids, mask, "test", fingerprint(ids, mask))


@pytest.mark.parametrize(
    ("cfg", "steps"),
    [(RTNConfig(SCHEME), 16), (GPTQConfig(SCHEME, error_propagation=0.0), 16), (GPTQConfig(SCHEME), 64)],
    ids=["rtn", "gptq-plain", "gptq-default"],
)
def test_pipeline_refinement_keeps_grids_and_lowers_the_output_error(make_tiny_llama, cfg, steps) -> None:
    """After RTN and GPTQ: the rounder's scales/zeros (all layers for RTN, whose grids depend on the
    weights alone; layer 0 for GPTQ, whose later grids see the refined earlier layers), the logged loss
    never up, and the logits move toward float. After the default GPTQ (error propagation α 0.5, whose
    codes already target the float outputs) 16 steps lowered no layer's loss on this model (the codes
    were kept), 64 did."""
    import dataclasses

    blocks = _blocks()
    with torch.no_grad():
        ref = make_tiny_llama()(blocks.input_ids).logits
    plain = pipeline.quantize(make_tiny_llama(), cfg, blocks, progress=False, batch_size=2)
    refined_cfg = dataclasses.replace(cfg, refine=RefineConfig(steps=steps))
    refined = pipeline.quantize(make_tiny_llama(), refined_cfg, blocks, progress=False, batch_size=2)
    for name, qw in plain.quantized.items():
        if cfg.method == "gptq" and not name.startswith("model.layers.0."):
            continue
        other = refined.quantized[name]
        assert torch.equal(qw.scales, other.scales) and torch.equal(qw.zeros, other.zeros), name
    for log in refined.logs:
        assert log.transform["refine_loss_after"] <= log.transform["refine_loss_before"]
    with torch.no_grad():
        errs = [(r.model(blocks.input_ids).logits - ref).pow(2).mean().item() for r in (plain, refined)]
    assert errs[1] < errs[0], errs
