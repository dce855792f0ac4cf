"""Registry and detect_format on configs as other tools write them (features.md B2-B4)."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import pytest

from llmquant.config import QuantScheme
from llmquant.formats import base, detect_format, get_format, list_formats, register_format

AUTOGPTQ = {
    "bits": 4, "group_size": 128, "damp_percent": 0.01, "desc_act": False, "static_groups": False,
    "sym": True, "true_sequential": True, "model_name_or_path": None, "model_file_base_name": None,
    "quant_method": "gptq", "checkpoint_format": "gptq",
}  # fmt: skip
GPTQMODEL = {
    "bits": 4, "checkpoint_format": "gptq", "desc_act": False,
    "dynamic": {"-:.*.mlp.gate.*": {}},
    "group_size": 128, "lm_head": False,
    "meta": {"damp_auto_increment": 0.01, "damp_percent": 0.01, "mse": 0.0,
             "quantizer": ["gptqmodel:4.0.0-dev"], "static_groups": False,
             "true_sequential": True, "uri": "https://github.com/modelcloud/gptqmodel"},
    "pack_dtype": "int32", "quant_method": "gptq", "sym": True,
}  # fmt: skip
AUTOAWQ = {
    "quant_method": "awq", "zero_point": True, "group_size": 128, "bits": 4, "version": "gemm",
    "modules_to_not_convert": None,
}  # fmt: skip
LLM_COMPRESSOR = {
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 4, "type": "int", "symmetric": True, "group_size": 128,
                        "strategy": "group", "block_structure": None, "dynamic": False,
                        "actorder": "weight", "scale_dtype": None, "zp_dtype": None,
                        "observer": "memoryless_minmax", "observer_kwargs": {}},
            "input_activations": None, "output_activations": None,
            "format": "pack-quantized",
        }
    },
    "format": "pack-quantized", "global_compression_ratio": None, "ignore": ["lm_head"],
    "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
    "sparsity_config": {}, "transform_config": {}, "version": "0.12.0",
}  # fmt: skip


def _with(config: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**config, **changes}


def test_list_and_get() -> None:
    assert list_formats() == ["awq", "compressed-tensors", "gptq", "gptq_v2"]
    assert get_format("GPTQ-v2") is get_format("gptq_v2")
    assert get_format("compressed_tensors").name == "compressed-tensors"
    with pytest.raises(ValueError, match=r"known: \['awq', 'compressed-tensors', 'gptq', 'gptq_v2'\]"):
        get_format("exl2")


def test_register_custom_format() -> None:
    class Dummy(type(get_format("gptq_v2"))):
        name: ClassVar[str] = "dummy_fmt"

    try:
        register_format(Dummy)
        assert "dummy_fmt" in list_formats() and isinstance(get_format("dummy-fmt"), Dummy)
        with pytest.raises(ValueError, match="already registered"):

            class Other(Dummy):
                pass

            register_format(Other)
    finally:
        base._REGISTRY.pop("dummy-fmt", None)


@pytest.mark.parametrize(
    ("config", "name", "scheme", "flags"),
    [
        (AUTOGPTQ, "gptq", QuantScheme(4, 128, True), {"act_order": False, "static_groups": False}),
        (GPTQMODEL, "gptq", QuantScheme(4, 128, True), {"act_order": False, "lm_head": False}),
        (
            _with(AUTOGPTQ, desc_act=True, group_size=-1),
            "gptq",
            QuantScheme(4, None, True),
            {"act_order": True},
        ),
        (
            _with(AUTOGPTQ, checkpoint_format="gptq_v2", sym=False, bits=3),
            "gptq_v2",
            QuantScheme(3, 128, False),
            {},
        ),
        (
            {"quant_method": "gptq", "bits": 8, "group_size": 32, "format": "gptq_v2", "sym": True},
            "gptq_v2",
            QuantScheme(8, 32, True),
            {},
        ),  # transformers v5 writes `format`
        (AUTOAWQ, "awq", QuantScheme(4, 128, False), {"act_order": False}),
        (
            {"quant_method": "awq", "zero_point": True, "q_group_size": 64, "w_bit": 4, "version": "GEMM"},
            "awq",
            QuantScheme(4, 64, False),
            {},
        ),
        (
            LLM_COMPRESSOR,
            "compressed-tensors",
            QuantScheme(4, 128, True),
            {"act_order": True, "static_groups": True},
        ),
    ],
)
def test_detect_format(config: dict, name: str, scheme: QuantScheme, flags: dict) -> None:
    fmt, got, got_flags = detect_format(config)
    assert fmt.name == name and got == scheme
    assert {k: got_flags[k] for k in flags} == flags


def test_detect_llm_compressor_variants() -> None:
    asym = {
        **LLM_COMPRESSOR["config_groups"]["group_0"]["weights"],
        "symmetric": False,
        "actorder": "dynamic",
    }
    cfg = _with(
        LLM_COMPRESSOR,
        config_groups={"group_0": {**LLM_COMPRESSOR["config_groups"]["group_0"], "weights": asym}},
    )
    _, scheme, flags = detect_format(cfg)
    assert (
        scheme == QuantScheme(4, 128, False) and flags["actorder"] == "group" and not flags["static_groups"]
    )
    channel = {**asym, "strategy": "channel", "group_size": None, "actorder": None, "num_bits": 8}
    cfg = _with(
        LLM_COMPRESSOR,
        config_groups={"group_0": {**LLM_COMPRESSOR["config_groups"]["group_0"], "weights": channel}},
    )
    _, scheme, flags = detect_format(cfg)
    assert scheme == QuantScheme(8, None, False) and flags["act_order"] is False


def test_missing_sym_warns_and_defaults_true(caplog: pytest.LogCaptureFixture) -> None:
    cfg = {k: v for k, v in AUTOGPTQ.items() if k != "sym"}
    with caplog.at_level(logging.WARNING, logger="llmquant.formats"):
        _, scheme, _ = detect_format(cfg)
    assert scheme.sym is True and "sym" in caplog.text
    del cfg["checkpoint_format"]  # old AutoGPTQ: v1
    assert detect_format(cfg)[0].name == "gptq"


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "unsupported quant_method 'bitsandbytes'"),
        ({"load_in_8bit": True}, "unsupported quant_method"),
        (_with(AUTOGPTQ, checkpoint_format="marlin"), "checkpoint_format 'marlin'"),
        (_with(AUTOGPTQ, is_marlin_format=True), "Marlin"),
        (_with(AUTOGPTQ, bits=5), "bits"),
        (_with(GPTQMODEL, dynamic={r"+:.*down_proj": {"bits": 8}}), "dynamic"),
        (_with(AUTOAWQ, version="gemv"), "'gemv'"),
        (_with(AUTOAWQ, bits=8), "bits"),
        (_with(AUTOAWQ, zero_point=False), "zero_point"),
        (_with(LLM_COMPRESSOR, format="float-quantized", config_groups={
            "group_0": {**LLM_COMPRESSOR["config_groups"]["group_0"], "format": "float-quantized"}}),
         "float-quantized"),
        (_with(LLM_COMPRESSOR, quantization_status="frozen"), "frozen"),
        (_with(LLM_COMPRESSOR, config_groups={"group_0": {
            **LLM_COMPRESSOR["config_groups"]["group_0"], "input_activations": {"num_bits": 8}}}),
         "activations"),
    ],
)  # fmt: skip
def test_detect_unsupported(config: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        detect_format(config)


def test_quantized_module_names_per_format() -> None:
    keys = ["m.a.weight_packed", "m.a.weight_scale", "m.b.weight", "m.c.qweight"]
    assert get_format("compressed-tensors").quantized_module_names(keys) == ["m.a"]
    assert get_format("awq").quantized_module_names(keys) == ["m.c"]


def test_llmquant_configs_round_trip_through_detect() -> None:
    for name in list_formats():
        fmt = get_format(name)
        schemes = [
            QuantScheme(b, gs, sym) for b in fmt.supported_bits for gs in (None, 64) for sym in (True, False)
        ]
        for scheme in schemes:
            try:
                fmt.check_scheme(scheme)
            except ValueError:
                continue
            qc = fmt.quantization_config(
                scheme,
                act_order=False,
                static_groups=False,
                method="rtn",
                extra_meta={},
                modules_not_converted=[],
            )
            got_fmt, got_scheme, _ = detect_format(qc)
            assert got_fmt is fmt and got_scheme == scheme, (name, scheme)
