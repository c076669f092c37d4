"""pytest plugin of the test suite (loaded by pyproject's addopts, `-p tests.plugin`).

One JAX persistent compilation cache for the whole run, shared by the xdist workers:
`tests/conftest.py` drops each module's compiled programs when it ends (to bound the
memory of a worker), so without it every module and every worker compiled the same small
programs again (eager ops such as `jax.random.normal` of a shape, the models' `full()`).
Programs with host callbacks — the solves, whose Equinox run-time checks are callbacks —
are never written to it by JAX, so it serves the small programs only (about 10% of the
suite's CPU time).

The folder is a temporary one, created by the process that starts the run (the xdist
controller, or the only process with `-n 0`), handed to the workers in the environment
variable `GRADFLOW_TEST_COMPILATION_CACHE` and removed at the end. Set that variable to a
folder to keep the cache across runs, or to `off` for none. Subprocesses that tests start
get it in their environment and may use it (`tests/sweep_job.py` does).

The run also compiles with XLA's backend (LLVM) optimization level 1 instead of 3
(`XLA_FLAGS=--xla_backend_optimization_level=1`, unless XLA_FLAGS sets a level): most of
the suite's time is compilation of programs that then run for milliseconds, and level 1
compiles them faster while running the long solves about as fast as level 3 (level 0 runs
them twice as slowly). Results may differ from level 3's in the last bits (where the
optimizer contracts a product and a sum into a fused multiply-add), within every test's
tolerance; the suite passes at either level (`XLA_FLAGS=--xla_backend_optimization_level=3
pytest` runs it as users' programs are compiled).
"""

import os
import shutil
import tempfile

ENV = "GRADFLOW_TEST_COMPILATION_CACHE"
OPTIMIZATION = "--xla_backend_optimization_level"


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
    flags = os.environ.get("XLA_FLAGS", "")
    if OPTIMIZATION not in flags:  # before JAX starts its backend; the workers inherit it
        os.environ["XLA_FLAGS"] = f"{flags} {OPTIMIZATION}=1".strip()
    if not hasattr(config, "workerinput") and ENV not in os.environ:  # the run's first process
        config._gradflow_compilation_cache = tempfile.mkdtemp(prefix="gradflow-tests-jax-")
        os.environ[ENV] = config._gradflow_compilation_cache
    use_cache()


def pytest_unconfigure(config):
    path = getattr(config, "_gradflow_compilation_cache", None)
    if path is not None:
        os.environ.pop(ENV, None)
        shutil.rmtree(path, ignore_errors=True)
