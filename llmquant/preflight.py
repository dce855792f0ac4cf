"""Checks made before any work: the model directory, its config and safetensors headers, the output path,
free disk, and the plan's peak memory.

Everything here reads only small files (config.json, the index, each shard's header), so a 70B checkpoint
is checked in milliseconds. The same headers give a cheap content fingerprint of the checkpoint (for resume)
and the parameter counts behind the disk and memory estimates.

Memory estimate (bytes; ``P`` parameters, ``e`` bytes per stored element, compute in float32 on the CPU):

- runtime: the Python process with torch and transformers imported (``RUNTIME_BYTES``, measured);
- resident model: the tensors outside the decoder layers (embeddings, lm_head) in the stored dtype, plus
  the packed codes of every quantized layer so far (bits/8 per weight + scales/zeros);
- the largest decoder layer: stored copy + compute-dtype copy;
- activation cache: n·seqlen·hidden·4 bytes, ×2 (a layer's inputs and its outputs);
- Hessians: K²·4 bytes per linear input group of a layer (GPTQ, AWQ);
- AWQ block caches: search_samples·seqlen·(3·hidden + intermediate)·4 bytes (captured block inputs/outputs);
- save: the packed tensors once more, plus the whole written checkpoint read back for verification.
The device estimate (CUDA) is the largest layer, the Hessians, the AWQ caches and one batch's activations.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import (
    DTYPE_BYTES,
    TensorInfo,
    read_checkpoint_index,
    read_header,
)
from .errors import (
    InsufficientDiskError,
    InsufficientMemoryError,
    ModelConfigError,
    ModelNotFoundError,
    OptionError,
    OutputExistsError,
    OutputNotWritableError,
    PathNotReadableError,
)

GiB = 2**30
RUNTIME_BYTES = int(
    0.6 * GiB
)  # python + torch + transformers + tokenizers, measured on SmolLM2 (reliability.md)


# ------------------------------------------------------------------------------------------------
# model directory
# ------------------------------------------------------------------------------------------------
def read_model_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """config.json of a model directory; one-line typed errors for a missing, unreadable or invalid one."""
    path = Path(path)
    if not path.exists():
        raise ModelNotFoundError(f"model path {path} does not exist; pass a local Hugging Face checkpoint")
    if not path.is_dir():
        raise ModelNotFoundError(f"model path {path} is not a directory; pass the checkpoint's folder")
    if not os.access(path, os.R_OK | os.X_OK):
        raise PathNotReadableError(f"model directory {path} is not readable (check its permissions)")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise ModelNotFoundError(f"{path} is not a model directory (no config.json)")
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except PermissionError as exc:
        raise PathNotReadableError(f"{cfg} is not readable (check its permissions)") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelConfigError(
            f"{cfg} is not valid JSON ({exc}); restore it from the original model"
        ) from exc
    if not isinstance(data, dict):
        raise ModelConfigError(f"{cfg} must hold a JSON object, got {type(data).__name__}")
    return data


def check_architecture(config: dict[str, Any], path: Path) -> None:
    """UnsupportedArchitectureError (a ModelConfigError) when no ArchSpec covers the model."""
    from types import SimpleNamespace

    from .arch import get_arch

    get_arch(SimpleNamespace(model_type=config.get("model_type")))
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers"):
        if not isinstance(config.get(key), int) or config[key] < 1:
            raise ModelConfigError(
                f"{path}/config.json: {key} must be a positive integer, got {config.get(key)!r}"
            )


def check_seqlen(seqlen: int, config: dict[str, Any], path: Path | str) -> None:
    """OptionError when calibration sequences are longer than the model's context."""
    context = config.get("max_position_embeddings")
    if isinstance(context, int) and seqlen > context:
        raise OptionError(
            f"--seqlen {seqlen} is beyond the model's context ({context} tokens, max_position_embeddings in "
            f"{path}/config.json); use --seqlen {min(context, 2048)} or less"
        )


def content_fingerprint(path: str | os.PathLike[str]) -> str:
    """sha256 over config.json and every shard's name, size and header: changes when the weights are
    replaced (a resume must not mix two checkpoints), costs a few small reads."""
    path = Path(path)
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for file in sorted(set(read_checkpoint_index(path).values())):
        digest.update(f"{file.name}:{file.stat().st_size}:".encode())
        digest.update(json.dumps(read_header(file), sort_keys=True).encode())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------
def check_output(out_dir: str | os.PathLike[str], *, overwrite: bool) -> None:
    """OutputExistsError if ``out_dir`` exists (unless ``overwrite``), OutputNotWritableError if it cannot
    be created there."""
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise OutputExistsError(
            f"output {out} already exists; pass --overwrite (overwrite=True) to replace it, or choose "
            "another -o"
        )
    if out.exists() and not out.is_dir():
        raise OutputNotWritableError(f"output {out} exists and is not a directory")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputNotWritableError(f"cannot write the output {out}: {parent} is not writable")


def check_disk(out_dir: str | os.PathLike[str], needed: int) -> None:
    """InsufficientDiskError if the output's filesystem has less than ``needed`` bytes free."""
    parent = Path(out_dir).absolute().parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise InsufficientDiskError(
            f"not enough free disk for the output: about {needed / GiB:.2f} GiB needed "
            f"(checkpoint + resume state), {free / GiB:.2f} GiB free on {parent}; free space or choose "
            "another -o"
        )


def available_memory() -> int:
    """MemAvailable, capped by a cgroup (v2 or v1) memory limit when one applies."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < avail:
            avail = int(text)
    return avail


def check_memory(estimate: int, available: int | None = None) -> None:
    """InsufficientMemoryError when the host estimate is clearly (>10 %) over the available memory."""
    available = available_memory() if available is None else available
    if estimate > 1.1 * available:
        raise InsufficientMemoryError(
            f"estimated peak host memory {estimate / GiB:.2f} GiB is over the {available / GiB:.2f} GiB "
            "available; lower --n-samples / --seqlen (activation cache) or --search-samples, or use a "
            "bigger machine (llmquant quantize --dry-run prints the breakdown)"
        )


# ------------------------------------------------------------------------------------------------
# the plan and its estimates
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """What a quantize run will hold: parameter counts, shapes and the estimated peaks (bytes)."""

    layers: int
    hidden: int
    intermediate: int
    quantized_params: int  # decoder-layer linear weights
    other_params: int  # everything else (embeddings, norms, lm_head, biases)
    stored_bytes: int  # the float checkpoint's tensors
    largest_layer_bytes: int
    output_bytes: int
    resume_bytes: int
    host: dict[str, int]  # component -> bytes
    device: dict[str, int]

    @property
    def host_peak(self) -> int:
        return sum(self.host.values())

    @property
    def device_peak(self) -> int:
        return sum(self.device.values())


def make_plan(
    config: dict[str, Any],
    tensors: dict[str, TensorInfo],
    method: Any,
    calibration: Any,
    *,
    batch_size: int = 8,
    layers_prefix: str = "model.layers.",
) -> Plan:
    """Estimate output size and peak memory of quantizing the checkpoint described by ``config`` and
    ``tensors`` with ``method`` (a MethodConfig) on ``calibration`` (a CalibrationConfig or None)."""
    from .methods import rounder_config

    hidden, inter, n_layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    scheme = method.scheme
    per_layer: dict[int, int] = {}
    linear_shapes: list[tuple[int, ...]] = []
    q_params = other = 0
    for name, info in tensors.items():
        if name.startswith(layers_prefix):
            i = int(name[len(layers_prefix) :].split(".")[0])
            per_layer[i] = per_layer.get(i, 0) + info.nbytes
        if name.startswith(layers_prefix) and name.endswith("proj.weight") and len(info.shape) == 2:
            q_params += info.numel
            linear_shapes.append(info.shape)
        else:
            other += info.numel
    other_bytes = sum(t.nbytes for n, t in tensors.items() if not n.endswith("proj.weight"))
    group = scheme.group_size or max((s[1] for s in linear_shapes), default=1)
    packed = int(q_params * scheme.bits / 8 + q_params / group * (2 + scheme.bits / 8) * 1.05)
    output = packed + other_bytes
    largest = max(per_layer.values(), default=0)
    calibrated = method.method != "rtn" and calibration is not None
    n, seqlen = (calibration.n_samples, calibration.seqlen) if calibrated else (0, 0)
    acts = n * seqlen * hidden * 4
    resume = int(q_params * 1.1) + acts  # codes as uint8 + scales, and the activation cache
    k_groups = (hidden, hidden, hidden, inter)  # q/k/v, o, gate/up, down inputs (o: heads*head_dim ~ hidden)
    uses_hessians = isinstance(rounder_config(method), _gptq_type()) or method.method.startswith("awq")
    hessians = sum(k * k * 4 for k in k_groups) if calibrated and uses_hessians else 0
    awq_cache = 0
    if method.method.startswith("awq") and calibrated:
        awq_cache = min(method.search_samples, n) * seqlen * (3 * hidden + inter) * 4
    host = {
        "runtime": RUNTIME_BYTES,
        "outside layers (stored dtype)": sum(
            t.nbytes for n, t in tensors.items() if not n.startswith(layers_prefix)
        ),
        "largest layer (stored + float32)": largest + largest * 4 // max(_elt(tensors), 1),
        "quantized layers (packed)": packed,
        "activation cache (x2)": 2 * acts,
        "Hessians": hessians,
        "AWQ block caches": awq_cache,
        "save (packed tensors + the checkpoint read back)": packed + output,
    }
    batch = min(batch_size, n) * seqlen * max(hidden, inter) * 4 * 4 if calibrated else 0
    device = {
        "largest layer": largest * 2,
        "Hessians": hessians,
        "AWQ block caches": awq_cache,
        "batch": batch,
    }
    return Plan(
        n_layers, hidden, inter, q_params, other, sum(t.nbytes for t in tensors.values()), largest,
        output, resume, host, device,
    )  # fmt: skip


def _gptq_type() -> type:
    from .config import GPTQConfig

    return GPTQConfig


def _elt(tensors: dict[str, TensorInfo]) -> int:
    """Bytes per element of the checkpoint's float weights (the most common float dtype)."""
    for info in tensors.values():
        if info.dtype in ("F16", "BF16", "F32", "F64"):
            return DTYPE_BYTES[info.dtype]
    return 2
