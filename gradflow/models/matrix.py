"""Deep matrix factorization (deep linear network), THEORY.md §1.1."""

from collections.abc import Sequence

import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from .._validate import check_dims, check_finite, check_positive, concrete
from .base import AbstractFactorization


class DeepMatrix(AbstractFactorization):
    r"""$W = W_{L:1} = W_L\cdots W_1$, with $W_j\in\mathbb R^{d_j\times d_{j-1}}$.

    **Arguments:**

    - `layers`: a tuple of matrices; `layers[j - 1]` is $W_j$ (the input layer $W_1$
      comes first; constructors `gaussian`, `balanced`, `identity`), so the end
      matrix has shape $(d_L, d_0)$. Any `Completion` or `Sensing` objective of that
      shape observes it; the loss is the library's usual mean over observations.

    !!! Example

        ```python
        import jax.random as jr
        import gradflow as gf

        model = gf.DeepMatrix.gaussian(jr.key(0), dims=(5, 8, 8, 4), std=1e-2)
        model.shape  # (4, 5)
        model.component_norms().shape  # (4,): singular values of the end matrix
        ```
    """

    layers: tuple[Float[Array, "d_j d_jm1"], ...]

    def __init__(self, layers: Sequence[Float[ArrayLike, "d_j d_jm1"]]):
        self.layers = tuple(jnp.asarray(w) for w in layers)

    def __check_init__(self):
        if len(self.layers) < 1:
            raise ValueError("`layers` must hold at least one matrix (depth L >= 1).")
        shapes = [tuple(w.shape) for w in self.layers]
        if any(w.ndim != 2 for w in self.layers):
            raise ValueError(f"`layers` must be 2-d arrays (d_j, d_(j-1)), got shapes {shapes}.")
        if any(min(shape) < 1 for shape in shapes):
            raise ValueError(f"`layers` must have widths >= 1 (no empty layer), got shapes "
                             f"{shapes}.")
        for j in range(1, len(self.layers)):
            if shapes[j][1] != shapes[j - 1][0]:
                raise ValueError(
                    f"`layers` widths do not chain: layer {j + 1} has shape {shapes[j]} "
                    f"but layer {j} has shape {shapes[j - 1]} (need "
                    f"{shapes[j][1]} == {shapes[j - 1][0]}); all shapes: {shapes}."
                )

    @property
    def depth(self) -> int:
        """Number of layers L."""
        return len(self.layers)

    @property
    def dims(self) -> tuple[int, ...]:
        """Widths $(d_0, d_1, \\dots, d_L)$, input first."""
        return (self.layers[0].shape[1],) + tuple(w.shape[0] for w in self.layers)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.layers[-1].shape[0], self.layers[0].shape[1])

    def full(self) -> Float[Array, "d_L d_0"]:
        out = self.layers[0]
        for w in self.layers[1:]:
            out = w @ out
        return out

    def entries(self, indices: Int[Array, "m 2"]) -> Float[Array, " m"]:
        # The matrices are small; reading entries off the product is the cheapest way.
        return self.full()[indices[:, 0], indices[:, 1]]

    def component_norms(self) -> Float[Array, " k"]:
        r"""Singular values of the end matrix, descending ($k=\min(d_0,d_L)$)."""
        return jnp.linalg.svd(self.full(), compute_uv=False)

    @classmethod
    def gaussian(
        cls,
        key: PRNGKeyArray,
        dims: Sequence[int],
        std: float | ArrayLike,
        dtype=jnp.float64,
        det_sign: int | None = None,
    ) -> "DeepMatrix":
        """I.i.d. $\\mathcal N(0, \\mathrm{std}^2)$ entries in every layer (not balanced).

        **Arguments:**

        - `key`: a JAX PRNG key.
        - `dims`: widths $(d_0, d_1, \\dots, d_L)$, input dimension first, at least
          two entries; layer $j$ has shape $(d_j, d_{j-1})$.
        - `std`: standard deviation of every entry (may be a traced scalar).
        - `dtype`: float64 by default.
        - `det_sign`: `+1` or `-1` to force $\\operatorname{sign}\\det W(0)$ (square end
          matrices only) by flipping the sign of the first row of $W_L$ if needed,
          as the Razin–Cohen experiments do (THEORY.md §2.6). `None` leaves it free.

        **Returns:** a `DeepMatrix`.
        """
        dims = check_dims("dims", dims, min_len=2)
        check_positive("std", std, allow_zero=True)
        if det_sign is not None:
            if det_sign not in (1, -1) or isinstance(det_sign, bool):
                raise ValueError(f"`det_sign` must be +1, -1 or None, got {det_sign!r}.")
            if dims[0] != dims[-1]:
                raise ValueError(
                    f"`det_sign` needs a square end matrix, but `dims` gives shape "
                    f"({dims[-1]}, {dims[0]})."
                )
        keys = jr.split(key, len(dims) - 1)
        std = jnp.asarray(std, dtype)
        layers = [
            std * jr.normal(k, (d_out, d_in), dtype)
            for k, d_in, d_out in zip(keys, dims[:-1], dims[1:])
        ]
        if det_sign is not None:
            sign = jnp.sign(jnp.linalg.det(cls(layers).full()))
            flip = jnp.where(sign == det_sign, 1.0, -1.0).astype(dtype)
            layers[-1] = layers[-1].at[0].multiply(flip)
        return cls(layers)

    @classmethod
    def balanced(
        cls,
        key: PRNGKeyArray,
        end: Float[ArrayLike, "d_L d_0"],
        dims: Sequence[int],
        dtype=jnp.float64,
    ) -> "DeepMatrix":
        r"""Exactly balanced layers whose product is `end` (THEORY.md §1.3).

        With the thin SVD $\mathrm{end}=USV^\top$ of rank $k$ and random $Q_j$ with
        orthonormal columns ($d_j\times k$, QR of a Gaussian) for the hidden layers:
        $W_1=Q_1S^{1/L}V^\top$, $W_j=Q_jS^{1/L}Q_{j-1}^\top$, $W_L=US^{1/L}Q_{L-1}^\top$.
        Then every $C_j=W_{j+1}^\top W_{j+1}-W_jW_j^\top$ is zero (up to rounding) and
        $W_{L:1}=\mathrm{end}$. Singular values below $10^{-12}\sigma_{\max}$ count as
        zero.

        **Arguments:**

        - `key`: a JAX PRNG key (for the $Q_j$).
        - `end`: the end matrix $W(0)$, shape $(d_L, d_0)$; must be concrete.
        - `dims`: widths $(d_0, \dots, d_L)$ as in [`gradflow.DeepMatrix.gaussian`][];
          `dims[0]` and `dims[-1]` must match `end`, and every hidden width must be
          at least the rank of `end`.
        - `dtype`: float64 by default.

        **Returns:** a balanced `DeepMatrix` of depth `len(dims) - 1`.
        """
        dims = check_dims("dims", dims, min_len=2)
        end_np = concrete(end)
        if end_np is None:
            raise ValueError("`end` must be a concrete array, not a traced value.")
        check_finite("end", end_np)
        if end_np.ndim != 2 or end_np.shape != (dims[-1], dims[0]):
            raise ValueError(
                f"`end` must have shape (dims[-1], dims[0]) = ({dims[-1]}, {dims[0]}), "
                f"got {end_np.shape}."
            )
        depth = len(dims) - 1
        end_arr = jnp.asarray(end_np, dtype)
        if depth == 1:
            return cls((end_arr,))
        u, s, vt = jnp.linalg.svd(end_arr, full_matrices=False)
        s_np = np.asarray(s)
        k = int(np.sum(s_np > 1e-12 * s_np.max())) if s_np.size and s_np.max() > 0 else 0
        hidden = dims[1:-1]
        if any(d < k for d in hidden):
            raise ValueError(
                f"`dims` hidden widths {hidden} must all be >= rank(end) = {k}."
            )
        if k == 0:
            return cls(
                [jnp.zeros((d_out, d_in), dtype) for d_in, d_out in zip(dims[:-1], dims[1:])]
            )
        u, root, vt = u[:, :k], s[:k] ** (1.0 / depth), vt[:k]
        qs = [
            jnp.linalg.qr(jr.normal(kj, (d, k), dtype))[0]
            for kj, d in zip(jr.split(key, depth - 1), hidden)
        ]
        layers = [qs[0] * root @ vt]
        for j in range(1, depth - 1):
            layers.append(qs[j] * root @ qs[j - 1].T)
        layers.append(u * root @ qs[-1].T)
        return cls(layers)

    @classmethod
    def identity(
        cls, d: int, depth: int, alpha: float | ArrayLike, dtype=jnp.float64
    ) -> "DeepMatrix":
        r"""Residual init $W_j=\alpha^{1/L}I_d$, so $W(0)=\alpha I$ and it is balanced (§1.3).

        **Arguments:**

        - `d`: the (square) width of every layer.
        - `depth`: the number of layers L >= 1.
        - `alpha`: the end scale $\alpha > 0$.
        - `dtype`: float64 by default.

        **Returns:** a `DeepMatrix` of depth `depth`.
        """
        (d,) = check_dims("d", (d,))
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
            raise ValueError(f"`depth` must be a positive int, got {depth!r}.")
        check_positive("alpha", alpha)
        root = jnp.asarray(alpha, dtype) ** (1.0 / depth)
        return cls([root * jnp.eye(d, dtype=dtype) for _ in range(depth)])
