"""QuantLinear: a drop-in nn.Linear replacement holding packed low-bit weights in the kernel layout.

Buffers follow ``llmquant.kernels.layout`` (qweight int32 [kernel_rows(K, bits), N], scales fp16 [G, N],
zeros uint8 [G, N], optional perm int32 [K]). ``forward`` calls ``llmquant.kernels.quant_matmul``,
which runs the Triton kernels on CUDA and the plain-PyTorch reference (dequantize, then an fp32
matmul) elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn

from .kernels.dispatch import quant_matmul
from .kernels.layout import build_layout, effective_group_size, kernel_rows, unpack_codes
from .qtensor import QuantizedWeight, trivial_g_idx


def to_kernel_layout(qw: QuantizedWeight) -> dict[str, torch.Tensor | None]:
    """QuantizedWeight -> {"qweight", "scales", "zeros", "perm"} in the kernel layout
    (``llmquant.kernels.layout``), on qw's device. An act-order g_idx becomes ``perm``, its stable
    argsort, so that groups are contiguous; g_idx with groups of uneven size are refused."""
    perm = None
    if not qw.has_trivial_g_idx():
        perm = torch.argsort(qw.g_idx.long(), stable=True)
        expect = trivial_g_idx(qw.shape[1], qw.group_size, device=qw.g_idx.device)
        if not torch.equal(qw.g_idx[perm], expect):
            raise ValueError(
                "g_idx assigns groups of uneven size; "
                "only act-order permutations of equal groups are supported"
            )
        perm = perm.to(torch.int32)
    return build_layout(qw.codes, qw.scales, qw.zeros, qw.bits, perm)


class QuantLinear(nn.Module):
    """y = x @ dequantize(W)^T + b with W stored packed (see module docstring)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        group_size: int | None,
        bias: bool = False,
        act_order: bool = False,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        gs = in_features if group_size is None else group_size
        n_groups = -(-in_features // gs)
        words = kernel_rows(in_features, bits)
        self.register_buffer("qweight", torch.zeros(words, out_features, dtype=torch.int32, device=device))
        self.register_buffer(
            "scales", torch.zeros(n_groups, out_features, dtype=torch.float16, device=device)
        )
        self.register_buffer("zeros", torch.zeros(n_groups, out_features, dtype=torch.uint8, device=device))
        perm = torch.arange(in_features, dtype=torch.int32, device=device) if act_order else None
        self.register_buffer("perm", perm)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @property
    def effective_group_size(self) -> int:
        """``group_size``, or K for per-channel weights (``kernels.layout.effective_group_size``)."""
        return effective_group_size(self.group_size, self.in_features)

    @classmethod
    def from_quantized(
        cls, qw: QuantizedWeight, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float16
    ) -> QuantLinear:
        """Build from a QuantizedWeight (conversion to the kernel layout happens on qw's device)."""
        n, k = qw.shape
        layout = to_kernel_layout(qw)
        module = cls(
            k,
            n,
            bits=qw.bits,
            group_size=qw.group_size,
            bias=bias is not None,
            act_order=layout["perm"] is not None,
            dtype=dtype,
            device="meta",
        )
        module.qweight = layout["qweight"]
        module.scales = layout["scales"]
        module.zeros = layout["zeros"]
        module.perm = layout["perm"]
        module.bias = None if bias is None else bias.detach().to(dtype).clone()
        return module

    def to_quantized(self) -> QuantizedWeight:
        """Inverse of ``from_quantized``: codes back in the original input order, with g_idx."""
        codes_t = unpack_codes(self.qweight, self.bits, self.in_features)  # [K, N] (permuted order)
        g_sorted = torch.arange(self.in_features, device=codes_t.device) // self.effective_group_size
        g_idx = None
        if self.perm is not None:
            inv = torch.empty_like(self.perm, dtype=torch.long)
            inv[self.perm.long()] = torch.arange(self.in_features, device=inv.device)
            codes_t = codes_t[inv]  # back to original input order
            g_idx = g_sorted[inv].to(torch.int32)
        return QuantizedWeight(
            codes=codes_t.t().contiguous(),
            scales=self.scales.t().contiguous(),
            zeros=self.zeros.t().contiguous(),
            bits=self.bits,
            group_size=self.group_size,
            g_idx=g_idx,
        )

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001
        """``model.to(dtype)`` casts every floating buffer; the scales are part of the packed format
        and stay float16 (casting them back is exact: they came from float16)."""
        super()._apply(fn, recurse)
        if self.scales.dtype != torch.float16:
            self.scales = self.scales.to(torch.float16)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_matmul(
            x,
            self.qweight,
            self.scales,
            self.zeros,
            self.bits,
            self.effective_group_size,
            self.perm,
            self.bias,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, act_order={self.perm is not None}, bias={self.bias is not None}"
        )


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` (mutates ``root``)."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
