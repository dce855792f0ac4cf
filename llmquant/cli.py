"""llmquant: one-shot low-bit weight quantization (GPTQ, AWQ, AWQ+GPTQ, RTN) of LLaMA-class Hugging Face
models, written as GPTQ / AWQ / compressed-tensors checkpoints that transformers and vLLM load.

(Module: argument parsing and printing only; the work is in the library. User errors -- bad paths, options,
inputs -- print one line ``llmquant: error: ...`` and exit with status 2, without a traceback.)
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shlex
import sys
import time
from typing import NoReturn

# third-party loggers kept at ERROR (the hub client's HTTP loggers among them: they log requests)
NOISY_LOGGERS = (
    "transformers",
    "accelerate",
    "datasets",
    "urllib3",
    "httpx",
    "httpx2",
    "httpcore",
    "httpcore2",
    "filelock",
    "huggingface_hub",
)


DESCRIPTION = __doc__.split("\n\n")[0].replace("\n", " ")
EPILOG = "Run `llmquant COMMAND --help` for a command's options. Docs: README.md, docs/reliability.md."


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (``llmquant: error: ...``, exit 2), not argparse's usage block."""

    def error(self, message: str) -> NoReturn:
        hint = f" (see `{self.prog} --help`)"
        self.exit(2, f"llmquant: error: {message.splitlines()[0]}{hint}\n")


class _HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to every option whose help does not state its default already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        if "default" in text or not action.option_strings or default is None or default is False:
            return text
        if default is argparse.SUPPRESS:
            return text
        if default is True:
            return f"{text} (default: on)"
        return f"{text} (default: %(default)s)"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


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


def _add_calibration_options(p: argparse.ArgumentParser) -> None:
    from .config import REFINE_LOSSES

    g = p.add_argument_group("calibration and GPTQ")
    g.add_argument(
        "--calib",
        default="c4",
        help="calibration data: c4 | wikitext2 | pileval | ultrachat (hub recipes) | PATH (.txt, .jsonl, "
        ".parquet) | synthetic (text sampled from the model itself)",
    )
    g.add_argument("--n-samples", type=int, default=128, help="calibration sequences")
    g.add_argument("--seqlen", type=int, default=512, help="tokens per calibration sequence")
    g.add_argument("--seed", type=int, default=0, help="seed for shuffling and synthetic sampling")
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
    g.add_argument(
        "--error-propagation",
        type=float,
        default=None,
        metavar="ALPHA",
        help="GPTQ rounds toward the float model's outputs (GPTAQ): minimizes |W X_float - Q X| at 1, "
        "plain GPTQ at 0 (default: 0.5); above 0 carries a second activation cache, about 1.9x the time",
    )
    g.add_argument(
        "--refine",
        type=_positive_int,
        default=None,
        metavar="STEPS",
        help="learned rounding after the rounder: STEPS signed-gradient steps per decoder layer on the "
        "codes against the float layer's outputs (AutoRound-style; default: off)",
    )
    g.add_argument(
        "--refine-loss",
        choices=REFINE_LOSSES,
        default=None,
        help="with --refine: 'mse' the layer outputs' squared error (default); 'relative' each token's error "
        "over its float output's mean square, so a few massive-activation tokens do not dominate",
    )
    g.add_argument(
        "--refine-scales",
        action="store_true",
        default=None,
        help="with --refine: also tune each group's scale (x0.82..x1.22, exact float16; zeros kept)",
    )
    g.add_argument(
        "--no-true-sequential",
        dest="true_sequential",
        action="store_false",
        help="quantize all linears of a layer from the float inputs (default: true-sequential groups)",
    )


def _add_awq_options(p: argparse.ArgumentParser) -> None:
    a = p.add_argument_group("AWQ (--method awq | awq+gptq)")
    a.add_argument(
        "--awq-grid", dest="n_grid", type=int, default=None, help="scale exponents tried (default 20)"
    )
    a.add_argument(
        "--duo-scaling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="scales from activations and weights (default: on); --no-duo-scaling: activations only",
    )
    a.add_argument(
        "--awq-clip",
        dest="clip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="search a clipping range per group after scaling (default: on for awq, off for awq+gptq)",
    )
    a.add_argument(
        "--search-samples",
        type=int,
        default=None,
        help="calibration sequences replayed per scale candidate (default 8; statistics use all)",
    )


def _add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-o", "--output", required=True, help="output directory (written atomically; must not exist)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace the output directory if it exists")


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize a local HF checkpoint and save it",
        description="Quantize a local float Hugging Face checkpoint (streamed layer by layer) and write a "
        "verified, atomically written checkpoint. Interrupted runs resume from OUT.partial.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("model", help="local Hugging Face checkpoint directory (float weights)")
    _add_output(p)
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="run every check, print the plan and the estimated peak memory and disk, and stop",
    )
    from .methods import METHODS

    p.add_argument(
        "--method",
        choices=list(METHODS),
        default="gptq",
        help="; ".join(f"{m.name}: {m.help}" for m in METHODS.values()) + " (default: gptq)",
    )
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8], help="bits per weight")
    p.add_argument("--group-size", type=_group_size, default=128, help="input channels per scale, or 'none'")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument(
        "--sym", dest="sym", action="store_true", default=None, help="symmetric grid (default for rtn, gptq)"
    )
    sym.add_argument(
        "--asym", dest="sym", action="store_false", help="asymmetric min-max grid (default for awq)"
    )
    p.add_argument(
        "--format",
        default=None,
        help="gptq (v1) | gptq_v2 | awq | compressed-tensors (default: the method's own: awq for AWQ when "
        "the group size divides every input size, else gptq for sym / gptq_v2 for asym)",
    )
    from .config import GRIDS

    p.add_argument(
        "--grid",
        choices=GRIDS,
        default=None,
        help="how each group's scale/zero are chosen (rtn/gptq): minmax (the plain range), mse (a shrink "
        "minimizing the L2.4 error), search (the scale/zero minimizing the Hessian-diagonal-weighted "
        "squared error) (default: the method's own)",
    )
    p.add_argument(
        "--mse-clip", dest="grid", action="store_const", const="mse", help="same as --grid mse (default: off)"
    )
    _add_calibration_options(p)
    _add_awq_options(p)
    p.add_argument("--device", default=None, help="compute device (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="calibration sequences per forward")
    p.add_argument(
        "--base-model", default=None, help="hub id the model card names as the base model (default: none)"
    )
    p.add_argument(
        "--no-resume", action="store_true", help="start over even if OUT.partial exists (default: resume)"
    )
    p.add_argument(
        "--no-memory-check",
        dest="memory_check",
        action="store_false",
        help="start even when the estimated peak memory is over the available memory",
    )
    p.set_defaults(func=_cmd_quantize)


def quantize_configs(args: argparse.Namespace):
    """The method and calibration configs ``llmquant quantize`` runs with for parsed ``args`` (fills in
    ``args.sym`` from the method when neither --sym nor --asym was given). Also used by scripts/demo.py,
    so the demo shows exactly the command's defaults."""
    from .config import CalibrationConfig, QuantScheme
    from .methods import METHODS, build_method_config

    if args.sym is None:
        args.sym = METHODS[args.method].default_sym
    scheme = QuantScheme(bits=args.bits, group_size=args.group_size, sym=args.sym)
    config = build_method_config(args.method, scheme, vars(args))
    calib = CalibrationConfig(
        source=args.calib,
        n_samples=args.n_samples,
        seqlen=args.seqlen,
        seed=args.seed,
        text_field=args.text_field,
    )
    return config, calib


def _cmd_quantize(args: argparse.Namespace) -> int:
    from .api import quantize_checkpoint

    config, calib = quantize_configs(args)
    if args.dry_run:
        return _print_plan(args, config, calib)
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
        base_model=args.base_model,
        overwrite=args.overwrite,
        check_memory=args.memory_check,
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


def _print_plan(args: argparse.Namespace, config, calib) -> int:
    """--dry-run: every check, the plan and the estimates (adapted to the memory there is, as the run would
    be); exit 2 (with the numbers) when nothing fits."""
    from .api import plan_quantization
    from .preflight import GiB

    planned = plan_quantization(
        args.model, args.output, config, calib, format=args.format, batch_size=args.batch_size,
        overwrite=args.overwrite, resume=not args.no_resume, device=args.device, adapt=args.memory_check,
    )  # fmt: skip
    plan, fit = planned["plan"], planned["fit"]
    model = f"{args.model} ({plan.layers} layers, hidden {plan.hidden}, intermediate {plan.intermediate})"
    params = f"{plan.quantized_params / 1e6:.1f} M quantized + {plan.other_params / 1e6:.1f} M kept"
    scheme = f"w{args.bits} g{args.group_size or 'channel'} {'sym' if args.sym else 'asym'}"
    data = "none" if config.method == "rtn" else f"{calib.source}: {calib.n_samples} x {calib.seqlen}"
    size = f"{plan.output_bytes / 2**20:.1f} MiB (+ {plan.resume_bytes / 2**20:.1f} MiB resume state)"
    rows = [
        ("model", model),
        ("parameters", params),
        ("method / format", f"{args.method} -> {planned['format']}"),
        ("scheme", scheme),
        ("calibration", data),
        ("device / batch size", f"{planned['device']} / {plan.batch_size}"),
        ("output size", size),
    ]
    if fit.changes and fit.fits:
        rows.append(("memory", fit.note(planned["asked"])))
    rows += [(f"  host: {k}", f"{v / 2**20:.1f} MiB") for k, v in plan.host.items() if v]
    rows.append(("peak host memory (estimate)", f"{plan.host_peak / GiB:.2f} GiB"))
    rows.append(("available memory", f"{fit.host_available / GiB:.2f} GiB"))
    if plan.device:
        rows += [(f"  device: {k}", f"{v / 2**20:.1f} MiB") for k, v in plan.device.items() if v]
        rows.append(("peak device memory (estimate)", f"{plan.device_peak / GiB:.2f} GiB"))
        rows.append(("available device memory", f"{(fit.device_available or 0) / GiB:.2f} GiB"))
    _print_table(rows)
    if args.memory_check:
        fit.refuse()
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity (and KL vs a float model) on a text file, or lm-eval tasks",
        description="Perplexity of a checkpoint on a UTF-8 text file (and, with --base, the float model's "
        "perplexity and KL(base || quantized)); or lm-evaluation-harness tasks with --tasks.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("path", help="quantized checkpoint (or a float HF checkpoint)")
    p.add_argument(
        "--text",
        default=None,
        help="UTF-8 text file, e.g. wikitext-2 wiki.test.raw (default: none; this or --tasks)",
    )
    p.add_argument(
        "--tasks",
        default=None,
        help="comma-separated lm-eval tasks (needs the [eval] extra) instead of --text (default: none)",
    )
    p.add_argument(
        "--include-path", default=None, help="folder of extra lm-eval task YAML files (default: none)"
    )
    p.add_argument(
        "--limit",
        type=_positive_int,
        default=None,
        help="lm-eval: first N documents of each task (default: all)",
    )
    p.add_argument(
        "--windows", type=_positive_int, default=None, help="evaluate only the first N windows (default: all)"
    )
    p.add_argument("--seqlen", type=_positive_int, default=2048, help="tokens per evaluation window")
    p.add_argument(
        "--base", default=None, help="float checkpoint to compare against (perplexity + KL; default: none)"
    )
    p.add_argument("--device", default=None, help="device (default: cuda if available, else cpu)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument(
        "--update-card",
        action="store_true",
        help="record the result (and this command) in the checkpoint's eval_results.json and model card",
    )
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    from .api import evaluate_checkpoint

    if args.tasks:
        return _cmd_tasks(args)
    if not args.text:
        raise ValueError("eval needs --text FILE (perplexity) or --tasks NAMES (lm-eval)")

    if args.update_card:
        _check_card_target(args.path)
    result = evaluate_checkpoint(
        args.path, args.text, base=args.base, windows=args.windows, seqlen=args.seqlen, device=args.device
    )
    if args.update_card:
        from .hub import record_evaluation

        command = shlex.join(["llmquant", *args.argv])
        record_evaluation(args.path, result, text=args.text, command=command, base=args.base)
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
    if args.update_card:
        rows.append(("model card", f"updated ({args.path}/README.md, eval_results.json)"))
    _print_table(rows)
    return 0


def _check_card_target(path: str) -> None:
    """--update-card needs a quantized checkpoint (checked before the evaluation runs)."""
    from .checkpoint import read_config

    if not read_config(path).get("quantization_config"):
        raise ValueError(f"{path} is not a quantized checkpoint; --update-card needs one")


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
    p = sub.add_parser(
        "inspect",
        help="format, scheme, per-layer shapes and verification of a checkpoint",
        description="Print a quantized checkpoint's format, scheme and per-module shapes after unpacking "
        "every module again (a fresh verification).",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("path", help="quantized checkpoint directory")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
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


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="re-pack a quantized checkpoint into another format, losslessly",
        description="Re-pack a quantized checkpoint's integer codes into another format (no re-quantizing); "
        "refused, with the reason, when the target cannot hold them exactly.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("input", help="quantized checkpoint (llmquant's or another tool's)")
    _add_output(p)
    p.add_argument("--format", required=True, help="gptq | gptq_v2 | awq | compressed-tensors")
    p.add_argument(
        "--base-model", default=None, help="hub id the model card names as the base model (default: none)"
    )
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert_checkpoint

    summary = convert_checkpoint(
        args.input, args.output, args.format, base_model=args.base_model, overwrite=args.overwrite
    )
    scheme = summary["scheme"]
    rows = [
        ("output", str(summary["path"])),
        ("format", f"{summary['from']} -> {summary['format']}"),
        ("scheme", f"w{scheme.bits} g{scheme.group_size or 'channel'} {'sym' if scheme.sym else 'asym'}"),
        ("quantized linears", str(summary["modules"])),
        ("verified", "yes (read back: same integer codes, scales and zeros)"),
    ]
    _print_table(rows)
    return 0


def _add_push(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "push",
        help="upload a verified checkpoint to the model hub in one commit",
        description="Upload a checkpoint llmquant wrote and verified to a hub model repository, in one "
        "commit (token from HF_TOKEN or the login cache).",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("path", help="checkpoint directory written by llmquant")
    p.add_argument("repo_id", help="model repository, owner/name (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", default=None, help="branch to commit to (created if missing; default main)")
    p.add_argument(
        "--commit-message",
        default=None,
        help="commit message (default: Upload NAME (N files, llmquant VERSION))",
    )
    p.set_defaults(func=_cmd_push)


def _cmd_push(args: argparse.Namespace) -> int:
    from .hub import push_checkpoint

    info = push_checkpoint(
        args.path,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
    )
    rows = [
        ("repository", info["repo_id"]),
        ("revision", info["revision"]),
        ("commit", info["commit_url"]),
        ("files", str(len(info["files"]))),
    ]
    _print_table(rows)
    return 0


def _print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__

    parser = _Parser(prog="llmquant", description=DESCRIPTION, epilog=EPILOG, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"llmquant {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    _add_quantize(sub)
    _add_eval(sub)
    _add_inspect(sub)
    _add_convert(sub)
    _add_push(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the exact command, for eval --update-card
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from .preflight import return_freed_memory

    return_freed_memory()  # before any large tensor: the memory estimate assumes freed memory goes back
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:  # llmquant.errors (typed), HubError, filesystem errors
        message = " ".join(str(exc).split()) if str(exc) else type(exc).__name__
        print(f"llmquant: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmquant: interrupted (a rerun of the same command resumes)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
