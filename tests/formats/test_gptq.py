"""GPTQ v1/v2 format: golden words worked out by hand from features.md B1/B2, round trips, schema, config."""

from __future__ import annotations

import json

import pytest
import torch

from llmquant.config import QuantScheme
from llmquant.formats import detect_format, get_format

from .helpers import make_qw, random_qw, schema_of, u32

V1, V2 = get_format("gptq"), get_format("gptq_v2")

# codes[n][k] = (k + n) % 16 -> column n of qweight holds nibbles n, n+1, ..., n+7 (LSB first)
CODES_8x8 = [[(k + n) % 16 for k in range(8)] for n in range(8)]
QWEIGHT_8x8 = [
    [0x76543210, 0x87654321, 0x98765432, 0xA9876543, 0xBA987654, 0xCBA98765, 0xDCBA9876, 0xEDCBA987]
]


def test_golden_v1_4bit_sym() -> None:
    qw = make_qw(CODES_8x8, [[8, 8]] * 8, bits=4, group_size=4)
    out = V1.pack(qw)
    assert u32(out["qweight"]) == QWEIGHT_8x8
    assert u32(out["qzeros"]) == [[0x77777777], [0x77777777]]  # zero 8 stored as 7
    assert torch.equal(out["scales"], qw.scales.t())
    assert out["g_idx"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert out["g_idx"].dtype == torch.int32 and out["scales"].dtype == torch.float16


def test_golden_v2_4bit_asym_and_v1_equivalent() -> None:
    zeros = [[n + 2 * g for g in range(2)] for n in range(8)]  # nibble n of qzeros[g] = n + 2g
    out = V2.pack(make_qw(CODES_8x8, zeros, bits=4, group_size=4))
    assert u32(out["qweight"]) == QWEIGHT_8x8
    assert u32(out["qzeros"]) == [[0x76543210], [0x98765432]]
    # v1 stores zero - 1: zeros one higher give the same words
    zeros_plus1 = [[z + 1 for z in row] for row in zeros]
    out_v1 = V1.pack(make_qw(CODES_8x8, zeros_plus1, bits=4, group_size=4))
    assert u32(out_v1["qzeros"]) == [[0x76543210], [0x98765432]]


def test_golden_3bit_dense_bitstream() -> None:
    # column 0: k % 8, column 1: 7 - k % 8 (bitwise complement); element k at stream bits 3k..3k+2:
    # word 0 = e0..e9 + low 2 bits of e10, word 1 = e10 bit 2, e11..e20, bit 0 of e21, word 2 = rest.
    codes = [[k % 8 for k in range(32)], [7 - k % 8 for k in range(32)]]
    expected = [[0x88FAC688, 0x77053977], [0xC688FAC6, 0x39770539], [0xFAC688FA, 0x05397705]]
    out = V1.pack(make_qw(codes, [[4, 4], [4, 4]], bits=3, group_size=16))
    assert u32(out["qweight"]) == expected
    assert u32(out["qzeros"]) == [[0x1B], [0x1B]]  # 3 | 3 << 3
    out = V2.pack(make_qw(codes, [[0, 7], [5, 2]], bits=3, group_size=16))
    assert u32(out["qweight"]) == expected
    assert u32(out["qzeros"]) == [[0x28], [0x17]]  # g0: 0 | 5 << 3, g1: 7 | 2 << 3


def test_golden_2bit_and_8bit() -> None:
    codes2 = [[k % 4 for k in range(16)], [3 - k % 4 for k in range(16)]]
    out = V1.pack(make_qw(codes2, [[2, 2], [2, 2]], bits=2, group_size=8))
    assert u32(out["qweight"]) == [[0xE4E4E4E4, 0x1B1B1B1B]]
    assert u32(out["qzeros"]) == [[0x5], [0x5]]  # zero 2 stored as 1, two columns
    codes8 = [[16 * k + n for k in range(8)] for n in range(2)]
    out = V1.pack(make_qw(codes8, [[128, 128], [128, 128]], bits=8, group_size=4))
    assert u32(out["qweight"]) == [[0x30201000, 0x31211101], [0x70605040, 0x71615141]]
    assert u32(out["qzeros"]) == [[0x7F7F], [0x7F7F]]


def test_v1_4bit_sym_qzeros_are_0x77777777() -> None:
    scheme = QuantScheme(4, 128, sym=True)
    out = V1.pack(random_qw(64, 576, scheme), scheme=scheme)
    assert out["qzeros"].shape == (5, 8)
    assert set(torch.flatten(torch.tensor(u32(out["qzeros"]))).tolist()) == {0x77777777}


def test_v1_refuses_asym_and_zero_0() -> None:
    with pytest.raises(ValueError, match="gptq_v2"):
        V1.check_scheme(QuantScheme(4, 128, sym=False))
    V2.check_scheme(QuantScheme(4, 128, sym=False))
    zeros = [[n + 2 * g for g in range(2)] for n in range(8)]  # contains zero = 0
    with pytest.raises(ValueError, match="zero = 0"):
        V1.pack(make_qw(CODES_8x8, zeros, bits=4, group_size=4))
    with pytest.raises(ValueError, match="bits"):
        get_format("awq").check_scheme(QuantScheme(3, 128, sym=False))


ROUND_TRIP = [
    (fmt, bits, sym, gs, k, act)
    for fmt in ("gptq", "gptq_v2")
    for bits in (2, 3, 4, 8)
    for sym in (True, False)
    for gs, k in ((None, 256), (32, 256), (128, 576))
    for act in (False, True)
    if not (act and gs is None)
]


@pytest.mark.parametrize(("fmt", "bits", "sym", "gs", "k", "act"), ROUND_TRIP)
@pytest.mark.parametrize("n", [64, 12])
def test_pack_unpack_identity_and_schema(
    fmt: str, bits: int, sym: bool, gs: int | None, k: int, act: bool, n: int
) -> None:
    f = get_format(fmt)
    scheme = QuantScheme(bits, gs, sym)
    qw = random_qw(n, k, scheme, act_order=act, min_zero=1 if fmt == "gptq" else 0, seed=bits * 7 + n)
    out = f.pack(qw, scheme=scheme)
    assert schema_of(out) == f.tensor_schema(n, k, scheme, act)
    back = f.unpack(out, scheme, n, k)
    assert back.equal(qw)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.zeros, qw.zeros)
    assert torch.equal(back.scales, qw.scales)
    if act:
        assert back.g_idx is not None and torch.equal(back.g_idx, qw.g_idx)
    else:
        assert back.g_idx is None


def test_ragged_groups_count() -> None:
    scheme = QuantScheme(4, 128)
    schema = V1.tensor_schema(64, 576, scheme, False)
    assert (
        schema["scales"][0] == (5, 64) and schema["qzeros"][0] == (5, 8) and schema["qweight"][0] == (72, 64)
    )
    per_channel = V2.tensor_schema(64, 576, QuantScheme(3, None, sym=False), False)
    assert per_channel["scales"][0] == (1, 64) and per_channel["qweight"][0] == (54, 64)
    assert per_channel["qzeros"][0] == (1, 6)


def test_unpack_reads_foreign_v1_zeros_and_desc_act_g_idx() -> None:
    """AutoGPTQ-style tensors built by hand: zeros 7 read as 8; a desc_act g_idx is kept."""
    k, n = 16, 8
    g_idx = torch.tensor([1, 0, 3, 2, 0, 1, 2, 3, 3, 2, 1, 0, 0, 1, 2, 3], dtype=torch.int32)
    tensors = {
        "qweight": torch.zeros(2, n, dtype=torch.int32),
        "qzeros": torch.full((4, 1), 0x77777777, dtype=torch.int32),
        "scales": torch.ones(4, n, dtype=torch.float16),
        "g_idx": g_idx,
    }
    qw = V1.unpack(tensors, QuantScheme(4, 4), n, k)
    assert qw.zeros.unique().tolist() == [8]
    assert torch.equal(qw.g_idx, g_idx)
    assert torch.equal(qw.dequantize(), torch.full((n, k), -8.0))
    tensors["g_idx"] = torch.arange(k, dtype=torch.int64) // 4  # trivial (int64 from some writers)
    assert V1.unpack(tensors, QuantScheme(4, 4), n, k).g_idx is None
    del tensors["g_idx"]  # very old checkpoints
    assert V1.unpack(tensors, QuantScheme(4, 4), n, k).g_idx is None
    tensors["qweight"] = torch.zeros(3, n, dtype=torch.int32)
    with pytest.raises(ValueError, match="qweight"):
        V1.unpack(tensors, QuantScheme(4, 4), n, k)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpack_v1_reads_wrapped_minus_one_as_zero_0(bits: int) -> None:
    """AutoGPTQ and auto-round's auto_gptq export store an asym zero 0 as -1, i.e. 2**b - 1 in b bits
    (GPTQModel reads it back as 0). Zero 0 must come back as 0, every other zero z as stored + 1."""
    n, k, gs = 12, 64, 32
    maxq = (1 << bits) - 1
    true = torch.randint(0, maxq + 1, (n, k // gs))
    true[0, 0], true[5, 1], true[3, 0] = 0, 0, maxq
    stored = (true - 1) % (1 << bits)  # what those writers pack: -1 wraps to 2**b - 1
    packed = V2.pack(make_qw([[0] * k] * n, stored.tolist(), bits=bits, group_size=gs))
    qw = V1.unpack(packed, QuantScheme(bits, gs, sym=False), n, k)
    assert torch.equal(qw.zeros.long(), true)
    assert torch.equal(qw.dequantize(), make_qw([[0] * k] * n, true.tolist(), bits, gs).dequantize())


def test_quantization_config_v1_and_quantize_config_json() -> None:
    qc = V1.quantization_config(
        QuantScheme(4, 128),
        act_order=True,
        static_groups=True,
        method="gptq",
        extra_meta={"damp": 0.01, "calibration": "c4"},
        modules_not_converted=["lm_head"],
    )
    assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq" and qc["format"] == "gptq"
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["lm_head"]) == (4, 128, True, False)
    assert qc["desc_act"] is False and qc["static_groups"] is True  # static groups: trivial g_idx
    assert qc["damp_percent"] == 0.01 and qc["pack_dtype"] == "int32" and "dynamic" not in qc
    meta = qc["meta"]
    assert meta["zero_point_convention"] == "v1_minus_one" and meta["act_order"] is True
    assert meta["quantizer"][0].startswith("llmquant:") and meta["calibration"] == "c4"
    assert V1.extra_files(qc) == {"quantize_config.json": qc}
    json.dumps(qc)
    qc2 = V2.quantization_config(
        QuantScheme(3, None, sym=False),
        act_order=True,
        static_groups=False,
        method="rtn",
        extra_meta={},
        modules_not_converted=["model.layers.0.mlp.gate_proj"],
    )
    assert qc2["group_size"] == -1 and qc2["desc_act"] is True and qc2["checkpoint_format"] == "gptq_v2"
    assert qc2["meta"]["zero_point_convention"] == "true"
    assert qc2["dynamic"] == {r"-:^model\.layers\.0\.mlp\.gate_proj$": {}}
    fmt, scheme, flags = detect_format(qc2)
    assert fmt is V2 and scheme == QuantScheme(3, None, sym=False) and flags["act_order"] is True


def test_transformers_gptq_config_reads_ours() -> None:
    from transformers import GPTQConfig

    qc = V2.quantization_config(
        QuantScheme(4, 128, sym=False),
        act_order=False,
        static_groups=False,
        method="rtn",
        extra_meta={},
        modules_not_converted=[],
    )
    cfg = GPTQConfig.from_dict(qc)
    assert (cfg.bits, cfg.group_size, cfg.sym, cfg.desc_act, cfg.format) == (4, 128, False, False, "gptq_v2")


def test_quantized_module_names() -> None:
    keys = ["a.q.qweight", "a.q.qzeros", "a.q.bias", "b.weight", "lm_head.weight", "c.qweight"]
    assert V1.quantized_module_names(keys) == ["a.q", "c"]


@pytest.mark.parametrize("name", ["gptq", "gptq_v2"])
def test_engine_notes_name_what_vllm_cannot_run(name: str) -> None:
    # vLLM 0.32 AutoGPTQConfig.TYPE_MAP holds (4, sym) and (8, sym) only; desc_act=True is refused
    fmt = get_format(name)
    assert fmt.engine_notes(QuantScheme(4, 64, sym=True)) == []
    assert fmt.engine_notes(QuantScheme(8, None, sym=True)) == []
    (asym,) = fmt.engine_notes(QuantScheme(4, 64, sym=False))
    assert "bits=4, sym=False" in asym and "--format awq or compressed-tensors" in asym
    (three,) = fmt.engine_notes(QuantScheme(3, 64, sym=True))
    assert "--format compressed-tensors" in three and "awq" not in three
    (perm,) = fmt.engine_notes(QuantScheme(4, 64, sym=True), act_order=True)
    assert "desc_act" in perm
