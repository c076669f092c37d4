"""Diagonal linear networks: the exact implicit bias, from min-l2 to min-l1, saddle to saddle.

Sparse noiseless regression y = X beta* (X: n x d with N(0, 1) entries, beta* with
`sparsity` non-zeros of random signs and magnitudes in [0.5, 2]; default d = 200,
n = 50, 5 non-zeros) fitted by a diagonal network beta = u^D - v^D (`gf.DiagonalNet`)
under gradient flow from u = v = alpha, for alpha over many decades, until the loss has
dropped by `--loss-drop`. For each alpha:

- the distance of the flow's limit from argmin Q_alpha subject to X beta = y, the
  minimiser of Woodworth et al.'s potential (COLT 2020), computed without the flow by
  a Newton solve of its KKT system (`gradflow.analysis.diagonal.flow_limit`): it should
  be at the solver's tolerance;
- its distances from the minimum-l2 and minimum-l1 interpolators (the l2 -> l1
  transition as alpha shrinks), and its test error ||beta - beta*||^2 / ||beta*||^2
  (the population risk for x ~ N(0, I), relative);
- (depth 2) the times at which the coordinates activate, in the accelerated time
  2t / ln(1/alpha), against the jump times of the saddle-to-saddle limit
  alpha -> 0 (Pesme & Flammarion, NeurIPS 2023, Algorithm 1, derived for gradflow's
  loss in `gradflow.analysis.diagonal.saddle_to_saddle`), with the extrapolation
  to 1/ln(1/alpha) = 0 of the two smallest alphas; a coordinate counts as active
  once |beta_i| reaches half its value at the saddle where Algorithm 1 activates it;
- the solver's cost (steps), and the drift of the conserved quantities (at depth 2
  the smaller weight of a learned coordinate falls to ~alpha^2 / |u_i|, far below the
  default atol = rtol * alpha, so there the drift of u_i v_i measures how well the
  solver resolves that weight, not the limit).

The solver is `gf.AutoStiff(gf.RosenbrockW(gf.GaussNewtonSubspace(rank=n)))`: the
Gauss-Newton matrix of a regression on n observations has rank <= n, so this handles
every stiff direction, including the coupling of the large coordinates to the many
small ones that decay slowly at the end (`--solver default` uses gradflow's default,
whose block of the 8 largest coordinates misses that coupling and crawls there).
"""

import dataclasses
import time

import jax.numpy as jnp
import jax.random as jr
import matplotlib.pyplot as plt
import numpy as np

from .. import plotting
from .._flow import flow
from ..analysis import diagonal as ad
from ..models.diagonal import DiagonalNet
from ..objectives import Sensing
from ..solvers import AutoStiff, RosenbrockW
from ..stiffness import GaussNewtonSubspace
from ._config import check, check_int, check_number, check_rtol, output, setting, write_summary

NAME = "diagonal-bias"


@dataclasses.dataclass(frozen=True)
class Config:
    dim: int = setting(200, "d, the number of coordinates")
    observations: int = setting(50, "n < d, the number of observations")
    sparsity: int = setting(5, "non-zeros of beta*")
    depth: int = setting(2, "D >= 2 (the saddle-to-saddle comparison is for depth 2)")
    alphas: tuple[float, ...] = setting(
        (10.0, 1.0, 0.3, 0.1, 0.03, 1e-2, 1e-3, 1e-4, 1e-6, 1e-8, 1e-10),
        "init scales alpha (u = v = alpha)")
    loss_drop: float = setting(1e-20, "stop when the loss falls below this x its initial value")
    rtol: float = setting(1e-10, "solver tolerance")
    solver: str = setting("subspace", "the stiffness approximation of the W steps: the "
                          "Gauss-Newton subspace of rank n, or gradflow's default",
                          choices=("subspace", "default"))
    saves: int = setting(400, "save times per flow")
    t1: float = setting(1e16, "final flow time (the loss stop normally ends the flow first)")
    max_steps: int = setting(100_000, "solver steps per flow")
    seed: int = setting(0, "seed of the data")

    def __post_init__(self):
        check(self.dim >= 2, "dim", "an int >= 2", self.dim)
        check(1 <= self.observations < self.dim, "observations",
              f"an int in [1, dim) = [1, {self.dim})", self.observations)
        check(1 <= self.sparsity <= self.observations, "sparsity",
              f"an int in [1, observations] = [1, {self.observations}]", self.sparsity)
        check(self.depth >= 2, "depth", "an int >= 2", self.depth)
        check(len(self.alphas) >= 1 and all(a > 0 and np.isfinite(a) for a in self.alphas),
              "alphas", "one or more positive numbers", self.alphas)
        check(len(set(self.alphas)) == len(self.alphas), "alphas", "distinct values",
              self.alphas)
        check(0 < self.loss_drop < 1, "loss_drop", "in (0, 1)", self.loss_drop)
        check_rtol(self)
        check(self.saves >= 16, "saves", "an int >= 16", self.saves)
        check_number(self, "t1")
        check_int(self, "seed", 0)
        check(self.max_steps >= 1, "max_steps", "an int >= 1", self.max_steps)


def sparse_regression(key, dim: int, observations: int, sparsity: int):
    """`(X, y, beta*)`: X with N(0, 1) entries, beta* with `sparsity` non-zeros of random
    signs and magnitudes uniform in [0.5, 2] at random coordinates, y = X beta*."""
    k_x, k_support, k_mag, k_sign = jr.split(key, 4)
    X = jr.normal(k_x, (observations, dim))
    support = jr.permutation(k_support, dim)[:sparsity]
    values = jr.uniform(k_mag, (sparsity,), minval=0.5, maxval=2.0)
    values = values * jnp.where(jr.bernoulli(k_sign, 0.5, (sparsity,)), 1.0, -1.0)
    beta = jnp.zeros(dim).at[support].set(values)
    return X, X @ beta, beta


def solver_for(name: str, observations: int):
    """The solver of `--solver`: `None` (gradflow's default) or the rank-n subspace one."""
    if name == "default":
        return None
    return AutoStiff(RosenbrockW(GaussNewtonSubspace(rank=observations)))


def _loss(t, model, objective):
    return objective(model)


def _beta(t, model, objective):
    return model.full()


def _invariant(t, model, objective):
    return ad.invariants(model)


OBSERVERS = {"loss": _loss, "beta": _beta, "invariant": _invariant}
"""What a flow of the experiment records (module-level functions: every flow of one
shape, here or elsewhere, reuses one compiled solve)."""


def _save_times(alpha: float, num: int, horizon: float) -> np.ndarray:
    """0, a geometric grid, and (alpha < 1) a linear grid in accelerated time up to
    `horizon`; always `num` strictly increasing times."""
    if alpha < 1:
        scale = np.log(1 / alpha) / 2
        linear = np.linspace(0.0, horizon, num - num // 4)[1:] * scale
        geometric = np.geomspace(1e-4, 1e16, num // 4 + 1)
        ts = np.unique(np.concatenate([[0.0], linear, geometric]))
    else:
        ts = np.concatenate([[0.0], np.geomspace(1e-6, 1e16, num - 1)])
    ts = ts[:num]
    if ts.size < num:  # (duplicates merged) pad at the end
        ts = np.concatenate([ts, ts[-1] * np.geomspace(2, 2 ** (num - ts.size), num - ts.size)])
    return ts


def run(config: Config, out=None, progress: bool = False) -> dict:
    start = time.perf_counter()
    X, y, truth = sparse_regression(jr.key(config.seed), config.dim, config.observations,
                                    config.sparsity)
    Xn, yn, truth_n = (np.asarray(a, dtype=float) for a in (X, y, truth))
    objective = Sensing(X, y)
    l1 = ad.min_l1_interpolator(Xn, yn)
    l2 = ad.min_l2_interpolator(Xn, yn)
    saddles = ad.saddle_to_saddle(Xn, yn) if config.depth == 2 else None
    horizon = 1.25 * float(saddles.times[-1]) if saddles is not None else 1.0
    first = saddles.first_activation() if saddles is not None else {}
    tracked = np.array(sorted(first, key=lambda i: first[i]), dtype=int)
    thresholds = np.array([0.5 * abs(saddles.betas[np.flatnonzero(saddles.activated == i)[0], i])
                           for i in tracked]) if saddles is not None else np.zeros(0)
    solver = solver_for(config.solver, config.observations)
    risk = lambda b: float(np.sum((b - truth_n) ** 2) / np.sum(truth_n**2))
    rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
    rows, curves = [], {}
    for alpha in sorted(config.alphas, reverse=True):
        model = DiagonalNet.uniform(config.dim, alpha, depth=config.depth)
        tr = flow(model, objective, t1=config.t1, loss_drop=config.loss_drop,
                  save_times=_save_times(alpha, config.saves, horizon), observers=OBSERVERS,
                  solver=solver, rtol=config.rtol, max_steps=config.max_steps, throw=False)
        beta = np.asarray(tr.model.full(), dtype=float)
        limit = ad.flow_limit(Xn, yn, alpha, alpha, config.depth)
        feasibility, stationarity = ad.kkt_residual(limit.beta, Xn, yn, alpha, config.depth)
        invariant = np.asarray(tr["invariant"])
        row = {
            "alpha": alpha,
            "status": tr.status,
            "t_final": tr.t_final,
            "final_loss_ratio": float(tr.final["loss"] / tr["loss"][0]),
            "steps": tr.stats["steps"],
            "explicit_steps": tr.stats.get("explicit_steps"),
            "stiff_steps": tr.stats.get("stiff_steps"),
            "wall_time_s": round(tr.stats["wall_time"], 3),
            "limit_error": rel(beta, limit.beta),
            "newton_converged": limit.converged,
            "newton_iterations": limit.iterations,
            "kkt_feasibility": feasibility,
            "kkt_stationarity": stationarity,
            "distance_l1": rel(beta, l1),
            "distance_l2": rel(beta, l2),
            "test_error": risk(beta),
            "potential_at_limit": ad.potential(beta, alpha, config.depth),
            "potential_minimum": ad.potential(limit.beta, alpha, config.depth),
            "l1_norm": float(np.abs(beta).sum()),
            "support_1e-3": int(np.sum(np.abs(beta) > 1e-3 * np.abs(beta).max())),
            "conservation_drift": float(np.max(np.abs(invariant - invariant[0])
                                               / np.abs(invariant[0]))),
        }
        if tracked.size and alpha < 1:
            times = ad.activation_times(tr.ts, np.asarray(tr["beta"])[:, tracked], thresholds)
            row["activation_accelerated"] = (times * 2 / np.log(1 / alpha)).tolist()
            curves[alpha] = (tr.ts * 2 / np.log(1 / alpha), np.asarray(tr["beta"]))
        rows.append(row)
        if progress:
            print(f"[{NAME}] alpha {alpha:.0e}: {tr.status}, {row['steps']} steps, "
                  f"|beta - argmin Q|/|argmin Q| = {row['limit_error']:.1e}, "
                  f"to l1 {row['distance_l1']:.3g}, to l2 {row['distance_l2']:.3g}, "
                  f"test error {row['test_error']:.3g}", flush=True)
    saddle_summary = _saddle_summary(saddles, tracked, rows) if saddles is not None else None
    ok = [r for r in rows if r["status"] in ("loss", "t1")]
    summary = {
        "experiment": NAME,
        "config": dataclasses.asdict(config),
        "truth_support": np.flatnonzero(truth_n).tolist(),
        "truth_values": truth_n[truth_n != 0].tolist(),
        "min_l1_equals_truth": rel(l1, truth_n),
        "worst_limit_error": max((r["limit_error"] for r in ok), default=float("nan")),
        "rows": rows,
        "saddle_to_saddle": saddle_summary,
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    if out is not None:
        out = output(out)
        _figure(rows, curves, saddles, tracked, config, out / f"{NAME}.png")
        write_summary(out, summary)
    return summary


def _saddle_summary(saddles, tracked, rows) -> dict:
    """Algorithm 1's saddles, and the flow's activation times against its jump times."""
    first = saddles.first_activation()
    small = sorted((r for r in rows if "activation_accelerated" in r), key=lambda r: r["alpha"])
    extrapolated = None
    if len(small) >= 2:  # linear in 1/ln(1/alpha) through the two smallest alphas
        (a0, t0), (a1, t1) = [(r["alpha"], np.asarray(r["activation_accelerated"]))
                              for r in small[:2]]
        x0, x1 = 1 / np.log(1 / a0), 1 / np.log(1 / a1)
        extrapolated = (t0 - x0 * (t1 - t0) / (x1 - x0)).tolist()
    predicted = np.array([first[i] for i in tracked])
    return {
        "jump_times": saddles.times.tolist(),
        "activated": saddles.activated.tolist(),
        "saddles": [{"support": np.flatnonzero(b).tolist(), "values": b[b != 0].tolist()}
                    for b in saddles.betas],
        "last_saddle_is_min_l1": bool(saddles.converged),
        "tracked_coordinates": tracked.tolist(),
        "predicted_activation": predicted.tolist(),
        "extrapolated_activation": extrapolated,
        "extrapolation_error": (None if extrapolated is None else
                                float(np.max(np.abs(np.asarray(extrapolated) - predicted)
                                             / predicted))),
        "smallest_alpha_error": (None if not small else float(np.max(
            np.abs(np.asarray(small[0]["activation_accelerated"]) - predicted) / predicted))),
    }


def _figure(rows, curves, saddles, tracked, config, path):
    alphas = np.array([r["alpha"] for r in rows])
    get = lambda k: np.array([r[k] for r in rows], dtype=float)
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.6))
    ax = axes[0, 0]
    ax.plot(alphas, get("distance_l2"), "o-", label=r"to min-$\ell_2$ interpolator")
    ax.plot(alphas, get("distance_l1"), "s-", label=r"to min-$\ell_1$ interpolator")
    ax.set(xscale="log", yscale="log", xlabel=r"init scale $\alpha$",
           ylabel=r"$\|\beta_\infty - \beta_\star\| / \|\beta_\star\|$",
           title=r"the limit moves from min-$\ell_2$ to min-$\ell_1$")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    ax.plot(alphas, get("test_error"), "o-", color="C3")
    ax.set(xscale="log", yscale="log", xlabel=r"init scale $\alpha$",
           ylabel=r"$\|\beta_\infty - \beta^*\|^2 / \|\beta^*\|^2$",
           title="test error (population risk, relative)")
    ax = axes[0, 2]
    ax.plot(alphas, get("limit_error"), "o-", color="C2",
            label=r"flow vs $\arg\min Q_\alpha$ (Newton on KKT)")
    ax.plot(alphas, get("conservation_drift"), "^--", color="C4",
            label="drift of the conserved quantities\n(small weights below atol)")
    ax.axhline(config.rtol, color="0.5", ls=":", label=f"rtol = {config.rtol:g}")
    ax.set(xscale="log", yscale="log", xlabel=r"init scale $\alpha$", ylabel="relative error",
           title="the closed-form limit, checked")
    ax.legend(fontsize=8)
    ax = axes[1, 0]
    if curves:
        smallest = min(curves)
        ts, betas = curves[smallest]
        colors = plt.cm.viridis(np.linspace(0, 0.9, max(len(tracked), 1)))
        for c, i in zip(colors, tracked):
            ax.plot(ts, betas[:, i], color=c, lw=1.6, label=f"coordinate {i}")
            ax.step(saddles.times, saddles.betas[:, i], where="post", color=c, ls="--", lw=1)
        others = np.setdiff1d(np.arange(betas.shape[1]), tracked)
        ax.plot(ts, betas[:, others], color="0.75", lw=0.5)
        ax.set_xlim(0, 1.25 * saddles.times[-1])
        ax.set(xlabel=r"accelerated time $2t/\ln(1/\alpha)$", ylabel=r"$\beta_i(t)$",
               title=rf"saddle to saddle at $\alpha$ = {smallest:g} (dashed: Algorithm 1)")
        ax.legend(fontsize=7, ncol=2)
    else:
        ax.text(0.5, 0.5, "saddle-to-saddle limit: depth 2 only", ha="center",
                transform=ax.transAxes)
        ax.axis("off")
    ax = axes[1, 1]
    small = [r for r in rows if "activation_accelerated" in r]
    if small and tracked.size:
        x = np.array([1 / np.log(1 / r["alpha"]) for r in small])
        times = np.array([r["activation_accelerated"] for r in small])
        first = saddles.first_activation()
        colors = plt.cm.viridis(np.linspace(0, 0.9, len(tracked)))
        for j, (c, i) in enumerate(zip(colors, tracked)):
            ax.plot(x, times[:, j], "o-", color=c, label=f"coordinate {i}")
            ax.plot([0], [first[i]], "*", color=c, ms=12, mec="k", clip_on=False)
        ax.set_xlim(left=-0.01)
        ax.set(xlabel=r"$1/\ln(1/\alpha)$", ylabel="activation time (accelerated)",
               title=r"activation times $\to$ Algorithm 1's jump times (stars)")
        ax.legend(fontsize=7)
    else:
        ax.axis("off")
    ax = axes[1, 2]
    ax.plot(alphas, get("steps"), "o-", label="all steps")
    if rows[0]["explicit_steps"] is not None:
        ax.plot(alphas, get("explicit_steps"), "s--", label="explicit (Tsit5) steps")
        ax.plot(alphas, get("stiff_steps"), "^--", label="W steps")
    ax.set(xscale="log", yscale="log", xlabel=r"init scale $\alpha$", ylabel="solver steps",
           title=f"solver cost (loss drop {config.loss_drop:g})")
    ax.legend(fontsize=8)
    for a in axes.flat:
        a.grid(alpha=0.3, which="both")
    fig.suptitle(f"diagonal linear network, depth {config.depth}: d = {config.dim}, "
                 f"n = {config.observations}, {config.sparsity}-sparse truth", fontsize=11)
    plotting.save(fig, path)
