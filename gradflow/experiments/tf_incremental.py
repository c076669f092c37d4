"""Figure 3 of Razin, Maman & Cohen (ICML 2021): incremental rank learning in CP.

Order-4 10x10x10x10 ground truth of tensor rank 5 (Gaussian factors, Frobenius norm
1), 2000 entries observed uniformly without repetition, R = 1000 components, Gaussian
init of decreasing std. As the std shrinks, components are learned one after another
and only ~5 leave zero: the flow finds the low-rank solution.
"""

import argparse
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import jax.random as jr
import matplotlib.pyplot as plt

from .. import plotting
from ..analysis import cp as acp
from ..data import random_cp_tensor, sample_indices
from .._flow import flow
from ..models.cp import CP
from ..objectives import Completion

NAME = "tf-incremental"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stds", type=float, nargs="+", default=[0.05, 0.01, 0.005],
                        help="init standard deviations (default: the paper's)")
    parser.add_argument("--order", type=int, default=4)
    parser.add_argument("--dim", type=int, default=10)
    parser.add_argument("--truth-rank", type=int, default=5)
    parser.add_argument("--observations", type=int, default=2000)
    parser.add_argument("--components", type=int, default=1000, help="R")
    parser.add_argument("--loss-drop", type=float, default=1e-4,
                        help="stop when loss <= this x initial loss")
    parser.add_argument("--t1", type=float, default=1e14, help="final flow time")
    parser.add_argument("--rtol", type=float, default=1e-8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--x", choices=["time", "loss"], default="time",
                        help="x-axis of the plots")


def run(args, out: Path, progress: bool = True) -> dict:
    dims = (args.dim,) * args.order
    k_truth, k_obs, k_init = jr.split(jr.key(args.seed), 3)
    truth = random_cp_tensor(k_truth, dims, args.truth_rank)
    objective = Completion.from_tensor(truth, sample_indices(k_obs, dims, args.observations))
    truth_norm = jnp.linalg.norm(truth)
    observers = {
        "component_norms": lambda t, m, o: m.component_norms(),
        "reconstruction_error": lambda t, m, o: jnp.linalg.norm(m.full() - truth) / truth_norm,
    }
    summary, trajectories = {}, {}
    for std in args.stds:
        model = CP.gaussian(k_init, dims, args.components, std)
        loss_tol = args.loss_drop * float(objective(model))
        if progress:
            print(f"[{NAME}] std={std:g}: integrating until loss <= {loss_tol:.3g}", flush=True)
        save_times = np.concatenate([[0.0], np.geomspace(1e-2, args.t1, 1500)])
        tr = flow(model, objective, t1=args.t1, loss_tol=loss_tol, observers=observers,
                  save_times=save_times, rtol=args.rtol, progress=progress,
                  max_steps=200_000)
        tr.save(out / f"trajectory_std{std:g}.npz")
        trajectories[std] = tr
        summary[f"{std:g}"] = {
            "status": tr.status,
            "final_loss": float(tr.final["loss"]),
            "relative_reconstruction_error": float(tr.final["reconstruction_error"]),
            "components_above_1pct": acp.tensor_rank_estimate(tr.model, 1e-2),
            "t_final": tr.t_final,
            "steps": tr.stats["steps"],
            "gradient_evaluations": tr.stats["gradient_evaluations"],
            "wall_time_s": round(tr.stats["wall_time"], 2),
        }
        if progress:
            print(f"[{NAME}] std={std:g}: {json.dumps(summary[f'{std:g}'])}", flush=True)
    _figure(trajectories, args.x, out / f"{NAME}.png")
    (out / "summary.json").write_text(json.dumps(
        {"experiment": NAME, "config": vars(args) | {"out": str(out)}, "results": summary},
        indent=2, default=str))
    return summary


def _figure(trajectories, x, path):
    n = len(trajectories)
    fig, axes = plt.subplots(2, n, figsize=(4.2 * n, 7), squeeze=False)
    for j, (std, tr) in enumerate(trajectories.items()):
        plotting.top_component_curves(axes[0, j], tr, 10, x, title=f"init std {std:g}")
        axes[0, j].set_yscale("log")
        ax = axes[1, j]
        plotting.curve(ax, tr, "reconstruction_error", x, label="reconstruction error", color="C3")
        ax.plot(plotting.xs(tr, x), tr["loss"] / tr["loss"][0], label="loss / initial", color="C0")
        ax.set_ylim(1e-6, 3)
        ax.legend(loc="lower left", fontsize=8)
    fig.suptitle("CP tensor completion under gradient flow: top-10 component norms "
                 "(top) and errors (bottom)", fontsize=10)
    plotting.save(fig, path)


def sweep_setup(args) -> dict:
    """This experiment's problem for `gradflow sweep`: CP init std = the sweep's scale."""
    dims = (args.dim,) * args.order
    k_truth, k_obs = jr.split(jr.key(args.seed), 3)[:2]
    truth = random_cp_tensor(k_truth, dims, args.truth_rank)
    objective = Completion.from_tensor(truth, sample_indices(k_obs, dims, args.observations))
    truth_norm = jnp.linalg.norm(truth)

    def problem(params):
        model = CP.gaussian(jr.key(params["seed"]), dims, args.components, params["scale"])
        return model, objective

    return dict(
        problem=problem,
        order=args.order,
        t1=args.t1,
        loss_drop=args.loss_drop,
        rtol=args.rtol,
        save_times=np.concatenate([[0.0], np.geomspace(1e-2, args.t1, 400)]),
        observers={
            "component_norms": lambda t, m, o: m.component_norms(),
            "reconstruction_error": lambda t, m, o: jnp.linalg.norm(m.full() - truth) / truth_norm,
        },
    )
