"""float32 works: the main job's problem, a deep matrix and an HTF flow end with the right
status and their theorem residuals at float32 tolerances (machine epsilon 1.2e-7,
default rtol 1e-5), with the default solver, Tsit5 and a loss stop; and with JAX kept in
32-bit mode by GRADFLOW_FLOAT32=1."""

import os
import subprocess
import sys

import diffrax as dfx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import gradflow as gf
from gradflow.analysis import cp as acp
from gradflow.analysis import htf as ah
from gradflow.analysis import matrix as am

F32 = jnp.float32


@pytest.fixture(autouse=True)
def standard_promotion():
    # With JAX's float64 on, a float32 model runs with float32 time, and Diffrax's event
    # handling mixes float32 time with Python-float (float64) padding in a `jnp.where`,
    # which strict promotion (the other tests' setting) refuses; users run "standard".
    with jax.numpy_dtype_promotion("standard"):
        yield


MAIN_JOB = {  # the paper's problem: order 4, 10^4, rank-5 truth, 2000 entries, R = 1000
    "paper": dict(dims=(10,) * 4, truth_rank=5, observations=2000, components=1000),
    "small": dict(dims=(5,) * 3, truth_rank=2, observations=60, components=40),
}


@pytest.mark.parametrize("size", [pytest.param("paper", marks=pytest.mark.slow), "small"])
def test_main_job_problem_in_float32(size):
    # the main job's problem (at the paper's size: `pytest -m slow`) at std 0.05
    p = MAIN_JOB[size]
    k_truth, k_obs, k_init = jr.split(jr.key(0), 3)
    truth = gf.random_cp_tensor(k_truth, p["dims"], p["truth_rank"])
    objective = gf.Completion.from_tensor(truth, gf.sample_indices(k_obs, p["dims"],
                                                                   p["observations"]))
    model64 = gf.CP.gaussian(k_init, p["dims"], p["components"], 0.05)
    model = jax.tree.map(lambda x: x.astype(F32), model64)  # the same init, rounded
    tr = gf.flow(model, objective, t1=1e12, loss_drop=1e-4,
                 observers=["squared_vector_norms", "component_norms"])
    assert tr.status == "loss" and tr.config["dtype"] == "float32"
    assert tr.model.factors[0].dtype == F32 and tr["loss"].dtype == F32
    assert tr.final["loss"] <= 1e-4 * tr["loss"][0] * (1 + 1e-5)
    # Lemma 1 in float32: drift relative to the largest squared norm, within 100 x rtol
    assert acp.conservation_verdict(tr["squared_vector_norms"], 100 * tr.config["rtol"]).passed
    # the same flow as in float64, to float32's accuracy: the learned components
    ref = gf.flow(model64, objective, t1=1e12, loss_drop=1e-4, observers=["component_norms"])
    k = p["truth_rank"]
    top = np.sort(np.asarray(ref.final["component_norms"]))[::-1][:k]
    ours = np.sort(np.asarray(tr.final["component_norms"], float))[::-1][:k]
    np.testing.assert_allclose(ours, top, rtol=1e-2)
    error = lambda m: float(jnp.linalg.norm(m.full().astype(float) - truth) / jnp.linalg.norm(truth))
    assert abs(error(tr.model) - error(ref.model)) < 1e-2


def test_deep_matrix_in_float32_with_tsit5_and_the_default():
    truth = jr.normal(jr.key(1), (6, 2)) @ jr.normal(jr.key(2), (2, 6))
    objective = gf.Completion.from_tensor(truth, gf.sample_indices(jr.key(3), (6, 6), 24))
    model = gf.DeepMatrix.gaussian(jr.key(4), (6, 6, 6, 6), 0.3, dtype=F32)
    observers = {"c": lambda t, m, o: am.imbalance_vector(m),
                 "scale": lambda t, m, o: am.layer_scale(m)}
    for solver in (None, dfx.Tsit5()):
        tr = gf.flow(model, objective, t1=1e6, loss_drop=1e-4, solver=solver,
                     observers=observers)
        assert tr.status == "loss" and tr["c"].dtype == F32
        assert am.balancedness_verdict(tr["c"], tr["scale"], 100 * tr.config["rtol"]).passed


def test_htf_in_float32():
    tree = gf.ModeTree.binary(4)
    dims = (3,) * 4
    truth = gf.random_htf_tensor(jr.key(5), dims, tree, (2, 2), 3.0)
    objective = gf.Completion.from_tensor(truth, gf.sample_indices(jr.key(6), dims, 60))
    model = gf.HTF.gaussian(jr.key(7), dims, tree, 4, 0.4, dtype=F32)
    observers = {"gaps": lambda t, m, o: ah.squared_norm_gaps(m),
                 "scale": lambda t, m, o: ah.vector_scale(m),
                 "identity": lambda t, m, o: ah.identity_residual(m, o)}
    tr = gf.flow(model, objective, t1=1e6, loss_drop=1e-3, observers=observers)
    assert tr.status == "loss"
    assert ah.conservation_verdict(tr["gaps"], tr["scale"], 100 * tr.config["rtol"]).passed
    assert float(np.max(tr["identity"])) < 1e-3  # float32 rounding of dP/dt's two forms


def test_float32_rtol_below_resolution_is_refused():
    model = gf.CP.gaussian(jr.key(0), (3, 3, 3), 3, 0.1, dtype=F32)
    objective = gf.Completion.from_tensor(gf.random_cp_tensor(jr.key(1), (3, 3, 3), 2),
                                          gf.sample_indices(jr.key(2), (3, 3, 3), 10))
    with pytest.raises(ValueError, match="`rtol`.*float32"):
        gf.flow(model, objective, t1=1.0, rtol=1e-8)


def test_gradflow_float32_environment():
    code = (
        "import jax.numpy as jnp, jax.random as jr, gradflow as gf\n"
        "import jax; assert not jax.config.jax_enable_x64\n"
        "dims = (4, 4, 4)\n"
        "o = gf.Completion.from_tensor(gf.random_cp_tensor(jr.key(0), dims, 2),\n"
        "                              gf.sample_indices(jr.key(1), dims, 30))\n"
        "m = gf.CP.gaussian(jr.key(2), dims, 8, 0.1, dtype=jnp.float32)\n"
        "tr = gf.flow(m, o, t1=1e6, loss_drop=1e-3)\n"
        "end = gf.final_state(m, o, t1=1e6, loss_drop=1e-3)\n"
        "print(tr.status, tr.config['dtype'], bool(end.ok), end.t.dtype)\n")
    env = dict(os.environ, GRADFLOW_FLOAT32="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["loss", "float32", "True", "float32"]


def test_sweep_and_descent_in_float32():
    # a compiled sweep of float32 members equals float32 flows of the same members, and
    # Optax descent keeps float32 and follows the flow's loss down
    dims = (4, 4, 4)
    truth = gf.random_cp_tensor(jr.key(6), dims, 2)
    objective = gf.Completion.from_tensor(truth, gf.sample_indices(jr.key(7), dims, 40))

    def problem(params):
        return gf.CP.gaussian(jr.key(params["seed"]), dims, 6, params["scale"], dtype=F32), \
            objective

    grid = {"scale": [0.3, 0.1], "seed": [1]}
    result = gf.sweep(problem, grid, t1=1e6, loss_drop=1e-3, observers=["loss"])
    assert list(result.status) == ["loss", "loss"] and result.final["loss"].dtype == F32
    for i, scale in enumerate(grid["scale"]):
        tr = gf.flow(*problem({"scale": scale, "seed": 1}), t1=1e6, loss_drop=1e-3)
        np.testing.assert_allclose(result.t_final[i], tr.t_final, rtol=1e-3)
    model = problem({"scale": 0.3, "seed": 1})[0]
    tr = gf.descent(model, objective, 0.05, steps=200, save_every=50)
    assert tr.model.factors[0].dtype == F32 and tr["loss"].dtype == F32
    assert np.all(np.diff(np.asarray(tr["loss"])) < 0)
