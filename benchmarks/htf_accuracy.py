"""Is the default solver's HTF flow the same flow? Against a tight explicit reference.

The `htf-incremental` problem (`htf.problem`: order 4, dim 8, HT-rank (5, 5) truth of
norm 64, 2048 entries) at small widths, solved to the loss stop 2.5e-5 by Dopri8 at
`--ref-rtol` (1e-12) and by gradflow's default solver (`gf.AutoStiff`, whose W steps
use the Gauss–Newton block of each node's largest local components) at `--rtols`
(1e-10, 1e-11), with Diffrax's Tsit5 at the same tolerances beside it as the control
(the flow amplifies what a solver does on the plateau as it leaves the saddle, so an
explicit solver at the same tolerance shows what "the same flow" can mean there).
All save at the same times — geometric over the plateau, dense over the
learning phase found by the reference — and the benchmark reports the largest
relative deviation, over the save times before both stops, of

- the local component norms above 1% of the largest one at that time,
- the relative reconstruction error, and the loss.

Escape times: the time at which the end tensor's norm first reaches `--escape` × the
truth's (a radius stop, located by root finding), by the reference and by the default
solver at the library's default rtol (1e-8) and at the experiment's (1e-6).

Targets (issue 15): deviations ≤ 1e-6 relative at rtol 1e-10, escape times ≤ 1e-4
relative at the default rtol.

    .venv/bin/python benchmarks/run.py htf-accuracy [--widths 32] [--stds 0.1 0.03]
"""

import argparse
import json
import time

import diffrax as dfx
import jax.numpy as jnp
import numpy as np

import _common
import gradflow as gf
from htf import LOSS_TOL, problem


def _observers(truth):
    norm = jnp.linalg.norm(truth)
    return {"component_norms": lambda t, m, o: m.component_norms(),
            "reconstruction_error": lambda t, m, o: jnp.linalg.norm(m.full() - truth) / norm,
            "loss": lambda t, m, o: o(m)}


def _relative_deviation(a, b, floor):
    """max |a - b| / max(|b|, floor) over finite entries."""
    a, b = np.asarray(a), np.asarray(b)
    ok = np.isfinite(a) & np.isfinite(b)
    return float(np.max(np.abs(a - b)[ok] / np.maximum(np.abs(b)[ok], floor)))


def _norms_deviation(a, b):
    """Per save time, over the components above 1% of that time's largest norm."""
    worst = 0.0
    for x, y in zip(np.asarray(a), np.asarray(b)):
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
            continue
        big = y > 1e-2 * y.max()
        worst = max(worst, float(np.max(np.abs(x[big] - y[big]) / y[big])))
    return worst


def run_one(width, std, *, rtols, ref_rtol, escape, seed):
    model, objective, truth = problem(width, std, seed)
    observers = _observers(truth)
    reference_solver = dfx.Dopri8()
    kw = dict(t1=1e14, loss_tol=LOSS_TOL, throw=False, max_steps=2_000_000)
    # 1. where the learning happens: the reference's stop time and escape time
    start = time.perf_counter()
    ref_stop = gf.flow(model, objective, rtol=ref_rtol, solver=reference_solver,
                       save_times=np.array([0.0, 1e14]), observers=[], **kw)
    radius = escape * float(jnp.linalg.norm(truth))
    ref_escape = gf.flow(model, objective, rtol=ref_rtol, solver=reference_solver,
                         save_times=np.array([0.0, 1e14]), observers=[], radius=radius, **kw)
    ref_wall = time.perf_counter() - start
    t_stop, t_escape = ref_stop.t_final, ref_escape.t_final
    saves = np.unique(np.concatenate([
        [0.0], np.geomspace(1e-2, t_escape, 200),
        np.linspace(t_escape, t_stop, 402)[1:-1]]))
    # 2. the reference and the competitors saved at those times
    ref = gf.flow(model, objective, rtol=ref_rtol, solver=reference_solver, save_times=saves,
                  observers=observers, **kw)
    row = dict(width=width, std=std, ref_rtol=ref_rtol, reference_steps=ref.stats["steps"],
               reference_wall_s=ref_wall, t_stop=t_stop, t_escape_reference=t_escape, solves=[])
    for name, solver in (("default", None), ("tsit5", dfx.Tsit5())):
        for tol in rtols:
            start = time.perf_counter()
            tr = gf.flow(model, objective, rtol=tol, solver=solver, save_times=saves,
                         observers=observers, **kw)
            wall = time.perf_counter() - start
            before = saves < min(ref.t_final, tr.t_final)
            # (a trajectory's rows are the save times, then its final state)
            pick = lambda tr, name: np.asarray(tr[name])[: len(saves)][before]
            row["solves"].append(dict(
                solver=name, rtol=tol, status=tr.status, steps=tr.stats["steps"], wall_s=wall,
                component_norms=_norms_deviation(pick(tr, "component_norms"),
                                                 pick(ref, "component_norms")),
                reconstruction_error=_relative_deviation(
                    pick(tr, "reconstruction_error"), pick(ref, "reconstruction_error"), 0.0),
                loss=_relative_deviation(pick(tr, "loss"), pick(ref, "loss"), 0.0),
                stop_time=abs(tr.t_final / ref.t_final - 1)))
    # 3. escape times at looser tolerances
    for loose in (1e-8, 1e-6):
        tr = gf.flow(model, objective, rtol=loose, save_times=np.array([0.0, 1e14]),
                     observers=[], radius=radius, **kw)
        row[f"escape_rtol_{loose:g}"] = abs(tr.t_final / t_escape - 1)
        row[f"escape_status_rtol_{loose:g}"] = tr.status
    return row


def add_arguments(parser):
    parser.add_argument("--widths", type=int, nargs="+", default=[32])
    parser.add_argument("--stds", type=float, nargs="+", default=[0.1, 0.03])
    parser.add_argument("--rtols", type=float, nargs="+", default=[1e-10, 1e-11])
    parser.add_argument("--ref-rtol", type=float, default=1e-12)
    parser.add_argument("--escape", type=float, default=0.01,
                        help="escape: the end tensor's norm reaches this x the truth's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="width 8, std 0.1")
    parser.add_argument("--out", default=None)


def markdown_table(rows) -> str:
    lines = ["| width | std | solver | rtol | steps (reference) | component norms | "
             "reconstruction error | loss | stop time |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for s in r["solves"]:
            lines.append(
                f"| {r['width']} | {r['std']:g} | {s['solver']} | {s['rtol']:g} | "
                f"{s['steps']:,} ({r['reference_steps']:,}) | {s['component_norms']:.1e} | "
                f"{s['reconstruction_error']:.1e} | {s['loss']:.1e} | {s['stop_time']:.1e} |")
    lines += ["", "| width | std | escape time (reference) | default, rtol 1e-8 | "
              "default, rtol 1e-6 |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['width']} | {r['std']:g} | {r['t_escape_reference']:.4g} | "
                     f"{r['escape_rtol_1e-08']:.1e} | {r['escape_rtol_1e-06']:.1e} |")
    return "\n".join(lines)


def main(args):
    if args.quick:
        args.widths, args.stds = [8], [0.1]
    rows = []
    for width in args.widths:
        for std in args.stds:
            row = run_one(width, std, rtols=args.rtols, ref_rtol=args.ref_rtol,
                          escape=args.escape, seed=args.seed)
            rows.append(row)
            print(json.dumps(row), flush=True)
            _common.write_results("htf_accuracy_partial", {"rows": rows}, quiet=True)
    table = markdown_table(rows)
    _common.write_results("htf_accuracy", dict(rows=rows, args=vars(args), table=table),
                          args.out)
    print("\n" + table)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    main(parser.parse_args())
