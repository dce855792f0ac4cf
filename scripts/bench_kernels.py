"""Benchmark llmquant's quantized-matmul kernels against fp16 ``torch.matmul`` (cuBLAS).

Two parts, both written to ``--out``:

1. Layer shapes: LLaMA K x N (4096x4096, 4096x11008, 11008x4096, 8192x8192, 8192x28672) for
   M in {1, 2, 4, 8, 16, 32, 64, 128, 512, 2048}. For each: median time of ``quant_matmul`` (the
   dispatched path) and of fp16 ``torch.matmul``, speedup, and the effective bandwidth of ours
   (bytes of packed weights + scales + zeros + activations + output, divided by the time) as a
   fraction of the measured device-to-device copy bandwidth. Also each forced path (gemv for
   M <= 16, gemm, dequantize-once + cuBLAS) so the dispatch thresholds in ``llmquant_kernels/configs.py`` can
   be checked. -> ``kernels.csv``, ``kernels.md``, ``kernels.png`` (if matplotlib is installed).
2. Decode: tokens/s of a LLaMA-7B-shaped stack (32 layers of q/k/v/o/gate/up/down linears, random
   weights) at batch 1 and 16, one decode step captured in a CUDA graph, ours vs fp16. Attention
   is OMITTED (o_proj consumes v_proj's output) and so are the norms: this measures the linears,
   the part the kernels change. -> ``decode.csv``, section in ``kernels.md``.

Timing: ``triton.testing.do_bench`` (median; L2 flushed before each call) of one call replayed from a
CUDA graph, so the numbers are GPU time without Python launch overhead, for ours and fp16 alike.
``--tune`` writes the autotuned configs to
``tuned_<gpu>.json`` (load them later with ``--load-tuned`` or ``llmquant.kernels.tuning.load_tuned``).

``--dry-run`` runs every code path on the CPU with tiny shapes, the Triton interpreter and a
``time.perf_counter`` timer (numbers meaningless); the unit tests use it. Without ``--dry-run`` and
without CUDA the script exits with a one-line message.

    python scripts/bench_kernels.py --out bench_out [--bits 4 --group-size 128] [--tune]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

LLAMA_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192), (8192, 28672)]  # (K, N)
BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 512, 2048]
DECODE_BATCHES = [1, 16]
LLAMA_7B = {"hidden": 4096, "intermediate": 11008, "layers": 32}

DRY_SHAPES = [(96, 48)]  # K not a multiple of the group size below: ragged path
DRY_BATCHES = [1, 5]
DRY_DECODE = {"hidden": 64, "intermediate": 96, "layers": 1}
DRY_GROUP_SIZE = 32


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench_out"), help="output directory")
    p.add_argument("--bits", type=int, default=4, choices=[2, 4, 8])
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--batches", type=int, nargs="+", default=None, help=f"M values (default {BATCHES})")
    p.add_argument("--shapes", nargs="+", default=None, help="KxN shapes, e.g. 4096x4096 (default: LLaMA)")
    p.add_argument("--no-paths", action="store_true", help="skip timing each forced kernel path")
    p.add_argument("--no-decode", action="store_true", help="skip the decode benchmark")
    p.add_argument("--tune", action="store_true", help="dump the autotuned configs to OUT/tuned_<gpu>.json")
    p.add_argument("--load-tuned", type=Path, default=None, help="seed the autotuners from this JSON")
    p.add_argument(
        "--l2-flush",
        choices=["write", "read"],
        default="write",
        help="how do_bench empties L2 before each timed call: 'write' (do_bench's own 256 MB zero-fill, "
        "which leaves L2 full of dirty lines the timed kernel must write back) or 'read' (a 256 MB read: "
        "L2 holds clean, unrelated lines, as between the layers of a real forward)",
    )
    p.add_argument("--decode-unfused", action="store_true", help="decode: separate q/k/v, gate/up matmuls")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU, Triton interpreter")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per point in --dry-run")
    return p.parse_args(argv)


@dataclass
class Row:
    """One (shape, M) point. Times in microseconds, bandwidths in GB/s."""

    k: int
    n: int
    m: int
    path: str
    ours_us: float
    fp16_us: float
    speedup: float
    ours_gbps: float
    fp16_gbps: float
    frac_copy_bw: float
    max_rel_err: float = 0.0  # of ours vs the fp32-accumulated reference, relative to max |reference|
    # same timer, a pure read of the packed weights (torch.amax over qweight): no kernel that reads them
    # can be faster, so fp16_us / read_floor_us bounds the speedup this timing method can show
    read_floor_us: float | None = None
    gemv_us: float | None = None
    gemm_us: float | None = None
    dequant_mm_us: float | None = None


class Bench:
    """Device, timer and tensor factory; CUDA + do_bench, or CPU + perf_counter for --dry-run."""

    def __init__(self, dry_run: bool, reps: int) -> None:
        import torch

        self.torch = torch
        self.dry_run = dry_run
        self.reps = reps
        self.device = torch.device("cpu" if dry_run else "cuda")
        self.backend = "triton" if dry_run else "auto"

    def use_read_flush(self) -> None:
        """Make do_bench (and the autotuner, which uses it) empty L2 by reading its 256 MB buffer."""
        import triton

        if not self.dry_run:
            triton.runtime.driver.active.clear_cache = lambda cache: cache.max()

    def time_us(self, fn: Callable[[], object]) -> float:
        """Median time of ``fn()`` in microseconds."""
        if not self.dry_run:
            from triton.testing import do_bench

            return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
        fn()  # warm-up: compilation / first-call costs are not timed
        times = []
        for _ in range(max(self.reps, 1)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e6

    def time_graphed(self, fn: Callable[[], object]) -> float:
        """Median GPU time of one ``fn()`` call replayed from a CUDA graph (us).

        ``do_bench`` flushes L2 before every replay, so weights come from HBM as in a real forward;
        the graph removes the Python launch overhead, as CUDA-graph serving (vLLM decode) does.
        """
        return self.time_us(_cuda_graph(self, fn))

    def synchronize(self) -> None:
        if not self.dry_run:
            self.torch.cuda.synchronize()

    def copy_bandwidth_gbps(self) -> float:
        """Device-to-device copy bandwidth (read + write bytes / time) of a large buffer."""
        nbytes = (16 if self.dry_run else 1024) << 20
        src = self.torch.empty(nbytes, dtype=self.torch.uint8, device=self.device)
        dst = self.torch.empty_like(src)
        return 2 * nbytes / (self.time_us(lambda: dst.copy_(src)) * 1e-6) / 1e9

    def random_layout(self, k: int, n: int, bits: int, group_size: int) -> dict:
        """Random kernel-layout weight (codes uniform, scales ~1e-2): timing does not need real data."""
        from llmquant.kernels.layout import kernel_rows

        torch = self.torch
        groups = -(-k // group_size)
        words = kernel_rows(k, bits)
        return {
            "qweight": torch.randint(-(2**31), 2**31 - 1, (words, n), dtype=torch.int32, device=self.device),
            "scales": (torch.rand(groups, n, device=self.device) * 0.02).to(torch.float16),
            "zeros": torch.randint(0, 2**bits, (groups, n), dtype=torch.uint8, device=self.device),
            "perm": None,
        }

    def activations(self, m: int, k: int):  # noqa: ANN201
        dtype = self.torch.float32 if self.dry_run else self.torch.float16  # interpreter: no fp16 dot speed
        return self.torch.randn(m, k, device=self.device, dtype=dtype)


def _quant_bytes(lay: dict, m: int, k: int, n: int, act_bytes: int) -> int:
    weights = sum(lay[name].numel() * lay[name].element_size() for name in ("qweight", "scales", "zeros"))
    return weights + m * k * act_bytes + m * n * act_bytes


CHECK_REL_TOL = 1e-2  # fp16 outputs of K-long fp32 sums: a wrong kernel is off by O(1)


def _check(y, x, w) -> float:  # noqa: ANN001
    """Max |y - x @ w| / max |x @ w| (fp32 reference); warns loudly above ``CHECK_REL_TOL``."""
    ref = x.float() @ w.float()
    err = float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    if err > CHECK_REL_TOL:
        print(f"MISMATCH: relative error {err:.3g} vs the reference", file=sys.stderr, flush=True)
    return err


def bench_layers(b: Bench, args: argparse.Namespace, copy_gbps: float) -> list[Row]:
    """Part 1: one row per (shape, M)."""
    from llmquant.kernels import quant_matmul
    from llmquant.kernels.dequant import dequant
    from llmquant.kernels.dispatch import DEQUANT_MATMUL_MIN_M, GEMV_MAX_M
    from llmquant.kernels.gemm import gemm
    from llmquant.kernels.gemv import GEMV_MAX_BLOCK_M, gemv

    torch = b.torch
    shapes = _parse_shapes(args.shapes) or (DRY_SHAPES if args.dry_run else LLAMA_SHAPES)
    batches = args.batches or (DRY_BATCHES if args.dry_run else BATCHES)
    gs, bits = args.group_size, args.bits
    rows = []
    for k, n in shapes:
        lay = b.random_layout(k, n, bits, gs)
        q = (lay["qweight"], lay["scales"], lay["zeros"])
        act_dtype = b.activations(1, k).dtype
        w_ref = dequant(*q, bits, gs, k, dtype=act_dtype)  # [K, N], the fp16 baseline's weight
        floor = b.time_graphed(lambda qw=lay["qweight"]: torch.amax(qw))
        for m in batches:
            x = b.activations(m, k)
            err = _check(quant_matmul(x, *q, bits, gs, backend=b.backend), x, w_ref)
            ours = b.time_graphed(lambda x=x, q=q: quant_matmul(x, *q, bits, gs, backend=b.backend))
            fp16 = b.time_graphed(lambda x=x, w=w_ref: torch.matmul(x, w))
            act_bytes = x.element_size()
            q_bytes = _quant_bytes(lay, m, k, n, act_bytes)
            f_bytes = (k * n + m * k + m * n) * act_bytes
            ours_gbps = q_bytes / (ours * 1e-6) / 1e9
            path = "gemv" if m <= GEMV_MAX_M else "gemm" if m < DEQUANT_MATMUL_MIN_M else "dequant+matmul"
            row = Row(
                k,
                n,
                m,
                path,
                ours,
                fp16,
                fp16 / ours,
                ours_gbps,
                f_bytes / (fp16 * 1e-6) / 1e9,
                ours_gbps / copy_gbps,
                err,
                floor,
            )
            if not args.no_paths:
                if m <= GEMV_MAX_BLOCK_M:
                    row.gemv_us = b.time_graphed(lambda x=x, q=q: gemv(x, *q, bits, gs))
                row.gemm_us = b.time_graphed(lambda x=x, q=q: gemm(x, *q, bits, gs))
                row.dequant_mm_us = b.time_graphed(
                    lambda x=x, q=q, k=k: torch.matmul(x, dequant(*q, bits, gs, k, dtype=x.dtype))
                )
            rows.append(row)
            print(
                f"K={k:6d} N={n:6d} M={m:5d} {path:>14s}: ours {ours:9.1f} us  fp16 {fp16:9.1f} us  "
                f"x{row.speedup:5.2f}  {ours_gbps:7.0f} GB/s ({100 * row.frac_copy_bw:5.1f}% of copy)  "
                f"err {err:.1e}  (read floor {floor:.1f} us)",
                flush=True,
            )
    return rows


@dataclass
class DecodeRow:
    batch: int
    layers: int
    ours_ms: float
    fp16_ms: float
    ours_tok_s: float
    fp16_tok_s: float
    speedup: float


def bench_decode(b: Bench, args: argparse.Namespace) -> list[DecodeRow]:
    """Part 2: one decode step of a LLaMA-shaped stack of linears (attention and norms omitted)."""
    from llmquant.kernels import quant_matmul
    from llmquant.kernels.dequant import dequant

    torch = b.torch
    dims = DRY_DECODE if args.dry_run else LLAMA_7B
    h, inter, n_layers = dims["hidden"], dims["intermediate"], dims["layers"]
    gs, bits = (DRY_GROUP_SIZE if args.dry_run else args.group_size), args.bits
    if args.decode_unfused:
        names = {"q": (h, h), "k": (h, h), "v": (h, h), "o": (h, h), "gate": (h, inter), "up": (h, inter)}
    else:  # q/k/v and gate/up share their input: one launch each (kernels.concat_layouts for checkpoints)
        names = {"qkv": (h, 3 * h), "o": (h, h), "gate_up": (h, 2 * inter)}
    names["down"] = (inter, h)
    layers = [
        {name: b.random_layout(k, n, bits, gs) for name, (k, n) in names.items()} for _ in range(n_layers)
    ]
    act_dtype = b.activations(1, h).dtype
    dense = [
        {name: dequant(lay["qweight"], lay["scales"], lay["zeros"], bits, gs, names[name][0], dtype=act_dtype)
         for name, lay in layer.items()}
        for layer in layers
    ]  # fmt: skip

    def ours(name: str, layer: dict, x):  # noqa: ANN001, ANN202
        lay = layer[name]
        return quant_matmul(x, lay["qweight"], lay["scales"], lay["zeros"], bits, gs, backend=b.backend)

    def fp16(name: str, layer: dict, x):  # noqa: ANN001, ANN202
        return torch.matmul(x, layer[name])

    def step(linear: Callable, weights: list[dict], x):  # noqa: ANN001, ANN202
        for layer in weights:
            if args.decode_unfused:
                linear("q", layer, x)
                linear("k", layer, x)
                v = linear("v", layer, x)  # attention omitted: o_proj reads v
                gate, up = linear("gate", layer, x), linear("up", layer, x)
            else:
                v = linear("qkv", layer, x)[..., 2 * h :]
            x = x + linear("o", layer, v)
            if not args.decode_unfused:
                gate, up = linear("gate_up", layer, x).split(inter, dim=-1)
            x = x + linear("down", layer, torch.nn.functional.silu(gate) * up)
        return x

    rows = []
    for batch in args.batches_decode:
        x = b.activations(batch, h) * 0.1
        times = {}
        for label, linear, weights in (("ours", ours, layers), ("fp16", fp16, dense)):
            fn = lambda linear=linear, weights=weights, x=x: step(linear, weights, x)  # noqa: E731
            times[label] = b.time_graphed(fn) / 1e3
        rows.append(
            DecodeRow(
                batch, n_layers, times["ours"], times["fp16"], batch / (times["ours"] * 1e-3),
                batch / (times["fp16"] * 1e-3), times["fp16"] / times["ours"],
            )
        )  # fmt: skip
        r = rows[-1]
        print(
            f"decode batch {batch:3d}: ours {r.ours_ms:8.3f} ms ({r.ours_tok_s:8.1f} tok/s)  "
            f"fp16 {r.fp16_ms:8.3f} ms ({r.fp16_tok_s:8.1f} tok/s)  x{r.speedup:5.2f}",
            flush=True,
        )
    return rows


def _cuda_graph(b: Bench, fn: Callable[[], object]) -> Callable[[], object]:
    """fn captured in a CUDA graph (after warm-up: compile + autotune must not happen in capture)."""
    if b.dry_run:
        return fn
    torch = b.torch
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    b.synchronize()
    return graph.replay


def _parse_shapes(specs: list[str] | None) -> list[tuple[int, int]] | None:
    if not specs:
        return None
    out = []
    for spec in specs:
        k, _, n = spec.lower().partition("x")
        out.append((int(k), int(n)))
    return out


def _fmt(v: object) -> str:
    if v is None:
        return ""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def write_outputs(out: Path, meta: dict, rows: list[Row], decode: list[DecodeRow]) -> list[Path]:
    """kernels.csv, decode.csv, kernels.md and (if matplotlib is installed) kernels.png."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, items in (("kernels.csv", rows), ("decode.csv", decode)):
        if not items:
            continue
        path = out / name
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(items[0])))
            writer.writeheader()
            writer.writerows({k: _fmt(v) for k, v in asdict(r).items()} for r in items)
        written.append(path)
    lines = [f"# Kernel benchmark ({meta['device']})", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += [
        "",
        "| K | N | M | path | ours (us) | fp16 (us) | speedup | ours GB/s | % of copy BW | max rel err "
        "| read floor (us) | gemv (us) | gemm (us) | deq+mm (us) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.k} | {r.n} | {r.m} | {r.path} | {r.ours_us:.1f} | {r.fp16_us:.1f} | {r.speedup:.2f} | "
            f"{r.ours_gbps:.0f} | {100 * r.frac_copy_bw:.1f} | {r.max_rel_err:.1e} | "
            f"{_fmt(r.read_floor_us)} | {_fmt(r.gemv_us)} | {_fmt(r.gemm_us)} | {_fmt(r.dequant_mm_us)} |"
        )
    if decode:
        lines += ["", f"Decode (linears only, attention and norms omitted; {meta['decode timing']}):", ""]
        lines += [
            "| batch | layers | ours ms | fp16 ms | ours tok/s | fp16 tok/s | speedup |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {d.batch} | {d.layers} | {d.ours_ms:.3f} | {d.fp16_ms:.3f} | {d.ours_tok_s:.1f} | "
            f"{d.fp16_tok_s:.1f} | {d.speedup:.2f} |"
            for d in decode
        ]
    md = out / "kernels.md"
    md.write_text("\n".join(lines) + "\n")
    written.append(md)
    png = _plot(out / "kernels.png", rows)
    if png is not None:
        written.append(png)
    return written


def _plot(path: Path, rows: list[Row]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)", file=sys.stderr)
        return None
    if not rows:
        return None
    fig, (ax_s, ax_b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for k, n in sorted({(r.k, r.n) for r in rows}):
        pts = sorted((r.m, r.speedup, 100 * r.frac_copy_bw) for r in rows if (r.k, r.n) == (k, n))
        ms = [p[0] for p in pts]
        ax_s.plot(ms, [p[1] for p in pts], marker="o", label=f"{k}x{n}")
        ax_b.plot(ms, [p[2] for p in pts], marker="o", label=f"{k}x{n}")
    for ax, title in ((ax_s, "speedup vs fp16 torch.matmul"), (ax_b, "effective bandwidth, % of copy")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (tokens)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    ax_s.axhline(1.0, color="k", lw=0.8)
    ax_s.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Tune afresh (before llmquant.kernels is imported): configs persisted by other processes, e.g. tests
    # autotuning on a shared GPU, must not decide what is timed here. --load-tuned reuses a dump on purpose.
    os.environ.setdefault("LLMQUANT_TUNE_CACHE", "off")
    if args.dry_run:
        # Before llmquant.kernels is imported: triton.jit picks the interpreter at decoration time.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.group_size = DRY_GROUP_SIZE
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(
            "bench_kernels: no CUDA GPU found; this benchmark needs one (--dry-run runs a CPU smoke test)",
            file=sys.stderr,
        )
        return 2
    args.batches_decode = [1, 2] if args.dry_run else DECODE_BATCHES
    b = Bench(args.dry_run, args.reps)
    if args.l2_flush == "read":
        b.use_read_flush()
    from llmquant.kernels import tuning

    if args.load_tuned is not None:
        print(f"loaded {tuning.load_tuned(args.load_tuned)} tuned configs from {args.load_tuned}")
    device = "cpu (dry run, Triton interpreter)" if args.dry_run else torch.cuda.get_device_name()
    copy_gbps = b.copy_bandwidth_gbps()
    print(f"{device}: device copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
    rows = bench_layers(b, args, copy_gbps)
    decode = [] if args.no_decode else bench_decode(b, args)
    meta = {
        "device": device,
        "bits": args.bits,
        "group_size": args.group_size,
        "copy bandwidth (GB/s)": f"{copy_gbps:.0f}",
        "torch": torch.__version__,
        "timer": "perf_counter median (dry run)"
        if args.dry_run
        else f"do_bench median of CUDA-graph replays, L2 flush by {args.l2_flush}",
        "decode linears": "separate q/k/v, gate/up" if args.decode_unfused else "fused qkv, fused gate_up",
        "decode timing": "eager (dry run)" if args.dry_run else "one step captured in a CUDA graph",
    }
    written = write_outputs(args.out, meta, rows, decode)
    if args.tune:
        name = "".join(c if c.isalnum() else "_" for c in device.lower())
        path = args.out / f"tuned_{name}.json"
        tuning.dump_tuned(path, device_name=device)
        written.append(path)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
