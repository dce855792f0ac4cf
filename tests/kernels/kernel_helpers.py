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
    from llmquant.nn import to_kernel_layout

    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    qw = quantize_weight(w, QuantScheme(bits, group_size, sym))
    if act_order:
        gs = k if group_size is None else group_size
        g_idx = (torch.argsort(torch.randperm(k, generator=gen)) // gs).to(torch.int32)
        qw = QuantizedWeight(qw.codes, qw.scales, qw.zeros, bits, group_size, g_idx)
    layout = to_kernel_layout(qw)
    return {key: (None if t is None else t.to(device)) for key, t in layout.items()}


def assert_matmul_accuracy(
    y: torch.Tensor,
    x: torch.Tensor,
    lay: dict,
    bits: int,
    group_size: int | None,
    bias: torch.Tensor | None = None,
    *,
    atol_scale: float = 1.0,
) -> None:
    """A quantized matmul is at least as accurate as ``quant_matmul_ref``, up to ``TOLERANCES``.

    Both are compared with the exact product (float64, W = s * (q - z) unrounded): elementwise
    |y - exact| <= |ref - exact| + atol + rtol * |exact|. The reference rounds W once to x's dtype;
    kernels that apply the scale to fp32 sums instead (GEMV, SCALE_AFTER GEMM) are closer to exact,
    which a plain ``assert_close(y, ref)`` would wrongly count against them.
    """
    from llmquant.kernels import quant_matmul_ref
    from llmquant.kernels.layout import unpack_codes

    k = x.shape[-1]
    gs = group_size or k
    ref = quant_matmul_ref(x, lay["qweight"], lay["scales"], lay["zeros"], bits, gs, lay["perm"], bias)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    q = unpack_codes(lay["qweight"], bits, k).double()  # [K, N]
    g = torch.arange(k, device=q.device) // gs
    w = lay["scales"].double()[g] * (q - lay["zeros"].double()[g])
    xp = x if lay["perm"] is None else x[..., lay["perm"].long()]
    exact = xp.double() @ w + (0 if bias is None else bias.double())
    tol = TOLERANCES[x.dtype]
    bound = (ref.double() - exact).abs() + tol["atol"] * atol_scale + tol["rtol"] * exact.abs()
    err, ref_err = (y.double() - exact).abs(), (ref.double() - exact).abs()
    worst = (err - bound).max().item()
    assert worst <= 0, (
        f"kernel error exceeds the reference's by {worst:.3g} "
        f"(max |y - exact| {err.max().item():.3g}, max |ref - exact| {ref_err.max().item():.3g})"
    )
