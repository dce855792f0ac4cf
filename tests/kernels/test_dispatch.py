"""quant_matmul routing, the custom op under torch.compile, the large-M path and concat_layouts."""

from __future__ import annotations

import llmquant.kernels.dispatch as dispatch
import pytest
import torch
from kernel_helpers import TOLERANCES, make_layout
from llmquant.kernels import concat_layouts, quant_matmul, quant_matmul_ref
from llmquant.kernels.dispatch import DEQUANT_MATMUL_MIN_M, GEMV_MAX_M


def _operands(lay: dict) -> tuple:
    return lay["qweight"], lay["scales"], lay["zeros"]


@pytest.mark.parametrize(
    ("rows", "backend", "expect"),
    [
        (1, "auto", "reference"),  # CPU tensors: reference unless asked
        (GEMV_MAX_M, "triton", "gemv"),
        (GEMV_MAX_M + 1, "triton", "gemm"),
        (DEQUANT_MATMUL_MIN_M - 1, "triton", "gemm"),
        (DEQUANT_MATMUL_MIN_M, "triton", "dequant"),
        (3, "reference", "reference"),
    ],
)
def test_routing(rows: int, backend: str, expect: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def spy(name):  # noqa: ANN001, ANN202
        def fn(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            calls.append(name)
            return torch.zeros(*args[0].shape[:-1], args[1].shape[1], dtype=args[0].dtype)

        return fn

    # the launchers are imported on first Triton use (dispatch._triton_ops): spy on what it hands out
    monkeypatch.setattr(dispatch, "_triton_ops", lambda: (spy("dequant-kernel"), spy("gemm"), spy("gemv")))
    monkeypatch.setattr(dispatch, "quant_matmul_ref", spy("reference"))
    monkeypatch.setattr(dispatch, "_dequant_matmul", spy("dequant"))
    lay = make_layout(8, 32, 4, 32, sym=True)
    quant_matmul(torch.zeros(rows, 32), *_operands(lay), 4, 32, backend=backend)
    assert calls == [expect]


def test_3bit_falls_back_to_reference(gen) -> None:  # noqa: ANN001
    lay = make_layout(16, 96, 3, 32, sym=False)
    x = torch.randn(3, 96, generator=gen)
    y = quant_matmul(x, *_operands(lay), 3, 32, backend="triton")
    assert torch.equal(y, quant_matmul_ref(x, *_operands(lay), 3, 32))


def test_bad_backend() -> None:
    lay = make_layout(8, 32, 4, 32, sym=True)
    with pytest.raises(ValueError, match="backend"):
        quant_matmul(torch.zeros(1, 32), *_operands(lay), 4, 32, backend="cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_large_m_dequant_then_matmul(dtype: torch.dtype, gen) -> None:  # noqa: ANN001
    """M >= DEQUANT_MATMUL_MIN_M: dequant kernel + torch.matmul, with act-order and bias."""
    n, k, gs, bits = 24, 96, 32, 4
    lay = make_layout(n, k, bits, gs, sym=False, act_order=True)
    x = torch.randn(DEQUANT_MATMUL_MIN_M, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    y = quant_matmul(x, *_operands(lay), bits, gs, lay["perm"], bias, backend="triton")
    ref = quant_matmul_ref(x, *_operands(lay), bits, gs, lay["perm"], bias)
    torch.testing.assert_close(y, ref, **TOLERANCES[dtype])


def test_group_size_none_is_per_channel(gen) -> None:  # noqa: ANN001
    lay = make_layout(8, 64, 4, None, sym=True)
    x = torch.randn(2, 64, generator=gen)
    y = quant_matmul(x, *_operands(lay), 4, None, backend="triton")
    torch.testing.assert_close(y, quant_matmul_ref(x, *_operands(lay), 4, 64), **TOLERANCES[torch.float32])


def test_custom_op_opcheck(gen) -> None:  # noqa: ANN001
    """Schema, fake (meta) kernel and eager results agree (torch.library.opcheck, CPU = reference)."""
    lay = make_layout(16, 64, 4, 32, sym=False, act_order=True)
    x = torch.randn(2, 3, 64, generator=gen)
    args = (x, *_operands(lay), 4, 32, lay["perm"], torch.randn(16, generator=gen), "auto")
    torch.library.opcheck(torch.ops.llmquant.quant_matmul.default, args)


def test_torch_compile_fullgraph_no_graph_break(gen) -> None:  # noqa: ANN001
    """fullgraph=True raises on any graph break; aot_eager keeps the test fast (no C++ codegen)."""
    lay = make_layout(24, 64, 4, 32, sym=True)
    x = torch.randn(2, 3, 64, generator=gen)

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(quant_matmul(x, *_operands(lay), 4, 32)) * 2

    torch._dynamo.reset()
    y = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(y, f(x))


@pytest.mark.slow
def test_torch_compile_inductor_cpu(gen) -> None:  # noqa: ANN001
    """Same through Inductor (~40 s of C++ compilation on a 2-core CPU, hence slow)."""
    lay = make_layout(24, 64, 4, 32, sym=True)
    x = torch.randn(2, 3, 64, generator=gen)

    def f(x: torch.Tensor) -> torch.Tensor:
        return quant_matmul(x, *_operands(lay), 4, 32) * 2

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))


def test_concat_layouts_fused_qkv(gen) -> None:  # noqa: ANN001
    """One launch on the concatenated layout == the three separate outputs, concatenated."""
    k, gs, bits = 96, 32, 4
    parts = [make_layout(n, k, bits, gs, sym=False, seed=s) for s, n in enumerate((32, 8, 8))]
    fused = concat_layouts(parts)
    assert fused["qweight"].shape == (k * bits // 32, 48) and fused["scales"].shape == (3, 48)
    x = torch.randn(3, k, generator=gen)
    y = quant_matmul(x, *_operands(fused), bits, gs, fused["perm"], backend="triton")
    expect = torch.cat([quant_matmul_ref(x, *_operands(p), bits, gs) for p in parts], dim=-1)
    torch.testing.assert_close(y, expect, **TOLERANCES[torch.float32])
    q, kk, v = y.split([p["qweight"].shape[1] for p in parts], dim=-1)
    assert q.shape == (3, 32) and kk.shape == v.shape == (3, 8)


def test_concat_layouts_shared_perm_and_errors() -> None:
    a = make_layout(8, 64, 4, 32, sym=True, act_order=True, seed=0)
    b = dict(make_layout(8, 64, 4, 32, sym=True, seed=1))
    b["perm"] = a["perm"]
    assert torch.equal(concat_layouts([a, b])["perm"], a["perm"])
    with pytest.raises(ValueError, match="perm"):
        concat_layouts([a, make_layout(8, 64, 4, 32, sym=True, seed=1)])
    with pytest.raises(ValueError, match="in_features"):
        concat_layouts([a, make_layout(8, 96, 4, 32, sym=True, act_order=True)])
    with pytest.raises(ValueError, match="at least one"):
        concat_layouts([])
