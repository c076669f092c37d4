"""Sweep of 16 members: compiled sweep vs a Python loop compiled once vs a loop that
recompiles per member (issue 6). Prints members/second and the ratios.

    .venv/bin/python benchmarks/sweep.py [--members 16] [--chunk-size 4]

The problem: order-3 CP completion (4x4x4, rank-2 truth, 40 observations, R = 8), init
scales 0.3 ... 0.03 x 2 seeds, stop at loss <= 1e-3 x initial.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import gradflow as gf

DIMS = (4, 4, 4)
TRUTH = gf.random_cp_tensor(jr.key(0), DIMS, 2)
OBJECTIVE = gf.Completion.from_tensor(TRUTH, gf.sample_indices(jr.key(1), DIMS, 40))
SAVES = np.concatenate([[0.0], np.geomspace(1e-2, 1e9, 60)])
SETTINGS = dict(t1=1e9, save_times=SAVES, observers=["component_norms"])


def problem(params):
    return gf.CP.gaussian(jr.key(params["seed"]), DIMS, 8, params["scale"]), OBJECTIVE


def one(scale, seed):
    model, objective = problem({"scale": jnp.asarray(scale), "seed": jnp.asarray(seed)})
    return gf.flow(model, objective, loss_tol=1e-3 * float(objective(model)), **SETTINGS)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--members", type=int, default=16)
    p.add_argument("--chunk-size", type=int, default=4)
    args = p.parse_args()
    scales = np.geomspace(0.3, 0.03, args.members // 2)
    grid = {"scale": scales, "seed": np.arange(2)}
    members = [(s, k) for s in scales for k in range(2)]
    rows = {}

    start = time.perf_counter()
    gf.sweep(problem, grid, loss_drop=1e-3, chunk_size=args.chunk_size, order_by="scale",
             **SETTINGS)
    rows["compiled sweep (first call, with compile)"] = time.perf_counter() - start
    start = time.perf_counter()
    gf.sweep(problem, grid, loss_drop=1e-3, chunk_size=args.chunk_size, order_by="scale",
             **SETTINGS)
    rows["compiled sweep (again, cached)"] = time.perf_counter() - start

    start = time.perf_counter()
    for s, k in members:  # gf.flow compiles once: the values are traced arrays
        one(s, k)
    rows["Python loop of gf.flow (compiled once)"] = time.perf_counter() - start

    start = time.perf_counter()
    for s, k in members:
        jax.clear_caches()  # what a loop that builds a new closure per member pays
        one(s, k)
    rows["Python loop, recompiling per member"] = time.perf_counter() - start

    base = rows["compiled sweep (first call, with compile)"]
    print(f"\n{'':44} {'seconds':>8} {'members/s':>10} {'x sweep':>8}")
    for name, seconds in rows.items():
        print(f"{name:44} {seconds:8.2f} {args.members / seconds:10.2f} {seconds / base:8.2f}")
    print(json.dumps({"members": args.members, "chunk_size": args.chunk_size,
                      "devices": jax.device_count(), "seconds": rows}))


if __name__ == "__main__":
    main()
