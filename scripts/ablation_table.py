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
import hashlib
import json
import math
import sys
from pathlib import Path

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
    ("AWQ (+ RTN)", _ids("awq")),
    ("AWQ + GPTQ, searched grid", _ids("awq+gptq", "-search")),
    (
        "llm-compressor GPTQ (peer)",
        ["llmcompressor-gptq-g64-sym-ao", "", "", "", "llmcompressor-gptq-w3-g64-asym", ""],
    ),
    (
        "llm-compressor AutoRound light (peer)",
        ["", "", "", "", "llmcompressor-autoround-light-w3-g64-asym", ""],
    ),
]
TOKENS_PER_WINDOW_OFFSET = 1  # each window scores seqlen - 1 next-token predictions


Scores = dict[tuple[str, str, int], dict[int, tuple[float, float]]]
DEFAULT_EVAL = (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
)


def _windows(folders: list[Path], eval_sha: str) -> Scores:
    """(run, stamp, seqlen) -> window -> (nll, kl) on the text of ``eval_sha``, from every folder's
    evaluation cache."""
    out: Scores = {}
    for folder in folders:
        path = folder / "eval_windows.jsonl"
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec["eval_sha"] != eval_sha:
                continue
            key = (rec["run"], rec["stamp"], rec["seqlen"])
            out.setdefault(key, {})[rec["window"]] = (rec["nll"], rec["kl"])
    return out


def _result(folders: list[Path], rid: str) -> dict | None:
    for folder in folders:
        path = folder / "runs" / f"{rid}.json"
        if path.is_file():
            return json.loads(path.read_text())
    return None


def _score(cache: Scores, rid: str, stamp: str, windows: int, seqlen: int) -> tuple[float, float] | None:
    scores = cache.get((rid, stamp, seqlen))
    if scores is None or any(w not in scores for w in range(windows)):
        return None
    n = windows * (seqlen - TOKENS_PER_WINDOW_OFFSET)
    nll = sum(scores[w][0] for w in range(windows))
    kl = sum(scores[w][1] for w in range(windows))
    return math.exp(nll / n), kl / n


def collect(folders: list[Path], eval_sha: str, windows: int, seqlen: int) -> dict[str, dict]:
    """run id -> {"ppl", "kl", "seconds", "cpu", "rss", "load"} for every run of the layout found."""
    cache = _windows(folders, eval_sha)
    float_stamp = next((k[1] for k in cache if k[0] == "float16"), None)
    found: dict[str, dict] = {}
    if float_stamp is not None and (s := _score(cache, "float16", float_stamp, windows, seqlen)):
        found["float16"] = {"ppl": s[0], "kl": 0.0}
    for _, ids in LEVERS:
        for rid in filter(None, ids):
            res = _result(folders, rid)
            if res is None:
                continue
            stamp = str(res.get("finished_at", res.get("checkpoint")))
            score = _score(cache, rid, stamp, windows, seqlen)
            if score is None:
                continue
            found[rid] = {
                "ppl": score[0],
                "kl": score[1],
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
    p.add_argument("--eval-file", type=Path, default=DEFAULT_EVAL, help="the text the scores are on")
    p.add_argument("--windows", type=int, default=12)
    p.add_argument("--seqlen", type=int, default=2048)
    args = p.parse_args(argv)
    sha = hashlib.sha256(args.eval_file.read_bytes()).hexdigest()
    sys.stdout.write(render(collect(args.folders, sha, args.windows, args.seqlen)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
