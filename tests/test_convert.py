"""``convert``: one quantization re-packed into every format that holds it exactly, loads with identical
logits, and decodes (by a reader written here from the public specs, not llmquant's unpack) to the same
weights; every pair that cannot hold it is refused with its reason and leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from llmquant import pipeline
from llmquant.api import inspect_checkpoint, save_quantized
from llmquant.cli import main
from llmquant.config import GPTQConfig, QuantScheme, RTNConfig
from llmquant.convert import ConversionError, convert_checkpoint
from llmquant.loading import from_pretrained

pytestmark = pytest.mark.usefixtures("_restore_logging")

FORMATS = ["gptq", "gptq_v2", "awq", "compressed-tensors"]
IDS = torch.tensor([[1, 5, 9, 2, 7, 3, 11, 4], [8, 6, 4, 2, 10, 12, 14, 16]])
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: nibble i of a word holds column order[i] of its 8


# ---------------------------------------------------------------------------------------------------
# An independent reader, from the specs (features.md section b), in numpy
# ---------------------------------------------------------------------------------------------------
def _bitstream(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Unsigned fields of a dense LSB-first bitstream along the last axis: field i = bits [b*i, b*i+b)."""
    raw = np.ascontiguousarray(words.astype("<i4")).view(np.uint8)  # little-endian bytes of each word
    stream = np.unpackbits(raw, axis=-1, bitorder="little")[..., : count * bits]
    fields = stream.reshape(*stream.shape[:-1], count, bits).astype(np.int64)
    return (fields << np.arange(bits)).sum(-1)


def _awq_nibbles(words: np.ndarray, count: int) -> np.ndarray:
    """[R, C/8] AWQ words -> [R, C] codes (undoing the [0,2,4,6,1,3,5,7] interleave)."""
    nib = (words.astype(np.int64)[..., None] >> (4 * np.arange(8))) & 0xF  # [R, C/8, 8], nibble i
    out = np.empty_like(nib)
    out[..., AWQ_ORDER] = nib  # column order[i] <- nibble i
    return out.reshape(words.shape[0], -1)[:, :count]


def _dequant(q, z, s, g_idx) -> np.ndarray:
    """W [N, K] = s[n, g(k)] * (q[n, k] - z[n, g(k)]) in float32."""
    return (s[:, g_idx].astype(np.float32) * (q - z[:, g_idx]).astype(np.float32)).astype(np.float32)


def read_module(tensors: dict[str, np.ndarray], qc: dict, n: int, k: int) -> np.ndarray:
    """Dequantized weight [N, K] of one linear, from its on-disk tensors and quantization_config."""
    method = qc["quant_method"]
    if method == "gptq":
        b = qc["bits"]
        q = _bitstream(tensors["qweight"].T, b, k)  # [K/pf, N] packed along K -> [N, K]
        z = _bitstream(tensors["qzeros"], b, n).T  # [G, N/pf] packed along N -> [N, G]
        z = z + (1 if qc["checkpoint_format"] == "gptq" else 0)  # v1 stores zero - 1
        return _dequant(q, z, tensors["scales"].T, tensors["g_idx"].astype(np.int64))
    if method == "awq":
        q = _awq_nibbles(tensors["qweight"], n).T  # [K, N/8] -> [N, K]
        z = _awq_nibbles(tensors["qzeros"], n).T  # [G, N/8] -> [N, G]
        gs = qc["group_size"] if qc["group_size"] > 0 else k
        return _dequant(q, z, tensors["scales"].T, np.arange(k) // gs)
    weights = qc["config_groups"]["group_0"]["weights"]
    b, gs = weights["num_bits"], weights["group_size"] or k
    q = _bitstream(tensors["weight_packed"], b, k)  # [N, K*b/32] packed along K
    if weights["symmetric"]:
        z = np.full(tensors["weight_scale"].shape, 1 << (b - 1), dtype=np.int64)
    else:
        z = _bitstream(tensors["weight_zero_point"].T, b, n).T  # [N*b/32, G] packed along N
    g_idx = tensors["weight_g_idx"].astype(np.int64) if "weight_g_idx" in tensors else np.arange(k) // gs
    return _dequant(q, z, tensors["weight_scale"], g_idx)


def read_checkpoint(path: Path) -> dict[str, np.ndarray]:
    """Every quantized linear of a single-file checkpoint, dequantized by the reader above."""
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    flat = {k: v.numpy() for k, v in load_file(path / "model.safetensors").items()}
    marker = "weight_packed" if qc["quant_method"] == "compressed-tensors" else "qweight"
    out = {}
    for key in flat:
        if key.endswith("." + marker):
            name = key.rpartition(".")[0]
            tensors = {k.rpartition(".")[2]: v for k, v in flat.items() if k.rpartition(".")[0] == name}
            n, k = _shape(tensors, qc)
            out[name] = read_module(tensors, qc, n, k)
    return out


def _shape(tensors: dict[str, np.ndarray], qc: dict) -> tuple[int, int]:
    if "weight_shape" in tensors:
        return tuple(int(v) for v in tensors["weight_shape"])
    if qc["quant_method"] == "awq":
        return tensors["scales"].shape[1], tensors["qweight"].shape[0]
    return tensors["scales"].shape[1], tensors["g_idx"].shape[0]


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
def _rtn(model, tmp_path: Path, name: str, scheme: QuantScheme, fmt: str) -> Path:
    result = pipeline.quantize(model, RTNConfig(scheme), progress=False)
    return save_quantized(result, tmp_path / name, format=fmt, base_model="org/tiny-base")


def _logits(path: Path) -> torch.Tensor:
    model = from_pretrained(path, dtype=torch.float32, progress=False, fuse=False)
    with torch.no_grad():
        return model(IDS).logits


def _assert_same_weights(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b) and len(a) == 14
    for name in a:
        assert np.array_equal(a[name], b[name]), name


def _files(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()}


# ---------------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("source_format", "scheme", "targets"),
    [
        ("gptq", QuantScheme(4, 32, True), FORMATS),
        ("gptq_v2", QuantScheme(4, 32, False), ["gptq_v2", "awq", "compressed-tensors"]),
        ("compressed-tensors", QuantScheme(3, 48, False), ["gptq_v2"]),  # 3-bit, ragged groups
        ("gptq", QuantScheme(8, None, True), ["gptq_v2", "compressed-tensors"]),
    ],
)
def test_convert_round_trips(make_tiny_llama, tmp_path, source_format, scheme, targets) -> None:
    src = _rtn(make_tiny_llama(), tmp_path, "src", scheme, source_format)
    want_logits, want_weights = _logits(src), read_checkpoint(src)
    quantized = pipeline.quantize(make_tiny_llama(), RTNConfig(scheme), progress=False).quantized
    for name, w in want_weights.items():  # the independent reader agrees with the quantizer itself
        assert np.array_equal(w, quantized[name].dequantize().numpy()), name
    for target in targets:
        out = convert_checkpoint(src, tmp_path / f"to-{target}", target)["path"]
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        assert qc["meta"]["converted_from"]["format"] == source_format
        assert qc["meta"]["verified"] is True and inspect_checkpoint(out)["format"] == target
        assert torch.equal(_logits(out), want_logits), target
        _assert_same_weights(read_checkpoint(out), want_weights)
        assert {"README.md", "quant_log.json", "generation_config.json"} <= _files(out)
        assert ("quantize_config.json" in _files(out)) == target.startswith("gptq")


def test_act_order_permutation_converts_with_its_g_idx(tiny_checkpoint, calib_text_file, tmp_path) -> None:
    from transformers import AutoTokenizer

    from llmquant.calibration import load_calibration
    from llmquant.config import CalibrationConfig

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    blocks = load_calibration(CalibrationConfig(str(calib_text_file), n_samples=4, seqlen=32), tok)
    config = GPTQConfig(QuantScheme(4, 16, True), act_order=True, static_groups=False)
    result = pipeline.quantize(tiny_checkpoint, config, blocks, progress=False)
    src = save_quantized(result, tmp_path / "src", format="gptq", tokenizer=tok)
    want_logits, want_weights = _logits(src), read_checkpoint(src)
    out = convert_checkpoint(src, tmp_path / "ct", "compressed-tensors")["path"]
    tensors = load_file(out / "model.safetensors")
    assert any(k.endswith(".weight_g_idx") for k in tensors)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["actorder"] == "group"
    assert torch.equal(_logits(out), want_logits)
    _assert_same_weights(read_checkpoint(out), want_weights)
    assert {"tokenizer.json", "tokenizer_config.json"} <= _files(out)
    back = convert_checkpoint(out, tmp_path / "back", "gptq")["path"]  # and back, g_idx intact
    assert torch.equal(_logits(back), want_logits)
    with pytest.raises(ConversionError, match="g_idx"):
        convert_checkpoint(src, tmp_path / "awq", "awq")
    assert not (tmp_path / "awq").exists()


def test_converts_a_checkpoint_written_by_another_tool(make_tiny_llama, tmp_path) -> None:
    """An AutoGPTQ-style folder: no llmquant meta, no quant log, no card; tensors per the spec."""
    src = _rtn(make_tiny_llama(), tmp_path, "ours", QuantScheme(4, 32, True), "gptq")
    for name in ("README.md", "quant_log.json", "quantize_config.json"):
        (src / name).unlink()
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "bits": 4,
        "group_size": 32,
        "damp_percent": 0.01,
        "desc_act": False,
        "static_groups": False,
        "sym": True,
        "true_sequential": True,
        "model_name_or_path": None,
        "model_file_base_name": None,
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
    }
    (src / "config.json").write_text(json.dumps(config))
    want_logits, want_weights = _logits(src), read_checkpoint(src)
    out = convert_checkpoint(src, tmp_path / "ct", "compressed-tensors", base_model="org/base")["path"]
    assert torch.equal(_logits(out), want_logits)
    _assert_same_weights(read_checkpoint(out), want_weights)
    card = (out / "README.md").read_text()
    assert "base_model: org/base" in card and "`gptq` (same integer codes" in card
    assert "None" not in card and "quant_log.json` is absent" in card


# ---------------------------------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("source_format", "scheme", "target", "reason"),
    [
        ("gptq_v2", QuantScheme(4, 32, False), "gptq", "cannot hold zero = 0"),
        ("gptq_v2", QuantScheme(4, 48, True), "awq", "in_features % group_size == 0"),
        ("gptq", QuantScheme(3, 32, True), "awq", "awq stores 4-bit codes, these are 3-bit"),
        ("gptq", QuantScheme(8, 32, True), "awq", "awq stores 4-bit codes, these are 8-bit"),
    ],
)
def test_refused_pairs_name_their_reason(make_tiny_llama, tmp_path, source_format, scheme, target, reason):
    src = _rtn(make_tiny_llama(), tmp_path, "src", scheme, source_format)
    with pytest.raises(ConversionError, match=reason):
        convert_checkpoint(src, tmp_path / "out", target)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no temporary directory left either


def test_bf16_scales_convert_only_when_exact_in_fp16(make_tiny_llama, tmp_path) -> None:
    """llm-compressor may store bf16 scales; every target stores fp16, so they must fit exactly."""
    src = _rtn(make_tiny_llama(), tmp_path, "src", QuantScheme(4, 32, True), "compressed-tensors")
    tensors = load_file(src / "model.safetensors")
    key = "model.layers.0.mlp.up_proj.weight_scale"
    for name in [k for k in tensors if k.endswith(".weight_scale")]:
        tensors[name] = tensors[name].to(torch.bfloat16)  # normal-range bf16: exact in fp16
    save_file(tensors, src / "model.safetensors")
    want = _logits(src)
    assert torch.equal(_logits(convert_checkpoint(src, tmp_path / "ok", "gptq")["path"]), want)
    tensors = load_file(src / "model.safetensors")
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = 1e5  # a bf16 value beyond fp16's range
    save_file(tensors, src / "model.safetensors")
    with pytest.raises(ConversionError, match=f"{key} is bfloat16 and not exactly representable"):
        convert_checkpoint(src, tmp_path / "bad", "gptq")
    assert not (tmp_path / "bad").exists()


def test_cli_convert_and_refusal(make_tiny_llama, tmp_path, capsys, caplog) -> None:
    src = _rtn(make_tiny_llama(), tmp_path, "src", QuantScheme(4, 32, False), "gptq_v2")
    assert main(["convert", str(src), "-o", str(tmp_path / "ct"), "--format", "compressed-tensors"]) == 0
    assert "gptq_v2 -> compressed-tensors" in capsys.readouterr().out
    # asym compressed-tensors needs an option in transformers with compressed-tensors 0.18-0.20.1: one line
    (note,) = [r.getMessage() for r in caplog.records if "compressed-tensors 0.18" in r.getMessage()]
    assert "\n" not in note and "CompressedTensorsConfig(dequantize=True)" in note
    caplog.clear()
    assert main(["convert", str(tmp_path / "ct"), "-o", str(tmp_path / "v2"), "--format", "gptq_v2"]) == 0
    (note,) = [r.getMessage() for r in caplog.records if "vLLM" in r.getMessage()]
    assert "bits=4, sym=False" in note and "--format awq or compressed-tensors" in note
    assert main(["convert", str(src), "-o", str(tmp_path / "v1"), "--format", "gptq"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llmquant: error: cannot convert src (gptq_v2, w4 g32 asym)")
    assert main(["convert", str(src), "-o", str(tmp_path / "x"), "--format", "gguf"]) == 2
    assert "unknown checkpoint format 'gguf'" in capsys.readouterr().err
