"""Quality benchmark: float / RTN / GPTQ / AWQ (and, with ``--peers``, GPTQModel and llm-compressor).

For every run: wikitext-2 perplexity over non-overlapping ``--seqlen`` windows (default the first 40 windows
of 2048 tokens), mean KL(float || quantized) per predicted token on the same windows, wall time of the
quantization step alone, peak RSS of the process doing it, and the checkpoint size on disk. Protocol:
``/work/shared/reference/peer-results.md`` (mirrored in the Quality section of ``docs/benchmarks.md``).

1. Calibration ids are cut once, here: ``--n-samples`` x ``--calib-seqlen`` consecutive tokens from the
   start of ``--calib-file`` (seed 0), written to ``OUT/calibration_ids.safetensors``; every quantizer,
   ours and the peers', reads exactly these ids.
2. Every quantization runs in a fresh process (``benchlib/runs.py``; peers in their own virtualenvs,
   ``peers/venvs.py``) that saves its checkpoint under ``OUT/checkpoints/<run>``.
3. The SAVED checkpoints are loaded and scored with ``llmquant.evaluate.evaluate_models`` against the float
   model, its logits computed once per window (``benchlib/evaluation.py``): bitwise the numbers of
   ``llmquant.evaluate.evaluate(model, ids, base_model=float_model)``.
4. Output: ``OUT/results.md`` (the table, also printed), ``OUT/results.json`` (every number, per-window
   values, the command line), with ``--append-docs`` the Quality section of ``docs/benchmarks.md``
   (``benchlib/report.py``). Per-window scores go to ``OUT/eval_windows.jsonl`` as they are computed;
   ``--resume`` reuses them and the checkpoints of runs whose spec is unchanged.

Usage:
    python scripts/bench_quality.py --windows 40 --out bench_out/quality --append-docs
    python scripts/bench_quality.py --runs float16,rtn-g64-asym,gptq-g64-asym --windows 12
    python scripts/bench_quality.py --peers --dry-run        # print every command, run nothing
    python scripts/bench_quality.py --peers --peer-setup-only  # create/install the peers' virtualenvs
    python scripts/bench_quality.py --quick --model DIR --eval-file F --calib-file F --seqlen 64 ...
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import evaluation, report, runs, util  # noqa: E402
from benchlib.runs import QUICK_RUNS, RUNS, RUNS_BY_ID, SEED  # noqa: E402
from peers import venvs  # noqa: E402

SCRIPT_REL = "scripts/bench_quality.py"
DEFAULT_CALIB = "../shared/data/calibration/c4.utf8"  # relative to the repository root
DEFAULT_EVAL = "../shared/data/wikitext-2-raw/wiki.test.raw"


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
    p.add_argument(
        "--peer-names",
        default=",".join(venvs.DEFAULT_PEER_RUNS),
        help=f"peer runs (comma-separated run ids or venv names; known: {', '.join(venvs.PEERS_BY_RUN)})",
    )
    p.add_argument(
        "--peers-root", type=Path, default=venvs.DEFAULT_PEERS_ROOT, help="where the peer venvs live"
    )
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
        const=util.REPO / "docs" / "benchmarks.md",
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
    ids = ids if ids is not None else (QUICK_RUNS if args.quick else [r.id for r in RUNS])
    unknown = [i for i in ids if i not in RUNS_BY_ID]
    if unknown:
        p.error(f"unknown run id(s) {unknown}; known: {', '.join(RUNS_BY_ID)}")
    args.run_specs = [RUNS_BY_ID["float16"]] + [RUNS_BY_ID[i] for i in dict.fromkeys(ids) if i != "float16"]
    names = [s.strip() for s in args.peer_names.split(",") if s.strip()]
    known = set(venvs.PEERS_BY_RUN) | {peer.name for peer in venvs.PEERS}
    bad = [n for n in names if n not in known]
    if bad:
        p.error(f"unknown peer(s) {bad}; known: {', '.join(venvs.PEERS_BY_RUN)}")
    args.peer_specs = venvs.select_peers(names) if (args.peers or args.peer_setup_only) else []
    args.calib_file = _repo_path(args.calib_file, DEFAULT_CALIB)
    args.eval_file = _repo_path(args.eval_file, DEFAULT_EVAL)
    return args


def _repo_path(path: Path | None, default: str) -> Path:
    return Path(path).expanduser().resolve() if path is not None else (util.REPO / default).resolve()


def _default_model() -> Path:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "prepare_test_model", util.REPO / "scripts/prepare_test_model.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return Path(module.prepare_test_model())


def _dry_run(args: argparse.Namespace, paths: dict[str, Path]) -> int:
    print("# dry run: the commands bench_quality.py would run (nothing is executed)")
    print(f"# calibration: {args.n_samples} x {args.calib_seqlen} tokens from {args.calib_file}")
    print(f"#   -> {paths['calib_ids']} (the ids every quantizer reads, peers included)")
    for run in args.run_specs[1:]:
        print(f"# {run.id}: {run.settings} -> {run.format}")
        print(shlex.join(runs.child_command(paths["runs"] / f"{run.id}.spec.json")))
    for peer in args.peer_specs:
        venvs.print_plan(args.peers_root, peer, paths)
    print(
        f"# evaluate float16 + {len(args.run_specs) - 1 + len(args.peer_specs)} checkpoints on "
        f"{args.windows} x {args.seqlen} tokens of {args.eval_file}"
    )
    return 0


def _calibrate(args: argparse.Namespace, paths: dict[str, Path]) -> tuple[Any, Any, dict[str, Any]]:
    """Tokenizer, calibration blocks (also written for the children and peers), calibration report."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from llmquant.calibration import load_calibration
    from llmquant.config import CalibrationConfig

    tokenizer = AutoTokenizer.from_pretrained(paths["model"])
    cfg = CalibrationConfig(
        str(args.calib_file), n_samples=args.n_samples, seqlen=args.calib_seqlen, seed=SEED
    )
    blocks = load_calibration(cfg, tokenizer)
    text = args.calib_file.read_text(encoding="utf-8")
    n_tokens = len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    save_file(
        {"input_ids": blocks.input_ids.contiguous(), "attention_mask": blocks.attention_mask.contiguous()},
        str(paths["calib_ids"]),
        metadata={"fingerprint": blocks.fingerprint, "source": str(args.calib_file)},
    )
    print(
        f"calibration: {args.n_samples} x {args.calib_seqlen} tokens from {args.calib_file} "
        f"({n_tokens:,} available), fingerprint {blocks.fingerprint[:12]}",
        flush=True,
    )
    info = {"file": str(args.calib_file), "file_display": util.display(args.calib_file)}
    info |= {
        "sha256": util.sha256_file(args.calib_file),
        "n_samples": args.n_samples,
        "seqlen": args.calib_seqlen,
    }
    info |= {"tokens_available": n_tokens, "fingerprint": blocks.fingerprint}
    return tokenizer, blocks, info | {"ids_file": str(paths["calib_ids"]), "seed": SEED}


def _evaluate(args: argparse.Namespace, paths: dict, tokenizer: Any, results: dict) -> tuple[dict, dict]:
    """Every model's metrics by run id, and the evaluation report."""
    from llmquant.evaluate import tokenize_corpus

    ids = tokenize_corpus(tokenizer, args.eval_file)
    sha = util.sha256_file(args.eval_file)
    models = evaluation.load_models(results, paths["model"], ids[: args.seqlen])
    stamps = {"__eval__": sha, "float16": f"float:{paths['model']}"}
    for rid in list(models)[1:]:  # the checkpoint's identity: when it was written
        stamps[rid] = str(results[rid].get("finished_at", results[rid].get("checkpoint")))
    metrics = evaluation.evaluate_runs(
        models,
        ids,
        seqlen=args.seqlen,
        windows=args.windows,
        out=paths["out"],
        stamps=stamps,
        resume=args.resume,
    )
    info = {"file": str(args.eval_file), "file_display": util.display(args.eval_file), "sha256": sha}
    info |= {"corpus_tokens": int(ids.numel()), "n_windows": metrics["float16"]["n_windows"]}
    info |= {
        "seqlen": args.seqlen,
        "n_tokens": metrics["float16"]["n_tokens"],
        "windows_requested": args.windows,
    }
    return metrics, info


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_child"]:
        return runs.child_main(argv[1])
    t_start = time.perf_counter()
    args = parse_args(argv)
    code = util.code_version()
    out = args.out.resolve()
    paths = {"out": out, "runs": out / "runs", "checkpoints": out / "checkpoints", "logs": out / "logs"}
    paths["calib_ids"] = out / "calibration_ids.safetensors"
    paths["model"] = args.model.expanduser().resolve() if args.model else Path("<SmolLM2 test model>")
    if args.dry_run:
        return _dry_run(args, paths)
    if args.render_only:
        rep = json.loads((out / "results.json").read_text())
        if args.note:  # notes given at render time replace the stored ones
            rep["notes"] = args.note
            util.write_json(out / "results.json", rep)
        report.write_outputs(rep, out, args.append_docs)
        return 0
    paths["model"] = paths["model"] if args.model else _default_model()
    for f in (args.calib_file, args.eval_file):
        if not f.is_file():
            print(f"error: {f} does not exist", file=sys.stderr)
            return 2
    for key in ("out", "runs", "checkpoints", "logs"):
        paths[key].mkdir(parents=True, exist_ok=True)
    if args.peer_setup_only:
        for peer in args.peer_specs:
            t0 = time.perf_counter()
            venvs.ensure_peer_venv(args.peers_root, peer, paths["logs"] / f"peer-setup-{peer.name}.log")
            print(f"[peers] {peer.name}: ready in {time.perf_counter() - t0:.0f} s", flush=True)
        return 0
    import torch

    torch.manual_seed(SEED)
    tokenizer, blocks, calibration = _calibrate(args, paths)
    t0 = time.perf_counter()
    results = {
        run.id: runs.run_quantization(
            run,
            runs.child_spec(run, paths, args.calib_file, blocks.fingerprint, args.batch_size),
            paths,
            args.resume,
        )
        for run in args.run_specs[1:]
    }
    results |= {p.run_id: venvs.run_peer(args.peers_root, p, paths, args.resume) for p in args.peer_specs}
    quant_phase_seconds, t0 = time.perf_counter() - t0, time.perf_counter()
    metrics, eval_info = _evaluate(args, paths, tokenizer, results)
    float_bytes = util.dir_bytes(paths["model"], "*.safetensors")
    rep = {
        "command": shlex.join(["python", SCRIPT_REL, *argv]), "argv": argv, "date": report.now(),
        "machine": util.machine(), "model": str(paths["model"]), "default_model": args.model is None,
        "notes": args.note, "results_display": util.display(out / "results.json"), "code": code,
        "calibration": calibration, "eval": eval_info, "quant_phase_seconds": quant_phase_seconds,
        "eval_phase_seconds": time.perf_counter() - t0, "total_seconds": time.perf_counter() - t_start,
        "runs": report.result_rows(args.run_specs, args.peer_specs, results, metrics, float_bytes),
    }  # fmt: skip
    util.write_json(out / "results.json", rep)
    report.write_outputs(rep, out, args.append_docs)
    return 1 if any(r.get("error") and not r.get("peer") for r in rep["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
