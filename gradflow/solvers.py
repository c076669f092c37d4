"""Rosenbrock-W solver for Diffrax: linearly implicit, with a cheap approximate Jacobian."""

from typing import ClassVar

import diffrax as dfx
import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np

from .stiffness import AbstractStiffness, LargestComponents

# ROS34PW2 (Rang & Angermann 2005): 4 stages, order 3 with an embedded order-2
# estimate, L-stable, stiffly accurate, and a W-method: its order holds for any
# Jacobian approximation W. Coefficients as in PETSc's TSROSWRA34PW2.
_GAMMA = 4.3586652150845900e-01
_A = np.array(
    [
        [0.0, 0.0, 0.0, 0.0],
        [8.7173304301691801e-01, 0.0, 0.0, 0.0],
        [8.4457060015369423e-01, -1.1299064236484185e-01, 0.0, 0.0],
        [0.0, 0.0, 1.0, 0.0],
    ]
)
_G = np.array(  # strictly lower part of PETSc's Gamma; its diagonal is _GAMMA
    [
        [0.0, 0.0, 0.0, 0.0],
        [-8.7173304301691801e-01, 0.0, 0.0, 0.0],
        [-9.0338057013044082e-01, 5.4180672388095326e-02, 0.0, 0.0],
        [2.4212380706095346e-01, -1.2232505839045147e00, 5.4526025533510214e-01, 0.0],
    ]
)
_B = np.array(
    [2.4212380706095346e-01, -1.2232505839045147e00, 1.5452602553351020e00, _GAMMA]
)
_B_EMBEDDED = np.array(
    [3.7810903145819369e-01, -9.6042292212423178e-02, 0.5, 2.1793326075422950e-01]
)


def _combine(coeffs, trees, base=None):
    """`base + sum_i coeffs[i] * trees[i]`, skipping zero coefficients."""
    out = base
    for c, tree in zip(coeffs, trees):
        if c == 0.0:
            continue
        term = jax.tree.map(lambda x: c * x, tree)
        out = term if out is None else jax.tree.map(jnp.add, out, term)
    return out


class RosenbrockW(dfx.AbstractAdaptiveSolver):
    """ROS34PW2, a third-order Rosenbrock-W method, for gradient flow.

    Each step solves four linear systems $(I - h\\gamma W)k_i = \\dots$ with the
    approximate Jacobian $W$ from `stiffness` (the Gauss–Newton matrix on the largest
    components by default), and uses four gradient evaluations. The vector field must
    be autonomous and the state a factorized model (`args` is the objective).

    **Arguments:**

    - `stiffness`: an [`gradflow.AbstractStiffness`][]; `LargestComponents(8)` by default.
    - `refresh_every`: rebuild $W$ every this many steps and reuse it in between (a
      W-method stays third order with a stale $W$; only stability depends on it).
    """

    stiffness: AbstractStiffness = LargestComponents()
    refresh_every: int = eqx.field(static=True, default=4)
    term_structure: ClassVar = dfx.AbstractTerm
    interpolation_cls: ClassVar = dfx.ThirdOrderHermitePolynomialInterpolation
    evaluations_per_step: ClassVar[int] = 4

    def order(self, terms):
        return 3

    def init(self, terms, t0, t1, y0, args):
        jac = self.stiffness.linearise(y0, args)
        return terms.vf(t0, y0, args), jac, jnp.array(0)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        del made_jump
        h = t1 - t0
        f0, jac, age = solver_state
        fresh = age >= self.refresh_every
        # Under vmap (sweeps) `fresh` is batched and a `lax.cond` on it would become a
        # select that linearises at every step; branch on "any member is due" instead.
        jac = lax.cond(
            eqxi.unvmap_any(fresh),
            lambda: jax.tree.map(
                lambda new, old: jnp.where(fresh, new, old) if eqx.is_array(new) else new,
                self.stiffness.linearise(y0, args), jac,
            ),
            lambda: jac,
        )
        age = jnp.where(fresh, 1, age + 1)
        solve = jac.shifted(h * _GAMMA)
        ks = []
        for i in range(4):
            if i == 0:
                f = f0
            else:
                f = terms.vf(t0, _combine(_A[i, :i], ks, y0), args)
            rhs = jax.tree.map(lambda x: h * x, f)
            coupled = _combine(_G[i, :i], ks)
            if coupled is not None:
                w = jac.matvec(coupled)
                rhs = jax.tree.map(lambda r, x: r + h * x, rhs, w)
            ks.append(solve(rhs))
        y1 = _combine(_B, ks, y0)
        y_error = _combine(_B - _B_EMBEDDED, ks)
        f1 = terms.vf(t1, y1, args)
        k0 = jax.tree.map(lambda x: h * x, f0)
        k1 = jax.tree.map(lambda x: h * x, f1)
        dense_info = dict(y0=y0, y1=y1, k0=k0, k1=k1)
        return y1, y_error, dense_info, (f1, jac, age), dfx.RESULTS.successful

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)
