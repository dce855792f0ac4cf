"""scripts/bench_quality.py: the --quick path end to end on a tiny random LLaMA (no SmolLM2), the docs
section writer, and the --peers --dry-run path (prints the commands, runs nothing)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_quality.py"
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


@pytest.fixture(scope="module")
def bench():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("bench_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def _eval_text(path: Path) -> Path:
    g = torch.Generator().manual_seed(1)
    lines = [
        " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (12,), generator=g).tolist())
        for _ in range(80)
    ]
    path.write_text("\n".join(lines))
    return path


def test_quick_end_to_end(bench, tiny_checkpoint: Path, calib_text_file: Path, tmp_path: Path) -> None:  # noqa: ANN001
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
    assert bench.main(argv) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["argv"] == argv and report["command"].startswith("python scripts/bench_quality.py --quick")
    runs = {r["id"]: r for r in report["runs"]}
    assert list(runs) == ["float16", "rtn-g64-asym", "gptq-g64-sym"]
    assert report["eval"]["n_windows"] == 2 and report["calibration"]["n_samples"] == 16
    for rid, r in runs.items():
        assert "error" not in r, r.get("error")
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1
        assert math.isfinite(r["kl_divergence"]) and r["kl_divergence"] >= 0
        assert r["checkpoint_bytes"] > 0
        if rid != "float16":
            assert r["kl_divergence"] > 0 and r["quant_seconds"] > 0
            assert r["peak_rss_bytes"] >= r["rss_after_load_bytes"] > 0
            assert r["dense_check_max_abs_diff"] == 0.0  # dequantize-once == QuantLinear forward
    assert runs["rtn-g64-asym"]["format"] == "gptq_v2" and runs["gptq-g64-sym"]["format"] == "gptq"

    # the same numbers as llmquant.evaluate.evaluate() run directly
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    ids = tokenize_corpus(tokenizer, eval_file)
    float_model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    ref = evaluate(float_model, ids, seqlen=64, windows=2, progress=False)
    assert runs["float16"]["perplexity"] == ref.perplexity
    assert runs["float16"]["n_tokens"] == ref.n_tokens == 2 * 63
    quant = from_pretrained(runs["gptq-g64-sym"]["checkpoint"], dtype=torch.float32, progress=False)
    ref_q = evaluate(quant, ids, seqlen=64, windows=2, base_model=float_model, progress=False)
    assert runs["gptq-g64-sym"]["perplexity"] == pytest.approx(ref_q.perplexity, rel=1e-12)
    assert runs["gptq-g64-sym"]["kl_divergence"] == pytest.approx(ref_q.kl_divergence, rel=1e-9)

    # outputs: table, docs section above Kernels (Kernels untouched); --resume reuses everything
    md = (out / "results.md").read_text()
    assert "| `gptq-g64-sym` |" in md and "(2×64)" in md
    text = docs.read_text()
    assert text.index("## Quality") < text.index("## Kernels") and text.endswith(
        "## Kernels\n\nkernel table\n"
    )
    assert "python scripts/bench_quality.py --quick" in text
    assert bench.main([*argv, "--resume"]) == 0
    again = {r["id"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert again["gptq-g64-sym"]["perplexity"] == runs["gptq-g64-sym"]["perplexity"]
    assert docs.read_text().count("## Quality") == 1


def test_update_docs_replaces_only_quality(bench, tmp_path: Path) -> None:  # noqa: ANN001
    docs = tmp_path / "b.md"
    docs.write_text("# Benchmarks\n\n## Quality\n\nold\n\n## Kernels\n\nK\n")
    bench.update_docs(docs, "## Quality\n\nnew table\n")
    assert docs.read_text() == "# Benchmarks\n\n## Quality\n\nnew table\n\n## Kernels\n\nK\n"


def test_peers_dry_run_prints_commands(bench, tmp_path: Path, capsys) -> None:  # noqa: ANN001
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
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert (
        "torch==2.13.0" in printed and "llmcompressor==0.14.0.1" in printed and "gptqmodel==7.7.0" in printed
    )
    assert printed.index("torch==2.13.0") < printed.index("llmcompressor==0.14.0.1")  # CPU torch first
    assert "GPTQMODEL_CPU_WORKERS=2" in printed and "scripts/peers/gptqmodel_gptq.py" in printed
    assert "gptq-g64-asym-mse" in printed and "12 x 2048" in printed
    assert not root.exists() and not (tmp_path / "o").exists()


def test_rejects_unknown_run(bench, tmp_path: Path) -> None:  # noqa: ANN001
    with pytest.raises(SystemExit):
        bench.main(["--runs", "gptq-g32-foo", "--dry-run", "--out", str(tmp_path)])
