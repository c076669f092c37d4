"""Arora, Cohen, Hu & Luo (NeurIPS 2019): deep matrix factorization learns rank incrementally.

Completion of a 100x100 matrix of rank 5 (singular values 5:4:3:2:1, entries of RMS
1) from 2000 entries observed uniformly without repetition, by deep matrix
factorizations of depths 1-4 (hidden widths 100) under gradient flow from Gaussian
inits of decreasing scale. With depth >= 2 and a small init, singular values are
learned one after another, largest first, more sharply with depth and smaller init,
and the solution has low effective rank; depth 1 (no factorization) converges to
the minimum-norm fit of the observations, of high effective rank.

The init scale is the expected Frobenius norm of the end matrix: every layer entry
is N(0, std^2) with std = (scale^2 / (d_0 d_1 ... d_L))^(1/(2L)), so the scales are
comparable across depths (`--init orthogonal` / `uniform` draw the layers otherwise and
rescale them to that Frobenius norm exactly).

Beside the depths, the convex baseline Arora et al. compare with: the minimum
nuclear-norm matrix that fits the observations (`gradflow.analysis.convex`, ADMM in
JAX), with its error and effective rank (`--no-nuclear-norm` skips it).
"""

import dataclasses
import time
from pathlib import Path

import jax.numpy as jnp
import jax.random as jr
import matplotlib.pyplot as plt
import numpy as np

from .. import plotting
from ..analysis import convex
from ..analysis import matrix as am
from ..data import sample_indices
from .._flow import flow
from ..models.matrix import DeepMatrix
from ..objectives import Completion
from ._config import (check, check_choice, check_int, check_ints, check_number, check_numbers,
                      check_rtol, output, setting, write_summary)

NAME = "mf-incremental"
INITS = ("gaussian", "orthogonal", "uniform")


@dataclasses.dataclass(frozen=True)
class Config:
    """`gradflow run mf-incremental`: the problem, the depths and the init scales (Arora
    et al.'s completion by default)."""

    depths: tuple[int, ...] = setting((1, 2, 3, 4), "depths of the factorizations (1: the "
                                      "matrix itself)")
    scales: tuple[float, ...] = setting((1e-1, 1e-2, 1e-3), "expected Frobenius norm of the "
                                        "end matrix at init")
    dim: int = setting(100, "the matrix is dim x dim")
    truth_rank: int = setting(5, "rank of the ground truth")
    observations: int = setting(2000, "observed entries (uniform, without repetition)")
    loss_drop: float = setting(1e-6, "stop when loss <= this x initial loss")
    t1: float = setting(1e12, "final flow time")
    rtol: float = setting(1e-8, "relative tolerance of the solve")
    seed: int = setting(0, "seed of the data and the inits")
    init: str = setting("gaussian", "layer init: i.i.d. Gaussian (scaled in expectation), or "
                        "orthogonal / uniform layers rescaled so that the end matrix has "
                        "Frobenius norm --scales exactly", choices=INITS)
    nuclear_norm: bool = setting(True, "also solve the minimum nuclear-norm completion (the "
                                       "convex baseline)")

    def __post_init__(self):
        check_ints(self, "depths", 1, distinct=True)
        check_numbers(self, "scales", distinct=True)
        check_int(self, "dim", 1)
        check_int(self, "truth_rank", 1, self.dim)
        check_int(self, "observations", 1, self.dim**2)
        check_number(self, "loss_drop", 0.0, 1.0)
        check_number(self, "t1")
        check_rtol(self)
        check_int(self, "seed", 0)
        check_choice(self, "init", INITS)
        check(isinstance(self.nuclear_norm, bool), "nuclear_norm", "True or False",
              self.nuclear_norm)


def initial_model(key, dims, scale: float, init: str = "gaussian") -> DeepMatrix:
    """The init of depth `len(dims) - 1` at `scale` (see the module docstring)."""
    if init == "gaussian":
        return DeepMatrix.gaussian(key, dims, layer_std(scale, dims))
    # Frobenius norm `scale` exactly: end_scale = ||W||_F / sqrt(n)
    end_scale = scale / np.sqrt(min(dims[0], dims[-1]))
    if init == "orthogonal":
        return DeepMatrix.orthogonal(key, dims, end_scale=end_scale)
    return DeepMatrix.uniform(key, dims, 1.0, end_scale=end_scale)


def ground_truth(key, dim: int, rank: int):
    """A dim×dim matrix with singular values ∝ rank, rank-1, ..., 1 and entries of RMS 1."""
    k_u, k_v = jr.split(key)
    u = jnp.linalg.qr(jr.normal(k_u, (dim, rank)))[0]
    v = jnp.linalg.qr(jr.normal(k_v, (dim, rank)))[0]
    sigma = jnp.arange(rank, 0, -1.0)
    return (u * (sigma * dim / jnp.linalg.norm(sigma))[None, :]) @ v.T


def layer_std(scale: float, dims) -> float:
    """Entry std giving $\\mathbb E\\|W_L\\cdots W_1\\|_F^2=$ `scale`² for i.i.d. Gaussian layers."""
    return float((scale**2 / np.prod(np.asarray(dims, float))) ** (1 / (2 * (len(dims) - 1))))


def run(config: Config, out: Path | None = None, progress: bool = False) -> dict:
    """Solve every (scale, depth) of `config`, and the convex baseline; return the
    summary (and, given a folder `out`, write the trajectories, the figure and
    `summary.json` there)."""
    k_truth, k_obs, k_init = jr.split(jr.key(config.seed), 3)
    shape = (config.dim, config.dim)
    truth = ground_truth(k_truth, config.dim, config.truth_rank)
    objective = Completion.from_tensor(truth, sample_indices(k_obs, shape, config.observations))
    truth_norm = jnp.linalg.norm(truth)
    observers = {
        "component_norms": lambda t, m, o: m.component_norms(),
        "effective_rank": lambda t, m, o: am.effective_rank(m.full()),
        "reconstruction_error": lambda t, m, o: jnp.linalg.norm(m.full() - truth) / truth_norm,
    }
    save_times = np.concatenate([[0.0], np.geomspace(1e-1, config.t1, 1500)])
    results, trajectories = {}, {}
    for scale in config.scales:
        for depth in config.depths:
            dims = (config.dim,) * (depth + 1)
            model = initial_model(k_init, dims, scale, config.init)
            loss_tol = config.loss_drop * float(objective(model))
            tr = flow(model, objective, t1=config.t1, loss_tol=loss_tol, observers=observers,
                      save_times=save_times, rtol=config.rtol, max_steps=200_000)
            if out is not None:
                tr.save(output(out) / f"trajectory_depth{depth}_scale{scale:g}.npz")
            trajectories[scale, depth] = tr
            sv = np.asarray(tr.final["component_norms"])
            results[f"depth{depth}_scale{scale:g}"] = {
                "depth": depth,
                "scale": scale,
                "status": tr.status,
                "t_final": tr.t_final,
                "final_loss": float(tr.final["loss"]),
                "relative_reconstruction_error": float(tr.final["reconstruction_error"]),
                "effective_rank": float(tr.final["effective_rank"]),
                "top_singular_values": sv[: config.truth_rank + 2].tolist(),
                "learning_order": learning_order(tr, config.truth_rank),
                "steps": tr.stats["steps"],
                "wall_time_s": round(tr.stats["wall_time"], 2),
            }
            if progress:
                r = results[f"depth{depth}_scale{scale:g}"]
                print(f"[{NAME}] depth {depth}, scale {scale:g}: error "
                      f"{r['relative_reconstruction_error']:.3g}, erank "
                      f"{r['effective_rank']:.3g}, {r['steps']} steps, "
                      f"{r['wall_time_s']} s", flush=True)
    truth_sv = np.asarray(jnp.linalg.svd(truth, compute_uv=False)[: config.truth_rank])
    baseline = None
    if config.nuclear_norm:
        baseline = nuclear_norm_baseline(objective, truth)
        if progress:
            print(f"[{NAME}] minimum nuclear norm: error "
                  f"{baseline['relative_reconstruction_error']:.3g}, erank "
                  f"{baseline['effective_rank']:.3g} ({baseline['iterations']} ADMM iterations, "
                  f"{baseline['wall_time_s']} s)", flush=True)
    summary = {"experiment": NAME, "config": dataclasses.asdict(config),
               "truth_singular_values": truth_sv.tolist(), "results": results,
               "min_nuclear_norm": baseline}
    if out is not None:
        out = output(out)
        _figure(trajectories, config, truth_sv, out / f"{NAME}.png", baseline)
        write_summary(out, summary | {"config": summary["config"] | {"out": str(out)}})
    return summary


def sweep_setup(config: Config) -> dict:
    """This experiment's problem for `gradflow sweep`: the deepest of `depths` (at
    least 3), every layer entry N(0, scale²) with scale = the sweep's scale (the
    per-weight scale α, so that the escape time grows like α^-(L-2) for depth L; the
    experiment's own `scales`, end-matrix norms, are replaced by the sweep's)."""
    depth = max(config.depths)
    check(depth >= 3, "depths", "ints of which one is >= 3 for a sweep (the escape time "
          "of depth 2 grows like log(1/scale))", config.depths)
    k_truth, k_obs, _ = jr.split(jr.key(config.seed), 3)
    shape = (config.dim, config.dim)
    truth = ground_truth(k_truth, config.dim, config.truth_rank)
    objective = Completion.from_tensor(truth, sample_indices(k_obs, shape, config.observations))
    truth_norm = jnp.linalg.norm(truth)
    dims = (config.dim,) * (depth + 1)

    def problem(params):
        return DeepMatrix.gaussian(jr.key(params["seed"]), dims, params["scale"]), objective

    return dict(
        problem=problem,
        order=depth,
        t1=config.t1,
        loss_drop=config.loss_drop,
        rtol=config.rtol,
        save_times=np.concatenate([[0.0], np.geomspace(1e-1, config.t1, 400)]),
        observers={
            "component_norms": lambda t, m, o: m.component_norms(),
            "reconstruction_error": lambda t, m, o: jnp.linalg.norm(m.full() - truth) / truth_norm,
        },
    )


def nuclear_norm_baseline(objective, truth) -> dict:
    """Error, effective rank and optimality certificate of the minimum nuclear-norm fit."""
    start = time.perf_counter()
    solution = convex.min_nuclear_norm(objective)
    x = solution.matrix
    sv = np.asarray(jnp.linalg.svd(x, compute_uv=False))
    return {
        "relative_reconstruction_error": float(jnp.linalg.norm(x - truth) / jnp.linalg.norm(truth)),
        "effective_rank": float(am.effective_rank(x)),
        "rank": int(np.sum(sv > 1e-6 * sv[0])) if sv[0] > 0 else 0,
        "top_singular_values": sv[:8].tolist(),
        "nuclear_norm": solution.nuclear_norm,
        "duality_gap": solution.nuclear_norm - solution.lower_bound,
        "max_relative_misfit": solution.feasibility,
        "iterations": solution.iterations,
        "converged": solution.converged,
        "wall_time_s": round(time.perf_counter() - start, 2),
    }


def learning_order(tr, k: int) -> list[float]:
    """Times at which the k largest singular values first reach half their final value."""
    sv = np.asarray(tr["component_norms"])[:, :k]
    reached = sv >= 0.5 * sv[-1]
    return [float(tr.ts[np.argmax(reached[:, r])]) for r in range(sv.shape[1])]


def _figure(trajectories, config, truth_sv, path, baseline=None):
    scales, depths = config.scales, config.depths
    columns = max(len(depths), 2)  # the bottom row has two summary panels
    fig, axes = plt.subplots(len(scales) + 1, columns,
                             figsize=(3.6 * columns, 2.9 * (len(scales) + 1)), squeeze=False)
    for i, scale in enumerate(scales):
        for j, depth in enumerate(depths):
            ax = axes[i, j]
            plotting.top_component_curves(ax, trajectories[scale, depth], 10,
                                          title=f"depth {depth}, init scale {scale:g}")
            for s in truth_sv:
                ax.axhline(s, color="0.6", ls=":", lw=0.8)
            ax.set_xscale("log")
            ax.set_xlim(left=1e-1)
            ax.set_ylabel("singular value" if j == 0 else "")
        for ax in axes[i, len(depths):]:
            ax.axis("off")
    for scale in scales:
        erank = [trajectories[scale, d].final["effective_rank"] for d in depths]
        error = [trajectories[scale, d].final["reconstruction_error"] for d in depths]
        axes[-1, 0].plot(depths, erank, "o-", label=f"scale {scale:g}")
        axes[-1, 1].plot(depths, error, "o-", label=f"scale {scale:g}")
    axes[-1, 0].axhline(len(truth_sv), color="0.6", ls=":")
    if baseline is not None:
        for ax, key in zip(axes[-1, :2], ("effective_rank", "relative_reconstruction_error")):
            ax.axhline(baseline[key], color="tab:red", ls="--", lw=1.2,
                       label="min nuclear norm")
    axes[-1, 0].set(title="effective rank of the solution", xlabel="depth", yscale="log")
    axes[-1, 1].set(title="relative reconstruction error", xlabel="depth", yscale="log")
    for ax in axes[-1, :2]:
        ax.set_xticks(depths)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[-1, 2:]:
        ax.axis("off")
    fig.suptitle(f"{config.dim}x{config.dim} rank-{config.truth_rank} completion from "
                 f"{config.observations} entries: top-10 singular values over flow time "
                 "(dotted: ground truth)", fontsize=10)
    plotting.save(fig, path)
