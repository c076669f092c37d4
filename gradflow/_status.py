"""How a solve ended: one enumeration, used by the flow, descent, sweeps and their files.

The integer codes are what `final_state`, sweeps and files store; the labels
(`"t1"`, `"loss"`, ...) are what a [`gradflow.Trajectory`][] shows. The codes are
fixed: files written by earlier versions hold the same codes and labels.
"""

import enum

import jax.numpy as jnp
from jaxtyping import Array, Bool, Int


class Status(enum.IntEnum):
    """How a solve ended.

    **Members** (code, label, meaning):

    - `T1` (0, `"t1"`): reached the final time `t1` (or the step budget of descent).
    - `LOSS` (1, `"loss"`): stopped because the loss fell to `loss_tol`.
    - `RADIUS` (2, `"radius"`): stopped because the end tensor reached the sphere.
    - `MAX_STEPS` (3, `"max_steps"`): ran out of steps before any stop condition.
    - `NON_FINITE` (4, `"non_finite"`): the weights, time or loss became non-finite.
    - `STEP_UNDERFLOW` (5, `"step_underflow"`): the step size underflowed.
    - `FAILED` (6, `"failed"`): the solver reported another error.

    The first three are finished solves (`status.finished`).
    """

    T1 = 0
    LOSS = 1
    RADIUS = 2
    MAX_STEPS = 3
    NON_FINITE = 4
    STEP_UNDERFLOW = 5
    FAILED = 6

    @property
    def label(self) -> str:
        """The name shown in trajectories and files (`"t1"`, `"max_steps"`, ...)."""
        return self.name.lower()

    @property
    def message(self) -> str:
        return _MESSAGES[self]

    @property
    def finished(self) -> bool:
        """True for a solve that ended at a stop condition (t1, loss or radius)."""
        return self <= Status.RADIUS

    @classmethod
    def of(cls, value) -> "Status":
        """The member for a code (int) or a label (str)."""
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                raise ValueError(f"unknown status {value!r}; known: {LABELS}.") from None
        return cls(int(value))


_MESSAGES = {
    Status.T1: "reached the final time t1",
    Status.LOSS: "stopped: loss fell below loss_tol",
    Status.RADIUS: "stopped: end tensor reached the sphere of radius `radius`",
    Status.MAX_STEPS: "FAILED: max_steps reached before any stop condition",
    Status.NON_FINITE: "FAILED: the state or loss became non-finite",
    Status.STEP_UNDERFLOW: "FAILED: step size underflowed (t + dt == t)",
    Status.FAILED: "FAILED: the solver reported an error",
}

LABELS = tuple(s.label for s in Status)
"""Every label, in code order (`LABELS[code]`)."""

FINISHED = tuple(s.label for s in Status if s.finished)
"""The labels of finished solves."""


def label(code) -> str:
    """The label of a status code (an int or a 0-d array)."""
    return Status(int(code)).label


def traced_code(
    solver_code: Int[Array, ""], stopped: Int[Array, ""], finite: Bool[Array, ""]
) -> Int[Array, ""]:
    """The status code of a solve inside `jit`/`vmap`.

    **Arguments:**

    - `solver_code`: one of `successful`, `event`, `max_steps`, `underflow` or `other`
      as `SOLVER_CODES` numbers it (the driver maps Diffrax's result onto these).
    - `stopped`: the status code of the stop that fired (used for `event`).
    - `finite`: whether the final state is finite.
    """
    conditions = [
        ~finite,
        solver_code == SOLVER_CODES["successful"],
        solver_code == SOLVER_CODES["event"],
        solver_code == SOLVER_CODES["max_steps"],
        solver_code == SOLVER_CODES["underflow"],
    ]
    choices = [Status.NON_FINITE, Status.T1, stopped, Status.MAX_STEPS, Status.STEP_UNDERFLOW]
    choices = [jnp.asarray(c, jnp.int32) for c in choices]
    return jnp.select(conditions, choices, jnp.asarray(Status.FAILED, jnp.int32))


SOLVER_CODES = {"successful": 0, "event": 1, "max_steps": 2, "underflow": 3, "other": 4}
"""How a solver's own result is summarized for `traced_code`."""
