"""On-disk checkpoint formats: the abstract base and the registry.

A :class:`CheckpointFormat` turns one :class:`~llmquant.qtensor.QuantizedWeight` into the exact tensors
another tool expects (``pack``), reads them back (``unpack``), declares their shapes and dtypes
(``tensor_schema``) and writes the ``config.json`` ``quantization_config`` that makes vLLM /
transformers / GPTQModel pick the right loader. Specs: ``reference/features.md`` section (b).

Meaning of ``act_order`` in ``check_scheme`` / ``tensor_schema`` / ``pack``: the checkpoint carries an
act-order *permutation* (a non-trivial ``g_idx``), i.e. act-order without static groups. Act-order with
``static_groups`` leaves ``g_idx`` trivial and is storable by every format; use
:func:`stores_permutation` to derive the flag from the two user options.
``quantization_config`` receives both user options unchanged.
"""

from __future__ import annotations

import abc
import importlib
import importlib.metadata
import logging
from collections.abc import Iterable
from typing import Any, ClassVar

import torch

from ..config import SUPPORTED_BITS, QuantScheme
from ..qtensor import QuantizedWeight, trivial_g_idx

logger = logging.getLogger(__name__)

TensorSchema = dict[str, tuple[tuple[int, ...], torch.dtype]]

_REGISTRY: dict[str, CheckpointFormat] = {}
_BUILTIN_MODULES = ("gptq", "awq", "compressed_tensors")


def llmquant_version() -> str:
    """Installed llmquant version (``0+unknown`` when not installed)."""
    try:
        return importlib.metadata.version("llmquant")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def stores_permutation(act_order: bool, static_groups: bool) -> bool:
    """Whether a checkpoint must carry a non-trivial ``g_idx`` (act-order without static groups)."""
    return bool(act_order and not static_groups)


class CheckpointFormat(abc.ABC):
    """One on-disk layout. Subclasses set the class attributes and implement the abstract methods."""

    name: ClassVar[str]
    quant_method: ClassVar[str]
    supported_bits: ClassVar[tuple[int, ...]] = SUPPORTED_BITS
    marker_suffix: ClassVar[str]  # the tensor whose presence marks a quantized module
    allows_ragged_groups: ClassVar[bool] = True  # K need not be a multiple of the group size

    # -- validation -------------------------------------------------------------------------------
    def check_scheme(self, scheme: QuantScheme, *, act_order: bool = False) -> None:
        """Raise ``ValueError`` (with a one-line fix) if this format cannot store ``scheme``."""
        if scheme.bits not in self.supported_bits:
            raise ValueError(
                f"format {self.name!r} supports bits {list(self.supported_bits)}, got {scheme.bits}; "
                f"use --bits {self.supported_bits[0]} or another --format"
            )

    def check_weight(self, qw: QuantizedWeight, scheme: QuantScheme | None) -> QuantScheme:
        """Scheme of ``qw`` (``scheme`` if given, after checking it matches), validated for this format."""
        if scheme is None:
            mid = 1 << (qw.bits - 1)
            scheme = QuantScheme(qw.bits, qw.group_size, sym=bool((qw.zeros == mid).all()))
        elif (scheme.bits, scheme.group_size) != (qw.bits, qw.group_size):
            raise ValueError(
                f"QuantizedWeight has bits={qw.bits}, group_size={qw.group_size} but the scheme says "
                f"bits={scheme.bits}, group_size={scheme.group_size}"
            )
        elif scheme.sym and not bool((qw.zeros == (1 << (qw.bits - 1))).all()):
            raise ValueError(f"scheme is symmetric but zeros are not all {1 << (qw.bits - 1)}")
        self.check_storable(scheme, act_order=not qw.has_trivial_g_idx())
        return scheme

    def check_storable(self, scheme: QuantScheme, *, act_order: bool) -> None:
        """Data-level check used by ``pack`` (default: ``check_scheme``); formats may relax it."""
        self.check_scheme(scheme, act_order=act_order)

    # -- tensors ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def tensor_schema(
        self, out_features: int, in_features: int, scheme: QuantScheme, act_order: bool
    ) -> TensorSchema:
        """Suffix -> (shape, dtype) of every tensor ``pack`` writes for one linear."""

    @abc.abstractmethod
    def pack(
        self, qw: QuantizedWeight, *, scheme: QuantScheme | None = None, act_order: bool | None = None
    ) -> dict[str, torch.Tensor]:
        """Suffix -> tensor, exactly per the spec. ``act_order`` None: ``qw`` has a non-trivial g_idx."""

    @abc.abstractmethod
    def unpack(
        self, tensors: dict[str, torch.Tensor], scheme: QuantScheme, out_features: int, in_features: int
    ) -> QuantizedWeight:
        """Inverse of ``pack`` (also reads the same format written by other tools)."""

    @abc.abstractmethod
    def stored_shape(self, tensors: dict[str, torch.Tensor], scheme: QuantScheme) -> tuple[int, int]:
        """(out_features, in_features) of one linear, read from its stored tensors alone (KeyError or
        IndexError when a tensor it needs is missing or misshapen)."""

    # -- config -----------------------------------------------------------------------------------
    @abc.abstractmethod
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
        """The ``config.json`` ``quantization_config`` for a checkpoint quantized with ``scheme``."""

    @abc.abstractmethod
    def parse_config(self, quantization_config: dict[str, Any]) -> tuple[QuantScheme, dict[str, Any]]:
        """(scheme, flags) from a ``quantization_config`` this format claims (see ``resolve``)."""

    @classmethod
    def resolve(cls, quantization_config: dict[str, Any]) -> str:
        """Name of the registered format that reads this config (same ``quant_method``) or ValueError."""
        return cls.name

    def engine_notes(self, scheme: QuantScheme, *, act_order: bool = False) -> list[str]:
        """One line per serving engine that cannot run (or needs an option for) this format + scheme,
        naming what does run there; measured with ``scripts/check_clients.py`` (docs/clients.md)."""
        return []

    def extra_files(self, quantization_config: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Additional JSON files to write beside config.json (file name -> content)."""
        return {}

    def quantized_module_names(self, keys: Iterable[str]) -> list[str]:
        """Sorted module names that carry ``<module>.<marker_suffix>`` among tensor names ``keys``."""
        suffix = "." + self.marker_suffix
        return sorted({k[: -len(suffix)] for k in keys if k.endswith(suffix)})

    # -- helpers for subclasses ---------------------------------------------------------------------
    def check_shapes(
        self, tensors: dict[str, torch.Tensor], schema: TensorSchema, optional: Iterable[str] = ()
    ) -> None:
        """ValueError naming the first tensor whose shape differs from ``schema`` (or is missing)."""
        optional = set(optional)
        for suffix, (shape, _dtype) in schema.items():
            if suffix not in tensors:
                if suffix in optional:
                    continue
                raise ValueError(f"{self.name}: missing tensor {suffix!r} (have {sorted(tensors)})")
            if tuple(tensors[suffix].shape) != shape:
                raise ValueError(
                    f"{self.name}: tensor {suffix!r} has shape {tuple(tensors[suffix].shape)}, "
                    f"expected {shape}"
                )

    def __repr__(self) -> str:
        return f"<CheckpointFormat {self.name!r}>"


def _normalize(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def register_format(cls: type[CheckpointFormat]) -> type[CheckpointFormat]:
    """Class decorator: register one instance of ``cls`` under ``cls.name``."""
    key = _normalize(cls.name)
    if key in _REGISTRY and type(_REGISTRY[key]) is not cls:
        raise ValueError(f"format {cls.name!r} is already registered by {type(_REGISTRY[key]).__name__}")
    _REGISTRY[key] = cls()
    return cls


def _ensure_builtin() -> None:
    for mod in _BUILTIN_MODULES:
        importlib.import_module(f"{__package__}.{mod}")


def list_formats() -> list[str]:
    """Names of every registered format."""
    _ensure_builtin()
    return sorted(f.name for f in _REGISTRY.values())


def get_format(name: str) -> CheckpointFormat:
    """The registered format called ``name`` (case-insensitive; ``_`` and ``-`` interchangeable)."""
    _ensure_builtin()
    fmt = _REGISTRY.get(_normalize(name))
    if fmt is None:
        raise ValueError(f"unknown checkpoint format {name!r}; known: {list_formats()}")
    return fmt


def detect_format(
    quantization_config: dict[str, Any],
) -> tuple[CheckpointFormat, QuantScheme, dict[str, Any]]:
    """Format, scheme and flags (act_order, static_groups, ...) of a config.json quantization_config.

    Reads configs written by llmquant, AutoGPTQ, GPTQModel, optimum/transformers, AutoAWQ and
    llm-compressor; raises ``ValueError`` naming what is unsupported otherwise.
    """
    from ..errors import CheckpointError

    _ensure_builtin()
    if not isinstance(quantization_config, dict):
        raise CheckpointError(f"quantization_config must be a dict, got {type(quantization_config).__name__}")
    method = str(quantization_config.get("quant_method", "")).lower()
    candidates = [f for f in _REGISTRY.values() if f.quant_method == method]
    if not candidates:
        known = sorted({f.quant_method for f in _REGISTRY.values()})
        raise CheckpointError(
            f"unsupported quant_method {quantization_config.get('quant_method')!r}; llmquant reads {known}"
        )
    try:
        fmt = get_format(candidates[0].resolve(quantization_config))
        scheme, flags = fmt.parse_config(quantization_config)
    except CheckpointError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise CheckpointError(f"invalid {method} quantization_config: {reason}") from exc
    logger.debug("detected format %s, scheme %s, flags %s", fmt.name, scheme, flags)
    return fmt, scheme, flags


def unpack_module(
    fmt: CheckpointFormat, tensors: dict[str, Any], scheme: QuantScheme, n: int, k: int, where: str
) -> Any:
    """``fmt.unpack`` with a CheckpointError naming the module and file (``where``) when the stored
    tensors are missing, misshapen or hold impossible values."""
    from ..errors import CheckpointError

    try:
        return fmt.unpack(tensors, scheme, n, k)
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise CheckpointError(f"{where}: cannot unpack ({reason}); the checkpoint is corrupted") from exc


def group_size_to_config(scheme: QuantScheme) -> int:
    """Our ``None`` (per-channel) -> the ``-1`` that GPTQ/AWQ configs use."""
    return -1 if scheme.group_size is None else scheme.group_size


def group_size_from_config(value: Any) -> int | None:
    """``-1``/None/0 -> per-channel (None), else a positive int."""
    if value is None or int(value) in (-1, 0):
        return None
    return int(value)


def scheme_from_fields(bits: Any, group_size: Any, sym: Any) -> QuantScheme:
    """QuantScheme from raw config values with a clear error for unsupported ones."""
    try:
        return QuantScheme(int(bits), group_size_from_config(group_size), bool(sym))
    except (TypeError, ValueError) as e:
        raise ValueError(f"unsupported quantization parameters: {e}") from e


def read_g_idx(g_idx: torch.Tensor | None, in_features: int, scheme: QuantScheme) -> torch.Tensor | None:
    """int32 g_idx if it is a real permutation-derived index, None if absent or trivial."""
    if g_idx is None:
        return None
    g_idx = g_idx.to(torch.int32).contiguous()
    n_groups = scheme.num_groups(in_features)
    if int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups:
        lo, hi = int(g_idx.min()), int(g_idx.max())
        raise ValueError(f"g_idx values must lie in [0, {n_groups}), got [{lo}, {hi}]")
    if torch.equal(g_idx, trivial_g_idx(in_features, scheme.group_size, device=g_idx.device)):
        return None
    return g_idx
