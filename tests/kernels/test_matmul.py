"""gemv / gemm kernels (via quant_matmul(backend="triton") and directly) == quant_matmul_ref."""

from __future__ import annotations

import pytest
import torch
import triton
from kernel_helpers import assert_matmul_accuracy, make_layout
from llmquant.kernels import quant_matmul
from llmquant.kernels.gemm import gemm
from llmquant.kernels.gemv import gemv

# (M, N, K, group_size, bits, sym, act_order, bias): every M in {1, 3, 16, 33}, N in {8, 24, 72}, each
# K kind (64, 96 = ragged BLOCK_K tail, 576/g128 = ragged last group, 160/g32 = BLOCK_K > group),
# every bit width, sym/asym, per-channel, act-order and bias, without a full cartesian product
# (the interpreter is slow).
CASES = [
    (1, 24, 576, 128, 4, True, False, False),
    (1, 8, 160, 32, 2, False, True, True),
    (1, 72, 96, None, 8, False, False, True),
    (3, 24, 64, 64, 4, False, True, False),
    (3, 72, 576, 128, 8, True, True, True),
    (3, 8, 96, 32, 2, True, False, False),
    (16, 72, 160, 32, 4, False, False, True),
    (16, 24, 96, None, 2, True, True, False),
    (16, 8, 576, 128, 8, False, True, False),
    (33, 24, 576, 128, 4, False, True, True),
    (33, 8, 64, None, 2, False, False, False),
    (33, 72, 160, 32, 8, True, False, True),
]


def _check(y: torch.Tensor, x: torch.Tensor, lay: dict, bits: int, gs: int | None, bias) -> None:
    assert_matmul_accuracy(y, x, lay, bits, gs, bias)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("m", "n", "k", "gs", "bits", "sym", "act_order", "has_bias"), CASES)
def test_quant_matmul_triton(m, n, k, gs, bits, sym, act_order, has_bias, dtype, gen) -> None:  # noqa: ANN001
    lay = make_layout(n, k, bits, gs, sym, act_order=act_order)
    x = torch.randn(m, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if has_bias else None
    q = (lay["qweight"], lay["scales"], lay["zeros"])
    y = quant_matmul(x, *q, bits, gs, lay["perm"], bias, backend="triton")
    _check(y, x, lay, bits, gs, bias)


@pytest.mark.parametrize(
    ("op", "m", "config"),
    [
        (gemv, 16, triton.Config({"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 1})),  # widest GEMV, no split
        (gemv, 2, triton.Config({"BLOCK_N": 64, "BLOCK_K": 32, "SPLIT_K": 4})),  # 4 splits, BLOCK_K < gs
        (gemv, 1, triton.Config({"BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 2})),  # one row, tile spans groups
        (gemv, 1, triton.Config({"BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 3})),  # one row, 3 splits
        (gemv, 1, triton.Config({"BLOCK_N": 64, "BLOCK_K": 32, "SPLIT_K": 16})),  # wide-tile shape: one block
        # FAST one-row path with the register prefetch, a split ending 1.5 tiles into K; and FAST off
        (gemv, 1, triton.Config({"BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 2, "PREFETCH": True})),
        (gemv, 1, triton.Config({"BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 2, "FAST": False})),
        # GEMM with the per-weight scale (SCALE_AFTER off), split-K
        (
            gemm,
            5,
            triton.Config(
                {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 2, "GROUP_M": 1, "SCALE_AFTER": 0}
            ),
        ),
        (gemm, 1, triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 3, "GROUP_M": 1})),
        (gemm, 40, triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 128, "SPLIT_K": 1, "GROUP_M": 2})),
        # one dot per tile over the slice-major reshaped codes, tile spanning groups, split-K
        (
            gemm,
            7,
            triton.Config(
                {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 256, "SPLIT_K": 2, "GROUP_M": 1, "ONE_DOT": True}
            ),
        ),
        (
            gemm,
            20,
            triton.Config(
                {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 1, "GROUP_M": 2, "ONE_DOT": True}
            ),
        ),
    ],
)
def test_kernel_configs(op, m: int, config: triton.Config, gen) -> None:  # noqa: ANN001
    """Split-K on/off, BLOCK_K spanning or subdividing groups, grouped program order: same result."""
    n, k, gs, bits = 40, 576, 128, 4
    lay = make_layout(n, k, bits, gs, sym=False, act_order=True)
    x = torch.randn(m, k, generator=gen, dtype=torch.float32)
    bias = torch.randn(n, generator=gen)
    y = op(x, lay["qweight"], lay["scales"], lay["zeros"], bits, gs, lay["perm"], bias, config=config)
    _check(y, x, lay, bits, gs, bias)


def test_leading_dims_and_noncontiguous_x(gen) -> None:  # noqa: ANN001
    n, k, gs, bits = 24, 64, 32, 4
    lay = make_layout(n, k, bits, gs, sym=True)
    x = torch.randn(2, 2, 2 * k, generator=gen, dtype=torch.float16)[..., ::2]  # [2, 2, K], stride 2
    y = quant_matmul(x, lay["qweight"], lay["scales"], lay["zeros"], bits, gs, backend="triton")
    assert y.shape == (2, 2, n)
    _check(y, x, lay, bits, gs, None)


def test_gemv_rejects_many_rows() -> None:
    lay = make_layout(8, 64, 4, 32, sym=True)
    with pytest.raises(ValueError, match="at most 16 rows"):
        gemv(torch.randn(17, 64), lay["qweight"], lay["scales"], lay["zeros"], 4, 32)


@pytest.mark.parametrize(
    ("op", "m", "config"),
    [
        (gemv, 1, triton.Config({"BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 4})),
        (gemm, 5, triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 3, "GROUP_M": 1})),
    ],
)
def test_split_k_single_launch_resets_counters(op, m: int, config: triton.Config, gen) -> None:  # noqa: ANN001
    """The last split of each tile reduces the partials and puts its counter back to 0, so repeated
    launches (and CUDA-graph replays) need no zero-fill and give bit-identical results."""
    from llmquant.kernels._launch import tile_locks

    n, k, gs, bits = 40, 576, 64, 4
    lay = make_layout(n, k, bits, gs, sym=True)
    x = torch.randn(m, k, generator=gen, dtype=torch.float32)
    q = (lay["qweight"], lay["scales"], lay["zeros"])
    y1 = op(x, *q, bits, gs, config=config)
    assert not tile_locks(x.device, 1).any()
    y2 = op(x, *q, bits, gs, config=config)
    assert torch.equal(y1, y2)
    _check(y1, x, lay, bits, gs, None)


def _random_case(seed: int) -> tuple:
    """One seeded random case over shapes the fixed CASES miss: K below one block or not a multiple of
    32, N = 1, group sizes 16 / 100, act-order, non-contiguous x, every dtype, every dispatched path."""
    import random

    rng = random.Random(seed)
    bits, k = rng.choice([2, 4, 8]), rng.choice([1, 7, 31, 33, 95, 130, 257, 576])
    gs = rng.choice([None, 16, 32, 64, 100])
    gs = None if gs is not None and gs >= k else gs
    act_order = gs is not None and rng.random() < 0.4
    m, n = rng.choice([1, 2, 5, 17, 70]), rng.choice([1, 3, 17, 40])
    dtype = rng.choice([torch.float16, torch.bfloat16, torch.float32])
    return bits, k, gs, rng.random() < 0.5, act_order, m, n, dtype, rng.random() < 0.3, rng.random() < 0.5


@pytest.mark.parametrize("seed", range(48))
def test_quant_matmul_random_cases(seed: int) -> None:
    bits, k, gs, sym, act_order, m, n, dtype, transposed, has_bias = _random_case(seed)
    gen = torch.Generator().manual_seed(seed)
    lay = make_layout(n, k, bits, gs, sym, act_order=act_order, seed=seed)
    x = torch.randn(k, m, generator=gen).t() if transposed else torch.randn(m, k, generator=gen)
    x = x.to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if has_bias else None
    q = (lay["qweight"], lay["scales"], lay["zeros"])
    y = quant_matmul(x, *q, bits, gs, lay["perm"], bias, backend="triton")
    assert_matmul_accuracy(y, x, lay, bits, gs, bias)


class _RecordingKernel:
    """Stands in for a jitted kernel: ``kernel[grid](*args, **kwargs)`` records the keyword arguments."""

    def __init__(self, real) -> None:  # noqa: ANN001
        self.fn = real.fn  # what dequant.check_interpretable inspects
        self.kwargs: list[dict] = []

    def __getitem__(self, grid):  # noqa: ANN001, ANN204
        return lambda *args, **kwargs: self.kwargs.append(kwargs)


@pytest.mark.parametrize("tuned", [True, False])
def test_every_launch_requests_fp_fusion(tuned: bool, monkeypatch: pytest.MonkeyPatch, gen) -> None:  # noqa: ANN001
    """gemv, gemm and dequant pass ``configs.COMPILE_OPTIONS`` (fp contraction on, which the packed
    decodes rely on and Triton 3.10 turns off by default) to the kernel, tuned or with a pinned config."""
    import importlib

    from llmquant.kernels.configs import COMPILE_OPTIONS
    from llmquant.kernels.dequant import dequant

    assert COMPILE_OPTIONS == {"enable_fp_fusion": True}
    lay = make_layout(24, 64, 4, 32, sym=True)
    q = (lay["qweight"], lay["scales"], lay["zeros"])
    x = torch.randn(2, 64, generator=gen)
    pinned = {
        "gemv": triton.Config({"BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 1}),
        "gemm": triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 1, "GROUP_M": 1}),
        "dequant": triton.Config({"BLOCK_K": 32, "BLOCK_N": 32}),
    }
    calls = {
        "gemv": lambda c: gemv(x, *q, 4, 32, config=c),
        "gemm": lambda c: gemm(x, *q, 4, 32, config=c),
        "dequant": lambda c: dequant(*q, 4, 32, 64, torch.float16, config=c),
    }
    for name, call in calls.items():
        module = importlib.import_module(f"llmquant.kernels.{name}")
        attr = f"_{name}_kernel_tuned" if tuned else f"_{name}_kernel"
        kernel = _RecordingKernel(getattr(module, attr))
        monkeypatch.setattr(module, attr, kernel)
        call(None if tuned else pinned[name])
        assert len(kernel.kwargs) == 1 and kernel.kwargs[0]["enable_fp_fusion"] is True, name


DECODES = [(torch.float16, 10, 0x6400), (torch.bfloat16, 7, 0x4300)]  # (dtype, MANT, MAGIC) as in gemm.py


@pytest.mark.parametrize(("dtype", "mant", "magic"), DECODES)
@pytest.mark.parametrize("bits", [2, 4])
def test_pair_decode_arithmetic_is_exact(dtype: torch.dtype, mant: int, magic: int, bits: int) -> None:
    """The arithmetic of ``gemm._pair_q_minus_z_half`` on the GPU, in torch's correctly rounded CPU fp16 and
    bf16 (the interpreter runs bf16 through fp32, so its bf16 GPU branch is checked here): for every field i,
    code q and zero z, magic | (q << S) read as ``dtype`` is 2^MANT + q 2^S, and
    (that * 2^-S) - (2^(MANT-S) + z) is q - z with or without fp contraction."""
    q = torch.arange(1 << bits, dtype=torch.int32)[:, None]
    z = torch.arange(1 << bits, dtype=torch.int32)[None, :]
    for i in range(16 // bits):
        s = (bits * i) % 8 if (bits * i) % 8 + bits <= mant else 0
        word = (magic | (q << s)).to(torch.int16).view(dtype)
        assert torch.equal(word.double(), (2.0**mant + q * 2.0**s).double())
        zs = (z + (1 << (mant - s))).to(dtype)
        assert torch.equal(zs.int(), z + (1 << (mant - s)))  # the constant is exact in dtype
        two_roundings = word * torch.tensor(2.0**-s, dtype=dtype) - zs
        one_rounding = (word.double() * 2.0**-s - zs.double()).to(dtype)
        assert torch.equal(two_roundings.int(), (q - z).expand_as(two_roundings)), (i, s)
        assert torch.equal(one_rounding, two_roundings), (i, s)
