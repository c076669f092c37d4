"""Theorem quantities of CP factorization along gradient flow (docs: Theory, Lemma 1 to Corollary 1).

Functions of a model (and objective) return arrays and can be used as observers;
`*_residual` functions return one relative residual per call, and the verdict
functions at the bottom reduce a trajectory's saved residuals to a `Verdict`.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from .. import observers as _observers
from .._numerics import safe_divide
from .._validate import check_finite, check_int, check_positive, check_saved
from ..models.cp import CP
from .verdict import Verdict, relative_max, verdict_tolerance


def squared_norm_gaps(model: CP) -> Float[Array, "N R"]:
    r"""$\|\mathbf w_r^n\|^2-\|\mathbf w_r^1\|^2$, conserved by gradient flow (Lemma 1, §3.2)."""
    sq = model.vector_norms() ** 2
    return sq - sq[:1]


def unbalancedness(model: CP) -> Float[Array, ""]:
    r"""$\epsilon=\max_{r,n,\bar n}\big|\|\mathbf w_r^n\|^2-\|\mathbf w_r^{\bar n}\|^2\big|$ (Definition 1, §3.3)."""
    return _observers.unbalancedness(None, model, None)


def gammas(model: CP, objective) -> Float[Array, " R"]:
    r"""$\gamma_r=\langle-\nabla\mathcal L(\mathcal W_e),\otimes_n\hat{\mathbf w}_r^n\rangle$ (§3.4), 0 where $P_r=0$.

    Uses $\gamma_r P_r=-\langle\mathbf w_r^1,\nabla_{\mathbf w_r^1}\phi\rangle$ (Euler's identity).
    """
    return _observers.gammas(None, model, objective)


def component_norm_rates(model: CP, objective) -> Float[Array, " R"]:
    r"""$\dot P_r$ under the flow, by the chain rule from $\dot{\mathbf w}=-\nabla\phi$."""
    return _observers.component_norm_rates(None, model, objective)


def identity_rate(model: CP, objective) -> Float[Array, " R"]:
    r"""Right side of the exact identity (§3.4): $\gamma_r\sum_n\prod_{n'\ne n}\|\mathbf w_r^{n'}\|^2$."""
    sq = model.vector_norms() ** 2
    others = [jnp.prod(jnp.delete(sq, n, axis=0), axis=0) for n in range(model.order)]
    return gammas(model, objective) * sum(others)


def corollary_rate(model: CP, objective) -> Float[Array, " R"]:
    r"""Corollary 1's law (§3.6), exact when balanced: $N\gamma_r P_r^{2-2/N}$."""
    n = model.order
    return n * gammas(model, objective) * model.component_norms() ** (2 - 2 / n)


def theorem1_bounds(model: CP, objective, epsilon: ArrayLike):
    r"""Theorem 1's (lower, upper) bounds on $\dot P_r$ (§3.5) for unbalancedness $\epsilon$."""
    n = model.order
    p = model.component_norms()
    g = gammas(model, objective)
    small = n * g * p**2 / (p ** (2 / n) + epsilon)
    large = n * g * (p ** (2 / n) + epsilon) ** (n - 1)
    return jnp.minimum(small, large), jnp.maximum(small, large)



def identity_residual(model: CP, objective) -> Float[Array, ""]:
    """Max over components of |Ṗ − identity| relative to the largest |Ṗ| (check T2)."""
    rate = component_norm_rates(model, objective)
    return relative_max(rate - identity_rate(model, objective), rate)


def corollary_residual(model: CP, objective) -> Float[Array, ""]:
    """As `identity_residual`, for Corollary 1's law (check T4; needs ε = 0)."""
    rate = component_norm_rates(model, objective)
    return relative_max(rate - corollary_rate(model, objective), rate)


def theorem1_violation(model: CP, objective, epsilon: ArrayLike) -> Float[Array, ""]:
    """How far Ṗ leaves Theorem 1's bounds, relative to the largest |Ṗ| (check T3)."""
    rate = component_norm_rates(model, objective)
    lower, upper = theorem1_bounds(model, objective, epsilon)
    excess = jnp.maximum(jnp.maximum(lower - rate, rate - upper), 0.0)
    return relative_max(excess, rate)


def conservation_verdict(squared_norms, tolerance: float | None = None, *,
                         rtol: float | None = None) -> Verdict:
    r"""Lemma 1 along a trajectory, from saved `vector_norms()**2` (shape `(T, N, R)`).

    The drift of $\|\mathbf w_r^n\|^2-\|\mathbf w_r^1\|^2$ from its initial value,
    relative to the largest squared norm (the scale of its rounding error).

    **Arguments:**

    - `squared_norms`: the saved `vector_norms()**2` (observer
      `"squared_vector_norms"`), `(T, N, R)`.
    - `tolerance`: the bound (> 0); by default
      `gradflow.analysis.verdict.drift_tolerance(rtol, dtype)`,
      tied to the solve's accuracy and the saves' dtype.
    - `rtol`: the `rtol` the trajectory was solved at (`trajectory.config["rtol"]`);
      by default the library's default for the dtype. Give it or `tolerance`.

    **Returns:** a [`gradflow.analysis.Verdict`][].
    """
    sq = check_saved("squared_norms", squared_norms, "(T, N, R)", ndim=3, nonempty=(1, 2))
    tolerance = verdict_tolerance(tolerance, rtol, sq.dtype)
    gaps = sq - sq[:, :1, :]
    drift = np.abs(gaps - gaps[0]).max()
    scale = max(float(np.abs(sq).max()), np.finfo(float).tiny)
    return Verdict("lemma1_drift", float(drift / scale), tolerance)


def tensor_rank_estimate(model: CP, rel_threshold: float = 1e-2) -> int:
    """Number of components whose norm exceeds `rel_threshold` times the largest (a
    count of the model's large components; see
    [`gradflow.analysis.cp.als_tensor_rank`][] for the papers' estimate from the end
    tensor alone)."""
    p = np.asarray(model.component_norms())
    return int(np.sum(p > rel_threshold * p.max())) if p.max() > 0 else 0


def reconstruction_error(model, truth: ArrayLike) -> float:
    """$\\|\\mathcal W-\\mathcal W^*\\|/\\|\\mathcal W^*\\|$ against a ground-truth tensor."""
    truth = jnp.asarray(truth)
    return float(jnp.linalg.norm(model.full() - truth) / jnp.linalg.norm(truth))



# --- the papers' CP-rank estimator: the smallest rank whose CP-ALS fit is exact ---------------


class ALSFit(NamedTuple):
    """A CP-ALS fit ([`gradflow.analysis.cp.cp_als`][]): the `model` (a `gradflow.CP`),
    its `relative_error` $\\|\\mathcal T-\\mathcal W\\|/\\|\\mathcal T\\|$ and the number of
    ALS sweeps it took (`iterations`, of the best restart)."""

    model: CP
    relative_error: float
    iterations: int


class RankEstimate(NamedTuple):
    """[`gradflow.analysis.cp.als_tensor_rank`][]'s answer: `rank`, the smallest $r$
    whose fit met the tolerance (`max_rank + 1` if none did), `reached` (whether one
    did) and `errors`, the best relative error of each rank tried (`errors[r - 1]`)."""

    rank: int
    reached: bool
    errors: tuple[float, ...]


def cp_als(
    tensor: ArrayLike,
    rank: int,
    *,
    key=None,
    restarts: int = 4,
    max_iters: int = 500,
    tol: float = 1e-10,
    stall: float = 1e-10,
) -> ALSFit:
    r"""A rank-`rank` CP approximation of `tensor` by alternating least squares.

    Each sweep solves, mode after mode, the linear least-squares problem for one
    factor with the others fixed, $A_n\leftarrow\mathcal T_{(n)}\big(\odot_{k\ne n}A_k\big)
    \big(\circledast_{k\ne n}A_k^\top A_k\big)^+$ (the pseudo-inverse keeps it defined
    when components are redundant), then balances the column norms across modes
    (the tensor is unchanged). It stops at relative error `tol`, when a sweep lowers
    the error by less than `stall` (relative to the tensor's norm), or after
    `max_iters` sweeps. `restarts` initializations run together (vmapped) and the
    best fit is returned: the first from the leading singular vectors of the mode-$n$
    unfoldings (HOSVD), the others Gaussian. CP-ALS finds a global optimum on generic tensors of
    rank $\le$ `rank` but, like every CP solver, can stall on hard ones (the best
    rank-$r$ approximation may not even exist): more restarts and sweeps help.

    **Arguments:**

    - `tensor`: a real array of order $N\ge2$ (dense; it is formed in full).
    - `rank`: the number of components $r\ge1$.
    - `key`: a JAX PRNG key for the Gaussian initializations (default
      `jax.random.key(0)`).
    - `restarts`: independent initializations ($\ge1$).
    - `max_iters`: most ALS sweeps ($\ge1$).
    - `tol`, `stall`: the stopping thresholds above (> 0).

    **Returns:** an [`ALSFit`][gradflow.analysis.cp.ALSFit].
    """
    tensor = _dense_tensor(tensor)
    rank = check_int("rank", rank)
    return _fit(tensor, rank, rank, key, restarts, max_iters, tol, stall)


def _fit(tensor, rank, padded, key, restarts, max_iters, tol, stall) -> ALSFit:
    """`cp_als` on a concrete dense tensor, compiled for `padded` >= `rank` components
    (the columns past `rank` are held at 0), so that every rank up to `padded` shares
    one compiled program."""
    restarts = check_int("restarts", restarts)
    max_iters = check_int("max_iters", max_iters)
    check_positive("tol", tol, scalar=True)
    check_positive("stall", stall, scalar=True)
    key = jr.key(0) if key is None else key
    norm = jnp.linalg.norm(tensor)
    if not float(norm) > 0:
        zeros = tuple(jnp.zeros((d, rank), tensor.dtype) for d in tensor.shape)
        return ALSFit(CP(zeros), 0.0, 0)
    dtype = tensor.dtype
    factors, errors, iters = _als_restarts(
        tensor / norm, jr.split(key, restarts), jnp.asarray(rank), padded, max_iters,
        jnp.asarray(tol, dtype), jnp.asarray(stall, dtype))
    best = int(jnp.argmin(errors))
    scale = norm ** (1.0 / tensor.ndim)
    factors = tuple(f[best, :, :rank] * scale for f in factors)
    return ALSFit(CP(factors), float(errors[best]), int(iters[best]))


def als_tensor_rank(
    tensor: ArrayLike,
    tol: float = 1e-6,
    max_rank: int | None = None,
    *,
    key=None,
    restarts: int = 4,
    max_iters: int = 500,
    bisect: bool = False,
) -> RankEstimate:
    r"""The papers' estimate of the tensor rank: the smallest $r$ for which a CP-ALS fit
    ([`gradflow.analysis.cp.cp_als`][]) reaches relative error `tol`.

    Tries $r=1,2,\dots$, `max_rank` in turn and stops at the first fit with
    $\|\mathcal T-\mathcal W_r\|\le\mathrm{tol}\,\|\mathcal T\|$. The tensor-completion
    experiments of Razin & Cohen (2020) use `tol` $=10^{-6}$ on targets of norm 1. It
    is an upper bound on the tensor rank up to `tol` (an ALS fit that fails at the true
    rank makes it larger), and unlike
    [`gradflow.analysis.cp.tensor_rank_estimate`][], which counts a model's large
    components, it looks at the end tensor only, whatever produced it. The zero tensor
    has rank 0.

    **Arguments:**

    - `tensor`: a real array of order $N\ge2$ (e.g. `model.full()`).
    - `tol`: the relative error that counts as an exact fit (> 0).
    - `max_rank`: the largest $r$ tried; default [`gradflow.CP.max_rank`][] of the
      shape, the rank every tensor of that shape can reach (ALS costs grow with $r$:
      cap it when only small ranks matter).
    - `key`, `restarts`, `max_iters`: as in [`gradflow.analysis.cp.cp_als`][].
    - `bisect`: search by bisection instead of $r=1,2,\dots$: `max_rank` first (one
      fit says "more than `max_rank`"), then halving, about $\log_2$ `max_rank` fits.
      It assumes that the fit error decreases with $r$ (true of best fits; an ALS
      fit that stalls can break it). `errors` then holds NaN for the ranks not tried.

    **Returns:** a [`RankEstimate`][gradflow.analysis.cp.RankEstimate].

    !!! Example

        ```python
        truth = gf.random_cp_tensor(jr.key(0), (6, 6, 6), rank=2)
        acp.als_tensor_rank(truth).rank  # 2
        ```
    """
    tensor = _dense_tensor(tensor)
    check_positive("tol", tol, scalar=True)
    max_rank = CP.max_rank(tensor.shape) if max_rank is None else check_int("max_rank", max_rank)
    if not float(jnp.linalg.norm(tensor)) > 0:
        return RankEstimate(0, True, ())
    errors = [float("nan")] * max_rank

    def error(r):
        fit = _fit(tensor, r, max_rank, key, restarts, max_iters, 0.1 * tol, 1e-3 * tol)
        errors[r - 1] = fit.relative_error
        return fit.relative_error

    if bisect:
        if error(max_rank) > tol:
            return RankEstimate(max_rank + 1, False, tuple(errors))
        low, high = 0, max_rank  # the fit fails at `low` (or low = 0), meets tol at `high`
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (low, mid) if error(mid) <= tol else (mid, high)
        return RankEstimate(high, True, tuple(errors))
    for r in range(1, max_rank + 1):
        if error(r) <= tol:
            return RankEstimate(r, True, tuple(errors[:r]))
    return RankEstimate(max_rank + 1, False, tuple(errors))


def _dense_tensor(tensor):
    arr = jnp.asarray(tensor)
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        if jnp.issubdtype(arr.dtype, jnp.complexfloating):
            raise TypeError(f"`tensor` must be real, got dtype {arr.dtype}.")
        arr = arr.astype(float)
    if arr.ndim < 2 or arr.size == 0:
        raise ValueError(f"`tensor` must be a non-empty array of order >= 2, got shape "
                         f"{arr.shape}.")
    check_finite("tensor", arr)
    return arr


def _mttkrp(tensor, factors, n):
    """$\\mathcal T_{(n)}(\\odot_{k\\ne n}A_k)$ by one einsum."""
    order = tensor.ndim
    rank_axis = order
    operands = [tensor, list(range(order))]
    for k, f in enumerate(factors):
        if k != n:
            operands += [f, [k, rank_axis]]
    return jnp.einsum(*operands, [n, rank_axis], optimize="greedy")


def _reconstruct(factors):
    order = len(factors)
    operands = [x for n, f in enumerate(factors) for x in (f, [n, order])]
    return jnp.einsum(*operands, list(range(order)), optimize="greedy")


def _pinv_psd(gram):
    """Pseudo-inverse of a symmetric PSD matrix (eigenvalues below 1e-13 of the largest
    count as 0, so zero rows and columns stay 0)."""
    lam, vec = jnp.linalg.eigh(gram)
    keep = lam > 1e-13 * jnp.max(lam)
    return (vec * jnp.where(keep, 1.0 / jnp.where(keep, lam, 1.0), 0.0)[None, :]) @ vec.T


def _als_sweep(tensor, factors):
    factors = list(factors)
    for n in range(len(factors)):
        gram = None
        for k, f in enumerate(factors):
            if k != n:
                gram = f.T @ f if gram is None else gram * (f.T @ f)
        factors[n] = _mttkrp(tensor, factors, n) @ _pinv_psd(gram)
    norms = jnp.stack([jnp.linalg.norm(f, axis=0) for f in factors])  # (N, r)
    target = jnp.prod(norms, axis=0) ** (1.0 / len(factors))
    scale = safe_divide(target[None, :], norms)  # (N, r)
    return tuple(f * s[None, :] for f, s in zip(factors, scale))


@functools.partial(jax.jit, static_argnums=(3, 4))
def _als_restarts(tensor, keys, rank, padded, max_iters, tol, stall):
    """Vmapped ALS (restart 0 from the HOSVD, the others Gaussian) on a tensor of norm
    1, with `padded` columns of which the first `rank` (traced) are used:
    (factors, errors, sweeps)."""
    active = (jnp.arange(padded) < rank).astype(tensor.dtype)
    big = jnp.asarray(jnp.finfo(tensor.dtype).max, tensor.dtype)

    def one(key, from_svd):
        ks = jr.split(key, tensor.ndim)
        start = []
        for n, (k, d) in enumerate(zip(ks, tensor.shape)):
            draw = jr.normal(k, (d, padded), tensor.dtype)
            # the leading left singular vectors of the mode-n unfolding (HOSVD), then
            # Gaussian columns past d_n
            unfolding = jnp.moveaxis(tensor, n, 0).reshape(d, -1)
            u = jnp.linalg.svd(unfolding, full_matrices=False)[0][:, :padded]
            u = jnp.concatenate([u, draw[:, u.shape[1]:]], axis=1)
            start.append(active[None, :] * jnp.where(from_svd, u, draw))
        start = tuple(start)

        def cond(state):
            _, err, prev, i = state
            return (i < max_iters) & (err > tol) & (prev - err > stall)

        def body(state):
            fs, err, _, i = state
            new = _als_sweep(tensor, fs)
            return new, jnp.linalg.norm(tensor - _reconstruct(new)), err, i + 1

        state = (start, big, jnp.asarray(jnp.inf, tensor.dtype), jnp.asarray(0))
        fs, err, _, i = jax.lax.while_loop(cond, body, state)
        return fs, err, i

    return jax.vmap(one)(keys, jnp.arange(keys.shape[0]) == 0)
