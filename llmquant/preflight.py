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
- activation cache: n·seqlen·hidden·e bytes (e: the compute dtype's), held once (a layer's outputs
  overwrite its inputs batch by batch); none in memory when it is offloaded to a file in OUT.partial;
- Hessians: K²·4 bytes per linear input group of a layer (GPTQ, AWQ);
- AWQ block caches: search_samples·seqlen·(3·hidden + intermediate)·e bytes (captured block inputs/outputs);
- one batch's forward: batch·seqlen·max(hidden, intermediate)·e·4 bytes;
- save: the packed tensors once more, plus the kept (not quantized) tensors read back at once for the
  verification (the packed modules are read back one at a time).
Hessians, AWQ caches and the batch are on the compute device: host memory on the CPU, else the device
estimate (CUDA: those plus twice the largest layer). When the estimate is over the available memory,
``fit_memory`` adapts the plan (smaller batches, then the activation cache on disk) before refusing.
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
# python + torch + transformers + tokenizer: 0.50-0.52 GiB measured (walk peaks less the model's terms,
# on SmolLM2 and a 1.1B random LLaMA; docs/reliability.md)
RUNTIME_BYTES = int(0.55 * GiB)


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
    if not parent.is_dir():
        raise OutputNotWritableError(f"cannot write the output {out}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
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


MMAP_THRESHOLD = 128 * 2**10
_M_MMAP_THRESHOLD = -3  # malloc.h


def return_freed_memory() -> bool:
    """Make glibc serve every allocation over ``MMAP_THRESHOLD`` with its own mmap, returned to the
    system when freed (process-wide; the CLI calls it first). glibc's default raises that threshold
    after the first large free, so torch's many short-lived tensors (packing, per-layer temporaries)
    come from the heap, where the long-lived ones between them keep the freed space from being given
    back: measured on SmolLM2, packing 55 MiB of tensors grew RSS by 480 MiB (57 MiB with this), and the
    estimate below would not hold. False where the C library is not glibc."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


HOST_SLACK = 1.1  # the host estimate may exceed the available memory by 10 % (it is an upper bound)


def available_device_memory(device: str) -> int | None:
    """Free memory of a CUDA ``device`` (None for the CPU)."""
    if not device.startswith("cuda"):
        return None
    import torch

    return int(torch.cuda.mem_get_info(torch.device(device))[0])


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
    device: dict[str, int]  # component -> bytes (empty when computing on the CPU)
    batch_size: int = 8
    offload_activations: bool = False

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
    device: str = "cpu",
    offload_activations: bool = False,
) -> Plan:
    """Estimate output size and peak memory of quantizing the checkpoint described by ``config`` and
    ``tensors`` with ``method`` (a MethodConfig) on ``calibration`` (a CalibrationConfig or None),
    computing on ``device`` in batches of ``batch_size``, the activation cache in memory or
    (``offload_activations``) in a file mapped from the resume directory."""
    hidden, inter, n_layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    shapes = _shapes(tensors, layers_prefix)
    q_params = sum(shape[0] * shape[1] for shape in shapes["linears"])
    other_bytes = sum(t.nbytes for n, t in tensors.items() if not n.endswith("proj.weight"))
    group = method.scheme.group_size or max((s[1] for s in shapes["linears"]), default=1)
    bits = method.scheme.bits
    packed = int(q_params * bits / 8 + q_params / group * (2 + bits / 8) * 1.05)
    output = packed + other_bytes
    largest = max(shapes["layers"].values(), default=0)
    from .methods import make_plan as make_layer_plan  # the per-layer plan, not this memory plan

    layer_plan = make_layer_plan(method)
    calibrated = layer_plan.needs_calibration and calibration is not None
    n, seqlen = (calibration.n_samples, calibration.seqlen) if calibrated else (0, 0)
    on_cpu = not device.startswith("cuda")
    elt = 4 if on_cpu else _elt(tensors)  # the compute dtype: float32 on the CPU, else the stored one
    acts = n * seqlen * hidden * elt
    work = _working_memory(method, calibrated, hidden, inter, n, seqlen, min(batch_size, n), elt)
    outside = sum(t.nbytes for n_, t in tensors.items() if not n_.startswith(layers_prefix))
    host = {
        "runtime": RUNTIME_BYTES,
        "outside layers (stored dtype)": outside,
        "largest layer (stored + float32)": largest + largest * 4 // max(_elt(tensors), 1),
        "quantized layers (packed)": packed,
        "activation cache": 0 if offload_activations else acts,
        **_stream_terms(layer_plan, acts, offload_activations),
        **(work if on_cpu else {}),
        "save (packed tensors + kept tensors read back)": packed + other_bytes,
    }
    device_terms = {} if on_cpu else {"largest layer": largest * 2, **work}
    resume = int(q_params * 1.1) + acts * (2 if offload_activations else 1)  # codes + scales, activations
    return Plan(
        n_layers, hidden, inter, q_params, sum(t.numel for t in tensors.values()) - q_params,
        sum(t.nbytes for t in tensors.values()), largest, output, resume, host, device_terms,
        batch_size, offload_activations,
    )  # fmt: skip


def _stream_terms(layer_plan: Any, acts: int, offload: bool) -> dict[str, int]:
    """The float model's activation cache (error propagation, refinement) and refinement's copies of
    one stream's inputs and the float targets, when the plan needs them."""
    terms = {}
    if layer_plan.needs_float_stream:
        terms["float activation cache"] = 0 if offload else acts
    if layer_plan.refiner is not None:
        terms["refinement inputs + targets"] = 2 * acts
    return terms


def _shapes(tensors: dict[str, TensorInfo], layers_prefix: str) -> dict[str, Any]:
    """Bytes per decoder layer (index -> bytes) and the shapes of the decoder linears' weights."""
    per_layer: dict[int, int] = {}
    linears: list[tuple[int, ...]] = []
    for name, info in tensors.items():
        if name.startswith(layers_prefix):
            i = int(name[len(layers_prefix) :].split(".")[0])
            per_layer[i] = per_layer.get(i, 0) + info.nbytes
            if name.endswith("proj.weight") and len(info.shape) == 2:
                linears.append(info.shape)
    return {"layers": per_layer, "linears": linears}


def _working_memory(
    method: Any, calibrated: bool, hidden: int, inter: int, n: int, seqlen: int, batch: int, elt: int
) -> dict[str, int]:
    """What a calibrated layer step holds where it computes: the Hessians (K^2 * 4 bytes per linear input
    group; GPTQ, AWQ), AWQ's captured block inputs/outputs, and one batch's forward (the MLP's
    intermediate activations dominate)."""
    from .methods import rounder_config

    if not calibrated:
        return {}
    k_groups = (hidden, hidden, hidden, inter)  # q/k/v, o, gate/up, down inputs (o: heads*head_dim ~ hidden)
    uses_hessians = isinstance(rounder_config(method), _gptq_type()) or method.method.startswith("awq")
    awq = method.method.startswith("awq")
    return {
        "Hessians": sum(k * k * 4 for k in k_groups) if uses_hessians else 0,
        "AWQ block caches": min(method.search_samples, n) * seqlen * (3 * hidden + inter) * elt if awq else 0,
        f"one batch of {batch} forward": batch * seqlen * max(hidden, inter) * elt * 4,
    }


@dataclass(frozen=True)
class MemoryFit:
    """The plan that will run: the one asked for, or the first adaptation whose estimate fits."""

    plan: Plan
    changes: tuple[str, ...]  # what was adapted, e.g. "batch size 8 -> 2"
    host_available: int
    device_available: int | None

    @property
    def fits(self) -> bool:
        host_ok = self.plan.host_peak <= HOST_SLACK * self.host_available
        return host_ok and (self.device_available is None or self.plan.device_peak <= self.device_available)

    def note(self, asked: Plan) -> str:
        """One line: what did not fit, what was changed, the estimate now."""
        over = [
            f"peak {where} memory {peak / GiB:.2f} GiB over the {avail / GiB:.2f} GiB available"
            for where, peak, avail, slack in (
                ("host", asked.host_peak, self.host_available, HOST_SLACK),
                ("device", asked.device_peak, self.device_available, 1.0),
            )
            if avail is not None and peak > slack * avail
        ]
        now = f"host {self.plan.host_peak / GiB:.2f} GiB"
        if self.device_available is not None:
            now += f", device {self.plan.device_peak / GiB:.2f} GiB"
        return f"estimated {' and '.join(over)}: adapting ({', '.join(self.changes)}); estimate now {now}"

    def refuse(self) -> None:
        """InsufficientMemoryError with the numbers, when even the last adaptation does not fit."""
        if self.fits:
            return
        tried = f" even with {', '.join(self.changes)}" if self.changes else ""
        where, peak, avail = ("host", self.plan.host_peak, self.host_available)
        if self.plan.host_peak <= HOST_SLACK * self.host_available:
            where, peak, avail = ("device", self.plan.device_peak, self.device_available or 0)
        raise InsufficientMemoryError(
            f"estimated peak {where} memory {peak / GiB:.2f} GiB is over the {avail / GiB:.2f} GiB "
            f"available{tried}; lower --n-samples / --seqlen (activation cache) or --search-samples, or "
            "use a bigger machine (llmquant quantize --dry-run prints the breakdown)"
        )


def fit_memory(
    build: Any,
    batch_sizes: list[int],
    host_available: int,
    device_available: int | None,
    *,
    can_offload: bool,
) -> MemoryFit:
    """The first plan ``build(batch_size, offload_activations)`` whose estimate fits: as asked
    (``batch_sizes[0]``, in memory), then each smaller batch size, then the activation cache on disk
    with each batch size. Nothing fits: the last one tried (``MemoryFit.refuse`` raises)."""
    asked = batch_sizes[0]
    fit = None
    for offload in (False, True) if can_offload else (False,):
        for batch in batch_sizes:
            changes = [f"batch size {asked} -> {batch}"] if batch != asked else []
            if offload:
                changes.append("activation cache on disk in OUT.partial")
            fit = MemoryFit(build(batch, offload), tuple(changes), host_available, device_available)
            if fit.fits:
                return fit
    assert fit is not None
    return fit


def halvings(batch_size: int) -> list[int]:
    """``batch_size``, then halved down to 1: 8 -> [8, 4, 2, 1]."""
    out = [batch_size]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return out


def _gptq_type() -> type:
    from .config import GPTQConfig

    return GPTQConfig


def _elt(tensors: dict[str, TensorInfo]) -> int:
    """Bytes per element of the checkpoint's float weights (the most common float dtype)."""
    for info in tensors.values():
        if info.dtype in ("F16", "BF16", "F32", "F64"):
            return DTYPE_BYTES[info.dtype]
    return 2
