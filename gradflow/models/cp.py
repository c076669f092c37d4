"""CP (canonical polyadic) tensor factorization (Razin, Maman & Cohen 2021, Eqs. (1)–(4))."""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from .._validate import (ArgumentTypeError, as_array, check_dims, check_float_dtype, check_int, check_number,
                         check_positive)
from .base import AbstractAdditiveFactorization


class CP(AbstractAdditiveFactorization):
    r"""$\mathcal W = \sum_{r=1}^R \mathbf w_r^1\otimes\cdots\otimes\mathbf w_r^N$.

    **Arguments:**

    - `factors`: a tuple of $N \ge 2$ arrays, `factors[n]` of shape `(d_n, R)`; its
      column `r` is $\mathbf w_r^n$. The constructors `gaussian` and `balanced` make
      the inits of the theory.

    !!! Example

        ```python
        import jax.random as jr
        import gradflow as gf

        model = gf.CP.gaussian(jr.key(0), dims=(10, 10, 10), rank=50, std=1e-2)
        model.component_norms().shape  # (50,)
        ```
    """

    factors: tuple[Float[Array, "_d R"], ...]  # (d_n, R): one d_n per mode

    def __init__(self, factors: Sequence[Float[ArrayLike, "_d R"]]):
        if not isinstance(factors, (tuple, list)):
            raise ArgumentTypeError(f"`factors` must be a tuple of arrays (d_n, R), got "
                                    f"{type(factors).__name__}.")
        self.factors = tuple(as_array("factors", f) for f in factors)

    def __check_init__(self):
        if len(self.factors) < 2:
            raise ValueError(f"`factors`: CP needs order >= 2, got {len(self.factors)}.")
        ranks = {f.shape[-1] for f in self.factors}
        shapes = [tuple(f.shape) for f in self.factors]
        if any(f.ndim != 2 for f in self.factors) or len(ranks) != 1:
            raise ValueError(
                f"`factors` must be 2-d arrays (d_n, R) sharing R, got shapes {shapes}."
            )
        if any(min(shape) < 1 for shape in shapes):
            raise ValueError(
                f"`factors` must have d_n >= 1 and R >= 1 (no empty mode or rank), got "
                f"shapes {shapes}."
            )

    @property
    def order(self) -> int:
        return len(self.factors)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(f.shape[0] for f in self.factors)

    @property
    def rank(self) -> int:
        """Number of components R (not the tensor rank of the end tensor)."""
        return self.factors[0].shape[1]

    def full(self) -> Float[Array, "..."]:
        # One einsum with a greedy contraction order: pairwise products, then a matmul
        # over the components; 1.1-2.4x faster than two Khatri-Rao products and a matmul
        # (orders 3-5, dims 6-18, benchmarks/vector_field.py).
        order = self.order
        operands = [x for n, f in enumerate(self.factors) for x in (f, [n, order])]
        return jnp.einsum(*operands, list(range(order)), optimize="greedy")

    def entries(self, indices: Int[Array, "m N"]) -> Float[Array, " m"]:
        prod = self.factors[0][indices[:, 0]]
        for n in range(1, self.order):
            prod = prod * self.factors[n][indices[:, n]]
        return prod.sum(axis=-1)

    def entries_jacobian(self, indices: Int[Array, "m N"]) -> Float[Array, "m weights"]:
        r"""Closed form: $\partial\mathcal W_i/\partial(\mathbf w^n_r)_j
        = [i_n = j]\prod_{n'\ne n}(\mathbf w^{n'}_r)_{i_{n'}}$."""
        rows = [f[indices[:, n]] for n, f in enumerate(self.factors)]  # (m, R) each
        blocks = []
        for n, f in enumerate(self.factors):
            others = jnp.ones_like(rows[0])
            for k, row in enumerate(rows):
                if k != n:
                    others = others * row
            onehot = jax.nn.one_hot(indices[:, n], f.shape[0], dtype=f.dtype)
            blocks.append((onehot[:, :, None] * others[:, None, :]).reshape(len(others), -1))
        return jnp.concatenate(blocks, axis=1)

    def vector_norms(self) -> Float[Array, "N R"]:
        r"""$\|\mathbf w_r^n\|$ for every mode $n$ (rows) and component $r$ (columns)."""
        return jnp.stack([jnp.linalg.norm(f, axis=0) for f in self.factors])

    def component_norms(self) -> Float[Array, " R"]:
        r"""$P_r=\prod_n\|\mathbf w_r^n\|$."""
        return jnp.prod(self.vector_norms(), axis=0)

    def conserved(self) -> tuple[Float[Array, " n"], Float[Array, ""]]:
        r"""The gaps $\|\mathbf w_r^n\|^2-\|\mathbf w_r^N\|^2$ between the squared vector
        norms of each component (Lemma 1: conserved for every loss), and the largest
        squared vector norm."""
        sq = self.vector_norms() ** 2
        return (sq[:-1] - sq[-1:]).ravel(), jnp.max(sq)

    def norm(self) -> Float[Array, ""]:
        """Frobenius norm of the end tensor, from the R×R Gram matrices (no full tensor)."""
        gram = self.factors[0].T @ self.factors[0]
        for f in self.factors[1:]:
            gram = gram * (f.T @ f)
        return jnp.sqrt(jnp.maximum(gram.sum(), 0.0))

    def take(self, components: Int[Array, " k"]) -> "CP":
        return CP(tuple(f[:, components] for f in self.factors))

    def put(self, components: Int[Array, " k"], sub: "CP") -> "CP":
        return CP(
            tuple(f.at[:, components].set(s) for f, s in zip(self.factors, sub.factors))
        )

    @classmethod
    def gaussian(
        cls,
        key: PRNGKeyArray,
        dims: Sequence[int],
        rank: int,
        std: float | ArrayLike,
        dtype=jnp.float64,
        *,
        mean: float | ArrayLike = 0.0,
    ) -> "CP":
        """I.i.d. $\\mathcal N(\\mathrm{mean}, \\mathrm{std}^2)$ entries (the papers' initialization).

        **Arguments:**

        - `key`: a JAX PRNG key.
        - `dims`: mode dimensions $(d_1,\\dots,d_N)$, $N\\ge2$.
        - `rank`: number of components R; [`gradflow.CP.max_rank`][] is the papers'
          default.
        - `std`: standard deviation of every entry (may be a traced scalar in sweeps).
        - `dtype`: float64 by default; pass `jnp.float32` to opt into single precision.
        - `mean`: the entries' mean (keyword only; default 0, the theory's small init).
          The tensor-factorization paper's fits of natural data start at mean 1
          (every factor entry near 1, each component near the all-ones tensor).

        **Returns:** a `CP` model.
        """
        dims = _check_cp_args(dims, rank)
        check_float_dtype("dtype", dtype)
        check_positive("std", std, allow_zero=True, scalar=True)
        check_number("mean", mean)
        keys = jr.split(key, len(dims))
        std = jnp.asarray(std, dtype)
        mean = jnp.asarray(mean, dtype)
        return cls(tuple(mean + std * jr.normal(k, (d, rank), dtype)
                         for k, d in zip(keys, dims)))

    @staticmethod
    def max_rank(dims: Sequence[int]) -> int:
        r"""The product of all mode dimensions but the largest: an upper bound on the
        tensor rank of *every* tensor of shape `dims`.

        With $d_N$ the largest, $\mathcal W=\sum_{i_1..i_{N-1}}\mathbf e_{i_1}\otimes
        \cdots\otimes\mathbf e_{i_{N-1}}\otimes\mathcal W_{i_1..i_{N-1},:}$ writes any
        tensor with that many rank-one terms. The papers' code uses it as the number
        of components $R$, so that the factorization can express any tensor and only
        the implicit regularization of the flow keeps its rank low (1000 for
        $10\times10\times10\times10$, 64 for $8\times8\times8$).

        **Arguments:**

        - `dims`: mode dimensions, at least 2.

        **Returns:** a Python int.
        """
        dims = check_dims("dims", dims, min_len=2)
        return math.prod(sorted(dims)[:-1])

    @classmethod
    def balanced(
        cls,
        key: PRNGKeyArray,
        dims: Sequence[int],
        rank: int,
        scale: float | ArrayLike,
        dtype=jnp.float64,
    ) -> "CP":
        """Exactly balanced init: $\\|\\mathbf w_r^n\\| = $ `scale` for every mode $n$.

        Directions are uniform on the unit spheres, so the unbalancedness magnitude
        (Definition 1; docs: Theory › Lemma 1) is zero up to rounding, and $P_r=\\mathrm{scale}^N$.

        **Arguments:**

        - `key`, `dims`, `rank`, `dtype`: as in [`gradflow.CP.gaussian`][].
        - `scale`: the vector norm, a scalar or one value per component (shape `(R,)`).

        **Returns:** a `CP` model with zero unbalancedness.
        """
        dims = _check_cp_args(dims, rank)
        check_float_dtype("dtype", dtype)
        check_positive("scale", scale, allow_zero=True)
        scale = jnp.broadcast_to(jnp.asarray(scale, dtype), (rank,))
        keys = jr.split(key, len(dims))
        factors = []
        for k, d in zip(keys, dims):
            v = jr.normal(k, (d, rank), dtype)
            factors.append(scale[None, :] * v / jnp.linalg.norm(v, axis=0)[None, :])
        return cls(tuple(factors))


def _check_cp_args(dims, rank) -> tuple[int, ...]:
    dims = check_dims("dims", dims, min_len=2)
    check_int("rank", rank)
    return dims
