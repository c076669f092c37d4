"""Differentiable simulation: derivatives of the flow's end state through the Diffrax solve.

Oracles: central finite differences of the same solve (float64, rtol 1e-10 to 1e-12),
and the exact hitting time of docs/theory/escape-times (constant γ under the Huber loss,
docs/theory/theorem2 §3.8).
Derivatives are taken with respect to the init scale α, the initial weights (along a
random direction) and the observed values (along a random direction).
"""

import diffrax as dfx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import gradflow as gf
from gradflow import FinalState, final_state

RTOL = 1e-12  # solve tolerance; the derivatives agree to <1e-6 (measured), asserted 1e-5
STEPS = np.array([1e-5, 1e-5, 1e-5])  # finite-difference steps in (α, s, u)


def cp_problem(seed=0):
    """Order-3 completion of a rank-2 tensor (entries of RMS 1) from 14 of 27 entries,
    and unit directions in weight space and in observed values."""
    k1, k2, k3, k4, k5 = jr.split(jr.key(seed), 5)
    dims = (3, 3, 3)
    truth = gf.random_cp_tensor(k1, dims, 2) * np.sqrt(27.0)
    objective = gf.Completion.from_tensor(truth, gf.sample_indices(k2, dims, 14))
    directions = gf.CP.gaussian(k3, dims, 3, 1.0)
    v = gf.CP.gaussian(k4, dims, 3, 1.0)
    norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(v)))
    v = jax.tree.map(lambda x: x / norm, v)
    u = jr.normal(k5, (14,))
    return truth, objective, directions, v, u / jnp.linalg.norm(u)


def perturbed(p, objective, directions, v, u):
    """Model α·directions + s·v and objective with values + u_coef·u, at p = (α, s, u_coef)."""
    alpha, s, coef = p
    model = jax.tree.map(lambda d, w: alpha * d + s * w, directions, v)
    observed = gf.Completion(objective.shape, objective.indices, objective.values + coef * u)
    return model, observed


def check_against_central_differences(functionals, p, rtol=1e-5):
    """Reverse-mode Jacobian (outputs × inputs) of `functionals` at `p` against central
    differences of the same solve; returns the functionals at `p`."""
    jac = np.asarray(jax.jit(jax.jacrev(functionals))(p))
    forward = jax.jit(functionals)
    fd = []
    for i, h in enumerate(STEPS):
        e = jnp.zeros(3).at[i].set(h)
        fd.append((forward(p + e) - forward(p - e)) / (2 * h))
    fd = np.stack(fd, axis=1)
    # Each entry relative to itself, but not below 1% of its row's largest: the solve's
    # tolerance bounds a functional's derivatives on the scale of its sensitivity, so a
    # derivative 1e4x smaller than the others in its row is only known to that scale
    # (measured: d(error)/ds = 1.4e-4 beside 0.2, |jac - fd| = 1.9e-9).
    scale = np.maximum(np.abs(fd), 1e-2 * np.max(np.abs(fd), axis=1, keepdims=True))
    relative = np.abs(jac - fd) / scale
    print("jacobian", jac, "relative error", relative, sep="\n")
    assert np.all(relative < rtol), relative
    return forward(p)


def test_end_functionals_reverse_mode_default_solver():
    # jax.grad-style (reverse mode, Diffrax's RecursiveCheckpointAdjoint) through the
    # default CP solver RosenbrockW: final loss, final reconstruction error and an
    # observer at the end time, w.r.t. α, the initial weights and the observed values.
    truth, objective, directions, v, u = cp_problem()

    def functionals(p):
        model, observed = perturbed(p, objective, directions, v, u)
        end = final_state(model, observed, t1=20.0, rtol=1e-10)  # 3rd order: 1e-12 is slow
        error = jnp.linalg.norm(end.model.full() - truth) / jnp.linalg.norm(truth)
        observer = jnp.sum(gf.observers.component_norms(end.t, end.model, observed))
        return jnp.stack([observed(end.model), error, observer])

    p = jnp.array([0.3, 0.0, 0.0])
    values = check_against_central_differences(functionals, p)
    assert values[0] < 0.1 * float(objective(perturbed(p, objective, directions, v, u)[0]))


def test_hitting_time_and_state_there():
    # The time at which ||W|| reaches ρ (a root find on the dense output, differentiated
    # implicitly) and the loss at that time, w.r.t. α, the weights and the values.
    truth, objective, directions, v, u = cp_problem()

    def functionals(p):
        model, observed = perturbed(p, objective, directions, v, u)
        end = final_state(model, observed, t1=100.0, radius=3.0, solver=dfx.Tsit5(), rtol=RTOL)
        return jnp.stack([end.t, observed(end.model)])

    t_hit, _ = check_against_central_differences(functionals, jnp.array([0.3, 0.0, 0.0]))
    assert 5.0 < t_hit < 50.0


def test_escape_time_derivative_exact():
    # §5.4 with §3.8's constant γ = δ (one observed entry, Huber loss, outside the
    # small ball): T(α) = (α^-(N-2) - ρ^-(N-2)/N) / ((N-2)δ), so dT/dα = -α^-(N-1)/δ.
    # Default solver (RosenbrockW), whose approximate Jacobian here has repeated
    # eigenvalues (an eigendecomposition that cannot be differentiated), in forward
    # mode (ForwardMode adjoint, jax.jvp).
    order, d, y, delta, rho, alpha = 3, 3, 2.0, 0.5, 1.0, 0.05
    objective = gf.Completion((d,) * order, jnp.array([[1] * order]), jnp.array([y]),
                              gf.HuberLoss(delta))
    e = jnp.zeros((d, 1)).at[1, 0].set(1.0)

    def escape_time(alpha):
        model = gf.CP((alpha * e,) * order)
        return final_state(model, objective, t1=1e6, radius=rho, rtol=RTOL,
                           adjoint=dfx.ForwardMode()).t

    t, dt = jax.jit(lambda a: jax.jvp(escape_time, (a,), (jnp.ones_like(a),)))(alpha)
    n = order
    assert float(t) == pytest.approx((alpha ** -(n - 2) - rho ** (-(n - 2) / n))
                                     / ((n - 2) * delta), rel=1e-9)
    assert float(dt) == pytest.approx(-alpha ** -(n - 1) / delta, rel=1e-6)


def test_vmap_matches_flow_and_members_without_a_stop():
    # final_state runs the same solve as flow (identical t and model); under vmap a
    # member that starts outside the sphere stops at t = 0, one that never reaches it
    # runs to t1, and neither disturbs the others (Diffrax root-finds all members once
    # any stop fired).
    _, objective, directions, _, _ = cp_problem()
    kw = dict(radius=3.0, solver=dfx.Tsit5(), rtol=1e-10)
    alphas = jnp.array([0.2, 0.3, 1.0, 0.01])
    batch = jax.vmap(lambda a: final_state(
        jax.tree.map(lambda x: a * x, directions), objective, t1=100.0, **kw))(alphas)
    assert isinstance(batch, FinalState)
    np.testing.assert_array_equal(batch.status, [2, 2, 2, 0])  # radius x 3, t1
    assert float(batch.t[2]) == 0.0
    assert bool(jnp.all(batch.ok))
    for i, a in enumerate(alphas):
        tr = gf.flow(jax.tree.map(lambda x: a * x, directions), objective, t1=100.0, **kw)
        assert tr.status == FinalState.STATUSES[int(batch.status[i])]
        assert float(batch.t[i]) == pytest.approx(tr.t_final, rel=1e-12)
        for x, y in zip(jax.tree.leaves(batch.model), jax.tree.leaves(tr.model)):
            np.testing.assert_allclose(x[i], y, rtol=1e-9, atol=1e-12)


def test_failure_is_raised_or_reported():
    _, objective, directions, _, _ = cp_problem()
    model = jax.tree.map(lambda x: 0.3 * x, directions)
    kw = dict(t1=100.0, solver=dfx.Tsit5(), max_steps=4)
    with pytest.raises(RuntimeError, match="max_steps reached"):  # under jit, at run time
        jax.block_until_ready(jax.jit(lambda m: final_state(m, objective, **kw).t)(model))
    end = jax.jit(lambda m: final_state(m, objective, throw=False, **kw))(model)
    assert FinalState.STATUSES[int(end.status)] == "max_steps" and not bool(end.ok)
    assert float(end.t) < 100.0
    with pytest.raises(TypeError, match="objective"):
        final_state(model, lambda m: 0.0, t1=1.0)
    with pytest.raises(ValueError, match="max_steps"):
        final_state(model, objective, t1=1.0, max_steps=0)
