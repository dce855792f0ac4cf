"""scripts/bench_quality.py as a command: --quick end to end on a tiny random LLaMA (no SmolLM2), its
outputs (table, JSON, per-window file, docs section), --resume and --render-only, and --peers --dry-run
(prints the commands, runs nothing)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "bench_quality.py"
WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "while",
    "quantized",
    "weights",
    "stay",
    "close",
    "to",
    "the",
    "float",
    "model",
    "in",
    "every",
    "layer",
]


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *argv], cwd=cwd, capture_output=True, text=True, timeout=900
    )


def _eval_text(path: Path) -> Path:
    g = torch.Generator().manual_seed(1)
    lines = [
        " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (12,), generator=g).tolist())
        for _ in range(80)
    ]
    path.write_text("\n".join(lines))
    return path


def test_quick_end_to_end(tiny_checkpoint: Path, calib_text_file: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmquant.evaluate import evaluate, tokenize_corpus
    from llmquant.loading import from_pretrained

    eval_file = _eval_text(tmp_path / "eval.txt")
    out = tmp_path / "out"
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## Kernels\n\nkernel table\n")
    argv = [
        "--quick",
        "--model", str(tiny_checkpoint),
        "--eval-file", str(eval_file),
        "--calib-file", str(calib_text_file),
        "--seqlen", "64",
        "--calib-seqlen", "32",
        "--out", str(out),
        "--append-docs", str(docs),
    ]  # fmt: skip
    proc = _run(argv, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert report["argv"] == argv and report["command"].startswith("python scripts/bench_quality.py --quick")
    runs = {r["id"]: r for r in report["runs"]}
    assert list(runs) == ["float16", "rtn-g64-asym", "gptq-g64-sym"]
    assert report["eval"]["n_windows"] == 2 and report["calibration"]["n_samples"] == 16
    for rid, r in runs.items():
        assert "error" not in r, r.get("error")
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1
        assert math.isfinite(r["kl_divergence"]) and r["kl_divergence"] >= 0
        assert r["checkpoint_bytes"] > 0 and len(r["per_window_nll"]) == 2
        if rid != "float16":
            assert r["kl_divergence"] > 0 and r["quant_seconds"] > 0
            assert r["peak_rss_bytes"] >= r["rss_after_load_bytes"] > 0
            assert r["dense_check_max_abs_diff"] == 0.0  # dequantize-once == QuantLinear forward
    assert runs["rtn-g64-asym"]["format"] == "gptq_v2" and runs["gptq-g64-sym"]["format"] == "gptq"
    records = (out / "eval_windows.jsonl").read_text().splitlines()
    assert sorted((json.loads(r)["run"], json.loads(r)["window"]) for r in records) == sorted(
        (rid, w) for rid in runs for w in (0, 1)
    )

    # bitwise the numbers of llmquant.evaluate.evaluate() run directly on the saved checkpoints
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    ids = tokenize_corpus(tokenizer, eval_file)
    float_model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    ref = evaluate(float_model, ids, seqlen=64, windows=2, progress=False)
    assert runs["float16"]["perplexity"] == ref.perplexity
    assert runs["float16"]["n_tokens"] == ref.n_tokens == 2 * 63
    for rid in ("rtn-g64-asym", "gptq-g64-sym"):
        quant = from_pretrained(runs[rid]["checkpoint"], dtype=torch.float32, progress=False)
        ref_q = evaluate(quant, ids, seqlen=64, windows=2, base_model=float_model, progress=False)
        assert (runs[rid]["perplexity"], runs[rid]["kl_divergence"]) == (
            ref_q.perplexity,
            ref_q.kl_divergence,
        )

    # outputs: table, docs section above Kernels (Kernels untouched)
    md = (out / "results.md").read_text()
    assert "| `gptq-g64-sym` |" in md and "(2×64)" in md
    assert "| `gptq-g64-sym` |" in proc.stdout  # the table is printed too
    text = docs.read_text()
    assert text.index("## Quality") < text.index("## Kernels") and text.endswith(
        "## Kernels\n\nkernel table\n"
    )
    assert "python scripts/bench_quality.py --quick" in text

    # --resume reuses the checkpoints and every per-window score: same numbers, nothing recomputed
    proc = _run([*argv, "--resume"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("reusing") == 2 and "[eval]" not in proc.stdout
    assert (out / "eval_windows.jsonl").read_text().splitlines() == records
    again = {r["id"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    for rid in runs:
        assert again[rid]["perplexity"] == runs[rid]["perplexity"]
        assert again[rid]["kl_divergence"] == runs[rid]["kl_divergence"]
    assert docs.read_text().count("## Quality") == 1

    # --render-only replaces only the Quality section, with the notes given
    docs.write_text("# Benchmarks\n\n## Quality\n\nold\n\n## Kernels\n\nK\n")
    proc = _run(["--out", str(out), "--render-only", "--append-docs", str(docs), "--note", "N1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\n## Quality\n") and text.endswith("\n\n## Kernels\n\nK\n")
    assert "old" not in text and "\nN1\n" in text and "| `rtn-g64-asym` |" in text
    assert json.loads((out / "results.json").read_text())["notes"] == ["N1"]


def test_peers_dry_run_prints_commands(tmp_path: Path) -> None:
    root = tmp_path / "peers"
    argv = [
        "--peers",
        "--dry-run",
        "--peers-root",
        str(root),
        "--out",
        str(tmp_path / "o"),
        "--windows",
        "12",
    ]
    proc = _run(argv, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout
    assert (
        "torch==2.13.0" in printed and "llmcompressor==0.14.0.1" in printed and "gptqmodel==7.7.0" in printed
    )
    assert printed.index("torch==2.13.0") < printed.index("llmcompressor==0.14.0.1")  # CPU torch first
    assert "GPTQMODEL_CPU_WORKERS=2" in printed and "scripts/peers/gptqmodel_gptq.py" in printed
    assert "gptq-g64-asym-mse" in printed and "12 x 2048" in printed
    assert "scripts/bench_quality.py _child" in printed
    assert not root.exists() and not (tmp_path / "o").exists()


def test_rejects_unknown_run(tmp_path: Path) -> None:
    proc = _run(["--runs", "gptq-g32-foo", "--dry-run", "--out", str(tmp_path)], tmp_path)
    assert proc.returncode == 2 and "unknown run id(s) ['gptq-g32-foo']" in proc.stderr
