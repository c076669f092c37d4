"""`gradflow` command line."""

import argparse
import sys
import time
from pathlib import Path

from .experiments import EXPERIMENTS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="gradflow",
        description="Exact gradient flow of factorized models, and the theory checked on it.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a named experiment (writes PNG + JSON)")
    run_sub = run.add_subparsers(dest="experiment", required=True)
    for name, module in EXPERIMENTS.items():
        p = run_sub.add_parser(name, help=module.__doc__.splitlines()[0],
                               description=module.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.add_argument("--out", type=Path, default=None,
                       help=f"output folder (default runs/{name})")
        p.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    module = EXPERIMENTS[args.experiment]
    out = args.out or Path("runs") / args.experiment
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    module.run(args, out, progress=not args.quiet)
    print(f"[{args.experiment}] done in {time.perf_counter() - start:.1f}s; "
          f"results in {out}/", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
