"""Integrate the gradient-flow ODE dθ/dt = −∇φ(θ) with Diffrax.

Two entry points share one solve (`_diffeqsolve`, the only `diffeqsolve` call):
[`gradflow.flow`][] observes a trajectory and returns a NumPy
[`gradflow.Trajectory`][] after Python-side checks; [`gradflow.final_state`][]
returns the final time and model as JAX arrays, so it works under `jax.grad`,
`jax.jit` and `jax.vmap`.
"""

import time
from typing import Any, NamedTuple

import diffrax as dfx
import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
from jaxtyping import Array, Float, Int

from . import observers as _observers
from ._checks import check_positive, concrete
from .models.base import AbstractAdditiveFactorization, AbstractFactorization
from .objectives import AbstractObjective
from .progress import LogTimeProgressMeter
from .solvers import RosenbrockW
from .stiffness import AbstractStiffness
from .trajectory import STATUS_TEXT, Trajectory
from .vector_field import vector_field


class FlowError(RuntimeError):
    """A solve that did not finish: raised by [`gradflow.flow`][] (with `throw=True`,
    its default) when it hits `max_steps`, becomes non-finite or its step size
    underflows.

    **Arguments:**

    - `trajectory`: the partial [`gradflow.Trajectory`][], up to where the solve
      stopped; its `status` and `reason` say why.

    **Attributes:** `trajectory`, the same partial trajectory, so that the work done
    is not lost (`except gf.FlowError as error: error.trajectory`).
    """

    def __init__(self, trajectory: Trajectory):
        self.trajectory = trajectory
        super().__init__(
            f"gradient flow did not finish: {trajectory.reason} "
            f"(t = {trajectory.t_final:.6g}, {trajectory.stats['steps']} steps). "
            "The partial trajectory is in `error.trajectory`; pass `throw=False` to "
            "get it returned instead."
        )


def default_solver(model: AbstractFactorization) -> dfx.AbstractSolver:
    """The solver [`gradflow.flow`][] uses when none is given.

    **Arguments:**

    - `model`: the initial factorization.

    **Returns:** `RosenbrockW()` ([`gradflow.RosenbrockW`][]) for additive models
    (CP), whose cost stays nearly flat as the init scale shrinks; Diffrax's `Tsit5()`
    for the others (deep matrix, HTF).
    """
    if isinstance(model, AbstractAdditiveFactorization):
        return RosenbrockW()
    return dfx.Tsit5()


def default_save_times(t1: float, num: int = 256) -> np.ndarray:
    """The save times [`gradflow.flow`][] uses when none are given.

    **Arguments:**

    - `t1`: the final time (> 0).
    - `num`: how many save times.

    **Returns:** a NumPy array of `num` times: 0, then `num - 1` geometrically spaced
    times from `t1`·1e-8 to `t1` (the escapes from a small init happen on a
    logarithmic time scale).
    """
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
    - `rtol`, `atol`: step-size control tolerances. `atol` defaults to `rtol` times
      the RMS of the initial weights, so small inits are resolved, not skipped.
    - `max_steps`: the most solver steps before the solve is declared failed.
    - `progress`: show a progress bar (in log physical time) on the terminal.
    - `throw`: raise [`gradflow.FlowError`][] (carrying the partial trajectory) if
      the solve does not finish; with `False` the trajectory is returned with its
      `status` saying why.

    **Returns:** a [`gradflow.Trajectory`][].
    """
    solver, stops, atol = _prepare(
        model, objective, t1, loss_tol, radius, solver, rtol, atol, max_steps
    )
    dtype = jax.tree.leaves(model)[0].dtype
    save_times = _check_save_times(
        default_save_times(float(t1)) if save_times is None else save_times, t1
    )
    atol = float(atol)
    observers = _observers.resolve(observers)

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
    finite = all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(final))
    status = STATUSES[int(_status_code(result, margins, jnp.asarray(finite)))]
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


STATUSES = ("t1", "loss", "radius", "max_steps", "non_finite", "step_underflow", "failed")
"""The statuses of a solve (`Trajectory.status`); `FinalState.status` is an index into
this tuple. The first three are finished solves."""


class FinalState(NamedTuple):
    """What [`gradflow.final_state`][] returns: JAX arrays, batched under `jax.vmap`.

    **Fields:**

    - `t`: the physical time at which the solve ended: `t1`, or the time at which a
      stop (loss or radius) fired, located by a root find on the dense output.
    - `model`: the model at time `t`.
    - `status`: an index into `FinalState.STATUSES`, the names of
      `Trajectory.status`: 0 `"t1"`, 1 `"loss"`, 2 `"radius"` (finished),
      3 `"max_steps"`, 4 `"non_finite"`, 5 `"step_underflow"`, 6 `"failed"`.
    """

    t: Float[Array, ""]
    model: Any
    status: Int[Array, ""]

    STATUSES = STATUSES

    @property
    def ok(self) -> Array:
        """True where the solve finished (`status` is `"t1"`, `"loss"` or `"radius"`)."""
        return self.status <= STATUSES.index("radius")


def final_state(
    model: AbstractFactorization,
    objective: AbstractObjective,
    *,
    t1: float | Array,
    loss_tol: float | Array | None = None,
    radius: float | Array | None = None,
    solver: dfx.AbstractSolver | None = None,
    rtol: float | Array = 1e-8,
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

    **Failure.** With `throw=True` an unfinished solve (max_steps, non-finite state,
    step-size underflow) raises a `RuntimeError` naming the reason when the program
    runs: `equinox.EquinoxRuntimeError` eagerly or under `eqx.filter_jit`,
    `jax.errors.JaxRuntimeError` carrying the same message under `jax.jit`; under
    `jax.vmap` if any member failed (Equinox's `EQX_ON_ERROR` environment variable
    can turn this into NaNs instead). With `throw=False` nothing is raised and
    `status` says what happened: check `.ok` before trusting `t` and `model`.

    **Arguments:**

    - `model`, `objective`, `t1`, `loss_tol`, `radius`, `solver`, `rtol`, `atol`,
      `max_steps`: as in [`gradflow.flow`][]. Numbers may be traced arrays (one
      compilation serves many values); `loss_tol` and `radius` only switch their
      stop on when not `None`. The default `atol` (`rtol` × RMS of the initial
      weights) carries no gradient.
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
    solver, stops, atol = _prepare(
        model, objective, t1, loss_tol, radius, solver, rtol, atol, max_steps
    )
    dtype = jax.tree.leaves(model)[0].dtype
    as_time = lambda x: jnp.asarray(x, dtype)
    return _final_state(
        model,
        objective,
        as_time(t1),
        as_time(0.0 if loss_tol is None else loss_tol),
        as_time(0.0 if radius is None else radius),
        as_time(rtol),
        as_time(atol),
        solver=solver,
        stops=stops,
        max_steps=max_steps,
        adjoint=adjoint,
        throw=throw,
    )


@eqx.filter_jit
def _final_state(model, objective, t1, loss_tol, radius, rtol, atol, *,
                 solver, stops, max_steps, adjoint, throw) -> FinalState:
    sol = _diffeqsolve(
        model, objective, t1, loss_tol, radius, rtol, atol, solver=solver, stops=stops,
        saveat=dfx.SaveAt(t1=True), max_steps=max_steps, adjoint=adjoint, progress=None,
    )
    t = sol.ts[0]
    final = jax.tree.map(lambda x: x[0], sol.ys)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves((t, final))]))
    margins = _stop_margins(lax.stop_gradient(final), objective, loss_tol, radius, stops)
    status = _status_code(sol.result, margins, finite)
    if throw:
        messages = [f"gradient flow did not finish: {STATUS_TEXT[name]}." for name in STATUSES]
        failed = status > STATUSES.index("radius")
        t, final = eqx.branched_error_if((t, final), failed, status, messages)
    return FinalState(t, final, status)


@eqx.filter_jit
def _solve(model, objective, t1, save_ts, loss_tol, radius, rtol, atol, *,
           solver, observers, stops, max_steps, progress):
    sol = _diffeqsolve(
        model, objective, t1, loss_tol, radius, rtol, atol, solver=solver, stops=stops,
        saveat=_observing_saveat(save_ts, observers), max_steps=max_steps, adjoint=None,
        progress=progress,
    )
    return sol.ys, sol.ts, sol.result, sol.stats


def _observing_saveat(save_ts, observers) -> dfx.SaveAt:
    """Observers at `save_ts` and at the end, and the final model."""
    observe = lambda t, y, args: {name: fn(t, y, args) for name, fn in observers.items()}
    return dfx.SaveAt(subs=[dfx.SubSaveAt(ts=save_ts, fn=observe),
                            dfx.SubSaveAt(t1=True, fn=observe), dfx.SubSaveAt(t1=True)])


def _diffeqsolve(model, objective, t1, loss_tol, radius, rtol, atol, *,
                 solver, stops, saveat, max_steps, adjoint, progress) -> dfx.Solution:
    """The gradient-flow solve behind both `flow` and `final_state`.

    From time 0 to `t1`, stopping early at the root of the stop margins (loss,
    radius); `throw=False`, so the caller turns `sol.result` into a status.
    """
    event = None
    if stops:
        margin = lambda t, y, args, **kw: jnp.min(
            jnp.stack(list(_stop_margins(y, args, loss_tol, radius, stops).values()))
        )
        event = dfx.Event(margin, root_finder=_Bracketing(rtol=1e-13, atol=1e-300))
    kwargs = {} if progress is None else {"progress_meter": progress}
    if adjoint is not None:
        kwargs["adjoint"] = adjoint
    return dfx.diffeqsolve(
        dfx.ODETerm(vector_field),
        _differentiable(solver),
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

    A root at an end of the bracket counts as bracketed. Under `jax.vmap` Diffrax
    root-finds every member once any member's stop fired, and a member without a stop
    is given a function that is positive at the start of its last step and exactly 0
    at its end; `optx.Bisection` would reject that bracket (it counts 0 as positive)
    and fail the whole batch.
    """

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        lower_val, _ = fn(jnp.asarray(options["lower"], f_struct.dtype), args)
        upper_val, _ = fn(jnp.asarray(options["upper"], f_struct.dtype), args)
        same_sign = ((lower_val > 0) & (upper_val > 0)) | ((lower_val < 0) & (upper_val < 0))
        flip = eqx.error_if(
            lower_val > upper_val, same_sign, "The root is not contained in [lower, upper]"
        )
        fixed = _Bracketing(rtol=self.rtol, atol=self.atol, flip=True)
        state = optx.Bisection.init(fixed, fn, y, args, options, f_struct, aux_struct, tags)
        return eqx.tree_at(lambda s: s.flip, state, flip)

    def terminate(self, fn, y, args, options, state, tags):
        width = jnp.abs(state.upper - state.lower)
        return width <= self.atol + self.rtol * jnp.abs(y), optx.RESULTS.successful


def _status_code(result, margins: dict, finite) -> Int[Array, ""]:
    """Index into `STATUSES` of how a solve ended (traceable: works under jit and vmap)."""
    code = lambda name: jnp.asarray(STATUSES.index(name))
    if margins:  # the stop that fired is the one closest to its threshold
        codes = jnp.stack([code(name) for name in margins])
        stopped = codes[jnp.argmin(jnp.stack(list(margins.values())))]
    else:
        stopped = code("failed")
    failed = jnp.where(
        ~finite,
        code("non_finite"),
        jnp.where(
            result == dfx.RESULTS.max_steps_reached,
            code("max_steps"),
            jnp.where(
                result == dfx.RESULTS.dt_min_reached, code("step_underflow"), code("failed")
            ),
        ),
    )
    return jnp.where(
        result == dfx.RESULTS.successful,
        jnp.where(finite, code("t1"), code("non_finite")),
        jnp.where(result == dfx.RESULTS.event_occurred, stopped, failed),
    )


def _prepare(model, objective, t1, loss_tol, radius, solver, rtol, atol, max_steps):
    """Checks shared by `flow` and `final_state`; (solver, stops, atol) with defaults.

    Checks that need concrete values are skipped for traced ones. The default `atol`
    is a JAX scalar without gradient (a tolerance is not part of the function).
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
    if atol is None:
        flat = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(model)])
        rtol_ = jnp.asarray(rtol, flat.dtype)
        rms = jnp.sqrt(jnp.mean(flat**2))
        atol = lax.stop_gradient(jnp.where(rms > 0, rtol_ * rms, rtol_))
    check_positive("atol", atol)
    solver = default_solver(model) if solver is None else solver
    stops = tuple(n for n, v in (("loss", loss_tol), ("radius", radius)) if v is not None)
    return solver, stops, atol


class _ConstantStiffness(AbstractStiffness):
    """`stiffness` whose linearisation carries no gradient.

    A Rosenbrock-W method keeps its order for any matrix W, so holding W constant
    under differentiation still differentiates a consistent discretization of the
    flow; differentiating W itself (an eigendecomposition) gives NaNs as soon as two
    eigenvalues coincide, which they do at a symmetric or sparse init.
    """

    stiffness: AbstractStiffness

    def linearise(self, model, objective):
        return lax.stop_gradient(self.stiffness.linearise(model, objective))


def _differentiable(solver):
    """`solver`, with a Rosenbrock-W linearisation that carries no gradient."""
    if isinstance(solver, RosenbrockW) and not isinstance(solver.stiffness, _ConstantStiffness):
        return eqx.tree_at(lambda s: s.stiffness, solver, _ConstantStiffness(solver.stiffness))
    return solver


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
