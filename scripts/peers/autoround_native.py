"""auto-round's own API (not llm-compressor's wrapper) on the calibration ids written by bench_quality.py.

Runs ``auto_round.AutoRound`` with the recipe its CLI names (``--recipe light``: 50 iterations, lr 5e-3;
``default``: 200 iterations, lr 1/iters; batch 8 and 128 samples in both) on exactly the ids llmquant
calibrates on (128 × 512 c4 tokens: so ``seqlen`` 512, not the CLI's 2048), seed 42 (its default),
``enable_torch_compile`` off (no use on this CPU-only torch). The quantization step timed is
``AutoRound.quantize()`` on an already loaded model; the result is saved with ``save_quantized(format=
"auto_gptq")`` (GPTQ v1 packing, which llmquant's and GPTQModel's readers decode) and timed apart.

Why a native run: llm-compressor 0.14.0.1's ``AutoRoundModifier`` maps auto-round's tuned ``scale`` back
into the model but not its zero point (``_postprocess_qparams`` has no ``zp`` entry), so an asymmetric
checkpoint written through it pairs AutoRound's scales with placeholder zero points.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    base_parser,
    cpu_seconds,
    current_rss_bytes,
    load_average,
    load_calibration_ids,
    peak_rss_bytes,
    write_result,
)

RECIPES = {"light": {"iters": 50, "lr": 5e-3}, "default": {"iters": 200, "lr": None}}


def main() -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--sym", default="true", choices=["true", "false"])
    p.add_argument("--recipe", default="default", choices=sorted(RECIPES))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--iters", type=int, default=None, help="override the recipe's iterations (smoke tests)")
    args = p.parse_args()

    rss_start = current_rss_bytes()
    import auto_round
    import torch
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids, mask = load_calibration_ids(args.calib)
    dataset = [{"input_ids": ids[i : i + 1], "attention_mask": mask[i : i + 1]} for i in range(ids.shape[0])]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rss_imports = current_rss_bytes()

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto").eval()
    load_seconds = time.perf_counter() - t0
    rss_after_load, peak_after_load = current_rss_bytes(), peak_rss_bytes()

    recipe = dict(RECIPES[args.recipe])
    if args.iters is not None:
        recipe["iters"] = args.iters
    ar = AutoRound(
        model,
        tokenizer,
        bits=args.bits,
        group_size=args.group_size,
        sym=args.sym == "true",
        iters=recipe["iters"],
        lr=recipe["lr"],
        batch_size=args.batch_size,
        nsamples=int(ids.shape[0]),
        seqlen=int(ids.shape[1]),
        dataset=dataset,
        seed=42,
        enable_torch_compile=False,
        device_map="cpu",
    )
    load_before = load_average()
    t0, c0 = time.perf_counter(), cpu_seconds()
    ar.quantize()
    quant_seconds, quant_cpu_seconds = time.perf_counter() - t0, cpu_seconds() - c0
    peak_after_quant = peak_rss_bytes()
    load_after = load_average()

    t0 = time.perf_counter()
    out = Path(args.out)
    ar.save_quantized(str(out), format="auto_gptq", inplace=True)
    tokenizer.save_pretrained(out)
    save_seconds = time.perf_counter() - t0
    write_result(
        args.result,
        {
            "library": "auto-round",
            "version": getattr(auto_round, "__version__", None),
            "torch": torch.__version__,
            "settings": vars(args) | recipe,
            "quant_seconds": quant_seconds,
            "quant_cpu_seconds": quant_cpu_seconds,
            "loadavg_1min_before_after": [load_before, load_after],
            "load_seconds": load_seconds,
            "save_seconds": save_seconds,
            "rss_start_bytes": rss_start,
            "rss_imports_bytes": rss_imports,
            "rss_after_load_bytes": rss_after_load,
            "peak_rss_after_load_bytes": peak_after_load,
            "peak_rss_bytes": peak_after_quant,
            "checkpoint": str(out),
            "format": "gptq",
            "torch_threads": torch.get_num_threads(),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
