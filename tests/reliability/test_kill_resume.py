"""`kill -9` of a real `llmquant quantize` process at several points, then the same command again: the
result must be byte-identical to an uninterrupted run (AWQ: the resume state also holds folded tensors)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _checkpoint(make_tiny_llama, make_tiny_tokenizer, calib: Path, path: Path) -> Path:
    tokenizer = make_tiny_tokenizer([calib.read_text()], vocab_size=256)
    make_tiny_llama(vocab=len(tokenizer), layers=5, tie=False).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _cmd(model: Path, out: Path, calib: Path) -> list[str]:
    return [
        sys.executable, "-m", "llmquant.cli", "quantize", str(model), "-o", str(out), "--method", "awq",
        "--group-size", "32", "--calib", str(calib), "--n-samples", "8", "--seqlen", "64",
    ]  # fmt: skip


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != "quant_log.json"}


def _kill_after(cmd: list[str], state: Path, layers_done: int) -> int:
    """Start ``cmd``, SIGKILL it once ``state`` records ``layers_done`` finished layers; its return code."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if state.is_file() and f'"layers_done": {layers_done}' in state.read_text():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    return proc.wait()


def test_kill9_twice_then_rerun_is_byte_identical(
    make_tiny_llama, make_tiny_tokenizer, calib_text_file, tmp_path
) -> None:
    """Killed after layer 1, resumed and killed again after layer 3, then finished: same bytes as one run."""
    model = _checkpoint(make_tiny_llama, make_tiny_tokenizer, calib_text_file, tmp_path / "m")
    ref = tmp_path / "uninterrupted" / "out"  # same folder name: the model card names the folder
    subprocess.run(_cmd(model, ref, calib_text_file), check=True, capture_output=True)
    out, partial = tmp_path / "out", tmp_path / "out.partial"
    for layers_done in (1, 3):
        code = _kill_after(_cmd(model, out, calib_text_file), partial / "state.json", layers_done)
        assert code == -signal.SIGKILL, "the run finished before it could be killed"
        assert not out.exists() and partial.is_dir()
    rerun = subprocess.run(_cmd(model, out, calib_text_file), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stderr and "3 layers already done" in rerun.stderr and not partial.exists()
    assert _files(out) == _files(ref)
