"""The main job on the embedded default: quantize the bundled SmolLM2-135M test model with RTN
(w4, group 128, sym), save it in GPTQ format, evaluate it against the float model on wikitext-2
and print a short table.

    python scripts/demo.py [--windows 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import resource
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _prepare_test_model() -> Path:
    spec = importlib.util.spec_from_file_location(
        "prepare_test_model", REPO / "scripts" / "prepare_test_model.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.prepare_test_model()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=4, help="2048-token wikitext-2 windows to evaluate")
    parser.add_argument(
        "--out", type=Path, default=Path.home() / ".cache" / "llmquant" / "demo-smollm2-rtn-w4g128"
    )
    parser.add_argument(
        "--text", type=Path, default=REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from llmquant import QuantScheme, RTNConfig
    from llmquant.api import evaluate_checkpoint, quantize_checkpoint

    model_dir = _prepare_test_model()
    t0 = time.perf_counter()
    summary = quantize_checkpoint(
        model_dir, args.out, RTNConfig(QuantScheme(4, 128, True)), format="gptq", overwrite=True
    )
    quant_s = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    ev = evaluate_checkpoint(args.out, args.text, base=model_dir, windows=args.windows)
    float_size = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    rows = [
        ("model", "SmolLM2-135M-Instruct (float16)"),
        ("method", "RTN w4 g128 sym -> GPTQ v1 checkpoint (read back and verified bit-exact)"),
        ("checkpoint", str(summary["path"])),
        ("quantize + save", f"{quant_s:.1f} s (peak RSS {rss:.2f} GiB)"),
        ("size float -> quantized", f"{float_size / 2**20:.1f} MiB -> {summary['bytes'] / 2**20:.1f} MiB"),
        (
            f"wikitext-2 ppl ({ev['n_windows']}x{ev['seqlen']})",
            f"float {ev['base_perplexity']:.3f} -> quantized {ev['perplexity']:.3f}",
        ),
        ("KL(float || quantized)", f"{ev['kl_divergence']:.4f} nats/token"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
