"""Benchmark 5: compile time and first-result latency of the main job.

The main job is `gradflow run tf-incremental` (Figure 3 of the TF paper on problem P;
its first init std is 0.05, rtol 1e-8, 1500 save times, two observers). Each
measurement runs in a fresh Python process, as a user would:

- `import`: `import gradflow` (JAX included);
- `compile`: the first `gf.flow` call on a tiny interval minus the second one (the
  same compiled program, so the difference is tracing + XLA compilation);
- `first result`: process start to the first std's finished trajectory (import,
  problem set-up, compile and the whole solve).

Run cold, and again with JAX's persistent compilation cache
(`JAX_COMPILATION_CACHE_DIR`) filled by the first of two runs, which is what a user
re-running the main job gets with the cache enabled.

    .venv/bin/python benchmarks/compile_time.py [--quick]   # --quick: no full solve

Writes `benchmarks/results/compile_time.json`.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    from . import _common as C
except ImportError:
    import _common as C

CHILD = r"""
import json, sys, time
t0 = float(sys.argv[1]); solve = sys.argv[2] == "1"
start = time.perf_counter()
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import gradflow as gf
t_import = time.perf_counter() - start
from gradflow.data import random_cp_tensor, sample_indices
dims = (10,) * 4
k_truth, k_obs, k_init = jr.split(jr.key(0), 3)
truth = random_cp_tensor(k_truth, dims, 5)
objective = gf.Completion.from_tensor(truth, sample_indices(k_obs, dims, 2000))
truth_norm = jnp.linalg.norm(truth)
observers = {   # the main job's observers (gradflow/experiments/tf_incremental.py)
    "component_norms": lambda t, m, o: m.component_norms(),
    "reconstruction_error": lambda t, m, o: jnp.linalg.norm(m.full() - truth) / truth_norm,
}
model = gf.CP.gaussian(k_init, dims, 1000, 0.05)
loss_tol = 1e-4 * float(objective(model))
save_times = np.concatenate([[0.0], np.geomspace(1e-2, 1e14, 1500)])
kw = dict(loss_tol=loss_tol, observers=observers, rtol=1e-8, max_steps=200_000)
t_setup = time.perf_counter() - start - t_import
tiny = save_times * 1e-20
a = time.perf_counter(); gf.flow(model, objective, t1=tiny[-1], save_times=tiny, **kw)
first = time.perf_counter() - a
a = time.perf_counter(); gf.flow(model, objective, t1=tiny[-1], save_times=tiny, **kw)
second = time.perf_counter() - a
out = dict(import_s=t_import, setup_s=t_setup, first_call_s=first, second_call_s=second,
           compile_s=first - second)
if solve:
    a = time.perf_counter()
    tr = gf.flow(model, objective, t1=1e14, save_times=save_times, **kw)
    out |= dict(solve_s=time.perf_counter() - a, steps=tr.stats["steps"], status=tr.status)
out["first_result_s"] = time.time() - t0
print("RESULT " + json.dumps(out))
"""


def child(solve: bool, env: dict) -> dict:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", CHILD, repr(t0), "1" if solve else "0"],
                          capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parent.parent)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(proc.stderr[-3000:])


def main(args=None):
    if args is None:
        p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        p.add_argument("--quick", action="store_true", help="compile only, no full solve")
        p.add_argument("--out", default=None)
        args = p.parse_args()
    rows = []
    base = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    with tempfile.TemporaryDirectory() as cache:
        cached = base | {"JAX_COMPILATION_CACHE_DIR": cache,
                         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
        runs = [("cold (no cache)", base, not args.quick),
                ("persistent cache, first run (fills it)", cached, False),
                ("persistent cache, second run", cached, not args.quick)]
        for label, env, solve in runs:
            r = child(solve, env)
            r["run"] = label
            rows.append(r)
            print(label, {k: round(v, 2) if isinstance(v, float) else v
                          for k, v in r.items()}, flush=True)
    print()
    text = C.table(rows, ["run", "import_s", "setup_s", "compile_s", "second_call_s",
                          "solve_s", "steps", "first_result_s"],
                   {k: ".1f" for k in ("import_s", "setup_s", "compile_s", "second_call_s",
                                       "solve_s", "first_result_s")})
    C.write_results("compile_time", {"config": vars(args), "rows": rows, "table": text},
                    args.out)


if __name__ == "__main__":
    main()
