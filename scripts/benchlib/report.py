"""The benchmark's outputs: the rows of ``results.json``, the Markdown table (``results.md``) and the
Quality section of ``docs/benchmarks.md`` (``--append-docs``: written above the Kernels section,
replaced if present)."""

from __future__ import annotations

import datetime as _dt
import math
import textwrap
from pathlib import Path
from typing import Any

from .runs import RUNS, RunSpec
from .util import gib

DOCS_SECTION = "## Quality"
DOCS_ANCHOR = "## Kernels"


def result_rows(
    run_specs: list[RunSpec],
    peer_specs: list,
    results: dict[str, dict],
    metrics: dict[str, dict],
    float_bytes: int,
) -> list[dict[str, Any]]:
    """One row per run (ours in table order, then the peers'): settings, quantization and evaluation."""
    rows: list[dict[str, Any]] = []
    for run in run_specs:
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
    for peer in peer_specs:
        row = {"id": peer.run_id, "library": peer.label, "settings": peer.settings, "peer": True}
        peer_result = dict(results[peer.run_id])
        peer_result.pop("spec", None)
        row["peer_args"] = peer_result.pop("settings", None)  # the peer script's argparse namespace
        row["peer_library"] = peer_result.pop("library", None)
        row.update(peer_result)
        row.update(metrics.get(peer.run_id, {}))
        row.setdefault("note", peer.reference)
        rows.append(row)
    return rows


def now() -> str:
    return _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


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
            gib(r.get("peak_rss_bytes")),
            gib(r.get("rss_after_load_bytes")),
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
