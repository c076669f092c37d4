"""Figure 3 of Razin, Maman & Cohen (ICML 2021): incremental rank learning in CP.

Order-4 10x10x10x10 ground truth of tensor rank 5 (Gaussian factors, Frobenius norm
1), 2000 entries observed uniformly without repetition, R = 1000 components (the
maximal CP rank, `--components`' default), Gaussian init of decreasing std. As the
std shrinks, components are learned one after another and only ~5 leave zero: the
flow finds the low-rank solution.

Appendix B's variants are flags: `--loss huber --delta D` (Huber loss, §3.7) or
`--loss absolute` (l1), other `--order` / `--truth-rank`, and `--task sensing`: the
same number of measurements <A_i, W*> with Gaussian measurement tensors whose
entries are i.i.d. N(0, 1/D), D = dim^order (`gradflow.Sensing.gaussian`: each A_i
has expected squared norm 1, as the indicator of one observed entry does, so the loss
and the time scale stay those of completion). Sensing stores the m x D operators
(2000 x 10^4 in float64: 160 MB at the default size).
"""

import dataclasses
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
from ._config import (check, check_choice, check_int, check_number, check_numbers, check_rtol,
                      output, setting, write_summary)

NAME = "tf-incremental"
LOSSES = ("squared", "huber", "absolute")
TASKS = ("completion", "sensing")


@dataclasses.dataclass(frozen=True)
class Config:
    """`gradflow run tf-incremental`: the problem, the model and its inits (the paper's
    Figure 3 by default)."""

    stds: tuple[float, ...] = setting((0.05, 0.01, 0.005), "init standard deviations "
                                      "(the paper's)")
    order: int = setting(4, "tensor order N")
    dim: int = setting(10, "mode dimension: the tensor is dim x ... x dim")
    truth_rank: int = setting(5, "CP rank of the ground truth")
    observations: int = setting(2000, "observed entries (uniform, without repetition), or "
                                      "measurements with --task sensing")
    components: int | None = setting(
        None, "R, the number of CP components; default the maximal CP rank, the product of "
              "all dims but the largest (the papers': 1000 for 10^4)")
    loss_drop: float = setting(1e-4, "stop when loss <= this x initial loss")
    t1: float = setting(1e14, "final flow time")
    rtol: float = setting(1e-8, "relative tolerance of the solve")
    seed: int = setting(0, "seed of the data and the inits")
    x: str = setting("time", "x-axis of the plots", choices=("time", "loss"))
    loss: str = setting("squared", "per-entry loss: z^2/2, Huber (needs --delta) or |z|",
                        choices=LOSSES)
    delta: float | None = setting(None, "Huber's transition point delta_h (> 0; with "
                                        "--loss huber)")
    task: str = setting("completion", "observe entries (completion) or Gaussian linear "
                                      "measurements (sensing)", choices=TASKS)

    def __post_init__(self):
        check_numbers(self, "stds")
        check_int(self, "order", 2)
        check_int(self, "dim", 1)
        check_int(self, "truth_rank", 1)
        check_int(self, "observations", 1, self.dim**self.order if self.task == "completion"
                  else None)
        check_int(self, "components", 1, optional=True)
        check_number(self, "loss_drop", 0.0, 1.0)
        check_number(self, "t1")
        check_rtol(self)
        check_int(self, "seed", 0)
        check_choice(self, "x", ("time", "loss"))
        check_choice(self, "loss", LOSSES)
        check_choice(self, "task", TASKS)
        if self.loss == "huber":
            check(self.delta is not None, "delta", "set with `loss` 'huber' (Huber's "
                  "transition point, a finite number > 0)", self.delta)
            check_number(self, "delta")
        else:
            check(self.delta is None, "delta", f"unset: it is Huber's parameter and needs "
                  f"`loss` 'huber' (the loss is {self.loss!r})", self.delta)

    @property
    def dims(self) -> tuple[int, ...]:
        return (self.dim,) * self.order

    @property
    def num_components(self) -> int:
        """R: `components`, or by default the maximal CP rank of `dims`."""
        return CP.max_rank(self.dims) if self.components is None else self.components


def make_loss(config: Config):
    """The per-entry loss named by `loss` (and `delta`)."""
    if config.loss == "huber":
        if config.delta is None:  # (refused by Config)
            raise ValueError("`delta` must be set with `loss` 'huber'.")
        return HuberLoss(config.delta)
    return AbsoluteLoss() if config.loss == "absolute" else SquaredLoss()


def problem_data(config: Config):
    """(truth, objective, init key) of the experiment for `config`."""
    dims = config.dims
    k_truth, k_obs, k_init = jr.split(jr.key(config.seed), 3)
    truth = random_cp_tensor(k_truth, dims, config.truth_rank)
    loss = make_loss(config)
    if config.task == "sensing":
        objective = Sensing.gaussian(k_obs, truth, config.observations, loss)
    else:
        objective = Completion.from_tensor(
            truth, sample_indices(k_obs, dims, config.observations), loss)
    return truth, objective, k_init


def run(config: Config, out: Path | None = None, progress: bool = False) -> dict:
    """Solve every init of `config`; return the summary (and, given a folder `out`,
    write the trajectories, the figure and `summary.json` there)."""
    dims = config.dims
    truth, objective, k_init = problem_data(config)
    truth_norm = jnp.linalg.norm(truth)
    observers = {
        "component_norms": lambda t, m, o: m.component_norms(),
        "reconstruction_error": lambda t, m, o: jnp.linalg.norm(m.full() - truth) / truth_norm,
    }
    results, trajectories = {}, {}
    for std in config.stds:
        model = CP.gaussian(k_init, dims, config.num_components, std)
        loss_tol = config.loss_drop * float(objective(model))
        if progress:
            print(f"[{NAME}] std={std:g}: integrating until loss <= {loss_tol:.3g}", flush=True)
        save_times = np.concatenate([[0.0], np.geomspace(1e-2, config.t1, 1500)])
        tr = flow(model, objective, t1=config.t1, loss_tol=loss_tol, observers=observers,
                  save_times=save_times, rtol=config.rtol, progress=progress,
                  max_steps=200_000)
        if out is not None:
            tr.save(output(out) / f"trajectory_std{std:g}.npz")
        trajectories[std] = tr
        results[f"{std:g}"] = {
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
            print(f"[{NAME}] std={std:g}: {json.dumps(results[f'{std:g}'])}", flush=True)
    summary = {"experiment": NAME, "config": dataclasses.asdict(config),
               "components": config.num_components, "results": results}
    if out is not None:
        out = output(out)
        _figure(trajectories, config.x, out / f"{NAME}.png", _variant(config))
        write_summary(out, summary | {"config": summary["config"] | {"out": str(out)}})
    return summary


def _variant(args) -> str:
    names = {"squared": "squared loss", "absolute": "l1 loss"}
    loss = names[args.loss] if args.loss in names else f"Huber loss (delta {args.delta:g})"
    task = args.task
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


def sweep_tag(config: Config) -> dict:
    """What identifies this experiment's sweep in its folder: the settings, with R
    resolved (the default and `--components 1000` are the same problem at 10^4)."""
    return dataclasses.asdict(config) | {"components": config.num_components}


def sweep_setup(config: Config) -> dict:
    """This experiment's problem for `gradflow sweep`: CP init std = the sweep's scale
    (`stds` is not used)."""
    dims = config.dims
    truth, objective, _ = problem_data(config)
    truth_norm = jnp.linalg.norm(truth)

    def problem(params):
        model = CP.gaussian(jr.key(params["seed"]), dims, config.num_components,
                            params["scale"])
        return model, objective

    return dict(
        problem=problem,
        order=config.order,
        t1=config.t1,
        loss_drop=config.loss_drop,
        rtol=config.rtol,
        save_times=np.concatenate([[0.0], np.geomspace(1e-2, config.t1, 400)]),
        observers={
            "component_norms": lambda t, m, o: m.component_norms(),
            "reconstruction_error": lambda t, m, o: jnp.linalg.norm(m.full() - truth) / truth_norm,
        },
    )
