"""The one description of a gradient-flow solve, and the one place that runs it.

[`gradflow.flow`][], [`gradflow.final_state`][] and [`gradflow.sweep`][] all `build`
a `Problem` (every argument validated, every default filled in) and `run` it, so a
check or a default added here holds for all of them. Values that are traced (inside
`jit`, `vmap`, a sweep member) are checked at run time.
"""

from typing import Any, NamedTuple

import diffrax as dfx
import equinox as eqx
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
from jaxtyping import Array, Bool, Float, Int

from . import _status
from ._validate import (Pending, check_finite, check_float_dtype, check_int, check_nonempty,
                        check_positive, concrete, enforce)
from ._vector_field import vector_field
from .models.base import AbstractFactorization
from .objectives import AbstractObjective
from .solvers import default_solver

DEFAULT_RTOL = {jnp.dtype(jnp.float64): 1e-8, jnp.dtype(jnp.float32): 1e-5}
"""The default `rtol` per dtype of the weights."""

MIN_RTOL_EPS = 10
"""The smallest `rtol` accepted, in units of the dtype's machine epsilon."""

INVALID_LOSS = "`objective`: the loss at the initial model is not finite"


class Problem(eqx.Module):
    """A validated gradient-flow solve: model, objective, stops, tolerances, solver.

    Built by `build`; every number is an array of the model's dtype (traced or not).
    `loss_tol` is relative to the initial loss when `relative_loss`.
    """

    model: AbstractFactorization
    objective: AbstractObjective
    t1: Float[Array, ""]
    loss_tol: Float[Array, ""]
    radius: Float[Array, ""]
    rtol: Float[Array, ""]
    atol: Float[Array, ""]
    solver: dfx.AbstractSolver
    pending: tuple
    stops: tuple[str, ...] = eqx.field(static=True)
    relative_loss: bool = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)

    @property
    def dtype(self):
        """The dtype of the weights (and of the tolerances and stop thresholds)."""
        return self.rtol.dtype

    @property
    def time_dtype(self):
        """The dtype of time: the weights' (Diffrax promotes the state to the time's
        dtype, so float64 time would run a float32 model in float64)."""
        return self.t1.dtype


def build(
    model,
    objective,
    *,
    t1,
    loss_tol=None,
    loss_drop=None,
    radius=None,
    rtol=None,
    atol=None,
    solver=None,
    max_steps=100_000,
) -> Problem:
    """Validate the arguments of a solve and fill in its defaults.

    Raises `TypeError`/`ValueError` naming the argument for anything concrete that is
    wrong; checks of traced values are carried in `Problem.pending` and enforced by
    `run`. The objective is cast to the model's dtype.
    """
    objective, dtype, pending = check_inputs(model, objective)
    pending += check_settings(dtype, t1=t1, loss_tol=loss_tol, loss_drop=loss_drop,
                              radius=radius, rtol=rtol, atol=atol)
    max_steps = check_int("max_steps", max_steps)
    rtol = jnp.asarray(DEFAULT_RTOL[dtype] if rtol is None else rtol, dtype)
    if atol is None:
        flat = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(model)])
        rms = jnp.sqrt(jnp.mean(flat**2))
        atol = lax.stop_gradient(jnp.where(rms > 0, rtol * rms, rtol))
    if solver is None:
        solver = default_solver(model)
    elif not isinstance(solver, dfx.AbstractAdaptiveSolver):
        raise TypeError(
            "`solver` must be an adaptive Diffrax solver (one with an error estimate, e.g. "
            f"`diffrax.Tsit5()` or `gradflow.RosenbrockW()`), got {type(solver).__name__}."
        )
    stops = tuple(n for n, v in (("loss", loss_tol if loss_drop is None else loss_drop),
                                 ("radius", radius)) if v is not None)
    as_array = lambda x: jnp.asarray(0.0 if x is None else x, dtype)
    return Problem(
        model=model,
        objective=objective,
        t1=jnp.asarray(t1, dtype),
        loss_tol=as_array(loss_tol if loss_drop is None else loss_drop),
        radius=as_array(radius),
        rtol=rtol,
        atol=jnp.asarray(atol, dtype),
        solver=solver,
        pending=tuple(pending),
        stops=stops,
        relative_loss=loss_drop is not None,
        max_steps=max_steps,
    )


def check_inputs(model, objective):
    """Check a model and the objective it is solved on (shared by every entry point):
    `(objective cast to the model's dtype, the dtype, checks left for run time)`."""
    if not isinstance(objective, AbstractObjective):
        raise TypeError(
            f"`objective` must be a gradflow objective (Completion, Sensing), got "
            f"{type(objective).__name__}."
        )
    objective.check_model(model)
    dtype = check_float_dtype("model", model)
    check_nonempty("model", model)
    pending = []
    for i, leaf in enumerate(jax.tree.leaves(model)):
        pending += check_finite(f"model (weight array {i})", leaf)
    return objective.astype(dtype), dtype, pending


def check_settings(dtype, *, t1, loss_tol=None, loss_drop=None, radius=None, rtol=None,
                   atol=None, names=None) -> list[Pending]:
    """Check a solve's numbers for weights of `dtype`; `names` renames an argument in
    the messages (a sweep's grid axis). Returns the checks left for run time."""
    names = names or {}
    label = lambda n: names.get(n, n)
    pending = check_positive(label("t1"), t1, scalar=True)
    if loss_tol is not None and loss_drop is not None:
        raise ValueError("Give at most one of `loss_tol` and `loss_drop`.")
    for name, value in (("loss_tol", loss_tol), ("loss_drop", loss_drop), ("radius", radius),
                        ("atol", atol)):
        if value is not None:
            pending += check_positive(label(name), value, scalar=True)
    if rtol is None:
        return pending
    pending += check_positive(label("rtol"), rtol, below=1, scalar=True)
    floor = MIN_RTOL_EPS * float(jnp.finfo(dtype).eps)
    low = concrete(rtol)
    if low is None:
        return pending + [Pending(jnp.all(rtol >= floor),
                                  f"`{label('rtol')}` must be >= {floor:.1e} in {dtype}.")]
    if np.any(low < floor):
        hint = " or float64 weights" if dtype == jnp.float32 else ""
        raise ValueError(
            f"`{label('rtol')}` = {low.item() if low.size == 1 else low} is below what "
            f"{dtype} can resolve (at least {floor:.1e}, {MIN_RTOL_EPS}x its machine "
            f"epsilon); use a larger rtol{hint}.")
    return pending


def check_save_times(save_times, t1) -> np.ndarray:
    """Save times as a NumPy array: finite, strictly increasing, within [0, t1]."""
    try:
        ts = np.asarray(save_times, dtype=float)
    except (TypeError, ValueError):
        raise TypeError(f"`save_times` must be an array of numbers, got {save_times!r}.") from None
    if ts.ndim != 1 or ts.size < 1:
        raise ValueError(f"`save_times` must be a non-empty 1-d array, got shape {ts.shape}.")
    t1_ = concrete(t1)
    upper = np.inf if t1_ is None else float(t1_)
    if not np.all(np.isfinite(ts)) or ts[0] < 0 or ts[-1] > upper or np.any(np.diff(ts) <= 0):
        raise ValueError(
            "`save_times` must be finite, strictly increasing and within [0, t1]"
            f" (t1 = {upper:g}), got {np.array2string(ts, threshold=6)}."
        )
    return ts


class Outcome(NamedTuple):
    """What `run` returns (JAX arrays): the observers' saves, the end, how it ended."""

    observed: list  # one entry per observing SubSaveAt
    observed_ts: list
    t: Float[Array, ""]
    model: Any
    loss: Float[Array, ""]
    status: Int[Array, ""]
    stats: dict


def _observing_subs(save_ts, observers) -> list:
    """Observers at `save_ts` and at the end of the solve."""
    observe = lambda t, y, args: {name: fn(t, y, args) for name, fn in observers.items()}
    return [dfx.SubSaveAt(ts=save_ts, fn=observe), dfx.SubSaveAt(t1=True, fn=observe)]


def conservation_drift(start: AbstractFactorization, end: AbstractFactorization):
    """The largest change of the model's conserved quantities from `start` to `end`,
    relative to their scale (see `AbstractFactorization.conserved`); `None` if the
    model knows none. Exact gradient flow keeps it at rounding level."""
    first, last = start.conserved(), end.conserved()
    if first is None or last is None:
        return None
    (before, scale0), (after, scale1) = first, last
    if before.size == 0:
        return jnp.zeros((), before.dtype)
    scale = jnp.maximum(jnp.maximum(scale0, scale1), jnp.finfo(before.dtype).tiny)
    return jnp.max(jnp.abs(after - before)) / scale


START = 1e-30
"""A solve whose stop is already met by the initial model runs from 0 to this time only
(a step that moves nothing) and is reported as ending at t = 0."""


FORWARD = dfx.ForwardMode()
"""The adjoint of the solves that are not differentiated in reverse mode (`flow`, a
sweep's members, verify's batches): Diffrax's plain `lax` loops, which take the same
steps to the same numbers as its default checkpointed ones and compile faster (an
order-4 CP flow: 4.7 s instead of 6.3 s). `final_state` uses Diffrax's default, which
`jax.grad` needs."""


def run(problem: Problem, save_ts=None, observers=None, *,
        adjoint: dfx.AbstractAdjoint = FORWARD, progress=None) -> Outcome:
    """Integrate `problem` from 0 to `t1`, stopping at the first stop that fires
    (a stop already met at the initial model ends the solve at t = 0).

    **Arguments:**

    - `save_ts`, `observers`: record `{name: fn(t, model, objective)}` at these times
      and at the end (`Outcome.observed`, with `Outcome.observed_ts`); none if `None`.
      Saves after the end of the solve hold the end's values.
    - `adjoint`: Diffrax's adjoint (`FORWARD` by default: forward-mode differentiation
      only).
    - `progress`: a Diffrax progress meter, or `None`.
    """
    model = enforce(problem.model, problem.pending)
    objective = problem.objective
    loss0 = objective(model)
    model = eqx.error_if(model, ~jnp.isfinite(loss0),
                         INVALID_LOSS + " (inf or nan); scale the model or the data down.")
    loss_tol = problem.loss_tol * loss0 if problem.relative_loss else problem.loss_tol
    margins = lambda y: stop_margins(y, objective, loss_tol, problem.radius, problem.stops)
    event, met_at_start, t1 = None, jnp.asarray(False), problem.t1
    if problem.stops:
        met_at_start = jnp.min(jnp.stack(list(margins(model).values()))) <= 0
        t1 = jnp.where(met_at_start, jnp.asarray(START, problem.time_dtype), t1)
        # The margin in the default float dtype: Diffrax pads the events that did not
        # fire with a Python 0.0 in a `lax.cond` with it.
        nearest = lambda t, y, args, **kw: jnp.min(jnp.stack(list(margins(y).values()))).astype(
            jnp.result_type(float))
        finfo = jnp.finfo(problem.time_dtype)
        event = dfx.Event(nearest, root_finder=StopTime(rtol=8 * float(finfo.eps),
                                                        atol=float(finfo.tiny)))
    subs = []
    if observers is not None:
        if save_ts is None:
            raise ValueError("`observers` need `save_ts`.")
        subs = _observing_subs(jnp.minimum(save_ts, t1), observers)
    kwargs = {} if progress is None else {"progress_meter": progress}
    sol = dfx.diffeqsolve(
        dfx.ODETerm(vector_field),
        problem.solver,
        jnp.zeros_like(problem.t1),
        t1,
        None,
        model,
        objective,
        saveat=dfx.SaveAt(subs=[*subs, dfx.SubSaveAt(t1=True)],
                          solver_state=hasattr(problem.solver, "statistics")),
        stepsize_controller=dfx.PIDController(rtol=problem.rtol, atol=problem.atol),
        max_steps=problem.max_steps,
        event=event,
        throw=False,
        adjoint=adjoint,
        **kwargs,
    )
    assert sol.ys is not None and sol.ts is not None  # SaveAt(subs=...) saves both
    *observed, final = sol.ys
    *observed_ts, t_end = sol.ts
    end = jax.tree.map(lambda x: x[0], final)
    end = jax.tree.map(lambda a, b: jnp.where(met_at_start, a, b), model, end)
    t = jnp.where(met_at_start, jnp.zeros_like(t_end[0]), t_end[0])
    loss = objective(end)
    finite = jnp.isfinite(t) & jnp.isfinite(loss) & all_finite(end)
    if problem.stops:
        fired = margins(lax.stop_gradient(end))
        codes = jnp.asarray([_status.Status[name.upper()] for name in fired], jnp.int32)
        stopped = codes[jnp.argmin(jnp.stack(list(fired.values())))]
    else:
        stopped = jnp.asarray(_status.Status.FAILED, jnp.int32)
    solver_code = jnp.where(met_at_start, _status.SOLVER_CODES["event"], _solver_code(sol.result))
    status = _status.traced_code(solver_code, stopped, finite)
    stats = {k: sol.stats[k] for k in ("num_steps", "num_accepted_steps", "num_rejected_steps")}
    statistics = getattr(problem.solver, "statistics", None)
    if statistics is not None:  # a solver that counts what its steps did
        stats |= statistics(sol.solver_state)
    if problem.stops:  # the near-zero solve of a stop met at the start took no steps
        stats = {k: jnp.where(met_at_start, jnp.zeros_like(v), v) for k, v in stats.items()}
    drift = conservation_drift(model, end)
    if drift is not None:
        stats["conservation_drift"] = drift
    return Outcome(observed, observed_ts, t, end, loss, status, stats)


def all_finite(tree) -> Bool[Array, ""]:
    """Whether every array of `tree` is finite (the one definition used by every solve)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if eqx.is_array(x)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def stop_margins(model, objective, loss_tol, radius, stops) -> dict:
    """Relative distance to each stop condition; a stop fires when its margin hits 0."""
    margins = {}
    if "loss" in stops:
        margins["loss"] = objective(model) / loss_tol - 1.0
    if "radius" in stops:
        margins["radius"] = 1.0 - model.norm() / radius
    return margins


def _solver_code(result) -> Int[Array, ""]:
    codes = _status.SOLVER_CODES
    conditions = [result == dfx.RESULTS.successful, result == dfx.RESULTS.event_occurred,
                  result == dfx.RESULTS.max_steps_reached, result == dfx.RESULTS.dt_min_reached]
    choices = [jnp.asarray(codes[k], jnp.int32)
               for k in ("successful", "event", "max_steps", "underflow")]
    return jnp.select(conditions, choices, jnp.asarray(codes["other"], jnp.int32))


class StopTime(optx.AbstractRootFinder):
    """Bisection for the time at which a stop margin reaches 0, ending on the bracket's
    width alone (Diffrax calls it with `lower`/`upper` = the last step).

    The margin is positive at `lower` and <= 0 at `upper`; the result is the upper end
    of the final bracket, so the stop condition holds at the reported time. Near a
    stop the loss can carry rounding noise far above its tolerance (the 2×2 problem:
    residuals 1e-4 read off entries of size 1e4), so no test is made on the value.
    Under `jax.vmap` Diffrax root-finds every member once any member's stop fired, and
    a member without a stop is given a function that is 0 at `upper`: it converges
    there. With several stop functions Diffrax passes one value each, all zero but
    the one that fired; their sum is the margin. The tolerances follow the dtype (`rtol` a few machine epsilons).

    **Arguments:** `rtol`, `atol`: the bracket width at which to stop,
    `atol + rtol * |t|`.
    """

    rtol: float
    atol: float
    norm: Any = eqx.field(static=True, default=jnp.abs)

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        dtype = jnp.result_type(y)
        return (jnp.asarray(options["lower"], dtype), jnp.asarray(options["upper"], dtype))

    def step(self, fn, y, args, options, state, tags):
        lower, upper = state
        mid = lower + 0.5 * (upper - lower)
        values, aux = fn(mid, args)
        value = sum(jax.tree.leaves(values))  # Diffrax zeroes all but the stop that fired
        lower, upper = jnp.where(value > 0, mid, lower), jnp.where(value > 0, upper, mid)
        return upper, (lower, upper), aux

    def terminate(self, fn, y, args, options, state, tags):
        lower, upper = state
        done = jnp.abs(upper - lower) <= self.atol + self.rtol * jnp.abs(upper)
        return done, optx.RESULTS.successful

    def postprocess(self, fn, y, aux, args, options, state, tags, result):
        return state[1], aux, {}
