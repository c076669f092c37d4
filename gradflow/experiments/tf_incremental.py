"""Figure 3 of Razin, Maman & Cohen (ICML 2021): incremental rank learning in CP.

Order-4 10x10x10x10 ground truth of tensor rank 5 (Gaussian factors, Frobenius norm
1), 2000 entries observed uniformly without repetition, R = 1000 components, Gaussian
init of decreasing std. As the std shrinks, components are learned one after another
and only ~5 leave zero: the flow finds the low-rank solution.

Appendix B's variants are flags: `--loss huber --delta D` (Huber loss, §3.7) or
`--loss absolute` (l1), other `--order` / `--truth-rank`, and `--task sensing`: the
same number of measurements <A_i, W*> with Gaussian measurement tensors whose
entries are i.i.d. N(0, 1/D), D = dim^order (`gradflow.Sensing.gaussian`: each A_i
has expected squared norm 1, as the indicator of one observed entry does, so the loss
and the time scale stay those of completion). Sensing stores the m x D operators
(2000 x 10^4 in float64: 160 MB at the default size).
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
from ..objectives import AbsoluteLoss, Completion, HuberLoss, Sensing, SquaredLoss

NAME = "tf-incremental"
LOSSES = ("squared", "huber", "absolute")
TASKS = ("completion", "sensing")


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
    parser.add_argument("--loss", choices=LOSSES, default="squared",
                        help="per-entry loss: z^2/2, Huber (needs --delta) or |z|")
    parser.add_argument("--delta", type=float, default=None,
                        help="Huber's transition point delta_h (> 0; with --loss huber)")
    parser.add_argument("--task", choices=TASKS, default="completion",
                        help="observe entries (completion) or Gaussian linear measurements "
                             "(sensing)")


def make_loss(args):
    """The per-entry loss named by `--loss` (and `--delta`)."""
    loss = getattr(args, "loss", "squared")
    delta = getattr(args, "delta", None)
    if loss == "huber":
        if delta is None:
            raise ValueError("--loss huber needs --delta, Huber's transition point (> 0).")
        if not delta > 0:
            raise ValueError(f"--delta must be > 0, got {delta}.")
        return HuberLoss(delta)
    if delta is not None:
        raise ValueError(f"--delta is Huber's parameter; it needs --loss huber (got --loss "
                         f"{loss}).")
    return AbsoluteLoss() if loss == "absolute" else SquaredLoss()


def problem_data(args):
    """(truth, objective, init key) of the experiment for `args`."""
    dims = (args.dim,) * args.order
    k_truth, k_obs, k_init = jr.split(jr.key(args.seed), 3)
    truth = random_cp_tensor(k_truth, dims, args.truth_rank)
    loss = make_loss(args)
    if getattr(args, "task", "completion") == "sensing":
        objective = Sensing.gaussian(k_obs, truth, args.observations, loss)
    else:
        objective = Completion.from_tensor(truth, sample_indices(k_obs, dims, args.observations),
                                           loss)
    return truth, objective, k_init


def run(args, out: Path, progress: bool = True) -> dict:
    dims = (args.dim,) * args.order
    truth, objective, k_init = problem_data(args)
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
    _figure(trajectories, args.x, out / f"{NAME}.png", _variant(args))
    (out / "summary.json").write_text(json.dumps(
        {"experiment": NAME, "config": vars(args) | {"out": str(out)}, "results": summary},
        indent=2, default=str))
    return summary


def _variant(args) -> str:
    loss = getattr(args, "loss", "squared")
    names = {"squared": "squared loss", "absolute": "l1 loss"}
    loss = names[loss] if loss in names else f"Huber loss (delta {args.delta:g})"
    task = getattr(args, "task", "completion")
    what = "sensing" if task == "sensing" else "completion"
    return (f"order {args.order}, rank-{args.truth_rank} truth, {args.observations} "
            f"{'measurements' if task == 'sensing' else 'observed entries'}, {loss}: CP tensor "
            f"{what}")


def _figure(trajectories, x, path, variant="CP tensor completion"):
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
    fig.suptitle(f"{variant} under gradient flow: top-10 component norms "
                 "(top) and errors (bottom)", fontsize=10)
    plotting.save(fig, path)


def sweep_setup(args) -> dict:
    """This experiment's problem for `gradflow sweep`: CP init std = the sweep's scale."""
    dims = (args.dim,) * args.order
    truth, objective, _ = problem_data(args)
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
