"""Gradient flow of CP factorizations against the oracles of the docs' theory pages (§3, §5)."""

import diffrax as dfx
import jax
import jax.flatten_util
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optimistix as optx
import pytest

import gradflow as gf
from gradflow._solve import StopTime
from gradflow.stiffness import AbstractLinearisation, as_shifted_solve
from gradflow.analysis import cp as acp
from gradflow.analysis.closed_forms import constant_gamma_hitting_time, logistic, product_flow_time

TIGHT = dict(rtol=1e-11, atol=1e-14)


def scalar_problem(order, w0, y):
    model = gf.CP(tuple(jnp.full((1, 1), w0 ** (1 / order)) for _ in range(order)))
    objective = gf.Completion((1,) * order, jnp.zeros((1, order), int), jnp.array([y]))
    return model, objective


def test_scalar_product_logistic_n2():  # §5.1, N = 2
    model, objective = scalar_problem(2, 1e-3, 1.5)
    ts = np.linspace(0, 6, 40)
    tr = gf.flow(model, objective, t1=6.0, save_times=ts, **TIGHT)
    w = tr["component_norms"][:, 0]
    np.testing.assert_allclose(w, logistic(ts, 1e-3, 1.5), rtol=1e-9)


@pytest.mark.parametrize("order", [3, 4])
def test_scalar_product_closed_form_time(order):  # §5.1, N >= 3
    w0, y = 1e-2, 1.0
    model, objective = scalar_problem(order, w0, y)
    t_half = product_flow_time(w0, 0.5, y, order)
    ts = np.linspace(0, 1.5 * t_half, 60)
    tr = gf.flow(model, objective, t1=ts[-1], save_times=ts, **TIGHT)
    w = tr["component_norms"][:, 0]
    sel = (w > 1.01 * w0) & (w < 0.9 * y)
    predicted = [product_flow_time(w0, wk, y, order) for wk in w[sel]]
    np.testing.assert_allclose(predicted, tr.ts[sel], rtol=1e-8)


def test_orthogonally_decomposable_incremental():  # §5.3
    n, d, c, a = 3, 3, np.array([2.0, 1.0, 0.5]), 1e-2
    keys = jr.split(jr.key(0), n)
    us = [jnp.linalg.qr(jr.normal(k, (d, d)))[0] for k in keys]
    truth = gf.CP(tuple(u * jnp.asarray(c)[None, :] ** (1 / n) for u in us)).full()
    idx = jnp.stack(jnp.unravel_index(jnp.arange(d**n), (d,) * n), axis=1)
    objective = gf.Completion.from_tensor(truth, idx)
    model = gf.CP(tuple(a * u for u in us))
    scale = d**n  # the objective averages over the 27 entries; §5's formulas sum
    t_end = scale * product_flow_time(a**n, 0.8 * c[-1], c[-1], n)
    tr = gf.flow(model, objective, t1=t_end, save_times=np.linspace(0, t_end, 200), **TIGHT)
    p = tr["component_norms"]
    for r in range(3):
        sel = (p[:, r] > 1.01 * a**n) & (p[:, r] < 0.8 * c[r])
        predicted = [scale * product_flow_time(a**n, v, c[r], n) for v in p[sel, r]]
        np.testing.assert_allclose(predicted, tr.ts[sel], rtol=1e-7)
    # incremental learning: when component r is half learned, later ones are tiny
    half = [scale * product_flow_time(a**n, c[r] / 2, c[r], n) for r in range(3)]
    assert half[0] < half[1] < half[2]


@pytest.mark.parametrize("order", [3, 4])
def test_huber_escape_time_and_sphere_hitting(order):  # §5.4 with §3.8's constant γ
    d, y, delta, a, rho = 3, 2.0, 0.5, 0.05, 1.0
    index = jnp.array([[1] * order])
    objective = gf.Completion((d,) * order, index, jnp.array([y]), gf.HuberLoss(delta))
    e = jnp.zeros((d, 1)).at[1, 0].set(a)
    model = gf.CP((e,) * order)
    expected = constant_gamma_hitting_time(a**order, rho, delta, order)
    tr = gf.flow(model, objective, t1=10 * expected, radius=rho, **TIGHT)
    assert tr.status == "radius"
    assert tr.t_final == pytest.approx(expected, rel=1e-9)
    assert float(tr.model.norm()) == pytest.approx(rho, rel=1e-9)


def small_problem(seed=0, order=3, d=4, rank=6, m=30, balanced=False, scale=0.4):
    k1, k2, k3 = jr.split(jr.key(seed), 3)
    dims = (d,) * order
    truth = gf.random_cp_tensor(k1, dims, 2)
    objective = gf.Completion.from_tensor(truth, gf.sample_indices(k2, dims, m))
    if balanced:
        model = gf.CP.balanced(k3, dims, rank, scale)
    else:
        model = gf.CP.gaussian(k3, dims, rank, scale)
    return model, objective


def test_lemma1_identity_and_theorem1_unbalanced():  # T1, T2, T3
    model, objective = small_problem()
    eps = float(acp.unbalancedness(model))
    assert eps > 0.05
    observers = {
        "sq": gf.observers.squared_vector_norms,
        "identity": lambda t, m, o: acp.identity_residual(m, o),
        "theorem1": lambda t, m, o: acp.theorem1_violation(m, o, eps),
        "eps": gf.observers.unbalancedness,
    }
    tr = gf.flow(model, objective, t1=2e3, observers=observers, **TIGHT)
    assert acp.conservation_verdict(tr["sq"], 1e-10)
    assert np.max(tr["identity"]) <= 1e-10
    assert np.max(tr["theorem1"]) <= 1e-9
    np.testing.assert_allclose(tr["eps"], eps, rtol=1e-9)
    assert tr.observations["loss"][-1] < 0.1 * tr.observations["loss"][0]


def test_corollary1_balanced():  # T4
    model, objective = small_problem(seed=1, balanced=True, scale=0.3)
    assert float(acp.unbalancedness(model)) < 1e-15
    observers = {"cor": lambda t, m, o: acp.corollary_residual(m, o)}
    tr = gf.flow(model, objective, t1=2e3, observers=observers, **TIGHT)
    assert np.max(tr["cor"]) <= 1e-9


def test_loss_stop_and_rank_of_solution():
    # rank-2 truth, small init: the flow finds the rank-2 solution (TF paper §4)
    model, objective = small_problem(seed=2, order=3, d=5, rank=20, m=80, scale=1e-3)
    l0 = float(objective(model))
    tr = gf.flow(model, objective, t1=1e12, loss_tol=1e-6 * l0)
    assert tr.status == "loss" and tr.ok
    assert tr.final["loss"] == pytest.approx(1e-6 * l0, rel=1e-6)
    assert np.all(np.diff(tr["loss"]) <= 1e-15)  # gradient flow decreases the loss
    assert acp.tensor_rank_estimate(tr.model, 1e-2) == 2


def test_flows_with_different_numbers_of_saves_share_one_program(monkeypatch):
    # Save times are padded to a power of two: 3 and 7 saves trace (and compile) the
    # solve once, and each trajectory holds exactly its own saves.
    from gradflow import _solve

    model, objective = small_problem(seed=2)
    traced = []
    original = _solve.run
    monkeypatch.setattr(_solve, "run", lambda *a, **kw: traced.append(1) or original(*a, **kw))
    long = gf.flow(model, objective, t1=4.0, save_times=np.linspace(0.0, 4.0, 7),
                   observers=["loss"])
    short = gf.flow(model, objective, t1=4.0, save_times=np.array([0.0, 2.0, 4.0]),
                    observers=["loss"])
    assert len(traced) == 1
    np.testing.assert_array_equal(long.ts, np.linspace(0.0, 4.0, 7))
    np.testing.assert_array_equal(short.ts, [0.0, 2.0, 4.0])
    np.testing.assert_allclose(short["loss"], long["loss"][::3], rtol=1e-7)


@pytest.mark.parametrize("solver, per_step", [(dfx.Tsit5(), 6), (dfx.Dopri8(), 13),
                                             (dfx.Heun(), 2)])
def test_gradient_evaluations_of_diffrax_explicit_solvers(solver, per_step):
    # one per stage, the first reused from the last step where the tableau is FSAL
    model, objective = small_problem(seed=1)
    tr = gf.flow(model, objective, t1=1.0, solver=solver, observers=[])
    assert tr.stats["gradient_evaluations"] == per_step * tr.stats["steps"] + 1


def test_failed_solve_says_so():
    model, objective = small_problem()
    with pytest.raises(gf.FlowError, match="max_steps") as info:
        gf.flow(model, objective, t1=1e6, max_steps=3)
    partial = info.value.trajectory
    assert not partial.ok and partial.status == "max_steps"
    assert partial.t_final < 1e6
    tr = gf.flow(model, objective, t1=1e6, max_steps=3, throw=False)
    assert tr.status == "max_steps" and "FAILED" in tr.reason


@pytest.mark.parametrize("stiffness", [gf.Explicit(), gf.LargestComponents(3),
                                       gf.LargestComponents(3, hessian="exact"),
                                       gf.DenseHessian()])
def test_rosenbrock_w_is_third_order(stiffness):
    model, objective = small_problem(seed=3, rank=4, scale=0.6)
    term = dfx.ODETerm(gf.vector_field)
    solve = lambda solver, **kw: dfx.diffeqsolve(
        term, solver, 0.0, 20.0, kw.pop("dt0", None), model, objective, **kw
    ).ys
    ref = solve(dfx.Dopri8(), stepsize_controller=dfx.PIDController(rtol=1e-13, atol=1e-15))
    errors = []
    for n in (40, 80, 160):
        # dt0 an array: one compiled solve for the three step sizes
        ys = solve(gf.RosenbrockW(stiffness), dt0=jnp.asarray(20.0 / n), max_steps=1000)
        diff = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), ys, ref)
        errors.append(max(jax.tree.leaves(diff)))
    orders = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert np.all((orders > 2.7) & (orders < 3.5)), orders


@pytest.mark.parametrize("stiffness", [gf.Explicit(), gf.LargestComponents(3),
                                       gf.LargestComponents(3, hessian="exact"),
                                       gf.DenseHessian(), gf.GaussNewtonSubspace(rank=4)])
def test_damped_slope_is_the_matrix_function_of_the_shifted_solve(stiffness):
    # The W steps' dense output uses r(S) = I - (I - S)^3 with S = (I - cW)^-1, applied
    # by each linearisation in one pass: against the dense matrix built from `matvec`.
    model, objective = small_problem(seed=4, rank=4, scale=0.6)
    lin = stiffness.linearise(model, objective)
    flat, unravel = jax.flatten_util.ravel_pytree(model)
    flatten = lambda tree: jax.flatten_util.ravel_pytree(tree)[0]
    w = jax.vmap(lambda e: flatten(lin.matvec(unravel(e))), out_axes=1)(jnp.eye(flat.size))
    c = 0.7 / max(float(lin.curvature()), 1e-3)  # c * curvature of order 1: r far from I
    eye = jnp.eye(flat.size)
    s = jnp.linalg.inv(eye - c * w)
    r = eye - jnp.linalg.matrix_power(eye - s, 3)
    x = jr.normal(jr.key(2), flat.shape)
    solve = as_shifted_solve(lin.shifted(c))
    np.testing.assert_allclose(flatten(solve(unravel(x))), s @ x, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(flatten(solve.damped(unravel(x))), r @ x, rtol=1e-10, atol=1e-12)
    if not isinstance(stiffness, gf.Explicit):
        assert float(jnp.max(jnp.abs(r @ x - x))) > 1e-2 * float(jnp.max(jnp.abs(x)))


class _PlainShifted(gf.AbstractStiffness):
    """A user's linearisation whose `shifted` returns a plain function."""

    inner: gf.AbstractStiffness

    def linearise(self, model, objective, previous=None):
        return _PlainLinearisation(self.inner.linearise(model, objective))


class _PlainLinearisation(AbstractLinearisation):
    lin: AbstractLinearisation

    def matvec(self, x):
        return self.lin.matvec(x)

    def shifted(self, c):
        solve = self.lin.shifted(c)
        return lambda x: solve(x)

    def curvature(self):
        return self.lin.curvature()


def test_a_plain_function_from_shifted_gives_the_same_w_steps():
    # The generic damping (three solves) and the Cholesky block's one pass agree.
    model, objective = small_problem(seed=3, rank=4, scale=0.6)
    saves = np.linspace(0.0, 20.0, 7)  # between steps: the dense output
    run = lambda stiffness: gf.flow(model, objective, t1=20.0, save_times=saves,
                                    solver=gf.RosenbrockW(stiffness), observers=["loss"])
    plain, built_in = run(_PlainShifted(gf.LargestComponents(3))), run(gf.LargestComponents(3))
    assert plain.stats["steps"] == built_in.stats["steps"]
    np.testing.assert_allclose(plain["loss"], built_in["loss"], rtol=1e-12)


def _block(stiffness, model, objective):
    """The block matrix -W a `LargestComponents` stiffness builds (negative curvature
    clipped), column by column through `matvec`."""
    lin = stiffness.linearise(model, objective)
    sub = model.take(lin.selection)
    flat, unravel = jax.flatten_util.ravel_pytree(sub)
    column = lambda e: -lin.flatten(lin.matvec(model.put(lin.selection, unravel(e))))
    return jax.vmap(column, out_axes=1)(jnp.eye(flat.size))


@pytest.mark.parametrize("loss", [gf.SquaredLoss(), gf.HuberLoss(0.3)])
def test_gauss_newton_block_is_the_hessian_at_an_exact_fit(loss):
    # At zero residual the exact Hessian of the restricted loss is J^T (d2 loss) J, the
    # Gauss-Newton matrix; elsewhere they differ by the residual-weighted curvature.
    model, _ = small_problem(seed=5, rank=5, scale=0.7)
    indices = gf.sample_indices(jr.key(9), model.shape, 30)
    fit = gf.Completion(model.shape, indices, model.full()[tuple(indices.T)], loss)
    gn, exact = gf.LargestComponents(3), gf.LargestComponents(3, hessian="exact")
    scale = jnp.max(jnp.abs(_block(exact, model, fit)))
    np.testing.assert_allclose(_block(gn, model, fit), _block(exact, model, fit),
                               atol=1e-12 * scale)
    off = gf.Completion(model.shape, indices, fit.values + 0.5, loss)
    gap = jnp.max(jnp.abs(_block(gn, model, off) - _block(exact, model, off)))
    assert gap > 1e-3 * scale
    assert jnp.all(jnp.linalg.eigvalsh(_block(gn, model, off)) > -1e-12 * scale)  # PSD


def test_largest_components_rejects_unknown_hessian():
    with pytest.raises(ValueError, match="`hessian` must be"):
        gf.LargestComponents(3, hessian="newton")


def test_stop_time_bracketed_despite_noisy_condition():
    # Near a stop the loss can carry rounding noise far above 1e-12 of its value; the
    # stop time must still be located (to the bracket width), not reported as failed.
    noisy = lambda t, _: (0.3 - t) / 0.3 + 1e-8 * jnp.sin(1e7 * t)  # a margin: > 0, then <= 0
    sol = optx.root_find(noisy, StopTime(rtol=1e-13, atol=1e-300), 1.0,
                         options={"lower": 0.0, "upper": 1.0}, throw=False)
    assert sol.result == optx.RESULTS.successful
    assert abs(float(sol.value) - 0.3) < 1e-8


OBSERVED = ["loss", "component_norms", "parameters"]
"""What the next two tests observe (one compiled solve for both)."""


def test_pytree_observer_and_parameters():
    model, objective = small_problem()
    tr = gf.flow(model, objective, t1=1.0, observers=OBSERVED)
    assert isinstance(tr["parameters"], gf.CP)
    assert tr["parameters"].factors[0].shape == (len(tr.ts),) + model.factors[0].shape
    np.testing.assert_allclose(tr["parameters"].factors[1][-1], tr.model.factors[1], rtol=1e-13)


def test_trajectory_save_load_roundtrip(tmp_path):
    model, objective = small_problem()
    tr = gf.flow(model, objective, t1=10.0, observers=OBSERVED)
    back = gf.Trajectory.load(tr.save(tmp_path / "t.npz"), like=model)
    np.testing.assert_array_equal(back.ts, tr.ts)
    np.testing.assert_array_equal(back["loss"], tr["loss"])
    for leaf, again in zip(jax.tree.leaves(tr["parameters"]), back["parameters"], strict=True):
        np.testing.assert_array_equal(again, leaf)  # a pytree comes back as its leaves
    np.testing.assert_array_equal(back.model.factors[0], tr.model.factors[0])
    assert back.status == tr.status and back.stats == tr.stats


@pytest.mark.parametrize("dense", [True, False])
def test_prediction_jacobian_closed_form_matches_autodiff(dense):
    model, objective = small_problem(seed=2, order=4, d=3, rank=5, m=40)
    objective = gf.Completion(objective.shape, objective.indices, objective.values,
                              dense=dense)
    flat, unravel = jax.flatten_util.ravel_pytree(model)
    auto = jax.jacfwd(lambda v: objective.predict(unravel(v)))(flat)
    np.testing.assert_allclose(objective.prediction_jacobian(model), auto, atol=1e-14)
    sensing = gf.Sensing(jr.normal(jr.key(4), (7, *model.shape)), jnp.zeros(7))
    auto = jax.jacfwd(lambda v: sensing.predict(unravel(v)))(flat)
    np.testing.assert_allclose(sensing.prediction_jacobian(model), auto, atol=1e-13)
