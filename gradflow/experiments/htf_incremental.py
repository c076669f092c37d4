"""Razin, Maman & Cohen (ICML 2022): hierarchical tensor factorization learns hierarchical rank incrementally.

Completion of an order-4 8x8x8x8 tensor of hierarchical tensor rank (5, 5) over the
binary mode tree ((0, 1), (2, 3)) (a random HTF with widths 5, 5, 5 and Gaussian
weights, scaled to Frobenius norm 64, i.e. entries of RMS 1) from 2048 entries
observed uniformly without repetition, by an HTF over the same tree under gradient
flow from Gaussian inits of several scales. After a plateau whose length grows like
std^-5, local components leave zero one after another, at the root and at the node
{0, 1} alike (each obeys dP/dt = K*gamma*P^(2-2/K), K = 3, THEORY.md §4.5), and
the solution has the truth's hierarchical rank.

Recorded per init (`trajectory_std*.npz`): every local component's norm, unsorted
(`component_norms`, one column per component, node by node in `tree.interior` order,
root last; `summary.json` gives the columns of each node), the singular values of
the matricization at `--node`, the reconstruction error, and the relative residuals
of §4.5's exact identity (any init) and of the law K*gamma*P^(2-2/K) (exact only
with `--init balanced`, an exactly balanced sign-matrix init whose root vectors have
norm = the `--stds` value). The solve runs in two legs (`flow_through_escape`) so
that the short learning phase after the plateau is finely saved; the figure's
x-axis is the time since the plateau ended.

Defaults versus the paper's code (THEORY.md §4.7): the data, init and stop are the
paper's (mode dimension 8, HT rank (5, 5), norm 64, 2048 entries, Gaussian init,
stop at loss 2.5e-5 = the code's MSE 5e-5 in gradflow's 1/2-mean convention), but
the widths are 32, 32 instead of 512, 512, and the init stds 0.1, 0.03, 0.01 (the
code's is 0.01). Measured on 2 slow cores shared with other jobs (load 7-10):

- widths 512 (`--widths 512 512 --stds 0.01`, the paper's run): one gradient takes
  4 ms, Tsit5 spends 6 per step, and 1000 steps (123 s) reached t = 1.8e8 with one
  root component learned; the solve needs ~10^5 steps, i.e. hours per init.
- the step count is set by stiffness, not width: once a component is learned its
  curvature caps the explicit step while the next one sits on its plateau
  (width 32, std 0.01: 62,705 Tsit5 steps, 13,433 rejected; width 64: 71,758).
  Other explicit solvers were slower (width 32, std 0.01, another seed: Tsit5
  24,769 steps / 36 s, Bosh3 37,906 / 53 s, RosenbrockW(Explicit()) 49,617 / 61 s).
- the defaults: 12,132 / 39,064 / 62,705 steps for std 0.1 / 0.03 / 0.01, about
  3.5 minutes of wall time in all (95 s of CPU). Each 3x smaller std costs ~3x more
  steps: std 0.003 took 231,032 steps (2.5-5 minutes alone).
"""

import argparse
import json
from pathlib import Path

import diffrax as dfx
import jax
import jax.numpy as jnp
import jax.random as jr
import matplotlib.pyplot as plt
import numpy as np

from .. import plotting
from ..analysis import htf as ah
from ..data import random_htf_tensor, sample_indices
from .._flow import flow
from ..models.htf import HTF, ModeTree
from ..objectives import Completion
from ..solvers import RosenbrockW
from ..stiffness import Explicit
from ..trajectory import Trajectory

NAME = "htf-incremental"

SOLVERS = {
    "tsit5": dfx.Tsit5,
    "dopri5": dfx.Dopri5,
    "bosh3": dfx.Bosh3,
    "rosenbrock-explicit": lambda: RosenbrockW(Explicit()),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stds", type=float, nargs="+", default=[0.1, 0.03, 0.01],
                        help="init std of every weight (with --init balanced: the root's "
                             "vector norm); the paper's code uses 0.01")
    parser.add_argument("--init", choices=["gaussian", "balanced"], default="gaussian")
    parser.add_argument("--order", type=int, default=4)
    parser.add_argument("--dim", type=int, default=8, help="mode dimension")
    parser.add_argument("--truth-ranks", type=int, nargs="+", default=[5, 5],
                        help="widths of the ground-truth HTF, one per layer (its HT rank)")
    parser.add_argument("--truth-norm", type=float, default=64.0)
    parser.add_argument("--observations", type=int, default=2048)
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 32],
                        help="HTF widths, one per layer (the paper's code: 512 512)")
    parser.add_argument("--node", type=int, nargs="+", default=[0, 1],
                        help="modes of the interior node plotted besides the root")
    parser.add_argument("--loss-tol", type=float, default=2.5e-5,
                        help="stop when the loss (1/2 mean squared error) falls below this")
    parser.add_argument("--t1", type=float, default=1e14, help="final flow time")
    parser.add_argument("--rtol", type=float, default=1e-8)
    parser.add_argument("--solver", choices=sorted(SOLVERS), default="tsit5")
    add_learning_phase_arguments(parser)


def add_learning_phase_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments shared with `compare-factorizations`: stop, ranks, the two-leg
    solve around the plateau's end, seed and x-axis."""
    parser.add_argument("--max-steps", type=int, default=400_000)
    parser.add_argument("--rank-rtol", type=float, default=1e-2,
                        help="singular values above this x the largest count toward a rank "
                             "(1e-2: just above the ~1%% reconstruction error at --loss-tol)")
    parser.add_argument("--escape", type=float, default=0.01,
                        help="the plateau ends when the end tensor's norm reaches this x the "
                             "truth's; the learning phase after it is saved finely")
    parser.add_argument("--saves", type=int, default=3000,
                        help="save times of the learning phase (geometric from t = 1e-2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--x", choices=["escape", "time", "loss"], default="escape",
                        help="x-axis: linear time since the plateau ended, log flow time, "
                             "or the loss")


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


def flow_through_escape(model, objective, *, escape_norm, loss_tol, t1, observers, saves,
                        **solve) -> tuple[Trajectory, float]:
    """Gradient flow in two legs, so that the short learning phase is finely saved.

    From a small init the flow sits on a plateau for a time that grows like a power
    of 1/init, then learns everything in a far shorter time (width 32, std 1e-2:
    plateau 2.8e9, learning 1.1e5). One geometric save grid over the whole solve
    puts the learning phase between two saves. So the first leg runs until the
    end tensor's norm reaches `escape_norm`, and the second restarts from there
    (its clock reset to 0, so its geometric save grid is dense where learning
    happens) until `loss_tol`. A W-method or Runge-Kutta solve restarted at a
    state is the same flow, so the legs join into one trajectory in physical time.

    **Returns:** `(trajectory, t_escape)`, with `t_escape` the end of the first leg
    (0 when the init's norm is already above `escape_norm`).
    """
    # Both legs have the same stops, save-grid size, t1 and observers, so the second
    # reuses the first's compiled solve (the radius of the second never fires).
    grid = np.concatenate([[0.0], np.geomspace(1e-2, t1, saves - 1)])
    kwargs = dict(t1=t1, loss_tol=loss_tol, save_times=grid, observers=observers,
                  throw=False, **solve)
    first = None
    if float(model.norm()) < escape_norm:
        first = flow(model, objective, radius=escape_norm, **kwargs)
        if first.status != "radius":  # stopped at the loss, or did not finish
            return first, first.t_final
        model = first.model
    second = flow(model, objective, radius=float(np.finfo(np.float64).max), **kwargs)
    if first is None:
        return second, 0.0
    return _join(first, second), first.t_final


def _join(first: Trajectory, second: Trajectory) -> Trajectory:
    """`second` continued from the end of `first`, in `first`'s clock."""
    offset = first.t_final
    cat = lambda a, b: np.concatenate([np.asarray(a)[:-1], np.asarray(b)])
    stats = {k: (first.stats[k] + second.stats[k]
                 if first.stats.get(k) is not None and second.stats.get(k) is not None
                 else None) for k in second.stats}
    return Trajectory(
        ts=cat(first.ts, offset + np.asarray(second.ts)),
        observations=jax.tree.map(cat, first.observations, second.observations),
        t_final=offset + second.t_final,
        final=second.final,
        model=second.model,
        status=second.status,
        stats=stats,
        config=second.config | {"t1": first.config["t1"], "t_escape": offset,
                                "escape_norm": first.config["radius"]},
    )


def run(args, out: Path, progress: bool = True) -> dict:
    k_problem, k_init = jr.split(jr.key(args.seed))
    tree, truth, objective = problem(args, k_problem)
    dims = (args.dim,) * args.order
    widths = tree.layer_widths(args.widths)
    node = tree.find(args.node)
    if tree.is_leaf(node) or node == tree.root:
        raise SystemExit(f"--node {args.node} must be an interior node other than the root")
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
        tr.save(out / f"trajectory_std{std:g}.npz")
        trajectories[std] = tr, t_escape
        summary[f"{std:g}"] = _result(tr, model, tree, args.rank_rtol) | {"t_escape": t_escape}
        if progress:
            r = summary[f"{std:g}"]
            ranks = {k: v["rank"] for k, v in r["hierarchical_ranks"].items()}
            print(f"[{NAME}] std={std:g}: {tr.status}, error "
                  f"{r['relative_reconstruction_error']:.3g}, HT ranks {ranks}, "
                  f"{r['steps']} steps, {r['wall_time_s']} s", flush=True)
    _figure(trajectories, tree, node, truth_sv, truth_ranks, args, out / f"{NAME}.png")
    (out / "summary.json").write_text(json.dumps(
        {"experiment": NAME, "config": vars(args) | {"out": str(out)},
         "tree": repr(tree.structure),
         "widths": {node_label(tree, v): w for v, w in zip(tree.interior, widths)},
         "component_slices": {node_label(tree, v): [s.start, s.stop]
                              for v, s in node_slices(model).items()},
         "truth_hierarchical_ranks": truth_ranks,
         "truth_node_singular_values": truth_sv[:10].tolist(),
         "results": summary},
        indent=2, default=str))
    return summary


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
