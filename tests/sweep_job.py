"""A small sweep run as a separate process by tests/test_sweep.py (devices, processes,
kill, concurrent writers).

Usage: `python sweep_job.py OUT MODE`, MODE one of `fast`, `stall` (the second chunk's
write stalls halfway, for two minutes), `process<i>of<n>:<port>` (one process of a JAX
multi-process run) or `shared:<folder>` (a writer among others of one OUT, whose chunks
take at least 2 s each: it waits until two writers have touched a file in <folder>, so
that they start together, and prints `wrote chunk_NNNNN.npz` for each chunk it computed).
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


def problem(params, delay=0.0):
    import gradflow as gf

    if delay:  # a chunk takes at least `delay` seconds, so a kill can land between chunks
        jax.debug.callback(lambda: time.sleep(delay))
    dims = (3, 3, 3)
    truth = gf.random_cp_tensor(jr.key(0), dims, 2)
    objective = gf.Completion.from_tensor(truth, gf.sample_indices(jr.key(1), dims, 15))
    return gf.CP.gaussian(jr.key(params["seed"]), dims, 5, params["scale"]), objective


def run(out, chunk_size=2, progress=False, delay=0.0):
    import gradflow as gf

    solve = problem if not delay else lambda params: problem(params, delay)
    return gf.sweep(solve, GRID, t1=1e9, loss_drop=1e-3, save_times=SAVE_TIMES,
                    observers=["component_norms"], out=out, chunk_size=chunk_size,
                    order_by="scale", tag={"job": "tests/sweep_job.py"}, progress=progress)


if __name__ == "__main__":
    out, mode = sys.argv[1], sys.argv[2]
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
        barrier = Path(mode[len("shared:"):])
        (barrier / f"ready_{os.getpid()}").touch()
        deadline = time.time() + 300
        while len(list(barrier.glob("ready_*"))) < 2 and time.time() < deadline:
            time.sleep(0.05)
    slow = mode.startswith("shared:")  # a chunk takes >= 2 s: the writers overlap
    result = run(out, progress=slow, delay=2.0 if slow else 0.0)
    print("devices", len(jax.local_devices()), "members", len(result), flush=True)
