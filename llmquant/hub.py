"""Publishing: the model card of a checkpoint directory, measured evaluations in it, and ``push``.

Card files. Every llmquant checkpoint carries ``README.md``, rendered by :mod:`llmquant.card` from
facts this module reads out of the directory itself (:func:`card_facts`): the ``quantization_config``
(scheme, format, ``meta`` with the method config, the calibration fingerprint and the base model),
``quant_log.json``, ``eval_results.json`` (what ``llmquant eval --update-card`` measured) and the
safetensors sizes. So the card can be rendered again at any time with the same truth: ``eval
--update-card`` and ``push`` do (a card without :data:`~llmquant.card.CARD_MARKER`, i.e. one the user
wrote, is never overwritten). Files are replaced atomically (temporary file + rename).

Push. :func:`push_checkpoint` refuses a folder that is not a verified llmquant checkpoint or whose
verification fails now (``inspection.inspect_checkpoint`` re-verifies), then creates the repository if
missing and uploads every file of the folder in ONE commit through ``HfApi.create_commit``.
(``upload_folder`` is not used: with ``hf_xet`` installed it splits large folders into several
commits.) Large files go through the hub's content-addressed storage (Xet, or LFS without
``hf_xet``), so a push interrupted during the upload re-sends only what the hub does not have yet when
it is run again, and the commit appears only once every file is stored. The token comes from
``HF_TOKEN`` or the login cache (``huggingface_hub.get_token``) and is never logged, printed or
written; the endpoint from ``HF_ENDPOINT`` (read when pushing, not at import).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from . import card
from .checkpoint import read_checkpoint_index, read_config
from .formats import detect_format
from .formats.base import llmquant_version

logger = logging.getLogger(__name__)

CARD_FILE = "README.md"
EVAL_FILE = "eval_results.json"
LOG_FILE = "quant_log.json"


class HubError(ValueError):
    """A push that cannot start or did not complete (one line; the CLI exits 2)."""


# ------------------------------------------------------------------------------------------------
# base model
# ------------------------------------------------------------------------------------------------
def describe_base(source: str | os.PathLike[str] | None, base_model: str | None = None) -> dict[str, Any]:
    """What the card says about the float model: hub id, the name the user gave, license, size.

    ``source`` is the float checkpoint's directory or hub id; ``base_model`` (``--base-model``)
    overrides the hub id. A local directory gives its safetensors size and, when its README.md has a
    YAML header, its ``license``; a hub id is taken as the base model's id.
    """
    if base_model is not None and not card.is_repo_id(base_model):
        raise ValueError(f"--base-model must be a hub model id like 'owner/name', got {base_model!r}")
    info: dict[str, Any] = {"base_model": base_model, "source": None, "license": None, "bytes": None}
    if source is None:
        return info
    path = Path(source)
    if path.is_dir():
        info["source"] = path.name
        files = sorted(path.glob("*.safetensors"))
        info["bytes"] = sum(f.stat().st_size for f in files) or None
        info["license"] = _license_of(path)
    else:
        info["source"] = str(source)
        if info["base_model"] is None and card.is_repo_id(str(source)):
            info["base_model"] = str(source)
    return info


def _license_of(model_dir: Path) -> str | None:
    """``license`` from the YAML header of the model's README.md, if it has one."""
    readme = model_dir / CARD_FILE
    if not readme.is_file():
        return None
    try:
        header, _ = card.split_front_matter(readme.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        logger.warning("could not read the license from %s: %s", readme, exc)
        return None
    value = header.get("license")
    return str(value) if isinstance(value, str) else None


# ------------------------------------------------------------------------------------------------
# card facts and files
# ------------------------------------------------------------------------------------------------
def card_facts(path: str | os.PathLike[str], *, name: str | None = None, repo_id: str | None = None):
    """The facts :func:`llmquant.card.render_card` needs, read from checkpoint directory ``path``.

    ``name`` is the checkpoint's folder name (default: ``path``'s); ``repo_id`` the repository it is
    published as, which the load snippets then use.
    """
    from .inspection import quantized_shapes

    path = Path(path)
    qc = read_config(path).get("quantization_config") or {}
    fmt, scheme, flags = detect_format(qc)
    meta = qc.get("meta") if isinstance(qc.get("meta"), dict) else {}
    base = meta.get("base") or {}
    qnames = fmt.quantized_module_names(read_checkpoint_index(path))
    shapes, _ = quantized_shapes(path, qnames)
    name = name or path.name
    return {
        "name": repo_id.split("/")[-1] if repo_id else name,
        "model_ref": repo_id or name,
        "on_hub": repo_id is not None,
        "base_model": base.get("base_model"),
        "source": base.get("source"),
        "license": base.get("license"),
        "format": fmt.name,
        "bits": scheme.bits,
        "group_size": scheme.group_size,
        "sym": scheme.sym,
        "permuted": bool(flags.get("act_order")) and not flags.get("static_groups"),
        "ragged": scheme.group_size is not None and any(k % scheme.group_size for _, k in shapes.values()),
        "quantized_modules": len(qnames),
        "method": meta.get("method", "unknown"),
        "method_config": meta.get("method_config"),
        "calibration": meta.get("calibration"),
        "tool_version": _tool_version(meta),
        "bytes_before": base.get("bytes"),
        "bytes_after": sum(f.stat().st_size for f in path.glob("*.safetensors")),
        "converted_from": meta.get("converted_from"),
        "modules": _read_json(path / LOG_FILE, {}).get("modules"),
        "evaluations": _read_json(path / EVAL_FILE, {}).get("evaluations", []),
    }


def _tool_version(meta: dict[str, Any]) -> str | None:
    for entry in meta.get("quantizer") or []:
        tool, _, version = str(entry).partition(":")
        if tool == "llmquant":
            return version
    return None


def _read_json(path: Path, default: dict[str, Any]) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else default


def write_card(
    path: str | os.PathLike[str], *, name: str | None = None, repo_id: str | None = None, force: bool = True
) -> bool:
    """Render the card of checkpoint ``path`` into its README.md (atomically); returns whether it did.

    With ``force=False`` an existing README.md that llmquant did not generate is left alone.
    """
    path = Path(path)
    readme = path / CARD_FILE
    if not force and readme.is_file() and card.CARD_MARKER not in readme.read_text(encoding="utf-8"):
        logger.info("%s was not written by llmquant; leaving it unchanged", readme)
        return False
    text = card.render_card(card_facts(path, name=name, repo_id=repo_id))
    _atomic_write(readme, text)
    return True


def card_writer(name: str, repo_id: str | None = None) -> Callable[[Path], None]:
    """A ``finalize`` callback for the checkpoint writers: renders the card in the temporary directory
    (after the read-back verification, before the directory is renamed into place)."""

    def finalize(tmp: Path) -> None:
        write_card(tmp, name=name, repo_id=repo_id)

    return finalize


def record_evaluation(
    path: str | os.PathLike[str],
    result: dict[str, Any],
    *,
    text: str | os.PathLike[str],
    command: str,
    base: str | None = None,
) -> dict[str, Any]:
    """Add an ``evaluate_checkpoint`` result (and the command that produced it) to ``eval_results.json``
    and re-render the card; returns the stored evaluation."""
    path, text = Path(path), Path(text)
    if not read_config(path).get("quantization_config"):
        raise ValueError(f"{path} is not a quantized checkpoint; --update-card needs one")
    evaluation = {
        "text": text.name,
        "text_sha256": _sha256(text),
        "perplexity": result["perplexity"],
        "n_windows": result["n_windows"],
        "n_tokens": result["n_tokens"],
        "seqlen": result["seqlen"],
        "command": command,
        "llmquant_version": llmquant_version(),
    }
    if result.get("base_perplexity") is not None:
        evaluation["base"] = base
        evaluation["base_perplexity"] = result["base_perplexity"]
        evaluation["kl_divergence"] = result.get("kl_divergence")
    stored = _read_json(path / EVAL_FILE, {}).get("evaluations", [])
    merged = card.merge_evaluation(stored, evaluation)
    _atomic_write(path / EVAL_FILE, json.dumps({"evaluations": merged}, indent=2, sort_keys=True) + "\n")
    write_card(path, force=False)
    return evaluation


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, fsync it, and rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; give it a normal file's mode
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------------
# push
# ------------------------------------------------------------------------------------------------
def push_checkpoint(
    path: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> dict[str, Any]:
    """Upload checkpoint ``path`` to model repository ``repo_id`` in one commit; returns the commit's
    url, oid, revision and the files sent. Raises :class:`HubError` (a ValueError) on any failure."""
    from huggingface_hub import HfApi, constants, get_token

    path = Path(path)
    check_repo_id(repo_id)
    if revision is not None and not revision.strip():
        raise HubError("--revision must be a branch name")
    check_pushable(path)
    token = token or get_token()
    if not token:
        raise HubError("no hub token: set HF_TOKEN or log in with `hf auth login`")
    readme = path / CARD_FILE
    old_card = readme.read_text(encoding="utf-8") if readme.is_file() else None
    write_card(path, repo_id=repo_id, force=False)  # the load snippets name the repository
    files = _folder_files(path)
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT, token=token)
    message = commit_message or f"Upload {path.name} ({len(files)} files, llmquant {llmquant_version()})"
    try:
        commit = _create_and_commit(api, repo_id, files, private, revision, message)
    except Exception as exc:
        if old_card is not None:  # the folder's card names the repository only once it holds the files
            _atomic_write(readme, old_card)
        raise _hub_error(exc, repo_id) from None
    logger.info("pushed %d files to %s in commit %s", len(files), repo_id, commit.oid)
    return {
        "repo_id": repo_id,
        "revision": revision or "main",
        "commit_url": str(commit.commit_url),
        "commit_oid": commit.oid,
        "files": [rel for rel, _ in files],
    }


def check_pushable(path: Path) -> dict[str, Any]:
    """The fresh ``inspect`` of ``path``; ValueError unless llmquant verified it at save time and it
    verifies again now."""
    from .inspection import inspect_checkpoint

    try:
        info = inspect_checkpoint(path)
    except (ValueError, KeyError, OSError) as exc:
        raise HubError(f"refusing to push {path}: it does not verify as a checkpoint ({exc})") from None
    if info.get("verified_at_save") is not True:
        raise HubError(
            f"refusing to push {path}: it was not written and verified by llmquant "
            "(run `llmquant convert` on it first)"
        )
    return info


def check_repo_id(repo_id: str) -> None:
    """HubError unless ``repo_id`` is a valid ``owner/name`` model repository id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise HubError(f"invalid repository id {repo_id!r}: {str(exc).splitlines()[0]}") from None
    if "/" not in repo_id:
        raise HubError(f"invalid repository id {repo_id!r}: give it as owner/name")


def _folder_files(path: Path) -> list[tuple[str, Path]]:
    """(path in repo, local file) for every regular file under ``path``, hidden ones excepted."""
    out = []
    for file in sorted(path.rglob("*")):
        rel = file.relative_to(path)
        if file.is_file() and not any(part.startswith(".") for part in rel.parts):
            out.append((rel.as_posix(), file))
    return out


def _create_and_commit(api, repo_id: str, files, private: bool, revision: str | None, message: str):
    from huggingface_hub import CommitOperationAdd

    api.create_repo(repo_id, repo_type="model", private=True if private else None, exist_ok=True)
    if revision is not None and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(file)) for rel, file in files]
    return api.create_commit(repo_id, operations, commit_message=message, revision=revision)


def _hub_error(exc: Exception, repo_id: str) -> HubError:
    """One line for a failed hub call (the token is in no exception message we build or keep)."""
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, HfHubHTTPError) and status in (401, 403):
        why = "the token was rejected (401)" if status == 401 else "the token may not write there (403)"
        return HubError(f"push to {repo_id} refused: {why}; nothing was committed")
    if isinstance(exc, RepositoryNotFoundError):
        return HubError(f"push to {repo_id} failed: no such repository or not writable; nothing committed")
    if isinstance(exc, HfHubHTTPError):
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return HubError(f"push to {repo_id} failed (HTTP {status}): {first}; nothing was committed")
    if _is_network_error(exc):
        why = f"the hub is unreachable ({type(exc).__name__})"
        return HubError(f"push to {repo_id} failed: {why}; nothing was committed")
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return HubError(f"push to {repo_id} failed: {first}; nothing was committed")


def _is_network_error(exc: BaseException) -> bool:
    """Connection refused / DNS / timeout, whichever HTTP library huggingface_hub uses."""
    while exc is not None:
        module = type(exc).__module__.split(".")[0]
        if isinstance(exc, (ConnectionError, TimeoutError)) or (
            module.startswith(("httpx", "httpcore", "requests", "urllib3"))
            and any(w in type(exc).__name__ for w in ("Connect", "Timeout", "Network", "Transport"))
        ):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
