"""Config validation (one call per pytest.raises), dict round trips, versioning, immutability."""

from __future__ import annotations

import dataclasses
import json

import pytest

from llmquant.config import (
    AWQConfig,
    CalibrationConfig,
    GPTQConfig,
    QuantScheme,
    RTNConfig,
    method_config_from_dict,
)

# ---------------------------------------------------------------------------------- QuantScheme


@pytest.mark.parametrize("bits", [0, 1, 5, 6, 7, 16, -4])
def test_scheme_rejects_unsupported_bits(bits):
    with pytest.raises(ValueError, match=r"bits must be one of \(2, 3, 4, 8\)"):
        QuantScheme(bits=bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_scheme_accepts_supported_bits_and_maxq(bits):
    assert QuantScheme(bits=bits).maxq == 2**bits - 1


@pytest.mark.parametrize("group_size", [0, -1, -128])
def test_scheme_rejects_non_positive_group_size_and_suggests_none(group_size):
    with pytest.raises(ValueError, match="use None instead of -1"):
        QuantScheme(group_size=group_size)


def test_scheme_rejects_float_group_size():
    with pytest.raises(ValueError, match="positive integer or None"):
        QuantScheme(group_size=128.0)


def test_scheme_rejects_float_bits():
    with pytest.raises(ValueError, match="bits must be one of"):
        QuantScheme(bits=4.0)


def test_scheme_rejects_bool_group_size():
    with pytest.raises(ValueError, match="positive integer or None"):
        QuantScheme(group_size=True)


@pytest.mark.parametrize(
    ("group_size", "k", "expected"),
    [(128, 576, 5), (128, 512, 4), (128, 1, 1), (32, 33, 2), (None, 576, 1), (1, 7, 7)],
)
def test_scheme_num_groups_is_ceil(group_size, k, expected):
    assert QuantScheme(group_size=group_size).num_groups(k) == expected


def test_scheme_effective_group_size():
    assert QuantScheme(group_size=None).effective_group_size(576) == 576
    assert QuantScheme(group_size=64).effective_group_size(576) == 64


# ---------------------------------------------------------------------------------- methods


@pytest.mark.parametrize("cls", [RTNConfig, GPTQConfig, AWQConfig])
def test_method_rejects_scheme_that_is_not_a_quantscheme(cls):
    with pytest.raises(ValueError, match="scheme must be a QuantScheme"):
        cls(scheme={"bits": 4})


@pytest.mark.parametrize("damp", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_gptq_rejects_damp_outside_open_unit_interval(damp):
    with pytest.raises(ValueError, match=r"damp must be in \(0, 1\)"):
        GPTQConfig(damp=damp)


@pytest.mark.parametrize("damp", [1e-6, 0.01, 0.999])
def test_gptq_accepts_damp_inside_interval(damp):
    assert GPTQConfig(damp=damp).damp == damp


@pytest.mark.parametrize("block_size", [0, -1])
def test_gptq_rejects_block_size_below_one(block_size):
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        GPTQConfig(block_size=block_size)


def test_gptq_rejects_static_groups_without_act_order():
    with pytest.raises(ValueError, match="static_groups only makes sense with act_order"):
        GPTQConfig(static_groups=True, act_order=False)


def test_gptq_accepts_static_groups_with_act_order():
    cfg = GPTQConfig(static_groups=True, act_order=True)
    assert (cfg.static_groups, cfg.act_order) == (True, True)


@pytest.mark.parametrize("n_grid", [0, -3])
def test_awq_rejects_n_grid_below_one(n_grid):
    with pytest.raises(ValueError, match="n_grid must be >= 1"):
        AWQConfig(n_grid=n_grid)


def test_awq_default_scheme_is_asym_4bit_g128():
    assert AWQConfig().scheme == QuantScheme(bits=4, group_size=128, sym=False)


def test_method_names():
    assert (RTNConfig.method, GPTQConfig.method, AWQConfig().method) == ("rtn", "gptq", "awq")
    scheme = AWQConfig().scheme
    assert AWQConfig(rounder=GPTQConfig(scheme)).method == "awq+gptq"
    assert AWQConfig(rounder=RTNConfig(scheme)).method == "awq"


# ---------------------------------------------------------------------------------- calibration


def test_calibration_rejects_empty_source():
    with pytest.raises(ValueError, match="source must not be empty"):
        CalibrationConfig(source="")


@pytest.mark.parametrize("n_samples", [0, -1])
def test_calibration_rejects_n_samples_below_one(n_samples):
    with pytest.raises(ValueError, match="n_samples must be >= 1"):
        CalibrationConfig(n_samples=n_samples)


@pytest.mark.parametrize("seqlen", [1, 0, -5])
def test_calibration_rejects_seqlen_below_two(seqlen):
    with pytest.raises(ValueError, match="seqlen must be >= 2"):
        CalibrationConfig(seqlen=seqlen)


# ---------------------------------------------------------------------------------- round trips

NON_DEFAULT_CONFIGS = [
    QuantScheme(bits=3, group_size=None, sym=False),
    QuantScheme(bits=8, group_size=32, sym=True),
    RTNConfig(scheme=QuantScheme(bits=2, group_size=64, sym=False), grid="mse"),
    GPTQConfig(
        scheme=QuantScheme(bits=3, group_size=None, sym=False),
        damp=0.1,
        block_size=32,
        act_order=True,
        static_groups=True,
        true_sequential=False,
        grid="search",
    ),
    AWQConfig(scheme=QuantScheme(bits=4, group_size=32, sym=True), n_grid=7, duo_scaling=False, clip=False),
    CalibrationConfig(source="/tmp/x.jsonl", n_samples=3, seqlen=17, seed=5, text_field="content"),
]
DEFAULT_CONFIGS = [QuantScheme(), RTNConfig(), GPTQConfig(), AWQConfig(), CalibrationConfig()]


@pytest.mark.parametrize("cfg", DEFAULT_CONFIGS + NON_DEFAULT_CONFIGS, ids=repr)
def test_to_dict_from_dict_round_trip(cfg):
    d = cfg.to_dict()
    assert d["version"] == (2 if isinstance(cfg, GPTQConfig) else 1)
    back = type(cfg).from_dict(d)
    assert back == cfg
    assert type(back) is type(cfg)
    # nested scheme comes back as a QuantScheme, not a dict
    if hasattr(cfg, "scheme"):
        assert isinstance(back.scheme, QuantScheme)
        assert d["scheme"] == {**dataclasses.asdict(cfg.scheme), "version": 1}


@pytest.mark.parametrize("cfg", DEFAULT_CONFIGS + NON_DEFAULT_CONFIGS, ids=repr)
def test_round_trip_through_json(cfg):
    assert type(cfg).from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_to_dict_has_every_field_and_nothing_else():
    cfg = NON_DEFAULT_CONFIGS[3]
    d = cfg.to_dict()
    assert set(d) == {f.name for f in dataclasses.fields(cfg)} | {"version"}
    assert d["damp"] == 0.1 and d["block_size"] == 32 and d["act_order"] is True


def test_from_dict_without_version_uses_current():
    assert GPTQConfig.from_dict({"damp": 0.05}) == GPTQConfig(damp=0.05)


def test_from_dict_accepts_scheme_object():
    s = QuantScheme(bits=2)
    assert RTNConfig.from_dict({"scheme": s}).scheme is s


def test_from_dict_rejects_unknown_key():
    with pytest.raises(ValueError, match="GPTQConfig has no field 'dampening'"):
        GPTQConfig.from_dict({"dampening": 0.1})


def test_from_dict_rejects_unknown_key_in_nested_scheme():
    with pytest.raises(ValueError, match="QuantScheme has no field 'bitz'"):
        RTNConfig.from_dict({"scheme": {"bits": 4, "bitz": 4}})


def test_from_dict_rejects_newer_version():
    with pytest.raises(ValueError, match="version 3 is newer"):
        GPTQConfig.from_dict({**GPTQConfig().to_dict(), "version": 3})


def test_gptq_default_is_error_propagation_half():
    assert GPTQConfig().error_propagation == 0.5


def test_version_1_gptq_dict_without_error_propagation_is_plain_gptq():
    """Dicts written before ``error_propagation`` existed (version 1) ran plain GPTQ, not today's default;
    a version-1 dict that names it keeps its value."""
    old = {k: v for k, v in GPTQConfig().to_dict().items() if k != "error_propagation"} | {"version": 1}
    assert GPTQConfig.from_dict(old) == GPTQConfig(error_propagation=0.0)
    assert GPTQConfig.from_dict(old | {"error_propagation": 1.0}).error_propagation == 1.0
    nested = AWQConfig(rounder=GPTQConfig(AWQConfig().scheme)).to_dict()
    rounder = {k: v for k, v in nested["rounder"].items() if k != "error_propagation"}
    nested["rounder"] = rounder | {"version": 1}
    assert AWQConfig.from_dict(nested).rounder.error_propagation == 0.0


def test_from_dict_rejects_newer_nested_scheme_version():
    d = AWQConfig().to_dict()
    d["scheme"] = {**d["scheme"], "version": 99}
    with pytest.raises(ValueError, match="QuantScheme version 99 is newer"):
        AWQConfig.from_dict(d)


def test_from_dict_accepts_older_version():
    assert QuantScheme.from_dict({"bits": 2, "version": 0}) == QuantScheme(bits=2)


def test_from_dict_still_validates():
    with pytest.raises(ValueError, match="bits must be one of"):
        RTNConfig.from_dict({"scheme": {"bits": 5}})


def test_from_dict_does_not_mutate_input():
    d = GPTQConfig().to_dict()
    snapshot = json.dumps(d, sort_keys=True)
    GPTQConfig.from_dict(d)
    assert json.dumps(d, sort_keys=True) == snapshot


# ---------------------------------------------------------------------------------- method dispatch


@pytest.mark.parametrize("cfg", [c for c in DEFAULT_CONFIGS + NON_DEFAULT_CONFIGS if hasattr(c, "method")])
def test_method_config_from_dict_is_inverse(cfg):
    data = cfg.to_dict() | {"method": cfg.method}
    back = method_config_from_dict(data)
    assert type(back) is type(cfg) and back == cfg
    assert data["method"] == cfg.method  # input not mutated


def test_method_config_from_dict_rejects_unknown_method():
    with pytest.raises(ValueError, match="unknown method 'squeezellm'"):
        method_config_from_dict({"method": "squeezellm"})


def test_method_config_from_dict_requires_method():
    with pytest.raises(ValueError, match="unknown method None"):
        method_config_from_dict(RTNConfig().to_dict())


# ---------------------------------------------------------------------------------- frozen


@pytest.mark.parametrize(
    ("cfg", "name", "value"),
    [
        (QuantScheme(), "bits", 8),
        (RTNConfig(), "grid", "search"),
        (GPTQConfig(), "damp", 0.5),
        (AWQConfig(), "n_grid", 3),
        (CalibrationConfig(), "n_samples", 1),
    ],
)
def test_configs_are_frozen(cfg, name, value):
    before = getattr(cfg, name)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(cfg, name, value)
    assert getattr(cfg, name) == before


def test_configs_are_hashable_and_compare_by_value():
    assert hash(GPTQConfig(damp=0.02)) == hash(GPTQConfig(damp=0.02))
    assert GPTQConfig(damp=0.02) != GPTQConfig(damp=0.03)
    assert RTNConfig(scheme=QuantScheme(sym=False)) != RTNConfig()


def test_gptq_defaults_to_act_order_with_static_groups():
    cfg = GPTQConfig()
    assert (cfg.act_order, cfg.static_groups) == (True, True)
    assert cfg.to_dict()["static_groups"] is True  # resolved, not None, in what is stored
    natural = GPTQConfig(act_order=False)
    assert (natural.act_order, natural.static_groups) == (False, False)
    dynamic = GPTQConfig(static_groups=False)
    assert (dynamic.act_order, dynamic.static_groups) == (True, False)
    assert GPTQConfig.from_dict(natural.to_dict()) == natural
