"""Launch configurations for the quantized-matmul kernels: autotune lists per regime, pruning, caching.

Regimes (chosen by ``dispatch.quant_matmul`` from M = number of activation rows):

- ``gemv``: M <= ``GEMV_MAX_M``. CUDA-core GEMV (broadcast-multiply + ``tl.sum``), split-K over the grid.
- ``gemm``: ``GEMV_MAX_M`` < M <= ``DEQUANT_MATMUL_MIN_M``. Tiled ``tl.dot`` (tensor cores); split-K only
  for skinny M (<= ``SPLIT_K_MAX_M``), where N x M tiles alone cannot fill the GPU.
- large M: dequantize once + ``torch.matmul`` (cuBLAS); no configs here.

Autotune keys are (N, K, M-bucket, GROUP_SIZE, BITS, dtypes): a server whose batch size varies does not
re-tune for every M. ``prune_*`` drop configs that cannot be valid or fast for a shape before timing
(BLOCK_K must fit the group, split-K must leave every split at least one block, register budget,
enough programs to fill the SMs). Under ``TRITON_INTERPRET=1`` each list collapses to one small
``INTERPRET_*`` config so the numpy interpreter never benchmarks.

Tuned results live in each ``triton.Autotuner``'s ``cache``; ``tuning.dump_tuned``/``load_tuned`` move
them to and from a JSON file (one per GPU model, written by ``scripts/bench_kernels.py --tune``).

The dispatch thresholds (``dispatch.py``) come from H100 measurements (comment there);
``scripts/bench_kernels.py`` prints each path's time per M to confirm or move them on other GPUs.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from typing import Any

import triton

# (the dispatch thresholds GEMV_MAX_M and DEQUANT_MATMUL_MIN_M live in dispatch.py)
SPLIT_K_MAX_M = 64  # GEMM split-K configs only for M up to this

# BLOCK_M * (BLOCK_K / PACK) * BLOCK_N fp32 partial sums of the GEMV kept per program (registers).
GEMV_MAX_PRODUCT = 8192
# tl.dot needs a K extent of at least 16: the GEMM dots [BLOCK_M, BLOCK_K] x [BLOCK_K, BN] (ONE_DOT) or
# PACK / 2 pair slices [BLOCK_M, 2 BLOCK_K / PACK] x [2 BLOCK_K / PACK, BN].
MIN_DOT_K = 16
# Compile options every launch passes (with its meta-parameters). The kernels rely on fp contraction for
# their packed decodes (one HFMA2 per pair in the GEMM); Triton 3.9 warns that its default turns it off in
# 3.10 (offline sm_90 SASS with fusion off: GEMM main loop 520 -> 562 instructions), so ask for it.
COMPILE_OPTIONS = {"enable_fp_fusion": True}

# LLMQUANT_TUNE=off: skip benchmarking, take the first config that survives pruning (fast tests).
TUNE_ENV = "LLMQUANT_TUNE"
# LLMQUANT_TUNE_CACHE=off: do not persist autotuning results on disk (read when the kernels are imported).
TUNE_CACHE_ENV = "LLMQUANT_TUNE_CACHE"


def interpreting() -> bool:
    """True when Triton runs kernels in the numpy interpreter (read at call time, not import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_OFF = ("off", "0", "false", "no")


def tuning_enabled() -> bool:
    """False when ``LLMQUANT_TUNE=off`` (read at tuning time): pruning then keeps one config."""
    return os.environ.get(TUNE_ENV, "on").lower() not in _OFF


def bench_config(fn: Any, quantiles: Any = None) -> Any:
    """Autotuner timer: a short ``do_bench`` (configs differ by far more than its noise)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


def autotune_options() -> dict[str, Any]:
    """``triton.autotune`` keywords, where the installed Triton takes them: the ``bench_config`` timer, and
    ``cache_results`` so tuned configs persist on disk per GPU architecture and kernel source (Triton's
    cache directory, ``$TRITON_CACHE_DIR``): a new process reuses them instead of re-tuning. Set
    ``LLMQUANT_TUNE_CACHE=off`` before importing the kernels to tune afresh every process."""
    import inspect

    params = inspect.signature(triton.autotune).parameters
    options: dict[str, Any] = {"do_bench": bench_config} if "do_bench" in params else {}
    if "cache_results" in params and os.environ.get(TUNE_CACHE_ENV, "on").lower() not in _OFF:
        options["cache_results"] = True
    return options


def m_bucket(m: int) -> int:
    """Autotune bucket of M: next power of two, capped (1, 2, 4, ..., 256, 512+)."""
    return min(triton.next_power_of_2(max(m, 1)), 512)


def _cfg(num_warps: int, num_stages: int, **kwargs: int) -> triton.Config:
    return triton.Config(kwargs, num_warps=num_warps, num_stages=num_stages)


# --- interpreter configs: small, and chosen to exercise the general paths (split-K, masked tails) ---
INTERPRET_DEQUANT = _cfg(1, 1, BLOCK_K=32, BLOCK_N=32)
INTERPRET_GEMV = _cfg(1, 1, BLOCK_N=32, BLOCK_K=64, SPLIT_K=2)
INTERPRET_GEMM = _cfg(1, 1, BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SPLIT_K=1, GROUP_M=2)


def dequant_configs() -> list[triton.Config]:
    """The dequant autotune list (one interpreter config under TRITON_INTERPRET=1), built once per mode."""
    return list(_dequant_configs(interpreting()))


@functools.cache
def _dequant_configs(interpret: bool) -> list[triton.Config]:
    """(cached: callers get copies)"""
    if interpret:
        return [INTERPRET_DEQUANT]
    return [
        _cfg(w, s, BLOCK_K=bk, BLOCK_N=bn)
        for bk in (64, 128, 256)
        for bn in (64, 128, 256)
        for w in (4, 8)
        for s in (1, 2)
        if bk * bn <= 32768
    ]


def gemv_configs() -> list[triton.Config]:
    """The gemv autotune list (one interpreter config under TRITON_INTERPRET=1), built once per mode."""
    return list(_gemv_configs(interpreting()))


@functools.cache
def _gemv_configs(interpret: bool) -> list[triton.Config]:
    """(cached: callers get copies)"""
    if interpret:
        return [INTERPRET_GEMV]
    # (BLOCK_N, BLOCK_K) word tiles x split-K; prune_gemv drops what the M bucket's registers, the
    # group alignment or the grid's occupancy rule out, so a shape times a dozen or so.
    tiles = (
        (32, 128), (64, 128), (128, 128), (256, 128), (64, 64), (128, 64), (64, 256), (128, 256), (32, 512),
    )  # fmt: skip
    configs = [
        _cfg(w, s, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk)
        for bn, bk in tiles
        for sk in (1, 2, 4, 8)
        for w, s in ((4, 2), (8, 3))
        if w == 4 or bn >= 128
    ]
    # Wide, short tiles: 8 columns per thread (Triton gives each thread 4 adjacent words; BLOCK_N = 256 per
    # warp repeats them) halve the per-weight cost of each thread's activation loads and conversions
    # (offline sm_90 SASS of the FAST loop: 4.2 instead of 4.8 instructions per weight). Few column tiles,
    # so up to 16 splits to fill the SMs.
    for bn, w, s in ((1024, 4, 2), (2048, 8, 3)):
        configs += [_cfg(w, s, BLOCK_N=bn, BLOCK_K=32, SPLIT_K=sk) for sk in (2, 4, 8, 16)]
    return configs


def gemm_configs() -> list[triton.Config]:
    """The gemm autotune list (one interpreter config under TRITON_INTERPRET=1), built once per mode."""
    return list(_gemm_configs(interpreting()))


@functools.cache
def _gemm_configs(interpret: bool) -> list[triton.Config]:
    """(cached: callers get copies)"""
    if interpret:
        return [INTERPRET_GEMM]
    # SCALE_AFTER (the kernel default) and per-slice dots: in the H100 sweep (scripts/sweep_kernels.py,
    # docs/benchmarks.md) ONE_DOT lost on the skinny shapes, so only a few ONE_DOT configs are tuned.
    configs = []
    for bm, bn, bk, w, s in (
        # skinny M (2..64): one MMA row tile, wide N tiles, split-K fills the SMs
        (16, 64, 128, 4, 2),
        (16, 128, 128, 4, 3),
        (16, 128, 128, 8, 3),
        (16, 256, 128, 8, 3),
        (16, 128, 256, 4, 3),
        (16, 64, 64, 4, 3),
        (32, 128, 128, 4, 3),
        (64, 128, 128, 4, 3),
        (64, 64, 128, 4, 4),
        (64, 128, 256, 4, 3),
        # mid M (64..1024)
        (128, 128, 128, 8, 3),
        (128, 256, 128, 8, 3),
        (128, 128, 64, 8, 3),
        (128, 128, 256, 8, 3),
    ):
        for sk in (1, 2, 4, 8) if bm <= 64 else (1,):
            configs.append(_cfg(w, s, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, GROUP_M=8))
    # ONE_DOT: one [BLOCK_K, BLOCK_N] operand per tile (pair-slice dots need BLOCK_K >= 128 at 2 bits)
    for bm, bn, bk, w, s in ((16, 128, 128, 4, 3), (64, 128, 128, 4, 3), (128, 128, 128, 8, 3)):
        for sk in (1, 4) if bm <= 64 else (1,):
            tile = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "GROUP_M": 8}
            configs.append(_cfg(w, s, **tile, ONE_DOT=True))
    return configs


def check_config(config: triton.Config | None) -> None:
    """An explicit launch config must tile K in multiples of the layout's 32-input blocks."""
    if config is not None and config.kwargs.get("BLOCK_K", 32) % 32:
        raise ValueError(f"BLOCK_K must be a multiple of 32 (the layout's input blocks), got {config.kwargs}")


def max_split_k(configs: list[triton.Config]) -> int:
    """The largest SPLIT_K in a config list (the split-K workspace is sized for it)."""
    return max(c.kwargs.get("SPLIT_K", 1) for c in configs)


@functools.cache
def _max_split(kind: str, interpret: bool) -> int:
    builders = {"gemv": _gemv_configs, "gemm": _gemm_configs}
    return max_split_k(list(builders[kind](interpret)))


def tuned_max_split(kind: str) -> int:
    """``max_split_k`` of the ``"gemv"`` or ``"gemm"`` list, computed once per mode (per-call hot path)."""
    return _max_split(kind, interpreting())


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(nargs: dict[str, Any]) -> int:
    x = nargs.get("x_ptr")
    if x is None or not hasattr(x, "device") or x.device.type != "cuda":
        return 132  # H100 SXM; only reached outside CUDA (tests of the pruning itself)
    return _num_sms(x.device.index or 0)


def _k_valid(cfg: triton.Config, k: int) -> bool:
    """BLOCK_K is not (much) longer than K, and every split gets at least two BLOCK_K steps."""
    bk, sk = cfg.kwargs["BLOCK_K"], cfg.kwargs.get("SPLIT_K", 1)
    if bk > max(16, triton.next_power_of_2(k)):
        return False
    return sk == 1 or triton.cdiv(k, bk) >= 2 * sk


def _prefer(configs: list[triton.Config], good: Iterable[bool]) -> list[triton.Config]:
    """Configs flagged good, or all of them if none is (pruning must never return nothing)."""
    kept = [c for c, ok in zip(configs, good) if ok]
    return kept or configs


def _occupancy_filter(configs: list[triton.Config], programs: list[int], sms: int) -> list[triton.Config]:
    """Keep configs that launch between half a wave and eight waves of programs, when some do."""
    return _prefer(configs, (sms // 2 <= p <= 8 * sms for p in programs))


def _one_if_untuned(configs: list[triton.Config]) -> list[triton.Config]:
    return configs if tuning_enabled() else configs[:1]


def prune_gemv(configs: list[triton.Config], nargs: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    a = {**nargs, **kwargs}
    n, k, gs, bm, pack = a["N"], a["K"], a["GROUP_SIZE"], a["BLOCK_M"], 32 // a["BITS"]
    valid = [
        c
        for c in configs
        if _k_valid(c, k)
        and bm * (c.kwargs["BLOCK_K"] // pack) * c.kwargs["BLOCK_N"] <= GEMV_MAX_PRODUCT
        and c.kwargs["BLOCK_N"] <= max(32, triton.next_power_of_2(n))
    ]
    valid = valid or configs[:1]
    valid = _prefer(valid, (gs % c.kwargs["BLOCK_K"] == 0 for c in valid))
    programs = [triton.cdiv(n, c.kwargs["BLOCK_N"]) * c.kwargs["SPLIT_K"] for c in valid]
    return _one_if_untuned(_occupancy_filter(valid, programs, _sm_count(nargs)))


def _dot_k_valid(cfg: triton.Config, pack: int) -> bool:
    """tl.dot needs K >= 16: the whole tile with ONE_DOT, each of the PACK / 2 pair slices otherwise."""
    bk = cfg.kwargs["BLOCK_K"]
    return bk // (1 if cfg.kwargs.get("ONE_DOT", False) else pack // 2) >= MIN_DOT_K


def prune_gemm(configs: list[triton.Config], nargs: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    a = {**nargs, **kwargs}
    m, n, k, gs, pack = a["M"], a["N"], a["K"], a["GROUP_SIZE"], 32 // a["BITS"]
    bucket = m_bucket(m)
    valid = []
    for c in configs:
        bm, sk = c.kwargs["BLOCK_M"], c.kwargs["SPLIT_K"]
        if not _k_valid(c, k) or not _dot_k_valid(c, pack):
            continue
        if sk > 1 and m > SPLIT_K_MAX_M:
            continue  # the launcher allocated no split-K workspace
        if bm > max(16, bucket) or (bucket >= 128 and bm < 64):
            continue
        valid.append(c)
    if not valid:  # a dot-valid config with no split
        valid = [c for c in configs if c.kwargs["SPLIT_K"] == 1 and _dot_k_valid(c, pack)][:1]
    valid = _prefer(valid, (gs % c.kwargs["BLOCK_K"] == 0 for c in valid))
    programs = [
        triton.cdiv(m, c.kwargs["BLOCK_M"]) * triton.cdiv(n, c.kwargs["BLOCK_N"]) * c.kwargs["SPLIT_K"]
        for c in valid
    ]
    return _one_if_untuned(_occupancy_filter(valid, programs, _sm_count(nargs)))


def prune_dequant(configs: list[triton.Config], nargs: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    gs = {**nargs, **kwargs}["GROUP_SIZE"]
    return _one_if_untuned(_prefer(configs, (gs % c.kwargs["BLOCK_K"] == 0 for c in configs)))


# --- tuned-config cache (JSON) ---------------------------------------------------------------------
