"""Theorem quantities of CP factorization along gradient flow, THEORY.md §3.

Functions of a model (and objective) return arrays and can be used as observers;
`*_residual` functions return one relative residual per call, and the verdict
functions at the bottom reduce a trajectory's saved residuals to a `Verdict`.
"""

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from .. import observers as _observers
from ..models.cp import CP
from .verdict import Verdict, relative_max


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


def conservation_verdict(squared_norms, tolerance: float = 1e-10) -> Verdict:
    r"""Lemma 1 along a trajectory, from saved `vector_norms()**2` (shape `(T, N, R)`).

    The drift of $\|\mathbf w_r^n\|^2-\|\mathbf w_r^1\|^2$ from its initial value,
    relative to the largest squared norm (the scale of its rounding error).
    """
    sq = np.asarray(squared_norms)
    gaps = sq - sq[:, :1, :]
    drift = np.abs(gaps - gaps[0]).max()
    scale = max(sq.max(), np.finfo(float).tiny)
    return Verdict("lemma1_drift", float(drift / scale), tolerance)


def tensor_rank_estimate(model: CP, rel_threshold: float = 1e-2) -> int:
    """Number of components whose norm exceeds `rel_threshold` times the largest."""
    p = np.asarray(model.component_norms())
    return int(np.sum(p > rel_threshold * p.max())) if p.max() > 0 else 0


def reconstruction_error(model, truth: ArrayLike) -> float:
    """$\\|\\mathcal W-\\mathcal W^*\\|/\\|\\mathcal W^*\\|$ against a ground-truth tensor."""
    truth = jnp.asarray(truth)
    return float(jnp.linalg.norm(model.full() - truth) / jnp.linalg.norm(truth))

