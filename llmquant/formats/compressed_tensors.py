"""compressed-tensors ``pack-quantized`` checkpoints (llm-compressor W4A16 / W4A16_ASYM / WNA16).

Tensors per linear (features.md B4), N = out_features, K = in_features, G = ceil(K / gs):

- ``weight_packed``     int32 [N, ceil(K*b/32)]: packed along K on the [out, in] orientation, dense
  LSB-first bitstream. Stored value = ``q_signed + 2**(b-1)``; since our unsigned code is
  ``q_u = q_signed + 2**(b-1)`` in both the sym and the asym case, the stored value is simply ``q_u``.
- ``weight_scale``      float16 [N, G] ([N, 1] for the ``channel`` strategy).
- ``weight_zero_point`` int32 [ceil(N*b/32), G]: asym only, packed along dim 0 (N); stored value =
  ``zp_signed + 2**(b-1)`` = our raw unsigned zero. This is what compressed-tensors' own compressor writes
  since its zero-point packing (compressed-tensors PR #296, 2025; ``PackedQuantizationCompressor.compress``)
  and what vLLM allocates (``CompressedTensorsWNA16.create_weights``: ``[ceil(N*b/32), G]`` int32,
  ``packed_dim=0``). ``unpack`` also reads the older convention, an unpacked ``[N, G]`` int8 tensor of
  signed zero points (``zp_signed`` in ``[-2**(b-1), 2**(b-1))``), that releases before it wrote.
  Loading ours through transformers: compressed-tensors 0.18-0.20.1 build the module with an unpacked
  ``[N, G]`` zero point on the meta device (their ``compress`` packs it only for real tensors), so
  transformers refuses the packed tensor as a size mismatch, while an unpacked one loads but decompresses
  as if packed (wrong weights). ``CompressedTensorsConfig(dequantize=True)`` (decompress at load, through
  the same compressor) reads the packed layout correctly there, and releases up to 0.17 need nothing.
- ``weight_shape``      int64 [2] = [N, K].
- ``weight_g_idx``      int32 [K]: only with ``actorder: "group"`` (an act-order permutation).

Config: per-channel -> ``strategy: "channel"``, ``group_size: null``; grouped -> ``strategy: "group"``.
``actorder``: null without act-order, ``"weight"`` for act-order with static groups (trivial g_idx,
nothing extra stored), ``"group"`` for act-order with a permutation (``weight_g_idx`` on every module).
Note: 3-bit uses the dense cross-word bitstream of current compressed-tensors; its pre-2026 releases
packed 10 codes per word and cannot read it (2/4/8-bit are identical in both).
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
    llmquant_version,
    read_g_idx,
    register_format,
    scheme_from_fields,
    stores_permutation,
)

logger = logging.getLogger(__name__)

FORMAT = "pack-quantized"
COMPRESSED_TENSORS_VERSION = "0.12.2"  # the config schema we emit (field set of CT quant_args.py)
_ACTORDER_ALIASES = {"dynamic": "group", "static": "weight", "true": "group"}


@register_format
class CompressedTensorsPacked(CheckpointFormat):
    """compressed-tensors ``pack-quantized`` (weight-only int, group or channel strategy)."""

    name: ClassVar[str] = "compressed-tensors"
    quant_method: ClassVar[str] = "compressed-tensors"
    marker_suffix: ClassVar[str] = "weight_packed"

    def tensor_schema(
        self, out_features: int, in_features: int, scheme: QuantScheme, act_order: bool
    ) -> TensorSchema:
        self.check_scheme(scheme, act_order=act_order)
        b, g = scheme.bits, scheme.num_groups(in_features)
        schema: TensorSchema = {
            "weight_packed": ((out_features, bitpack.packed_length(in_features, b)), torch.int32),
            "weight_scale": ((out_features, g), torch.float16),
            "weight_shape": ((2,), torch.int64),
        }
        if not scheme.sym:
            schema["weight_zero_point"] = ((bitpack.packed_length(out_features, b), g), torch.int32)
        if act_order and scheme.group_size is not None:
            schema["weight_g_idx"] = ((in_features,), torch.int32)
        return schema

    def engine_notes(self, scheme: QuantScheme, *, act_order: bool = False) -> list[str]:
        """transformers + compressed-tensors 0.18-0.20.1 and asym; vLLM 0.32 and ``actorder: group``."""
        notes = []
        if not scheme.sym:
            notes.append(
                "transformers with compressed-tensors 0.18-0.20.1 loads asym pack-quantized only with "
                "quantization_config=CompressedTensorsConfig(dequantize=True) (size mismatch otherwise); "
                "vLLM loads it as is"
            )
        if act_order and scheme.group_size is not None:
            notes.append(
                "vLLM refuses compressed-tensors actorder 'group' (a weight_g_idx permutation); "
                "drop --no-static-groups for vLLM"
            )
        return notes

    def pack(
        self, qw: QuantizedWeight, *, scheme: QuantScheme | None = None, act_order: bool | None = None
    ) -> dict[str, torch.Tensor]:
        """CT tensors of ``qw``; ``weight_g_idx`` iff ``act_order`` (default: qw has a permutation)."""
        scheme = self.check_weight(qw, scheme)
        if act_order is None:
            act_order = not qw.has_trivial_g_idx()
        elif not act_order and not qw.has_trivial_g_idx():
            raise ValueError("weight has an act-order g_idx but act_order=False: it would be lost")
        n, k = qw.shape
        out = {
            "weight_packed": bitpack.pack(qw.codes, scheme.bits, dim=1),  # [N, K] packed along K
            "weight_scale": qw.scales.contiguous(),  # [N, G]
            "weight_shape": torch.tensor([n, k], dtype=torch.int64),
        }
        if not scheme.sym:
            out["weight_zero_point"] = bitpack.pack(qw.zeros, scheme.bits, dim=0)  # [N, G] along N
        if act_order and scheme.group_size is not None:
            out["weight_g_idx"] = qw.group_index().to(torch.int32).contiguous()
        return out

    def stored_shape(self, tensors: dict[str, torch.Tensor], scheme: QuantScheme) -> tuple[int, int]:
        """``weight_shape`` [2] when stored; else N from ``weight_packed`` [N, K*bits/32] and K from
        ``weight_g_idx`` [K] or the packed width."""
        if "weight_shape" in tensors:
            n, k = (int(v) for v in tensors["weight_shape"].tolist())
            return n, k
        n = tensors["weight_packed"].shape[0]
        if "weight_g_idx" in tensors:
            return n, tensors["weight_g_idx"].shape[0]
        return n, tensors["weight_packed"].shape[1] * 32 // scheme.bits

    def unpack(
        self, tensors: dict[str, torch.Tensor], scheme: QuantScheme, out_features: int, in_features: int
    ) -> QuantizedWeight:
        """QuantizedWeight from pack-quantized tensors (ours or llm-compressor's)."""
        act_order = "weight_g_idx" in tensors
        schema = self.tensor_schema(out_features, in_features, scheme, act_order=act_order)
        schema.pop("weight_zero_point", None)  # two conventions, checked by _read_zero_point
        self.check_shapes(tensors, schema, optional=("weight_shape",))
        if "weight_shape" in tensors and tensors["weight_shape"].tolist() != [out_features, in_features]:
            raise ValueError(
                f"weight_shape {tensors['weight_shape'].tolist()} != [{out_features}, {in_features}]"
            )
        b, g = scheme.bits, scheme.num_groups(in_features)
        codes = bitpack.unpack(tensors["weight_packed"], b, in_features, dim=1)  # [N, K]
        if scheme.sym:
            zeros = torch.full((out_features, g), 1 << (b - 1), dtype=torch.uint8)
        else:
            if "weight_zero_point" not in tensors:
                raise ValueError(f"{self.name}: asymmetric scheme but no 'weight_zero_point' tensor")
            zeros = _read_zero_point(tensors["weight_zero_point"], b, out_features, g)
        g_idx = None
        if act_order:
            g_idx = read_g_idx(tensors["weight_g_idx"], in_features, scheme)
        return QuantizedWeight(
            codes=codes,
            scales=tensors["weight_scale"].to(torch.float16).contiguous(),
            zeros=zeros,
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
        """The CT ``QuantizationConfig`` dump (keys as CT writes them) plus llmquant ``meta``."""
        actorder = _actorder(scheme, act_order, static_groups)
        weights = {
            "num_bits": scheme.bits,
            "type": "int",
            "symmetric": scheme.sym,
            "group_size": scheme.group_size,
            "strategy": "channel" if scheme.group_size is None else "group",
            "block_structure": None,
            "dynamic": False,
            "actorder": actorder,
            "scale_dtype": None,
            "zp_dtype": None if scheme.sym else "torch.int8",
            "observer": "memoryless_minmax",
            "observer_kwargs": {},
        }
        group = {
            "targets": ["Linear"],
            "weights": weights,
            "input_activations": None,
            "output_activations": None,
            "format": FORMAT,
        }
        ignore = ["lm_head", *[m for m in modules_not_converted if m != "lm_head"]]
        return {
            "config_groups": {"group_0": group},
            "format": FORMAT,
            "global_compression_ratio": None,
            "ignore": ignore,
            "kv_cache_scheme": None,
            "quant_method": "compressed-tensors",
            "quantization_status": "compressed",
            "sparsity_config": {},
            "transform_config": {},
            "version": COMPRESSED_TENSORS_VERSION,
            "meta": {
                **extra_meta,
                "quantizer": [f"llmquant:{llmquant_version()}"],
                "method": method,
                "act_order": bool(act_order),
                "static_groups": bool(static_groups),
                "zero_point_convention": "stored = zp_signed + 2**(bits-1) = true unsigned zero",
                "pack_axis": "weight_packed: dim 1 (in_features); weight_zero_point: dim 0 (out_features)",
                "pack_order": "LSB-first dense bitstream: element i at bits [b*i, b*i+b); no interleave",
            },
        }

    def parse_config(self, quantization_config: dict[str, Any]) -> tuple[QuantScheme, dict[str, Any]]:
        """Scheme and flags from an llm-compressor / llmquant ``pack-quantized`` config."""
        qc = quantization_config
        groups = qc.get("config_groups") or {}
        weight_args = [_weights_of(name, grp, qc) for name, grp in groups.items()]
        weight_args = [w for w in weight_args if w is not None]
        if not weight_args:
            raise ValueError("compressed-tensors config has no weight quantization in config_groups")
        if any(w != weight_args[0] for w in weight_args[1:]):
            raise ValueError(
                "compressed-tensors configs with several different weight schemes are not supported"
            )
        w = weight_args[0]
        status = qc.get("quantization_status", "compressed")
        if status != "compressed":
            raise ValueError(
                f"compressed-tensors quantization_status {status!r} is not 'compressed' (not packed)"
            )
        if w.get("type", "int") != "int":
            raise ValueError(f"compressed-tensors weight type {w.get('type')!r} is not supported (int only)")
        strategy = w.get("strategy") or ("group" if (w.get("group_size") or 0) > 0 else "channel")
        if strategy not in ("group", "channel"):
            raise ValueError(f"compressed-tensors strategy {strategy!r} is not supported (group/channel)")
        group_size = w.get("group_size") if strategy == "group" else -1
        scheme = scheme_from_fields(w.get("num_bits", 8), group_size, w.get("symmetric", True))
        actorder = _normalize_actorder(w.get("actorder"))
        meta = qc.get("meta") or {}
        flags = {
            "act_order": actorder is not None,
            "actorder": actorder,
            "static_groups": actorder == "weight",
            "ignore": list(qc.get("ignore") or []),
            "meta": meta,
        }
        return scheme, flags


def _read_zero_point(zp: torch.Tensor, bits: int, out_features: int, groups: int) -> torch.Tensor:
    """Unsigned zeros [N, G] from a packed ``[ceil(N*b/32), G]`` int32 zero point (current) or an unpacked
    ``[N, G]`` integer one holding signed values (compressed-tensors before zero-point packing)."""
    packed_rows = bitpack.packed_length(out_features, bits)
    if zp.dtype == torch.int32 and tuple(zp.shape) == (packed_rows, groups):
        return bitpack.unpack(zp, bits, out_features, dim=0)  # [N*b/32, G] -> [N, G]
    if tuple(zp.shape) == (out_features, groups) and not zp.is_floating_point():
        half = 1 << (bits - 1)
        lo, hi = int(zp.min()), int(zp.max())
        if lo < -half or hi >= half:
            raise ValueError(
                f"unpacked weight_zero_point holds [{lo}, {hi}], outside the signed {bits}-bit range"
            )
        return (zp.to(torch.int16) + half).to(torch.uint8).contiguous()  # signed -> unsigned
    raise ValueError(
        f"compressed-tensors: weight_zero_point has shape {tuple(zp.shape)} ({zp.dtype}), expected packed "
        f"({packed_rows}, {groups}) int32 or unpacked ({out_features}, {groups})"
    )


def _actorder(scheme: QuantScheme, act_order: bool, static_groups: bool) -> str | None:
    """CT ``actorder`` for our options (CT allows "group" only with the group strategy)."""
    if not act_order or scheme.group_size is None:
        return None
    return "group" if stores_permutation(act_order, static_groups) else "weight"


def _normalize_actorder(value: Any) -> str | None:
    if value in (None, False):
        return None
    value = str(value).lower()
    return _ACTORDER_ALIASES.get(value, value)


def _weights_of(name: str, group: Any, qc: dict[str, Any]) -> dict[str, Any] | None:
    """The ``weights`` args of one config group, after checking the group is weight-only pack-quantized."""
    if not isinstance(group, dict):
        raise ValueError(f"compressed-tensors preset config group {name!r} is not supported; expand it")
    fmt = group.get("format") or qc.get("format")
    if fmt != FORMAT:
        raise ValueError(f"compressed-tensors format {fmt!r} is not supported; llmquant reads {FORMAT!r}")
    if group.get("input_activations") or group.get("output_activations"):
        raise ValueError(
            f"compressed-tensors group {name!r} quantizes activations; only weight-only is supported"
        )
    return group.get("weights")
