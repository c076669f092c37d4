"""Razin & Cohen (NeurIPS 2020): CP tensor completion drives the tensor rank down.

A target of CP rank 1 (and 3) with Gaussian factors and Frobenius norm 1, of order 3
(8x8x8; `--order 4` for the talk's "order 4, rank 1" figure), is completed from a
growing number of entries observed uniformly without repetition, by a CP
factorization with the maximal number of components (R = the product of all dims but
the largest: 64 for 8x8x8, 512 for 8x8x8x8) under gradient flow from Gaussian inits
of std 1e-2 and 1e-3, over several seeds. Plotted against the number of
observations: the reconstruction error, and the tensor rank of the solution as the
papers estimate it (the smallest r whose CP-ALS fit of the end tensor reaches a
relative error tolerance, `gradflow.analysis.cp.als_tensor_rank`), beside the "linear" baseline that fits the
observations exactly and is 0 elsewhere. Expected: the flow's solutions have low
rank (about the target's) at every number of observations, and recover the target
once there are enough of them; the baseline's error is sqrt(1 - observed fraction of
the norm) and its rank is high.

Every run is one compiled `gradflow.sweep` over (target rank, number of
observations, init std, seed): the observed entries of a seed are one random order
of all entries, and a member observes its first m with 0/1 weights on the rest
(`Completion(..., weights=...)`), so shapes are fixed and the loss is the mean over
the m observed. Each seed draws its own target, order of entries and init; the
target of rank 1 is the first component of the target of rank 3.

Against the paper's code (github.com/noamrazin/imp_reg_dl_not_norms,
`tc_multiple_experiments_runner.py`): same targets, sample counts and init
stds; 2 seeds instead of 5 (`--seeds 5`); the exact flow instead of gradient descent
with an adaptive learning rate (a time reparametrization of the same curve). The
papers stop at a mean squared error of 1e-6, which for a norm-1 target of 512
entries is only 1e-3 of the initial loss and leaves a reconstruction error of a few
percent, so the default here stops at 1e-8 of each member's initial loss
(`--loss-drop`; errors then bottom out near 1e-4). The papers' rank tolerance, 1e-6,
is below what is left of the unlearned components at that point (measured: 6e-5 of
the end tensor's norm at std 1e-3 for a rank-3 target, 2e-4 to 5e-4 at std 1e-2),
so every solution would count as rank > max-rank; the default `--rank-tol 1e-3` sits
above that and far below the learned components (`--rank-tol 1e-6` for the papers').
The ALS estimator tries ranks up to `--max-rank` (a tensor it cannot fit with that
many components is reported as max-rank + 1). `--rtol 1e-6` (not gradflow's 1e-8)
takes 3-5x fewer steps at an integration error far below these errors.
"""

import dataclasses
import time
from pathlib import Path
from typing import Any

import diffrax as dfx
import jax.numpy as jnp
import jax.random as jr
import matplotlib.pyplot as plt
import numpy as np

from .. import plotting
from .._sweep import sweep
from ..analysis import convex
from ..analysis import cp as acp
from ..models.cp import CP
from ..objectives import Completion
from ._config import (check, check_int, check_number, check_numbers, check_rtol, output, setting,
                      write_summary)

NAME = "tensor-completion"


@dataclasses.dataclass(frozen=True)
class Config:
    order: int = setting(3, "tensor order N (the papers: 3 and 4)")
    dim: int = setting(8, "mode dimension: the tensor is dim x ... x dim")
    truth_ranks: tuple[int, ...] = setting((1, 3), "CP ranks of the targets (norm 1)")
    observations: tuple[int, ...] = setting(
        (50, 100, 150, 200, 250, 300, 350, 400, 450, 511),
        "numbers of observed entries (nested: each set holds the smaller ones)")
    stds: tuple[float, ...] = setting((1e-2, 1e-3), "init standard deviations")
    seeds: int = setting(2, "repetitions (each draws a target, an order of entries, an init)")
    components: int | None = setting(
        None, "R, the number of CP components; default the maximal CP rank, the product "
              "of all dims but the largest")
    loss_drop: float = setting(1e-8, "stop when the loss falls below this x its initial value")
    rank_tol: float = setting(1e-3, "relative error of a CP-ALS fit that counts as exact "
                                    "(the papers': 1e-6)")
    max_rank: int = setting(8, "the largest rank the ALS estimator tries")
    t1: float = setting(1e12, "final flow time")
    rtol: float = setting(1e-6, "solver tolerance")
    max_steps: int = setting(10_000, "solver steps per member before it counts as unfinished")
    solver: str = setting("default", "ODE solver: gradflow's default (explicit until stiff, "
                          "then Rosenbrock-W) or Diffrax's explicit Tsit5",
                          choices=("default", "tsit5"))
    chunk_size: int = setting(4, "members solved together by the compiled sweep (they step "
                                 "in lockstep until the slowest stops)")
    seed: int = setting(0, "base seed")

    def __post_init__(self):
        check(self.order >= 2, "order", "an int >= 2", self.order)
        check(self.dim >= 1, "dim", "an int >= 1", self.dim)
        size = self.dim**self.order
        check(len(self.truth_ranks) >= 1 and all(r >= 1 for r in self.truth_ranks),
              "truth_ranks", "one or more ints >= 1", self.truth_ranks)
        check(len(self.observations) >= 1 and all(1 <= m <= size for m in self.observations),
              "observations", f"one or more ints in [1, {size}] (dim^order)", self.observations)
        check_numbers(self, "stds")
        check(self.seeds >= 1, "seeds", "an int >= 1", self.seeds)
        check(self.components is None or self.components >= 1, "components",
              "an int >= 1 (or unset)", self.components)
        check(0 < self.loss_drop < 1, "loss_drop", "in (0, 1)", self.loss_drop)
        check(0 < self.rank_tol < 1, "rank_tol", "in (0, 1)", self.rank_tol)
        check(self.max_rank >= 1, "max_rank", "an int >= 1", self.max_rank)
        check_number(self, "t1")
        check_rtol(self)
        check(self.max_steps >= 1, "max_steps", "an int >= 1", self.max_steps)
        check(self.chunk_size >= 1, "chunk_size", "an int >= 1", self.chunk_size)
        check(self.solver in ("default", "tsit5"), "solver", "'default' or 'tsit5'", self.solver)
        check_int(self, "seed", 0)

    @property
    def dims(self) -> tuple[int, ...]:
        return (self.dim,) * self.order

    @property
    def num_components(self) -> int:
        return CP.max_rank(self.dims) if self.components is None else self.components


def target(key, dims, rank, max_rank: int):
    """A tensor of CP rank `rank` (may be traced) with Gaussian factors and norm 1: the
    first `rank` of `max_rank` Gaussian components, so targets of one key are nested."""
    keys = jr.split(key, len(dims))
    factors = [jr.normal(k, (d, max_rank)) for k, d in zip(keys, dims)]
    factors[0] = factors[0] * (jnp.arange(max_rank) < rank).astype(factors[0].dtype)[None, :]
    tensor = CP(tuple(factors)).full()
    return tensor / jnp.linalg.norm(tensor)


def entry_order(key, dims, num: int):
    """The first `num` entries of a uniformly random order of all entries, `(num, N)`."""
    flat = jr.permutation(key, int(np.prod(dims)))[:num]
    return jnp.stack(jnp.unravel_index(flat, dims), axis=1)


def member_keys(config: Config, seed):
    """(target, entry order, init) keys of repetition `seed`."""
    return jr.split(jr.fold_in(jr.key(config.seed), seed), 3)


def problem(config: Config):
    """`params -> (model, objective)` for `gradflow.sweep` (axes truth_rank,
    observations, scale, seed)."""
    dims, m_max, top = config.dims, max(config.observations), max(config.truth_ranks)

    def build(params):
        k_truth, k_obs, k_init = member_keys(config, params["seed"])
        truth = target(k_truth, dims, params["truth_rank"], top)
        indices = entry_order(k_obs, dims, m_max)
        observed = jnp.arange(m_max) < params["observations"]
        objective = Completion(dims, indices, truth[tuple(indices.T)], weights=observed)
        model = CP.gaussian(k_init, dims, config.num_components, params["scale"])
        return model, objective

    return build


def _model(t, model, objective):
    return model


def sweep_tag(config: Config) -> dict:
    """What identifies the flows of `config` in its sweep folder beyond the sweep's own
    settings (grid, stops, tolerances, solver): the problem's shape, R and base seed.
    The rank-estimation settings are not in it, so a re-run with another `rank_tol`
    or `max_rank` reuses the flows."""
    return {"experiment": NAME, "order": config.order, "dim": config.dim,
            "components": config.num_components, "seed": config.seed}


def run(config: Config, out: Path | None = None, progress: bool = False) -> dict:
    """Solve every member of `config`'s grid and estimate the ranks; return the summary
    (and, given a folder `out`, write the figure and `summary.json` there, and the
    sweep's chunks to `out/sweep`, from which an interrupted run resumes)."""
    say = (lambda line: print(f"[{NAME}] {line}", flush=True)) if progress else (lambda _: None)
    dims, top, m_max = config.dims, max(config.truth_ranks), max(config.observations)
    grid = {"truth_rank": np.asarray(config.truth_ranks),
            "observations": np.asarray(config.observations),
            "scale": np.asarray(config.stds, float),
            "seed": np.arange(config.seeds)}
    members = int(np.prod([len(v) for v in grid.values()]))
    say(f"order {config.order}, {'x'.join(map(str, dims))}, R = {config.num_components}: "
        f"{members} flows (target ranks {list(config.truth_ranks)} x "
        f"{len(config.observations)} observation counts x stds {list(config.stds)} x "
        f"{config.seeds} seeds), one compiled sweep")
    start = time.perf_counter()
    # With a folder, every finished chunk of flows is written to out/sweep, and a run
    # interrupted and started again resumes from there (the tag refuses a folder
    # holding the flows of another problem).
    result = sweep(problem(config), grid, t1=config.t1, loss_drop=config.loss_drop,
                   rtol=config.rtol, max_steps=config.max_steps, save_times=[0.0],
                   observers={"model": _model}, chunk_size=config.chunk_size,
                   order_by="scale", progress=progress,
                   solver=dfx.Tsit5() if config.solver == "tsit5" else None,
                   out=None if out is None else Path(out) / "sweep", tag=sweep_tag(config))
    flow_wall = time.perf_counter() - start
    say(f"flows done in {flow_wall:.1f}s ({int(result.steps.sum())} steps; statuses "
        f"{dict(zip(*np.unique(result.status, return_counts=True)))})")

    start = time.perf_counter()
    truths = {}
    for seed in range(config.seeds):
        k_truth, k_obs, _ = member_keys(config, seed)
        order = np.asarray(entry_order(k_obs, dims, m_max))
        for rank in config.truth_ranks:
            truths[rank, seed] = (np.asarray(target(k_truth, dims, rank, top)), order)
    leaves = [np.asarray(leaf) for leaf in result.final["model"]]
    rows = []
    estimate = lambda tensor, **kw: acp.als_tensor_rank(
        tensor, config.rank_tol, config.max_rank, key=jr.key(config.seed), **kw)
    for i in range(len(result)):
        p = {k: v[i] for k, v in result.params.items()}
        rank, seed, m = int(p["truth_rank"]), int(p["seed"]), int(p["observations"])
        truth = truths[rank, seed][0]
        model = CP(tuple(jnp.asarray(leaf[i]) for leaf in leaves))
        end = np.asarray(model.full())
        rows.append(dict(
            truth_rank=rank, observations=m, std=float(p["scale"]), seed=seed,
            status=str(result.status[i]), t_final=float(result.t_final[i]),
            steps=int(result.steps[i]),
            relative_error=float(np.linalg.norm(end - truth)),  # the truth has norm 1
            als_rank=estimate(end).rank,
            components_above_1pct=acp.tensor_rank_estimate(model, 1e-2)))
        if progress and (i + 1) % 20 == 0:
            say(f"estimated the rank of {i + 1}/{len(result)} solutions")
    baseline = []
    for (rank, seed), (truth, order) in truths.items():
        for m in config.observations:
            objective = Completion(dims, order[:m], truth[tuple(order[:m].T)])
            fit = np.asarray(convex.min_frobenius_norm(objective))
            baseline.append(dict(truth_rank=rank, observations=m, seed=seed,
                                 relative_error=float(np.linalg.norm(fit - truth)),
                                 als_rank=estimate(fit, bisect=True).rank))
    rank_wall = time.perf_counter() - start
    say(f"ALS rank estimates done in {rank_wall:.1f}s")

    table = _table(config, rows, baseline)
    for rank in config.truth_ranks:
        for std in config.stds:
            t = table[f"rank{rank}"][f"std{std:g}"]
            say(f"target rank {rank}, std {std:g}: error "
                + " ".join(f"{m}:{e:.2g}" for m, e in zip(config.observations, t["error_mean"]))
                + " | ALS rank " + " ".join(f"{r:.3g}" for r in t["als_rank_mean"]))
        b = table[f"rank{rank}"]["linear"]
        say(f"target rank {rank}, linear baseline: error "
            + " ".join(f"{e:.2g}" for e in b["error_mean"])
            + " | ALS rank " + " ".join(f"{r:.3g}" for r in b["als_rank_mean"]))
    summary = {
        "experiment": NAME,
        "config": dataclasses.asdict(config),
        "components": config.num_components,
        "flow_wall_time_s": round(flow_wall, 2),
        "rank_estimation_wall_time_s": round(rank_wall, 2),
        "table": table,
        "members": rows,
        "linear_baseline": baseline,
    }
    if out is not None:
        out = output(out)
        _figure(config, table, out / f"{NAME}.png")
        write_summary(out, summary)
    return summary


def _table(config: Config, rows, baseline) -> dict:
    """Mean and spread over seeds, per target rank, std (and the baseline), per m."""

    def stats(selected):
        out = {k: [] for k in ("error_mean", "error_min", "error_max", "als_rank_mean",
                               "als_rank_min", "als_rank_max", "finished")}
        for m in config.observations:
            at = [r for r in selected if r["observations"] == m]
            errors = np.array([r["relative_error"] for r in at])
            ranks = np.array([r["als_rank"] for r in at])
            out["error_mean"].append(float(errors.mean()))
            out["error_min"].append(float(errors.min()))
            out["error_max"].append(float(errors.max()))
            out["als_rank_mean"].append(float(ranks.mean()))
            out["als_rank_min"].append(int(ranks.min()))
            out["als_rank_max"].append(int(ranks.max()))
            out["finished"].append(sum(r.get("status", "loss") == "loss" for r in at))
        return out

    table = {}
    for rank in config.truth_ranks:
        entry: dict[str, Any] = {f"std{std:g}": stats([r for r in rows if r["truth_rank"] == rank
                                       and r["std"] == float(std)]) for std in config.stds}
        entry["linear"] = stats([r for r in baseline if r["truth_rank"] == rank])
        entry["observations"] = list(config.observations)
        table[f"rank{rank}"] = entry
    return table


def _figure(config: Config, table: dict, path: Path) -> None:
    ranks = config.truth_ranks
    fig, axes = plt.subplots(2, len(ranks), figsize=(5.2 * len(ranks), 7.4), squeeze=False)
    ms = np.asarray(config.observations)
    colors = plt.cm.viridis(np.linspace(0.1, 0.75, len(config.stds)))
    cap = config.max_rank + 1
    for j, rank in enumerate(ranks):
        entry = table[f"rank{rank}"]
        series = [(f"gradient flow, init std {std:g}", entry[f"std{std:g}"],
                   dict(color=c, marker="o")) for std, c in zip(config.stds, colors)]
        series.append(("linear (observations, 0 elsewhere)", entry["linear"],
                       dict(color="0.3", marker="s", ls="--")))
        err_ax, rank_ax = axes[0, j], axes[1, j]
        for label, s, style in series:
            err = np.asarray(s["error_mean"])
            err_ax.plot(ms, err, label=label, **style)
            err_ax.fill_between(ms, s["error_min"], s["error_max"], color=style["color"],
                                alpha=0.15, lw=0)
            mean = np.asarray(s["als_rank_mean"])
            rank_ax.plot(ms, mean, label=label, **style)
            rank_ax.fill_between(ms, s["als_rank_min"], s["als_rank_max"],
                                 color=style["color"], alpha=0.15, lw=0)
        err_ax.set(yscale="log", xlabel="number of observed entries",
                   ylabel="relative reconstruction error",
                   title=f"order {config.order}, target rank {rank}: reconstruction error")
        rank_ax.axhline(rank, color="tab:red", ls=":", lw=1, label=f"target rank {rank}")
        rank_ax.axhline(cap, color="0.6", ls="-", lw=0.8)
        rank_ax.text(ms[0], cap, f" > {config.max_rank}: ALS cannot fit it", va="bottom",
                     fontsize=7, color="0.4")
        rank_ax.set(xlabel="number of observed entries", ylim=(0, cap + 1),
                    ylabel=f"tensor rank (CP-ALS to rel. error {config.rank_tol:g})",
                    title="estimated tensor rank of the solution")
        for ax in (err_ax, rank_ax):
            ax.grid(alpha=0.3, which="both")
        err_ax.legend(fontsize=7, loc="lower left")
    dims = "x".join(map(str, config.dims))
    fig.suptitle(f"CP tensor completion of a {dims} tensor by gradient flow (R = "
                 f"{config.num_components}): mean over {config.seeds} seeds, band = min-max",
                 fontsize=10)
    plotting.save(fig, path)

