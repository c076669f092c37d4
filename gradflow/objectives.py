"""Completion and sensing objectives (docs: Concepts › Objectives; Theory › Theorem 2 and the Huber loss).

An objective is a callable `objective(model) -> scalar`; `jax.grad` of it is (minus)
the gradient-flow vector field. Losses are averaged over observations,
$\\mathcal L = \\frac{1}{m}\\sum_i \\ell(\\text{prediction}_i - y_i)$, with
$\\ell(z) = z^2/2$ (`SquaredLoss`), the Huber loss of §3.7 (`HuberLoss`) or
$\\ell(z)=|z|$ (`AbsoluteLoss`). A `Completion` may weight its observations (a 0/1
mask observes a subset at a fixed shape), and splits into train and test halves.
"""

import abc
import math
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.flatten_util import ravel_pytree
from jaxtyping import Array, ArrayLike, Float, Int, Integer, PRNGKeyArray

from ._validate import as_array, check_dims, check_finite, check_int, check_positive, concrete
from .models.base import AbstractFactorization
from .models.stacked import StackedCP


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
        check_positive("delta", self.delta, scalar=True)

    def __call__(self, residual):
        a = jnp.abs(residual)
        quadratic = 0.5 * residual**2
        linear = self.delta * (a - 0.5 * self.delta)
        return jnp.where(a < self.delta, quadratic, linear)


class AbsoluteLoss(AbstractLoss):
    """$\\ell(z) = |z|$ (the $\\ell_1$ loss).

    It is not differentiable at $z=0$; gradflow uses the subgradient $\\operatorname{sign}(z)$,
    which is 0 at $z=0$ (the minimal-norm subgradient). The vector field is then
    discontinuous where a residual vanishes: the exact flow (a differential inclusion)
    slides along $z_i=0$ once it reaches it, while an integrator of $-\\nabla\\phi$
    makes that residual chatter about 0 with an amplitude set by its step, and an
    adaptive solver shrinks its steps to keep the chattering within tolerance — expect
    many steps near the end of a fit. `HuberLoss(delta) / delta` tends to $|z|$ as
    $\\delta\\to0$ and is the smooth alternative.

    **Arguments:** none.
    """

    def __call__(self, residual):
        # z * sign(z) = |z| with derivative sign(z), 0 at z = 0 (jnp.abs's is 1 there).
        return residual * jnp.sign(residual)


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

    def observe(self, tensor: Float[ArrayLike, "..."]) -> Float[Array, " m"]:
        """The observed values of a given end tensor (the linear map `predict` applies
        to `model.full()`)."""
        raise NotImplementedError(
            f"{type(self).__name__} does not define `observe(tensor)`; it is needed for "
            "gradients in the end tensor (`tensor_gradient`)."
        )

    def tensor_gradient(self, tensor: Float[ArrayLike, "..."]) -> Float[Array, "..."]:
        r"""$\nabla\mathcal L(\mathcal W)$: the gradient of the loss in the end tensor
        $\mathcal W$ = `tensor` (of this objective's `shape`).

        **Arguments:**

        - `tensor`: an end tensor, e.g. `model.full()`.

        **Returns:** an array of the tensor's shape.
        """
        tensor = jnp.asarray(tensor)
        if tuple(tensor.shape) != tuple(self.shape):
            raise ValueError(
                f"`tensor` must have the objective's shape {tuple(self.shape)}, got "
                f"{tuple(tensor.shape)}."
            )
        return jax.grad(lambda x: self.loss_at(self.observe(x)))(tensor)

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
    - `loss`: `SquaredLoss()` (default), `HuberLoss(delta)` or `AbsoluteLoss()`.
    - `dense`: read the observed entries off the full end tensor (`True`) or
      evaluate only the observed entries (`False`). By default (`None`) the full
      tensor is used only when it is small — at most `DENSE_RATIO` times the number
      of observations and at most `DENSE_MAX` entries — because the model's dense
      contraction runs as a matmul (36x faster on the paper's problem, see
      `benchmarks/`), while large tensors are never formed.
    - `weights`: optional per-observation weights $c_i\\ge0$ `(m,)`, not all zero; the
      loss is then the weighted mean $\\sum_ic_i\\ell(z_i)/\\sum_ic_i$. A 0/1 mask
      observes a subset of the rows with the loss normalized over that subset, so the
      number of observations can vary at a fixed array shape — a traced grid axis of
      [`gradflow.sweep`][]: `weights=jnp.arange(m) < params["observations"]`.
      `None` (default) weighs every observation equally.
    """

    DENSE_RATIO: ClassVar[int] = 32
    DENSE_MAX: ClassVar[int] = 2**22

    shape: tuple[int, ...] = eqx.field(static=True)
    indices: Int[Array, "m order"]
    values: Float[Array, " m"]
    loss: AbstractLoss
    dense: bool = eqx.field(static=True)
    weights: Float[Array, " m"] | None

    def __init__(
        self, shape, indices, values, loss: AbstractLoss | None = None, dense=None,
        weights=None,
    ):
        self.shape = check_dims("shape", shape)
        self.indices = jnp.asarray(indices)
        self.values = _real("values", values)
        self.loss = _check_loss(loss)
        _check_completion(self.shape, self.indices, self.values)
        self.weights = None if weights is None else _check_weights(
            weights, self.indices.shape[0])
        if dense is None:
            size = math.prod(self.shape)
            m = self.indices.shape[0]
            dense = size <= min(self.DENSE_RATIO * m, self.DENSE_MAX)
        self.dense = bool(dense)

    def predict(self, model):
        if self.dense:
            return model.full()[tuple(self.indices.T)]
        return model.entries(self.indices)

    def observe(self, tensor):
        return jnp.asarray(tensor)[tuple(self.indices.T)]

    def prediction_jacobian(self, model):
        return model.entries_jacobian(self.indices)

    def loss_at(self, predictions):
        per_entry = self.loss(predictions - self.values)
        if self.weights is None:
            return jnp.mean(per_entry)
        return jnp.sum(self.weights * per_entry) / jnp.sum(self.weights)

    @classmethod
    def from_tensor(
        cls, tensor: ArrayLike, indices, loss=None, dense=None, weights=None
    ) -> "Completion":
        """Observe `tensor` at `indices` (other arguments as in the constructor).

        **Arguments:**

        - `tensor`: the (ground-truth) tensor.
        - `indices`: integer array `(m, tensor.ndim)` of distinct entries, e.g. from
          [`gradflow.sample_indices`][].
        - `loss`, `dense`, `weights`: as in the constructor.

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
        return cls(tensor.shape, indices, tensor[tuple(indices.T)], loss, dense, weights)

    def split(
        self, key: PRNGKeyArray, test_fraction: float
    ) -> tuple["Completion", "Completion"]:
        """A random train/test split of the observed entries, for held-out evaluation.

        The papers report a test error where the full tensor is too large to compare:
        fit `train`, and observe `test` along the flow with
        [`gradflow.observers.held_out_loss`][].

        **Arguments:**

        - `key`: a JAX PRNG key.
        - `test_fraction`: the fraction of the observations held out, in $(0, 1)$;
          the test set has `round(test_fraction * m)` of them, at least 1, and the
          train set at least 1.

        **Returns:** `(train, test)`: two `Completion`s of the same shape and loss on
        disjoint sets of rows whose union is this one's (weights travel with their
        rows).

        !!! Example

            ```python
            train, test = objective.split(jr.key(3), 0.2)
            trajectory = gf.flow(model, train, t1=1e9, observers={"test": gf.observers.held_out_loss(test)})
            ```
        """
        check_positive("test_fraction", test_fraction, below=1, scalar=True)
        m = self.num_observations
        if m < 2:
            raise ValueError(f"`split` needs at least 2 observations, got {m}.")
        n_test = min(max(int(round(float(test_fraction) * m)), 1), m - 1)
        order = jr.permutation(key, m)
        parts = []
        for rows in (order[n_test:], order[:n_test]):
            weights = None if self.weights is None else self.weights[rows]
            parts.append(Completion(self.shape, self.indices[rows], self.values[rows],
                                    self.loss, None, weights))
        return parts[0], parts[1]


class Sensing(AbstractObjective):
    """Tensor sensing: $y_i = \\langle \\mathcal A_i, \\mathcal W\\rangle$ (§3.1).

    **Arguments:**

    - `operators`: array `(m, *shape)` of measurement tensors $\\mathcal A_i$.
    - `values`: the measurements `(m,)`.
    - `loss`: `SquaredLoss()` (default), `HuberLoss(delta)` or `AbsoluteLoss()`.
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
        return self.observe(model.full())

    def observe(self, tensor):
        flat = self.operators.reshape(self.operators.shape[0], -1)
        return flat @ jnp.asarray(tensor).reshape(-1)

    @classmethod
    def gaussian(
        cls, key: PRNGKeyArray, tensor: ArrayLike, num: int, loss: AbstractLoss | None = None,
        std: float | None = None,
    ) -> "Sensing":
        r"""Sensing of `tensor` by `num` Gaussian measurement tensors.

        Every entry of every $\mathcal A_i$ is i.i.d. $\mathcal N(0, \mathrm{std}^2)$, by
        default with $\mathrm{std}=1/\sqrt{D}$, $D=\prod_nd_n$: then
        $\mathbb E\|\mathcal A_i\|^2=1$, as for the indicator tensor of one observed
        entry, and a measurement $\langle\mathcal A_i,\mathcal W\rangle\sim
        \mathcal N(0,\|\mathcal W\|^2/D)$ has the RMS of the tensor's entries, so losses
        and flow times are on the scale of completion's.

        **Arguments:**

        - `key`: a JAX PRNG key.
        - `tensor`: the (ground-truth) tensor $\mathcal W^*$, at least 1-d.
        - `num`: the number of measurements $m\ge1$.
        - `loss`: as in the constructor.
        - `std`: the entries' standard deviation (> 0); default $1/\sqrt D$.

        **Returns:** a `Sensing` with $y_i=\langle\mathcal A_i,\mathcal W^*\rangle$.

        !!! Example

            ```python
            truth = gf.random_cp_tensor(jr.key(0), (6, 6, 6), rank=2)
            objective = gf.Sensing.gaussian(jr.key(1), truth, 300)
            ```
        """
        tensor = _real("tensor", tensor)
        if tensor.ndim < 1 or tensor.size == 0:
            raise ValueError(f"`tensor` must be a non-empty array, got shape {tensor.shape}.")
        check_finite("tensor", tensor)
        num = check_int("num", num)
        if std is None:
            std = 1.0 / math.sqrt(tensor.size)
        check_positive("std", std, scalar=True)
        # drawn as one (num, D) matrix: XLA compiles the generator for a matrix several
        # times faster than for a high-order array of the same size
        flat = std * jr.normal(key, (num, tensor.size), tensor.dtype)
        values = flat @ tensor.reshape(-1)
        return cls(flat.reshape((num,) + tuple(tensor.shape)), values, loss)



class GroupedFits(AbstractObjective):
    r"""Many independent least-squares fits of CP predictors, as one objective.

    The model ([`gradflow.StackedCP`][]) has $R=B\cdot R_b$ components, in $B$
    blocks of $R_b$; block $b$ is evaluated on its own inputs, and within a block the
    components are split into groups (`groups`, a 0/1 matrix `(R_b, G)`), each group
    a separate predictor with its own targets. The objective is the *sum* over blocks
    and groups of each fit's mean loss, so every fit sees exactly its own gradient:
    Adam, SGD or any per-coordinate optimizer then runs all fits at once exactly as it
    would run them one by one (e.g. one-vs-all tasks x ranks x data sets, Razin,
    Maman & Cohen, ICML 2021, Sec. 5.2).

    **Arguments:**

    - `shape`: `(d,) * N`, the tensor the inputs index.
    - `inputs`: integer array `(B, m, N)`.
    - `values`: targets `(B, m, G)`.
    - `groups`: 0/1 array `(R_b, G)`; column `g` selects the components of fit `g`.
    - `loss`: per-entry loss, `SquaredLoss()` by default.
    """

    shape: tuple[int, ...] = eqx.field(static=True)
    inputs: Integer[Array, "B m N"]  # e.g. uint8 pixels
    values: Float[Array, "B m G"]
    groups: Float[Array, "Rb G"]
    loss: AbstractLoss

    def __init__(self, shape, inputs, values, groups, loss=None):
        self.shape = tuple(int(s) for s in shape)
        self.inputs = jnp.asarray(inputs)
        self.values = jnp.asarray(values)
        self.groups = jnp.asarray(groups, self.values.dtype)
        self.loss = SquaredLoss() if loss is None else loss
        b, m, n = self.inputs.shape
        if n != len(self.shape):
            raise ValueError(f"`inputs` have {n} modes but `shape` has {len(self.shape)}.")
        if self.values.shape != (b, m, self.groups.shape[1]):
            raise ValueError(
                f"`values` must have shape {(b, m, self.groups.shape[1])}, got {self.values.shape}."
            )

    def predict(self, model: StackedCP) -> Float[Array, "B m G"]:
        """Every fit's predictions on its block's inputs."""
        stacked = model.weights  # (N, d, B * Rb)
        n, d, _ = stacked.shape
        blocks = self.inputs.shape[0]
        stacked = jnp.moveaxis(stacked.reshape(n, d, blocks, -1), 2, 0)
        values = jax.vmap(_stacked_values)(stacked, self.inputs)  # (B, m, Rb)
        return values @ self.groups

    def loss_at(self, predictions):
        """The sum over blocks and fits of each fit's mean loss."""
        return jnp.sum(jnp.mean(self.loss(predictions - self.values), axis=1))


def _stacked_values(weights, inputs):
    return StackedCP(weights).component_values(inputs)

def _check_loss(loss) -> AbstractLoss:
    if loss is None:
        return SquaredLoss()
    if not isinstance(loss, AbstractLoss):
        raise TypeError(
            f"`loss` must be a gradflow loss (SquaredLoss(), HuberLoss(delta), AbsoluteLoss()), "
            f"got {loss!r}."
        )
    return loss


def _real(name: str, x):
    """`x` as a real floating-point JAX array (ints are converted; complex is refused)."""
    arr = as_array(name, x)
    if jnp.issubdtype(arr.dtype, jnp.complexfloating):
        raise TypeError(f"`{name}` must be real, got complex dtype {arr.dtype}.")
    if not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)
            or arr.dtype == jnp.bool_):
        raise TypeError(f"`{name}` must be an array of real numbers, got dtype {arr.dtype}.")
    return arr if jnp.issubdtype(arr.dtype, jnp.floating) else arr.astype(float)


def _check_weights(weights, m: int):
    """Per-observation weights: real, shape `(m,)`, finite, >= 0 and not all 0."""
    w = _real("weights", weights)
    if w.shape != (m,):
        raise ValueError(f"`weights` must have shape ({m},), one per observation, got {w.shape}.")
    check_positive("weights", w, allow_zero=True)
    concrete_w = concrete(w)
    if concrete_w is not None and not np.any(concrete_w > 0):
        raise ValueError("`weights` must not all be 0 (nothing would be observed).")
    return w


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
