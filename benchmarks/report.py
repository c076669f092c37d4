"""Write `docs/benchmarks.md` from the JSON results in `benchmarks/results/` and `notes.md`.

`notes.md` is the page's narrative. It may contain

- `<!-- targets -->`: replaced by the table of the issue's targets (measured, met or
  missed and by how much), computed here from the results;
- `<!-- results -->`: replaced by one section per benchmark (its table, the machine, the
  load average and the command that produced it);
- `{{key}}` or `{{key:format}}` (a Python format spec): a number from the results, by
  the names `values()` gives them (`.venv/bin/python benchmarks/report.py --keys` lists
  them). An unknown key is an error, so the text cannot quote a number that is not in
  the results.

The work-precision plot is copied to `docs/benchmarks-work-precision.png`.

    .venv/bin/python benchmarks/report.py [--keys]
"""

import argparse
import io
import json
import re
import shutil
from pathlib import Path

try:
    from . import _common as C
except ImportError:
    import _common as C

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "benchmarks-work-precision.png"
NOTES = Path(__file__).resolve().parent / "notes.md"

ALIASES = {  # short names of the configurations in `values()` keys
    "gradflow default (RosenbrockW)": "default",
    "RosenbrockW, exact block Hessian": "exact",
    "Tsit5 (raw time)": "tsit5",
    "Tsit5 + time change": "timechange",
    "Kvaerno5 + Newton-GMRES, preconditioned": "kvaerno_pre",
    "Kvaerno5 + Newton-GMRES": "kvaerno",
    "gradient descent": "gd",
    "gather/scatter": "gather",
    "segment sums": "segment",
    "one-hot matmuls": "onehot",
    "dense einsum": "einsum",
    "Khatri-Rao matmul": "khatri_rao",
}

SECTIONS = [
    ("init_scale", "1. Init-scale scaling",
     "Steps, gradient evaluations, gradient-evaluation equivalents and wall time to loss "
     "≤ 10⁻⁴ × initial; `x_equivalents` and `x_wall` are relative to the same method at "
     "std 0.05."),
    ("work_precision", "2. Work-precision",
     "error = max relative deviation of the ten largest component-norm "
     "curves from the reference at the save times (`inf`: the solver gave up before T)."),
    ("vector_field", "3. Vector-field cost",
     "Time per gradient of the loss (min over interleaved repeats), each implementation's "
     "own flop count, and the fraction of this machine's float64 dense-matmul rate; "
     "**yes** marks the one gradflow picks (`Completion`'s dense path on these sizes)."),
    ("torch_gd", "4. The papers' way: a PyTorch gradient-descent loop",
     "Eager PyTorch GD (float64, CPU) against gradflow's default solve, to the same loss "
     "stop; `ratio` = wall time / gradflow's wall time at the same std."),
    ("compile_time", "5. Compile time and first-result latency",
     "The main job (`gradflow run tf-incremental`, its first init std), each run in a "
     "fresh process; `first_result_s` is process start to the first finished trajectory."),
    ("sweep", "Sweeps (issue 6)",
     "`gf.sweep` against Python loops of `gf.flow` on a small order-3 problem."),
    ("htf", "Hierarchical tensor factorization: init scale and width (issue 15)",
     "The `htf-incremental` problem (order 4, dim 8, HT-rank (5, 5) truth of norm 64, 2048 "
     "entries, stop at loss 2.5e-5, rtol 1e-6) solved by the default solver "
     "(`gf.AutoStiff`: Tsit5 steps, then Rosenbrock-W on the Gauss–Newton block of each "
     "node's 8 largest local components); `explicit / W` counts accepted steps of each "
     "kind, `equivalents` prices linearisations and the W steps' linear algebra in "
     "gradients of the same width. Tsit5 on the same problem: 12,134 / 39,079 / 62,705 "
     "steps at widths 32, std 0.1 / 0.03 / 0.01 (rtol 1e-8), and capped at 1,500 steps "
     "(t = 2e8 of the 1.9e8 … needed) at width 512."),
    ("htf_accuracy", "Hierarchical tensor factorization: the same flow (issue 15)",
     "The `htf-incremental` problem at small widths: the default solver and Tsit5 at "
     "tight tolerances against Dopri8 at rtol 1e-12, saved at the same times (geometric on "
     "the plateau, dense over the learning phase): the largest relative deviation of the "
     "local component norms above 1% of the largest, of the reconstruction error and of "
     "the loss, before both stops; then the escape time (the end tensor's norm reaching "
     "1% of the truth's, a root-found radius stop) of the default solver at rtol 1e-8 "
     "and 1e-6 against the reference's. The flow amplifies, as it leaves the saddle, "
     "what any solver does on the plateau, so Tsit5 at the same tolerance is the "
     "control."),
    ("default_solver", "The default is never the slow choice (issue 15)",
     "Every experiment's problem whose solves use the default solver, at every init "
     "scale it runs: the default (`gf.AutoStiff`) against Diffrax's Tsit5 and the "
     "previous default (`gf.RosenbrockW()` for CP; Tsit5 for the other models), side by "
     "side in one process, compile time excluded; a competitor still running at 3× the "
     "default's wall time is stopped and marked. Deep matrices (`mf-incremental`, "
     "`compare-factorizations MF`) use the model-agnostic `gf.GaussNewtonSubspace(16)`."),
    ("diagonal", "Diagonal linear networks: cost against the init scale α (issue 18)",
     "The `diagonal-bias` problem (d = 200, n = 50 Gaussian observations of a 5-sparse "
     "truth, depth 2, u = v = α) from α = 0.1 down to 1e-6, to each loss stop (relative "
     "to the initial loss), by the default solver (W steps on the Gauss–Newton block of "
     "the 8 largest coordinates) and by `AutoStiff(RosenbrockW(GaussNewtonSubspace(rank=n)))`"
     "; the ratios are cost(α = 1e-6) / cost(α = 0.1)."),
    ("verify_cases100", "gradflow verify --cases 100 (issue 17)",
     "100 random instances per check, one run on an empty cache folder: the sample that "
     "makes random testing of the theorems real (every verdict must pass)."),
    ("verify", "Theorem checks and the test suite: what they take (issue 17)",
     "`gradflow verify` at its default (3 instances per check) run twice as a user runs "
     "it, first on an empty cache folder (it compiles and keeps its programs), then "
     "again (it loads them); per check: instances, worst residual, tolerance, verdict "
     "and the seconds of the first and second run."),
]

COMMANDS = {
    "init_scale": ".venv/bin/python benchmarks/run.py init-scale",
    "work_precision": ".venv/bin/python benchmarks/run.py work-precision",
    "vector_field": ".venv/bin/python benchmarks/run.py vector-field",
    "torch_gd": ".venv/bin/python benchmarks/run.py torch",
    "compile_time": ".venv/bin/python benchmarks/run.py compile",
    "sweep": ".venv/bin/python benchmarks/run.py sweep",
    "htf": ".venv/bin/python benchmarks/run.py htf --rtol 1e-6 --tsit5-cap 1500",
    "htf_accuracy": ".venv/bin/python benchmarks/run.py htf-accuracy",
    "default_solver": ".venv/bin/python benchmarks/run.py default-solver",
    "diagonal": ".venv/bin/python benchmarks/run.py diagonal",
    "verify": ".venv/bin/python benchmarks/run.py verify --pytest",
    "verify_cases100": ".venv/bin/python benchmarks/run.py verify --cases 100 --cold-only",
}


def _load(name):
    path = C.RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _alias(name):
    if name.startswith("GD lr="):
        return "gd"
    return ALIASES.get(name, re.sub(r"\W+", "_", name).strip("_").lower())


def _flat(prefix, value, out):
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}", v, out)
    elif isinstance(value, (int, float, str, bool)) or value is None:
        out[prefix] = value


def values(data=None) -> dict:
    """Every number the page may quote, by name (see the module docstring)."""
    data = data or {name: _load(name) for name, *_ in SECTIONS}
    out = {}
    d = data.get("init_scale")
    if d:
        for r in d["rows"]:
            r = r | {"equivalents_per_step": r["equivalents"] / max(r["steps"], 1)}
            _flat(f"init.{_alias(r['method'])}@{r['std']:g}", r, out)
        priced = [r["x_priced"] for r in d["rows"] if "x_priced" in r]
        if priced:
            out["init.x_priced.min"], out["init.x_priced.max"] = min(priced), max(priced)
        out["init.tsit5_cap"] = d["config"]["tsit5_cap"]
        out["init.gd_cap"] = d["config"]["gd_cap"]
        for name, t in d["targets"].items():
            _flat(f"init.target.{_alias(name)}", t, out)
        _flat("init.cost", d["unit_costs"], out)
        _flat("init.machine", d["machine"], out)
        out["init.gd_lr"] = d["config"]["lr"]
    d = data.get("work_precision")
    if d:
        by_setting = {}
        for r in d["rows"]:
            value = r["setting"].split()[1]
            r = r | {"value": float(value),
                     "equivalents_per_step": r["equivalents"] / max(r["steps"], 1)}
            by_setting[(r["method"], r["setting"])] = r
            _flat(f"wp.{_alias(r['method'])}@{value}", r, out)
        priced = [r["x_priced"] for r in d["rows"] if "x_priced" in r]
        if priced:
            out["wp.x_priced.min"], out["wp.x_priced.max"] = min(priced), max(priced)
        for name, t in d["targets"].items():
            flow = by_setting[(name, t["setting"])]
            gd = by_setting.get(("gradient descent", t["gd_setting"]), {})
            t = t | {"steps": flow["steps"], "equivalents": flow["equivalents"],
                     "wall_s": flow["wall_s"], "gd_steps": gd.get("steps"),
                     "gd_equivalents": gd.get("equivalents"), "gd_wall_s": gd.get("wall_s")}
            _flat(f"wp.target.{_alias(name)}", t, out)
        _flat("wp.cost", d["unit_costs"], out)
        _flat("wp.ref", d["reference"], out)
        _flat("wp.machine", d["machine"], out)
    d = data.get("vector_field")
    if d:
        for r in d["rows"]:
            p = "P" if r["problem"].startswith("P") else "10x"
            _flat(f"vf.{p}.{_alias(r['implementation'])}", r, out)
        for label, rate in d["matmul_gflops"].items():
            out[f"vf.{'P' if label.startswith('P') else '10x'}.matmul_gflops"] = rate
        _flat("vf.target", d["target"], out)
        _flat("vf.cost", d["unit_costs"], out)
        _flat("vf.machine", d["machine"], out)
    d = data.get("torch_gd")
    if d:
        _flat("torch.step_ms", d["per_step_ms"], out)
        out["torch.jax_gradient_ms"] = d["jax_gradient_ms"]
        out["torch.implementation"] = d.get("implementation")
        for r in d.get("runs", []):
            _flat(f"torch.run@{r['std']:g}@{r['lr']:g}", r, out)
        for r in d.get("estimates", []):
            _flat(f"torch.estimate@{r['std']:g}@{r['lr']:g}", r, out)
        _flat("torch.machine", d["machine"], out)
    d = data.get("compile_time")
    if d:
        for r, key in zip(d["rows"], ("cold", "cache_fill", "cached")):
            _flat(f"compile.{key}", r, out)
        _flat("compile.machine", d["machine"], out)
    d = data.get("sweep")
    if d:
        for r, key in zip(d["rows"], ("first", "sorted", "mixed", "loop", "recompiling")):
            _flat(f"sweep.{key}", r, out)
        _flat("sweep.machine", d["machine"], out)
    d = data.get("htf")
    if d:
        for width in {r["width"] for r in d["rows"]}:
            mine = {r["std"]: r for r in d["rows"]
                    if r["width"] == width and r["solver"] == "default"}
            small, large = mine[min(mine)], mine[max(mine)]
            out[f"htf.w{width}.steps"] = small["steps"] / large["steps"]
            out[f"htf.w{width}.equivalents"] = small["equivalents"] / large["equivalents"]
        spreads = []
        for std in {r["std"] for r in d["rows"]}:
            steps = [r["steps"] for r in d["rows"] if r["std"] == std
                     and r["solver"] == "default"]
            spreads.append(max(steps) / min(steps))
        out["htf.spread_max"] = max(spreads)
    d = data.get("default_solver")
    if d:
        out["default_solver.met"] = sum(r["met"] for r in d["results"])
        out["default_solver.total"] = len(d["results"])
    d = data.get("diagonal")
    if d:
        for key, value in d["summary"].items():
            if key.startswith("default, loss drop 0.0001:"):
                _flat("diagonal.drop4", value, out)
            if key.startswith("default, loss drop 1e-10:"):
                _flat("diagonal.drop10", value, out)
    d = data.get("verify")
    if d:
        out["verify.cold_s"], out["verify.warm_s"] = (r["wall_s"] for r in d["runs"])
        if "pytest" in d:
            out["verify.pytest_min"] = d["pytest"]["wall_s"] / 60
            out["verify.pytest_cpu_min"] = d["pytest"]["cpu_s"] / 60
    d = data.get("verify_cases100")
    if d:
        run = d["runs"][0]
        out["verify100.min"] = run["wall_s"] / 60
        out["verify100.passed"], out["verify100.checks"] = run["passed"], run["checks"]
    # "<prefix>.verdict": "met" or "missed by F×" for every target with a `met` flag
    for key in [k for k in out if k.endswith(".met")]:
        prefix = key[:-len("met")]
        missed = [v for k, v in out.items() if k.startswith(prefix + "missed_by")
                  and isinstance(v, float)]
        out[prefix + "verdict"] = _verdict(out[key], max(missed, default=None)).strip("*")
    return out


def _verdict(met, missed_by):
    """"met", or "missed by F×" with F the factor the measurement falls short by."""
    if met:
        return "**met**"
    if isinstance(missed_by, dict):
        missed_by = max(missed_by.values(), default=None)
    return f"missed by {missed_by:.3g}×" if missed_by else "missed"


def targets_table(data) -> str:
    rows = []
    d = data.get("init_scale")
    if d:
        for name, t in d["targets"].items():
            lo, hi = t["stds"][1], t["stds"][0]
            for k, what in (("equivalents", "gradient equivalents"), ("wall", "wall time")):
                met = t["reached"] and t[k] <= t["target"]
                rows.append(dict(
                    target=f"cost at std {hi:g} ≤ 3 × cost at std {lo:g} ({what})",
                    configuration=name, measured=f"{t[k]:.2f}×", goal="≤ 3×",
                    verdict=_verdict(met, t[k] / t["target"])))
    d = data.get("work_precision")
    if d:
        for name, t in d["targets"].items():
            for k, what, goal in (("gradient_ratio", "gradient equivalents", 20.0),
                                  ("wall_ratio", "wall time", 10.0)):
                rows.append(dict(
                    target=f"matched accuracy (1%), std {d['config']['std']:g}: {what}, "
                           f"GD / flow",
                    configuration=f"{name} {t['setting']} vs GD {t['gd_setting']}",
                    measured=f"{t[k]:.1f}×", goal=f"≥ {goal:g}×",
                    verdict=_verdict(t[k] >= goal, goal / t[k])))
    d = data.get("torch_gd")
    if d:
        for r in d.get("runs", []):
            rows.append(dict(
                target="PyTorch GD loop / gradflow, wall time to the same loss stop",
                configuration=f"std {r['std']:g}, torch lr {r['lr']:g} "
                              f"({r['why'].replace(' (work-precision)', ', work-precision')})"
                              + ("" if r["reached"] else ", did not reach the stop"),
                measured=f"{r['ratio']:.2f}×", goal="≥ 30×",
                verdict=_verdict(r["met"], r.get("missed_by"))))
        for r in d.get("estimates", []):
            rows.append(dict(
                target="PyTorch GD loop / gradflow, wall time to the same loss stop",
                configuration=f"std {r['std']:g}, torch lr {r['lr']:g} (estimated: "
                              f"per-step time × {r['steps']:,} steps; not run)",
                measured=f"{r['ratio']:.1f}×", goal="≥ 30×",
                verdict=_verdict(r["met"], r.get("missed_by"))))
    d = data.get("vector_field")
    if d:
        t = d["target"]
        rows.append(dict(
            target="vector field, fraction of the dense-matmul flop rate on P",
            configuration=f"{t['implementation']} (gradflow's pick)",
            measured=f"{t['fraction_of_matmul_on_P']:.0%}", goal="≥ 25%",
            verdict=_verdict(t["met"], t.get("missed_by"))))
    if not rows:
        return ""
    return C.table(rows, ["target", "configuration", "measured", "goal", "verdict"],
                   file=io.StringIO())


def _machine_line(data):
    m = data["machine"]
    load = f"{m['load_average_1m']:.1f} at the end of the run"
    if m.get("load_average_1m_at_start") is not None:
        load = f"{m['load_average_1m_at_start']:.1f} at the start, " + load
    return (f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores, 1-minute load average "
            f"{load}), JAX {m['jax']} ({m['jax_backend']}), "
            f"commit {m['commit']}, `OPENBLAS_NUM_THREADS={m.get('OPENBLAS_NUM_THREADS')}`; "
            f"command `{m['command']}`.")


def results_sections(data) -> str:
    parts = []
    for name, title, blurb in SECTIONS:
        d = data.get(name)
        if d is None:
            continue
        if name == "work_precision":
            blurb = f"Init std {d['config']['std']:g}; " + blurb
        parts += [f"### {title}", "", blurb, "", _machine_line(d), "", d["table"], ""]
        if name == "init_scale":
            t_need = {r["std"]: r["t_final"] for r in d["rows"]
                      if r["method"].startswith("gradflow") and r["status"] == "loss"}
            notes = []
            for r in d["rows"]:
                if "gave_up_at_fraction_of_t" in r:
                    extra = (f"; it would need about {r['steps_needed_estimate']:,} steps"
                             if "steps_needed_estimate" in r else "")
                    notes.append(f"- {r['method']} at std {r['std']:g} gave up "
                                 f"({r['status']}) at t = {r['t_final']:.3g}, "
                                 f"{100 * r['gave_up_at_fraction_of_t']:.1f}% of the way "
                                 f"to the stop time {t_need[r['std']]:.3g}{extra}.")
            c = d["unit_costs"]
            notes.append(f"- Unit costs in gradients (one gradient = "
                         f"{c['gradient_s'] * 1e3:.2f} ms): rebuild Gauss–Newton "
                         f"{c['rebuild[gauss-newton]']:.2f}, rebuild exact "
                         f"{c['rebuild[exact]']:.2f}, per-step linear algebra "
                         f"{c['step_linalg[gauss-newton]']:.2f} / "
                         f"{c['step_linalg[exact]']:.2f}, loss (stop event) {c['loss']:.2f}.")
            parts += notes + [""]
        if name == "work_precision":
            png = C.RESULTS / "work_precision.png"
            if png.exists():
                shutil.copyfile(png, PLOT)
                parts += [f"![Work-precision on problem P]({PLOT.name})", ""]
            ref = d["reference"]
            parts += [f"Reference: gradflow's default at rtol {ref['rtol']:g}, "
                      f"{int(ref['steps'])} steps, {ref['saves']} save times on "
                      f"[0, {ref['T']:.4g}].", ""]
            for name_, t in d["targets"].items():
                parts.append(f"- Matched accuracy, {name_}: cheapest within 1% is "
                             f"{t['setting']} (error {t['error']:.1e}); GD's is "
                             f"{t['gd_setting']}" + (f" (error {t['gd_error']:.1e})"
                                                     if t.get("gd_error") is not None
                                                     else "") + ".")
            parts.append("")
        if isinstance(d.get("runs"), dict):  # rows measured in more than one run
            parts += [f"Rows {label}: " + _machine_line({"machine": m})
                      for label, m in d["runs"].items()] + [""]
        if d.get("remeasured"):
            r = d["remeasured"]
            parts += [f"Re-measured rows ({', '.join(r['rows'])}): {r['why']}. "
                      + _machine_line({"machine": r["machine"]}), ""]
        if name in ("verify", "verify_cases100"):
            for run in d["runs"]:
                parts.append(f"- {run['run']} cache: {run['wall_s']:.0f} s wall, "
                             f"{run['cpu_s']:.0f} s CPU, {run['passed']}/{run['checks']} "
                             f"checks passed; {run['summary']}")
            if "pytest" in d:
                p = d["pytest"]
                parts += [f"- `python -m pytest` (the default run, `-n auto` on "
                          f"{d['machine']['cores']} cores): {p['wall_s'] / 60:.1f} min wall, "
                          f"{p['cpu_s'] / 60:.1f} min CPU; {p['summary']}. Slowest:", ""]
                parts.append(C.table(p["slowest"], ["seconds", "phase", "test"],
                                     {"seconds": ".1f"}, file=io.StringIO()))
            parts.append("")
        if name == "vector_field":
            parts += ["Rosenbrock-W linear algebra on P, priced in gradient evaluations "
                      "(init std 0.05):", "", d["rebuild_table"], ""]
            parts += ["Dense float64 matmul rate (1000³): " + ", ".join(
                f"{k}: {v:.1f} GFLOP/s" for k, v in d["matmul_gflops"].items()) + ".", ""]
    return "\n".join(parts)


def render(notes: str, data) -> str:
    vals = values(data)

    def sub(match):
        key, _, fmt = match.group(1).strip().partition(":")
        if key not in vals:
            close = [k for k in vals if k.split(".")[0] == key.split(".")[0]][:40]
            raise KeyError(f"notes.md quotes {key!r}, which is not in the results; "
                           f"some keys: {close}")
        v = vals[key]
        if fmt:
            return format(v, fmt)
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    text = re.sub(r"\{\{([^{}]+)\}\}", sub, notes)
    text = text.replace("<!-- targets -->", targets_table(data))
    text = text.replace("<!-- results -->", results_sections(data))
    return text


def main(args=None):
    if args is not None and getattr(args, "keys", False):
        for k, v in values().items():
            print(f"{k} = {v!r}")
        return
    data = {name: _load(name) for name, *_ in SECTIONS}
    DOCS.write_text(render(NOTES.read_text(), data).rstrip() + "\n")
    print(f"wrote {DOCS}")


def add_arguments(p):
    p.add_argument("--keys", action="store_true",
                   help="list the values notes.md can quote ({{key}}) and exit")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    main(p.parse_args())
