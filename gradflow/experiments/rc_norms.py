"""Razin & Cohen (NeurIPS 2020): all norms go to infinity while the rank is minimized.

The 2x2 completion problem with observed entries (1,2) = 1, (2,1) = 1, (2,2) = 0
(docs: Theory › Norms go to infinity), deep matrix factorizations of depths 2, 3, 4
from a balanced init with det W(0) > 0. Along the flow the unobserved |w11|, the
Frobenius and nuclear norms grow like 1/sqrt(loss) while sigma_min, erank - 1 and
rank-subopt shrink, and the explicit bounds of §2.3 hold at every save. The perturbed
problem of §2.4 (z = -2, z' = 0.5, (2,2) = eps, det W(0) < 0) shows the effect
receding as eps grows: |w11| stops near |z z' / eps|.

Float64 caveat (docs: Theory › Norms go to infinity, "Float64 caveat"): det W decays
to 0 along the flow (exponentially at depth 2), and once it falls below the solver's
resolution its sign is lost. The summary reports, per run, the loss down to which det
kept the sign of det W(0); the bounds are checked on that stretch.
"""

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import jax.random as jr
import matplotlib.pyplot as plt
import numpy as np

from .. import plotting
from ..analysis import matrix as am
from .._flow import flow
from ..models.matrix import DeepMatrix
from ..objectives import Completion
from ..solvers import RosenbrockW
from ..stiffness import DenseHessian
from ._config import (check, check_choice, check_int, check_ints, check_number, check_numbers,
                      check_rtol, output, setting, write_summary)

NAME = "rc-norms"
OBSERVED = jnp.array([[0, 1], [1, 0], [1, 1]])  # every entry but (1,1) (0-based (0,0))
INITS = ("identity", "gaussian")


@dataclasses.dataclass(frozen=True)
class Config:
    """`gradflow run rc-norms`: the depths, the init and the perturbed problems (the
    docs' Razin-Cohen runs by default)."""

    depths: tuple[int, ...] = setting((2, 3, 4), "depths of the unperturbed problem's "
                                      "factorizations")
    init: str = setting("identity", "W(0) = scale * diag(+-1, 1) (the docs' Razin-Cohen "
                        "runs), or a Gaussian matrix of norm scale; balanced layers either "
                        "way", choices=INITS)
    scale: float = setting(1e-1, "scale of the end matrix at init (see --init)")
    perturbed_depth: int = setting(3, "depth of the perturbed problem's factorization")
    eps: tuple[float, ...] = setting((0.0, 0.01, 0.05, 0.1, 0.5), "observed (2,2) entry of "
                                     "the perturbed problem")
    z: tuple[float, float] = setting((-2.0, 0.5), "observed (1,2) and (2,1) entries of the "
                                     "perturbed problem")
    loss_tol: float = setting(1e-8, "stop when the (mean 1/2 squared) loss falls below this")
    t1: float = setting(1e14, "final flow time")
    rtol: float = setting(1e-10, "relative tolerance of the solve")
    seed: int = setting(0, "seed of the inits")

    def __post_init__(self):
        check_ints(self, "depths", 2, distinct=True)
        check_choice(self, "init", INITS)
        check_number(self, "scale")
        check_int(self, "perturbed_depth", 2)
        check_numbers(self, "eps", None, distinct=True)
        check_numbers(self, "z", None, length=2)
        check(self.z[0] * self.z[1] != 0, "z", "two non-zero numbers (their product's sign "
              "is det W(0)'s)", self.z)
        check_number(self, "loss_tol")
        check_number(self, "t1")
        check_rtol(self)
        check_int(self, "seed", 0)


def problem(z: float = 1.0, z2: float = 1.0, eps: float = 0.0) -> Completion:
    """The 2×2 completion problem of §2.1 (defaults) or §2.4: (1,2)=z, (2,1)=z', (2,2)=eps."""
    return Completion((2, 2), OBSERVED, jnp.array([z, z2, eps]))


def initial_model(key, depth: int, scale: float, det_sign: int, init: str = "identity"):
    r"""Balanced 2×2 layers whose product $W(0)$ has the given det sign.

    `init="identity"`: $W(0)=$ `scale`$\cdot\mathrm{diag}(\pm1, 1)$;
    `init="gaussian"`: a Gaussian matrix scaled to Frobenius norm `scale`, its rows
    swapped if needed.
    """
    k_end, k_layers = jr.split(key)
    if init == "identity":
        end = scale * jnp.diag(jnp.array([float(det_sign), 1.0]))
    else:
        g = jr.normal(k_end, (2, 2))
        g = g if np.sign(float(jnp.linalg.det(g))) == det_sign else g[::-1]
        end = scale * g / jnp.linalg.norm(g)
    return DeepMatrix.balanced(k_layers, end, (2,) * (depth + 1))


def solve(model, objective, config: Config):
    """Gradient flow of one 2×2 run with the stiff-capable solver, to `config.loss_tol`."""
    return flow(model, objective, t1=config.t1, loss_tol=config.loss_tol, observers=am.RC_OBSERVERS,
                save_times=np.concatenate([[0.0], np.geomspace(1e-2, config.t1, 1200)]),
                solver=RosenbrockW(DenseHessian(), refresh_every=1), rtol=config.rtol,
                max_steps=400_000)


def _summary(tr, m: dict) -> dict:
    kept = m["sign_kept"]
    last = int(np.flatnonzero(kept)[-1])
    return {
        "status": tr.status,
        "t_final": tr.t_final,
        "final_loss": float(m["loss"][-1]),
        "final_abs_w11": float(m["abs_w11"][-1]),
        "final_frobenius": float(m["frobenius"][-1]),
        "final_nuclear": float(m["nuclear"][-1]),
        "final_sigma_min": float(m["sigma_min"][-1]),
        "final_effective_rank": float(m["effective_rank"][-1]),
        "final_rank_subopt": float(m["rank_subopt"][-1]),
        "det_sign_kept_to_loss": float(m["loss"][last]),
        "det_sign_kept_to_end": bool(kept[-1]),
        "abs_w11_times_s_at_that_loss": float(m["abs_w11"][last] * m["s"][last]),
        "bounds": am.rc_bound_report(m),
        "steps": tr.stats["steps"],
        "wall_time_s": round(tr.stats["wall_time"], 2),
    }


def run(config: Config, out: Path | None = None, progress: bool = False) -> dict:
    """Solve the unperturbed runs (one per depth) and the perturbed ones (one per eps);
    return the summary (and, given a folder `out`, write the figure and `summary.json`
    there)."""
    key = jr.key(config.seed)
    results = {"unperturbed": {}, "perturbed": {}}
    curves = {"unperturbed": {}, "perturbed": {}}
    for depth in config.depths:
        tr = solve(initial_model(key, depth, config.scale, +1, config.init), problem(), config)
        curves["unperturbed"][depth] = m = am.rc_measures(tr)
        results["unperturbed"][f"depth{depth}"] = _summary(tr, m)
        if progress:
            print(f"[{NAME}] depth {depth}: {json.dumps(results['unperturbed'][f'depth{depth}'])}",
                  flush=True)
    z, z2 = config.z
    sign = int(np.sign(z * z2))
    for eps in config.eps:
        model = initial_model(key, config.perturbed_depth, config.scale, sign, config.init)
        tr = solve(model, problem(z, z2, eps), config)
        curves["perturbed"][eps] = m = am.rc_measures(tr, z, z2, eps)
        results["perturbed"][f"eps{eps:g}"] = _summary(tr, m) | {
            "abs_z_z2_over_eps": abs(z * z2 / eps) if eps else None}
        if progress:
            print(f"[{NAME}] eps {eps:g}: {json.dumps(results['perturbed'][f'eps{eps:g}'])}",
                  flush=True)
    summary = {"experiment": NAME, "config": dataclasses.asdict(config), "results": results}
    if out is not None:
        out = output(out)
        _figure(curves, config, out / f"{NAME}.png")
        write_summary(out, summary | {"config": summary["config"] | {"out": str(out)}})
    return summary


def _loss_axis(ax):
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("loss (decreasing →)")
    ax.grid(alpha=0.3)


def _plot_kept(ax, m, y, **kw):
    """Solid where det kept its initial sign, dotted after (float64 lost it)."""
    kept = m["sign_kept"]
    (line,) = ax.plot(m["loss"][kept], y[kept], **kw)
    if not kept[-1]:
        first = int(np.argmin(kept)) - 1
        ax.plot(m["loss"][first:], y[first:], ls=":", color=line.get_color())


def _figure(curves, config, path):
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for i, (depth, m) in enumerate(curves["unperturbed"].items()):
        color = f"C{i}"
        _plot_kept(axes[0, 0], m, m["abs_w11"], color=color, label=f"|w11|, depth {depth}")
        _plot_kept(axes[0, 0], m, m["nuclear"], color=color, alpha=0.5, lw=3)
        _plot_kept(axes[0, 1], m, m["sigma_min"], color=color, label=f"depth {depth}")
        _plot_kept(axes[0, 2], m, m["rank_subopt"], color=color, label=f"depth {depth}")
    if curves["unperturbed"]:
        m = max(curves["unperturbed"].values(), key=lambda m: m["loss"].size)
        axes[0, 0].plot(m["loss"], m["w11_lower_bound"], "k--", label="bound (1-s)²/s")
        axes[0, 1].plot(m["loss"], m["sigma_min_upper_bound"], "k--", label="§2.3 bound")
        axes[0, 1].set_ylim(top=10)
    axes[0, 0].set_title("norms → ∞ (thin: |w11|, thick: nuclear norm)")
    axes[0, 1].set_title("σ_min → 0")
    axes[0, 2].set_title("rank-subopt = max(σ_min, erank − 1)")
    z, z2 = config.z
    colors = plt.cm.plasma(np.linspace(0, 0.85, max(len(curves["perturbed"]), 1)))
    for c, (eps, m) in zip(colors, curves["perturbed"].items()):
        _plot_kept(axes[1, 0], m, m["abs_w11"], color=c, label=f"ε = {eps:g}")
        axes[1, 0].plot(m["loss"], np.where(m["w11_lower_bound"] > 0, m["w11_lower_bound"],
                                            np.nan), "--", color=c, lw=0.8)
        if eps:
            axes[1, 0].axhline(abs(z * z2 / eps), color=c, ls=":", lw=0.8)
        _plot_kept(axes[1, 1], m, m["sigma_min"], color=c, label=f"ε = {eps:g}")
        _plot_kept(axes[1, 2], m, m["effective_rank"], color=c, label=f"ε = {eps:g}")
    axes[1, 0].set_title(f"perturbed (z={z:g}, z'={z2:g}): |w11| (dashed: §2.4 bound, "
                         "dotted: |zz'/ε|)", fontsize=9)
    axes[1, 1].set_title("perturbed: σ_min")
    axes[1, 2].set_title("perturbed: effective rank")
    for ax in axes.ravel():
        _loss_axis(ax)
        ax.legend(fontsize=7)
    axes[1, 2].set_yscale("linear")
    fig.suptitle("Razin–Cohen 2×2 completion under gradient flow (dotted tails: det sign "
                 "lost to float64)", fontsize=10)
    plotting.save(fig, path)
