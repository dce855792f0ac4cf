"""QuantLinear: a drop-in nn.Linear replacement holding packed low-bit weights in the kernel layout.

Buffers follow ``llmquant.kernels.layout`` (qweight int32 [kernel_rows(K, bits), N], scales fp16 [G, N],
zeros uint8 [G, N], optional perm int32 [K]). ``forward`` calls ``llmquant.kernels.quant_matmul``,
which runs the Triton kernels on CUDA and the plain-PyTorch reference (dequantize, then an fp32
matmul) elsewhere.

CPU inference can skip the per-forward dequantization: ``cache_dense_weight`` (or
``cache_dense_weights(model)``, or ``from_pretrained(..., dequantize_cache=True)``) keeps a float32 copy of
W^T and multiplies by it with the reference path's own arithmetic, so outputs are bitwise unchanged.
It costs 4 bytes per weight (8x a 4-bit weight's packed size; 425 MB for SmolLM2-135M's 106M quantized
weights) and applies to inputs off CUDA only.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .kernels.dispatch import quant_matmul
from .kernels.layout import (
    build_layout,
    dense_matmul_ref,
    dequantize_ref,
    effective_group_size,
    kernel_rows,
    unpack_codes,
)
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


logger = logging.getLogger(__name__)


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
        self._dense_weight: torch.Tensor | None = None  # W^T [K, N] float32, see cache_dense_weight

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

    def cache_dense_weight(self, enabled: bool = True) -> None:
        """Keep a dense float32 W^T [in_features, out_features] for CPU inference (``False``: drop it).

        While it is kept, ``forward`` on an input off CUDA multiplies by it (``kernels.dense_matmul_ref``)
        instead of dequantizing the packed weight on every call: bitwise the same output, at the memory
        cost of 4 bytes per weight. Not for CUDA, where the kernels read the packed weight: refused
        there, and dropped when the module moves to a CUDA device (moved along to any other device).

        Raises:
            ValueError: if the module's weight is on a CUDA device.
        """
        if not enabled:
            self._dense_weight = None
            return
        if self.qweight.is_cuda:
            raise ValueError("the dense weight cache is for CPU inference; on CUDA the kernels are faster")
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor even if called in inference mode
            self._dense_weight = dequantize_ref(
                self.qweight, self.scales, self.zeros, self.bits, self.effective_group_size, self.in_features
            )  # [K, N] float32

    @property
    def dense_weight_cached(self) -> bool:
        return self._dense_weight is not None

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001
        """``model.to(dtype)`` casts every floating buffer; the scales are part of the packed format
        and stay float16 (casting them back is exact: they came from float16). A dense weight cache
        follows the packed weight to its new device (dropped on CUDA)."""
        super()._apply(fn, recurse)
        if self.scales.dtype != torch.float16:
            self.scales = self.scales.to(torch.float16)
        cached = self._dense_weight
        if cached is not None and cached.device != self.qweight.device:
            if self.qweight.is_cuda:
                logger.debug("dense weight cache dropped: QuantLinear moved to %s", self.qweight.device)
            self.cache_dense_weight(not self.qweight.is_cuda)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._dense_weight
        if w is not None and x.device == w.device:
            return dense_matmul_ref(x, w, self.perm, self.bias)
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


def cache_dense_weights(model: nn.Module, enabled: bool = True) -> int:
    """``QuantLinear.cache_dense_weight(enabled)`` on every QuantLinear of ``model`` (fused ones
    included); returns how many. With ``enabled``, logs the memory the dense copies take.

    Raises:
        ValueError: if ``enabled`` and a quantized weight is on a CUDA device.
    """
    modules = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for module in modules:
        module.cache_dense_weight(enabled)
    if enabled and modules:
        n_bytes = sum(4 * m.in_features * m.out_features for m in modules)
        logger.info("dense weight cache: %d quantized linears, %.0f MB float32", len(modules), n_bytes / 1e6)
    return len(modules)


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` (mutates ``root``)."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
