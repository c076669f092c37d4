"""Observers: functions `(t, model, objective) -> pytree` evaluated at save times.

A trajectory stores observer values, not parameters, so its memory is
O(saves x observables) however many steps the solver takes. Any function of that
signature is an observer; these are the common ones, also addressable by name.
"""

import equinox as eqx
import jax.numpy as jnp

from ._vector_field import rate_along_flow


def loss(t, model, objective):
    """The objective's value."""
    return objective(model)


def component_norms(t, model, objective):
    """Norms of the model's components (CP: $P_r$)."""
    return model.component_norms()


def end_norm(t, model, objective):
    """Frobenius norm of the end tensor."""
    return model.norm()


def squared_vector_norms(t, model, objective):
    """CP: $\\|\\mathbf w_r^n\\|^2$, shape `(N, R)` (Lemma 1's conserved gaps)."""
    return model.vector_norms() ** 2


def unbalancedness(t, model, objective):
    r"""CP: unbalancedness magnitude
    $\epsilon=\max_{r,n,\bar n}\big|\|\mathbf w_r^n\|^2-\|\mathbf w_r^{\bar n}\|^2\big|$
    (Definition 1)."""
    sq = model.vector_norms() ** 2
    return jnp.max(sq.max(axis=0) - sq.min(axis=0))


def gammas(t, model, objective):
    r"""CP: $\gamma_r=\langle-\nabla\mathcal L(\mathcal W_e),\otimes_n\hat{\mathbf w}_r^n\rangle$
    for every component (0 where $P_r=0$), from Euler's identity
    $\gamma_r P_r=-\langle\mathbf w_r^1,\nabla_{\mathbf w_r^1}\phi\rangle$."""
    grads = eqx.filter_grad(objective)(model)
    inner = -jnp.sum(model.factors[0] * grads.factors[0], axis=0)
    norms = model.component_norms()
    return jnp.where(norms > 0, inner / jnp.where(norms > 0, norms, 1.0), 0.0)


def component_norm_rates(t, model, objective):
    """$\\dot P_r$ (the time derivative of `component_norms`) by the chain rule."""
    return rate_along_flow(lambda m: m.component_norms(), model, objective)


def parameters(t, model, objective):
    """The whole model (memory grows with the number of saves; use sparingly)."""
    return model


BY_NAME = {
    f.__name__: f
    for f in (
        loss,
        component_norms,
        end_norm,
        squared_vector_norms,
        unbalancedness,
        gammas,
        component_norm_rates,
        parameters,
    )
}
DEFAULT = ("loss", "component_norms", "end_norm")


def resolve(observers) -> dict:
    """Normalize `observers` (None, names, callables or a dict) to `{name: fn}`.

    The loss is always observed (under the name `"loss"`).
    """
    if observers is None:
        observers = DEFAULT
    if isinstance(observers, dict):
        items = observers.items()
    else:
        items = []
        for obs in observers:
            if isinstance(obs, str):
                items.append((obs, obs))
            elif callable(obs):
                items.append((getattr(obs, "__name__", repr(obs)), obs))
            else:
                raise TypeError(f"`observers` entries must be names or callables, got {obs!r}.")
    out = {}
    for name, obs in items:
        if isinstance(obs, str):
            if obs not in BY_NAME:
                raise ValueError(
                    f"`observers`: unknown observer {obs!r}; known: {sorted(BY_NAME)}."
                )
            obs = BY_NAME[obs]
        if not callable(obs):
            raise TypeError(f"`observers[{name!r}]` must be callable, got {obs!r}.")
        out[str(name)] = obs
    out.setdefault("loss", loss)
    return out
