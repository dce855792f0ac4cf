"""Corrupted or truncated checkpoints (safetensors shards, index, quantization_config) are answered with a
one-line error naming the file (and the tensor) by `inspect`, `convert`, `eval` and `from_pretrained`; fuzzed
headers and configs never crash the loader with anything but llmquant's typed errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmquant import errors
from llmquant.cli import main


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, calib_text_file, make_tiny_tokenizer) -> Path:
    """A tiny RTN w4 g32 GPTQ checkpoint, written once for the module (copied per test)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("q")
    tokenizer = make_tiny_tokenizer([calib_text_file.read_text()], vocab_size=256)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(root / "m")
    tokenizer.save_pretrained(root / "m")
    assert (
        main(["quantize", str(root / "m"), "-o", str(root / "q"), "--method", "rtn", "--group-size", "32"])
        == 0
    )
    return root / "q"


@pytest.fixture
def ckpt(quantized, tmp_path) -> Path:
    return Path(shutil.copytree(quantized, tmp_path / "ckpt"))


def _error(capsys, *argv: str) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("llmquant: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _commands(ckpt: Path, tmp_path: Path, text: Path) -> dict[str, list[str]]:
    return {
        "inspect": ["inspect", str(ckpt)],
        "convert": ["convert", str(ckpt), "-o", str(tmp_path / "conv"), "--format", "compressed-tensors"],
        "eval": ["eval", str(ckpt), "--text", str(text), "--seqlen", "32", "--windows", "1"],
    }


@pytest.mark.parametrize("command", ["inspect", "convert", "eval"])
def test_truncated_shard_is_named(capsys, ckpt, tmp_path, calib_text_file, command) -> None:
    shard = ckpt / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    line = _error(capsys, *_commands(ckpt, tmp_path, calib_text_file)[command])
    assert f"{shard} is truncated: tensor" in line and "download it again" in line
    assert not (tmp_path / "conv").exists()


@pytest.mark.parametrize("command", ["inspect", "convert", "eval"])
def test_garbled_header_is_named(capsys, ckpt, tmp_path, calib_text_file, command) -> None:
    shard = ckpt / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:20] = b"#" * 12  # the JSON header's first bytes
    shard.write_bytes(bytes(data))
    line = _error(capsys, *_commands(ckpt, tmp_path, calib_text_file)[command])
    assert f"{shard}: corrupted safetensors header" in line


def test_bad_index_is_named(capsys, ckpt, tmp_path) -> None:
    (ckpt / "model.safetensors.index.json").write_text('{"weight_map": {"a": ')
    line = _error(capsys, "inspect", str(ckpt))
    assert f"{ckpt / 'model.safetensors.index.json'} is not valid JSON" in line


def test_index_naming_a_missing_shard(capsys, ckpt, tmp_path) -> None:
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "gone.safetensors"}}))
    assert "names missing shard files" in _error(capsys, "inspect", str(ckpt))


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"bits": "four"}, "unsupported quantization parameters"),
        ({"quant_method": "exl2"}, "unsupported quant_method 'exl2'"),
        ({"group_size": [1]}, "quantization_config"),
    ],
)
def test_bad_quantization_config(capsys, ckpt, change, needle) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"].update(change)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert needle in _error(capsys, "inspect", str(ckpt))


def test_config_json_invalid_on_load(capsys, ckpt) -> None:
    (ckpt / "config.json").write_text("{")
    assert f"{ckpt / 'config.json'} is not valid JSON" in _error(capsys, "inspect", str(ckpt))


def test_missing_packed_tensor_is_named_by_from_pretrained(ckpt) -> None:
    from safetensors.torch import load_file, save_file

    from llmquant import from_pretrained

    shard = ckpt / "model.safetensors"
    tensors = load_file(shard)
    del tensors["model.layers.0.mlp.down_proj.scales"]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(errors.CheckpointError, match=r"model\.layers\.0\.mlp\.down_proj"):
        from_pretrained(ckpt, progress=False)


# ---- fuzzing ----------------------------------------------------------------------------------------
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
_KEYS = [
    "quant_method",
    "bits",
    "group_size",
    "sym",
    "desc_act",
    "checkpoint_format",
    "zero_point",
    "version",
    "format",
    "config_groups",
    "static_groups",
    "meta",
    "weights",
    "num_bits",
    "strategy",
    "type",
]
_WORDS = ["gptq", "awq", "compressed-tensors", "gemm", "gptq_v2", "pack-quantized", "int", "group", "channel"]
_VALUES = st.sampled_from([*_WORDS, 4, 8, 3, -1, 0, 128, True, False, None]) | _JSON


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(_KEYS), _VALUES | st.dictionaries(st.sampled_from(_KEYS), _VALUES)))
def test_fuzzed_quantization_config_only_typed_errors(qc) -> None:
    from llmquant.formats import detect_format

    try:
        detect_format(qc)
    except errors.CheckpointError as exc:
        assert str(exc) and "\n" not in str(exc)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.dictionaries(st.text(max_size=6), _JSON, max_size=4) | _JSON, tail=st.binary(max_size=64))
def test_fuzzed_safetensors_header_only_typed_errors(tmp_path, header, tail) -> None:
    from llmquant.checkpoint import load_tensors, read_checkpoint_index

    raw = json.dumps(header).encode()
    shard = tmp_path / "model.safetensors"
    shard.write_bytes(len(raw).to_bytes(8, "little") + raw + tail)
    try:
        load_tensors(tmp_path, list(read_checkpoint_index(tmp_path)))
    except errors.CheckpointError as exc:
        assert str(shard) in str(exc)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=96))
def test_fuzzed_shard_bytes_only_typed_errors(tmp_path, data) -> None:
    from llmquant.checkpoint import load_tensors

    (tmp_path / "model.safetensors").write_bytes(data)
    try:
        load_tensors(tmp_path)
    except errors.CheckpointError as exc:
        assert str(tmp_path / "model.safetensors") in str(exc)
