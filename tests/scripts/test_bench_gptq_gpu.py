"""scripts/bench_gptq_gpu.py --dry-run: the GPU GPTQ benchmark's code path on a tiny model on the CPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_gptq_gpu.py"


def test_dry_run_quantizes_and_reports(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_gptq_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "r.json"
    assert mod.main(["--dry-run", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    dims = mod.SMOKE
    # every decoder linear was quantized, and the float parameter count is the model's, not the
    # quantized model's (QuantLinear keeps codes in buffers)
    assert r["modules"] == 7 * dims["layers"]
    per_layer = 4 * dims["hidden"] ** 2 + 3 * dims["hidden"] * dims["intermediate"] + 2 * dims["hidden"]
    assert r["params"] == dims["layers"] * per_layer + 2 * dims["vocab"] * dims["hidden"] + dims["hidden"]
    assert r["quantize_wall_s"] > 0 and r["max_damp"] >= 0.01
