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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Meter, base_parser, load_calibration_ids, write_result  # noqa: E402

RECIPES = {"light": {"iters": 50, "lr": 5e-3}, "default": {"iters": 200, "lr": None}}


def main() -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--sym", default="true", choices=["true", "false"])
    p.add_argument("--recipe", default="default", choices=sorted(RECIPES))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--iters", type=int, default=None, help="override the recipe's iterations (smoke tests)")
    args = p.parse_args()

    meter = Meter()
    import auto_round
    import torch
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids, mask = load_calibration_ids(args.calib)
    dataset = [{"input_ids": ids[i : i + 1], "attention_mask": mask[i : i + 1]} for i in range(ids.shape[0])]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    meter.imported()

    with meter.phase("load"):
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto").eval()

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
    with meter.phase("quant"):
        ar.quantize()
    out = Path(args.out)
    with meter.phase("save"):
        ar.save_quantized(str(out), format="auto_gptq", inplace=True)
        tokenizer.save_pretrained(out)
    write_result(
        args.result,
        {
            "library": "auto-round",
            "version": getattr(auto_round, "__version__", None),
            "torch": torch.__version__,
            "settings": vars(args) | recipe,
            "checkpoint": str(out),
            "format": "gptq",
            "torch_threads": torch.get_num_threads(),
        }
        | meter.fields(),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
