"""Theorem 2 of Razin, Maman & Cohen (ICML 2021): from small init, CP follows a rank-one trajectory.

Huber-loss tensor completion (docs: Theory › Theorem 2 and the Huber loss; default:
order 3, 3x3x3, R = 4, 12 observations with |y| in [0.5, 1.5] and random signs,
delta_h = 0.05 min|y|). The
init satisfies Assumptions 2 and 3 (balanced; component 0 pushed toward the leading
rank-one direction of -grad L(0), the others shrunk below A3's threshold). For each
init scale alpha the flow from alpha*a reaches the sphere |W| = rho at t_S; from there
it is compared with the balanced rank-one trajectory started on the sphere along the
largest component, up to time T (or until |W| = D). Expected: Delta(alpha) -> 0 like
alpha^N (fitted log-log slope ~ N) and t_S * alpha^(N-2) -> const.
"""

import dataclasses
from pathlib import Path

import diffrax as dfx
import jax.numpy as jnp
import jax.random as jr
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import NullFormatter

from .. import plotting
from .. import theorem2
from ..data import sample_indices
from ..objectives import Completion, HuberLoss
from ..solvers import RosenbrockW
from ._config import (check, check_choice, check_int, check_number, check_numbers, check_rtol,
                      output, setting, write_summary)

NAME = "rank-one-trajectory"
SOLVERS = {"dopri8": dfx.Dopri8, "tsit5": dfx.Tsit5, "rosenbrock": RosenbrockW}


@dataclasses.dataclass(frozen=True)
class Config:
    """`gradflow run rank-one-trajectory`: the Huber completion problem, the init scales
    and the comparison with the rank-one trajectory (Theorem 2's protocol)."""

    alphas: tuple[float, ...] = setting((3e-2, 1e-2, 3e-3, 1e-3), "init scales, decreasing")
    order: int = setting(3, "N (>= 3)")
    dim: int = setting(3, "mode dimension")
    components: int = setting(4, "R")
    observations: int = setting(12, "observed entries (uniform, without repetition)")
    delta_fraction: float = setting(0.05, "Huber delta_h as a fraction of min|y| (< 1: "
                                          "Assumption 1)")
    rho_fraction: float = setting(0.5, "sphere radius rho as a fraction of min|y| - delta_h")
    T: float = setting(40.0, "comparison horizon after t_S")
    D: float | None = setting(None, "stop comparing once |W| reaches D (> rho; default: no "
                                    "limit)")
    shrink: float = setting(0.5, "non-leading component norms, as a fraction of A3's "
                                 "threshold")
    power_iterations: int = setting(10, "higher-order power method sweeps toward the leading "
                                        "direction")
    saves: int = setting(400, "comparison times in [0, T]")
    solver: str = setting("dopri8", "ODE solver", choices=tuple(sorted(SOLVERS)))
    rtol: float = setting(1e-13, "solver tolerance; Delta is resolved down to ~rtol x |W|")
    seed: int = setting(0, "seed of the data and the init")

    def __post_init__(self):
        check_numbers(self, "alphas", distinct=True)
        check_int(self, "order", 3)
        check_int(self, "dim", 1)
        check_int(self, "components", 1)
        check_int(self, "observations", 1, self.dim**self.order)
        check_number(self, "delta_fraction", 0.0, 1.0)
        check_number(self, "rho_fraction", 0.0, 1.0)
        check_number(self, "T")
        check_number(self, "D", optional=True)
        check_number(self, "shrink", 0.0, 1.0)
        check_int(self, "power_iterations", 0)
        check_int(self, "saves", 2)
        check_choice(self, "solver", tuple(SOLVERS))
        check_rtol(self)
        check_int(self, "seed", 0)


def huber_problem(key, order: int = 3, dim: int = 3, observations: int = 12,
                  delta_fraction: float = 0.05) -> Completion:
    """Huber completion with |y| uniform in [0.5, 1.5], random signs, uniform entries.

    delta_h = `delta_fraction` * min|y|, so Assumption 1 holds for `delta_fraction` < 1.
    """
    k_idx, k_mag, k_sign = jr.split(key, 3)
    dims = (dim,) * order
    indices = sample_indices(k_idx, dims, observations)
    magnitude = jr.uniform(k_mag, (observations,), minval=0.5, maxval=1.5)
    values = jnp.where(jr.bernoulli(k_sign, 0.5, (observations,)), 1.0, -1.0) * magnitude
    delta = delta_fraction * float(jnp.min(jnp.abs(values)))
    return Completion(dims, indices, values, HuberLoss(delta))


def run(config: Config, out: Path | None = None, progress: bool = False) -> dict:
    """Theorem 2's protocol at every init scale; return the summary (and, given a folder
    `out`, write the figure and `summary.json` there)."""
    k_data, k_init = jr.split(jr.key(config.seed))
    objective = huber_problem(k_data, config.order, config.dim, config.observations,
                              config.delta_fraction)
    ball = theorem2.check_assumption1(objective)
    rho = config.rho_fraction * ball
    check(config.D is None or config.D > rho, "D", f"> rho = {rho:.6g} (or unset)", config.D)
    init = theorem2.leading_init(k_init, objective, config.components, shrink=config.shrink,
                                 power_iterations=config.power_iterations)
    say = (lambda line: print(f"[{NAME}] {line}", flush=True)) if progress else None
    if say:
        say(f"A1 ball radius min|y|-delta_h = {ball:.6g}; "
            f"{theorem2.assumption2(init)}; {theorem2.assumption3(init, objective)}")
    result = theorem2.protocol(
        init, objective, sorted(config.alphas, reverse=True), T=config.T, D=config.D,
        rho=rho, num_saves=config.saves, solver=SOLVERS[config.solver](),
        rtol=config.rtol, progress=say,
    )
    n = result.order
    slope = result.slope()
    others = np.array([r.others_norm for r in result.runs])
    others_slope = float(np.polyfit(np.log(result.alphas), np.log(others), 1)[0]) \
        if len(others) > 1 and np.all(others > 0) else float("nan")
    scaled = result.hit_times_scaled
    summary = {
        "order": n,
        "rho": result.rho,
        "huber_delta": (float(np.asarray(objective.loss.delta))
                        if isinstance(objective.loss, HuberLoss) else None),
        "assumption1_ball_radius": ball,
        "assumptions": {k: {"value": v.value, "passed": v.passed, "detail": v.detail}
                        for k, v in result.verdicts.items()},
        "table": result.table(),
        "delta_slope": slope,
        "others_norm_slope": others_slope,
        "t_hit_scaled_relative_changes": (np.abs(np.diff(scaled)) / scaled[1:]).tolist(),
        "wall_time_s": round(sum(s["wall_time"] for r in result.runs
                                 for s in r.stats.values()), 2),
    }
    if say:
        say(f"{'alpha':>8} {'t_S':>11} {'t_S*a^(N-2)':>12} {'Delta':>10} {'max P_r(t_S), r!=r*':>20}")
        for r in result.runs:
            say(f"{r.alpha:8.1e} {r.t_hit:11.4e} {r.t_hit_scaled:12.5g} {r.delta:10.3e} "
                f"{r.others_norm:20.3e}")
        say(f"fitted slope of log Delta vs log alpha: {slope:.3f} (N = {n})")
    summary = {"experiment": NAME, "config": dataclasses.asdict(config), "results": summary}
    if out is not None:
        out = output(out)
        _figure(result, out / f"{NAME}.png")
        write_summary(out, summary | {"config": summary["config"] | {"out": str(out)}})
    return summary


def _figure(result, path):
    n = result.order
    a, d = result.alphas, result.deltas
    others = np.array([r.others_norm for r in result.runs])
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))

    ax = axes[0]
    ax.loglog(a, d, "o-", label=r"$\Delta(\alpha)$")
    ax.loglog(a, others, "s--", alpha=0.6, label=r"largest other $P_r(t_S)$")
    slope = result.slope()
    if np.isfinite(slope):
        coef = np.polyfit(np.log(a), np.log(d), 1)
        grid = np.geomspace(a.min(), a.max(), 50)
        ax.loglog(grid, np.exp(np.polyval(coef, np.log(grid))), ":", color="k",
                  label=f"fit: slope {slope:.2f} (N = {n})")
    _alpha_axis(ax, a)
    ax.set_title(r"distance to the rank-one trajectory")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")

    ax = axes[1]
    ax.semilogx(a, result.hit_times_scaled, "o-")
    _alpha_axis(ax, a)
    ax.set_ylabel(r"$t_S\,\alpha^{N-2}$")
    ax.set_title("hitting time of the sphere, rescaled")
    ax.grid(alpha=0.3, which="both")

    colors = plt.cm.viridis(np.linspace(0, 0.9, len(result.runs)))
    ax = axes[2]
    for c, r in zip(colors, result.runs):
        ax.semilogy(r.ts, r.distance, color=c, label=rf"$\alpha$ = {r.alpha:g}")
    ax.set_xlabel(r"time after $t_S$")
    ax.set_title(r"$\|\overline{\mathcal{W}}_e(t)-\mathcal{W}_1(t)\|$")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[3]
    r = result.runs[-1]
    ax.plot(r.ts, r.norm, color="C0", lw=3, alpha=0.5, label=r"$\|\overline{\mathcal{W}}_e(t)\|$")
    ax.plot(r.ts, r.rank_one_norm, "--", color="C3", label=r"$\|\mathcal{W}_1(t)\|$ (rank one)")
    ax.set_xlabel(r"time after $t_S$")
    ax.set_title(rf"end-tensor norms, $\alpha$ = {r.alpha:g}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle(f"Theorem 2 (Huber CP completion, order {n}, rho = {result.rho:.3g}, "
                 f"T = {result.T:g}" + (f", D = {result.D:g}" if result.D else "") + ")",
                 fontsize=10)
    plotting.save(fig, path)


def _alpha_axis(ax, alphas):
    """Log x-axis labelled at the init scales themselves (no crowded minor labels)."""
    ax.set_xticks(alphas, [f"{x:g}" for x in alphas])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(r"init scale $\alpha$")
