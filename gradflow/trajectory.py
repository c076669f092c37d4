"""The result of a solve: observer values at save times, final model, status, statistics."""

import dataclasses
import json
import zipfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ._status import Status
from ._validate import check_path


@dataclasses.dataclass
class Trajectory:
    """A gradient-flow (or gradient-descent) trajectory.

    **Fields:**

    - `ts`: save times (physical flow time), shape `(T,)`: the requested times that
      were reached, then `t_final`.
    - `observations`: `{name: array (T, ...)}`, one entry per observer.
    - `t_final`: physical time at which the solve ended (the event time if a stop
      condition fired).
    - `final`: `{name: value}` of every observer at `t_final`.
    - `model`: the final model.
    - `status`: one of `"t1"`, `"loss"`, `"radius"` (finished) or `"max_steps"`,
      `"non_finite"`, `"step_underflow"`, `"failed"` (did not finish).
    - `stats`: solver statistics (accepted/rejected steps, gradient evaluations,
      `wall_time`, ...). `wall_time` includes compilation when the call compiled: the
      first call for a model structure, solver and set of stops (to time a solve, call
      it once before with the same arguments).
    - `config`: what was solved (solver, tolerances, stop conditions).
    """

    ts: np.ndarray
    observations: dict[str, Any]
    t_final: float
    final: dict[str, Any]
    model: Any
    status: str
    stats: dict[str, Any]
    config: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when a stop condition (t1, loss or radius) ended the solve."""
        return Status.of(self.status).finished

    @property
    def reason(self) -> str:
        """What the status means, in words."""
        return Status.of(self.status).message

    def __getitem__(self, name: str):
        return self.observations[name]

    def __repr__(self) -> str:
        obs = ", ".join(self.observations)
        return (
            f"Trajectory(status={self.status!r}, t_final={self.t_final:.4g}, "
            f"saves={len(self.ts)}, observations=[{obs}], "
            f"steps={self.stats.get('accepted_steps')})"
        )

    def save(self, path) -> Path:
        """Write to a `.npz` file (NumPy only is needed to read it back).

        **Arguments:**

        - `path`: the file to write (its folder is created); written to a temporary
          name first and renamed, so an interrupted save leaves no partial file.

        **Returns:** the path written, as a `pathlib.Path`.
        """
        path = Path(path)
        arrays: dict[str, Any] = {"ts": np.asarray(self.ts)}
        for prefix, tree in (("obs", self.observations), ("final", self.final)):
            for name, value in tree.items():
                for i, leaf in enumerate(jax.tree.leaves(value)):
                    arrays[f"{prefix}/{name}/{i}"] = np.asarray(leaf)
        for i, leaf in enumerate(jax.tree.leaves(self.model)):
            arrays[f"model/{i}"] = np.asarray(leaf)
        meta = {
            "t_final": float(self.t_final),
            "status": self.status,
            "stats": _jsonable(self.stats),
            "config": _jsonable(self.config),
            "model_class": type(self.model).__name__,
        }
        arrays["meta"] = np.array(json.dumps(meta))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path, like=None) -> "Trajectory":
        """Read a trajectory written by `save`.

        Observations are rebuilt as arrays (observers returning pytrees come back as
        lists of leaves). The final model is rebuilt with the structure of `like`
        (any model of the same kind and shape) or, when `like` is None, as the list
        of its weight arrays.

        **Arguments:**

        - `path`: a file written by [`gradflow.Trajectory.save`][] (anything else, a
          missing file or a folder is a `ValueError` naming `path`).
        - `like`: optional, a model with the structure of the saved final model.

        **Returns:** a [`gradflow.Trajectory`][].

        !!! Example

            ```python
            trajectory.save("runs/run.npz")
            again = gf.Trajectory.load("runs/run.npz", like=model)
            ```
        """
        path = check_path("path", path, kind="file")
        try:
            meta, ts, groups, model_leaves = _read(path)
        except _UNREADABLE as error:
            raise ValueError(f"`path`: {path} is not a trajectory written by "
                             f"`Trajectory.save` ({type(error).__name__}: {error}).") from None
        unpack = lambda d: {k: v[0] if len(v) == 1 else v for k, v in d.items()}
        model = model_leaves
        if like is not None:
            model = _rebuild(like, model_leaves, meta.get("model_class"), path)
        return cls(
            ts=ts,
            observations=unpack(groups["obs"]),
            t_final=meta["t_final"],
            final=unpack(groups["final"]),
            model=model,
            status=meta["status"],
            stats=meta["stats"],
            config=meta["config"],
        )


_UNREADABLE = (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile)
_META_KEYS = ("t_final", "status", "stats", "config")


def _read(path: Path):
    """(meta, ts, {"obs": ..., "final": ...}, model leaves) of a file `save` wrote; an
    error of `_UNREADABLE` for anything else."""
    # The file is opened here, so that it is closed when NumPy fails to read it.
    with open(path, "rb") as file:
        data = np.load(file, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("a single array (.npy), not an .npz archive")
        with data:
            missing = [k for k in ("meta", "ts") if k not in data.files]
            if missing:
                raise KeyError(f"no {' or '.join(map(repr, missing))} entry")
            meta = json.loads(str(data["meta"]))
            if not isinstance(meta, dict) or not all(k in meta for k in _META_KEYS):
                raise ValueError(f"its meta entry is not a dict with {list(_META_KEYS)}")
            groups: dict[str, dict[str, list]] = {"obs": {}, "final": {}}
            model_leaves = []
            for key in sorted(data.files, key=_natural):
                parts = key.split("/")
                if parts[0] in groups:
                    groups[parts[0]].setdefault(parts[1], []).append(data[key])
                elif parts[0] == "model":
                    model_leaves.append(data[key])
            ts = data["ts"]
    return meta, ts, groups, model_leaves


def _rebuild(like, leaves, saved_class, path):
    """`like`'s structure filled with `leaves`, checked against what was saved."""
    if saved_class is not None and type(like).__name__ != saved_class:
        raise ValueError(
            f"`like`: {path} holds a {saved_class} model, got a {type(like).__name__}.")
    template = jax.tree.leaves(like)
    shapes = [tuple(np.shape(x)) for x in template]
    saved = [tuple(x.shape) for x in leaves]
    if shapes != saved:
        raise ValueError(
            f"`like`: {path} holds weights of shapes {saved}, but `like` has {shapes}.")
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def _natural(key: str):
    return [int(p) if p.isdigit() else p for p in key.split("/")]


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.generic, np.ndarray)) or hasattr(obj, "shape"):
        arr = np.asarray(obj)
        return arr.tolist()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)
