"""Nothing silent, continued: random invalid inputs through the entry points that
tests/test_inputs.py does not drive (DeepMatrix, HTF and DiagonalNet constructors,
Sensing, Trajectory/SweepResult files, the analysis verdicts) get a `ValueError` or
`TypeError` whose message names the argument, never a silent success (hypothesis,
>= 200 examples each). Constructors and validation only: nothing is solved."""

import math
import re
import zipfile

import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import gradflow as gf
from gradflow.analysis import cp as acp
from gradflow.analysis import descent as adesc
from gradflow.analysis import diagonal as ad
from gradflow.analysis import htf as ah
from gradflow.analysis import matrix as am
from gradflow.analysis import verdict as av

EXAMPLES = settings(max_examples=200, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.function_scoped_fixture])

nonfinite = st.sampled_from([math.nan, math.inf, -math.inf])
negative = st.one_of(st.floats(max_value=-1e-12, allow_nan=False, allow_infinity=False),
                     st.integers(max_value=-1))
nonpositive = st.one_of(st.floats(max_value=0.0, allow_nan=False), st.integers(max_value=0))
not_a_number = st.sampled_from(["1.0", "abc", {"a": 1}, 1j, 1.0 + 2j, b"1"])
bad_std = st.one_of(negative, nonfinite, not_a_number)  # std = 0 is allowed (a zero init)
bad_positive = st.one_of(nonpositive, nonfinite, not_a_number)
bad_tolerance = st.one_of(bad_positive, st.sampled_from([[1.0, 2.0], np.ones(2)]))  # None: default
bad_int = st.one_of(st.integers(max_value=0), st.floats(allow_nan=True),
                    st.sampled_from([True, False, "3", [3], 2.5, None]))
bad_dtype = st.sampled_from([jnp.complex64, jnp.complex128, np.complex64, jnp.int32, "int8",
                             np.int64, jnp.bfloat16, jnp.float16, bool, None, "abc", "complex64",
                             3, 2.5, object])
bad_dims = st.one_of(
    st.lists(st.integers(max_value=0), min_size=2, max_size=4),
    st.lists(st.floats(min_value=1.1, max_value=9.9), min_size=2, max_size=3),
    st.sampled_from([(3,), (), "33", 3, (3, True), None, (3, "3")]))


def _names(message: str, name: str) -> bool:
    return re.search(rf"`{re.escape(name)}[`\[ (]", message) is not None


def _refused(call, name):
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    assert _names(str(info.value), name), (name, str(info.value))


# --- model constructors -----------------------------------------------------------------


@EXAMPLES
@given(st.sampled_from(["dims", "std", "dtype", "det_sign", "end_scale"]), st.data())
def test_deep_matrix_gaussian_refuses_invalid_arguments(name, data):
    value = data.draw({"dims": bad_dims, "std": bad_std, "dtype": bad_dtype,
                       "det_sign": st.sampled_from([0, 2, -2, True, "1", 1.5, [1]]),
                       "end_scale": bad_positive}[name])
    kwargs = dict(dims=(3, 3, 3), std=0.1) | {name: value}
    _refused(lambda: gf.DeepMatrix.gaussian(jr.key(0), **kwargs), name)


@EXAMPLES
@given(st.sampled_from(["orthogonal", "uniform", "balanced", "identity"]), st.sampled_from(
    ["dims", "scale", "dtype"]), st.data())
def test_other_deep_matrix_constructors_refuse_invalid_arguments(constructor, name, data):
    size = {"orthogonal": "scale", "uniform": "bound", "balanced": "end", "identity": "alpha"}
    name = size[constructor] if name == "scale" else name
    if constructor == "identity" and name == "dims":
        name = "d"
    value = data.draw({"dims": bad_dims, "d": bad_int, "dtype": bad_dtype,
                       "scale": bad_std, "bound": bad_std, "alpha": bad_positive,
                       "end": st.sampled_from([[[math.nan, 0.0], [0.0, 1.0]], "ab", 3.0,
                                               [[1.0, 2.0]], 1j * np.eye(2)])}[name])
    if constructor == "identity":
        kwargs = dict(d=2, depth=3, alpha=0.5) | {name: value}
        call = lambda: gf.DeepMatrix.identity(**kwargs)
    elif constructor == "balanced":
        kwargs = dict(dims=(2, 3, 2), end=np.eye(2)) | {name: value}
        call = lambda: gf.DeepMatrix.balanced(jr.key(0), **kwargs)
    else:
        kwargs = dict(dims=(2, 3, 2), **{size[constructor]: 0.1}) | {name: value}
        call = lambda: getattr(gf.DeepMatrix, constructor)(jr.key(0), **kwargs)
    _refused(call, name)


@EXAMPLES
@given(st.sampled_from(["gaussian", "balanced"]),
       st.sampled_from(["dims", "tree", "widths", "std", "dtype"]), st.data())
def test_htf_constructors_refuse_invalid_arguments(constructor, name, data):
    scale = "std" if constructor == "gaussian" else "scale"
    value = data.draw({
        "dims": st.one_of(bad_dims, st.just((3, 3, 3)), st.just((3, 3, 3, 3, 3))),  # 4 modes
        "tree": st.sampled_from(["binary", 4, None, (0, 1), gf.ModeTree]),
        "widths": st.one_of(st.integers(max_value=0), st.sampled_from(
            [2.5, True, "2", None, (2,), (2, 2, 2, 2), (2, 0, 2), (2, 2.0, 2)])),
        "std": bad_std, "dtype": bad_dtype}[name])
    name = scale if name == "std" else name
    kwargs = dict(dims=(3, 3, 3, 3), tree=gf.ModeTree.binary(4), widths=2,
                  **{scale: 0.1}) | {name: value}
    _refused(lambda: getattr(gf.HTF, constructor)(jr.key(0), **kwargs), name)


@EXAMPLES
@given(st.sampled_from(["uniform", "gaussian", "init"]),
       st.sampled_from(["d", "scale", "depth", "dtype"]), st.data())
def test_diagonal_net_constructors_refuse_invalid_arguments(constructor, name, data):
    if constructor == "init":  # DiagonalNet(u, v, depth)
        name = {"d": "u", "scale": "v", "dtype": "u"}.get(name, name)
        value = data.draw({
            "u": st.sampled_from([jnp.ones((2, 3)), jnp.ones(0), jnp.ones(3, int),
                                  jnp.ones(3, jnp.complex64), jnp.ones(()),
                                  jnp.ones(3, jnp.float32)]),
            "v": st.sampled_from([jnp.ones(4), jnp.ones((3, 1)), jnp.ones(3, int)]),
            "depth": bad_int.filter(lambda v: v is not None) | st.just(1)}[name])
        kwargs = dict(u=jnp.ones(3), v=jnp.ones(3), depth=2) | {name: value}
        if name == "u" and getattr(value, "dtype", None) == jnp.float32:
            name = "u` and `v"  # same shape, other dtype than v: the message names both
            _refused(lambda: gf.DiagonalNet(**kwargs), "u")
            return
        _refused(lambda: gf.DiagonalNet(**kwargs), name)
        return
    scale = "alpha" if constructor == "uniform" else "std"
    name = scale if name == "scale" else name
    value = data.draw({"d": bad_int, "alpha": st.one_of(bad_positive, st.just([0.1, 0.2])),
                       "std": bad_positive, "depth": bad_int | st.just(1),
                       "dtype": bad_dtype}[name])
    kwargs = dict(d=3, depth=2, **{scale: 0.1}) | {name: value}
    if constructor == "uniform":
        _refused(lambda: gf.DiagonalNet.uniform(**kwargs), name)
    else:
        _refused(lambda: gf.DiagonalNet.gaussian(jr.key(0), **kwargs), name)


# --- objectives ---------------------------------------------------------------------------


@EXAMPLES
@given(st.sampled_from(["operators", "values", "loss"]), st.data())
def test_sensing_refuses_invalid_arguments(name, data):
    value = data.draw({
        "operators": st.sampled_from([jnp.ones((0, 3)), jnp.ones(3), jnp.ones((2, 0)),
                                      jnp.full((2, 3), jnp.nan), jnp.full((2, 3), jnp.inf),
                                      jnp.ones((2, 3), jnp.complex128), "abc"]),
        "values": st.one_of(st.sampled_from([jnp.ones(3), jnp.ones((2, 1)), jnp.ones(0),
                                             jnp.array([1.0, jnp.nan]), jnp.array([jnp.inf, 1.0]),
                                             jnp.ones(2, jnp.complex128), "ab"]),
                            st.lists(nonfinite, min_size=2, max_size=2)),
        "loss": st.sampled_from([0.5, "huber", "squared", gf.SquaredLoss, 3, [gf.SquaredLoss()]]),
    }[name])
    kwargs = dict(operators=jnp.ones((2, 3)), values=jnp.ones(2)) | {name: value}
    _refused(lambda: gf.Sensing(**kwargs), name)


# --- files --------------------------------------------------------------------------------


def _bad_file(tmp_path, kind):
    """A path that is not a file `save` wrote: missing, a folder, text, truncated, ..."""
    path = tmp_path / f"{kind}.npz"
    if kind == "folder":
        path.mkdir(exist_ok=True)
    elif kind == "text":
        path.write_text("not a trajectory")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("ts.npy", b"x" * 100)
        path.write_bytes(path.read_bytes()[:30])
    elif kind == "npy":
        np.save(path.with_suffix(".npy"), np.ones(3))
        path = path.with_suffix(".npy")
    elif kind == "other_npz":
        np.savez(path, a=np.ones(3))
    return path


FILE_KINDS = ["missing", "folder", "text", "empty", "truncated", "npy", "other_npz"]


@EXAMPLES
@given(st.one_of(st.sampled_from(FILE_KINDS), st.sampled_from([3, None, 2.5, b"x.npz", ["a"]])))
def test_trajectory_load_refuses_what_is_not_a_trajectory(tmp_path_factory, kind):
    path = (_bad_file(tmp_path_factory.mktemp("tr"), kind) if isinstance(kind, str)
            and kind in FILE_KINDS else kind)
    _refused(lambda: gf.Trajectory.load(path), "path")


def _bad_sweep(tmp_path, kind):
    out = tmp_path / "sweep"
    if kind == "missing":
        return out
    if kind == "file":
        out.write_text("x")
        return out
    out.mkdir()
    chunk = out / "chunk_00000.npz"
    if kind == "bad_config":
        (out / "config.json").write_text("{not json")
    elif kind == "config_list":
        (out / "config.json").write_text("[1, 2]")
    else:
        (out / "config.json").write_text('{"save_times": [0.0, 1.0]}')
    if kind == "corrupt_chunk":
        chunk.write_bytes(b"PK\x03\x04 truncated")
    elif kind == "chunk_missing_keys":
        np.savez(chunk, members=np.arange(2))
    elif kind == "only_temporary_and_lock_files":
        (out / ".chunk_00000.npz.123.abc.tmp").write_bytes(b"x")
        (out / ".chunk_00000.npz.lock").write_text('{"pid": 1}')
    return out


SWEEP_KINDS = ["missing", "file", "empty_folder", "bad_config", "config_list", "corrupt_chunk",
               "chunk_missing_keys", "only_temporary_and_lock_files"]


@EXAMPLES
@given(st.one_of(st.sampled_from(SWEEP_KINDS), st.sampled_from([3, None, 2.5, b"out", ["a"]])))
def test_sweep_result_load_refuses_what_is_not_a_sweep(tmp_path_factory, kind):
    out = (_bad_sweep(tmp_path_factory.mktemp("sw"), kind) if isinstance(kind, str)
           and kind in SWEEP_KINDS else kind)
    _refused(lambda: gf.SweepResult.load(out), "out")


# --- analysis verdicts ---------------------------------------------------------------------

GOOD = {  # verdict -> (the arrays it judges, their names)
    "cp": (acp.conservation_verdict, [np.ones((4, 3, 2))], ["squared_norms"]),
    "matrix": (am.balancedness_verdict, [np.ones((4, 5)), np.ones(4)], ["imbalances", "scales"]),
    "htf": (ah.conservation_verdict, [np.ones((4, 5)), np.ones(4)], ["gaps", "scales"]),
    "diagonal": (ad.conservation_verdict, [np.ones((4, 3))], ["saved"]),
}


def _bad_array(good):
    """Arrays that are not saves of the shape `good` has."""
    return st.sampled_from([
        np.ones(good.shape[:-1]) if good.ndim > 1 else np.ones((2, 2)),  # an axis short
        np.ones(good.shape + (2,)),  # an axis too many
        np.ones((0,) + good.shape[1:]),  # no saves
        1j * np.ones(good.shape),  # complex
        np.full(good.shape, "a"),  # not numbers
        np.ones(good.shape, bool),
        "abc", None, 3.0,
    ])


@EXAMPLES
@given(st.sampled_from(sorted(GOOD)), st.sampled_from(["tolerance", "rtol", "array"]),
       st.data())
def test_conservation_verdicts_refuse_invalid_arguments(model, name, data):
    verdict, arrays, names = GOOD[model]
    arrays = list(arrays)
    kwargs = {}
    if name == "array":
        i = data.draw(st.integers(0, len(arrays) - 1))
        arrays[i] = data.draw(_bad_array(arrays[i]))
        name = names[i]
    else:
        kwargs[name] = data.draw(bad_tolerance)
    _refused(lambda: verdict(*arrays, **kwargs), name)


@EXAMPLES
@given(st.sampled_from(sorted(GOOD)), st.floats(1e-12, 1e-1), st.floats(1e-12, 1e-1))
def test_conservation_verdicts_refuse_both_tolerance_and_rtol(model, tolerance, rtol):
    verdict, arrays, _ = GOOD[model]
    _refused(lambda: verdict(*arrays, tolerance, rtol=rtol), "tolerance")
    assert verdict(*arrays, tolerance).tolerance == tolerance
    assert verdict(*arrays, rtol=rtol).tolerance == pytest.approx(av.DRIFT_PER_RTOL * rtol)


@EXAMPLES
@given(st.sampled_from(["rtol", "dtype"]), st.data())
def test_drift_tolerance_refuses_invalid_arguments(name, data):
    value = data.draw({"rtol": bad_tolerance, "dtype": bad_dtype.filter(
        lambda d: d is not None)}[name])
    _refused(lambda: av.drift_tolerance(**{name: value}), name)


@EXAMPLES
@given(st.sampled_from(["values", "tolerance", "excesses", "order_tolerance"]), st.data())
def test_other_verdicts_refuse_invalid_arguments(name, data):
    if name == "values":
        value = data.draw(st.sampled_from([[], np.ones((0, 3)), "abc", None, [1j], ["a"],
                                           [[1.0], [1.0, 2.0]]]))
        _refused(lambda: av.worst("x", value, 1.0), "values")
    elif name == "tolerance":
        value = data.draw(st.one_of(negative, nonfinite, not_a_number))
        _refused(lambda: av.worst("x", [1.0], value), "tolerance")
    elif name == "excesses":
        value = data.draw(_bad_array(np.ones(4)))
        _refused(lambda: ah.rank_bound_verdict(value), "excesses")
    else:
        value = data.draw(bad_tolerance)
        _refused(lambda: adesc.order_verdict([0.1, 0.05], [1e-2, 5e-3], tolerance=value),
                 "tolerance")


# --- a number given as an array, and arrays given as None or a string --------------------
# (once silent or unnamed: `std=[1.0, 2.0]` broadcast, `DeepMatrix.identity` built
# diag(alpha); now every "a number" argument goes through `_validate.check_scalar`)

NOT_A_NUMBER = {
    "DeepMatrix.gaussian(std=[...])": (lambda: gf.DeepMatrix.gaussian(
        jr.key(0), (3, 3, 3), [1.0, 2.0]), "std"),
    "DeepMatrix.gaussian(end_scale=[...])": (lambda: gf.DeepMatrix.gaussian(
        jr.key(0), (3, 3, 3), 0.1, end_scale=[1.0, 2.0]), "end_scale"),
    "DeepMatrix.orthogonal(scale=[...])": (lambda: gf.DeepMatrix.orthogonal(
        jr.key(0), (2, 3, 2), [1.0, 2.0]), "scale"),
    "DeepMatrix.uniform(bound=[...])": (lambda: gf.DeepMatrix.uniform(
        jr.key(0), (2, 3, 2), [1.0, 2.0]), "bound"),
    "DeepMatrix.identity(alpha=[...]) (silent: diag(alpha))": (lambda: gf.DeepMatrix.identity(
        2, 3, [1.0, 2.0]), "alpha"),
    "HTF.gaussian(std=[...])": (lambda: gf.HTF.gaussian(
        jr.key(0), (3, 3, 3, 3), gf.ModeTree.binary(4), 2, [1.0, 2.0]), "std"),
    "HTF.balanced(scale=[...])": (lambda: gf.HTF.balanced(
        jr.key(0), (3, 3, 3, 3), gf.ModeTree.binary(4), 2, [1.0, 2.0]), "scale"),
    "DiagonalNet.gaussian(std=[...])": (lambda: gf.DiagonalNet.gaussian(
        jr.key(0), 3, [1.0, 2.0]), "std"),
    "DiagonalNet(u='abc')": (lambda: gf.DiagonalNet("abc", jnp.ones(3)), "u"),
    "Sensing(operators=None)": (lambda: gf.Sensing(None, jnp.ones(2)), "operators"),
    "Sensing(values=None)": (lambda: gf.Sensing(jnp.ones((2, 3)), None), "values"),
    "DiagonalNet(v=None)": (lambda: gf.DiagonalNet(jnp.ones(3), None), "v"),
    "CP.gaussian(std=[...])": (lambda: gf.CP.gaussian(jr.key(0), (3, 3), 2, [1.0, 2.0]), "std"),
    "CP.gaussian(mean=[...])": (lambda: gf.CP.gaussian(
        jr.key(0), (3, 3), 2, 0.1, mean=[1.0, 2.0]), "mean"),
    "Sensing.gaussian(std=[...])": (lambda: gf.Sensing.gaussian(
        jr.key(0), jnp.ones((2, 2)), 3, std=[1.0, 2.0]), "std"),
    "random_cp_tensor(norm=[...])": (lambda: gf.random_cp_tensor(
        jr.key(0), (3, 3), 2, norm=[1.0, 2.0]), "norm"),
}


@pytest.mark.parametrize("case", sorted(NOT_A_NUMBER))
def test_a_number_given_as_an_array_or_an_array_as_none_is_refused(case):
    call, name = NOT_A_NUMBER[case]
    _refused(call, name)
