"""save -> from_pretrained: exact logits for every format; foreign GPTQ checkpoints; errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from llmquant import pipeline
from llmquant.api import save_quantized
from llmquant.config import GPTQConfig, QuantScheme, RTNConfig
from llmquant.formats import get_format
from llmquant.grid import quantize_weight
from llmquant.loading import from_pretrained
from llmquant.nn import QuantLinear
from llmquant.qtensor import QuantizedWeight

IDS = torch.arange(40).reshape(2, 20) % 256


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize(
    "fmt,scheme",
    [
        ("gptq", QuantScheme(4, 32, True)),
        ("gptq_v2", QuantScheme(4, 32, False)),
        ("gptq", QuantScheme(8, None, True)),
        ("gptq_v2", QuantScheme(3, 48, False)),  # ragged: K=64 -> groups of 48 and 16
        ("awq", QuantScheme(4, 32, False)),
        ("compressed-tensors", QuantScheme(4, 32, True)),
        ("compressed-tensors", QuantScheme(2, 32, False)),
    ],
)
def test_save_load_logits_exact(tiny_llama, tmp_path, fmt, scheme) -> None:
    result = pipeline.quantize(tiny_llama, RTNConfig(scheme), progress=False)
    path = save_quantized(result, tmp_path / "q", format=fmt)
    loaded = from_pretrained(path)
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 14
    assert torch.equal(_logits(result.model), _logits(loaded))
    for name, qw in result.quantized.items():
        assert loaded.get_submodule(name).to_quantized().equal(qw)


def test_act_order_round_trips_through_g_idx(tiny_checkpoint, calib_text_file, tmp_path) -> None:
    from transformers import AutoTokenizer

    from llmquant.calibration import load_calibration
    from llmquant.config import CalibrationConfig

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    blocks = load_calibration(CalibrationConfig(str(calib_text_file), n_samples=4, seqlen=64), tok)
    result = pipeline.quantize(
        tiny_checkpoint,
        GPTQConfig(QuantScheme(4, 16, True), act_order=True, static_groups=False),
        blocks,
        progress=False,
    )
    assert any(not qw.has_trivial_g_idx() for qw in result.quantized.values())
    path = save_quantized(result, tmp_path / "q", format="gptq")
    qcfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qcfg["desc_act"] is True
    loaded = from_pretrained(path)
    assert torch.equal(_logits(result.model), _logits(loaded))
    out = loaded.generate(IDS[:1, :5], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


def _autogptq_style_checkpoint(model, path, perm_seed: int = 3) -> dict[str, QuantizedWeight]:
    """What AutoGPTQ writes: one gptq_model-*.safetensors file, desc_act g_idx, quantize_config-style
    quantization_config without our meta block."""
    fmt = get_format("gptq")
    scheme = QuantScheme(4, 16, True)
    tensors, expected = {}, {}
    g = torch.Generator().manual_seed(perm_seed)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers"):
            k = module.in_features
            perm = torch.randperm(k, generator=g)
            g_idx = torch.empty(k, dtype=torch.int32)
            g_idx[perm] = (torch.arange(k) // 16).to(torch.int32)
            base = quantize_weight(module.weight.detach(), scheme)
            qw = QuantizedWeight(base.codes, base.scales, base.zeros, 4, 16, g_idx)
            expected[name] = qw
            tensors.update({f"{name}.{s}": t for s, t in fmt.pack(qw).items()})
    for name, tensor in model.state_dict().items():
        if name.rpartition(".")[0] not in expected and name != "lm_head.weight":
            tensors[name] = tensor.half().contiguous()
    path.mkdir()
    save_file(tensors, str(path / "gptq_model-4bit-16g.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = {
        "bits": 4,
        "group_size": 16,
        "damp_percent": 0.01,
        "desc_act": True,
        "static_groups": False,
        "sym": True,
        "true_sequential": True,
        "model_name_or_path": None,
        "model_file_base_name": None,
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
    }
    config["torch_dtype"] = "float16"
    (path / "config.json").write_text(json.dumps(config))
    return expected


def test_loads_foreign_gptq_checkpoint_with_desc_act(tiny_llama, tmp_path) -> None:
    expected = _autogptq_style_checkpoint(tiny_llama, tmp_path / "foreign")
    loaded = from_pretrained(tmp_path / "foreign", dtype=torch.float32)
    for name, qw in expected.items():
        module = loaded.get_submodule(name)
        assert module.perm is not None
        assert torch.equal(module.to_quantized().dequantize(), qw.dequantize())
    # the forward equals a float model carrying the dequantized weights
    ref = tiny_llama
    with torch.no_grad():
        for name, qw in expected.items():
            ref.get_submodule(name).weight.copy_(qw.dequantize())
        for name, p in ref.named_parameters():
            if "layers" not in name or "norm" in name:
                p.copy_(p.half().float())
    torch.testing.assert_close(_logits(loaded), _logits(ref), atol=2e-4, rtol=2e-4)


def test_not_a_checkpoint_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_pretrained(tmp_path)


def test_float_checkpoint_is_a_clear_error(tiny_llama_dir) -> None:
    with pytest.raises(ValueError, match="not quantized"):
        from_pretrained(tiny_llama_dir)
