"""Reading checkpoints: one :class:`Checkpoint` object per safetensors checkpoint.

A checkpoint is a directory (``model.safetensors.index.json``, else ``model.safetensors``, else the one
``*.safetensors.index.json`` or all ``*.safetensors`` files, e.g. AutoGPTQ's
``gptq_model-4bit-128g.safetensors``), an index json, or a single ``.safetensors`` file. The index
(tensor name -> shard) is parsed once; each shard's header is validated and the shard opened once, on
first use, and tensors are read lazily by name, so callers can stream one layer (or one module) at a
time. Corrupted or truncated files raise :class:`~llmquant.errors.CheckpointError` naming the file and
the tensor.
"""

from __future__ import annotations

import functools
import json
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .errors import CheckpointError, ModelConfigError, ModelNotFoundError, PathNotReadableError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
MAX_HEADER_BYTES = 100 * 2**20  # the safetensors library's own limit
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip


class MissingTensorError(CheckpointError, KeyError):
    """A tensor the caller asked for is not in the checkpoint (a KeyError too, for older callers)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class Checkpoint:
    """The tensors of one checkpoint, by name: the index parsed once, each shard opened once.

    ``with Checkpoint(path) as ckpt: ckpt.read(names)``; outside a ``with`` block the shards stay open
    until :meth:`close` (or garbage collection).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._handles: dict[tuple[Path, str], Any] = {}
        self.index: dict[str, Path] = self._read_index()
        self._by_module: dict[str, list[str]] | None = None

    # -- the index ------------------------------------------------------------------------------------
    def _read_index(self) -> dict[str, Path]:
        path = self.path
        if path.is_file():
            return _index_from_json(path) if path.name.endswith(".json") else self._keys_of([path])
        if not path.is_dir():
            raise FileNotFoundError(f"no checkpoint at {path}")
        if (path / INDEX_FILE).is_file():
            return _index_from_json(path / INDEX_FILE)
        if (path / SINGLE_FILE).is_file():
            return self._keys_of([path / SINGLE_FILE])
        indexes = sorted(path.glob("*.safetensors.index.json"))
        if len(indexes) == 1:
            return _index_from_json(indexes[0])
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors files in {path}")
        return self._keys_of(files)

    def _keys_of(self, files: list[Path]) -> dict[str, Path]:
        out: dict[str, Path] = {}
        for f in files:
            for name in self._handle(f).keys():  # noqa: SIM118  (safe_open is not a mapping)
                if name in out:
                    raise ValueError(f"tensor {name!r} occurs in both {out[name]} and {f}")
                out[name] = f
        return out

    @property
    def names(self) -> list[str]:
        """Every tensor name, in index order."""
        return list(self.index)

    @property
    def files(self) -> list[Path]:
        """The shard files, sorted."""
        return sorted(set(self.index.values()))

    def __contains__(self, name: object) -> bool:
        return name in self.index

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def keys_of(self, module: str) -> list[str]:
        """Tensor names directly under ``module`` (``<module>.<leaf>``), in index order."""
        if self._by_module is None:
            self._by_module = defaultdict(list)
            for key in self.index:
                self._by_module[key.rpartition(".")[0]].append(key)
        return list(self._by_module.get(module, ()))

    # -- tensors ----------------------------------------------------------------------------------------
    def _handle(self, file: Path, device: str = "cpu") -> Any:
        key = (file, device)
        if key not in self._handles:
            read_header(file)  # the library's own errors name neither the file nor the tensor
            try:
                self._handles[key] = safe_open(str(file), framework="pt", device=device)
            except Exception as exc:  # SafetensorError is not exported as a stable type
                raise CheckpointError(f"{file}: cannot open as safetensors ({exc})") from exc
        return self._handles[key]

    def read(
        self, names: Iterable[str] | None = None, device: str | torch.device = "cpu"
    ) -> dict[str, torch.Tensor]:
        """The tensors ``names`` (all if None), in the order asked."""
        wanted = list(self.index) if names is None else list(names)
        missing = [n for n in wanted if n not in self.index]
        if missing:
            raise MissingTensorError(
                f"tensors not in checkpoint {self.path}: {missing[:10]}{' ...' if len(missing) > 10 else ''}"
            )
        out: dict[str, torch.Tensor] = {}
        for n in wanted:
            file = self.index[n]
            handle = self._handle(file, str(device))
            try:
                out[n] = handle.get_tensor(n)
            except Exception as exc:  # SafetensorError, e.g. a tensor missing from its shard
                raise CheckpointError(f"{file}: cannot read tensor {n!r} ({exc})") from exc
        return out

    def module_tensors(self, module: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """``leaf -> tensor`` for the tensors directly under ``module`` (``qweight``, ``scales``, ...)."""
        return {k.rpartition(".")[2]: t for k, t in self.read(self.keys_of(module), device).items()}

    def config(self) -> dict[str, Any]:
        """config.json beside the tensors."""
        return read_config(self.path if self.path.is_dir() else self.path.parent)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _index_from_json(index_file: Path) -> dict[str, Path]:
    try:
        data = json.loads(index_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{index_file} is not valid JSON ({exc}); the index is corrupted") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and Path(v).name == v for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{index_file} has no valid weight_map (tensor name -> shard file name)")
    out = {name: index_file.parent / fname for name, fname in weight_map.items()}
    missing = sorted({str(p) for p in out.values() if not p.is_file()})
    if missing:
        raise FileNotFoundError(f"{index_file} names missing shard files: {missing}")
    return out


def read_checkpoint_index(path: str | os.PathLike[str]) -> dict[str, Path]:
    """Tensor name -> shard file (see the module docstring for what ``path`` may be)."""
    with Checkpoint(path) as ckpt:
        return dict(ckpt.index)


def load_tensors(
    path: str | os.PathLike[str], names: Iterable[str] | None = None, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """One-off read of the tensors ``names`` (all if None); use :class:`Checkpoint` for repeated reads."""
    with Checkpoint(path) as ckpt:
        return ckpt.read(names, device)


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """config.json of a checkpoint directory (or the JSON file itself)."""
    path = Path(path)
    cfg = path / CONFIG_FILE if path.is_dir() else path
    if not cfg.is_file():
        raise ModelNotFoundError(f"{cfg.parent} is not a checkpoint directory (no config.json)")
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelConfigError(f"{cfg} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelConfigError(f"{cfg} must hold a JSON object, got {type(data).__name__}")
    return data


# ------------------------------------------------------------------------------------------------
# headers only (preflight checks, fingerprints, memory estimates)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    file: Path

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES.get(self.dtype, 4)


def read_header(file: Path) -> dict[str, Any]:
    """A safetensors file's JSON header, validated against the file size (CheckpointError names the file
    and tensor when it is corrupted or the file is truncated). Cached per (file, size, mtime)."""
    try:
        st = Path(file).stat()
    except FileNotFoundError as exc:
        raise CheckpointError(f"shard {file} is missing") from exc
    return _read_header(Path(file), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _read_header(file: Path, size: int, _mtime_ns: int) -> dict[str, Any]:
    try:
        with file.open("rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(f"{file} is not a safetensors file or is truncated (header length {n})")
            raw = f.read(n)
    except PermissionError as exc:
        raise PathNotReadableError(f"{file} is not readable (check its permissions)") from exc
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: corrupted safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupted safetensors header (not a JSON object)")
    data_len = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        _check_entry(file, name, entry, data_len)
    return header


def _check_entry(file: Path, name: str, entry: Any, data_len: int) -> None:
    ok = (
        isinstance(entry, dict)
        and entry.get("dtype") in DTYPE_BYTES
        and isinstance(entry.get("shape"), list)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry["shape"])
        and isinstance(entry.get("data_offsets"), list)
        and len(entry["data_offsets"]) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in entry["data_offsets"])
    )
    if not ok:
        raise CheckpointError(f"{file}: tensor {name!r} has a corrupted header entry")
    start, end = entry["data_offsets"]
    info = TensorInfo(entry["dtype"], tuple(entry["shape"]), file)
    if not 0 <= start <= end or end - start != info.nbytes:
        raise CheckpointError(f"{file}: tensor {name!r} has inconsistent data offsets (corrupted header)")
    if end > data_len:
        raise CheckpointError(
            f"{file} is truncated: tensor {name!r} ends at byte {end} of {data_len}; download it again"
        )


def checkpoint_tensors(path: str | os.PathLike[str]) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint directory (name -> dtype, shape, file), from the headers only."""
    index = read_checkpoint_index(path)
    out: dict[str, TensorInfo] = {}
    for file in sorted(set(index.values())):
        for name, entry in read_header(file).items():
            if name != "__metadata__":
                out[name] = TensorInfo(entry["dtype"], tuple(entry["shape"]), file)
    return out
