"""The main job on the embedded default: quantize the bundled SmolLM2-135M test model with what
``llmquant quantize`` does by default, and with round-to-nearest on the same grid for comparison; save
both (read back and verified), evaluate both against the float model on wikitext-2, print a table.

The default method runs exactly as ``llmquant quantize MODEL -o OUT --calib c4.utf8`` would (the
command's own option defaults, through ``llmquant.cli.quantize_configs``), except for the number of
calibration sequences (``--n-samples``, default here 32 instead of 128, so the demo takes a few minutes
on a 2-core CPU); the calibration text is the local c4 sample in ``../shared/data/calibration``.

    python scripts/demo.py [--windows 4] [--n-samples 32] [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def _prepare_test_model() -> Path:
    spec = importlib.util.spec_from_file_location(
        "prepare_test_model", REPO / "scripts" / "prepare_test_model.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.prepare_test_model()


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=4, help="2048-token wikitext-2 windows to evaluate")
    parser.add_argument("--n-samples", type=int, default=32, help="calibration sequences (the CLI's: 128)")
    parser.add_argument("--out", type=Path, default=Path.home() / ".cache" / "llmquant" / "demo")
    parser.add_argument("--text", type=Path, default=SHARED / "wikitext-2-raw" / "wiki.test.raw")
    parser.add_argument("--calib", type=Path, default=SHARED / "calibration" / "c4.utf8")
    return parser.parse_args()


def _run(model_dir: Path, out: Path, config, calib, args) -> dict:
    from llmquant.api import evaluate_checkpoint, quantize_checkpoint

    t0 = time.perf_counter()
    summary = quantize_checkpoint(model_dir, out, config, calib, overwrite=True)
    seconds = time.perf_counter() - t0
    ev = evaluate_checkpoint(out, args.text, base=model_dir, windows=args.windows)
    return {"summary": summary, "seconds": seconds, "eval": ev}


def main() -> None:
    args = _parse()
    logging.basicConfig(level=logging.WARNING)

    from llmquant.cli import build_parser, quantize_configs
    from llmquant.config import RTNConfig

    model_dir = _prepare_test_model()
    cli = ["quantize", str(model_dir), "-o", str(args.out), "--calib", str(args.calib)]
    default_cfg, calib = quantize_configs(
        build_parser().parse_args([*cli, "--n-samples", str(args.n_samples)])
    )
    scheme = default_cfg.scheme
    runs = {
        "RTN": _run(model_dir, args.out / "rtn", RTNConfig(scheme), calib, args),
        f"default ({default_cfg.method})": _run(model_dir, args.out / "default", default_cfg, calib, args),
    }
    float_ppl = next(iter(runs.values()))["eval"]["base_perplexity"]
    grid = f"w{scheme.bits} g{scheme.group_size or 'channel'} {'sym' if scheme.sym else 'asym'}"
    print(f"SmolLM2-135M-Instruct, {grid}; wikitext-2 perplexity on {args.windows} x 2048 tokens")
    print(f"default: what `llmquant quantize` does without options ({default_cfg.method}), calibrated on "
          f"{calib.n_samples} x {calib.seqlen} tokens of {args.calib.name}")  # fmt: skip
    header = ("method", "format", "quantize+save s", "ppl", "vs float", "KL nats/token", "MiB")
    rows = [("float16", "-", "-", f"{float_ppl:.3f}", "-", "-", "-")]
    for name, r in runs.items():
        ev, s = r["eval"], r["summary"]
        rows.append((name, s["format"], f"{r['seconds']:.1f}", f"{ev['perplexity']:.3f}",
                     f"{100 * (ev['perplexity'] / float_ppl - 1):+.1f}%", f"{ev['kl_divergence']:.4f}",
                     f"{s['bytes'] / 2**20:.1f}"))  # fmt: skip
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))


if __name__ == "__main__":
    main()
