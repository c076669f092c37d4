"""Bad input gets a clear error; identities hold at random points (hypothesis)."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import gradflow as gf
from gradflow.analysis import cp as acp


def completion(shape=(3, 3, 3), m=5, seed=0, **kw):
    idx = gf.sample_indices(jr.key(seed), shape, m)
    return gf.Completion(shape, idx, jnp.ones(m), **kw)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(indices=[[0, 0, 3]], values=[1.0]), "out of range"),
        (dict(indices=[[0, 0, -1]], values=[1.0]), "out of range"),
        (dict(indices=[[0, 1, 2], [0, 1, 2]], values=[1.0, 2.0]), "duplicate"),
        (dict(indices=[[0, 1, 2]], values=[np.nan]), "`values` must be finite"),
        (dict(indices=[[0, 1]], values=[1.0]), r"`indices` must have shape \(m, 3\)"),
        (dict(indices=[[0, 1, 2]], values=[1.0, 2.0]), "`values` must have shape"),
    ],
)
def test_completion_rejects_bad_observations(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gf.Completion((3, 3, 3), **kwargs)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="`delta` must be > 0"):
        gf.HuberLoss(0.0)
    with pytest.raises(ValueError, match="`std` must be >= 0"):
        gf.CP.gaussian(jr.key(0), (3, 3), 2, -1.0)
    with pytest.raises(ValueError, match="`scale`"):
        gf.CP.balanced(jr.key(0), (3, 3), 2, np.inf)
    with pytest.raises(ValueError, match="`dims`"):
        gf.CP.gaussian(jr.key(0), (3,), 2, 0.1)
    with pytest.raises(ValueError, match="`rank`"):
        gf.CP.gaussian(jr.key(0), (3, 3), 0, 0.1)
    with pytest.raises(ValueError, match="`num`"):
        gf.sample_indices(jr.key(0), (2, 2), 5)
    with pytest.raises(ValueError, match="`operators`"):
        gf.Sensing(jnp.ones((4,)), jnp.ones(4))
    with pytest.raises(TypeError, match="`quantity` must be a function"):
        gf.rate_along_flow("component_norms", gf.CP.gaussian(jr.key(0), (3, 3, 3), 2, 0.1),
                           completion())
    with pytest.raises(ValueError, match="`hessian` must be"):
        gf.LargestComponents(8, hessian="newton")


def test_flow_rejects_bad_arguments():
    obj = completion()
    model = gf.CP.gaussian(jr.key(1), (3, 3, 3), 2, 0.1)
    with pytest.raises(ValueError, match=r"`model` has shape \(3, 3\)"):
        gf.flow(gf.CP.gaussian(jr.key(1), (3, 3), 2, 0.1), obj, t1=1.0)
    with pytest.raises(ValueError, match=r"`model` has shape \(3, 3, 4\)"):
        gf.flow(gf.CP.gaussian(jr.key(1), (3, 3, 4), 2, 0.1), obj, t1=1.0)
    for kw, match in [
        (dict(t1=-1.0), "`t1`"),
        (dict(t1=1.0, loss_tol=0.0), "`loss_tol`"),
        (dict(t1=1.0, radius=-2.0), "`radius`"),
        (dict(t1=1.0, rtol=0.0), "`rtol`"),
        (dict(t1=1.0, save_times=[0.0, 2.0]), "`save_times`"),
        (dict(t1=1.0, save_times=[0.5, 0.2]), "`save_times`"),
        (dict(t1=1.0, max_steps=0), "`max_steps`"),
        (dict(t1=1.0, observers=["nope"]), "unknown observer"),
    ]:
        with pytest.raises(ValueError, match=match):
            gf.flow(model, obj, **kw)
    bad = gf.CP(tuple(f.at[0, 0].set(jnp.nan) for f in model.factors))
    with pytest.raises(ValueError, match="non-finite"):
        gf.flow(bad, obj, t1=1.0)


def test_dense_and_sparse_completion_agree():
    shape = (4, 5, 3)
    truth = gf.random_cp_tensor(jr.key(0), shape, 2)
    idx = gf.sample_indices(jr.key(1), shape, 20)
    model = gf.CP.gaussian(jr.key(2), shape, 3, 0.5)
    dense = gf.Completion.from_tensor(truth, idx, dense=True)
    sparse = gf.Completion.from_tensor(truth, idx, dense=False)
    assert float(dense(model)) == pytest.approx(float(sparse(model)), rel=1e-14)
    g1, g2 = jax.grad(dense)(model), jax.grad(sparse)(model)
    for a, b in zip(g1.factors, g2.factors):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-16)
    # big tensors are never formed
    assert not gf.Completion((100,) * 4, jnp.zeros((1, 4), int), jnp.ones(1)).dense


def test_sensing_with_indicator_operators_equals_completion():
    shape = (3, 4)
    idx = gf.sample_indices(jr.key(3), shape, 6)
    y = jr.normal(jr.key(4), (6,))
    ops = jnp.zeros((6,) + shape).at[jnp.arange(6), idx[:, 0], idx[:, 1]].set(1.0)
    model = gf.CP.gaussian(jr.key(5), shape, 3, 0.7)
    loss = gf.HuberLoss(0.3)
    a = gf.Sensing(ops, y, loss)
    b = gf.Completion(shape, idx, y, loss)
    assert float(a(model)) == pytest.approx(float(b(model)), rel=1e-14)


def test_huber_small_ball_gradient_is_constant():  # §5.5 / T5
    shape, m, delta = (3, 3, 3), 8, 0.2
    idx = gf.sample_indices(jr.key(0), shape, m)
    y = jnp.where(jr.bernoulli(jr.key(1), 0.5, (m,)), 1.0, -1.0) * (1 + jr.uniform(jr.key(2), (m,)))
    obj = gf.Completion(shape, idx, y, gf.HuberLoss(delta))
    g0 = jnp.zeros(shape).at[tuple(idx.T)].set(-delta / m * jnp.sign(y))
    for seed in range(3):
        w = jr.normal(jr.key(10 + seed), shape)
        w = w / jnp.linalg.norm(w) * 0.99 * (float(jnp.min(jnp.abs(y))) - delta)
        grad = jax.grad(lambda t: obj.loss_at(t[tuple(idx.T)]))(w)
        np.testing.assert_array_equal(grad, g0)


problems = st.tuples(
    st.integers(2, 4),  # order
    st.integers(1, 4),  # dim
    st.integers(1, 5),  # rank
    st.integers(0, 2**16),  # seed
    st.booleans(),  # huber
)


@jax.jit
def _point_quantities(model, obj):
    """The component norms' rates (by the chain rule and by Lemma 1's identity), the
    rate of the squared-norm gaps, and the vector norms at a point."""
    velocity = gf.vector_field(0.0, model, obj)
    return (acp.component_norm_rates(model, obj), acp.identity_rate(model, obj),
            jax.jvp(acp.squared_norm_gaps, (model,), (velocity,))[1], model.vector_norms())


@settings(max_examples=25, deadline=None)
@given(problems)
def test_identity_and_conservation_at_random_points(problem):  # §3.2, §3.4
    order, d, rank, seed, huber = problem
    shape = (d,) * order
    keys = jr.split(jr.key(seed), 3)
    m = max(1, d**order // 2)
    loss = gf.HuberLoss(0.1) if huber else gf.SquaredLoss()
    obj = gf.Completion(shape, gf.sample_indices(keys[0], shape, m), jr.normal(keys[1], (m,)), loss)
    model = gf.CP.gaussian(keys[2], shape, rank, 0.8)
    rate, identity, gap_rate, norms = _point_quantities(model, obj)  # one compile per shape
    scale = max(float(jnp.max(jnp.abs(rate))), 1e-300)
    np.testing.assert_allclose(identity, rate, atol=1e-12 * scale)
    sq = float(jnp.max(norms ** 2))
    assert float(jnp.max(jnp.abs(gap_rate))) <= 1e-12 * max(scale * sq, 1e-300) + 1e-15


def test_balanced_init_is_balanced_and_take_put_roundtrip():
    model = gf.CP.balanced(jr.key(0), (3, 4, 5), 7, jnp.linspace(0.1, 1.0, 7))
    assert float(acp.unbalancedness(model)) < 1e-14
    np.testing.assert_allclose(model.component_norms(), jnp.linspace(0.1, 1.0, 7) ** 3, rtol=1e-13)
    comps = jnp.array([4, 1])
    sub = model.take(comps)
    assert sub.rank == 2
    again = model.put(comps, sub)
    for a, b in zip(again.factors, model.factors):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(model.norm(), jnp.linalg.norm(model.full()), rtol=1e-13)
    idx = gf.sample_indices(jr.key(1), (3, 4, 5), 9)
    np.testing.assert_allclose(model.entries(idx), model.full()[tuple(idx.T)], rtol=1e-13)
