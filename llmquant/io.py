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

Reading is lazy: :func:`load_tensors` opens shards with ``safetensors.safe_open`` and reads only the
requested tensors, so callers can stream one layer at a time.
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
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import QuantScheme
from .errors import CheckpointError, ModelConfigError, ModelNotFoundError
from .faults import kill_point
from .formats.base import CheckpointFormat, detect_format, get_format, llmquant_version, stores_permutation
from .qtensor import QuantizedWeight

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
DEFAULT_MAX_SHARD_SIZE = 4 * 2**30


class MissingTensorError(CheckpointError, KeyError):
    """A tensor the caller asked for is not in the checkpoint (a KeyError too, for older callers)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointVerificationError(RuntimeError):
    """A written checkpoint does not read back bit-exactly (nothing was left at the output path)."""


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


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
def read_checkpoint_index(path: str | os.PathLike[str]) -> dict[str, Path]:
    """Tensor name -> shard file, for a checkpoint dir, an index json, or a single .safetensors file.

    In a directory: ``model.safetensors.index.json`` if present, else ``model.safetensors``, else the
    one ``*.safetensors.index.json`` or all ``*.safetensors`` files (e.g. AutoGPTQ's
    ``gptq_model-4bit-128g.safetensors``).
    """
    path = Path(path)
    if path.is_file():
        return _index_from_json(path) if path.name.endswith(".json") else _keys_of([path])
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if (path / INDEX_FILE).is_file():
        return _index_from_json(path / INDEX_FILE)
    if (path / SINGLE_FILE).is_file():
        return _keys_of([path / SINGLE_FILE])
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return _index_from_json(indexes[0])
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path}")
    return _keys_of(files)


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


def _open(file: Path, device: str = "cpu"):
    """``safe_open`` with a CheckpointError naming the file when it is corrupted or truncated (the header
    is validated first: the library's own errors do not name the file or the tensor)."""
    from .preflight import read_header

    read_header(file)
    try:
        return safe_open(str(file), framework="pt", device=device)
    except Exception as exc:  # SafetensorError is not exported as a stable type
        raise CheckpointError(f"{file}: cannot open as safetensors ({exc})") from exc


def _keys_of(files: list[Path]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for f in files:
        with _open(f) as handle:
            for name in handle.keys():  # noqa: SIM118  (safe_open is not a mapping)
                if name in out:
                    raise ValueError(f"tensor {name!r} occurs in both {out[name]} and {f}")
                out[name] = f
    return out


def load_tensors(
    path: str | os.PathLike[str], names: Iterable[str] | None = None, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Read the tensors ``names`` (all if None) lazily, opening each needed shard once."""
    index = read_checkpoint_index(path)
    wanted = list(index) if names is None else list(names)
    missing = [n for n in wanted if n not in index]
    if missing:
        raise MissingTensorError(
            f"tensors not in checkpoint {path}: {missing[:10]}{' ...' if len(missing) > 10 else ''}"
        )
    by_file: dict[Path, list[str]] = {}
    for n in wanted:
        by_file.setdefault(index[n], []).append(n)
    out: dict[str, torch.Tensor] = {}
    for f, file_names in by_file.items():
        with _open(f, str(device)) as handle:
            for n in file_names:
                try:
                    out[n] = handle.get_tensor(n)
                except Exception as exc:  # SafetensorError, e.g. a tensor missing from its shard
                    raise CheckpointError(f"{f}: cannot read tensor {n!r} ({exc})") from exc
    return {n: out[n] for n in wanted}


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
# quantized models
# ------------------------------------------------------------------------------------------------
def save_quantized(
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
    packed = _pack_all(fmt, quantized, scheme, stores_permutation(act_order, static_groups))
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
        _verify_checkpoint(tmp, fmt, scheme, quantized, plain, set(packed))
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


def _pack_all(
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


def _verify_checkpoint(
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
    index = read_checkpoint_index(path)
    expected = set(plain) | packed_names
    if set(index) != expected:
        missing, extra = sorted(expected - set(index)), sorted(set(index) - expected)
        raise CheckpointVerificationError(f"index mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
    found = fmt.quantized_module_names(index)
    if found != sorted(quantized):
        raise CheckpointVerificationError(
            f"quantized modules read back as {found[:5]}..., expected {sorted(quantized)[:5]}..."
        )
    for name, t in load_tensors(path, sorted(plain)).items():
        if not _bit_equal(t, plain[name].cpu()):
            raise CheckpointVerificationError(f"tensor {name} does not read back bit-exactly")
    for name in sorted(quantized):
        qw = quantized[name].to("cpu")
        prefix = f"{name}."
        names = sorted(k for k in packed_names if k.startswith(prefix) and "." not in k[len(prefix) :])
        tensors = {k[len(prefix) :]: v for k, v in load_tensors(path, names).items()}
        try:
            back = fmt.unpack(tensors, scheme, *qw.shape)
        except ValueError as e:
            raise CheckpointVerificationError(f"{name}: cannot unpack: {e}") from e
        if not back.equal(qw):
            raise CheckpointVerificationError(f"quantized module {name} does not unpack to the same weight")
    logger.info("verified %d quantized modules and %d tensors", len(quantized), len(plain))
