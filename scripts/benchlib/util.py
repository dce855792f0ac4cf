"""Small helpers shared by the benchmark's driver and child: files, JSON, the code version, the machine."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from peers._common import cpu_seconds, current_rss_bytes, dir_bytes, load_average, peak_rss_bytes

REPO = Path(__file__).resolve().parents[2]

__all__ = [
    "REPO",
    "code_version",
    "cpu_seconds",
    "current_rss_bytes",
    "dir_bytes",
    "display",
    "gib",
    "load_average",
    "machine",
    "peak_rss_bytes",
    "sha256_file",
    "write_json",
]


def code_version() -> dict[str, Any]:
    """The llmquant commit this process runs and which of its source files differ from it (the working
    tree is shared with colleagues, so a run may see uncommitted edits; they are listed, not hidden)."""

    def git(*cmd: str) -> str:
        try:
            proc = subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return proc.stdout.strip() if proc.returncode == 0 else ""

    dirty = git("status", "--porcelain", "--", "llmquant", "kernels", "calibration")
    return {"commit": git("rev-parse", "--short", "HEAD") or None, "dirty": dirty.splitlines()}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json(path: Path, data: Any) -> None:
    """Atomically (a temporary file, then a rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def gib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**30:.2f}"


def display(path: Path) -> str:
    """``path`` relative to the repository root where it can be."""
    try:
        return os.path.relpath(path, REPO)
    except ValueError:
        return str(path)


def machine() -> dict[str, Any]:
    import torch
    import transformers

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "description": f"{cores}-core CPU ({cpu}), " + (f"GPU {gpu}" if gpu else "no GPU"),
        "cpu": cpu,
        "cores": cores,
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "niceness": os.nice(0),
    }
