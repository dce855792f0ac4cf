"""The tuned-config cache: dump the autotuners' choices (key -> best config) to JSON, and seed them from
such a file in a later process (``scripts/bench_kernels.py --dump-tuned / --load-tuned``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import triton

TUNED_FORMAT_VERSION = 1


def _autotuners() -> dict[str, Any]:
    # (``from . import gemv`` would give the launcher function the package re-exports, not the module)
    from .dequant import _dequant_kernel_tuned
    from .gemm import _gemm_kernel_tuned
    from .gemv import _gemv_kernel_tuned

    return {"dequant": _dequant_kernel_tuned, "gemv": _gemv_kernel_tuned, "gemm": _gemm_kernel_tuned}


def _config_to_dict(cfg: triton.Config) -> dict[str, Any]:
    return {"kwargs": dict(cfg.kwargs), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def dump_tuned(path: str | Path, device_name: str = "") -> dict[str, Any]:
    """Write every autotuner's cache (key -> best config) to ``path`` as JSON; returns the data."""
    data: dict[str, Any] = {"version": TUNED_FORMAT_VERSION, "device": device_name, "kernels": {}}
    for name, tuner in _autotuners().items():
        data["kernels"][name] = [
            {"key": list(key), "config": _config_to_dict(cfg)} for key, cfg in tuner.cache.items()
        ]
    Path(path).write_text(json.dumps(data, indent=1))
    return data


def load_tuned(path: str | Path) -> int:
    """Seed the autotuner caches from a ``dump_tuned`` file; returns the number of entries loaded."""
    data = json.loads(Path(path).read_text())
    if data.get("version") != TUNED_FORMAT_VERSION:
        raise ValueError(f"{path}: tuned-config format {data.get('version')} != {TUNED_FORMAT_VERSION}")
    tuners, count = _autotuners(), 0
    for name, entries in data["kernels"].items():
        for entry in entries:
            c = entry["config"]
            cfg = triton.Config(c["kwargs"], num_warps=c["num_warps"], num_stages=c["num_stages"])
            tuners[name].cache[tuple(entry["key"])] = cfg
            count += 1
    return count
