"""Quality benchmark: float / RTN / GPTQ (and, with ``--peers``, GPTQModel and llm-compressor) on one model.

For every run: wikitext-2 perplexity over non-overlapping ``--seqlen`` windows (default the first 40 windows
of 2048 tokens), mean KL(float || quantized) per predicted token on the same windows, wall time of the
quantization step alone, peak RSS of the process doing it, and the checkpoint size on disk. Protocol:
``/work/shared/reference/peer-results.md`` (mirrored in the Quality section of ``docs/benchmarks.md``).

How it works
1. The calibration token ids are cut once, in this process: ``--n-samples`` x ``--calib-seqlen``
   consecutive tokens from the start of ``--calib-file`` (``llmquant.calibration.load_calibration`` on a
   local text file, i.e. the protocol's blocks; the seed is fixed at 0), and written to
   ``OUT/calibration_ids.safetensors``. Every quantizer, ours and the peers', reads exactly these ids.
2. Every quantization runs in a fresh subprocess (``python scripts/bench_quality.py _child SPEC.json``)
   so that ``ru_maxrss`` is that run's own peak. The child loads the float checkpoint (in its stored
   dtype, fully into memory), notes its RSS, then times ``llmquant.quantize`` alone (model load,
   tokenization and saving are excluded), notes the peak RSS, and saves the result with
   ``save_quantized`` (``gptq`` for symmetric schemes, ``gptq_v2`` for asymmetric ones) under
   ``OUT/checkpoints/<run>``. Peers run the same way inside their own virtualenvs (``scripts/peers/``).
3. Evaluation loads each SAVED checkpoint with ``llmquant.from_pretrained(path, dtype=torch.float32)``
   (what a user gets) and the float checkpoint with transformers in float32. To avoid recomputing the
   float model's logits per run (or storing 400 MB of them per window), all models are held in memory at
   once and evaluated window by window: the float logits of a window (and their log-softmax) are computed
   once and reused for the KL of every run. Each QuantLinear's weight is dequantized once (the same
   ``dequantize_ref`` + float32 matmul as the CPU reference path of ``quant_matmul``, which otherwise
   dequantizes on every forward); the identity is checked on a short prefix of the first window for
   every model and the max |logit difference| is recorded (expected: 0). Numbers are bitwise those of
   ``llmquant.evaluate.evaluate(model, ids, base_model=float_model)``: same windows, same chunked
   NLL/KL sums, same accumulation order. Memory: about 0.55 GB per model (float32, dense) + ~1.5 GB.
4. Output: ``OUT/results.md`` (markdown table, also printed), ``OUT/results.json`` (every number,
   per-window values, the exact command line), and with ``--append-docs`` the Quality section of
   ``docs/benchmarks.md`` (written above the Kernels section, replaced if present).

Per-window results go to ``OUT/eval_windows.jsonl`` as they are computed; ``--resume`` reuses them and
the checkpoints of runs whose spec is unchanged, so an interrupted benchmark continues.

Usage:
    python scripts/bench_quality.py --windows 40 --out bench_out/quality --append-docs
    python scripts/bench_quality.py --runs float16,rtn-g64-asym,gptq-g64-asym --windows 12
    python scripts/bench_quality.py --peers --dry-run        # print every command, run nothing
    python scripts/bench_quality.py --peers --peer-setup-only  # create/install the peers' virtualenvs
    python scripts/bench_quality.py --quick --model DIR --eval-file F --calib-file F --seqlen 64 ...
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCRIPT_REL = "scripts/bench_quality.py"
DEFAULT_CALIB = "../shared/data/calibration/c4.utf8"  # relative to the repository root
DEFAULT_EVAL = "../shared/data/wikitext-2-raw/wiki.test.raw"
DEFAULT_PEERS_ROOT = Path.home() / ".cache" / "llmquant" / "peers"
PEER_TORCH = "torch==2.13.0"  # the CPU wheel on local disk: installed FIRST (a bare torch pulls CUDA)
SEED = 0
CHECK_TOKENS = 64  # prefix of window 0 used to check dense evaluation == QuantLinear forward
DOCS_SECTION = "## Quality"
DOCS_ANCHOR = "## Kernels"


# ---------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """One row of the table: a quantizer configuration (or the float model)."""

    id: str
    method: str  # "float", "rtn", "gptq", "awq", "awq+gptq"
    group_size: int | None = None
    sym: bool = True
    act_order: bool = True  # llmquant's GPTQ defaults (ignored by rtn)
    static_groups: bool = True
    mse_clip: bool = False
    bits: int = 4
    search_samples: int | None = None  # AWQ: sequences replayed per scale candidate (None: default, 8)

    @property
    def format(self) -> str | None:
        if self.method == "float":
            return None
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
        if self.mse_clip:
            parts.append("mse_clip")
        if self.method in ("gptq", "awq+gptq"):
            parts.append("damp 0.01, true_sequential")
        return ", ".join(parts)

    def method_config(self) -> dict[str, Any]:
        """``config.to_dict() | {"method": ...}`` of the llmquant config (JSON, for the child)."""
        from llmquant.config import AWQConfig, GPTQConfig, QuantScheme, RTNConfig

        scheme = QuantScheme(bits=self.bits, group_size=self.group_size, sym=self.sym)
        if self.method.startswith("awq"):
            rounder = GPTQConfig(scheme=scheme) if self.method == "awq+gptq" else None
            extra = {"search_samples": self.search_samples} if self.search_samples else {}
            cfg = AWQConfig(scheme=scheme, rounder=rounder, **extra)
        elif self.method == "rtn":
            cfg = RTNConfig(scheme=scheme, mse_clip=self.mse_clip)
        elif self.method == "gptq":
            cfg = GPTQConfig(
                scheme=scheme,
                act_order=self.act_order,
                static_groups=self.static_groups,
                mse_clip=self.mse_clip,
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
    RunSpec("gptq-g64-asym-mse", "gptq", 64, False, mse_clip=True),
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
]
RUNS_BY_ID = {r.id: r for r in RUNS}
QUICK_RUNS = ["float16", "rtn-g64-asym", "gptq-g64-sym"]


@dataclass(frozen=True)
class PeerSpec:
    """A peer library run inside its own virtualenv by ``scripts/peers/<script>``."""

    name: str  # virtualenv name under the peers root
    run_id: str
    requirement: str
    script: str
    label: str
    settings: str
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    reference: str = ""  # what peer-results.md reports for this run
    setup_note: str = ""


PEERS: list[PeerSpec] = [
    PeerSpec(
        name="llmcompressor",
        run_id="llmcompressor-gptq-g64-sym-ao",
        requirement="llmcompressor==0.14.0.1",
        script="scripts/peers/llmcompressor_gptq.py",
        label="llm-compressor 0.14.0.1",
        settings="GPTQModifier W4A16 sym, group 64, actorder static, damp 0.01 (its default)",
        args=("--group-size", "64", "--actorder", "static"),
        reference="peer-results.md: 2,702 s, 1.75 GiB, ppl 27.81 (40 windows), 27.13 (12 windows)",
    ),
    PeerSpec(
        name="gptqmodel",
        run_id="gptqmodel-gptq-g128-sym",
        requirement="gptqmodel==7.7.0",
        script="scripts/peers/gptqmodel_gptq.py",
        label="GPTQModel 7.7.0",
        settings="w4 g128 sym, desc_act off (group-aware reordering on), damp 0.05",
        args=("--group-size", "128", "--damp", "0.05"),
        env=(("GPTQMODEL_CPU_WORKERS", "2"),),
        setup_note="gptqmodel 7.7.0 requires torch>=2.14.1, so pip replaces the local CPU torch 2.13.0 wheel "
        "with PyPI's torch 2.14.1 (the CUDA build: ~4.5 GB of nvidia-* wheels, ~6 GB venv; runs on CPU)",
        reference="peer-results.md: 3,589 s, 1.50 GiB, ppl 30.72 (40 windows)",
    ),
]
PEERS_BY_NAME = {p.name: p for p in PEERS}


# ---------------------------------------------------------------------------------------------------
# Small helpers (also used by the child process)
# ---------------------------------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_seconds() -> float:
    """User + system CPU time of this process (and of its waited-for children) so far."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


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


def current_rss_bytes() -> int | None:
    """Current resident set size (``VmRSS`` of /proc/self/status), None where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in Path(path).glob(pattern) if f.is_file())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _gib(n: int | None) -> str:
    return "—" if n is None else f"{n / 2**30:.2f}"


# ---------------------------------------------------------------------------------------------------
# Child: one quantization in a fresh process
# ---------------------------------------------------------------------------------------------------


def child_main(spec_path: str) -> int:
    """Quantize per the JSON spec, save the checkpoint, write the result JSON (see module docstring)."""
    spec = json.loads(Path(spec_path).read_text())
    rss_start = current_rss_bytes()
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
    rss_imports = current_rss_bytes()

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype="auto").eval()
    load_seconds = time.perf_counter() - t0
    rss_after_load = current_rss_bytes()
    peak_after_load = peak_rss_bytes()

    load_before = load_average()
    t0, c0 = time.perf_counter(), cpu_seconds()
    result = quantize(model, config, blocks, device="cpu", batch_size=spec["batch_size"], progress=False)
    quant_seconds, quant_cpu_seconds = time.perf_counter() - t0, cpu_seconds() - c0
    peak_after_quant = peak_rss_bytes()
    load_after = load_average()

    t0 = time.perf_counter()
    out = save_quantized(result, spec["out_dir"], format=spec["format"], tokenizer=tokenizer, overwrite=True)
    save_seconds = time.perf_counter() - t0
    damps = [log.damp for log in result.logs if getattr(log, "damp", None) is not None]
    _write_json(
        Path(spec["result"]),
        {
            "spec": spec,
            "quant_seconds": quant_seconds,
            "quant_cpu_seconds": quant_cpu_seconds,
            "loadavg_1min_before_after": [load_before, load_after],
            "pipeline_seconds": result.seconds,
            "load_seconds": load_seconds,
            "save_seconds": save_seconds,
            "rss_start_bytes": rss_start,
            "rss_imports_bytes": rss_imports,
            "rss_after_load_bytes": rss_after_load,
            "peak_rss_after_load_bytes": peak_after_load,
            "peak_rss_bytes": peak_after_quant,
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


# ---------------------------------------------------------------------------------------------------
# Arguments and plan
# ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench_out/quality"), help="output directory")
    p.add_argument("--model", type=Path, default=None, help="float checkpoint (default: SmolLM2 test model)")
    p.add_argument("--eval-file", type=Path, default=None, help=f"evaluation text (default {DEFAULT_EVAL})")
    p.add_argument(
        "--calib-file", type=Path, default=None, help=f"calibration text (default {DEFAULT_CALIB})"
    )
    p.add_argument("--windows", type=int, default=None, help="evaluation windows (default 40; --quick 2)")
    p.add_argument("--seqlen", type=int, default=2048, help="evaluation window length (default 2048)")
    p.add_argument("--n-samples", type=int, default=None, help="calibration blocks (default 128; --quick 16)")
    p.add_argument("--calib-seqlen", type=int, default=512, help="calibration block length (default 512)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration batch size of our quantizer")
    p.add_argument(
        "--runs",
        default=None,
        help=f"comma-separated run ids (default all: {','.join(r.id for r in RUNS)}; --quick: "
        f"{','.join(QUICK_RUNS)}); float16 is always evaluated (it is the KL reference)",
    )
    p.add_argument("--quick", action="store_true", help="2 windows, 16 calibration samples, 2 runs")
    p.add_argument("--resume", action="store_true", help="reuse unchanged checkpoints and per-window results")
    p.add_argument("--peers", action="store_true", help="also run GPTQModel and llm-compressor (slow)")
    p.add_argument("--peer-names", default=",".join(PEERS_BY_NAME), help="which peers (comma-separated)")
    p.add_argument("--peers-root", type=Path, default=DEFAULT_PEERS_ROOT, help="where the peer venvs live")
    p.add_argument("--peer-setup-only", action="store_true", help="create/install the peer venvs, then stop")
    p.add_argument("--dry-run", action="store_true", help="print the commands it would run; run nothing")
    p.add_argument(
        "--note",
        action="append",
        default=[],
        help="a paragraph of free text for the docs section, below the table (repeatable; kept in the JSON)",
    )
    p.add_argument(
        "--render-only",
        action="store_true",
        help="re-render OUT/results.md (and the docs with --append-docs) from OUT/results.json; run nothing",
    )
    p.add_argument(
        "--append-docs",
        nargs="?",
        const=REPO / "docs" / "benchmarks.md",
        type=Path,
        default=None,
        help="write/replace the Quality section of docs/benchmarks.md (or the given file)",
    )
    args = p.parse_args(argv)
    args.windows = args.windows if args.windows is not None else (2 if args.quick else 40)
    args.n_samples = args.n_samples if args.n_samples is not None else (16 if args.quick else 128)
    if args.windows < 1 or args.n_samples < 1:
        p.error("--windows and --n-samples must be >= 1")
    ids = [s.strip() for s in args.runs.split(",") if s.strip()] if args.runs else None
    if ids is None:
        ids = QUICK_RUNS if args.quick else [r.id for r in RUNS]
    unknown = [i for i in ids if i not in RUNS_BY_ID]
    if unknown:
        p.error(f"unknown run id(s) {unknown}; known: {', '.join(RUNS_BY_ID)}")
    args.run_specs = [RUNS_BY_ID["float16"]] + [RUNS_BY_ID[i] for i in dict.fromkeys(ids) if i != "float16"]
    names = [s.strip() for s in args.peer_names.split(",") if s.strip()]
    bad = [n for n in names if n not in PEERS_BY_NAME]
    if bad:
        p.error(f"unknown peer(s) {bad}; known: {', '.join(PEERS_BY_NAME)}")
    args.peer_specs = [PEERS_BY_NAME[n] for n in names] if (args.peers or args.peer_setup_only) else []
    args.calib_file = _repo_path(args.calib_file, DEFAULT_CALIB)
    args.eval_file = _repo_path(args.eval_file, DEFAULT_EVAL)
    return args


def _repo_path(path: Path | None, default: str) -> Path:
    return Path(path).expanduser().resolve() if path is not None else (REPO / default).resolve()


def _default_model() -> Path:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "prepare_test_model", REPO / "scripts" / "prepare_test_model.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return Path(module.prepare_test_model())


# ---------------------------------------------------------------------------------------------------
# Peers
# ---------------------------------------------------------------------------------------------------


def peer_python(root: Path, peer: PeerSpec) -> Path:
    return root / peer.name / "bin" / "python"


def peer_setup_commands(root: Path, peer: PeerSpec) -> list[list[str]]:
    """venv creation, then the CPU torch wheel FIRST, then the peer library (pinned)."""
    py = str(peer_python(root, peer))
    return [
        [sys.executable, "-m", "venv", str(root / peer.name)],
        [py, "-m", "pip", "install", "-q", "--upgrade", "pip"],
        [py, "-m", "pip", "install", "-q", PEER_TORCH],
        [py, "-m", "pip", "install", "-q", peer.requirement],
    ]


def _peer_marker(root: Path, peer: PeerSpec) -> Path:
    return root / peer.name / ".llmquant-peer-installed"


def ensure_peer_venv(root: Path, peer: PeerSpec, log: Path) -> None:
    """Create and install the peer's virtualenv unless a marker says it is done (idempotent)."""
    marker = _peer_marker(root, peer)
    wanted = f"{PEER_TORCH}\n{peer.requirement}\n"
    if marker.is_file() and marker.read_text() == wanted:
        return
    root.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        for cmd in peer_setup_commands(root, peer):
            if cmd[1:3] == ["-m", "venv"] and peer_python(root, peer).exists():
                continue
            print(f"[peers] {shlex.join(cmd)}", flush=True)
            fh.write(f"$ {shlex.join(cmd)}\n")
            fh.flush()
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
            fh.write(f"# rc={proc.returncode} in {time.perf_counter() - t0:.0f} s\n")
            if proc.returncode != 0:
                raise RuntimeError(f"peer setup failed ({shlex.join(cmd)}); see {log}")
    marker.write_text(wanted)


def peer_command(args: argparse.Namespace, peer: PeerSpec, paths: dict[str, Path]) -> list[str]:
    return [
        str(peer_python(args.peers_root, peer)),
        str(REPO / peer.script),
        "--model",
        str(paths["model"]),
        "--calib",
        str(paths["calib_ids"]),
        "--out",
        str(paths["checkpoints"] / peer.run_id),
        "--result",
        str(paths["runs"] / f"{peer.run_id}.json"),
        *peer.args,
    ]


# ---------------------------------------------------------------------------------------------------
# Quantization phase
# ---------------------------------------------------------------------------------------------------


def _child_spec(args: argparse.Namespace, run: RunSpec, paths: dict[str, Path], calib_fp: str) -> dict:
    return {
        "run": run.id,
        "model": str(paths["model"]),
        "config": run.method_config(),
        "format": run.format,
        "calib_ids": str(paths["calib_ids"]),
        "calib_source": str(args.calib_file),
        "calib_fingerprint": calib_fp,
        "batch_size": args.batch_size,
        "seed": SEED,
        "out_dir": str(paths["checkpoints"] / run.id),
        "result": str(paths["runs"] / f"{run.id}.json"),
    }


def _reusable(result_path: Path, spec: dict) -> dict | None:
    if not result_path.is_file():
        return None
    try:
        old = json.loads(result_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    ckpt = Path(old.get("checkpoint", ""))
    if old.get("spec") != spec or not (ckpt / "config.json").is_file():
        return None
    return old


def run_quantization(args, run: RunSpec, paths: dict[str, Path], calib_fp: str) -> dict:
    spec = _child_spec(args, run, paths, calib_fp)
    result_path = Path(spec["result"])
    if args.resume and (old := _reusable(result_path, spec)) is not None:
        print(
            f"[{run.id}] reusing {old['checkpoint']} (quantized in {old['quant_seconds']:.1f} s)", flush=True
        )
        return old
    result_path.unlink(missing_ok=True)
    spec_path = paths["runs"] / f"{run.id}.spec.json"
    _write_json(spec_path, spec)
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", str(spec_path)]
    log = paths["logs"] / f"{run.id}.log"
    print(f"[{run.id}] quantizing ({run.settings}) ... log: {log}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)
    if proc.returncode != 0 or not result_path.is_file():
        tail = " | ".join(log.read_text().strip().splitlines()[-3:])
        return {"error": f"quantization failed (rc={proc.returncode}): {tail[-300:]}", "spec": spec}
    out = json.loads(result_path.read_text())
    print(
        f"[{run.id}] quantized in {out['quant_seconds']:.1f} s, peak RSS {_gib(out['peak_rss_bytes'])} GiB, "
        f"checkpoint {out['checkpoint_bytes'] / 1e6:.1f} MB (child wall {time.perf_counter() - t0:.0f} s)",
        flush=True,
    )
    return out


def run_peer(args, peer: PeerSpec, paths: dict[str, Path]) -> dict:
    result_path = paths["runs"] / f"{peer.run_id}.json"
    cmd = peer_command(args, peer, paths)
    spec = {"cmd": cmd[1:], "requirement": peer.requirement}
    if args.resume and result_path.is_file():
        old = json.loads(result_path.read_text())
        if old.get("spec") == spec and (Path(old.get("checkpoint", "")) / "config.json").is_file():
            print(f"[{peer.run_id}] reusing {old['checkpoint']}", flush=True)
            return old
    log = paths["logs"] / f"{peer.run_id}.log"
    try:
        ensure_peer_venv(args.peers_root, peer, paths["logs"] / f"peer-setup-{peer.name}.log")
    except RuntimeError as exc:
        return {"error": str(exc), "spec": spec}
    result_path.unlink(missing_ok=True)
    env = os.environ | dict(peer.env)
    print(f"[{peer.run_id}] quantizing with {peer.label} ... log: {log}", flush=True)
    with open(log, "w") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    if proc.returncode != 0 or not result_path.is_file():
        tail = " | ".join(log.read_text().strip().splitlines()[-3:])
        return {"error": f"{peer.label} failed (rc={proc.returncode}): {tail[-300:]}", "spec": spec}
    out = json.loads(result_path.read_text())
    out["spec"] = spec
    _write_json(result_path, out)
    return out


# ---------------------------------------------------------------------------------------------------
# Evaluation phase
# ---------------------------------------------------------------------------------------------------


def _dense_module(qlinear):
    """A module computing exactly QuantLinear's CPU reference forward, with the weight dequantized once."""
    import torch
    from llmquant.kernels.layout import dequantize_ref
    from torch import nn

    class DequantizedLinear(nn.Module):
        def __init__(self, q) -> None:
            super().__init__()
            self.in_features, self.out_features = q.in_features, q.out_features
            w = dequantize_ref(
                q.qweight,
                q.scales,
                q.zeros,
                q.bits,
                q.effective_group_size,
                q.in_features,
                dtype=torch.float32,
            )  # W^T [K, N]
            self.register_buffer("w", w)
            self.register_buffer("perm", None if q.perm is None else q.perm.long())
            self.register_buffer("bias", q.bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # == kernels.layout.quant_matmul_ref
            if self.perm is not None:
                x = x[..., self.perm]
            y = x.float() @ self.w.to(x.dtype).float()
            if self.bias is not None:
                y = y + self.bias.float()
            return y.to(x.dtype)

    return DequantizedLinear(qlinear)


def densify(model) -> int:
    """Replace every QuantLinear of ``model`` by its dequantize-once equivalent; returns the count."""
    from llmquant.nn import QuantLinear, set_module

    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    for name in names:
        set_module(model, name, _dense_module(model.get_submodule(name)))
    return len(names)


def _record_key(rec: dict) -> tuple:
    return rec["run"], rec["window"], rec["stamp"]


def evaluate_all(
    args, runs: list[tuple[str, Any]], float_model, ids, paths: dict[str, Path], stamps: dict[str, str]
) -> dict[str, dict]:
    """Perplexity and KL of every model on the same windows; float logits computed once per window.

    ``runs``: (run id, model) pairs, float first. Identical arithmetic to ``llmquant.evaluate.evaluate``.
    """
    import torch
    import torch.nn.functional as F

    from llmquant.evaluate import CHUNK_SIZE, _chunks, _window_logits, nll_sum

    seqlen = args.seqlen
    n_windows = min(ids.numel() // seqlen, args.windows)
    if n_windows == 0:
        raise ValueError(f"evaluation corpus has {ids.numel()} tokens, fewer than one window of {seqlen}")
    blocks = ids[: n_windows * seqlen].view(n_windows, seqlen)  # [T] -> [n_windows, seqlen]
    cpu = torch.device("cpu")
    done: dict[tuple, dict] = {}
    records_path = paths["out"] / "eval_windows.jsonl"
    if args.resume and records_path.is_file():
        for line in records_path.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("seqlen") == seqlen and rec.get("eval_sha") == stamps["__eval__"]:
                done[_record_key(rec)] = rec
    elif records_path.exists():
        records_path.unlink()
    per_run: dict[str, list[dict]] = {rid: [] for rid, _ in runs}
    with open(records_path, "a") as fh, torch.inference_mode():
        for w in range(n_windows):
            window = blocks[w]
            todo = [(rid, m) for rid, m in runs if (rid, w, stamps[rid]) not in done]
            for rid, _ in runs:
                if (rid, w, stamps[rid]) in done:
                    per_run[rid].append(done[(rid, w, stamps[rid])])
            if not todo:
                continue
            t0 = time.perf_counter()
            base = _window_logits(float_model, window, cpu)[:-1]  # [seqlen - 1, V]
            base_seconds = time.perf_counter() - t0
            targets = window[1:]
            # log-softmax of the float logits per chunk, once per window (kl_sum recomputes it per call)
            base_logp = [
                F.log_softmax(base[rows].float(), dim=-1) for rows in _chunks(base.shape[0], CHUNK_SIZE)
            ]
            base_p = [lp.exp() for lp in base_logp]
            timings = []
            for rid, model in todo:
                t0 = time.perf_counter()
                if rid == "float16":
                    logits, seconds = base, base_seconds
                else:
                    logits = _window_logits(model, window, cpu)[:-1]
                    seconds = time.perf_counter() - t0
                nll = nll_sum(logits, targets)
                kl = 0.0
                if rid != "float16":
                    for i, rows in enumerate(_chunks(logits.shape[0], CHUNK_SIZE)):
                        logq = F.log_softmax(logits[rows].float(), dim=-1)  # [c, V]
                        kl += (
                            (base_p[i] * (base_logp[i] - logq)).sum(dim=-1, dtype=torch.float64).sum().item()
                        )
                rec = {
                    "run": rid,
                    "window": w,
                    "stamp": stamps[rid],
                    "seqlen": seqlen,
                    "eval_sha": stamps["__eval__"],
                    "nll": nll,
                    "kl": kl,
                    "forward_seconds": seconds,
                }
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                per_run[rid].append(rec)
                timings.append(f"{rid} {seconds:.1f}s")
            del base, base_logp, base_p
            print(f"[eval] window {w + 1}/{n_windows}: " + ", ".join(timings), flush=True)
    n_tokens = n_windows * (seqlen - 1)
    out = {}
    for rid, recs in per_run.items():
        nll = sum(r["nll"] for r in recs)  # same order as evaluate(): window by window
        kl = sum(r["kl"] for r in recs)
        out[rid] = {
            "perplexity": math.exp(nll / n_tokens),
            "kl_divergence": kl / n_tokens,
            "n_windows": n_windows,
            "n_tokens": n_tokens,
            "seqlen": seqlen,
            "per_window_nll": [r["nll"] for r in recs],
            "per_window_kl": [r["kl"] for r in recs],
            "forward_seconds": sum(r["forward_seconds"] for r in recs),
        }
    return out


def stored_dtypes(path: Path) -> dict[str, str]:
    """Tensor name -> safetensors dtype string ("F16", "F32", "I32" ...) from the headers only."""
    from safetensors import safe_open

    out: dict[str, str] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(file), "pt") as fh:
            for key in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
                out[key] = fh.get_slice(key).get_dtype()
    return out


def upcast_tensors(checkpoint: Path, float_dtypes: dict[str, str]) -> list[str]:
    """Unquantized tensors stored wider than in the float checkpoint (F32 where it has F16/BF16)."""
    mine = stored_dtypes(checkpoint)
    return sorted(k for k, d in mine.items() if d == "F32" and float_dtypes.get(k) in ("F16", "BF16"))


def _check_dense(model, window) -> float:
    """Max |logit| difference between the QuantLinear forward and the dense one on a short prefix."""
    import torch

    from llmquant.evaluate import _window_logits

    prefix = window[:CHECK_TOKENS]
    with torch.inference_mode():
        before = _window_logits(model, prefix, torch.device("cpu"))
        densify(model)
        after = _window_logits(model, prefix, torch.device("cpu"))
    return float((before - after).abs().max())


# ---------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------


def _fmt(v: float | None, spec: str, dash: str = "—") -> str:
    return dash if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def markdown_table(report: dict) -> str:
    rows = report["runs"]
    n_windows, seqlen = report["eval"]["n_windows"], report["eval"]["seqlen"]
    float_ppl = next((r.get("perplexity") for r in rows if r["id"] == "float16"), None)
    columns = [
        "run",
        "library",
        "settings",
        "format",
        "quant time (s)",
        "quant CPU (s)",
        "peak RSS quant (GiB)",
        "RSS after float load (GiB)",
        "checkpoint (MB)",
        f"wikitext-2 ppl ({n_windows}×{seqlen})",
        "Δppl vs float",
        "KL to float (nats/token)",
        "notes",
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        ppl = r.get("perplexity")
        delta = None
        if ppl is not None and float_ppl is not None and r["id"] != "float16":
            delta = 100 * (ppl / float_ppl - 1)
        notes = r.get("error") or r.get("note") or ""
        if r.get("upcast_tensors"):
            names = r["upcast_tensors"]
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            notes = (
                notes + "; " if notes else ""
            ) + f"{names[0]}{more} stored as float32 (float16 in the input)"
        code, ref = r.get("code") or {}, report.get("code") or {}
        if code.get("commit") and code.get("commit") != ref.get("commit"):
            notes = (notes + "; " if notes else "") + f"quantized at llmquant {code['commit']}"
        if code.get("dirty"):
            files = ", ".join(line[3:] for line in code["dirty"])
            notes = (notes + "; " if notes else "") + f"uncommitted edits in {files} at quantization time"
        size = r.get("checkpoint_bytes")
        cells = [
            f"`{r['id']}`",
            r["library"],
            str(r["settings"]),
            r.get("format") or "—",
            _fmt(r.get("quant_seconds"), ".1f"),
            _fmt(r.get("quant_cpu_seconds"), ".0f"),
            _gib(r.get("peak_rss_bytes")),
            _gib(r.get("rss_after_load_bytes")),
            _fmt(None if size is None else size / 1e6, ".1f"),
            _fmt(ppl, ".3f"),
            "—" if delta is None else f"{delta:+.1f}%",
            _fmt(r.get("kl_divergence"), ".4f"),
            notes.replace("|", "/").replace("\n", " "),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


PEERS_FROM_REFERENCE = """\
Peers: **not run by this command** (`--peers` takes 45–60 min per peer on this CPU). Their numbers
below are copied from `../shared/reference/peer-results.md` (same protocol, same machine type), not
measured by this script; they were timed with two such jobs sharing the machine (upper bounds).

| run | library | settings | quant time | peak RSS | ppl (40×2048) | ppl (12×2048) |
|---|---|---|---|---|---|---|
| float16 | (reference) | — | — | — | 20.57 | 20.41 |
| GPTQ | llm-compressor 0.14.0.1 | W4A16 sym, group 64, actorder static | 2,702 s | 1.75 GiB | 27.81 | 27.13 |
| GPTQ | llm-compressor 0.14.0.1 | group 128 | refused (576 = 4.5 × 128) | — | — | — |
| GPTQ | GPTQModel 7.7.0 | w4 g128 sym, desc_act off, damp 0.05 | 3,589 s | 1.50 GiB | 30.72 | — |
| RTN | (reference) | w4 asym min-max g64 / g128 | 1.4 s / 4.6 s | — | 27.31 / 28.32 | — |
| RTN | (reference) | w4 sym g64 (absmax/7.5, codes in [−8, 7]) | — | — | — | 28.35 |

To measure the peers here: `python scripts/bench_quality.py --peers` (first use creates
`~/.cache/llmquant/peers/{llmcompressor,gptqmodel}`: venv, the CPU torch wheel first, then the pinned
library; `--peers --dry-run` prints every command). Their checkpoints are evaluated with our evaluator
after loading them with `llmquant.from_pretrained`; a checkpoint it cannot read is reported as such.
That path has been exercised end to end on a tiny random LLaMA (both venvs install in 2–4 min, both
peers quantize, llmquant loads and evaluates both checkpoints), not on SmolLM2. GPTQModel 7.7.0 requires
torch>=2.14.1, so pip replaces the CPU torch 2.13.0 wheel in its venv with PyPI's CUDA build (~6 GB venv);
on CPU it loads the model in bfloat16 by itself (`dtype="auto"`).
"""

PEERS_MEASURED = """\
Peers (rows marked with a library other than llmquant): measured by this command, each in its own
virtualenv under `~/.cache/llmquant/peers/`, on the identical calibration ids, with the settings of
`../shared/reference/peer-results.md`; their saved checkpoints are loaded with
`llmquant.from_pretrained` and evaluated with the same evaluator on the same windows.
"""

DOCS_TEMPLATE = """\
{heading}

Measured {date} on {machine} ({minutes:.0f} min for the whole command), llmquant commit
{commit}, by:

```
{command}
```

Protocol (the one in `../shared/reference/peer-results.md`):
- Model: {model}
- Calibration: {n_samples} × {calib_seqlen} tokens cut consecutively from the start of
  `{calib_file}` (tokenized whole; {calib_tokens:,} tokens available), the identical ids for every
  quantizer, seed 0. GPTQ: damp 0.01, block 128, true-sequential, act-order with static groups (llmquant
  defaults).
- Evaluation: `{eval_file}` tokenized whole ({corpus_tokens:,} tokens), the first **{n_windows}**
  non-overlapping {seqlen}-token windows ({n_tokens:,} predicted tokens), perplexity = exp(mean next-token
  NLL); KL = mean KL(P_float ‖ P_quant) per predicted token on the same positions. Every quantized
  model is loaded from its SAVED checkpoint with `llmquant.from_pretrained(path, dtype=torch.float32)`,
  the float model with transformers in float32.{windows_note}
- Quant time: wall clock of `llmquant.quantize()` alone, in a fresh process per run (model load,
  tokenization and saving excluded); quant CPU = user + system CPU seconds of that process over the
  same span (2 threads, so up to 2× the wall time on an idle machine). Peak RSS: `ru_maxrss` of that
  process at the end of quantization; it includes the float model, loaded whole in float16 (the
  process's RSS right after that load is the next column). Checkpoint: bytes of the saved
  `*.safetensors` (sym → `gptq`, asym → `gptq_v2`; the float row is the float16 checkpoint).
- Machine: {machine}, shared with other jobs while this ran{nice_note}, so times are
  upper bounds; compare ratios within the table.

{table}
{extra}{peers}
Every number (per-window NLL/KL, RSS, CPU and wall times, code versions) and the command line are
in `{results}` (not committed).
"""


def docs_section(report: dict, table: str) -> str:
    ev, cal, mach = report["eval"], report["calibration"], report["machine"]
    measured_peers = any(r.get("peer") and r.get("perplexity") is not None for r in report["runs"])
    windows_note = (
        "\n  Fewer than the 40 windows of the peers' main table, to keep the run time down on this CPU;\n"
        "  peer-results.md also lists 12-window numbers for some runs."
        if ev["n_windows"] < 40
        else ""
    )
    extra = []
    if "--resume" in report.get("argv", []):
        extra.append(
            "This invocation used `--resume`: checkpoints (and per-window results) of an earlier invocation "
            "with identical run specs in the same output directory were reused, so their quant time, CPU "
            "and RSS columns come from that earlier invocation (same machine, same day)."
        )
    extra += list(report.get("notes", []))
    ran = {r["id"] for r in report["runs"]}
    missing = [r.id for r in RUNS if r.id not in ran]
    if missing:
        gptq = [
            r["quant_seconds"] for r in report["runs"] if r["id"].startswith("gptq") and "quant_seconds" in r
        ]
        span = f"{min(gptq):.0f}" if gptq and round(min(gptq)) == round(max(gptq)) else None
        span = span or (f"{min(gptq):.0f}–{max(gptq):.0f}" if gptq else None)
        took = f"GPTQ took {span} s per run here" if span else "time"
        extra.append(
            f"Not run this time ({took}): "
            + ", ".join(f"`{m}`" for m in missing)
            + "; add them to the same table with `--resume --runs <all ids>`."
        )
    return DOCS_TEMPLATE.format(
        extra="".join(textwrap.fill(e, 105) + "\n\n" for e in extra),
        heading=DOCS_SECTION,
        date=report["date"],
        nice_note=f" (at niceness {mach['niceness']})" if mach.get("niceness") else "",
        model=(
            "SmolLM2-135M-Instruct as a float16 HF checkpoint (`scripts/prepare_test_model.py`); it was\n"
            '  converted from a Q4_1 GGUF, so its "float" weights already carry 4-bit rounding of their own.'
            if report.get("default_model")
            else f"`{report['model']}`"
        ),
        commit=(report.get("code") or {}).get("commit"),
        machine=mach["description"],
        minutes=report["total_seconds"] / 60,
        command=report["command"],
        n_samples=cal["n_samples"],
        calib_seqlen=cal["seqlen"],
        calib_file=cal["file_display"],
        calib_tokens=cal["tokens_available"],
        eval_file=ev["file_display"],
        corpus_tokens=ev["corpus_tokens"],
        n_windows=ev["n_windows"],
        seqlen=ev["seqlen"],
        n_tokens=ev["n_tokens"],
        windows_note=windows_note,
        table=table,
        peers=PEERS_MEASURED if measured_peers else PEERS_FROM_REFERENCE,
        results=report.get("results_display", "OUT/results.json"),
    )


def update_docs(path: Path, section: str) -> None:
    """Replace the Quality section (up to the next ``## `` heading) or insert it above the Kernels one."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip() == DOCS_SECTION), None)
    if start is not None:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    else:
        anchor = next((i for i, ln in enumerate(lines) if ln.rstrip() == DOCS_ANCHOR), None)
        start = end = anchor if anchor is not None else len(lines)
    block = section.rstrip("\n") + "\n\n"
    path.write_text("".join(lines[:start]) + block + "".join(lines[end:]))


def write_outputs(report: dict, out: Path, append_docs: Path | None) -> None:
    """results.md (and the docs section) from a report; results.json is written by the caller."""
    table = markdown_table(report)
    ev = report["eval"]
    md = f"# Quality: {ev['n_windows']} × {ev['seqlen']} tokens\n\n`{report['command']}`\n\n{table}"
    (out / "results.md").write_text(md)
    print()
    print(table)
    print(f"wrote {out / 'results.md'} and {out / 'results.json'} ({report['total_seconds']:.0f} s in all)")
    if append_docs is not None:
        update_docs(append_docs, docs_section(report, table))
        print(f"updated the Quality section of {append_docs}")


def _machine() -> dict[str, Any]:
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


def _display(path: Path) -> str:
    try:
        return os.path.relpath(path, REPO)
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------


def _dry_run(args, paths: dict[str, Path]) -> int:
    print("# dry run: the commands bench_quality.py would run (nothing is executed)")
    print(f"# calibration: {args.n_samples} x {args.calib_seqlen} tokens from {args.calib_file}")
    print(f"#   -> {paths['calib_ids']} (the ids every quantizer reads, peers included)")
    for run in args.run_specs:
        if run.method == "float":
            continue
        spec = paths["runs"] / f"{run.id}.spec.json"
        print(f"# {run.id}: {run.settings} -> {run.format}")
        print(shlex.join([sys.executable, str(Path(__file__).resolve()), "_child", str(spec)]))
    for peer in args.peer_specs:
        print(f"# peer {peer.name}: {peer.label}, {peer.settings}")
        marker = _peer_marker(args.peers_root, peer)
        state = "installed" if marker.is_file() else "to be created"
        print(f"# virtualenv {args.peers_root / peer.name} ({state})")
        for cmd in peer_setup_commands(args.peers_root, peer):
            print(shlex.join(cmd))
        if peer.setup_note:
            print(f"# note: {peer.setup_note}")
        env = " ".join(f"{k}={v}" for k, v in peer.env)
        print((env + " " if env else "") + shlex.join(peer_command(args, peer, paths)))
    print(
        f"# evaluate float16 + {len(args.run_specs) - 1 + len(args.peer_specs)} checkpoints on "
        f"{args.windows} x {args.seqlen} tokens of {args.eval_file}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_child"]:
        return child_main(argv[1])
    t_start = time.perf_counter()
    args = parse_args(argv)
    code = code_version()
    command = shlex.join(["python", SCRIPT_REL, *argv])
    out = args.out.resolve()
    paths = {
        "out": out,
        "runs": out / "runs",
        "checkpoints": out / "checkpoints",
        "logs": out / "logs",
        "calib_ids": out / "calibration_ids.safetensors",
    }
    paths["model"] = (args.model.expanduser().resolve() if args.model else None) or Path(
        "<SmolLM2 test model>"
    )
    if args.dry_run:
        return _dry_run(args, paths)
    if args.render_only:
        report = json.loads((out / "results.json").read_text())
        if args.note:  # notes given at render time replace the stored ones
            report["notes"] = args.note
            _write_json(out / "results.json", report)
        write_outputs(report, out, args.append_docs)
        return 0
    if args.model is None:
        paths["model"] = _default_model()
    for f in (args.calib_file, args.eval_file):
        if not f.is_file():
            print(f"error: {f} does not exist", file=sys.stderr)
            return 2
    for key in ("out", "runs", "checkpoints", "logs"):
        paths[key].mkdir(parents=True, exist_ok=True)

    if args.peer_setup_only:
        for peer in args.peer_specs:
            t0 = time.perf_counter()
            ensure_peer_venv(args.peers_root, peer, paths["logs"] / f"peer-setup-{peer.name}.log")
            print(f"[peers] {peer.name}: ready in {time.perf_counter() - t0:.0f} s", flush=True)
        return 0

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmquant.calibration import load_calibration
    from llmquant.config import CalibrationConfig
    from llmquant.evaluate import tokenize_corpus
    from llmquant.loading import from_pretrained

    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(paths["model"])
    calib_cfg = CalibrationConfig(
        source=str(args.calib_file), n_samples=args.n_samples, seqlen=args.calib_seqlen, seed=SEED
    )
    blocks = load_calibration(calib_cfg, tokenizer)
    n_calib_tokens = len(
        tokenizer(args.calib_file.read_text(encoding="utf-8"), add_special_tokens=False, verbose=False)[
            "input_ids"
        ]
    )
    save_file(
        {"input_ids": blocks.input_ids.contiguous(), "attention_mask": blocks.attention_mask.contiguous()},
        str(paths["calib_ids"]),
        metadata={"fingerprint": blocks.fingerprint, "source": str(args.calib_file)},
    )
    print(
        f"calibration: {args.n_samples} x {args.calib_seqlen} tokens from {args.calib_file} "
        f"({n_calib_tokens:,} available), fingerprint {blocks.fingerprint[:12]}",
        flush=True,
    )

    # 1. quantization, each run in a fresh subprocess
    results: dict[str, dict] = {}
    t_quant = time.perf_counter()
    for run in args.run_specs:
        if run.method != "float":
            results[run.id] = run_quantization(args, run, paths, blocks.fingerprint)
    for peer in args.peer_specs:
        results[peer.run_id] = run_peer(args, peer, paths)
    quant_phase_seconds = time.perf_counter() - t_quant

    # 2. evaluation, all models together, window by window
    t_eval = time.perf_counter()
    eval_ids = tokenize_corpus(tokenizer, args.eval_file)
    eval_sha = sha256_file(args.eval_file)
    float_model = AutoModelForCausalLM.from_pretrained(paths["model"], dtype=torch.float32).eval()
    models: list[tuple[str, Any]] = [("float16", float_model)]
    stamps = {"__eval__": eval_sha, "float16": f"float:{paths['model']}"}
    check_window = eval_ids[: args.seqlen]
    float_dtypes = stored_dtypes(paths["model"])
    for rid, res in results.items():
        if "error" in res:
            continue
        try:
            model = from_pretrained(res["checkpoint"], dtype=torch.float32, progress=False)
            res["dense_check_max_abs_diff"] = _check_dense(model, check_window)
            res["upcast_tensors"] = upcast_tensors(Path(res["checkpoint"]), float_dtypes)
        except Exception as exc:  # a checkpoint our reader cannot load: say why in the table
            res["error"] = f"cannot load with llmquant.from_pretrained: {type(exc).__name__}: {exc}"[:300]
            continue
        models.append((rid, model))
        stamps[rid] = str(res.get("finished_at", res.get("checkpoint")))
    metrics = evaluate_all(args, models, float_model, eval_ids, paths, stamps)
    eval_phase_seconds = time.perf_counter() - t_eval

    # 3. report
    float_bytes = dir_bytes(paths["model"], "*.safetensors")
    rows: list[dict[str, Any]] = []
    for run in args.run_specs:
        row: dict[str, Any] = {
            "id": run.id,
            "library": "—" if run.method == "float" else f"llmquant {run.method.upper()}",
            "settings": run.settings,
            "format": run.format,
            "peer": False,
        }
        if run.method == "float":
            row["checkpoint_bytes"] = float_bytes
        else:
            row["config"] = run.method_config()
            row.update({k: v for k, v in results[run.id].items() if k != "spec"})
        row.update(metrics.get(run.id, {}))
        rows.append(row)
    for peer in args.peer_specs:
        row = {"id": peer.run_id, "library": peer.label, "settings": peer.settings, "peer": True}
        peer_result = dict(results[peer.run_id])
        peer_result.pop("spec", None)
        row["peer_args"] = peer_result.pop("settings", None)  # the peer script's argparse namespace
        row["peer_library"] = peer_result.pop("library", None)
        row.update(peer_result)
        row.update(metrics.get(peer.run_id, {}))
        row.setdefault("note", peer.reference)
        rows.append(row)
    n_windows = metrics["float16"]["n_windows"]
    report = {
        "command": command,
        "argv": argv,
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": _machine(),
        "model": str(paths["model"]),
        "default_model": args.model is None,
        "notes": args.note,
        "results_display": _display(out / "results.json"),
        "code": code,
        "calibration": {
            "file": str(args.calib_file),
            "file_display": _display(args.calib_file),
            "sha256": sha256_file(args.calib_file),
            "n_samples": args.n_samples,
            "seqlen": args.calib_seqlen,
            "tokens_available": n_calib_tokens,
            "fingerprint": blocks.fingerprint,
            "ids_file": str(paths["calib_ids"]),
            "seed": SEED,
        },
        "eval": {
            "file": str(args.eval_file),
            "file_display": _display(args.eval_file),
            "sha256": eval_sha,
            "corpus_tokens": int(eval_ids.numel()),
            "n_windows": n_windows,
            "seqlen": args.seqlen,
            "n_tokens": metrics["float16"]["n_tokens"],
            "windows_requested": args.windows,
        },
        "quant_phase_seconds": quant_phase_seconds,
        "eval_phase_seconds": eval_phase_seconds,
        "total_seconds": time.perf_counter() - t_start,
        "runs": rows,
    }
    _write_json(out / "results.json", report)
    write_outputs(report, out, args.append_docs)
    failed = [r["id"] for r in rows if r.get("error") and not r.get("peer")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
