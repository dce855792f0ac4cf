"""dequant kernel == reference, bitwise, over bit widths, group sizes, ragged K/N and both dtypes."""

from __future__ import annotations

import pytest
import torch
import triton
from kernel_helpers import make_layout
from llmquant.kernels.dequant import dequant, dequant_ref, kernel_group_size

SHAPES = [  # (N, K, group_size)
    (24, 576, 128),  # ragged last group (576 = 4*128 + 64)
    (8, 160, 32),  # BLOCK_K (64) > group_size: per-row scale gather
    (72, 96, None),  # per-channel, K not a multiple of BLOCK_K
    (24, 64, 64),
]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize(("n", "k", "group_size"), SHAPES)
def test_dequant_bitwise(bits: int, sym: bool, n: int, k: int, group_size: int | None) -> None:
    lay = make_layout(n, k, bits, group_size, sym)
    args = (lay["qweight"], lay["scales"], lay["zeros"], bits, group_size, k)
    for dtype in (torch.float16, torch.float32):
        assert torch.equal(dequant(*args, dtype=dtype), dequant_ref(*args, dtype=dtype))


@pytest.mark.parametrize(
    "config",
    [
        triton.Config({"BLOCK_K": 32, "BLOCK_N": 16}),  # several tiles per group, ragged N tiles
        triton.Config({"BLOCK_K": 128, "BLOCK_N": 64}),  # one tile spans several groups
    ],
)
def test_dequant_configs(config: triton.Config) -> None:
    n, k, gs, bits = 40, 160, 64, 4
    lay = make_layout(n, k, bits, gs, sym=False)
    args = (lay["qweight"], lay["scales"], lay["zeros"], bits, gs, k)
    out = dequant(*args, dtype=torch.float16, config=config)
    assert torch.equal(out, dequant_ref(*args, dtype=torch.float16))


def test_dequant_extreme_codes() -> None:
    """Codes 0 and 2^b-1 with zeros 0 and 255 (8-bit) and tiny/huge fp16 scales stay exact."""
    k, n, bits = 64, 16, 8
    codes = torch.tensor([0, 255], dtype=torch.uint8).repeat(k * n // 2).reshape(k, n)
    from llmquant.kernels.layout import pack_codes

    qweight = pack_codes(codes, bits)
    scales = torch.tensor([2.0**-20, 1000.0], dtype=torch.float16).repeat(n // 2)[None, :]
    zeros = torch.tensor([0, 255], dtype=torch.uint8).repeat(n // 2)[None, :]
    for dtype in (torch.float16, torch.float32):
        out = dequant(qweight, scales, zeros, bits, None, k, dtype=dtype)
        assert torch.equal(out, dequant_ref(qweight, scales, zeros, bits, None, k, dtype=dtype))


def test_kernel_group_size() -> None:
    assert kernel_group_size(None, 96) == 1024
    assert kernel_group_size(96, 96) == 1024
    assert kernel_group_size(5000, 4096) == 4096  # >= K: per-channel
    assert kernel_group_size(None, 1500) == 2048
    assert kernel_group_size(128, 576) == 128


def test_dequant_rejects_3bit() -> None:
    lay = make_layout(8, 64, 3, 32, sym=True)
    with pytest.raises(ValueError, match="bits"):
        dequant(lay["qweight"], lay["scales"], lay["zeros"], 3, 32, 64)
