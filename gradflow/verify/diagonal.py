"""Theorem checks of diagonal linear networks (`gradflow.analysis.diagonal`).

- `diagonal-limit`: at depth 2 from $u = v = \\alpha\\mathbf 1$, the flow's limit is
  $\\arg\\min Q_\\alpha$ subject to $X\\beta = y$ (Woodworth et al. 2020), the minimiser
  computed by a Newton solve of its KKT system, independently of the flow;
- `diagonal-limit-depth`: the same at depths 3 and 4 with the depth-$D$ potential;
- `diagonal-conservation`: $u_iv_i$ (depth 2) and $u_i^{2-D} + v_i^{2-D}$ (depth $D$)
  are constant along the flow, from a Gaussian init.

Every instance has the same shapes (d = 24 coordinates, n = 10 observations); the depth
is the shape *bucket* (instance `k` has depth `buckets[k % len(buckets)]["depth"]`, so
that a run of 2 or 3 cases covers every depth and solves the instances of a depth
together); the data, the truth's support and signs, $\\alpha$ and the init are random.
"""

import diffrax as dfx
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from ..analysis import diagonal as ad
from ..models.diagonal import DiagonalNet
from ..objectives import Sensing
from ..solvers import AutoStiff, RosenbrockW
from ..stiffness import GaussNewtonSubspace
from .registry import Case, Check, register

DIM, OBSERVATIONS = 24, 10
LIMIT_FLOW = dict(t1=1e16, loss_drop=1e-20, rtol=1e-10, max_steps=100_000,
                  solver=AutoStiff(RosenbrockW(GaussNewtonSubspace(rank=OBSERVATIONS))))
"""Flow to the limit: a loss drop of 1e-20 (residual 1e-10 of the initial one), with
the Gauss-Newton subspace of rank n (all of the Gauss-Newton matrix, of rank <= n)."""


def _rng(key) -> np.random.Generator:
    return np.random.default_rng(int(jr.randint(key, (), 0, 2**31 - 1)))


def _regression(rng):
    """X with N(0, 1) entries, a 1-3 sparse truth with signs, y = X beta*."""
    X = rng.standard_normal((OBSERVATIONS, DIM))
    k = int(rng.integers(1, 4))
    beta = np.zeros(DIM)
    beta[rng.choice(DIM, k, replace=False)] = rng.choice([-1.0, 1.0], k) * rng.uniform(0.5, 2, k)
    return X, X @ beta, k


DEPTH_BUCKETS = (dict(depth=3), dict(depth=4))
ALL_DEPTHS = (dict(depth=2), dict(depth=3), dict(depth=4))


def _limit_case(key, depth, log_alpha):
    rng = _rng(key)
    X, y, k = _regression(rng)
    alpha = float(10 ** rng.uniform(*log_alpha))
    model = DiagonalNet.uniform(DIM, alpha, depth=depth)
    return Case(model, Sensing(jnp.asarray(X), jnp.asarray(y)),
                dict(observers=["loss"], **LIMIT_FLOW),
                f"depth {depth}, d={DIM}, n={OBSERVATIONS}, {k}-sparse, alpha {alpha:.3g}",
                extra=dict(X=X, y=y, alpha=alpha, depth=depth))


def _limit_residual(trajectory, case) -> float:
    """|beta_flow - argmin Q| / |argmin Q| (the Newton solve must have converged)."""
    e = case.extra
    limit = ad.flow_limit(e["X"], e["y"], e["alpha"], e["alpha"], e["depth"])
    if not limit.converged:
        raise RuntimeError(f"the KKT solve did not converge (residual {limit.residual:.1e})")
    beta = np.asarray(trajectory.model.full(), dtype=float)
    return float(np.linalg.norm(beta - limit.beta) / np.linalg.norm(limit.beta))


register(Check(
    "diagonal-limit",
    "depth-2 diagonal net from u=v=α: lim β(t) = argmin Q_α s.t. Xβ=y (Woodworth et al.)",
    "ℓ2 regression, n < d, sparse truth, α log-uniform in [1e-3, 10]",
    lambda key: _limit_case(key, 2, (-3.0, 1.0)),
    _limit_residual,
    1e-6,
))
register(Check(
    "diagonal-limit-depth",
    "depth-D diagonal net from u=v=α: lim β(t) = argmin Q^D_α s.t. Xβ=y",
    "D ∈ {3, 4}, ℓ2 regression, n < d, α log-uniform in [1e-3, 10]",
    lambda key, bucket: _limit_case(key, bucket["depth"], (-3.0, 1.0)),
    _limit_residual,
    1e-6,
    DEPTH_BUCKETS,
))


def _conservation_case(key, depth):
    rng = _rng(key)
    X, y, k = _regression(rng)
    std = float(rng.uniform(0.2, 0.6))
    model = DiagonalNet.gaussian(key, DIM, std, depth=depth)
    t1 = 50.0
    observers = {"c": lambda t, m, o: ad.invariants(m)}
    return Case(model, Sensing(jnp.asarray(X), jnp.asarray(y)),
                dict(t1=t1, save_times=np.linspace(0.0, t1, 25), observers=observers,
                     solver=dfx.Dopri8(), rtol=1e-11, atol=1e-14, max_steps=200_000),
                f"depth {depth}, d={DIM}, n={OBSERVATIONS}, Gaussian std {std:.2g}")


register(Check(
    "diagonal-conservation",
    "u_i v_i (D=2) and u_i^(2−D) + v_i^(2−D) (D≥3) are constant along the flow",
    "any Gaussian init, depth 2–4, ℓ2 regression",
    lambda key, bucket: _conservation_case(key, bucket["depth"]),
    lambda tr, case: ad.conservation_verdict(tr["c"]).value,
    1e-9,
    ALL_DEPTHS,
))
