"""The runs of the quality table and the child process that quantizes one of them.

Every quantization runs in a fresh subprocess (``python scripts/bench_quality.py _child SPEC.json``) so
that ``ru_maxrss`` is that run's own peak. The child loads the float checkpoint (in its stored dtype,
fully into memory), notes its RSS, then times ``llmquant.quantize`` alone (model load, tokenization and
saving are excluded), notes the peak RSS, and saves the result with ``save_quantized`` under
``OUT/checkpoints/<run>``; its numbers go to ``OUT/runs/<run>.json``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .util import (
    REPO,
    code_version,
    cpu_seconds,
    current_rss_bytes,
    dir_bytes,
    gib,
    load_average,
    peak_rss_bytes,
    write_json,
)

SCRIPT = REPO / "scripts" / "bench_quality.py"
SEED = 0


@dataclass(frozen=True)
class RunSpec:
    """One row of the table: a quantizer configuration (or the float model)."""

    id: str
    method: str  # "float", "rtn", "gptq", "awq", "awq+gptq"
    group_size: int | None = None
    sym: bool = True
    act_order: bool = True  # llmquant's GPTQ defaults (ignored by rtn)
    static_groups: bool = True
    grid: str = "minmax"  # the rounder's grid (llmquant.grid.GRIDS)
    bits: int = 4
    search_samples: int | None = None  # AWQ: sequences replayed per scale candidate (None: default, 8)
    fmt: str | None = None  # the checkpoint format, when not the method's natural one
    propagation: float = 0.0  # GPTQ's error_propagation α (GPTAQ)
    refine: int = 0  # --refine STEPS after the rounder (0: none)
    refine_loss: str = "mse"  # RefineConfig.loss
    refine_scales: bool = False  # RefineConfig.scales

    @property
    def format(self) -> str | None:
        if self.method == "float":
            return None
        if self.fmt is not None:
            return self.fmt
        divides = self.group_size is not None and 576 % self.group_size == 0  # SmolLM2's K: 576, 1536
        if self.method.startswith("awq") and self.bits == 4 and divides:
            return "awq"  # AutoAWQ GEMM needs every K divisible by the group size
        return "gptq" if self.sym else "gptq_v2"  # GPTQ v1 cannot store zero = 0: asym needs v2

    @property
    def settings(self) -> str:
        if self.method == "float":
            return "float16 checkpoint, evaluated in float32"
        parts = [f"w{self.bits} g{self.group_size} {'sym' if self.sym else 'asym'}"]
        if self.method.startswith("awq"):
            parts.append("AWQ duo scaling n_grid 20" + (", clip" if self.method == "awq" else ""))
            parts.append(f"search on {self.search_samples or 8} seqs")
        if self.method in ("gptq", "awq+gptq"):
            parts.append(
                "act_order" + ("+static_groups" if self.static_groups else "")
                if self.act_order
                else "natural order"
            )
        if self.grid != "minmax":
            parts.append(f"grid {self.grid}")
        if self.propagation:
            parts.append(f"error propagation α {self.propagation:g}")
        if self.refine:
            parts.append(
                f"refine {self.refine} steps"
                + (f" ({self.refine_loss} loss)" if self.refine_loss != "mse" else "")
                + (" + scales" if self.refine_scales else "")
            )
        if self.method in ("gptq", "awq+gptq"):
            parts.append("damp 0.01, true_sequential")
        return ", ".join(parts)

    def method_config(self) -> dict[str, Any]:
        """``config.to_dict() | {"method": ...}`` of the llmquant config (JSON, for the child)."""
        from llmquant.config import AWQConfig, GPTQConfig, QuantScheme, RefineConfig, RTNConfig

        scheme = QuantScheme(bits=self.bits, group_size=self.group_size, sym=self.sym)
        refine = (
            RefineConfig(self.refine, loss=self.refine_loss, scales=self.refine_scales)
            if self.refine
            else None
        )
        if self.method.startswith("awq"):
            rounder = None
            if self.method == "awq+gptq":
                rounder = GPTQConfig(scheme=scheme, grid=self.grid, error_propagation=self.propagation)
            extra = {"search_samples": self.search_samples} if self.search_samples else {}
            cfg = AWQConfig(scheme=scheme, rounder=rounder, **extra)
        elif self.method == "rtn":
            cfg = RTNConfig(scheme=scheme, grid=self.grid, refine=refine)
        elif self.method == "gptq":
            cfg = GPTQConfig(
                scheme=scheme,
                act_order=self.act_order,
                static_groups=self.static_groups,
                grid=self.grid,
                error_propagation=self.propagation,
                refine=refine,
            )
        else:
            raise ValueError(f"run {self.id} has no quantizer config")
        return cfg.to_dict() | {"method": cfg.method}


RUNS: list[RunSpec] = [
    RunSpec("float16", "float"),
    RunSpec("rtn-g64-sym", "rtn", 64, True),
    RunSpec("rtn-g64-asym", "rtn", 64, False),
    RunSpec("rtn-g128-sym", "rtn", 128, True),
    RunSpec("rtn-g128-asym", "rtn", 128, False),
    RunSpec("gptq-g64-sym", "gptq", 64, True),
    RunSpec("gptq-g64-asym", "gptq", 64, False),
    RunSpec("gptq-g128-sym", "gptq", 128, True),
    RunSpec("gptq-g128-asym", "gptq", 128, False),
    RunSpec("gptq-g64-sym-noao", "gptq", 64, True, act_order=False, static_groups=False),
    RunSpec("gptq-g64-asym-mse", "gptq", 64, False, grid="mse"),
    RunSpec("rtn-g64-sym-search", "rtn", 64, True, grid="search"),
    RunSpec("rtn-g64-asym-search", "rtn", 64, False, grid="search"),
    RunSpec("rtn-g128-sym-search", "rtn", 128, True, grid="search"),
    RunSpec("rtn-g128-asym-search", "rtn", 128, False, grid="search"),
    RunSpec("rtn-w3-g64-asym-search", "rtn", 64, False, grid="search", bits=3),
    RunSpec("rtn-w2-g64-asym-search", "rtn", 64, False, grid="search", bits=2),
    RunSpec("gptq-g64-sym-search", "gptq", 64, True, grid="search"),
    RunSpec("gptq-g64-asym-search", "gptq", 64, False, grid="search"),
    RunSpec("gptq-g64-sym-mse", "gptq", 64, True, grid="mse"),
    RunSpec("gptq-g128-asym-search", "gptq", 128, False, grid="search"),
    RunSpec("rtn-w3-g64-asym", "rtn", 64, False, bits=3),
    RunSpec("gptq-w3-g64-asym", "gptq", 64, False, bits=3),
    RunSpec("gptq-w3-g64-asym-search", "gptq", 64, False, grid="search", bits=3),
    RunSpec("gptq-g64-sym-search-ep", "gptq", 64, True, grid="search", propagation=1.0),
    RunSpec("gptq-g64-asym-search-ep", "gptq", 64, False, grid="search", propagation=1.0),
    RunSpec("gptq-w3-g64-asym-search-ep", "gptq", 64, False, grid="search", bits=3, propagation=1.0),
    RunSpec("gptq-w3-g64-asym-search-ep05", "gptq", 64, False, grid="search", bits=3, propagation=0.5),
    RunSpec("gptq-w3-g64-asym-search-ep075", "gptq", 64, False, grid="search", bits=3, propagation=0.75),
    RunSpec("gptq-w2-g64-asym-search-ep", "gptq", 64, False, grid="search", bits=2, propagation=1.0),
    RunSpec("gptq-g64-sym-search-ep05", "gptq", 64, True, grid="search", propagation=0.5),
    RunSpec("gptq-g64-asym-search-ep05", "gptq", 64, False, grid="search", propagation=0.5),
    RunSpec("gptq-g128-asym-search-ep05", "gptq", 128, False, grid="search", propagation=0.5),
    RunSpec("gptq-g128-sym-search", "gptq", 128, True, grid="search"),
    RunSpec("gptq-g128-sym-search-ep05", "gptq", 128, True, grid="search", propagation=0.5),
    RunSpec("gptq-w2-g64-asym-search-ep05", "gptq", 64, False, grid="search", bits=2, propagation=0.5),
    RunSpec(
        "gptq-w3-g64-asym-search-ep05-refine64",
        "gptq",
        64,
        False,
        grid="search",
        bits=3,
        propagation=0.5,
        refine=64,
    ),
    RunSpec(
        "gptq-w3-g64-asym-search-ep05-refine64-rel",
        "gptq",
        64,
        False,
        grid="search",
        bits=3,
        propagation=0.5,
        refine=64,
        refine_loss="relative",
    ),
    RunSpec(
        "gptq-w3-g64-asym-search-ep05-refine64-scales",
        "gptq",
        64,
        False,
        grid="search",
        bits=3,
        propagation=0.5,
        refine=64,
        refine_loss="mse",
        refine_scales=True,
    ),
    RunSpec(
        "gptq-w3-g64-asym-search-ep05-refine64-rel-scales",
        "gptq",
        64,
        False,
        grid="search",
        bits=3,
        propagation=0.5,
        refine=64,
        refine_loss="relative",
        refine_scales=True,
    ),
    RunSpec("rtn-w2-g64-asym", "rtn", 64, False, bits=2),
    RunSpec("gptq-w2-g64-asym", "gptq", 64, False, bits=2),
    RunSpec("gptq-w2-g64-asym-search", "gptq", 64, False, grid="search", bits=2),
    RunSpec("awq-g64-asym", "awq", 64, False),
    RunSpec("awq-g64-sym", "awq", 64, True),
    RunSpec("awq-g128-asym", "awq", 128, False),
    RunSpec("awq-g128-sym", "awq", 128, True),
    RunSpec("awq-g64-asym-s16", "awq", 64, False, search_samples=16),
    RunSpec("awq-g64-asym-s32", "awq", 64, False, search_samples=32),
    RunSpec("awq+gptq-g64-asym", "awq+gptq", 64, False),
    RunSpec("awq+gptq-g64-sym", "awq+gptq", 64, True),
    RunSpec("awq+gptq-g128-asym", "awq+gptq", 128, False),
    RunSpec("awq+gptq-g128-sym", "awq+gptq", 128, True),
    RunSpec("awq+gptq-g64-sym-gptqfmt", "awq+gptq", 64, True, fmt="gptq"),
    RunSpec("awq+gptq-g64-sym-search", "awq+gptq", 64, True, grid="search", fmt="gptq"),
    RunSpec("awq+gptq-g64-sym-search-ep05", "awq+gptq", 64, True, grid="search", fmt="gptq", propagation=0.5),
    RunSpec("awq+gptq-g64-asym-search", "awq+gptq", 64, False, grid="search"),
]
RUNS_BY_ID = {r.id: r for r in RUNS}
QUICK_RUNS = ["float16", "rtn-g64-asym", "gptq-g64-sym"]


def child_spec(run: RunSpec, paths: dict[str, Path], calib_source: Path, calib_fp: str, batch: int) -> dict:
    """What the child gets (and what ``--resume`` compares to reuse a checkpoint)."""
    return {
        "run": run.id,
        "model": str(paths["model"]),
        "config": run.method_config(),
        "format": run.format,
        "calib_ids": str(paths["calib_ids"]),
        "calib_source": str(calib_source),
        "calib_fingerprint": calib_fp,
        "batch_size": batch,
        "seed": SEED,
        "out_dir": str(paths["checkpoints"] / run.id),
        "result": str(paths["runs"] / f"{run.id}.json"),
    }


def child_command(spec_path: Path) -> list[str]:
    return [sys.executable, str(SCRIPT), "_child", str(spec_path)]


def _reusable(result_path: Path, spec: dict) -> dict | None:
    if not result_path.is_file():
        return None
    try:
        old = json.loads(result_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    ckpt = Path(old.get("checkpoint", ""))
    if _normalized(old.get("spec")) != _normalized(spec) or not (ckpt / "config.json").is_file():
        return None
    return old


def _normalized(spec: object) -> object:
    """A child spec with its method config read and written again, so a spec written before a config
    field existed equals today's with that field at its default (the checkpoint is the same)."""
    from llmquant.config import method_config_from_dict

    if not isinstance(spec, dict) or not isinstance(spec.get("config"), dict):
        return spec
    try:
        cfg = method_config_from_dict(spec["config"])
    except (TypeError, ValueError):
        return spec
    return spec | {"config": cfg.to_dict() | {"method": cfg.method}}


def run_quantization(run: RunSpec, spec: dict, paths: dict[str, Path], resume: bool) -> dict:
    """Quantize one run in a child process (or reuse its checkpoint); its result, or ``{"error": ...}``."""
    result_path = Path(spec["result"])
    if resume and (old := _reusable(result_path, spec)) is not None:
        print(
            f"[{run.id}] reusing {old['checkpoint']} (quantized in {old['quant_seconds']:.1f} s)", flush=True
        )
        return old
    result_path.unlink(missing_ok=True)
    spec_path = paths["runs"] / f"{run.id}.spec.json"
    write_json(spec_path, spec)
    log = paths["logs"] / f"{run.id}.log"
    print(f"[{run.id}] quantizing ({run.settings}) ... log: {log}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(child_command(spec_path), stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode != 0 or not result_path.is_file():
        tail = " | ".join(log.read_text().strip().splitlines()[-3:])
        return {"error": f"quantization failed (rc={proc.returncode}): {tail[-300:]}", "spec": spec}
    out = json.loads(result_path.read_text())
    print(
        f"[{run.id}] quantized in {out['quant_seconds']:.1f} s, peak RSS {gib(out['peak_rss_bytes'])} GiB, "
        f"checkpoint {out['checkpoint_bytes'] / 1e6:.1f} MB (child wall {time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    return out


def child_main(spec_path: str) -> int:
    """Quantize per the JSON spec, save the checkpoint, write the result JSON (module docstring)."""
    spec = json.loads(Path(spec_path).read_text())
    stats: dict[str, Any] = {"rss_start_bytes": current_rss_bytes()}
    code = code_version()
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmquant.api import save_quantized
    from llmquant.calibration import CalibrationBlocks, fingerprint
    from llmquant.config import method_config_from_dict
    from llmquant.pipeline import quantize

    torch.manual_seed(spec["seed"])
    config = method_config_from_dict(spec["config"])
    calib = load_file(spec["calib_ids"])
    ids, mask = calib["input_ids"], calib["attention_mask"]
    blocks = CalibrationBlocks(ids, mask, spec["calib_source"], fingerprint(ids, mask))
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    stats["rss_imports_bytes"] = current_rss_bytes()

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype="auto").eval()
    stats["load_seconds"] = time.perf_counter() - t0
    stats["rss_after_load_bytes"] = current_rss_bytes()
    stats["peak_rss_after_load_bytes"] = peak_rss_bytes()

    load_before = load_average()
    t0, c0 = time.perf_counter(), cpu_seconds()
    result = quantize(model, config, blocks, device="cpu", batch_size=spec["batch_size"], progress=False)
    quant_seconds, quant_cpu_seconds = time.perf_counter() - t0, cpu_seconds() - c0
    stats["peak_rss_bytes"] = peak_rss_bytes()
    load_after = load_average()

    t0 = time.perf_counter()
    out = save_quantized(result, spec["out_dir"], format=spec["format"], tokenizer=tokenizer, overwrite=True)
    save_seconds = time.perf_counter() - t0
    damps = [log.damp for log in result.logs if getattr(log, "damp", None) is not None]
    write_json(
        Path(spec["result"]),
        {
            "spec": spec,
            "quant_seconds": quant_seconds,
            "quant_cpu_seconds": quant_cpu_seconds,
            "loadavg_1min_before_after": [load_before, load_after],
            "pipeline_seconds": result.seconds,
            "load_seconds": stats["load_seconds"],
            "save_seconds": save_seconds,
            **{k: stats[k] for k in ("rss_start_bytes", "rss_imports_bytes", "rss_after_load_bytes")},
            "peak_rss_after_load_bytes": stats["peak_rss_after_load_bytes"],
            "peak_rss_bytes": stats["peak_rss_bytes"],
            "checkpoint": str(out),
            "checkpoint_bytes": dir_bytes(out, "*.safetensors"),
            "checkpoint_total_bytes": dir_bytes(out),
            "modules": len(result.quantized),
            "rtn_fallbacks": sum(1 for log in result.logs if getattr(log, "fallback", False)),
            "damp_max_used": max(damps) if damps else None,
            "calibration_fingerprint": blocks.fingerprint,
            "finished_at": time.time(),
            "torch_threads": torch.get_num_threads(),
            "code": code,
        },
    )
    return 0
