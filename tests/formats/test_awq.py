"""AWQ GEMM format: golden interleaved words (by hand from features.md B3), round trips, refusals."""

from __future__ import annotations

import pytest
import torch

from llmquant.config import QuantScheme
from llmquant.formats import detect_format, get_format

from .helpers import make_qw, random_qw, schema_of, u32

AWQ = get_format("awq")


def test_golden_awq_gemm() -> None:
    # codes[n][k] = n + k; nibble i of qweight[k, 0] holds column order[i] = [0,2,4,6,1,3,5,7][i], so
    # reading the word's nibbles from the top: columns 7,5,3,1,6,4,2,0 (+ k).
    codes = [[n + k for k in range(8)] for n in range(8)]
    zeros = [[15 - n, n] for n in range(8)]  # group 0: 15..8, group 1: 0..7
    qw = make_qw(codes, zeros, bits=4, group_size=4)
    out = AWQ.pack(qw)
    assert u32(out["qweight"]) == [
        [0x75316420],
        [0x86427531],
        [0x97538642],
        [0xA8649753],
        [0xB975A864],
        [0xCA86B975],
        [0xDB97CA86],
        [0xECA8DB97],
    ]
    assert u32(out["qzeros"]) == [[0x8ACE9BDF], [0x75316420]]  # raw zeros, same interleave
    assert torch.equal(out["scales"], qw.scales.t()) and out["scales"].dtype == torch.float16
    assert set(out) == {"qweight", "qzeros", "scales"}  # no g_idx


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize(("gs", "k"), [(None, 96), (32, 256), (128, 512)])
@pytest.mark.parametrize("n", [64, 8])
def test_pack_unpack_identity_and_schema(sym: bool, gs: int | None, k: int, n: int) -> None:
    scheme = QuantScheme(4, gs, sym)
    qw = random_qw(n, k, scheme, seed=n + k)
    out = AWQ.pack(qw, scheme=scheme)
    assert schema_of(out) == AWQ.tensor_schema(n, k, scheme, False)
    back = AWQ.unpack(out, scheme, n, k)
    assert back.equal(qw) and torch.equal(back.codes, qw.codes) and torch.equal(back.zeros, qw.zeros)


def test_sym_written_as_zero_8() -> None:
    scheme = QuantScheme(4, 32, sym=True)
    out = AWQ.pack(random_qw(16, 64, scheme), scheme=scheme)
    assert set(torch.tensor(u32(out["qzeros"])).flatten().tolist()) == {0x88888888}


def test_refusals() -> None:
    for bits in (2, 3, 8):
        with pytest.raises(ValueError, match="bits"):
            AWQ.check_scheme(QuantScheme(bits, 128, sym=False))
    with pytest.raises(ValueError, match="act-order"):
        AWQ.check_scheme(QuantScheme(4, 128), act_order=True)
    scheme = QuantScheme(4, 32)
    with pytest.raises(ValueError, match="act-order"):
        AWQ.pack(random_qw(16, 64, scheme, act_order=True), scheme=scheme)
    with pytest.raises(ValueError, match="% 8"):
        AWQ.pack(random_qw(12, 64, scheme), scheme=scheme)
    with pytest.raises(ValueError, match="group_size"):
        AWQ.pack(random_qw(16, 576, QuantScheme(4, 128)), scheme=QuantScheme(4, 128))  # ragged


def test_quantization_config() -> None:
    qc = AWQ.quantization_config(
        QuantScheme(4, 128, sym=True),
        act_order=True,
        static_groups=True,
        method="awq",
        extra_meta={},
        modules_not_converted=["lm_head", "model.layers.0.mlp.gate"],
    )
    assert {k: qc[k] for k in ("quant_method", "bits", "group_size", "zero_point", "version")} == {
        "quant_method": "awq",
        "bits": 4,
        "group_size": 128,
        "zero_point": True,
        "version": "gemm",
    }
    assert qc["modules_to_not_convert"] == ["model.layers.0.mlp.gate"]
    assert qc["meta"]["sym"] is True and qc["meta"]["interleave"] == [0, 2, 4, 6, 1, 3, 5, 7]
    fmt, scheme, _ = detect_format(qc)
    assert fmt is AWQ and scheme == QuantScheme(4, 128, sym=True)
    with pytest.raises(ValueError, match="act-order"):
        AWQ.quantization_config(
            QuantScheme(4, 128),
            act_order=True,
            static_groups=False,
            method="gptq",
            extra_meta={},
            modules_not_converted=[],
        )


def test_transformers_awq_config_reads_ours() -> None:
    from transformers import AwqConfig

    qc = AWQ.quantization_config(
        QuantScheme(4, 64, sym=False),
        act_order=False,
        static_groups=False,
        method="awq",
        extra_meta={},
        modules_not_converted=[],
    )
    cfg = AwqConfig.from_dict(qc)
    assert (cfg.bits, cfg.group_size, cfg.zero_point, str(cfg.format)) in {
        (4, 64, True, "gemm"),
        (4, 64, True, "AwqFormat.GEMM"),
    }
