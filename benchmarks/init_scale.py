"""Benchmark 1: cost of reaching loss <= 1e-4 x initial on problem P across init scales.

Side by side in one process, interleaved per init std: gradflow's default solver
(`gf.RosenbrockW()`), Diffrax Tsit5 in raw time (capped: where it gives up is
reported), and constant-step gradient descent (`gf.descent` with a learning rate,
the update of `optax.sgd(lr)`) at the largest learning rate that is stable on P.
Cost is steps, gradient evaluations, *gradient-evaluation equivalents* (gradients +
Hessian rebuilds + stop-event losses, each rebuild and loss priced in gradients as
measured in this process, see `_common.py`) and wall time (compile excluded: every
configuration is compiled by a short warm-up solve first).

    .venv/bin/python benchmarks/init_scale.py            # ~10 min on 2 busy cores
    .venv/bin/python benchmarks/init_scale.py --quick    # smoke run (~1 min)

Writes `benchmarks/results/init_scale.json`.
"""

import argparse
import time

import diffrax as dfx
import jax
import numpy as np

import gradflow as gf

try:
    from . import _common as C
except ImportError:
    import _common as C


def add_arguments(p):
    p.add_argument("--stds", type=float, nargs="+", default=[0.05, 0.01, 0.005, 0.001])
    p.add_argument("--rtol", type=float, default=1e-7, help="flow rtol (gradflow, Tsit5)")
    p.add_argument("--tsit5-cap", type=int, default=4000, help="Tsit5 max steps")
    p.add_argument("--lr", type=float, default=8000.0,
                   help="GD learning rate (P's stability limit 2/lambda_max is ~9.5e3)")
    p.add_argument("--gd-cap", type=int, default=50_000, help="GD max steps")
    p.add_argument("--repeats", type=int, default=1,
                   help="interleaved repeats of every solve (min wall time is kept)")
    p.add_argument("--proposed", action="store_true",
                   help="also run RosenbrockW with the analytic restricted Hessian")
    p.add_argument("--quick", action="store_true", help="smoke sizes")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/)")


def main(args=None):
    if args is None:
        p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        add_arguments(p)
        args = p.parse_args()
    if args.quick:
        args.stds, args.tsit5_cap, args.gd_cap = [0.05, 0.01], 500, 3000
    model0, objective = C.problem(args.stds[0])
    stiff = {"autodiff": gf.LargestComponents(8), "analytic": C.AnalyticLargestComponents(8)}
    print("analytic vs autodiff restricted Hessian, max rel. difference:",
          f"{C.check_analytic_hessian(model0, objective):.1e}")
    costs = C.unit_costs(model0, objective, stiff)
    print("unit costs (in gradient evaluations):",
          {k: round(v, 2) if k != "gradient_s" else f"{v * 1e3:.2f} ms"
           for k, v in costs.items()})

    methods = {
        "gradflow default (RosenbrockW)": ("flow", gf.RosenbrockW(), "autodiff"),
        "Tsit5 (raw time)": ("flow", dfx.Tsit5(), None),
        f"GD lr={args.lr:g}": ("gd", args.lr, None),
    }
    if args.proposed:
        methods["RosenbrockW + analytic Hessian"] = (
            "flow", gf.RosenbrockW(C.AnalyticLargestComponents(8)), "analytic")

    def run(kind, solver, std, warmup=False):
        model, _ = C.problem(std)
        loss_tol = C.LOSS_DROP * float(objective(model))
        if kind == "flow":
            cap = args.tsit5_cap if isinstance(solver, dfx.Tsit5) else 200_000
            return gf.flow(model, objective, t1=1e-6 if warmup else 1e14, loss_tol=loss_tol,
                           solver=solver, rtol=args.rtol, max_steps=cap, throw=False,
                           save_times=[0.0, 1e-6 if warmup else 1e14])
        return gf.descent(model, objective, solver, steps=args.gd_cap, loss_tol=loss_tol,
                          t1=1e-6 if warmup else None, throw=False, save_steps=[0])

    for kind, solver, _ in methods.values():  # compile every configuration once
        run(kind, solver, args.stds[0], warmup=True)

    results = {}
    for rep in range(args.repeats):
        for std in args.stds:
            for name, (kind, solver, stiff_name) in methods.items():
                tr = run(kind, solver, std)
                key = (name, std)
                wall = tr.stats["wall_time"]
                if key in results and results[key]["wall_s"] <= wall:
                    continue
                row = dict(method=name, std=std, status=tr.status, t_final=tr.t_final,
                           steps=tr.stats["steps"], wall_s=wall)
                if kind == "flow":
                    row |= C.flow_equivalents(tr, solver, costs, stiff_name)
                    if stiff_name == "autodiff":  # same steps, the analytic rebuild's price
                        row["equivalents_if_analytic"] = (
                            row["equivalents"]
                            + row["rebuilds"] * (costs["rebuild[analytic]"] - row["rebuild_cost"]))
                else:
                    row |= dict(gradients=tr.stats["gradient_evaluations"], rebuilds=0,
                                equivalents=float(tr.stats["gradient_evaluations"]))
                results[key] = row
                print(f"[rep {rep}] {name:32} std={std:<6g} {row['status']:>9} "
                      f"t={row['t_final']:.3g} steps={row['steps']} "
                      f"equiv={row['equivalents']:.0f} wall={wall:.1f}s", flush=True)

    rows = list(results.values())
    # where a solve gave up, say how far it got and what it would have needed
    t_need = {r["std"]: r["t_final"] for r in rows
              if r["method"].startswith("gradflow") and r["status"] == "loss"}
    for r in rows:
        base = results[(r["method"], args.stds[0])]
        r["x_equivalents"] = r["equivalents"] / base["equivalents"]
        r["x_wall"] = r["wall_s"] / base["wall_s"]
        if r["status"] != "loss" and r["std"] in t_need:
            r["gave_up_at_fraction_of_t"] = r["t_final"] / t_need[r["std"]]
            if r["method"].startswith("GD"):
                r["steps_needed_estimate"] = int(np.ceil(t_need[r["std"]] / args.lr))
    print()
    text = C.table(rows, ["method", "std", "status", "t_final", "steps", "gradients",
                          "rebuilds", "equivalents", "wall_s", "x_equivalents", "x_wall"],
                   {"t_final": ".3g", "equivalents": ".0f", "wall_s": ".1f",
                    "x_equivalents": ".2f", "x_wall": ".2f"})
    for r in rows:
        if "gave_up_at_fraction_of_t" in r:
            extra = (f"; needs ~{r['steps_needed_estimate']:,} steps"
                     if "steps_needed_estimate" in r else "")
            print(f"- {r['method']} at std {r['std']:g} gave up at t = {r['t_final']:.3g} "
                  f"({100 * r['gave_up_at_fraction_of_t']:.1f}% of gradflow's stop time"
                  f"{extra})")
    targets = {}
    g = [r for r in rows if r["method"].startswith("gradflow")]
    if len(g) > 1:
        worst = g[-1]
        targets["cost_ratio_smallest_vs_largest_std"] = {
            "stds": [args.stds[-1], args.stds[0]],
            "equivalents": worst["x_equivalents"],
            "equivalents_if_analytic": (worst["equivalents_if_analytic"]
                                        / g[0]["equivalents_if_analytic"]),
            "wall": worst["x_wall"], "target": 3.0}
        print("\ntarget: cost at smallest std <= 3x cost at largest std:",
              {k: round(v, 2) for k, v in targets["cost_ratio_smallest_vs_largest_std"].items()
               if isinstance(v, float)})
    C.write_results("init_scale", {"config": vars(args), "unit_costs": costs, "rows": rows,
                                   "targets": targets, "table": text}, args.out)
    return rows


if __name__ == "__main__":
    main()
