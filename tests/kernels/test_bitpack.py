"""bitpack: identity over random codes/odd shapes, an independent big-integer reference, golden words."""

from __future__ import annotations

import pytest
import torch
from llmquant.kernels.bitpack import pack, packed_length, unpack

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _signed32(u: int) -> int:
    return u - (1 << 32) if u >= 1 << 31 else u


def _words(*unsigned: int) -> torch.Tensor:
    return torch.tensor([_signed32(u) for u in unsigned], dtype=torch.int32)


def _ref_pack_row(codes: list[int], bits: int) -> list[int]:
    """Module docstring, literally: one Python integer as the LSB-first bitstream, cut into 32-bit words."""
    stream = 0
    for i, c in enumerate(codes):
        stream |= c << (bits * i)
    n_words = -(-len(codes) * bits // 32)
    return [_signed32((stream >> (32 * w)) & 0xFFFFFFFF) for w in range(n_words)]


# ---------------------------------------------------------------------------------- identity


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("length", [1, 31, 33, 97])
@pytest.mark.parametrize("dim", [0, 1])
def test_pack_unpack_identity(bits, length, dim):
    g = torch.Generator().manual_seed(1000 * bits + length)
    shape = (length, 5) if dim == 0 else (5, length)
    codes = torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.uint8)
    packed = pack(codes, bits, dim=dim)
    assert packed.dtype == torch.int32
    assert packed.shape[dim] == packed_length(length, bits) == -(-length * bits // 32)
    out = unpack(packed, bits, length, dim=dim)
    assert out.dtype == torch.uint8
    assert torch.equal(out, codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_matches_bigint_bitstream_reference(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (4, 75), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)  # along the last dim
    expected = torch.tensor([_ref_pack_row(row.tolist(), bits) for row in codes], dtype=torch.int32)
    assert torch.equal(packed, expected)
    # and along dim 0 of the transpose: the same words, transposed
    assert torch.equal(pack(codes.t(), bits, dim=0), expected.t())


def test_pack_middle_dim_of_3d_tensor():
    g = torch.Generator().manual_seed(7)
    codes = torch.randint(0, 8, (2, 45, 3), generator=g, dtype=torch.uint8)
    packed = pack(codes, 3, dim=1)
    assert packed.shape == (2, 5, 3)
    for a in range(2):
        for c in range(3):
            assert packed[a, :, c].tolist() == _ref_pack_row(codes[a, :, c].tolist(), 3)
    assert torch.equal(unpack(packed, 3, 45, dim=1), codes)


def test_tail_bits_past_length_are_zero():
    # 5 codes of 4 bits = 20 bits; the top 12 bits of the single word must be zero
    codes = torch.full((5,), 15, dtype=torch.uint8)
    assert torch.equal(pack(codes, 4), _words(0x000FFFFF))


# ---------------------------------------------------------------------------------- golden words


def test_golden_4bit_codes_0_to_7():
    assert torch.equal(pack(torch.arange(8, dtype=torch.uint8), 4), _words(0x76543210))


def test_golden_4bit_codes_8_to_15_is_negative_int32():
    packed = pack(torch.arange(8, 16, dtype=torch.uint8), 4)
    assert torch.equal(packed, _words(0xFEDCBA98))
    assert int(packed[0]) == 0xFEDCBA98 - (1 << 32) < 0
    assert torch.equal(unpack(packed, 4, 8), torch.arange(8, 16, dtype=torch.uint8))


def test_golden_only_top_bit_set():
    codes = torch.tensor([0, 0, 0, 0, 0, 0, 0, 8], dtype=torch.uint8)
    packed = pack(codes, 4)
    assert int(packed[0]) == -(2**31)
    assert torch.equal(unpack(packed, 4, 8), codes)


def test_golden_3bit_32_codes_into_3_words():
    # codes c_i = i % 8, i = 0..31: 96 stream bits = 3 words. A 3-bit code is one octal digit, so a
    # run of whole codes reads as an octal literal (highest code first).
    # word 0, bits 0..29 = codes 0..9  -> 0o1076543210
    #         bits 30..31 = low 2 bits of code 10 (= 2 = 0b010) -> bit 30 = 0, bit 31 = 1
    #                                                         -> 0o1076543210 | 1 << 31 = 0x88FAC688
    # word 1, bit 0      = bit 2 of code 10 = 0
    #         bits 1..30 = codes 11..20 (3,4,5,6,7,0,1,2,3,4) -> 0o4321076543 << 1
    #         bit 31     = bit 0 of code 21 (= 5 = 0b101) = 1 -> 0xC688FAC6
    # word 2, bits 0..1  = bits 1..2 of code 21 = 0b10 = 2
    #         bits 2..31 = codes 22..31 (6,7,0,...,7)         -> 0o7654321076 << 2 | 2 = 0xFAC688FA
    # (GPTQ's 10|1|10|1|10 split.) All three words have bit 31 set, so all are negative int32.
    codes = torch.arange(32, dtype=torch.uint8) % 8
    assert 0o1076543210 | 1 << 31 == 0x88FAC688
    assert (0o4321076543 << 1) | 1 << 31 == 0xC688FAC6
    assert (0o7654321076 << 2) | 2 == 0xFAC688FA
    packed = pack(codes, 3)
    assert torch.equal(packed, _words(0x88FAC688, 0xC688FAC6, 0xFAC688FA))
    assert torch.equal(unpack(packed, 3, 32), codes)


def test_golden_3bit_single_code_straddling_words():
    # code 10 alone = 0b111: bits 30,31 of word 0 and bit 0 of word 1 (11 codes -> 33 bits -> 2 words)
    codes = torch.zeros(11, dtype=torch.uint8)
    codes[10] = 7
    packed = pack(codes, 3)
    assert torch.equal(packed, _words(0xC0000000, 0x00000001))
    assert torch.equal(unpack(packed, 3, 11), codes)


def test_golden_2bit():
    # codes 0,1,2,3 repeated: base-4 digits "3210" = 0b11_10_01_00 = 0xE4 per 4 codes
    codes = torch.tensor([0, 1, 2, 3] * 4, dtype=torch.uint8)
    assert torch.equal(pack(codes, 2), _words(0xE4E4E4E4))
    # 17 codes: second word holds only code 16 (= 0b11 here) at bits 0..1
    codes17 = torch.tensor([1] * 16 + [3], dtype=torch.uint8)
    assert torch.equal(pack(codes17, 2), _words(0x55555555, 0x00000003))


def test_golden_8bit():
    codes = torch.tensor([0x01, 0x23, 0x45, 0x67, 0x89, 0xAB, 0xCD, 0xEF], dtype=torch.uint8)
    packed = pack(codes, 8)
    assert torch.equal(packed, _words(0x67452301, 0xEFCDAB89))
    assert torch.equal(unpack(packed, 8, 8), codes)


def test_golden_1bit():
    codes = torch.tensor([1, 0, 0, 0] * 8, dtype=torch.uint8)
    assert torch.equal(pack(codes, 1), _words(0x11111111))


def test_golden_8bit_along_dim0():
    codes = torch.tensor([[1, 255], [2, 0], [3, 0], [4, 128]], dtype=torch.uint8)  # [4, 2]
    assert torch.equal(pack(codes, 8, dim=0), _words(0x04030201, 0x800000FF).reshape(1, 2))


# ---------------------------------------------------------------------------------- AWQ order


def test_golden_awq_order():
    codes = torch.arange(8, dtype=torch.uint8)
    packed = pack(codes, 4, order=AWQ_ORDER)
    # nibble i holds element order[i]: nibbles (LSB first) 0,2,4,6,1,3,5,7
    assert torch.equal(packed, _words(0x75316420))
    assert torch.equal(unpack(packed, 4, 8, order=AWQ_ORDER), codes)


def test_awq_order_applies_per_8_element_chunk():
    codes = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(pack(codes, 4, order=AWQ_ORDER), _words(0x75316420, 0xFDB9ECA8))


@pytest.mark.parametrize("dim", [0, 1])
def test_order_round_trip_random(dim):
    g = torch.Generator().manual_seed(3)
    shape = (24, 5) if dim == 0 else (5, 24)
    codes = torch.randint(0, 16, shape, generator=g, dtype=torch.uint8)
    packed = pack(codes, 4, dim=dim, order=AWQ_ORDER)
    assert torch.equal(unpack(packed, 4, 24, dim=dim, order=AWQ_ORDER), codes)
    # without the order on unpack we read the interleaved sequence
    plain = unpack(packed, 4, 24, dim=dim)
    perm = torch.tensor([c * 8 + o for c in range(3) for o in AWQ_ORDER])
    assert torch.equal(plain, codes.index_select(dim, perm))


def test_order_requires_length_divisible_by_order():
    with pytest.raises(ValueError, match="divisible by 8"):
        pack(torch.zeros(12, dtype=torch.uint8), 4, order=AWQ_ORDER)


# ---------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("bits", "bad"), [(4, 16), (3, 8), (2, 4), (1, 2), (8, 256), (4, -1)])
def test_out_of_range_codes_raise(bits, bad):
    codes = torch.zeros(8, dtype=torch.int32)
    codes[5] = bad
    with pytest.raises(ValueError, match=f"codes out of range for {bits} bits"):
        pack(codes, bits)


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_unsupported_bits_raise(bits):
    with pytest.raises(ValueError, match="bits must be in 1..8"):
        pack(torch.zeros(8, dtype=torch.uint8), bits)


def test_max_codes_accepted_for_each_width():
    for bits in range(1, 9):
        codes = torch.full((40,), (1 << bits) - 1, dtype=torch.int64)
        assert torch.equal(unpack(pack(codes, bits), bits, 40), codes.to(torch.uint8))
