"""``convert``: re-pack a quantized checkpoint's integer codes into another format, without re-quantizing.

Every quantized linear is read through its format's ``unpack`` into a :class:`QuantizedWeight` (codes,
fp16 scales, true zeros, g_idx) and written through the target's ``pack``; only the on-disk data and
``config.json`` are used, so checkpoints written by AutoGPTQ, GPTQModel, AutoAWQ or llm-compressor
convert like ours. The target must hold the same weights exactly, otherwise nothing is written and
:class:`ConversionError` names the reason (:func:`refusal`): bits the format cannot store, asym into
GPTQ v1, an act-order g_idx permutation into AWQ (no g_idx), ragged groups or out_features % 8 into
AWQ, scales that are not exactly float16.

Everything else is copied unchanged: non-quantized tensors (embeddings, norms, lm_head, biases) bit
for bit, tokenizer files, generation config, chat template, ``quant_log.json``. The output is written
atomically and verified by reading it back (every module unpacks to the same codes, every other tensor
is bit-identical) before it is moved into place, and it gets a fresh model card.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CONFIG_FILE, Checkpoint, read_config
from .config import QuantScheme
from .errors import CheckpointError, LlmquantError, ModelNotFoundError, OptionError
from .formats import CheckpointFormat, detect_format, get_format
from .formats.base import llmquant_version, unpack_module
from .inspection import quantized_shapes
from .io import DEFAULT_MAX_SHARD_SIZE, write_checkpoint
from .qtensor import QuantizedWeight
from .save import pack_modules, verify_written

logger = logging.getLogger(__name__)

# files copied from the source checkpoint (anything else is reported and left out)
COPIED_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "chat_template.*",
    "generation_config.json",
    "quant_log.json",
    "LICENSE*",
    "NOTICE*",
)
# quantization_config.meta keys that describe the run (carried over); the format's own keys are rewritten
_RUN_META = ("method_config", "calibration", "damp_max_used", "rtn_fallbacks", "base", "damp_percent")
_SCALE_KEYS = ("scales", "weight_scale")


class ConversionError(LlmquantError, ValueError):
    """The target format cannot hold the source's weights exactly (nothing was written)."""


def refusal(
    target: CheckpointFormat,
    scheme: QuantScheme,
    shapes: Mapping[str, tuple[int, int]],
    *,
    permuted: bool,
    inexact_scales: str | None = None,
) -> str | None:
    """Why ``target`` cannot hold these weights exactly, or None if it can (pure)."""
    if scheme.bits not in target.supported_bits:
        held = "/".join(str(b) for b in target.supported_bits)
        return f"{target.name} stores {held}-bit codes, these are {scheme.bits}-bit"
    if inexact_scales:
        return inexact_scales
    try:
        target.check_scheme(scheme, act_order=permuted)
        for n, k in shapes.values():
            target.tensor_schema(n, k, scheme, permuted)
    except ValueError as exc:
        return str(exc).split("; ")[0]
    return None


class _SourceWeights(Mapping[str, QuantizedWeight]):
    """Module name -> QuantizedWeight, unpacked from the source checkpoint on access (one at a time)."""

    def __init__(self, ckpt: Checkpoint, fmt: CheckpointFormat, scheme: QuantScheme, shapes) -> None:
        self.ckpt, self.fmt, self.scheme, self.shapes = ckpt, fmt, scheme, shapes

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The module's packed tensors (its bias is a plain tensor, copied as is)."""
        tensors = self.ckpt.module_tensors(name)
        tensors.pop("bias", None)
        return tensors

    def __getitem__(self, name: str) -> QuantizedWeight:
        where = f"{name} in {self.ckpt.path}"
        return unpack_module(self.fmt, self.tensors(name), self.scheme, *self.shapes[name], where)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def convert_checkpoint(
    src: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    format: str,
    *,
    base_model: str | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``src``'s quantized weights in ``format`` to ``out_dir``; returns a summary.

    Raises :class:`ConversionError` (nothing written) when ``format`` cannot hold them exactly,
    ``OutputExistsError`` when ``out_dir`` exists and not ``overwrite``.
    """
    from .hub import card_writer
    from .preflight import check_disk, check_output

    src, out_dir = Path(src), Path(out_dir)
    if not (src / CONFIG_FILE).is_file():
        raise ModelNotFoundError(f"{src} is not a checkpoint directory (no config.json)")
    if src.resolve() == out_dir.resolve():
        raise OptionError("convert needs a new output directory, not the input one")
    check_output(out_dir, overwrite=overwrite)
    check_disk(out_dir, int(1.1 * sum(f.stat().st_size for f in src.iterdir() if f.is_file())))
    config = read_config(src)
    qc = config.pop("quantization_config", None)
    if not qc:
        raise CheckpointError(f"{src} is not quantized (no quantization_config in config.json)")
    fmt, scheme, flags = detect_format(qc)
    target = get_format(format)
    with Checkpoint(src) as ckpt:
        shapes, not_converted = quantized_shapes(src, fmt.quantized_module_names(ckpt.index))
        weights = _SourceWeights(ckpt, fmt, scheme, shapes)
        permuted = _check_convertible(weights, target, scheme, src, fmt)
        for note in target.engine_notes(scheme, act_order=permuted):
            logger.warning(note)  # where the converted checkpoint will not run as is, and what runs there
        packed = pack_modules(target, weights, scheme, permuted)
        plain = ckpt.read(k for k in ckpt.index if k.rpartition(".")[0] not in shapes or k.endswith(".bias"))
        new_qc = _target_config(target, scheme, qc, flags, fmt, permuted, not_converted, base_model, src)
        config["quantization_config"] = new_qc
        finalize = card_writer(out_dir.name)

        def verify(tmp: Path) -> None:
            verify_written(tmp, target, scheme, weights, plain, set(packed))
            finalize(tmp)

        copies, logs = _files_to_copy(src)
        path = write_checkpoint(
            out_dir,
            {**plain, **packed},
            config=config,
            extra_files=target.extra_files(new_qc) | logs,
            copy_files=copies,
            metadata={"llmquant_version": llmquant_version(), "quantization_format": target.name},
            max_shard_size=max_shard_size,
            verify=verify,
        )
    return {"path": path, "from": fmt.name, "format": target.name, "modules": len(shapes), "scheme": scheme}


def _check_convertible(weights: _SourceWeights, target, scheme, src: Path, fmt) -> bool:
    """Whether a g_idx permutation is stored; ConversionError if ``target`` cannot hold the weights."""
    permuted, inexact = False, None
    for name in weights:
        tensors = weights.tensors(name)
        inexact = inexact or _inexact_scales(name, tensors)
        qw = unpack_module(weights.fmt, tensors, scheme, *weights.shapes[name], f"{name} in {src}")
        permuted = permuted or not qw.has_trivial_g_idx()
    why = refusal(target, scheme, weights.shapes, permuted=permuted, inexact_scales=inexact)
    if why is not None:
        grid = "sym" if scheme.sym else "asym"
        what = f"{fmt.name}, w{scheme.bits} g{scheme.group_size or 'channel'} {grid}"
        raise ConversionError(f"cannot convert {src.name} ({what}) to {target.name} exactly: {why}")
    return permuted


def _inexact_scales(name: str, tensors: dict[str, torch.Tensor]) -> str | None:
    """A reason if the stored scales do not survive the float16 every format writes."""
    for key in _SCALE_KEYS:
        t = tensors.get(key)
        if t is not None and t.dtype != torch.float16 and not torch.equal(t.to(torch.float16).to(t.dtype), t):
            dtype = str(t.dtype).removeprefix("torch.")
            return f"{name}.{key} is {dtype} and not exactly representable in float16"
    return None


def _target_config(
    target, scheme, qc, flags, fmt, permuted, not_converted, base_model, src
) -> dict[str, Any]:
    """The target's quantization_config, carrying the run's provenance from the source ``meta``."""
    from .hub import describe_base

    meta = qc.get("meta") if isinstance(qc.get("meta"), dict) else {}
    method = str(meta.get("method") or "unknown")  # other tools do not record it (AWQ's scales are folded)
    extra = {k: meta[k] for k in _RUN_META if k in meta}
    for key in ("true_sequential", "damp_percent"):  # GPTQ run options, kept top-level by GPTQ configs
        if method == "gptq" and flags.get(key) is not None:
            extra[key] = flags[key]
    base = dict(extra.get("base") or describe_base(None))
    if base_model is not None:
        base["base_model"] = describe_base(None, base_model)["base_model"]
    elif not base.get("base_model") and not base.get("source"):
        base["source"] = read_config(src).get("_name_or_path") or None
    extra["base"] = base
    quantizer = ", ".join(str(q) for q in meta.get("quantizer") or []) or None
    extra["converted_from"] = {"format": fmt.name, "quantizer": quantizer}
    act_order = bool(flags.get("act_order")) or permuted
    static_groups = act_order and not permuted
    out = target.quantization_config(
        scheme,
        act_order=act_order,
        static_groups=static_groups,
        method=method,
        extra_meta=extra,
        modules_not_converted=[n for n in not_converted if n != "lm_head"],
    )
    out["meta"]["verified"] = True  # the directory only appears if the read-back check passes
    return out


def _files_to_copy(src: Path) -> tuple[list[Path], dict[str, dict]]:
    """Tokenizer, generation config, chat template, quant log and license files of ``src``; an llmquant
    ``quant_log.json`` is returned as JSON content (second item) without the quantize run's fingerprint
    (which marks that run's own output, see ``api.save_quantized``)."""
    copies, skipped, logs = [], [], {}
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name == CONFIG_FILE or f.name.endswith(".safetensors"):
            continue
        log = _quant_log_without_run(f) if f.name == "quant_log.json" else None
        if log is not None:
            logs[f.name] = log
        elif any(fnmatch.fnmatch(f.name, pattern) for pattern in COPIED_FILES):
            copies.append(f)
        elif not f.name.endswith(".safetensors.index.json"):
            skipped.append(f.name)
    if skipped:
        logger.info("not copied from %s: %s (the output gets its own)", src, ", ".join(skipped))
    return copies, logs


def _quant_log_without_run(path: Path) -> dict | None:
    """``path``'s JSON without ``run_fingerprint`` when it has one (else None: the file is copied)."""
    try:
        log = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(log, dict) or "run_fingerprint" not in log:
        return None
    return {k: v for k, v in log.items() if k != "run_fingerprint"}
