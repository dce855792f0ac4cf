"""`kill -9` at every named point of `llmquant quantize` and `llmquant convert` (``llmquant.faults``: during
capture, inside a layer, between the resume files, while packing, while writing shards and JSON, after the
read-back, after the rename, while dropping the resume state), and at seeded random points: after every
kill the output is absent, the previous one or the finished one -- never a directory that loads but is
wrong -- and the same command then finishes byte-identical to one uninterrupted run, leaving nothing else
beside the output. Each run is a forked process (``kill_helpers``), so a kill costs about a second."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from kill_helpers import KILLED, differing, run_cli, tree
from transformers import LlamaConfig, LlamaForCausalLM


@pytest.fixture(scope="module")
def work(tmp_path_factory, make_tiny_tokenizer, calib_text_file) -> dict[str, Path]:
    """A 2-layer random LLaMA + tokenizer, and one uninterrupted quantize run (output and kill trace)."""
    root = tmp_path_factory.mktemp("kills")
    tokenizer = make_tiny_tokenizer([calib_text_file.read_text()], vocab_size=256)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    paths = {"root": root, "model": root / "model", "calib": calib_text_file}
    paths["ref"], paths["trace"] = root / "ref" / "out", root / "trace.txt"
    code = run_cli(_quantize(paths, paths["ref"]), root / "ref.log", trace=paths["trace"])
    assert code == 0, (root / "ref.log").read_text()
    return paths


def _quantize(work: dict[str, Path], out: Path) -> list[str]:
    """AWQ + GPTQ: a transform and a rounder, so every in-layer point is reached."""
    return [
        "quantize", str(work["model"]), "-o", str(out), "--method", "awq+gptq", "--group-size", "32",
        "--calib", str(work["calib"]), "--n-samples", "4", "--seqlen", "32", "--batch-size", "2",
    ]  # fmt: skip


def _kill(cmd: list[str], at: str, log: Path, out: Path, allowed: list[dict[str, bytes]]) -> int:
    """Run ``cmd`` killed at ``at``; the output must then be absent or one of ``allowed`` (file trees)."""
    code = run_cli(cmd, log, kill_at=at)
    assert code in (KILLED, 0), log.read_text()[-2000:]
    ok = not out.exists() or tree(out) in allowed
    assert ok, f"killed at {at}: {out} is neither absent nor a complete, allowed checkpoint"
    return code


def _finish(cmd: list[str], log: Path, out: Path, ref: Path) -> None:
    """Rerun ``cmd`` uninterrupted: byte-identical to ``ref``, nothing else left beside ``out``. A run
    killed after its output was complete (dropping the resume state) is answered as a finished run's
    rerun is: exit 2, `already exists`."""
    was_complete = out.is_dir() and not (out.with_name(out.name + ".partial") / "state.json").exists()
    code = run_cli(cmd, log)
    text = log.read_text()
    if code == 2:
        assert was_complete and "already exists; pass --overwrite" in text, text[-2000:]
    else:
        assert code == 0, text[-2000:]
    assert differing(out, ref) == []
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name)) == [out.name]


QUANTIZE_CHAIN = [
    "capture.batch:2",
    "layer.loaded",
    "layer.transformed",
    "gptq.group:3",
    "layer.rounded",
    "layer.propagated",
    "resume.layer",
    "resume.activations",  # layer 0's outputs written, state.json still says 0 layers done
    "resume.state",
    "resume.activations",  # layer 1 (resumed from layer 0's activations): its outputs written, not the state
    "save.packed:9",
    "save.shard",
    "save.json:2",
    "save.verified",
    "save.swapped",  # the output is complete, the resume state not yet dropped
    "save.resume_dropped",  # state.json gone, the rest of the resume directory not yet
]


def test_quantize_killed_at_every_point_in_turn(work, tmp_path) -> None:
    """Each run resumes what the previous kill left and is killed at the next point; then it finishes."""
    out = tmp_path / "out"
    cmd, ref = _quantize(work, out), tree(work["ref"])
    for i, point in enumerate(QUANTIZE_CHAIN):
        code = _kill(cmd, point, tmp_path / f"{i}.log", out, [ref])
        assert code == KILLED, f"the run finished before reaching {point}"
        if point.startswith("resume."):
            assert not out.exists()
    _finish(cmd, tmp_path / "final.log", out, work["ref"])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_quantize_killed_at_seeded_points(work, tmp_path, seed) -> None:
    """Killed at two random points of the trace (the k-th point reached, whatever it is), then finished."""
    out = tmp_path / "out"
    cmd, ref = _quantize(work, out), tree(work["ref"])
    points = work["trace"].read_text().split()
    rng = random.Random(seed)
    for i in range(2):
        _kill(cmd, f"*:{rng.randint(1, len(points) - 1)}", tmp_path / f"{i}.log", out, [ref])
    _finish(cmd, tmp_path / "final.log", out, work["ref"])


def _convert(work: dict[str, Path], out: Path, fmt: str) -> list[str]:
    """Re-pack the reference quantize output (AWQ format) into ``fmt``."""
    return ["convert", str(work["ref"]), "-o", str(out), "--format", fmt]


CONVERT_CHAIN = ["save.packed:5", "save.shard", "save.json", "save.verified", "save.swapped"]


def test_convert_killed_while_writing_keeps_the_previous_output(work, tmp_path) -> None:
    """`convert --overwrite` over an existing checkpoint, killed at every write point: the output is the
    previous checkpoint until the swap and the new one after it, never absent; then it finishes."""
    out, ref = tmp_path / "out", tmp_path / "ref" / "out"
    assert run_cli(_convert(work, out, "gptq_v2"), tmp_path / "p.log") == 0
    previous = tree(out)
    cmd = [*_convert(work, out, "compressed-tensors"), "--overwrite"]
    assert run_cli(_convert(work, ref, "compressed-tensors"), tmp_path / "ref.log") == 0
    for i, point in enumerate(CONVERT_CHAIN):
        assert _kill(cmd, point, tmp_path / f"{i}.log", out, [previous, tree(ref)]) == KILLED
        assert tree(out) == (tree(ref) if point == "save.swapped" else previous)
    assert any(p.name.startswith("out.tmp-") for p in tmp_path.iterdir()), "the kill left no temporary dir"
    _finish(cmd, tmp_path / "final.log", out, ref)


def test_convert_killed_mid_write_then_rerun(work, tmp_path) -> None:
    """A fresh `convert` killed between its shards and its JSON files leaves no output; rerun: identical."""
    out, ref = tmp_path / "out", tmp_path / "ref" / "out"
    cmd = _convert(work, out, "gptq_v2")
    assert run_cli(_convert(work, ref, "gptq_v2"), tmp_path / "r.log") == 0
    assert _kill(cmd, "save.json:2", tmp_path / "k.log", out, []) == KILLED
    _finish(cmd, tmp_path / "final.log", out, ref)
    # the quantize run's fingerprint marks its own output only: convert drops it from the copied log
    log, copied = (json.loads((p / "quant_log.json").read_text()) for p in (work["ref"], out))
    assert len(log.pop("run_fingerprint")) == 64 and copied == log
