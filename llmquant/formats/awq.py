"""AutoAWQ GEMM checkpoints (``quant_method: "awq"``, ``version: "gemm"``), 4-bit only.

Tensors per linear (features.md B3), N = out_features, K = in_features, G = ceil(K / gs):

- ``qweight`` int32 [K, N/8]: codes transposed to [K, N] and packed along N (dim 1) with the AWQ
  interleave: nibble i (bits 4i..4i+3) of ``qweight[k, c]`` holds column ``8c + [0,2,4,6,1,3,5,7][i]``.
- ``qzeros``  int32 [G, N/8]: raw (true) zeros, same packing and interleave.
- ``scales``  float16 [G, N].
- no ``g_idx``: AWQ never reorders, so an act-order permutation cannot be stored.

Requires N % 8 == 0 and (for AutoAWQ / vLLM) K % group_size == 0; a ragged last group is refused.
Symmetric weights are written with zeros = 8 and ``zero_point: true`` (the only GEMM variant every
loader accepts); ``meta.sym`` records that the grid was symmetric.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch

from ..config import QuantScheme
from ..kernels import bitpack
from ..qtensor import QuantizedWeight
from .base import (
    CheckpointFormat,
    TensorSchema,
    group_size_to_config,
    llmquant_version,
    register_format,
    scheme_from_fields,
)

logger = logging.getLogger(__name__)

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i holds column order[i] of its 8-column chunk
PACK_FACTOR = 8


@register_format
class AWQGemm(CheckpointFormat):
    """AutoAWQ ``WQLinear_GEMM`` layout."""

    name: ClassVar[str] = "awq"
    quant_method: ClassVar[str] = "awq"
    supported_bits: ClassVar[tuple[int, ...]] = (4,)
    marker_suffix: ClassVar[str] = "qweight"
    allows_ragged_groups: ClassVar[bool] = False

    def check_scheme(self, scheme: QuantScheme, *, act_order: bool = False) -> None:
        super().check_scheme(scheme, act_order=act_order)
        if act_order:
            raise ValueError(
                "AWQ GEMM has no g_idx and cannot store an act-order permutation; drop --act-order, "
                "add --static-groups, or use --format gptq / compressed-tensors"
            )

    def tensor_schema(
        self, out_features: int, in_features: int, scheme: QuantScheme, act_order: bool
    ) -> TensorSchema:
        self.check_scheme(scheme, act_order=act_order)
        _check_shape(out_features, in_features, scheme)
        g = scheme.num_groups(in_features)
        return {
            "qweight": ((in_features, out_features // PACK_FACTOR), torch.int32),
            "qzeros": ((g, out_features // PACK_FACTOR), torch.int32),
            "scales": ((g, out_features), torch.float16),
        }

    def pack(
        self, qw: QuantizedWeight, *, scheme: QuantScheme | None = None, act_order: bool | None = None
    ) -> dict[str, torch.Tensor]:
        """qweight/qzeros/scales of ``qw`` in the interleaved GEMM layout."""
        scheme = self.check_weight(qw, scheme)
        if act_order:
            self.check_scheme(scheme, act_order=True)
        n, k = qw.shape
        _check_shape(n, k, scheme)
        return {
            "qweight": bitpack.pack(qw.codes.t(), 4, dim=1, order=AWQ_ORDER),  # [N, K] -> [K, N/8]
            "qzeros": bitpack.pack(qw.zeros.t(), 4, dim=1, order=AWQ_ORDER),  # [N, G] -> [G, N/8]
            "scales": qw.scales.t().contiguous(),  # [N, G] -> [G, N]
        }

    def stored_shape(self, tensors: dict[str, torch.Tensor], scheme: QuantScheme) -> tuple[int, int]:
        """N from ``scales`` [G, N], K from ``qweight`` [K, N/8]."""
        return tensors["scales"].shape[1], tensors["qweight"].shape[0]

    def unpack(
        self, tensors: dict[str, torch.Tensor], scheme: QuantScheme, out_features: int, in_features: int
    ) -> QuantizedWeight:
        """QuantizedWeight from AWQ GEMM tensors (ours or AutoAWQ's)."""
        self.check_shapes(tensors, self.tensor_schema(out_features, in_features, scheme, act_order=False))
        codes = bitpack.unpack(tensors["qweight"], 4, out_features, dim=1, order=AWQ_ORDER)  # [K, N]
        zeros = bitpack.unpack(tensors["qzeros"], 4, out_features, dim=1, order=AWQ_ORDER)  # [G, N]
        return QuantizedWeight(
            codes=codes.t().contiguous(),
            scales=tensors["scales"].to(torch.float16).t().contiguous(),
            zeros=zeros.t().contiguous(),
            bits=4,
            group_size=scheme.group_size,
        )

    def quantization_config(
        self,
        scheme: QuantScheme,
        *,
        act_order: bool,
        static_groups: bool,
        method: str,
        extra_meta: dict[str, Any],
        modules_not_converted: list[str],
    ) -> dict[str, Any]:
        """AutoAWQ ``to_transformers_dict`` fields plus ``format`` (transformers v5) and ``meta``."""
        self.check_scheme(scheme, act_order=act_order and not static_groups)
        skipped = [m for m in modules_not_converted if m != "lm_head"]
        return {
            "quant_method": "awq",
            "bits": scheme.bits,
            "group_size": group_size_to_config(scheme),
            "zero_point": True,
            "version": "gemm",
            "format": "gemm",
            "modules_to_not_convert": skipped or None,
            "meta": {
                **extra_meta,
                "quantizer": [f"llmquant:{llmquant_version()}"],
                "method": method,
                "sym": scheme.sym,
                "act_order": bool(act_order),
                "static_groups": bool(static_groups),
                "zero_point_convention": "true",
                "pack_axis": "qweight [K, N/8] and qzeros [G, N/8]: dim 1 (out_features)",
                "pack_order": "8 x 4-bit per int32, nibble i = column order[i] of its chunk",
                "interleave": AWQ_ORDER,
            },
        }

    @classmethod
    def resolve(cls, quantization_config: dict[str, Any]) -> str:
        """Only the GEMM layout is supported (not gemv / gemv_fast / marlin / ...)."""
        qc = quantization_config
        version = str(qc.get("version") or qc.get("format") or "gemm").lower()
        if version != "gemm":
            raise ValueError(f"AWQ version/format {version!r} is not supported; llmquant reads 'gemm'")
        return cls.name

    def parse_config(self, quantization_config: dict[str, Any]) -> tuple[QuantScheme, dict[str, Any]]:
        """Scheme and flags from an AutoAWQ / GPTQModel / llmquant AWQ config."""
        qc = quantization_config
        meta = qc.get("meta") or {}
        if not qc.get("zero_point", True):
            raise ValueError("AWQ GEMM without zero_point is not supported (AutoAWQ GEMM requires zeros)")
        bits = qc.get("bits", qc.get("w_bit"))
        group_size = qc.get("group_size", qc.get("q_group_size"))
        if bits is None or group_size is None:
            raise ValueError("AWQ quantization_config needs 'bits' (w_bit) and 'group_size' (q_group_size)")
        scheme = scheme_from_fields(bits, group_size, meta.get("sym", False))
        self.check_scheme(scheme)
        flags = {
            "act_order": bool(meta.get("act_order", False)),
            "static_groups": bool(meta.get("static_groups", False)),
            "zero_point": True,
            "modules_to_not_convert": qc.get("modules_to_not_convert"),
            "meta": meta,
        }
        return scheme, flags


def _check_shape(out_features: int, in_features: int, scheme: QuantScheme) -> None:
    if out_features % PACK_FACTOR:
        raise ValueError(f"AWQ GEMM needs out_features % 8 == 0, got {out_features}; use --format gptq")
    gs = scheme.group_size
    if gs is not None and in_features % gs:
        raise ValueError(
            f"AWQ GEMM needs in_features % group_size == 0 (AutoAWQ/vLLM), got {in_features} % {gs}; "
            "choose a group size that divides it or use --format gptq_v2"
        )
