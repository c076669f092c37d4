"""Theorem quantities of deep matrix factorization along gradient flow (docs: Theory, §1–§2).

Functions of a model (and objective) return arrays and can be used in observers;
`*_residual` functions return one relative residual per call. The `rc_*` functions
are the explicit Razin–Cohen bounds of §2.3–§2.4.

**Loss convention.** Razin & Cohen (2020) write the 2×2 problem with the half-*sum* loss
$\\ell=\\tfrac12\\sum_{\\Omega}z^2$ and $s=\\sqrt{2\\ell}$. gradflow's objectives
*average* over the $m$ observations ($\\mathcal L=\\frac1m\\sum\\tfrac12z^2$), so
$s=\\sqrt{2m\\mathcal L}$ (with $m=3$ in the 2×2 problem: $s=\\sqrt{6\\mathcal L}$); use
[`gradflow.analysis.matrix.residual_scale`][]. Averaging also slows the flow: its
time is $m$ times the time of the half-sum flow.
"""

import functools
import operator

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from .._validate import check_positive, check_saved
from ..models.matrix import DeepMatrix
from .._vector_field import rate_along_flow
from .verdict import Verdict, relative_max, verdict_tolerance

EIGEN_CUTOFF = 1e-12
"""Eigen/singular values below this fraction of the largest count as zero (§1.4 pitfall)."""


def balancedness(model: DeepMatrix) -> tuple[Float[Array, "_d_j _d_j"], ...]:
    r"""$C_j=W_{j+1}^\top W_{j+1}-W_jW_j^\top$ for $j=1..L-1$, conserved by gradient flow (§1.2)."""
    ws = model.layers
    return tuple(ws[j + 1].T @ ws[j + 1] - ws[j] @ ws[j].T for j in range(len(ws) - 1))


def imbalance_vector(model: DeepMatrix) -> Float[Array, " n"]:
    """All entries of every $C_j$ in one flat array (an observer-friendly form)."""
    cs = balancedness(model)
    if not cs:
        return jnp.zeros((0,), model.layers[0].dtype)
    return jnp.concatenate([c.ravel() for c in cs])


def unbalancedness(model: DeepMatrix) -> Float[Array, ""]:
    r"""$\max_j\|C_j\|_F$ (§1.2; the $\delta$ of approximate balancedness), 0 for $L=1$."""
    cs = balancedness(model)
    if not cs:
        return jnp.zeros((), model.layers[0].dtype)
    return jnp.max(jnp.stack([jnp.linalg.norm(c) for c in cs]))


def layer_scale(model: DeepMatrix) -> Float[Array, ""]:
    r"""$\max_j\|W_j\|_F^2$: the scale of the rounding error of the $C_j$."""
    return jnp.max(jnp.stack([jnp.sum(w**2) for w in model.layers]))


def end_gradient(model: DeepMatrix, objective) -> Float[Array, "d_L d_0"]:
    r"""$\nabla\ell(W)$: the gradient of `objective` with respect to the end matrix.

    Works for any objective: it is evaluated on the depth-1 factorization $W$ itself.
    """
    return jax.grad(lambda m: objective(DeepMatrix((m,))))(model.full())


def end_to_end_rate(model: DeepMatrix, objective) -> Float[Array, "d_L d_0"]:
    r"""$\dot W$ under the flow, by the chain rule from $\dot W_j=-\partial\phi/\partial W_j$."""
    return rate_along_flow(lambda m: m.full(), model, objective)


def psd_power(matrix: Float[Array, "d d"], power: float) -> Float[Array, "d d"]:
    r"""$A^{p}$ of a symmetric PSD matrix by `eigh`; eigenvalues below
    `EIGEN_CUTOFF`$\cdot\lambda_{\max}$ (and negative round-off) are set to 0 first,
    and $A^0=I$ (§1.4)."""
    d = matrix.shape[0]
    if power == 0:
        return jnp.eye(d, dtype=matrix.dtype)
    lam, vec = jnp.linalg.eigh(0.5 * (matrix + matrix.T))
    keep = lam > EIGEN_CUTOFF * jnp.max(lam)
    powered = jnp.where(keep, jnp.where(keep, lam, 1.0) ** power, 0.0)
    return (vec * powered[None, :]) @ vec.T


def end_to_end_formula(model: DeepMatrix, objective) -> Float[Array, "d_L d_0"]:
    r"""Arora–Cohen–Hazan's end-to-end law (§1.4), exact for balanced layers:
    $-\sum_{j=1}^L(WW^\top)^{\frac{j-1}L}\nabla\ell(W)(W^\top W)^{\frac{L-j}L}$."""
    n = model.depth
    w = model.full()
    g = end_gradient(model, objective)
    left, right = w @ w.T, w.T @ w
    terms = [psd_power(left, (j - 1) / n) @ g @ psd_power(right, (n - j) / n) for j in range(1, n + 1)]
    return -functools.reduce(operator.add, terms)



def end_to_end_residual(model: DeepMatrix, objective) -> Float[Array, ""]:
    """max |Ẇ − formula| relative to max |Ẇ| (check M2; needs balanced layers)."""
    rate = end_to_end_rate(model, objective)
    return relative_max(rate - end_to_end_formula(model, objective), rate)


def singular_value_rates(model: DeepMatrix, objective):
    r"""$(u_r^\top\dot Wv_r,\ -L\sigma_r^{2-2/L}u_r^\top\nabla\ell\,v_r)$ for every singular pair (§1.5).

    The first is $\dot\sigma_r$ by first-order perturbation (for simple $\sigma_r$);
    the second is Arora et al. 2019's law.
    """
    w = model.full()
    u, s, vt = jnp.linalg.svd(w, full_matrices=False)
    rate = end_to_end_rate(model, objective)
    g = end_gradient(model, objective)
    measured = jnp.einsum("ir,ij,rj->r", u, rate, vt)
    n = model.depth
    law = -n * s ** (2 - 2 / n) * jnp.einsum("ir,ij,rj->r", u, g, vt)
    return measured, law


def singular_value_residual(model: DeepMatrix, objective) -> Float[Array, ""]:
    """max over nonzero σ_r of |u_rᵀẆv_r − law| relative to max |Ẇ| (check M3)."""
    measured, law = singular_value_rates(model, objective)
    s = model.component_norms()
    nonzero = s > EIGEN_CUTOFF * jnp.max(s)
    rate = end_to_end_rate(model, objective)
    return relative_max(jnp.where(nonzero, measured - law, 0.0), rate)


def _singular_values(matrix):
    return jnp.linalg.svd(jnp.asarray(matrix), compute_uv=False)


def effective_rank(matrix: Float[ArrayLike, "a b"]) -> Float[Array, ""]:
    r"""Roy–Vetterli effective rank (§1.6): $\exp(-\sum_ip_i\log p_i)$, $p_i=\sigma_i/\sum_k\sigma_k$.

    Only singular values above `EIGEN_CUTOFF`$\cdot\sigma_{\max}$ count. Returns a
    value in $[1,\operatorname{rank}]$, and 0 for the zero matrix.
    """
    s = _singular_values(matrix)
    keep = s > EIGEN_CUTOFF * jnp.max(s)
    s = jnp.where(keep, s, 0.0)
    total = jnp.sum(s)
    p = s / jnp.where(total > 0, total, 1.0)
    entropy = -jnp.sum(jnp.where(keep, p * jnp.log(jnp.where(keep, p, 1.0)), 0.0))
    return jnp.where(total > 0, jnp.exp(entropy), 0.0)


def schatten(matrix: Float[ArrayLike, "a b"], p: float) -> Float[Array, ""]:
    r"""Schatten-$p$ norm $(\sum_i\sigma_i^p)^{1/p}$; a quasi-norm for $0<p<1$ (§2.1)."""
    check_positive("p", p, scalar=True)
    s = _singular_values(matrix)
    return jnp.sum(s**p) ** (1.0 / p)


def distance_from_rank_one(matrix: Float[ArrayLike, "a b"]) -> Float[Array, ""]:
    r"""$\sigma_2$: the distance to the rank-≤1 matrices (Eckart–Young, §2.2); 0 if a side is 1."""
    s = _singular_values(matrix)
    return s[1] if s.shape[0] > 1 else jnp.zeros((), s.dtype)


def rank_suboptimality_2x2(matrix: Float[ArrayLike, "2 2"]) -> Float[Array, ""]:
    r"""$\max\{\sigma_2,\operatorname{erank}-1\}$: Razin–Cohen's rank-subopt of the unperturbed 2×2 problem (§2.2)."""
    return jnp.maximum(distance_from_rank_one(matrix), effective_rank(matrix) - 1.0)


def residual_scale(model, objective) -> Float[Array, ""]:
    r"""$s=\sqrt{2\ell_{\text{sum}}}=\sqrt{2m\mathcal L}$ for gradflow's mean loss $\mathcal L$ over $m$ observations.

    The $s$ of Razin & Cohen's bounds (docs: Theory › Norms go to infinity), which bounds
    every observed residual: $|z_i|\le s$.
    """
    return jnp.sqrt(2.0 * objective.num_observations * objective(model))


def rc_norm_lower_bound(s: ArrayLike) -> Float[Array, "..."]:
    r"""$(1-s)^2/s$, a lower bound on $|w_{11}|$ when $\det W>0$ and $0<s<1$ (§2.3).

    For $s\ge1$ the bound is vacuous and 0 is returned.
    """
    s = jnp.asarray(s)
    safe = jnp.where((s > 0) & (s < 1), s, 0.5)
    return jnp.where(s < 1, jnp.where(s > 0, (1 - safe) ** 2 / safe, jnp.inf), 0.0)


def rc_sigma2_upper_bound(s: ArrayLike) -> Float[Array, "..."]:
    r"""$s+s(1+s)^2/(1-s)^2$, an upper bound on $\sigma_2(W)$ when $\det W>0$, $s<1$ (§2.3).

    For $s\ge1$ the bound is vacuous and $+\infty$ is returned.
    """
    s = jnp.asarray(s)
    safe = jnp.where(s < 1, s, 0.0)
    return jnp.where(s < 1, safe + safe * (1 + safe) ** 2 / (1 - safe) ** 2, jnp.inf)


def rc_perturbed_bounds(s: ArrayLike, z: float, z2: float, eps: float):
    r"""§2.4's explicit bounds for observations $b_{12}=z$, $b_{21}=z'$ (`z2`), $b_{22}=\epsilon$.

    If $\operatorname{sign}\det W=\operatorname{sign}(zz')$ and $s<\min(|z|,|z'|)$:
    $|w_{11}|\ge\frac{(|z|-s)(|z'|-s)}{|\epsilon|+s}$ and
    $\sigma_2\le(|\epsilon|+s)\big(1+\frac{(|z|+s)(|z'|+s)}{(|z|-s)(|z'|-s)}\big)$.

    **Arguments:**

    - `s`: $\sqrt{2\ell_{\text{sum}}}$ (see [`gradflow.analysis.matrix.residual_scale`][]).
    - `z`, `z2`: the nonzero off-diagonal observations.
    - `eps`: the observed $(1,1)$ entry (0-based), any value.

    **Returns:** `(lower bound on |w11|, upper bound on σ_2)`; `(0, inf)` (vacuous)
    where $s\ge\min(|z|,|z'|)$.
    """
    if z == 0 or z2 == 0:
        raise ValueError(f"`z` and `z2` must be nonzero, got {z!r} and {z2!r}.")
    s = jnp.asarray(s)
    a, b, e = abs(z), abs(z2), abs(eps)
    valid = s < min(a, b)
    safe = jnp.where(valid, s, 0.0)
    denom = e + safe
    lower = (a - safe) * (b - safe) / jnp.where(denom > 0, denom, 1.0)
    lower = jnp.where(denom > 0, lower, jnp.inf)
    upper = denom * (1 + (a + safe) * (b + safe) / ((a - safe) * (b - safe)))
    return jnp.where(valid, lower, 0.0), jnp.where(valid, upper, jnp.inf)


def balancedness_verdict(imbalances, scales, tolerance: float | None = None, *,
                         rtol: float | None = None) -> Verdict:
    r"""§1.2 along a trajectory, from saved `imbalance_vector` (shape `(T, n)`) and
    `layer_scale` (shape `(T,)`): the drift of the $C_j$ from their initial values,
    relative to the largest $\|W_j\|_F^2$ seen (the scale of their rounding error).

    `tolerance` (> 0) defaults to
    `gradflow.analysis.verdict.drift_tolerance(rtol, dtype)`, with
    `rtol` the one the trajectory was solved at (default: the library's default for
    the dtype); give one of them."""
    c = check_saved("imbalances", imbalances, "(T, n)", ndim=2)
    s = check_saved("scales", scales, "(T,)", ndim=1)
    if len(s) != len(c):
        raise ValueError(f"`scales` must have one value per save of `imbalances` ({len(c)}), "
                         f"got {len(s)}.")
    tolerance = verdict_tolerance(tolerance, rtol, c.dtype)
    drift = np.abs(c - c[0]).max() if c.size else 0.0
    scale = max(float(np.max(np.abs(s))), np.finfo(float).tiny)
    return Verdict("balancedness_drift", float(drift / scale), tolerance)


def determinant(model: DeepMatrix) -> Float[Array, ""]:
    r"""$\det W$ as $\prod_j\det W_j$ when every layer is square (it keeps its accuracy
    when $\det W$ is far below the rounding error of $W$'s entries), else $\det W$."""
    if all(w.shape[0] == w.shape[1] for w in model.layers):
        return jnp.prod(jnp.stack([jnp.linalg.det(w) for w in model.layers]))
    return jnp.linalg.det(model.full())


RC_OBSERVERS = {
    "end": lambda t, m, o: m.full(),
    "det": lambda t, m, o: determinant(m),
    "singular_values": lambda t, m, o: m.component_norms(),
    "effective_rank": lambda t, m, o: effective_rank(m.full()),
    "s": lambda t, m, o: residual_scale(m, o),
}
"""Observers that [`gradflow.analysis.matrix.rc_measures`][] reads off a 2×2 trajectory."""


def rc_measures(trajectory, z: float = 1.0, z2: float = 1.0, eps: float = 0.0) -> dict:
    r"""Per-save norms, rank measures and the §2.3/§2.4 bounds along a 2×2 trajectory.

    **Arguments:**

    - `trajectory`: a flow of a 2×2 `DeepMatrix` observed with `RC_OBSERVERS`.
    - `z`, `z2`, `eps`: the observed (1,2), (2,1) and (2,2) entries (§2.4; the
      defaults are §2.1's problem).

    **Returns:** a dict of arrays over the saves: `loss`, `s`, `abs_w11`, `frobenius`,
    `nuclear`, `sigma_min` ($|\det W|/\sigma_1$), `effective_rank`, `rank_subopt`,
    `det`, `sign_kept` (det still has its initial sign, at this save and all before),
    `w11_lower_bound`, `sigma_min_upper_bound`.
    """
    end = np.asarray(trajectory["end"])
    sv = np.asarray(trajectory["singular_values"])
    det = np.asarray(trajectory["det"])
    s = np.asarray(trajectory["s"])
    sigma2 = np.abs(det) / sv[:, 0]
    lower, upper = (np.asarray(b) for b in rc_perturbed_bounds(s, z, z2, eps))
    erank = np.asarray(trajectory["effective_rank"])
    return {
        "loss": np.asarray(trajectory["loss"]),
        "s": s,
        "abs_w11": np.abs(end[:, 0, 0]),
        "frobenius": np.sqrt(np.sum(sv**2, axis=1)),
        "nuclear": np.sum(sv, axis=1),
        "sigma_min": sigma2,
        "effective_rank": erank,
        "rank_subopt": np.maximum(sigma2, erank - 1.0),
        "det": det,
        "sign_kept": np.cumprod(np.sign(det) == np.sign(det[0])).astype(bool),
        "w11_lower_bound": lower,
        "sigma_min_upper_bound": upper,
    }


def rc_bound_report(measures: dict) -> dict:
    """How the §2.3/§2.4 bounds fared on the saves where det kept its initial sign and
    the bounds apply ($s<\\min(|z|,|z'|)$): the worst ratios, and `violation`, how far
    the worst one is past its bound (0 when both hold)."""
    on = measures["sign_kept"] & (measures["w11_lower_bound"] > 0)
    if not np.any(on):
        return {"saves_checked": 0, "violation": 0.0, "holds": True}
    w11_ratio = measures["abs_w11"][on] / measures["w11_lower_bound"][on]
    s2_ratio = measures["sigma_min"][on] / measures["sigma_min_upper_bound"][on]
    violation = max(1.0 - float(w11_ratio.min()), float(s2_ratio.max()) - 1.0, 0.0)
    return {
        "saves_checked": int(on.sum()),
        "min_abs_w11_over_bound": float(w11_ratio.min()),
        "max_sigma_min_over_bound": float(s2_ratio.max()),
        "violation": violation,
        "holds": violation == 0.0,
    }
