"""A number, the tolerance it is held to, and whether it passes."""

import dataclasses

import jax.numpy as jnp
import numpy as np

from .._solve import DEFAULT_RTOL

DRIFT_PER_RTOL = 100
"""Conservation verdicts allow a drift of this many `rtol`s by default."""


def drift_tolerance(rtol: float | None = None, dtype=jnp.float64) -> float:
    """The default tolerance of the conservation verdicts: `DRIFT_PER_RTOL` × `rtol`,
    `rtol` by default the library's default for `dtype` (1e-8 for float64, 1e-5 for
    float32). A solve's conserved quantities drift by its accumulated local errors,
    each at most `rtol` relative: measured 1.5–30 × `rtol` over hundreds to thousands
    of steps at rtol 1e-10 … 1e-4, so 100 × passes every exact run at that `rtol` and
    fails a run ~100× less accurate (e.g. rtol 1e-4 judged at the default 1e-8).
    Pass the `rtol` a trajectory was solved at (`trajectory.config["rtol"]`) to judge
    it by its own accuracy."""
    if rtol is None:
        rtol = DEFAULT_RTOL[jnp.dtype(dtype)]
    return DRIFT_PER_RTOL * float(rtol)


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
    """Verdict on the largest entry of `values` (NaN counts as a failure)."""
    arr = np.asarray(values, dtype=float)
    value = float(np.nanmax(arr)) if arr.size else 0.0
    if arr.size and np.isnan(arr).any():
        value = float("nan")
    return Verdict(name, value, float(tolerance), detail)
