"""AWQ math (awq.py): folding is exact, the searches never lose to their baselines, uniform activations
change nothing, and the clip plan is the grid the rounder then uses."""

from __future__ import annotations

import pytest
import torch

from llmquant.awq import (
    ScalePlan,
    candidate_scales,
    clip_weight_,
    fold_scales_,
    group_hessian_blocks,
    scaled_fake_quant,
    search_clip,
    search_scales,
    weight_channel_mean,
)
from llmquant.config import QuantScheme
from llmquant.grid import fake_quantize, quantize_weight

SCHEME = QuantScheme(bits=4, group_size=16, sym=False)


def _layer(make_tiny_llama, kv_heads: int):
    return make_tiny_llama(layers=1, kv_heads=kv_heads).model.layers[0].double()


def _layer_out(model_layer, x: torch.Tensor, make_tiny_llama) -> torch.Tensor:
    rotary = make_tiny_llama(layers=1).model.rotary_emb.double()
    pos = torch.arange(x.shape[1])[None]
    cos, sin = rotary(x, pos)
    out = model_layer(x, attention_mask=None, position_ids=pos, position_embeddings=(cos, sin))
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize(
    "smooth,balance,kv_heads",
    [
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), 2),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), 2),
        ("mlp.up_proj", ("mlp.down_proj",), 2),
        ("self_attn.v_proj", ("self_attn.o_proj",), 4),  # only foldable without grouped-query attention
    ],
)
def test_folding_preserves_the_float_layer(make_tiny_llama, smooth, balance, kv_heads) -> None:
    layer = _layer(make_tiny_llama, kv_heads)
    x = torch.randn(2, 12, 64, dtype=torch.float64)
    with torch.no_grad():
        before = _layer_out(layer, x, make_tiny_llama)
        k = layer.get_submodule(balance[0]).weight.shape[1]
        scales = torch.rand(k, dtype=torch.float64) * 4 + 0.1
        weights = [layer.get_submodule(n).weight.clone() for n in balance]
        fold_scales_(layer.get_submodule(smooth), [layer.get_submodule(n) for n in balance], scales)
        after = _layer_out(layer, x, make_tiny_llama)
    assert any(not torch.equal(w, layer.get_submodule(n).weight) for w, n in zip(weights, balance))
    torch.testing.assert_close(after, before, rtol=1e-12, atol=1e-12)


def test_folding_into_a_linear_scales_its_bias() -> None:
    smooth, balance = torch.nn.Linear(8, 6, bias=True).double(), torch.nn.Linear(6, 5).double()
    x = torch.randn(10, 8, dtype=torch.float64)
    with torch.no_grad():
        before = balance(smooth(x))
        fold_scales_(smooth, [balance], torch.rand(6, dtype=torch.float64) + 0.5)
        torch.testing.assert_close(balance(smooth(x)), before, rtol=1e-12, atol=1e-12)


def test_search_keeps_the_lowest_loss_and_never_loses_to_alpha_zero_or_identity() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 48, generator=g)
    x = torch.randn(512, 48, generator=g) * (torch.rand(48, generator=g) * 8)  # salient channels
    ref = x @ w.T
    seen: list[float] = []

    def loss_fn(s: torch.Tensor) -> float:
        loss = float((x @ scaled_fake_quant(w, s, SCHEME).T - ref).pow(2).mean())
        seen.append(loss)
        return loss

    x_mean = x.abs().mean(0)
    plan = search_scales("norm", ("fc",), x_mean, weight_channel_mean([w], 16), loss_fn, n_grid=10)
    identity, alpha0 = seen[0], seen[1]
    assert plan.loss == min(seen) and plan.loss <= alpha0 and plan.loss <= identity
    assert plan.loss_identity == identity
    assert plan.alpha is not None and plan.loss < identity  # salient channels: scaling helps here
    expected = candidate_scales(x_mean, weight_channel_mean([w], 16), plan.alpha)
    assert torch.equal(plan.scales, expected)


def test_uniform_activations_leave_the_rounding_unchanged() -> None:
    w = torch.randn(24, 40)
    x_mean = torch.full((40,), 0.37)
    for i in range(20):
        s = candidate_scales(x_mean, None, i / 20)
        assert torch.equal(s, torch.ones(40))
        assert torch.equal(scaled_fake_quant(w, s, SCHEME), fake_quantize(w, SCHEME))
    plan = search_scales("n", ("l",), x_mean, None, lambda s: float((s - 1).abs().sum()), n_grid=20)
    assert isinstance(plan, ScalePlan) and torch.equal(plan.scales, torch.ones(40))


def test_scales_are_normalized_to_unit_geometric_range() -> None:
    s = candidate_scales(torch.rand(30) + 0.01, torch.rand(30) + 0.01, 0.5)
    assert torch.isclose(s.max() * s.min(), torch.tensor(1.0))


def test_group_hessian_blocks_pad_a_ragged_group_with_zeros() -> None:
    h = torch.randn(20, 20)
    blocks = group_hessian_blocks(h, 8)  # groups 8, 8, 4 (+4 padding)
    assert blocks.shape == (3, 8, 8)
    assert torch.equal(blocks[1], h[8:16, 8:16])
    assert (
        torch.equal(blocks[2, :4, :4], h[16:, 16:]) and not blocks[2, 4:].any() and not blocks[2, :, 4:].any()
    )


@pytest.mark.parametrize(
    "scheme", [QuantScheme(4, 16, False), QuantScheme(4, 16, True), QuantScheme(3, 20, False)]
)
def test_clip_search_lowers_the_output_error_and_is_the_rounders_grid(scheme: QuantScheme) -> None:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(12, 56, generator=g)
    w[:, 3] *= 6  # outliers worth clipping
    x = torch.randn(400, 56, generator=g)
    h = x.T @ x / 400
    plan = search_clip("fc", w, h, scheme, n_grid=20, max_shrink=0.5)
    assert plan.loss <= plan.loss_unclipped

    def out_err(q: torch.Tensor) -> float:  # per-group output error summed (cross-group terms excluded)
        total = 0.0
        for start in range(0, 56, scheme.group_size):
            sl = slice(start, start + scheme.group_size)
            total += float((x[:, sl] @ (q[:, sl] - w[:, sl]).T).pow(2).sum() / 400)
        return total

    linear = torch.nn.Linear(56, 12, bias=False)
    linear.weight.data = w.clone()
    clip_weight_(linear, plan, scheme.group_size)
    q = quantize_weight(linear.weight.data, scheme).dequantize()
    assert out_err(q) == pytest.approx(plan.loss, rel=1e-3)
    assert out_err(q) <= out_err(quantize_weight(w, scheme).dequantize()) + 1e-6
