"""Approximate Jacobians of the gradient-flow vector field for Rosenbrock-W steps.

Gradient flow near a saddle-to-saddle plateau is stiff: the components already
learned have large curvature while the next one is still escaping (DESIGN.md). The
stiff directions are the weights of those few large components, so an approximate
Jacobian that is *exact* on them and zero elsewhere removes the stiffness at the
cost of a small dense Hessian. A W-method keeps its order for any approximation, so
the choice affects only speed, never accuracy.
"""

import abc

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from .models.base import AbstractAdditiveFactorization


class AbstractLinearisation(eqx.Module):
    """A matrix $W \\approx \\partial f/\\partial y$ of the vector field $f=-\\nabla\\phi$."""

    @abc.abstractmethod
    def matvec(self, x):
        """$W x$."""

    @abc.abstractmethod
    def solve(self, c, x):
        """$(I - cW)^{-1} x$ for a scalar $c \\ge 0$."""

    def shifted(self, c):
        """$x \\mapsto (I - cW)^{-1} x$, for several $x$ with the same $c$ (one
        factorization, where `solve` would factor each time)."""
        return lambda x: self.solve(c, x)


class AbstractStiffness(eqx.Module):
    """How a Rosenbrock-W solver approximates the Jacobian at a state."""

    @abc.abstractmethod
    def linearise(self, model, objective) -> AbstractLinearisation:
        """The approximate Jacobian at `model`."""


class _ZeroLinearisation(AbstractLinearisation):
    def matvec(self, x):
        return jax.tree.map(jnp.zeros_like, x)

    def solve(self, c, x):
        return x


class Explicit(AbstractStiffness):
    """$W=0$: the Rosenbrock-W method becomes an explicit third-order method.

    **Arguments:** none.
    """

    def linearise(self, model, objective):
        return _ZeroLinearisation()


class _BlockLinearisation(AbstractLinearisation):
    """A linearisation that acts on the weights of some components only."""

    components: eqx.AbstractVar[jax.Array]
    template: eqx.AbstractVar[AbstractAdditiveFactorization]

    def _gather(self, x):
        return ravel_pytree(x.take(self.components))[0]

    def _scatter(self, x, v):
        unravel = ravel_pytree(self.template)[1]
        return x.put(self.components, unravel(v))


class _SubspaceLinearisation(_BlockLinearisation):
    """$W = -V\\,\\mathrm{diag}(\\lambda)V^\\top$ on the block, from an eigendecomposition."""

    components: jax.Array
    eigvecs: jax.Array
    curvatures: jax.Array
    template: AbstractAdditiveFactorization

    def matvec(self, x):
        v = self.eigvecs @ (-self.curvatures * (self.eigvecs.T @ self._gather(x)))
        zero = jax.tree.map(jnp.zeros_like, x)
        return self._scatter(zero, v)

    def solve(self, c, x):
        v = self._gather(x)
        damp = c * self.curvatures / (1.0 + c * self.curvatures)
        v = v - self.eigvecs @ (damp * (self.eigvecs.T @ v))
        return self._scatter(x, v)


class _CholeskyLinearisation(_BlockLinearisation):
    """$W = -H$ on the weights of `components`, with $H$ positive semidefinite, so
    $I - cW = I + cH$ is factored by Cholesky (no eigendecomposition)."""

    components: jax.Array
    hessian: jax.Array
    template: AbstractAdditiveFactorization

    def matvec(self, x):
        zero = jax.tree.map(jnp.zeros_like, x)
        return self._scatter(zero, -(self.hessian @ self._gather(x)))

    def solve(self, c, x):
        return self.shifted(c)(x)

    def shifted(self, c):
        eye = jnp.eye(self.hessian.shape[0], dtype=self.hessian.dtype)
        factor = jax.scipy.linalg.cho_factor(eye + c * self.hessian)
        return lambda x: self._scatter(x, jax.scipy.linalg.cho_solve(factor, self._gather(x)))


class LargestComponents(AbstractStiffness):
    """The Hessian block of the `size` largest components' weights, zero elsewhere.

    The block Hessian comes from a loss restricted to those components (the others
    fixed), so its cost is that of a model with `size` components. The Gauss–Newton
    block is positive semidefinite; the exact one can have negative curvature
    (escaping directions), which is not damped: its eigenvalues are clipped at zero.

    **Arguments:**

    - `size`: how many components (by norm) to treat implicitly. It should exceed the
      number of components the flow learns; beyond that it only costs time.
    - `hessian`: `"gauss-newton"` (default) for the Gauss–Newton part
      $J^\\top\\nabla^2\\ell\\,J$ of the block, with $J$ the Jacobian of the predictions
      in the block's weights and $\\nabla^2\\ell$ the loss's Hessian in the predictions;
      `"exact"` for the whole block Hessian. They differ by the residual-weighted
      curvature of the predictions, which vanishes as the fit improves; Gauss–Newton
      takes about 5% more steps on the benchmark problem and its rebuild costs ~7x less
      (`benchmarks/`), and a W-method is exact to its order with either.
    """

    size: int = eqx.field(static=True, default=8)
    hessian: str = eqx.field(static=True, default="gauss-newton")

    def __check_init__(self):
        if self.hessian not in ("gauss-newton", "exact"):
            raise ValueError(
                f"`hessian` must be 'gauss-newton' or 'exact', got {self.hessian!r}."
            )

    def linearise(self, model, objective):
        if not isinstance(model, AbstractAdditiveFactorization):
            raise TypeError(
                f"`LargestComponents` needs an additive model (CP), got "
                f"{type(model).__name__}; use `Explicit()`."
            )
        k = min(self.size, model.component_norms().shape[0])
        _, components = lax.top_k(model.component_norms(), k)
        sub = model.take(components)
        predictions = objective.predict(model)
        if self.hessian == "gauss-newton":
            jac = objective.prediction_jacobian(sub)  # (observations, block weights)
            loss_hvp = lambda u: jax.jvp(jax.grad(objective.loss_at), (predictions,), (u,))[1]
            hessian = jac.T @ jax.vmap(loss_hvp, in_axes=1, out_axes=1)(jac)
            return _CholeskyLinearisation(components, 0.5 * (hessian + hessian.T), sub)
        flat, unravel = ravel_pytree(sub)
        base = predictions - objective.predict(sub)
        restricted = lambda v: objective.loss_at(base + objective.predict(unravel(v)))
        hessian = jax.hessian(restricted)(flat)
        curvatures, eigvecs = jnp.linalg.eigh(0.5 * (hessian + hessian.T))
        return _SubspaceLinearisation(
            components, eigvecs, jnp.maximum(curvatures, 0.0), sub
        )


class _DenseLinearisation(AbstractLinearisation):
    eigvecs: jax.Array
    curvatures: jax.Array

    def matvec(self, x):
        flat, unravel = ravel_pytree(x)
        return unravel(self.eigvecs @ (-self.curvatures * (self.eigvecs.T @ flat)))

    def solve(self, c, x):
        flat, unravel = ravel_pytree(x)
        damp = c * self.curvatures / (1.0 + c * self.curvatures)
        return unravel(flat - self.eigvecs @ (damp * (self.eigvecs.T @ flat)))


class DenseHessian(AbstractStiffness):
    """The exact Hessian of the objective in all weights (negative curvature clipped).

    For models with few weights (the 2×2 problems, small deep matrices): its cost is a
    dense Hessian and an eigendecomposition of size (number of weights)², so use it
    below a few hundred weights.

    **Arguments:** none.
    """

    def linearise(self, model, objective):
        flat, unravel = ravel_pytree(model)
        hessian = jax.hessian(lambda v: objective(unravel(v)))(flat)
        curvatures, eigvecs = jnp.linalg.eigh(0.5 * (hessian + hessian.T))
        return _DenseLinearisation(eigvecs, jnp.maximum(curvatures, 0.0))
