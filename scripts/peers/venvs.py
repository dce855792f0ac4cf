"""Peer libraries for ``scripts/bench_quality.py --peers``: their specs, virtualenvs and commands.

Each peer runs ``scripts/peers/<script>`` inside its own virtualenv under the peers root
(``~/.cache/llmquant/peers/<name>``), created on first use: ``python -m venv``, pip upgraded, the CPU
torch wheel FIRST (a bare torch pulls the CUDA build), then the pinned library. A marker file records
what was installed, so set-up is idempotent. The peer script quantizes on the calibration ids the
benchmark wrote and saves the checkpoint in the library's own format; the benchmark loads it with
``llmquant.from_pretrained`` and evaluates it like its own runs.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ._common import write_result

REPO = Path(__file__).resolve().parents[2]
DEFAULT_PEERS_ROOT = Path.home() / ".cache" / "llmquant" / "peers"
PEER_TORCH = "torch==2.13.0"  # the CPU wheel on local disk: installed FIRST (a bare torch pulls CUDA)


@dataclass(frozen=True)
class PeerSpec:
    """A peer library run inside its own virtualenv by ``scripts/peers/<script>``."""

    name: str  # virtualenv name under the peers root
    run_id: str
    requirement: str
    script: str
    label: str
    settings: str
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    reference: str = ""  # what peer-results.md reports for this run
    setup_note: str = ""


PEERS: list[PeerSpec] = [
    PeerSpec(
        name="llmcompressor",
        run_id="llmcompressor-gptq-g64-sym-ao",
        requirement="llmcompressor==0.14.0.1",
        script="scripts/peers/llmcompressor_gptq.py",
        label="llm-compressor 0.14.0.1",
        settings="GPTQModifier W4A16 sym, group 64, actorder static, damp 0.01 (its default)",
        args=("--group-size", "64", "--actorder", "static"),
        reference="peer-results.md: 2,702 s, 1.75 GiB, ppl 27.81 (40 windows), 27.13 (12 windows)",
    ),
    PeerSpec(
        name="llmcompressor",
        run_id="llmcompressor-gptq-w3-g64-asym",
        requirement="llmcompressor==0.14.0.1",
        script="scripts/peers/llmcompressor_gptq.py",
        label="llm-compressor 0.14.0.1",
        settings="GPTQModifier int3 asym, group 64, actorder static, damp 0.01 (its default)",
        args=("--bits", "3", "--group-size", "64", "--actorder", "static", "--sym", "false"),
    ),
    PeerSpec(
        name="llmcompressor",
        run_id="llmcompressor-autoround-w3-g64-asym",
        requirement="llmcompressor==0.14.0.1",
        script="scripts/peers/llmcompressor_gptq.py",
        label="llm-compressor 0.14.0.1 + auto-round 0.15.1",
        settings="AutoRoundModifier int3 asym, group 64, 200 iters, batch 8, torch.compile off (CPU)",
        args=("--modifier", "autoround", "--bits", "3", "--group-size", "64", "--sym", "false"),
    ),
    PeerSpec(
        name="llmcompressor",
        run_id="llmcompressor-autoround-light-w3-g64-asym",
        requirement="llmcompressor==0.14.0.1",
        script="scripts/peers/llmcompressor_gptq.py",
        label="llm-compressor 0.14.0.1 + auto-round 0.15.1",
        settings="AutoRoundModifier int3 asym, group 64, auto-round's 'light' recipe (50 iters, lr 5e-3), "
        "batch 8, torch.compile off (CPU)",
        args=(
            "--modifier",
            "autoround",
            "--iters",
            "50",
            "--lr",
            "5e-3",
            "--bits",
            "3",
            "--group-size",
            "64",
            "--sym",
            "false",
        ),
    ),
    PeerSpec(
        name="llmcompressor",  # auto-round 0.15.1 is installed there as llm-compressor's dependency
        run_id="autoround-light-w3-g64-asym",
        requirement="llmcompressor==0.14.0.1",
        script="scripts/peers/autoround_native.py",
        label="auto-round 0.15.1 (its own API)",
        settings="AutoRound int3 asym, group 64, its CLI's 'light' recipe (50 iters, lr 5e-3), batch 8, "
        "seed 42, torch.compile off (CPU), saved as auto_gptq",
        args=("--recipe", "light", "--bits", "3", "--group-size", "64", "--sym", "false"),
    ),
    PeerSpec(
        name="llmcompressor",
        run_id="autoround-w3-g64-asym",
        requirement="llmcompressor==0.14.0.1",
        script="scripts/peers/autoround_native.py",
        label="auto-round 0.15.1 (its own API)",
        settings="AutoRound int3 asym, group 64, its default recipe (200 iters, lr 1/iters), batch 8, "
        "seed 42, torch.compile off (CPU), saved as auto_gptq",
        args=("--recipe", "default", "--bits", "3", "--group-size", "64", "--sym", "false"),
    ),
    PeerSpec(
        name="gptqmodel",
        run_id="gptqmodel-gptq-g128-sym",
        requirement="gptqmodel==7.7.0",
        script="scripts/peers/gptqmodel_gptq.py",
        label="GPTQModel 7.7.0",
        settings="w4 g128 sym, desc_act off (group-aware reordering on), damp 0.05",
        args=("--group-size", "128", "--damp", "0.05"),
        env=(("GPTQMODEL_CPU_WORKERS", "2"),),
        setup_note="gptqmodel 7.7.0 requires torch>=2.14.1, so pip replaces the local CPU torch 2.13.0 wheel "
        "with PyPI's torch 2.14.1 (the CUDA build: ~4.5 GB of nvidia-* wheels, ~6 GB venv; runs on CPU)",
        reference="peer-results.md: 3,589 s, 1.50 GiB, ppl 30.72 (40 windows)",
    ),
]
PEERS_BY_RUN = {p.run_id: p for p in PEERS}
DEFAULT_PEER_RUNS = ("llmcompressor-gptq-g64-sym-ao", "gptqmodel-gptq-g128-sym")


def select_peers(names: list[str]) -> list[PeerSpec]:
    """Peers by run id, or by virtualenv name (that library's first, w4 run); KeyError on an unknown one."""
    out = []
    for n in names:
        spec = PEERS_BY_RUN.get(n) or next((p for p in PEERS if p.name == n), None)
        if spec is None:
            raise KeyError(n)
        out.append(spec)
    return out


def peer_python(root: Path, peer: PeerSpec) -> Path:
    return root / peer.name / "bin" / "python"


def peer_marker(root: Path, peer: PeerSpec) -> Path:
    return root / peer.name / ".llmquant-peer-installed"


def peer_setup_commands(root: Path, peer: PeerSpec) -> list[list[str]]:
    """venv creation, then the CPU torch wheel FIRST, then the peer library (pinned)."""
    py = str(peer_python(root, peer))
    return [
        [sys.executable, "-m", "venv", str(root / peer.name)],
        [py, "-m", "pip", "install", "-q", "--upgrade", "pip"],
        [py, "-m", "pip", "install", "-q", PEER_TORCH],
        [py, "-m", "pip", "install", "-q", peer.requirement],
    ]


def ensure_peer_venv(root: Path, peer: PeerSpec, log: Path) -> None:
    """Create and install the peer's virtualenv unless its marker says it is done (idempotent)."""
    marker = peer_marker(root, peer)
    wanted = f"{PEER_TORCH}\n{peer.requirement}\n"
    if marker.is_file() and marker.read_text() == wanted:
        return
    root.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as fh:
        for cmd in peer_setup_commands(root, peer):
            if cmd[1:3] == ["-m", "venv"] and peer_python(root, peer).exists():
                continue
            print(f"[peers] {shlex.join(cmd)}", flush=True)
            fh.write(f"$ {shlex.join(cmd)}\n")
            fh.flush()
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
            fh.write(f"# rc={proc.returncode} in {time.perf_counter() - t0:.0f} s\n")
            if proc.returncode != 0:
                raise RuntimeError(f"peer setup failed ({shlex.join(cmd)}); see {log}")
    marker.write_text(wanted)


def peer_command(root: Path, peer: PeerSpec, paths: dict[str, Path]) -> list[str]:
    """The peer script's command line (``paths``: model, calib_ids, checkpoints, runs)."""
    return [
        str(peer_python(root, peer)),
        str(REPO / peer.script),
        "--model",
        str(paths["model"]),
        "--calib",
        str(paths["calib_ids"]),
        "--out",
        str(paths["checkpoints"] / peer.run_id),
        "--result",
        str(paths["runs"] / f"{peer.run_id}.json"),
        *peer.args,
    ]


def print_plan(root: Path, peer: PeerSpec, paths: dict[str, Path]) -> None:
    """What ``--dry-run`` shows for a peer: its venv's state, set-up commands and run command."""
    print(f"# peer {peer.name}: {peer.label}, {peer.settings}")
    state = "installed" if peer_marker(root, peer).is_file() else "to be created"
    print(f"# virtualenv {root / peer.name} ({state})")
    for cmd in peer_setup_commands(root, peer):
        print(shlex.join(cmd))
    if peer.setup_note:
        print(f"# note: {peer.setup_note}")
    env = " ".join(f"{k}={v}" for k, v in peer.env)
    print((env + " " if env else "") + shlex.join(peer_command(root, peer, paths)))


def run_peer(root: Path, peer: PeerSpec, paths: dict[str, Path], resume: bool) -> dict:
    """Quantize with the peer (setting up its venv first); its result JSON, or ``{"error": ...}``."""
    import json

    result_path = paths["runs"] / f"{peer.run_id}.json"
    cmd = peer_command(root, peer, paths)
    spec = peer_spec(cmd, peer)
    if resume and result_path.is_file():
        old = json.loads(result_path.read_text())
        was = old.get("spec") or {}
        was = {**was, "cmd": _script_relative(was.get("cmd", []), peer)}  # results written before 2026-12-07
        if was == spec and (Path(old.get("checkpoint", "")) / "config.json").is_file():
            print(f"[{peer.run_id}] reusing {old['checkpoint']}", flush=True)
            return old
    log = paths["logs"] / f"{peer.run_id}.log"
    try:
        ensure_peer_venv(root, peer, paths["logs"] / f"peer-setup-{peer.name}.log")
    except RuntimeError as exc:
        return {"error": str(exc), "spec": spec}
    # an earlier result (and its log) is moved aside, never deleted: it comes back if this run fails
    previous = _set_aside(result_path), _set_aside(log)
    print(f"[{peer.run_id}] quantizing with {peer.label} ... log: {log}", flush=True)
    with open(log, "w") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(
            cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=os.environ | dict(peer.env)
        )
    if proc.returncode != 0 or not result_path.is_file():
        if previous[0] is not None and not result_path.exists():
            os.replace(previous[0], result_path)
        tail = " | ".join(log.read_text().strip().splitlines()[-3:])
        return {"error": f"{peer.label} failed (rc={proc.returncode}): {tail[-300:]}", "spec": spec}
    out = json.loads(result_path.read_text()) | {"spec": spec}
    write_result(str(result_path), out)
    return out


def peer_spec(cmd: list[str], peer: PeerSpec) -> dict:
    """What ``--resume`` compares: the command without the interpreter, with the peer script named by its
    path in the repository (a checkout elsewhere, e.g. a worktree, runs the same peer), and the pin."""
    return {"cmd": _script_relative(cmd[1:], peer), "requirement": peer.requirement}


def _script_relative(args: list[str], peer: PeerSpec) -> list[str]:
    return [peer.script if str(a).endswith("/" + peer.script) else a for a in args]


def _set_aside(path: Path) -> Path | None:
    """Rename ``path`` to ``path.prev`` (replacing an older one); the new name, or None if absent."""
    if not path.is_file():
        return None
    prev = path.with_name(path.name + ".prev")
    os.replace(path, prev)
    return prev
