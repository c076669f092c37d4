"""Synthetic ground truths and observation patterns, generated in code."""

import math
from collections.abc import Sequence

import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ._validate import check_dims, check_positive
from .models.cp import CP
from .models.htf import HTF, ModeTree


def random_cp_tensor(
    key: PRNGKeyArray, dims: Sequence[int], rank: int, norm: float = 1.0
) -> Float[Array, "..."]:
    """A tensor of CP rank `rank` with Gaussian factors, rescaled to Frobenius `norm`.

    This is the ground truth of the code of Razin, Maman & Cohen (ICML 2021),
    github.com/noamrazin/imp_reg_in_tf, whose generator defaults to order 4, mode
    dimension 10, CP rank 5 and Frobenius norm 1.

    **Arguments:**

    - `key`: a JAX PRNG key.
    - `dims`: mode dimensions $(d_1,\\dots,d_N)$, $N\\ge2$.
    - `rank`: the number of Gaussian rank-one terms (so the CP rank is at most `rank`).
    - `norm`: the Frobenius norm of the result (> 0).

    **Returns:** a float64 array of shape `dims`.

    !!! Example

        ```python
        truth = gf.random_cp_tensor(jr.key(0), (10, 10, 10, 10), rank=5)
        float(jnp.linalg.norm(truth))  # 1.0
        ```
    """
    check_positive("norm", norm, scalar=True)
    tensor = CP.gaussian(key, dims, rank, 1.0).full()
    return norm * tensor / jnp.linalg.norm(tensor)


def sample_indices(
    key: PRNGKeyArray, shape: Sequence[int], num: int
) -> Int[Array, "num order"]:
    """`num` distinct entries of a tensor of `shape`, uniformly without repetition.

    **Arguments:**

    - `key`: a JAX PRNG key.
    - `shape`: the tensor's shape.
    - `num`: how many entries, an int in $[1, \\prod_n d_n]$.

    **Returns:** an integer array `(num, len(shape))`, one entry's index per row, as
    [`gradflow.Completion`][] takes them.

    !!! Example

        ```python
        indices = gf.sample_indices(jr.key(1), (10, 10, 10, 10), 2000)
        objective = gf.Completion.from_tensor(truth, indices)
        ```
    """
    shape = check_dims("shape", shape)
    size = math.prod(shape)
    if not isinstance(num, int) or not 1 <= num <= size:
        raise ValueError(f"`num` must be an int in [1, {size}], got {num!r}.")
    flat = jr.choice(key, size, (num,), replace=False)
    return jnp.stack(jnp.unravel_index(flat, shape), axis=1)


def random_htf_tensor(
    key: PRNGKeyArray, dims: Sequence[int], tree: ModeTree, ranks: Sequence[int],
    norm: float = 1.0,
) -> Float[Array, "..."]:
    """A tensor of low hierarchical rank: a Gaussian HTF with small widths, rescaled.

    The ground truth of the hierarchical-tensor-factorization paper's code.

    **Arguments:**

    - `key`: a JAX PRNG key.
    - `dims`: mode dimensions, one per mode of `tree`.
    - `tree`: a [`gradflow.ModeTree`][].
    - `ranks`: one width per layer of the tree (the paper's `target_tensor_ht_rank`),
      so the hierarchical rank is at most that at every node.
    - `norm`: the Frobenius norm of the result (> 0).

    **Returns:** a float64 array of shape `dims`.
    """
    check_positive("norm", norm, scalar=True)
    tensor = HTF.gaussian(key, dims, tree, tree.layer_widths(ranks), 1.0).full()
    return norm * tensor / jnp.linalg.norm(tensor)
