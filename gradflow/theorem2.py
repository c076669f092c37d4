r"""Theorem 2 of the tensor-factorization paper: CP under Huber loss follows a rank-one trajectory.

Razin, Maman & Cohen (ICML 2021), Sec. 4, Theorem 2 (docs: Theory › Theorem 2 and the Huber
loss, §3.7–3.9). Under Assumption 1 (Huber $\delta_h<|y|$ on every observation),
Assumption 2 (balanced init) and Assumption 3 (one component aligned with
$-\nabla\mathcal L(0)$ and large enough compared with the others), gradient flow from
$\alpha\,\mathbf a$ reaches the sphere $\|\mathcal W\|=\rho$ at a time $t_S$, and from
there it stays within $\epsilon\to0$ (as $\alpha\to0$) of the *balanced rank-one
trajectory* started on the sphere along the largest component.

This module gives

- the assumptions as checks: [`check_assumption1`][gradflow.theorem2.check_assumption1]
  (raises), [`assumption2`][gradflow.theorem2.assumption2] and
  [`assumption3`][gradflow.theorem2.assumption3] (verdicts);
- an initialization that satisfies A2 and A3 by construction
  ([`leading_init`][gradflow.theorem2.leading_init], §3.9 step 1);
- the numerical protocol of §3.9 ([`protocol`][gradflow.theorem2.protocol]): for each
  $\alpha$ the hitting time $t_S$, the rank-one comparison trajectory and the distance
  $\Delta(\alpha)$, all solved with [`gradflow.flow`][].

Only tensor completion (`gradflow.Completion`) with `gradflow.HuberLoss` is covered, as in
the paper's Sec. 4.
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from .analysis.closed_forms import constant_gamma_hitting_time
from .analysis.verdict import Verdict
from ._flow import flow
from .models.cp import CP
from .objectives import Completion, HuberLoss

_STRICTLY_BELOW_ONE = float(np.nextafter(1.0, 0.0))


# --- the loss at the origin and Assumption 1 ---------------------------------------------


def origin_gradient(objective: Completion) -> Float[Array, "..."]:
    r"""$\nabla\mathcal L(0)$ as a dense tensor of the objective's shape.

    Under Assumption 1 this is $G_0=-\frac{\delta_h}{|\Omega|}\sum_{I\in\Omega}
    \operatorname{sign}(y_I)\mathbf E_I$, and it is the gradient everywhere in the ball
    $\|\mathcal W\|<\min_\Omega|y|-\delta_h$ (§3.8). Computed by differentiating the
    objective's loss at zero predictions, so it holds for any per-entry loss.
    """
    _check_completion(objective)
    g = jax.grad(objective.loss_at)(jnp.zeros_like(objective.values))
    dense = jnp.zeros(objective.shape, g.dtype)
    return dense.at[tuple(objective.indices.T)].add(g)


def check_assumption1(objective: Completion) -> float:
    r"""Check Assumption 1 ($\delta_h<|y_I|$ for every observation); raise `ValueError` if not.

    **Returns:** the radius $\min_\Omega|y|-\delta_h>0$ of the ball around the origin in
    which the loss is linear (§3.8); a reference sphere radius $\rho$ must lie below it.
    """
    _check_completion(objective)
    if not isinstance(objective.loss, HuberLoss):
        raise ValueError(
            "Assumption 1 is about the Huber loss: the objective's loss is "
            f"{type(objective.loss).__name__}, pass `loss=gradflow.HuberLoss(delta)`."
        )
    delta = float(np.asarray(objective.loss.delta))
    y = np.abs(np.asarray(objective.values))
    i = int(np.argmin(y))
    if not y[i] > delta:
        entry = tuple(int(v) for v in np.asarray(objective.indices[i]))
        raise ValueError(
            f"Assumption 1 fails: the Huber delta_h = {delta:.6g} is not below |y| at every "
            f"observation; entry {entry} has |y| = {y[i]:.6g}. Lower delta_h below "
            f"min |y| = {y.min():.6g}."
        )
    return float(y[i] - delta)


# --- Assumptions 2 and 3 --------------------------------------------------------------------


def assumption2(model: CP, tolerance: float = 1e-12) -> Verdict:
    r"""Assumption 2 (§3.7): the unbalancedness magnitude (Definition 1, §3.3) is 0.

    The value is $\epsilon$ relative to the largest $\|\mathbf a_r^n\|^2$ (the scale of
    its rounding error), held to `tolerance`.
    """
    sq = np.asarray(model.vector_norms()) ** 2
    eps = float(np.max(sq.max(axis=0) - sq.min(axis=0)))
    scale = max(float(sq.max()), np.finfo(float).tiny)
    return Verdict("assumption2_relative_unbalancedness", eps / scale, tolerance)


def assumption3(model: CP, objective: Completion) -> Verdict:
    r"""Assumption 3 (§3.7), as a verdict on the best candidate $\bar r$.

    For each $\bar r$ with $\bar\gamma:=\langle-\nabla\mathcal L(0),\otimes_n\hat{\mathbf
    a}_{\bar r}^n\rangle>0$ the value is

    $$\max_{r\ne\bar r,\,n}\frac{\|\mathbf a_r^n\|}{\|\mathbf a_{\bar r}^n\|}
    \Big(\frac{\|\nabla\mathcal L(0)\|}{\bar\gamma}\Big)^{1/(N-2)},$$

    and A3 holds iff the smallest such value is $<1$ (the verdict's tolerance is the
    largest float below 1). `detail` names $\bar r$, $\bar\gamma$ and the ratio
    $\|\nabla\mathcal L(0)\|/\bar\gamma$. Needs $N\ge3$.
    """
    value, r, gamma, ratio = _assumption3(model, objective)
    if r is None:
        detail = "no component has gamma > 0 at the origin"
    else:
        detail = f"leading component {r}, gamma = {gamma:.6g}, |grad L(0)|/gamma = {ratio:.6g}"
    return Verdict("assumption3_ratio", value, _STRICTLY_BELOW_ONE, detail)


def leading_init(
    key: PRNGKeyArray,
    objective: Completion,
    rank: int,
    *,
    scale: float = 1.0,
    shrink: float = 0.5,
    power_iterations: int = 10,
    dtype=jnp.float64,
) -> CP:
    r"""An initialization $\mathbf a$ satisfying Assumptions 2 and 3 (§3.9 step 1).

    Component 0 is the leading one: its directions start uniform on the spheres and
    are pushed toward a leading rank-one direction of $-\nabla\mathcal L(0)$ by
    `power_iterations` sweeps of the higher-order power method
    ($\hat{\mathbf u}^n\leftarrow$ normalized $-G_0\times_{n'\ne n}\hat{\mathbf u}^{n'}$),
    with the sign fixed so that $\bar\gamma>0$; its vectors have norm `scale`. The
    other components have uniform directions and norm
    `shrink`$\cdot$`scale`$\,/(\|G_0\|/\bar\gamma)^{1/(N-2)}$, i.e. a factor `shrink`
    below Assumption 3's threshold. Every component is balanced (A2).

    **Arguments:**

    - `key`: a JAX PRNG key.
    - `objective`: a Huber completion objective satisfying Assumption 1.
    - `rank`: number of components R (>= 1).
    - `scale`: norm of the leading component's vectors (the init is later scaled by α).
    - `shrink`: in (0, 1); how far below A3's threshold the other components are.
    - `power_iterations`: HOPM sweeps (>= 0; 0 keeps the random direction, which then
      only needs $\bar\gamma\ne0$).

    **Returns:** a `CP` model; raises `ValueError` if A2 or A3 does not hold for it
    (e.g. `shrink >= 1`).
    """
    check_assumption1(objective)
    n = len(objective.shape)
    if n < 3:
        raise ValueError(f"Theorem 2 needs order N >= 3, got N = {n}.")
    for name, value in (("scale", scale), ("shrink", shrink)):
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"`{name}` must be a positive finite number, got {value!r}.")
    if not isinstance(power_iterations, int) or power_iterations < 0:
        raise ValueError(f"`power_iterations` must be an int >= 0, got {power_iterations!r}.")
    base = CP.balanced(key, objective.shape, rank, 1.0, dtype)
    target = -np.asarray(origin_gradient(objective))
    u = [np.asarray(f[:, 0]) for f in base.factors]
    for _ in range(power_iterations):
        for m in range(n):
            v = _contract_except(target, u, m)
            norm = np.linalg.norm(v)
            if norm == 0:
                break
            u[m] = v / norm
    gamma = _gamma(target, u)
    if gamma == 0:
        raise ValueError("The leading direction has gamma = 0; use another key or more "
                         "power iterations.")
    if gamma < 0:
        u[0] = -u[0]
        gamma = -gamma
    kappa = float(np.linalg.norm(target)) / gamma
    others = shrink * scale / kappa ** (1.0 / (n - 2))
    factors = tuple(
        jnp.asarray(f).at[:, 0].set(scale * jnp.asarray(u[m], dtype)).at[:, 1:].multiply(others)
        for m, f in enumerate(base.factors)
    )
    model = CP(factors)
    a2, a3 = assumption2(model), assumption3(model, objective)
    if not (a2 and a3):
        raise ValueError(f"The constructed init violates the assumptions: {a2}; {a3}.")
    return model


# --- the protocol of §3.9 -------------------------------------------------------------------


@dataclasses.dataclass
class RankOneComparison:
    r"""The §3.9 protocol at one init scale $\alpha$.

    **Fields:**

    - `alpha`: the init scale.
    - `rho_hit`: $\|\mathcal W_e(t_S)\|$, the radius of the sphere actually hit: `rho`
      up to the event location's tolerance; $\mathcal W_1$ starts on this sphere.
    - `t_hit`: hitting time $t_S$ of the sphere $\|\mathcal W\|=\rho$ from $\alpha\mathbf a$.
    - `t_hit_scaled`: $t_S\,\alpha^{N-2}$ (tends to a constant as $\alpha\to0$).
    - `delta`: $\Delta(\alpha)=\max_t\|\overline{\mathcal W}_e(t)-\mathcal W_1(t)\|$.
    - `leading`: $\bar r^*=\arg\max_r P_r(t_S)$.
    - `others_norm`: $\max_{r\ne\bar r^*}P_r(t_S)$ (expected $O(\alpha^N)$).
    - `ts`: times after $t_S$ at which the two trajectories were compared.
    - `distance`: $\|\overline{\mathcal W}_e(t)-\mathcal W_1(t)\|$ at `ts`.
    - `norm`, `rank_one_norm`: $\|\overline{\mathcal W}_e(t)\|$ and $\|\mathcal W_1(t)\|$ at `ts`.
    - `stopped`: `"T"` (compared up to time T) or `"D"` (until $\|\overline{\mathcal W}_e\|=D$).
    - `stats`: solver steps and wall time of the three solves.
    """

    alpha: float
    rho_hit: float
    t_hit: float
    t_hit_scaled: float
    delta: float
    leading: int
    others_norm: float
    ts: np.ndarray
    distance: np.ndarray
    norm: np.ndarray
    rank_one_norm: np.ndarray
    stopped: str
    stats: dict


@dataclasses.dataclass
class Theorem2Result:
    """The protocol over a sequence of init scales (see [`gradflow.theorem2.protocol`][]).

    **Fields:** `runs` (one [`RankOneComparison`][gradflow.theorem2.RankOneComparison]
    per α, in the order given), `order` N, `rho`, `T`, `D`, `verdicts` (the checks of
    the assumptions on the unscaled init).
    """

    runs: list
    order: int
    rho: float
    T: float
    D: float | None
    verdicts: dict

    @property
    def alphas(self) -> np.ndarray:
        return np.array([r.alpha for r in self.runs])

    @property
    def deltas(self) -> np.ndarray:
        return np.array([r.delta for r in self.runs])

    @property
    def hit_times_scaled(self) -> np.ndarray:
        return np.array([r.t_hit_scaled for r in self.runs])

    def slope(self) -> float:
        r"""Least-squares slope of $\log\Delta$ against $\log\alpha$ (expected $\approx N$)."""
        a, d = self.alphas, self.deltas
        if a.size < 2 or not np.all(d > 0):
            return math.nan
        return float(np.polyfit(np.log(a), np.log(d), 1)[0])

    def table(self) -> list[dict]:
        """One row per α: alpha, ρ hit, t_S, t_S·α^(N−2), Δ, max other component norm at t_S."""
        return [
            {
                "alpha": r.alpha,
                "rho_hit": r.rho_hit,
                "t_hit": r.t_hit,
                "t_hit_scaled": r.t_hit_scaled,
                "delta": r.delta,
                "others_norm_at_hit": r.others_norm,
                "stopped": r.stopped,
            }
            for r in self.runs
        ]


def protocol(
    init: CP,
    objective: Completion,
    alphas,
    *,
    T: float,
    D: float | None = None,
    rho: float | None = None,
    num_saves: int = 400,
    t1: float | None = None,
    solver=None,
    rtol: float = 1e-12,
    atol: float | None = None,
    max_steps: int = 100_000,
    progress=None,
) -> Theorem2Result:
    r"""Run Theorem 2's numerical protocol (docs: Theory › Theorem 2, §3.9) for each `alphas`.

    For each $\alpha$:

    1. gradient flow from $\alpha\,$`init` with a terminal event on $\|\mathcal W_e\|=\rho$
       gives $t_S$ and the state at $t_S$;
    2. the comparison trajectory $\mathcal W_1$ is gradient flow of the $R=1$
       factorization from $\mathbf v^n=\rho^{1/N}\hat{\mathbf w}^n_{\bar r^*}(t_S)$,
       $\bar r^*=\arg\max_rP_r(t_S)$ (balanced, on the sphere);
    3. the full flow continues from $t_S$; both are observed at `num_saves` equally
       spaced times in $[0,T]$ (shifted time), and the full flow stops early if
       $\|\overline{\mathcal W}_e\|$ reaches `D`;
    4. $\Delta(\alpha)$ is the largest $\|\overline{\mathcal W}_e(t)-\mathcal W_1(t)\|_F$
       over those times.

    The distance is taken between dense end tensors observed at the save times (no
    cancellation-prone Gram formula), so memory is `num_saves` × the tensor size: this
    is meant for the small problems on which the theorem is checked.

    **Arguments:**

    - `init`: the unscaled init $\mathbf a$, e.g. from [`gradflow.theorem2.leading_init`][];
      A2 and A3 are checked on it (`ValueError` if they fail).
    - `objective`: a Huber completion objective; Assumption 1 is checked.
    - `alphas`: the init scales (positive).
    - `T`: comparison horizon after $t_S$ (> 0).
    - `D`: stop the comparison once $\|\overline{\mathcal W}_e\|$ reaches `D` (> `rho`).
    - `rho`: reference sphere radius in $(0,\min|y|-\delta_h)$; default half of that.
    - `num_saves`: comparison times in $[0,T]$.
    - `t1`: time limit of the approach solve; default 4× the hitting time of the
      leading component at constant $\bar\gamma(0)$ (an upper bound on it, since
      $\bar\gamma$ does not decrease inside the ball, §3.8).
    - `solver`, `rtol`, `atol`, `max_steps`: passed to [`gradflow.flow`][] for all solves.
      $\Delta$ is resolved only down to the solves' accuracy, about `rtol`·$\rho$.
    - `progress`: a callable receiving one line of text per α, or None.

    **Returns:** a [`Theorem2Result`][gradflow.theorem2.Theorem2Result]; raises
    [`gradflow.FlowError`][] if a solve fails, `RuntimeError` if the sphere is not
    reached by `t1` (Theorem 2 (i)).
    """
    rho_max = check_assumption1(objective)
    objective.check_model(init, "init")
    n = init.order
    verdicts = {"assumption2": assumption2(init), "assumption3": assumption3(init, objective)}
    for v in verdicts.values():
        if not v:
            raise ValueError(f"`init` does not satisfy the assumptions of Theorem 2: {v}.")
    rho = 0.5 * rho_max if rho is None else float(rho)
    if not 0 < rho < rho_max:
        raise ValueError(
            f"`rho` must be in (0, min|y| - delta_h) = (0, {rho_max:.6g}), got {rho!r}."
        )
    if not (isinstance(T, (int, float)) and T > 0 and math.isfinite(T)):
        raise ValueError(f"`T` must be a positive finite number, got {T!r}.")
    if D is not None and not D > rho:
        raise ValueError(f"`D` must be > rho = {rho:.6g}, got {D!r}.")
    alphas = [float(a) for a in np.atleast_1d(np.asarray(alphas, dtype=float))]
    if not alphas or not all(a > 0 and math.isfinite(a) for a in alphas):
        raise ValueError(f"`alphas` must be positive finite numbers, got {alphas!r}.")
    if not isinstance(num_saves, int) or num_saves < 2:
        raise ValueError(f"`num_saves` must be an int >= 2, got {num_saves!r}.")

    _, leading, gamma0, _ = _assumption3(init, objective)
    p_leading = float(init.component_norms()[leading])
    kw: dict[str, Any] = dict(solver=solver, rtol=rtol, atol=atol, max_steps=max_steps)
    observers = {"end_tensor": lambda t, m, o: m.full(), "end_norm": lambda t, m, o: m.norm()}
    grid = np.linspace(0.0, float(T), num_saves)
    runs = []
    for alpha in alphas:
        model0 = jax.tree.map(lambda f: alpha * f, init)
        limit = t1
        if limit is None:
            limit = 4 * constant_gamma_hitting_time(alpha**n * p_leading, rho, gamma0, n)
        hit = flow(model0, objective, t1=limit, radius=rho, save_times=[0.0, limit],
                   observers=["component_norms"], **kw)
        if hit.status != "radius":
            raise RuntimeError(
                f"alpha = {alpha:g}: the flow did not reach the sphere |W| = {rho:.6g} by "
                f"t1 = {limit:.6g} (|W| = {float(hit.model.norm()):.6g}); pass a larger `t1`."
            )
        state = hit.model
        p = np.asarray(state.component_norms())
        star = int(np.argmax(p))
        # The sphere actually hit: rho up to the event location's tolerance (relative
        # 1e-13 in time, i.e. |dW/dt|·1e-13·t_S in norm). Starting W_1 on it keeps that
        # tolerance out of Delta; W_1 is then the balanced rank-one trajectory from the
        # sphere of radius rho_hit, whose first hitting time is t_S.
        rho_hit = float(state.norm())
        v = tuple(
            (rho_hit ** (1.0 / n) * f[:, star] / jnp.linalg.norm(f[:, star]))[:, None]
            for f in state.factors
        )
        rank_one = CP(v)
        full = flow(state, objective, t1=float(T), radius=D, save_times=grid,
                    observers=observers, **kw)
        end = full.t_final
        times = grid[grid < end]
        one = flow(rank_one, objective, t1=end, save_times=np.append(times, end),
                   observers=observers, **kw)
        if full.ts.shape != one.ts.shape or not np.allclose(full.ts, one.ts, rtol=1e-12):
            raise RuntimeError("internal error: the two trajectories were saved at different times")
        diff = np.asarray(full["end_tensor"]) - np.asarray(one["end_tensor"])
        distance = np.sqrt(np.sum(diff.reshape(diff.shape[0], -1) ** 2, axis=1))
        others = float(np.max(np.delete(p, star))) if p.size > 1 else 0.0
        run = RankOneComparison(
            alpha=alpha,
            rho_hit=rho_hit,
            t_hit=hit.t_final,
            t_hit_scaled=hit.t_final * alpha ** (n - 2),
            delta=float(np.max(distance)),
            leading=star,
            others_norm=others,
            ts=np.asarray(full.ts),
            distance=distance,
            norm=np.asarray(full["end_norm"]),
            rank_one_norm=np.asarray(one["end_norm"]),
            stopped="D" if full.status == "radius" else "T",
            stats={
                name: {"steps": tr.stats["steps"], "wall_time": tr.stats["wall_time"]}
                for name, tr in (("approach", hit), ("full", full), ("rank_one", one))
            },
        )
        runs.append(run)
        if progress is not None:
            progress(
                f"alpha={alpha:g}: t_S={run.t_hit:.6g}, t_S*alpha^(N-2)={run.t_hit_scaled:.6g}, "
                f"Delta={run.delta:.3e}, max other P_r(t_S)={run.others_norm:.3e}, "
                f"compared until {run.stopped}"
            )
    return Theorem2Result(runs=runs, order=n, rho=rho, T=float(T), D=D, verdicts=verdicts)


# --- helpers --------------------------------------------------------------------------------


def _check_completion(objective) -> None:
    if not isinstance(objective, Completion):
        raise TypeError(
            "Theorem 2 is checked on tensor completion: `objective` must be a "
            f"gradflow.Completion, got {type(objective).__name__}."
        )


def _assumption3(model, objective):
    """(A3 ratio, best leading component or None, its gamma, |G0|/gamma)."""
    _check_completion(objective)
    objective.check_model(model)
    n = model.order
    if n < 3:
        raise ValueError(f"Assumption 3 (and Theorem 2) need order N >= 3, got N = {n}.")
    g0 = np.asarray(origin_gradient(objective))
    norms = np.asarray(model.vector_norms())  # (N, R)
    gam = np.array([_gamma(-g0, [np.asarray(f[:, r]) for f in model.factors])
                    for r in range(model.rank)])
    gnorm = float(np.linalg.norm(g0))
    best = (math.inf, None, math.nan, math.nan)
    for r in np.flatnonzero(gam > 0):
        ratio = gnorm / gam[r]
        others = np.delete(norms, r, axis=1)
        value = float(np.max(others / norms[:, r:r + 1])) * ratio ** (1.0 / (n - 2)) if others.size else 0.0
        if value < best[0]:
            best = (value, int(r), float(gam[r]), float(ratio))
    return best


def _contract_except(tensor, vectors, keep: int) -> np.ndarray:
    """`tensor` contracted with `vectors[m]` along every mode m except `keep`."""
    out = np.asarray(tensor)
    for m in reversed(range(len(vectors))):
        if m != keep:
            out = np.tensordot(out, vectors[m], axes=([m], [0]))
    return out


def _gamma(tensor, vectors) -> float:
    r"""$\langle T,\otimes_n\hat{\mathbf u}^n\rangle$ (0 if some vector is 0)."""
    norms = [np.linalg.norm(u) for u in vectors]
    if min(norms) == 0:
        return 0.0
    value = _contract_except(tensor, vectors, 0) @ vectors[0]
    return float(value / np.prod(norms))
