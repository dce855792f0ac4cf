"""Learned rounding refinement: never increases the loss it optimizes, lowers it where there is room,
keeps the grids, is deterministic, and runs in the pipeline after RTN and GPTQ."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmquant import pipeline
from llmquant.calibration import CalibrationBlocks, fingerprint
from llmquant.config import GPTQConfig, QuantScheme, RefineConfig, RTNConfig
from llmquant.grid import quantize_weight
from llmquant.layer import ModuleLog
from llmquant.refine import _Offsets, _total_loss, refine_codes, token_weights

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
    codes, before, after = refine_codes(block, weights, result, batches, targets, RefineConfig(steps=40))
    start = {n: _Offsets.start(weights[n], qw) for n, (qw, _) in result.items()}
    assert before == pytest.approx(
        _total_loss(block, start, batches, targets)
    )  # starts at the rounder's codes
    assert after <= before
    assert after < 0.9 * before  # measured: 3-bit RTN leaves plenty of room
    for name, (qw, _) in result.items():
        moved = (codes[name].int() - qw.codes.int()).abs()
        assert int(moved.max()) <= 1 and codes[name].dtype == torch.uint8


@pytest.mark.parametrize("seed", [0, 1])
def test_relative_loss_lowers_the_token_normalized_error(seed: int) -> None:
    """``loss="relative"``: before/after are the mean over real tokens of each token's squared error over
    its float output's mean square (computed here independently); refinement lowers it."""
    block, weights, result, batches, targets = _problem(seed)
    targets = [t * torch.linspace(0.1, 30.0, t.shape[1])[None, :, None] for t in targets]  # uneven scales
    cfg = RefineConfig(steps=40, loss="relative")
    codes, before, after = refine_codes(block, weights, result, batches, targets, cfg)

    def relative(codes_of: dict) -> float:
        from llmquant.qtensor import QuantizedWeight

        w = {
            f"{n}.weight": QuantizedWeight(
                codes_of[n], qw.scales, qw.zeros, qw.bits, qw.group_size
            ).dequantize()
            for n, (qw, _) in result.items()
        }
        errs = []
        with torch.no_grad():
            for (x, _kw, mask), t in zip(batches, targets):
                e = (torch.func.functional_call(block, w, (x,)) - t).pow(2).sum(-1) / t.pow(2).mean(-1)
                errs.append(e[mask] if mask is not None else e.flatten())
        return float(torch.cat(errs).mean())

    assert before == pytest.approx(relative({n: qw.codes for n, (qw, _) in result.items()}), rel=1e-5)
    assert after == pytest.approx(relative(codes), rel=1e-5)
    assert after < 0.9 * before
    mse = token_weights(targets, "mse")
    assert mse == [None] * len(targets)


def test_no_improvement_keeps_the_rounder_codes() -> None:
    """A learning rate too small to flip any code leaves the loss equal: the rounder's codes come back."""
    block, weights, result, batches, targets = _problem(0)
    codes, before, after = refine_codes(block, weights, result, batches, targets, RefineConfig(1, lr=1e-9))
    assert after == before
    assert all(torch.equal(codes[n], qw.codes) for n, (qw, _) in result.items())


def test_refinement_is_deterministic_for_a_seed() -> None:
    block, weights, result, batches, targets = _problem(1)
    a = refine_codes(block, weights, result, batches, targets, RefineConfig(20, seed=3))[0]
    b = refine_codes(block, weights, result, batches, targets, RefineConfig(20, seed=3))[0]
    assert all(torch.equal(a[n], b[n]) for n in a)


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

    codes, before, after = refine_codes(
        block, weights, result, batches, targets, RefineConfig(20), trace=trace
    )
    assert seen == list(range(1, 21))
    assert after < before and last["loss"] == pytest.approx(after)
    assert all(torch.equal(codes[n], last["codes"][n]) for n in codes)


@pytest.mark.parametrize(
    "bad", [{"steps": 0}, {"steps": 2.5}, {"lr": 0.0}, {"lr": 2.0}, {"seed": "x"}, {"loss": "l1"}]
)
def test_refine_config_validation(bad: dict) -> None:
    with pytest.raises(ValueError, match="refine"):
        RefineConfig(**bad)


def test_refine_config_round_trips() -> None:
    from llmquant.config import method_config_from_dict

    cfg = GPTQConfig(SCHEME, refine=RefineConfig(7, lr=0.01, seed=2, loss="relative"))
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
