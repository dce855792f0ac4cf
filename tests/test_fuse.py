"""llmquant.fuse: q/k/v and gate/up in one matmul launch, with unchanged results."""

from __future__ import annotations

import pytest
import torch

from llmquant import nn as llmquant_nn
from llmquant import pipeline
from llmquant.api import save_quantized
from llmquant.arch import get_arch
from llmquant.config import QuantScheme, RTNConfig
from llmquant.fuse import FusedQuantLinear, QuantLinearPart, fuse_quant_linears
from llmquant.grid import quantize_weight
from llmquant.loading import from_pretrained
from llmquant.nn import QuantLinear
from llmquant.qtensor import QuantizedWeight

IDS = torch.arange(40).reshape(2, 20) % 256


def _parts(n_outs: list[int], k: int = 64, gs: int = 32, perm_seed: int | None = None) -> list[QuantLinear]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for n in n_outs:
        qw = quantize_weight(torch.randn(n, k, generator=gen), QuantScheme(4, gs, False))
        if perm_seed is not None:  # act-order: the same g_idx permutation for every part (same input)
            g = torch.Generator().manual_seed(perm_seed)
            g_idx = (torch.argsort(torch.randperm(k, generator=g)) // gs).to(torch.int32)
            qw = QuantizedWeight(qw.codes, qw.scales, qw.zeros, 4, gs, g_idx)
        out.append(QuantLinear.from_quantized(qw, torch.randn(n, generator=gen), dtype=torch.float32))
    return out


@pytest.fixture
def count_matmuls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = llmquant_nn.quant_matmul

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(llmquant_nn, "quant_matmul", counting)
    return calls


@pytest.mark.parametrize("perm_seed", [None, 3])
def test_parts_equal_separate_linears_one_launch(perm_seed: int | None, count_matmuls: list[int]) -> None:
    parts = _parts([24, 8, 8], perm_seed=perm_seed)
    fused = FusedQuantLinear(parts)
    views = [QuantLinearPart(fused, i) for i in range(3)]
    x = torch.randn(2, 5, 64)
    expect = [p(x) for p in parts]
    count_matmuls[0] = 0
    got = [v(x) for v in views]
    assert count_matmuls[0] == 1  # one fused launch served all three parts
    for g, e in zip(got, expect):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_cache_never_serves_stale_results(count_matmuls: list[int]) -> None:
    fused = FusedQuantLinear(_parts([16, 16]))
    q, k = QuantLinearPart(fused, 0), QuantLinearPart(fused, 1)
    x = torch.randn(3, 64)
    q(x)
    x.mul_(2.0)  # in place after q: k must see the new values
    torch.testing.assert_close(k(x), fused(x)[..., 16:], atol=1e-5, rtol=1e-5)
    x2 = torch.randn(3, 64)
    count_matmuls[0] = 0
    y1, y2 = q(x2), q(x2)  # the same part twice: recomputed, not served twice
    assert count_matmuls[0] == 2 and torch.equal(y1, y2)
    other = torch.randn(3, 64)
    torch.testing.assert_close(k(other), fused(other)[..., 16:], atol=1e-5, rtol=1e-5)


def test_compiling_path_uses_column_views(monkeypatch: pytest.MonkeyPatch) -> None:
    parts = _parts([24, 8])
    fused = FusedQuantLinear(parts)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    x = torch.randn(4, 64)
    for i, part in enumerate(parts):
        torch.testing.assert_close(QuantLinearPart(fused, i)(x), part(x), atol=1e-5, rtol=1e-5)
    assert fused._cache is None  # nothing cached while tracing


def test_unfusable_groups_are_left_alone(tiny_llama) -> None:  # noqa: ANN001
    result = pipeline.quantize(tiny_llama, RTNConfig(QuantScheme(4, 32, True)), progress=False)
    model = result.model
    layer = model.model.layers[0]
    layer.mlp.up_proj = _parts([layer.mlp.up_proj.out_features], k=layer.mlp.up_proj.in_features, gs=16)[0]
    fused = fuse_quant_linears(model, get_arch(model.config))
    n_layers = len(model.model.layers)
    assert fused == 2 * n_layers - 1  # layer 0's gate/up differ in group size
    assert isinstance(layer.self_attn.q_proj, QuantLinearPart)
    assert type(layer.mlp.gate_proj) is QuantLinear


def test_from_pretrained_fuse_matches_unfused(tiny_llama, tmp_path, count_matmuls: list[int]) -> None:  # noqa: ANN001
    result = pipeline.quantize(tiny_llama, RTNConfig(QuantScheme(4, 32, False)), progress=False)
    path = save_quantized(result, tmp_path / "q", format="gptq_v2")
    plain, fused = from_pretrained(path), from_pretrained(path, fuse=True)
    assert sum(isinstance(m, FusedQuantLinear) for m in fused.modules()) == 2 * len(fused.model.layers)
    with torch.no_grad():
        expect = plain(IDS).logits
        count_matmuls[0] = 0
        got = fused(IDS).logits
    assert count_matmuls[0] == 4 * len(fused.model.layers)  # qkv, o, gate_up, down (unfused: 7)
    torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)
    out = fused.generate(IDS[:1, :5], max_new_tokens=4, do_sample=False)
    assert torch.equal(out, plain.generate(IDS[:1, :5], max_new_tokens=4, do_sample=False))
