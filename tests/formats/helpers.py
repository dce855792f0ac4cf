"""Shared helpers for the format tests: hand-built QuantizedWeights and unsigned views of int32 words."""

from __future__ import annotations

import torch

from llmquant.config import QuantScheme
from llmquant.qtensor import QuantizedWeight


def u32(t: torch.Tensor) -> list:
    """int32 words as nested lists of unsigned Python ints (to compare with hex literals)."""
    assert t.dtype == torch.int32
    return (t.to(torch.int64) & 0xFFFFFFFF).tolist()


def make_qw(
    codes: list[list[int]] | torch.Tensor,
    zeros: list[list[int]] | torch.Tensor,
    bits: int,
    group_size: int | None,
    scales: torch.Tensor | None = None,
    g_idx: torch.Tensor | None = None,
) -> QuantizedWeight:
    """QuantizedWeight from explicit codes [N, K] and zeros [N, G] (scales default 0.5 + n/8 + g)."""
    codes = torch.as_tensor(codes, dtype=torch.uint8)
    zeros = torch.as_tensor(zeros, dtype=torch.uint8)
    n, g = zeros.shape
    if scales is None:
        scales = (0.5 + torch.arange(n)[:, None] / 8 + torch.arange(g)[None, :]).half()
    return QuantizedWeight(codes, scales, zeros, bits, group_size, g_idx)


def random_qw(
    n: int, k: int, scheme: QuantScheme, *, act_order: bool = False, min_zero: int = 0, seed: int = 0
) -> QuantizedWeight:
    """Random codes/scales/zeros; with ``act_order`` a permutation-derived g_idx."""
    gen = torch.Generator().manual_seed(seed)
    g = scheme.num_groups(k)
    codes = torch.randint(0, scheme.maxq + 1, (n, k), generator=gen).to(torch.uint8)
    scales = (torch.rand(n, g, generator=gen) + 0.01).half()
    if scheme.sym:
        zeros = torch.full((n, g), 1 << (scheme.bits - 1), dtype=torch.uint8)
    else:
        zeros = torch.randint(min_zero, scheme.maxq + 1, (n, g), generator=gen).to(torch.uint8)
    g_idx = None
    if act_order:
        gs = scheme.effective_group_size(k)
        perm = torch.randperm(k, generator=gen)
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[perm] = (torch.arange(k) // gs).to(torch.int32)  # column perm[i] is the i-th quantized
    return QuantizedWeight(codes, scales, zeros, scheme.bits, scheme.group_size, g_idx)


def schema_of(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
