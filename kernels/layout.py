"""The kernel-side weight layout ("llmquant kernel layout v1") and its conversion from QuantizedWeight.

Byte for byte, for a linear with N outputs, K inputs, ``bits`` in {2, 3, 4, 8}, G = ceil(K / gs):

- ``qweight`` int32 [ceil(K * bits / 32), N]: for each output column n, the codes q[0..K) form a dense
  little-endian bitstream down the column (code k at stream bits [bits*k, bits*k + bits), word r holds
  stream bits [32r, 32r + 32), LSB first). For 2/4/8 bits: ``qweight[k // PF, n] >> (bits * (k % PF))``
  with PF = 32 // bits. Identical to the GPTQ ``qweight`` tensor, so GPTQ checkpoints need no repack.
  Tail bits past K are zero.
- ``scales`` float16 [G, N], ``zeros`` uint8 [G, N] (true zero points, not GPTQ-v1's zero - 1).
- the group of (permuted) input k is ``k // gs`` (gs = K for per-channel); the last group may be short.
- ``perm`` int32 [K] or absent: act-order checkpoints are reordered once at load so that groups are
  contiguous; the forward then reads ``x[..., perm]``. ``perm`` is the stable argsort of ``g_idx``.
- W[n, k] = float32(scales[g, n]) * (float32(q[k, n]) - float32(zeros[g, n])), rounded once to the
  activation dtype; ``y = x[..., perm] @ W^T`` accumulated in float32.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from llmquant.bitpack import pack, unpack
from llmquant.qtensor import QuantizedWeight, trivial_g_idx


def to_kernel_layout(qw: QuantizedWeight) -> dict[str, torch.Tensor | None]:
    """QuantizedWeight -> {"qweight", "scales", "zeros", "perm"} in the layout above (on qw's device)."""
    codes, perm = qw.codes, None
    if not qw.has_trivial_g_idx():
        perm = torch.argsort(qw.g_idx.long(), stable=True)
        sorted_g = qw.g_idx[perm]
        expect = trivial_g_idx(qw.shape[1], qw.group_size, device=sorted_g.device)
        if not torch.equal(sorted_g, expect):
            raise ValueError(
                "g_idx assigns groups of uneven size; "
                "only act-order permutations of equal groups are supported"
            )
        codes = codes[:, perm]  # [N, K] columns in group order
        perm = perm.to(torch.int32)
    return {
        "qweight": pack(codes.t(), qw.bits, dim=0),  # codes [N, K] -> [K, N] -> [ceil(K*b/32), N]
        "scales": qw.scales.t().contiguous(),  # [N, G] -> [G, N]
        "zeros": qw.zeros.t().contiguous(),  # [N, G] -> [G, N]
        "perm": perm,
    }


def dequantize_ref(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W^T [K, N] (in permuted input order) from the kernel layout; float32 math, one rounding."""
    q = unpack(qweight, bits, in_features, dim=0)  # [ceil(K*b/32), N] -> [K, N]
    g = torch.arange(in_features, device=q.device) // group_size
    return (scales.float()[g] * (q.float() - zeros.float()[g])).to(dtype)


def quant_matmul_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    perm: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [..., N] = x[..., perm] @ W^T (+ bias), W rounded to x's dtype, accumulated in float32."""
    k = x.shape[-1]
    if perm is not None:
        x = x[..., perm.long()]
    w = dequantize_ref(qweight, scales, zeros, bits, group_size, k, dtype=x.dtype)
    y = x.float() @ w.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def concat_layouts(layouts: Sequence[Mapping[str, torch.Tensor | None]]) -> dict[str, torch.Tensor | None]:
    """Concatenate kernel layouts of linears sharing one input along N (fused QKV, fused gate/up).

    All parts must have the same K, bits and group_size (so the same qweight rows and group count)
    and the same ``perm`` (None, or equal: q/k/v and gate/up see the same input, hence the same
    act-order). One ``quant_matmul`` on the result equals the parts' outputs concatenated on the last
    dim; split them back with ``y.split([part["qweight"].shape[1] for part in layouts], dim=-1)``.
    """
    if not layouts:
        raise ValueError("concat_layouts needs at least one layout")
    first = layouts[0]
    for i, part in enumerate(layouts[1:], start=1):
        rows, rows0 = (
            (part["qweight"].shape[0], part["scales"].shape[0]),
            (first["qweight"].shape[0], first["scales"].shape[0]),
        )
        if rows != rows0:
            raise ValueError(
                f"layout {i} has qweight/scales rows {part['qweight'].shape[0]}/{part['scales'].shape[0]}, "
                f"layout 0 has {first['qweight'].shape[0]}/{first['scales'].shape[0]}: "
                "concatenate only linears with the same in_features, bits and group_size"
            )
        p0, p1 = first.get("perm"), part.get("perm")
        if (p0 is None) != (p1 is None) or (p0 is not None and not torch.equal(p0, p1)):
            raise ValueError(f"layout {i} has a different act-order perm than layout 0; they cannot share x")
    return {
        "qweight": torch.cat([p["qweight"] for p in layouts], dim=1),  # [Kw, N_i] -> [Kw, sum N_i]
        "scales": torch.cat([p["scales"] for p in layouts], dim=1),  # [G, N_i] -> [G, sum N_i]
        "zeros": torch.cat([p["zeros"] for p in layouts], dim=1),  # [G, N_i] -> [G, sum N_i]
        "perm": first.get("perm"),
    }
