"""Run `llmquant` commands as separate processes that are killed outright at a named point
(``llmquant.faults``), cheaply: each run is a child forked from one warm server process that imported
torch, transformers and llmquant once (``multiprocessing`` forkserver), so a run costs a fork, not an
interpreter start. The server computes nothing itself, so its children start with a clean OpenMP state.

A child killed at a point dies by its own SIGKILL -- no ``finally`` block, exception handler or atexit
hook runs -- which is what ``kill -9`` from outside does; ``test_kill_resume.py`` does the latter to a
real ``python -m llmquant.cli`` process as well.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from pathlib import Path

PRELOAD = [
    "torch",
    "transformers",
    "transformers.models.llama.modeling_llama",
    "safetensors.torch",
    "tokenizers",
    "llmquant.cli",
    "llmquant.api",
    "llmquant.convert",
    "llmquant.pipeline",
]
KILLED = -9  # multiprocessing's exit code of a child killed by SIGKILL


def _child(argv: list[str], env: dict[str, str], log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(env)
    import threading

    import torch
    from tqdm import tqdm

    from llmquant.cli import main

    torch.set_num_threads(1)  # tiny tensors: threads cost more than they give on a shared CI machine
    tqdm.set_lock(threading.RLock())  # not tqdm's default multiprocessing lock (a named semaphore)

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_cli(argv: list[str], log: Path, *, kill_at: str | None = None, trace: Path | None = None) -> int:
    """``llmquant ARGV`` in a forked child (stdout and stderr to ``log``); its exit code, ``KILLED`` when
    it was killed at ``kill_at`` (``NAME[:N]``, see ``llmquant.faults``). ``trace``: file the child
    appends the kill points it reaches to."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # effective when the server starts (the first run)
    env = {}
    if kill_at is not None:
        env["LLMQUANT_KILL_AT"] = kill_at
    if trace is not None:
        env["LLMQUANT_KILL_TRACE"] = str(trace)
    proc = ctx.Process(target=_child, args=(argv, env, str(log)))
    proc.start()
    proc.join(timeout=300)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        raise TimeoutError(f"llmquant {' '.join(argv)} did not finish in 300 s (log: {log})")
    return proc.exitcode


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` (relative name -> bytes), without ``quant_log.json`` (timings)."""
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != "quant_log.json"
    }


def differing(a: Path, b: Path) -> list[str]:
    """Files that differ between the trees ``a`` and ``b`` (present in one only, or other bytes)."""
    ta, tb = tree(a), tree(b)
    return sorted(n for n in ta.keys() | tb.keys() if ta.get(n) != tb.get(n))
