"""CPU evaluation speed of a quantized checkpoint against its float model, with and without the
dequantize-once cache (``llmquant.nn.cache_dense_weights``).

Loads the float model (transformers, float32) and the checkpoint (``llmquant.from_pretrained``, float32)
once, then times ``llmquant.evaluate.evaluate`` on the same windows for the float model, the quantized
model dequantizing on every forward, and the quantized model with the cache: in turn, ``--repeats``
times, so that a change in a shared machine's speed hits all three alike. Reports the median wall and
CPU seconds (user + system of the process, all threads) and the ratios to the float model, the load
and cache-building times, and checks that the cached and per-forward numbers are identical.

Usage:
    python scripts/bench_eval_cpu.py CKPT FLOAT_DIR --text wiki.test.raw --windows 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def _timed(fn: Any) -> tuple[Any, float, float]:
    """fn()'s result, its wall seconds and the process's CPU seconds (all threads) it took."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmquant.evaluate import evaluate, tokenize_corpus
    from llmquant.loading import from_pretrained
    from llmquant.nn import cache_dense_weights

    load = {}
    ids = tokenize_corpus(AutoTokenizer.from_pretrained(args.float_dir), args.text)
    float_model, *load["float"] = _timed(
        lambda: AutoModelForCausalLM.from_pretrained(args.float_dir, dtype=torch.float32).eval()
    )
    quant, *load["quantized"] = _timed(
        lambda: from_pretrained(args.checkpoint, dtype=torch.float32, progress=False)
    )
    _, *load["cache_build"] = _timed(lambda: cache_dense_weights(quant))
    variants = {"float": (float_model, False), "per-forward": (quant, False), "cached": (quant, True)}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    results: dict[str, Any] = {}
    for _ in range(args.repeats):
        for name, (model, cached) in variants.items():
            if model is quant:
                cache_dense_weights(quant, cached)
            results[name], wall, cpu = _timed(
                lambda m=model: evaluate(m, ids, seqlen=args.seqlen, windows=args.windows, progress=False)
            )
            times[name].append((wall, cpu))
            print(
                f"{name:12s} wall {wall:7.1f} s  cpu {cpu:7.1f} s  ppl {results[name].perplexity:.4f}",
                flush=True,
            )
    if results["cached"].perplexity != results["per-forward"].perplexity:
        raise SystemExit("the cached evaluation's perplexity differs from the per-forward one")
    median = {n: [statistics.median(t[i] for t in ts) for i in (0, 1)] for n, ts in times.items()}
    return {
        "windows": results["float"].n_windows,
        "seqlen": args.seqlen,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "load_wall_cpu_seconds": load,
        "eval_wall_cpu_seconds": times,
        "median_wall_cpu_seconds": median,
        "ratio_to_float": {n: [m[i] / median["float"][i] for i in (0, 1)] for n, m in median.items()},
        "perplexity": {n: r.perplexity for n, r in results.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="quantized checkpoint directory")
    p.add_argument("float_dir", type=Path, help="the float model it was quantized from")
    p.add_argument("--text", type=Path, required=True, help="evaluation text, e.g. wikitext-2 wiki.test.raw")
    p.add_argument("--windows", type=int, default=2, help="evaluation windows (default 2)")
    p.add_argument("--seqlen", type=int, default=2048, help="window length (default 2048)")
    p.add_argument("--repeats", type=int, default=3, help="rounds of the three evaluations (default 3)")
    p.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    report = measure(args)
    print(
        f"\n{report['windows']} x {report['seqlen']} tokens, median of {args.repeats}, "
        f"{report['torch_threads']} threads"
    )
    print("| evaluation | wall (s) | CPU (s) | wall / float | CPU / float |\n|---|---|---|---|---|")
    for name, (wall, cpu) in report["median_wall_cpu_seconds"].items():
        ratio = report["ratio_to_float"][name]
        print(f"| {name} | {wall:.1f} | {cpu:.1f} | {ratio[0]:.2f} | {ratio[1]:.2f} |")
    for name, (wall, cpu) in report["load_wall_cpu_seconds"].items():
        print(f"load {name}: wall {wall:.1f} s, cpu {cpu:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
