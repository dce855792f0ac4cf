"""The kernel-side weight layout ("llmquant kernel layout v3") and its conversion from QuantizedWeight.

Byte for byte, for a linear with N outputs, K inputs, ``bits`` in {2, 3, 4, 8}, G = ceil(K / gs):

- ``qweight`` int32 [kernel_rows(K, bits), N], codes packed down each output column n.
  - bits in {2, 4, 8} (the kernels' widths), "blocked": inputs go in blocks of 32 (block B holds inputs
    32B .. 32B + 31), each block in ``bits`` consecutive words, so kernel_rows = bits * ceil(K / 32).
    A word has PF = 32 // bits bit fields (field f at bits [bits*f, bits*f + bits), LSB first), H = PF / 2
    in each 16-bit half. Word row ``bits * B + w`` (w < bits) holds in field ``f = h*H + j`` (half h in
    {0, 1}, j < H) the code of input ``32B + 2*bits*j + 2*w + h``. Decoding the code of input k:
    ``c = k % 32; j, w, h = c // (2*bits), (c % (2*bits)) // 2, c % 2;``
    ``qweight[bits * (k // 32) + w, n] >> (bits * (h*H + j)) & (2^bits - 1)``.
    So fields j and j + H of a word (the same bits of its two half-words) hold two consecutive inputs
    2i, 2i + 1, and "pair slice" j of a block's ``bits`` words holds the 2*bits contiguous inputs
    32B + 2*bits*j ..: the GEMM builds a tensor-core operand pair (k, k + 1) from one word with one
    mask (the fp16 pair (1024 + q_lo, 1024 + q_hi) is ``word >> s & 0x000F000F | 0x64006400`` at 4 bits)
    and multiplies it with runs of 2*bits contiguous activations (staged with asynchronous copies).
    Fields of inputs >= K are 0.
  - bits = 3 (reference path only): a dense little-endian bitstream down the column (code k at stream
    bits [3k, 3k + 3), word r holds stream bits [32r, 32r + 32)), kernel_rows = ceil(3K / 32).
  GPTQ/AWQ checkpoints are repacked into this once at load, on the device (``pack_codes``).
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

from .bitpack import pack, packed_length, unpack

BLOCK_INPUTS = 32  # inputs per block of the blocked layout (bits in BLOCKED_BITS)
BLOCKED_BITS = (2, 4, 8)
SUPPORTED_BITS = BLOCKED_BITS  # the widths the Triton kernels read; others run the reference


def effective_group_size(group_size: int | None, in_features: int) -> int:
    """The group size of the layout's math: ``None`` (per-channel) is one group of all K inputs."""
    return in_features if group_size is None else int(group_size)


def kernel_rows(in_features: int, bits: int) -> int:
    """Rows of ``qweight`` for K = in_features: bits * ceil(K / 32), or ceil(3K / 32) for 3 bits."""
    if bits in BLOCKED_BITS:
        return bits * -(-in_features // BLOCK_INPUTS)
    return packed_length(in_features, bits)


def pack_codes(codes_kn: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [K, N] (uint8, input-major) -> qweight int32 [kernel_rows(K, bits), N] (module docstring)."""
    if bits not in BLOCKED_BITS:
        return pack(codes_kn, bits, dim=0)
    k, n = codes_kn.shape
    blocks = -(-k // BLOCK_INPUTS)
    padded = torch.nn.functional.pad(codes_kn, (0, 0, 0, blocks * BLOCK_INPUTS - k))
    # input 32B + 2*bits*j + 2w + h sits at [B, j, w, h]; words are (B, w), fields f = h*H + j in order
    fields = padded.reshape(blocks, 16 // bits, bits, 2, n).permute(0, 2, 3, 1, 4)  # [B, w, h, j, N]
    return pack(fields.reshape(-1, n), bits, dim=0)


def unpack_codes(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: qweight int32 [kernel_rows(K, bits), N] -> codes uint8 [K, N]."""
    if bits not in BLOCKED_BITS:
        return unpack(qweight, bits, in_features, dim=0)
    n, blocks = qweight.shape[1], qweight.shape[0] // bits
    fields = unpack(qweight, bits, blocks * BLOCK_INPUTS, dim=0)  # [(B, w, h, j), N]
    codes = fields.reshape(blocks, bits, 2, 16 // bits, n).permute(0, 3, 1, 2, 4)  # [B, j, w, h, N]
    return codes.reshape(-1, n)[:in_features]


def build_layout(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    perm: torch.Tensor | None = None,
) -> dict[str, torch.Tensor | None]:
    """{"qweight", "scales", "zeros", "perm"} in the layout above, from codes uint8 [N, K] (in the
    original input order), scales float16 [N, G] and zeros uint8 [N, G]; ``perm`` int32 [K] (the stable
    argsort of an act-order g_idx) or None. The llmquant side builds it from a QuantizedWeight
    (``llmquant.nn.to_kernel_layout``)."""
    if perm is not None:
        codes = codes[:, perm.long()]  # [N, K] columns in group order
    return {
        "qweight": pack_codes(codes.t(), bits),  # codes [N, K] -> [K, N] -> [kernel_rows, N]
        "scales": scales.t().contiguous(),  # [N, G] -> [G, N]
        "zeros": zeros.t().contiguous(),  # [N, G] -> [G, N]
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
    q = unpack_codes(qweight, bits, in_features)  # [kernel_rows, N] -> [K, N]
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
    w = dequantize_ref(qweight, scales, zeros, bits, group_size, x.shape[-1], dtype=x.dtype)
    return dense_matmul_ref(x, w, perm, bias)


def dense_matmul_ref(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    perm: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``quant_matmul_ref`` after its dequantization: y [..., N] = x[..., perm] @ weight_t (+ bias) for a
    dense W^T [K, N] (in permuted input order), rounded to x's dtype, accumulated in float32. Given
    ``dequantize_ref(..., dtype=torch.float32)`` it is bitwise ``quant_matmul_ref`` (one rounding either
    way), which is how a dequantize-once cache reuses one float32 copy for any input dtype."""
    if perm is not None:
        x = x[..., perm.long()]
    y = x.float() @ weight_t.to(x.dtype).float()
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
