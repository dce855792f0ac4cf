"""The ablation table of issue #14 from what ``bench_quality.py`` left in its output folders.

Reads, for every run id of the layout below, ``OUT/runs/<id>.json`` (quantization wall/CPU seconds, peak
RSS) and that checkpoint's per-window scores in ``OUT/eval_windows.jsonl`` (the cache bench_quality
writes while evaluating), recomputes perplexity and KL to float from the windows (nothing is copied
from the docs), and prints two Markdown tables: perplexity / KL per lever and scheme, and each lever's
cost where it was timed, with the machine's 1-minute load average before and after the run (about 2 or
more after: the 2 cores were shared, so that time is an upper bound).
A cell is "—" when that run has not been evaluated in any folder given.

    python scripts/ablation_table.py /tmp/bq /tmp/bqa
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_quality import DEFAULT_EVAL  # noqa: E402
from benchlib import evaluation, util  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCHEMES = ["w4 g64 sym", "w4 g64 asym", "w4 g128 sym", "w4 g128 asym", "w3 g64 asym", "w2 g64 asym"]
_SUFFIX = ["g64-sym", "g64-asym", "g128-sym", "g128-asym", "w3-g64-asym", "w2-g64-asym"]


def _ids(prefix: str, tail: str = "") -> list[str]:
    return [f"{prefix}-{s}{tail}" for s in _SUFFIX]


LEVERS: list[tuple[str, list[str]]] = [
    ("RTN, min-max grid", _ids("rtn")),
    ("RTN, searched grid", _ids("rtn", "-search")),
    ("GPTQ, min-max grid", _ids("gptq")),
    ("GPTQ, searched grid (default grid)", _ids("gptq", "-search")),
    ("GPTQ searched + error propagation α 1", _ids("gptq", "-search-ep")),
    ("GPTQ searched + error propagation α 0.5", _ids("gptq", "-search-ep05")),
    ("GPTQ searched + α 0.5 + `--refine 64`", _ids("gptq", "-search-ep05-refine64")),
    ("… + `--refine-loss relative`", _ids("gptq", "-search-ep05-refine64-rel")),
    ("… + `--refine-scales`", _ids("gptq", "-search-ep05-refine64-scales")),
    ("… + `--refine-loss relative --refine-scales`", _ids("gptq", "-search-ep05-refine64-rel-scales")),
    ("AWQ (+ RTN)", _ids("awq")),
    ("AWQ + GPTQ, searched grid", _ids("awq+gptq", "-search")),
    ("AWQ + GPTQ searched + error propagation α 0.5", _ids("awq+gptq", "-search-ep05")),
    (
        "llm-compressor GPTQ (peer)",
        ["llmcompressor-gptq-g64-sym-ao", "", "", "", "llmcompressor-gptq-w3-g64-asym", ""],
    ),
    (
        "llm-compressor AutoRound light (peer; drops asym zero points)",
        ["", "", "", "", "llmcompressor-autoround-light-w3-g64-asym", ""],
    ),
    ("auto-round, its own API, light recipe (peer)", ["", "", "", "", "autoround-light-w3-g64-asym", ""]),
    ("auto-round, its own API, default recipe (peer)", ["", "", "", "", "autoround-w3-g64-asym", ""]),
]


def _result(folder: Path, rid: str) -> dict | None:
    path = folder / "runs" / f"{rid}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _folder_scores(folder: Path, eval_sha: str, windows: int, seqlen: int) -> dict[str, dict]:
    """run id -> {"ppl", "kl", "result"} for one folder: its cached windows of the checkpoint each run's
    result names (bench_quality's own stamps and reader), scored only when all ``windows`` are there."""
    path, report = folder / "eval_windows.jsonl", folder / "results.json"
    if not path.is_file():
        return {}
    results = {rid: r for _, ids in LEVERS for rid in filter(None, ids) if (r := _result(folder, rid))}
    stamps = {rid: str(r.get("finished_at", r.get("checkpoint"))) for rid, r in results.items()}
    if report.is_file():  # the float model's stamp: bench_quality's "float:<model dir>"
        stamps["float16"] = f"float:{json.loads(report.read_text())['model']}"
    done = evaluation.read_done(path, seqlen, eval_sha, stamps)
    out: dict[str, dict] = {}
    for rid in stamps:
        if any((rid, w) not in done for w in range(windows)):
            continue
        scores = [done[(rid, w)] for w in range(windows)]
        n = windows * (seqlen - 1)  # each window scores seqlen - 1 next-token predictions
        out[rid] = {
            "ppl": math.exp(sum(s.nll for s in scores) / n),
            "kl": sum(s.kl or 0.0 for s in scores) / n,
            "result": results.get(rid, {}),
        }
    return out


def collect(folders: list[Path], eval_sha: str, windows: int, seqlen: int) -> dict[str, dict]:
    """run id -> {"ppl", "kl", "seconds", "cpu", "rss", "load"} for every run of the layout found; the
    first folder that scores a run wins."""
    found: dict[str, dict] = {}
    for folder in folders:
        for rid, score in _folder_scores(folder, eval_sha, windows, seqlen).items():
            if rid in found:
                continue
            res = score.pop("result")
            found[rid] = score | {
                "seconds": res.get("quant_seconds"),
                "cpu": res.get("quant_cpu_seconds"),
                "rss": res.get("peak_rss_bytes"),
                "load": res.get("loadavg_1min_before_after"),
            }
    return found


def render(found: dict[str, dict]) -> str:
    lines = ["| lever | " + " | ".join(SCHEMES) + " |", "|---|" + "---|" * len(SCHEMES)]
    base = found.get("float16", {}).get("ppl")
    lines.append("| float16 | " + " | ".join([f"{base:.3f}" if base else "—"] * len(SCHEMES)) + " |")
    for name, ids in LEVERS:
        cells = []
        for rid in ids:
            r = found.get(rid) if rid else None
            cells.append("—" if r is None else f"{r['ppl']:.3f} / {r['kl']:.4f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| run | quant wall s | quant CPU s | peak RSS GiB | 1-min load before / after |"]
    lines.append("|---|---|---|---|---|")
    for _, ids in LEVERS:
        for rid in filter(None, ids):
            r = found.get(rid)
            if r is None or r.get("seconds") is None:
                continue
            rss = "—" if not r.get("rss") else f"{r['rss'] / 2**30:.2f}"
            load = "—" if not r.get("load") else " / ".join(f"{v:.2f}" for v in r["load"])
            lines.append(f"| `{rid}` | {r['seconds']:.1f} | {r['cpu']:.0f} | {rss} | {load} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", type=Path, nargs="+", help="bench_quality.py --out folders, searched in order")
    p.add_argument("--eval-file", type=Path, default=REPO / DEFAULT_EVAL, help="the text the scores are on")
    p.add_argument("--windows", type=int, default=12)
    p.add_argument("--seqlen", type=int, default=2048)
    args = p.parse_args(argv)
    sha = util.sha256_file(args.eval_file)
    sys.stdout.write(render(collect(args.folders, sha, args.windows, args.seqlen)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
