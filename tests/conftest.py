import atexit
import gc
import os
import sys

import jax
import jaxtyping
import pytest
from jaxtyping import install_import_hook

# The command line turns on JAX's persistent compilation cache for the process that runs
# it; the tests call it in-process, so keep the cache out of the test run (its own test
# runs the CLI in a subprocess).
os.environ["GRADFLOW_NO_CACHE"] = "1"

jax.config.update("jax_enable_x64", True)
# Strict promotion: mixing float32 and float64 (or an int array with a float array)
# must be explicit; an implicit rank promotion ((d, R) * (R,)) must be written with the
# axis it means ([None, :]).
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

# Runtime checks of gradflow's annotations (as Diffrax's tests do): every function and
# dataclass of the package, imported from here on, is checked by beartype through
# jaxtyping, array shapes and dtypes included. An int is accepted where `float` is
# annotated (PEP 484's numeric tower), as Python itself does. Installed before anything
# imports gradflow; a module imported later (lazily) is instrumented as well.
install_import_hook(
    "gradflow", "beartype.beartype(conf=beartype.BeartypeConf(is_pep484_tower=True))")

# These tests give the entry points wrong arguments on purpose (a string for `dims`, a
# float for `depth`, a list for `std`, ...) to check the errors gradflow itself raises:
# a ValueError or TypeError naming the argument, which is what a user (who runs no type
# checker) gets. The runtime type checker would answer first, so it is off while they
# run (their fixtures, built from valid arguments, are still checked).
UNCHECKED = {  # module -> its tests that pass wrong arguments (None: all of them)
    "test_inputs.py": None,
    "test_inputs_and_properties.py": None,
    "test_inputs_properties_more.py": None,
    "test_descent.py": {"test_bad_arguments", "test_bad_optimizers_and_models"},
    "test_diagonal.py": {"test_bad_model_arguments"},
    "test_experiment_configs.py": {"test_config_refuses_a_bad_value_naming_the_field"},
    "test_htf.py": {"test_invalid_arguments_are_named"},
    "test_matrix.py": {"test_bad_inputs"},
    "test_options.py": {"test_absolute_loss_objective_is_the_mean_absolute_residual",
                        "test_cp_observers_against_hand_computations"},
}


def _unchecked(item) -> bool:
    if item.path.name not in UNCHECKED:
        return False
    names = UNCHECKED[item.path.name]
    return names is None or getattr(item, "originalname", item.name) in names


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    jaxtyping.config.update("jaxtyping_disable", _unchecked(item))
    try:
        return (yield)
    finally:
        jaxtyping.config.update("jaxtyping_disable", False)


RELEASE_AFTER = 6 * 2**30
"""Growth of a test process's resident memory (bytes) since the start (or the last
release) after which a module's end drops JAX's compiled programs and traces."""


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


_released_at = [_resident_bytes() or 0]
gc.set_threshold(*gc.get_threshold()[:2], 1_000_000)  # full passes: at a module's end


@pytest.fixture(scope="module", autouse=True)
def _keep_compiled_programs():
    """Keep JAX's compiled programs and traces from module to module, for the next
    modules that build the same programs (the suite ran 15% faster than when it dropped
    them after every module), and out of the garbage collector's way.

    - Memory: a worker grows to about 5 GiB over the whole suite. When its resident
      memory has grown by `RELEASE_AFTER` since the start (or the last release), or
      cannot be read, the caches are dropped. (Growth, not size: memory that Python
      frees stays resident, so a size limit, once passed, would drop them after every
      later module.)
    - Garbage collection: the collector's full passes, which Python runs each time its
      oldest generation has grown by a quarter, walked the kept traces again and again
      (30 s of the suite's CPU time). They run at a module's end instead, and what
      survives is frozen (`gc.freeze`), so that the next pass walks only what the next
      module made. The young generations are collected as usual; the workers' memory
      is as without this (at most 5.5 GiB).
    """
    yield
    resident = _resident_bytes()
    if resident is None or resident - _released_at[0] > RELEASE_AFTER:
        gc.unfreeze()
        jax.clear_caches()
        _released_at[0] = resident or 0
    gc.collect()
    gc.freeze()


HEAVY_FIRST = ["test_sweep.py", "test_cp_flow.py", "test_accuracy.py", "test_inputs.py",
               "test_verify.py", "test_float32.py", "test_htf_experiments.py", "test_cli.py",
               "test_htf.py", "test_differentiable.py", "test_diagonal.py", "test_matrix.py",
               "test_tensor_completion.py", "test_options.py"]
"""The modules that take longest (20-70 s each), longest first; the others follow in
the order pytest collects them."""


def pytest_collection_modifyitems(items):
    """Hand the modules to the workers longest first (pyproject's addopts turn off
    xdist's own order, which is by number of tests), so that the short ones fill the
    end and both workers finish together."""
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_unconfigure(config):
    """A worker ends without Python's finalization, which took 5 s at the end of the
    run to free, object by object, the gigabytes of traces that the exit frees at once
    (the worker's results are already sent; its exit status is not read)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        atexit.register(_exit_now)  # the first handler to run: registered last


def _exit_now():
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
