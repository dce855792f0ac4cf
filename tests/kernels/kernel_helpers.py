"""Weight builders and tolerances shared by the kernel tests (imported as ``kernel_helpers``)."""

from __future__ import annotations

import torch

from llmquant.config import QuantScheme
from llmquant.grid import quantize_weight
from llmquant.qtensor import QuantizedWeight

# Per-dtype tolerances for matmuls (fp32 accumulation in both; only the summation order differs, plus
# one output rounding for 16-bit dtypes).
TOLERANCES = {
    torch.float32: {"atol": 1e-3, "rtol": 1e-4},
    torch.float16: {"atol": 1e-2, "rtol": 2e-3},
    torch.bfloat16: {"atol": 6e-2, "rtol": 1.6e-2},
}


def make_layout(
    n: int,
    k: int,
    bits: int,
    group_size: int | None,
    sym: bool,
    *,
    act_order: bool = False,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, torch.Tensor | None]:
    """Kernel layout of an RTN-quantized random W [n, k]; act_order permutes g_idx randomly."""
    from llmquant.kernels import to_kernel_layout

    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    qw = quantize_weight(w, QuantScheme(bits, group_size, sym))
    if act_order:
        gs = k if group_size is None else group_size
        g_idx = (torch.argsort(torch.randperm(k, generator=gen)) // gs).to(torch.int32)
        qw = QuantizedWeight(qw.codes, qw.scales, qw.zeros, bits, group_size, g_idx)
    layout = to_kernel_layout(qw)
    return {key: (None if t is None else t.to(device)) for key, t in layout.items()}
