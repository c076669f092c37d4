"""Sweeps: compiled once, equal to one-by-one flows, resumable, sharded, multi-process."""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import gradflow as gf
from gradflow.cli import main

sys.path.insert(0, str(Path(__file__).parent))
import sweep_job

JOB = Path(__file__).parent / "sweep_job.py"


def _spawn(out, mode, env=None):
    return subprocess.Popen([sys.executable, str(JOB), str(out), mode], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _same(a, b):
    assert list(a.status) == list(b.status)
    np.testing.assert_array_equal(a.steps, b.steps)
    np.testing.assert_allclose(a.t_final, b.t_final, rtol=1e-12)
    np.testing.assert_allclose(a.observations["component_norms"],
                               b.observations["component_norms"], rtol=1e-10, atol=1e-14)


@contextlib.contextmanager
def _counting_traces():
    """The list of the traces of sweep chunks' programs made inside the block
    (`_sweep._member` is called when a chunk's program is traced, and only then)."""
    from gradflow import _sweep

    traces, member = [], _sweep._member
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_sweep, "_member", lambda *a: traces.append(1) or member(*a))
        yield traces


REFERENCE_TRACES = []


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """sweep_job's sweep: 6 members in 3 chunks."""
    with _counting_traces() as traces:
        result = sweep_job.run(tmp_path_factory.mktemp("reference"))
    REFERENCE_TRACES.extend(traces)
    return result


def test_compiled_once_and_equal_to_single_flows(reference):
    assert len(REFERENCE_TRACES) == 1  # one trace for its 3 chunks
    grid_a = {"scale": [0.3, 0.1], "seed": [0, 1]}
    grid_b = {"scale": [0.2, 0.05], "seed": [2, 3]}  # same chunk shape, other values
    with _counting_traces() as traces:
        for grid in (grid_a, grid_b):
            gf.sweep(sweep_job.problem, grid, t1=1e9, loss_drop=1e-3, chunk_size=2,
                     save_times=sweep_job.SAVE_TIMES, observers=["component_norms"])
    assert traces == []  # both grids, all their chunks: the reference's program
    assert reference.ok.all() and len(reference) == 6
    for i in (0, 5):
        params = {k: jnp.asarray(v[i]) for k, v in reference.params.items()}
        model, objective = sweep_job.problem(params)
        tr = gf.flow(model, objective, t1=1e9, loss_tol=1e-3 * float(objective(model)),
                     save_times=sweep_job.SAVE_TIMES, observers=["component_norms"])
        assert tr.stats["steps"] == reference.steps[i]
        assert tr.t_final == pytest.approx(reference.t_final[i], rel=1e-12)
        n = len(tr.ts) - 1  # the saves before the end
        np.testing.assert_allclose(reference.observations["component_norms"][i, :n],
                                   tr["component_norms"][:n], rtol=1e-10, atol=1e-14)
        assert np.isnan(reference.observations["component_norms"][i, n:]).all()


def _names_in(folder):
    return sorted(p.name for p in folder.iterdir())


CHUNKS = ["chunk_00000.npz", "chunk_00001.npz", "chunk_00002.npz"]


def test_resume_after_sigkill_during_a_chunk_write(tmp_path, reference):
    # The job writes its first chunk; the writer's test hook writes half of the second
    # chunk's temporary file, then sleeps before the rest and the rename: the kill lands
    # inside that write, after a finished chunk.
    out = tmp_path / "out"
    proc = _spawn(out, "stall")
    deadline = time.time() + 300
    while not list(out.glob(".chunk_00001.npz.*.tmp")) and time.time() < deadline:
        time.sleep(0.05)
        assert proc.poll() is None, proc.stdout.read()
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = _names_in(out)
    assert [n for n in left if n.startswith("chunk_")] == CHUNKS[:1]  # finished before it
    temporary = [n for n in left if n.endswith(".tmp")]
    assert len(temporary) == 1 and ".chunk_00001.npz.lock" in left  # a claim left by the dead
    assert (out / temporary[0]).stat().st_size > 0
    # temporary and lock files are not results
    assert len(gf.SweepResult.load(out)) == 2
    alone = tmp_path / "alone"
    alone.mkdir()
    for name in ("config.json", temporary[0], ".chunk_00001.npz.lock"):
        shutil.copy(out / name, alone / name)
    with pytest.raises(ValueError, match="no finished chunks"):
        gf.SweepResult.load(alone)
    finished = (out / CHUNKS[0]).stat().st_mtime_ns
    resumed = sweep_job.run(out)  # takes over the dead writer's claim
    assert (out / CHUNKS[0]).stat().st_mtime_ns == finished  # not redone
    assert _names_in(out) == CHUNKS + ["config.json"]  # its leftovers removed
    _same(resumed, reference)
    _same(gf.SweepResult.load(out), reference)


def test_concurrent_writers_of_one_folder_compute_each_chunk_once(tmp_path, reference):
    out, barrier = tmp_path / "shared", tmp_path / "barrier"
    barrier.mkdir()
    procs = [_spawn(out, f"shared:{barrier}") for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    wrote = [re.findall(r"wrote (chunk_\d{5}\.npz)", o) for o in outputs]
    assert sorted(wrote[0] + wrote[1]) == CHUNKS, wrote  # each chunk computed once
    assert wrote[0] and wrote[1], wrote  # the second writer picked up the chunks left
    assert all("members 6" in o for o in outputs)  # each returns the whole sweep
    assert _names_in(out) == CHUNKS + ["config.json"]  # no claim or temporary file left
    _same(gf.SweepResult.load(out), reference)


def test_claims_of_live_and_dead_writers(tmp_path):
    from gradflow import _sweep

    path = tmp_path / "chunk_00000.npz"
    with _sweep._claim(path) as claim:
        assert claim.lock.name == ".chunk_00000.npz.lock"
        assert _sweep._claim(path) is None  # held by a live writer (this one)
    assert not claim.lock.exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    claim.lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid,
                                      "time": time.time()}))
    with _sweep._claim(path) as taken:  # a dead writer's claim is taken over
        assert json.loads(taken.lock.read_text())["pid"] == os.getpid()
    claim.lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "time": 0.0}))
    assert _sweep._claim(path) is None  # another host's live claim...
    old = time.time() - _sweep.LOCK_STALE_S - 1
    os.utime(claim.lock, (old, old))
    with _sweep._claim(path):  # ...until it is not refreshed for LOCK_STALE_S
        pass
    assert _names_in(tmp_path) == []


def test_conflicting_output_folder_is_refused(tmp_path):
    sweep_job.run(tmp_path)
    with pytest.raises(ValueError, match="different configuration"):
        gf.sweep(sweep_job.problem, {"scale": [0.3], "seed": [0]}, t1=1e9, out=tmp_path)


def test_two_processes_of_two_devices_split_the_sweep(tmp_path, reference):
    # a JAX multi-process run: the processes split the chunks, and each process splits
    # its chunks' members across its two (host) devices
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
    env = dict(os.environ, XLA_FLAGS=flags.strip())  # with the run's compile options
    procs = [_spawn(tmp_path, f"process{i}of2:{port}", env) for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    # 3 chunks of 2 members: chunks 0 and 2 in process 0, chunk 1 in process 1
    assert "devices 2 members 4" in outputs[0], outputs[0]
    assert "devices 2 members 2" in outputs[1], outputs[1]
    assert len(list(tmp_path.glob("chunk_*.npz"))) == 3
    _same(gf.SweepResult.load(tmp_path), reference)


def test_bad_arguments():
    with pytest.raises(ValueError, match="grid"):
        gf.sweep(sweep_job.problem, {}, t1=1.0)
    with pytest.raises(ValueError, match=r"grid\['scale'\]"):
        gf.sweep(sweep_job.problem, {"scale": [0.1, np.nan]}, t1=1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        gf.sweep(sweep_job.problem, {"scale": [0.1]}, t1=1.0, chunk_size=0)
    with pytest.raises(ValueError, match="order_by"):
        gf.sweep(sweep_job.problem, {"scale": [0.1]}, t1=1.0, order_by="std")


def test_cli_sweep_plot_and_escape_law(tmp_path):
    argv = ["sweep", "tf-incremental", "--order", "3", "--dim", "4", "--truth-rank", "2",
            "--observations", "40", "--components", "8", "--scales", "1e-1:1e-2:3",
            "--seeds", "2", "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 0
    summary = __import__("json").loads((tmp_path / "summary.json").read_text())
    assert [r["members"] for r in summary["per_scale"]] == [2, 2, 2]
    # docs/theory/escape-times: escape time ~ scale^-(N-2) = scale^-1 for N = 3
    assert abs(summary["escape_time_slope"] + 1) < 0.35
    assert (tmp_path / "sweep-tf-incremental.png").stat().st_size > 10_000
    assert main(argv) == 0  # re-running resumes: nothing left to solve


def test_escape_time_is_caught_between_sparse_saves():
    # a learning phase shorter than the save spacing: the crossing lies between the
    # last save and the member's final state, interpolated in log time
    from gradflow.sweep_report import escape_times

    ts = np.array([0.0, 1.0, 10.0, 100.0])
    norms = np.array([[[0.01], [0.01], [0.02], [np.nan]],   # ends at t = 50 with norm 1
                      [[0.01], [0.6], [1.0], [1.0]]])       # crosses 0.5 between t = 0 and 1
    result = gf.SweepResult(params={"scale": np.array([1.0, 1.0])}, ts=ts,
                            observations={"component_norms": norms},
                            final={"component_norms": np.array([[1.0], [1.0]])},
                            t_final=np.array([50.0, 100.0]), status=np.array(["loss", "loss"]),
                            steps=np.array([1, 1]), config={})
    escape = escape_times(result)
    w = (0.5 - 0.02) / (1.0 - 0.02)
    assert np.isclose(escape[0], np.exp(np.log(10.0) + w * np.log(5.0)), rtol=1e-12)
    assert escape[1] == 1.0  # the first save at or above the level follows t = 0
