import gc
import os

import jax
import pytest

# The command line turns on JAX's persistent compilation cache for the process that runs
# it; the tests call it in-process, so keep the cache out of the test run (its own test
# runs the CLI in a subprocess).
os.environ["GRADFLOW_NO_CACHE"] = "1"

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Each test module's compiled programs are dropped when it ends, so that the memory
    of one long pytest process stays bounded (hundreds of compiled solves otherwise)."""
    yield
    jax.clear_caches()
    gc.collect()
