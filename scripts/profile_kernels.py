"""Launch one dispatched quantized matmul per (shape, M) a few times, for an external profiler.

Nsight Compute needs a process that runs the kernels of interest and nothing heavy besides; this is that
process. Each point is warmed up (compile + autotune, or ``--load-tuned``), then launched ``--launches``
times between ``torch.cuda.synchronize()`` calls. Example (stall reasons and memory throughput of the
GEMV and GEMM kernels only)::

    ncu --kernel-name regex:"_gemv_kernel|_gemm_kernel" --launch-skip 40 --launch-count 2 \\
        --section SpeedOfLight --section WarpStateStats --section MemoryWorkloadAnalysis \\
        python scripts/profile_kernels.py --points 8192x8192:1 8192x8192:16

Without CUDA it exits with a one-line message. ``--dry-run`` runs the same on CPU under the Triton
interpreter with tiny shapes (a smoke test).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _points(specs: list[str]) -> list[tuple[int, int, int]]:
    out = []
    for spec in specs:
        try:
            shape, m = spec.split(":")
            k, n = (int(v) for v in shape.lower().split("x"))
            out.append((k, n, int(m)))
        except ValueError:
            raise SystemExit(f"profile_kernels: bad point {spec!r}; write KxN:M, e.g. 8192x8192:1") from None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--points", nargs="+", default=["8192x8192:1", "8192x8192:16"], help="KxN:M points")
    p.add_argument("--launches", type=int, default=5, help="timed launches per point after warm-up")
    p.add_argument("--warmup", type=int, default=20, help="warm-up launches per point (autotuning included)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--load-tuned", type=Path, default=None, help="seed the autotuners from this JSON")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU, Triton interpreter")
    args = p.parse_args(argv)
    points = _points(args.points)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("profile_kernels: no CUDA GPU found (--dry-run runs a CPU smoke test)", file=sys.stderr)
        return 2
    from llmquant.kernels import quant_matmul, tuning
    from llmquant.kernels.layout import kernel_rows

    if args.load_tuned is not None:
        tuning.load_tuned(args.load_tuned)
    device = "cpu" if args.dry_run else "cuda"
    dtype = torch.float32 if args.dry_run else torch.float16
    backend = "triton" if args.dry_run else "auto"
    gs = 32 if args.dry_run else args.group_size
    for k, n, m in points:
        words, groups = kernel_rows(k, 4), -(-k // gs)
        q = (
            torch.randint(-(2**31), 2**31 - 1, (words, n), dtype=torch.int32, device=device),
            (torch.rand(groups, n, device=device) * 0.02).to(torch.float16),
            torch.randint(0, 16, (groups, n), dtype=torch.uint8, device=device),
        )
        x = torch.randn(m, k, device=device, dtype=dtype)
        for _ in range(args.warmup + args.launches):
            quant_matmul(x, *q, 4, gs, backend=backend)
        if not args.dry_run:
            torch.cuda.synchronize()
        print(f"profiled {k}x{n} M={m}: {args.warmup} warm-up + {args.launches} launches", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
