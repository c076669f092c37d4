"""Argument validation shared by every public entry point.

Concrete values are checked at once and refused with a `ValueError`/`TypeError` that
names the argument. Traced values (inside `jit`, `vmap`, a sweep) cannot be read in
Python: the checks that need them return a `Pending` check, which the solve turns
into an `equinox.error_if` at run time, so they are never skipped silently.
"""

import math
import numbers
import os

import equinox as eqx
import jax
from jax.core import Tracer
import jax.numpy as jnp
import numpy as np


def concrete(x):
    """`x` as a NumPy array, or None when it is traced."""
    if isinstance(x, Tracer):
        return None
    return np.asarray(x)


class Pending(eqx.Module):
    """A check of a traced value, done at run time: `ok` must hold, else `message`."""

    ok: jax.Array
    message: str = eqx.field(static=True)


def enforce(tree, pending):
    """`tree`, with every pending check applied (`equinox.error_if` on its arrays)."""
    for check in pending:
        tree = eqx.error_if(tree, ~check.ok, check.message)
    return tree


def check_finite(name: str, x) -> list[Pending]:
    """`x` (a number or array) real and finite."""
    if isinstance(x, (str, bytes)) or x is None:
        raise ArgumentTypeError(f"`{name}` must be real numbers, got {x!r}.")
    arr = concrete(x)
    if arr is None:
        return [Pending(jnp.all(jnp.isfinite(x)), f"`{name}` must be finite.")]
    if np.iscomplexobj(arr):
        raise ArgumentTypeError(f"`{name}` must be real, got complex values (dtype {arr.dtype}).")
    if arr.dtype != bool and not np.issubdtype(arr.dtype, np.number):
        raise ArgumentTypeError(f"`{name}` must be real numbers, got dtype {arr.dtype}.")
    if not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"`{name}` must be finite; it has {bad} non-finite value(s).")
    return []


def check_scalar(name: str, x) -> None:
    """`x` is one number: a Python or NumPy number or an array without axes (traced
    or not), not a string, None, a sequence or an array with axes. Every argument a
    docstring calls "a number" or "a scalar" (an init's `std`, `scale`, `alpha`, a
    tolerance) is checked with it, so that `std=[1.0, 2.0]` is refused, not broadcast."""
    if isinstance(x, (str, bytes)) or x is None:
        raise ArgumentTypeError(f"`{name}` must be a number, got {x!r}.")
    try:
        ndim = np.ndim(x)
    except (TypeError, ValueError):  # a ragged sequence
        raise ArgumentTypeError(f"`{name}` must be a number, got {x!r}.") from None
    if ndim != 0:
        raise ValueError(f"`{name}` must be a number (a scalar), got {_brief(x)}.")


def check_number(name: str, x) -> list[Pending]:
    """`x` one real, finite number (see `check_scalar`; traced: checked at run time)."""
    check_scalar(name, x)
    return check_finite(name, x)


def check_positive(name: str, x, *, allow_zero: bool = False, below=None,
                   scalar: bool = False) -> list[Pending]:
    """`x` (a number or array; one number, see `check_scalar`, if `scalar`) finite and
    > 0 (>= 0 with `allow_zero`), and < `below`."""
    if scalar:
        check_scalar(name, x)
    bound = "must be >= 0" if allow_zero else "must be > 0"
    if below is not None:
        bound += f" and < {below}"
    arr = concrete(x)
    if arr is None:
        ok = jnp.isfinite(x) & ((x >= 0) if allow_zero else (x > 0))
        if below is not None:
            ok = ok & (x < below)
        return [Pending(jnp.all(ok), f"`{name}` {bound} (a traced value, checked at run time).")]
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.number)):
        raise TypeError(f"`{name}` must be a real number, got {x!r}.")
    if np.iscomplexobj(arr):
        raise TypeError(f"`{name}` must be real, got a complex value {x!r}.")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"`{name}` must be finite, got {_show(arr)}.")
    bad = (arr < 0) if allow_zero else (arr <= 0)
    if below is not None:
        bad = bad | (arr >= below)
    if np.any(bad):
        raise ValueError(f"`{name}` {bound}, got {_show(arr)}.")
    return []


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type: a `TypeError`, and a `ValueError` for code that
    catches bad arguments as values."""


def as_array(name: str, x) -> jax.Array:
    """`x` as a JAX array (traced or not); None, a string, or anything JAX cannot convert
    (ragged lists, objects) is refused naming `name`."""
    if x is None or isinstance(x, (str, bytes)):
        raise ArgumentTypeError(f"`{name}` must be an array of numbers, got {x!r}.")
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError) as error:
        raise ArgumentTypeError(f"`{name}` must be an array of numbers, got "
                                f"{type(x).__name__} ({error}).") from None


def check_int(name: str, x, *, minimum: int = 1) -> int:
    """`x` as a Python int >= `minimum` (NumPy integers accepted; bools and floats not)."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral):
        raise ArgumentTypeError(f"`{name}` must be an int >= {minimum}, got {x!r}.")
    if int(x) < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {int(x)}.")
    return int(x)


def check_dims(name: str, dims, *, min_len: int = 1) -> tuple[int, ...]:
    """A sequence of positive ints (NumPy integers accepted; floats and bools not)."""
    if isinstance(dims, (str, bytes)) or not hasattr(dims, "__iter__"):
        raise ArgumentTypeError(f"`{name}` must be a sequence of positive ints, got {dims!r}.")
    dims = tuple(dims)
    if any(isinstance(d, (bool, np.bool_)) or not isinstance(d, numbers.Integral) for d in dims):
        raise ArgumentTypeError(f"`{name}` must be a sequence of positive ints, got {dims!r}.")
    dims = tuple(int(d) for d in dims)
    if len(dims) < min_len or any(d < 1 for d in dims):
        raise ValueError(f"`{name}` must be at least {min_len} positive int(s), got {dims!r}.")
    return dims


def check_float_dtype(name: str, tree) -> jnp.dtype:
    """The one real floating dtype of every array in `tree` (weights, values), or
    `tree` itself when it is a dtype (a constructor's `dtype` argument): float32 or
    float64, else a `TypeError` naming `name`."""
    if _is_dtype_like(tree):
        try:
            dtype = jnp.dtype(tree)
        except TypeError:
            raise ArgumentTypeError(
                f"`{name}` must be a floating-point dtype (jnp.float64 or jnp.float32), "
                f"got {tree!r}.") from None
        if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
            raise ArgumentTypeError(
                f"`{name}` must be a real floating-point dtype (jnp.float64 or jnp.float32), "
                f"got {dtype}.")
        return dtype
    if tree is None:
        raise ArgumentTypeError(f"`{name}` must be float32 or float64 (a dtype, or arrays of "
                                "one), got None.")
    leaves = [x for x in jax.tree.leaves(tree) if eqx.is_array(x)]
    if not leaves:
        raise ValueError(f"`{name}` has no arrays.")
    dtypes = {jnp.dtype(x.dtype) for x in leaves}
    for dtype in dtypes:
        if not jnp.issubdtype(dtype, jnp.floating):
            kind = "complex" if jnp.issubdtype(dtype, jnp.complexfloating) else str(dtype)
            raise TypeError(
                f"`{name}` must hold real floating-point arrays (float32 or float64), got "
                f"{kind}; build it with `dtype=jnp.float64` (or jnp.float32)."
            )
    if len(dtypes) > 1:
        raise TypeError(f"`{name}` mixes dtypes {sorted(map(str, dtypes))}; use one.")
    (dtype,) = dtypes
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        raise TypeError(f"`{name}` must be float32 or float64, got {dtype}.")
    return dtype


def check_nonempty(name: str, tree) -> None:
    """Every array of `tree` has at least one entry."""
    for x in jax.tree.leaves(tree):
        if eqx.is_array(x) and math.prod(x.shape) == 0:
            raise ValueError(f"`{name}` has an empty weight array (shape {tuple(x.shape)}).")


def _is_dtype_like(x) -> bool:
    return isinstance(x, (str, type, np.dtype))


def check_positive_number(name: str, x, *, allow_zero: bool = False) -> float:
    """A concrete, finite number > 0 (>= 0 with `allow_zero`), as a float (a verdict's
    tolerance, the `rtol` it is derived from, the `t1` of NumPy save times)."""
    if concrete(x) is None:
        raise ArgumentTypeError(f"`{name}` must be a concrete number, not a traced value.")
    check_positive(name, x, allow_zero=allow_zero, scalar=True)
    return float(np.asarray(x))


def check_saved(name: str, x, shape: str, *, ndim: int | None = None,
                nonempty: tuple = ()) -> np.ndarray:
    """Values saved along a trajectory (a verdict's input) as a real NumPy array of
    `ndim` axes (any number, at least one value, when None) described by `shape`
    (e.g. `"(T, N, R)"`), with at least one save and no empty axis among `nonempty`.
    float32 stays float32 (a verdict's default tolerance follows the dtype); other
    real numbers become float64."""
    if isinstance(x, (str, bytes)) or x is None:
        raise ArgumentTypeError(f"`{name}` must be an array of shape {shape}, got {x!r}.")
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError) as error:  # ragged lists
        raise ValueError(f"`{name}` must be an array of shape {shape}: {error}") from None
    if np.iscomplexobj(arr):
        raise ArgumentTypeError(f"`{name}` must be real, got dtype {arr.dtype}.")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise ArgumentTypeError(f"`{name}` must be an array of numbers of shape {shape}, got "
                                f"dtype {arr.dtype}.")
    if ndim is None:
        arr = np.atleast_1d(arr)
        if arr.size == 0:
            raise ValueError(f"`{name}` is empty (shape {arr.shape}): a verdict needs at "
                             "least one value.")
    elif arr.ndim != ndim:
        raise ValueError(f"`{name}` must have shape {shape}, got shape {arr.shape}.")
    elif arr.shape[0] < 1:
        raise ValueError(f"`{name}` has no saves (shape {arr.shape}); it must have shape "
                         f"{shape} with T >= 1.")
    for axis in nonempty:
        if arr.shape[axis] < 1:
            raise ValueError(f"`{name}` must have shape {shape} with no empty axis, got shape "
                             f"{arr.shape}.")
    return arr if arr.dtype == np.float32 else arr.astype(np.float64)


def runtime_message(error: Exception, names: dict | None = None) -> str:
    """The short message of a failed run-time check (an `equinox.EquinoxRuntimeError`,
    whose text is long: the check's message, then Equinox's advice), with each
    `` `name` `` of `names` renamed (a sweep's grid axis: `` `grid['rtol']` ``)."""
    text = str(error)
    first = next((line for line in text.splitlines() if "`" in line), text).strip()
    first = first.split("EquinoxRuntimeError: ", 1)[-1]
    for old, new in (names or {}).items():
        first = first.replace(f"`{old}`", f"`{new}`")
    return first


def check_path(name: str, path, *, kind: str = "file"):
    """`path` as a `pathlib.Path` that exists and is a `kind` ("file" or "folder")."""
    from pathlib import Path

    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)):
        raise ArgumentTypeError(f"`{name}` must be a path (str or os.PathLike), got "
                                f"{type(path).__name__}.")
    path = Path(path)
    if not path.exists():
        raise ValueError(f"`{name}`: {path} does not exist.")
    if kind == "file" and not path.is_file():
        raise ValueError(f"`{name}`: {path} is not a file.")
    if kind == "folder" and not path.is_dir():
        raise ValueError(f"`{name}`: {path} is not a folder.")
    return path


def _brief(x) -> str:
    """`x` for a message: its repr, or its shape when that would be long."""
    text = repr(x)
    return text if len(text) <= 60 else f"an array of shape {np.shape(x)}"


def _show(arr: np.ndarray) -> str:
    return repr(arr.item()) if arr.size == 1 else np.array2string(arr, threshold=8)
