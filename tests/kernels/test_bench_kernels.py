"""scripts/bench_kernels.py: the --dry-run path executes every code path on CPU; clean no-GPU exit."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_kernels.py"

# --dry-run runs the kernels on CPU tensors, which needs the Triton interpreter; the test session enables
# it only where there is no CUDA (tests/kernels/conftest.py), so on a GPU host these are skipped.
needs_interpreter = pytest.mark.skipif(
    torch.cuda.is_available(), reason="--dry-run needs TRITON_INTERPRET=1 (not set with CUDA)"
)


@pytest.fixture(scope="module")
def bench():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@needs_interpreter
def test_dry_run_writes_tables(bench, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:  # noqa: ANN001
    assert bench.main(["--dry-run", "--out", str(tmp_path), "--reps", "1"]) == 0
    rows = list(csv.DictReader((tmp_path / "kernels.csv").open()))
    assert [(r["m"], r["path"]) for r in rows] == [("1", "gemv"), ("5", "gemm")]
    assert all(float(r["ours_us"]) > 0 and float(r["fp16_us"]) > 0 and r["gemm_us"] for r in rows)
    assert all(float(r["max_rel_err"]) < bench.CHECK_REL_TOL for r in rows)  # results checked, not only timed
    decode = list(csv.DictReader((tmp_path / "decode.csv").open()))
    assert [d["batch"] for d in decode] == ["1", "2"] and all(float(d["ours_tok_s"]) > 0 for d in decode)
    md = (tmp_path / "kernels.md").read_text()
    assert "| 96 | 48 | 1 | gemv |" in md and "Decode" in md
    assert "device copy bandwidth" in capsys.readouterr().out


@needs_interpreter
def test_dry_run_tune_dump(bench, tmp_path: Path) -> None:  # noqa: ANN001
    argv = ["--dry-run", "--out", str(tmp_path), "--reps", "1", "--no-paths", "--no-decode", "--batches", "1"]
    assert bench.main([*argv, "--tune"]) == 0
    (tuned,) = tmp_path.glob("tuned_*.json")
    assert bench.main([*argv, "--load-tuned", str(tuned)]) == 0


def test_without_cuda_one_line_message(
    bench, monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path
) -> None:  # noqa: ANN001
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())


@needs_interpreter
def test_dry_run_unfused_decode_and_read_flush(bench, tmp_path: Path) -> None:  # noqa: ANN001
    argv = ["--dry-run", "--out", str(tmp_path), "--reps", "1", "--no-paths", "--batches", "1"]
    assert bench.main([*argv, "--decode-unfused", "--l2-flush", "read"]) == 0
    decode = list(csv.DictReader((tmp_path / "decode.csv").open()))
    assert [d["batch"] for d in decode] == ["1", "2"] and all(float(d["ours_tok_s"]) > 0 for d in decode)
    assert "separate q/k/v" in (tmp_path / "kernels.md").read_text()
