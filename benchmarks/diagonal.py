"""Diagonal linear networks: the solver's cost against the init scale alpha.

The `diagonal-bias` experiment's problem (d = 200 coordinates, n = 50 Gaussian
observations of a 5-sparse truth, depth 2, u = v = alpha), solved from alpha = 1e-1
down to 1e-6 to each of several loss stops (`--loss-drops`, relative to the initial
loss), by gradflow's default solver (`gf.AutoStiff` whose W steps use the Gauss-Newton
block of the 8 largest coordinates) and by `gf.AutoStiff(gf.RosenbrockW(
gf.GaussNewtonSubspace(rank=n)))` (the whole Gauss-Newton matrix, of rank <= n). Compile
time is excluded (a first solve of each configuration). For each run: status, steps
(explicit / W), linearisations, gradient evaluations, gradient-evaluation equivalents
(each linearisation and each W step's linear algebra priced against one gradient in
this process), wall time, flow time at the stop; then the ratio
cost(alpha = 1e-6) / cost(alpha = 1e-1) per solver and stop (the issue's target: <= 3).

    .venv/bin/python benchmarks/diagonal.py [--quick] [--alphas ...] [--loss-drops ...]
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import jax.random as jr

import _common
import gradflow as gf
from gradflow.experiments import diagonal_bias


def problem(seed: int = 0, dim: int = 200, observations: int = 50, sparsity: int = 5):
    X, y, truth = diagonal_bias.sparse_regression(jr.key(seed), dim, observations, sparsity)
    return gf.Sensing(X, y), truth


def solvers(observations: int) -> dict:
    return {"default": None,
            "subspace": diagonal_bias.solver_for("subspace", observations)}


def _linearisation_costs(model, objective, solver) -> dict:
    """One linearisation and one W step's linear algebra, in gradients."""
    stiff = solver.stiff
    grad = jax.jit(lambda m: jax.grad(objective)(m))
    lin_fn = jax.jit(lambda m: stiff.linearise(m, objective))
    lin = lin_fn(model)

    @jax.jit
    def linalg(lin, x):
        solve = lin.shifted(1e4)
        out = x
        for _ in range(3):
            out = jax.tree.map(jnp.add, out, lin.matvec(out))
        for _ in range(4):
            out = solve(out)
        return out

    best = _common.interleaved_min({"gradient": lambda: grad(model),
                                    "linearisation": lambda: lin_fn(model),
                                    "linalg": lambda: linalg(lin, model)})
    g = best["gradient"]
    return {"gradient_s": g, "linearisation": best["linearisation"] / g,
            "w_step_linalg": best["linalg"] / g}


def run_one(objective, truth, alpha, name, solver, loss_drop, *, rtol, cap, costs):
    model = gf.DiagonalNet.uniform(truth.shape[0], alpha)
    kw = dict(loss_drop=loss_drop, rtol=rtol, solver=solver, throw=False, max_steps=cap,
              save_times=jnp.array([0.0, 1e-12]), observers=[])
    gf.flow(model, objective, t1=1e-12, **kw)  # compile (t1 is traced: the same program)
    start = time.perf_counter()
    tr = gf.flow(model, objective, t1=1e16, **kw)
    wall = time.perf_counter() - start
    stats = tr.stats
    equivalents = float(stats["gradient_evaluations"] + stats["linearisations"]
                        * costs["linearisation"] + stats["stiff_steps"] * costs["w_step_linalg"])
    error = float(jnp.linalg.norm(tr.model.full() - truth) / jnp.linalg.norm(truth))
    return dict(alpha=alpha, solver=name, loss_drop=loss_drop, status=tr.status,
                steps=stats["steps"], rejected=stats["rejected_steps"],
                explicit_steps=stats["explicit_steps"], stiff_steps=stats["stiff_steps"],
                linearisations=stats["linearisations"],
                gradient_evaluations=stats["gradient_evaluations"],
                equivalents=equivalents, wall_s=wall, t_final=tr.t_final,
                error_vs_truth=error)


def add_arguments(parser):
    parser.add_argument("--alphas", type=float, nargs="+",
                        default=[1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6])
    parser.add_argument("--loss-drops", type=float, nargs="+", default=[1e-4, 1e-10, 1e-20])
    parser.add_argument("--solvers", nargs="+", default=["default", "subspace"],
                        choices=["default", "subspace"])
    parser.add_argument("--rtol", type=float, default=1e-8)
    parser.add_argument("--cap", type=int, default=50_000, help="max_steps per solve")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="alphas 1e-1 1e-6, loss drops 1e-4 1e-10")
    parser.add_argument("--out", default=None)


def main(args):
    if args.quick:
        args.alphas, args.loss_drops = [1e-1, 1e-6], [1e-4, 1e-10]
    objective, truth = problem(args.seed)
    n = objective.num_observations
    available = solvers(n)
    rows = []
    for name in args.solvers:
        solver = available[name]
        probe = gf.DiagonalNet.uniform(truth.shape[0], 1e-3)
        costs = _linearisation_costs(probe, objective,
                                     gf.default_solver(probe) if solver is None else solver)
        for loss_drop in args.loss_drops:
            for alpha in args.alphas:
                row = run_one(objective, truth, alpha, name, solver, loss_drop,
                              rtol=args.rtol, cap=args.cap, costs=costs)
                row["costs"] = costs
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "costs"}), flush=True)
                _common.write_results("diagonal_partial", {"rows": rows}, quiet=True)
    summary = _summary(rows)
    table = _print_table(rows, summary)
    _common.write_results("diagonal", dict(rows=rows, summary=summary, args=vars(args),
                                           table=table), args.out)


def _summary(rows) -> dict:
    out = {}
    for name in sorted({r["solver"] for r in rows}):
        for drop in sorted({r["loss_drop"] for r in rows}, reverse=True):
            mine = {r["alpha"]: r for r in rows if r["solver"] == name
                    and r["loss_drop"] == drop}
            if len(mine) < 2:
                continue
            small, large = mine[min(mine)], mine[max(mine)]
            key = (f"{name}, loss drop {drop:g}: cost(alpha {small['alpha']:g}) / "
                   f"cost(alpha {large['alpha']:g})")
            finished = small["status"] == "loss" and large["status"] == "loss"
            out[key] = {
                "steps": small["steps"] / large["steps"],
                "equivalents": small["equivalents"] / large["equivalents"],
                "wall": small["wall_s"] / max(large["wall_s"], 1e-9),
                "both_finished": finished,
                "meets_target_3x": bool(finished and small["equivalents"]
                                        <= 3 * large["equivalents"]),
            }
    return out


def _print_table(rows, summary) -> str:
    """Print the rows and the cost ratios; return both as Markdown."""
    text = _common.table(rows, ["solver", "loss_drop", "alpha", "status", "steps", "explicit_steps",
                         "stiff_steps", "linearisations", "equivalents", "wall_s", "t_final"],
                  formats={"loss_drop": "g", "alpha": "g", "equivalents": ",.0f",
                           "wall_s": ".2f", "t_final": ".3g"})
    lines = [f"- {key}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in value.items())
             for key, value in summary.items()]
    print("\n".join(lines), flush=True)
    return text + "\n\n" + "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    main(parser.parse_args())
