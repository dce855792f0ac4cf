"""scripts/peers/venvs.py: what --resume compares for a peer, and that a re-run never loses the old result."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO / "scripts") not in sys.path:
    sys.path.insert(0, str(REPO / "scripts"))

from peers import venvs  # noqa: E402

PEER = venvs.PEERS_BY_RUN["autoround-w3-g64-asym"]


def _paths(tmp: Path) -> dict[str, Path]:
    paths = {k: tmp / k for k in ("checkpoints", "runs", "logs")}
    for p in paths.values():
        p.mkdir()
    return paths | {"model": tmp / "model", "calib_ids": tmp / "ids.safetensors"}


def test_spec_does_not_depend_on_where_the_repository_is(tmp_path: Path) -> None:
    cmd = venvs.peer_command(tmp_path, PEER, _paths(tmp_path))
    elsewhere = [cmd[0], *(a.replace(str(venvs.REPO), "/tmp/worktree") for a in cmd[1:])]
    assert elsewhere != cmd
    assert venvs.peer_spec(elsewhere, PEER) == venvs.peer_spec(cmd, PEER)
    assert PEER.script in venvs.peer_spec(cmd, PEER)["cmd"]


def test_a_failed_rerun_keeps_the_previous_result(tmp_path: Path) -> None:
    root, paths = tmp_path / "peers", _paths(tmp_path)
    python = venvs.peer_python(root, PEER)
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\necho 'peer broke' >&2\nexit 3\n")
    python.chmod(0o755)
    venvs.peer_marker(root, PEER).write_text(f"{venvs.PEER_TORCH}\n{PEER.requirement}\n")
    old = {"spec": {"cmd": ["another", "command"]}, "quant_seconds": 1610.5, "checkpoint": "x"}
    result = paths["runs"] / f"{PEER.run_id}.json"
    result.write_text(json.dumps(old))
    (paths["logs"] / f"{PEER.run_id}.log").write_text("the old run's log\n")

    out = venvs.run_peer(root, PEER, paths, resume=True)  # spec differs: it re-runs, and fails

    assert "error" in out and "rc=3" in out["error"]
    assert json.loads(result.read_text()) == old
    assert (paths["logs"] / f"{PEER.run_id}.log.prev").read_text() == "the old run's log\n"
