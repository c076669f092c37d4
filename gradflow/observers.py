"""Observers: functions `(t, model, objective) -> pytree` evaluated at save times.

A trajectory stores observer values, not parameters, so its memory is
O(saves x observables) however many steps the solver takes. Any function of that
signature is an observer; these are the common ones, also addressable by name.
"""

import equinox as eqx
import jax
import jax.numpy as jnp

from ._numerics import safe_divide
from ._validate import check_int
from ._vector_field import rate_along_flow
from .objectives import AbstractObjective


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
    return safe_divide(inner, norms)


def component_norm_rates(t, model, objective):
    """$\\dot P_r$ (the time derivative of `component_norms`) by the chain rule."""
    return rate_along_flow(lambda m: m.component_norms(), model, objective)


def factor_norms(t, model, objective):
    """Frobenius norm of every weight array, in the model's leaf order (CP: one per mode
    $\\|W^n\\|_F$; `DeepMatrix`: one per layer $\\|W_j\\|_F$, input layer first)."""
    return jnp.stack([jnp.linalg.norm(x) for x in jax.tree.leaves(model)])


def component_cosines(t, model, objective):
    r"""CP: the cosine similarities of the components' rank-one tensors, `(R, R)`:
    $\cos(\otimes_n\mathbf w_r^n,\otimes_n\mathbf w_s^n)=\prod_n\langle\hat{\mathbf w}_r^n,
    \hat{\mathbf w}_s^n\rangle$ (1 on the diagonal; 0 in the rows and columns of a zero
    component). Its memory is $R^2$ per save: for large $R$ observe the top
    components only (`top_component_cosines(k)`)."""
    return _cosines(model.factors)


def top_component_cosines(k: int = 10):
    """An observer: the `(k, k)` cosines of `component_cosines` between the `k`
    components of largest norm, largest first.

    **Arguments:**

    - `k`: how many components (at most R are used).

    **Returns:** an observer `(t, model, objective) -> (k, k)`.
    """
    k = check_int("k", k)

    def top_component_cosines(t, model, objective):
        top = jax.lax.top_k(model.component_norms(), min(k, model.rank))[1]
        return _cosines(tuple(f[:, top] for f in model.factors))

    return top_component_cosines


def top_column_norms(k: int = 10):
    """An observer: for every mode $n$ of a CP model, the `k` largest column norms
    $\\|\\mathbf w_r^n\\|$, shape `(N, k)`, descending in each row (the papers log them
    per mode; their components need not be the same in every row).

    **Arguments:**

    - `k`: how many columns per mode (at most R are returned).

    **Returns:** an observer `(t, model, objective) -> (N, min(k, R))`.
    """
    k = check_int("k", k)

    def top_column_norms(t, model, objective):
        norms = model.vector_norms()
        return jax.lax.top_k(norms, min(k, norms.shape[1]))[0]

    return top_column_norms


def gradient_alignment(t, model, objective):
    r"""CP: the cosine between each component's tensor and $-\nabla\mathcal L(\mathcal W_e)$,
    $\langle-\nabla\mathcal L,\otimes_n\hat{\mathbf w}_r^n\rangle/\|\nabla\mathcal L\|
    =\gamma_r/\|\nabla\mathcal L(\mathcal W_e)\|$, shape `(R,)`, in $[-1,1]$ (0 where
    $P_r=0$ or the gradient is 0). The tensor-factorization paper's alignment check:
    a component grows fastest when it is aligned with $-\nabla\mathcal L$ (value near
    1). Forms the end tensor."""
    g = gammas(t, model, objective)
    size = jnp.linalg.norm(objective.tensor_gradient(model.full()))
    return safe_divide(g, size)


def singular_basis_gradient(t, model, objective):
    r"""Matrices (`DeepMatrix`, or any order-2 model): the end gradient in the singular
    basis of the end matrix, $G=U^\top\nabla\ell(W)V$ for $W=USV^\top$ (full SVD),
    summarized: `{"diagonal": diag G (min(d_L, d_0),), "off_diagonal": ||G - diag G||_F,
    "off_diagonal_fraction": ||G - diag G||_F / ||G||_F}` (0 where $\nabla\ell=0$).

    Arora et al.'s alignment: under gradient flow from small init the singular vectors
    of $W$ move toward those of the gradient, and the off-diagonal fraction is small
    while the singular values $\sigma_r$ evolve by $u_r^\top\nabla\ell\,v_r$ (diagonal)."""
    w = model.full()
    if w.ndim != 2:
        raise ValueError(f"`singular_basis_gradient` needs an end matrix, got shape {w.shape}.")
    u, _, vt = jnp.linalg.svd(w, full_matrices=True)
    rotated = u.T @ objective.tensor_gradient(w) @ vt.T
    diagonal = jnp.diagonal(rotated)
    total = jnp.linalg.norm(rotated)
    off = jnp.linalg.norm(jnp.where(jnp.eye(*rotated.shape, dtype=bool), 0.0, rotated))
    return {"diagonal": diagonal, "off_diagonal": off,
            "off_diagonal_fraction": safe_divide(off, total)}


def held_out_loss(test_objective: AbstractObjective):
    """An observer: the loss of `test_objective` at the model — held-out evaluation,
    e.g. with the `test` half of [`gradflow.Completion.split`][].

    **Arguments:**

    - `test_objective`: a gradflow objective of the model's shape (cast to the
      model's dtype when observed).

    **Returns:** an observer `(t, model, objective) -> scalar`.

    !!! Example

        ```python
        train, test = objective.split(jr.key(0), 0.2)
        trajectory = gf.flow(model, train, t1=1e9, observers={"test_loss": gf.observers.held_out_loss(test)})
        ```
    """
    if not isinstance(test_objective, AbstractObjective):
        raise TypeError(f"`test_objective` must be a gradflow objective, got "
                        f"{type(test_objective).__name__}.")

    def held_out_loss(t, model, objective):
        test_objective.check_model(model)
        dtype = jax.tree.leaves(model)[0].dtype
        return test_objective.astype(dtype)(model)

    return held_out_loss


def _cosines(factors):
    """prod_n of the Gram matrices of the normalized columns (zero columns stay 0)."""
    out = None
    for f in factors:
        norms = jnp.linalg.norm(f, axis=0)
        unit = safe_divide(f, jnp.broadcast_to(norms, f.shape))
        gram = unit.T @ unit
        out = gram if out is None else out * gram
    return out


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
        factor_norms,
        component_cosines,
        gradient_alignment,
        singular_basis_gradient,
        parameters,
    )
}
DEFAULT = ("loss", "component_norms", "end_norm")


def resolve(observers, model=None, objective=None) -> dict:
    """Normalize `observers` (None, names, callables or a dict) to `{name: fn}`.

    The loss is always observed (under the name `"loss"`). Given the `model` (and
    `objective`) of the solve, every observer is also evaluated on them abstractly
    (`equinox.filter_eval_shape`: no computation), so that one that does not apply to the model
    (a CP observer on a `DeepMatrix`, say) is refused when the solve is set up, with
    a `ValueError` naming `observers` and the model's type.
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
    if model is not None:
        _check_applies(out, model, objective)
    return out


_APPLIES: dict = {}
"""The (observers, model, objective) signatures already checked by `_check_applies`."""


def _signature(tree):
    """What an abstract evaluation depends on: the structure, shapes and dtypes."""
    return jax.tree.structure(tree), tuple(
        (x.shape, x.dtype) if eqx.is_array(x) else x for x in jax.tree.leaves(tree))


def _check_applies(observers: dict, model, objective) -> None:
    """Every observer evaluated abstractly at `(0, model, objective)`; one that fails
    (`model.vector_norms` of a `DeepMatrix`, ...) is a `ValueError` naming it. A
    signature that passed is remembered, so repeated solves pay nothing."""
    try:
        key = (tuple(observers.items()), _signature(model), _signature(objective))
        hash(key)
    except TypeError:  # an unhashable leaf: check every time
        key = None
    if key is not None and key in _APPLIES:
        return
    leaves = [x for x in jax.tree.leaves(model) if eqx.is_array(x)]
    t = jnp.zeros((), leaves[0].dtype if leaves else float)
    kind = type(model).__name__
    for name, fn in observers.items():
        try:
            eqx.filter_eval_shape(fn, t, model, objective)
        except Exception as error:  # any failure: it cannot observe this model
            first = str(error).splitlines()[0] if str(error) else ""
            raise ValueError(
                f"`observers`: {name!r} does not apply to a {kind} model "
                f"({type(error).__name__}: {first})."
            ) from error
    if key is not None:
        if len(_APPLIES) >= 256:  # bounded (observers made per call are new keys)
            _APPLIES.clear()
        _APPLIES[key] = True
