"""Observers: functions `(t, model, objective) -> pytree` evaluated at save times.

A trajectory stores observer values, not parameters, so its memory is
O(saves x observables) however many steps the solver takes. Any function of that
signature is an observer; these are the common ones, also addressable by name.
"""

from .analysis import cp as _cp


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
    """CP: unbalancedness magnitude $\\epsilon$ (Definition 1)."""
    return _cp.unbalancedness(model)


def gammas(t, model, objective):
    """CP: $\\gamma_r$ for every component (§3.4)."""
    return _cp.gammas(model, objective)


def component_norm_rates(t, model, objective):
    """CP: $\\dot P_r$ by the chain rule."""
    return _cp.component_norm_rates(model, objective)


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
