#!/usr/bin/env bash
# Build the documentation site into site/ with `mkdocs build --strict`.
#
# Installs nothing: run it in an environment with `pip install -e '.[docs]'` (CI does).
# The tutorials, theory pages and API examples are executed during the build
# (markdown-exec), so a broken example, a failed check, a broken link or cross-reference,
# or a public name missing from the API reference fails it (exit status 1).
#
#   bash docs/build.sh            # uses .venv/bin/python if it exists, else python3
#   PYTHON=/path/to/python bash docs/build.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export MPLBACKEND=Agg               # figures are rendered off-screen
export NO_MKDOCS_2_WARNING=1        # silence mkdocs-material's banner about MkDocs 2
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
# The examples' programs run for moments and compile for seconds: XLA's classic CPU
# emitter at LLVM level 0 compiles them about twice as fast (the build: 119 s against
# 223 s), as in the test run (tests/plugin.py). Set XLA_FLAGS (even empty) to override.
export XLA_FLAGS="${XLA_FLAGS---xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false}"
start=$(date +%s)
"$PYTHON" -m mkdocs build --strict --clean "$@"
echo "docs: built site/ in $(( $(date +%s) - start ))s"
