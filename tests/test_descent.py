"""Gradient descent with Optax beside the flow: `gradflow.descent` and its analysis."""

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

import gradflow as gf
from gradflow.analysis import descent as ad
from gradflow import DescentError, descent, rms_normalized

REFERENCE = dict(solver=dfx.Dopri8(), rtol=1e-12, atol=1e-14)  # flow error ≪ GD error


def cp_problem(seed=0):
    k1, k2, k3 = jr.split(jr.key(seed), 3)
    dims = (3, 3, 3)
    truth = gf.random_cp_tensor(k1, dims, 2)
    objective = gf.Completion.from_tensor(truth, gf.sample_indices(k2, dims, 15))
    return gf.CP.gaussian(k3, dims, 3, 0.5), objective


def dmf_problem(seed=0):
    k1, k2, k3 = jr.split(jr.key(seed), 3)
    objective = gf.Completion.from_tensor(jr.normal(k1, (3, 4)), gf.sample_indices(k2, (3, 4), 8))
    return gf.DeepMatrix.gaussian(k3, (4, 5, 6, 3), 0.7), objective


def local_orders(step_sizes, errors):
    return np.log(errors[:-1] / errors[1:]) / np.log(step_sizes[:-1] / step_sizes[1:])


def test_gd_iterates_times_and_saves(tmp_path):
    model, objective = cp_problem()
    lr, seen = 0.01, []

    def spy(t, m, o):  # runs (not just traces) only where the observer is evaluated
        jax.debug.callback(lambda t: seen.append(float(t)), t)
        return m.factors[0]

    tr = descent(model, objective, lr, steps=10, save_steps=[0, 3, 7], observers={"w": spy})
    assert tr.ok and tr.status == "t1" and tr.stats["steps"] == 10
    np.testing.assert_array_equal(tr.stats["save_steps"], [0, 3, 7, 10])  # final appended
    np.testing.assert_allclose(tr.ts, lr * np.array([0, 3, 7, 10]), rtol=1e-15)
    np.testing.assert_allclose(sorted(seen), tr.ts, rtol=1e-15)  # 3 chosen steps + final
    # the iterates are plain GD, θ ← θ − η∇φ
    manual, loss, grad = model, [], jax.jit(jax.value_and_grad(objective))
    for k in range(11):
        value, g = grad(manual)
        loss.append(float(value))
        if k < 10:
            manual = jax.tree.map(lambda w, d: w - lr * d, manual, g)
    for a, b in zip(jax.tree.leaves(tr.model), jax.tree.leaves(manual)):
        np.testing.assert_allclose(a, b, rtol=1e-13)
    np.testing.assert_allclose(tr["loss"], np.array(loss)[[0, 3, 7, 10]], rtol=1e-13)
    # the clock is k·η to rounding over many steps (compensated summation)
    long = descent(model, objective, 0.1, steps=1000, save_every=250, observers=[])
    np.testing.assert_allclose(long.ts, 0.1 * np.arange(0, 1001, 250), rtol=2e-16)
    back = gf.Trajectory.load(long.save(tmp_path / "gd.npz"), like=model)
    np.testing.assert_array_equal(back["loss"], long["loss"])
    assert back.config["learning_rate"] == 0.1 and back.status == "t1"


def test_gd_converges_to_flow_first_order():
    # GD is explicit Euler for the flow: error(t) = C(t)η + O(η²). The fitted slope's
    # deviation from 1 is itself O(η), so it must halve with η (measured: local
    # orders 1.0062, 1.0031, 1.0015 on the weights).
    model, objective = cp_problem()
    lrs, t_end = np.array([0.04, 0.02, 0.01, 0.005]), 20.0
    observers = {
        "component_norms": "component_norms", "w": ad.flat_weights, "end": ad.end_tensor
    }
    runs = [
        descent(model, objective, float(lr), steps=round(t_end / lr),
                save_every=round(2 / lr), observers=observers)
        for lr in lrs
    ]
    reference = gf.matched_flow(runs[-1], model, objective, observers=observers, **REFERENCE)
    for name in observers:
        errors = np.array([ad.trajectory_distance(r, reference, name).max() for r in runs])
        assert ad.order_verdict(lrs, errors, 1.0, tolerance=0.02), errors
        halving = np.diff(np.log2(np.abs(local_orders(lrs, errors) - 1)))
        assert np.all(np.abs(halving + 1) < 0.3), halving
    assert errors[-1] < 1e-3  # relative, at η = 0.005


def test_rms_normalized_is_a_time_change_of_the_flow():
    # GroupRMSprop (gf.rms_normalized): every step is a multiple h_k of −g, so at the clock t = Σh_k the
    # iterates approach the flow at first order. The EMA over ~1/(1−β) = 100 steps
    # lags by O(η/(1−β)) in time, so the order approaches 1 only as η shrinks
    # (measured local orders 0.917, 0.959, 0.979: the deviation halves with η).
    model, objective = cp_problem()
    lrs = np.array([5e-4, 2.5e-4, 1.25e-4, 6.25e-5])
    observers = {"w": ad.flat_weights}
    errors = []
    for lr in lrs:
        tr = descent(model, objective, rms_normalized(float(lr)), steps=10**6, t1=20.0,
                     save_steps=[0], observers=observers)
        assert tr.status == "t1" and 20.0 <= tr.t_final < 20.1
        reference = gf.matched_flow(tr, model, objective, observers=observers, **REFERENCE)
        errors.append(ad.trajectory_distance(tr, reference, "w")[-1])
    orders = local_orders(lrs, np.array(errors))
    deviation = 1 - orders
    assert np.all(deviation > 0) and deviation[-1] < 0.03, orders
    halving = np.diff(np.log2(deviation))
    assert np.all(np.abs(halving + 1) < 0.3), halving


def test_rms_normalized_matches_group_rmsprop():  # the official code's formula, by hand
    lr, beta, eps = 0.1, 0.99, 1e-6
    opt = rms_normalized(lr)
    params = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
    grads = [
        {"a": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array([[0.1, 0.0], [3.0, -1.0]])},
        {"a": jnp.array([0.2, 0.1, -0.4]), "b": jnp.array([[1.0, 1.0], [0.0, 0.5]])},
    ]
    state, v = opt.init(params), 0.0
    for k, g in enumerate(grads, start=1):
        updates, state = opt.update(g, state, params)
        v = beta * v + (1 - beta) * sum(float(jnp.sum(x**2)) for x in jax.tree.leaves(g))
        h = lr / (np.sqrt(v / (1 - beta**k)) + eps)
        for u, x in zip(jax.tree.leaves(updates), jax.tree.leaves(g)):
            np.testing.assert_allclose(u, -h * x, rtol=1e-14)
    schedule = rms_normalized(lambda count: 0.1 / (1.0 + count.astype(jnp.float64)))
    state = schedule.init(params)
    first, state = schedule.update(grads[0], state, params)
    second, _ = schedule.update(grads[0], state, params)  # same g: only η changes
    np.testing.assert_allclose(second["a"], 0.5 * first["a"], rtol=1e-14)


@pytest.mark.parametrize("problem", [cp_problem, dmf_problem])
def test_one_step_conservation_change_is_exact(problem):
    # Lemma 1 / balancedness (docs: theory/lemma1, theory/balancedness): one step of size
    # h along −g changes the conserved quantities by exactly h²Q(g). Measured residuals: CP 1.3e-13 (GD), 4.9e-15 (rms);
    # DMF 3.8e-15 (GD), 4.4e-14 (rms). The floor is ε·max|Q| / max|ΔQ| ≈ 1e-13 here.
    model, objective = problem()

    @eqx.filter_jit
    def check(before, after, objective, h):
        change = jnp.max(jnp.abs(ad.step_change(before, objective, h)))
        scale = jnp.max(jnp.abs(ad.conserved(before)))
        return change, scale, ad.step_residual(before, after, objective, h)

    for optimizer in (0.5, rms_normalized(0.5)):
        tr = descent(model, objective, optimizer, steps=1, observers=[])
        h = tr.t_final  # η for GD; the adaptive step for rms_normalized
        change, scale, residual = check(model, tr.model, objective, h)
        assert change > 1e-4 * scale  # far above rounding: the check has teeth
        assert residual < 1e-12


def test_conservation_drift_is_all_discretization():
    # Along 200 GD steps the invariants drift by O(1e-2), and that drift is exactly
    # the sum of the per-step η² terms (measured: 2e-13 relative).
    model, objective = cp_problem()
    lr = 0.3
    observers = {
        "q": lambda t, m, o: ad.conserved(m),
        "dq": lambda t, m, o: ad.step_change(m, o, lr),
    }
    tr = descent(model, objective, lr, steps=200, save_every=1, observers=observers)
    drift = tr["q"][-1] - tr["q"][0]
    predicted = tr["dq"][:-1].sum(axis=0)
    assert np.abs(drift).max() > 1e-3
    assert np.abs(drift - predicted).max() < 1e-11 * np.abs(drift).max()


def test_momentum_and_adam_clock():
    model, objective = cp_problem()
    lr, beta = 0.002, 0.9
    tr = descent(model, objective, optax.sgd(lr), steps=100, save_every=50, observers=[])
    np.testing.assert_allclose(tr.ts, [0, 50 * lr, 100 * lr], rtol=1e-12)  # step along −g
    tr = descent(model, objective, optax.sgd(lr, momentum=beta), steps=400, save_every=1,
                 observers=[])
    h = np.diff(tr.ts)
    assert h[0] == pytest.approx(lr, rel=1e-12)  # no momentum yet
    np.testing.assert_allclose(h[200:], lr / (1 - beta), rtol=0.1)  # the heavy-ball time change
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam mixes int and float
        tr = descent(model, objective, optax.adam(lr), steps=300, save_every=100, observers=[])
    assert tr.ok and np.all(np.diff(tr.ts) > 0) and tr["loss"][-1] < tr["loss"][0]


def test_stops_loss_and_t1():
    model, objective = cp_problem()
    tol = 0.5 * float(objective(model))
    tr = descent(model, objective, 0.05, steps=200, save_every=1, loss_tol=tol, observers=[])
    assert tr.status == "loss" and tr.ok
    assert tr["loss"][-1] <= tol < tr["loss"][-2]
    assert tr.stats["gradient_evaluations"] == tr.stats["steps"] + 1
    tr = descent(model, objective, 0.125, steps=100, t1=2.0, save_steps=[0], observers=[])
    assert tr.status == "t1" and tr.stats["steps"] == 16 and tr.t_final == 2.0
    with pytest.raises(DescentError, match="max_steps"):
        descent(model, objective, 0.125, steps=10, t1=2.0, save_steps=[0], observers=[])


def test_divergence_is_a_failure():
    model, objective = cp_problem()
    with pytest.raises(DescentError, match="non-finite at step 3 of 100.*too large") as info:
        descent(model, objective, 1e3, steps=100)
    assert isinstance(info.value, gf.FlowError)
    tr = descent(model, objective, 1e3, steps=100, throw=False)
    assert tr.status == "non_finite" and not tr.ok and "FAILED" in tr.reason
    assert tr.stats["steps"] < 100 and tr.t_final == 1e3 * tr.stats["steps"]
    assert all(np.all(np.isfinite(w)) for w in jax.tree.leaves(tr.model))  # last finite iterate
    assert np.isfinite(tr.final["loss"]) and np.all(np.isfinite(tr["loss"]))  # its loss too


@pytest.mark.parametrize(
    "optimizer, kwargs, match",
    [
        (-0.1, {}, "`optimizer`"),
        (0.0, {}, "`optimizer`"),
        (0.1, {"steps": 0}, "`steps`"),
        (0.1, {"steps": 2.5}, "`steps`"),
        (0.1, {"save_every": 0}, "`save_every`"),
        (0.1, {"save_steps": [0, 20]}, "`save_steps`"),
        (0.1, {"save_steps": [3, 2]}, "`save_steps`"),
        (0.1, {"save_steps": [0.5]}, "`save_steps`"),
        (0.1, {"save_every": 2, "save_steps": [0]}, "`save_every` and `save_steps`"),
        (0.1, {"loss_tol": -1.0}, "`loss_tol`"),
        (0.1, {"t1": 0.0}, "`t1`"),
        (0.1, {"observers": ["nope"]}, "`observers`"),
    ],
)
def test_bad_arguments(optimizer, kwargs, match):
    model, objective = cp_problem()
    kwargs = {"steps": 10} | kwargs
    with pytest.raises(ValueError, match=match):
        descent(model, objective, optimizer, **kwargs)


def test_bad_optimizers_and_models():
    model, objective = cp_problem()
    with pytest.raises(TypeError, match="`optimizer`"):
        descent(model, objective, "adam", steps=10)
    for kwargs, match in [
        ({"learning_rate": -1.0}, "`learning_rate`"),
        ({"learning_rate": 0.1, "decay": 1.0}, "`decay`"),
        ({"learning_rate": 0.1, "eps": -1.0}, "`eps`"),
    ]:
        with pytest.raises(ValueError, match=match):
            rms_normalized(**kwargs)
    other = gf.CP.gaussian(jr.key(1), (3, 3, 4), 2, 0.1)
    with pytest.raises(ValueError, match="`model` has shape"):
        descent(other, objective, 0.1, steps=10)
    bad = gf.CP((model.factors[0].at[0, 0].set(jnp.nan),) + model.factors[1:])
    with pytest.raises(ValueError, match="`model"):
        descent(bad, objective, 0.1, steps=10)


def test_loop_compiles_once():
    # One compilation serves every chunk of a progress-bar run and every learning rate.
    model, objective = cp_problem()
    observers = ["loss", "component_norms"]
    descent(model, objective, 0.01, steps=50, save_every=10, observers=observers)
    compiles = []

    def listen(event, *args, **kwargs):
        # a compilation, or a program read from the persistent compilation cache that
        # the test run shares (tests/plugin.py): JAX records no compilation for that
        if event in ("/jax/core/compile/backend_compile_duration",
                     "/jax/compilation_cache/cache_hits"):
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    jax.monitoring.register_event_listener(listen)
    try:  # 80 one-step chunks, another η and step count, the same number of saves
        tr = descent(model, objective, 0.02, steps=80, save_every=16, observers=observers,
                     progress=True)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
        jax.monitoring.unregister_event_listener(listen)
    assert compiles == []
    np.testing.assert_allclose(tr.ts, 0.02 * np.arange(0, 81, 16), rtol=1e-15)


def test_trajectory_distance_interpolates_and_checks():
    # x(t) = (sin t, 2 sin t) and cos t as one pytree observation; the reference is
    # sampled on a grid and linearly interpolated: exact at its nodes, O(Δ²) between.
    f = lambda ts: {"a": np.sin(ts)[:, None] * np.array([1.0, 2.0]), "b": np.cos(ts)}
    fake = lambda ts: gf.Trajectory(
        np.asarray(ts), {"x": f(np.asarray(ts))}, ts[-1], {}, None, "t1", {}
    )
    errors = []
    for n in (201, 401):
        grid = np.linspace(0.0, 2.0, n)
        mid = 0.5 * (grid[n // 2] + grid[n // 2 + 1])  # error Δ²|x''|/8 at a cell midpoint
        ts = np.concatenate([grid[[0, n // 4, n - 1]], [mid]])
        d = ad.trajectory_distance(fake(ts), fake(grid), "x", relative=False)
        np.testing.assert_array_equal(d[:3], 0.0)
        norm = np.sqrt(5 * np.sin(mid) ** 2 + np.cos(mid) ** 2)  # x'' = -x
        np.testing.assert_allclose(d[3], (grid[1] ** 2 / 8) * norm, rtol=1e-3)
        errors.append(d[3])
    rel = ad.trajectory_distance(fake(ts), fake(grid), "x")  # ÷ max ‖x‖ over the grid
    scale = np.sqrt(5 * np.sin(grid) ** 2 + np.cos(grid) ** 2).max()
    np.testing.assert_allclose(rel[3], errors[1] / scale, rtol=1e-14)
    with pytest.raises(ValueError, match="not covered"):
        ad.trajectory_distance(fake([0.0, 3.0]), fake(grid), "x")
    with pytest.raises(ValueError, match="no observation"):
        ad.trajectory_distance(fake(ts), fake(grid), "y")
