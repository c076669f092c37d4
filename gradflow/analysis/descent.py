r"""Gradient descent against gradient flow: distance at matched times, order of
convergence in the step size, and the exact per-step change of the conserved
quantities (docs: Theory › Balancedness is conserved, Lemma 1).

**Conserved quantities under a step.** Lemma 1's gaps (CP) and the $C_j$ (DMF) are
quadratic forms $Q$ of the weights whose polarization vanishes along the gradient,
$B(\theta,\nabla\phi(\theta))=0$ (that is why the flow conserves them). A step
$\theta\leftarrow\theta-h\,\nabla\phi$ therefore changes them by exactly
$Q(\theta-hg)-Q(\theta)=h^2Q(g)$:

- CP: $\Delta\big(\|\mathbf w_r^n\|^2-\|\mathbf w_r^{1}\|^2\big)=h^2\big(\|g_r^n\|^2-\|g_r^1\|^2\big)$;
- DMF: $\Delta C_j=h^2\big(G_{j+1}^\top G_{j+1}-G_jG_j^\top\big)$.

This holds for plain GD ($h=\eta$) and for any step along $-g$ (e.g.
[`gradflow.rms_normalized`][], whose $h$ is the clock increment of
[`gradflow.descent`][]). A drift that these formulas do not account for is a bug,
not discretization error.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from .._validate import check_positive_number
from ..models.cp import CP
from ..models.matrix import DeepMatrix
from ..trajectory import Trajectory
from . import cp as _cp
from . import matrix as _matrix
from .verdict import Verdict


def end_tensor(t, model, objective) -> Float[Array, "..."]:
    """Observer: the end tensor (memory grows with its size times the saves)."""
    return model.full()


def flat_weights(t, model, objective) -> Float[Array, " p"]:
    """Observer: all weights in one flat array (a distance in parameter space)."""
    return jnp.concatenate([jnp.ravel(w) for w in jax.tree.leaves(model)])


# --- distance between trajectories --------------------------------------------------------


def trajectory_distance(
    trajectory: Trajectory,
    reference: Trajectory,
    name: str = "component_norms",
    *,
    relative: bool = True,
) -> np.ndarray:
    r"""$\|x(t_k)-x_{\text{ref}}(t_k)\|$ at every save time $t_k$ of `trajectory`.

    $x$ is the observation `name` (any pytree: its leaves are compared together, in
    the Frobenius norm). The reference is linearly interpolated in time onto
    `trajectory.ts`; where the times coincide (a reference from
    [`gradflow.matched_flow`][]) this is exact, otherwise
    it adds an interpolation error of second order in the reference's save spacing.

    **Arguments:**

    - `trajectory`: e.g. a gradient-descent trajectory.
    - `reference`: e.g. the gradient-flow trajectory; its times must increase and
      cover those of `trajectory`.
    - `name`: the observation to compare (`"component_norms"`, or the observers
      [`end_tensor`][gradflow.analysis.descent.end_tensor] and
      [`flat_weights`][gradflow.analysis.descent.flat_weights], ...).
    - `relative`: divide by $\max_t\|x_{\text{ref}}(t)\|$ over the reference.

    **Returns:** an array of shape `(len(trajectory.ts),)`.
    """
    for arg, tr in (("trajectory", trajectory), ("reference", reference)):
        if name not in tr.observations:
            raise ValueError(
                f"`{arg}` has no observation {name!r}; it has {list(tr.observations)}."
            )
    ts, ref_ts = np.asarray(trajectory.ts, float), np.asarray(reference.ts, float)
    if np.any(np.diff(ref_ts) < 0):
        raise ValueError("`reference` times must be increasing.")
    slack = 1e-12 * max(abs(ref_ts[-1]), 1.0)
    if ts.min() < ref_ts[0] - slack or ts.max() > ref_ts[-1] + slack:
        raise ValueError(
            f"`trajectory` times [{ts.min():.6g}, {ts.max():.6g}] are not covered by "
            f"`reference` times [{ref_ts[0]:.6g}, {ref_ts[-1]:.6g}]."
        )
    leaves = [np.asarray(x, float) for x in jax.tree.leaves(trajectory.observations[name])]
    ref = [np.asarray(x, float) for x in jax.tree.leaves(reference.observations[name])]
    if [x.shape[1:] for x in leaves] != [x.shape[1:] for x in ref]:
        raise ValueError(f"{name!r} has different shapes in `trajectory` and `reference`.")
    sq = lambda xs: sum(np.sum(x.reshape(len(x), -1) ** 2, axis=1) for x in xs)
    dist = np.sqrt(sq([x - _interp(ts, ref_ts, r) for x, r in zip(leaves, ref)]))
    if relative:
        scale = np.sqrt(sq(ref)).max()
        dist = dist / (scale if scale > 0 else 1.0)
    return dist


def _interp(x, xp, fp):
    """Piecewise-linear interpolation of `fp` (leading axis over `xp`) at `x`; exact at nodes."""
    if len(xp) == 1:
        return np.repeat(fp[:1], len(x), axis=0)
    i = np.clip(np.searchsorted(xp, x, side="right") - 1, 0, len(xp) - 2)
    width = xp[i + 1] - xp[i]
    w = np.where(width > 0, (x - xp[i]) / np.where(width > 0, width, 1.0), 0.0)
    w = np.clip(w, 0.0, 1.0).reshape((-1,) + (1,) * (fp.ndim - 1))
    return (1 - w) * fp[i] + w * fp[i + 1]


def convergence_order(step_sizes: ArrayLike, errors: ArrayLike) -> float:
    r"""Least-squares slope of $\log(\text{error})$ against $\log(\text{step size})$.

    Gradient descent is the explicit Euler method for the flow, so its error at a
    fixed time is $C\eta+O(\eta^2)$ and the slope tends to 1 as $\eta\to0$; the
    deviation from 1 is of the order of $\eta$ times the ratio of the second- to
    the first-order error constants.
    """
    h, e = np.asarray(step_sizes, float), np.asarray(errors, float)
    if h.shape != e.shape or h.ndim != 1 or h.size < 2:
        raise ValueError("`step_sizes` and `errors` must be 1-d arrays of equal length >= 2.")
    if not (np.all(np.isfinite(h)) and np.all(h > 0) and np.all(np.isfinite(e)) and np.all(e > 0)):
        raise ValueError("`step_sizes` and `errors` must be finite and > 0.")
    return float(np.polyfit(np.log(h), np.log(e), 1)[0])


def order_verdict(step_sizes, errors, order: float = 1.0, tolerance: float = 0.1) -> Verdict:
    """Verdict on $|$fitted order − `order`$|$ (see `convergence_order`); `tolerance`
    a finite number > 0."""
    tolerance = check_positive_number("tolerance", tolerance)
    check_positive_number("order", order)
    slope = convergence_order(step_sizes, errors)
    return Verdict("convergence_order", abs(slope - order), tolerance, f"slope {slope:.4f}")


# --- conserved quantities under a step -------------------------------------------------------


def conserved(model) -> Float[Array, "..."]:
    r"""The flow's conserved quantities: CP Lemma 1 gaps $\|\mathbf w_r^n\|^2-\|\mathbf w_r^1\|^2$
    (shape `(N, R)`, §3.2) or the flattened DMF $C_j$ (§1.2)."""
    if isinstance(model, CP):
        return _cp.squared_norm_gaps(model)
    if isinstance(model, DeepMatrix):
        return _matrix.imbalance_vector(model)
    raise TypeError(f"`model` must be a CP or DeepMatrix model, got {type(model).__name__}.")


def step_change(model, objective, step_size: float | ArrayLike) -> Float[Array, "..."]:
    r"""The exact change of [`conserved`][gradflow.analysis.descent.conserved] under one step
    $\theta\leftarrow\theta-h\nabla\phi(\theta)$: $h^2Q(\nabla\phi)$ (module docstring)."""
    q = conserved(eqx.filter_grad(objective)(model))
    return jnp.asarray(step_size, q.dtype) ** 2 * q


def step_residual(before, after, objective, step_size: float | ArrayLike) -> Float[Array, ""]:
    r"""max |observed − predicted| change of the conserved quantities over one step,
    relative to the largest predicted change.

    **Arguments:**

    - `before`, `after`: the models before and after one step of size `step_size`
      along $-\nabla\phi$(`before`) (e.g. one step of [`gradflow.descent`][], whose
      step size is `t_final` after `steps=1`).
    - `objective`: the objective of the step.
    - `step_size`: $h$ ($\eta$ for plain GD).

    **Returns:** a scalar. Its rounding floor is about
    $\varepsilon\max\|W\|^2/\max|\text{predicted}|$ (the observed change is a
    difference of two numbers of the size of the squared weights), so the step must
    change the quantities well above rounding for a tight check.
    """
    observed = conserved(after) - conserved(before)
    predicted = step_change(before, objective, step_size)
    scale = jnp.max(jnp.abs(predicted), initial=0.0)
    return jnp.max(jnp.abs(observed - predicted), initial=0.0) / jnp.where(scale > 0, scale, 1.0)
