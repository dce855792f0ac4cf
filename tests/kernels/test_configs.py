"""Autotune config lists, pruning and the tuned-config JSON cache (pure host code)."""

from __future__ import annotations

import llmquant.kernels.configs as configs
import pytest
import triton


@pytest.fixture
def gpu_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    """Build the GPU config lists even under the interpreter."""
    monkeypatch.setattr(configs, "interpreting", lambda: False)


def test_m_bucket() -> None:
    assert [configs.m_bucket(m) for m in (0, 1, 2, 3, 16, 17, 100, 512, 4096)] == [
        1,
        1,
        2,
        4,
        16,
        32,
        128,
        512,
        512,
    ]


def test_interpreter_collapses_to_one_config() -> None:
    assert configs.interpreting()
    assert configs.gemv_configs() == [configs.INTERPRET_GEMV]
    assert configs.gemm_configs() == [configs.INTERPRET_GEMM]
    assert configs.dequant_configs() == [configs.INTERPRET_DEQUANT]


@pytest.mark.parametrize(("n", "k", "gs", "m"), [(4096, 4096, 128, 1), (11008, 4096, 128, 4), (8, 96, 32, 2)])
def test_prune_gemv(gpu_lists: None, n: int, k: int, gs: int, m: int) -> None:
    block_m = triton.next_power_of_2(m)
    kept = configs.prune_gemv(
        configs.gemv_configs(), {"N": n, "K": k}, GROUP_SIZE=gs, BLOCK_M=block_m, BITS=4
    )
    assert kept
    for c in kept:
        assert block_m * (c.kwargs["BLOCK_K"] // 8) * c.kwargs["BLOCK_N"] <= configs.GEMV_MAX_PRODUCT
        assert c.kwargs["SPLIT_K"] == 1 or triton.cdiv(k, c.kwargs["BLOCK_K"]) >= 2 * c.kwargs["SPLIT_K"]
    if k >= 1024:
        assert all(gs % c.kwargs["BLOCK_K"] == 0 for c in kept)  # one scale row per tile


@pytest.mark.parametrize("m", [5, 16, 64, 65, 512])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_prune_gemm(gpu_lists: None, m: int, bits: int) -> None:
    kept = configs.prune_gemm(
        configs.gemm_configs(), {"M": m, "N": 4096, "K": 4096}, GROUP_SIZE=128, BITS=bits
    )
    assert kept
    # every dot has K >= 16: the whole tile (ONE_DOT) or each of the 16 / bits pair slices
    for c in kept:
        slices = 1 if c.kwargs.get("ONE_DOT", False) else 16 // bits
        assert c.kwargs["BLOCK_K"] // slices >= configs.MIN_DOT_K
    assert all(128 % c.kwargs["BLOCK_K"] == 0 for c in kept)  # one scale row per tile
    if m > configs.SPLIT_K_MAX_M:
        assert all(c.kwargs["SPLIT_K"] == 1 for c in kept)  # no workspace is allocated there
    if m >= 128:
        assert all(c.kwargs["BLOCK_M"] >= 64 for c in kept)


def test_prune_never_empty(gpu_lists: None) -> None:
    kept = configs.prune_gemm(configs.gemm_configs(), {"M": 1, "N": 1, "K": 1}, GROUP_SIZE=1024, BITS=2)
    assert kept and all(configs._dot_k_valid(c, 16) for c in kept)
    assert configs.prune_gemv(configs.gemv_configs(), {"N": 1, "K": 1}, GROUP_SIZE=1024, BLOCK_M=16, BITS=4)
    assert configs.prune_dequant(configs.dequant_configs(), {}, GROUP_SIZE=3)


def test_tune_off_keeps_one_config(gpu_lists: None, monkeypatch: pytest.MonkeyPatch) -> None:
    args = ({"M": 64, "N": 11008, "K": 4096},)
    tuned = configs.prune_gemm(configs.gemm_configs(), *args, GROUP_SIZE=128, BITS=4)
    monkeypatch.setenv(configs.TUNE_ENV, "off")
    assert configs.prune_gemm(configs.gemm_configs(), *args, GROUP_SIZE=128, BITS=4) == tuned[:1]
    assert len(tuned) > 1


def test_autotune_options_persist_results_unless_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    import inspect

    params = inspect.signature(triton.autotune).parameters
    monkeypatch.delenv(configs.TUNE_CACHE_ENV, raising=False)
    opts = configs.autotune_options()
    assert opts.get("cache_results", False) == ("cache_results" in params)
    assert ("do_bench" in opts) == ("do_bench" in params)
    monkeypatch.setenv(configs.TUNE_CACHE_ENV, "off")
    assert "cache_results" not in configs.autotune_options()
