"""Completion and sensing objectives, THEORY.md §3.1 and §3.7.

An objective is a callable `objective(model) -> scalar`; `jax.grad` of it is (minus)
the gradient-flow vector field. Losses are averaged over observations,
$\\mathcal L = \\frac{1}{m}\\sum_i \\ell(\\text{prediction}_i - y_i)$, with
$\\ell(z) = z^2/2$ (`SquaredLoss`) or the Huber loss of §3.7 (`HuberLoss`).
"""

import abc
import math
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, ArrayLike, Float, Int

from ._validate import check_dims, check_finite, check_positive, concrete
from .models.base import AbstractFactorization


class AbstractLoss(eqx.Module):
    """A per-entry loss $\\ell(z)$ of the residual $z$."""

    @abc.abstractmethod
    def __call__(self, residual: Float[Array, " m"]) -> Float[Array, " m"]:
        """$\\ell$ applied entrywise."""


class SquaredLoss(AbstractLoss):
    """$\\ell(z) = z^2/2$ (the default loss of every objective).

    **Arguments:** none.
    """

    def __call__(self, residual):
        return 0.5 * residual**2


class HuberLoss(AbstractLoss):
    """$\\ell_h(z) = z^2/2$ for $|z|<\\delta_h$, else $\\delta_h(|z| - \\delta_h/2)$ (§3.7).

    **Arguments:**

    - `delta`: the transition point $\\delta_h > 0$.
    """

    delta: Float[ArrayLike, ""]

    def __check_init__(self):
        if np.ndim(self.delta) != 0:
            raise ValueError(f"`delta` must be a scalar, got shape {np.shape(self.delta)}.")
        check_positive("delta", self.delta)

    def __call__(self, residual):
        a = jnp.abs(residual)
        quadratic = 0.5 * residual**2
        linear = self.delta * (a - 0.5 * self.delta)
        return jnp.where(a < self.delta, quadratic, linear)


class AbstractObjective(eqx.Module):
    """Observations of a tensor and a per-entry loss.

    Subclasses say how a model is observed (`predict`); the loss is shared.
    """

    shape: eqx.AbstractVar[tuple[int, ...]]
    values: eqx.AbstractVar[Float[Array, " m"]]
    loss: eqx.AbstractVar[AbstractLoss]

    @abc.abstractmethod
    def predict(self, model: AbstractFactorization) -> Float[Array, " m"]:
        """The model's observed values (linear in the end tensor)."""

    def prediction_jacobian(self, model: AbstractFactorization) -> Float[Array, "m weights"]:
        """Jacobian of `predict(model)` in the model's weights, flattened in
        `jax.flatten_util.ravel_pytree` order."""
        flat, unravel = ravel_pytree(model)
        return jax.jacfwd(lambda v: self.predict(unravel(v)))(flat)

    @property
    def num_observations(self) -> int:
        return self.values.shape[0]

    def loss_at(self, predictions: Float[Array, " m"]) -> Float[Array, ""]:
        """The objective as a function of the predictions."""
        return jnp.mean(self.loss(predictions - self.values))

    def __call__(self, model: AbstractFactorization) -> Float[Array, ""]:
        return self.loss_at(self.predict(model))

    def astype(self, dtype) -> "AbstractObjective":
        """This objective with its floating-point arrays (values, operators, Huber's
        delta) cast to `dtype`, the dtype of the model it observes."""
        cast = lambda x: x.astype(dtype) if eqx.is_array(x) and jnp.issubdtype(
            x.dtype, jnp.floating) else x
        return jax.tree.map(cast, self)

    def check_model(self, model: AbstractFactorization, name: str = "model") -> None:
        """Raise a `ValueError` naming `name` if `model` cannot be observed here."""
        if not isinstance(model, AbstractFactorization):
            raise TypeError(
                f"`{name}` must be a gradflow factorization, got {type(model).__name__}."
            )
        if tuple(model.shape) != tuple(self.shape):
            raise ValueError(
                f"`{name}` has shape {tuple(model.shape)} (order {len(model.shape)}), "
                f"but the objective observes a tensor of shape {tuple(self.shape)} "
                f"(order {len(self.shape)})."
            )


class Completion(AbstractObjective):
    """Tensor completion: the loss on observed entries only.

    The model is evaluated at the observed indices alone; the full tensor is never
    formed.

    **Arguments:**

    - `shape`: shape of the tensor being completed.
    - `indices`: integer array `(m, order)`, one observed entry per row, no repeats.
    - `values`: the observed values `(m,)`.
    - `loss`: `SquaredLoss()` (default) or `HuberLoss(delta)`.
    - `dense`: read the observed entries off the full end tensor (`True`) or
      evaluate only the observed entries (`False`). By default (`None`) the full
      tensor is used only when it is small — at most `DENSE_RATIO` times the number
      of observations and at most `DENSE_MAX` entries — because the model's dense
      contraction runs as a matmul (36x faster on the paper's problem, see
      `benchmarks/`), while large tensors are never formed.
    """

    DENSE_RATIO: ClassVar[int] = 32
    DENSE_MAX: ClassVar[int] = 2**22

    shape: tuple[int, ...] = eqx.field(static=True)
    indices: Int[Array, "m order"]
    values: Float[Array, " m"]
    loss: AbstractLoss
    dense: bool = eqx.field(static=True)

    def __init__(
        self, shape, indices, values, loss: AbstractLoss | None = None, dense=None
    ):
        self.shape = check_dims("shape", shape)
        self.indices = jnp.asarray(indices)
        self.values = _real("values", values)
        self.loss = _check_loss(loss)
        _check_completion(self.shape, self.indices, self.values)
        if dense is None:
            size = math.prod(self.shape)
            m = self.indices.shape[0]
            dense = size <= min(self.DENSE_RATIO * m, self.DENSE_MAX)
        self.dense = bool(dense)

    def predict(self, model):
        if self.dense:
            return model.full()[tuple(self.indices.T)]
        return model.entries(self.indices)

    def prediction_jacobian(self, model):
        return model.entries_jacobian(self.indices)

    @classmethod
    def from_tensor(
        cls, tensor: ArrayLike, indices, loss=None, dense=None
    ) -> "Completion":
        """Observe `tensor` at `indices` (other arguments as in the constructor).

        **Arguments:**

        - `tensor`: the (ground-truth) tensor.
        - `indices`: integer array `(m, tensor.ndim)` of distinct entries, e.g. from
          [`gradflow.sample_indices`][].
        - `loss`, `dense`: as in the constructor.

        **Returns:** a `Completion` with `values = tensor[indices]`.

        !!! Example

            ```python
            truth = gf.random_cp_tensor(jr.key(0), (10, 10, 10), rank=3)
            objective = gf.Completion.from_tensor(truth, gf.sample_indices(jr.key(1), truth.shape, 500))
            ```
        """
        tensor = jnp.asarray(tensor)
        indices = jnp.asarray(indices)
        _check_indices(tuple(tensor.shape), indices)
        return cls(tensor.shape, indices, tensor[tuple(indices.T)], loss, dense)


class Sensing(AbstractObjective):
    """Tensor sensing: $y_i = \\langle \\mathcal A_i, \\mathcal W\\rangle$ (§3.1).

    **Arguments:**

    - `operators`: array `(m, *shape)` of measurement tensors $\\mathcal A_i$.
    - `values`: the measurements `(m,)`.
    - `loss`: `SquaredLoss()` (default) or `HuberLoss(delta)`.
    """

    shape: tuple[int, ...] = eqx.field(static=True)
    operators: Float[Array, "m ..."]
    values: Float[Array, " m"]
    loss: AbstractLoss

    def __init__(self, operators, values, loss: AbstractLoss | None = None):
        self.operators = _real("operators", operators)
        self.values = _real("values", values)
        self.loss = _check_loss(loss)
        if self.operators.ndim < 2 or math.prod(self.operators.shape) == 0:
            raise ValueError(
                "`operators` must have shape (m, *tensor_shape) with m >= 1 and a non-empty "
                f"tensor shape, got {self.operators.shape}."
            )
        self.shape = tuple(self.operators.shape[1:])
        if self.values.shape != (self.operators.shape[0],):
            raise ValueError(
                f"`values` must have shape ({self.operators.shape[0]},) to match "
                f"`operators`, got {self.values.shape}."
            )
        check_finite("operators", self.operators)
        check_finite("values", self.values)

    def predict(self, model):
        flat = self.operators.reshape(self.operators.shape[0], -1)
        return flat @ model.full().reshape(-1)


def _check_loss(loss) -> AbstractLoss:
    if loss is None:
        return SquaredLoss()
    if not isinstance(loss, AbstractLoss):
        raise TypeError(
            f"`loss` must be a gradflow loss (SquaredLoss(), HuberLoss(delta)), got {loss!r}."
        )
    return loss


def _real(name: str, x):
    """`x` as a real floating-point JAX array (ints are converted; complex is refused)."""
    try:
        arr = jnp.asarray(x)
    except TypeError:
        raise TypeError(f"`{name}` must be an array of real numbers, got {type(x).__name__}.")
    if jnp.issubdtype(arr.dtype, jnp.complexfloating):
        raise TypeError(f"`{name}` must be real, got complex dtype {arr.dtype}.")
    if not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)
            or arr.dtype == jnp.bool_):
        raise TypeError(f"`{name}` must be an array of real numbers, got dtype {arr.dtype}.")
    return arr if jnp.issubdtype(arr.dtype, jnp.floating) else arr.astype(float)


def _check_indices(shape, indices) -> None:
    idx = concrete(indices)
    if idx is None:
        return
    if idx.ndim != 2 or idx.shape[1] != len(shape) or idx.shape[0] < 1:
        raise ValueError(
            f"`indices` must have shape (m, {len(shape)}) with m >= 1 observed entries for "
            f"a tensor of shape {shape}, got {idx.shape}."
        )
    if not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"`indices` must be integers, got dtype {idx.dtype}.")
    for n, d in enumerate(shape):
        bad = (idx[:, n] < 0) | (idx[:, n] >= d)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(
                f"`indices` row {i} is out of range: mode {n} index {int(idx[i, n])} "
                f"not in [0, {d})."
            )
    uniq, counts = np.unique(idx, axis=0, return_counts=True)
    if (counts > 1).any():
        dup = tuple(int(v) for v in uniq[np.argmax(counts > 1)])
        raise ValueError(f"`indices` has a duplicate observed index {dup}.")


def _check_completion(shape, indices, values) -> None:
    _check_indices(shape, indices)
    v = concrete(values)
    if v is not None and v.shape != (indices.shape[0],):
        raise ValueError(
            f"`values` must have shape ({indices.shape[0]},) to match `indices`, "
            f"got {v.shape}."
        )
    check_finite("values", values)
