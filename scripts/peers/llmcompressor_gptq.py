"""llm-compressor GPTQ (or AutoRound) on the calibration ids written by bench_quality.py (peer venv).

Settings as in ``../shared/reference/peer-results.md``: ``GPTQModifier`` with a W4A16 weight scheme,
symmetric int4, ``strategy=group`` (``--group-size``, 64 by default there), ``actorder`` static, lm_head
ignored, damp 0.01 (the modifier's default), batch 1. The quantization step timed is ``oneshot()`` on
an already loaded model; the result is saved with ``save_pretrained(save_compressed=True)``
(compressed-tensors ``pack-quantized``), which llmquant's ``from_pretrained`` reads.

``--modifier autoround``: llm-compressor's ``AutoRoundModifier`` (auto-round's signed-gradient
rounding and clipping per decoder layer) with the same weight scheme, its defaults (``--iters`` 200,
batch 8) and ``enable_torch_compile=False`` (torch.compile has no use on this CPU-only torch).
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


def main() -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--actorder", default="static", choices=["static", "group", "weight", "none"])
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--sym", default="true", choices=["true", "false"])
    p.add_argument("--modifier", default="gptq", choices=["gptq", "autoround"])
    p.add_argument("--iters", type=int, default=200, help="AutoRound tuning steps per decoder layer")
    p.add_argument("--lr", type=float, default=None, help="AutoRound learning rate (default: 1/iters)")
    p.add_argument("--dtype", default="auto", help="dtype the float model is loaded in (default: as stored)")
    args = p.parse_args()

    rss_start = current_rss_bytes()
    import llmcompressor
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.autoround import AutoRoundModifier
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    ids, mask = load_calibration_ids(args.calib)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist()})
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    rss_imports = current_rss_bytes()

    t0 = time.perf_counter()
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    load_seconds = time.perf_counter() - t0
    rss_after_load, peak_after_load = current_rss_bytes(), peak_rss_bytes()

    weights = QuantizationArgs(
        num_bits=args.bits,
        type="int",
        symmetric=args.sym == "true",
        strategy="group",
        group_size=args.group_size,
        actorder=None if args.actorder == "none" else args.actorder,
    )
    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
    if args.modifier == "autoround":
        recipe = AutoRoundModifier(
            config_groups=groups,
            ignore=["lm_head"],
            iters=args.iters,
            lr=args.lr,
            enable_torch_compile=False,
        )
    else:
        recipe = GPTQModifier(config_groups=groups, ignore=["lm_head"], dampening_frac=args.damp)
    load_before = load_average()
    t0, c0 = time.perf_counter(), cpu_seconds()
    oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=dataset,
        recipe=recipe,
        num_calibration_samples=int(ids.shape[0]),
        max_seq_length=int(ids.shape[1]),
        shuffle_calibration_samples=False,
        batch_size=1,
    )
    quant_seconds, quant_cpu_seconds = time.perf_counter() - t0, cpu_seconds() - c0
    peak_after_quant = peak_rss_bytes()
    load_after = load_average()

    t0 = time.perf_counter()
    out = Path(args.out)
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    save_seconds = time.perf_counter() - t0
    write_result(
        args.result,
        {
            "library": "llmcompressor",
            "version": llmcompressor.__version__ if hasattr(llmcompressor, "__version__") else None,
            "torch": torch.__version__,
            "settings": vars(args),
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
            "format": "compressed-tensors",
            "torch_threads": torch.get_num_threads(),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
