"""Sweep of 16 members: compiled sweep vs a Python loop compiled once vs a loop that
recompiles per member, and chunks ordered by init scale vs mixed (issue 6).

    .venv/bin/python benchmarks/run.py sweep [--members 16] [--chunk-size 4] [--quick]

The problem: order-3 CP completion (4x4x4, rank-2 truth, 40 observations, R = 8), init
scales 0.3 ... 0.03 (geometric) x 2 seeds, stop at loss <= 1e-3 x initial, gradflow's
default solver. A chunk's members step in lockstep until the last one stops, so a
chunk costs (its size) x (its largest step count): the "lockstep steps" column, against
the members' own steps. Ordering members by scale (`order_by="scale"`) puts members of
similar cost together; "mixed" chunks each span the whole range of scales.
"""

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gradflow as gf
from _common import table, write_results

DIMS = (4, 4, 4)
TRUTH = gf.random_cp_tensor(jr.key(0), DIMS, 2)
OBJECTIVE = gf.Completion.from_tensor(TRUTH, gf.sample_indices(jr.key(1), DIMS, 40))
SAVES = np.concatenate([[0.0], np.geomspace(1e-2, 1e9, 60)])
SETTINGS = dict(t1=1e9, save_times=SAVES, observers=["component_norms"], progress=False)


def problem(params):
    return gf.CP.gaussian(jr.key(params["seed"]), DIMS, 8, params["scale"]), OBJECTIVE


def one(scale, seed):
    model, objective = problem({"scale": jnp.asarray(scale), "seed": jnp.asarray(seed)})
    settings = {k: v for k, v in SETTINGS.items() if k != "progress"}
    return gf.flow(model, objective, loss_tol=1e-3 * float(objective(model)), **settings)


def lockstep_steps(result: gf.SweepResult, order, chunk_size: int) -> int:
    """What a chunked vmapped solve pays: each chunk runs until its slowest member."""
    steps = np.asarray(result.steps)[order]
    return int(sum(chunk_size * steps[i:i + chunk_size].max()
                   for i in range(0, len(steps), chunk_size)))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--members", type=int, default=16, help="an even number (2 seeds)")
    p.add_argument("--chunk-size", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="8 members")
    p.add_argument("--out", default=None, help="JSON path (default results/sweep.json)")


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main(args):
    members = 8 if args.quick else args.members
    scales = np.geomspace(0.3, 0.03, members // 2)
    by_scale = {"scale": scales, "seed": np.arange(2)}  # grid order: scale-major
    mixed = {"seed": np.arange(2), "scale": scales}  # grid order: every chunk spans all scales
    chunk = args.chunk_size
    rows = []

    def row(name, seconds, result=None, order=None):
        r = {"method": name, "seconds": seconds, "members_per_s": members / seconds}
        if result is not None:
            r["member_steps"] = int(np.sum(result.steps))
            r["lockstep_steps"] = lockstep_steps(result, order, chunk)
        rows.append(r)

    sweep = lambda grid, **kw: gf.sweep(problem, grid, loss_drop=1e-3, chunk_size=chunk,
                                        **kw, **SETTINGS)
    sorted_order = np.arange(members)  # scale-major grid order is already by scale
    result, s = timed(lambda: sweep(by_scale, order_by="scale"))
    row("compiled sweep, first call (compiles)", s)
    result, s = timed(lambda: sweep(by_scale, order_by="scale"))
    row("compiled sweep, chunks ordered by scale", s, result, sorted_order)
    mixed_result, s = timed(lambda: sweep(mixed))
    row("compiled sweep, chunks mixing scales", s, mixed_result, np.arange(members))

    pairs = [(s_, k) for s_ in scales for k in range(2)]
    _, s = timed(lambda: [one(s_, k) for s_, k in pairs])  # gf.flow compiles once
    row("Python loop of gf.flow (compiled once)", s)

    def recompiling():
        for s_, k in pairs:
            jax.clear_caches()  # what a loop that builds a new closure per member pays
            one(s_, k)

    _, s = timed(recompiling)
    row("Python loop, recompiling per member", s)

    base = rows[1]["seconds"]
    for r in rows:
        r["x_sorted_sweep"] = r["seconds"] / base
    print(f"\n{members} members, chunk size {chunk}, {jax.device_count()} device(s); steps per "
          f"member from {int(result.steps.min())} to {int(result.steps.max())}\n")
    text = table(rows, ["method", "seconds", "members_per_s", "x_sorted_sweep", "member_steps",
                        "lockstep_steps"],
                 {"seconds": ".2f", "members_per_s": ".2f", "x_sorted_sweep": ".2f"})
    write_results("sweep", {"config": vars(args) | {"members": members},
                            "steps": np.asarray(result.steps).tolist(),
                            "scales": scales.tolist(), "rows": rows, "table": text},
                  args.out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    main(parser.parse_args())
