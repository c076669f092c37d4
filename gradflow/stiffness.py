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
    """$W=0$: the Rosenbrock-W method becomes an explicit third-order method."""

    def linearise(self, model, objective):
        return _ZeroLinearisation()


class _SubspaceLinearisation(AbstractLinearisation):
    components: jax.Array
    eigvecs: jax.Array
    curvatures: jax.Array
    template: AbstractAdditiveFactorization

    def _gather(self, x):
        return ravel_pytree(x.take(self.components))[0]

    def _scatter(self, x, v):
        unravel = ravel_pytree(self.template)[1]
        return x.put(self.components, unravel(v))

    def matvec(self, x):
        v = self.eigvecs @ (-self.curvatures * (self.eigvecs.T @ self._gather(x)))
        zero = jax.tree.map(jnp.zeros_like, x)
        return self._scatter(zero, v)

    def solve(self, c, x):
        v = self._gather(x)
        damp = c * self.curvatures / (1.0 + c * self.curvatures)
        v = v - self.eigvecs @ (damp * (self.eigvecs.T @ v))
        return self._scatter(x, v)


class LargestComponents(AbstractStiffness):
    """Exact Hessian on the weights of the `size` largest components, zero elsewhere.

    The block Hessian comes from a loss restricted to those components (the others
    fixed), so its cost is that of a model with `size` components. Negative
    curvature (escaping directions) is not damped: eigenvalues are clipped at zero.

    **Arguments:**

    - `size`: how many components (by norm) to treat implicitly. It should exceed the
      number of components the flow learns; beyond that it only costs time.
    """

    size: int = eqx.field(static=True, default=8)

    def linearise(self, model, objective):
        if not isinstance(model, AbstractAdditiveFactorization):
            raise TypeError(
                f"`LargestComponents` needs an additive model (CP), got "
                f"{type(model).__name__}; use `Explicit()`."
            )
        k = min(self.size, model.component_norms().shape[0])
        _, components = lax.top_k(model.component_norms(), k)
        sub = model.take(components)
        flat, unravel = ravel_pytree(sub)
        base = objective.predict(model) - objective.predict(sub)
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
    """

    def linearise(self, model, objective):
        flat, unravel = ravel_pytree(model)
        hessian = jax.hessian(lambda v: objective(unravel(v)))(flat)
        curvatures, eigvecs = jnp.linalg.eigh(0.5 * (hessian + hessian.T))
        return _DenseLinearisation(eigvecs, jnp.maximum(curvatures, 0.0))
