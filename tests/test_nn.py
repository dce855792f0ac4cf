"""QuantLinear's dequantize-once cache for CPU inference: bitwise the per-forward output, opt-in."""

from __future__ import annotations

import pytest
import torch

from llmquant import nn as llmquant_nn
from llmquant import pipeline
from llmquant.api import save_quantized
from llmquant.config import QuantScheme, RTNConfig
from llmquant.fuse import FusedQuantLinear
from llmquant.grid import quantize_weight
from llmquant.loading import from_pretrained
from llmquant.nn import QuantLinear, cache_dense_weights
from llmquant.qtensor import QuantizedWeight, trivial_g_idx

IDS = torch.arange(40).reshape(2, 20) % 256
W4_G32_ASYM = QuantScheme(4, 32, False)


def _linear(
    n: int = 48, k: int = 96, scheme: QuantScheme = W4_G32_ASYM, act_order: bool = False
) -> QuantLinear:
    gen = torch.Generator().manual_seed(1)
    qw = quantize_weight(torch.randn(n, k, generator=gen), scheme)
    if act_order:  # a permuted g_idx: the kernel layout stores a permutation
        g_idx = trivial_g_idx(k, scheme.group_size)[torch.randperm(k, generator=gen)].to(torch.int32)
        qw = QuantizedWeight(qw.codes, qw.scales, qw.zeros, qw.bits, qw.group_size, g_idx)
    return QuantLinear.from_quantized(qw, torch.randn(n, generator=gen), dtype=torch.float32)


@pytest.mark.parametrize(
    "scheme,act_order",
    [
        (QuantScheme(4, 32, False), False),
        (QuantScheme(4, 32, True), True),
        (QuantScheme(3, 40, False), True),  # ragged groups, 3-bit codes straddling words
        (QuantScheme(8, None, True), False),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cached_forward_is_bitwise_the_per_forward_one(
    scheme: QuantScheme, act_order: bool, dtype: torch.dtype
) -> None:
    module = _linear(scheme=scheme, act_order=act_order)
    x = torch.randn(3, 7, module.in_features).to(dtype)
    expect = module(x)
    module.cache_dense_weight()
    assert module.dense_weight_cached and module._dense_weight.dtype == torch.float32
    assert module._dense_weight.shape == (module.in_features, module.out_features)
    got = module(x)
    assert got.dtype == expect.dtype and torch.equal(got, expect)
    with torch.inference_mode():
        assert torch.equal(module(x), expect)
    module.cache_dense_weight(False)
    assert not module.dense_weight_cached and torch.equal(module(x), expect)


def test_cached_forward_does_not_dequantize(monkeypatch: pytest.MonkeyPatch) -> None:
    module = _linear()
    module.cache_dense_weight()

    def fail(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("quant_matmul called although the weight is cached")

    monkeypatch.setattr(llmquant_nn, "quant_matmul", fail)
    monkeypatch.setattr(llmquant_nn, "dequantize_ref", fail)
    module(torch.randn(2, module.in_features))


def test_cache_survives_dtype_casts_and_is_not_state() -> None:
    module = _linear()
    keys = set(module.state_dict())
    module.cache_dense_weight()
    assert set(module.state_dict()) == keys  # not a buffer: never saved
    module.to(torch.float16)  # bias cast; packed buffers and the float32 cache unchanged
    assert module._dense_weight.dtype == torch.float32
    x = torch.randn(4, module.in_features, dtype=torch.float16)
    cached = module(x)
    module.cache_dense_weight(False)
    assert torch.equal(cached, module(x))


def test_cache_built_in_inference_mode_serves_autograd() -> None:
    module = _linear()
    with torch.inference_mode():
        module.cache_dense_weight()
    x = torch.randn(2, module.in_features, requires_grad=True)
    module(x).sum().backward()  # an inference tensor could not be saved for backward
    assert x.grad is not None and x.grad.shape == x.shape


def test_fused_linear_caches_too() -> None:
    parts = [_linear(n) for n in (24, 8)]
    fused = FusedQuantLinear(parts)
    x = torch.randn(5, fused.in_features)
    expect = fused(x)
    assert cache_dense_weights(torch.nn.ModuleList([fused])) == 1
    assert torch.equal(fused(x), expect)


def test_from_pretrained_dequantize_cache_same_logits(tiny_llama, tmp_path) -> None:  # noqa: ANN001
    result = pipeline.quantize(tiny_llama, RTNConfig(QuantScheme(4, 32, False)), progress=False)
    path = save_quantized(result, tmp_path / "q", format="gptq_v2")
    plain = from_pretrained(path, dtype=torch.float32, progress=False)
    cached = from_pretrained(path, dtype=torch.float32, progress=False, dequantize_cache=True)
    qlinears = [m for m in cached.modules() if isinstance(m, QuantLinear)]
    assert len(qlinears) == 14 and all(m.dense_weight_cached for m in qlinears)
    assert not any(m.dense_weight_cached for m in plain.modules() if isinstance(m, QuantLinear))
    assert list(cached.state_dict()) == list(plain.state_dict())
    with torch.no_grad():
        assert torch.equal(cached(IDS).logits, plain(IDS).logits)
    assert cache_dense_weights(cached, False) == 14
    assert not any(m.dense_weight_cached for m in qlinears)


def test_from_pretrained_refuses_the_cache_on_cuda_before_loading(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="CPU inference"):  # no checkpoint needed: checked first
        from_pretrained(tmp_path / "missing", device="cuda", dequantize_cache=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cache_refused_on_cuda_and_dropped_when_moved_there() -> None:
    module = _linear()
    module.cache_dense_weight()
    module.to("cuda")
    assert not module.dense_weight_cached
    with pytest.raises(ValueError, match="CPU inference"):
        module.cache_dense_weight()
