"""The tuned-config cache: an autotuner's choice survives a dump to JSON and a load in a fresh cache."""

from __future__ import annotations

import llmquant.kernels.tuning as tuning
import triton
from llmquant.kernels.gemv import _gemv_kernel_tuned


def test_dump_and_load_tuned(tmp_path) -> None:  # noqa: ANN001
    key = (4096, 4096, 1, 4, 128, "torch.float16", "torch.int32")
    cfg = triton.Config({"BLOCK_N": 128, "BLOCK_K": 128, "SPLIT_K": 4}, num_warps=4, num_stages=2)
    saved = dict(_gemv_kernel_tuned.cache)
    try:
        _gemv_kernel_tuned.cache.clear()
        _gemv_kernel_tuned.cache[key] = cfg
        path = tmp_path / "h100.json"
        tuning.dump_tuned(path, device_name="test")
        _gemv_kernel_tuned.cache.clear()
        assert tuning.load_tuned(path) == 1
        got = _gemv_kernel_tuned.cache[key]
        assert (got.kwargs, got.num_warps, got.num_stages) == (cfg.kwargs, 4, 2)
    finally:
        _gemv_kernel_tuned.cache.clear()
        _gemv_kernel_tuned.cache.update(saved)
