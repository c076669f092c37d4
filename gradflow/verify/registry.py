"""Theorem checks: a registry of small objects, and the runner behind `gradflow verify`."""

import dataclasses
import time
import zlib
from collections.abc import Callable
from typing import Any

import jax.random as jr
import numpy as np

from .._flow import flow
from ..trajectory import Trajectory


@dataclasses.dataclass
class Case:
    """One random instance of a check: what to integrate, and anything the residual needs.

    **Fields:** `model`, `objective`, `flow` (keyword arguments of
    [`gradflow.flow`][]: `t1`, `observers`, `save_times`, stops, tolerances, solver),
    `description` (shapes and scales, shown for the worst case), `extra` (free).
    """

    model: Any
    objective: Any
    flow: dict
    description: str = ""
    extra: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Check:
    """A theorem check.

    **Fields:**

    - `name`: a short unique id (`"cp-lemma1"`).
    - `statement`: the statement checked, one line, with its THEORY.md section.
    - `preconditions`: when the statement applies (how the instances are drawn).
    - `draw`: `key -> Case`, a random instance.
    - `residual`: `(trajectory, case) -> float`, the worst residual along the flow;
      the check passes when it is finite and at most `tolerance`.
    - `tolerance`: the bound the residual is held to.
    """

    name: str
    statement: str
    preconditions: str
    draw: Callable[[Any], Case]
    residual: Callable[[Trajectory, Case], float]
    tolerance: float


CHECKS: dict[str, Check] = {}
"""Every registered check by name; `gradflow verify` runs them all by default."""


def register(check: Check) -> Check:
    """Add `check` to [`gradflow.verify.CHECKS`][] (a name already taken is an error)."""
    if not isinstance(check, Check):
        raise TypeError(f"`check` must be a gradflow.verify.Check, got {check!r}.")
    if check.name in CHECKS:
        raise ValueError(f"`check.name`: a check named {check.name!r} is already registered.")
    CHECKS[check.name] = check
    return check


@dataclasses.dataclass(frozen=True)
class Result:
    """The outcome of one check over its cases (`error` holds the first exception text)."""

    name: str
    statement: str
    cases: int
    worst: float
    tolerance: float
    worst_case: str
    seconds: float
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and bool(np.isfinite(self.worst) and self.worst <= self.tolerance)


def run_check(check: Check, cases: int = 3, seed: int = 0) -> Result:
    """Draw `cases` instances of `check`, integrate each, and keep the worst residual.

    Instance `k` uses the key `fold_in(key(seed), crc32(name) + k)`, so a run is
    reproducible and adding checks does not change the instances of others. A solve
    that fails, or a residual that raises, fails the check with the error's text.
    """
    if not isinstance(cases, int) or cases < 1:
        raise ValueError(f"`cases` must be a positive int, got {cases!r}.")
    start = time.perf_counter()
    worst, worst_case = -np.inf, ""
    for k in range(cases):
        key = jr.fold_in(jr.key(seed), zlib.crc32(check.name.encode()) + k)
        description = f"case {k}"
        try:
            case = check.draw(key)
            description = f"case {k}: {case.description}"
            trajectory = flow(case.model, case.objective, **case.flow)
            value = float(check.residual(trajectory, case))
        except Exception as error:  # a check that cannot run is a failed check
            return Result(check.name, check.statement, k + 1, float("nan"), check.tolerance,
                          description, time.perf_counter() - start,
                          f"{type(error).__name__}: {error}")
        if not np.isfinite(value) or value > worst:
            worst, worst_case = value, description
        if not np.isfinite(value):
            break
    return Result(check.name, check.statement, cases, float(worst), check.tolerance,
                  worst_case, time.perf_counter() - start)


def run_checks(names=None, cases: int = 3, seed: int = 0, on_result=None) -> list[Result]:
    """Run the named checks (all registered ones by default) in registration order.

    **Arguments:**

    - `names`: check names, or None for all of [`gradflow.verify.CHECKS`][].
    - `cases`: random instances per check.
    - `seed`: the seed of every instance.
    - `on_result`: called with each [`gradflow.verify.Result`][] as it finishes.

    **Returns:** the list of results.
    """
    if names is None:
        names = list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise ValueError(f"`names`: unknown checks {unknown}; known: {sorted(CHECKS)}.")
    results = []
    for name in names:
        result = run_check(CHECKS[name], cases, seed)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def format_row(result: Result) -> str:
    """One line of the verdict table."""
    verdict = "PASS" if result.passed else ("ERROR" if result.error else "FAIL")
    return (f"{result.name:<26} {result.cases:>5} {result.worst:>11.3g} "
            f"{result.tolerance:>9.1g}  {verdict:<5} {result.seconds:>6.1f}s")


HEADER = f"{'check':<26} {'cases':>5} {'worst':>11} {'tolerance':>9}  {'':<5} {'time':>7}"
