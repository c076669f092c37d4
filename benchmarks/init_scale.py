"""Cost of reaching loss <= 1e-4 x initial on the main job's problem, across init scales.

Runs gradflow's default solver and Diffrax Tsit5 (raw time, capped) side by side and
prints steps, gradient evaluations and wall time, with the ratio to the largest std.

    .venv/bin/python benchmarks/init_scale.py [--stds 0.05 0.01 0.005 0.001] [--cap 30000]
"""

import argparse
import json
import time

import diffrax as dfx
import jax.random as jr

import gradflow as gf


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stds", type=float, nargs="+", default=[0.05, 0.01, 0.005, 0.001])
    p.add_argument("--cap", type=int, default=30_000, help="Tsit5 max steps")
    p.add_argument("--rtol", type=float, default=1e-7)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    dims = (10, 10, 10, 10)
    truth = gf.random_cp_tensor(jr.key(0), dims, 5)
    objective = gf.Completion.from_tensor(truth, gf.sample_indices(jr.key(1), dims, 2000))
    solvers = {"gradflow default": None, "Tsit5 (raw time)": dfx.Tsit5()}
    rows = []
    for name, solver in solvers.items():
        for std in args.stds:
            model = gf.CP.gaussian(jr.key(2), dims, 1000, std)
            cap = args.cap if solver is not None else 200_000
            start = time.perf_counter()
            tr = gf.flow(model, objective, t1=1e14, loss_tol=1e-4 * float(objective(model)),
                         solver=solver, rtol=args.rtol, max_steps=cap, throw=False,
                         save_times=[0.0, 1e14])
            wall = time.perf_counter() - start
            evals = tr.stats["gradient_evaluations"]
            if evals is None:  # Tsit5: 6 new stages per step (FSAL) + 1
                evals = 6 * tr.stats["steps"] + 1
            rows.append(dict(solver=name, std=std, status=tr.status, t_final=tr.t_final,
                             steps=tr.stats["steps"], evaluations=evals, wall_s=wall))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'solver':18} {'std':>7} {'status':>10} {'t_final':>9} {'steps':>7} "
          f"{'evals':>7} {'wall s':>7} {'x steps':>8} {'x wall':>7}")
    for name in solvers:
        mine = [r for r in rows if r["solver"] == name]
        base = mine[0]
        for r in mine:
            print(f"{name:18} {r['std']:7g} {r['status']:>10} {r['t_final']:9.3g} "
                  f"{r['steps']:7d} {r['evaluations']:7d} {r['wall_s']:7.1f} "
                  f"{r['steps'] / base['steps']:8.2f} {r['wall_s'] / base['wall_s']:7.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
