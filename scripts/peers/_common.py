"""Shared by the peer scripts (they run inside the peers' virtualenvs, without llmquant installed).

Each peer script: loads the float checkpoint, notes its RSS, times the library's quantization step alone
(model load and saving excluded, as for llmquant's runs), notes the peak RSS (``ru_maxrss``), saves the
checkpoint in the library's own format and writes a JSON result with the same keys as the child of
``bench_quality.py`` (``benchlib/runs.py``: ``quant_seconds``, ``peak_rss_bytes``, ``checkpoint`` ...).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def cpu_seconds() -> float:
    """User + system CPU time of this process (and of its waited-for children) so far."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def current_rss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in Path(path).glob(pattern) if f.is_file())


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", required=True, help="float checkpoint directory")
    p.add_argument("--calib", required=True, help="calibration_ids.safetensors written by bench_quality.py")
    p.add_argument("--out", required=True, help="where to save the quantized checkpoint")
    p.add_argument("--result", required=True, help="JSON result file")
    p.add_argument("--group-size", type=int, required=True)
    p.add_argument("--bits", type=int, default=4)
    return p


def load_calibration_ids(path: str):
    """input_ids / attention_mask [n, seqlen] int64, exactly the ids llmquant calibrates on."""
    from safetensors.torch import load_file

    tensors = load_file(path)
    return tensors["input_ids"], tensors["attention_mask"]


def write_result(path: str, data: dict[str, Any]) -> None:
    out = Path(data["checkpoint"])
    data = dict(data)
    data.setdefault("checkpoint_bytes", dir_bytes(out, "*.safetensors"))
    data.setdefault("checkpoint_total_bytes", dir_bytes(out))
    data.setdefault("finished_at", time.time())
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


class Meter:
    """The timings and RSS a peer script reports, noted as it goes (``start`` at construction)::

    meter = Meter()             # before the heavy imports
    ...imports...; meter.imported()
    with meter.phase("load"): model = ...
    with meter.phase("quant"): quantize(model)   # wall + CPU seconds, load average before/after
    with meter.phase("save"): save(model)
    write_result(path, {"library": ...} | meter.fields())
    """

    def __init__(self) -> None:
        self._fields: dict[str, Any] = {"rss_start_bytes": current_rss_bytes()}

    def imported(self) -> None:
        self._fields["rss_imports_bytes"] = current_rss_bytes()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        before, t0, c0 = load_average(), time.perf_counter(), cpu_seconds()
        yield
        self._fields[f"{name}_seconds"] = time.perf_counter() - t0
        if name == "load":
            self._fields["rss_after_load_bytes"] = current_rss_bytes()
            self._fields["peak_rss_after_load_bytes"] = peak_rss_bytes()
        elif name == "quant":
            self._fields["quant_cpu_seconds"] = cpu_seconds() - c0
            self._fields["peak_rss_bytes"] = peak_rss_bytes()
            self._fields["loadavg_1min_before_after"] = [before, load_average()]

    def fields(self) -> dict[str, Any]:
        return dict(self._fields)
