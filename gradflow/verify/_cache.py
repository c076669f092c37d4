"""verify's batched programs on disk, so that a second run skips Python tracing.

Tracing and lowering a vmapped Diffrax solve costs seconds of Python per program, and
JAX's persistent compilation cache (which the command line turns on) only skips the XLA
compilation that follows. So each batched program of `gradflow verify` is traced once,
exported with `jax.export` (StableHLO plus its input and output shapes) and written
beside JAX's cache, in the folder `gradflow-verify` of `jax_compilation_cache_dir`
(the command line's `$XDG_CACHE_HOME/gradflow/jax`, by default
`~/.cache/gradflow/jax`). A later run loads the program instead of tracing it, and JAX's
cache then supplies the compiled executable: the module is the same bytes in both runs.

**Keys.** An entry's file name is the SHA-256 of everything the program depends on: the
kind of program, the problem's structure with every static value (the solver and its
settings, the stops, the model's and objective's static fields), the shapes and dtypes
of its inputs, the batch size, the observers (by module, name and code), gradflow's
version and a hash of all of gradflow's source files, the versions of JAX, jaxlib,
Equinox, Diffrax, Optimistix, Lineax and NumPy, the backend and device kind, and the
x64 flag. A program whose key cannot be written down for sure (an observer or a static
value defined outside these packages, e.g. a user's check from `--import`; an object
without a faithful description) is not stored: it is traced in every run, and only its
compilation is cached. So a stale entry is never used: a change to gradflow's code or
to a dependency changes every key.

**Entries** are `MAGIC`, a JSON header (the `Exported`'s fields and the SHA-256 of the
module) and the module's bytecode. An entry that cannot be read, fails its checksum,
does not decode or does not run is ignored (and rewritten): the program is traced
again, never trusted.

**Errors inside the programs.** Host callbacks cannot be exported, and JAX does not
cache programs that contain them; Equinox's runtime checks (`equinox.error_if`, in
gradflow's solve and in Diffrax) are host callbacks unless `EQX_ON_ERROR=nan`. While
verify traces its programs, those checks are therefore made in Equinox's `nan` mode (in
the tracing thread only): a failed check turns the solve's values into NaN instead of
raising, and the runner solves any member that did not finish alone with
[`gradflow.flow`][], whose checks raise with their message.
"""

import contextlib
import dataclasses
import enum
import functools
import hashlib
import importlib.metadata
import json
import os
import threading
import types
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
from jax.core import ShapedArray

FORMAT = 1
"""The entries' format; part of every key."""

MAGIC = b"gradflow-verify-program\n"

FOLDER = "gradflow-verify"
"""The sub-folder of JAX's persistent compilation cache that holds the entries."""

DIRECTORY = "auto"
"""Where entries are kept: `"auto"` (the folder `FOLDER` of JAX's
`jax_compilation_cache_dir`, when that cache is on and `GRADFLOW_NO_CACHE` is not set),
a path, or None (no entries: every program is traced)."""

TRUSTED = ("gradflow", "diffrax", "equinox", "optimistix", "lineax", "jax", "jaxlib",
           "numpy", "builtins")
"""Packages whose code is covered by the keys (their versions, gradflow's source hash):
only functions and types from these are written into a key."""

_DISTRIBUTIONS = ("jax", "jaxlib", "equinox", "diffrax", "optimistix", "lineax", "numpy")
_JAX_SETTINGS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_numpy_dtype_promotion",
                 "jax_numpy_rank_promotion", "jax_default_prng_impl")


class Uncacheable(Exception):
    """Something in a program's description that a key cannot hold faithfully."""


def directory() -> Path | None:
    """The folder of the entries, or None when programs are not kept."""
    if DIRECTORY is None:
        return None
    if DIRECTORY != "auto":
        return Path(DIRECTORY)
    if os.environ.get("GRADFLOW_NO_CACHE", "0") not in ("0", "", "false", "no"):
        return None
    # (JAX's options are attributes its config gets at run time: not in its type stubs)
    base = jax.config.jax_compilation_cache_dir  # pyright: ignore[reportAttributeAccessIssue]
    if not base or "://" in str(base):
        return None
    return Path(base) / FOLDER


@functools.cache
def _source_hash() -> str:
    """SHA-256 of every Python file of the gradflow package (paths and contents)."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


@functools.cache
def _environment_static() -> tuple:
    from .. import __version__

    return (__version__, _source_hash(), tuple((d, _version(d)) for d in _DISTRIBUTIONS))


def environment() -> tuple:
    """What every key holds besides the program: versions, sources, backend, the JAX
    settings that change a trace, and the environment variables of gradflow, Equinox,
    JAX and XLA."""
    device = jax.devices()[0]
    settings = {n: str(getattr(jax.config, n, None)) for n in _JAX_SETTINGS}
    variables = sorted((k, v) for k, v in os.environ.items()
                       if k.startswith(("GRADFLOW_", "EQX_", "JAX_", "XLA_FLAGS")))
    return (*_environment_static(), jax.default_backend(), device.platform,
            getattr(device, "device_kind", ""), settings, variables)


def _trusted(module) -> bool:
    return isinstance(module, str) and module.split(".")[0] in TRUSTED


def _code(code: types.CodeType) -> list:
    consts = [_code(c) if isinstance(c, types.CodeType) else render(c) for c in code.co_consts]
    return [code.co_name, code.co_firstlineno,
            hashlib.sha256(code.co_code).hexdigest(), list(code.co_names), consts]


def _function(fn) -> list:
    module = getattr(fn, "__module__", None)
    if not _trusted(module):
        raise Uncacheable(f"{fn!r} is defined outside {TRUSTED}")
    out = ["function", module, getattr(fn, "__qualname__", repr(fn))]
    code = getattr(fn, "__code__", None)
    if code is not None:
        out.append(_code(code))
        closure = getattr(fn, "__closure__", None) or ()
        out.append([render(c.cell_contents) for c in closure])
        out.append(render(getattr(fn, "__defaults__", None)))
        out.append(render(getattr(fn, "__kwdefaults__", None)))
    return out


def render(obj):
    """A JSON-able description of `obj` that determines it, or `Uncacheable`."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return [type(obj).__name__, obj]
    if isinstance(obj, float):
        return ["float", repr(obj)]
    if isinstance(obj, complex):
        return ["complex", repr(obj)]
    if isinstance(obj, bytes):
        return ["bytes", obj.hex()]
    if isinstance(obj, enum.Enum):
        return ["enum", render(type(obj)), obj.name]
    if isinstance(obj, (tuple, list, frozenset, set)):
        items = [render(x) for x in obj]
        if isinstance(obj, (frozenset, set)):
            items = sorted(items, key=json.dumps)
        return [type(obj).__name__, items]
    if isinstance(obj, dict):
        return ["dict", [[render(k), render(v)] for k, v in obj.items()]]
    if isinstance(obj, np.dtype):
        return ["dtype", str(obj)]
    if isinstance(obj, (np.ndarray, np.generic)):
        array = np.asarray(obj)
        return ["ndarray", str(array.dtype), list(array.shape),
                hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()]
    if isinstance(obj, type):
        if not _trusted(obj.__module__):
            raise Uncacheable(f"{obj!r} is defined outside {TRUSTED}")
        return ["type", obj.__module__, obj.__qualname__]
    if isinstance(obj, functools.partial):
        return ["partial", render(obj.func), render(obj.args), render(obj.keywords)]
    if isinstance(obj, eqx.Module) or (dataclasses.is_dataclass(obj)
                                       and not isinstance(obj, type)):
        fields = [[f.name, render(getattr(obj, f.name))] for f in dataclasses.fields(obj)]
        return ["module", render(type(obj)), fields]
    if isinstance(obj, types.FunctionType):
        return _function(obj)
    if isinstance(obj, (types.BuiltinFunctionType, np.ufunc)):
        if not _trusted(getattr(obj, "__module__", None) or "numpy"):
            raise Uncacheable(f"{obj!r} is defined outside {TRUSTED}")
        return ["builtin", getattr(obj, "__module__", None) or "numpy", obj.__name__]
    if isinstance(obj, types.MethodType):
        return ["method", render(obj.__self__), obj.__name__]
    raise Uncacheable(f"no faithful description of a {type(obj).__qualname__}")


def key(description) -> str:
    """The entry name of a program described by `description` (see `render`)."""
    text = json.dumps([FORMAT, list(environment()), description], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


# --- entries ---------------------------------------------------------------------------


def _skeleton(treedef):
    """A tree of builtin containers as JSON (tuples tagged), or `Uncacheable`."""
    example = jax.tree.unflatten(treedef, [0] * treedef.num_leaves)

    def encode(x):
        if isinstance(x, tuple):
            return {"tuple": [encode(v) for v in x]}
        if isinstance(x, list):
            return {"list": [encode(v) for v in x]}
        if isinstance(x, dict) and all(isinstance(k, str) for k in x):
            return {"dict": [[k, encode(v)] for k, v in x.items()]}
        if x is None:
            return {"none": 0}
        if x == 0 and type(x) is int:
            return "*"
        raise Uncacheable(f"a {type(x).__qualname__} in a program's inputs or outputs")

    skeleton = encode(example)
    if _unskeleton(skeleton) != treedef:
        raise Uncacheable("a tree structure that does not round-trip")
    return skeleton


def _unskeleton(skeleton):
    def decode(x):
        if x == "*":
            return 0
        (kind, value), = x.items()
        if kind == "tuple":
            return tuple(decode(v) for v in value)
        if kind == "list":
            return [decode(v) for v in value]
        if kind == "dict":
            return {k: decode(v) for k, v in value}
        return None

    return jax.tree.structure(decode(skeleton))


def _aval(a) -> list:
    return [list(a.shape), str(a.dtype), bool(getattr(a, "weak_type", False))]


def encode(exported) -> bytes:
    """An `Exported` as bytes (`MAGIC`, JSON header, module), or `Uncacheable`."""
    fields = {f.name: getattr(exported, f.name) for f in dataclasses.fields(exported)}
    for name in ("in_shardings_hlo", "out_shardings_hlo", "_in_named_shardings",
                 "_out_named_shardings"):
        if any(s is not None for s in fields.get(name, ())):
            raise Uncacheable(f"`{name}` of an exported program")
    for name in ("ordered_effects", "unordered_effects", "disabled_safety_checks"):
        if tuple(fields.get(name, ())):
            raise Uncacheable(f"`{name}` of an exported program")
    if any(not isinstance(d, int) for a in fields["in_avals"] for d in a.shape):
        raise Uncacheable("symbolic shapes")
    module = bytes(fields["mlir_module_serialized"])
    header = {
        "fields": sorted(fields),
        "fun_name": str(fields["fun_name"]),
        "in_tree": _skeleton(fields["in_tree"]),
        "out_tree": _skeleton(fields["out_tree"]),
        "in_avals": [_aval(a) for a in fields["in_avals"]],
        "out_avals": [_aval(a) for a in fields["out_avals"]],
        "nr_devices": int(fields["nr_devices"]),
        "platforms": [str(p) for p in fields["platforms"]],
        "calling_convention_version": int(fields["calling_convention_version"]),
        "module_kept_var_idx": [int(i) for i in fields["module_kept_var_idx"]],
        "uses_global_constants": bool(fields["uses_global_constants"]),
        "has_named_shardings": bool(fields.get("_has_named_shardings", False)),
        "module_sha256": hashlib.sha256(module).hexdigest(),
    }
    text = json.dumps(header).encode()
    return MAGIC + len(text).to_bytes(8, "little") + text + module


def decode(data: bytes):
    """The `Exported` of `encode`'s bytes; raises on anything unexpected."""
    from jax.export import Exported

    if not data.startswith(MAGIC):
        raise ValueError("not a gradflow verify program")
    start = len(MAGIC) + 8
    size = int.from_bytes(data[len(MAGIC):start], "little")
    header = json.loads(data[start:start + size])
    module = bytes(data[start + size:])
    if hashlib.sha256(module).hexdigest() != header["module_sha256"]:
        raise ValueError("checksum mismatch")
    if header["fields"] != sorted(f.name for f in dataclasses.fields(Exported)):
        raise ValueError("written by another version of jax.export")
    aval = lambda a: ShapedArray(tuple(a[0]), np.dtype(a[1]), weak_type=a[2])
    n_in, n_out = len(header["in_avals"]), len(header["out_avals"])
    in_tree, out_tree = _unskeleton(header["in_tree"]), _unskeleton(header["out_tree"])
    if in_tree.num_leaves != n_in or out_tree.num_leaves != n_out:
        raise ValueError("inconsistent header")
    return Exported(
        fun_name=header["fun_name"], in_tree=in_tree,
        in_avals=tuple(aval(a) for a in header["in_avals"]), out_tree=out_tree,
        out_avals=tuple(aval(a) for a in header["out_avals"]),
        _has_named_shardings=header["has_named_shardings"],
        _in_named_shardings=(None,) * n_in, _out_named_shardings=(None,) * n_out,
        in_shardings_hlo=(None,) * n_in, out_shardings_hlo=(None,) * n_out,
        nr_devices=header["nr_devices"], platforms=tuple(header["platforms"]),
        ordered_effects=(), unordered_effects=(), disabled_safety_checks=(),
        mlir_module_serialized=module,
        calling_convention_version=header["calling_convention_version"],
        module_kept_var_idx=tuple(header["module_kept_var_idx"]),
        uses_global_constants=header["uses_global_constants"], _get_vjp=None)


def load(name: str):
    """The entry `name` as an `Exported`, or None (missing, unreadable, corrupt)."""
    folder = directory()
    if folder is None:
        return None
    try:
        return decode((folder / name).read_bytes())
    except Exception:  # missing or corrupt: trace the program again
        return None


def store(name: str, data: bytes) -> None:
    """Write the entry `name` (atomically; a folder that cannot be written is skipped)."""
    folder = directory()
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, folder / name)
    except OSError:
        pass


def discard(name: str | None) -> None:
    """Remove the entry `name` (one that did not run; nothing for None)."""
    folder = directory()
    if folder is not None and name is not None:
        with contextlib.suppress(OSError):
            (folder / name).unlink()


# --- Equinox's runtime checks without host callbacks ------------------------------------


_NAN = threading.local()
_PATCH = threading.Lock()
_PATCHED = [False]


def _install() -> bool:
    """Route `equinox.error_if` through Equinox's `nan` mode in threads that ask for it
    (`errors_as_nan`); other threads keep their mode. False if Equinox's internals are
    not the expected ones (then programs keep their callbacks and are not stored)."""
    with _PATCH:
        if _PATCHED[0]:
            return True
        try:
            from equinox import _errors
        except ImportError:
            return False
        original = getattr(_errors, "branched_error_if_impl_jit", None)
        impl = getattr(_errors, "branched_error_if_impl", None)
        if original is None or impl is None:
            return False

        def branched_error_if_impl_jit(x, pred, index, msgs, *, on_error):
            if getattr(_NAN, "on", False) and on_error == "default":
                # unjitted: the `nan` form is not kept in a jit cache other threads use
                return impl(x, pred, index, msgs, on_error="nan")
            return original(x, pred, index, msgs, on_error=on_error)

        _errors.branched_error_if_impl_jit = branched_error_if_impl_jit
        _PATCHED[0] = True
        return True


@contextlib.contextmanager
def errors_as_nan():
    """Trace with Equinox's runtime checks in `nan` mode (this thread only)."""
    _install()
    previous = getattr(_NAN, "on", False)
    _NAN.on = True
    try:
        yield
    finally:
        _NAN.on = previous
