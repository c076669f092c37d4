"""Small numerical helpers shared by the solve, the observers and the analyses."""

import jax.numpy as jnp


def safe_divide(num, den):
    """`num / den` where `den > 0`, and 0 elsewhere (`num` and `den` of one shape, or
    `den` a scalar).

    The division is never evaluated where `den <= 0` (the denominator is replaced by 1
    there first), so neither the value nor its gradient holds a NaN or an infinity: a
    ratio of a quantity to a norm, a size or a squared gradient that may be 0.
    """
    positive = den > 0
    return jnp.where(positive, num / jnp.where(positive, den, 1.0), 0.0)
