"""Reading what a quantized checkpoint holds without loading the model: the shapes of its model's
linears (from config.json, on a meta skeleton) and a fresh verification of every quantized module
(``llmquant inspect``, ``push``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .checkpoint import Checkpoint, read_config
from .errors import CheckpointError
from .formats import detect_format
from .formats.base import unpack_module


def linear_shapes(path: str | os.PathLike[str]) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of every nn.Linear of the checkpoint's model, from its config.json
    (the skeleton is built on the meta device; no weights are read)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    return {
        n: (m.out_features, m.in_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    }


def quantized_shapes(path: Path, names: list[str]) -> tuple[dict[str, tuple[int, int]], list[str]]:
    """(shapes of the quantized linears ``names``, the model's other linears) of checkpoint ``path``."""
    linears = linear_shapes(path)
    missing = [n for n in names if n not in linears]
    if missing:
        raise ValueError(f"{path}: quantized modules {missing[:3]} are not linears of the model")
    return {n: linears[n] for n in names}, sorted(set(linears) - set(names))


def inspect_checkpoint(path: str | Path) -> dict[str, Any]:
    """Format, scheme, per-module tensor shapes, and a fresh verification (every module unpacks and
    its tensors match the format's schema)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no config.json)")
    qcfg = read_config(path).get("quantization_config")
    if not qcfg:
        raise ValueError(f"{path} is not quantized (no quantization_config in config.json)")
    fmt, scheme, flags = detect_format(qcfg)
    modules = []
    with Checkpoint(path) as ckpt:
        for name in fmt.quantized_module_names(ckpt.index):
            modules.append(_inspect_module(ckpt, name, fmt, scheme))
    meta = qcfg.get("meta", {}) if isinstance(qcfg.get("meta"), dict) else {}
    return {
        "path": str(path),
        "format": fmt.name,
        "bits": scheme.bits,
        "group_size": scheme.group_size,
        "sym": scheme.sym,
        "flags": json.dumps(flags),
        "quantized_modules": len(modules),
        "verified_at_save": meta.get("verified"),
        "verified_now": True,
        "modules": modules,
    }


def _inspect_module(ckpt, name: str, fmt, scheme) -> dict[str, Any]:
    """One quantized module's shape, groups and stored tensor shapes, after a fresh unpack."""
    tensors = ckpt.module_tensors(name)
    tensors.pop("bias", None)
    where = f"{name} in {ckpt.index[ckpt.keys_of(name)[0]]}"
    try:
        n, k = fmt.stored_shape(tensors, scheme)
    except (KeyError, IndexError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{where}: missing or misshapen tensors ({exc})") from exc
    qw = unpack_module(fmt, tensors, scheme, n, k, where)
    return {
        "name": name,
        "shape": [n, k],
        "groups": qw.num_groups,
        "tensors": {s: list(t.shape) for s, t in tensors.items()},
    }
