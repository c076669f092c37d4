"""Matrix, CP and hierarchical tensor factorization side by side: incremental learning in all three.

The figure of the HTF blog post (offconvex.org, 2022-07-15; CODE-HTF's
`mf_tf_htf_dyn` plot, THEORY.md §4.7): the ten largest singular values of a deep
matrix factorization, the ten largest component norms of a CP factorization and
the ten largest local component norms at the root of a hierarchical tensor
factorization, over gradient-flow time, on comparable problems. Each is a
completion of 4096 entries, 2048 of them observed uniformly without repetition,
of a ground truth of rank 5 in the model's own sense with Gaussian factors and
Frobenius norm 64 (entries of RMS 1), as CODE-HTF's generators make them:

- MF: a 64x64 matrix of rank 5, depth-3 factorization with hidden widths 64,
  Gaussian init std 1e-3 (CODE-HTF's defaults);
- CP: an 8x8x8x8 tensor of CP rank 5, `--cp-components` components, init std 1e-3;
- HTF: an 8x8x8x8 tensor of hierarchical rank (5, 5) over ((0, 1), (2, 3)), widths
  `--htf-widths`, init std 1e-2 (CODE-HTF's default; widths 512 in the code, 32
  here, see `gradflow run htf-incremental --help` for the measured cost).

All three stop at loss 2.5e-5 (CODE-HTF's MSE 5e-5 in gradflow's 1/2-mean
convention). Every model's components are recorded unsorted (`component_norms` in
each trajectory file); the figure shows the ten with the largest final value.
"""

import argparse
import json
from pathlib import Path

import jax.numpy as jnp
import jax.random as jr
import matplotlib.pyplot as plt
import numpy as np
from threadpoolctl import threadpool_limits

from .. import plotting
from ..analysis import cp as acp
from ..analysis import matrix as am
from ..data import random_htf_tensor, random_cp_tensor, sample_indices
from ..models.cp import CP
from ..models.htf import HTF, ModeTree
from ..models.matrix import DeepMatrix
from ..objectives import Completion
from ..solvers import RosenbrockW
from ..stiffness import LargestComponents
from .htf_incremental import (SOLVERS, add_learning_phase_arguments, flow_through_escape,
                              node_label, node_slices, rank_summary,
                              top_curves, x_axis, x_values)

NAME = "compare-factorizations"
MODELS = ("mf", "cp", "htf")
TITLES = {"mf": "matrix factorization", "cp": "tensor factorization (CP)",
          "htf": "hierarchical tensor factorization"}
YLABELS = {"mf": "singular values", "cp": "component norms",
           "htf": "local component norms (root)"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--observations", type=int, default=2048)
    parser.add_argument("--truth-rank", type=int, default=5,
                        help="rank of the MF and CP truths; the HTF truth has HT rank "
                             "(r, r)")
    parser.add_argument("--truth-norm", type=float, default=64.0)
    parser.add_argument("--order", type=int, default=4, help="tensor order (CP, HTF)")
    parser.add_argument("--dim", type=int, default=8, help="tensor mode dimension (CP, HTF)")
    parser.add_argument("--matrix-dim", type=int, default=64, help="the matrix is d x d")
    parser.add_argument("--mf-depth", type=int, default=3)
    parser.add_argument("--mf-std", type=float, default=1e-3)
    parser.add_argument("--cp-components", type=int, default=512,
                        help="R (CODE-HTF's default: the product of all dims but the "
                             "largest, 512 for 8^4)")
    parser.add_argument("--cp-std", type=float, default=1e-3)
    parser.add_argument("--htf-widths", type=int, nargs="+", default=[32, 32],
                        help="one per layer (CODE-HTF: 512 512)")
    parser.add_argument("--htf-std", type=float, default=1e-2)
    parser.add_argument("--htf-solver", choices=sorted(SOLVERS), default="tsit5")
    parser.add_argument("--loss-tol", type=float, default=2.5e-5,
                        help="stop when the loss (1/2 mean squared error) falls below this")
    parser.add_argument("--t1", type=float, default=1e14, help="final flow time")
    parser.add_argument("--rtol", type=float, default=1e-6,
                        help="step-size control (1e-6 is ample for a figure; CP's "
                             "Rosenbrock-W steps grow like rtol^(-1/3))")
    add_learning_phase_arguments(parser)


def _problem(name, args, key):
    """(truth, initial model, extra solve kwargs) of one model's problem."""
    k_truth, k_init = jr.split(key)
    tensor_dims = (args.dim,) * args.order
    if name == "mf":
        dims = (args.matrix_dim,) * 2
        truth = random_cp_tensor(k_truth, dims, args.truth_rank, args.truth_norm)
        model = DeepMatrix.gaussian(k_init, (args.matrix_dim,) * (args.mf_depth + 1),
                                    args.mf_std)
        return truth, model, {}
    if name == "cp":
        truth = random_cp_tensor(k_truth, tensor_dims, args.truth_rank, args.truth_norm)
        model = CP.gaussian(k_init, tensor_dims, args.cp_components, args.cp_std)
        # The implicit block on truth_rank + 1 components (the flow learns truth_rank),
        # refreshed every 8 steps: same step count as RosenbrockW()'s (8, every 4),
        # 3.5x less CPU (1305 vs 1302 steps, 62 vs 220 s on 8^4, R = 512).
        stiffness = LargestComponents(min(args.truth_rank + 1, args.cp_components))
        return truth, model, {"solver": RosenbrockW(stiffness, refresh_every=8)}
    tree = ModeTree.binary(args.order)
    layers = tree.height[tree.root]
    truth = random_htf_tensor(k_truth, tensor_dims, tree, [args.truth_rank] * layers,
                              args.truth_norm)
    if len(args.htf_widths) != layers:
        raise SystemExit(f"--htf-widths needs {layers} values for order {args.order}")
    model = HTF.gaussian(k_init, tensor_dims, tree, tree.layer_widths(args.htf_widths),
                         args.htf_std)
    return truth, model, {"solver": SOLVERS[args.htf_solver]()}


def run(args, out: Path, progress: bool = True) -> dict:
    # CP's Rosenbrock-W eigendecomposes a 256x256 Hessian block every 4 steps; with
    # OpenBLAS's default threads on a busy 2-core machine that took 1.3 s instead of
    # 20 ms single-threaded (measured), so BLAS/LAPACK run on one thread here.
    with threadpool_limits(1, "blas"):
        return _run(args, out, progress)


def _run(args, out, progress):
    keys = dict(zip(MODELS, jr.split(jr.key(args.seed), len(MODELS))))
    k_obs = jr.fold_in(jr.key(args.seed), 1)
    results, trajectories = {}, {}
    for name in args.models:
        truth, model, extra = _problem(name, args, keys[name])
        objective = Completion.from_tensor(
            truth, sample_indices(k_obs, truth.shape, args.observations))
        truth_norm = jnp.linalg.norm(truth)
        observers = {
            "component_norms": lambda t, m, o: m.component_norms(),
            "reconstruction_error": lambda t, m, o, truth=truth: (
                jnp.linalg.norm(m.full() - truth) / truth_norm),
        }
        if progress:
            print(f"[{NAME}] {name}: {type(model).__name__} of shape {model.shape}, "
                  f"integrating until loss <= {args.loss_tol:g}", flush=True)
        tr, t_escape = flow_through_escape(
            model, objective, escape_norm=args.escape * args.truth_norm,
            loss_tol=args.loss_tol, t1=args.t1, observers=observers, saves=args.saves,
            rtol=args.rtol, max_steps=args.max_steps, progress=progress, **extra)
        tr.save(out / f"trajectory_{name}.npz")
        trajectories[name] = tr, t_escape
        results[name] = _result(name, tr, args) | {"t_escape": t_escape}
        if progress:
            r = results[name]
            print(f"[{NAME}] {name}: {tr.status}, error "
                  f"{r['relative_reconstruction_error']:.3g}, rank {r['rank']}, "
                  f"{r['steps']} steps, {r['wall_time_s']} s", flush=True)
    _figure(trajectories, args, out / f"{NAME}.png")
    (out / "summary.json").write_text(json.dumps(
        {"experiment": NAME, "config": vars(args) | {"out": str(out)}, "results": results},
        indent=2, default=str))
    return results


def _result(name, tr, args) -> dict:
    model = tr.model
    norms = np.asarray(tr.final["component_norms"])
    out = {
        "model": type(model).__name__,
        "shape": list(model.shape),
        "status": tr.status,
        "t_final": tr.t_final,
        "final_loss": float(tr.final["loss"]),
        "relative_reconstruction_error": float(tr.final["reconstruction_error"]),
        "components_recorded": int(np.asarray(tr["component_norms"]).shape[1]),
        "saves": len(tr.ts),
        "steps": tr.stats["steps"],
        "wall_time_s": round(tr.stats["wall_time"], 2),
    }
    if name == "mf":
        end = model.full()
        s = np.asarray(jnp.linalg.svd(end, compute_uv=False))
        out["rank"] = int(np.sum(s > args.rank_rtol * s[0]))
        out["effective_rank"] = float(am.effective_rank(end))
        out["top_norms"] = s[:10].tolist()
    elif name == "cp":
        out["rank"] = acp.tensor_rank_estimate(model, 1e-2)
        out["top_norms"] = np.sort(norms)[::-1][:10].tolist()
    else:
        tree = model.tree
        ranks = rank_summary(model.full(), tree, args.rank_rtol)
        out["hierarchical_ranks"] = ranks
        out["rank"] = [ranks[node_label(tree, v)]["rank"] for v in tree.children[tree.root]]
        root = norms[node_slices(model)[tree.root]]
        out["top_norms"] = np.sort(root)[::-1][:10].tolist()
    return out


def _figure(trajectories, args, path):
    n = len(trajectories)
    fig, axes = plt.subplots(2, n, figsize=(5 * n, 7), squeeze=False)
    for j, (name, (tr, t_e)) in enumerate(trajectories.items()):
        xs = x_values(tr, t_e, args.x)
        norms = np.asarray(tr["component_norms"])
        if name == "htf":
            norms = norms[:, node_slices(tr.model)[tr.model.tree.root]]
        status = "" if tr.ok else f" [{tr.status.upper()}]"
        ax = axes[0, j]
        top_curves(ax, xs, norms)
        ax.set(title=TITLES[name] + status, ylabel=YLABELS[name])
        x_axis(ax, tr, t_e, args.x)
        ax = axes[1, j]
        ax.plot(xs, tr["loss"] / tr["loss"][0], label="loss / initial", color="C0")
        ax.plot(xs, tr["reconstruction_error"], label="reconstruction error", color="C3",
                ls="--")
        ax.set(yscale="log", title=f"{type(tr.model).__name__} {tuple(tr.model.shape)}: "
                                   f"{tr.stats['steps']} steps")
        x_axis(ax, tr, t_e, args.x)
        ax.legend(loc="lower left", fontsize=8)
    fig.suptitle(f"Incremental learning under gradient flow: rank-{args.truth_rank} truths "
                 f"of norm {args.truth_norm:g}, {args.observations} entries observed; "
                 "ten largest (final) norms", fontsize=11)
    plotting.save(fig, path)
