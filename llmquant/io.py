"""Checkpoint I/O: sharded safetensors + HF index + JSON configs, written atomically and verified.

Atomicity: everything is written into a temporary directory ``<out_dir>.tmp-<random>`` beside the
target (same filesystem), optionally checked by a ``verify`` callback, and only then renamed into
place. An existing ``out_dir`` is swapped with it in one step (Linux ``renameat2(RENAME_EXCHANGE)``) and
then deleted, so ``out_dir`` always holds a complete checkpoint, the old one or the new one; where the
exchange is not supported, ``out_dir`` is renamed aside to ``<out_dir>.old-<random>`` first (for the
instant between the two renames there is no ``out_dir``). Any failure before the swap removes the
temporary directory and leaves ``out_dir`` untouched. A writer killed outright (``kill -9``, power loss)
leaves its temporary directory behind: the next write to the same ``out_dir`` deletes such leftovers
(each live writer holds an ``flock`` on its temporary directory, so only a dead writer's are taken), and
puts back an ``.old-`` directory whose swap was cut short.

Reading lives in :mod:`llmquant.checkpoint`; writing a quantized model (pack, verify) in
:mod:`llmquant.save`.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .checkpoint import CONFIG_FILE, INDEX_FILE, SINGLE_FILE
from .faults import kill_point

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_SIZE = 4 * 2**30


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------
def write_checkpoint(
    out_dir: str | os.PathLike[str],
    tensors: dict[str, torch.Tensor],
    *,
    config: dict[str, Any],
    extra_files: dict[str, dict[str, Any]] | None = None,
    copy_files: Iterable[str | os.PathLike[str]] = (),
    metadata: dict[str, str] | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    verify: Callable[[Path], None] | None = None,
) -> Path:
    """Write tensors (sharded safetensors), config.json, extra JSON files and copies, atomically.

    ``verify(tmp_dir)`` runs on the complete temporary directory; if it raises, the temporary directory
    is removed, ``out_dir`` is unchanged and the exception propagates. Tensors that share storage are
    rejected (dedupe tied weights first). Returns the final ``out_dir``.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a directory")
    extra_files = dict(extra_files or {})
    copy_files = [Path(p) for p in copy_files]
    _check_file_names(extra_files, copy_files)
    tensors = _prepare_tensors(tensors)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_writes(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.tmp-", dir=out_dir.parent))
    lock = _lock(tmp)  # held until this write ends: marks ``tmp`` as a live writer's
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700: give it a normal directory's mode
        _write_shards(tmp, tensors, {"format": "pt", **(metadata or {})}, max_shard_size)
        _write_json(tmp / CONFIG_FILE, config)
        for name, content in extra_files.items():
            _write_json(tmp / name, content)
        for src in copy_files:
            shutil.copy2(src, tmp / src.name)
        if verify is not None:
            verify(tmp)
        kill_point("save.verified")
        _follow_umask_(tmp)
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(lock)
    logger.info("wrote checkpoint %s (%d tensors)", out_dir, len(tensors))
    return out_dir


def _lock(directory: Path) -> int:
    """An open descriptor of ``directory`` holding an exclusive ``flock`` (released when closed or when
    the process dies)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def remove_stale_writes(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Delete what writers of ``out_dir`` killed outright left beside it: ``<name>.tmp-XXXXXXXX``
    directories no live process holds locked, and put back (or delete, when ``out_dir`` exists) an
    ``<name>.old-XXXXXXXX`` directory a cut-short swap left. Returns the paths removed or restored."""
    out_dir = Path(out_dir).absolute()
    pattern = re.compile(re.escape(out_dir.name) + r"\.(tmp|old)-[a-z0-9_]{8}")
    try:
        entries = sorted(out_dir.parent.iterdir())
    except OSError:
        return []
    done = []
    for path in entries:
        match = pattern.fullmatch(path.name)
        if match is None or path.is_symlink() or not path.is_dir():
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a live writer's
            os.close(fd)
            continue
        if match.group(1) == "old" and not out_dir.exists():
            os.rename(path, out_dir)
            logger.warning("restored %s from %s (a write was interrupted mid-swap)", out_dir, path.name)
        else:
            shutil.rmtree(path, ignore_errors=True)
            logger.info("removed %s, left by an interrupted write", path)
        os.close(fd)
        done.append(path)
    return done


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _follow_umask_(directory: Path) -> None:
    """Give every file of ``directory`` the mode a plain ``open()`` would (0666 minus the umask): some
    writers (mkstemp, copies of a 0600 temp file) create 0600 files another user's server cannot read."""
    mode = 0o666 & ~_umask()
    for p in directory.iterdir():
        if p.is_file() and not p.is_symlink():
            p.chmod(mode)


def _check_file_names(extra_files: dict[str, dict[str, Any]], copy_files: list[Path]) -> None:
    """Extra/copied files must be plain names that do not clash with each other or our own files."""
    reserved = {CONFIG_FILE, SINGLE_FILE, INDEX_FILE}
    seen: set[str] = set()
    for name in [*extra_files, *(p.name for p in copy_files)]:
        if Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"extra file name must be a plain file name, got {name!r}")
        if name in reserved or name in seen or (name.startswith("model-") and name.endswith(".safetensors")):
            raise ValueError(f"file name {name!r} clashes with another file of the checkpoint")
        seen.add(name)
    for p in copy_files:
        if not p.is_file():
            raise ValueError(f"file to copy does not exist or is not a file: {p}")


def _prepare_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors; ValueError if two of them share storage (tied weights, views)."""
    owners: dict[tuple[str, int], str] = {}
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.device.type == "meta":
            raise ValueError(f"{name} is on the meta device (not materialized); load it before saving")
        storage = t.untyped_storage()
        if storage.nbytes() > 0:
            key = (str(t.device), storage.data_ptr())
            if key in owners:
                raise ValueError(
                    f"tensors {owners[key]!r} and {name!r} share memory; keep one of them "
                    "(dedupe tied weights) or .clone() it before saving"
                )
            owners[key] = name
        out[name] = t.detach().to("cpu").contiguous()
    return out


def _plan_shards(tensors: dict[str, torch.Tensor], max_shard_size: int) -> list[list[str]]:
    """Greedy HF-style sharding in insertion order; a tensor larger than the limit gets its own shard."""
    if max_shard_size < 1:
        raise ValueError(f"max_shard_size must be positive, got {max_shard_size}")
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_shards(
    tmp: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str], max_shard_size: int
) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json."""
    bad = {k: v for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise ValueError(f"safetensors metadata must map str -> str, got {bad}")
    shards = _plan_shards(tensors, max_shard_size)
    if len(shards) == 1:
        _save(tmp / SINGLE_FILE, {k: tensors[k] for k in shards[0]}, metadata)
        return
    weight_map: dict[str, str] = {}
    for i, names in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _save(tmp / fname, {k: tensors[k] for k in names}, metadata)
        weight_map.update(dict.fromkeys(names, fname))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})
    logger.info("sharded %d tensors into %d files", len(tensors), len(shards))


def _save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    save_file(tensors, str(path), metadata=metadata)
    _canonical_header_(path)
    _fsync(path)
    kill_point("save.shard")


def _canonical_header_(path: Path) -> None:
    """Rewrite a safetensors header with its ``__metadata__`` keys sorted (in place, same length).

    safetensors keeps metadata in a hash map whose iteration order varies between calls, so the same
    tensors and metadata could give different bytes; sorted keys make every checkpoint reproducible
    byte for byte (resumed runs included). Tensor entries are already written in a fixed order."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw)
        meta = header.get("__metadata__")
        if not meta:
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        ordered = {"__metadata__": header.pop("__metadata__"), **header}
        out = json.dumps(ordered, separators=(",", ":")).encode()
        if len(out) > n:  # never expected: same content; keep the library's bytes rather than corrupt
            return
        f.seek(8)
        f.write(out + b" " * (n - len(out)))


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _fsync(path)
    kill_point("save.json")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``; an existing ``out_dir`` is exchanged with it in one step (where the
    filesystem allows, else moved aside first) and then deleted."""
    previous: Path | None = None
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        _fsync_dir(out_dir.parent)
    elif _exchange(tmp, out_dir):
        previous = tmp
    else:
        previous = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.old-", dir=out_dir.parent))
        os.rmdir(previous)
        os.rename(out_dir, previous)
        try:
            os.rename(tmp, out_dir)
        except BaseException:
            os.rename(previous, out_dir)
            raise
    kill_point("save.swapped")
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` atomically (``renameat2(RENAME_EXCHANGE)``); False where the
    platform or filesystem does not support it."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        _fsync_dir(b.parent)
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
