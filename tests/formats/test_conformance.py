"""Golden tensor names, shapes and dtypes per format, as the real loaders allocate them (no client needed).

The goldens are written out by hand for SmolLM2-135M's shapes (hidden 576, intermediate 1536, 3 KV heads
of 64: k_proj is N=192, K=576; down_proj is N=576, K=1536), w4 and w8, group 64, from the parameters the
loading libraries create and copy checkpoint tensors into (a shape or name that differs is a load error
there). Sources, read in the releases that ``scripts/check_clients.py`` installs (docs/clients.md):

- GPTQ (v1 and v2 share the layout): vLLM 0.32 ``model_executor/layers/quantization/auto_gptq.py``,
  ``AutoGPTQLinearMethod.create_weights``: ``qweight`` int32 [K / pack_factor, N], ``qzeros`` int32
  [K / gs, N / pack_factor], ``scales`` [K / gs, N] (params dtype; fp16 on disk); vLLM registers no
  ``g_idx`` (desc_act is refused) and skips it. GPTQModel 7.7 ``nn_modules/qlinear`` (``TorchQuantLinear``
  buffers): the same three plus ``g_idx`` int32 [K]. Config keys read by vLLM
  ``AutoGPTQConfig.from_config``: bits, group_size, desc_act, sym, lm_head (+ dynamic, checkpoint_format).
- AWQ GEMM: vLLM 0.32 ``auto_awq.py``, ``AWQLinearMethod.create_weights``: ``qweight`` int32 [K, N/8],
  ``qzeros`` int32 [K / gs, N/8], ``scales`` [K / gs, N]; ``AWQConfig.from_config`` requires
  ``zero_point`` (and bits / w_bit, group_size / q_group_size).
- compressed-tensors pack-quantized: vLLM 0.32 ``compressed_tensors/schemes/compressed_tensors_wNa16.py``,
  ``CompressedTensorsWNA16.create_weights``: ``weight_packed`` int32 [N, ceil(K*b/32)], ``weight_scale``
  [N, K / gs], ``weight_zero_point`` int32 [ceil(N*b/32), K / gs] (asym only), ``weight_shape`` int64 [2];
  compressed-tensors 0.20.1 ``compressors/pack_quantized/base.py``,
  ``PackedQuantizationCompressor.compress`` writes exactly these (zero point ``pack_to_int32(...,
  packed_dim=0)``; no zero point when symmetric).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmquant.checkpoint import read_checkpoint_index
from llmquant.config import QuantScheme
from llmquant.formats import get_format
from llmquant.save import write_quantized

from .helpers import random_qw, schema_of

I32, F16, I64 = torch.int32, torch.float16, torch.int64
K_PROJ, DOWN_PROJ = (192, 576), (576, 1536)  # (N, K) of SmolLM2-135M

GOLDEN = {
    # (format, bits, sym, (N, K)) -> {suffix: (shape, dtype)}
    ("gptq", 4, True, K_PROJ): {
        "qweight": ((72, 192), I32),
        "qzeros": ((9, 24), I32),
        "scales": ((9, 192), F16),
        "g_idx": ((576,), I32),
    },
    ("gptq", 8, True, DOWN_PROJ): {
        "qweight": ((384, 576), I32),
        "qzeros": ((24, 144), I32),
        "scales": ((24, 576), F16),
        "g_idx": ((1536,), I32),
    },
    ("gptq_v2", 4, False, DOWN_PROJ): {
        "qweight": ((192, 576), I32),
        "qzeros": ((24, 72), I32),
        "scales": ((24, 576), F16),
        "g_idx": ((1536,), I32),
    },
    ("awq", 4, True, K_PROJ): {
        "qweight": ((576, 24), I32),
        "qzeros": ((9, 24), I32),
        "scales": ((9, 192), F16),
    },
    ("awq", 4, False, DOWN_PROJ): {
        "qweight": ((1536, 72), I32),
        "qzeros": ((24, 72), I32),
        "scales": ((24, 576), F16),
    },
    ("compressed-tensors", 4, True, K_PROJ): {
        "weight_packed": ((192, 72), I32),
        "weight_scale": ((192, 9), F16),
        "weight_shape": ((2,), I64),
    },
    ("compressed-tensors", 4, False, K_PROJ): {
        "weight_packed": ((192, 72), I32),
        "weight_scale": ((192, 9), F16),
        "weight_zero_point": ((24, 9), I32),
        "weight_shape": ((2,), I64),
    },
    ("compressed-tensors", 8, False, DOWN_PROJ): {
        "weight_packed": ((576, 384), I32),
        "weight_scale": ((576, 24), F16),
        "weight_zero_point": ((144, 24), I32),
        "weight_shape": ((2,), I64),
    },
}


@pytest.mark.parametrize("key", list(GOLDEN), ids=lambda k: f"{k[0]}-w{k[1]}-{'sym' if k[2] else 'asym'}")
def test_packed_tensors_match_what_the_loaders_allocate(key) -> None:
    fmt_name, bits, sym, (n, k) = key
    scheme = QuantScheme(bits, 64, sym)
    fmt = get_format(fmt_name)
    out = fmt.pack(random_qw(n, k, scheme, min_zero=1), scheme=scheme)
    assert schema_of(out) == GOLDEN[key]
    assert fmt.tensor_schema(n, k, scheme, act_order=False) == GOLDEN[key]
    if "weight_shape" in out:
        assert out["weight_shape"].tolist() == [n, k]


# config keys each loader reads, with the values our RTN w4 g64 checkpoints must carry
CONFIG_GOLDEN = {
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": False, "sym": True,
             "lm_head": False, "checkpoint_format": "gptq"},
    "gptq_v2": {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": False, "sym": False,
                "lm_head": False, "checkpoint_format": "gptq_v2"},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"},
}  # fmt: skip


@pytest.mark.parametrize("fmt_name", list(CONFIG_GOLDEN))
def test_config_fields_the_loaders_read(fmt_name: str) -> None:
    sym = CONFIG_GOLDEN[fmt_name].get("sym", True)
    qc = get_format(fmt_name).quantization_config(
        QuantScheme(4, 64, sym),
        act_order=False,
        static_groups=False,
        method="rtn",
        extra_meta={},
        modules_not_converted=["lm_head"],
    )
    assert {k: qc[k] for k in CONFIG_GOLDEN[fmt_name]} == CONFIG_GOLDEN[fmt_name]


def test_compressed_tensors_config_fields() -> None:
    # compressed-tensors QuantizationConfig / vLLM CompressedTensorsConfig._from_config read these
    qc = get_format("compressed-tensors").quantization_config(
        QuantScheme(4, 64, False),
        act_order=False,
        static_groups=False,
        method="rtn",
        extra_meta={},
        modules_not_converted=["lm_head"],
    )
    assert (qc["quant_method"], qc["format"], qc["quantization_status"]) == (
        "compressed-tensors",
        "pack-quantized",
        "compressed",
    )
    weights = qc["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["strategy"], weights["symmetric"]) == (
        4,
        64,
        "group",
        False,
    )
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear"] and qc["ignore"] == ["lm_head"]


@pytest.mark.parametrize("fmt_name", ["gptq", "awq", "compressed-tensors"])
def test_full_tensor_names_in_a_saved_checkpoint(tiny_llama: nn.Module, tmp_path, fmt_name: str) -> None:
    # loaders look tensors up as f"{module name}.{suffix}" under the HF module names
    from llmquant.grid import quantize_weight

    scheme = QuantScheme(4, 32, True)
    linears = {
        name: quantize_weight(m.weight.data, scheme)
        for name, m in tiny_llama.named_modules()
        if isinstance(m, nn.Linear) and name != "lm_head"
    }
    out = write_quantized(tiny_llama, linears, tmp_path / "q", format=fmt_name, scheme=scheme, method="rtn")
    index = read_checkpoint_index(out)
    suffixes = set(get_format(fmt_name).tensor_schema(64, 64, scheme, act_order=False))
    for prefix in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        assert {k.rpartition(".")[2] for k in index if k.rpartition(".")[0] == prefix} == suffixes
    assert not any(k.endswith("proj.weight") for k in index)
