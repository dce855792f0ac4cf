"""The method registry: a transform then a rounder; the CLI's choices and formats come from it."""

from __future__ import annotations

import pytest

from llmquant.api import check_format, natural_format
from llmquant.cli import build_parser
from llmquant.config import AWQConfig, GPTQConfig, QuantScheme, RTNConfig, method_config_from_dict
from llmquant.methods import METHODS, GPTQRounder, RTNRounder, build_method_config, make_plan
from llmquant.transforms import AWQTransform

ASYM = QuantScheme(4, 64, False)


@pytest.mark.parametrize(
    "config,transforms,rounder",
    [
        (RTNConfig(ASYM), [], RTNRounder),
        (GPTQConfig(ASYM), [], GPTQRounder),
        (AWQConfig(ASYM), [AWQTransform], RTNRounder),
        (AWQConfig(ASYM, rounder=GPTQConfig(ASYM)), [AWQTransform], GPTQRounder),
    ],
)
def test_plan_is_transforms_then_one_rounder(config, transforms, rounder) -> None:
    plan = make_plan(config)
    assert [type(t) for t in plan.transforms] == transforms and type(plan.rounder) is rounder
    assert plan.needs_calibration == (config.method != "rtn")
    again = method_config_from_dict(config.to_dict() | {"method": config.method})
    assert again == config and again.method == config.method


def test_awq_clip_default_follows_the_rounder() -> None:
    assert AWQConfig(ASYM).clip is True and AWQConfig(ASYM, rounder=GPTQConfig(ASYM)).clip is False
    with pytest.raises(ValueError, match="same QuantScheme"):
        AWQConfig(ASYM, rounder=GPTQConfig(QuantScheme(4, 128, False)))
    with pytest.raises(ValueError, match="does not match"):
        method_config_from_dict(AWQConfig(ASYM).to_dict() | {"method": "awq+gptq"})


def test_cli_choices_and_builders_come_from_the_registry() -> None:
    args = build_parser().parse_args(["quantize", "m", "-o", "o", "--method", "awq+gptq", "--damp", "0.05"])
    assert args.method == "awq+gptq"
    cfg = build_method_config(args.method, ASYM, vars(args))
    assert isinstance(cfg, AWQConfig) and isinstance(cfg.rounder, GPTQConfig) and cfg.rounder.damp == 0.05
    assert set(METHODS) == {"rtn", "gptq", "awq", "awq+gptq"}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "m", "-o", "o", "--method", "smoothquant"])


@pytest.mark.parametrize(
    "config,in_features,expected",
    [
        (AWQConfig(ASYM), {576, 1536}, "awq"),
        (AWQConfig(QuantScheme(4, 128, False)), {576, 1536}, "gptq_v2"),  # ragged: AutoAWQ GEMM refuses
        (AWQConfig(QuantScheme(4, 128, True)), {576, 1536}, "gptq"),
        (AWQConfig(QuantScheme(3, 64, False)), {576, 1536}, "gptq_v2"),  # AutoAWQ GEMM is 4-bit only
        (RTNConfig(QuantScheme(4, 64, True)), {576}, "gptq"),
        (GPTQConfig(ASYM), {576}, "gptq_v2"),
    ],
)
def test_natural_format(config, in_features, expected) -> None:
    assert natural_format(config, in_features) == expected


def test_check_format_refuses_before_work_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"ragged last group .* --group-size 64"):
        check_format("awq", AWQConfig(QuantScheme(4, 128, False)), {576, 1536})
    with pytest.raises(ValueError, match="gptq_v2"):
        check_format("gptq", RTNConfig(ASYM), {576})
    with pytest.raises(ValueError, match="act-order"):
        check_format("awq", GPTQConfig(ASYM, static_groups=False), {576})
    check_format("compressed-tensors", AWQConfig(QuantScheme(4, 128, False)), {576, 1536})


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "awq+gptq"])
def test_refine_options_reach_every_rounder(method) -> None:
    argv = ["quantize", "m", "-o", "o", "--method", method, "--refine", "8", "--seed", "3"]
    args = build_parser().parse_args([*argv, "--refine-loss", "relative", "--refine-scales"])
    cfg = build_method_config(args.method, ASYM, vars(args))
    rounder = cfg.rounder if isinstance(cfg, AWQConfig) else cfg
    assert (rounder.refine.steps, rounder.refine.seed) == (8, 3)
    assert (rounder.refine.loss, rounder.refine.scales) == ("relative", True)
    plain = build_method_config(method, ASYM, vars(build_parser().parse_args(argv)))
    plain = plain.rounder if isinstance(plain, AWQConfig) else plain
    assert (plain.refine.loss, plain.refine.scales) == ("mse", False)


@pytest.mark.parametrize("extra", [["--refine-loss", "relative"], ["--refine-scales"]])
def test_refine_options_without_refine_are_refused(extra) -> None:
    args = build_parser().parse_args(["quantize", "m", "-o", "o", *extra])
    with pytest.raises(ValueError, match=r"add --refine STEPS"):
        build_method_config("gptq", ASYM, vars(args))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "m", "-o", "o", "--refine", "8", "--refine-loss", "l1"])
