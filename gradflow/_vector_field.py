"""The gradient-flow vector field, shared by the solve and the analysis."""

import equinox as eqx
import jax
import jax.numpy as jnp


def vector_field(t, model, objective):
    """$-\\nabla\\phi$ at `model`: the gradient-flow vector field (Diffrax signature `(t, y, args)`).

    **Arguments:**

    - `t`: the time (unused: gradient flow is autonomous).
    - `model`: the state, a gradflow model.
    - `objective`: the objective $\\phi$ (Diffrax's `args`).

    **Returns:** a model of the same structure holding $-\\nabla\\phi$(`model`).

    !!! Example

        ```python
        velocity = gf.vector_field(0.0, model, objective)  # e.g. a CP of velocities
        ```
    """
    return jax.tree.map(jnp.negative, eqx.filter_grad(objective)(model))


def rate_along_flow(quantity, model, objective):
    """$\\frac{d}{dt}$`quantity(model)` under gradient flow: the chain rule, a JVP of
    `quantity` along $-\\nabla\\phi$ (exact, no finite differences).

    **Arguments:**

    - `quantity`: a function of the model (component norms, the end tensor, ...).
    - `model`, `objective`: the state and the objective $\\phi$.

    **Returns:** the time derivative, shaped like `quantity(model)`.
    """
    if not callable(quantity):
        raise TypeError(
            f"`quantity` must be a function of the model, got {type(quantity).__name__}."
        )
    velocity = vector_field(0.0, model, objective)
    return jax.jvp(quantity, (model,), (velocity,))[1]
