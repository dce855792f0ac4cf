"""write_quantized on a tiny LLaMA: every format, act-order, sharding, ties, biases, verification."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from llmquant.checkpoint import load_tensors, read_checkpoint_index, read_config
from llmquant.config import QuantScheme
from llmquant.formats import detect_format, get_format
from llmquant.grid import quantize_weight
from llmquant.qtensor import QuantizedWeight
from llmquant.save import CheckpointVerificationError, write_quantized

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir())


class _StubTokenizer:
    def save_pretrained(self, path: str) -> None:
        Path(path, "tokenizer.json").write_text('{"stub": true}')
        Path(path, "tokenizer_config.json").write_text("{}")


def _rtn(model: nn.Module, scheme: QuantScheme) -> dict[str, QuantizedWeight]:
    return {
        name: quantize_weight(m.weight.data, scheme)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.rpartition(".")[2] in LINEARS
    }


@pytest.mark.parametrize(
    ("fmt", "sym"), [("gptq", True), ("gptq_v2", False), ("awq", False), ("compressed-tensors", False)]
)
def test_write_quantized_tiny_llama(tiny_llama: nn.Module, tmp_path: Path, fmt: str, sym: bool) -> None:
    scheme = QuantScheme(4, 32, sym)
    quantized = _rtn(tiny_llama, scheme)
    assert len(quantized) == 14
    tiny_llama.config.quantization_config = {"quant_method": "stale"}
    out = write_quantized(
        tiny_llama,
        quantized,
        tmp_path / "q",
        format=fmt,
        scheme=scheme,
        method="rtn",
        extra_meta={"calibration": "none"},
        tokenizer=_StubTokenizer(),
    )
    files = sorted(p.name for p in out.iterdir())
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    assert ("quantize_config.json" in files) == fmt.startswith("gptq")
    config = read_config(out)
    qc = config["quantization_config"]
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert qc["meta"]["verified"] is True and qc["meta"]["calibration"] == "none"
    if fmt.startswith("gptq"):
        assert json.loads((out / "quantize_config.json").read_text()) == qc
    got_fmt, got_scheme, _ = detect_format(qc)
    assert got_fmt is get_format(fmt) and got_scheme == scheme

    index = read_checkpoint_index(out)
    assert "lm_head.weight" not in index and "model.embed_tokens.weight" in index  # tied copy dropped
    assert "model.norm.weight" in index and "model.layers.1.post_attention_layernorm.weight" in index
    assert not any(k.endswith(("q_proj.weight", "down_proj.weight")) for k in index)
    assert get_format(fmt).quantized_module_names(index) == sorted(quantized)
    name = "model.layers.1.mlp.down_proj"
    prefix = name + "."
    tensors = {
        k[len(prefix) :]: v for k, v in load_tensors(out, [k for k in index if k.startswith(prefix)]).items()
    }
    assert get_format(fmt).unpack(tensors, scheme, *quantized[name].shape).equal(quantized[name])
    assert _siblings(out) == ["q"]


def test_write_quantized_act_order_sharded_untied(make_tiny_llama, tmp_path: Path) -> None:
    model = make_tiny_llama(tie=False)
    scheme = QuantScheme(4, 32)
    quantized = _rtn(model, scheme)
    name = "model.layers.0.self_attn.q_proj"
    qw = quantized[name]
    perm = torch.randperm(qw.shape[1])
    g_idx = torch.empty_like(perm, dtype=torch.int32)
    g_idx[perm] = (torch.arange(qw.shape[1]) // 32).to(torch.int32)
    quantized[name] = QuantizedWeight(qw.codes, qw.scales, qw.zeros, 4, 32, g_idx)
    out = write_quantized(
        model,
        quantized,
        tmp_path / "q",
        format="gptq",
        scheme=scheme,
        act_order=True,
        method="gptq",
        max_shard_size=20_000,
        extra_files={"quant_log.json": {"modules": []}},
    )
    assert json.loads((out / "quant_log.json").read_text()) == {"modules": []}
    assert (out / "model.safetensors.index.json").is_file()
    index = read_checkpoint_index(out)
    assert "lm_head.weight" in index  # untied: kept
    assert torch.equal(load_tensors(out, [f"{name}.g_idx"])[f"{name}.g_idx"], g_idx)
    qc = read_config(out)["quantization_config"]
    assert qc["desc_act"] is True and qc["meta"]["act_order"] is True
    with pytest.raises(ValueError, match="act-order"):
        write_quantized(
            model, quantized, tmp_path / "a", format="awq", scheme=scheme, act_order=True, method="gptq"
        )
    assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match="clashes"):
        write_quantized(
            model,
            quantized,
            tmp_path / "b",
            format="gptq",
            scheme=scheme,
            method="rtn",
            extra_files={"quantize_config.json": {}},
        )
    with pytest.raises(ValueError, match="lm_head"):
        write_quantized(
            model,
            {"lm_head": quantize_weight(model.lm_head.weight.data, scheme)},
            tmp_path / "c",
            format="gptq",
            scheme=scheme,
            method="rtn",
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_corrupted_pack_raises_and_leaves_nothing(
    tiny_llama: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fmt = get_format("gptq")
    original = type(fmt).pack

    def flipped(self, qw, **kwargs):
        out = original(self, qw, **kwargs)
        out["qweight"] = out["qweight"].clone()
        out["qweight"][0, 0] ^= 1 << 5  # one bit of one code
        return out

    monkeypatch.setattr(type(fmt), "pack", flipped)
    scheme = QuantScheme(4, 32)
    with pytest.raises(CheckpointVerificationError, match="does not unpack"):
        write_quantized(
            tiny_llama, _rtn(tiny_llama, scheme), tmp_path / "q", format="gptq", scheme=scheme, method="rtn"
        )
    assert list(tmp_path.iterdir()) == []


def test_write_quantized_keeps_bias_and_unquantized_linears(make_tiny_llama, tmp_path: Path) -> None:
    model = make_tiny_llama()
    model.config.attention_bias = True
    layer = model.model.layers[0].self_attn
    layer.q_proj.bias = nn.Parameter(torch.randn(layer.q_proj.out_features))
    scheme = QuantScheme(4, 32, sym=False)
    quantized = _rtn(model, scheme)
    del quantized["model.layers.1.mlp.gate_proj"]
    out = write_quantized(
        model, quantized, tmp_path / "q", format="compressed-tensors", scheme=scheme, method="rtn"
    )
    index = read_checkpoint_index(out)
    assert "model.layers.0.self_attn.q_proj.bias" in index
    assert "model.layers.1.mlp.gate_proj.weight" in index
    qc = read_config(out)["quantization_config"]
    assert qc["ignore"] == ["lm_head", "model.layers.1.mlp.gate_proj"]
    bias = load_tensors(out, ["model.layers.0.self_attn.q_proj.bias"])["model.layers.0.self_attn.q_proj.bias"]
    assert torch.equal(bias, layer.q_proj.bias.data)
