"""A terminal progress bar for long solves, in log physical time."""

import diffrax as dfx
import jax.numpy as jnp


class LogTimeProgressMeter(dfx.TqdmProgressMeter):
    """tqdm bar whose fraction is log(1 + t/t_ref) / log(1 + t1/t_ref).

    Gradient flow from a small init spends its time on geometric scales (escape
    times grow like a power of 1/init), so linear time would sit at 0% for most of
    the solve.
    """

    t1: float = 1.0
    t_ref: float = 1.0

    def step(self, state, progress):
        t = progress * self.t1
        frac = jnp.log1p(t / self.t_ref) / jnp.log1p(self.t1 / self.t_ref)
        return super().step(state, frac)
