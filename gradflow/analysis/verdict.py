"""A number, the tolerance it is held to, and whether it passes."""

import dataclasses

import jax.numpy as jnp
import numpy as np


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
