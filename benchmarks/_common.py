"""Shared pieces of the benchmarks: problem P, timing, cost accounting, results files.

Problem P is the main job's problem (`gradflow run tf-incremental`): an order-4
10x10x10x10 ground truth of CP rank 5 (Frobenius norm 1), 2000 entries observed
uniformly without repetition, R = 1000 components, Gaussian init; keys as in
`gradflow/experiments/tf_incremental.py`, so std 0.005 here is the main job's std 0.005.

Cost is counted in *gradient-evaluation equivalents*: one full gradient of the loss
is 1; a Hessian-vector product is 2; a forward loss evaluation, a rebuild of a
Rosenbrock-W Jacobian approximation or anything else is its own cost measured in this
process as a ratio to one gradient evaluation (min over interleaved repeats), so the
count does not depend on how loaded the machine is.
"""

import os

# OpenBLAS (behind JAX's CPU eigh/Cholesky) spawns one thread per core; on a shared,
# oversubscribed machine those threads spin against each other and a 320x320 eigh
# took 500-750 ms instead of 35 ms (measured, see docs/benchmarks.md). The benchmarks
# therefore run with one BLAS thread unless told otherwise (set before JAX loads it).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import json
import platform
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import gradflow as gf

RESULTS = Path(__file__).resolve().parent / "results"
# the load when the benchmark started (`machine()` also records it when results are written)
LOAD_AT_START = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
LOSS_DROP = 1e-4  # stop at loss <= LOSS_DROP x initial loss


def stiffnesses() -> dict:
    """The Rosenbrock-W Jacobian approximations the benchmarks price, by name: gradflow's
    default (Gauss-Newton block of the 8 largest components, Cholesky) and the previous
    default (exact block Hessian by autodiff, eigendecomposition)."""
    return {"gauss-newton": gf.LargestComponents(8),
            "exact": gf.LargestComponents(8, hessian="exact")}


# --- problem P ------------------------------------------------------------------------


def problem(std, *, dim=10, order=4, observations=2000, components=1000, truth_rank=5,
            seed=0, dense=None):
    """(model, objective) of problem P (or a resized variant) at init `std`."""
    dims = (dim,) * order
    k_truth, k_obs, k_init = jr.split(jr.key(seed), 3)
    truth = gf.random_cp_tensor(k_truth, dims, truth_rank)
    objective = gf.Completion.from_tensor(
        truth, gf.sample_indices(k_obs, dims, observations), dense=dense
    )
    return gf.CP.gaussian(k_init, dims, components, std), objective


# --- timing ---------------------------------------------------------------------------


def interleaved_min(fns: dict, *, repeats=7, target_s=0.05, args=()):
    """Seconds per call of each `fns[name](*args)`, min over `repeats` interleaved rounds.

    Each function is compiled/warmed first; in every round each runs `number` times
    back to back (chosen so a round takes about `target_s`), and the rounds of the
    different functions alternate so that load changes hit them all alike.
    """
    number = {}
    for name, fn in fns.items():
        jax.block_until_ready(fn(*args))
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        once = time.perf_counter() - start
        number[name] = max(1, int(target_s / max(once, 1e-6)))
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(number[name]):
                out = fn(*args)
            jax.block_until_ready(out)
            best[name] = min(best[name], (time.perf_counter() - start) / number[name])
    return best


_grad = eqx.filter_jit(lambda model, objective: eqx.filter_grad(objective)(model))
_loss = eqx.filter_jit(lambda model, objective: objective(model))


def _linearise_fn(stiffness):
    # jit on the stiffness as a static argument-free closure
    return eqx.filter_jit(lambda model, objective: stiffness.linearise(model, objective))


def unit_costs(model, objective, stiffnesses: dict, *, repeats=7):
    """Costs relative to one gradient: loss evaluation, and one rebuild per stiffness.

    Returns `{"gradient_s": s, "loss": ratio, "rebuild[name]": ratio, ...}`.
    """
    fns = {"gradient": _grad, "loss": _loss}
    for name, stiffness in stiffnesses.items():
        fns[f"rebuild[{name}]"] = _linearise_fn(stiffness)
    best = interleaved_min(fns, repeats=repeats, args=(model, objective))
    g = best["gradient"]
    out = {"gradient_s": g}
    out.update({name: t / g for name, t in best.items() if name != "gradient"})
    return out


def step_linear_algebra_costs(model, objective, stiffnesses: dict, *, repeats=7):
    """Per-step cost of a Rosenbrock-W step's linear algebra, relative to one gradient:
    `{"step_linalg[name]": r}`. As in `gf.RosenbrockW.step`: one `shifted` (for the
    Gauss-Newton block: the Cholesky factorization of I + cH), four solves with it and
    three products with W."""
    fns = {"gradient": lambda: _grad(model, objective)}
    for name, stiffness in stiffnesses.items():
        lin = _linearise_fn(stiffness)(model, objective)

        @eqx.filter_jit
        def linalg(lin, x, c):
            out = x
            for _ in range(3):
                out = jax.tree.map(jnp.add, out, lin.matvec(out))
            solve = lin.shifted(c)
            for _ in range(4):
                out = solve(out)
            return out

        fns[name] = (lambda lin, linalg: lambda: linalg(lin, model, 1e4))(lin, linalg)
    best = interleaved_min(fns, repeats=repeats)
    return {f"step_linalg[{k}]": v / best["gradient"] for k, v in best.items()
            if k != "gradient"}


def solver_costs(model, objective, *, repeats=7) -> dict:
    """`unit_costs` and `step_linear_algebra_costs` of the library's stiffnesses
    (`stiffnesses()`), in gradient evaluations, plus `gradient_s`."""
    stiff = stiffnesses()
    costs = unit_costs(model, objective, stiff, repeats=repeats)
    return costs | step_linear_algebra_costs(model, objective, stiff, repeats=repeats)


# --- cost accounting ------------------------------------------------------------------


def rosenbrock_rebuilds(steps: int, refresh_every: int) -> int:
    """Jacobian rebuilds of `gf.RosenbrockW`: one at init, then every `refresh_every`
    step attempts (accepted or rejected), see `RosenbrockW.step`."""
    return 1 + max(steps - 1, 0) // refresh_every


def flow_equivalents(tr, solver, costs, stiffness_name=None) -> dict:
    """Gradient-evaluation equivalents of a `gf.flow` solve with a loss stop.

    gradients (the solver's stages, rejected steps included) + rebuilds x rebuild
    cost + steps x the per-step linear algebra (factorization, solves, products with W)
    + one forward loss per step for the stop event x loss cost.
    """
    steps = tr.stats["steps"]
    linalg = 0.0
    if isinstance(solver, gf.RosenbrockW):
        grads = 4 * steps + 1
        rebuilds = rosenbrock_rebuilds(steps, solver.refresh_every)
        rebuild_cost = costs[f"rebuild[{stiffness_name}]"]
        linalg = steps * costs.get(f"step_linalg[{stiffness_name}]", 0.0)
    else:  # an explicit RK with FSAL (Tsit5): 6 new stages per attempt + 1
        grads = 6 * steps + 1
        rebuilds, rebuild_cost = 0, 0.0
    event = steps + 1 if tr.config.get("loss_tol") is not None else 0
    total = grads + rebuilds * rebuild_cost + linalg + event * costs["loss"]
    return dict(gradients=grads, rebuilds=rebuilds, rebuild_cost=rebuild_cost,
                linalg=linalg, event_losses=event, equivalents=total)


# --- machine and results --------------------------------------------------------------


def _commit():
    """The checked-out commit (short), read from `.git` (no git process)."""
    git = Path(__file__).resolve().parent.parent / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head[:7]
        ref = head[5:]
        if (git / ref).exists():
            return (git / ref).read_text().strip()[:7]
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0][:7]
    except OSError:
        pass
    return None


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = _commit()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "load_average_1m_at_start": LOAD_AT_START,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "x64": bool(jax.config.jax_enable_x64),
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
        "commit": commit,
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def record(results: dict, key, row: dict, wall: float, costs: dict, partial: str,
           out=None) -> None:
    """Store a measured `row` under `key`, with `x_priced` = wall time over the priced
    cost (equivalents x one gradient's best time: what the accounting leaves out, i.e.
    solver overhead and load), and save all rows so far to `results/<partial>.json`
    (or beside `out`, the run's own results path)."""
    row["x_priced"] = wall / (row["equivalents"] * costs["gradient_s"])
    results[key] = row
    path = None if out is None else Path(out).with_name(Path(out).stem + "_partial.json")
    write_results(partial, {"rows": list(results.values())}, path, quiet=True)


def write_results(name: str, payload: dict, path=None, quiet=False) -> Path:
    path = Path(path) if path else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine()} | payload
    path.write_text(json.dumps(payload, indent=2, default=_jsonable))
    if not quiet:
        print(f"\nwrote {path}")
    return path


def _jsonable(x):
    if isinstance(x, (np.generic, np.ndarray)) or hasattr(x, "shape"):
        return np.asarray(x).tolist()
    return repr(x)


def table(rows, columns, formats=None, file=None):
    """Print `rows` (dicts) as a Markdown table of `columns` and return its text."""
    formats = formats or {}

    def cell(row, col):
        v = row.get(col, "")
        if v is None or v == "":
            return "–"
        f = formats.get(col)
        if f is None:
            if isinstance(v, float):
                return f"{v:.3g}"
            return str(v)
        return f(v) if callable(f) else format(v, f)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r, c) for c in columns) + " |" for r in rows]
    text = "\n".join(lines)
    print(text, file=file, flush=True)
    return text
