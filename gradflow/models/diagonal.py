"""Diagonal linear networks: $\\beta = u^{\\odot D} - v^{\\odot D}$ (Woodworth et al. 2020)."""

import equinox as eqx
from jax import lax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from .._validate import as_array, check_float_dtype, check_int, check_positive, concrete
from .base import AbstractAdditiveFactorization


class DiagonalNet(AbstractAdditiveFactorization):
    r"""A depth-$D$ diagonal linear network, $\beta = u^{\odot D} - v^{\odot D}$.

    Its end "tensor" is the vector $\beta\in\mathbb R^d$ (shape `(d,)`), so
    [`gradflow.Sensing`][] with the rows of a design matrix $X$ (`(n, d)`) as
    operators is least-squares regression $\frac1{2n}\|X\beta - y\|^2$. Its components
    are the coordinates: `component_norms()` is $|\beta_i|$, and the model is additive
    in them (coordinate $i$ owns the weights $u_i, v_i$), so the default solver treats
    the largest coordinates implicitly once the flow is stiff
    ([`gradflow.LargestComponents`][]).

    **Arguments:**

    - `u`, `v`: the weights, 1-d arrays of the same shape `(d,)` and dtype. The
      constructors `uniform` (Woodworth et al.'s $u = v = \alpha\mathbf 1$) and
      `gaussian` make the usual inits.
    - `depth`: $D \ge 2$ (an int).
    - `coordinates`, `dim`: set only by `take` (leave them `None`): a block of $k$
      coordinates carries their indices in `coordinates` and the length `dim` of the
      whole vector, so that it is observed by the same objective as the whole model.
      The indices are stored in the weights' dtype (so that a block flattens to one
      array, as the solver's linear algebra wants); nothing depends on them
      differentiably, so their gradient is zero and a flow leaves them fixed.

    !!! Example

        ```python
        import gradflow as gf

        model = gf.DiagonalNet.uniform(100, alpha=1e-3)          # u = v = 1e-3, beta = 0
        objective = gf.Sensing(X, y)                               # X: (n, 100), y: (n,)
        trajectory = gf.flow(model, objective, t1=1e8, loss_drop=1e-16)
        ```
    """

    u: Float[Array, " k"]
    v: Float[Array, " k"]
    coordinates: Float[Array, " k"] | None
    depth: int = eqx.field(static=True)
    dim: int = eqx.field(static=True)

    def __init__(self, u, v, depth: int = 2, *, coordinates=None, dim=None):
        self.u = as_array("u", u)
        self.v = as_array("v", v)
        self.depth = check_int("depth", depth, minimum=2)
        if coordinates is None:
            if dim is not None:
                raise ValueError("`dim` is set only together with `coordinates` (by `take`).")
            self.coordinates = None
            self.dim = int(self.u.shape[0]) if self.u.ndim == 1 else 0
        else:
            self.coordinates = jnp.asarray(coordinates).astype(self.u.dtype)
            self.dim = check_int("dim", dim)

    def __check_init__(self):
        for name in ("u", "v"):
            x = getattr(self, name)
            if x.ndim != 1 or x.shape[0] < 1:
                raise ValueError(f"`{name}` must be a non-empty 1-d array, got shape {x.shape}.")
            if not jnp.issubdtype(x.dtype, jnp.floating):
                raise TypeError(f"`{name}` must be a real floating-point array, got {x.dtype}.")
        if self.u.shape != self.v.shape or self.u.dtype != self.v.dtype:
            raise ValueError(
                f"`u` and `v` must have the same shape and dtype, got {self.u.shape} "
                f"{self.u.dtype} and {self.v.shape} {self.v.dtype}."
            )
        if self.coordinates is not None:
            c = self.coordinates
            if c.shape != self.u.shape:
                raise ValueError(
                    f"`coordinates` must have the shape of `u` {self.u.shape}, got {c.shape}."
                )
            known = concrete(c)
            if known is not None and (np.any(known < 0) or np.any(known >= self.dim)
                                      or np.any(known != np.round(known))):
                raise ValueError(f"`coordinates` must be integers in [0, {self.dim}), got "
                                 f"{known}.")

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.dim,)

    def coefficients(self) -> Float[Array, " k"]:
        r"""$u^{\odot D} - v^{\odot D}$ of this model's own coordinates (all of $\beta$
        for a whole model; the block's entries for a block)."""
        return self.u**self.depth - self.v**self.depth

    def full(self) -> Float[Array, " d"]:
        """The vector $\\beta$ (length `dim`; a block is zero off its coordinates)."""
        beta = self.coefficients()
        if self.coordinates is None:
            return beta
        return jnp.zeros(self.dim, beta.dtype).at[self._indices()].add(beta)

    def _indices(self) -> Int[Array, " k"]:
        """A block's coordinates (set by `take`), as ints."""
        if self.coordinates is None:
            raise ValueError("only a block of coordinates (made by `take`) has indices.")
        return jnp.round(lax.stop_gradient(self.coordinates)).astype(jnp.int32)

    def entries(self, indices: Int[Array, "m 1"]) -> Float[Array, " m"]:
        return self.full()[indices[:, 0]]

    def entries_jacobian(self, indices: Int[Array, "m 1"]) -> Float[Array, "m weights"]:
        r"""Closed form: $\partial\beta_i/\partial u_j = [i=j]\,D u_j^{D-1}$,
        $\partial\beta_i/\partial v_j = -[i=j]\,D v_j^{D-1}$ (a block's `coordinates`,
        not weights, get zero columns)."""
        own = jnp.arange(self.dim) if self.coordinates is None else self._indices()
        hit = (indices[:, :1] == own[None, :].astype(indices.dtype)).astype(self.u.dtype)
        d = self.depth
        blocks = [hit * (d * self.u ** (d - 1))[None, :], -hit * (d * self.v ** (d - 1))[None, :]]
        if self.coordinates is not None:
            blocks.append(jnp.zeros_like(hit))
        return jnp.concatenate(blocks, axis=1)

    def component_norms(self) -> Float[Array, " k"]:
        r"""$|\beta_i|$ of every coordinate (of the block's, for a block)."""
        return jnp.abs(self.coefficients())

    def conserved(self) -> tuple[Float[Array, " k"], Float[Array, ""]]:
        r"""Every coordinate's invariant ($u_iv_i$ at depth 2, $u_i^{2-D}+v_i^{2-D}$ at
        depth $D\ge3$; see `gradflow.analysis.diagonal.invariants`) and the largest
        magnitude among them."""
        u, v = self.u, self.v
        values = u * v if self.depth == 2 else u ** (2 - self.depth) + v ** (2 - self.depth)
        return values, jnp.max(jnp.abs(values))

    def take(self, components: Int[Array, " k"]) -> "DiagonalNet":
        """The block of the given coordinates (indices into this model's own)."""
        components = jnp.asarray(components)
        own = components if self.coordinates is None else self._indices()[components]
        return DiagonalNet(self.u[components], self.v[components], self.depth,
                           coordinates=own, dim=self.dim)

    def put(self, components: Int[Array, " k"], sub: "DiagonalNet") -> "DiagonalNet":
        """This model with the weights of the given coordinates replaced by `sub`'s."""
        components = jnp.asarray(components)
        return eqx.tree_at(lambda m: (m.u, m.v), self,
                           (self.u.at[components].set(sub.u), self.v.at[components].set(sub.v)))

    @classmethod
    def uniform(cls, d: int, alpha: float | ArrayLike, depth: int = 2,
                dtype=jnp.float64) -> "DiagonalNet":
        r"""Woodworth et al.'s init $u = v = \alpha\mathbf 1$, so $\beta(0) = 0$.

        **Arguments:**

        - `d`: the number of coordinates.
        - `alpha`: the init scale $\alpha > 0$, a scalar or one value per coordinate
          (shape `(d,)`); it may be a traced scalar (sweeps).
        - `depth`: $D \ge 2$.
        - `dtype`: float64 by default; `jnp.float32` for single precision.

        **Returns:** a `DiagonalNet`.
        """
        d = check_int("d", d)
        check_float_dtype("dtype", dtype)
        check_positive("alpha", alpha)
        if np.ndim(alpha) not in (0, 1) or (np.ndim(alpha) == 1 and np.shape(alpha) != (d,)):
            raise ValueError(f"`alpha` must be a scalar or of shape ({d},), got shape "
                             f"{np.shape(alpha)}.")
        w = jnp.broadcast_to(jnp.asarray(alpha, dtype), (d,))
        return cls(w, w, depth)

    @classmethod
    def gaussian(cls, key: PRNGKeyArray, d: int, std: float | ArrayLike, depth: int = 2,
                 dtype=jnp.float64) -> "DiagonalNet":
        r"""I.i.d. $\mathcal N(0, \mathrm{std}^2)$ entries of $u$ and $v$.

        **Arguments:**

        - `key`: a JAX PRNG key.
        - `d`: the number of coordinates.
        - `std`: the standard deviation (> 0; may be a traced scalar).
        - `depth`, `dtype`: as in [`gradflow.DiagonalNet.uniform`][].

        **Returns:** a `DiagonalNet`.
        """
        d = check_int("d", d)
        check_float_dtype("dtype", dtype)
        check_positive("std", std, scalar=True)
        k_u, k_v = jr.split(key)
        std = jnp.asarray(std, dtype)
        return cls(std * jr.normal(k_u, (d,), dtype), std * jr.normal(k_v, (d,), dtype), depth)
