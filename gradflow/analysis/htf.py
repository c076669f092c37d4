"""Theorem quantities of hierarchical tensor factorization along gradient flow (docs: Theory, §4).

Functions of a model (and objective) return arrays and can be used in observers.
Per-component arrays are flat in the order of [`gradflow.HTF.component_norms`][]
(interior nodes in `tree.interior` order, root last; component `r` fastest).

**Loss convention.** $\\gamma_{\\nu,r}$ (§4.5) is taken against the objective
exactly as the flow sees it: gradflow's objectives *average* over the $m$
observations, $\\mathcal L=\\frac1m\\sum\\tfrac12z^2$, and the flow is
$\\dot\\theta=-\\nabla\\mathcal L$, so the identity and the law hold with this
$\\mathcal L$ and no extra factor. Against a half-*sum* loss $\\tfrac12\\sum z^2$ (as in
the closed forms of §5), $\\gamma$ is $m$ times larger and time runs $m$ times faster:
a time read off §5 is multiplied by $m$ here.
"""

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from .._numerics import safe_divide
from .._validate import check_saved
from ..models.base import AbstractFactorization
from ..models.htf import HTF
from .._vector_field import rate_along_flow, vector_field
from .matrix import EIGEN_CUTOFF, effective_rank
from .verdict import Verdict, relative_max, verdict_tolerance, worst


def squared_norm_gaps(model: HTF) -> Float[Array, " gaps"]:
    r"""$\|\mathbf a^{(\nu,r)}_k\|^2-\|W^{(\nu)}_{r,:}\|^2$ for every child vector $k$, conserved (§4.4).

    Flat: node by node (`tree.interior` order), then child `k`, then `r`; length
    $\sum_\nu(K_\nu-1)R_\nu$. Every conserved gap of §4.4 is a difference of these.
    """
    sq = [n**2 for n in model.local_vector_norms().values()]
    return jnp.concatenate([(s[:-1] - s[-1:]).ravel() for s in sq])


def vector_scale(model: HTF) -> Float[Array, ""]:
    r"""$\max_{\nu,r,k}\|\mathbf a^{(\nu,r)}_k\|^2$: the scale of the rounding error of the gaps."""
    return jnp.max(jnp.stack([jnp.max(n**2) for n in model.local_vector_norms().values()]))


def unbalancedness(model: HTF) -> Float[Array, ""]:
    r"""$\epsilon_H=\max_{\nu,r,k,k'}\big|\|\mathbf a^{(\nu,r)}_k\|^2-\|\mathbf a^{(\nu,r)}_{k'}\|^2\big|$ (§4.4)."""
    sq = [n**2 for n in model.local_vector_norms().values()]
    return jnp.max(jnp.stack([jnp.max(s.max(axis=0) - s.min(axis=0)) for s in sq]))


def conservation_verdict(gaps, scales, tolerance: float | None = None, *,
                         rtol: float | None = None) -> Verdict:
    r"""§4.4 along a trajectory (check H1), from saved `squared_norm_gaps` (shape
    `(T, n)`) and `vector_scale` (shape `(T,)`): the drift of the gaps from their
    initial values, relative to the largest squared vector norm seen.

    `tolerance` (> 0) defaults to
    `gradflow.analysis.verdict.drift_tolerance(rtol, dtype)`, with
    `rtol` the one the trajectory was solved at (default: the library's default for
    the dtype); give one of them."""
    g = check_saved("gaps", gaps, "(T, n)", ndim=2)
    s = check_saved("scales", scales, "(T,)", ndim=1)
    if len(s) != len(g):
        raise ValueError(f"`scales` must have one value per save of `gaps` ({len(g)}), got "
                         f"{len(s)}.")
    tolerance = verdict_tolerance(tolerance, rtol, g.dtype)
    drift = np.abs(g - g[0]).max() if g.size else 0.0
    scale = max(float(np.max(np.abs(s))), np.finfo(float).tiny)
    return Verdict("htf_gap_drift", float(drift / scale), tolerance)


def num_axes(model: HTF) -> Float[Array, " components"]:
    r"""$K_\nu=|C(\nu)|+1$ for every local component, flat (in the weights' float dtype)."""
    tree, dtype = model.tree, model.weights[0].dtype
    return jnp.concatenate(
        [jnp.full(model.weights[v].shape[0], tree.num_axes(v), dtype) for v in tree.interior]
    )


def gammas(model: HTF, objective) -> Float[Array, " components"]:
    r"""$\gamma_{\nu,r}=\langle-\nabla\mathcal L(\mathcal W_H),\hat{\mathcal H}_{\nu,r}\rangle$ (§4.5),
    0 where $P_{\nu,r}=0$.

    By Euler's identity $\gamma_{\nu,r}P_{\nu,r}=\langle W^{(\nu)}_{r,:},\dot W^{(\nu)}_{r,:}\rangle$,
    with $\dot W=-\nabla\phi$ the flow's velocity.
    """
    velocity = vector_field(0.0, model, objective)
    inner = jnp.concatenate(
        [jnp.sum(model.weights[v] * velocity.weights[v], axis=1) for v in model.tree.interior]
    )
    p = model.component_norms()
    return safe_divide(inner, p)


def local_norm_rates(model: HTF, objective) -> Float[Array, " components"]:
    r"""$\dot P_{\nu,r}$ under the flow, by the chain rule (a JVP along $-\nabla\phi$)."""
    return rate_along_flow(lambda m: m.component_norms(), model, objective)


def identity_rate(model: HTF, objective) -> Float[Array, " components"]:
    r"""Right side of the exact identity (§4.5): $\gamma_{\nu,r}\sum_k\prod_{k'\ne k}\|\mathbf a^{(\nu,r)}_{k'}\|^2$."""
    sums = []
    for n in model.local_vector_norms().values():
        sq = n**2
        sums.append(sum(jnp.prod(jnp.delete(sq, k, axis=0), axis=0) for k in range(sq.shape[0])))
    return gammas(model, objective) * jnp.concatenate(sums)


def corollary_rate(model: HTF, objective) -> Float[Array, " components"]:
    r"""The balanced law (§4.5): $K_\nu\gamma_{\nu,r}P_{\nu,r}^{2-2/K_\nu}$, exact when $\epsilon_H=0$."""
    k = num_axes(model)
    return k * gammas(model, objective) * model.component_norms() ** (2 - 2 / k)


def identity_residual(model: HTF, objective) -> Float[Array, ""]:
    """max over components of |Ṗ − identity| relative to the largest |Ṗ| (check H2)."""
    rate = local_norm_rates(model, objective)
    return relative_max(rate - identity_rate(model, objective), rate)


def corollary_residual(model: HTF, objective) -> Float[Array, ""]:
    """As `identity_residual`, for the law Ṗ = Kγ P^(2−2/K) (check H3; needs ε_H = 0)."""
    rate = local_norm_rates(model, objective)
    return relative_max(rate - corollary_rate(model, objective), rate)


class MatricizationRank(NamedTuple):
    """Rank measures of one matricization (§4.3).

    **Fields:** `singular_values` (descending), `rank` (numerical: the number of
    singular values above `rtol` times the largest), `effective_rank` (§1.6, as
    [`gradflow.analysis.matrix.effective_rank`][] computes it).
    """

    singular_values: Float[Array, " k"]
    rank: Int[Array, ""]
    effective_rank: Float[Array, ""]


def matricization(tensor: Float[ArrayLike, "..."], modes: Sequence[int]) -> Float[Array, "a b"]:
    r"""$\llbracket\mathcal W;I\rrbracket$: rows indexed by the modes in $I=$ `modes`, columns by the rest (§4.3).

    Both sides are in increasing mode order (row-major).

    **Arguments:**

    - `tensor`: an order-$N$ array.
    - `modes`: a non-empty proper subset $I$ of $\{0,\dots,N-1\}$ (order ignored).

    **Returns:** a $\prod_{n\in I}d_n\times\prod_{n\notin I}d_n$ matrix.
    """
    tensor = jnp.asarray(tensor)
    rows = _check_modes(modes, tensor.ndim)
    cols = tuple(n for n in range(tensor.ndim) if n not in rows)
    size = math.prod(tensor.shape[n] for n in rows)
    return jnp.transpose(tensor, rows + cols).reshape(size, -1)


def matricization_rank(
    model: AbstractFactorization | Float[ArrayLike, "..."],
    modes: Sequence[int],
    rtol: float = EIGEN_CUTOFF,
) -> MatricizationRank:
    """Singular values, numerical rank and effective rank of $\\llbracket\\mathcal W;I\\rrbracket$.

    **Arguments:**

    - `model`: any gradflow model (its end tensor is used) or a tensor.
    - `modes`: the row modes $I$, any non-empty proper subset (e.g. `(0, 2)` for
      the partition $\\{0,2\\}$ vs $\\{1,3\\}$).
    - `rtol`: singular values above `rtol` times the largest count toward `rank`.

    **Returns:** a [`gradflow.analysis.htf.MatricizationRank`][].
    """
    tensor = model.full() if isinstance(model, AbstractFactorization) else jnp.asarray(model)
    mat = matricization(tensor, modes)
    s = jnp.linalg.svd(mat, compute_uv=False)
    rank = jnp.sum(s > rtol * s[0])
    return MatricizationRank(s, rank, effective_rank(mat))


def hierarchical_ranks(model: HTF, rtol: float = EIGEN_CUTOFF) -> dict[int, MatricizationRank]:
    r"""The hierarchical tensor rank (§4.3): `matricization_rank` at every non-root node.

    **Returns:** `{v: MatricizationRank}` for every node id `v` but the root, with
    rows indexed by `tree.modes[v]`.
    """
    tensor, tree = model.full(), model.tree
    return {v: matricization_rank(tensor, tree.modes[v], rtol) for v in range(tree.root)}


def rank_bounds(model: HTF, threshold: float = 0.0) -> dict[int, Int[Array, ""]]:
    r"""§4.3's bound on $\operatorname{rank}\llbracket\mathcal W_H;\nu\rrbracket$ by local components (check H4).

    With $n_\nu=\#\{r:P_{\nu,r}>\text{threshold}\}$: $\min(n_\nu,n_{Pa(\nu)})$ at an
    interior non-root node and $n_{Pa(\{n\})}$ at a leaf. With `threshold = 0` this is
    the exact theorem; a positive threshold makes it a heuristic for "non-negligible".

    **Returns:** `{v: bound}` for every node id `v` but the root.
    """
    tree = model.tree
    count = {v: jnp.sum(p > threshold) for v, p in model.local_component_norms().items()}
    above = {v: count[p] for v, p in enumerate(tree.parent) if p is not None}  # not the root
    return {v: above[v] if tree.is_leaf(v) else jnp.minimum(count[v], above[v]) for v in above}


def rank_bound_excess(
    model: HTF, threshold: float = 0.0, rtol: float = EIGEN_CUTOFF
) -> Float[Array, ""]:
    """max over non-root nodes of (numerical rank − `rank_bounds`); H4 holds iff it is <= 0.

    An integer held in the weights' float dtype, so that it can be an observer
    (Diffrax fills unsaved outputs with `inf`, which an integer array cannot hold).
    """
    ranks = hierarchical_ranks(model, rtol)
    bounds = rank_bounds(model, threshold)
    excess = jnp.max(jnp.stack([ranks[v].rank - bounds[v] for v in ranks]))
    return excess.astype(model.weights[0].dtype)


def rank_bound_verdict(excesses) -> Verdict:
    """H4 along a trajectory, from saved `rank_bound_excess` values (shape `(T,)`):
    passes iff none is > 0."""
    excesses = check_saved("excesses", excesses, "(T,)", ndim=1)
    return worst("h4_rank_excess", excesses, 0.0)


def _check_modes(modes, order: int) -> tuple[int, ...]:
    try:
        rows = tuple(sorted(int(m) for m in modes))
    except TypeError:
        raise ValueError(f"`modes` must be a sequence of ints, got {modes!r}.") from None
    if len(set(rows)) != len(rows) or any(m < 0 or m >= order for m in rows):
        raise ValueError(
            f"`modes` must be distinct modes in [0, {order}), got {tuple(modes)!r}."
        )
    if not 0 < len(rows) < order:
        raise ValueError(
            f"`modes` must be a non-empty proper subset of the {order} modes, got {tuple(modes)!r}."
        )
    return rows
