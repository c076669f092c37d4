"""Solvers for gradient flow: a Rosenbrock-W method with a cheap approximate Jacobian,
and the default that switches between it and an explicit method by itself."""

from typing import ClassVar, NamedTuple

import diffrax as dfx
import equinox as eqx
import equinox.internal as eqxi
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from .stiffness import AbstractStiffness, LargestComponents, as_shifted_solve, default_stiffness


class _Tableau(NamedTuple):
    """A Rosenbrock(-W) method: stages $k_i$ solve
    $(I-h\\gamma W)k_i=h f(y_0+\\sum_j a_{ij}k_j)+hW\\sum_j g_{ij}k_j$, and
    $y_1=y_0+\\sum_i b_ik_i$ with the embedded $\\hat b$ for the error estimate."""

    gamma: float
    a: np.ndarray
    g: np.ndarray
    b: np.ndarray
    b_embedded: np.ndarray
    order: int

    @property
    def stages(self) -> int:
        return len(self.b)


# ROS34PW2 (Rang & Angermann 2005): 4 stages, order 3 with an embedded order-2
# estimate, L-stable, stiffly accurate, and a W-method: its order holds for any
# Jacobian approximation W. Coefficients as in PETSc's TSROSWRA34PW2.
_GAMMA = 4.3586652150845900e-01
ROS34PW2 = _Tableau(
    gamma=_GAMMA,
    a=np.array([
        [0.0, 0.0, 0.0, 0.0],
        [8.7173304301691801e-01, 0.0, 0.0, 0.0],
        [8.4457060015369423e-01, -1.1299064236484185e-01, 0.0, 0.0],
        [0.0, 0.0, 1.0, 0.0],
    ]),
    g=np.array([  # strictly lower part of PETSc's Gamma; its diagonal is gamma
        [0.0, 0.0, 0.0, 0.0],
        [-8.7173304301691801e-01, 0.0, 0.0, 0.0],
        [-9.0338057013044082e-01, 5.4180672388095326e-02, 0.0, 0.0],
        [2.4212380706095346e-01, -1.2232505839045147e00, 5.4526025533510214e-01, 0.0],
    ]),
    b=np.array([2.4212380706095346e-01, -1.2232505839045147e00, 1.5452602553351020e00,
                _GAMMA]),
    b_embedded=np.array([3.7810903145819369e-01, -9.6042292212423178e-02, 0.5,
                         2.1793326075422950e-01]),
    order=3,
)


def _combine_stacked(coeffs, stacked, base=None):
    """`base + sum_i coeffs[i] * stacked[i]` for a tree of arrays stacked on their first
    axis (coefficients cast to each array's dtype)."""
    out = jax.tree.map(lambda s: jnp.tensordot(jnp.asarray(coeffs, s.dtype), s, axes=1), stacked)
    return out if base is None else jax.tree.map(jnp.add, base, out)


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
    tableau: ClassVar[_Tableau] = ROS34PW2
    evaluations_per_step: ClassVar[int] = ROS34PW2.stages
    """Gradient evaluations per step: one per stage after the first, whose value is
    the previous step's end, plus the end of the step."""

    def order(self, terms):
        return self.tableau.order

    def linearise(self, y, args, previous=None):
        """The approximate Jacobian at `y`, without gradient: a W-method keeps its
        order for any W, so derivatives of a solve are those of a consistent
        discretization, and differentiating an eigendecomposition or a top-k selection
        (ties at symmetric inits) would give NaNs."""
        return lax.stop_gradient(self.stiffness.linearise(y, args, previous))

    def init(self, terms, t0, t1, y0, args):
        return terms.vf(t0, y0, args), self.linearise(y0, args), jnp.array(0)

    def step(self, terms, t0, t1, y0, args, solver_state, made_jump):
        del made_jump
        f0, jac, age = solver_state
        y1, y_error, dense_info, f1, jac, age, _ = self.w_step(terms, t0, t1, y0, args, f0,
                                                               jac, age)
        return y1, y_error, dense_info, (f1, jac, age), dfx.RESULTS.successful

    def w_step(self, terms, t0, t1, y0, args, f0, jac, age):
        """One step from `y0` (with `f0` = f(y0)) and the linearisation `jac` of
        `age` steps; returns `(y1, y_error, dense_info, f1, jac, age, refreshed)`."""
        tab = self.tableau
        h = t1 - t0
        fresh = age >= self.refresh_every
        # Under vmap (sweeps) `fresh` is batched and a `lax.cond` on it would become a
        # select that linearises at every step; branch on "any member is due" instead.
        jac = lax.cond(
            eqxi.unvmap_any(fresh),
            lambda: jax.tree.map(
                lambda new, old: jnp.where(fresh, new, old) if eqx.is_array(new) else new,
                self.linearise(y0, args, jac), jac,
            ),
            lambda: jac,
        )
        age = jnp.where(fresh, 1, age + 1)
        solve = as_shifted_solve(jac.shifted(h * tab.gamma))
        scale = lambda tree: jax.tree.map(lambda x: h * x, tree)
        # The stages after the first in a `lax.scan` (one traced gradient, matvec and
        # solve instead of three); `ks` stacks the stage increments, zeros until set.
        k0 = solve(scale(f0))
        ks = jax.tree.map(lambda k: jnp.zeros((tab.stages,) + k.shape, k.dtype).at[0].set(k), k0)

        def stage(ks, i):
            y = _combine_stacked(jnp.asarray(tab.a)[i], ks, y0)
            coupled = _combine_stacked(jnp.asarray(tab.g)[i], ks)
            rhs = jax.tree.map(lambda f, w: h * (f + w), terms.vf(t0, y, args), jac.matvec(coupled))
            return jax.tree.map(lambda buf, k: buf.at[i].set(k), ks, solve(rhs)), None

        ks, _ = lax.scan(stage, ks, jnp.arange(1, tab.stages))
        y1 = _combine_stacked(tab.b, ks, y0)
        y_error = _combine_stacked(tab.b - tab.b_embedded, ks)
        f1 = terms.vf(t1, y1, args)
        # The slopes of the cubic Hermite dense output, damped in the stiff directions:
        # r(hγW) hf with r = 1-(1-(I-hγW)^{-1})^3. Along a curvature λ with z = hγλ,
        # r = 1-(z/(1+z))^3: 1-O(z^3) where the step resolves the flow (the
        # interpolant keeps its order: the slope changes by O(h^4)), and 3/(1+z) where
        # it does not. Undamped, a W step over a stiff direction multiplies the state's
        # small distance from the slow manifold (within the tolerance) by hλ in the
        # slope, and the interpolant between the two accurate ends swings by that much:
        # a 2x2 depth-4 flow at rtol 1e-10 saved a loss of 160 between steps whose ends
        # had 0.0174. Applied with the factors the step already has; no gradient.
        dense_info = dict(y0=y0, y1=y1, k0=solve.damped(scale(f0)), k1=solve.damped(scale(f1)))
        return y1, y_error, dense_info, f1, jac, age, fresh

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)


# --- the default: explicit while the flow is not stiff, Rosenbrock-W once it is -------

_TSIT5 = dfx.Tsit5.tableau
_TSIT5_STAGES = len(_TSIT5.b_sol)
_TSIT5_A = np.zeros((_TSIT5_STAGES, _TSIT5_STAGES))  # row i: the stage-i argument's weights
for _i, _row in enumerate(_TSIT5.a_lower):
    _TSIT5_A[_i + 1, : len(_row)] = _row
_TSIT5_C = np.concatenate([[0.0], _TSIT5.c])


def _tsit5_step(terms, t0, t1, y0, args, f0):
    """One Tsit5 step (Diffrax's tableau), first-same-as-last from `f0` = f(y0):
    `(y1, y_error, k, f1, y6)` with `k` the stacked stage increments h·f_i (what
    Tsit5's interpolation takes) and `y6` the argument of the sixth stage.

    A `lax.scan` over the stages, so that both forward and reverse mode differentiate
    it (Diffrax's own loop over the stages is set per adjoint by `diffeqsolve`, which
    does not look inside this solver)."""
    h = t1 - t0
    fs = jax.tree.map(lambda f: jnp.zeros((_TSIT5_STAGES,) + f.shape, f.dtype).at[0].set(f), f0)
    dot = lambda w, stack: jax.tree.map(
        lambda s: jnp.tensordot(jnp.asarray(w, s.dtype), s, axes=1), stack)
    add = lambda y, increment: jax.tree.map(lambda a, b: a + h * b, y, increment)

    def stage(fs, i):
        weights = jnp.asarray(_TSIT5_A)[i]
        f = terms.vf(t0 + jnp.asarray(_TSIT5_C, h.dtype)[i] * h, add(y0, dot(weights, fs)), args)
        return jax.tree.map(lambda buf, x: buf.at[i].set(x), fs, f), None

    fs, _ = lax.scan(stage, fs, jnp.arange(1, _TSIT5_STAGES))
    y1 = add(y0, dot(_TSIT5.b_sol, fs))
    y_error = jax.tree.map(lambda e: h * e, dot(_TSIT5.b_error, fs))
    y6 = add(y0, dot(_TSIT5_A[_TSIT5_STAGES - 2], fs))
    f1 = jax.tree.map(lambda s: s[-1], fs)
    return y1, y_error, jax.tree.map(lambda s: h * s, fs), f1, y6


class _SwitchedInterpolation(dfx.AbstractLocalInterpolation):
    """Dense output of a step of `AutoStiff`: Tsit5's own interpolation after an
    explicit step, the cubic Hermite one (from `k[0]`, `k[1]`) after a W step."""

    t0: jax.Array
    t1: jax.Array
    y0: object
    y1: object
    k: object
    stiff: jax.Array

    def evaluate(self, t0, t1=None, left=True):
        explicit = dfx.Tsit5.interpolation_cls(t0=self.t0, t1=self.t1, y0=self.y0,
                                               y1=self.y1, k=self.k)
        hermite = dfx.ThirdOrderHermitePolynomialInterpolation(
            t0=self.t0, t1=self.t1, y0=self.y0, y1=self.y1,
            k0=jax.tree.map(lambda k: k[0], self.k), k1=jax.tree.map(lambda k: k[1], self.k))
        return jax.tree.map(lambda a, b: jnp.where(self.stiff, b, a),
                            explicit.evaluate(t0, t1, left), hermite.evaluate(t0, t1, left))


class _SwitchState(eqx.Module):
    f0: object  # f(y0)
    jac: object  # the W step's linearisation (stale while explicit)
    age: jax.Array
    stiff: jax.Array  # the mode
    count: jax.Array  # explicit: stability-limited steps; stiff: steps an explicit one would take
    calm: jax.Array  # explicit: consecutive steps that were not stability-limited
    patience: jax.Array  # stability-limited explicit steps before switching to W steps
    h_explicit: jax.Array  # the last explicit step size (what a W step must beat)
    gained: jax.Array  # the W steps of this episode outgrew the explicit ones
    explicit_steps: jax.Array  # accepted steps of each kind, and linearisations
    stiff_steps: jax.Array
    refreshes: jax.Array


class AutoStiff(dfx.AbstractAdaptiveSolver):
    """Explicit steps while the flow is not stiff, Rosenbrock-W steps once stiffness
    limits the step, and back (the default solver, like LSODA or DifferentialEquations.jl's
    `AutoTsit5(Rosenbrock23())`).

    **Switching.** After every explicit Tsit5 step the stiffness is estimated from two
    of its stages at the same time, $h\\rho\\approx\\|k_7-k_6\\|/\\|y_1-\\hat y_6\\|$
    (Hairer & Wanner's test for Dormand–Prince). When $h\\rho$ exceeds the explicit
    stability boundary `boundary` on `stiff_after` accepted steps (with no run of six
    calm steps between), the step is limited by stability, not accuracy: the solver
    switches to the W method. It switches back after `explicit_after` consecutive W
    steps on which explicit steps would do as well: $h\\lambda<1$ ($\\lambda$ the
    stiffness approximation's largest curvature: an explicit step of that size is
    stable with room to spare), or $h$ below `gain` times the last explicit step (the
    W steps, which cost about as many gradients as an explicit one, are not longer).
    A W episode whose steps never outgrew the explicit ones doubles the patience
    before the next switch, so a flow that is stiff only mildly stays explicit
    (LSODA compares the two methods' step sizes in the same way). Under `jax.vmap`
    (sweeps) a step is a W step for every member once any member is in W mode.

    **Arguments:**

    - `stiff`: the [`gradflow.RosenbrockW`][] used once the flow is stiff.
    - `stiff_after`, `explicit_after`: the patience of the two switches.
    - `gain`: how much longer than the explicit steps the W steps must be to pay, for
      W steps that cost no more than explicit ones; a costlier stiffness approximation
      raises it in proportion (`gain_over_explicit`).
    - `boundary`: Tsit5's stability boundary on the negative real axis ($h\\rho$ above
      it means the step is stability-limited); 3.25 as in Hairer & Wanner.

    The step-size controller is told order 5, Tsit5's (the W method's is 3): measured
    on CP and deep-matrix problems, it takes fewer steps (rejections included) than
    telling it 4, whichever method takes most of them.
    """

    stiff: RosenbrockW = RosenbrockW()
    stiff_after: int = eqx.field(static=True, default=15)
    explicit_after: int = eqx.field(static=True, default=15)
    boundary: float = eqx.field(static=True, default=3.25)
    gain: float = eqx.field(static=True, default=1.0)
    term_structure: ClassVar = dfx.AbstractTerm
    interpolation_cls: ClassVar = _SwitchedInterpolation
    evaluations: ClassVar[dict] = {"explicit_steps": 6, "stiff_steps": ROS34PW2.stages}
    """Gradient evaluations per accepted step of each kind (Tsit5 is first-same-as-last)."""

    def order(self, terms):
        return 5

    def init(self, terms, t0, t1, y0, args):
        # The linearisation's structure only: it is built at the first W step.
        shape = eqx.filter_eval_shape(self.stiff.linearise, y0, args)
        jac = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shape)
        zero = jnp.array(0)
        h = jnp.zeros((), jnp.result_type(t0, t1))
        return _SwitchState(terms.vf(t0, y0, args), jac, jnp.array(self.stiff.refresh_every),
                            jnp.array(False), zero, zero, jnp.array(self.stiff_after), h,
                            jnp.array(False), zero, zero, zero)

    def step(self, terms, t0, t1, y0, args, state, made_jump):
        return _autostiff_step(self, terms, t0, t1, y0, args, state)

    def _step(self, terms, t0, t1, y0, args, state):
        h = t1 - t0

        def explicit(state):
            y1, y_error, k, f1, y6 = _tsit5_step(terms, t0, t1, y0, args, state.f0)
            num = _norm(jax.tree.map(lambda x: x[6] - x[5], k))
            den = _norm(jax.tree.map(jnp.subtract, y1, y6))
            limited = num > self.boundary * den
            calm = jnp.where(limited, 0, state.calm + 1)
            count = jnp.where(limited, state.count + 1, jnp.where(calm >= 6, 0, state.count))
            switch = count >= state.patience
            new = eqx.tree_at(
                lambda s: (s.f0, s.stiff, s.count, s.calm, s.h_explicit, s.gained,
                           s.explicit_steps, s.age), state,
                (f1, switch, jnp.where(switch, 0, count), jnp.where(switch, 0, calm),
                 jnp.abs(h).astype(state.h_explicit.dtype), jnp.array(False),
                 state.explicit_steps + 1, jnp.array(self.stiff.refresh_every)))
            info = dict(y0=y0, y1=y1, k=k, stiff=jnp.array(False))
            return y1, y_error, info, new, dfx.RESULTS.successful

        def implicit(state):
            y1, y_error, dense, f1, jac, age, fresh = self.stiff.w_step(
                terms, t0, t1, y0, args, state.f0, state.jac, state.age)
            longer = jnp.abs(h) >= self.gain_over_explicit(y0) * state.h_explicit
            easy = (jnp.abs(h) * jac.curvature() < 1.0) | ~longer
            # (a member still in explicit mode, stepping with the others, keeps its count)
            count = jnp.where(state.stiff, jnp.where(easy, state.count + 1, 0), state.count)
            gained = state.gained | (state.stiff & longer)
            back = state.stiff & (count >= self.explicit_after)
            # an episode that did not pay doubles the patience (up to 2^10 x), one that did
            # resets it
            patience = jnp.where(back, jnp.where(
                gained, self.stiff_after,
                jnp.minimum(2 * state.patience, 1024 * self.stiff_after)), state.patience)
            new = eqx.tree_at(
                lambda s: (s.f0, s.jac, s.age, s.stiff, s.count, s.patience, s.gained,
                           s.stiff_steps, s.refreshes),
                state, (f1, jac, jnp.where(back, self.stiff.refresh_every, age),
                        state.stiff & ~back, jnp.where(back, 0, count), patience, gained,
                        state.stiff_steps + 1,
                        state.refreshes + fresh.astype(state.refreshes.dtype)))
            k = jax.tree.map(
                lambda k0, k1: jnp.zeros((_TSIT5_STAGES,) + k0.shape, k0.dtype).at[0].set(
                    k0).at[1].set(k1), dense["k0"], dense["k1"])
            info = dict(y0=y0, y1=y1, k=k, stiff=jnp.array(True))
            return y1, y_error, info, new, dfx.RESULTS.successful

        return lax.cond(eqxi.unvmap_any(state.stiff), implicit, explicit, state)

    def func(self, terms, t0, y0, args):
        return terms.vf(t0, y0, args)

    def gain_over_explicit(self, y) -> float:
        """How much longer than the last explicit step a W step must be to pay: `gain`
        times the ratio of a W step's cost (its stages and its share of a
        linearisation, [`gradflow.AbstractStiffness.cost`][]) to an explicit step's, at
        least `gain`."""
        w_step = ROS34PW2.stages + self.stiff.stiffness.cost(y) / self.stiff.refresh_every
        return self.gain * max(1.0, w_step / self.evaluations["explicit_steps"])

    def statistics(self, state: _SwitchState) -> dict:
        """Counts of a finished solve from its final solver state: accepted explicit
        and W steps, and linearisations built."""
        return dict(explicit_steps=state.explicit_steps, stiff_steps=state.stiff_steps,
                    linearisations=state.refreshes)


@eqx.filter_jit
def _autostiff_step(solver, terms, t0, t1, y0, args, state):
    """`AutoStiff`'s step behind a `jit`, so that it is traced once per program (and
    once for all programs of the same solver, shapes and dtypes): Diffrax traces a
    solver's step four times for one solve (shape passes and the loop), and both of
    AutoStiff's branches, the W step's linearisation included, are long to trace. XLA
    inlines the call; the compiled program is the same."""
    return solver._step(terms, t0, t1, y0, args, state)


def _norm(tree):
    return jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(tree)))


def default_solver(model) -> dfx.AbstractAdaptiveSolver:
    """The solver [`gradflow.flow`][] uses when none is given.

    **Arguments:**

    - `model`: the initial factorization.

    **Returns:** `AutoStiff(RosenbrockW(default_stiffness(model)))`
    ([`gradflow.AutoStiff`][]): explicit Tsit5 steps while the flow is not stiff, and
    Rosenbrock-W steps with the stiffness approximation the model offers
    ([`gradflow.default_stiffness`][]) once it is, so that its cost stays nearly flat
    as the init scale shrinks.
    """
    return AutoStiff(RosenbrockW(default_stiffness(model)))
