"""The built-in theorem checks of `gradflow verify` (THEORY.md §6's check matrix).

Each check draws random instances (orders, shapes, depths, trees, scales), integrates
them with Dopri8 at rtol 1e-11 (the accuracy THEORY.md's expectations assume) unless
the problem needs a stiff solver, and reduces a residual along the trajectory.
"""

import diffrax as dfx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from ..analysis import closed_forms as oracle
from ..analysis import cp as acp
from ..analysis import htf as ahtf
from ..analysis import matrix as am
from ..data import random_cp_tensor, sample_indices
from .._flow import flow
from ..models.cp import CP
from ..models.htf import HTF, ModeTree
from ..models.matrix import DeepMatrix
from ..objectives import Completion, HuberLoss
from ..observers import squared_vector_norms
from ..solvers import RosenbrockW
from ..stiffness import DenseHessian
from .registry import Case, Check, register

ACCURATE = dict(solver=dfx.Dopri8(), rtol=1e-11, atol=1e-14, max_steps=200_000)


def _rng(key) -> np.random.Generator:
    return np.random.default_rng(int(jr.randint(key, (), 0, 2**31 - 1)))


def _linear(t1: float, num: int = 25) -> np.ndarray:
    return np.linspace(0.0, t1, num)


def _accurate_case(model, objective, t1, observers, description) -> Case:
    """A case integrated accurately to `t1`, observed at 25 equally spaced times."""
    return Case(model, objective, dict(t1=t1, save_times=_linear(t1), observers=observers,
                                       **ACCURATE), description)


def _max_observed(name):
    return lambda tr, case: float(np.max(tr[name]))


def _all_indices(shape):
    return jnp.stack(jnp.unravel_index(jnp.arange(int(np.prod(shape))), shape), axis=1)


def _orthonormal(key, d, k):
    return jnp.linalg.qr(jr.normal(key, (d, k)))[0]


# --- CP, §3 ---------------------------------------------------------------------------


def _cp_case(key, observers, balanced=False):
    rng = _rng(key)
    order, d, rank = int(rng.integers(3, 5)), int(rng.integers(2, 5)), int(rng.integers(2, 7))
    dims = (d,) * order
    m = min(int(rng.integers(8, 31)), d**order)
    scale = float(rng.uniform(0.2, 0.6))
    k_truth, k_obs, k_init = jr.split(key, 3)
    objective = Completion.from_tensor(random_cp_tensor(k_truth, dims, 2),
                                       sample_indices(k_obs, dims, m))
    make = CP.balanced if balanced else CP.gaussian
    model = make(k_init, dims, rank, scale)
    return _accurate_case(model, objective, 60.0 * m, observers(model),
                          f"order {order}, dims {d}, R={rank}, |Ω|={m}, scale {scale:.2g}")


register(Check(
    "cp-lemma1",
    "‖w_r^n‖² − ‖w_r^n'‖² is constant in time (Lemma 1, §3.2)",
    "any CP init (Gaussian, unbalanced), ℓ2 completion",
    lambda key: _cp_case(key, lambda m: {"sq": squared_vector_norms}),
    lambda tr, case: acp.conservation_verdict(tr["sq"]).value,
    1e-10,
))
register(Check(
    "cp-identity",
    "dP_r/dt = γ_r Σ_n Π_{n'≠n} ‖w_r^{n'}‖² (exact identity, §3.4)",
    "any CP init, ℓ2 completion",
    lambda key: _cp_case(key, lambda m: {"r": lambda t, m, o: acp.identity_residual(m, o)}),
    _max_observed("r"),
    1e-8,
))
register(Check(
    "cp-theorem1",
    "dP_r/dt within Theorem 1's bounds for unbalancedness ε (§3.5)",
    "ε = unbalancedness of the (Gaussian) init",
    lambda key: _cp_case(key, lambda m: {"r": (lambda eps: lambda t, m, o: acp.theorem1_violation(
        m, o, eps))(acp.unbalancedness(m))}),
    _max_observed("r"),
    1e-9,
))
register(Check(
    "cp-corollary1",
    "dP_r/dt = N γ_r P_r^(2−2/N) (Corollary 1, §3.6)",
    "balanced init (ε = 0)",
    lambda key: _cp_case(key, lambda m: {"r": lambda t, m, o: acp.corollary_residual(m, o)},
                         balanced=True),
    _max_observed("r"),
    1e-8,
))


def _huber_case(key):
    rng = _rng(key)
    order, d, rank = int(rng.integers(3, 5)), int(rng.integers(2, 4)), int(rng.integers(2, 5))
    dims = (d,) * order
    m = min(int(rng.integers(3, 9)), d**order)
    values = rng.choice([-1.0, 1.0], m) * rng.uniform(1.0, 2.0, m)
    delta = float(rng.uniform(0.1, 0.5) * np.min(np.abs(values)))
    k_obs, k_init = jr.split(key)
    objective = Completion(dims, sample_indices(k_obs, dims, m), jnp.asarray(values),
                           HuberLoss(delta))
    model = CP.gaussian(k_init, dims, rank, float(rng.uniform(0.05, 0.2)))
    rho = 0.5 * (float(np.min(np.abs(values))) - delta)
    g0 = -(delta / m) * jnp.sign(objective.values)
    observers = {
        "gradient_gap": lambda t, mdl, o: jnp.max(jnp.abs(
            jax.grad(o.loss_at)(o.predict(mdl)) - g0)) / jnp.max(jnp.abs(g0)),
        "gammas": lambda t, mdl, o: acp.gammas(mdl, o),
        "component_norms": lambda t, mdl, o: mdl.component_norms(),
    }
    t1 = 1e9
    save_times = np.concatenate([[0.0], np.geomspace(1e-3, t1, 400)])
    return Case(model, objective, dict(t1=t1, radius=rho, save_times=save_times,
                                       observers=observers, **ACCURATE),
                f"order {order}, dims {d}, R={rank}, |Ω|={m}, δ={delta:.2g}, ρ={rho:.2g}")


def _huber_residual(tr, case):
    """Worst of: ∇L ≠ G0, a decrease of some γ_r, and component r's trajectory
    changing when every other component is deleted (§3.8)."""
    gammas = np.asarray(tr["gammas"])
    drop = np.max(np.maximum(gammas[:-1] - gammas[1:], 0.0)) / np.max(np.abs(gammas))
    leader = int(np.argmax(tr["component_norms"][-1]))
    alone = flow(case.model.take(jnp.array([leader])), case.objective, t1=tr.t_final,
                 save_times=tr.ts, observers=["component_norms"], **ACCURATE)
    p = np.asarray(tr["component_norms"])[:, leader]
    coupling = np.max(np.abs(alone["component_norms"][:, 0] - p)) / np.max(p)
    return max(float(np.max(tr["gradient_gap"])), float(drop), float(coupling))


register(Check(
    "huber-small-ball",
    "inside ‖W‖ < min|y| − δ: ∇L ≡ G0, γ_r non-decreasing, components decoupled (§3.8, §5.5)",
    "Huber loss with δ < min|y| (A1), init inside the ball, stop on the sphere ρ",
    _huber_case,
    _huber_residual,
    1e-8,
))


# --- deep matrix factorization, §1–§2 -------------------------------------------------


def _dmf_case(key, observers, balanced):
    rng = _rng(key)
    depth = int(rng.integers(2, 5))
    dims = [int(x) for x in rng.integers(2, 6, depth + 1)]
    if balanced:  # hidden widths must hold the rank of the end matrix
        dims[1:-1] = [max(d, min(dims[0], dims[-1])) for d in dims[1:-1]]
    dims = tuple(dims)
    shape = (dims[-1], dims[0])
    m = int(rng.integers(max(2, shape[0] * shape[1] // 3), shape[0] * shape[1] + 1))
    k_truth, k_obs, k_init, k_end = jr.split(key, 4)
    truth = jr.normal(k_truth, shape)
    objective = Completion.from_tensor(truth, sample_indices(k_obs, shape, m))
    scale = float(rng.uniform(0.3, 0.8))
    if balanced:
        end = jr.normal(k_end, shape)
        model = DeepMatrix.balanced(k_init, scale * end / jnp.linalg.norm(end), dims)
    else:
        model = DeepMatrix.gaussian(k_init, dims, scale)
    return _accurate_case(model, objective, 10.0 * m, observers,
                          f"dims {dims}, |Ω|={m}, scale {scale:.2g}, "
                          f"{'balanced' if balanced else 'Gaussian'}")


register(Check(
    "dmf-balancedness",
    "C_j = W_{j+1}ᵀW_{j+1} − W_jW_jᵀ is constant in time (§1.2)",
    "any init (Gaussian, unbalanced), depth 2–4, random widths",
    lambda key: _dmf_case(key, {"c": lambda t, m, o: am.imbalance_vector(m),
                                "scale": lambda t, m, o: am.layer_scale(m)}, balanced=False),
    lambda tr, case: am.balancedness_verdict(tr["c"], tr["scale"]).value,
    1e-10,
))
register(Check(
    "dmf-end-to-end",
    "dW/dt = −Σ_j (WWᵀ)^((j−1)/L) ∇ℓ(W) (WᵀW)^((L−j)/L) (§1.4)",
    "balanced init (§1.3 construction)",
    lambda key: _dmf_case(key, {"r": lambda t, m, o: am.end_to_end_residual(m, o)},
                          balanced=True),
    _max_observed("r"),
    1e-8,
))
register(Check(
    "dmf-singular-values",
    "dσ_r/dt = −L σ_r^(2−2/L) u_rᵀ∇ℓ(W) v_r (§1.5)",
    "balanced init; nonzero singular values",
    lambda key: _dmf_case(key, {"r": lambda t, m, o: am.singular_value_residual(m, o)},
                          balanced=True),
    _max_observed("r"),
    1e-8,
))


def _rc_case(key, perturbed):
    rng = _rng(key)
    depth = int(rng.integers(3, 5))
    if perturbed:
        z, z2 = (rng.choice([-1.0, 1.0], 2) * rng.uniform(0.5, 2.0, 2)).tolist()
        eps = float(rng.choice([0.0, rng.uniform(0.01, 0.5)]))
    else:
        z, z2, eps = 1.0, 1.0, 0.0
    sign = float(np.sign(z * z2))
    end = jr.normal(key, (2, 2))
    end = end if float(jnp.sign(jnp.linalg.det(end))) == sign else end[::-1]
    scale = float(rng.uniform(0.02, 0.2))
    model = DeepMatrix.balanced(key, scale * end / jnp.linalg.norm(end), (2,) * (depth + 1))
    objective = Completion((2, 2), jnp.array([[0, 1], [1, 0], [1, 1]]), jnp.array([z, z2, eps]))
    loss_tol = float(10 ** rng.uniform(-6, -4))
    return Case(model, objective,
                dict(t1=1e14, loss_tol=loss_tol, observers=am.RC_OBSERVERS,
                     save_times=np.concatenate([[0.0], np.geomspace(1e-2, 1e14, 400)]),
                     solver=RosenbrockW(DenseHessian(), refresh_every=1), rtol=1e-10,
                     max_steps=400_000),
                f"depth {depth}, z={z:.3g}, z'={z2:.3g}, ε={eps:.3g}, scale {scale:.2g}, "
                f"to loss {loss_tol:.2g}", dict(z=z, z2=z2, eps=eps))


def _rc_residual(tr, case):
    measures = am.rc_measures(tr, case.extra["z"], case.extra["z2"], case.extra["eps"])
    return am.rc_bound_report(measures)["violation"]


register(Check(
    "rc-bounds",
    "|w11| ≥ (1−s)²/s and σ_min ≤ s + s(1+s)²/(1−s)² while det W > 0 (§2.3)",
    "2×2 problem, balanced init with det W(0) > 0, depth 3–4",
    lambda key: _rc_case(key, perturbed=False),
    _rc_residual,
    1e-9,
))
register(Check(
    "rc-perturbed-bounds",
    "|w11| ≥ (|z|−s)(|z'|−s)/(|ε|+s) and the σ_min bound (§2.4)",
    "2×2 perturbed problem, sign det W(0) = sign(zz'), depth 3–4",
    lambda key: _rc_case(key, perturbed=True),
    _rc_residual,
    1e-9,
))


# --- hierarchical tensor factorization, §4 --------------------------------------------


def _htf_case(key, observers, balanced):
    rng = _rng(key)
    order = int(rng.integers(3, 6))
    tree = [ModeTree.binary, ModeTree.adjacent, ModeTree.interleaved][int(rng.integers(3))](order)
    dims = tuple(int(x) for x in rng.integers(2, 4, order))
    widths = int(rng.integers(2, 4))
    m = min(int(rng.integers(10, 40)), int(np.prod(dims)))
    k_truth, k_obs, k_init = jr.split(key, 3)
    objective = Completion.from_tensor(random_cp_tensor(k_truth, dims, 2),
                                       sample_indices(k_obs, dims, m))
    scale = float(rng.uniform(0.3, 0.7))
    make = HTF.balanced if balanced else HTF.gaussian
    model = make(k_init, dims, tree, widths, scale)
    return _accurate_case(model, objective, 30.0 * m, observers,
                          f"tree {tree.structure}, dims {dims}, widths {widths}, |Ω|={m}, "
                          f"scale {scale:.2g}")


register(Check(
    "htf-conservation",
    "‖a_k^(ν,r)‖² − ‖W^(ν)_r,:‖² is constant in time (§4.4)",
    "Gaussian init, random trees (binary, adjacent, interleaved), N = 3–5",
    lambda key: _htf_case(key, {"gaps": lambda t, m, o: ahtf.squared_norm_gaps(m),
                                "scale": lambda t, m, o: ahtf.vector_scale(m)}, False),
    lambda tr, case: ahtf.conservation_verdict(tr["gaps"], tr["scale"]).value,
    1e-10,
))
register(Check(
    "htf-identity",
    "dP_(ν,r)/dt = γ_(ν,r) Σ_k Π_{k'≠k} ‖a_k'^(ν,r)‖² (local-component identity, §4.5)",
    "Gaussian init, random trees",
    lambda key: _htf_case(key, {"r": lambda t, m, o: ahtf.identity_residual(m, o)}, False),
    _max_observed("r"),
    1e-8,
))
register(Check(
    "htf-law",
    "dP_(ν,r)/dt = K_ν γ_(ν,r) P_(ν,r)^(2−2/K_ν) (§4.5)",
    "balanced (sign-matrix) init, random trees",
    lambda key: _htf_case(key, {"r": lambda t, m, o: ahtf.corollary_residual(m, o)}, True),
    _max_observed("r"),
    1e-8,
))
register(Check(
    "htf-rank-bound",
    "rank of every node's matricization ≤ number of nonzero local components (H4, §4.3)",
    "Gaussian init, random trees; max over saves of (rank − bound)",
    lambda key: _htf_case(key, {"r": lambda t, m, o: ahtf.rank_bound_excess(m)}, False),
    _max_observed("r"),
    0.0,
))


# --- closed forms, §5 -----------------------------------------------------------------


def _time_gap(predicted, actual) -> float:
    predicted, actual = np.asarray(predicted), np.asarray(actual)
    return float(np.max(np.abs(predicted - actual) / actual)) if actual.size else float("nan")


def _product_case(key):
    rng = _rng(key)
    order = int(rng.integers(2, 6))
    w0, y = float(10 ** rng.uniform(-3, -1)), float(rng.uniform(0.5, 2.0))
    model = CP(tuple(jnp.full((1, 1), w0 ** (1 / order)) for _ in range(order)))
    objective = Completion((1,) * order, jnp.zeros((1, order), int), jnp.array([y]))
    t1 = 1.5 * oracle.product_flow_time(w0, 0.5 * y, y, order)
    return Case(model, objective, dict(t1=t1, save_times=_linear(t1, 60), **ACCURATE),
                f"N={order}, w0={w0:.2g}, y={y:.2g}", dict(w0=w0, y=y, order=order))


def _product_residual(tr, case):
    w0, y, n = case.extra["w0"], case.extra["y"], case.extra["order"]
    w = np.asarray(tr["component_norms"])[:, 0]
    sel = (w > 1.01 * w0) & (w < 0.9 * y)
    return _time_gap([oracle.product_flow_time(w0, v, y, n) for v in w[sel]], tr.ts[sel])


register(Check(
    "closed-form-product",
    "balanced scalar product w = Π w_j reaches w at t(w) = ∫ du / (N u^(2−2/N) (y−u)) (§5.1)",
    "N = 2–5 factors, 0 < w0 < y",
    _product_case,
    _product_residual,
    1e-7,
))


def _aligned_case(key):
    rng = _rng(key)
    depth = int(rng.integers(2, 4))
    dims = tuple(int(x) for x in rng.integers(3, 6, depth + 1))
    k = min(dims[0], dims[-1], 3)
    y = np.sort(rng.uniform(0.5, 2.0, k))[::-1]
    sigma0 = np.sort(rng.uniform(0.01, 0.05, k))[::-1]  # no crossings: compare by index
    k_u, k_v, k_init = jr.split(key, 3)
    u, v = _orthonormal(k_u, dims[-1], k), _orthonormal(k_v, dims[0], k)
    objective = Completion.from_tensor((u * jnp.asarray(y)) @ v.T,
                                       _all_indices((dims[-1], dims[0])))
    model = DeepMatrix.balanced(k_init, (u * jnp.asarray(sigma0)) @ v.T, dims)
    m = dims[0] * dims[-1]  # the objective averages; THEORY sums: flow time = m × theory time
    t1 = m * max(oracle.product_flow_time(s, 0.9 * yr, yr, depth) for s, yr in zip(sigma0, y))
    return Case(model, objective, dict(t1=t1, save_times=_linear(t1, 80), **ACCURATE),
                f"dims {dims}, y={np.round(y, 2).tolist()}",
                dict(y=y, sigma0=sigma0, depth=depth, m=m))


def _aligned_residual(tr, case):
    e = case.extra
    sigma = np.asarray(tr["component_norms"])
    gaps = []
    for r, (s0, yr) in enumerate(zip(e["sigma0"], e["y"])):
        sel = (sigma[:, r] > 1.01 * s0) & (sigma[:, r] < 0.9 * yr)
        predicted = [e["m"] * oracle.product_flow_time(s0, v, yr, e["depth"])
                     for v in sigma[sel, r]]
        gaps.append(_time_gap(predicted, tr.ts[sel]))
    return max(gaps)


register(Check(
    "closed-form-aligned-dmf",
    "spectrally aligned DMF: each σ_r follows §5.1 with y_r (§5.2)",
    "full observation of UYVᵀ, balanced init U σ(0) Vᵀ, depth 2–3",
    _aligned_case,
    _aligned_residual,
    1e-7,
))


def _odeco_case(key):
    rng = _rng(key)
    order, d = 3, int(rng.integers(2, 4))
    c = np.sort(rng.uniform(0.5, 2.0, d))[::-1]
    a = float(rng.uniform(0.01, 0.05))
    us = [_orthonormal(k, d, d) for k in jr.split(key, order)]
    truth = CP(tuple(u * jnp.asarray(c) ** (1 / order) for u in us)).full()
    objective = Completion.from_tensor(truth, _all_indices((d,) * order))
    scale = d**order
    t1 = scale * oracle.product_flow_time(a**order, 0.8 * c[-1], c[-1], order)
    return Case(CP(tuple(a * u for u in us)), objective,
                dict(t1=t1, save_times=_linear(t1, 120), **ACCURATE),
                f"N=3, d={d}, c={np.round(c, 2).tolist()}, a={a:.2g}",
                dict(c=c, p0=a**order, scale=scale))


def _odeco_residual(tr, case):
    e = case.extra
    p = np.asarray(tr["component_norms"])
    gaps = []
    for r, cr in enumerate(e["c"]):
        sel = (p[:, r] > 1.01 * e["p0"]) & (p[:, r] < 0.8 * cr)
        predicted = [e["scale"] * oracle.product_flow_time(e["p0"], v, cr, 3) for v in p[sel, r]]
        gaps.append(_time_gap(predicted, tr.ts[sel]))
    return max(gaps)


register(Check(
    "closed-form-odeco-cp",
    "orthogonally decomposable CP: dP_r/dt = N(c_r − P_r)P_r^(2−2/N) (§5.3)",
    "full observation, init a·u_r^n along the truth's orthonormal factors",
    _odeco_case,
    _odeco_residual,
    1e-7,
))


def _escape_case(key):
    rng = _rng(key)
    order, d = int(rng.integers(3, 6)), int(rng.integers(2, 4))
    y, a = float(rng.uniform(1.0, 3.0)), float(rng.uniform(0.02, 0.1))
    delta = float(rng.uniform(0.1, 0.5) * y)
    rho = 0.5 * (y - delta)
    objective = Completion((d,) * order, jnp.zeros((1, order), int), jnp.array([y]),
                           HuberLoss(delta))
    model = CP((jnp.zeros((d, 1)).at[0, 0].set(a),) * order)
    expected = oracle.constant_gamma_hitting_time(a**order, rho, delta, order)
    return Case(model, objective, dict(t1=10 * expected, radius=rho, **ACCURATE),
                f"N={order}, a={a:.2g}, δ={delta:.2g}", dict(expected=expected))


register(Check(
    "closed-form-escape",
    "constant γ: the sphere ρ is hit at (P0^(−(N−2)/N) − ρ^(−(N−2)/N)) / ((N−2)γ) (§5.4)",
    "Huber, one observed entry, one component aligned with it (γ = δ)",
    _escape_case,
    lambda tr, case: abs(tr.t_final - case.extra["expected"]) / case.extra["expected"]
    if tr.status == "radius" else float("nan"),
    1e-8,
))
