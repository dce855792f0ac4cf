"""QuantizedWeight: validation, the dequantization formula by hand, g_idx semantics, equal()."""

from __future__ import annotations

import pytest
import torch

from llmquant.qtensor import QuantizedWeight, trivial_g_idx


def _qw(n=3, k=10, bits=4, gs=4, seed=0, g_idx=None):
    g = torch.Generator().manual_seed(seed)
    n_groups = 1 if gs is None else -(-k // gs)
    return QuantizedWeight(
        codes=torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8),
        scales=(torch.rand(n, n_groups, generator=g) + 0.1).half(),
        zeros=torch.randint(0, 1 << bits, (n, n_groups), generator=g, dtype=torch.uint8),
        bits=bits,
        group_size=gs,
        g_idx=g_idx,
    )


# ---------------------------------------------------------------------------------- validation


def _valid_parts():
    return {
        "codes": torch.zeros(2, 6, dtype=torch.uint8),
        "scales": torch.ones(2, 2, dtype=torch.float16),
        "zeros": torch.zeros(2, 2, dtype=torch.uint8),
        "bits": 4,
        "group_size": 4,  # K=6 -> G=2 (ragged)
    }


def test_valid_parts_construct():
    qw = QuantizedWeight(**_valid_parts())
    assert qw.shape == (2, 6) and qw.num_groups == 2


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.float32])
def test_rejects_codes_dtype(dtype):
    parts = _valid_parts() | {"codes": torch.zeros(2, 6, dtype=dtype)}
    with pytest.raises(ValueError, match="codes must be uint8"):
        QuantizedWeight(**parts)


@pytest.mark.parametrize("shape", [(2, 1), (2, 3), (1, 2), (3, 2)])
def test_rejects_scales_shape(shape):
    parts = _valid_parts() | {"scales": torch.ones(shape, dtype=torch.float16)}
    with pytest.raises(ValueError, match=r"scales/zeros must be \[2, 2\]"):
        QuantizedWeight(**parts)


@pytest.mark.parametrize("shape", [(2, 1), (2, 3), (2,)])
def test_rejects_zeros_shape(shape):
    parts = _valid_parts() | {"zeros": torch.zeros(shape, dtype=torch.uint8)}
    with pytest.raises(ValueError, match=r"scales/zeros must be \[2, 2\]"):
        QuantizedWeight(**parts)


def test_rejects_per_channel_with_grouped_scales():
    parts = _valid_parts() | {"group_size": None}  # G must be 1
    with pytest.raises(ValueError, match=r"scales/zeros must be \[2, 1\]"):
        QuantizedWeight(**parts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rejects_scales_dtype(dtype):
    parts = _valid_parts() | {"scales": torch.ones(2, 2, dtype=dtype)}
    with pytest.raises(ValueError, match="scales must be float16"):
        QuantizedWeight(**parts)


def test_rejects_zeros_dtype():
    parts = _valid_parts() | {"zeros": torch.zeros(2, 2, dtype=torch.int32)}
    with pytest.raises(ValueError, match="zeros uint8"):
        QuantizedWeight(**parts)


def test_rejects_g_idx_dtype():
    parts = _valid_parts() | {"g_idx": torch.zeros(6, dtype=torch.int64)}
    with pytest.raises(ValueError, match=r"g_idx must be int32 \[6\]"):
        QuantizedWeight(**parts)


def test_rejects_g_idx_length():
    parts = _valid_parts() | {"g_idx": torch.zeros(5, dtype=torch.int32)}
    with pytest.raises(ValueError, match=r"g_idx must be int32 \[6\]"):
        QuantizedWeight(**parts)


def test_rejects_unsupported_bits():
    parts = _valid_parts() | {"bits": 5}
    with pytest.raises(ValueError, match="bits must be one of"):
        QuantizedWeight(**parts)


def test_rejects_bad_group_size():
    parts = _valid_parts() | {"group_size": -1}
    with pytest.raises(ValueError, match="use None instead of -1"):
        QuantizedWeight(**parts)


# ---------------------------------------------------------------------------------- dequantize


def test_dequantize_hand_computation():
    # N=2, K=5, gs=2 -> G=3 (last group = column 4 alone)
    codes = torch.tensor([[0, 15, 8, 7, 3], [1, 2, 3, 4, 5]], dtype=torch.uint8)
    scales = torch.tensor([[0.5, 0.25, 2.0], [1.5, 0.125, 3.0]], dtype=torch.float16)
    zeros = torch.tensor([[8, 8, 0], [0, 4, 5]], dtype=torch.uint8)
    qw = QuantizedWeight(codes, scales, zeros, bits=4, group_size=2)
    expected = torch.tensor(
        [
            [0.5 * (0 - 8), 0.5 * (15 - 8), 0.25 * (8 - 8), 0.25 * (7 - 8), 2.0 * (3 - 0)],
            [1.5 * (1 - 0), 1.5 * (2 - 0), 0.125 * (3 - 4), 0.125 * (4 - 4), 3.0 * (5 - 5)],
        ]
    )
    assert expected.tolist() == [[-4.0, 3.5, 0.0, -0.25, 6.0], [1.5, 3.0, -0.125, 0.0, 0.0]]
    out = qw.dequantize()
    assert out.dtype == torch.float32
    assert torch.equal(out, expected)
    assert torch.equal(qw.dequantize(torch.float16), expected.half())


def test_dequantize_with_explicit_g_idx_by_hand():
    # columns map to groups [1, 0, 1, 0]
    codes = torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8)
    scales = torch.tensor([[0.5, 4.0]], dtype=torch.float16)
    zeros = torch.tensor([[2, 1]], dtype=torch.uint8)
    g_idx = torch.tensor([1, 0, 1, 0], dtype=torch.int32)
    qw = QuantizedWeight(codes, scales, zeros, bits=2, group_size=2, g_idx=g_idx)
    assert qw.dequantize().tolist() == [[4.0 * 0, 0.5 * 0, 4.0 * 2, 0.5 * 2]]
    assert not qw.has_trivial_g_idx()


def test_dequantize_is_exact_float32_of_fp16_scale_times_integer():
    qw = _qw(n=16, k=300, bits=8, gs=64, seed=1)
    g = torch.arange(300) // 64
    ref = qw.scales.double()[:, g] * (qw.codes.double() - qw.zeros.double()[:, g])
    # every product fits in float32 exactly, so the float32 result equals the float64 one
    assert torch.equal(qw.dequantize().double(), ref)


def test_dequantize_bf16_is_single_rounding_of_float32():
    qw = _qw(n=8, k=64, bits=8, gs=16, seed=2)
    assert torch.equal(qw.dequantize(torch.bfloat16), qw.dequantize().to(torch.bfloat16))


def test_per_channel_uses_one_group():
    qw = _qw(n=4, k=9, bits=3, gs=None, seed=3)
    assert qw.num_groups == 1
    ref = qw.scales.float() * (qw.codes.float() - qw.zeros.float())  # [N,1] broadcast over K
    assert torch.equal(qw.dequantize(), ref)
    assert torch.equal(qw.group_index(), torch.zeros(9, dtype=torch.long))


# ---------------------------------------------------------------------------------- g_idx


def test_trivial_g_idx_values():
    assert trivial_g_idx(10, 4).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert trivial_g_idx(5, None).tolist() == [0] * 5
    assert trivial_g_idx(3, 4).dtype == torch.int32


@pytest.mark.parametrize("gs", [4, 3, None])
def test_g_idx_none_equals_trivial_g_idx(gs):
    a = _qw(n=5, k=10, gs=gs, seed=4)
    b = QuantizedWeight(a.codes, a.scales, a.zeros, a.bits, a.group_size, g_idx=trivial_g_idx(10, gs))
    assert a.has_trivial_g_idx() and b.has_trivial_g_idx()
    assert torch.equal(a.group_index(), b.group_index())
    assert a.group_index().dtype == b.group_index().dtype == torch.long
    assert torch.equal(a.dequantize(), b.dequantize())
    assert a.equal(b) and b.equal(a)


def test_permuted_g_idx_is_not_trivial_and_changes_weight():
    a = _qw(n=5, k=8, gs=4, seed=5)
    g_idx = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1], dtype=torch.int32)
    b = QuantizedWeight(a.codes, a.scales, a.zeros, a.bits, a.group_size, g_idx=g_idx)
    assert not b.has_trivial_g_idx()
    expected = a.scales.float()[:, g_idx.long()] * (a.codes.float() - a.zeros.float()[:, g_idx.long()])
    assert torch.equal(b.dequantize(), expected)
    assert not a.equal(b)


# ---------------------------------------------------------------------------------- equal


def test_equal_to_itself_and_copy():
    a = _qw(seed=6)
    b = QuantizedWeight(a.codes.clone(), a.scales.clone(), a.zeros.clone(), a.bits, a.group_size)
    assert a.equal(a) and a.equal(b)


def test_not_equal_when_one_code_differs():
    a = _qw(seed=7)
    codes = a.codes.clone()
    codes[1, 3] ^= 1
    b = QuantizedWeight(codes, a.scales, a.zeros, a.bits, a.group_size)
    assert not a.equal(b)


def test_not_equal_when_one_scale_differs_by_one_ulp():
    a = _qw(seed=8)
    scales = a.scales.clone()
    scales[0, 0] = torch.nextafter(scales[0, 0], torch.tensor(10.0, dtype=torch.float16))
    b = QuantizedWeight(a.codes, scales, a.zeros, a.bits, a.group_size)
    # fails only if every code in that group equals its zero; seed 8 does not do that
    assert not a.equal(b)


def test_not_equal_when_bits_differ_even_if_values_match():
    a = QuantizedWeight(
        torch.ones(2, 4, dtype=torch.uint8),
        torch.ones(2, 1, dtype=torch.float16),
        torch.zeros(2, 1, dtype=torch.uint8),
        bits=4,
        group_size=None,
    )
    b = QuantizedWeight(a.codes, a.scales, a.zeros, bits=8, group_size=None)
    assert torch.equal(a.dequantize(), b.dequantize())
    assert not a.equal(b)


def test_not_equal_when_shape_differs():
    assert not _qw(n=3, k=8, seed=9).equal(_qw(n=4, k=8, seed=9))


def test_equal_compares_represented_weight_not_storage():
    # code - zero is what matters: shifting both by one represents the same weight
    a = QuantizedWeight(
        torch.tensor([[3, 5]], dtype=torch.uint8),
        torch.tensor([[0.5]], dtype=torch.float16),
        torch.tensor([[4]], dtype=torch.uint8),
        bits=4,
        group_size=None,
    )
    b = QuantizedWeight(
        torch.tensor([[4, 6]], dtype=torch.uint8), a.scales, torch.tensor([[5]], dtype=torch.uint8), 4, None
    )
    assert a.equal(b)


def test_to_preserves_everything():
    a = _qw(seed=10, g_idx=torch.tensor([1, 0, 2, 0, 1, 2, 0, 1, 2, 0], dtype=torch.int32))
    b = a.to("cpu")
    assert b is not a and a.equal(b)
    assert torch.equal(b.g_idx, a.g_idx) and (b.bits, b.group_size) == (a.bits, a.group_size)


def test_is_frozen():
    a = _qw(seed=11)
    with pytest.raises(AttributeError):
        a.bits = 8
