import gc
import os

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


RELEASE_ABOVE = 3 * 2**30
"""Resident memory (bytes) of a test process above which a module's end drops JAX's
compiled programs and traces."""


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drop the compiled programs when a test module ends if the process holds more than
    `RELEASE_ABOVE` (or its memory cannot be read), so that the memory of one long
    pytest process stays bounded: each module adds about half a GiB of compiled solves.
    Below it they are kept, for the next modules that build the same programs (the
    suite ran 15% faster than when it dropped them after every module)."""
    yield
    resident = _resident_bytes()
    if resident is None or resident > RELEASE_ABOVE:
        jax.clear_caches()
        gc.collect()
