"""Is the default solver ever the slow choice? It against Tsit5 and the previous default.

On every experiment's problem whose solves use the default solver, at every init scale
the experiment runs, the default (`gf.AutoStiff`: Tsit5 steps until stiffness limits the
step, then Rosenbrock-W with the model's stiffness approximation) is timed side by side
with Diffrax's Tsit5 and with the previous default (`gf.RosenbrockW()` with the
Gauss–Newton block for CP; Tsit5 for the other models), in one process, each compiled
by a short warm-up solve first. Every timed solve follows a warm-up that compiles the
same program (compile time excluded). A competitor that has not finished when it has
used `--patience` times the default's wall time is stopped there (it is slower), and
counted as such. The target: the default's wall time <= 1.25x the better of the others.

Problems (keys as in the experiments):

- `tf-incremental`: the main job (CP, 10^4, R = 1000, 2000 entries), std 0.05/0.01/0.005;
- `cp-6x6x6x6`: the papers' code comparison (CP, 6^4, R = 216, 500 entries), std 0.05/0.005;
- `mf-incremental`: 100x100 rank-5 completion from 2000 entries, depths 2-4 (depth 1 is
  linear), scales 1e-1/1e-2/1e-3;
- `htf-incremental`: the HTF problem at the paper's widths 512, stds of `--htf-stds`;
- `compare-factorizations`: its three models at the paper's settings (rtol 1e-6).

    .venv/bin/python benchmarks/run.py default-solver [--only NAME ...] [--quick]
"""

import argparse
import json
import time

import diffrax as dfx
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import _common
import gradflow as gf


def _cp(dims, components, observations, truth_rank, std, seed=0):
    k_truth, k_obs, k_init = jr.split(jr.key(seed), 3)
    truth = gf.random_cp_tensor(k_truth, dims, truth_rank)
    objective = gf.Completion.from_tensor(truth, gf.sample_indices(k_obs, dims, observations))
    return gf.CP.gaussian(k_init, dims, components, std), objective


def _mf(depth, scale, dim=100, rank=5, observations=2000, seed=0):
    k_truth, k_obs, k_init = jr.split(jr.key(seed), 3)
    k_u, k_v = jr.split(k_truth)
    u = jnp.linalg.qr(jr.normal(k_u, (dim, rank)))[0]
    v = jnp.linalg.qr(jr.normal(k_v, (dim, rank)))[0]
    sigma = jnp.arange(rank, 0, -1.0)
    truth = (u * (sigma * dim / jnp.linalg.norm(sigma))) @ v.T
    objective = gf.Completion.from_tensor(truth, gf.sample_indices(k_obs, (dim, dim),
                                                                   observations))
    dims = (dim,) * (depth + 1)
    std = float((scale**2 / np.prod(np.asarray(dims, float))) ** (1 / (2 * depth)))
    return gf.DeepMatrix.gaussian(k_init, dims, std), objective


def _htf(width, std, seed=0, dim=8, order=4, observations=2048):
    dims, tree = (dim,) * order, gf.ModeTree.binary(order)
    k_truth, k_obs = jr.split(jr.key(seed))
    truth = gf.random_htf_tensor(k_truth, dims, tree, (5,) * (order // 2), 64.0)
    objective = gf.Completion.from_tensor(truth, gf.sample_indices(k_obs, dims, observations))
    model = gf.HTF.gaussian(jr.fold_in(jr.key(seed), 1), dims, tree,
                            tree.layer_widths((width,) * (order // 2)), std)
    return model, objective


def problems(args) -> list[dict]:
    """(name, scale, model, objective, stop, rtol) of every benchmarked solve."""
    out = []
    for std in (0.05, 0.01, 0.005):
        model, objective = _cp((10,) * 4, 1000, 2000, 5, std)
        out.append(dict(problem="tf-incremental", scale=std, model=model, objective=objective,
                        stop=dict(loss_drop=1e-4), rtol=1e-8))
    for std in (0.05, 0.005):
        model, objective = _cp((6,) * 4, 216, 500, 5, std)
        out.append(dict(problem="cp-6x6x6x6", scale=std, model=model, objective=objective,
                        stop=dict(loss_drop=1e-4), rtol=1e-8))
    for scale in (1e-1, 1e-2, 1e-3):
        for depth in (2, 3, 4):
            model, objective = _mf(depth, scale)
            out.append(dict(problem=f"mf-incremental depth {depth}", scale=scale, model=model,
                            objective=objective, stop=dict(loss_drop=1e-4), rtol=1e-8))
    for std in args.htf_stds:
        model, objective = _htf(512, std)
        out.append(dict(problem="htf-incremental", scale=std, model=model, objective=objective,
                        stop=dict(loss_tol=2.5e-5), rtol=args.htf_rtol))
    model, objective = _mf(3, 1e-3, dim=64, observations=2048)
    out.append(dict(problem="compare-factorizations MF", scale=1e-3, model=model,
                    objective=objective, stop=dict(loss_tol=2.5e-5 / 64), rtol=1e-6))
    model, objective = _cp((8,) * 4, 512, 2048, 5, 0.01)
    out.append(dict(problem="compare-factorizations CP", scale=0.01, model=model,
                    objective=objective, stop=dict(loss_drop=1e-4), rtol=1e-6))
    model, objective = _htf(512, 0.01)
    out.append(dict(problem="compare-factorizations HTF", scale=0.01, model=model,
                    objective=objective, stop=dict(loss_tol=2.5e-5), rtol=1e-6))
    if args.only:
        out = [p for p in out if any(p["problem"].startswith(o) for o in args.only)]
    if args.quick:
        out = [p for p in out if p["problem"] in ("cp-6x6x6x6", "mf-incremental depth 3")]
    return out


def competitors(model) -> dict:
    old = gf.RosenbrockW() if isinstance(model, gf.CP) else dfx.Tsit5()
    out = {"default": None, "tsit5": dfx.Tsit5()}
    if isinstance(model, gf.CP):
        out["previous default"] = old
    return out


def solve(p, solver, max_steps):
    """One timed solve, after a warm-up that compiles the same program (`max_steps` and
    the stops are static; `t1` and the save times are not, so a solve to t = 1e-3
    compiles it in no time); a solve shorter than a second is timed three times and
    the fastest kept (single timings of 0.2 s solves varied 2x on the shared machine)."""
    kw = dict(rtol=p["rtol"], solver=solver, throw=False, observers=[], max_steps=max_steps,
              **p["stop"])
    gf.flow(p["model"], p["objective"], t1=1e-3, save_times=np.array([0.0, 1e-3]), **kw)
    walls = []
    while not walls or (sum(walls) < 3.0 and len(walls) < 3):  # short solves: min of 3
        start = time.perf_counter()
        tr = gf.flow(p["model"], p["objective"], t1=1e16, save_times=np.array([0.0, 1.0]), **kw)
        walls.append(time.perf_counter() - start)
    return tr, min(walls)


def run_problem(p, patience: float) -> dict:
    rows = {}
    default_wall = None
    for name, solver in competitors(p["model"]).items():
        max_steps = 400_000
        if default_wall is not None:  # stop a competitor once it is `patience` x slower
            tr_probe, wall_probe = solve(p, solver, 200)
            per_step = wall_probe / max(tr_probe.stats["steps"], 1)
            max_steps = max(200, int(patience * default_wall / per_step))
        tr, wall = solve(p, solver, max_steps)
        rows[name] = dict(status=tr.status, steps=tr.stats["steps"],
                          rejected=tr.stats["rejected_steps"], wall_s=wall,
                          t_final=tr.t_final, final_loss=float(tr.final["loss"]),
                          explicit_steps=tr.stats.get("explicit_steps"),
                          stiff_steps=tr.stats.get("stiff_steps"),
                          finished=tr.status in ("loss", "radius", "t1"))
        if name == "default":
            default_wall = wall
    others = [r["wall_s"] for n, r in rows.items() if n != "default"]
    best = min(others)
    unfinished = all(not r["finished"] for n, r in rows.items() if n != "default")
    ratio = rows["default"]["wall_s"] / best
    return dict(problem=p["problem"], scale=p["scale"], rtol=p["rtol"], rows=rows,
                ratio=ratio, others_unfinished=unfinished,
                met=bool(ratio <= 1.25 or unfinished))


def add_arguments(parser):
    parser.add_argument("--only", nargs="+", default=None, help="problem names (prefixes)")
    parser.add_argument("--htf-stds", type=float, nargs="+", default=[0.03, 0.01, 0.003])
    parser.add_argument("--htf-rtol", type=float, default=1e-6)
    parser.add_argument("--patience", type=float, default=3.0,
                        help="stop a competitor at this many times the default's wall time")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)


def main(args):
    results = []
    for p in problems(args):
        result = run_problem(p, args.patience)
        results.append(result)
        print(json.dumps(result, default=float), flush=True)
        _common.write_results("default_solver_partial", {"results": results}, quiet=True)
    table = markdown_table(results)
    _common.write_results("default_solver", {"results": results, "args": vars(args),
                                             "table": table}, args.out)
    print("\n" + table)


def markdown_table(results) -> str:
    """One row per problem and scale: wall time and steps of each solver, the ratio."""
    lines = ["| problem | scale | default (explicit / W steps) | Tsit5 | previous default | "
             "default / best | target |", "|---|---|---|---|---|---|---|"]
    cell = lambda row: (f"{row['wall_s']:.2f} s, {row['steps']:,} steps"
                        + ("" if row["finished"] else f" [{row['status']}]"))
    for r in results:
        d = r["rows"]["default"]
        prev = r["rows"].get("previous default")
        lines.append(
            f"| {r['problem']} | {r['scale']:g} | {cell(d)} ({d['explicit_steps']} / "
            f"{d['stiff_steps']}) | {cell(r['rows']['tsit5'])} | "
            f"{cell(prev) if prev else '= Tsit5'} | {r['ratio']:.2f} | "
            f"{'met' if r['met'] else 'MISSED'} |")
    met = sum(r["met"] for r in results)
    lines += ["", f"{met} of {len(results)} met (default ≤ 1.25 × the better of the others)."]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    main(parser.parse_args())
