"""`sweep`: one compiled, vmapped gradient-flow solve over a grid of hyper-parameters.

The grid's members (the cartesian product of its axes: init scale, seed, tolerance,
...) are solved in chunks of fixed size by one compiled program; each chunk is
written to disk as it finishes, so an interrupted sweep resumes where it stopped.
The chunks are split across the local devices with `shard_map`, and across the
processes of a JAX multi-process run (`jax.distributed.initialize()`).

**On-disk format** (`out/`): `config.json` (the grid and the solve's settings) and one
`chunk_NNNNN.npz` per finished chunk, readable with NumPy alone. Each chunk holds
`members` (indices into the grid's member list), `params/NAME`, `t_final`, `status`
([`gradflow.Status`][] codes), `steps`, and the observers' leaves as
`obs/NAME/i` (member × save time × ...) and `final/NAME/i` (member × ...); saves past
a member's `t_final` are NaN. [`gradflow.SweepResult.load`][] reads a folder back.

**Several writers.** Processes that run one sweep into one folder (by hand, or a job
array) share its chunks: a writer claims a chunk with a lock file
`.chunk_NNNNN.npz.lock` (created with `O_CREAT|O_EXCL`, holding its host and pid,
refreshed while the chunk is computed, removed once it is written), skips the chunks
that another live writer holds and computes the rest, then waits for the others'
chunks. A claim whose writer died (its pid is gone on this host, or it was not
refreshed for `LOCK_STALE_S` seconds) is taken over. Chunk files are written under a
temporary name and renamed, so a chunk file is complete or absent; lock and temporary
files are never read as results.
"""

import dataclasses
import io
import itertools
import json
import os
import re
import socket
import threading
import time
import uuid
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from . import _solve
from . import observers as _observers
from ._flow import default_save_times
from ._status import LABELS, Status
from ._validate import check_int, check_path, runtime_message

OVERRIDABLE = ("rtol", "atol", "loss_tol", "loss_drop", "radius")
"""Settings a grid axis of the same name overrides per member (traced, no recompile)."""

LOCK_STALE_S = 600.0
"""A chunk claim (lock file) not refreshed for this many seconds is stale: its writer
is presumably gone (on another host; on this one, a dead pid is stale at once)."""

HEARTBEAT_S = 30.0
"""How often a writer refreshes the claims it holds."""

POLL_S = 0.5
"""How often a writer looks for the chunks that other writers are computing."""

WRITE_DELAY_ENV = "GRADFLOW_SWEEP_WRITE_DELAY"
"""Test hook: an environment variable (seconds); when set, a chunk writer writes half
of the temporary file, sleeps this long, then writes the rest and renames it (so a
test can kill a sweep during a chunk write)."""


@dataclasses.dataclass
class SweepResult:
    """The members of a sweep, stacked along a leading member axis.

    **Fields:** `params` (`{name: (M,)}`), `ts` (save times, `(T,)`), `observations`
    (`{name: (M, T, ...)}`, NaN after a member's end), `final` (`{name: (M, ...)}`),
    `t_final`, `status` (names, see [`gradflow.Trajectory`][]), `steps`, `config`.
    """

    params: dict
    ts: np.ndarray
    observations: dict
    final: dict
    t_final: np.ndarray
    status: np.ndarray
    steps: np.ndarray
    config: dict

    def __len__(self) -> int:
        return len(self.t_final)

    @property
    def ok(self) -> np.ndarray:
        """Per member: True when a stop condition ended its solve."""
        return np.array([Status.of(s).finished for s in self.status], dtype=bool)

    @classmethod
    def load(cls, out) -> "SweepResult":
        """Read the finished chunks of the sweep in folder `out` (members in grid order).

        An unreadable chunk (a truncated or corrupt file) is an error naming it;
        re-running the sweep recomputes it. Temporary and lock files (of a writer at
        work or killed) are not chunks.
        """
        out = check_path("out", out, kind="folder")
        if not (out / "config.json").is_file():
            raise ValueError(f"`out`: {out} holds no sweep (no config.json).")
        config = _read_config(out / "config.json")
        chunks = []
        for path in chunk_files(out):
            try:
                chunks.append(_read_chunk(path))
            except _UNREADABLE as error:
                raise ValueError(
                    f"`out`: chunk file {path} is unreadable ({type(error).__name__}: "
                    f"{error}); re-run the sweep to recompute it.") from None
        if not chunks:
            raise ValueError(f"`out`: no finished chunks in {out}.")
        return _merge(chunks, config)


def sweep(
    problem: Callable,
    grid: dict,
    *,
    t1: float,
    loss_tol: float | None = None,
    loss_drop: float | None = None,
    radius: float | None = None,
    save_times=None,
    observers=None,
    solver=None,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int = 100_000,
    out=None,
    chunk_size: int = 8,
    order_by: str | None = None,
    tag: dict | None = None,
    progress: bool = False,
) -> SweepResult:
    """Gradient flow of every member of a grid, compiled once.

    **Arguments:**

    - `problem`: `params -> (model, objective)`, where `params` maps each grid axis
      to a scalar JAX array (traced: write it with `jax.random.key(params["seed"])`,
      `std=params["scale"]`, ... and no Python control flow on the values).
    - `grid`: `{name: 1-d values}`; the members are the cartesian product, in order.
      An axis named like one of `OVERRIDABLE` sets that solve setting per member.
    - `t1`, `loss_tol`, `radius`, `save_times`, `observers`, `solver`, `rtol`, `atol`,
      `max_steps`: as in [`gradflow.flow`][], shared by all members.
    - `loss_drop`: stop when the loss falls below this times the member's initial loss
      (instead of an absolute `loss_tol`).
    - `out`: a folder to write each finished chunk to, and to resume from. Re-using
      it with a different configuration is an error. Several processes may run the
      same sweep into one folder at once: each claims the chunks it computes (lock
      files), skips those another live process holds, and waits for them at the end,
      so every chunk is computed once (module docstring).
    - `chunk_size`: members solved together (rounded up to a multiple of the number
      of local devices). A vmapped adaptive solve runs until its slowest member
      finishes, so chunks should hold members of similar cost: see `order_by`.
    - `order_by`: a grid axis; members are chunked in increasing order of it (e.g.
      `"scale"`, whose escape times grow as it shrinks).
    - `tag`: anything JSON-able identifying the problem (written to `config.json` and
      compared on resume, since a Python function cannot be compared).
    - `progress`: a progress bar over chunks.

    **Returns:** a [`gradflow.SweepResult`][] of every finished member (all of them,
    unless another process of a multi-process run holds some).

    **Raises:** `ValueError`/`TypeError` naming the argument for invalid inputs,
    checked before anything is solved or written; a value checked only when a member
    runs (a grid axis's `rtol` too small for the problem's dtype, an initial loss that
    overflows, non-finite weights) is a `ValueError` naming it (`grid['rtol']` for a
    grid axis) and the chunk's members.
    """
    names, values = _check_grid(grid)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive int, got {chunk_size!r}.")
    if order_by is not None and order_by not in names:
        raise ValueError(f"`order_by` must be a grid axis {names}, got {order_by!r}.")
    if not callable(problem):
        raise TypeError(f"`problem` must be a function params -> (model, objective), got "
                        f"{type(problem).__name__}.")
    max_steps = check_int("max_steps", max_steps)
    settings = dict(t1=t1, loss_tol=loss_tol, loss_drop=loss_drop, radius=radius,
                    rtol=rtol, atol=atol, max_steps=max_steps)
    members = np.array(list(itertools.product(*values)), dtype=float).reshape(-1, len(names))
    dtypes = {n: np.asarray(v).dtype for n, v in zip(names, values)}
    _check_axes(settings, names, members)
    save_times = _solve.check_save_times(
        default_save_times(float(t1)) if save_times is None else save_times, t1)
    observers = _observers.resolve(observers)
    order = np.arange(len(members))
    if order_by is not None:
        order = np.argsort(members[:, names.index(order_by)], kind="stable")
    devices = jax.local_devices()
    chunk_size = -(-chunk_size // len(devices)) * len(devices)
    settings = {k: (float(v) if isinstance(v, (int, float, np.number)) and k != "max_steps"
                    else v) for k, v in settings.items()}
    config = dict(grid={n: np.asarray(v).tolist() for n, v in zip(names, values)},
                  save_times=save_times.tolist(), observers=sorted(observers),
                  solver=repr(solver), chunk_size=chunk_size, order_by=order_by,
                  tag=tag, **settings)
    out = None if out is None else _check_folder(Path(out), config)
    mesh = Mesh(np.asarray(devices), ("members",)) if len(devices) > 1 else None
    run_chunk = lambda params, ts: _run_chunk(
        params, ts, problem=problem, settings=tuple(settings.items()), solver=solver,
        observers=observers, mesh=mesh)
    chunks = [order[i:i + chunk_size] for i in range(0, len(order), chunk_size)]
    axes = {n: f"grid[{n!r}]" for n in names if n in settings}

    def compute(k):
        idx = np.resize(chunks[k], chunk_size)  # pad by repeating members
        params = {n: jnp.asarray(members[idx, j].astype(dtypes[n]))
                  for j, n in enumerate(names)}
        try:
            raw = jax.device_get(run_chunk(params, jnp.asarray(save_times)))
        except eqx.EquinoxRuntimeError as error:  # a check of a member's traced values
            raise ValueError(
                f"{runtime_message(error, axes).rstrip('.')} (in chunk {k} of the sweep: "
                f"grid members {chunks[k].tolist()}).") from None
        return _unpad(raw, chunks[k], params, save_times)

    warned = set()

    def obtain(k):
        """Chunk `k`: read, or computed (and written); None while another writer holds it."""
        if out is None:
            return compute(k)
        path = out / f"chunk_{k:05d}.npz"
        chunk = _read_finished(path, warned)
        if chunk is not None:
            return chunk
        out.mkdir(parents=True, exist_ok=True)
        claim = _claim(path)
        if claim is None:
            return None
        with claim:
            chunk = _read_finished(path, warned)  # written by another just before the claim
            if chunk is None:
                for tmp in path.parent.glob(f".{path.name}.*.tmp"):  # of a writer now gone
                    tmp.unlink(missing_ok=True)
                chunk = compute(k)
                _write_config(out, config)  # once a member has solved: the inputs are valid
                _write_chunk(path, chunk)
        return chunk

    todo = list(range(jax.process_index(), len(chunks), jax.process_count()))
    results = []
    bar = _bar(len(todo), progress)
    made = out is not None and not out.exists()
    try:
        while todo:
            held = []
            for k in todo:
                chunk = obtain(k)
                if chunk is None:
                    held.append(k)
                    continue
                results.append(chunk)
                if bar is not None:
                    bar.update(1)
            todo = held
            if todo:  # chunks other writers are computing: wait for them
                time.sleep(POLL_S)
    except BaseException:
        if made and out is not None:  # a sweep that failed before its first chunk leaves no folder
            try:
                out.rmdir()
            except OSError:
                pass
        raise
    finally:
        if bar is not None:
            bar.close()
    return _merge(results, config)


def _check_axes(settings, names, members):
    """Every value of a grid axis that overrides a setting, checked like the setting
    (the problem itself is checked when the first chunk is traced)."""
    given = set(names) | {k for k, v in settings.items() if v is not None}
    if {"loss_tol", "loss_drop"} <= given:
        raise ValueError("Give at most one of `loss_tol` and `loss_drop` (as settings or "
                         "grid axes).")
    shared = ("t1", "loss_tol", "loss_drop", "radius", "rtol", "atol")
    _solve.check_settings(jnp.float64, **{k: settings[k] for k in shared})
    for name in (n for n in names if n in OVERRIDABLE):
        for value in np.unique(members[:, names.index(name)]):
            kw = dict(settings, **{name: float(value)})
            _solve.check_settings(jnp.float64, names={name: f"grid[{name!r}]"},
                                  **{k: kw[k] for k in ("t1", "loss_tol", "loss_drop",
                                                        "radius", "rtol", "atol")})


def _check_grid(grid):
    if not isinstance(grid, dict) or not grid:
        raise ValueError("`grid` must be a non-empty dict {name: 1-d values}.")
    names, values = list(grid), []
    for name, v in grid.items():
        v = np.asarray(v)
        if v.ndim != 1 or v.size < 1 or not np.issubdtype(v.dtype, np.number):
            raise ValueError(f"`grid[{name!r}]` must be a non-empty 1-d numeric array.")
        if not np.all(np.isfinite(v)):
            raise ValueError(f"`grid[{name!r}]` has non-finite values.")
        values.append(v)
    return names, values


def _check_folder(out: Path, config: dict) -> Path:
    """`out`, refused if it holds a sweep of another configuration (it is created, and
    `config.json` written, only when the first chunk is)."""
    path = out / "config.json"
    if out.exists() and not out.is_dir():
        raise ValueError(f"`out`: {out} exists and is not a folder.")
    if path.exists():
        text = json.dumps(config, indent=1, sort_keys=True, default=str)
        if json.loads(path.read_text()) != json.loads(text):
            raise ValueError(
                f"`out`: {out} holds a sweep with a different configuration; use another "
                "folder, or delete it to start over.")
    return out


def _write_config(out: Path, config: dict) -> None:
    path = out / "config.json"
    out.mkdir(parents=True, exist_ok=True)
    if path.exists() or jax.process_index() != 0:
        return
    tmp = path.with_name(f".config.json.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(config, indent=1, sort_keys=True, default=str))
    tmp.replace(path)


def _member(params, save_ts, problem, settings, solver, observers):
    """One member's solve: observers at `save_ts`, final observations, end time, status."""
    model, objective = problem(params)
    kw = {k: params.get(k, v) for k, v in settings.items()}
    built = _solve.build(model, objective, solver=solver, **kw)
    observers = _observers.resolve(observers, built.model, built.objective)
    out = _solve.run(built, save_ts.astype(built.time_dtype), observers)
    saved, final = out.observed
    return dict(obs=saved, final=jax.tree.map(lambda x: x[0], final), t_final=out.t,
                status=out.status, steps=out.stats["num_steps"])


@eqx.filter_jit
def _run_chunk(params, save_ts, *, problem, settings, solver, observers, mesh):
    """A chunk's members, vmapped (and split across `mesh`'s devices); compiled once per
    problem, settings and chunk shape, whatever the parameter values."""
    batched = jax.vmap(
        lambda p, ts: _member(p, ts, problem, dict(settings), solver, observers),
        in_axes=(0, None))
    if mesh is not None:
        batched = jax.shard_map(batched, mesh=mesh, check_vma=False,
                                in_specs=(PartitionSpec("members"), PartitionSpec()),
                                out_specs=PartitionSpec("members"))
    return batched(params, save_ts)


_SCALARS = ("members", "t_final", "status", "steps")


def _unpad(raw, members, params, save_times) -> dict:
    """The chunk's real members, as flat arrays; saves after a member's end become NaN."""
    n = len(members)
    t_final = np.asarray(raw["t_final"])[:n]
    after = save_times[None, :] > t_final[:, None]
    hide = lambda x: np.where(after.reshape(after.shape + (1,) * (x.ndim - 2)), np.nan, x)
    leaves = lambda tree, f: {k: [f(np.asarray(x)[:n]) for x in jax.tree.leaves(v)]
                              for k, v in tree.items()}
    return dict(members=np.asarray(members), t_final=t_final,
                status=np.asarray(raw["status"])[:n], steps=np.asarray(raw["steps"])[:n],
                params={k: np.asarray(v)[:n] for k, v in params.items()},
                obs=leaves(raw["obs"], hide), final=leaves(raw["final"], lambda x: x))


_CHUNK = re.compile(r"chunk_\d{5}\.npz")
_UNREADABLE = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile)


def chunk_files(out: Path) -> list[Path]:
    """The finished chunk files of a sweep folder, in order (temporary files excluded)."""
    return sorted(p for p in out.iterdir() if _CHUNK.fullmatch(p.name))


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"`out`: {path} is unreadable ({type(error).__name__}: {error}).") from None
    if not isinstance(config, dict) or "save_times" not in config:
        raise ValueError(f"`out`: {path} is not a sweep's configuration.")
    return config


def _read_finished(path: Path, warned: set) -> dict | None:
    """The chunk at `path`, or None when it is absent or unreadable (warned once: it is
    recomputed)."""
    if not path.exists():
        return None
    try:
        return _read_chunk(path)
    except _UNREADABLE as error:
        if path not in warned:
            warned.add(path)
            warnings.warn(f"sweep: chunk file {path} is unreadable ({type(error).__name__}: "
                          f"{error}); recomputing it.", stacklevel=4)
        return None


class _Claim:
    """A writer's claim on one chunk: its lock file, refreshed every `HEARTBEAT_S`
    seconds until released (on leaving the `with` block)."""

    def __init__(self, lock: Path):
        self.lock = lock
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()

    def _beat(self):
        while not self._done.wait(HEARTBEAT_S):
            try:
                os.utime(self.lock)
            except OSError:
                return

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.lock.unlink(missing_ok=True)


def _claim(path: Path) -> "_Claim | None":
    """Claim the chunk at `path` (create its lock file exclusively; take over a stale
    one), or None if another live writer holds it."""
    lock = path.with_name(f".{path.name}.lock")
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not _take_over(lock):
                return None
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}, f)
        return _Claim(lock)
    return None


def _stale(lock: Path) -> bool:
    """Whether the claim `lock` is left by a writer that is gone (or is gone itself)."""
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return True
    if age > LOCK_STALE_S:
        return True
    try:
        owner = json.loads(lock.read_text())
    except FileNotFoundError:
        return True
    except (OSError, ValueError):  # being written (or its writer died at once)
        return age > 30.0
    if not isinstance(owner, dict) or owner.get("host") != socket.gethostname():
        return False
    pid = owner.get("pid")
    if not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


def _take_over(lock: Path) -> bool:
    """Remove the claim `lock` if it is stale: True if the chunk can be claimed again.
    It is first renamed aside (atomic), so that of two writers taking over one stale
    claim, only one removes it; a fresh claim renamed by mistake is put back."""
    if not _stale(lock):
        return False
    aside = lock.with_name(f"{lock.name}.{os.getpid()}.{uuid.uuid4().hex}.stale")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return True
    if not _stale(aside):  # another writer's fresh claim, made since we looked
        try:
            os.link(aside, lock)
        except OSError:
            pass
        aside.unlink(missing_ok=True)
        return False
    aside.unlink(missing_ok=True)
    return True


def _write_chunk(path: Path, chunk: dict) -> None:
    arrays = {k: chunk[k] for k in _SCALARS}
    arrays |= {f"params/{k}": v for k, v in chunk["params"].items()}
    for prefix in ("obs", "final"):
        for name, leaves in chunk[prefix].items():
            arrays |= {f"{prefix}/{name}/{i}": leaf for i, leaf in enumerate(leaves)}
    # A name of its own per writer (two processes may write one folder), that no
    # reader takes for a chunk; renamed into place, so a chunk file is complete or absent.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    data = buffer.getbuffer()
    delay = float(os.environ.get(WRITE_DELAY_ENV) or 0.0)  # a test hook (see its docstring)
    try:
        with open(tmp, "wb") as f:
            if delay > 0:
                f.write(data[:len(data) // 2])
                f.flush()
                time.sleep(delay)
                f.write(data[len(data) // 2:])
            else:
                f.write(data)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_chunk(path: Path) -> dict:
    # The file is opened here, so that it is closed when NumPy fails to read it (a
    # corrupt zip: `np.load` leaves the file it opened unclosed).
    with open(path, "rb") as file, np.load(file) as data:
        chunk = {k: data[k] for k in _SCALARS}
        chunk["params"] = {k.split("/")[1]: data[k] for k in data.files
                           if k.startswith("params/")}
        for prefix in ("obs", "final"):
            keys = sorted((k for k in data.files if k.startswith(prefix + "/")),
                          key=lambda k: int(k.rsplit("/", 1)[1]))
            chunk[prefix] = {}
            for key in keys:
                chunk[prefix].setdefault(key.split("/")[1], []).append(data[key])
    return chunk


def _merge(chunks, config) -> SweepResult:
    """Stack chunks into one result, members in grid order."""
    members = np.concatenate([c["members"] for c in chunks])
    order = np.argsort(members)
    cat = lambda arrays: np.concatenate(arrays)[order]
    group = lambda prefix: {name: cat([c[prefix][name] for c in chunks])
                            for name in chunks[0][prefix]}
    tree = lambda prefix: {
        name: [cat([c[prefix][name][i] for c in chunks]) for i in range(len(leaves))]
        for name, leaves in chunks[0][prefix].items()}
    single = lambda d: {k: v[0] if len(v) == 1 else v for k, v in d.items()}
    return SweepResult(
        params=group("params"), ts=np.asarray(config["save_times"]),
        observations=single(tree("obs")), final=single(tree("final")),
        t_final=cat([c["t_final"] for c in chunks]),
        status=np.asarray(LABELS)[cat([c["status"] for c in chunks])],
        steps=cat([c["steps"] for c in chunks]), config=config)


def _bar(total: int, progress: bool):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sweep chunks", unit="chunk")
