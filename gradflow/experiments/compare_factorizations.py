"""Matrix, CP and hierarchical tensor factorization side by side: incremental learning in all three.

The figure of the HTF blog post (offconvex.org, 2022-07-15; CODE-HTF's
`mf_tf_htf_dyn` plot in the HTF paper's code, github.com/asafmaman101/imp_reg_htf): the
ten largest singular values of a deep
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
  512, 512, init std 1e-2 (CODE-HTF's defaults).

All three stop at loss 2.5e-5 (CODE-HTF's MSE 5e-5 in gradflow's 1/2-mean
convention) and use the default solver (for CP with the Gauss-Newton block on
truth-rank + 1 components, refreshed every 8 steps). `--htf-widths 32 32` and the
like give smaller runs. Every model's components are recorded unsorted (`component_norms` in
each trajectory file); the figure shows the ten with the largest final value.
"""

import dataclasses
from pathlib import Path

import jax.numpy as jnp
import jax.random as jr
import matplotlib.pyplot as plt
import numpy as np
from threadpoolctl import threadpool_limits

from .. import plotting
from .._flow import flow_through_escape
from ..analysis import cp as acp
from ..analysis import matrix as am
from ..data import random_htf_tensor, random_cp_tensor, sample_indices
from ..models.cp import CP
from ..models.htf import HTF, ModeTree
from ..models.matrix import DeepMatrix
from ..objectives import Completion
from ..solvers import AutoStiff, RosenbrockW
from ..stiffness import LargestComponents
from ._config import check, output, setting, write_summary
from .htf_incremental import (SOLVERS, LearningPhase, node_label, node_slices, rank_summary,
                              top_curves, x_axis, x_values)

NAME = "compare-factorizations"
MODELS = ("mf", "cp", "htf")
TITLES = {"mf": "matrix factorization", "cp": "tensor factorization (CP)",
          "htf": "hierarchical tensor factorization"}
YLABELS = {"mf": "singular values", "cp": "component norms",
           "htf": "local component norms (root)"}


@dataclasses.dataclass(frozen=True)
class Config(LearningPhase):
    """`gradflow run compare-factorizations`: the three problems (CODE-HTF's defaults)."""

    models: tuple[str, ...] = setting(MODELS, "which factorizations to run", choices=MODELS)
    observations: int = setting(2048, "observed entries of each problem")
    truth_rank: int = setting(5, "rank of the MF and CP truths; the HTF truth has HT rank "
                                 "(r, r)")
    truth_norm: float = setting(64.0, "Frobenius norm of every truth")
    order: int = setting(4, "tensor order (CP, HTF)")
    dim: int = setting(8, "tensor mode dimension (CP, HTF)")
    matrix_dim: int = setting(64, "the matrix is d x d")
    mf_depth: int = setting(3, "depth of the matrix factorization")
    mf_std: float = setting(1e-3, "init std of the matrix factorization")
    cp_components: int = setting(512, "R (CODE-HTF: the product of all dims but the "
                                      "largest, 512 for 8^4)")
    cp_std: float = setting(1e-3, "init std of the CP factorization")
    htf_widths: tuple[int, ...] = setting((512, 512), "HTF widths, one per layer "
                                          "(CODE-HTF: 512 512)")
    htf_std: float = setting(1e-2, "init std of the HTF")
    htf_solver: str = setting("default", "the HTF's ODE solver", choices=tuple(SOLVERS))

    def __post_init__(self):
        super().__post_init__()
        check(len(self.models) > 0 and len(set(self.models)) == len(self.models), "models",
              "distinct names", self.models)
        for name in ("observations", "truth_rank", "order", "dim", "matrix_dim", "mf_depth",
                     "cp_components"):
            check(getattr(self, name) >= 1, name, "an int >= 1", getattr(self, name))
        for name in ("truth_norm", "mf_std", "cp_std", "htf_std"):
            value = getattr(self, name)
            check(value > 0 and np.isfinite(value), name, "a finite number > 0", value)
        tree = ModeTree.binary(self.order)
        layers = tree.height[tree.root]
        check(len(self.htf_widths) == layers and min(self.htf_widths) >= 1, "htf_widths",
              f"{layers} ints >= 1 (one per layer of the order-{self.order} tree)",
              self.htf_widths)
        cells = min(self.matrix_dim**2, self.dim**self.order)
        check(self.observations <= cells, "observations",
              f"at most {cells} (the entries of the smallest problem)", self.observations)


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
        return truth, model, {"solver": AutoStiff(RosenbrockW(stiffness, refresh_every=8))}
    tree = ModeTree.binary(args.order)
    layers = tree.height[tree.root]
    truth = random_htf_tensor(k_truth, tensor_dims, tree, [args.truth_rank] * layers,
                              args.truth_norm)
    model = HTF.gaussian(k_init, tensor_dims, tree, tree.layer_widths(args.htf_widths),
                         args.htf_std)
    return truth, model, {"solver": SOLVERS[args.htf_solver]()}


def run(config: Config, out: Path | None = None, progress: bool = False) -> dict:
    """Solve the three problems; return their results (and, given a folder `out`,
    write the trajectories, the figure and `summary.json` there)."""
    # CP's Rosenbrock-W eigendecomposes a 256x256 Hessian block every 4 steps; with
    # OpenBLAS's default threads on a busy 2-core machine that took 1.3 s instead of
    # 20 ms single-threaded (measured), so BLAS/LAPACK run on one thread here.
    with threadpool_limits(1, "blas"):
        return _run(config, out, progress)


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
        if out is not None:
            tr.save(output(out) / f"trajectory_{name}.npz")
        trajectories[name] = tr, t_escape
        results[name] = _result(name, tr, args) | {"t_escape": t_escape}
        if progress:
            r = results[name]
            print(f"[{NAME}] {name}: {tr.status}, error "
                  f"{r['relative_reconstruction_error']:.3g}, rank {r['rank']}, "
                  f"{r['steps']} steps, {r['wall_time_s']} s", flush=True)
    summary = {"experiment": NAME, "config": dataclasses.asdict(args), "results": results}
    if out is not None:
        out = output(out)
        _figure(trajectories, args, out / f"{NAME}.png")
        write_summary(out, summary | {"out": str(out)})
    return summary


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
