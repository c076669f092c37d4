"""Gradient descent against the exact gradient flow it discretizes.

Plain gradient descent with step η is the explicit Euler method for the flow, so at
a fixed time t = kη its iterates differ from the flow by C(t)·η + O(η²). On a CP
completion problem (order 3) and a deep matrix completion problem (depth 3), both
from a small Gaussian init, GD at several learning rates is overlaid on the exact
flow (component norms / singular values against time t = kη), and the largest
relative distance of the end tensor to the flow over [0, t1] is plotted against η
with its fitted slope (1 for a first-order method).
"""

import argparse
import json
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

NAME = "gd-vs-flow"

OBSERVERS = {"loss": "loss", "component_norms": "component_norms", "end": ad.end_tensor}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.8, 0.4, 0.2, 0.1, 0.05, 0.025],
                        help="GD learning rates (each t1/(lr·saves) must be an integer)")
    parser.add_argument("--saves", type=int, default=100,
                        help="compare GD and flow at this many equally spaced times")
    parser.add_argument("--cp-dim", type=int, default=5, help="CP tensor is dim^3")
    parser.add_argument("--cp-components", type=int, default=6, help="R")
    parser.add_argument("--cp-observations", type=int, default=60)
    parser.add_argument("--cp-std", type=float, default=0.2, help="CP init std")
    parser.add_argument("--cp-t1", type=float, default=160.0, help="CP time horizon")
    parser.add_argument("--dmf-dim", type=int, default=6, help="the matrix is dim x dim")
    parser.add_argument("--dmf-depth", type=int, default=3)
    parser.add_argument("--dmf-observations", type=int, default=24)
    parser.add_argument("--dmf-std", type=float, default=0.2, help="DMF init std per layer")
    parser.add_argument("--dmf-t1", type=float, default=80.0, help="DMF time horizon")
    parser.add_argument("--rtol", type=float, default=1e-11,
                        help="reference flow tolerance (Dopri8)")
    parser.add_argument("--seed", type=int, default=0)


def cp_problem(args):
    """Order-3 completion of a rank-2 tensor with entries of RMS 1, Gaussian CP init."""
    dims = (args.cp_dim,) * 3
    k_truth, k_obs, k_init = jr.split(jr.key(args.seed), 3)
    truth = random_cp_tensor(k_truth, dims, 2) * float(np.sqrt(np.prod(dims)))
    objective = Completion.from_tensor(truth, sample_indices(k_obs, dims, args.cp_observations))
    return CP.gaussian(k_init, dims, args.cp_components, args.cp_std), objective


def dmf_problem(args):
    """Completion of a rank-2 matrix with entries of RMS 1 by a deep matrix factorization."""
    d = args.dmf_dim
    k_u, k_v, k_obs, k_init = jr.split(jr.key(args.seed + 1), 4)
    u, v = jr.normal(k_u, (d, 2)), jr.normal(k_v, (d, 2))
    truth = (u * jnp.array([2.0, 1.0])) @ v.T
    truth = truth * (d / jnp.linalg.norm(truth))
    objective = Completion.from_tensor(truth, sample_indices(k_obs, (d, d), args.dmf_observations))
    model = DeepMatrix.gaussian(k_init, (d,) * (args.dmf_depth + 1), args.dmf_std)
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


def _steps_per_save(t1: float, lr: float, saves: int) -> int:
    per_save = t1 / (lr * saves)
    if round(per_save) < 1 or abs(per_save - round(per_save)) > 1e-9 * per_save:
        raise ValueError(
            f"t1/(lr·saves) = {per_save:g} must be a positive integer (t1={t1:g}, "
            f"lr={lr:g}, saves={saves}) so that every run is compared at the same times."
        )
    return round(per_save)


def run(args, out: Path, progress: bool = True) -> dict:
    lrs = np.sort(np.asarray(args.lrs, float))[::-1]
    if lrs.size < 2 or np.any(lrs <= 0) or len(set(lrs.tolist())) < lrs.size:
        raise ValueError("`--lrs` needs at least two distinct positive learning rates.")
    for lr in lrs:  # check all before computing anything
        _steps_per_save(args.cp_t1, lr, args.saves)
        _steps_per_save(args.dmf_t1, lr, args.saves)
    problems = {
        "cp": ("CP, order 3", cp_problem(args), args.cp_t1),
        "dmf": (f"deep matrix, depth {args.dmf_depth}", dmf_problem(args), args.dmf_t1),
    }
    summary, results = {}, {}
    for key, (title, (model, objective), t1) in problems.items():
        if progress:
            print(f"[{NAME}] {title}: GD at lr {list(lrs)} and the flow up to t = {t1:g}",
                  flush=True)
        reference, runs, errors = compare(model, objective, lrs, t1, args.saves, args.rtol,
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
    _figure(results, out / f"{NAME}.png")
    (out / "summary.json").write_text(json.dumps(
        {"experiment": NAME, "config": vars(args) | {"out": str(out)}, "results": summary},
        indent=2, default=str))
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
