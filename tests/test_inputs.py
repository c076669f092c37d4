"""Nothing silent: random invalid inputs through every entry point get an error that names
the argument (hypothesis, >= 200 examples each), one validation path serves flow,
final_state and sweep, traced values are checked at run time, stops met at t = 0 stop
there, and files written by others (temporary, truncated) are never mistaken for results."""

import math
import re

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import gradflow as gf
from gradflow import _solve
from gradflow._validate import Pending

DIMS = (3, 3, 3)
TRUTH = gf.random_cp_tensor(jr.key(0), DIMS, 2)
OBJECTIVE = gf.Completion.from_tensor(TRUTH, gf.sample_indices(jr.key(1), DIMS, 12))
MODEL = gf.CP.gaussian(jr.key(2), DIMS, 4, 0.3)
SOLVER = dfx.Tsit5()
"""The solver of this module's solves: they test checks, stops and files, not the solver
(the default one is tested by every theory test), and Tsit5's programs compile faster."""
EXAMPLES = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

nonfinite = st.sampled_from([math.nan, math.inf, -math.inf])
not_a_number = st.sampled_from(["1.0", "abc", None, [1.0, 2.0], {"a": 1}, 1j, 1.0 + 2j])
nonpositive = st.one_of(st.floats(max_value=0.0, allow_nan=False), st.integers(max_value=0))
bad_positive = st.one_of(nonpositive, nonfinite, not_a_number.filter(lambda v: v is not None))
bad_int = st.one_of(st.integers(max_value=0), st.floats(allow_nan=True),
                    st.sampled_from([True, False, "3", [3], 2.5, None]))
bad_rtol = st.one_of(bad_positive, st.floats(min_value=1.0, max_value=1e6),
                     st.floats(min_value=1e-300, max_value=1e-16))
bad_save_times = st.one_of(
    st.lists(st.floats(min_value=-1e3, max_value=-1e-6), min_size=1, max_size=4),  # < 0
    st.lists(st.floats(min_value=11.0, max_value=1e9), min_size=1, max_size=4),  # > t1
    st.just([]), st.just([[0.0, 1.0]]), st.just([0.0, math.nan]), st.just([2.0, 1.0]),
    st.just("0 1"), st.just([0.0, 0.0]))

SETTINGS = {  # argument -> strategy of invalid values (t1 = 10 elsewhere)
    "t1": bad_positive,
    "loss_tol": bad_positive,
    "loss_drop": bad_positive,
    "radius": bad_positive,
    "rtol": bad_rtol,
    "atol": bad_positive,
    "max_steps": bad_int,
}


def _names(message: str, name: str) -> bool:
    return re.search(rf"`{re.escape(name)}[`\[ (]", message) is not None


def _refused(call, name):
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    assert _names(str(info.value), name), (name, str(info.value))


@st.composite
def bad_setting(draw, extra=()):
    names = sorted(SETTINGS) + [n for n, _ in extra]
    name = draw(st.sampled_from(names))
    strategy = SETTINGS[name] if name in SETTINGS else dict(extra)[name]
    return name, draw(strategy)


@EXAMPLES
@given(bad_setting(extra=[("save_times", bad_save_times),
                          ("observers", st.sampled_from([["nope"], [3], "loss!", [None]])),
                          ("solver", st.sampled_from(["tsit5", 3, dfx.Euler(), object()]))]))
def test_flow_refuses_invalid_arguments(case):
    name, value = case
    kwargs = dict(t1=10.0) | {name: value}
    if name == "loss_drop" and value is not None:
        kwargs.pop("loss_tol", None)
    _refused(lambda: gf.flow(MODEL, OBJECTIVE, **kwargs), name)


@EXAMPLES
@given(bad_setting())
def test_final_state_refuses_invalid_arguments(case):
    name, value = case
    _refused(lambda: gf.final_state(MODEL, OBJECTIVE, **(dict(t1=10.0) | {name: value})), name)


def _problem(params):
    return gf.CP.gaussian(jr.key(params["seed"]), DIMS, 4, params["scale"]), OBJECTIVE


@EXAMPLES
@given(bad_setting(extra=[("chunk_size", bad_int), ("order_by", st.sampled_from(["x", 3])),
                          ("save_times", bad_save_times)]))
def test_sweep_refuses_invalid_arguments(case):
    name, value = case
    grid = {"scale": [0.3, 0.1], "seed": [0]}
    _refused(lambda: gf.sweep(_problem, grid, **(dict(t1=10.0) | {name: value})), name)


@EXAMPLES
@given(st.sampled_from(["rtol", "atol", "loss_tol", "radius", "loss_drop"]),
       st.one_of(nonpositive.filter(lambda v: v == v), st.floats(min_value=-1e6, max_value=0.0)))
def test_sweep_refuses_invalid_grid_axes(name, value):
    grid = {"scale": [0.3], "seed": [0], name: [0.1, value]}
    _refused(lambda: gf.sweep(_problem, grid, t1=10.0), f"grid['{name}']")


@EXAMPLES
@given(st.sampled_from(["optimizer", "steps", "save_every", "t1", "loss_tol"]), st.data())
def test_descent_refuses_invalid_arguments(name, data):
    value = data.draw({"optimizer": st.one_of(nonpositive, nonfinite, st.sampled_from(
                           ["sgd", [0.1], jnp.ones(2), lambda g: g])),
                       "steps": bad_int, "save_every": bad_int.filter(lambda v: v is not None),
                       "t1": bad_positive, "loss_tol": bad_positive}[name])
    kwargs = dict(optimizer=0.01, steps=5) | {name: value}
    optimizer = kwargs.pop("optimizer")
    _refused(lambda: gf.descent(MODEL, OBJECTIVE, optimizer, **kwargs), name)


@EXAMPLES
@given(st.sampled_from(["dims", "rank", "std"]), st.data())
def test_cp_constructor_refuses_invalid_arguments(name, data):
    value = data.draw({"dims": st.one_of(
                           st.lists(st.integers(max_value=0), min_size=2, max_size=4),
                           st.lists(st.floats(min_value=1.1, max_value=9.9), min_size=2,
                                    max_size=3),
                           st.sampled_from([(3,), (), "33", 3, (3, True)])),
                       "rank": bad_int.filter(lambda v: v is not None),
                       "std": st.one_of(st.floats(max_value=-1e-9), nonfinite,
                                        st.sampled_from(["0.1", 1j]))}[name])
    kwargs = dict(dims=(3, 3), rank=2, std=0.1) | {name: value}
    _refused(lambda: gf.CP.gaussian(jr.key(0), **kwargs), name)


@EXAMPLES
@given(st.sampled_from(["shape", "indices", "values", "loss"]), st.data())
def test_completion_refuses_invalid_arguments(name, data):
    value = data.draw({"shape": st.sampled_from([(3, 0), (3, -1), (3, 2.5), "33", (), 3]),
                       "indices": st.sampled_from([[[0, 0, 3]], [[0, 0, -1]], [[0, 0]],
                                                   [[0.5, 0, 0]], np.zeros((0, 3), int),
                                                   [[1, 1, 1], [1, 1, 1]]]),
                       "values": st.sampled_from([[math.nan], [math.inf], [1.0, 2.0], [1j],
                                                  ["a"]]),
                       "loss": st.sampled_from([0.5, "huber", gf.SquaredLoss])}[name])
    kwargs = dict(shape=(3, 3, 3), indices=[[0, 1, 2]], values=[1.0]) | {name: value}
    _refused(lambda: gf.Completion(**kwargs), name)


@EXAMPLES
@given(st.sampled_from(["delta"]), st.one_of(nonpositive, nonfinite,
                                             st.sampled_from(["a", [1.0, 2.0], 1j])))
def test_huber_refuses_invalid_delta(name, value):
    _refused(lambda: gf.HuberLoss(value), name)


def test_one_validation_path_for_flow_final_state_and_sweep(monkeypatch):
    # A check added to `_solve.build` (here a run-time check: it holds for concrete and
    # traced `t1` alike) is enforced by flow, final_state, and every member of a sweep,
    # with `t1` a setting or a grid axis: all of them build their solve there. (The
    # sweep's up-front `check_settings` of its settings does not know this check.)
    original = _solve.build
    built = []

    def stricter(model, objective, **kw):
        problem = original(model, objective, **kw)
        built.append(problem)
        check = Pending(problem.t1 != 7.0, "`t1` = 7 is refused by this test's new check.")
        return eqx.tree_at(lambda p: p.pending, problem, problem.pending + (check,))

    monkeypatch.setattr(_solve, "build", stricter)
    problem = lambda params: _problem(params)  # a new function: the sweep traces anew
    calls = {
        "flow": lambda: gf.flow(MODEL, OBJECTIVE, t1=7.0, solver=SOLVER),
        "final_state": lambda: jax.block_until_ready(
            gf.final_state(MODEL, OBJECTIVE, t1=7.0, solver=SOLVER).t),
        "sweep": lambda: gf.sweep(problem, {"scale": [0.3], "seed": [0]}, t1=7.0, solver=SOLVER),
        "sweep, t1 a grid axis": lambda: gf.sweep(
            problem, {"scale": [0.3], "seed": [0], "t1": [5.0, 7.0]}, t1=10.0, solver=SOLVER),
    }
    for name, call in calls.items():
        before = len(built)
        with pytest.raises(Exception, match="new check"):
            call()
        assert len(built) > before, name
    assert gf.final_state(MODEL, OBJECTIVE, t1=6.0, solver=SOLVER).t == 6.0  # only t1 = 7 is refused


def test_traced_values_are_checked_at_run_time():
    run = jax.jit(lambda t1: gf.final_state(MODEL, OBJECTIVE, t1=t1, solver=SOLVER).t)
    assert float(run(1.0)) == 1.0
    for bad in (-1.0, math.nan):  # -1 would integrate backwards: gradient ascent
        with pytest.raises(Exception, match="`t1` must be > 0"):
            jax.block_until_ready(run(bad))
    sweep_nan = lambda params: (_nan_model(params), OBJECTIVE)
    with pytest.raises(Exception, match="must be finite"):
        gf.sweep(sweep_nan, {"scale": [0.3, 0.1]}, t1=10.0, solver=SOLVER)


def _nan_model(params):
    model = gf.CP.gaussian(jr.key(0), DIMS, 4, params["scale"])
    return eqx.tree_at(lambda m: m.factors[0], model,
                       model.factors[0].at[0, 0].set(jnp.where(params["scale"] < 0.2,
                                                               jnp.nan, 1.0)))


# Far from met: the other stop of the loss_tol and radius cases. Both stops are on in
# those cases and their values are traced (grid axes in the sweep), so the two cases share
# one compiled flow, final_state and sweep; loss_drop (a relative stop) is alone.
NOT_MET = {"loss_tol": 1e-12 * float(OBJECTIVE(MODEL)), "radius": 1e6 * float(MODEL.norm())}


@pytest.mark.parametrize("stop", ["loss_tol", "radius", "loss_drop"])
def test_a_stop_met_at_the_start_ends_the_solve_there(stop):
    value = {"loss_tol": 2.0 * float(OBJECTIVE(MODEL)), "radius": 0.5 * float(MODEL.norm()),
             "loss_drop": 1.5}[stop]
    stops = ({} if stop == "loss_drop" else dict(NOT_MET)) | {stop: value}
    tr = gf.flow(MODEL, OBJECTIVE, t1=10.0, solver=SOLVER, **stops)
    assert tr.status == ("radius" if stop == "radius" else "loss") and tr.t_final == 0.0
    assert tr.stats["steps"] == 0 and tr.ok
    end = gf.final_state(MODEL, OBJECTIVE, t1=10.0, solver=SOLVER, **stops)
    assert float(end.t) == 0.0 and bool(end.ok)
    grid = {"scale": [0.3], "seed": [2]} | {k: [v] for k, v in stops.items()}
    result = gf.sweep(_problem, grid, t1=10.0, solver=SOLVER)
    assert result.t_final[0] == 0.0 and list(result.status) == [tr.status]


def test_degenerate_and_ill_typed_inputs_are_refused():
    for call, name in [
        (lambda: gf.CP((jnp.ones((3, 0)), jnp.ones((3, 0)))), "factors"),
        (lambda: gf.CP((jnp.ones((0, 2)), jnp.ones((3, 2)))), "factors"),
        (lambda: gf.DeepMatrix([jnp.ones((0, 3)), jnp.ones((3, 0))]), "layers"),
        (lambda: gf.CP.gaussian(jr.key(0), (3, 3), True, 0.1), "rank"),
        (lambda: gf.CP.gaussian(jr.key(0), (3, 3.7), 2, 0.1), "dims"),
        (lambda: gf.Sensing(jnp.ones((0, 3)), jnp.ones(0)), "operators"),
        (lambda: gf.Sensing(jnp.ones((2, 3)), jnp.ones(2), loss=0.5), "loss"),
        (lambda: gf.flow(gf.CP(tuple(jnp.ones((3, 2), int) for _ in range(3))), OBJECTIVE,
                         t1=1.0), "model"),
        (lambda: gf.flow(gf.CP(tuple(jnp.ones((3, 2), jnp.complex128) for _ in range(3))),
                         OBJECTIVE, t1=1.0), "model"),
    ]:
        _refused(call, name)
    assert gf.CP.gaussian(jr.key(0), (3, 3), np.int64(2), 0.1).rank == 2
    # the default's value: the solve compiled once for the tests below
    assert gf.flow(MODEL, OBJECTIVE, t1=1.0, max_steps=np.int64(100_000), solver=SOLVER).ok


def test_an_initial_loss_that_overflows_is_refused():
    huge = gf.CP(tuple(1e120 * f for f in MODEL.factors))
    with pytest.raises(ValueError, match="loss at the initial model is not finite"):
        gf.flow(huge, OBJECTIVE, t1=1.0, solver=SOLVER)
    with pytest.raises(ValueError, match="loss at the initial model is not finite"):
        gf.descent(huge, OBJECTIVE, 0.1, steps=3)


def test_trajectory_load_checks_the_model(tmp_path):
    tr = gf.flow(MODEL, OBJECTIVE, t1=1.0, solver=SOLVER)
    path = tr.save(tmp_path / "tr.npz")
    assert isinstance(gf.Trajectory.load(path, like=MODEL).model, gf.CP)
    with pytest.raises(ValueError, match="`like`.*CP"):
        gf.Trajectory.load(path, like=gf.DeepMatrix.gaussian(jr.key(0), (3, 3, 3), 0.1))
    with pytest.raises(ValueError, match="`like`.*shapes"):
        gf.Trajectory.load(path, like=gf.CP.gaussian(jr.key(0), DIMS, 5, 0.1))


def _sweep(out, **kw):
    return gf.sweep(_problem, {"scale": [0.3, 0.2, 0.1], "seed": [0]}, t1=50.0,
                    loss_drop=1e-2, out=out, chunk_size=1, observers=["component_norms"],
                    save_times=np.linspace(0, 50, 6), solver=SOLVER, **kw)


def test_sweep_files_left_by_others_are_not_results(tmp_path):
    reference = _sweep(tmp_path / "ref")
    out = tmp_path / "run"
    _sweep(out)
    # a writer killed during a chunk write leaves a temporary file: never read as a chunk
    chunk = out / "chunk_00001.npz"
    (out / ".chunk_00001.npz.123.abc.tmp").write_bytes(chunk.read_bytes())
    (out / "chunk_00001.npz.tmp.npz").write_bytes(chunk.read_bytes()[:40])  # the old name
    again = gf.SweepResult.load(out)
    assert len(again) == len(reference) == 3
    np.testing.assert_array_equal(again.t_final, reference.t_final)
    # a truncated chunk: load names it; a resumed sweep recomputes it, with a warning
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(ValueError, match="chunk_00001.npz"):
        gf.SweepResult.load(out)
    with pytest.warns(UserWarning, match="chunk_00001.npz.*recomputing"):
        resumed = _sweep(out)
    np.testing.assert_array_equal(resumed.t_final, reference.t_final)
    np.testing.assert_array_equal(gf.SweepResult.load(out).steps, reference.steps)


def test_sweep_validates_before_writing(tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="`rtol`"):
        _sweep(out, rtol=-1.0)
    assert not out.exists()
    bad_shape = lambda p: (gf.CP.gaussian(jr.key(0), (3, 3), 4, p["scale"]), OBJECTIVE)
    with pytest.raises(ValueError, match=r"`model` has shape \(3, 3\)"):
        gf.sweep(bad_shape, {"scale": [0.3]}, t1=1.0, out=out)
    assert not out.exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="`out`"):
        _sweep(tmp_path / "file")


def test_two_writers_of_one_folder_agree(tmp_path):
    # Two sweeps of one configuration into one folder (unique temporary names, atomic
    # renames): both finish, and the folder holds each chunk once.
    out = tmp_path / "shared"
    first, second = _sweep(out), _sweep(out)
    np.testing.assert_array_equal(first.t_final, second.t_final)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["chunk_00000.npz", "chunk_00001.npz", "chunk_00002.npz", "config.json"]


def test_default_save_times_refuses_what_is_not_a_final_time():
    for bad in (-1.0, 0.0, math.nan, math.inf, "10", [1.0, 2.0]):
        _refused(lambda: gf.default_save_times(bad), "t1")
    for bad in (0, 2.5, True):
        _refused(lambda: gf.default_save_times(10.0, bad), "num")
    ts = gf.default_save_times(10.0, 5)
    assert ts[0] == 0 and ts[-1] == 10.0 and np.all(np.diff(ts) > 0)


def test_verdicts_refuse_meaningless_tolerances_and_shapes():
    from gradflow.analysis import cp as acp
    from gradflow.analysis import diagonal as ad
    from gradflow.analysis import htf as ah
    from gradflow.analysis import matrix as am

    sq = np.ones((3, 2, 2))
    # a negative tolerance or rtol was a silent FAIL ("0 <= -1"); a 2-d input an IndexError
    _refused(lambda: acp.conservation_verdict(sq, -1.0), "tolerance")
    _refused(lambda: acp.conservation_verdict(sq, rtol=-1), "rtol")
    _refused(lambda: acp.conservation_verdict(sq, rtol=math.nan), "rtol")
    _refused(lambda: acp.conservation_verdict(np.ones((3, 2))), "squared_norms")
    _refused(lambda: acp.conservation_verdict(np.ones((0, 2, 2))), "squared_norms")
    _refused(lambda: am.balancedness_verdict(np.ones((3, 4)), np.ones(2)), "scales")
    _refused(lambda: am.balancedness_verdict(np.ones(3), np.ones(3)), "imbalances")
    _refused(lambda: ah.conservation_verdict(np.ones((3, 4)), np.ones(3), 0.0), "tolerance")
    _refused(lambda: ah.rank_bound_verdict([]), "excesses")
    _refused(lambda: ad.conservation_verdict(np.ones((3, 2)), rtol=0.0), "rtol")
    _refused(lambda: ad.conservation_verdict(np.ones((3, 0))), "saved")
    _refused(lambda: gf.analysis.worst("x", [], 1.0), "values")
    _refused(lambda: gf.analysis.worst("x", [1.0], -1.0), "tolerance")
    _refused(lambda: acp.conservation_verdict(sq, 1e-3, rtol=1e-8), "tolerance")
    assert acp.conservation_verdict(sq).passed and acp.conservation_verdict(sq, rtol=1e-4)


@pytest.mark.parametrize("observer", ["squared_vector_norms", "gammas", "unbalancedness"])
def test_observers_that_do_not_apply_to_the_model_are_refused_at_setup(observer, tmp_path):
    model = gf.DeepMatrix.gaussian(jr.key(0), (3, 3, 3), 0.3)
    objective = gf.Completion.from_tensor(jnp.ones((3, 3)),
                                          gf.sample_indices(jr.key(1), (3, 3), 5))
    with pytest.raises(ValueError, match=rf"`observers`: '{observer}'.*DeepMatrix"):
        gf.flow(model, objective, t1=1.0, observers=[observer])
    problem = lambda p: (gf.DeepMatrix.gaussian(jr.key(0), (3, 3, 3), p["scale"]), objective)
    out = tmp_path / "never"
    with pytest.raises(ValueError, match=rf"`observers`: '{observer}'.*DeepMatrix"):
        gf.sweep(problem, {"scale": [0.3]}, t1=1.0, observers=[observer], out=out)
    assert not out.exists()
    # a user's observer that cannot read the model is named too
    with pytest.raises(ValueError, match=r"`observers`: 'mine'.*DeepMatrix"):
        gf.flow(model, objective, t1=1.0, observers={"mine": lambda t, m, o: m.factors[0]})


@pytest.mark.parametrize("dtype", [jnp.complex64, jnp.complex128, jnp.int32, jnp.bfloat16,
                                   "float16", None, "nope"])
def test_constructors_refuse_a_dtype_that_is_not_float32_or_float64(dtype):
    tree = gf.ModeTree.binary(4)
    for call in [
        lambda: gf.CP.gaussian(jr.key(0), DIMS, 2, 0.1, dtype=dtype),
        lambda: gf.CP.balanced(jr.key(0), DIMS, 2, 0.1, dtype=dtype),
        lambda: gf.DeepMatrix.gaussian(jr.key(0), (3, 3, 3), 0.1, dtype=dtype),
        lambda: gf.DeepMatrix.orthogonal(jr.key(0), (3, 3, 3), 0.1, dtype=dtype),
        lambda: gf.DeepMatrix.uniform(jr.key(0), (3, 3, 3), 0.1, dtype=dtype),
        lambda: gf.DeepMatrix.balanced(jr.key(0), dims=(3, 3, 3), end=np.eye(3), dtype=dtype),
        lambda: gf.DeepMatrix.identity(3, 2, 0.1, dtype=dtype),
        lambda: gf.HTF.gaussian(jr.key(0), (3,) * 4, tree, 2, 0.1, dtype=dtype),
        lambda: gf.HTF.balanced(jr.key(0), (3,) * 4, tree, 2, 0.1, dtype=dtype),
        lambda: gf.DiagonalNet.uniform(3, 0.1, dtype=dtype),
        lambda: gf.DiagonalNet.gaussian(jr.key(0), 3, 0.1, dtype=dtype),
    ]:
        _refused(call, "dtype")
    assert gf.CP.gaussian(jr.key(0), DIMS, 2, 0.1, dtype="float32").factors[0].dtype == jnp.float32


def test_a_runtime_check_in_a_sweep_member_is_a_short_error_naming_the_grid_axis():
    f32 = lambda p: (gf.CP.gaussian(jr.key(0), DIMS, 4, p["scale"], dtype=jnp.float32),
                     OBJECTIVE)
    # 1e-7 is fine in float64, not in float32 (standard promotion: see test_float32.py)
    with pytest.raises(ValueError) as info, jax.numpy_dtype_promotion("standard"):
        gf.sweep(f32, {"scale": [0.3], "rtol": [1e-3, 1e-7]}, t1=10.0, solver=SOLVER)
    message = str(info.value)
    assert message.startswith("`grid['rtol']` must be >= ") and "float32" in message
    assert "members [0, 1]" in message and len(message) < 300

    def overflows(p):
        model = gf.CP.gaussian(jr.key(0), DIMS, 4, p["scale"])
        return gf.CP(tuple(jnp.where(p["scale"] > 0.2, 1e120, 1.0) * f
                           for f in model.factors)), OBJECTIVE

    with pytest.raises(ValueError, match=r"^`objective`: the loss at the initial model is not "
                                         r"finite.*chunk 1.*members \[1\]"):
        gf.sweep(overflows, {"scale": [0.1, 0.3]}, t1=10.0, chunk_size=1, solver=SOLVER)


def test_a_corrupt_chunk_is_closed_after_failing_to_read(tmp_path):
    import gc
    import warnings

    (tmp_path / "config.json").write_text('{"save_times": [0.0, 1.0]}')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for data in (b"PK\x03\x04 not a zip", b"", b"\x93NUMPY"):
            (tmp_path / "chunk_00000.npz").write_bytes(data)
            with pytest.raises(ValueError, match="unreadable"):
                gf.SweepResult.load(tmp_path)
        gc.collect()  # one pass finalizes whatever the three reads left open
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
