"""compressed-tensors pack-quantized: golden words (features.md B4, by hand), round trips, config."""

from __future__ import annotations

import pytest
import torch

from llmquant.config import QuantScheme
from llmquant.formats import detect_format, get_format

from .helpers import make_qw, random_qw, schema_of, u32

CT = get_format("compressed-tensors")
CODES_8x8 = [[(k + n) % 16 for k in range(8)] for n in range(8)]  # row n: nibbles n..n+7
PACKED_8x8 = [
    [0x76543210],
    [0x87654321],
    [0x98765432],
    [0xA9876543],
    [0xBA987654],
    [0xCBA98765],
    [0xDCBA9876],
    [0xEDCBA987],
]


def test_golden_sym() -> None:
    # sym: stored = q_signed + 8 = our unsigned code; packed along K on [N, K]; no zero point
    qw = make_qw(CODES_8x8, [[8, 8]] * 8, bits=4, group_size=4)
    out = CT.pack(qw, scheme=QuantScheme(4, 4, sym=True))
    assert set(out) == {"weight_packed", "weight_scale", "weight_shape"}
    assert u32(out["weight_packed"]) == PACKED_8x8
    assert torch.equal(out["weight_scale"], qw.scales) and out["weight_scale"].shape == (8, 2)
    assert out["weight_shape"].dtype == torch.int64 and out["weight_shape"].tolist() == [8, 8]


def test_golden_asym_zero_point_packed_along_dim0() -> None:
    zeros = [[n + 2 * g for g in range(2)] for n in range(8)]  # column g of weight_zero_point: nibble n
    qw = make_qw(CODES_8x8, zeros, bits=4, group_size=4)
    out = CT.pack(qw, scheme=QuantScheme(4, 4, sym=False))
    assert u32(out["weight_packed"]) == PACKED_8x8  # asym: stored = q_u as well
    assert out["weight_zero_point"].shape == (1, 2)
    assert u32(out["weight_zero_point"]) == [[0x76543210, 0x98765432]]


def test_golden_3bit_zero_point_across_words() -> None:
    # N = 12 zeros of 3 bits along dim 0: 36 bits -> 2 words; zero n = n % 8 (element 10 straddles)
    zeros = [[n % 8] for n in range(12)]
    qw = make_qw(torch.zeros(12, 4, dtype=torch.uint8), zeros, bits=3, group_size=None)
    out = CT.pack(qw, scheme=QuantScheme(3, None, sym=False))
    # word 0: 0o76543210 | 0 << 24 | 1 << 27 | (2 & 3) << 30; word 1: 2 >> 2 | 3 << 1
    assert u32(out["weight_zero_point"]) == [[0x88FAC688], [0x6]]


ROUND_TRIP = [
    (bits, sym, gs, k, act)
    for bits in (2, 3, 4, 8)
    for sym in (True, False)
    for gs, k in ((None, 200), (32, 256), (128, 576))
    for act in (False, True)
    if not (act and gs is None)
]


@pytest.mark.parametrize(("bits", "sym", "gs", "k", "act"), ROUND_TRIP)
@pytest.mark.parametrize("n", [64, 12])
def test_pack_unpack_identity_and_schema(
    bits: int, sym: bool, gs: int | None, k: int, act: bool, n: int
) -> None:
    scheme = QuantScheme(bits, gs, sym)
    qw = random_qw(n, k, scheme, act_order=act, seed=bits + n)
    out = CT.pack(qw, scheme=scheme)
    assert schema_of(out) == CT.tensor_schema(n, k, scheme, act)
    assert ("weight_g_idx" in out) == act and ("weight_zero_point" in out) == (not sym)
    back = CT.unpack(out, scheme, n, k)
    assert back.equal(qw) and torch.equal(back.codes, qw.codes) and torch.equal(back.zeros, qw.zeros)
    if act:
        assert torch.equal(back.g_idx, qw.g_idx)


def test_static_groups_writes_no_g_idx_and_group_actorder_always_does() -> None:
    scheme = QuantScheme(4, 32)
    qw = random_qw(16, 64, scheme)
    assert "weight_g_idx" not in CT.pack(qw, scheme=scheme, act_order=False)
    assert "weight_g_idx" in CT.pack(qw, scheme=scheme, act_order=True)  # actorder "group": every module
    with pytest.raises(ValueError, match="g_idx"):
        CT.pack(random_qw(16, 64, scheme, act_order=True), scheme=scheme, act_order=False)


@pytest.mark.parametrize(
    ("gs", "act", "static", "strategy", "actorder"),
    [
        (128, False, False, "group", None),
        (128, True, True, "group", "weight"),
        (128, True, False, "group", "group"),
        (None, True, False, "channel", None),
    ],
)
def test_quantization_config(
    gs: int | None, act: bool, static: bool, strategy: str, actorder: str | None
) -> None:
    scheme = QuantScheme(4, gs, sym=False)
    qc = CT.quantization_config(
        scheme,
        act_order=act,
        static_groups=static,
        method="gptq",
        extra_meta={},
        modules_not_converted=["lm_head"],
    )
    w = qc["config_groups"]["group_0"]["weights"]
    assert w["strategy"] == strategy and w["group_size"] == gs and w["actorder"] == actorder
    assert (
        w["symmetric"] is False
        and w["zp_dtype"] == "torch.int8"
        and w["num_bits"] == 4
        and w["type"] == "int"
    )
    assert set(w) == {
        "num_bits",
        "type",
        "symmetric",
        "group_size",
        "strategy",
        "block_structure",
        "dynamic",
        "actorder",
        "scale_dtype",
        "zp_dtype",
        "observer",
        "observer_kwargs",
    }
    group = qc["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and group["format"] == "pack-quantized"
    assert group["input_activations"] is None and group["output_activations"] is None
    assert qc["format"] == "pack-quantized" and qc["quantization_status"] == "compressed"
    assert qc["ignore"] == ["lm_head"] and qc["quant_method"] == "compressed-tensors"
    fmt, got, flags = detect_format(qc)
    assert fmt is CT and got == scheme and flags["act_order"] == (actorder is not None)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpack_reads_the_unpacked_signed_zero_point_convention(bits: int) -> None:
    # compressed-tensors before its zero-point packing (PR #296) saved weight_zero_point as int8 [N, G]
    # holding zp_signed = zero - 2**(b-1); both conventions must give the same weight
    scheme = QuantScheme(bits, 32, sym=False)
    qw = random_qw(12, 64, scheme, seed=bits)
    out = CT.pack(qw, scheme=scheme)
    old = dict(out, weight_zero_point=(qw.zeros.to(torch.int16) - (1 << (bits - 1))).to(torch.int8))
    assert old["weight_zero_point"].shape == (12, 2)
    back = CT.unpack(old, scheme, 12, 64)
    assert torch.equal(back.zeros, qw.zeros) and torch.equal(back.codes, qw.codes)


def test_unpack_rejects_bad_zero_points() -> None:
    scheme = QuantScheme(4, 32, sym=False)
    out = CT.pack(random_qw(16, 64, scheme), scheme=scheme)
    with pytest.raises(ValueError, match=r"expected packed \(2, 2\) int32 or unpacked \(16, 2\)"):
        CT.unpack(dict(out, weight_zero_point=torch.zeros(4, 2, dtype=torch.int32)), scheme, 16, 64)
    with pytest.raises(ValueError, match="outside the signed 4-bit range"):
        CT.unpack(dict(out, weight_zero_point=torch.full((16, 2), 8, dtype=torch.int8)), scheme, 16, 64)
    with pytest.raises(ValueError, match="no 'weight_zero_point'"):
        CT.unpack({k: v for k, v in out.items() if k != "weight_zero_point"}, scheme, 16, 64)


def test_engine_notes() -> None:
    assert CT.engine_notes(QuantScheme(4, 64, sym=True)) == []
    assert CT.engine_notes(QuantScheme(4, None, sym=True), act_order=True) == []  # channel: no g_idx
    (asym,) = CT.engine_notes(QuantScheme(4, 64, sym=False))
    assert "CompressedTensorsConfig(dequantize=True)" in asym and "vLLM loads it as is" in asym
    (perm,) = CT.engine_notes(QuantScheme(4, 64, sym=True), act_order=True)
    assert "actorder 'group'" in perm
