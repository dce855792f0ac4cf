"""Cost and layer-loss effect of ``--refine`` on the first decoder layers of a model.

Quantizes a truncated copy of the model (its first ``--layers`` decoder layers) with GPTQ (w3 g64 asym,
search grid and error propagation α 0.5 by default; ``--method rtn`` for RTN with ``--grid``) once per
``--steps`` value (0 = no refinement) on the calibration ids that
``bench_quality.py`` wrote, and prints the seconds each run took; the refinement's loss before/after per
layer is logged at INFO level ("refine layer i: loss a -> b in s"). ``--trace K`` also logs, every K
steps, the loss over every calibration batch and how many codes differ from the rounder's::

    python scripts/refine_cost.py --model ~/.cache/llmquant/smollm2-135m-instruct \\
        --calib-ids /tmp/bq/calibration_ids.safetensors --steps 0 16 64
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from llmquant import pipeline, refine
from llmquant.calibration import CalibrationBlocks, fingerprint
from llmquant.config import GPTQConfig, QuantScheme, RefineConfig, RTNConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--calib-ids", required=True, help="calibration_ids.safetensors from bench_quality.py")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--steps", type=int, nargs="+", default=[0, 16, 64])
    p.add_argument("--method", choices=["gptq", "rtn"], default="gptq")
    p.add_argument("--grid", default="search", help="the rounder's grid (default: search)")
    p.add_argument("--error-propagation", type=float, default=0.5, help="GPTQ's α (default: 0.5)")
    p.add_argument("--lr", type=float, default=None, help="refinement step size (default: 1 / steps)")
    p.add_argument("--trace", type=int, default=0, help="log the full calibration loss every K steps")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.trace:
        _install_trace(args.trace)
    tensors = load_file(args.calib_ids)
    ids, mask = tensors["input_ids"], tensors["attention_mask"]
    blocks = CalibrationBlocks(ids, mask, "ids", fingerprint(ids, mask))
    for steps in args.steps:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float16)
        model.model.layers = model.model.layers[: args.layers]
        model.config.num_hidden_layers = args.layers
        scheme = QuantScheme(args.bits, args.group_size, False)
        refinement = RefineConfig(steps, lr=args.lr) if steps else None  # (``refine`` is the module)
        if args.method == "rtn":
            cfg = RTNConfig(scheme, grid=args.grid, refine=refinement)
        else:
            cfg = GPTQConfig(
                scheme, grid=args.grid, error_propagation=args.error_propagation, refine=refinement
            )
        t0 = time.perf_counter()
        pipeline.quantize(model, cfg, blocks, progress=False)
        logging.info("steps=%d: %.1f s for %d layers", steps, time.perf_counter() - t0, args.layers)


def _install_trace(every: int) -> None:
    """Wrap ``refine.refine_codes`` (the Refiner looks it up at call time) with a per-step trace."""
    plain = refine.refine_codes

    def traced(layer, weights, result, batches, targets, config, trace=None):
        def log(step: int, offsets: dict) -> None:
            if step % every:
                return
            full = refine._total_loss(layer, offsets, batches, targets)
            flips = sum(
                int((offsets[n].codes() != qw.codes.to(offsets[n].v.device)).sum())
                for n, (qw, _) in result.items()
            )
            logging.info(
                "  step %d: loss over every batch %.4f, %d codes differ from the rounder's", step, full, flips
            )

        return plain(layer, weights, result, batches, targets, config, trace=log)

    refine.refine_codes = traced


if __name__ == "__main__":
    main()
