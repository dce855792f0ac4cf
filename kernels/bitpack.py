"""Vectorized packing of low-bit codes into int32 words.

Layout: along the packed axis, codes form one dense little-endian bitstream: element ``i`` occupies
bits ``[bits*i, bits*(i+1))`` of the stream, and word ``w`` holds stream bits ``[32w, 32w+32)`` (bit 0 =
LSB). For bits in {2, 4, 8} this is the familiar "``32 // bits`` codes per word, element j at bit
``bits*j``"; for 3 bits it is GPTQ's 10|1|10|1|10 split of 32 codes over 3 words. An optional
``order`` permutes the codes within each word first (AWQ's interleave: nibble ``i`` holds element
``order[i]`` of its 8-element chunk).
"""

from __future__ import annotations

import sys

import torch

_MASK32 = (1 << 32) - 1
# widths whose codes tile a byte: packed through uint8 views of the int32 words (little-endian hosts)
_BYTE_BITS = (1, 2, 4, 8) if sys.byteorder == "little" else ()


def packed_length(length: int, bits: int) -> int:
    """Words needed for ``length`` codes of ``bits`` bits."""
    return -(-length * bits // 32)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit values -> int32 with the same bits."""
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def pack(codes: torch.Tensor, bits: int, dim: int = -1, order: list[int] | None = None) -> torch.Tensor:
    """Pack unsigned integer codes along ``dim`` into int32 words (see module docstring)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if codes.numel() and (int(codes.max()) >= 1 << bits or int(codes.min()) < 0):
        raise ValueError(f"codes out of range for {bits} bits")
    x = codes.movedim(dim, -1)
    if bits in _BYTE_BITS:
        x = x.to(torch.uint8)
    else:
        x = x.to(torch.int32 if 32 % bits == 0 and order is None else torch.int64)
    length = x.shape[-1]
    if order is not None:
        pf = len(order)
        if length % pf:
            raise ValueError(f"packing with an order needs a length divisible by {pf}, got {length}")
        idx = torch.tensor(order, device=x.device)
        x = x.reshape(*x.shape[:-1], length // pf, pf)[..., idx].reshape(x.shape)
    n_words = packed_length(length, bits)
    if bits in _BYTE_BITS:
        return _pack_bytes(x, bits, n_words).movedim(-1, dim).contiguous()
    if 32 % bits == 0:
        return _pack_aligned(x, bits, n_words).movedim(-1, dim).contiguous()
    return _to_int32(_pack_stream(x, bits, n_words)).movedim(-1, dim).contiguous()


def _pack_bytes(x: torch.Tensor, bits: int, n_words: int) -> torch.Tensor:
    """Bit widths dividing 8: codes are OR-ed into bytes (byte ``b`` of word ``w`` holds codes
    ``4w + b``'s ``8 // bits`` codes, LSB first), and the bytes are viewed as little-endian int32 words;
    the same bitstream as :func:`_pack_aligned`, in a quarter of the memory traffic."""
    per_byte = 8 // bits
    pad = n_words * 4 * per_byte - x.shape[-1]
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    x = x.reshape(*x.shape[:-1], n_words * 4, per_byte)  # [..., L] -> [..., bytes, codes per byte]
    acc = x[..., 0].clone()
    for c in range(1, per_byte):
        acc |= x[..., c] << (bits * c)
    return acc.contiguous().view(torch.int32)  # [..., bytes] -> [..., words]


def _unpack_bytes(words: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`_pack_bytes`: int32 words [..., W] -> uint8 codes [..., length]."""
    per_byte = 8 // bits
    b = words.contiguous().view(torch.uint8)  # [..., W] -> [..., 4W] little-endian bytes
    if per_byte == 1:
        return b[..., :length]
    mask = (1 << bits) - 1
    x = torch.stack([(b >> (bits * c)) & mask for c in range(per_byte)], dim=-1)  # [..., 4W, per_byte]
    return x.reshape(*b.shape[:-1], -1)[..., :length]


def _pack_aligned(x: torch.Tensor, bits: int, n_words: int) -> torch.Tensor:
    """Fast path for bit widths dividing 32, all in int32: shifts wrap in two's complement, and
    adding disjoint bit fields never carries, so the wrapping sum is their OR."""
    pf = 32 // bits
    pad = n_words * pf - x.shape[-1]
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    shifts = torch.arange(pf, device=x.device, dtype=torch.int32) * bits
    x = x.reshape(*x.shape[:-1], n_words, pf)  # [..., L] -> [..., words, pf]
    return (x << shifts).sum(dim=-1, dtype=torch.int32)


def _pack_stream(x: torch.Tensor, bits: int, n_words: int) -> torch.Tensor:
    """Generic dense bitstream pack for bit widths that straddle words (e.g. 3)."""
    length = x.shape[-1]
    start = torch.arange(length, device=x.device, dtype=torch.int64) * bits
    word, shift = start // 32, start % 32
    words = torch.zeros(*x.shape[:-1], n_words + 1, dtype=torch.int64, device=x.device)
    words.index_add_(-1, word, (x << shift) & _MASK32)
    spill = shift + bits > 32
    if bool(spill.any()):
        words.index_add_(-1, word[spill] + 1, x[..., spill] >> (32 - shift[spill]))
    return words[..., :n_words]


def unpack(
    packed: torch.Tensor, bits: int, length: int, dim: int = -1, order: list[int] | None = None
) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 words -> uint8 codes, ``length`` codes along ``dim``."""
    if bits in _BYTE_BITS:
        x = _unpack_bytes(packed.movedim(dim, -1).to(torch.int32), bits, length)
    elif 32 % bits == 0:  # int32 arithmetic shifts: the mask drops the sign-extended bits
        w = packed.movedim(dim, -1).to(torch.int32)
        pf = 32 // bits
        shifts = torch.arange(pf, device=w.device, dtype=torch.int32) * bits
        x = ((w[..., None] >> shifts) & ((1 << bits) - 1)).reshape(*w.shape[:-1], -1)[..., :length]
    else:
        w = packed.movedim(dim, -1).to(torch.int64) & _MASK32
        w = torch.nn.functional.pad(w, (0, 1))
        start = torch.arange(length, device=w.device, dtype=torch.int64) * bits
        word, shift = start // 32, start % 32
        lo = w[..., word] >> shift
        hi = w[..., word + 1] << (32 - shift)
        x = (lo | hi) & ((1 << bits) - 1)
    if order is not None:
        pf = len(order)
        inverse = torch.argsort(torch.tensor(order, device=x.device))
        x = x.reshape(*x.shape[:-1], length // pf, pf)[..., inverse].reshape(x.shape)
    return x.to(torch.uint8).movedim(-1, dim).contiguous()
