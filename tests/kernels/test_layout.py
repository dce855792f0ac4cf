"""Kernel layout v2: to_kernel_layout + dequantize_ref / quant_matmul_ref against QuantizedWeight, and
the blocked qweight convention checked code by code with the documented formula."""

from __future__ import annotations

import pytest
import torch
from llmquant.kernels.layout import (
    dequantize_ref,
    kernel_rows,
    pack_codes,
    quant_matmul_ref,
    unpack_codes,
)

from llmquant.nn import to_kernel_layout
from llmquant.qtensor import QuantizedWeight, trivial_g_idx


def _make_qw(n, k, bits, gs, seed, act_order=False):
    """Random QuantizedWeight; with act_order, g_idx[perm[j]] = j // gs for a random permutation."""
    g = torch.Generator().manual_seed(seed)
    n_groups = 1 if gs is None else -(-k // gs)
    g_idx = None
    if act_order:
        perm = torch.randperm(k, generator=g)
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[perm] = (torch.arange(k) // (gs or k)).to(torch.int32)
    return QuantizedWeight(
        codes=torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8),
        scales=(torch.rand(n, n_groups, generator=g) * 0.1 + 1e-3).half(),
        zeros=torch.randint(0, 1 << bits, (n, n_groups), generator=g, dtype=torch.uint8),
        bits=bits,
        group_size=gs,
        g_idx=g_idx,
    )


def _stable_argsort_reference(g_idx: torch.Tensor) -> torch.Tensor:
    """Columns ordered by (group, original index): a plain Python sort."""
    return torch.tensor(sorted(range(len(g_idx)), key=lambda c: (int(g_idx[c]), c)))


SHAPES = [(5, 64, 32), (7, 100, 32), (3, 576, 128), (4, 96, None), (9, 130, 64)]  # (N, K, gs)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(("n", "k", "gs"), SHAPES)
def test_dequantize_ref_reproduces_qw_transposed(bits, n, k, gs):
    qw = _make_qw(n, k, bits, gs, seed=bits * 100 + k)
    lay = to_kernel_layout(qw)
    assert lay["perm"] is None
    assert lay["qweight"].dtype == torch.int32
    rows = -(-k * 3 // 32) if bits == 3 else bits * -(-k // 32)
    assert lay["qweight"].shape == (rows, n) and kernel_rows(k, bits) == rows
    assert torch.equal(lay["scales"], qw.scales.t()) and lay["scales"].is_contiguous()
    assert torch.equal(lay["zeros"], qw.zeros.t()) and lay["zeros"].is_contiguous()
    w_t = dequantize_ref(lay["qweight"], lay["scales"], lay["zeros"], bits, gs or k, k)
    assert torch.equal(w_t, qw.dequantize().t())
    w16 = dequantize_ref(lay["qweight"], lay["scales"], lay["zeros"], bits, gs or k, k, dtype=torch.float16)
    assert torch.equal(w16, qw.dequantize(torch.float16).t())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(("n", "k", "gs"), SHAPES)
def test_act_order_layout_is_permuted_reproduction(bits, n, k, gs):
    qw = _make_qw(n, k, bits, gs, seed=bits * 100 + k + 1, act_order=True)
    if gs is not None:
        assert not qw.has_trivial_g_idx()
    lay = to_kernel_layout(qw)
    if gs is None:  # one group: any g_idx is all zeros, hence trivial
        assert lay["perm"] is None
        return
    perm = lay["perm"]
    assert perm.dtype == torch.int32 and perm.shape == (k,)
    assert torch.equal(perm.long(), _stable_argsort_reference(qw.g_idx))
    # in permuted order, groups are contiguous and trivial
    assert torch.equal(qw.g_idx[perm.long()], trivial_g_idx(k, gs))
    w_t = dequantize_ref(lay["qweight"], lay["scales"], lay["zeros"], bits, gs, k)
    assert torch.equal(w_t, qw.dequantize()[:, perm.long()].t())
    # inverting the permutation gives back the original weight
    inv = torch.argsort(perm.long())
    assert torch.equal(w_t[inv].t(), qw.dequantize())


def test_trivial_explicit_g_idx_gives_no_perm():
    qw = _make_qw(4, 100, 4, 32, seed=0)
    qw2 = QuantizedWeight(qw.codes, qw.scales, qw.zeros, 4, 32, g_idx=trivial_g_idx(100, 32))
    a, b = to_kernel_layout(qw), to_kernel_layout(qw2)
    assert b["perm"] is None
    assert torch.equal(a["qweight"], b["qweight"])


def test_uneven_g_idx_rejected():
    # gs=2, K=4, but group 0 gets 3 columns and group 1 one
    qw = QuantizedWeight(
        torch.zeros(1, 4, dtype=torch.uint8),
        torch.ones(1, 2, dtype=torch.float16),
        torch.zeros(1, 2, dtype=torch.uint8),
        bits=4,
        group_size=2,
        g_idx=torch.tensor([0, 1, 0, 0], dtype=torch.int32),
    )
    with pytest.raises(ValueError, match="uneven size"):
        to_kernel_layout(qw)


# ---------------------------------------------------------------------------------- bit convention


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("k", [64, 100, 576])
def test_qweight_blocked_convention_explicit_shifts(bits, k):
    # code of input k (c = k % 32; j, w, h = c // (2 bits), (c % (2 bits)) // 2, c % 2):
    # qweight[bits * (k // 32) + w, n] >> (bits * (h * (16 // bits) + j)) & mask
    n = 6
    qw = _make_qw(n, k, bits, 32, seed=bits + k)
    qweight = to_kernel_layout(qw)["qweight"]
    mask = (1 << bits) - 1
    for kk in range(k):
        c = kk % 32
        j, w, h = c // (2 * bits), (c % (2 * bits)) // 2, c % 2
        row, field = bits * (kk // 32) + w, h * (16 // bits) + j
        for nn in range(n):
            word = int(qweight[row, nn])  # signed Python int; & mask reads the same bits
            assert (word >> (bits * field)) & mask == int(qw.codes[nn, kk])
    assert torch.equal(unpack_codes(qweight, bits, k), qw.codes.t())
    assert torch.equal(pack_codes(qw.codes.t().contiguous(), bits), qweight)


def test_qweight_4bit_golden_column():
    # one column with codes k % 16 down K = 32: word w (0..3) holds inputs 2w + 8j in its low half (fields
    # j = 0..3) and 2w + 1 + 8j in its high half (fields 4 + j), so e.g. word 0 = nibbles 0 8 0 8 | 1 9 1 9
    qw = QuantizedWeight(
        (torch.arange(32) % 16).to(torch.uint8)[None, :],
        torch.ones(1, 1, dtype=torch.float16),
        torch.zeros(1, 1, dtype=torch.uint8),
        bits=4,
        group_size=None,
    )
    qweight = to_kernel_layout(qw)["qweight"]
    words = [0x91918080, 0xB3B3A2A2, 0xD5D5C4C4, 0xF7F7E6E6]
    assert qweight.tolist() == [[w - (1 << 32)] for w in words]


def test_qweight_3bit_matches_bitstream_reference():
    n, k = 3, 70
    qw = _make_qw(n, k, 3, 32, seed=5)
    qweight = to_kernel_layout(qw)["qweight"]
    assert qweight.shape == (7, n)  # ceil(70 * 3 / 32) = 7
    for nn in range(n):
        stream = sum(int(c) << (3 * i) for i, c in enumerate(qw.codes[nn]))
        words = [(stream >> (32 * r)) & 0xFFFFFFFF for r in range(7)]
        assert [w & 0xFFFFFFFF for w in qweight[:, nn].tolist()] == words
        # tail bits past K are zero: 70 * 3 = 210 bits, the last word holds bits 192..209 only
        assert (qweight[6, nn].item() & 0xFFFFFFFF) >> (210 - 192) == 0


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_qweight_tail_fields_are_zero(bits):
    k = 100  # the last block holds inputs 96..99: fields of inputs 100..127 must be zero
    qw = _make_qw(3, k, bits, 32, seed=bits)
    qw = QuantizedWeight(torch.full_like(qw.codes, (1 << bits) - 1), qw.scales, qw.zeros, bits, 32)
    qweight = to_kernel_layout(qw)["qweight"]
    assert qweight.shape[0] == bits * 4
    codes = unpack_codes(qweight, bits, 128)  # decode past K: the padding inputs
    assert bool((codes[:k] == (1 << bits) - 1).all()) and bool((codes[k:] == 0).all())
    last = qweight[-bits:].long() & 0xFFFFFFFF  # words of block 3: field h H + j holds 96 + 2 bits j + 2w + h
    half = 16 // bits
    for w in range(bits):
        used = [f for f in range(32 // bits) if 96 + 2 * bits * (f % half) + 2 * w + f // half < k]
        expect = sum(((1 << bits) - 1) << (bits * f) for f in used)
        assert bool((last[w] == expect).all())


# ---------------------------------------------------------------------------------- matmul


@pytest.mark.parametrize("m", [1, 3, 16, 33])
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize(("n", "k", "gs"), [(7, 100, 32), (16, 128, 64), (5, 96, None)])
@pytest.mark.parametrize("act_order", [False, True])
def test_quant_matmul_ref_equals_dense_fp32(m, bits, n, k, gs, act_order):
    with_bias = m % 2 == 1  # bias on for M in {1, 3, 33}, off for 16
    qw = _make_qw(n, k, bits, gs, seed=m + bits + k, act_order=act_order)
    lay = to_kernel_layout(qw)
    if act_order and gs is not None:
        assert lay["perm"] is not None
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g)
    bias = torch.randn(n, generator=g) if with_bias else None
    y = quant_matmul_ref(
        x, lay["qweight"], lay["scales"], lay["zeros"], bits, gs or k, perm=lay["perm"], bias=bias
    )
    ref = x.double() @ qw.dequantize().double().t()
    if bias is not None:
        ref = ref + bias.double()
    assert y.dtype == torch.float32 and y.shape == (m, n)
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)


def test_quant_matmul_ref_leading_batch_dims_and_fp16():
    qw = _make_qw(12, 128, 4, 32, seed=9, act_order=True)
    lay = to_kernel_layout(qw)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, 128, generator=g)
    bias = torch.randn(12, generator=g)
    args = (lay["qweight"], lay["scales"], lay["zeros"], 4, 32)
    y = quant_matmul_ref(x, *args, perm=lay["perm"], bias=bias)
    assert y.shape == (2, 3, 12)
    torch.testing.assert_close(y, x @ qw.dequantize().t() + bias, atol=1e-5, rtol=1e-5)
    # fp16 activations: W rounded to fp16 once, float32 accumulation, one rounding of the output
    x16 = x.half()
    y16 = quant_matmul_ref(x16, *args, perm=lay["perm"], bias=bias.half())
    ref16 = (x16.float() @ qw.dequantize(torch.float16).float().t() + bias.half().float()).half()
    assert y16.dtype == torch.float16
    torch.testing.assert_close(y16, ref16, atol=2e-3, rtol=2e-3)


def test_weight_is_rounded_to_activation_dtype_before_the_product():
    # K=2, gs=1: W = [255 * (1 + 2**-10), -255]. In fp16, W[0] = 255.2490234375 rounds to 255.25 (ulp
    # 0.125 in [128, 256)), so y = 0.25; without that rounding y = 255 / 1024 = 0.2490234375 (also an
    # fp16 number, so the output rounding cannot hide the difference).
    qw = QuantizedWeight(
        torch.tensor([[255, 0]], dtype=torch.uint8),
        torch.tensor([[1 + 2**-10, 1.0]], dtype=torch.float16),
        torch.tensor([[0, 255]], dtype=torch.uint8),
        bits=8,
        group_size=1,
    )
    lay = to_kernel_layout(qw)
    x = torch.ones(1, 2, dtype=torch.float16)
    y = quant_matmul_ref(x, lay["qweight"], lay["scales"], lay["zeros"], 8, 1)
    assert y.dtype == torch.float16 and y.item() == 0.25
    y32 = quant_matmul_ref(x.float(), lay["qweight"], lay["scales"], lay["zeros"], 8, 1)
    assert y32.item() == 255 / 1024


def test_perm_is_required_for_act_order():
    # sanity of the test setup: dropping perm gives a different (wrong) result
    qw = _make_qw(8, 64, 4, 16, seed=10, act_order=True)
    lay = to_kernel_layout(qw)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(10))
    args = (lay["qweight"], lay["scales"], lay["zeros"], 4, 16)
    ref = x @ qw.dequantize().t()
    assert not torch.allclose(quant_matmul_ref(x, *args), ref, atol=1e-3)
    torch.testing.assert_close(quant_matmul_ref(x, *args, perm=lay["perm"]), ref, atol=1e-5, rtol=1e-5)
