"""A small sweep run as a separate process by tests/test_sweep.py (devices, processes,
kill, concurrent writers).

Usage: `python sweep_job.py OUT MODE`, MODE one of `stall` (the second chunk's write
stalls halfway, for two minutes), `process<i>of<n>:<port>` (one process of a JAX
multi-process run) or `shared:<folder>` (a writer among others of one OUT: its first
chunk, once compiled, waits until two writers have touched a file in <folder>, so that
the writers compute together; every chunk then takes at least 0.5 s; it prints
`wrote chunk_NNNNN.npz` for each chunk it computed).
"""

import os
import sys
import time
from pathlib import Path

import jax
import jax.random as jr
import numpy as np

GRID = {"scale": [0.3, 0.1, 0.03], "seed": [0, 1]}
SAVE_TIMES = np.concatenate([[0.0], np.geomspace(1e-2, 1e9, 40)])


def problem(params, pause=None):
    import gradflow as gf

    if pause is not None:  # called each time a chunk runs (compiled, before its solves)
        jax.debug.callback(pause)
    dims = (3, 3, 3)
    truth = gf.random_cp_tensor(jr.key(0), dims, 2)
    objective = gf.Completion.from_tensor(truth, gf.sample_indices(jr.key(1), dims, 15))
    return gf.CP.gaussian(jr.key(params["seed"]), dims, 5, params["scale"]), objective


def run(out, chunk_size=2, progress=False, pause=None):
    import gradflow as gf

    solve = problem if pause is None else lambda params: problem(params, pause)
    return gf.sweep(solve, GRID, t1=1e9, loss_drop=1e-3, save_times=SAVE_TIMES,
                    observers=["component_norms"], out=out, chunk_size=chunk_size,
                    order_by="scale", tag={"job": "tests/sweep_job.py"}, progress=progress)


def _meet_then_wait(barrier: Path, seconds: float):
    """A pause for `problem`: the first call waits for a second writer at `barrier`."""
    met = []

    def pause():
        if not met:
            (barrier / f"ready_{os.getpid()}").touch()
            deadline = time.time() + 300
            while len(list(barrier.glob("ready_*"))) < 2 and time.time() < deadline:
                time.sleep(0.02)
            met.append(True)
        time.sleep(seconds)

    return pause


if __name__ == "__main__":
    out, mode = sys.argv[1], sys.argv[2]
    pause = None
    if mode.startswith("process"):  # process<i>of<n>:<port>
        ident, port = mode[len("process"):].split(":")
        index, count = (int(x) for x in ident.split("of"))
        jax.distributed.initialize(f"localhost:{port}", num_processes=count, process_id=index)
    if mode == "stall":  # the writer's test hook stalls the writes after the first
        from gradflow import _sweep

        write, written = _sweep._write_chunk, []

        def stalling(path, chunk):
            if written:
                os.environ[_sweep.WRITE_DELAY_ENV] = "120"
            write(path, chunk)
            written.append(path)

        _sweep._write_chunk = stalling
    if mode.startswith("shared:"):
        from gradflow import _sweep

        write = _sweep._write_chunk

        def logged(path, chunk):
            write(path, chunk)
            print("wrote", path.name, flush=True)

        _sweep._write_chunk = logged
        pause = _meet_then_wait(Path(mode[len("shared:"):]), 0.5)
    result = run(out, progress=pause is not None, pause=pause)
    print("devices", len(jax.local_devices()), "members", len(result), flush=True)
