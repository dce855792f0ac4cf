"""GPU-only checks: autotuned kernels vs reference in fp16/bf16, CUDA-graph capture/replay, torch.compile.

Marked ``gpu`` (deselected by default, skipped without CUDA). Run: ``pytest -m gpu tests/kernels``.
"""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import assert_matmul_accuracy, make_layout
from llmquant.kernels import quant_matmul, quant_matmul_ref
from llmquant.kernels.configs import TUNE_ENV
from llmquant.kernels.dequant import dequant, dequant_ref
from llmquant.kernels.gemm import gemm
from llmquant.kernels.gemv import gemv

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(autouse=True)
def untuned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Correctness tests take the first pruned config (no benchmarking: minutes saved);
    ``test_autotuned_matches_reference`` turns tuning back on."""
    monkeypatch.setenv(TUNE_ENV, "off")


SHAPES = [  # (N, K, group_size)
    (4096, 4096, 128),
    (1000, 576, 128),  # ragged last group, N not a multiple of any BLOCK_N
    (256, 4096, None),  # per-channel
    (384, 1056, 32),  # ragged K tail
]


def _ops(lay: dict) -> tuple:
    return lay["qweight"], lay["scales"], lay["zeros"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(("n", "k", "gs"), SHAPES)
def test_dequant_bitwise_gpu(dtype: torch.dtype, bits: int, n: int, k: int, gs: int | None) -> None:
    lay = make_layout(n, k, bits, gs, sym=False, device="cuda")
    args = (*_ops(lay), bits, gs, k)
    assert torch.equal(dequant(*args, dtype=dtype), dequant_ref(*args, dtype=dtype))


def _check_matmul(dtype, m, n, k, gs, bits, sym, act_order) -> None:  # noqa: ANN001
    lay = make_layout(n, k, bits, gs, sym, act_order=act_order, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, generator=gen, device="cuda").to(dtype)
    bias = torch.randn(n, generator=gen, device="cuda").to(dtype)
    y = quant_matmul(x, *_ops(lay), bits, gs, lay["perm"], bias)
    # K up to 4096 of O(1) products: scale the absolute tolerance with sqrt(K)
    assert_matmul_accuracy(y, x, lay, bits, gs, bias, atol_scale=(k / 64) ** 0.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 16, 33, 300, 2048])
@pytest.mark.parametrize(("n", "k", "gs"), SHAPES)
@pytest.mark.parametrize(
    ("bits", "sym", "act_order"), [(4, True, False), (4, False, True), (8, False, False), (2, True, True)]
)
def test_quant_matmul_gpu(dtype, m, n, k, gs, bits, sym, act_order) -> None:  # noqa: ANN001
    """Every dispatch path (gemv, gemm, dequant + cuBLAS) on its first pruned config."""
    _check_matmul(dtype, m, n, k, gs, bits, sym, act_order)


@pytest.mark.parametrize("m", [1, 4, 16, 64, 512])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_autotuned_matches_reference(m: int, bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """With autotuning on, whichever config wins (split-K or not) still matches the reference."""
    monkeypatch.setenv(TUNE_ENV, "on")
    _check_matmul(torch.float16, m, 3072, 2048, 128, bits, False, False)


@pytest.mark.parametrize("op", [gemv, gemm])
def test_fp32_activations_gpu(op) -> None:  # noqa: ANN001
    lay = make_layout(512, 1024, 4, 128, sym=False, device="cuda")
    x = torch.randn(4, 1024, device="cuda")
    torch.testing.assert_close(
        op(x, *_ops(lay), 4, 128), quant_matmul_ref(x, *_ops(lay), 4, 128), atol=1e-3, rtol=1e-4
    )


@pytest.mark.parametrize("m", [1, 16, 64])
def test_cuda_graph_capture_replay(m: int) -> None:
    n, k, gs, bits = 2048, 1024, 128, 4
    lay = make_layout(n, k, bits, gs, sym=False, act_order=True, device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    fn = lambda: quant_matmul(x, *_ops(lay), bits, gs, lay["perm"])  # noqa: E731
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # compile + autotune outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fn()
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        ref = quant_matmul_ref(x, *_ops(lay), bits, gs, lay["perm"])
        torch.testing.assert_close(y, ref, atol=5e-2, rtol=5e-3)


def test_torch_compile_gpu() -> None:
    lay = make_layout(1024, 512, 4, 128, sym=True, device="cuda")
    x = torch.randn(2, 5, 512, device="cuda", dtype=torch.float16)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(quant_matmul(x, *_ops(lay), 4, 128))

    torch._dynamo.reset()
    y = torch.compile(f, fullgraph=True, mode="reduce-overhead")(x)
    torch.testing.assert_close(y, f(x), atol=1e-2, rtol=2e-3)
