"""Gradient flow of deep matrix factorizations against the docs' theory oracles (§1, §2, §5.2)."""

import math

import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import gradflow as gf
from gradflow.analysis import matrix as am
from gradflow.models.matrix import DeepMatrix
from gradflow.analysis.closed_forms import logistic, product_flow_time

TIGHT = dict(rtol=1e-11, atol=1e-14)
ALL_2X2 = jnp.array([[0, 1], [1, 0], [1, 1]])  # every entry but (0, 0)


def all_indices(shape):
    return jnp.stack(jnp.unravel_index(jnp.arange(math.prod(shape)), shape), axis=1)


def orthonormal(key, d, k):
    return jnp.linalg.qr(jr.normal(key, (d, k)))[0]


def aligned_problem(y, sigma0, dims, seed=0):
    """§5.2: full observation of Y = U diag(y) Vᵀ, balanced init U diag(σ0) Vᵀ."""
    k1, k2, k3 = jr.split(jr.key(seed), 3)
    d0, dl = dims[0], dims[-1]
    u, v = orthonormal(k1, dl, len(y)), orthonormal(k2, d0, len(y))
    target = (u * jnp.asarray(y)[None, :]) @ v.T
    start = (u * jnp.asarray(sigma0)[None, :]) @ v.T
    objective = gf.Completion.from_tensor(target, all_indices((dl, d0)))
    return DeepMatrix.balanced(k3, start, dims), objective, dl * d0


def test_aligned_full_observation_logistic_l2():  # §5.2 with §5.1's L = 2 closed form
    y, sigma0 = np.array([2.0, 1.0, 0.5]), np.array([0.03, 0.02, 0.01])
    model, objective, m = aligned_problem(y, sigma0, (3, 5, 4))
    # the objective averages over the m = 12 entries, §5.2 sums: flow time = m × theory time
    ts = np.linspace(0, 10 * m, 50)
    tr = gf.flow(model, objective, t1=ts[-1], save_times=ts, **TIGHT)
    assert tr.ok and tr.config["solver"] == "AutoStiff"  # gf.flow's default for every model
    sigma = tr["component_norms"]
    expected = np.stack([logistic(ts / m, s0, yr) for s0, yr in zip(sigma0, y)], axis=1)
    np.testing.assert_allclose(sigma, expected, rtol=1e-8, atol=1e-12)
    assert sigma[-1, -1] > 0.45  # every direction learned, the largest first
    half = [np.argmax(sigma[:, r] > y[r] / 2) for r in range(3)]
    assert half[0] < half[1] < half[2]


def test_aligned_full_observation_depth3():  # §5.2 with §5.1's general-L time
    y, sigma0, n = np.array([1.5, 1.0]), np.array([0.08, 0.05]), 3
    model, objective, m = aligned_problem(y, sigma0, (3, 4, 5, 2), seed=1)
    t_end = m * product_flow_time(sigma0[1], 0.9 * y[1], y[1], n)
    ts = np.linspace(0, t_end, 80)
    tr = gf.flow(model, objective, t1=t_end, save_times=ts, **TIGHT)
    sigma = tr["component_norms"]
    for r in range(2):
        sel = (sigma[:, r] > 1.01 * sigma0[r]) & (sigma[:, r] < 0.95 * y[r])
        (rows,) = np.nonzero(sel)
        assert rows.size > 10
        rows = rows[:: rows.size // 8]  # the oracle's quadrature is slow: a few points
        predicted = [m * product_flow_time(sigma0[r], v, y[r], n) for v in sigma[rows, r]]
        np.testing.assert_allclose(predicted, tr.ts[rows], rtol=1e-7)


def partial_problem(seed=0, dims=(3, 4, 5, 4)):
    k1, k2 = jr.split(jr.key(seed))
    shape = (dims[-1], dims[0])
    truth = jr.normal(k1, shape)
    idx = gf.sample_indices(k2, shape, 8)
    return gf.Completion.from_tensor(truth, idx)


def test_balancedness_conserved_from_unbalanced_init():  # §1.2, check M1
    objective = partial_problem()
    model = DeepMatrix.gaussian(jr.key(5), (3, 4, 5, 4), std=0.7)
    assert float(am.unbalancedness(model)) > 0.5
    # the end-to-end law of §1.4 needs balance: unbalanced, it visibly fails
    assert float(am.end_to_end_residual(model, objective)) > 1e-2
    observers = {
        "c": lambda t, m, o: am.imbalance_vector(m),
        "scale": lambda t, m, o: am.layer_scale(m),
    }
    tr = gf.flow(model, objective, t1=10.0, save_times=np.linspace(0, 10, 30),
                 observers=observers, **TIGHT)
    assert tr["loss"][-1] < 0.2 * tr["loss"][0]
    assert am.balancedness_verdict(tr["c"], tr["scale"], 1e-10)
    # the verdict is not vacuous: the layers moved far more than the tolerance
    assert np.abs(tr["scale"] - tr["scale"][0]).max() > 1e-2


def test_end_to_end_and_singular_values_on_balanced_trajectory():  # §1.4–1.5, M2, M3
    objective = partial_problem(seed=1)
    start = DeepMatrix.gaussian(jr.key(6), (3, 4), std=0.3).full()
    model = DeepMatrix.balanced(jr.key(7), start, (3, 5, 4, 4))
    assert float(am.unbalancedness(model)) < 1e-14
    observers = {
        "e2e": lambda t, m, o: am.end_to_end_residual(m, o),
        "sv": lambda t, m, o: am.singular_value_residual(m, o),
        "sigma": lambda t, m, o: m.component_norms(),
    }
    tr = gf.flow(model, objective, t1=40.0, save_times=np.linspace(0, 40, 30),
                 observers=observers, **TIGHT)
    assert tr["loss"][-1] < 0.2 * tr["loss"][0]
    assert np.max(tr["e2e"]) <= 1e-8
    assert np.max(tr["sv"]) <= 1e-8
    # §1.5 (a): for L >= 2 the rank is constant (here full: 3 positive σ throughout)
    assert np.all(tr["sigma"][:, -1] > 0)


def test_end_to_end_depth_one_and_rank_deficient():  # §1.4 edge cases
    objective = partial_problem(seed=2, dims=(3, 4))
    one = DeepMatrix.gaussian(jr.key(0), (3, 4), std=1.0)
    np.testing.assert_allclose(am.end_to_end_rate(one, objective),
                               -am.end_gradient(one, objective), atol=1e-15)
    assert float(am.end_to_end_residual(one, objective)) < 1e-14
    # rank-1 end matrix: the Gram matrices are singular (the §1.4 pitfall)
    a, b = jr.normal(jr.key(1), (4, 1)), jr.normal(jr.key(2), (1, 3))
    model = DeepMatrix.balanced(jr.key(3), a @ b, (3, 2, 3, 4))
    assert float(am.end_to_end_residual(model, objective)) < 1e-10
    assert float(am.singular_value_residual(model, objective)) < 1e-10


def test_end_gradient_matches_hand_formula():
    objective = partial_problem(seed=3, dims=(3, 4))
    model = DeepMatrix.gaussian(jr.key(4), (3, 2, 4), std=1.0)
    w = np.asarray(model.full())
    idx = np.asarray(objective.indices)
    expected = np.zeros_like(w)
    expected[idx[:, 0], idx[:, 1]] = (w[idx[:, 0], idx[:, 1]] - np.asarray(objective.values))
    expected /= len(idx)
    np.testing.assert_allclose(am.end_gradient(model, objective), expected, atol=1e-15)


RC_OBSERVERS = {"W": lambda t, m, o: m.full(), "s": lambda t, m, o: am.residual_scale(m, o)}
"""What the two Razin–Cohen tests observe (one compiled solve for both)."""


def test_razin_cohen_unperturbed():  # §2.3, checks R1, R2, M4
    objective = gf.Completion((2, 2), ALL_2X2, jnp.array([1.0, 1.0, 0.0]))
    model = DeepMatrix.balanced(jr.key(0), 0.1 * jnp.eye(2), (2, 2, 2, 2))
    identity = DeepMatrix.identity(2, 3, 0.1)
    np.testing.assert_allclose(model.full(), identity.full(), atol=1e-15)
    ts = np.linspace(0, 1500, 150)
    tr = gf.flow(model, objective, t1=1500.0, save_times=ts, observers=RC_OBSERVERS, **TIGHT)
    w, s = tr["W"], tr["s"]
    np.testing.assert_allclose(s, np.sqrt(6 * tr["loss"]))
    assert np.all(np.linalg.det(w) > 0)
    sel = s < 1
    assert sel.sum() > 100 and s[-1] < 0.06
    assert np.all(np.abs(w[sel, 0, 0]) >= am.rc_norm_lower_bound(s[sel]))
    sigma = np.linalg.svd(w, compute_uv=False)
    assert np.all(sigma[sel, 1] <= am.rc_sigma2_upper_bound(s[sel]))
    p = sigma[sel, 1] / sigma[sel].sum(axis=1)
    erank = np.array([am.effective_rank(x) for x in w[sel]])
    assert np.all(erank - 1 <= 2 * p * (1 - np.log(p)) + 1e-12)
    subopt = np.array([am.rank_suboptimality_2x2(x) for x in w[sel]])
    np.testing.assert_allclose(subopt, np.maximum(sigma[sel, 1], erank - 1), rtol=1e-12)
    # the bound is asymptotically tight: |w11| s -> 1; the norms grow without bound
    assert abs(w[-1, 0, 0]) * s[-1] == pytest.approx(1.0, abs=0.01)
    assert abs(w[-1, 0, 0]) > 15


def test_razin_cohen_perturbed():  # §2.4, check R3
    z, z2, eps = -2.0, 0.5, 0.1
    objective = gf.Completion((2, 2), ALL_2X2, jnp.array([z, z2, eps]))
    end = DeepMatrix.gaussian(jr.key(3), (2, 2, 2, 2), std=0.5, det_sign=-1).full()
    assert np.linalg.det(end) < 0
    model = DeepMatrix.balanced(jr.key(4), end, (2, 2, 2, 2))
    ts = np.linspace(0, 1500, 150)
    tr = gf.flow(model, objective, t1=1500.0, save_times=ts, observers=RC_OBSERVERS, **TIGHT)
    w, s = tr["W"], tr["s"]
    assert np.all(np.linalg.det(w) < 0)
    lower, upper = am.rc_perturbed_bounds(s, z, z2, eps)
    sel = s < min(abs(z), abs(z2))
    assert sel.sum() > 100
    assert np.all(np.abs(w[:, 0, 0]) >= lower)
    assert np.all(np.linalg.svd(w, compute_uv=False)[:, 1] <= upper)
    # converging to the rank-1 solution x = z z'/ε = -10
    assert 9.5 < abs(w[-1, 0, 0]) < 10.02


def test_rc_bound_formulas():
    assert float(am.rc_norm_lower_bound(0.5)) == pytest.approx(0.5)
    assert float(am.rc_sigma2_upper_bound(0.5)) == pytest.approx(0.5 + 0.5 * 2.25 / 0.25)
    assert float(am.rc_norm_lower_bound(1.5)) == 0.0
    assert float(am.rc_sigma2_upper_bound(1.5)) == np.inf
    lo, up = am.rc_perturbed_bounds(0.25, -2.0, 0.5, 0.1)
    assert float(lo) == pytest.approx(1.75 * 0.25 / 0.35)
    assert float(up) == pytest.approx(0.35 * (1 + 2.25 * 0.75 / (1.75 * 0.25)))
    lo, up = am.rc_perturbed_bounds(0.6, -2.0, 0.5, 0.1)
    assert float(lo) == 0.0 and float(up) == np.inf
    # at eps = 0 and z = z' = 1 the perturbed bound is the unperturbed one
    s = np.array([0.1, 0.3, 0.7])
    np.testing.assert_allclose(am.rc_perturbed_bounds(s, 1.0, 1.0, 0.0)[0],
                               am.rc_norm_lower_bound(s))


def test_rank_measures():  # §1.6, §2.1–2.2
    rank_one = np.outer([1.0, 2.0, 3.0], [1.0, -1.0])
    assert float(am.effective_rank(rank_one)) == pytest.approx(1.0, abs=1e-12)
    q = np.asarray(orthonormal(jr.key(0), 4, 4))
    assert float(am.effective_rank(2.5 * q)) == pytest.approx(4.0, rel=1e-12)
    p = np.array([2.0, 1.0]) / 3
    expected = np.exp(-np.sum(p * np.log(p)))
    assert float(am.effective_rank(np.diag([2.0, 1.0, 0.0]))) == pytest.approx(expected)
    assert float(am.effective_rank(np.zeros((2, 3)))) == 0.0
    m = np.diag([3.0, 4.0])
    assert float(am.schatten(m, 2)) == pytest.approx(5.0)
    assert float(am.schatten(m, 1)) == pytest.approx(7.0)
    assert float(am.schatten(m, 0.5)) == pytest.approx((np.sqrt(3) + 2) ** 2)
    assert float(am.distance_from_rank_one(m)) == pytest.approx(3.0)
    assert float(am.distance_from_rank_one(np.ones((1, 3)))) == 0.0
    # §2.1: W_x has σ = (√(x²+4) ± |x|)/2; rank-subopt is 1 at x = 0 and -> 0 as |x| grows
    for x in (0.0, 1.5, -7.0):
        wx = np.array([[x, 1.0], [1.0, 0.0]])
        r = np.sqrt(x * x + 4)
        sig = np.array([(r + abs(x)) / 2, (r - abs(x)) / 2])
        np.testing.assert_allclose(DeepMatrix((wx,)).component_norms(), sig, rtol=1e-12)
    subopt = [float(am.rank_suboptimality_2x2(np.array([[x, 1.0], [1.0, 0.0]])))
              for x in (0.0, 1.0, 10.0, 100.0)]
    assert subopt[0] == pytest.approx(1.0) and np.all(np.diff(subopt) < 0)
    with pytest.raises(ValueError, match="`p`"):
        am.schatten(m, 0.0)


def test_model_basics_and_constructors():
    model = DeepMatrix.gaussian(jr.key(0), (3, 5, 2, 4), std=0.5)
    assert model.shape == (4, 3) and model.depth == 3 and model.dims == (3, 5, 2, 4)
    w1, w2, w3 = (np.asarray(x) for x in model.layers)
    assert w1.shape == (5, 3) and w3.shape == (4, 2)
    np.testing.assert_allclose(model.full(), w3 @ w2 @ w1, rtol=1e-13)
    idx = jnp.array([[0, 0], [3, 2], [1, 1]])
    np.testing.assert_allclose(model.entries(idx), (w3 @ w2 @ w1)[[0, 3, 1], [0, 2, 1]])
    np.testing.assert_allclose(model.component_norms(),  # rank 2: the last σ is ~1e-17
                               np.linalg.svd(w3 @ w2 @ w1, compute_uv=False), atol=1e-13)
    assert float(model.norm()) == pytest.approx(np.linalg.norm(w3 @ w2 @ w1))
    assert float(am.unbalancedness(DeepMatrix((w1,)))) == 0.0
    cs = am.balancedness(model)
    np.testing.assert_allclose(cs[0], w2.T @ w2 - w1 @ w1.T, atol=1e-14)
    # balanced: exact product and C_j = 0, also for a rank-deficient, non-square end
    end = np.outer([1.0, -2.0, 0.5, 3.0], [0.3, 0.1, -1.0]) + np.outer(
        [0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 1.0])
    bal = DeepMatrix.balanced(jr.key(1), end, (3, 2, 6, 4))
    np.testing.assert_allclose(bal.full(), end, atol=1e-13)
    assert float(am.unbalancedness(bal)) < 1e-13
    ident = DeepMatrix.identity(3, 4, 0.0625)
    np.testing.assert_allclose(ident.layers[0], 0.5 * np.eye(3))
    np.testing.assert_allclose(ident.full(), 0.0625 * np.eye(3), rtol=1e-14)
    for seed in range(6):
        for sign in (1, -1):
            g = DeepMatrix.gaussian(jr.key(seed), (3, 4, 3), std=1.0, det_sign=sign)
            assert np.sign(np.linalg.det(g.full())) == sign
            free = DeepMatrix.gaussian(jr.key(seed), (3, 4, 3), std=1.0)
            np.testing.assert_allclose(np.abs(g.layers[1]), np.abs(free.layers[1]))


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"`layers`.*\(2, 4\).*\(5, 3\)"):
        DeepMatrix((jnp.ones((5, 3)), jnp.ones((2, 4))))
    with pytest.raises(ValueError, match="`layers`"):
        DeepMatrix(())
    with pytest.raises(ValueError, match="`layers`"):
        DeepMatrix((jnp.ones(3),))
    with pytest.raises(ValueError, match="`det_sign`"):
        DeepMatrix.gaussian(jr.key(0), (3, 4, 2), std=1.0, det_sign=1)
    with pytest.raises(ValueError, match="`det_sign`"):
        DeepMatrix.gaussian(jr.key(0), (3, 4, 3), std=1.0, det_sign=2)
    with pytest.raises(ValueError, match="`dims`"):
        DeepMatrix.gaussian(jr.key(0), (3,), std=1.0)
    with pytest.raises(ValueError, match="`std`"):
        DeepMatrix.gaussian(jr.key(0), (3, 3), std=-1.0)
    with pytest.raises(ValueError, match=r"`dims` hidden widths.*rank\(end\) = 2"):
        DeepMatrix.balanced(jr.key(0), np.array([[2.0, 1.0], [1.0, 1.0], [0.0, 0.0]]),
                            (2, 1, 3))
    with pytest.raises(ValueError, match="`end`"):
        DeepMatrix.balanced(jr.key(0), np.eye(3), (3, 3, 2))
    with pytest.raises(ValueError, match="`alpha`"):
        DeepMatrix.identity(2, 3, 0.0)
    with pytest.raises(ValueError, match="`depth`"):
        DeepMatrix.identity(2, 0, 1.0)
    with pytest.raises(ValueError, match="`z`"):
        am.rc_perturbed_bounds(0.1, 0.0, 1.0, 0.0)
    objective = gf.Completion((2, 2), ALL_2X2, jnp.array([1.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="shape"):
        gf.flow(DeepMatrix.identity(3, 2, 0.1), objective, t1=1.0)
