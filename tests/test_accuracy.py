"""The accuracy signal of every solve: the drift of the model's conserved quantities
(`Trajectory.stats["conservation_drift"]`), `AccuracyWarning` on a visibly inexact
solve, and verdict tolerances that pass at the default settings and fail when loose."""

import warnings

import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import gradflow as gf
from gradflow.analysis import cp as acp
from gradflow.analysis import diagonal as ad
from gradflow.analysis import htf as ah
from gradflow.analysis import matrix as am


def _cp():
    dims = (3, 3, 3)
    objective = gf.Completion.from_tensor(gf.random_cp_tensor(jr.key(0), dims, 2),
                                          gf.sample_indices(jr.key(1), dims, 20))
    return gf.CP.gaussian(jr.key(2), dims, 4, 0.3), objective


def _matrix():
    truth = jr.normal(jr.key(3), (5, 2)) @ jr.normal(jr.key(4), (2, 5))
    objective = gf.Completion.from_tensor(truth, gf.sample_indices(jr.key(5), (5, 5), 18))
    return gf.DeepMatrix.gaussian(jr.key(6), (5, 5, 5, 5), 0.4), objective


def _htf():
    tree, dims = gf.ModeTree.binary(4), (3,) * 4
    truth = gf.random_htf_tensor(jr.key(7), dims, tree, (2, 2), 9.0)
    objective = gf.Completion.from_tensor(truth, gf.sample_indices(jr.key(8), dims, 60))
    return gf.HTF.gaussian(jr.key(9), dims, tree, 5, 0.3), objective


# What each family's conservation verdict reads. Every solve of one family below is
# observed by the same observers (and ends on the same kind of stop), so that the tests
# of this module share one compiled solve per family.
OBSERVERS = {
    _cp: {"sq": gf.observers.squared_vector_norms},
    _matrix: {"c": lambda t, m, o: am.imbalance_vector(m), "s": lambda t, m, o: am.layer_scale(m)},
    _htf: {"g": lambda t, m, o: ah.squared_norm_gaps(m), "s": lambda t, m, o: ah.vector_scale(m)},
}


def _solve(make, **kw):
    model, objective = make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr = gf.flow(model, objective, **(dict(t1=1e9, loss_drop=1e-4) | kw),
                     observers=OBSERVERS[make], throw=False)
    return tr, [w for w in caught if w.category is gf.AccuracyWarning]


@pytest.mark.parametrize("make", [_cp, _matrix, _htf], ids=["cp", "deep-matrix", "htf"])
def test_conservation_drift_is_recorded_and_warns_only_when_visibly_inexact(make):
    tr, warned = _solve(make)
    # exact flow: the drift is the accumulated local error, a few tens of rtol at most
    assert tr.ok and not warned
    assert 0 <= tr.stats["conservation_drift"] < 100 * tr.config["rtol"]
    loose, warned = _solve(make, rtol=1e-1)
    assert loose.stats["conservation_drift"] > gf.AccuracyWarning.threshold
    assert len(warned) == 1 and "rtol 0.1" in str(warned[0].message)


def test_drift_of_a_stop_met_at_the_start_is_zero():
    tr, warned = _solve(_cp, loss_drop=1.5)  # below 1.5 times the initial loss: at t = 0
    assert tr.status == "loss" and tr.t_final == 0 and not warned
    assert tr.stats["conservation_drift"] == 0


def test_conservation_verdicts_pass_at_default_settings_and_fail_when_loose():
    verdicts = {
        _cp: lambda tr: acp.conservation_verdict(tr["sq"]),
        _matrix: lambda tr: am.balancedness_verdict(tr["c"], tr["s"]),
        _htf: lambda tr: ah.conservation_verdict(tr["g"], tr["s"]),
    }
    tight = {}
    for make, verdict in verdicts.items():
        tight[make], _ = _solve(make)
        assert tight[make].ok and verdict(tight[make]).passed, make.__name__
        loose, _ = _solve(make, rtol=1e-3)
        assert not verdict(loose).passed, make.__name__
    # the recorded drift is the verdict's drift at the last save (HTF)
    tight = tight[_htf]
    g = np.asarray(tight["g"])
    expected = np.abs(g[-1] - g[0]).max() / max(tight["s"][0], tight["s"][-1])
    np.testing.assert_allclose(tight.stats["conservation_drift"], expected, rtol=1e-6)


def _diagonal(depth):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((6, 12))
    y = X @ np.r_[1.0, -2.0, 0.5, np.zeros(9)]
    return (gf.DiagonalNet.gaussian(jr.key(10 + depth), 12, 0.3, depth=depth),
            gf.Sensing(jnp.asarray(X), jnp.asarray(y)))


@pytest.mark.parametrize("depth", [2, 3])
def test_diagonal_conservation_verdict_is_tied_to_the_solve_accuracy(depth):
    # Its tolerance was a fixed 1e-9; now drift_tolerance(rtol, dtype), as for CP/DMF/HTF.
    model, objective = _diagonal(depth)
    observers = {"c": lambda t, m, o: ad.invariants(m)}
    tight = gf.flow(model, objective, t1=1e9, loss_drop=1e-4, observers=observers)
    verdict = ad.conservation_verdict(tight["c"])
    assert verdict.passed and verdict.tolerance == 100 * 1e-8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", gf.AccuracyWarning)
        loose = gf.flow(model, objective, t1=1e9, loss_drop=1e-4, observers=observers,
                        rtol=1e-3)
    assert not ad.conservation_verdict(loose["c"]).passed
    # judged by its own accuracy, the loose run is what rtol 1e-3 promises
    assert ad.conservation_verdict(loose["c"], rtol=loose.config["rtol"]).passed
    assert ad.conservation_verdict(np.asarray(tight["c"], np.float32)).tolerance == 100 * 1e-5


@pytest.mark.parametrize("solver", ["default", "dense"])
def test_saves_between_long_stiff_steps_are_the_flow(solver):
    """A saved state between two W steps is the flow there: the dense output's slopes
    are damped in the stiff directions (a 2x2 depth-4 flow that approaches a singular W
    took steps 1e7 long, and the undamped cubic between ends of loss 0.0174 swung to a
    loss of 160). Oracle: solves that end exactly at save times, and a loss that never
    rises (the oracle's legs: the flow to the first save time, then on from there to
    the second: the flow is autonomous)."""
    from gradflow.verify.registry import CHECKS

    case = CHECKS["rc-perturbed-bounds"].instance(11)  # depth 4, z=-1.14, z'=-1.7, ε=0.323
    kw = dict(rtol=1e-10, throw=False)
    if solver == "dense":
        kw["solver"] = gf.RosenbrockW(gf.DenseHessian(), refresh_every=1)
    ts = np.concatenate([[0.0], np.geomspace(1e-2, 1e8, 61)])
    tr = gf.flow(case.model, case.objective, t1=ts[-1], save_times=ts,
                 observers=("loss",), **kw)
    assert tr.status == "t1"
    loss = np.asarray(tr["loss"])
    assert np.all(np.diff(loss) <= 1e-12 * loss[:-1])
    start, t0 = case.model, 0.0
    for i in (40, 55):
        leg = gf.flow(start, case.objective, t1=ts[i] - t0, atol=tr.config["atol"],
                      save_times=np.linspace(0.0, ts[i] - t0, 41),  # one program for all
                      observers=("loss",), **kw)
        assert leg.status == "t1" and leg.t_final == ts[i] - t0
        assert abs(loss[i] / float(leg["loss"][-1]) - 1) < 1e-7, (i, loss[i])
        start, t0 = leg.model, ts[i]
