"""scripts/ablation_table.py: scores recomputed from bench_quality's per-window cache, only the checkpoint
that the run's result names (its stamp), only the text asked for, and "—" where a window is missing."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("ablation_table", REPO / "scripts" / "ablation_table.py")
assert _spec is not None and _spec.loader is not None
table = importlib.util.module_from_spec(_spec)
sys.modules["ablation_table"] = table
_spec.loader.exec_module(table)

SEQLEN, WINDOWS = 9, 2


def _write(folder: Path, records: list[dict], results: dict[str, dict]) -> None:
    (folder / "runs").mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"model": "m"}))  # the float stamp is "float:m"
    (folder / "eval_windows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for rid, res in results.items():
        (folder / "runs" / f"{rid}.json").write_text(json.dumps(res))


def _rec(run: str, window: int, stamp: str, nll: float, kl: float, sha: str = "text") -> dict:
    return {
        "run": run,
        "window": window,
        "stamp": stamp,
        "seqlen": SEQLEN,
        "eval_sha": sha,
        "nll": nll,
        "kl": kl,
        "forward_seconds": 0.5,
    }


def test_scores_follow_the_stamp_and_the_text(tmp_path: Path) -> None:
    records = [_rec("float16", w, "float:m", 10.0 + w, 0.0) for w in range(WINDOWS)]
    records += [_rec("rtn-g64-sym", w, "old", 99.0, 9.0) for w in range(WINDOWS)]  # an older checkpoint
    records += [_rec("rtn-g64-sym", 0, "123.5", 12.0, 0.8), _rec("rtn-g64-sym", 1, "123.5", 14.0, 1.6)]
    records += [_rec("rtn-g64-sym", w, "123.5", 50.0, 5.0, sha="other") for w in range(WINDOWS)]
    records += [_rec("gptq-g64-sym", 0, "7.0", 11.0, 0.1)]  # one window of two: not scored
    results = {
        "rtn-g64-sym": {"finished_at": 123.5, "quant_seconds": 1.5, "quant_cpu_seconds": 3.0,
                        "peak_rss_bytes": 2**30, "loadavg_1min_before_after": [0.1, 0.2]},
        "gptq-g64-sym": {"finished_at": 7.0, "quant_seconds": 5.0, "quant_cpu_seconds": 9.0},
    }  # fmt: skip
    _write(tmp_path, records, results)
    found = table.collect([tmp_path], "text", WINDOWS, SEQLEN)
    n = WINDOWS * (SEQLEN - 1)
    assert math.isclose(found["float16"]["ppl"], math.exp(21.0 / n))
    assert math.isclose(found["rtn-g64-sym"]["ppl"], math.exp(26.0 / n))
    assert math.isclose(found["rtn-g64-sym"]["kl"], 2.4 / n)
    assert "gptq-g64-sym" not in found
    out = table.render(found)
    row = next(line for line in out.splitlines() if line.startswith("| RTN, min-max grid |"))
    assert row.split(" | ")[1] == f"{math.exp(26.0 / n):.3f} / {2.4 / n:.4f}"
    assert "| `rtn-g64-sym` | 1.5 | 3 | 1.00 | 0.10 / 0.20 |" in out
    gptq_row = next(line for line in out.splitlines() if line.startswith("| GPTQ, min-max grid |"))
    assert gptq_row.split(" | ")[1] == "—"
