"""`llmquant quantize | eval | inspect` — argument parsing and printing only; the work is in the library.

User errors (missing paths, unsupported architectures, bad option combinations) print one line
``llmquant: error: ...`` and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time


def _group_size(text: str) -> int | None:
    if text.lower() in {"none", "-1", "channel", "per-channel"}:
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--group-size takes a positive integer or 'none', got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError("--group-size must be positive (or 'none' for per-channel)")
    return value


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a local HF checkpoint and save it")
    p.add_argument("model", help="local Hugging Face checkpoint directory (float weights)")
    p.add_argument("-o", "--output", required=True, help="output directory (written atomically)")
    p.add_argument("--method", choices=["rtn", "gptq"], default="gptq")
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    p.add_argument("--group-size", type=_group_size, default=128, help="input channels per scale, or 'none'")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True, help="symmetric grid (default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric min-max grid")
    p.add_argument("--format", default="gptq", help="gptq (v1, default) | gptq_v2 | awq | compressed-tensors")
    p.add_argument("--mse-clip", action="store_true", help="choose each group's range by an error search")
    g = p.add_argument_group("GPTQ")
    g.add_argument("--calib", default="c4", help="c4 | wikitext2 | pileval | ultrachat | PATH | synthetic")
    g.add_argument("--n-samples", type=int, default=128)
    g.add_argument("--seqlen", type=int, default=512)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--text-field", default="text", help="text column of a jsonl/parquet calibration file")
    g.add_argument("--damp", type=float, default=0.01, help="fraction of the mean Hessian diagonal")
    g.add_argument("--block-size", type=int, default=128, help="GPTQ lazy-batch width")
    g.add_argument(
        "--act-order",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="quantize columns by decreasing Hessian diagonal (default: on)",
    )
    g.add_argument(
        "--static-groups",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with --act-order: grids fixed up front, g_idx trivial (default: on with --act-order)",
    )
    g.add_argument("--no-true-sequential", dest="true_sequential", action="store_false")
    p.add_argument("--device", default=None, help="compute device (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward")
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT.partial exists")
    p.set_defaults(func=_cmd_quantize)


def _cmd_quantize(args: argparse.Namespace) -> int:
    from .api import quantize_checkpoint
    from .config import CalibrationConfig, GPTQConfig, QuantScheme, RTNConfig

    scheme = QuantScheme(bits=args.bits, group_size=args.group_size, sym=args.sym)
    if args.method == "rtn":
        config = RTNConfig(scheme=scheme, mse_clip=args.mse_clip)
    else:
        config = GPTQConfig(
            scheme=scheme,
            damp=args.damp,
            block_size=args.block_size,
            act_order=args.act_order,
            static_groups=args.static_groups,
            true_sequential=args.true_sequential,
            mse_clip=args.mse_clip,
        )
    calib = CalibrationConfig(
        source=args.calib,
        n_samples=args.n_samples,
        seqlen=args.seqlen,
        seed=args.seed,
        text_field=args.text_field,
    )
    t0 = time.perf_counter()
    summary = quantize_checkpoint(
        args.model,
        args.output,
        config,
        calib,
        format=args.format,
        device=args.device,
        batch_size=args.batch_size,
        resume=not args.no_resume,
    )
    rows = [
        ("output", str(summary["path"])),
        ("format", summary["format"]),
        ("scheme", f"w{args.bits} g{args.group_size or 'channel'} {'sym' if args.sym else 'asym'}"),
        ("method", args.method),
        ("quantized linears", str(summary["modules"])),
        ("quantization time", f"{summary['seconds']:.1f} s"),
        ("total time", f"{time.perf_counter() - t0:.1f} s"),
        ("peak RSS", f"{_peak_rss_gib():.2f} GiB"),
        ("checkpoint size", f"{summary['bytes'] / 2**20:.1f} MiB"),
        ("verified", "yes (read back, bit-exact)"),
    ]
    _print_table(rows)
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity (and KL vs a float model) on a text file, or lm-eval tasks")
    p.add_argument("path", help="quantized checkpoint (or a float HF checkpoint)")
    p.add_argument("--text", help="UTF-8 text file, e.g. wikitext-2 wiki.test.raw")
    p.add_argument("--tasks", help="comma-separated lm-eval tasks (needs the [eval] extra) instead of --text")
    p.add_argument("--include-path", default=None, help="folder of extra lm-eval task YAML files")
    p.add_argument("--limit", type=int, default=None, help="lm-eval: first N documents of each task")
    p.add_argument("--windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--base", default=None, help="float checkpoint to compare against (perplexity + KL)")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    from .api import evaluate_checkpoint

    if args.tasks:
        return _cmd_tasks(args)
    if not args.text:
        raise ValueError("eval needs --text FILE (perplexity) or --tasks NAMES (lm-eval)")

    result = evaluate_checkpoint(
        args.path, args.text, base=args.base, windows=args.windows, seqlen=args.seqlen, device=args.device
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    rows = [
        ("windows", f"{result['n_windows']} x {result['seqlen']} tokens"),
        ("perplexity", f"{result['perplexity']:.4f}"),
    ]
    if "base_perplexity" in result:
        rows += [
            ("base perplexity", f"{result['base_perplexity']:.4f}"),
            ("KL(base || quant)", f"{result['kl_divergence']:.5f} nats/token"),
        ]
    _print_table(rows)
    return 0


def _cmd_tasks(args: argparse.Namespace) -> int:
    from .harness import evaluate_tasks

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    results = evaluate_tasks(
        args.path, tasks, include_path=args.include_path, limit=args.limit, device=args.device
    )
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    _print_table(
        [(f"{task} {metric}", f"{value:.4f}") for task, m in results.items() for metric, value in m.items()]
    )
    return 0


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="format, scheme, per-layer shapes and verification of a checkpoint")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_inspect)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .api import inspect_checkpoint

    info = inspect_checkpoint(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    _print_table([(k, str(v)) for k, v in info.items() if k != "modules"])
    for row in info["modules"]:
        print(f"  {row['name']:<48} {row['shape']!s:<14} {row['tensors']}")
    return 0


def _print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmquant", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_quantize(sub)
    _add_eval(sub)
    _add_inspect(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("transformers", "accelerate", "datasets", "urllib3", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"llmquant: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmquant: interrupted (a rerun of the same command resumes)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
