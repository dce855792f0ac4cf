"""GPTQModel GPTQ on the calibration ids written by bench_quality.py (runs in the peer's virtualenv).

Settings as in ``../shared/reference/peer-results.md``: 4-bit, ``--group-size`` (128 there), symmetric,
``desc_act=False`` (GPTQModel then enables its group-aware reordering, ``act_group_aware``, by default),
``damp_percent`` 0.05, batch 1, GPTQ v1 checkpoint format. ``GPTQMODEL_CPU_WORKERS=2`` must be set by
the caller on a 2-core machine (bench_quality.py does). The timed step is ``model.quantize()`` on an
already loaded model; the result is saved with ``model.save()``.
"""

from __future__ import annotations

import os
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
    p.add_argument("--damp", type=float, default=0.05)
    p.add_argument("--sym", default="true", choices=["true", "false"])
    p.add_argument("--desc-act", default="false", choices=["true", "false"])
    p.add_argument("--dtype", default="auto", help="dtype the float model is loaded in (default: as stored)")
    args = p.parse_args()
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

    rss_start = current_rss_bytes()
    import gptqmodel
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    ids, mask = load_calibration_ids(args.calib)
    calibration = [{"input_ids": row.tolist(), "attention_mask": m.tolist()} for row, m in zip(ids, mask)]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    qcfg = QuantizeConfig(
        bits=args.bits,
        group_size=args.group_size,
        sym=args.sym == "true",
        desc_act=args.desc_act == "true",
        damp_percent=args.damp,
    )
    rss_imports = current_rss_bytes()

    t0 = time.perf_counter()
    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    model = GPTQModel.load(args.model, qcfg, device="cpu", dtype=dtype)
    load_seconds = time.perf_counter() - t0
    rss_after_load, peak_after_load = current_rss_bytes(), peak_rss_bytes()

    load_before = load_average()
    t0, c0 = time.perf_counter(), cpu_seconds()
    model.quantize(calibration, batch_size=1, tokenizer=tokenizer)
    quant_seconds, quant_cpu_seconds = time.perf_counter() - t0, cpu_seconds() - c0
    peak_after_quant = peak_rss_bytes()
    load_after = load_average()

    t0 = time.perf_counter()
    out = Path(args.out)
    model.save(str(out))
    tokenizer.save_pretrained(out)
    save_seconds = time.perf_counter() - t0
    write_result(
        args.result,
        {
            "library": "gptqmodel",
            "version": getattr(gptqmodel, "__version__", None),
            "torch": torch.__version__,
            "settings": vars(args),
            "act_group_aware": getattr(qcfg, "act_group_aware", None),
            "cpu_workers": os.environ.get("GPTQMODEL_CPU_WORKERS"),
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
