"""Theorem 2 of the TF paper (docs/theory/theorem2): assumptions, the A2+A3 init, the protocol."""

import functools
import json

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import gradflow as gf
from gradflow import theorem2
from gradflow.cli import main
from gradflow.experiments.rank_one_trajectory import NAME, huber_problem


@pytest.fixture(scope="module")
def objective():
    return huber_problem(jr.key(0))  # order 3, 3x3x3, 12 observations, delta_h = 0.05 min|y|


def test_origin_gradient_is_the_huber_ball_gradient(objective):  # §3.8, §5.5
    g0 = theorem2.origin_gradient(objective)
    y, idx = np.asarray(objective.values), np.asarray(objective.indices)
    expected = np.zeros(objective.shape)
    expected[tuple(idx.T)] = -float(objective.loss.delta) * np.sign(y) / len(y)
    np.testing.assert_array_equal(g0, expected)
    # the gradient is the same constant anywhere inside the ball |W| < min|y| - delta_h
    radius = theorem2.check_assumption1(objective)
    w = jr.normal(jr.key(1), objective.shape)
    w = 0.9 * radius * w / jnp.linalg.norm(w)
    grad = jax.grad(lambda t: objective.loss_at(t[tuple(objective.indices.T)]))(w)
    np.testing.assert_allclose(grad, expected, rtol=0, atol=1e-17)


def test_assumption1_check(objective):
    y = np.abs(np.asarray(objective.values))
    assert theorem2.check_assumption1(objective) == pytest.approx(y.min() - float(objective.loss.delta))
    too_wide = gf.Completion(objective.shape, objective.indices, objective.values,
                             gf.HuberLoss(float(y.min()) * 1.01))
    with pytest.raises(ValueError, match="Assumption 1 fails.*entry"):
        theorem2.check_assumption1(too_wide)
    squared = gf.Completion(objective.shape, objective.indices, objective.values)
    with pytest.raises(ValueError, match="Huber"):
        theorem2.check_assumption1(squared)


def test_leading_init_satisfies_assumptions_2_and_3(objective):
    init = theorem2.leading_init(jr.key(2), objective, 5, shrink=0.5)
    a2, a3 = theorem2.assumption2(init), theorem2.assumption3(init, objective)
    assert a2 and a2.value < 1e-15
    # the other components sit exactly a factor `shrink` below A3's threshold
    assert a3 and a3.value == pytest.approx(0.5, rel=1e-12)
    assert "leading component 0" in a3.detail
    # HOPM pushed component 0 toward the leading rank-one direction of -grad L(0):
    # gamma = <-G0, (x) u^n> is far above that of a random direction
    target = -np.asarray(theorem2.origin_gradient(objective))
    gamma = lambda us: float(np.tensordot(  # <T, (x)_n u^n / |u^n|>
        target, functools.reduce(np.multiply.outer, [u / np.linalg.norm(u) for u in us]),
        axes=target.ndim))
    lead = gamma([np.asarray(f[:, 0]) for f in init.factors])
    rand = gf.CP.balanced(jr.key(2), objective.shape, 1, 1.0)
    assert lead > 0 and lead > 2 * abs(gamma([np.asarray(f[:, 0]) for f in rand.factors]))
    assert lead <= np.linalg.norm(target) * (1 + 1e-12)  # Cauchy-Schwarz


def test_assumption3_fails_when_it_should(objective):
    # equal norms: the ratio is (|G0|/gamma)^(1/(N-2)) >= 1 for every candidate
    equal = gf.CP.balanced(jr.key(3), objective.shape, 4, 0.1)
    assert not theorem2.assumption3(equal, objective)
    with pytest.raises(ValueError, match="violates the assumptions"):
        theorem2.leading_init(jr.key(2), objective, 4, shrink=1.5)
    order2 = gf.Completion((3, 3), jnp.array([[0, 1], [2, 2]]), jnp.array([1.0, -1.0]),
                           gf.HuberLoss(0.1))
    with pytest.raises(ValueError, match="N >= 3"):
        theorem2.leading_init(jr.key(0), order2, 2)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    out = tmp_path_factory.mktemp(NAME)
    argv = ["run", NAME, "--alphas", "3e-2", "1e-2", "3e-3", "1e-3", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    return out, json.loads((out / "summary.json").read_text())["results"]


def test_rank_one_trajectory_delta_scales_like_alpha_to_the_N(experiment):  # T6
    out, results = experiment
    n = results["order"]
    table = results["table"]
    assert [r["alpha"] for r in table] == [3e-2, 1e-2, 3e-3, 1e-3]
    assert all(v["passed"] for v in results["assumptions"].values())
    deltas = np.array([r["delta"] for r in table])
    assert np.all(np.diff(deltas) < 0) and deltas[-1] < 1e-9
    # Delta = C alpha^N (1 + O(alpha)) above an integration floor of ~1e-12 (rtol 1e-12
    # times |W| ~ 0.3, about 5% of Delta(1e-3)): over 1.5 decades this moves the fitted
    # slope by a few hundredths; 0.15 keeps room for that and still rejects N - 1 or N + 1.
    assert abs(results["delta_slope"] - n) < 0.15
    # proof sketch: every other component is O(alpha^N) at the hitting time
    assert abs(results["others_norm_slope"] - n) < 0.15
    assert all(r["stopped"] == "T" for r in table)
    assert (out / f"{NAME}.png").stat().st_size > 10_000


def test_rank_one_trajectory_hitting_time_scaling(experiment):  # §5.4: t_S ~ alpha^-(N-2)
    _, results = experiment
    scaled = np.array([r["t_hit_scaled"] for r in results["table"]])
    changes = np.array(results["t_hit_scaled_relative_changes"])
    np.testing.assert_allclose(changes, np.abs(np.diff(scaled)) / scaled[1:])
    # converging: the corrections are O(alpha^(N-2)), so they shrink about 3x per 3x in alpha
    assert np.all(changes[1:] < 0.6 * changes[:-1])
    assert changes[-1] < 0.01
