"""`gradflow` command line."""

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

from .experiments import EXPERIMENTS
from .experiments import _config


CACHE_ENV = "GRADFLOW_NO_CACHE"
"""Set to 1 to run the command line without JAX's persistent compilation cache."""


def cache_dir() -> Path:
    """Where the command line keeps JAX's persistent compilation cache: the compiled
    XLA programs of the solves it ran, keyed by program and JAX version, so that a
    second run of the same command skips compilation
    (`$XDG_CACHE_HOME/gradflow/jax`, by default `~/.cache/gradflow/jax`)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gradflow" / "jax"


def _use_cache(enabled: bool) -> None:
    if not enabled or os.environ.get(CACHE_ENV, "0") not in ("0", "", "false", "no"):
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", str(cache_dir()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="gradflow",
        description="Exact gradient flow of factorized models, and the theory checked on it.",
    )
    parser.add_argument("--no-cache", action="store_true",
                        help="do not use JAX's persistent compilation cache (kept in "
                             f"{cache_dir()}; the environment variable {CACHE_ENV}=1 does "
                             "the same)")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a named experiment (writes PNG + JSON)")
    run_sub = run.add_subparsers(dest="experiment", required=True)
    parsers = {}
    for name, module in EXPERIMENTS.items():
        p = parsers[name] = run_sub.add_parser(
            name, help=(module.__doc__ or name).splitlines()[0], description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        _config.add_arguments(p, module.Config)
        p.add_argument("--out", type=Path, default=None,
                       help=f"output folder (default runs/{name}; created when the run "
                            "first writes)")
        p.add_argument("--quiet", action="store_true", help="no progress output")
    sweep = sub.add_parser("sweep", help="an experiment over init scales x seeds, compiled "
                           "once, saved chunk by chunk (re-run to resume)")
    sweep_sub = sweep.add_subparsers(dest="experiment", required=True)
    for name, module in EXPERIMENTS.items():
        if not hasattr(module, "sweep_setup"):
            continue
        # the sweep's own flags replace an experiment's settings of those names
        p = parsers["sweep " + name] = sweep_sub.add_parser(
            name, help=(module.__doc__ or name).splitlines()[0], description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        _config.add_arguments(p, module.Config, exclude=SWEEP_FLAGS)
        p.add_argument("--scales", default="1e-1:1e-3:5",
                       help="init scales: START:STOP:NUM (geometric) or a comma list")
        p.add_argument("--seeds", type=_positive_int, default=2, help="seeds per scale")
        p.add_argument("--chunk-size", type=_positive_int, default=4,
                       help="members solved together")
        p.add_argument("--out", type=Path, default=None,
                       help=f"output folder (default runs/sweep-{name})")
        p.add_argument("--quiet", action="store_true", help="no progress output")
    verify = sub.add_parser(
        "verify", help="check every theorem on random instances; exit 1 if any fails",
        description="Draw random instances of every registered theorem check, integrate "
                    "them, and print check, cases, worst residual, tolerance and verdict.")
    verify.add_argument("--only", nargs="+", metavar="NAME", help="run only these checks")
    verify.add_argument("--cases", type=_positive_int, default=3,
                        help="instances per check (default 3)")
    verify.add_argument("--seed", type=int, default=0)
    verify.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")
    verify.add_argument("--import", dest="imports", nargs="+", default=[], metavar="MODULE",
                        help="modules or .py files that register more checks first")
    verify.add_argument("--case", type=_case_index, nargs="+", default=None, metavar="K",
                        help="run only instance(s) K of each check (the re-run of a failure)")
    verify.add_argument("--list", action="store_true",
                        help="list the checks, their instance draws and shapes, and exit")
    args = parser.parse_args(argv)
    _use_cache(not args.no_cache)
    if args.command == "verify":
        return _verify(args, verify)
    if args.command == "sweep":
        return _sweep(args, parsers["sweep " + args.experiment])
    module, p = EXPERIMENTS[args.experiment], parsers[args.experiment]
    out = args.out or Path("runs") / args.experiment
    if out.exists() and not out.is_dir():
        p.error(f"argument --out: {out} exists and is not a folder")
    config = _config.from_args(module.Config, args, p)  # validated before any output
    start = time.perf_counter()
    try:
        module.run(config, out=out, progress=not args.quiet)  # creates `out` when it writes
    except (ValueError, TypeError) as error:
        _refuse(error, p, args, module.Config)
    print(f"[{args.experiment}] done in {time.perf_counter() - start:.1f}s; "
          f"results in {out}/", flush=True)
    return 0


SWEEP_FLAGS = ("scales", "seeds", "chunk_size")
"""The flags of `gradflow sweep` itself; an experiment's settings of these names keep
their defaults in a sweep."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {value}")
    return value


def _refuse(error: Exception, parser: argparse.ArgumentParser, args,
            config_cls) -> NoReturn:
    """A setting refused while the command ran (a check that needs the data, or one of
    the library's on a value the experiment passed on) as an argparse error naming the
    flag (exit status 2); any other error is raised as it is."""
    names = set(vars(args)) | {f.name for f in dataclasses.fields(config_cls)}
    if not (isinstance(error, _config.SettingError)
            or any(f"`{name}`" in str(error) for name in names)):
        raise error
    parser.error(_flag_names(str(error), names))


def _flag_names(message: str, names) -> str:
    """`loss_drop` -> `--loss-drop` for the flags of this command."""
    for name in names:
        message = message.replace(f"`{name}`", f"`{_config.flag(name)}`")
    return message


def _sweep(args, parser) -> int:
    from . import sweep_report

    module = EXPERIMENTS[args.experiment]
    out = args.out or Path("runs") / f"sweep-{args.experiment}"
    if out.exists() and not out.is_dir():
        parser.error(f"argument --out: {out} exists and is not a folder")
    config = _config.from_args(module.Config, args, parser, exclude=SWEEP_FLAGS)
    try:
        scales = sweep_report.parse_scales(args.scales)
    except ValueError as error:
        parser.error(str(error))
    start = time.perf_counter()
    try:
        summary = sweep_report.run(module, config, out, scales=scales, seeds=args.seeds,
                                   chunk_size=args.chunk_size, progress=not args.quiet)
    except (ValueError, TypeError) as error:
        _refuse(error, parser, args, module.Config)
    if not args.quiet:
        for row in summary["per_scale"]:
            print(json.dumps(row), flush=True)
        print(f"escape time ~ scale^{summary['escape_time_slope']:.2f} "
              f"(theory: {summary['expected_slope']})", flush=True)
    print(f"[sweep {args.experiment}] done in {time.perf_counter() - start:.1f}s; "
          f"results in {out}/", flush=True)
    return 0


def _import(name: str, parser: argparse.ArgumentParser) -> None:
    if name.endswith(".py"):
        spec = importlib.util.spec_from_file_location(Path(name).stem, name)
        if spec is None or spec.loader is None or not Path(name).is_file():
            parser.error(f"argument --import: no such file {name!r}")
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    else:
        importlib.import_module(name)


def _case_index(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative int, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative int, got {value}")
    return value


def _verify(args, parser) -> int:
    from . import verify
    from .verify.registry import describe_bucket

    for name in args.imports:
        _import(name, parser)
    unknown = [n for n in (args.only or []) if n not in verify.CHECKS]
    if unknown:
        parser.error(f"argument --only: unknown check(s) {unknown}; known: "
                     f"{sorted(verify.CHECKS)}")
    if args.list:
        for check in verify.CHECKS.values():
            print(f"{check.name:<26} {check.statement}\n{'':<26} when: {check.preconditions}")
            if check.buckets:
                shapes = "; ".join(f"[{i}] {describe_bucket(b)}"
                                   for i, b in enumerate(check.buckets))
                print(f"{'':<26} shapes (instance k in bucket k mod {len(check.buckets)}): "
                      f"{shapes}")
        return 0
    print(verify.HEADER, flush=True)

    def show(result):
        print(verify.format_row(result), flush=True)
        if not result.passed:
            print(f"{'':<4}failed {result.failed_case}" + (f"; {result.error}" if result.error
                                                          else ""), flush=True)
            print(f"{'':<4}re-run: {result.rerun(args.imports)}", flush=True)

    start, cpu = time.perf_counter(), time.process_time()
    before = verify.registry.compiled_programs()
    try:
        results = verify.run_checks(args.only, args.cases, args.seed, on_result=show,
                                    case=args.case)
    except ValueError as error:  # a bad --case or --cases for a check
        parser.error(_flag_names(str(error), ("cases", "case")).replace("`names`", "`--only`"))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    failed = [r.name for r in results if not r.passed]
    print(f"{len(results) - len(failed)}/{len(results)} checks passed"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""), flush=True)
    programs = {k: v - before[k] for k, v in verify.registry.compiled_programs().items()}
    print(f"{sum(r.cases for r in results)} instances in {programs['batched']} batched solve "
          f"programs (+ {programs['alone']} solved alone); {wall:.1f}s wall, {cpu:.1f}s CPU",
          flush=True)
    if args.json:
        args.json.write_text(json.dumps(
            {"cases": args.cases, "case": args.case, "seed": args.seed,
             "wall_seconds": wall, "cpu_seconds": cpu,
             "results": [r.__dict__ | {"passed": r.passed, "rerun": r.rerun(args.imports)}
                         for r in results]}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
