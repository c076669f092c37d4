"""A CP factorization with its factors in one array, evaluated in log domain.

For predictors of very high order on discrete inputs (a binarized image of P pixels
is an entry of an order-P tensor with mode dimension 2: Razin, Maman & Cohen, ICML
2021, Sec. 5.2), where a product of P factor entries under- or overflows on the way.
"""

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, Integer

from .base import AbstractAdditiveFactorization
from .cp import CP


class StackedCP(AbstractAdditiveFactorization):
    r"""A CP factorization with its factors in one array, evaluated in log domain.

    `weights[n, :, r]` is $\mathbf w_r^n$, so `weights` has shape `(N, d, R)`: the
    same tensor as `gradflow.CP(tuple(weights))` ([`as_cp`][gradflow.StackedCP.as_cp]),
    but one array leaf instead of $N$. For predictors of order 64 (8x8 binary images)
    or 784 (MNIST) this keeps compiled programs small (a 64-leaf `CP` spends most of a
    short fit in XLA compilation) and lets entries be read with matrix products, in
    log domain ([`component_values`][gradflow.StackedCP.component_values]).

    **Arguments:**

    - `weights`: array `(N, d, R)` with `N >= 2`, every mode of dimension `d`.
    """

    weights: Float[Array, "N d R"]

    def __check_init__(self):
        if self.weights.ndim != 3 or self.weights.shape[0] < 2:
            raise ValueError(f"`weights` must have shape (N >= 2, d, R), got {self.weights.shape}.")

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.weights.shape[1],) * self.weights.shape[0]

    @property
    def order(self) -> int:
        return self.weights.shape[0]

    @property
    def rank(self) -> int:
        return self.weights.shape[2]

    def as_cp(self) -> CP:
        """The same tensor as a `gradflow.CP` (one factor per mode)."""
        return CP(tuple(self.weights))

    @classmethod
    def from_cp(cls, model: CP) -> "StackedCP":
        """The factors of `model` (all modes of one dimension) stacked into one array."""
        return cls(jnp.stack(model.factors))

    def full(self) -> Float[Array, "..."]:
        return self.as_cp().full()

    def entries(self, indices: Int[Array, "m N"]) -> Float[Array, " m"]:
        """The entries at `indices`, computed in log domain (the row sums of
        [`component_values`][gradflow.StackedCP.component_values])."""
        return _component_values(self.weights, indices).sum(axis=-1)

    def component_values(self, inputs: Integer[Array, "m N"]) -> Float[Array, "m R"]:
        r"""$\prod_n\mathbf w_r^n[x_n]$ for every input $x$ (row of `inputs`) and
        component $r$ (column), in log domain: see
        [`gradflow.models.stacked.component_values`][]."""
        return _component_values(self.weights, inputs)

    def vector_norms(self) -> Float[Array, "N R"]:
        return jnp.linalg.norm(self.weights, axis=1)

    def component_norms(self) -> Float[Array, " R"]:
        r"""$P_r=\prod_n\|\mathbf w_r^n\|$, summed in log domain."""
        return jnp.exp(jnp.sum(jnp.log(self.vector_norms()), axis=0))

    def norm(self) -> Float[Array, ""]:
        return self.as_cp().norm()

    def take(self, components) -> "StackedCP":
        return StackedCP(self.weights[:, :, components])

    def put(self, components, sub: "StackedCP") -> "StackedCP":
        return StackedCP(self.weights.at[:, :, components].set(sub.weights))


def component_values(model: CP | StackedCP, inputs: Integer[Array, "m N"]) -> Float[Array, "m R"]:
    r"""$\prod_n\mathbf w_r^n[x_n]$ for every input $x$ (row) and component $r$ (column).

    Computed in log domain, as $s_r(x)\exp\big(\sum_n\log|\mathbf w_r^n[x_n]|\big)$
    with the sign $s_r(x)$ from the parity of the negative factors, so the product of
    $N$ numbers never under- or overflows in between; only a value that is itself out
    of range does. The sums are matrix products of the inputs' indicator matrices with
    the log-weights, $\sum_b\mathbb 1[x=b]\,\log|W_{:,b,:}|$, the fast form for
    small mode dimensions (2 for binary images).

    A factor entry below the smallest normal float in magnitude (0 included) is read
    as that float, and its gradient is 0; any other entry's gradient is exact.

    **Arguments:**

    - `model`: a `StackedCP`, or a `gradflow.CP` (its factors `(d, R)` are stacked).
    - `inputs`: integer array `(m, N)` with entries in `[0, d)` (e.g. binary images).

    **Returns:** array `(m, R)`; its row sums are `model.entries(inputs)`.
    """
    weights = model.weights if isinstance(model, StackedCP) else jnp.stack(model.factors)
    return _component_values(weights, inputs)


def _component_values(stacked, inputs):
    d = stacked.shape[1]
    dtype = stacked.dtype
    floor = float(np.finfo(dtype).tiny)
    magnitude = jnp.abs(stacked)
    tiny = magnitude < floor  # 0 or subnormal: log and its gradient 1/w are not safe
    logabs = jnp.where(tiny, float(np.log(floor)), jnp.log(jnp.where(tiny, 1.0, magnitude)))
    # Parities are small integers: exact in float32, cheaper than a float64 product.
    negative = (stacked < 0).astype(jnp.float32)
    # sum_n f[n, x_n] = sum_n f[n, 0] + sum_{b >= 1} 1[x = b] @ (f[:, b] - f[:, 0]):
    # d - 1 matrix products (one for binary inputs).
    shape = (inputs.shape[0], stacked.shape[2])  # (m, R)
    log_sum = jnp.broadcast_to(jnp.sum(logabs[:, 0, :], axis=0), shape)
    negatives = jnp.broadcast_to(jnp.sum(negative[:, 0, :], axis=0), shape)
    for b in range(1, d):
        hit = inputs == b
        log_sum = log_sum + hit.astype(dtype) @ (logabs[:, b, :] - logabs[:, 0, :])
        negatives = negatives + hit.astype(jnp.float32) @ (negative[:, b, :] - negative[:, 0, :])
    sign = (1.0 - 2.0 * jnp.mod(negatives, 2.0)).astype(dtype)
    return sign * jnp.exp(log_sum)
