"""Sweep explicit launch configurations (including kernel-variant flags) of the GEMV / GEMM kernels.

Where ``bench_kernels.py`` times the dispatched op with whatever the autotuner picks, this times every
config of a hand-written grid on a few shapes and M values, so kernel variants (the GEMV's ``FAST`` /
``PREFETCH``, the GEMM's ``SCALE_AFTER`` / ``ONE_DOT``) can be compared with each
other and with fp16 cuBLAS, and the autotune lists in ``llmquant_kernels/configs.py`` set from data.

Each config is run once and checked against the fp32 reference (relative error; a config that fails
to compile or mismatches is recorded as such), then timed like ``bench_kernels.py``: ``do_bench``
median of one call replayed from a CUDA graph, L2 flushed. Rows are appended to ``OUT/sweep.csv``
as they are measured (a run cut short keeps what it measured); ``--budget-s`` stops each (shape, M)
section early. Needs CUDA.

    python scripts/sweep_kernels.py --out sweep_out --shapes 8192x8192 8192x28672 --batches 1 16
"""

from __future__ import annotations

import argparse
import csv
import itertools
import random
import sys
import time
from pathlib import Path

from bench_kernels import Bench, _check, _parse_shapes

FIELDS = ["k", "n", "m", "op", "config", "us", "fp16_us", "speedup", "gbps", "rel_err", "error"]


def gemv_grid(m: int) -> list[dict]:
    """GEMV configs: word tiles x split-K x warps x (FAST, PREFETCH)."""
    out = []
    tiles = [(128, 128), (256, 128), (64, 128), (128, 256), (64, 256), (256, 64), (512, 64), (128, 64)]
    for (bn, bk), (fast, pf), sk, w in itertools.product(
        tiles, ((True, True), (True, False), (False, False)), (1, 2, 4, 8, 16), (4, 8)
    ):
        if not fast and bk != 128:
            continue  # the old path: a baseline at its tuned tile depth
        if m > 1 and fast:
            continue  # FAST is the one-row path only
        if w == 8 and bn < 128:
            continue
        out.append(
            {"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "FAST": fast, "PREFETCH": pf,
             "num_warps": w, "num_stages": 1}
        )  # fmt: skip
    return out


def gemm_grid(m: int) -> list[dict]:
    """GEMM configs for skinny M: BLOCK_M 16 (or the next power of two of M up to 64)."""
    bm = min(max(16, 1 << (m - 1).bit_length()), 64)
    out = []
    variants = [
        {"SCALE_AFTER": False, "ONE_DOT": False},
        {"SCALE_AFTER": True, "ONE_DOT": False},
        {"SCALE_AFTER": True, "ONE_DOT": True},
    ]
    tiles = [(128, 128), (64, 128), (256, 128), (128, 256), (64, 256)]
    for (bn, bk), v, sk, (w, s) in itertools.product(tiles, variants, (1, 2, 4, 8), ((4, 3), (8, 3), (4, 2))):
        if w == 8 and bn < 128:
            continue
        out.append({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "GROUP_M": 8, **v,
                    "num_warps": w, "num_stages": s})  # fmt: skip
    return out


def _programs(cfg: dict, m: int, n: int) -> int:
    tiles_m = -(-m // cfg.get("BLOCK_M", m))
    return tiles_m * -(-n // cfg["BLOCK_N"]) * cfg["SPLIT_K"]


def sweep_point(b: Bench, writer, k: int, n: int, m: int, ops: list[str], budget_s: float, sms: int) -> None:  # noqa: ANN001
    import triton
    from llmquant.kernels.dequant import dequant
    from llmquant.kernels.gemm import gemm
    from llmquant.kernels.gemv import gemv

    torch = b.torch
    lay = b.random_layout(k, n, 4, 128)
    q = (lay["qweight"], lay["scales"], lay["zeros"])
    x = b.activations(m, k)
    w = dequant(*q, 4, 128, k, dtype=torch.float16)
    fp16_us = b.time_graphed(lambda: torch.matmul(x, w))
    nbytes = sum(t.numel() * t.element_size() for t in q) + (m * k + m * n) * 2
    for op_name in ops:
        op, grid = (gemv, gemv_grid(m)) if op_name == "gemv" else (gemm, gemm_grid(m))
        random.Random(0).shuffle(grid)  # a budget cut then still samples every variant
        t0 = time.time()
        for spec in grid:
            if time.time() - t0 > budget_s:
                print(f"budget reached at {k}x{n} M={m} {op_name}", flush=True)
                break
            fills = sms // 2 <= _programs(spec, m, n) <= 8 * sms
            if not fills or -(-k // spec["BLOCK_K"]) < 2 * spec["SPLIT_K"]:
                continue
            kw = {key: v for key, v in spec.items() if key not in ("num_warps", "num_stages")}
            cfg = triton.Config(kw, num_warps=spec["num_warps"], num_stages=spec["num_stages"])
            row = {"k": k, "n": n, "m": m, "op": op_name, "config": repr(spec), "fp16_us": round(fp16_us, 2)}
            try:
                fn = lambda op=op, cfg=cfg: op(x, *q, 4, 128, config=cfg)  # noqa: E731
                row["rel_err"] = _check(fn(), x, w)
                us = b.time_graphed(fn)
                row.update(us=round(us, 2), speedup=round(fp16_us / us, 3), gbps=round(nbytes / us / 1e3, 1))
            except Exception as exc:  # noqa: BLE001 - a config that fails to compile is a data point
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            writer.writerow(row)
            print(row, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("sweep_out"))
    p.add_argument("--shapes", nargs="+", default=["8192x8192", "8192x28672"])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--ops", nargs="+", default=["gemv", "gemm"], choices=["gemv", "gemm"])
    p.add_argument("--budget-s", type=float, default=120.0, help="seconds per (shape, M) section")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("sweep_kernels.py needs CUDA", file=sys.stderr)
        return 2
    b = Bench(dry_run=False, reps=1)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "sweep.csv", "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for (k, n), m in itertools.product(_parse_shapes(args.shapes), args.batches):
            ops = [o for o in args.ops if o == "gemm" or m <= 16]
            sweep_point(b, writer, k, n, m, ops, args.budget_s, sms)
            f.flush()
    summarize(args.out / "sweep.csv")
    return 0


def _variant(op: str, cfg: dict) -> str:
    keys = ("FAST", "PREFETCH") if op == "gemv" else ("SCALE_AFTER", "ONE_DOT")
    return op + ":" + ",".join(f"{key}={int(bool(cfg.get(key, False)))}" for key in keys)


def summarize(path: Path) -> None:
    """Print the best config per (shape, M, op variant)."""
    import ast

    best: dict[tuple, dict] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            if row["k"] == "k" or not row.get("us"):
                continue
            cfg = ast.literal_eval(row["config"])
            key = (row["k"], row["n"], row["m"], _variant(row["op"], cfg))
            if key not in best or float(row["us"]) < float(best[key]["us"]):
                best[key] = row
    for key in sorted(best, key=lambda t: (int(t[0]), int(t[1]), int(t[2]), float(best[t]["us"]))):
        r = best[key]
        print(f"BEST {r['k']}x{r['n']} M={r['m']} {key[3]}: {r['us']} us (fp16 {r['fp16_us']}, "
              f"x{r['speedup']}, {r['gbps']} GB/s, err {float(r['rel_err']):.1e}) {r['config']}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
