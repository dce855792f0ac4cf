"""GPTQ properties: H = I is RTN, blocked == naive reference, beats RTN on correlated activations,
act_order/static_groups bookkeeping, damp recovery and RTN fallback, dead columns, Hessian accumulation."""

from __future__ import annotations

import logging

import pytest
import torch

from llmquant.config import GPTQConfig, QuantScheme
from llmquant.gptq import accumulate_hessian, gptq_quantize, hessian_init, hessian_weighted_error
from llmquant.grid import compute_qparams, dequantize_codes, group_qparams, quantize_weight, round_to_grid
from llmquant.qtensor import trivial_g_idx


def correlated_hessian(k: int, tokens: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Normalised H of X = Z @ A, A with singular values spanning 1e3 (iid X would give H ≈ cI)."""
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64))
    A = U * torch.logspace(0, -3, k, dtype=torch.float64)  # [K, K]: orthogonal columns, scaled
    X = torch.randn(tokens, k, generator=gen, dtype=torch.float64) @ A.T  # [tokens, K]
    H, n = hessian_init(k, dtype=dtype)
    H, n = accumulate_hessian(H, n, X)
    return H / n


def random_weight(n: int, k: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def naive_gptq(W, H, scheme, damp, act_order):
    """Column-by-column GPTQ, dynamic groups, float64 -> (codes [N, K], Q [N, K]), original order."""
    k = W.shape[1]
    gs = scheme.group_size or k
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(k)
    W, H = W[:, perm].clone(), H[perm][:, perm].clone()
    H += damp * H.diagonal().mean() * torch.eye(k, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes, Q = torch.zeros_like(W), torch.zeros_like(W)
    for j in range(k):
        if j % gs == 0:
            scale, zero = group_qparams(W[:, j : j + gs], scheme.bits, scheme.sym)
        codes[:, j] = round_to_grid(W[:, j], scale[:, 0], zero[:, 0], scheme.bits)
        Q[:, j] = dequantize_codes(codes[:, j], scale[:, 0], zero[:, 0]).double()
        W[:, j:] -= torch.outer((W[:, j] - Q[:, j]) / U[j, j], U[j, j:])
    inv = torch.argsort(perm)
    return codes[:, inv], Q[:, inv]


def damped(H: torch.Tensor, damp: float) -> torch.Tensor:
    return H + damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)


# 1. H = I: no error feedback, so GPTQ is exactly RTN ------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, None])
@pytest.mark.parametrize("k", [96, 101])
def test_identity_hessian_equals_rtn(bits, sym, group_size, k):
    scheme = QuantScheme(bits, group_size, sym)
    W = random_weight(24, k, seed=bits * 7 + k)
    result = gptq_quantize(W, torch.eye(k), GPTQConfig(scheme, block_size=16, grid="minmax"))
    rtn = quantize_weight(W, scheme)
    assert torch.equal(result.weight.codes, rtn.codes)
    assert torch.equal(result.weight.scales, rtn.scales)
    assert torch.equal(result.weight.zeros, rtn.zeros)
    assert result.fallback is None and result.damp == 0.01 and result.dead_columns == 0


@pytest.mark.parametrize("grid", ["mse", "search"])
@pytest.mark.parametrize("act_order", [False, True])
def test_identity_hessian_equals_rtn_with_a_searched_grid(act_order, grid):
    scheme = QuantScheme(3, 32, sym=False)
    W = random_weight(24, 101, seed=1)
    result = gptq_quantize(
        W, torch.eye(101), GPTQConfig(scheme, grid=grid, act_order=act_order, static_groups=False)
    )
    assert result.weight.equal(quantize_weight(W, scheme, grid=grid))


# 2. blocked == naive column-by-column reference (float64 removes rounding ties) -----------------------


@pytest.fixture(scope="module")
def problem64():
    return random_weight(20, 70, seed=3, dtype=torch.float64), correlated_hessian(
        70, 512, seed=4, dtype=torch.float64
    )


@pytest.mark.parametrize("block_size", [1, 4, 7, 128])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("scheme", [QuantScheme(4, 16, sym=False), QuantScheme(3, None, sym=True)])
def test_blocked_matches_naive_reference(problem64, block_size, act_order, scheme):
    W, H = problem64
    config = GPTQConfig(
        scheme, block_size=block_size, act_order=act_order, static_groups=False, grid="minmax"
    )
    result = gptq_quantize(W, H, config)
    codes, Q = naive_gptq(W, H, scheme, config.damp, act_order)
    assert torch.equal(result.weight.codes, codes.to(torch.uint8))
    # what is stored dequantizes to exactly the Q whose error was fed back
    assert torch.equal(result.weight.dequantize(torch.float64), Q)
    # the accounted GPTQ objective is ½ tr((W - Q) H_damped (W - Q)ᵀ)
    assert result.loss == pytest.approx(hessian_weighted_error(W, Q, damped(H, config.damp)) / 2, rel=1e-9)
    assert result.hessian_error == pytest.approx(hessian_weighted_error(W, Q, H), rel=1e-12)


def test_float32_block_size_changes_only_rounding():
    W, H = random_weight(64, 200, seed=5), correlated_hessian(200, 1024, seed=6)
    a = gptq_quantize(W, H, GPTQConfig(QuantScheme(4, 32), block_size=128))
    b = gptq_quantize(W, H, GPTQConfig(QuantScheme(4, 32), block_size=5))
    assert (a.weight.codes != b.weight.codes).float().mean() < 0.01
    assert a.hessian_error == pytest.approx(b.hessian_error, rel=0.02)


# 3. GPTQ beats RTN where it should: correlated activations ------------------------------------------


@pytest.fixture(scope="module")
def problem32():
    return random_weight(64, 160, seed=7), correlated_hessian(160, 1024, seed=8)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, None])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_activations(problem32, sym, group_size, act_order):
    W, H = problem32
    scheme = QuantScheme(4, group_size, sym)
    rtn_error = hessian_weighted_error(W, quantize_weight(W, scheme).dequantize(), H)
    result = gptq_quantize(W, H, GPTQConfig(scheme, act_order=act_order, static_groups=False))
    assert result.hessian_error < 0.8 * rtn_error
    assert result.hessian_error == pytest.approx(hessian_weighted_error(W, result.weight.dequantize(), H))


@pytest.mark.parametrize("grid", ["mse", "search"])
@pytest.mark.parametrize("sym", [True, False])
def test_searched_grid_gptq_not_worse_than_rtn(problem32, sym, grid):
    W, H = problem32
    scheme = QuantScheme(3, 32, sym)
    result = gptq_quantize(W, H, GPTQConfig(scheme, grid=grid))
    for rtn_grid in ("minmax", grid):
        assert result.hessian_error < hessian_weighted_error(
            W, quantize_weight(W, scheme, grid=rtn_grid).dequantize(), H
        )


# 4. act_order bookkeeping -----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [128, 140])
def test_act_order_g_idx_is_permutation_derived(k):
    W, H = random_weight(16, k, seed=9), correlated_hessian(k, 512, seed=10)
    H = H * torch.linspace(0.5, 2.0, k).sqrt().outer(torch.linspace(0.5, 2.0, k).sqrt())  # vary diag(H)
    result = gptq_quantize(W, H, GPTQConfig(QuantScheme(4, 32), act_order=True, static_groups=False))
    g_idx = result.weight.g_idx
    assert g_idx is not None and g_idx.dtype == torch.int32 and not result.weight.has_trivial_g_idx()
    sizes = torch.bincount(g_idx.long()).tolist()
    assert sizes == [32] * (k // 32) + ([k % 32] if k % 32 else [])
    perm = torch.argsort(H.diagonal(), descending=True, stable=True)
    assert torch.equal(g_idx.long(), torch.argsort(perm) // 32)
    # group members are consecutive in descending diag(H) order
    for g in range(len(sizes)):
        assert torch.equal(
            torch.sort(torch.nonzero(g_idx == g)[:, 0]).values, torch.sort(perm[g * 32 : (g + 1) * 32]).values
        )


def test_static_groups_trivial_g_idx_and_upfront_grids(problem32):
    W, H = problem32
    scheme = QuantScheme(4, 32, sym=False)
    result = gptq_quantize(W, H, GPTQConfig(scheme, act_order=True, static_groups=True, grid="minmax"))
    assert result.weight.has_trivial_g_idx()
    scales, zeros = compute_qparams(W, scheme)  # grids from the unpermuted weight, contiguous groups
    assert torch.equal(result.weight.scales, scales) and torch.equal(result.weight.zeros, zeros)
    assert result.hessian_error < 0.8 * hessian_weighted_error(W, quantize_weight(W, scheme).dequantize(), H)


def test_static_groups_identity_hessian_equals_rtn():
    scheme = QuantScheme(4, 32, sym=True)
    W = random_weight(8, 100, seed=11)
    result = gptq_quantize(
        W, torch.eye(100), GPTQConfig(scheme, act_order=True, static_groups=True, grid="minmax")
    )
    assert result.weight.equal(quantize_weight(W, scheme))


# 5. non-PD Hessians: damp recovery, RTN fallback -------------------------------------------------------


def test_rank_deficient_hessian_quantizes_at_default_damp():
    W, H = random_weight(16, 96, seed=12), correlated_hessian(96, 40, seed=13)  # 40 tokens < K
    result = gptq_quantize(W, H, GPTQConfig(QuantScheme(4, 32), grid="minmax"))
    assert result.fallback is None and result.damp == 0.01
    assert result.hessian_error < hessian_weighted_error(
        W, quantize_weight(W, QuantScheme(4, 32)).dequantize(), H
    )


def test_indefinite_hessian_raises_damp_with_warning(caplog):
    W, H = random_weight(16, 96, seed=14), correlated_hessian(96, 40, seed=15)
    H = damped(H, -0.05)  # eigenvalues down to -0.05·mean(diag): fails at damp 0.01, not at 0.1
    with caplog.at_level(logging.WARNING, logger="llmquant.gptq"):
        result = gptq_quantize(W, H, GPTQConfig(QuantScheme(4, 32), damp=0.01), name="layers.0.q_proj")
    assert result.fallback is None
    assert result.damp == pytest.approx(0.1) and result.damp > 0.01
    assert any("damp=0.1" in r.getMessage() and "layers.0.q_proj" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("bad", ["nan", "negative", "zero"])
def test_unusable_hessian_falls_back_to_rtn_with_warning(caplog, bad):
    scheme = QuantScheme(4, 32, sym=False)
    W = random_weight(16, 64, seed=16)
    H = {"nan": torch.full((64, 64), float("nan")), "negative": -torch.eye(64), "zero": torch.zeros(64, 64)}[
        bad
    ]
    with caplog.at_level(logging.WARNING, logger="llmquant.gptq"):
        result = gptq_quantize(W, H, GPTQConfig(scheme, grid="minmax"))
    assert result.fallback == "rtn"
    assert result.weight.equal(quantize_weight(W, scheme))
    assert any("falling back to RTN" in r.getMessage() for r in caplog.records)


# 6. dead columns ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("act_order", [False, True])
def test_dead_columns_are_zeroed_and_counted(act_order):
    k, dead = 64, [3, 17, 40]
    gen = torch.Generator().manual_seed(17)
    X = torch.randn(256, k, generator=gen) @ torch.randn(k, k, generator=gen)  # [tokens, K]
    X[:, dead] = 0
    H, n = accumulate_hessian(*hessian_init(k), X)
    W = random_weight(16, k, seed=18) + 1.0  # nonzero everywhere
    result = gptq_quantize(
        W, H / n, GPTQConfig(QuantScheme(4, 16, sym=False), act_order=act_order, static_groups=False)
    )
    assert result.dead_columns == len(dead)
    Q = result.weight.dequantize()
    assert torch.equal(Q[:, dead], torch.zeros(16, len(dead)))
    assert torch.isfinite(Q).all() and result.fallback is None


# 7. Hessian accumulation -------------------------------------------------------------------------------


def test_accumulate_hessian_mask_excludes_padding():
    gen = torch.Generator().manual_seed(19)
    X = torch.randn(2, 50, 32, generator=gen)  # [batch, seq, K]
    mask = torch.rand(2, 50, generator=gen) > 0.3  # [batch, seq]
    X[~mask] = 1e6  # padding junk must not leak
    H, n = accumulate_hessian(*hessian_init(32), X, mask)
    H_ref, n_ref = accumulate_hessian(*hessian_init(32), X[mask])
    assert n == n_ref == int(mask.sum())
    torch.testing.assert_close(H, H_ref, rtol=1e-6, atol=0)


def test_accumulate_hessian_batches_equal_one_shot():
    X = random_weight(300, 48, seed=20, dtype=torch.float64)  # [tokens, K]
    H, n = hessian_init(48, dtype=torch.float64)
    for chunk in X.split(70):
        H, n = accumulate_hessian(H, n, chunk)
    H_ref, n_ref = accumulate_hessian(*hessian_init(48, dtype=torch.float64), X)
    assert n == n_ref == 300
    torch.testing.assert_close(H, H_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(H / n, 2 * X.T @ X / 300)


def test_accumulate_hessian_half_inputs_accumulate_in_float32():
    X = random_weight(64, 16, seed=21).half()
    H, n = accumulate_hessian(*hessian_init(16), X)
    assert H.dtype == torch.float32 and n == 64
    torch.testing.assert_close(H, 2 * X.float().T @ X.float())


def test_shape_mismatch_is_a_value_error():
    with pytest.raises(ValueError, match="H \\[K, K\\]"):
        gptq_quantize(torch.zeros(4, 8), torch.eye(7), GPTQConfig())


def test_trivial_g_idx_without_act_order(problem32):
    W, H = problem32
    result = gptq_quantize(W, H, GPTQConfig(QuantScheme(4, 32)))
    assert result.weight.g_idx is None
    assert torch.equal(result.weight.group_index(), trivial_g_idx(160, 32).long())


# Error-propagation GPTQ (GPTAQ): the shifted target -------------------------------------------------


def _streams(k: int, tokens: int, seed: int, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(X quantized stream, X̃ float stream) [tokens, K] float64: correlated inputs, X̃ = X plus a
    deviation that is mostly a function of X (what quantizing earlier layers does) and partly not."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(k, k, generator=gen, dtype=torch.float64) / k**0.5
    X = torch.randn(tokens, k, generator=gen, dtype=torch.float64) @ A
    R = torch.randn(k, k, generator=gen, dtype=torch.float64) / k**0.5
    other = 0.2 * torch.randn(tokens, k, generator=gen, dtype=torch.float64) @ A
    return X, X + noise * (X @ R + other)


def _stats(X: torch.Tensor, X_float: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from llmquant.gptq import accumulate_cross

    k = X.shape[1]
    H, n = accumulate_hessian(*hessian_init(k, dtype=torch.float64), X)
    D = accumulate_cross(torch.zeros(k, k, dtype=torch.float64), X, X_float)
    return H / n, D / n


def test_error_propagation_with_equal_streams_is_gptq() -> None:
    """X_float = X: the cross term is exactly zero, the target is W and the result is GPTQ's, bit for bit."""
    from llmquant.gptq import propagation_target

    X, _ = _streams(64, 512, seed=3, noise=0.0)
    H, D = _stats(X.float(), X.float())
    assert not bool(D.any())
    W = random_weight(48, 64, seed=4)
    cfg = GPTQConfig(QuantScheme(4, 32, False), error_propagation=1.0)
    target = propagation_target(W, H, D, 1.0, cfg.damp)
    assert torch.equal(target, W)
    a, b = gptq_quantize(target, H, cfg), gptq_quantize(W, H, GPTQConfig(QuantScheme(4, 32, False)))
    assert a.weight.equal(b.weight) and a.loss == b.loss


def test_propagation_target_is_the_least_squares_fit_to_the_float_outputs() -> None:
    """Undamped (tiny λ), W + W·D·H⁻¹ is argmin_T ‖T·X − W·X̃‖ (lstsq on the streams); α scales the shift."""
    from llmquant.gptq import propagation_target

    X, X_float = _streams(32, 1024, seed=5, noise=0.3)
    H, D = _stats(X, X_float)
    W = random_weight(16, 32, seed=6, dtype=torch.float64)
    target = propagation_target(W, H, D, 1.0, damp=1e-12)
    lstsq = torch.linalg.lstsq(X, X_float @ W.T).solution.T  # [N, K]
    torch.testing.assert_close(target, lstsq, rtol=1e-8, atol=1e-8)
    half = propagation_target(W, H, D, 0.5, damp=1e-12)
    torch.testing.assert_close(half, W + 0.5 * (lstsq - W), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_error_propagation_lowers_the_float_output_error(seed: int) -> None:
    """GPTQ on the shifted target has a lower ‖W·X̃ − Q·X‖ than plain GPTQ when the streams differ."""
    from llmquant.gptq import propagation_target

    X, X_float = _streams(64, 2048, seed=10 + seed, noise=0.2)
    H, D = _stats(X, X_float)
    W = random_weight(64, 64, seed=20 + seed, dtype=torch.float64)
    cfg = GPTQConfig(QuantScheme(3, 32, False), grid="minmax")
    ref = X_float @ W.T

    def err(Q: torch.Tensor) -> float:
        return float((X @ Q.T - ref).pow(2).sum())

    plain = gptq_quantize(W, H, cfg).weight.dequantize(torch.float64)
    shifted = gptq_quantize(propagation_target(W, H, D, 1.0, cfg.damp), H, cfg).weight.dequantize(
        torch.float64
    )
    assert err(shifted) < 0.5 * err(plain)  # measured 0.30-0.32 on these seeds
