"""Razin, Maman & Cohen (ICML 2022): hierarchical tensor factorization learns hierarchical rank incrementally.

Completion of an order-4 8x8x8x8 tensor of hierarchical tensor rank (5, 5) over the
binary mode tree ((0, 1), (2, 3)) (a random HTF with widths 5, 5, 5 and Gaussian
weights, scaled to Frobenius norm 64, i.e. entries of RMS 1) from 2048 entries
observed uniformly without repetition, by an HTF of widths 512, 512 over the same tree
under gradient flow from Gaussian inits of several scales. After a plateau whose
length grows like std^-5 (the end tensor is a product of 7 weight matrices), local
components leave zero one after another, at the root and at the node {0, 1} alike
(each obeys dP/dt = K*gamma*P^(2-2/K), K = 3), and the solution has the truth's
hierarchical rank.

Recorded per init (`trajectory_std*.npz`): every local component's norm, unsorted
(`component_norms`, one column per component, node by node in `tree.interior` order,
root last; `summary.json` gives the columns of each node), the singular values of
the matricization at `--node`, the reconstruction error, and the relative residuals
of the exact identity for dP/dt (any init) and of the law K*gamma*P^(2-2/K) (exact
only with `--init balanced`, an exactly balanced sign-matrix init whose root vectors
have norm = the `--stds` value). The solve runs in two legs (`flow_through_escape` of
`gradflow._flow`) so that the short learning phase after the plateau is finely saved;
the figure's x-axis is the time since the plateau ended.

The settings are the paper code's: mode dimension 8, HT rank (5, 5), norm 64, 2048
entries, widths 512, Gaussian init (its std is 0.01; 0.03 and 0.003 beside it show
the plateau's growth), stop at loss 2.5e-5 (the code's MSE 5e-5 in gradflow's
1/2-mean convention). The default solver (`gf.default_solver`: Tsit5 while the flow
is not stiff, then Rosenbrock-W steps on the Gauss-Newton block of each node's
largest local components) keeps the step count nearly flat in the init scale and the
width; Tsit5 alone needs 10^4-10^5 steps per init here (`--solver tsit5`).
`benchmarks/htf.py` measures both. `--rtol` 1e-6 resolves the figure's curves and the
escape times to ~1e-5 relative; `--rtol 1e-8` or below for residual studies.
"""

import dataclasses
from pathlib import Path

import diffrax as dfx
import jax.numpy as jnp
import jax.random as jr
import matplotlib.pyplot as plt
import numpy as np

from .. import plotting
from ..analysis import htf as ah
from ..data import random_htf_tensor, sample_indices
from .._flow import flow_through_escape
from ..models.htf import HTF, ModeTree
from ..objectives import Completion
from ..solvers import RosenbrockW
from ..stiffness import Explicit
from ._config import check, check_int, check_number, check_rtol, output, setting, write_summary

NAME = "htf-incremental"

SOLVERS = {
    "default": lambda: None,
    "tsit5": dfx.Tsit5,
    "dopri5": dfx.Dopri5,
    "dopri8": dfx.Dopri8,
    "bosh3": dfx.Bosh3,
    "rosenbrock-explicit": lambda: RosenbrockW(Explicit()),
}
"""`--solver` choices: `default` is `gf.default_solver(model)`."""


@dataclasses.dataclass(frozen=True)
class LearningPhase:
    """The settings shared with `compare-factorizations`: stop, ranks, the two-leg
    solve around the plateau's end, seed and x-axis."""

    loss_tol: float = setting(2.5e-5, "stop when the loss (1/2 mean squared error) falls "
                                      "below this")
    t1: float = setting(1e14, "final flow time")
    rtol: float = setting(1e-6, "relative tolerance of the solve")
    max_steps: int = setting(400_000, "step budget of each solve")
    rank_rtol: float = setting(1e-2, "singular values above this x the largest count toward "
                                     "a rank (just above the ~1%% error at --loss-tol)")
    escape: float = setting(0.01, "the plateau ends when the end tensor's norm reaches this "
                                  "x the truth's; the learning phase after it is saved finely")
    saves: int = setting(3000, "save times of the learning phase (geometric from t = 1e-2)")
    seed: int = setting(0, "seed of the data and the inits")
    x: str = setting("escape", "x-axis: linear time since the plateau ended, log flow time, "
                               "or the loss", choices=("escape", "time", "loss"))

    def __post_init__(self):
        for name in ("loss_tol", "t1", "rtol", "rank_rtol"):
            value = getattr(self, name)
            check(value > 0 and np.isfinite(value), name, "a finite number > 0", value)
        check_rtol(self)
        check_number(self, "escape", 0.0, low_open=False)
        check_int(self, "seed", 0)
        for name in ("max_steps", "saves"):
            check(getattr(self, name) >= 2, name, "an int >= 2", getattr(self, name))


@dataclasses.dataclass(frozen=True)
class Config(LearningPhase):
    """`gradflow run htf-incremental`: the problem, the model and its inits."""

    stds: tuple[float, ...] = setting((0.03, 0.01, 0.003), "init std of every weight (with "
                                      "--init balanced: the root's vector norm); the "
                                      "paper's code uses 0.01")
    init: str = setting("gaussian", "init family", choices=("gaussian", "balanced"))
    order: int = setting(4, "tensor order (a balanced binary mode tree)")
    dim: int = setting(8, "mode dimension")
    truth_ranks: tuple[int, ...] = setting((5, 5), "widths of the ground-truth HTF, one per "
                                           "layer (its HT rank)")
    truth_norm: float = setting(64.0, "Frobenius norm of the ground truth")
    observations: int = setting(2048, "observed entries (uniform, without repetition)")
    widths: tuple[int, ...] = setting((512, 512), "HTF widths, one per layer (the paper's "
                                      "code: 512 512)")
    node: tuple[int, ...] = setting((0, 1), "modes of the interior node plotted besides the "
                                    "root")
    solver: str = setting("default", "ODE solver", choices=tuple(SOLVERS))

    def __post_init__(self):
        super().__post_init__()
        check(len(self.stds) > 0 and all(s > 0 and np.isfinite(s) for s in self.stds),
              "stds", "finite numbers > 0", self.stds)
        check(self.order >= 2, "order", ">= 2", self.order)
        check(self.dim >= 1, "dim", ">= 1", self.dim)
        check(self.truth_norm > 0, "truth_norm", "> 0", self.truth_norm)
        check(1 <= self.observations <= self.dim**self.order, "observations",
              f"between 1 and dim^order = {self.dim**self.order}", self.observations)
        tree = ModeTree.binary(self.order)
        layers = tree.height[tree.root]
        for name in ("widths", "truth_ranks"):
            value = getattr(self, name)
            check(len(value) == layers and all(w >= 1 for w in value), name,
                  f"{layers} ints >= 1 (one per layer of the order-{self.order} tree)", value)
        try:
            node = tree.find(self.node)
        except (ValueError, KeyError):
            node = None
        check(node is not None and not tree.is_leaf(node) and node != tree.root, "node",
              "the modes of an interior node other than the root", self.node)


def node_label(tree: ModeTree, v: int) -> str:
    return "{" + ",".join(map(str, tree.modes[v])) + "}"


def node_slices(model: HTF) -> dict[int, slice]:
    """Where each interior node's components sit in `component_norms()` (root last)."""
    out, start = {}, 0
    for v, r in zip(model.tree.interior, model.widths):
        out[v] = slice(start, start + r)
        start += r
    return out


def problem(args, key):
    """(tree, truth, objective) of the experiment."""
    dims = (args.dim,) * args.order
    tree = ModeTree.binary(args.order)
    k_truth, k_obs = jr.split(key)
    truth = random_htf_tensor(k_truth, dims, tree, args.truth_ranks, args.truth_norm)
    objective = Completion.from_tensor(truth, sample_indices(k_obs, dims, args.observations))
    return tree, truth, objective


def rank_summary(tensor, tree: ModeTree, rtol: float) -> dict:
    """Numerical and effective rank of the matricization at every non-root node (§4.3)."""
    out = {}
    for v in range(tree.root):
        r = ah.matricization_rank(tensor, tree.modes[v], rtol)
        out[node_label(tree, v)] = {"rank": int(r.rank), "effective_rank": float(r.effective_rank),
                                    "top_singular_values": np.asarray(r.singular_values)[:8].tolist()}
    return out


def run(config: Config, out: Path | None = None, progress: bool = False) -> dict:
    """Solve every init of `config`; return the per-std results (and, given a folder
    `out`, write the trajectories, the figure and `summary.json` there)."""
    args = config
    k_problem, k_init = jr.split(jr.key(args.seed))
    tree, truth, objective = problem(args, k_problem)
    dims = (args.dim,) * args.order
    widths = tree.layer_widths(args.widths)
    node = tree.find(args.node)
    truth_norm = jnp.linalg.norm(truth)
    observers = {
        "component_norms": lambda t, m, o: m.component_norms(),
        "reconstruction_error": lambda t, m, o: jnp.linalg.norm(m.full() - truth) / truth_norm,
        "node_singular_values": lambda t, m, o: jnp.linalg.svd(
            ah.matricization(m.full(), tree.modes[node]), compute_uv=False),
        "identity_residual": lambda t, m, o: ah.identity_residual(m, o),
        "corollary_residual": lambda t, m, o: ah.corollary_residual(m, o),
    }
    truth_ranks = rank_summary(truth, tree, args.rank_rtol)
    truth_sv = np.asarray(jnp.linalg.svd(ah.matricization(truth, tree.modes[node]),
                                         compute_uv=False))
    summary, trajectories = {}, {}
    for std in args.stds:
        init = HTF.balanced if args.init == "balanced" else HTF.gaussian
        model = init(k_init, dims, tree, widths, std)
        if progress:
            print(f"[{NAME}] std={std:g}: integrating until loss <= {args.loss_tol:g}",
                  flush=True)
        tr, t_escape = flow_through_escape(
            model, objective, escape_norm=args.escape * args.truth_norm,
            loss_tol=args.loss_tol, t1=args.t1, observers=observers, saves=args.saves,
            rtol=args.rtol, solver=SOLVERS[args.solver](), max_steps=args.max_steps,
            progress=progress)
        if out is not None:
            tr.save(output(out) / f"trajectory_std{std:g}.npz")
        trajectories[std] = tr, t_escape
        summary[f"{std:g}"] = _result(tr, model, tree, args.rank_rtol) | {"t_escape": t_escape}
        if progress:
            r = summary[f"{std:g}"]
            ranks = {k: v["rank"] for k, v in r["hierarchical_ranks"].items()}
            print(f"[{NAME}] std={std:g}: {tr.status}, error "
                  f"{r['relative_reconstruction_error']:.3g}, HT ranks {ranks}, "
                  f"{r['steps']} steps, {r['wall_time_s']} s", flush=True)
    result = {"experiment": NAME, "config": dataclasses.asdict(config),
              "tree": repr(tree.structure),
              "widths": {node_label(tree, v): w for v, w in zip(tree.interior, widths)},
              "component_slices": {node_label(tree, v): [s.start, s.stop]
                                   for v, s in node_slices(model).items()},
              "truth_hierarchical_ranks": truth_ranks,
              "truth_node_singular_values": truth_sv[:10].tolist(),
              "results": summary}
    if out is not None:
        out = output(out)
        _figure(trajectories, tree, node, truth_sv, truth_ranks, args, out / f"{NAME}.png")
        write_summary(out, result | {"out": str(out)})
    return result


def sweep_setup(config: Config) -> dict:
    """This experiment's problem for `gradflow sweep`: every weight's init std = the
    sweep's scale (`--stds` is not used). The end tensor is a product of the tree's
    2·order − 1 weight matrices, so the escape time grows like scale^-(2·order − 3)."""
    tree, truth, objective = problem(config, jr.split(jr.key(config.seed))[0])
    dims, widths = (config.dim,) * config.order, tree.layer_widths(config.widths)
    truth_norm = jnp.linalg.norm(truth)

    def member(params):
        model = HTF.gaussian(jr.key(params["seed"]), dims, tree, widths, params["scale"])
        return model, objective

    return dict(
        problem=member,
        order=len(tree.interior) + config.order,
        t1=config.t1,
        loss_tol=config.loss_tol,
        rtol=config.rtol,
        solver=SOLVERS[config.solver](),
        max_steps=config.max_steps,
        save_times=np.concatenate([[0.0], np.geomspace(1e-2, config.t1, 400)]),
        observers={
            "component_norms": lambda t, m, o: m.component_norms(),
            "reconstruction_error": lambda t, m, o: jnp.linalg.norm(m.full() - truth) / truth_norm,
        },
    )


def _result(tr, model0, tree, rank_rtol) -> dict:
    final = tr.model
    norms = final.local_component_norms()
    slices = node_slices(final)
    saved = np.asarray(tr["component_norms"])
    bounds = ah.rank_bounds(final, 0.0)
    ranks = rank_summary(final.full(), tree, rank_rtol)
    return {
        "status": tr.status,
        "t_final": tr.t_final,
        "final_loss": float(tr.final["loss"]),
        "relative_reconstruction_error": float(tr.final["reconstruction_error"]),
        "hierarchical_ranks": ranks,
        "rank_within_local_component_bound": all(
            ranks[node_label(tree, v)]["rank"] <= int(b) for v, b in bounds.items()),
        "local_components_above_1pct": {
            node_label(tree, v): int(np.sum(np.asarray(p) > 1e-2 * float(p.max())))
            for v, p in norms.items()},
        "top_local_component_norms": {
            node_label(tree, v): np.sort(np.asarray(p))[::-1][:10].tolist()
            for v, p in norms.items()},
        "local_components_recorded": {
            node_label(tree, v): int(saved[:, s].shape[1]) for v, s in slices.items()},
        "saves": int(saved.shape[0]),
        "unbalancedness_at_init": float(ah.unbalancedness(model0)),
        "identity_residual_max": float(np.nanmax(tr["identity_residual"])),
        "corollary_residual_max": float(np.nanmax(tr["corollary_residual"])),
        "steps": tr.stats["steps"],
        "rejected_steps": tr.stats["rejected_steps"],
        "wall_time_s": round(tr.stats["wall_time"], 2),
    }


def x_values(tr, t_escape, x):
    """The x values of a trajectory's saves (see `x_axis`)."""
    if x == "loss":
        return np.asarray(tr["loss"])
    return np.asarray(tr.ts) - (t_escape if x == "escape" else 0.0)


def x_axis(ax, tr, t_escape, x):
    """`escape`: linear time since the plateau ended (the learning phase); `time`:
    log physical time; `loss`: the loss, decreasing."""
    ax.grid(alpha=0.3)
    if x == "loss":
        ax.set_xscale("log")
        ax.set_xlim(float(tr["loss"][0]) * 1.5, float(tr["loss"][-1]) / 1.5)
        ax.set_xlabel("loss (decreasing →)")
    elif x == "time":
        ax.set_xscale("log")
        ax.set_xlim(tr.ts[1], tr.t_final * 1.5)
        ax.set_xlabel("flow time t")
    else:
        ax.set_xlim(0, tr.t_final - t_escape)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
        ax.set_xlabel(f"flow time t − t_e  (plateau until t_e = {t_escape:.3g})")


def top_curves(ax, xs, values, k=10):
    """The `k` columns of `values` with the largest final value, with fixed
    identities (not re-sorted at each time), on a log y-axis."""
    top = np.argsort(values[-1])[::-1][:k]
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(top)))
    for c, r in zip(colors, top):
        ax.plot(xs, values[:, r], color=c, lw=1.5)
    ax.set_yscale("log")
    # floor at the smallest initial value shown, never at rounding noise
    low = max(float(np.min(values[0, top])) / 3, float(np.max(values)) * 1e-12)
    ax.set_ylim(bottom=low)


def _figure(trajectories, tree, node, truth_sv, truth_ranks, args, path):
    n = len(trajectories)
    fig, axes = plt.subplots(4, n + 1, figsize=(4.4 * (n + 1), 12.5), squeeze=False)
    slices = node_slices(next(iter(trajectories.values()))[0].model)
    root, label = tree.root, node_label(tree, node)
    truth_widths = dict(zip(tree.interior, tree.layer_widths(args.truth_ranks)))
    for j, (std, (tr, t_e)) in enumerate(trajectories.items()):
        status = "" if tr.ok else f" [{tr.status.upper()}]"
        xs = x_values(tr, t_e, args.x)
        norms = np.asarray(tr["component_norms"])
        for i, v in enumerate((root, node)):
            ax = axes[i, j]
            top_curves(ax, xs, norms[:, slices[v]])
            where = "root" if v == root else "node"
            ax.set(title=f"init {std:g}: {where} {node_label(tree, v)}{status}",
                   ylabel="local component norm")
            x_axis(ax, tr, t_e, args.x)
        ax = axes[2, j]
        top_curves(ax, xs, np.asarray(tr["node_singular_values"]))
        for sv in truth_sv[truth_sv > 1e-8 * truth_sv[0]]:
            ax.axhline(sv, color="0.6", ls=":", lw=0.8)
        ax.set(ylabel="singular value", title=f"matricization {label} (dotted: truth)")
        x_axis(ax, tr, t_e, args.x)
        ax = axes[3, j]
        ax.plot(xs, tr["loss"] / tr["loss"][0], label="loss / initial", color="C0")
        ax.plot(xs, tr["reconstruction_error"], label="reconstruction error", color="C3",
                ls="--")
        ax.set(yscale="log", title=f"errors ({tr.stats['steps']} steps, {tr.status})")
        x_axis(ax, tr, t_e, args.x)
        ax.legend(loc="lower left", fontsize=8)
    _rank_panel(axes[0, n], trajectories, truth_ranks, args.rank_rtol)
    for i, v in enumerate((root, node)):
        ax = axes[i + 1, n]
        for j, (std, (tr, _)) in enumerate(trajectories.items()):
            p = np.sort(np.asarray(tr["component_norms"])[-1, slices[v]])[::-1]
            ax.semilogy(np.arange(1, p.size + 1), p, ".-", color=f"C{j}", label=f"{std:g}")
        ax.axvline(truth_widths[v] + 0.5, color="0.6", ls=":")
        ax.set(title=f"final local norms, {'root' if v == root else 'node'} "
                     f"{node_label(tree, v)}\n(dotted: the truth's width)",
               xlabel="component (sorted)", ylabel="local component norm")
        ax.grid(alpha=0.3)
        ax.legend(title=f"init {args.init}", fontsize=7)
    ax = axes[3, n]
    for j, (std, (tr, _)) in enumerate(trajectories.items()):
        ax.plot(tr.ts[1:], np.asarray(tr["identity_residual"])[1:], color=f"C{j}",
                label=f"exact identity, {std:g}")
        ax.plot(tr.ts[1:], np.asarray(tr["corollary_residual"])[1:], color=f"C{j}", ls="--",
                label=f"K·γ·P^(2−2/K), {std:g}")
    ax.set(xscale="log", yscale="log", xlabel="flow time t",
           title="§4.5: max relative residual of dP/dt\n(the law is exact when balanced)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(
        f"HTF completion (order {args.order}, dim {args.dim}, HT-rank "
        f"{tuple(args.truth_ranks)} truth, {args.observations} entries, widths "
        f"{tuple(args.widths)}, {args.init} init): ten largest local component norms",
        fontsize=11)
    plotting.save(fig, path)


def _rank_panel(ax, trajectories, truth_ranks, rtol):
    nodes = list(truth_ranks)
    x = np.arange(len(nodes))
    width = 0.8 / (len(trajectories) + 1)
    ax.bar(x, [truth_ranks[k]["rank"] for k in nodes], width, color="0.6", label="truth")
    for j, (std, (tr, _)) in enumerate(trajectories.items()):
        ranks = rank_summary(tr.model.full(), tr.model.tree, rtol)
        ax.bar(x + (j + 1) * width, [ranks[k]["rank"] for k in nodes], width, color=f"C{j}",
               label=f"solution, {std:g}")
    ax.set_xticks(x + 0.4 - width / 2, nodes)
    ax.set(title=f"hierarchical rank (σ > {rtol:g}·σ_max)", xlabel="matricization rows",
           ylabel="rank")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
