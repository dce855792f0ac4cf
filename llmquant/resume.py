"""Per-layer resume checkpoints for the pipeline.

Layout of a checkpoint directory (``<out>.partial`` by default):
- ``state.json``: {"fingerprint": ..., "layers_done": i}. Written last, atomically: a layer counts as
  done only when its files are complete.
- ``layer-00012.safetensors``: codes/scales/zeros/g_idx of every linear of layer 12, plus its log, and
  (``float.<name>``) every float tensor of the layer that a transform may have changed (AWQ's folded
  norms and biases), which a resumed run puts back instead of the streamed originals.
- ``activations-00013.safetensors``: the calibration activations leaving the last finished layer (layer
  13's inputs), exactly as the uninterrupted run had them, so a resumed run is bit-identical. Named by
  the layer they feed, so a kill between writing them and ``state.json`` leaves the files ``state.json``
  names intact (the previous layer's activations are deleted only after ``state.json`` moved on).

Every file is written to ``NAME.tmp`` and renamed, so ``kill -9`` at any moment leaves either the previous
state or the next one. The directory is deleted ``state.json`` first (:func:`drop_resume_dir`): a directory
whose deletion was interrupted holds no progress, never a ``state.json`` naming deleted files.

The fingerprint covers the model (path and a hash of its config and safetensors headers), the calibration
data, the method config, batch size / compute dtype and the llmquant version, each part hashed on its own:
a mismatch is refused with a ``ResumeMismatchError`` naming the parts that differ (``--no-resume`` starts
over), never silently discarded or mixed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import ResumeMismatchError, ResumeStateError
from .faults import kill_point
from .layer import LayerResult, ModuleLog
from .qtensor import QuantizedWeight

logger = logging.getLogger(__name__)


def fingerprint(*parts: object) -> str:
    """sha256 over the JSON of ``parts`` (configs, data fingerprints, versions)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _atomic_save(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _activations_file(directory: Path, layer: int) -> Path:
    return directory / f"activations-{layer:05d}.safetensors"


def drop_resume_dir(directory: Path) -> None:
    """Delete a resume directory, ``state.json`` first (an interrupted deletion leaves no progress)."""
    (directory / "state.json").unlink(missing_ok=True)
    kill_point("save.resume_dropped")
    shutil.rmtree(directory, ignore_errors=True)


def read_fingerprint(directory: Path) -> str | None:
    """The run fingerprint ``directory/state.json`` records (None without a readable state)."""
    fp = _read_state(directory / "state.json").get("fingerprint")
    return fp if isinstance(fp, str) else None


def recorded_batch_size(directory: Path) -> int | None:
    """The batch size the run whose state ``directory`` holds used (None without a readable state)."""
    run = _read_state(directory / "state.json").get("run")
    batch = run.get("batch_size") if isinstance(run, dict) else None
    return batch if isinstance(batch, int) and not isinstance(batch, bool) and batch > 0 else None


def _read_state(state_file: Path) -> dict:
    """state.json, or {} when it is unreadable (a resume directory from a crashed write): never resumed."""
    try:
        state = json.loads(state_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return state if isinstance(state, dict) and isinstance(state.get("layers_done"), int) else {}


class ResumeState:
    """Reads and writes one pipeline run's resume directory."""

    def __init__(
        self, directory: Path | None, parts: dict[str, object], record: dict[str, object] | None = None
    ) -> None:
        """``parts``: what the run depends on (name -> JSON-able value); each is fingerprinted on its own
        so a mismatch names the part that differs. ``record``: plain values state.json keeps for a
        rerun to read (the batch size the memory fit chose, which a resumed run must keep)."""
        self.parts = {name: fingerprint(value) for name, value in parts.items()}
        self.record = dict(record or {})
        self.dir, self.fp, self.layers_done = directory, fingerprint(self.parts), 0
        if directory is None:
            return
        state_file = directory / "state.json"
        if state_file.is_file():
            state = _read_state(state_file)
            if state.get("fingerprint") != self.fp:
                raise ResumeMismatchError(
                    f"{directory} holds a different run's resume state ({self._difference(state)} differs); "
                    "rerun with the same inputs to resume it, or pass --no-resume (resume=False) to start "
                    "over"
                )
            self.layers_done = int(state["layers_done"])
            logger.info("resuming from %s: %d layers already done", directory, self.layers_done)
        directory.mkdir(parents=True, exist_ok=True)

    def _difference(self, state: dict) -> str:
        saved = state.get("parts")
        if not isinstance(saved, dict):
            return "the llmquant version that wrote it"
        diff = [name for name, fp in self.parts.items() if saved.get(name) != fp]
        return ", ".join(diff) or "its fingerprint"

    def save_layer(
        self,
        index: int,
        result: LayerResult,
        activations: list[torch.Tensor] | None,
        float_state: dict[str, torch.Tensor] | None = None,
        float_activations: list[torch.Tensor] | None = None,
    ) -> None:
        """Checkpoint finished layer ``index``: its weights and logs, the changed float tensors, and
        the activations leaving it (and the float model's, ``float_activations``, when carried)."""
        if self.dir is None:
            return
        tensors: dict[str, torch.Tensor] = {f"float.{n}": t for n, t in (float_state or {}).items()}
        logs = {}
        for name, (qw, log) in result.items():
            tensors.update(
                {f"{name}.codes": qw.codes, f"{name}.scales": qw.scales, f"{name}.zeros": qw.zeros}
            )
            if qw.g_idx is not None:
                tensors[f"{name}.g_idx"] = qw.g_idx
            logs[name] = {**log.__dict__, "bits": qw.bits, "group_size": qw.group_size}
        _atomic_save(tensors, self.dir / f"layer-{index:05d}.safetensors", {"logs": json.dumps(logs)})
        kill_point("resume.layer")
        if activations is not None:
            batches = {f"batch_{j}": a for j, a in enumerate(activations)}
            batches |= {f"float_batch_{j}": a for j, a in enumerate(float_activations or [])}
            _atomic_save(batches, _activations_file(self.dir, index + 1))
            kill_point("resume.activations")
        tmp = self.dir / "state.json.tmp"
        state = {"fingerprint": self.fp, "layers_done": index + 1, "parts": self.parts, "run": self.record}
        tmp.write_text(json.dumps(state, sort_keys=True))
        os.replace(tmp, self.dir / "state.json")
        kill_point("resume.state")
        _activations_file(self.dir, index).unlink(missing_ok=True)  # no longer named by state.json

    def load_layer(self, index: int) -> tuple[LayerResult, dict[str, torch.Tensor]]:
        """The layer's quantized weights + logs, and its saved float tensors (name -> tensor)."""
        assert self.dir is not None
        path = self.dir / f"layer-{index:05d}.safetensors"
        try:
            tensors = load_file(str(path))
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                logs = json.loads(f.metadata()["logs"])
            out: LayerResult = {}
            for name, log in logs.items():
                bits, group_size = log.pop("bits"), log.pop("group_size")
                qw = QuantizedWeight(
                    codes=tensors[f"{name}.codes"],
                    scales=tensors[f"{name}.scales"],
                    zeros=tensors[f"{name}.zeros"],
                    bits=bits,
                    group_size=group_size,
                    g_idx=tensors.get(f"{name}.g_idx"),
                )
                if "loss" in log:  # resume states written before the field was named for what it holds
                    log["hessian_error"] = log.pop("loss")
                out[name] = (qw, ModuleLog(**log))
        except Exception as exc:  # missing file, SafetensorError, bad metadata: the state is damaged
            raise self._damaged(path, exc) from exc
        float_state = {k[len("float.") :]: v for k, v in tensors.items() if k.startswith("float.")}
        return out, float_state

    def load_activations(
        self, into: list[torch.Tensor], float_into: list[torch.Tensor] | None = None
    ) -> None:
        """Copy the activations leaving the last finished layer into ``into`` (the activation cache's
        buffers, one per batch), one batch at a time; the float stream's into ``float_into``."""
        assert self.dir is not None
        path = _activations_file(self.dir, self.layers_done)
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                names = list(f.keys())
                saved = sum(1 for k in names if k.startswith("batch_"))
                if saved != len(into):
                    raise ValueError(f"{saved} batches saved, {len(into)} expected")
                for j, buffer in enumerate(into):
                    buffer.copy_(f.get_tensor(f"batch_{j}"))
                for j, buffer in enumerate(float_into or []):
                    buffer.copy_(f.get_tensor(f"float_batch_{j}"))
        except Exception as exc:  # missing file, SafetensorError, a missing or misshapen batch
            raise self._damaged(path, exc) from exc

    def _damaged(self, path: Path, exc: Exception) -> ResumeStateError:
        reason = "is missing" if isinstance(exc, FileNotFoundError) else f"cannot be read ({exc})"
        return ResumeStateError(
            f"resume file {path} {reason}; {self.dir} is damaged: pass --no-resume (resume=False) to start "
            "over"
        )
