"""The interface every factorized model implements."""

import abc
from typing import Any, ClassVar

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

    def conserved(self) -> tuple[Float[Array, " n"], Float[Array, ""]] | None:
        """What gradient flow conserves for every loss (the model's rescaling
        symmetries), as `(values, scale)`: a flat array of conserved quantities and
        the magnitude their rounding is relative to. `None` if the model knows none.

        Every solve records the drift of these values from the initial model to the
        end, relative to `scale` (`Trajectory.stats["conservation_drift"]`): a cheap
        accuracy signal of the solve itself."""
        return None


class AbstractBlockFactorization(AbstractFactorization):
    """A factorization that can cut out the weights of its largest components.

    The stiffness of saddle-to-saddle dynamics lives in the weights of the few
    components already learned, so a solver treats a small block of weights
    implicitly ([`gradflow.LargestComponents`][]): `select` picks the block,
    `take` cuts it out as a smaller model of the same kind, `put` writes one back.
    The selection is a pytree of integer arrays of fixed shapes (it works under
    `jit` and `vmap`).
    """

    additive: ClassVar[bool] = False
    """True when the end tensor is the sub-model's plus that of the other weights
    (the components have disjoint weights), so the sub-model's predictions and their
    derivatives are exactly those of the block inside the whole model."""

    @abc.abstractmethod
    def select(self, size: int) -> Any:
        """The block of the `size` largest components (fewer if the model has fewer)."""

    @abc.abstractmethod
    def take(self, selection) -> "AbstractBlockFactorization":
        """The sub-model made of the weights in `selection`."""

    @abc.abstractmethod
    def put(self, selection, sub: "AbstractBlockFactorization") -> "AbstractBlockFactorization":
        """This model with the weights in `selection` replaced by those of `sub`."""


class AbstractAdditiveFactorization(AbstractBlockFactorization):
    """A factorization whose end tensor is a sum of components with disjoint weights
    (CP): a block is a set of components, `select` the largest by norm."""

    additive: ClassVar[bool] = True

    def select(self, size: int) -> Int[Array, " k"]:
        norms = self.component_norms()
        return jax.lax.top_k(norms, min(int(size), norms.shape[0]))[1]

    @abc.abstractmethod
    def take(self, components: Int[Array, " k"]) -> "AbstractAdditiveFactorization":
        """The sub-model made of the given components."""

    @abc.abstractmethod
    def put(
        self, components: Int[Array, " k"], sub: "AbstractAdditiveFactorization"
    ) -> "AbstractAdditiveFactorization":
        """This model with the given components replaced by those of `sub`."""
