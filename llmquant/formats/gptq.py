"""GPTQ checkpoints: v1 (``checkpoint_format: "gptq"``) and v2 (``"gptq_v2"``), 2/3/4/8 bits.

Tensors per linear (features.md B1/B2), with N = out_features, K = in_features, G = ceil(K / gs):

- ``qweight`` int32 [ceil(K*b/32), N]: codes packed along K (dim 0) as a dense LSB-first bitstream
  (element k at bits [b*k, b*k+b)); for 3 bits this is GPTQ's 10|1|10|1|10 split of 32 rows over 3 words.
- ``qzeros``  int32 [G, ceil(N*b/32)]: zeros packed along N (dim 1), same bit order. v1 stores
  ``zero - 1`` (so it cannot hold zero = 0: asym must use v2), v2 stores the true zero. Reading v1,
  zero = (stored + 1) mod 2**b: other writers store an asym zero 0 as -1, wrapped to 2**b - 1.
- ``scales``  float16 [G, N].
- ``g_idx``   int32 [K]: always written; ``k // gs`` unless an act-order permutation is stored.

Per-channel (our ``group_size=None``) is ``group_size: -1`` in the config and G = 1. A ragged last group
(K % gs != 0) is written as G = ceil(K / gs) groups, like AutoGPTQ; vLLM needs K % gs == 0.
"""

from __future__ import annotations

import logging
import re
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
    read_g_idx,
    register_format,
    scheme_from_fields,
    stores_permutation,
)

logger = logging.getLogger(__name__)

PACK_AXIS = "qweight: dim 0 (in_features); qzeros: dim 1 (out_features)"
PACK_ORDER = (
    "LSB-first dense bitstream along the packed axis: element i at bits [b*i, b*i+b) "
    "(b=2/4/8: element j of a word at bits b*j; b=3: 10|1|10|1|10 over 3 words); no interleave"
)
_SUPPORTED_CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


class _GPTQ(CheckpointFormat):
    """Shared v1/v2 implementation; subclasses differ in the stored zero offset."""

    quant_method: ClassVar[str] = "gptq"
    marker_suffix: ClassVar[str] = "qweight"
    zero_offset: ClassVar[int]  # stored zero = true zero - zero_offset
    zero_point_convention: ClassVar[str]

    def check_scheme(self, scheme: QuantScheme, *, act_order: bool = False) -> None:
        super().check_scheme(scheme, act_order=act_order)
        if self.zero_offset and not scheme.sym:
            raise ValueError(
                "GPTQ v1 ('gptq') stores zero-1 and cannot hold zero = 0; use --format gptq_v2 "
                "(or compressed-tensors) for asym, or --sym"
            )

    def engine_notes(self, scheme: QuantScheme, *, act_order: bool = False) -> list[str]:
        """vLLM 0.32 runs GPTQ 4/8-bit symmetric only (``AutoGPTQConfig.TYPE_MAP``) and no desc_act."""
        notes = []
        if (scheme.bits, scheme.sym) not in ((4, True), (8, True)):
            kind = f"{scheme.bits}-bit {'sym' if scheme.sym else 'asym'}"
            alt = "awq or compressed-tensors" if scheme.bits == 4 else "compressed-tensors"
            notes.append(
                f"vLLM cannot run {kind} GPTQ ('Unsupported quantization config: bits={scheme.bits}, "
                f"sym={scheme.sym}'); for vLLM use --format {alt} (transformers + gptqmodel runs this one)"
            )
        if act_order:
            notes.append(
                "vLLM refuses GPTQ desc_act=True (a g_idx permutation); drop --no-static-groups for vLLM"
            )
        return notes

    def check_storable(self, scheme: QuantScheme, *, act_order: bool) -> None:
        """``pack`` accepts an asym weight in v1 as long as no zero is 0 (checked on the data)."""
        CheckpointFormat.check_scheme(self, scheme, act_order=act_order)

    def tensor_schema(
        self, out_features: int, in_features: int, scheme: QuantScheme, act_order: bool
    ) -> TensorSchema:
        b, g = scheme.bits, scheme.num_groups(in_features)
        return {
            "qweight": ((bitpack.packed_length(in_features, b), out_features), torch.int32),
            "qzeros": ((g, bitpack.packed_length(out_features, b)), torch.int32),
            "scales": ((g, out_features), torch.float16),
            "g_idx": ((in_features,), torch.int32),
        }

    def pack(
        self, qw: QuantizedWeight, *, scheme: QuantScheme | None = None, act_order: bool | None = None
    ) -> dict[str, torch.Tensor]:
        """qweight/qzeros/scales/g_idx of ``qw`` (g_idx always written, permutation or trivial)."""
        self.check_weight(qw, scheme)
        b = qw.bits
        zeros = qw.zeros.to(torch.int64) - self.zero_offset  # [N, G]
        if bool((zeros < 0).any()):
            n, g = (int(i) for i in torch.nonzero(zeros < 0)[0])
            raise ValueError(
                f"GPTQ v1 ('gptq') stores zero-1 and cannot hold zero = 0 (row {n}, group {g}); "
                "use --format gptq_v2 (or compressed-tensors) for asym, or --sym"
            )
        return {
            "qweight": bitpack.pack(qw.codes.t(), b, dim=0),  # codes [N, K] -> [K, N], packed along K
            "qzeros": bitpack.pack(zeros.t(), b, dim=1),  # zeros [N, G] -> [G, N], packed along N
            "scales": qw.scales.t().contiguous(),  # [N, G] -> [G, N]
            "g_idx": qw.group_index().to(torch.int32).contiguous(),
        }

    def stored_shape(self, tensors: dict[str, torch.Tensor], scheme: QuantScheme) -> tuple[int, int]:
        """N from ``scales`` [G, N]; K from ``g_idx`` [K], else from ``qweight``'s rows (K*bits/32)."""
        n = tensors["scales"].shape[1]
        if "g_idx" in tensors:
            return n, tensors["g_idx"].shape[0]
        return n, tensors["qweight"].shape[0] * 32 // scheme.bits

    def unpack(
        self, tensors: dict[str, torch.Tensor], scheme: QuantScheme, out_features: int, in_features: int
    ) -> QuantizedWeight:
        """QuantizedWeight from GPTQ tensors (ours or AutoGPTQ/GPTQModel's); g_idx None if trivial."""
        schema = self.tensor_schema(out_features, in_features, scheme, act_order=False)
        self.check_shapes(tensors, schema, optional=("g_idx",))
        b = scheme.bits
        codes = bitpack.unpack(tensors["qweight"], b, in_features, dim=0).t().contiguous()  # [K,N]->[N,K]
        stored = bitpack.unpack(tensors["qzeros"], b, out_features, dim=1).t()  # [G, N] -> [N, G]
        # v1 writers (AutoGPTQ, auto-round's auto_gptq export) store an asym zero 0 as -1, which wraps to
        # 2**b - 1 in b bits; that cannot mean zero 2**b (> maxq), so it reads as 0, as GPTQModel reads it
        zeros = (stored.to(torch.int64) + self.zero_offset) % (1 << b)
        g_idx = read_g_idx(tensors.get("g_idx"), in_features, scheme)
        return QuantizedWeight(
            codes=codes,
            scales=tensors["scales"].to(torch.float16).t().contiguous(),  # [G, N] -> [N, G]
            zeros=zeros.to(torch.uint8).contiguous(),
            bits=b,
            group_size=scheme.group_size,
            g_idx=g_idx,
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
        """AutoGPTQ/GPTQModel-style config. ``desc_act`` is true only when g_idx is a permutation."""
        self.check_scheme(scheme)
        extra = dict(extra_meta)
        damp = extra.pop("damp_percent", extra.pop("damp", None))
        true_sequential = bool(extra.pop("true_sequential", True))
        meta = {
            **extra,
            "quantizer": [f"llmquant:{llmquant_version()}"],
            "method": method,
            "act_order": bool(act_order),
            "static_groups": bool(static_groups),
            "zero_point_convention": self.zero_point_convention,
            "pack_axis": PACK_AXIS,
            "pack_order": PACK_ORDER,
        }
        config: dict[str, Any] = {
            "quant_method": "gptq",
            "bits": scheme.bits,
            "group_size": group_size_to_config(scheme),
            "desc_act": stores_permutation(act_order, static_groups),
            "static_groups": bool(static_groups),
            "sym": scheme.sym,
            "true_sequential": true_sequential,
            "lm_head": False,
            "checkpoint_format": self.name,
            "format": self.name,
            "pack_dtype": "int32",
        }
        if damp is not None:
            config["damp_percent"] = float(damp)
        skipped = [m for m in modules_not_converted if m != "lm_head"]
        if skipped:  # GPTQModel / vLLM negative "dynamic" rules: leave these modules unquantized
            config["dynamic"] = {f"-:^{re.escape(m)}$": {} for m in skipped}
        config["meta"] = meta
        return config

    def extra_files(self, quantization_config: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """``quantize_config.json`` with the same fields (AutoGPTQ / legacy readers)."""
        return {"quantize_config.json": dict(quantization_config)}

    @classmethod
    def resolve(cls, quantization_config: dict[str, Any]) -> str:
        """'gptq' or 'gptq_v2' from checkpoint_format/format; ValueError for marlin, bitblas, ..."""
        qc = quantization_config
        if qc.get("is_marlin_format"):
            raise ValueError(
                "GPTQ checkpoints in Marlin layout (is_marlin_format) are not supported; "
                "use the original 'gptq' checkpoint"
            )
        fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
        if fmt not in _SUPPORTED_CHECKPOINT_FORMATS:
            raise ValueError(
                f"GPTQ checkpoint_format {fmt!r} is not supported; llmquant reads "
                f"{list(_SUPPORTED_CHECKPOINT_FORMATS)}"
            )
        return fmt

    def parse_config(self, quantization_config: dict[str, Any]) -> tuple[QuantScheme, dict[str, Any]]:
        """Scheme and flags from an AutoGPTQ / GPTQModel / optimum / llmquant GPTQ config."""
        qc = quantization_config
        meta = qc.get("meta") or {}
        bits = qc.get("bits", qc.get("w_bit"))
        if bits is None:
            raise ValueError("GPTQ quantization_config has no 'bits'")
        group_size = qc.get("group_size", qc.get("q_group_size"))
        if group_size is None:
            logger.warning("GPTQ config has no group_size; assuming -1 (per-channel, AutoGPTQ's default)")
            group_size = -1
        if "sym" not in qc:
            logger.warning("GPTQ config has no 'sym' key; assuming sym=True (AutoGPTQ's default)")
        _check_dynamic(qc.get("dynamic"))
        scheme = scheme_from_fields(bits, group_size, qc.get("sym", True))
        desc_act = bool(qc.get("desc_act", False))
        static_groups = bool(qc.get("static_groups", meta.get("static_groups", False)))
        flags = {
            "act_order": bool(meta.get("act_order", desc_act)),
            "desc_act": desc_act,
            "static_groups": static_groups,
            "lm_head": bool(qc.get("lm_head", False)),
            "true_sequential": qc.get("true_sequential", meta.get("true_sequential")),
            "damp_percent": qc.get("damp_percent", meta.get("damp_percent")),
            "checkpoint_format": self.name,
            "dynamic": qc.get("dynamic"),
            "meta": meta,
        }
        return scheme, flags


def _check_dynamic(dynamic: Any) -> None:
    """Only negative (skip) rules of GPTQModel's ``dynamic`` are supported."""
    if not dynamic:
        return
    for pattern, override in dict(dynamic).items():
        if not str(pattern).startswith("-:") and override:
            raise ValueError(
                f"per-module GPTQ 'dynamic' overrides ({pattern!r}: {override}) are not supported; "
                "only '-:' skip rules are"
            )


@register_format
class GPTQv1(_GPTQ):
    """GPTQ v1: qzeros hold ``zero - 1`` (sym only; widest loader support)."""

    name: ClassVar[str] = "gptq"
    zero_offset: ClassVar[int] = 1
    zero_point_convention: ClassVar[str] = "v1_minus_one"


@register_format
class GPTQv2(_GPTQ):
    """GPTQ v2: qzeros hold the true zero (sym and asym)."""

    name: ClassVar[str] = "gptq_v2"
    zero_offset: ClassVar[int] = 0
    zero_point_convention: ClassVar[str] = "true"
