"""One driver for gradflow's benchmarks (issue 5); each subcommand is one benchmark.

    .venv/bin/python benchmarks/run.py init-scale      [--quick] [...]   # 1
    .venv/bin/python benchmarks/run.py work-precision  [--quick|--full]  # 2 (+ plot)
    .venv/bin/python benchmarks/run.py vector-field    [--quick]         # 3
    .venv/bin/python benchmarks/run.py torch           [--quick]         # 4 (needs torch)
    .venv/bin/python benchmarks/run.py compile         [--quick]         # 5
    .venv/bin/python benchmarks/run.py sweep           [--quick]         # issue 6
    .venv/bin/python benchmarks/run.py htf             [--quick] [...]   # issue 15
    .venv/bin/python benchmarks/run.py htf-accuracy    [--quick] [...]   # issue 15
    .venv/bin/python benchmarks/run.py default-solver  [--quick] [...]   # issue 15
    .venv/bin/python benchmarks/run.py diagonal        [--quick] [...]   # issue 18
    .venv/bin/python benchmarks/run.py verify          [--pytest] [...]  # issue 17
    .venv/bin/python benchmarks/run.py report          # docs/benchmarks.md from results/

Each prints its table and writes JSON under `benchmarks/results/`; `--help` after a
subcommand lists its options.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compile_time
import default_solver
import diagonal
import htf
import htf_accuracy
import init_scale
import report
import sweep
import torch_gd
import vector_field
import verify_time
import work_precision

COMMANDS = {
    "init-scale": init_scale,
    "work-precision": work_precision,
    "vector-field": vector_field,
    "torch": torch_gd,
    "compile": compile_time,
    "sweep": sweep,
    "htf": htf,
    "htf-accuracy": htf_accuracy,
    "default-solver": default_solver,
    "diagonal": diagonal,
    "verify": verify_time,
    "report": report,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        p = sub.add_parser(name, help=module.__doc__.splitlines()[0],
                           description=module.__doc__.splitlines()[0])
        if hasattr(module, "add_arguments"):
            module.add_arguments(p)
        elif name == "compile":
            p.add_argument("--quick", action="store_true")
            p.add_argument("--out", default=None)
    args = parser.parse_args()
    module = COMMANDS[args.command]
    del args.command
    module.main(args)


if __name__ == "__main__":
    main()
