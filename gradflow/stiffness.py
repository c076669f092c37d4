"""Approximate Jacobians of the gradient-flow vector field for Rosenbrock-W steps.

Gradient flow near a saddle-to-saddle plateau is stiff: the components already
learned have large curvature while the next one is still escaping. The stiff
directions are the weights of those few large components, so an approximate Jacobian
that is close to the Hessian on them and zero elsewhere removes the stiffness at the
cost of a small dense matrix. A W-method keeps its order for any approximation, so
the choice affects only speed, never accuracy.

- [`gradflow.LargestComponents`][]: the Gauss–Newton block of the largest components
  of a model that offers blocks (CP, HTF; any
  `gradflow.AbstractBlockFactorization`).
- [`gradflow.GaussNewtonSubspace`][]: model-agnostic, the top eigenspace of the
  Gauss–Newton matrix found from the model's predictions alone (JVPs and VJPs).
- [`gradflow.DenseHessian`][]: the exact Hessian of all weights, for tiny models.
- [`gradflow.Explicit`][]: none ($W = 0$).
"""

import abc
from collections.abc import Callable

import equinox as eqx
import jax
from jax import lax
import jax.numpy as jnp
import jax.random as jr
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float

from .models.base import AbstractBlockFactorization


class AbstractLinearisation(eqx.Module):
    """A matrix $W \\approx \\partial f/\\partial y$ of the vector field $f=-\\nabla\\phi$,
    with $-W$ positive semidefinite."""

    @abc.abstractmethod
    def matvec(self, x):
        """$W x$."""

    @abc.abstractmethod
    def shifted(self, c):
        """$x \\mapsto (I - cW)^{-1} x$ for a scalar $c \\ge 0$ (factored once, applied
        to several $x$): a callable, or an `AbstractShiftedSolve` that also offers
        a cheaper `damped`."""

    @abc.abstractmethod
    def curvature(self) -> Float[Array, ""]:
        """An estimate of the largest eigenvalue of $-W$: the stiffest curvature, whose
        product with the step size says whether an explicit step would be stable."""


class AbstractShiftedSolve(eqx.Module):
    """$S=(I-cW)^{-1}$, factored once: what `AbstractLinearisation.shifted` may return.

    `damped(x)` is $(I-(I-S)^3)\\,x = (3S-3S^2+S^3)\\,x$, the damping of the W steps'
    dense output (`RosenbrockW`); by default three solves, which a
    linearisation with structure (an eigenbasis, a block) does in one pass.
    """

    @abc.abstractmethod
    def __call__(self, x):
        """$Sx$."""

    def damped(self, x):
        return _three_solves(self, x)


def _three_solves(solve, x):
    """$(3S-3S^2+S^3)\\,x$ from three applications of `solve` ($S$), on any pytree."""
    s1 = solve(x)
    s2 = solve(s1)
    s3 = solve(s2)
    return jax.tree.map(lambda a, b, c: 3.0 * a - 3.0 * b + c, s1, s2, s3)


class _CallableSolve(AbstractShiftedSolve):
    """A plain callable returned by a user's `shifted`."""

    solve: Callable

    def __call__(self, x):
        return self.solve(x)


def as_shifted_solve(solve) -> AbstractShiftedSolve:
    """What `shifted(c)` returned, as an `AbstractShiftedSolve`."""
    return solve if isinstance(solve, AbstractShiftedSolve) else _CallableSolve(solve)


class AbstractStiffness(eqx.Module):
    """How a Rosenbrock-W solver approximates the Jacobian at a state."""

    @abc.abstractmethod
    def linearise(self, model, objective, previous=None) -> AbstractLinearisation:
        """The approximate Jacobian at `model`; `previous` is the last one built (or
        None), for methods that refine it (warm starts)."""

    def cost(self, model) -> float:
        """Roughly how many gradient evaluations one `linearise` costs at a model of
        `model`'s shapes: [`gradflow.AutoStiff`][] asks W steps to be that much longer
        than explicit ones before it keeps taking them."""
        return 4.0


class _ZeroLinearisation(AbstractLinearisation):
    def matvec(self, x):
        return jax.tree.map(jnp.zeros_like, x)

    def shifted(self, c):
        return _IdentitySolve()

    def curvature(self):
        return jnp.zeros(())


class _IdentitySolve(AbstractShiftedSolve):
    def __call__(self, x):
        return x

    def damped(self, x):
        return x


class Explicit(AbstractStiffness):
    """$W=0$: the Rosenbrock-W method becomes an explicit third-order method.

    **Arguments:** none.
    """

    def linearise(self, model, objective, previous=None):
        return _ZeroLinearisation()

    def cost(self, model) -> float:
        return 0.0


def _power_curvature(matvec, size: int, dtype, iterations: int = 12) -> Float[Array, ""]:
    """The largest eigenvalue of a PSD operator by power iteration (a lower estimate
    that converges from below; 1.1x for safety)."""
    x = jnp.ones(size, dtype) + jnp.linspace(0.0, 1.0, size, dtype=dtype)
    x = x / jnp.linalg.norm(x)

    def iteration(_, x):
        y = matvec(x)
        return y / jnp.maximum(jnp.linalg.norm(y), jnp.finfo(dtype).tiny)

    x = lax.fori_loop(0, iterations, iteration, x)
    return 1.1 * jnp.vdot(x, matvec(x))


class _AbstractEigenLinearisation(AbstractLinearisation):
    """$W=-V\\,\\mathrm{diag}(\\lambda)V^\\top$ in flat coordinates `flatten`/`unflatten`
    of the state, with orthonormal $V$ (an eigendecomposition or a subspace)."""

    eigvecs: eqx.AbstractVar[Float[Array, "n k"]]
    curvatures: eqx.AbstractVar[Float[Array, " k"]]

    @abc.abstractmethod
    def flatten(self, x) -> Float[Array, " n"]: ...

    @abc.abstractmethod
    def unflatten(self, x, v): ...

    def matvec(self, x):
        v = self.eigvecs @ (-self.curvatures * (self.eigvecs.T @ self.flatten(x)))
        return self.unflatten(jax.tree.map(jnp.zeros_like, x), v)

    def shifted(self, c):
        return _EigenSolve(self, c * self.curvatures / (1.0 + c * self.curvatures))

    def curvature(self):
        return jnp.max(self.curvatures, initial=0.0)


class _EigenSolve(AbstractShiftedSolve):
    """$S = I - V\\operatorname{diag}(d)V^\\top$ with $d = c\\lambda/(1+c\\lambda)$, so
    $I-(I-S)^3 = I - V\\operatorname{diag}(d^3)V^\\top$."""

    linearisation: _AbstractEigenLinearisation
    damp: Float[Array, " k"]

    def _apply(self, x, damp):
        lin = self.linearisation
        v = lin.flatten(x)
        return lin.unflatten(x, v - lin.eigvecs @ (damp * (lin.eigvecs.T @ v)))

    def __call__(self, x):
        return self._apply(x, self.damp)

    def damped(self, x):
        return self._apply(x, self.damp**3)


class _FlatEigen(_AbstractEigenLinearisation):
    """On all weights."""

    eigvecs: Float[Array, "n k"]
    curvatures: Float[Array, " k"]

    def flatten(self, x):
        return ravel_pytree(x)[0]

    def unflatten(self, x, v):
        return ravel_pytree(x)[1](v)


class _AbstractBlock(eqx.Module):
    """Flat coordinates of the weights of a block (`selection` of a block model): the
    `flatten`/`unflatten` of the block linearisations, which declare the two fields
    (abstract, so that no concrete class is subclassed)."""

    selection: eqx.AbstractVar[object]
    template: eqx.AbstractVar[AbstractBlockFactorization]

    def flatten(self, x):
        return ravel_pytree(x.take(self.selection))[0]

    def unflatten(self, x, v):
        return x.put(self.selection, ravel_pytree(self.template)[1](v))


class _BlockEigen(_AbstractBlock, _AbstractEigenLinearisation):
    r"""$W=-V\,\mathrm{diag}(\lambda)V^\top$ on the weights of a block."""

    eigvecs: Float[Array, "n k"]
    curvatures: Float[Array, " k"]
    selection: object
    template: AbstractBlockFactorization


class _CholeskyBlock(_AbstractBlock, AbstractLinearisation):
    r"""$W=-H$ on the weights of a block, with $H$ positive semidefinite, so
    $I - cW = I + cH$ is factored by Cholesky (no eigendecomposition).

    (JAX's `cho_factor`, not Lineax's `Cholesky`: Lineax compares the vector's
    sharding with the operator's, which differ inside the `shard_map` of a sweep.)
    """

    hessian: Float[Array, "n n"]
    largest: Float[Array, ""]
    selection: object
    template: AbstractBlockFactorization

    def matvec(self, x):
        return self.unflatten(jax.tree.map(jnp.zeros_like, x), -(self.hessian @ self.flatten(x)))

    def shifted(self, c):
        eye = jnp.eye(self.hessian.shape[0], dtype=self.hessian.dtype)
        factor, lower = jax.scipy.linalg.cho_factor(eye + c * self.hessian)
        return _CholeskySolve(self, factor, lower)

    def curvature(self):
        return self.largest


class _CholeskySolve(AbstractShiftedSolve):
    """$S$ on a block from the Cholesky factor of $I + cH$ (the identity elsewhere);
    `damped` applies $3S-3S^2+S^3$ in the block's flat coordinates."""

    block: _CholeskyBlock
    factor: Float[Array, "n n"]
    lower: bool = eqx.field(static=True)

    def _solve(self, v):
        return jax.scipy.linalg.cho_solve((self.factor, self.lower), v)

    def __call__(self, x):
        return self.block.unflatten(x, self._solve(self.block.flatten(x)))

    def damped(self, x):
        return self.block.unflatten(x, _three_solves(self._solve, self.block.flatten(x)))


class LargestComponents(AbstractStiffness):
    """The Hessian block of the `size` largest components' weights, zero elsewhere.

    For a model that offers blocks (`gradflow.AbstractBlockFactorization`:
    CP's components, HTF's local components at every node with the rows and columns
    of each matrix that connect them), the block's weights are cut out as a small
    model of the same kind, so the cost does not grow with the model's size. The
    Gauss–Newton block is positive semidefinite and factored by Cholesky once per
    step; the exact one can have negative curvature (escaping directions), which is
    not damped: its eigenvalues are clipped at zero.

    **Arguments:**

    - `size`: how many components (by norm; per node for HTF) to treat implicitly.
      It should exceed the number the flow learns; beyond that it only costs time.
    - `hessian`: `"gauss-newton"` (default) for $J^\\top\\nabla^2\\ell\\,J$, with $J$
      the Jacobian of the sub-model's predictions in its weights (closed form for CP
      and HTF; exact for an additive model, and for HTF exact up to the paths
      through unselected, small components) and $\\nabla^2\\ell$ the loss's Hessian
      at the whole model's predictions; `"exact"` (additive models only) for the
      whole block Hessian. They differ by the residual-weighted curvature of the
      predictions, which vanishes as the fit improves.
    """

    size: int = eqx.field(static=True, default=8)
    hessian: str = eqx.field(static=True, default="gauss-newton")

    def __check_init__(self):
        if self.hessian not in ("gauss-newton", "exact"):
            raise ValueError(
                f"`hessian` must be 'gauss-newton' or 'exact', got {self.hessian!r}."
            )
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"`size` must be a positive int, got {self.size!r}.")

    @staticmethod
    def supports(model) -> bool:
        """Whether `model` offers blocks of its largest components."""
        return isinstance(model, AbstractBlockFactorization)

    def linearise(self, model, objective, previous=None):
        if not self.supports(model):
            raise TypeError(
                f"`LargestComponents` needs a model with blocks (CP, HTF), got "
                f"{type(model).__name__}; use `GaussNewtonSubspace()`."
            )
        selection = model.select(self.size)
        sub = model.take(selection)
        predictions = objective.predict(model)
        if self.hessian == "gauss-newton":
            jac = objective.prediction_jacobian(sub)  # (observations, block weights)
            loss_hvp = lambda u: jax.jvp(jax.grad(objective.loss_at), (predictions,), (u,))[1]
            hessian = jac.T @ jax.vmap(loss_hvp, in_axes=1, out_axes=1)(jac)
            hessian = 0.5 * (hessian + hessian.T)
            largest = _power_curvature(lambda v: hessian @ v, hessian.shape[0], hessian.dtype)
            return _CholeskyBlock(selection=selection, template=sub, hessian=hessian,
                                  largest=largest)
        if not model.additive:
            raise TypeError(
                f"`hessian='exact'` needs an additive model (CP), got {type(model).__name__}."
            )
        flat, unravel = ravel_pytree(sub)
        base = predictions - objective.predict(sub)
        restricted = lambda v: objective.loss_at(base + objective.predict(unravel(v)))
        hessian = jax.hessian(restricted)(flat)
        curvatures, eigvecs = jnp.linalg.eigh(0.5 * (hessian + hessian.T))
        return _BlockEigen(selection=selection, template=sub, eigvecs=eigvecs,
                           curvatures=jnp.maximum(curvatures, 0.0))


class GaussNewtonSubspace(AbstractStiffness):
    """Model-agnostic: the top-`rank` eigenspace of the Gauss–Newton matrix
    $G=J^\\top\\nabla^2\\ell\\,J$ of all weights, from the model's predictions alone.

    $G$ is applied to `rank` vectors at once by a batched JVP of the predictions, the
    loss's Hessian in the predictions and a batched VJP — nothing is asked of the
    model beyond `predict`, so any `gradflow.AbstractFactorization` (deep matrices,
    your own models) gets a stiff-capable solver. The subspace is found by subspace
    iteration, warm-started from the previous one at every refresh, with a
    Rayleigh–Ritz step; $W=-V\\Lambda V^\\top$ on it.

    **Arguments:**

    - `rank`: the dimension of the subspace (the number of stiff directions handled).
    - `iterations`: subspace iterations per refresh (the first build does 4x more).
    """

    rank: int = eqx.field(static=True, default=16)
    iterations: int = eqx.field(static=True, default=2)

    def __check_init__(self):
        for name in ("rank", "iterations"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")

    def cost(self, model) -> float:
        # a Gauss-Newton product (a JVP and a VJP) is about two gradients; `iterations`
        # products of the basis and one for Rayleigh-Ritz per refresh
        return 2.0 * self.rank * (self.iterations + 1)

    def linearise(self, model, objective, previous=None):
        flat, unravel = ravel_pytree(model)
        predict = lambda v: objective.predict(unravel(v))
        predictions, pullback = jax.vjp(predict, flat)
        loss_hvp = lambda u: jax.jvp(jax.grad(objective.loss_at), (predictions,), (u,))[1]

        def gauss_newton(v):
            return pullback(loss_hvp(jax.jvp(predict, (flat,), (v,))[1]))[0]

        apply = lambda basis: jax.vmap(gauss_newton, in_axes=1, out_axes=1)(basis)
        k = min(self.rank, flat.size)
        start = jr.normal(jr.key(0), (flat.size, k), flat.dtype)
        if isinstance(previous, _FlatEigen) and previous.eigvecs.shape == (flat.size, k):
            # warm start (a placeholder of zeros, before the first build, starts cold)
            empty = jnp.all(previous.eigvecs == 0)
            basis, rounds = jnp.where(empty, start, previous.eigvecs), self.iterations
        else:
            basis, rounds = start, 4 * self.iterations
        for _ in range(rounds):
            basis = jnp.linalg.qr(apply(basis))[0]
        projected = basis.T @ apply(basis)
        curvatures, rotation = jnp.linalg.eigh(0.5 * (projected + projected.T))
        return _FlatEigen(basis @ rotation, jnp.maximum(curvatures, 0.0))


class DenseHessian(AbstractStiffness):
    """The exact Hessian of the objective in all weights (negative curvature clipped).

    For models with few weights (the 2×2 problems, small deep matrices): its cost is a
    dense Hessian and an eigendecomposition of size (number of weights)², so use it
    below a few hundred weights.

    **Arguments:** none.
    """

    def cost(self, model) -> float:
        return 2.0 * sum(x.size for x in jax.tree.leaves(model) if eqx.is_array(x))

    def linearise(self, model, objective, previous=None):
        flat, unravel = ravel_pytree(model)
        hessian = jax.hessian(lambda v: objective(unravel(v)))(flat)
        curvatures, eigvecs = jnp.linalg.eigh(0.5 * (hessian + hessian.T))
        return _FlatEigen(eigvecs, jnp.maximum(curvatures, 0.0))


def default_stiffness(model) -> AbstractStiffness:
    """The stiffness approximation [`gradflow.default_solver`][] uses for `model`.

    **Arguments:**

    - `model`: a factorization.

    **Returns:** `LargestComponents()` for models that offer blocks of their largest
    components (CP, HTF), else the model-agnostic `GaussNewtonSubspace()`.
    """
    return LargestComponents() if LargestComponents.supports(model) else GaussNewtonSubspace()


