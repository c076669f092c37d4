"""Argument validation shared by models, objectives and the flow."""

import jax
import numpy as np


def concrete(x):
    """`x` as a NumPy array, or None when it is traced (validation then is skipped)."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def check_finite(name: str, x) -> None:
    arr = concrete(x)
    if arr is not None and not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(f"`{name}` must be finite; it has {bad} non-finite value(s).")


def check_positive(name: str, x, *, allow_zero: bool = False) -> None:
    arr = concrete(x)
    if arr is None:
        return
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"`{name}` must be finite, got {arr}.")
    if allow_zero and np.any(arr < 0):
        raise ValueError(f"`{name}` must be >= 0, got {arr}.")
    if not allow_zero and np.any(arr <= 0):
        raise ValueError(f"`{name}` must be > 0, got {arr}.")


def check_dims(name: str, dims, *, min_len: int = 1) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in dims)
    except TypeError:
        raise ValueError(f"`{name}` must be a sequence of positive ints, got {dims!r}.")
    if len(dims) < min_len or any(d < 1 for d in dims):
        raise ValueError(
            f"`{name}` must be at least {min_len} positive int(s), got {dims!r}."
        )
    return dims
