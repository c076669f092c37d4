r"""Diagonal linear networks: conservation, the implicit-bias potential and its
minimiser, the interpolators it moves between, and the saddle-to-saddle limit.

Regression $y = X\beta^*$ ($X$ of shape `(n, d)`, $n < d$) with gradflow's loss
$L(\beta) = \frac1{2n}\|X\beta - y\|^2$ (`gradflow.Sensing(X, y)`), and the model
$\beta = u^{\odot D} - v^{\odot D}$ ([`gradflow.DiagonalNet`][]). With
$g = \nabla L(\beta)$, gradient flow is $\dot u = -D u^{D-1}\odot g$,
$\dot v = D v^{D-1}\odot g$, one coordinate at a time.

**Conservation.** At depth 2, $\frac{d}{dt}(u_iv_i) = 0$; at depth $D\ge3$,
$\frac{d}{dt}\big(u_i^{2-D} + v_i^{2-D}\big) = 0$ (each term moves by
$\mp D(D-2)g_i$). ($u_i^2 - v_i^2 = \beta_i$ is *not* conserved by this
parametrization; it is for $\beta = u\odot v$.)

**The limit is a mirror-descent limit.** With $r(t) = -\int_0^t g\,ds \in
\operatorname{range}(X^\top)$, each coordinate is an explicit function of one number
$s_i$: at depth 2, $\beta_i = u_{0,i}^2e^{s_i} - v_{0,i}^2e^{-s_i}$ with $s = 4r$; at
depth $D$, $\beta_i = (a_i - s_i)^{-D/(D-2)} - (b_i + s_i)^{-D/(D-2)}$ with
$a_i = u_{0,i}^{2-D}$, $b_i = v_{0,i}^{2-D}$, $s = D(D-2)r$. So a limit that
interpolates is $\beta = h(X^\top\mu)$, $X\beta = y$ — the KKT system of
$\min \sum_i H_i^*(\beta_i)$ subject to $X\beta = y$, where $H_i' = h_i$. For
$u_0 = v_0 = \alpha\mathbf 1$ this is Woodworth et al.'s potential (COLT 2020):
$Q_\alpha(\beta) = \alpha^2\sum_i q(\beta_i/\alpha^2)$,
$q(z) = 2 - \sqrt{4+z^2} + z\operatorname{arcsinh}(z/2)$ at depth 2, and
$Q^D_\alpha(\beta) = \alpha^D\sum_i q_D(\beta_i/\alpha^D)$, $q_D = \int h_D^{-1}$,
$h_D(z) = (1-z)^{-D/(D-2)} - (1+z)^{-D/(D-2)}$ at depth $D$. `flow_limit` solves the
KKT system by a damped Newton method on the (strictly convex) dual,
$\min_\mu \sum_i H_i((X^\top\mu)_i) - y^\top\mu$, in NumPy float64 — independently
of the flow.

**Saddle to saddle.** At depth 2 from $u_0 = v_0 = \alpha\mathbf 1$, in the
accelerated time $\tilde t = 2t/\ln(1/\alpha)$ the variable
$\tilde s = \ln(u/v)/(2\ln(1/\alpha)) = -\int_0^{\tilde t}\nabla L$ (exact at every
$\alpha$) and $\beta_i = \alpha^{2-2\tilde s_i} - \alpha^{2+2\tilde s_i}$. As
$\alpha\to0$, $\beta$ is piecewise constant: coordinate $i$ can be non-zero only while
$|\tilde s_i| = 1$, with the sign of $\tilde s_i$. `saddle_to_saddle` computes the
saddles and jump times of this limit (Pesme & Flammarion, NeurIPS 2023, Algorithm 1,
derived here for gradflow's loss and time).

All functions take and return NumPy arrays (float64).
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._validate import check_int, check_positive_number, check_saved
from .verdict import Verdict, verdict_tolerance, worst


# --- conservation ---------------------------------------------------------------------


def invariants(model) -> Float[Array, " d"]:
    r"""The conserved quantity of every coordinate of a [`gradflow.DiagonalNet`][]:
    $u_iv_i$ at depth 2, $u_i^{2-D} + v_i^{2-D}$ at depth $D\ge3$.

    **Arguments:**

    - `model`: a `DiagonalNet` (with non-zero weights at depth $\ge3$).

    **Returns:** a JAX array `(d,)` (traced when the weights are, so it can be an
    observer: `lambda t, m, o: invariants(m)`).
    """
    u, v, depth = model.u, model.v, model.depth
    if depth == 2:
        return u * v
    return u ** (2 - depth) + v ** (2 - depth)


def conservation_verdict(saved, tolerance: float | None = None, *,
                         rtol: float | None = None) -> Verdict:
    r"""Drift of the saved invariants, $\max_{t,i}|C_i(t) - C_i(0)| / |C_i(0)|$.

    **Arguments:**

    - `saved`: the values of [`gradflow.analysis.diagonal.invariants`][] at the save
      times, `(T, d)`.
    - `tolerance`: the bound (> 0); by default
      `gradflow.analysis.verdict.drift_tolerance(rtol, dtype)`
      ($100\times$ `rtol`), tied to the solve's accuracy and the saves' dtype, as for
      every model's conservation verdict.
    - `rtol`: the `rtol` the trajectory was solved at (`trajectory.config["rtol"]`);
      by default the library's default for the dtype (1e-8 for float64, 1e-5 for
      float32). Give it or `tolerance`.

    **Returns:** a [`gradflow.analysis.Verdict`][].
    """
    saved = check_saved("saved", saved, "(T, d)", ndim=2, nonempty=(1,))
    tolerance = verdict_tolerance(tolerance, rtol, saved.dtype)
    saved = saved.astype(float)
    ref = np.abs(saved[0])
    scale = np.where(ref > 0, ref, 1.0)
    drift = np.abs(saved - saved[0]) / scale
    return worst("diagonal-conservation", drift, tolerance, "max_{t,i} |C_i(t)-C_i(0)|/|C_i(0)|")


# --- the potential --------------------------------------------------------------------


def _check_depth(depth) -> int:
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 2:
        raise ValueError(f"`depth` must be an int >= 2, got {depth!r}.")
    return int(depth)


def _check_scale(name, alpha, d=None) -> np.ndarray:
    a = np.asarray(alpha, dtype=float)
    if a.ndim > 1 or (a.ndim == 1 and d is not None and a.shape != (d,)):
        raise ValueError(f"`{name}` must be a scalar or of shape ({d},), got shape {a.shape}.")
    if not np.all(np.isfinite(a)) or np.any(a <= 0):
        raise ValueError(f"`{name}` must be finite and > 0, got {alpha!r}.")
    return a


def _h_depth(z, depth):
    """Woodworth et al.'s $h_D(z) = (1-z)^{-D/(D-2)} - (1+z)^{-D/(D-2)}$ on (-1, 1)."""
    p = depth / (depth - 2)
    return (1 - z) ** -p - (1 + z) ** -p


def _h_depth_inverse(beta, depth, iterations: int = 200) -> np.ndarray | float:
    """$h_D^{-1}$ by bisection on (-1, 1) (odd and increasing), to full precision."""
    beta = np.asarray(beta, dtype=float)
    target = np.abs(beta)
    lo, hi = np.zeros_like(target), np.ones_like(target)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        with np.errstate(divide="ignore", over="ignore"):
            above = _h_depth(mid, depth) > target
        lo, hi = np.where(above, lo, mid), np.where(above, mid, hi)
        if np.all(hi - lo <= 4 * np.finfo(float).eps * np.maximum(hi, 1e-300)):
            break
    return np.sign(beta) * 0.5 * (lo + hi)


def q_depth2(z) -> np.ndarray | float:
    r"""$q(z) = 2 - \sqrt{4 + z^2} + z\operatorname{arcsinh}(z/2)$, Woodworth et al.'s
    depth-2 potential ($q'(z) = \operatorname{arcsinh}(z/2)$, $q(z)\approx z^2/4$ near
    0, $\approx |z|\ln|z|$ at infinity)."""
    z = np.asarray(z, dtype=float)
    return 2 - np.sqrt(4 + z**2) + z * np.arcsinh(z / 2)


def q_depth(z, depth: int) -> np.ndarray | float:
    r"""$q_D(z) = \int_0^z h_D^{-1}$, Woodworth et al.'s depth-$D$ potential, in closed
    form given $\zeta = h_D^{-1}(z)$: $q_D(z) = z\zeta - \frac{D-2}{2}\big[(1-\zeta)^{-2/(D-2)}
    + (1+\zeta)^{-2/(D-2)} - 2\big]$ (the Legendre transform of $\int h_D$).
    `depth=2` gives `q_depth2`."""
    depth = _check_depth(depth)
    if depth == 2:
        return q_depth2(z)
    z = np.asarray(z, dtype=float)
    zeta = _h_depth_inverse(z, depth)
    e = -2.0 / (depth - 2)
    conjugate = 0.5 * (depth - 2) * ((1 - zeta) ** e + (1 + zeta) ** e - 2)
    return z * zeta - conjugate


def potential(beta, alpha, depth: int = 2) -> float:
    r"""Woodworth et al.'s $Q_\alpha(\beta)$ for the init $u = v = \alpha\mathbf 1$:
    $\alpha^2\sum_i q(\beta_i/\alpha^2)$ at depth 2, $\alpha^D\sum_i q_D(\beta_i/\alpha^D)$
    at depth $D$.

    **Arguments:**

    - `beta`: a vector `(d,)`.
    - `alpha`: the init scale, a scalar or one per coordinate.
    - `depth`: $D\ge2$.

    **Returns:** the value (a float).
    """
    depth = _check_depth(depth)
    beta = np.asarray(beta, dtype=float)
    alpha = _check_scale("alpha", alpha, beta.shape[0] if beta.ndim == 1 else None)
    scale = alpha**depth
    return float(np.sum(scale * q_depth(beta / scale, depth)))


def potential_gradient(beta, alpha, depth: int = 2) -> np.ndarray | float:
    r"""$\nabla Q_\alpha(\beta)$: $\operatorname{arcsinh}(\beta_i/(2\alpha^2))$ at depth 2,
    $h_D^{-1}(\beta_i/\alpha^D)$ at depth $D$. At the constrained minimiser it lies in
    the row space of $X$ (the KKT condition; see `kkt_residual`)."""
    depth = _check_depth(depth)
    beta = np.asarray(beta, dtype=float)
    alpha = _check_scale("alpha", alpha, beta.shape[0] if beta.ndim == 1 else None)
    if depth == 2:
        return np.arcsinh(beta / (2 * alpha**2))
    return _h_depth_inverse(beta / alpha**depth, depth)


def kkt_residual(beta, X, y, alpha, depth: int = 2) -> tuple[float, float]:
    r"""How far `beta` is from satisfying the KKT conditions of $\min Q_\alpha$ subject
    to $X\beta = y$: `(feasibility, stationarity)` $= (\|X\beta - y\|/\|y\|,\
    \|P^\perp\nabla Q_\alpha(\beta)\|/\|\nabla Q_\alpha(\beta)\|)$, with $P^\perp$ the
    projection onto the null space of $X$. Both vanish exactly at the minimiser."""
    X, y = _check_data(X, y)
    grad = potential_gradient(beta, alpha, depth)
    coef = np.linalg.lstsq(X.T, grad, rcond=None)[0]
    stationarity = np.linalg.norm(grad - X.T @ coef) / max(np.linalg.norm(grad), 1e-300)
    feasibility = np.linalg.norm(X @ np.asarray(beta, float) - y) / max(np.linalg.norm(y),
                                                                         1e-300)
    return float(feasibility), float(stationarity)


# --- the limit of the flow, independently of it ---------------------------------------


def _check_data(X, y):
    X = np.asarray(X, dtype=float)
    y = np.asarray(y, dtype=float)
    if X.ndim != 2 or X.shape[0] < 1 or X.shape[1] < 1:
        raise ValueError(f"`X` must be a non-empty matrix (n, d), got shape {X.shape}.")
    if y.shape != (X.shape[0],):
        raise ValueError(f"`y` must have shape ({X.shape[0]},) to match `X`, got {y.shape}.")
    if not (np.all(np.isfinite(X)) and np.all(np.isfinite(y))):
        raise ValueError("`X` and `y` must be finite.")
    return X, y


@dataclasses.dataclass(frozen=True)
class _Maps:
    """Per-coordinate $h$, $h'$, $H = \\int_0 h$ of the mirror map, and its domain."""

    u0: np.ndarray
    v0: np.ndarray
    depth: int

    def domain(self):
        if self.depth == 2:
            return -np.inf, np.inf
        return -(self.v0 ** (2.0 - self.depth)), self.u0 ** (2.0 - self.depth)

    def h(self, s):
        if self.depth == 2:
            return self.u0**2 * np.exp(s) - self.v0**2 * np.exp(-s)
        a, b = self.u0 ** (2.0 - self.depth), self.v0 ** (2.0 - self.depth)
        p = self.depth / (self.depth - 2)
        return (a - s) ** -p - (b + s) ** -p

    def dh(self, s):
        if self.depth == 2:
            return self.u0**2 * np.exp(s) + self.v0**2 * np.exp(-s)
        a, b = self.u0 ** (2.0 - self.depth), self.v0 ** (2.0 - self.depth)
        p = self.depth / (self.depth - 2)
        return p * ((a - s) ** (-p - 1) + (b + s) ** (-p - 1))

    def H(self, s):
        if self.depth == 2:
            return self.u0**2 * np.expm1(s) + self.v0**2 * np.expm1(-s)
        a, b = self.u0 ** (2.0 - self.depth), self.v0 ** (2.0 - self.depth)
        e = -2.0 / (self.depth - 2)
        return 0.5 * (self.depth - 2) * ((a - s) ** e - self.u0**2 + (b + s) ** e - self.v0**2)


@dataclasses.dataclass(frozen=True)
class LimitSolve:
    """What [`gradflow.analysis.diagonal.flow_limit`][] found.

    **Fields:** `beta` (the minimiser), `dual` ($\\mu$, with $\\beta = h(X^\\top\\mu)$),
    `iterations` (Newton steps), `residual` ($\\|X\\beta - y\\|/\\|y\\|$), `converged`.
    """

    beta: np.ndarray
    dual: np.ndarray
    iterations: int
    residual: float
    converged: bool


def flow_limit(X, y, u0, v0=None, depth: int = 2, *, tol: float = 1e-13,
               accept: float = 1e-9, max_iterations: int = 500) -> LimitSolve:
    r"""The limit of gradient flow of $\beta = u^{\odot D} - v^{\odot D}$ on
    $\frac1{2n}\|X\beta - y\|^2$ from $(u_0, v_0)$, computed without the flow: the
    unique $\beta = h(X^\top\mu)$ with $X\beta = y$ (module docstring), by a damped
    Newton method on the dual $\min_\mu\sum_i H_i((X^\top\mu)_i) - y^\top\mu$ (strictly
    convex for $X$ of full row rank; backtracking keeps the iterates in the domain).

    For $u_0 = v_0 = \alpha\mathbf 1$ this is $\arg\min Q_\alpha$ subject to $X\beta=y$
    ([`gradflow.analysis.diagonal.min_potential_interpolator`][]).

    **Arguments:**

    - `X`, `y`: the design `(n, d)` (full row rank, $n\le d$) and the targets `(n,)`.
    - `u0`, `v0`: the init, scalars or `(d,)` arrays (`v0` defaults to `u0`); any
      non-zero values at depth 2 (only $u_0^2$, $v_0^2$ matter), positive at depth
      $\ge3$.
    - `depth`: $D\ge2$.
    - `tol`: stop when $\|X\beta - y\| \le$ `tol` $\cdot\|y\|$ (or when the residual
      stops decreasing).
    - `accept`: the relative residual up to which the solve counts as `converged`.

    **Precision.** At depth 2 the solve reaches $\|X\beta-y\|/\|y\|\approx10^{-14}$.
    At depth $D\ge3$ the map $\mu\mapsto\beta$ goes through
    $u_i^{2-D} = u_{0,i}^{2-D} - (X^\top\mu)_i$, a difference of two large numbers when
    $u_i \gg u_{0,i}$, so the relative precision is about
    $\varepsilon\,(\max_i|u_i|/u_0)^{D-2}$ ($10^{-10}$ at $D=4$, $\alpha = 10^{-3}$,
    $|\beta|\sim1$); below it `converged` is False.
    - `max_iterations`: the most Newton steps.

    **Returns:** a [`gradflow.analysis.diagonal.LimitSolve`][] (check `converged`).
    """
    X, y = _check_data(X, y)
    depth = _check_depth(depth)
    tol = check_positive_number("tol", tol)
    accept = check_positive_number("accept", accept)
    max_iterations = check_int("max_iterations", max_iterations)
    n, d = X.shape
    u0 = np.broadcast_to(np.asarray(u0, dtype=float), (d,))
    v0 = u0 if v0 is None else np.broadcast_to(np.asarray(v0, dtype=float), (d,))
    for name, w in (("u0", u0), ("v0", v0)):
        if not np.all(np.isfinite(w)) or (np.any(w <= 0) if depth > 2 else np.any(w == 0)):
            kind = "positive" if depth > 2 else "non-zero"
            raise ValueError(f"`{name}` must be finite and {kind} at depth {depth}.")
    maps = _Maps(np.abs(u0), np.abs(v0), depth)
    lo, hi = maps.domain()
    ynorm = max(np.linalg.norm(y), 1e-300)

    def inside(s):
        return np.all(s > lo) and np.all(s < hi)

    def dual(mu):
        s = X.T @ mu
        if not inside(s):
            return np.inf
        with np.errstate(over="ignore"):
            value = np.sum(maps.H(s)) - y @ mu
        return value if np.isfinite(value) else np.inf

    residual_at = lambda mu: np.linalg.norm(X @ maps.h(X.T @ mu) - y)
    mu = np.zeros(n)
    best, stalled, it = np.inf, 0, 0
    for _ in range(max_iterations):
        s = X.T @ mu
        grad = X @ maps.h(s) - y
        gnorm = np.linalg.norm(grad)
        if gnorm <= tol * ynorm:
            break
        stalled = stalled + 1 if gnorm > 0.99 * best else 0
        best = min(best, gnorm)
        if stalled >= 20:  # at the precision floor (see the docstring)
            break
        hess = (X * maps.dh(s)) @ X.T
        try:
            step = -np.linalg.solve(hess, grad)
        except np.linalg.LinAlgError:
            step = -np.linalg.lstsq(hess, grad, rcond=None)[0]
        decrement = float(-(grad @ step))
        # Backtracking: first into the domain, then Armijo on the dual. Near the
        # solution the dual's decrease falls below its rounding error; a step is then
        # accepted if it keeps the dual value (to rounding) and reduces the residual.
        f0, t = dual(mu), 1.0
        while t > 1e-300 and not np.isfinite(dual(mu + t * step)):
            t *= 0.5
        while t > 1e-300:
            trial = mu + t * step
            f = dual(trial)
            if f <= f0 - 0.25 * t * decrement:
                break
            if abs(f - f0) <= 1e-12 * (1 + abs(f0)) and residual_at(trial) < gnorm:
                break
            t *= 0.5
        if t <= 1e-300:  # no progress possible at this precision
            break
        mu = trial
        it += 1
    s = X.T @ mu
    beta = maps.h(s)
    residual = float(np.linalg.norm(X @ beta - y) / ynorm)
    return LimitSolve(beta=beta, dual=mu, iterations=it, residual=residual,
                      converged=bool(residual <= accept))


def min_potential_interpolator(X, y, alpha, depth: int = 2, **kwargs) -> np.ndarray:
    r"""$\arg\min Q_\alpha(\beta)$ subject to $X\beta = y$ (Woodworth et al.): the limit
    of the flow from $u = v = \alpha\mathbf 1$, by
    [`gradflow.analysis.diagonal.flow_limit`][] (keyword arguments passed on).

    **Raises:** `RuntimeError` if the Newton solve did not converge.
    """
    alpha = _check_scale("alpha", alpha, np.shape(X)[1] if np.ndim(X) == 2 else None)
    result = flow_limit(X, y, alpha, alpha, depth, **kwargs)
    if not result.converged:
        raise RuntimeError(
            f"min_potential_interpolator: Newton did not converge in {result.iterations} "
            f"steps (relative residual {result.residual:.2e}); alpha may be too small "
            "for float64 at this depth.")
    return result.beta


def min_l2_interpolator(X, y) -> np.ndarray:
    """$\\arg\\min\\|\\beta\\|_2$ subject to $X\\beta = y$ (the pseudo-inverse solution;
    the limit as $\\alpha\\to\\infty$)."""
    X, y = _check_data(X, y)
    return np.linalg.lstsq(X, y, rcond=None)[0]


def min_l1_interpolator(X, y, *, polish: bool = True) -> np.ndarray:
    r"""$\arg\min\|\beta\|_1$ subject to $X\beta = y$ (the limit as $\alpha\to0$): the
    linear program $\min \mathbf 1^\top(p + q)$, $X(p - q) = y$, $p, q\ge0$ (SciPy's
    HiGHS), then, with `polish`, the equations re-solved on the support found
    (a vertex has at most $n$ non-zeros), to float64 precision.

    **Raises:** `RuntimeError` if the linear program fails.
    """
    from scipy.optimize import linprog

    X, y = _check_data(X, y)
    n, d = X.shape
    result = linprog(np.ones(2 * d), A_eq=np.hstack([X, -X]), b_eq=y, bounds=(0, None),
                     method="highs")
    if result.status != 0:
        raise RuntimeError(f"min_l1_interpolator: the linear program failed: {result.message}")
    beta = result.x[:d] - result.x[d:]
    if polish:
        support = np.flatnonzero(np.abs(beta) > 1e-9 * np.max(np.abs(beta), initial=0.0))
        if 0 < support.size <= n:
            refined = np.zeros(d)
            refined[support] = np.linalg.lstsq(X[:, support], y, rcond=None)[0]
            if (np.linalg.norm(X @ refined - y) <= np.linalg.norm(X @ beta - y)
                    and np.all(np.sign(refined[support]) == np.sign(beta[support]))):
                beta = refined
    return beta


def interpolator_distances(beta, X, y, alpha=None, depth: int = 2) -> dict:
    r"""Relative distances $\|\beta - \beta_\star\|_2/\|\beta_\star\|_2$ of `beta` (a
    flow's limit) from the minimum-$\ell_1$ and minimum-$\ell_2$ interpolators, and,
    given `alpha`, from $\arg\min Q_\alpha$.

    **Returns:** `{"l1": ..., "l2": ..., "potential": ...}` (floats).
    """
    beta = np.asarray(beta, dtype=float)
    rel = lambda ref: float(np.linalg.norm(beta - ref) / max(np.linalg.norm(ref), 1e-300))
    out = {"l1": rel(min_l1_interpolator(X, y)), "l2": rel(min_l2_interpolator(X, y))}
    if alpha is not None:
        out["potential"] = rel(min_potential_interpolator(X, y, alpha, depth))
    return out


# --- saddle to saddle (depth 2, alpha -> 0) -------------------------------------------


def mirror_coordinates(model, alpha):
    r"""$\tilde s = \ln(u/v)/(2\ln(1/\alpha))$ of a depth-2 `DiagonalNet` started at
    $u = v = \alpha\mathbf 1$ (with $\alpha < 1$): exactly
    $-\int_0^{\tilde t}\nabla L$ in the accelerated time $\tilde t = 2t/\ln(1/\alpha)$,
    the variable of [`gradflow.analysis.diagonal.saddle_to_saddle`][]. (Works on traced
    weights, as an observer.)"""
    if model.depth != 2:
        raise ValueError(f"`model` must have depth 2, got {model.depth}.")
    return jnp.log(jnp.abs(model.u) / jnp.abs(model.v)) / (2 * jnp.log(1 / alpha))


@dataclasses.dataclass(frozen=True)
class Saddles:
    r"""The limit $\alpha\to0$ of the depth-2 flow in accelerated time (Algorithm 1 of
    Pesme & Flammarion).

    **Fields:** `times` (`(K,)`: $\tilde t_k$, the time at which saddle $k$ is reached;
    `times[0] = 0`), `betas` (`(K, d)`: the saddles $\beta^{(k)}$, `betas[0] = 0`),
    `duals` (`(K, d)`: $\tilde s$ at $\tilde t_k$), `activated` (`(K,)`: the coordinate
    whose $|\tilde s_i|$ reached 1 at $\tilde t_k$; -1 for $k = 0$), `converged` (the
    last saddle interpolates).
    """

    times: np.ndarray
    betas: np.ndarray
    duals: np.ndarray
    activated: np.ndarray
    converged: bool

    def physical_times(self, alpha) -> np.ndarray:
        r"""$t_k = \tilde t_k\ln(1/\alpha)/2$: the predicted jump times of the flow at a
        small $\alpha$."""
        return self.times * np.log(1 / np.asarray(alpha, float)) / 2

    def first_activation(self) -> dict:
        """`{coordinate: accelerated time}` of each coordinate's first activation
        (those that are non-zero at the saddle reached then)."""
        out = {}
        for k in range(1, len(self.times)):
            i = int(self.activated[k])
            if i >= 0 and i not in out and self.betas[k, i] != 0:
                out[i] = float(self.times[k])
        return out


def saddle_to_saddle(X, y, *, max_saddles: int | None = None, tol: float = 1e-10) -> Saddles:
    r"""The saddles visited by the depth-2 flow from $u = v = \alpha\mathbf 1$ as
    $\alpha\to0$, and the accelerated times $\tilde t = 2t/\ln(1/\alpha)$ at which it
    jumps to them (Pesme & Flammarion 2023, Algorithm 1).

    Starting from $\beta = 0$, $\tilde s = 0$: while $\nabla L(\beta)\neq0$, every
    coordinate's $\tilde s_i$ moves at velocity $-\nabla L(\beta)_i$; the first to reach
    $\pm1$ (after $\tau = \min_i (1 \mp \tilde s_i)/|\nabla L(\beta)_i|$) changes the
    sign pattern, and $\beta$ jumps to the minimiser of $L$ over
    $\{\beta_i\ge0$ if $\tilde s_i = 1$, $\beta_i\le0$ if $\tilde s_i=-1$, $\beta_i = 0$
    otherwise$\}$ (a non-negative least-squares problem, SciPy's `nnls`). The last
    saddle interpolates and is the minimum-$\ell_1$ interpolator.

    **Arguments:**

    - `X`, `y`: the design `(n, d)` and targets `(n,)` (in general position, so that the
      constrained minimisers are unique).
    - `max_saddles`: the most jumps (default $4d$).
    - `tol`: $\|\nabla L\|_\infty$ below which the process has stopped, and the slack
      in $|\tilde s_i| = 1$.

    **Returns:** a [`gradflow.analysis.diagonal.Saddles`][].
    """
    from scipy.optimize import nnls

    X, y = _check_data(X, y)
    n, d = X.shape
    max_saddles = 4 * int(d) if max_saddles is None else int(max_saddles)
    grad = lambda b: X.T @ (X @ b - y) / n
    t, beta, s = 0.0, np.zeros(d), np.zeros(d)
    times, betas, duals, activated = [0.0], [beta], [s.copy()], [-1]
    converged = False
    scale = max(np.max(np.abs(grad(beta))), 1e-300)
    for _ in range(max_saddles):
        g = grad(beta)
        if np.max(np.abs(g)) <= tol * scale:
            converged = True
            break
        moving = np.abs(g) > tol * scale
        target = -np.sign(g)
        tau = np.full(d, np.inf)
        tau[moving] = (target[moving] - s[moving]) / (-g[moving])
        tau[tau <= 0] = np.inf  # already on its boundary (an active coordinate)
        i = int(np.argmin(tau))
        if not np.isfinite(tau[i]):
            break
        t += tau[i]
        # Every coordinate moves, also one on the boundary whose constrained optimum is
        # 0 (its gradient points inwards: it leaves the boundary and deactivates); an
        # active one has g_i = 0 (to rounding, which the clip absorbs).
        s = np.clip(s - tau[i] * g, -1.0, 1.0)
        s[i] = target[i]
        support = np.flatnonzero(np.abs(s) >= 1 - tol)
        beta = np.zeros(d)
        if support.size:
            signs = np.sign(s[support])
            w = nnls(X[:, support] * signs, y, maxiter=50 * max(support.size, 10))[0]
            beta[support] = signs * w
        times.append(t)
        betas.append(beta)
        duals.append(s.copy())
        activated.append(i)
    return Saddles(times=np.asarray(times), betas=np.asarray(betas),
                   duals=np.asarray(duals), activated=np.asarray(activated),
                   converged=converged)


def activation_times(ts, betas, thresholds) -> np.ndarray:
    r"""The first save time at which $|\beta_i(t)|\ge$ `thresholds[i]`, per coordinate
    (NaN if never), linearly interpolated between saves in $\log|\beta_i|$.

    **Arguments:**

    - `ts`: save times `(T,)`.
    - `betas`: $\beta$ at those times, `(T, d)`.
    - `thresholds`: a scalar or `(d,)`.

    **Returns:** an array `(d,)`.
    """
    ts = np.asarray(ts, dtype=float)
    betas = np.abs(np.asarray(betas, dtype=float))
    if betas.ndim != 2 or betas.shape[0] != ts.shape[0]:
        raise ValueError(f"`betas` must have shape ({ts.shape[0]}, d), got {betas.shape}.")
    thresholds = np.broadcast_to(np.asarray(thresholds, float), betas.shape[1:])
    out = np.full(betas.shape[1], np.nan)
    for i in range(betas.shape[1]):
        above = np.flatnonzero(betas[:, i] >= thresholds[i])
        if above.size == 0:
            continue
        k = above[0]
        if k == 0:
            out[i] = ts[0]
            continue
        lo, hi = np.log(max(betas[k - 1, i], 1e-300)), np.log(betas[k, i])
        frac = (np.log(thresholds[i]) - lo) / (hi - lo) if hi > lo else 1.0
        out[i] = ts[k - 1] + float(np.clip(frac, 0.0, 1.0)) * (ts[k] - ts[k - 1])
    return out
