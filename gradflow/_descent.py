"""`descent`: gradient descent with Optax on the flow's models, objectives and observers.

The discrete counterpart of [`gradflow.flow`][]: same models, objectives and
observers, same [`gradflow.Trajectory`][], and a time axis (the accumulated step
size) on which the two can be overlaid. The whole run is one compiled loop; the
observers are evaluated only at the chosen steps.
"""

import math
import time
from typing import Any, NamedTuple, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, ArrayLike, Float, Int

from . import _solve
from . import observers as _observers
from ._flow import FlowError, flow
from ._numerics import safe_divide
from ._status import Status
from ._validate import check_int, check_positive, enforce
from .models.base import AbstractFactorization
from .objectives import AbstractObjective
from .trajectory import Trajectory

_RUNNING = -1  # not a status: the loop goes on
PROGRESS_CHUNKS = 100
"""With `progress=True` the run is split into this many compiled chunks (at most)."""


class DescentError(FlowError):
    """A descent run that did not finish (diverged, or a non-finite state).

    **Attributes:** `trajectory`, the [`gradflow.Trajectory`][] of what was computed,
    up to the failed step (its `status` and `reason` say why).
    """

    def __init__(self, trajectory: Trajectory):
        hint = ""
        if trajectory.status == "non_finite":
            hint = " The step size is too large for this problem (or the objective overflows)."
        super().__init__(
            trajectory,
            f"gradient descent did not finish: {trajectory.reason} at step "
            f"{trajectory.stats['steps'] + 1} of {trajectory.config['steps']} "
            f"(t = {trajectory.t_final:.6g}).{hint} The partial trajectory (ending at "
            "the last finite iterate) is in `error.trajectory`; pass `throw=False` to "
            "get it returned instead.",
        )


# --- the papers' adaptive scheme ------------------------------------------------------


class RmsNormalizedState(NamedTuple):
    """State of [`gradflow.rms_normalized`][].

    **Fields:** `count` (steps taken) and `square_avg` (the exponential moving average
    of $\\|g\\|^2$ over the whole gradient).
    """

    count: Int[Array, ""]
    square_avg: Float[Array, ""]


def rms_normalized(
    learning_rate: float | optax.Schedule, decay: float = 0.99, eps: float = 1e-6
) -> optax.GradientTransformation:
    r"""The TF/HTF papers' adaptive step (`GroupRMSprop` of their official code) as Optax.

    One scalar for all parameters together:
    $v_k=\beta v_{k-1}+(1-\beta)\sum_{\text{all params}}\|g_k\|^2$ ($v_0=0$) and
    $\theta\leftarrow\theta-h_k\,g_k$ with
    $h_k=\eta/\big(\sqrt{v_k/(1-\beta^k)}+\varepsilon\big)$, $k=1,2,\dots$ — the
    update of the official code (`common/train/optim/group_rsmprop.py`). Every step
    is a positive multiple of the gradient, so as $\eta\to0$ the iterates follow
    gradient flow reparametrized by $dt=h_k$ per step, which is exactly the clock
    [`gradflow.descent`][] uses. The code's weight decay is
    `optax.chain(optax.add_decayed_weights(wd), rms_normalized(lr))`.

    **Arguments:**

    - `learning_rate`: $\eta>0$, or an Optax schedule of the step count (from 0).
    - `decay`: $\beta\in[0,1)$ (the code's `alpha`).
    - `eps`: $\varepsilon\ge0$, added to the debiased RMS.

    **Returns:** an `optax.GradientTransformation` with state [`gradflow.RmsNormalizedState`][].

    !!! Example

        ```python
        import gradflow as gf

        tr = gf.descent(model, objective, gf.rms_normalized(1e-2), steps=10_000)
        ```
    """
    if not callable(learning_rate):
        check_positive("learning_rate", learning_rate, scalar=True)
    check_positive("decay", decay, allow_zero=True, scalar=True)
    if not decay < 1:
        raise ValueError(f"`decay` must be in [0, 1), got {decay!r}.")
    check_positive("eps", eps, allow_zero=True, scalar=True)

    def init(params):
        dtype = jax.tree.leaves(params)[0].dtype
        return RmsNormalizedState(jnp.zeros((), jnp.int32), jnp.zeros((), dtype))

    def update(updates, state, params=None):
        dtype = state.square_avg.dtype
        sq = sum(jnp.sum(g**2) for g in jax.tree.leaves(updates))
        square_avg = decay * state.square_avg + (1 - decay) * sq
        count = state.count + 1
        debias = 1 - jnp.asarray(decay, dtype) ** count.astype(dtype)
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        step = jnp.asarray(lr, dtype) / (jnp.sqrt(square_avg / debias) + eps)
        return jax.tree.map(lambda g: -step * g, updates), RmsNormalizedState(count, square_avg)

    return optax.GradientTransformation(init, update)


# --- the loop ---------------------------------------------------------------------------


def _projected_step(updates, grads, state):
    """$h=\\langle-u,g\\rangle/\\|g\\|^2$ (0 where $g=0$): the step along $-g$."""
    num = -jnp.asarray(optax.tree_utils.tree_vdot(updates, grads))
    den = jnp.asarray(optax.tree_utils.tree_vdot(grads, grads))
    return safe_divide(num, den)


_SGD = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)  # one `update` for every run


def _gd_step(updates, grads, state):
    """Plain gradient descent (`optax.inject_hyperparams(optax.sgd)`): $h=\\eta$ exactly."""
    return state.hyperparams["learning_rate"]


class _Carry(NamedTuple):
    model: Any
    loss: Array  # the loss and gradient at `model`
    grads: Any
    opt_state: Any
    t: Array  # accumulated step size, with its Kahan compensation
    comp: Array
    k: Array
    status: Array
    slot: Array  # index of the next save
    ts: Array
    saved: dict


def _observe(t, model, objective, observers):
    return {name: fn(t, model, objective) for name, fn in observers.items()}


_observe_jit = eqx.filter_jit(_observe)
_value_and_grad = eqx.filter_jit(lambda objective, model: eqx.filter_value_and_grad(
    objective)(model))


@eqx.filter_jit
def _run(carry, k_end, objective, save_steps, loss_tol, t1, *, update, step_size, observers):
    def step(c: _Carry) -> _Carry:
        updates, opt_state = update(c.grads, c.opt_state, c.model)
        h = step_size(updates, c.grads, c.opt_state)
        model = eqx.apply_updates(c.model, updates)
        y = h - c.comp  # Kahan: t_k = k·η to rounding for constant steps
        t = c.t + y
        comp = (t - c.t) - y
        loss, grads = eqx.filter_value_and_grad(objective)(model)
        finite = (jnp.isfinite(loss) & jnp.isfinite(h) & _solve.all_finite(model)
                  & _solve.all_finite(grads))
        status = jnp.select([~finite, loss <= loss_tol, t >= t1],
                            [Status.NON_FINITE, Status.LOSS, Status.T1], _RUNNING)
        moved = (model, loss, grads, opt_state, t, comp, c.k + 1)
        kept = (c.model, c.loss, c.grads, c.opt_state, c.t, c.comp, c.k)
        # a step to a non-finite iterate is not taken: the run ends on the last finite one
        model, loss, grads, opt_state, t, comp, k = jax.tree.map(
            lambda a, b: jnp.where(finite, a, b), moved, kept)
        return c._replace(model=model, loss=loss, grads=grads, opt_state=opt_state, t=t,
                          comp=comp, k=k, status=status.astype(c.status.dtype))

    def record(c: _Carry) -> _Carry:
        obs = _observe(c.t, c.model, objective, observers)
        saved = jax.tree.map(lambda buf, x: buf.at[c.slot].set(x), c.saved, obs)
        return c._replace(ts=c.ts.at[c.slot].set(c.t), saved=saved, slot=c.slot + 1)

    def segment(c: _Carry) -> _Carry:
        target = jnp.minimum(save_steps[c.slot], k_end)
        c = jax.lax.while_loop(lambda c: (c.status == _RUNNING) & (c.k < target), step, c)
        return jax.lax.cond(c.k == save_steps[c.slot], record, lambda c: c, c)

    return jax.lax.while_loop(lambda c: (c.status == _RUNNING) & (c.k < k_end), segment, carry)


# --- the public function ----------------------------------------------------------------


def descent(
    model: AbstractFactorization,
    objective: AbstractObjective,
    optimizer: float | ArrayLike | optax.GradientTransformation,
    *,
    steps: int,
    save_every: int | None = None,
    save_steps=None,
    observers=None,
    t1: float | None = None,
    loss_tol: float | None = None,
    progress: bool = False,
    throw: bool = True,
) -> Trajectory:
    r"""Run gradient descent (or any Optax optimizer) from `model` on `objective`.

    **Time.** Step $k$ moves the weights by $u_k$ and advances the clock by
    $h_k$; `ts` are the accumulated sums $t_k=\sum_{i<k}h_i$ (compensated summation).

    - Plain GD (`optimizer` a number $\eta$): $h_k=\eta$, so $t_k=k\eta$, the time at
      which gradient flow is compared with GD.
    - An Optax transformation: $h_k=\langle-u_k,g_k\rangle/\|g_k\|^2$ ($0$ where
      $g_k=0$), the gradient-flow time that gives the same first-order loss decrease
      ($\phi$ drops by $h_k\|g_k\|^2$ to first order, as along the flow). For any
      update along $-g_k$ — `optax.sgd` with or without a schedule, and
      [`gradflow.rms_normalized`][] — this is the step size itself (to rounding), and
      the small-step limit is gradient flow in exactly this time. For heavy-ball
      momentum $\beta$ it tends to $\eta/(1-\beta)$ once the momentum has built up,
      the time change of its small-step limit. For Adam and other preconditioned
      methods, which are not time changes of the flow, it is a $g^2$-weighted mean of
      the per-coordinate steps, and it can be negative (time runs back) if an update
      points uphill.

    **Stopping.** After `steps` steps (status `"t1"`); at the first step with
    $t\ge$ `t1` if given (status `"t1"`; `"max_steps"` if `steps` run out first);
    at the first iterate whose loss is $\le$ `loss_tol` (status `"loss"`); or, with
    status `"non_finite"`, when a step would make the loss, its gradient, the step
    size or the weights non-finite — that step is not taken, so the run ends at the
    last finite iterate (finite loss included) and `stats["steps"]` counts the steps
    taken before it. A loss already at or below `loss_tol` at the initial model stops
    at step 0.

    **Arguments:**

    - `model`: the initial factorization.
    - `objective`: a `Completion` or `Sensing` objective of the same shape.
    - `optimizer`: a learning rate $\eta>0$ for plain gradient descent (an array
      argument: another $\eta$ does not recompile), or any `optax.GradientTransformation`,
      e.g. `optax.sgd(eta, momentum=0.9)`, `optax.adam(eta)`, [`gradflow.rms_normalized`][].
    - `steps`: the most steps to take (int $\ge1$).
    - `save_every`: record the observers at steps $0, s, 2s, \dots$.
    - `save_steps`: or at these step indices (increasing ints in $[0,$ `steps`$]$).
      Default: step 0 and a geometric grid up to `steps` (about 256 saves). The
      iterate where the run ended is always appended as the last save.
    - `observers`: as in [`gradflow.flow`][]: names, callables
      `(t, model, objective) -> pytree` or a `{name: callable}` dict.
    - `t1`: stop once the clock reaches `t1` (`steps` is then a budget; saves after
      the stop are dropped, so choose `save_steps` for the expected length).
    - `loss_tol`: stop at the first iterate with loss $\le$ `loss_tol`.
    - `progress`: show a progress bar; the loop then runs in up to
      `PROGRESS_CHUNKS` compiled chunks (one compilation for all of them).
    - `throw`: raise [`gradflow.DescentError`][] (carrying the partial trajectory) if
      the run did not finish; with `False` it is returned with `status` saying why.

    **Returns:** a [`gradflow.Trajectory`][]; `stats["save_steps"]` are the step
    indices of `ts`, and `stats["steps"]` the number of steps taken.

    !!! Example

        ```python
        import gradflow as gf

        gd = gf.descent(model, objective, 1e-3, steps=20_000, save_every=1000)
        gf_ = gf.flow(model, objective, t1=gd.t_final, save_times=gd.ts)
        gf.analysis.descent.trajectory_distance(gd, gf_)  # O(1e-3)
        ```
    """
    objective, dtype, pending = _solve.check_inputs(model, objective)
    model = enforce(model, pending)
    steps = check_int("steps", steps)
    for name, value in (("t1", t1), ("loss_tol", loss_tol)):
        if value is not None:
            check_positive(name, value, scalar=True)
    saves = _check_save_steps(steps, save_every, save_steps)
    update, step_size, opt_state, opt_config = _optimizer(optimizer, model, dtype)
    observers = _observers.resolve(observers)
    loss, grads = _value_and_grad(objective, model)
    if not np.isfinite(float(loss)):
        raise ValueError(f"{_solve.INVALID_LOSS} ({float(loss)}); scale the model or the "
                         "data down.")

    zero = jnp.zeros((), dtype)
    index = jnp.asarray(0).dtype
    shapes = eqx.filter_eval_shape(_observe, zero, model, objective, observers)
    initial = _RUNNING if loss_tol is None or float(loss) > loss_tol else Status.LOSS
    carry = _Carry(
        model=model,
        loss=loss,
        grads=grads,
        opt_state=opt_state,
        t=zero,
        comp=zero,
        k=jnp.zeros((), index),
        status=jnp.asarray(initial, index),
        slot=jnp.zeros((), index),
        ts=jnp.zeros(saves.size, dtype),
        saved=jax.tree.map(lambda s: jnp.zeros((saves.size,) + s.shape, s.dtype), shapes),
    )
    padded = jnp.asarray(np.append(saves, steps + 1), index)  # a sentinel past the end
    as_time = lambda x, default: jnp.asarray(default if x is None else x, dtype)
    args = (objective, padded, as_time(loss_tol, -jnp.inf), as_time(t1, jnp.inf))
    if initial != _RUNNING:  # the stop is already met: record the initial iterate
        carry = carry._replace(ts=carry.ts.at[0].set(zero), slot=carry.slot + 1,
                               saved=jax.tree.map(lambda b, x: b.at[0].set(x), carry.saved,
                                                  _observe_jit(zero, model, objective, observers)))
    kw = dict(update=update, step_size=step_size, observers=observers)
    chunk = math.ceil(steps / PROGRESS_CHUNKS) if progress else steps

    start = time.perf_counter()
    bar = _progress_bar(steps) if progress else None
    k_end = 0
    try:
        while k_end < steps and int(carry.status) == _RUNNING:
            k_end = min(k_end + chunk, steps)
            carry = _run(carry, jnp.asarray(k_end, index), *args, **kw)
            if bar is not None:
                bar.update(int(carry.k) - bar.n)
            if int(carry.status) != _RUNNING:
                break
    finally:
        if bar is not None:
            bar.close()
    final = _observe_jit(carry.t, carry.model, objective, observers)
    jax.block_until_ready(final)
    wall = time.perf_counter() - start

    config = {"steps": steps, "t1": t1, "loss_tol": loss_tol, "observers": list(observers)}
    trajectory = _trajectory(carry, final, padded, t1, wall, opt_config | config)
    if throw and not trajectory.ok:
        raise DescentError(trajectory)
    return trajectory


def matched_flow(
    trajectory: Trajectory, model, objective, *, observers=None, **flow_kwargs
) -> Trajectory:
    """Gradient flow from `model`, observed at the times of `trajectory`.

    [`gradflow.flow`][] with `t1 = trajectory.ts[-1]` and `save_times = trajectory.ts`,
    so [`gradflow.analysis.descent.trajectory_distance`][] compares
    the two at identical times (no interpolation error).

    **Arguments:**

    - `trajectory`: e.g. a [`gradflow.descent`][] result (its times must increase).
    - `model`, `objective`: the initial model and objective of that run.
    - `observers`: default: the names of `trajectory.observations` (pass callables
      explicitly for observers that are not built-in names).
    - `flow_kwargs`: passed on to [`gradflow.flow`][] (`rtol`, `atol`, `solver`, ...).

    **Returns:** the flow's [`gradflow.Trajectory`][].
    """
    ts = np.asarray(trajectory.ts, dtype=float)
    if ts.size < 2 or ts[-1] <= 0 or np.any(np.diff(ts) <= 0):
        raise ValueError(
            "`trajectory` times must be strictly increasing and end after 0 to match a "
            f"flow to them, got {ts}."
        )
    if observers is None:
        observers = list(trajectory.observations)
        unknown = [name for name in observers if name not in _observers.BY_NAME]
        if unknown:
            raise ValueError(
                f"`observers`: {unknown} are not built-in observer names; pass "
                "`observers` (e.g. the dict given to `gradflow.descent`)."
            )
    t1 = float(ts[-1])
    return flow(model, objective, t1=t1, save_times=ts, observers=observers, **flow_kwargs)


def _optimizer(optimizer, model, dtype):
    """(update, step_size, initial state, config) for a learning rate or an Optax transform."""
    if isinstance(optimizer, optax.GradientTransformation):
        return optimizer.update, _projected_step, optimizer.init(model), {"optimizer": "optax"}
    if callable(optimizer) or isinstance(optimizer, (str, bytes)):
        raise TypeError(
            "`optimizer` must be a learning rate (plain gradient descent) or an "
            f"`optax.GradientTransformation`, got {optimizer!r}."
        )
    try:
        lr = jnp.asarray(optimizer, dtype)
    except TypeError:
        raise TypeError(
            "`optimizer` must be a learning rate or an `optax.GradientTransformation`, "
            f"got {optimizer!r}."
        ) from None
    if lr.shape != ():
        raise ValueError(f"`optimizer` (a learning rate) must be a scalar, got shape {lr.shape}.")
    rate = float(lr)
    if not (np.isfinite(rate) and rate > 0):
        raise ValueError(
            f"`optimizer` (the learning rate of plain gradient descent) must be > 0, got {rate}."
        )
    state = cast(optax.InjectHyperparamsState, _SGD.init(model))
    state.hyperparams["learning_rate"] = lr  # in the state: another η does not recompile
    return _SGD.update, _gd_step, state, {"optimizer": "gd", "learning_rate": rate}


def _check_save_steps(steps, save_every, save_steps) -> np.ndarray:
    if save_every is not None and save_steps is not None:
        raise ValueError("Pass at most one of `save_every` and `save_steps`.")
    if save_every is not None:
        if not isinstance(save_every, int) or isinstance(save_every, bool) or save_every < 1:
            raise ValueError(f"`save_every` must be an int >= 1, got {save_every!r}.")
        return np.arange(0, steps + 1, save_every)
    if save_steps is None:
        grid = np.round(np.geomspace(1, steps, 255)).astype(np.int64)
        return np.unique(np.concatenate([[0], grid]))
    arr = np.asarray(save_steps)
    if arr.ndim != 1 or arr.size < 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"`save_steps` must be a non-empty 1-d array of ints, got {arr.dtype} "
            f"array of shape {arr.shape}."
        )
    if arr[0] < 0 or arr[-1] > steps or np.any(np.diff(arr) <= 0):
        raise ValueError(
            f"`save_steps` must be strictly increasing and within [0, steps={steps}]."
        )
    return arr.astype(np.int64)


def _trajectory(carry, final, padded, t1, wall, config) -> Trajectory:
    n, k = int(carry.slot), int(carry.k)
    code = int(carry.status)
    if code == _RUNNING:  # ran out of steps
        status = Status.T1 if t1 is None else Status.MAX_STEPS
    else:
        status = Status(code)
    save_steps = np.asarray(padded[:n])
    ts = np.asarray(carry.ts[:n])
    observations = jax.tree.map(lambda x: np.asarray(x[:n]), carry.saved)
    final = jax.tree.map(np.asarray, final)
    t_final = float(carry.t)
    if n == 0 or save_steps[-1] != k:  # the trajectory ends where the run did
        save_steps = np.append(save_steps, k)
        ts = np.append(ts, t_final)
        observations = jax.tree.map(
            lambda v, f: np.concatenate([v, f[None]]), observations, final
        )
    evaluations = k + 1 + (status == Status.NON_FINITE)  # the initial one, the rejected one
    return Trajectory(
        ts=ts,
        observations=observations,
        t_final=t_final,
        final=final,
        model=carry.model,
        status=status.label,
        stats={
            "steps": k,
            "accepted_steps": k,
            "rejected_steps": 0,
            "gradient_evaluations": evaluations,
            "wall_time": wall,
            "save_steps": save_steps,
        },
        config=config,
    )


def _progress_bar(steps):
    from tqdm.auto import tqdm

    return tqdm(total=steps, unit="step", desc="descent")
