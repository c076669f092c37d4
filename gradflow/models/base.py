"""The interface every factorized model implements."""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, Float, Int


class AbstractFactorization(eqx.Module):
    """A factorized tensor whose array leaves are exactly its trainable weights.

    Subclasses give the end tensor, its entries at given indices (without forming the
    whole tensor), and the norms of the components the theory talks about.
    """

    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, ...]:
        """Shape of the end tensor."""

    @abc.abstractmethod
    def full(self) -> Float[Array, "..."]:
        """The end tensor."""

    @abc.abstractmethod
    def entries(self, indices: Int[Array, "m order"]) -> Float[Array, " m"]:
        """Entries of the end tensor at `indices` (one row per entry)."""

    def entries_jacobian(self, indices: Int[Array, "m order"]) -> Float[Array, "m weights"]:
        """Jacobian of `entries(indices)` in the weights, flattened in
        `jax.flatten_util.ravel_pytree` order (forward-mode autodiff unless a model
        knows it in closed form)."""
        flat, unravel = ravel_pytree(self)
        return jax.jacfwd(lambda v: unravel(v).entries(indices))(flat)

    @abc.abstractmethod
    def component_norms(self) -> Float[Array, " components"]:
        """Norms of the model's components (singular values, CP or local components)."""

    def norm(self) -> Float[Array, ""]:
        """Frobenius norm of the end tensor."""
        return jnp.sqrt(jnp.sum(self.full() ** 2))


class AbstractAdditiveFactorization(AbstractFactorization):
    """A factorization whose end tensor is a sum of components with disjoint weights.

    This lets a solver work on a few components at a time: `take` cuts out a
    sub-model made of some components, `put` writes one back.
    """

    @abc.abstractmethod
    def take(self, components: Int[Array, " k"]) -> "AbstractAdditiveFactorization":
        """The sub-model made of the given components."""

    @abc.abstractmethod
    def put(
        self, components: Int[Array, " k"], sub: "AbstractAdditiveFactorization"
    ) -> "AbstractAdditiveFactorization":
        """This model with the given components replaced by those of `sub`."""
