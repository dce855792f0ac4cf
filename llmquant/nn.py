"""QuantLinear: a drop-in nn.Linear replacement holding packed low-bit weights in the kernel layout.

Buffers follow ``llmquant.kernels.layout`` (qweight int32 [kernel_rows(K, bits), N], scales fp16 [G, N],
zeros uint8 [G, N], optional perm int32 [K]). ``forward`` calls ``llmquant.kernels.quant_matmul``,
which runs the Triton kernels on CUDA and the plain-PyTorch reference (dequantize, then an fp32
matmul) elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn

from .kernels import quant_matmul, to_kernel_layout
from .kernels.layout import kernel_rows, unpack_codes
from .qtensor import QuantizedWeight


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
    def kernel_group_size(self) -> int:
        return self.in_features if self.group_size is None else self.group_size

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
        g_sorted = torch.arange(self.in_features, device=codes_t.device) // self.kernel_group_size
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
            x, self.qweight, self.scales, self.zeros, self.bits, self.kernel_group_size, self.perm, self.bias
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
