"""A number, the tolerance it is held to, and whether it passes."""

import dataclasses

import jax.numpy as jnp
import numpy as np

from .._solve import DEFAULT_RTOL
from .._validate import check_float_dtype, check_positive_number, check_saved

DRIFT_PER_RTOL = 100
"""Conservation verdicts allow a drift of this many `rtol`s by default."""


def drift_tolerance(rtol: float | None = None, dtype=np.float64) -> float:
    """The default tolerance of the conservation verdicts: `DRIFT_PER_RTOL` × `rtol`,
    `rtol` by default the library's default for `dtype` (1e-8 for float64, 1e-5 for
    float32). A solve's conserved quantities drift by its accumulated local errors,
    each at most `rtol` relative: measured 1.5–30 × `rtol` over hundreds to thousands
    of steps at rtol 1e-10 … 1e-4, so 100 × passes every exact run at that `rtol` and
    fails a run ~100× less accurate (e.g. rtol 1e-4 judged at the default 1e-8).
    Pass the `rtol` a trajectory was solved at (`trajectory.config["rtol"]`) to judge
    it by its own accuracy.

    **Raises:** `ValueError`/`TypeError` naming `rtol` (not a finite number > 0) or
    `dtype` (not float32 or float64)."""
    dtype = check_float_dtype("dtype", dtype)
    if rtol is None:
        rtol = DEFAULT_RTOL[dtype]
    return DRIFT_PER_RTOL * check_positive_number("rtol", rtol)


def verdict_tolerance(tolerance, rtol, dtype) -> float:
    """A conservation verdict's tolerance: `tolerance` if given (a finite number > 0),
    else `drift_tolerance(rtol, dtype)`;
    giving both is an error (one would be ignored)."""
    if tolerance is None:
        return drift_tolerance(rtol, dtype)
    if rtol is not None:
        raise ValueError("Give `tolerance` or `rtol`, not both: the tolerance is "
                         "drift_tolerance(rtol) when `tolerance` is not given.")
    return check_positive_number("tolerance", tolerance)


def relative_max(diff, reference):
    """$\\max|$`diff`$| / \\max|$`reference`$|$: a residual relative to the size of what it
    is a residual of (unscaled when `reference` is all zero)."""
    scale = jnp.max(jnp.abs(reference))
    return jnp.max(jnp.abs(diff), initial=0.0) / jnp.where(scale > 0, scale, 1.0)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The worst value of a residual along a trajectory against its tolerance.

    **Fields:** `name`, `value` (worst residual), `tolerance`, `passed`
    (`value <= tolerance`, False when `value` is not finite), `detail` (free text).
    """

    name: str
    value: float
    tolerance: float
    detail: str = ""

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.value) and self.value <= self.tolerance)

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        mark = "PASS" if self.passed else "FAIL"
        extra = f" ({self.detail})" if self.detail else ""
        return f"{mark} {self.name}: {self.value:.3g} <= {self.tolerance:.3g}{extra}"


def worst(name: str, values, tolerance: float, detail: str = "") -> Verdict:
    """Verdict on the largest entry of `values` (NaN counts as a failure).

    **Raises:** `ValueError`/`TypeError` naming `values` (not real numbers, or none)
    or `tolerance` (not a finite number >= 0)."""
    tolerance = check_positive_number("tolerance", tolerance, allow_zero=True)
    arr = check_saved("values", values, "(n, ...)").astype(float)
    value = float(np.nanmax(arr))
    if np.isnan(arr).any():
        value = float("nan")
    return Verdict(name, value, tolerance, detail)
