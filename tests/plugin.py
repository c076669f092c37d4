"""pytest plugin of the test suite (loaded by pyproject's addopts, `-p tests.plugin`).

One JAX persistent compilation cache for the whole run, shared by the xdist workers:
each worker would otherwise compile the same small programs as the other (eager ops such
as `jax.random.normal` of a shape, the models' `full()`), and again after
`tests/conftest.py` drops its compiled programs (when the worker's memory has grown by
6 GiB, which the default run does not reach).
Programs with host callbacks — the solves, whose Equinox run-time checks are callbacks —
are never written to it by JAX, so it serves the small programs only (about 10% of the
suite's CPU time).

The folder is a temporary one, created by the process that starts the run (the xdist
controller, or the only process with `-n 0`), handed to the workers in the environment
variable `GRADFLOW_TEST_COMPILATION_CACHE` and removed at the end. Set that variable to a
folder to keep the cache across runs, or to `off` for none. Subprocesses that tests start
inherit the variable but do not use the cache: a sweep job finds 6 of its small programs
there and runs no faster.

The run also compiles with two XLA options that make compilation about twice as fast
(`XLA_FLAGS=--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false`,
unless the environment sets XLA_FLAGS): most of the suite's time is compilation of programs
that then run for milliseconds. XLA's MLIR fusion emitters compile each fused kernel
through an MLIR pipeline of its own; without them (XLA's classic emitter) a default solve
compiles in half the time, and with LLVM's optimization at level 0 the long solves run
faster than with the MLIR emitters at level 0 (7,364 steps of a 10x10x10 CP flow: 11.7 s
against 15.1 s; 7.4 s at XLA's defaults). Results may differ from the defaults' in the
last bits (fused multiply-adds, the order of a reduction), within every test's
tolerance; the suite passes with XLA's defaults as well (`XLA_FLAGS=" " pytest` runs it
as users' programs are compiled).
"""

import os
import shutil
import tempfile

ENV = "GRADFLOW_TEST_COMPILATION_CACHE"
FLAGS = {"--xla_backend_optimization_level": "0", "--xla_cpu_use_fusion_emitters": "false"}


def use_cache() -> None:
    """Turn on the run's cache in this process (a no-op without the variable, or `off`)."""
    path = os.environ.get(ENV, "off")
    if path in ("", "off"):
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_configure(config):
    flags = os.environ.get("XLA_FLAGS")
    if flags is None:  # before JAX starts its backend; the workers inherit it
        os.environ["XLA_FLAGS"] = " ".join(f"{k}={v}" for k, v in FLAGS.items())
    if not hasattr(config, "workerinput") and ENV not in os.environ:  # the run's first process
        config._gradflow_compilation_cache = tempfile.mkdtemp(prefix="gradflow-tests-jax-")
        os.environ[ENV] = config._gradflow_compilation_cache
    use_cache()


def pytest_unconfigure(config):
    path = getattr(config, "_gradflow_compilation_cache", None)
    if path is not None:
        os.environ.pop(ENV, None)
        shutil.rmtree(path, ignore_errors=True)
