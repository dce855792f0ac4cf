"""scripts/bench_eval_cpu.py on a tiny random LLaMA: three evaluations, identical cached numbers, ratios."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_eval_cpu.py"


def test_reports_float_per_forward_and_cached(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from llmquant import pipeline
    from llmquant.api import save_quantized
    from llmquant.config import QuantScheme, RTNConfig

    result = pipeline.quantize(tiny_checkpoint, RTNConfig(QuantScheme(4, 32, False)), progress=False)
    ckpt = save_quantized(result, tmp_path / "q", format="gptq_v2")
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 37}" for i in range(600)))
    spec = importlib.util.spec_from_file_location("bench_eval_cpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "r.json"
    argv = [str(ckpt), str(tiny_checkpoint), "--text", str(text), "--seqlen", "32", "--windows", "2"]
    assert mod.main([*argv, "--repeats", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["windows"] == 2 and set(r["median_wall_cpu_seconds"]) == {"float", "per-forward", "cached"}
    assert r["perplexity"]["cached"] == r["perplexity"]["per-forward"] != r["perplexity"]["float"]
    assert r["ratio_to_float"]["float"] == [1.0, 1.0]
    assert set(r["load_wall_cpu_seconds"]) == {"float", "quantized", "cache_build"}
