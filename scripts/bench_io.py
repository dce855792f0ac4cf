"""Time the checkpoint I/O paths on a real model: save + verify, and ``from_pretrained``.

    python scripts/bench_io.py [--model DIR] [--group-size 64] [--format gptq] [--repeat 3]

In one process, after the imports and a warm-up: RTN-quantizes every linear of the model (not timed),
then times ``write_quantized`` (pack, write atomically, read back and verify every tensor) into a temporary
directory, then ``llmquant.from_pretrained`` of what it wrote (float32, CPU). Prints one JSON line per
repetition and the medians. Imports (torch, transformers: several seconds) are outside every timing.
Targets (issue #16): ``from_pretrained`` <= 3 s and save + verify <= 15 s for SmolLM2-135M.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import llmquant
from llmquant.config import QuantScheme
from llmquant.grid import quantize_weight
from llmquant.save import write_quantized


def _default_model() -> Path:
    return Path.home() / ".cache" / "llmquant" / "smollm2-135m-instruct"


def _quantize_all(model: torch.nn.Module, scheme: QuantScheme) -> dict:
    return {
        name: quantize_weight(m.weight.data.float(), scheme)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name != "lm_head"
    }


def run(model_dir: Path, scheme: QuantScheme, fmt: str, repeat: int) -> list[dict[str, float]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float16)
    quantized = _quantize_all(model, scheme)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeat + 1):  # the first round warms caches and lazy imports; not reported
            out = Path(tmp) / f"q{i}"
            t0 = time.perf_counter()
            write_quantized(model, quantized, out, format=fmt, scheme=scheme, method="rtn")
            t1 = time.perf_counter()
            loaded = llmquant.from_pretrained(out, dtype=torch.float32, progress=False)
            t2 = time.perf_counter()
            del loaded
            if i:
                rows.append({"save_verify_s": round(t1 - t0, 3), "from_pretrained_s": round(t2 - t1, 3)})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=_default_model())
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--format", default="gptq")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    rows = run(args.model, QuantScheme(4, args.group_size, True), args.format, args.repeat)
    medians = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(json.dumps({"median": medians, "threads": torch.get_num_threads()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
