"""`flow`: integrate the gradient-flow ODE dθ/dt = −∇φ(θ) with Diffrax."""

import time

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx

from . import observers as _observers
from ._checks import check_positive, concrete
from .models.base import AbstractAdditiveFactorization, AbstractFactorization
from .objectives import AbstractObjective
from .progress import LogTimeProgressMeter
from .solvers import RosenbrockW
from .trajectory import Trajectory
from .vector_field import vector_field


class FlowError(RuntimeError):
    """A solve that did not finish. `error.trajectory` holds what was computed."""

    def __init__(self, trajectory: Trajectory):
        self.trajectory = trajectory
        super().__init__(
            f"gradient flow did not finish: {trajectory.reason} "
            f"(t = {trajectory.t_final:.6g}, {trajectory.stats['steps']} steps). "
            "The partial trajectory is in `error.trajectory`; pass `throw=False` to "
            "get it returned instead."
        )


def default_solver(model: AbstractFactorization) -> dfx.AbstractSolver:
    """`RosenbrockW()` for additive models (CP), else Diffrax's `Tsit5()`."""
    if isinstance(model, AbstractAdditiveFactorization):
        return RosenbrockW()
    return dfx.Tsit5()


def default_save_times(t1: float, num: int = 256) -> np.ndarray:
    """0 followed by a geometric grid from `t1`·1e-8 to `t1`."""
    return np.concatenate([[0.0], np.geomspace(t1 * 1e-8, t1, num - 1)])


def flow(
    model: AbstractFactorization,
    objective: AbstractObjective,
    *,
    t1: float,
    loss_tol: float | None = None,
    radius: float | None = None,
    save_times=None,
    observers=None,
    solver: dfx.AbstractSolver | None = None,
    rtol: float = 1e-8,
    atol: float | None = None,
    max_steps: int = 100_000,
    progress: bool = False,
    throw: bool = True,
) -> Trajectory:
    """Integrate gradient flow from `model` on `objective` and observe it.

    Stops at the first of: physical time `t1`; loss below `loss_tol`; Frobenius norm
    of the end tensor reaching `radius` (its hitting time is located by a root
    find on the solver's dense output).

    **Arguments:**

    - `model`: the initial factorization (e.g. `gradflow.CP.gaussian(...)`).
    - `objective`: a `Completion` or `Sensing` objective of the same shape.
    - `t1`: final physical time (> 0).
    - `loss_tol`: stop when the loss drops below this value.
    - `radius`: stop when $\\|\\mathcal W\\| = $ `radius` is reached.
    - `save_times`: physical times at which observers are recorded; by default 0 and
      a geometric grid up to `t1` ([`gradflow.default_save_times`][]). The state
      where the solve ended is always appended as the last save.
    - `observers`: names from `gradflow.observers.BY_NAME`, callables
      `(t, model, objective) -> pytree`, or a `{name: callable}` dict. Default:
      loss, component norms and end-tensor norm.
    - `solver`: any Diffrax adaptive solver; default [`gradflow.default_solver`][]
      (a Rosenbrock-W method whose cost stays nearly flat as the init scale shrinks).
    - `rtol`, `atol`: step-size control tolerances. `atol` defaults to `rtol` times
      the RMS of the initial weights, so small inits are resolved, not skipped.
    - `max_steps`: the most solver steps before the solve is declared failed.
    - `progress`: show a progress bar (in log physical time) on the terminal.
    - `throw`: raise [`gradflow.FlowError`][] (carrying the partial trajectory) if
      the solve does not finish; with `False` the trajectory is returned with its
      `status` saying why.

    **Returns:** a [`gradflow.Trajectory`][].
    """
    if not isinstance(objective, AbstractObjective):
        raise TypeError(f"`objective` must be a gradflow objective, got {objective!r}.")
    objective.check_model(model)
    _check_weights(model)
    check_positive("t1", t1)
    for name, value in (("loss_tol", loss_tol), ("radius", radius)):
        if value is not None:
            check_positive(name, value)
    check_positive("rtol", rtol)
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"`max_steps` must be a positive int, got {max_steps!r}.")
    dtype = jax.tree.leaves(model)[0].dtype
    save_times = _check_save_times(
        default_save_times(float(t1)) if save_times is None else save_times, t1
    )
    if atol is None:
        flat = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(model)])
        atol = float(rtol) * float(jnp.sqrt(jnp.mean(flat**2)))
        atol = atol if atol > 0 else float(rtol)
    check_positive("atol", atol)
    solver = default_solver(model) if solver is None else solver
    observers = _observers.resolve(observers)
    stops = tuple(n for n, v in (("loss", loss_tol), ("radius", radius)) if v is not None)

    as_time = lambda x: jnp.asarray(x, dtype)
    start = time.perf_counter()
    ys, ts, result, stats = _solve(
        model,
        objective,
        as_time(t1),
        as_time(save_times),
        as_time(0.0 if loss_tol is None else loss_tol),
        as_time(0.0 if radius is None else radius),
        as_time(rtol),
        as_time(atol),
        solver=solver,
        observers=observers,
        stops=stops,
        max_steps=max_steps,
        progress=LogTimeProgressMeter(float(t1), float(save_times[1])) if progress else None,
    )
    jax.block_until_ready(ys)
    wall = time.perf_counter() - start

    saved, final, final_model = ys
    t_final = float(ts[1][0])
    keep = np.asarray(ts[0]) <= t_final
    final_model = jax.tree.map(lambda x: x[0], final_model)
    margins = _stop_margins(final_model, objective, loss_tol, radius, stops)
    status = _status(result, {k: float(v) for k, v in margins.items()}, final)
    evals_per_step = getattr(solver, "evaluations_per_step", None)
    steps = int(stats["num_steps"])
    saved_ts = np.asarray(ts[0])[keep]
    observations = jax.tree.map(lambda x: np.asarray(x)[keep], saved)
    final = jax.tree.map(lambda x: np.asarray(x[0]), final)
    if saved_ts.size == 0 or t_final > saved_ts[-1]:  # the trajectory ends where the solve did
        saved_ts = np.append(saved_ts, t_final)
        observations = jax.tree.map(lambda v, f: np.concatenate([v, f[None]]), observations, final)
    trajectory = Trajectory(
        ts=saved_ts,
        observations=observations,
        t_final=t_final,
        final=final,
        model=final_model,
        status=status,
        stats={
            "steps": steps,
            "accepted_steps": int(stats["num_accepted_steps"]),
            "rejected_steps": int(stats["num_rejected_steps"]),
            "gradient_evaluations": (
                None if evals_per_step is None else evals_per_step * steps + 1
            ),
            "wall_time": wall,
        },
        config={
            "solver": type(solver).__name__,
            "t1": float(t1),
            "loss_tol": loss_tol,
            "radius": radius,
            "rtol": float(rtol),
            "atol": float(atol),
            "max_steps": max_steps,
        },
    )
    if throw and not trajectory.ok:
        raise FlowError(trajectory)
    return trajectory


@eqx.filter_jit
def _solve(model, objective, t1, save_ts, loss_tol, radius, rtol, atol, *,
           solver, observers, stops, max_steps, progress):
    def observe(t, y, args):
        return {name: fn(t, y, args) for name, fn in observers.items()}

    event = None
    if stops:
        margin = lambda t, y, args, **kw: jnp.min(
            jnp.stack(list(_stop_margins(y, args, loss_tol, radius, stops).values()))
        )
        event = dfx.Event(margin, root_finder=_Bracketing(rtol=1e-13, atol=1e-300))
    saveat = dfx.SaveAt(
        subs=[
            dfx.SubSaveAt(ts=save_ts, fn=observe),
            dfx.SubSaveAt(t1=True, fn=observe),
            dfx.SubSaveAt(t1=True),
        ]
    )
    kwargs = {} if progress is None else {"progress_meter": progress}
    sol = dfx.diffeqsolve(
        dfx.ODETerm(vector_field),
        solver,
        jnp.zeros_like(t1),
        t1,
        None,
        model,
        objective,
        saveat=saveat,
        stepsize_controller=dfx.PIDController(rtol=rtol, atol=atol),
        max_steps=max_steps,
        event=event,
        throw=False,
        **kwargs,
    )
    return sol.ys, sol.ts, sol.result, sol.stats


def _stop_margins(model, objective, loss_tol, radius, stops) -> dict:
    """Relative distance to each stop condition; a stop fires when its margin hits 0."""
    margins = {}
    if "loss" in stops:
        margins["loss"] = objective(model) / loss_tol - 1.0
    if "radius" in stops:
        margins["radius"] = 1.0 - model.norm() / radius
    return margins


class _Bracketing(optx.Bisection):
    """Bisection of the stop time that ends on the bracket's width alone.

    Near a stop the loss can carry rounding noise far above 1e-12 of its value (the
    2×2 problem: residuals 1e-4 read off entries of size 1e4), which makes a test on
    the function value (Newton's, or Bisection's own) fail to terminate.
    """

    def terminate(self, fn, y, args, options, state, tags):
        width = jnp.abs(state.upper - state.lower)
        return width <= self.atol + self.rtol * jnp.abs(y), optx.RESULTS.successful


def _status(result, margins, final) -> str:
    finite = all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(final))
    if result == dfx.RESULTS.successful:
        return "t1" if finite else "non_finite"
    if result == dfx.RESULTS.event_occurred:
        return min(margins, key=margins.get) if margins else "failed"
    if not finite:
        return "non_finite"
    if result == dfx.RESULTS.max_steps_reached:
        return "max_steps"
    if result == dfx.RESULTS.dt_min_reached:
        return "step_underflow"
    return "failed"


def _check_weights(model) -> None:
    for leaf in jax.tree.leaves(model):
        arr = concrete(leaf)
        if arr is not None and not np.all(np.isfinite(arr)):
            raise ValueError("`model` has non-finite weights.")


def _check_save_times(save_times, t1) -> np.ndarray:
    ts = np.asarray(save_times, dtype=float)
    if ts.ndim != 1 or ts.size < 1:
        raise ValueError(f"`save_times` must be a non-empty 1-d array, got shape {ts.shape}.")
    if not np.all(np.isfinite(ts)) or ts[0] < 0 or ts[-1] > t1 or np.any(np.diff(ts) <= 0):
        raise ValueError(
            "`save_times` must be finite, strictly increasing and within [0, t1]."
        )
    if ts.size < 2:
        ts = np.append(ts, t1) if ts[0] < t1 else np.insert(ts, 0, 0.0)
    return ts
