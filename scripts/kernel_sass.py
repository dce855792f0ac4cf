"""Compile a GEMV / GEMM launch configuration for a GPU architecture offline and summarize its SASS.

No GPU is needed: Triton's NVIDIA backend compiles to a cubin with the ``ptxas`` it ships, and its
``nvdisasm`` / ``cuobjdump`` disassemble it. This shows what a kernel change does to the instruction
mix (integer ops, FFMA, loads and their vector width, barriers, MMA) and to register use, on a machine
without a GPU. Arguments are specialized the way a real launch on aligned tensors is (unit strides as
constants, everything else divisible by 16, M = 1 for the GEMV). The installed Triton may differ from a
GPU machine's, so treat the numbers as guidance and measure on the GPU (``sweep_kernels.py``).

    python scripts/kernel_sass.py gemv --config BLOCK_N=256 BLOCK_K=128 SPLIT_K=8 --warps 8 --stages 3
    python scripts/kernel_sass.py gemm --config BLOCK_N=128 BLOCK_K=128 SPLIT_K=4 --out-dir sass_out
    python scripts/kernel_sass.py gemm --all-configs 4   # every autotune config compiles (exit 1 if not)
"""

from __future__ import annotations

import argparse
import collections
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

POINTERS = {
    "x_ptr": "*fp16",
    "qweight_ptr": "*i32",
    "scales_ptr": "*fp16",
    "zeros_ptr": "*u8",
    "perm_ptr": "*i32",
    "bias_ptr": "*fp16",
    "y_ptr": "*fp16",
    "ws_ptr": "*fp32",
    "lock_ptr": "*i32",
}
ACTIVATION_POINTERS = ("x_ptr", "bias_ptr", "y_ptr")  # x's dtype (--dtype)
UNIT_STRIDES = ("stride_xk", "stride_qn", "stride_sn", "stride_zn", "stride_yn")
BASE = {
    "BITS": 4,
    "GROUP_SIZE": 128,
    "FP16_MATH": True,
    "FP32_DOT": False,
    "HAS_PERM": False,
    "HAS_BIAS": False,
    "EVEN_K": True,
    "EVEN_N": True,
}
DEFAULTS = {
    "gemv": {"BLOCK_M": 1, "BLOCK_N": 256, "BLOCK_K": 128, "SPLIT_K": 8},
    "gemm": {
        "BLOCK_M": 16,
        "BLOCK_N": 128,
        "BLOCK_K": 128,
        "SPLIT_K": 4,
        "GROUP_M": 8,
        "WEIGHT_EVICTION": "evict_first",
    },
}


def _value(text: str) -> object:
    if text in ("True", "False"):
        return text == "True"
    try:
        return int(text)
    except ValueError:
        return text


def parse_config(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"kernel_sass: bad --config item {item!r}; write NAME=VALUE, e.g. BLOCK_N=128")
        out[key] = _value(value)
    return out


def compile_cubin(kind: str, config: dict, warps: int, stages: int, arch: int, dtype: str = "fp16") -> object:
    """The compiled kernel (``.asm`` holds ttgir / ptx / cubin) for activations of ``dtype`` (fp16/bf16)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = importlib.import_module(f"llmquant.kernels.{kind}")  # the module, not the re-exported function
    fn = getattr(module, f"_{kind}_kernel").fn  # the jit function under @triton.heuristics
    if not hasattr(fn, "params"):
        raise SystemExit("kernel_sass: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
    act = {"FP16_MATH": dtype == "fp16"}
    constexprs = {**BASE, **act, **DEFAULTS[kind], **config, **dict.fromkeys(UNIT_STRIDES, 1)}
    for param in fn.params:  # meta-parameters with defaults (FAST, ONE_DOT, ...), as a launch binds them
        if param.is_constexpr and param.default is not inspect.Parameter.empty:
            constexprs.setdefault(param.name, param.default)
    if constexprs["BLOCK_M"] == 1:
        constexprs["M"] = 1  # a one-row launch specializes M == 1
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = POINTERS.get(name, "i32")
            if name in ACTIVATION_POINTERS:
                signature[name] = f"*{dtype}"
            if name != "M":
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    from llmquant.kernels.configs import COMPILE_OPTIONS

    options = {"num_warps": warps, "num_stages": stages, **COMPILE_OPTIONS}  # as a launch passes them
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


_INSTRUCTION = re.compile(
    r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)([^;]*);"
)


def _opcode(op: str) -> str:
    base = op.split(".")[0]
    return base + (".128" if base.startswith("LD") and ".128" in op else "")


def main_loop(sass: str) -> collections.Counter:
    """Opcode histogram of the longest loop of ``nvdisasm -c`` output (from a backward branch's target
    label to the branch): the K loop, where a kernel spends its time."""
    labels, pending, instructions = {}, [], []
    for line in sass.splitlines():
        label = re.match(r"(\.L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        m = _INSTRUCTION.search(line)
        if m:
            address = int(m.group(1), 16)
            labels.update(dict.fromkeys(pending, address))
            pending = []
            instructions.append((address, m.group(2), m.group(3)))
    best = (0, 0, -1)
    for address, op, operands in instructions:
        target = re.search(r"\((\.L_x_\d+)\)", operands)
        if op.startswith("BRA") and target and labels.get(target.group(1), address) < address:
            start = labels[target.group(1)]
            best = max(best, (address - start, start, address))
    _, start, end = best
    return collections.Counter(_opcode(op) for address, op, _ in instructions if start <= address <= end)


def summarize(cubin: Path) -> tuple[str, collections.Counter, collections.Counter]:
    """(resource usage line, opcode histogram, main-loop opcode histogram) of a cubin."""
    usage = subprocess.run(
        [_tool("cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True, text=True
    )
    resources = " ".join(re.findall(r"(?:REG|SHARED|LOCAL):\d+", usage.stdout))
    sass = subprocess.run(
        [_tool("nvdisasm"), "-c", str(cubin)], capture_output=True, text=True, check=True
    ).stdout
    ops = collections.Counter(_opcode(m.group(2)) for m in _INSTRUCTION.finditer(sass))
    return resources, ops, main_loop(sass)


def compile_all(kind: str, bits: int, arch: int, limit: int | None = None) -> int:
    """Compile every distinct autotune config of ``kind`` (``llmquant.kernels.configs``) at ``bits`` for
    ``arch`` with group size 128, SPLIT_K aside (it does not change the code); prints each failure and
    returns their count.
    GEMM configs whose pair-slice dots would be shorter than K = 16 are skipped (the pruning drops them)."""
    from llmquant.kernels import configs

    listed = configs.gemm_configs() if kind == "gemm" else configs.gemv_configs()
    seen, failures, done = set(), 0, 0
    for cfg in listed:
        meta = {k: v for k, v in cfg.kwargs.items() if k != "SPLIT_K"}
        key = (tuple(sorted(meta.items())), cfg.num_warps, cfg.num_stages)
        if key in seen or (kind == "gemm" and not configs._dot_k_valid(cfg, 32 // bits)):
            continue
        seen.add(key)
        if limit is not None and done >= limit:
            break
        done += 1
        meta = {**cfg.kwargs, "BITS": bits, "GROUP_SIZE": 128}
        try:
            compile_cubin(kind, meta, cfg.num_warps, cfg.num_stages, arch)
        except Exception as exc:  # noqa: BLE001 -- report every failing config, then the count
            failures += 1
            print(f"FAILED {kind} {meta} warps={cfg.num_warps} stages={cfg.num_stages}: {exc!r:.300}")
    print(f"{kind} {bits}-bit sm_{arch}: {done} configs compiled, {failures} failed")
    return failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=["gemv", "gemm"])
    p.add_argument(
        "--config", nargs="*", default=[], help="NAME=VALUE meta-parameters (BLOCK_N=128 FAST=False ...)"
    )
    p.add_argument("--warps", type=int, default=4)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90 = H100/H200)")
    p.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16", help="activation dtype")
    p.add_argument("--out-dir", type=Path, default=Path("sass_out"))
    p.add_argument("--top", type=int, default=20, help="opcodes to print")
    p.add_argument(
        "--all-configs", type=int, metavar="BITS", help="compile every autotune config at BITS (group 128)"
    )
    p.add_argument("--limit", type=int, help="with --all-configs: at most this many configs")
    args = p.parse_args(argv)
    if args.all_configs is not None:
        return 1 if compile_all(args.kind, args.all_configs, args.arch, args.limit) else 0
    config = parse_config(args.config)
    kernel = compile_cubin(args.kind, config, args.warps, args.stages, args.arch, args.dtype)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / args.kind
    for ext in ("ttgir", "ptx"):
        stem.with_suffix(f".{ext}").write_text(kernel.asm[ext])
    cubin = stem.with_suffix(".cubin")
    cubin.write_bytes(kernel.asm["cubin"])
    resources, ops, loop = summarize(cubin)
    launch = f"{args.kind} {args.dtype} {config} warps={args.warps} stages={args.stages} sm_{args.arch}"
    print(f"{launch}: {resources}")
    print("  " + "  ".join(f"{op} {n}" for op, n in ops.most_common(args.top)))
    print(
        f"  main loop, {loop.total()} instructions: "
        + "  ".join(f"{op} {n}" for op, n in loop.most_common(args.top))
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
