"""The gradient-flow vector field, shared by the solve and the analysis."""

import equinox as eqx
import jax
import jax.numpy as jnp


def vector_field(t, model, objective):
    """$-\\nabla\\phi$ at `model` (Diffrax signature `(t, y, args)`)."""
    return jax.tree.map(jnp.negative, eqx.filter_grad(objective)(model))
