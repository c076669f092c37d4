"""A terminal progress bar for long solves, in log physical time."""

import diffrax as dfx
import jax.numpy as jnp


class LogTimeProgressMeter(dfx.AbstractProgressMeter):
    """A tqdm bar (Diffrax's `TqdmProgressMeter`) whose fraction is
    log(1 + t/t_ref) / log(1 + t1/t_ref).

    Gradient flow from a small init spends its time on geometric scales (escape
    times grow like a power of 1/init), so linear time would sit at 0% for most of
    the solve.

    **Arguments:** `t1` (the solve's final time) and `t_ref` (the time scale below
    which the bar moves linearly).
    """

    t1: float = 1.0
    t_ref: float = 1.0
    bar: dfx.TqdmProgressMeter = dfx.TqdmProgressMeter()

    def init(self):
        return self.bar.init()

    def step(self, state, progress):
        t = progress * self.t1
        return self.bar.step(state, jnp.log1p(t / self.t_ref) / jnp.log1p(self.t1 / self.t_ref))

    def close(self, state):
        return self.bar.close(state)
