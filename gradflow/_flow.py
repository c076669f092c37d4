"""Integrate the gradient-flow ODE dθ/dt = −∇φ(θ) with Diffrax.

[`gradflow.flow`][] observes a trajectory and returns a NumPy
[`gradflow.Trajectory`][]; [`gradflow.final_state`][] returns the final time and
model as JAX arrays, so it works under `jax.grad`, `jax.jit` and `jax.vmap`. Both
build and run the same solve (`gradflow._solve`).
"""

import time
import warnings
from typing import Any, NamedTuple

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from . import _solve
from . import observers as _observers
from ._progress import LogTimeProgressMeter
from ._status import LABELS, Status
from ._validate import check_int, check_positive_number, runtime_message
from .models.base import AbstractFactorization
from .objectives import AbstractObjective
from .trajectory import Trajectory


class FlowError(RuntimeError):
    """A solve that did not finish: raised by [`gradflow.flow`][] and
    [`gradflow.descent`][] (with `throw=True`, their default) when it hits
    `max_steps`, becomes non-finite or its step size underflows.

    **Arguments:**

    - `trajectory`: the partial [`gradflow.Trajectory`][], up to where the solve
      stopped; its `status` and `reason` say why.
    - `message`: the text of the error (by default, built from the trajectory).

    **Attributes:** `trajectory`, the same partial trajectory, so that the work done
    is not lost (`except gf.FlowError as error: error.trajectory`).
    """

    def __init__(self, trajectory: Trajectory, message: str | None = None):
        self.trajectory = trajectory
        if message is None:
            message = (
                f"gradient flow did not finish: {trajectory.reason} "
                f"(t = {trajectory.t_final:.6g}, {trajectory.stats['steps']} steps). "
                "The partial trajectory is in `error.trajectory`; pass `throw=False` to "
                "get it returned instead."
            )
        super().__init__(message)


def default_save_times(t1: float, num: int = 256) -> np.ndarray:
    """The save times [`gradflow.flow`][] uses when none are given.

    **Arguments:**

    - `t1`: the final time (> 0).
    - `num`: how many save times.

    **Returns:** a NumPy array of `num` times: 0, then `num - 1` geometrically spaced
    times from `t1`·1e-8 to `t1` (the escapes from a small init happen on a
    logarithmic time scale).

    **Raises:** `ValueError`/`TypeError` naming `t1` (not a finite number > 0) or
    `num` (not an int >= 1).
    """
    t1 = check_positive_number("t1", t1)
    num = check_int("num", num)
    return np.concatenate([[0.0], np.geomspace(t1 * 1e-8, t1, num - 1)])


def flow(
    model: AbstractFactorization,
    objective: AbstractObjective,
    *,
    t1: float,
    loss_tol: float | None = None,
    loss_drop: float | None = None,
    radius: float | None = None,
    save_times=None,
    observers=None,
    solver: dfx.AbstractSolver | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int = 100_000,
    progress: bool = False,
    throw: bool = True,
) -> Trajectory:
    """Integrate gradient flow from `model` on `objective` and observe it.

    Stops at the first of: physical time `t1`; loss below `loss_tol` (or below
    `loss_drop` times the initial loss); Frobenius norm of the end tensor reaching
    `radius` (its hitting time is located by a root find on the solver's dense
    output). A stop already met by the initial model ends the solve at t = 0.

    **Arguments:**

    - `model`: the initial factorization (e.g. `gradflow.CP.gaussian(...)`), float64
      or float32.
    - `objective`: a `Completion` or `Sensing` objective of the same shape (cast to
      the model's dtype).
    - `t1`: final physical time (> 0).
    - `loss_tol`: stop when the loss drops below this value.
    - `loss_drop`: or stop when it drops below this fraction of the initial loss.
    - `radius`: stop when the Frobenius norm $\\|\\mathcal W\\|$ of the end tensor
      reaches `radius` (Theorem 2's reference sphere).
    - `save_times`: physical times at which observers are recorded; by default 0 and
      a geometric grid up to `t1` ([`gradflow.default_save_times`][]). The state
      where the solve ended is always appended as the last save.
    - `observers`: names from `gradflow.observers.BY_NAME`, callables
      `(t, model, objective) -> pytree`, or a `{name: callable}` dict. Default:
      loss, component norms and end-tensor norm.
    - `solver`: any Diffrax adaptive solver; default [`gradflow.default_solver`][]
      (a Rosenbrock-W method whose cost stays nearly flat as the init scale shrinks).
    - `rtol`, `atol`: step-size control tolerances. `rtol` defaults to 1e-8 (1e-5
      for float32 weights) and must be at least 10 machine epsilons; `atol`
      defaults to `rtol` times the RMS of the initial weights, so small inits are
      resolved, not skipped.
    - `max_steps`: the most solver steps before the solve is declared failed.
    - `progress`: show a progress bar (in log physical time) on the terminal.
    - `throw`: raise [`gradflow.FlowError`][] (carrying the partial trajectory) if
      the solve does not finish; with `False` the trajectory is returned with its
      `status` saying why.

    **Returns:** a [`gradflow.Trajectory`][].
    """
    problem = _solve.build(model, objective, t1=t1, loss_tol=loss_tol, loss_drop=loss_drop,
                           radius=radius, rtol=rtol, atol=atol, solver=solver,
                           max_steps=max_steps)
    save_times = _solve.check_save_times(
        default_save_times(float(t1)) if save_times is None else save_times, t1)
    observers = _observers.resolve(observers, problem.model, problem.objective)
    meter = None
    if progress:
        meter = LogTimeProgressMeter(float(t1), float(save_times[1] if save_times.size > 1
                                                      else t1))
    start = time.perf_counter()
    try:
        out = _observed(problem, jnp.asarray(_padded(save_times), problem.time_dtype),
                        observers, meter)
        jax.block_until_ready(out)
    except eqx.EquinoxRuntimeError as error:  # a check of the inputs, run in the solve
        raise ValueError(runtime_message(error)) from None
    wall = time.perf_counter() - start

    (saved, final), (saved_ts, _) = out.observed, out.observed_ts
    saved = jax.tree.map(lambda x: x[: save_times.size], saved)
    saved_ts = saved_ts[: save_times.size]
    t_final = float(out.t)
    keep = np.asarray(saved_ts) <= t_final
    saved_ts = np.asarray(saved_ts)[keep]
    observations = jax.tree.map(lambda x: np.asarray(x)[keep], saved)
    final = jax.tree.map(lambda x: np.asarray(x[0]), final)
    if saved_ts.size == 0 or t_final > saved_ts[-1]:  # the trajectory ends where the solve did
        saved_ts = np.append(saved_ts, t_final)
        observations = jax.tree.map(lambda v, f: np.concatenate([v, f[None]]), observations, final)
    steps = int(out.stats["num_steps"])
    trajectory = Trajectory(
        ts=saved_ts,
        observations=observations,
        t_final=t_final,
        final=final,
        model=out.model,
        status=Status(int(out.status)).label,
        stats={
            "steps": steps,
            "accepted_steps": int(out.stats["num_accepted_steps"]),
            "rejected_steps": int(out.stats["num_rejected_steps"]),
            "gradient_evaluations": gradient_evaluations(problem.solver, out.stats),
            "wall_time": wall,
            **{k: v.item() for k, v in jax.device_get(out.stats).items()
               if not k.startswith("num_")},
        },
        config={
            "solver": type(problem.solver).__name__,
            "t1": float(t1),
            "loss_tol": loss_tol,
            "loss_drop": loss_drop,
            "radius": radius,
            "rtol": float(problem.rtol),
            "atol": float(problem.atol),
            "max_steps": problem.max_steps,
            "dtype": str(problem.dtype),
        },
    )
    drift = trajectory.stats.get("conservation_drift")
    if drift is not None and not drift <= AccuracyWarning.threshold:
        warnings.warn(
            f"the model's conserved quantities drifted by {drift:.2g} (relative) during the "
            f"solve, at rtol {float(problem.rtol):g}: the trajectory is not the exact flow "
            "to this accuracy; lower `rtol`.", AccuracyWarning, stacklevel=2)
    if throw and not trajectory.ok:
        raise FlowError(trajectory)
    return trajectory


class AccuracyWarning(UserWarning):
    """Warned by [`gradflow.flow`][] when the solve visibly departed from the exact flow:
    the quantities gradient flow conserves (`AbstractFactorization.conserved`) drifted
    by more than `AccuracyWarning.threshold` (1e-3) relative to their scale
    (`trajectory.stats["conservation_drift"]`)."""

    threshold = 1e-3


def _padded(save_times: np.ndarray) -> np.ndarray:
    """`save_times` repeated at its last time up to the next power of two (at least 8),
    so that flows with different numbers of saves share one compiled solve (their extra
    saves are dropped)."""
    size = max(8, 1 << (save_times.size - 1).bit_length())
    return np.concatenate([save_times, np.full(size - save_times.size, save_times[-1])])


def gradient_evaluations(solver, stats) -> int | None:
    """Gradient evaluations of a solve: per step of each kind when the solver counts
    them (rejected steps spread over the kinds in proportion), else per step."""
    steps = int(stats["num_steps"])
    if hasattr(solver, "evaluations"):
        accepted = sum(int(stats[k]) for k in solver.evaluations)
        per_step = sum(n * int(stats[k]) for k, n in solver.evaluations.items())
        return round(per_step * steps / max(accepted, 1)) + 1
    per_step = getattr(solver, "evaluations_per_step", None)
    tableau = getattr(solver, "tableau", None)
    if per_step is None and isinstance(tableau, dfx.ButcherTableau) and tableau.a_diagonal is None:
        # Diffrax's explicit Runge-Kutta methods (Tsit5, Dopri5, Dopri8, ...): one
        # evaluation per stage, the first reused from the last step when FSAL (an
        # implicit or multi-tableau method is not counted)
        per_step = len(tableau.b_sol) - int(tableau.fsal)
    return None if per_step is None else per_step * steps + 1


@eqx.filter_jit
def _observed(problem, save_ts, observers, meter):
    return _solve.run(problem, save_ts, observers, progress=meter)


STATUSES = LABELS
"""The labels of `Status` in code order (kept for code written against earlier versions)."""


class FinalState(NamedTuple):
    """What [`gradflow.final_state`][] returns: JAX arrays, batched under `jax.vmap`.

    **Fields:**

    - `t`: the physical time at which the solve ended: `t1`, or the time at which a
      stop (loss or radius) fired, located by a root find on the dense output.
    - `model`: the model at time `t`.
    - `status`: a [`gradflow.Status`][] code: 0 `"t1"`, 1 `"loss"`, 2 `"radius"`
      (finished), 3 `"max_steps"`, 4 `"non_finite"`, 5 `"step_underflow"`,
      6 `"failed"`; `FinalState.STATUSES[code]` is its label.
    """

    t: Float[Array, ""]
    model: Any
    status: Int[Array, ""]

    STATUSES = LABELS

    @property
    def ok(self) -> Array:
        """True where the solve finished (`status` is `"t1"`, `"loss"` or `"radius"`)."""
        return self.status <= Status.RADIUS


def final_state(
    model: AbstractFactorization,
    objective: AbstractObjective,
    *,
    t1: float | Array,
    loss_tol: float | Array | None = None,
    loss_drop: float | Array | None = None,
    radius: float | Array | None = None,
    solver: dfx.AbstractSolver | None = None,
    rtol: float | Array | None = None,
    atol: float | Array | None = None,
    max_steps: int = 100_000,
    adjoint: dfx.AbstractAdjoint | None = None,
    throw: bool = True,
) -> FinalState:
    r"""The end of the gradient flow, as a JAX function of its inputs.

    The same solve as [`gradflow.flow`][] (same solvers, tolerances and stops) without
    observers or Python-side bookkeeping, so it can be transformed: `jax.grad`,
    `jax.jvp`, `jax.jit`, `jax.vmap`. Differentiate any functional of the end state —
    the final loss, reconstruction error, an observer $o(t,\theta,\phi)$ at the end
    time, or the stop time itself — with respect to the initial weights (and so the
    initialization scale) and the objective (its observed values).

    **Derivatives.** Reverse mode goes through the solver's steps
    (`diffrax.RecursiveCheckpointAdjoint`, Diffrax's default; pass
    `adjoint=diffrax.ForwardMode()` for `jax.jvp`/`jax.jacfwd`, cheaper for a few
    scalar inputs). They are derivatives of the discretized solve: the step sizes
    are held fixed (Diffrax stops their gradient), so they agree with the exact
    derivative to about the solve's accuracy — use a tight `rtol`. When a stop
    fires, the derivative of its time comes from the implicit function theorem on
    the root find, $\partial t^*=-\partial_\theta m/\partial_t m$ for the stop
    margin $m$ (Optimistix's implicit adjoint); this is singular where the flow
    crosses the stop tangentially. With [`gradflow.RosenbrockW`][] the approximate
    Jacobian $W$ is held constant under differentiation: the method's order does
    not depend on $W$, and differentiating an eigendecomposition with repeated
    eigenvalues would give NaNs.

    **Inputs.** Concrete arguments are checked as in [`gradflow.flow`][]; traced
    ones (under `jit`, `vmap`, `grad`) are checked when the program runs, and an
    invalid one (a negative or NaN `t1`, say) raises a runtime error naming it.

    **Failure.** With `throw=True` an unfinished solve (max_steps, non-finite state,
    step-size underflow) raises a `RuntimeError` naming the reason when the program
    runs: `equinox.EquinoxRuntimeError` eagerly or under `eqx.filter_jit`,
    `jax.errors.JaxRuntimeError` carrying the same message under `jax.jit`; under
    `jax.vmap` if any member failed (Equinox's `EQX_ON_ERROR` environment variable
    can turn this into NaNs instead). With `throw=False` nothing is raised and
    `status` says what happened: check `.ok` before trusting `t` and `model`.

    **Arguments:**

    - `model`, `objective`, `t1`, `loss_tol`, `loss_drop`, `radius`, `solver`, `rtol`,
      `atol`, `max_steps`: as in [`gradflow.flow`][]. Numbers may be traced arrays
      (one compilation serves many values); `loss_tol`, `loss_drop` and `radius` only
      switch their stop on when not `None`. The default `atol` (`rtol` × RMS of the
      initial weights) carries no gradient.
    - `adjoint`: how Diffrax differentiates the solve; `None` for its default.
    - `throw`: raise on an unfinished solve (see above).

    **Returns:** a [`gradflow.FinalState`][] `(t, model, status)`.

    !!! Example

        ```python
        import jax
        import gradflow as gf

        def hitting_time(alpha):  # time for ||W|| to reach 1 from init scale alpha
            model = gf.CP(tuple(alpha * u for u in directions))
            return gf.final_state(model, objective, t1=1e6, radius=1.0, rtol=1e-10).t

        jax.grad(hitting_time)(0.05)
        ```
    """
    problem = _solve.build(model, objective, t1=t1, loss_tol=loss_tol, loss_drop=loss_drop,
                           radius=radius, rtol=rtol, atol=atol, solver=solver,
                           max_steps=max_steps)
    return _final_state(problem, adjoint=adjoint, throw=throw)


@eqx.filter_jit
def _final_state(problem, *, adjoint, throw) -> FinalState:
    out = _solve.run(problem, adjoint=dfx.RecursiveCheckpointAdjoint() if adjoint is None
                     else adjoint)
    t, model = out.t, out.model
    if throw:
        messages = [f"gradient flow did not finish: {s.message}." for s in Status]
        t, model = eqx.branched_error_if((t, model), out.status > Status.RADIUS, out.status,
                                         messages)
    return FinalState(t, model, out.status)



def flow_through_escape(model, objective, *, escape_norm, loss_tol, t1, observers, saves,
                        **solve) -> tuple[Trajectory, float]:
    """Gradient flow in two legs, so that the short learning phase is finely saved.

    From a small init the flow sits on a plateau for a time that grows like a power
    of 1/init, then learns everything in a far shorter time (an HTF of width 32,
    std 1e-2: plateau 2.8e9, learning 1.1e5). One geometric save grid over the whole
    solve puts the learning phase between two saves. So the first leg runs until the
    end tensor's norm reaches `escape_norm` (a `radius` stop), and the second
    restarts from there (its clock reset to 0, so its geometric save grid is dense
    where learning happens) until `loss_tol`. A W-method or Runge-Kutta solve
    restarted at a state is the same flow, so the legs join into one trajectory in
    physical time.

    **Arguments:**

    - `model`, `objective`: as in [`gradflow.flow`][].
    - `escape_norm`: the end-tensor norm at which the first leg ends.
    - `loss_tol`, `t1`, `observers`: as in [`gradflow.flow`][], for both legs.
    - `saves`: the size of each leg's save grid (0, then geometric from 1e-2 to `t1`).
    - `**solve`: any other setting of [`gradflow.flow`][] (`rtol`, `solver`,
      `max_steps`, `progress`, ...); both legs run with `throw=False`.

    **Returns:** `(trajectory, t_escape)`, with `t_escape` the end of the first leg
    (0 when the init's norm is already above `escape_norm`). The trajectory's
    `config` holds `t_escape` and `escape_norm` when there were two legs.
    """
    # Both legs have the same stops, save-grid size, t1 and observers, so the second
    # reuses the first's compiled solve (the radius of the second never fires).
    grid = np.concatenate([[0.0], np.geomspace(1e-2, t1, saves - 1)])
    kwargs: dict[str, Any] = dict(t1=t1, loss_tol=loss_tol, save_times=grid,
                                  observers=observers, throw=False, **solve)
    first = None
    if float(model.norm()) < escape_norm:
        first = flow(model, objective, radius=escape_norm, **kwargs)
        if first.status != "radius":  # stopped at the loss, or did not finish
            return first, first.t_final
        model = first.model
    second = flow(model, objective, radius=float(np.finfo(np.float64).max), **kwargs)
    if first is None:
        return second, 0.0
    return _join_legs(first, second), first.t_final


def _join_legs(first: Trajectory, second: Trajectory) -> Trajectory:
    """`second` continued from the end of `first`, in `first`'s clock."""
    offset = first.t_final
    cat = lambda a, b: np.concatenate([np.asarray(a)[:-1], np.asarray(b)])
    stats = {k: (first.stats[k] + second.stats[k]
                 if first.stats.get(k) is not None and second.stats.get(k) is not None
                 else None) for k in second.stats}
    return Trajectory(
        ts=cat(first.ts, offset + np.asarray(second.ts)),
        observations=jax.tree.map(cat, first.observations, second.observations),
        t_final=offset + second.t_final,
        final=second.final,
        model=second.model,
        status=second.status,
        stats=stats,
        config=second.config | {"t1": first.config["t1"], "t_escape": offset,
                                "escape_norm": first.config["radius"]},
    )
