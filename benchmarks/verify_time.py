"""How long `gradflow verify` takes: on a cold cache, then on a warm one (issue 17).

Runs the command line twice in subprocesses, exactly as a user does, with a fresh
cache folder (`XDG_CACHE_HOME` pointed at a temporary folder, so JAX's persistent
compilation cache and verify's exported programs start empty): the first run compiles
and keeps its programs, the second loads them. For each run: wall and CPU seconds (of
the command, from its own report and from the OS), the verdicts, and each check's
cases, worst residual and time. `--pytest` also times the default test run
(`python -m pytest --durations=15`) and records its slowest tests.

    .venv/bin/python benchmarks/run.py verify [--cases 3] [--only NAME ...] [--pytest]
    .venv/bin/python benchmarks/run.py verify --cases 100 --cold-only  # the long sample
"""

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common

ROOT = Path(__file__).resolve().parent.parent


def _timed(command, env) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall seconds, CPU seconds of the child, the finished process)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done


def verify_runs(cases: int, only, cache: Path, labels=("cold", "warm")) -> list[dict]:
    env = os.environ | {"XDG_CACHE_HOME": str(cache)}
    env.pop("GRADFLOW_NO_CACHE", None)
    runs = []
    for label in labels:
        report = cache / f"{label}.json"
        command = [sys.executable, "-m", "gradflow.cli", "verify", "--cases", str(cases),
                   "--json", str(report)] + (["--only", *only] if only else [])
        wall, cpu, done = _timed(command, env)
        if not report.exists():
            raise SystemExit(f"verify wrote no report ({label}):\n{done.stdout}\n{done.stderr}")
        data = json.loads(report.read_text())
        summary = [line for line in done.stdout.splitlines() if "instances in" in line]
        runs.append({
            "run": label, "wall_s": wall, "cpu_s": cpu, "exit_code": done.returncode,
            "checks": len(data["results"]),
            "passed": sum(r["passed"] for r in data["results"]),
            "summary": summary[-1] if summary else "",
            "per_check": [{"check": r["name"], "cases": r["cases"], "worst": r["worst"],
                           "tolerance": r["tolerance"], "passed": r["passed"],
                           "seconds": r["seconds"]} for r in data["results"]],
        })
        print(f"{label}: {wall:.1f} s wall, {cpu:.1f} s CPU, "
              f"{runs[-1]['passed']}/{runs[-1]['checks']} passed", flush=True)
    return runs


def pytest_run() -> dict:
    env = dict(os.environ)
    # (the project's addopts already have -q; a second one hides the summary line)
    wall, cpu, done = _timed([sys.executable, "-m", "pytest", "--durations=15"], env)
    slowest = re.findall(r"^\s*([\d.]+)s (call|setup|teardown)\s+(\S+)$", done.stdout, re.M)
    tail = [line for line in done.stdout.splitlines() if re.search(r"\d+ passed", line)]
    print(f"pytest: {wall:.1f} s wall, {cpu:.1f} s CPU: {tail[-1] if tail else done.returncode}",
          flush=True)
    return {"wall_s": wall, "cpu_s": cpu, "exit_code": done.returncode,
            "summary": tail[-1].strip(" =") if tail else f"exit code {done.returncode}",
            "slowest": [{"seconds": float(s), "phase": p, "test": t} for s, p, t in slowest]}


def main(args):
    labels = ("cold",) if args.cold_only else ("cold", "warm")
    with tempfile.TemporaryDirectory(prefix="gradflow-verify-bench-") as cache:
        runs = verify_runs(args.cases, args.only, Path(cache), labels)
    rows = [{"check": c["check"], "cases": c["cases"], "worst": c["worst"],
             "tolerance": c["tolerance"], "verdict": "PASS" if c["passed"] else "FAIL"}
            | {f"{run['run']}_s": run["per_check"][i]["seconds"] for run in runs}
            for i, c in enumerate(runs[0]["per_check"])]
    table = _common.table(rows, ["check", "cases", "worst", "tolerance", "verdict",
                                 *(f"{label}_s" for label in labels)],
                          {"worst": ".1e", "tolerance": ".0e", "cold_s": ".1f",
                           "warm_s": ".1f"})
    payload = {"args": vars(args), "runs": runs, "table": table}
    if args.pytest:
        payload["pytest"] = pytest_run()
    name = "verify" if args.cases == 3 and not args.cold_only else f"verify_cases{args.cases}"
    _common.write_results(name, payload, args.out)


def add_arguments(parser):
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--only", nargs="+", default=None)
    parser.add_argument("--cold-only", action="store_true",
                        help="one run, on the empty cache (results/verify_casesN.json)")
    parser.add_argument("--pytest", action="store_true",
                        help="also time the default test run")
    parser.add_argument("--out", default=None)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    main(parser.parse_args())
