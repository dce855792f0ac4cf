"""scripts/sweep_kernels.py and scripts/profile_kernels.py: the parts that run without a GPU."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _load(name: str):  # noqa: ANN202
    sys.path.insert(0, str(SCRIPTS))  # sweep_kernels imports bench_kernels
    try:
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(SCRIPTS))


def test_sweep_grids_are_valid_configs() -> None:
    sweep = _load("sweep_kernels")
    gemv = sweep.gemv_grid(1)
    assert gemv and all(c["BLOCK_K"] % 32 == 0 and c["SPLIT_K"] >= 1 for c in gemv)  # layout blocks
    assert {(c["FAST"], c["PREFETCH"]) for c in gemv} == {(True, True), (True, False), (False, False)}
    assert not any(c["FAST"] for c in sweep.gemv_grid(16))  # FAST is the one-row path only
    gemm = sweep.gemm_grid(16)
    assert {c["BLOCK_M"] for c in gemm} == {16} and {c["SCALE_AFTER"] for c in gemm} == {True, False}
    assert {c["BLOCK_M"] for c in sweep.gemm_grid(40)} == {64}


def test_sweep_summary_picks_fastest_per_variant(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sweep = _load("sweep_kernels")
    path = tmp_path / "sweep.csv"
    cfg = {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 8, "FAST": True, "PREFETCH": False}
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=sweep.FIELDS)
        w.writeheader()
        for us in (30.0, 20.0):
            w.writerow({"k": 8, "n": 8, "m": 1, "op": "gemv", "config": repr(cfg), "us": us, "fp16_us": 40.0,
                        "speedup": 40.0 / us, "gbps": 1.0, "rel_err": 1e-4})  # fmt: skip
        w.writerow({"k": 8, "n": 8, "m": 1, "op": "gemv", "config": repr(cfg), "error": "CompileError"})
    sweep.summarize(path)
    out = capsys.readouterr().out
    assert out.count("BEST") == 1 and ": 20.0 us" in out


def test_profile_driver_bad_point_and_no_gpu() -> None:
    prof = _load("profile_kernels")
    with pytest.raises(SystemExit, match="bad point"):
        prof.main(["--points", "8192x8192"])
    if not torch.cuda.is_available():
        assert prof.main(["--points", "64x32:1"]) == 2  # clean exit, no traceback


@pytest.mark.skipif(torch.cuda.is_available(), reason="--dry-run needs TRITON_INTERPRET=1")
def test_profile_driver_dry_run(capsys: pytest.CaptureFixture) -> None:
    prof = _load("profile_kernels")
    assert prof.main(["--dry-run", "--points", "64x32:1", "64x32:5", "--warmup", "1", "--launches", "1"]) == 0
    assert "profiled 64x32 M=5" in capsys.readouterr().out


def test_kernel_sass_offline_compile(tmp_path: Path) -> None:
    """The GEMV compiles for sm_90 without a GPU, and its packed words are read with 128-bit loads.

    Run in a subprocess: this test session has TRITON_INTERPRET=1, which replaces the kernels by
    interpreted functions that cannot be compiled."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    config = ["--config", "BLOCK_N=64", "BLOCK_K=64", "SPLIT_K=2"]
    argv = ["gemv", *config, "--warps", "4", "--out-dir", str(tmp_path), "--top", "60"]
    run = subprocess.run(
        [sys.executable, str(SCRIPTS / "kernel_sass.py"), *argv], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "REG:" in run.stdout and "LDG.128" in run.stdout
    sass = _load("kernel_sass")
    _, ops, loop = sass.summarize(tmp_path / "gemv.cubin")
    per_thread = 64 * 64 // (32 * 4)  # weights of one 64 x 64 tile per thread (4 warps)
    assert ops["LDG.128"] >= 1 and ops["FFMA"] >= per_thread  # one FFMA per weight
    # the K loop: it streams the tile's words and does the FFMAs, and is a strict part of the kernel
    assert loop["LDG.128"] >= 1 and loop["FFMA"] >= per_thread and loop.total() < ops.total()
    assert f"main loop, {loop.total()} instructions" in run.stdout
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        sass.parse_config(["BLOCK_N"])
    argv = ["gemm", "--all-configs", "2", "--limit", "1"]  # the first 2-bit GEMM autotune config
    run = subprocess.run(
        [sys.executable, str(SCRIPTS / "kernel_sass.py"), *argv], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "1 configs compiled, 0 failed" in run.stdout


def test_kernel_sass_gemm_keeps_fused_pair_decode(tmp_path: Path) -> None:
    """The fp16 GEMM's pair decode (M + q 2^S) 2^-S - (2^(10-S) + z) is one HFMA2 per operand pair even
    where Triton's default turns fp contraction off (TRITON_DEFAULT_FP_FUSION=0, the Triton 3.10 default):
    compilation passes ``configs.COMPILE_OPTIONS`` as every launch does. 16 x 128 x 128 on 4 warps:
    2 of the 4 pair slices have S = 4, 16 pairs each per thread."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "0"
    config = ["--config", "BLOCK_M=16", "BLOCK_N=128", "BLOCK_K=128", "SPLIT_K=1"]
    argv = ["gemm", *config, "--warps", "4", "--stages", "3", "--out-dir", str(tmp_path)]
    run = subprocess.run(
        [sys.executable, str(SCRIPTS / "kernel_sass.py"), *argv], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr[-2000:]
    _, _, loop = _load("kernel_sass").summarize(tmp_path / "gemm.cubin")
    assert loop["HFMA2"] == 32 and loop["HMUL2"] == 0, loop
    assert loop["HMMA"] == 32  # 16 x 128 x 128 in m16n8k16 MMAs over 4 warps
