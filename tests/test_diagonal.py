"""Diagonal linear networks: the model, conservation, the closed-form limit of the flow
(Woodworth et al.'s potential) against the flow, the saddle-to-saddle limit
(Pesme & Flammarion's Algorithm 1), the experiment and the verify checks."""

import dataclasses
import json
import math

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from scipy.integrate import quad

import gradflow as gf
from gradflow.analysis import diagonal as ad
from gradflow.cli import main
from gradflow.experiments import diagonal_bias
from gradflow.verify import CHECKS
from gradflow.verify import diagonal as vdiag

D, N = vdiag.DIM, vdiag.OBSERVATIONS
SAVES = 200
# The verify checks' settings (a loss drop of 1e-20 at rtol 1e-10) with the experiment's
# observers and number of saves: one compiled solve serves the depth-2 tests, the
# instances of the checks and the experiment's run in `test_experiment_cli`.
TO_LIMIT = dict(vdiag.LIMIT_FLOW, observers=diagonal_bias.OBSERVERS,
                save_times=np.concatenate([[0.0], np.geomspace(1e-4, 1e16, SAVES - 1)]))


def regression(seed, d=D, n=N, k=3):
    """Held-out instances (seeds unlike the verify checks'): X, y, beta*."""
    rng = np.random.default_rng(1000 + seed)
    X = rng.standard_normal((n, d))
    beta = np.zeros(d)
    beta[rng.choice(d, k, replace=False)] = rng.choice([-1.0, 1.0], k) * rng.uniform(0.5, 2, k)
    return X, X @ beta, beta


@pytest.fixture(scope="module")
def data():
    X, y, beta = regression(0)
    return X, y, beta, gf.Sensing(jnp.asarray(X), jnp.asarray(y))


# --- the model ------------------------------------------------------------------------


def test_model_shapes_and_values():
    model = gf.DiagonalNet.gaussian(jr.key(0), 7, 0.5, depth=3)
    assert model.shape == (7,) and model.depth == 3
    np.testing.assert_allclose(model.full(), model.u**3 - model.v**3)
    np.testing.assert_allclose(model.component_norms(), jnp.abs(model.full()))
    idx = jnp.array([[0], [6], [3], [3]])
    np.testing.assert_array_equal(model.entries(idx), model.full()[idx[:, 0]])
    uniform = gf.DiagonalNet.uniform(5, 0.1)
    assert float(jnp.max(jnp.abs(uniform.full()))) == 0.0
    assert uniform.u.dtype == jnp.float64
    per_coordinate = gf.DiagonalNet.uniform(3, jnp.array([0.1, 0.2, 0.3]), depth=4)
    np.testing.assert_allclose(per_coordinate.v, [0.1, 0.2, 0.3])
    assert gf.DiagonalNet.uniform(4, 0.1, dtype=jnp.float32).u.dtype == jnp.float32


@pytest.mark.parametrize("make, match", [
    (lambda: gf.DiagonalNet(jnp.ones((2, 2)), jnp.ones((2, 2))), "`u` must be a non-empty 1-d"),
    (lambda: gf.DiagonalNet(jnp.ones(3), jnp.ones(4)), "same shape"),
    (lambda: gf.DiagonalNet(jnp.ones(3), jnp.ones(3, jnp.float32)), "same shape and dtype"),
    (lambda: gf.DiagonalNet(jnp.ones(3), jnp.ones(3), depth=1), "`depth` must be an int >= 2"),
    (lambda: gf.DiagonalNet(jnp.ones(3), jnp.ones(3), depth=2.0), "`depth` must be an int"),
    (lambda: gf.DiagonalNet(jnp.ones(3), jnp.ones(3), dim=5), "`dim` is set only"),
    (lambda: gf.DiagonalNet(jnp.ones(2), jnp.ones(2), coordinates=jnp.array([0, 9]), dim=5),
     "`coordinates` must be integers in"),
    (lambda: gf.DiagonalNet.uniform(0, 0.1), "`d` must be an int >= 1"),
    (lambda: gf.DiagonalNet.uniform(3, -0.1), "`alpha` must be > 0"),
    (lambda: gf.DiagonalNet.uniform(3, jnp.ones(4)), "`alpha` must be a scalar or of shape"),
    (lambda: gf.DiagonalNet.gaussian(jr.key(0), 3, 0.0), "`std` must be > 0"),
])
def test_bad_model_arguments(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_integer_weights_are_refused():
    with pytest.raises(TypeError, match="`u` must be a real floating-point"):
        gf.DiagonalNet(jnp.ones(3, int), jnp.ones(3, int))


def test_objective_refuses_a_wrong_length(data):
    *_, objective = data
    with pytest.raises(ValueError, match="has shape"):
        gf.flow(gf.DiagonalNet.uniform(D + 1, 0.1), objective, t1=1.0)


def test_take_put_round_trip_and_block_observation():
    model = gf.DiagonalNet.gaussian(jr.key(1), 9, 0.7)
    coords = jnp.array([7, 2, 4])
    block = model.take(coords)
    assert block.shape == (9,) and block.u.shape == (3,)
    # the block's end vector is the model's on its coordinates, zero elsewhere
    expected = jnp.zeros(9).at[coords].set(model.full()[coords])
    np.testing.assert_array_equal(block.full(), expected)
    np.testing.assert_array_equal(block.component_norms(), model.component_norms()[coords])
    # a block of a block keeps the global coordinates
    np.testing.assert_array_equal(block.take(jnp.array([1])).coordinates, [2])
    np.testing.assert_array_equal(model.put(coords, block).full(), model.full())
    changed = model.put(coords, eqx.tree_at(lambda m: (m.u, m.v), block,
                                            (2 * block.u, 2 * block.v)))
    np.testing.assert_allclose(changed.full()[coords], 4 * model.full()[coords])
    np.testing.assert_array_equal(np.delete(changed.full(), coords),
                                  np.delete(model.full(), coords))


@pytest.mark.parametrize("depth", [2, 3])
def test_jacobian_closed_form_matches_autodiff(depth):
    model = gf.DiagonalNet.gaussian(jr.key(2), 6, 0.8, depth=depth)
    idx = jnp.array([[0], [5], [2], [2]])
    block = model.take(jnp.array([2, 5]))

    @eqx.filter_jit  # one compilation instead of many eager ones
    def both(m):
        return m.entries_jacobian(idx), gf.AbstractFactorization.entries_jacobian(m, idx)

    for m in (model, block):
        closed, auto = both(m)
        np.testing.assert_allclose(closed, auto, atol=1e-14)


def test_largest_components_block_is_the_gauss_newton_block(data):
    """The default solver's stiffness on a DiagonalNet: W = -(J_B^T J_B)/n on the
    weights of the k largest coordinates (checked against a hand-built Jacobian)."""
    X, y, _, objective = data
    model = gf.DiagonalNet.gaussian(jr.key(3), D, 0.5)
    lin = eqx.filter_jit(gf.LargestComponents(4).linearise)(model, objective)
    top = np.argsort(-np.abs(np.asarray(model.full())))[:4]
    assert set(np.asarray(lin.selection).tolist()) == set(top.tolist())
    u, v = np.asarray(model.u), np.asarray(model.v)
    sel = np.asarray(lin.selection)
    J = np.hstack([X[:, sel] * 2 * u[sel], -X[:, sel] * 2 * v[sel]])  # (n, 2k)
    gn = J.T @ J / N
    direction = gf.DiagonalNet(jnp.asarray(np.random.default_rng(0).standard_normal(D)),
                               jnp.asarray(np.random.default_rng(1).standard_normal(D)))
    out = lin.matvec(direction)
    x = np.concatenate([np.asarray(direction.u)[sel], np.asarray(direction.v)[sel]])
    np.testing.assert_allclose(np.concatenate([np.asarray(out.u)[sel], np.asarray(out.v)[sel]]),
                               -gn @ x, rtol=1e-10, atol=1e-12)
    rest = np.setdiff1d(np.arange(D), sel)
    assert np.all(np.asarray(out.u)[rest] == 0) and np.all(np.asarray(out.v)[rest] == 0)


# --- conservation ---------------------------------------------------------------------


# --- the potential and its minimiser --------------------------------------------------


def test_q_closed_forms_against_quadrature():
    for z in (-30.0, -1.0, 0.3, 5.0, 400.0):
        assert ad.q_depth2(z) == pytest.approx(quad(lambda s: np.arcsinh(s / 2), 0, z)[0],
                                               rel=1e-10)
        for depth in (3, 4):
            # q_D' = h_D^{-1} = the potential's gradient at alpha = 1
            integral = quad(lambda s: float(ad.potential_gradient(s, 1.0, depth)), 0, z,
                            limit=200)[0]
            assert ad.q_depth(z, depth) == pytest.approx(integral, rel=1e-8)
    z = np.array([-2.0, 0.0, 0.7, 40.0])
    for depth in (3, 5):
        p = depth / (depth - 2)
        h = lambda x: (1 - x) ** -p - (1 + x) ** -p  # Woodworth et al.'s h_D
        np.testing.assert_allclose(h(ad.potential_gradient(z, 1.0, depth)), z,
                                   rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("depth, alpha", [(2, 1e-3), (2, 0.3), (2, 10.0), (3, 0.1), (4, 0.5)])
def test_minimiser_is_optimal(data, depth, alpha):
    """KKT holds, and Q grows along every feasible direction (null space of X)."""
    X, y, *_ = data
    beta = ad.min_potential_interpolator(X, y, alpha, depth)
    feasibility, stationarity = ad.kkt_residual(beta, X, y, alpha, depth)
    assert feasibility < 1e-12 and stationarity < 1e-10
    null = np.linalg.svd(X)[2][N:].T  # (d, d - n)
    rng = np.random.default_rng(5)
    q0 = ad.potential(beta, alpha, depth)
    for _ in range(5):
        step = null @ rng.standard_normal(D - N)
        step *= 1e-3 * np.linalg.norm(beta) / np.linalg.norm(step)
        assert ad.potential(beta + step, alpha, depth) > q0
        assert ad.potential(beta - step, alpha, depth) > q0


def test_minimiser_interpolates_between_l2_and_l1(data):
    X, y, truth, _ = data
    l1, l2 = ad.min_l1_interpolator(X, y), ad.min_l2_interpolator(X, y)
    np.testing.assert_allclose(X @ l1, y, atol=1e-12)
    assert np.abs(l1).sum() <= np.abs(l2).sum() + 1e-12
    rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)
    assert rel(ad.min_potential_interpolator(X, y, 100.0), l2) < 1e-4
    to_l1 = [rel(ad.min_potential_interpolator(X, y, a), l1) for a in (1e-2, 1e-5, 1e-12)]
    assert to_l1[0] > to_l1[1] > to_l1[2] and to_l1[2] < 1e-3, to_l1
    np.testing.assert_allclose(l1, truth, atol=1e-10)  # here min-l1 recovers the truth
    distances = ad.interpolator_distances(ad.min_potential_interpolator(X, y, 1.0), X, y, 1.0)
    assert distances["potential"] < 1e-12 and distances["l2"] < distances["l1"]


@pytest.mark.parametrize("depth", [2, 3])
def test_flow_limit_counts_its_newton_steps(data, depth):
    X, y, *_ = data
    result = ad.flow_limit(X, y, 0.1, depth=depth)
    assert result.converged and 0 < result.iterations < 500  # was always 0
    capped = ad.flow_limit(X, y, 0.1, depth=depth, max_iterations=2)
    assert capped.iterations == 2 and not capped.converged
    for name, kw in (("max_iterations", dict(max_iterations=0)), ("tol", dict(tol=-1.0)),
                     ("accept", dict(accept=math.nan))):
        with pytest.raises((ValueError, TypeError), match=f"`{name}`"):
            ad.flow_limit(X, y, 0.1, depth=depth, **kw)


def test_analysis_bad_input(data):
    X, y, *_ = data
    with pytest.raises(ValueError, match="`y` must have shape"):
        ad.flow_limit(X, y[:-1], 0.1)
    with pytest.raises(ValueError, match="`X` must be a non-empty matrix"):
        ad.flow_limit(X[0], y, 0.1)
    with pytest.raises(ValueError, match="`u0` must be finite and positive"):
        ad.flow_limit(X, y, -0.1, depth=3)
    with pytest.raises(ValueError, match="`depth` must be an int >= 2"):
        ad.potential(np.zeros(3), 0.1, depth=1)
    with pytest.raises(ValueError, match="`alpha` must be finite and > 0"):
        ad.potential(np.zeros(3), 0.0)
    with pytest.raises(ValueError, match="`saved` must have shape"):
        ad.conservation_verdict(np.zeros(3))


# --- the flow's limit against the closed form -----------------------------------------


@pytest.mark.parametrize("seed", [1, 2])
def test_depth2_limit_agrees_with_the_flow(seed):
    """<= 1e-6 relative for alpha from 1e-3 to 10 on held-out random instances."""
    X, y, _ = regression(seed)
    objective = gf.Sensing(jnp.asarray(X), jnp.asarray(y))
    for alpha in (1e-3, 1e-2, 0.1, 1.0, 10.0):
        tr = gf.flow(gf.DiagonalNet.uniform(D, alpha), objective, **TO_LIMIT)
        assert tr.status == "loss"
        beta = np.asarray(tr.model.full())
        limit = ad.min_potential_interpolator(X, y, alpha)
        assert np.linalg.norm(beta - limit) / np.linalg.norm(limit) <= 1e-6, alpha


def test_depth_d_limit_and_conservation_along_the_flow():
    """Depth 3, alpha from 1e-3 to 10 (depth 4: the verify check): the limit is argmin of
    the depth-D potential to <= 1e-6, and u_i^(2-D) + v_i^(2-D) stays constant while
    u_i^2 - v_i^2 (conserved for beta = u*v, not here) does not. (Depth 2 and Gaussian
    inits of any sign: the `diagonal-conservation` check and `test_experiment_cli`.)"""
    X, y, _ = regression(3)
    objective = gf.Sensing(jnp.asarray(X), jnp.asarray(y))
    for alpha in (1e-3, 0.1, 10.0):
        tr = gf.flow(gf.DiagonalNet.uniform(D, alpha, depth=3), objective, **TO_LIMIT)
        assert tr.status == "loss"
        beta = np.asarray(tr.model.full())
        limit = ad.min_potential_interpolator(X, y, alpha, 3)
        assert np.linalg.norm(beta - limit) / np.linalg.norm(limit) <= 1e-6, alpha
        drift = ad.conservation_verdict(tr["invariant"]).value
        assert drift <= 1e-8, (alpha, drift)
        u, v = np.asarray(tr.model.u), np.asarray(tr.model.v)
        assert np.max(np.abs(u**2 - v**2)) > 1e-3  # from 0: not conserved


def test_gaussian_init_limit_at_depth2(data):
    """From any init, the limit is h(X^T mu) with the init's own mirror map."""
    X, y, _, objective = data
    model = gf.DiagonalNet.gaussian(jr.key(6), D, 0.3)
    tr = gf.flow(model, objective, **TO_LIMIT)
    limit = ad.flow_limit(X, y, np.asarray(model.u), np.asarray(model.v))
    assert limit.converged
    beta = np.asarray(tr.model.full())
    assert np.linalg.norm(beta - limit.beta) / np.linalg.norm(limit.beta) <= 1e-6


def test_float32_flow():
    """float32 weights (Tsit5, one cheap compilation; the default solver's W steps in
    float32 are `tests/test_float32.py`'s): float32 all along, and the limit to float32
    accuracy. Standard promotion, as users run: with x64 on, Diffrax's event handling
    mixes float32 time with float64 padding."""
    rng = np.random.default_rng(4)
    X = rng.standard_normal((N, D))
    truth = np.zeros(D)
    truth[[3, 11]] = [1.5, -1.0]
    with jax.numpy_dtype_promotion("standard"):
        model = gf.DiagonalNet.uniform(D, 0.05, dtype=jnp.float32)
        objective = gf.Sensing(jnp.asarray(X, jnp.float32), jnp.asarray(X @ truth, jnp.float32))
        tr = gf.flow(model, objective, t1=1e9, loss_drop=1e-8, observers=["loss"],
                     save_times=np.array([0.0, 1.0]), solver=dfx.Tsit5())
    assert tr.status == "loss" and tr.config["dtype"] == "float32"
    beta = np.asarray(tr.model.full())
    assert beta.dtype == np.float32 and tr["loss"].dtype == np.float32
    limit = ad.min_potential_interpolator(X, X @ truth, 0.05)
    # float32 (eps 1.2e-7) at its default rtol 1e-5: 1.2e-4 measured
    assert np.linalg.norm(beta - limit) / np.linalg.norm(limit) < 1e-3
    # a float32 block keeps its coordinates exactly (stored in the weights' dtype)
    coords = jnp.array([23, 3])
    block = tr.model.take(coords)
    assert block.coordinates.dtype == jnp.float32 and block.full().dtype == jnp.float32
    np.testing.assert_array_equal(block.full()[coords], tr.model.full()[coords])


# --- saddle to saddle -----------------------------------------------------------------


@pytest.fixture(scope="module")
def saddles(data):
    X, y, *_ = data
    return ad.saddle_to_saddle(X, y)


def test_algorithm1_ends_at_the_min_l1_interpolator(data, saddles):
    X, y, *_ = data
    assert saddles.converged and saddles.times[0] == 0 and np.all(np.diff(saddles.times) > 0)
    np.testing.assert_allclose(saddles.betas[-1], ad.min_l1_interpolator(X, y), atol=1e-10)
    for beta, s in zip(saddles.betas, saddles.duals):  # beta_i != 0 only where |s_i| = 1
        active = beta != 0
        np.testing.assert_allclose(np.abs(s[active]), 1.0)
        assert np.all(np.sign(beta[active]) == np.sign(s[active]))
        assert np.all(np.abs(s) <= 1.0)
    # between jumps every s_i moves at -grad L(beta_k)_i, also a coordinate that leaves
    # the support (here some do: coordinates non-zero at one saddle and zero at the next)
    grad = lambda b: X.T @ (X @ b - y) / N
    left = [i for k in range(1, len(saddles.betas)) for i in range(D)
            if saddles.betas[k - 1, i] != 0 and saddles.betas[k, i] == 0]
    assert left
    for k in range(len(saddles.times) - 1):
        moved = saddles.duals[k] - np.diff(saddles.times)[k] * grad(saddles.betas[k])
        np.testing.assert_allclose(saddles.duals[k + 1], np.clip(moved, -1, 1), atol=1e-9)


# --- the experiment and the checks ----------------------------------------------------


def test_experiment_cli(tmp_path):
    # the shapes and settings of TO_LIMIT: the solve compiled above
    code = main(["run", "diagonal-bias", "--dim", str(D), "--observations", str(N),
                 "--sparsity", "2", "--alphas", "1", "1e-4", "1e-10", "--saves", str(SAVES),
                 "--out", str(tmp_path), "--quiet"])
    assert code == 0
    assert (tmp_path / "diagonal-bias.png").stat().st_size > 10_000
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = summary["rows"]
    assert [r["alpha"] for r in rows] == [1.0, 1e-4, 1e-10]
    assert all(r["status"] == "loss" and r["newton_converged"] for r in rows)
    assert summary["worst_limit_error"] <= 1e-6
    # u_i v_i (depth 2); at alpha = 1e-10 the small weight v_i ~ alpha^2 is below atol
    assert max(r["conservation_drift"] for r in rows[:2]) <= 1e-6
    # the l2 -> l1 transition
    assert rows[0]["distance_l2"] < rows[0]["distance_l1"]
    assert rows[-1]["distance_l1"] < 1e-6 and rows[-1]["distance_l2"] > 0.1
    # activation times (accelerated) approach Algorithm 1's jump times as alpha -> 0
    saddles = summary["saddle_to_saddle"]
    assert saddles["last_saddle_is_min_l1"]
    predicted = np.asarray(saddles["predicted_activation"])
    gaps = [np.max(np.abs(np.asarray(r["activation_accelerated"]) - predicted) / predicted)
            for r in rows[1:]]
    assert gaps[1] < gaps[0] < 0.5, gaps
    # the gap is O(1/ln(1/alpha)): extrapolated linearly in it to 0, it closes
    assert saddles["extrapolation_error"] < min(0.05, gaps[1]), (saddles, gaps)


def test_experiment_bad_flag(capsys):
    with pytest.raises(SystemExit) as info:
        main(["run", "diagonal-bias", "--observations", "300", "--quiet"])
    assert info.value.code == 2
    assert "--observations" in capsys.readouterr().err


def test_verify_checks():
    """The three checks are registered (`tests/test_verify.py` runs every built-in check
    through the batched runner); here the depth-2 limit check's statement holds on
    instances of its own draws, solved by `gf.flow` with the check's settings (the
    program compiled above)."""
    assert {"diagonal-limit", "diagonal-limit-depth", "diagonal-conservation"} <= set(CHECKS)
    check = CHECKS["diagonal-limit"]
    for k in range(2):
        case = check.instance(k, seed=7)
        tr = gf.flow(case.model, case.objective, **dict(case.flow, **TO_LIMIT))
        residual = check.residual(tr, case)
        assert residual <= check.tolerance, (residual, case.description)
    # and the residual can fail: the limit of the other regime (l1-like / l2-like) is far
    wrong = dict(case.extra, alpha=1e-3 if case.extra["alpha"] > 0.1 else 10.0)
    assert check.residual(tr, dataclasses.replace(case, extra=wrong)) > 1e-3
