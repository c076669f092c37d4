"""Gradient descent against the exact gradient flow it discretizes.

Plain gradient descent with step η is the explicit Euler method for the flow, so at
a fixed time t = kη its iterates differ from the flow by C(t)·η + O(η²). On a CP
completion problem (order 3) and a deep matrix completion problem (depth 3), both
from a small Gaussian init, GD at several learning rates is overlaid on the exact
flow (component norms / singular values against time t = kη), and the largest
relative distance of the end tensor to the flow over [0, t1] is plotted against η
with its fitted slope (1 for a first-order method).
"""

import dataclasses
from pathlib import Path

import diffrax as dfx
import jax.numpy as jnp
import jax.random as jr
import matplotlib.pyplot as plt
from matplotlib.ticker import NullFormatter
import numpy as np

from .. import plotting
from ..analysis import descent as ad
from ..data import random_cp_tensor, sample_indices
from .._descent import descent
from .._flow import flow
from ..models.cp import CP
from ..models.matrix import DeepMatrix
from ..objectives import Completion
from ._config import (SettingError, check, check_int, check_number, check_numbers, check_rtol,
                      output, setting, write_summary)

NAME = "gd-vs-flow"

OBSERVERS = {"loss": "loss", "component_norms": "component_norms", "end": ad.end_tensor}


@dataclasses.dataclass(frozen=True)
class Config:
    """`gradflow run gd-vs-flow`: the learning rates, and the CP and deep-matrix problems."""

    lrs: tuple[float, ...] = setting((0.8, 0.4, 0.2, 0.1, 0.05, 0.025), "GD learning rates "
                                     "(each t1/(lr·saves) must be an integer)")
    saves: int = setting(100, "compare GD and flow at this many equally spaced times")
    cp_dim: int = setting(5, "CP tensor is dim^3")
    cp_components: int = setting(6, "R")
    cp_observations: int = setting(60, "observed entries of the CP problem")
    cp_std: float = setting(0.2, "CP init std")
    cp_t1: float = setting(160.0, "CP time horizon")
    dmf_dim: int = setting(6, "the matrix is dim x dim")
    dmf_depth: int = setting(3, "depth of the deep matrix factorization")
    dmf_observations: int = setting(24, "observed entries of the deep-matrix problem")
    dmf_std: float = setting(0.2, "DMF init std per layer")
    dmf_t1: float = setting(80.0, "DMF time horizon")
    rtol: float = setting(1e-11, "reference flow tolerance (Dopri8)")
    seed: int = setting(0, "seed of the data and the inits")

    def __post_init__(self):
        check_numbers(self, "lrs", distinct=True)
        check(len(self.lrs) >= 2, "lrs", "at least two distinct learning rates > 0 (a "
              "convergence order is a slope)", self.lrs)
        check_int(self, "saves", 1)
        check_int(self, "cp_dim", 1)
        check_int(self, "cp_components", 1)
        check_int(self, "cp_observations", 1, self.cp_dim**3)
        check_int(self, "dmf_dim", 1)
        check_int(self, "dmf_depth", 1)
        check_int(self, "dmf_observations", 1, self.dmf_dim**2)
        for name in ("cp_std", "cp_t1", "dmf_std", "dmf_t1"):
            check_number(self, name)
        check_rtol(self)
        check_int(self, "seed", 0)
        for t1 in ("cp_t1", "dmf_t1"):  # every learning rate hits the comparison times
            for lr in self.lrs:
                _steps_per_save(getattr(self, t1), lr, self.saves, t1)


def cp_problem(config):
    """Order-3 completion of a rank-2 tensor with entries of RMS 1, Gaussian CP init."""
    dims = (config.cp_dim,) * 3
    k_truth, k_obs, k_init = jr.split(jr.key(config.seed), 3)
    truth = random_cp_tensor(k_truth, dims, 2) * float(np.sqrt(np.prod(dims)))
    objective = Completion.from_tensor(truth, sample_indices(k_obs, dims, config.cp_observations))
    return CP.gaussian(k_init, dims, config.cp_components, config.cp_std), objective


def dmf_problem(config):
    """Completion of a rank-2 matrix with entries of RMS 1 by a deep matrix factorization."""
    d = config.dmf_dim
    k_u, k_v, k_obs, k_init = jr.split(jr.key(config.seed + 1), 4)
    u, v = jr.normal(k_u, (d, 2)), jr.normal(k_v, (d, 2))
    truth = (u * jnp.array([2.0, 1.0])[None, :]) @ v.T
    truth = truth * (d / jnp.linalg.norm(truth))
    objective = Completion.from_tensor(truth, sample_indices(k_obs, (d, d), config.dmf_observations))
    model = DeepMatrix.gaussian(k_init, (d,) * (config.dmf_depth + 1), config.dmf_std)
    return model, objective


def compare(model, objective, lrs, t1: float, saves: int, rtol: float, progress=False):
    """GD at each learning rate and the flow, observed at the same `saves` + 1 times.

    **Returns:** `(flow trajectory, [GD trajectories], errors)`, where `errors[i]` is
    $\\max_t\\|W_{GD}(t)-W(t)\\|/\\max_t\\|W(t)\\|$ over the common times.
    """
    runs = []
    for lr in lrs:
        per_save = _steps_per_save(t1, lr, saves)
        runs.append(descent(model, objective, float(lr), steps=per_save * saves,
                            save_every=per_save, observers=OBSERVERS))
        if progress:
            print(f"[{NAME}] GD lr={lr:g}: {runs[-1].stats['steps']} steps, "
                  f"{runs[-1].stats['wall_time']:.2f}s", flush=True)
    times = np.linspace(0.0, t1, saves + 1)
    reference = flow(model, objective, t1=t1, save_times=times, observers=OBSERVERS,
                     solver=dfx.Dopri8(), rtol=rtol, atol=1e-3 * rtol)
    errors = np.array([ad.trajectory_distance(r, reference, "end").max() for r in runs])
    return reference, runs, errors


def _steps_per_save(t1: float, lr: float, saves: int, name: str = "t1") -> int:
    per_save = t1 / (lr * saves)
    if round(per_save) < 1 or abs(per_save - round(per_save)) > 1e-9 * per_save:
        raise SettingError(
            f"`{name}`/(`lrs`·`saves`) = {t1:g}/({lr:g}·{saves}) = {per_save:g} must be a "
            "positive integer, so that every run is compared at the same times."
        )
    return round(per_save)


def run(config: Config, out: Path | None = None, progress: bool = False) -> dict:
    """GD at every learning rate against the flow, on both problems; return the summary
    (and, given a folder `out`, write the figure and `summary.json` there)."""
    lrs = np.sort(np.asarray(config.lrs, float))[::-1]
    problems = {
        "cp": ("CP, order 3", cp_problem(config), config.cp_t1),
        "dmf": (f"deep matrix, depth {config.dmf_depth}", dmf_problem(config), config.dmf_t1),
    }
    summary, results = {}, {}
    for key, (title, (model, objective), t1) in problems.items():
        if progress:
            print(f"[{NAME}] {title}: GD at lr {list(lrs)} and the flow up to t = {t1:g}",
                  flush=True)
        reference, runs, errors = compare(model, objective, lrs, t1, config.saves, config.rtol,
                                          progress)
        slope = ad.convergence_order(lrs, errors)
        results[key] = (title, reference, runs, errors, slope)
        summary[key] = {
            "model": title,
            "learning_rates": lrs.tolist(),
            "max_relative_error": errors.tolist(),
            "slope": slope,
            "local_orders": (np.log(errors[:-1] / errors[1:])
                             / np.log(lrs[:-1] / lrs[1:])).tolist(),
            "gd_steps": [r.stats["steps"] for r in runs],
            "gd_final_loss": [float(r.final["loss"]) for r in runs],
            "flow_final_loss": float(reference.final["loss"]),
            "flow_status": reference.status,
            "flow_steps": reference.stats["steps"],
        }
        if progress:
            print(f"[{NAME}] {title}: errors {np.array2string(errors, precision=3)}, "
                  f"slope {slope:.4f}", flush=True)
    summary = {"experiment": NAME, "config": dataclasses.asdict(config), "results": summary}
    if out is not None:
        out = output(out)
        _figure(results, out / f"{NAME}.png")
        write_summary(out, summary | {"config": summary["config"] | {"out": str(out)}})
    return summary


def _figure(results, path):
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    for ax, (title, reference, runs, _errors, _slope) in zip(axes[0], results.values()):
        final = np.asarray(reference["component_norms"])[-1]
        top = np.argsort(final)[::-1][:4]
        ref = np.asarray(reference["component_norms"])[:, top]
        for j in range(len(top)):
            ax.plot(reference.ts, ref[:, j], color="0.6", lw=5, alpha=0.5,
                    label="gradient flow" if j == 0 else None)
        for run_, color in zip(runs, _colors(len(runs))):
            norms = np.asarray(run_["component_norms"])[:, top]
            lr = run_.config["learning_rate"]
            for j in range(len(top)):
                ax.plot(run_.ts, norms[:, j], color=color, lw=1,
                        label=f"GD η={lr:g}" if j == 0 else None)
        ax.set_yscale("log")
        ax.set_xlabel("time t = kη")
        ax.set_ylabel("component norm" if "CP" in title else "singular value")
        ax.set_title(f"{title}: top {len(top)} components", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    ax = axes[1, 0]
    for (title, reference, runs, _errors, _slope), style in zip(results.values(), ("-", ":")):
        for run_, color in zip(runs, _colors(len(runs))):
            dist = ad.trajectory_distance(run_, reference, "end")
            ax.plot(run_.ts[1:], dist[1:], style, color=color, lw=1.2)
        ax.plot([], [], style, color="k", label=title)
    ax.set_yscale("log")
    ax.set_xlabel("time t = kη")
    ax.set_ylabel("‖W_GD(t) − W(t)‖ / max ‖W‖")
    ax.set_title("distance to the flow over time (colors: η as above)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    for (title, _reference, runs, errors, slope), marker in zip(results.values(), "os"):
        lrs = np.array([r.config["learning_rate"] for r in runs])
        fit = np.exp(np.polyval(np.polyfit(np.log(lrs), np.log(errors), 1), np.log(lrs)))
        line = ax.plot(lrs, errors, marker, ms=7, label=f"{title}: slope {slope:.3f}")[0]
        ax.plot(lrs, fit, "-", color=line.get_color(), lw=1, alpha=0.7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("learning rate η")
    ax.set_ylabel("max over t of ‖W_GD(t) − W(t)‖ / max ‖W‖")
    ax.set_title("GD error against the exact flow, least-squares slope (first order: 1)",
                 fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.suptitle("Gradient descent at several learning rates against the exact gradient flow",
                 fontsize=11)
    plotting.save(fig, path)


def _colors(n):
    return plt.cm.plasma(np.linspace(0.05, 0.85, n))
