"""Deep matrix factorization (deep linear network; Arora, Cohen & Hazan 2018)."""

from collections.abc import Sequence

import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from .._validate import check_dims, check_finite, check_float_dtype, check_positive, concrete
from .base import AbstractFactorization


class DeepMatrix(AbstractFactorization):
    r"""$W = W_{L:1} = W_L\cdots W_1$, with $W_j\in\mathbb R^{d_j\times d_{j-1}}$.

    **Arguments:**

    - `layers`: a tuple of matrices; `layers[j - 1]` is $W_j$ (the input layer $W_1$
      comes first; constructors `gaussian`, `orthogonal`, `uniform`, `balanced`,
      `identity`), so the end
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

    layers: tuple[Float[Array, "_d_j _d_jm1"], ...]  # one shape per layer

    def __init__(self, layers: Sequence[Float[ArrayLike, "_d_j _d_jm1"]]):
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

    def conserved(self) -> tuple[Float[Array, " n"], Float[Array, ""]]:
        r"""Every entry of $C_j=W_{j+1}^\top W_{j+1}-W_jW_j^\top$ (balancedness, conserved
        for every loss; none at depth 1) and $\max_j\|W_j\|_F^2$."""
        cs = [b.T @ b - a @ a.T for a, b in zip(self.layers[:-1], self.layers[1:])]
        values = (jnp.concatenate([c.ravel() for c in cs]) if cs
                  else jnp.zeros((0,), self.layers[0].dtype))
        return values, jnp.max(jnp.stack([jnp.sum(w**2) for w in self.layers]))

    @classmethod
    def gaussian(
        cls,
        key: PRNGKeyArray,
        dims: Sequence[int],
        std: float | ArrayLike,
        dtype=jnp.float64,
        det_sign: int | None = None,
        *,
        end_scale: float | ArrayLike | None = None,
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
          as the Razin–Cohen experiments do (docs: Theory › Norms go to infinity, the
          paper's experiments). `None` leaves it free.
        - `end_scale`: if given, the layers are then rescaled (all by one factor) so
          that $\\|W(0)\\|_F/\\sqrt n$ = `end_scale` exactly (Arora et al.'s init-scale
          convention, see [`gradflow.DeepMatrix.with_end_scale`][]); `std` then only
          shapes the draw.

        **Returns:** a `DeepMatrix`.
        """
        dims = check_dims("dims", dims, min_len=2)
        check_float_dtype("dtype", dtype)
        check_positive("std", std, allow_zero=True, scalar=True)
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
        return _maybe_end_scale(cls(layers), end_scale)

    @classmethod
    def orthogonal(
        cls,
        key: PRNGKeyArray,
        dims: Sequence[int],
        scale: float | ArrayLike = 1.0,
        dtype=jnp.float64,
        *,
        end_scale: float | ArrayLike | None = None,
    ) -> "DeepMatrix":
        r"""Every layer `scale` times a random (semi-)orthogonal matrix.

        $W_j=\mathrm{scale}\cdot Q_j$ with $Q_j$ Haar-distributed: orthonormal columns
        if $d_j\ge d_{j-1}$, orthonormal rows otherwise (QR of a Gaussian matrix, with
        the signs of $R$'s diagonal folded in). For square layers every singular value
        of $W_j$ is `scale`, and of $W(0)$ is $\mathrm{scale}^L$.

        **Arguments:**

        - `key`, `dims`, `dtype`: as in [`gradflow.DeepMatrix.gaussian`][].
        - `scale`: the singular value of every layer ($\ge0$, may be traced).
        - `end_scale`: as in [`gradflow.DeepMatrix.gaussian`][] (overrides `scale`'s
          size, keeps the directions).

        **Returns:** a `DeepMatrix`.
        """
        dims = check_dims("dims", dims, min_len=2)
        check_float_dtype("dtype", dtype)
        check_positive("scale", scale, allow_zero=True, scalar=True)
        scale = jnp.asarray(scale, dtype)
        layers = []
        for k, d_in, d_out in zip(jr.split(key, len(dims) - 1), dims[:-1], dims[1:]):
            tall = (max(d_out, d_in), min(d_out, d_in))
            q, r = jnp.linalg.qr(jr.normal(k, tall, dtype))
            q = q * jnp.where(jnp.diag(r) < 0, -1.0, 1.0).astype(dtype)[None, :]
            layers.append(scale * (q if d_out >= d_in else q.T))
        return _maybe_end_scale(cls(layers), end_scale)

    @classmethod
    def uniform(
        cls,
        key: PRNGKeyArray,
        dims: Sequence[int],
        bound: float | ArrayLike,
        dtype=jnp.float64,
        *,
        end_scale: float | ArrayLike | None = None,
    ) -> "DeepMatrix":
        r"""I.i.d. entries uniform on $[-\mathrm{bound},\mathrm{bound}]$ in every layer
        (standard deviation $\mathrm{bound}/\sqrt3$).

        **Arguments:**

        - `key`, `dims`, `dtype`: as in [`gradflow.DeepMatrix.gaussian`][].
        - `bound`: the half-width ($\ge0$, may be traced).
        - `end_scale`: as in [`gradflow.DeepMatrix.gaussian`][].

        **Returns:** a `DeepMatrix`.
        """
        dims = check_dims("dims", dims, min_len=2)
        check_float_dtype("dtype", dtype)
        check_positive("bound", bound, allow_zero=True, scalar=True)
        bound = jnp.asarray(bound, dtype)
        layers = [
            bound * jr.uniform(k, (d_out, d_in), dtype, minval=-1.0, maxval=1.0)
            for k, d_in, d_out in zip(jr.split(key, len(dims) - 1), dims[:-1], dims[1:])
        ]
        return _maybe_end_scale(cls(layers), end_scale)

    def end_scale(self) -> Float[Array, ""]:
        r"""$\|W\|_F/\sqrt n$ with $n=\min(d_0,d_L)$: the root mean square of the end
        matrix's $n$ singular values (Arora et al.'s measure of the init's scale; for
        an $n\times n$ end matrix, $\|W\|_F/\sqrt n$)."""
        n = min(self.shape)
        return jnp.sqrt(jnp.sum(self.full() ** 2) / n)

    def with_end_scale(self, end_scale: float | ArrayLike) -> "DeepMatrix":
        r"""This model with every layer multiplied by one factor $c^{1/L}$, chosen so that
        $\|W\|_F/\sqrt n$ = `end_scale` ([`gradflow.DeepMatrix.end_scale`][]).

        The directions of the layers, hence the shape of the spectrum and the relative
        imbalance, are kept; only the size changes (Arora et al. set the init's size
        this way, whatever the depth and the widths).

        **Arguments:**

        - `end_scale`: the target $\|W\|_F/\sqrt n$, > 0 (may be traced).

        **Returns:** a `DeepMatrix`; a model whose end matrix is 0 cannot be rescaled
        (a `ValueError` when concrete).
        """
        check_positive("end_scale", end_scale, scalar=True)
        current = self.end_scale()
        now = concrete(current)
        if now is not None and not now > 0:
            raise ValueError("`with_end_scale`: the end matrix is 0, so it cannot be rescaled "
                             "to a given `end_scale`.")
        dtype = self.layers[0].dtype
        factor = (jnp.asarray(end_scale, dtype) / current) ** (1.0 / self.depth)
        return DeepMatrix(tuple(factor * w for w in self.layers))

    @classmethod
    def balanced(
        cls,
        key: PRNGKeyArray,
        end: Float[ArrayLike, "d_L d_0"],
        dims: Sequence[int],
        dtype=jnp.float64,
    ) -> "DeepMatrix":
        r"""Exactly balanced layers whose product is `end` (docs: Theory › Balancedness,
        building an exactly balanced init).

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
        check_float_dtype("dtype", dtype)
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
        root = root[None, :]  # scales the columns
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
        check_float_dtype("dtype", dtype)
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
            raise ValueError(f"`depth` must be a positive int, got {depth!r}.")
        check_positive("alpha", alpha, scalar=True)
        root = jnp.asarray(alpha, dtype) ** (1.0 / depth)
        return cls([root * jnp.eye(d, dtype=dtype) for _ in range(depth)])


def _maybe_end_scale(model: DeepMatrix, end_scale) -> DeepMatrix:
    return model if end_scale is None else model.with_end_scale(end_scale)
