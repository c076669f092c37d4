"""`gradflow sweep EXPERIMENT`: an experiment's problem over init scales × seeds, and its plot.

An experiment takes part by defining `sweep_setup(config) -> dict` (`config` its
`Config`) with `problem` (`params -> (model, objective)`, reading
`params["scale"]` and `params["seed"]`), `order` (the N of the escape-time law
α^-(N-2): the degree of the end tensor in the weights — a CP's order, a deep matrix's
depth, an HTF's number of weight matrices), and any [`gradflow.sweep`][] settings
(`t1`, `loss_drop`, `rtol`, `save_times`, `observers` with `component_norms` and
optionally `reconstruction_error`). The sweep's folder is tagged with the `Config`'s
fields (or `sweep_tag(config)`, where the experiment defines it), so that a re-run
resumes only the same problem.
"""

import dataclasses
import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from . import plotting
from ._sweep import SweepResult, sweep
from .experiments._config import write_summary


def parse_scales(text: str) -> np.ndarray:
    """`"1e-1:1e-4:8"` (8 geometrically spaced values) or `"0.1,0.01"` (a list)."""
    try:
        if ":" in text:
            start, stop, num = text.split(":")
            start, stop, num = float(start), float(stop), int(num)
        else:
            values = np.array([float(v) for v in text.split(",")])
    except ValueError:
        raise ValueError(f"`--scales`: expected START:STOP:NUM or a comma list, got {text!r}.") from None
    if ":" in text:
        if not (start > 0 and stop > 0 and np.isfinite(start) and np.isfinite(stop)):
            raise ValueError(f"`--scales`: START and STOP must be positive and finite (a "
                             f"geometric grid), got {text!r}.")
        if num < 1:
            raise ValueError(f"`--scales`: NUM must be at least 1, got {text!r}.")
        values = np.geomspace(start, stop, num)
    if values.size < 1 or np.any(values <= 0) or not np.all(np.isfinite(values)):
        raise ValueError(f"`--scales` must be positive and finite, got {text!r}.")
    return values


def escape_times(result: SweepResult, fraction: float = 0.5) -> np.ndarray:
    """Per member: the time at which the largest component norm first reaches
    `fraction` of its final value.

    The member's saves are followed by its final state (at `t_final`), so a learning
    phase shorter than the save spacing is still caught; the crossing is interpolated
    linearly in (log time, norm) between the two samples around it. NaN for a member
    whose final norm is not positive and finite."""
    top = np.max(result.observations["component_norms"], axis=-1)  # (M, T), NaN after the end
    final = np.max(result.final["component_norms"], axis=-1)
    out = np.full(len(final), np.nan)
    for i, (norms, level, t_end) in enumerate(zip(top, final * fraction, result.t_final)):
        if not (np.isfinite(level) and level > 0 and np.isfinite(t_end)):
            continue
        keep = np.isfinite(norms) & (result.ts < t_end)
        ts = np.append(result.ts[keep], t_end)
        ys = np.append(norms[keep], final[i])
        k = int(np.argmax(ys >= level))  # the final sample always reaches the level
        if k == 0 or ts[k - 1] <= 0:
            out[i] = ts[k]
            continue
        w = (level - ys[k - 1]) / (ys[k] - ys[k - 1])
        out[i] = np.exp(np.log(ts[k - 1]) + w * (np.log(ts[k]) - np.log(ts[k - 1])))
    return out


def learned_components(result: SweepResult, threshold: float = 1e-2) -> np.ndarray:
    """Per member: how many final component norms exceed `threshold` times the largest."""
    norms = result.final["component_norms"]
    return np.sum(norms > threshold * norms.max(axis=-1, keepdims=True), axis=-1)


def power_law_fit(scales, times) -> tuple[float, float]:
    """Least-squares `(slope, prefactor)` of log(times) = log(prefactor) + slope·log(scales)."""
    ok = np.isfinite(times) & (times > 0)
    if ok.sum() < 2:
        return float("nan"), float("nan")
    slope, intercept = np.polyfit(np.log(scales[ok]), np.log(times[ok]), 1)
    return float(slope), float(np.exp(intercept))


def summarize(result: SweepResult, order: int) -> dict:
    """Per init scale (mean and std over seeds), and the escape-time fit against α^-(N-2)."""
    scales = result.params["scale"]
    escape = escape_times(result)
    learned = learned_components(result)
    error = result.final.get("reconstruction_error")
    rows = []
    for s in np.unique(scales)[::-1]:
        at = scales == s
        row = {"scale": float(s), "members": int(at.sum()), "ok": int(result.ok[at].sum()),
               "escape_time_mean": float(np.nanmean(escape[at])),
               "learned_components_mean": float(learned[at].mean()),
               "learned_components_std": float(learned[at].std())}
        if error is not None:
            row |= {"reconstruction_error_mean": float(error[at].mean()),
                    "reconstruction_error_std": float(error[at].std())}
        rows.append(row)
    slope, prefactor = power_law_fit(scales, escape)
    return {"per_scale": rows, "escape_time_slope": slope, "escape_time_prefactor": prefactor,
            "expected_slope": -(order - 2), "statuses": dict(zip(*np.unique(
                result.status, return_counts=True)))}


def figure(result: SweepResult, summary: dict, order: int, path) -> None:
    scales = result.params["scale"]
    rows = summary["per_scale"]
    s = np.array([r["scale"] for r in rows])
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].errorbar(s, [r["learned_components_mean"] for r in rows],
                     [r["learned_components_std"] for r in rows], marker="o", capsize=3)
    axes[0].set(title="components above 1% of the largest", ylabel="count")
    if "reconstruction_error_mean" in rows[0]:
        axes[1].errorbar(s, [r["reconstruction_error_mean"] for r in rows],
                         [r["reconstruction_error_std"] for r in rows], marker="o", capsize=3,
                         color="C3")
        axes[1].set(title="relative reconstruction error", yscale="log")
    else:
        axes[1].axis("off")
    escape = escape_times(result)
    axes[2].loglog(scales, escape, "o", color="C2", alpha=0.6, label="members")
    slope, pre = summary["escape_time_slope"], summary["escape_time_prefactor"]
    if np.isfinite(slope):
        grid = np.geomspace(s.min(), s.max(), 50)
        axes[2].loglog(grid, pre * grid**slope, "k-", label=f"fit: slope {slope:.2f}")
        ref = np.nanmedian(escape * scales ** (order - 2))
        axes[2].loglog(grid, ref * grid ** -(order - 2), "k:", label=f"α^-{order - 2} (N={order})")
    axes[2].set(title="escape time (top component at half its final norm)", ylabel="flow time")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("init scale α")
        ax.grid(alpha=0.3)
    fig.suptitle(f"sweep over init scale: {len(result)} members, "
                 f"{len(np.unique(result.params['seed']))} seeds per scale", fontsize=10)
    plotting.save(fig, path)


def run(module, config, out: Path, *, scales, seeds: int, chunk_size: int,
        progress: bool = True) -> dict:
    """The `gradflow sweep` command: solve, write chunks, the PNG and `summary.json`.

    `config` is the experiment's `Config`, `scales` the init scales (an array, or the
    `--scales` text, read by `parse_scales`), `seeds`
    the seeds per scale."""
    setup = module.sweep_setup(config)
    problem, order = setup.pop("problem"), setup.pop("order")
    scales = parse_scales(scales) if isinstance(scales, str) else np.asarray(scales, float)
    grid = {"scale": scales, "seed": np.arange(seeds)}
    settings = (module.sweep_tag(config) if hasattr(module, "sweep_tag")
                else dataclasses.asdict(config))
    tag = {"experiment": module.NAME} | {
        k: v for k, v in settings.items() if k not in ("scales", "seeds", "chunk_size")}
    result = sweep(problem, grid, out=out, chunk_size=chunk_size, order_by="scale",
                   tag=json.loads(json.dumps(tag, default=str)), progress=progress, **setup)
    summary = summarize(result, order)
    figure(result, summary, order, out / f"sweep-{module.NAME}.png")
    write_summary(out, summary)
    return summary
