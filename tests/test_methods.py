"""Per-layer method glue: stacking modules that share a Hessian is exact."""

from __future__ import annotations

import pytest
import torch

from llmquant.config import GPTQConfig, QuantScheme
from llmquant.gptq import accumulate_hessian, gptq_quantize, hessian_init


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("scheme", [QuantScheme(4, 16, True), QuantScheme(3, None, False)])
def test_stacked_rows_equal_separate_calls(act_order: bool, scheme: QuantScheme) -> None:
    g = torch.Generator().manual_seed(0)
    k = 48
    X = torch.randn(256, k, generator=g, dtype=torch.float64) @ torch.randn(
        k, k, generator=g, dtype=torch.float64
    )
    H, n = accumulate_hessian(*hessian_init(k, dtype=torch.float64), X)
    H = H / n
    weights = [torch.randn(rows, k, generator=g, dtype=torch.float64) for rows in (24, 8, 8)]  # q, k, v
    cfg = GPTQConfig(scheme, act_order=act_order, static_groups=False)
    stacked = gptq_quantize(torch.cat(weights), H, cfg).weight
    start = 0
    for W in weights:
        alone = gptq_quantize(W, H, cfg).weight
        part = stacked.rows(start, start + W.shape[0])
        start += W.shape[0]
        assert torch.equal(part.codes, alone.codes)
        assert torch.equal(part.scales, alone.scales) and torch.equal(part.zeros, alone.zeros)
        assert (part.g_idx is None and alone.g_idx is None) or torch.equal(part.g_idx, alone.g_idx)
