"""Writing a quantized model: pack its quantized linears in a format, keep every other tensor, write the
directory atomically (:func:`llmquant.io.write_checkpoint`) and verify it by reading it back first."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import CONFIG_FILE, INDEX_FILE, Checkpoint, read_config
from .config import QuantScheme
from .faults import kill_point
from .formats.base import CheckpointFormat, detect_format, get_format, llmquant_version, stores_permutation
from .io import DEFAULT_MAX_SHARD_SIZE, write_checkpoint
from .qtensor import QuantizedWeight

logger = logging.getLogger(__name__)


class CheckpointVerificationError(RuntimeError):
    """A written checkpoint does not read back bit-exactly (nothing was left at the output path)."""


def write_quantized(
    model: nn.Module,
    quantized: dict[str, QuantizedWeight],
    out_dir: str | os.PathLike[str],
    *,
    format: str,
    scheme: QuantScheme,
    act_order: bool = False,
    static_groups: bool = False,
    method: str,
    extra_meta: dict[str, Any] | None = None,
    tokenizer: Any = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    extra_files: dict[str, dict[str, Any]] | None = None,
    finalize: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``model`` with the modules in ``quantized`` packed in ``format``; verify by reading back.

    Tensors: every ``model.state_dict()`` entry except those of quantized modules (their ``bias`` is
    kept) and tied duplicates, plus ``<module>.<suffix>`` for each packed tensor. Files: config.json
    (``model.config`` + ``quantization_config``), generation_config.json, the format's extra files
    (e.g. quantize_config.json), the caller's ``extra_files`` (name -> JSON content), tokenizer files.
    ``act_order``/``static_groups`` are the user's options; whether a g_idx permutation is stored is
    derived from them (``stores_permutation``). The checkpoint is read back before it is moved into
    place: every quantized module must unpack to a bit-identical weight and every other tensor must
    match exactly, otherwise :class:`CheckpointVerificationError` is raised and nothing is left at
    ``out_dir``. ``finalize(tmp_dir)`` runs after a successful verification, before the rename: it may
    add files computed from the written checkpoint (the model card).
    """
    fmt = get_format(format)
    fmt.check_scheme(scheme, act_order=stores_permutation(act_order, static_groups))
    # ``quantized`` may be a lazy mapping (pipeline.QuantizedWeights): read one module at a time so
    # the unpacked codes of the whole model are never in memory at once
    _check_modules(model, quantized)
    plain = _plain_tensors(model, quantized)
    packed = pack_modules(fmt, quantized, scheme, stores_permutation(act_order, static_groups))
    clash = sorted(set(plain) & set(packed))
    if clash:
        raise ValueError(f"packed tensor names clash with model tensors: {clash[:5]}")
    skipped = sorted(
        name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in quantized
    )
    qc = fmt.quantization_config(
        scheme,
        act_order=act_order,
        static_groups=static_groups,
        method=method,
        extra_meta=dict(extra_meta or {}),
        modules_not_converted=skipped,
    )
    qc["meta"]["verified"] = True  # the directory only appears if the read-back check below passes
    config = _model_config_dict(model)
    config["quantization_config"] = qc
    extra = dict(fmt.extra_files(qc))
    generation = _generation_config_dict(model)
    if generation is not None:
        extra["generation_config.json"] = generation
    for name, content in (extra_files or {}).items():
        if name in extra or name == CONFIG_FILE:
            raise ValueError(f"extra file {name!r} clashes with a file save_quantized writes")
        extra[name] = content

    def verify(tmp: Path) -> None:
        verify_written(tmp, fmt, scheme, quantized, plain, set(packed))
        if finalize is not None:
            finalize(tmp)

    metadata = {"llmquant_version": llmquant_version(), "quantization_format": fmt.name}
    with tempfile.TemporaryDirectory() as tok_dir:
        copies = _tokenizer_files(tokenizer, Path(tok_dir), reserved={CONFIG_FILE, *extra})
        return write_checkpoint(
            out_dir,
            {**plain, **packed},
            config=config,
            extra_files=extra,
            copy_files=copies,
            metadata=metadata,
            max_shard_size=max_shard_size,
            verify=verify,
        )


def _check_modules(model: nn.Module, quantized: dict[str, QuantizedWeight]) -> None:
    """Every quantized name is a module of ``model``; an nn.Linear's weight must match the codes' shape."""
    if "lm_head" in quantized:
        raise ValueError(
            "quantized lm_head is not supported by the written configs (lm_head: false); keep it float"
        )
    for name in quantized:
        try:
            module = model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"{name!r} is not a module of the model") from e
        if isinstance(module, nn.Linear) and tuple(module.weight.shape) != quantized[name].shape:
            shape = quantized[name].shape
            raise ValueError(f"{name}: weight shape {tuple(module.weight.shape)} != quantized {shape}")


def _tied_keys(model: nn.Module) -> set[str]:
    """State-dict keys that transformers re-ties at load (``_tied_weights_keys``, list or dict form)."""
    keys = getattr(model, "_tied_weights_keys", None) or ()
    out: set[str] = set(keys)  # dict form: the keys are the tied (dropped) parameters
    for name, module in model.named_modules():
        sub = getattr(module, "_tied_weights_keys", None) or ()
        if module is not model:
            out.update(f"{name}.{k}" for k in sub)
    return out


def _plain_tensors(model: nn.Module, quantized: dict[str, QuantizedWeight]) -> dict[str, torch.Tensor]:
    """Non-quantized state-dict tensors, without quantized modules' entries (bias kept) or tied copies."""
    tied = _tied_keys(model)
    kept: dict[str, torch.Tensor] = {}
    seen: dict[tuple[int, tuple[int, ...], tuple[int, ...], int, torch.dtype], str] = {}
    for key, t in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if module in quantized and leaf != "bias":
            continue
        if not isinstance(t, torch.Tensor):
            logger.debug("skipping non-tensor state entry %s", key)
            continue
        if t.device.type == "meta":
            raise ValueError(f"{key} is on the meta device (offloaded?); materialize the model before saving")
        view = (
            t.untyped_storage().data_ptr(),
            tuple(t.shape),
            tuple(t.stride()),
            t.storage_offset(),
            t.dtype,
        )
        if t.numel() and view in seen:
            first = seen[view]
            drop, keep = (key, first) if key in tied or first not in tied else (first, key)
            logger.info("skipping tied weight %s (same storage as %s)", drop, keep)
            kept.pop(drop, None)
            kept[keep] = t.detach()
            seen[view] = keep
            continue
        seen[view] = key
        kept[key] = t.detach()
    return kept


def pack_modules(
    fmt: CheckpointFormat, quantized: dict[str, QuantizedWeight], scheme: QuantScheme, permuted: bool
) -> dict[str, torch.Tensor]:
    """``<module>.<suffix>`` -> packed tensor for every quantized module (checked against the schema)."""
    from tqdm.auto import tqdm

    out: dict[str, torch.Tensor] = {}
    ragged = []
    names = sorted(quantized)
    for name in tqdm(names, desc=f"packing ({fmt.name})", disable=len(names) < 32, leave=False):
        qw = quantized[name].to("cpu")
        n, k = qw.shape
        if scheme.group_size is not None and k % scheme.group_size:
            ragged.append(name)
        tensors = fmt.pack(qw, scheme=scheme, act_order=permuted)
        schema = fmt.tensor_schema(n, k, scheme, permuted)
        got = {s: (tuple(t.shape), t.dtype) for s, t in tensors.items()}
        if got != schema:
            raise CheckpointVerificationError(
                f"{name}: packed tensors {got} do not match the schema {schema}"
            )
        out.update({f"{name}.{suffix}": t for suffix, t in tensors.items()})
        kill_point("save.packed")
    if ragged:
        logger.warning(
            "%d modules have in_features not divisible by group_size %s (ragged last group), e.g. %s; "
            "vLLM refuses such layers",
            len(ragged),
            scheme.group_size,
            ragged[0],
        )
    return out


def _model_config_dict(model: nn.Module) -> dict[str, Any]:
    """``model.config.to_dict()`` without a stale ``quantization_config`` (empty dict if no config)."""
    cfg = getattr(model, "config", None)
    data = dict(cfg.to_dict()) if cfg is not None else {}
    data.pop("quantization_config", None)
    floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
    if floats:  # the dtype the non-quantized tensors are stored in (config.dtype may be unset)
        data["dtype"] = str(floats[0]).removeprefix("torch.")
    return json.loads(json.dumps(data, default=str))  # dtypes and the like become strings


def _generation_config_dict(model: nn.Module) -> dict[str, Any] | None:
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return None
    data = gen.to_diff_dict() if hasattr(gen, "to_diff_dict") else gen.to_dict()
    return json.loads(json.dumps(data, default=str))


def _tokenizer_files(tokenizer: Any, tmp: Path, reserved: set[str]) -> list[Path]:
    """Save ``tokenizer`` into ``tmp`` and return its top-level files (skipping reserved names)."""
    if tokenizer is None:
        return []
    tokenizer.save_pretrained(str(tmp))
    files = []
    for p in sorted(tmp.iterdir()):
        if not p.is_file():
            logger.warning("tokenizer wrote a non-file entry %s; not copied", p.name)
        elif p.name in reserved or p.name.endswith(".safetensors") or p.name == INDEX_FILE:
            logger.warning("tokenizer file %s clashes with a checkpoint file; not copied", p.name)
        else:
            files.append(p)
    return files


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN-safe)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )


def verify_written(
    path: Path,
    fmt: CheckpointFormat,
    scheme: QuantScheme,
    quantized: dict[str, QuantizedWeight],
    plain: dict[str, torch.Tensor],
    packed_names: set[str],
) -> None:
    """Read ``path`` back: config, index coverage, plain tensors bit-exact, quantized modules identical."""
    qc = read_config(path).get("quantization_config") or {}
    got_fmt, got_scheme, _ = detect_format(qc)
    if got_fmt is not fmt or got_scheme != scheme:
        raise CheckpointVerificationError(
            f"config.json reads back as {got_fmt.name} {got_scheme}, expected {fmt.name} {scheme}"
        )
    with Checkpoint(path) as ckpt:
        expected = set(plain) | packed_names
        if set(ckpt.index) != expected:
            missing, extra = sorted(expected - set(ckpt.index)), sorted(set(ckpt.index) - expected)
            raise CheckpointVerificationError(
                f"index mismatch: missing {missing[:5]}, unexpected {extra[:5]}"
            )
        found = fmt.quantized_module_names(ckpt.index)
        if found != sorted(quantized):
            raise CheckpointVerificationError(
                f"quantized modules read back as {found[:5]}..., expected {sorted(quantized)[:5]}..."
            )
        for name, t in ckpt.read(sorted(plain)).items():
            if not _bit_equal(t, plain[name].cpu()):
                raise CheckpointVerificationError(f"tensor {name} does not read back bit-exactly")
        for name in sorted(quantized):
            _verify_module(ckpt, name, quantized[name].to("cpu"), fmt, scheme, packed_names)
    logger.info("verified %d quantized modules and %d tensors", len(quantized), len(plain))


def _verify_module(
    ckpt: Checkpoint,
    name: str,
    qw: QuantizedWeight,
    fmt: CheckpointFormat,
    scheme: QuantScheme,
    packed_names: set[str],
) -> None:
    """The packed tensors of module ``name`` unpack to exactly ``qw``."""
    tensors = {
        k.rpartition(".")[2]: t
        for k, t in ckpt.read(sorted(k for k in ckpt.keys_of(name) if k in packed_names)).items()
    }
    try:
        back = fmt.unpack(tensors, scheme, *qw.shape)
    except ValueError as e:
        raise CheckpointVerificationError(f"{name}: cannot unpack: {e}") from e
    if not back.equal(qw):
        raise CheckpointVerificationError(f"quantized module {name} does not unpack to the same weight")
