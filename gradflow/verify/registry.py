"""Theorem checks: a registry of small objects, and the runner behind `gradflow verify`.

**How a run is solved.** [`gradflow.verify.run_checks`][] first draws every instance of
every check it runs, then groups the solves by shape: two solves fall in one group
when their model, objective and solve settings have the same pytree structure, static
values and array shapes (values may differ) and they save at the same number of times
(what they observe does not matter). Each group is stacked along a leading axis and
integrated by one compiled, `jax.vmap`-ed solve (`gradflow._solve.build`/`run`, the
solve behind [`gradflow.flow`][]) that saves the model at the save times; the
observers are then evaluated on the saved models by a second compiled program, one per
set of observers. A run thus compiles about two programs per shape, not one per
instance, and groups span checks (the CP checks share their solves). The built-in
checks draw their instances from a few fixed shape *buckets* (instance `k` uses bucket
`k % len(check.buckets)`) so that every group holds many instances. A check whose
instances have random shapes, or whose observers close over per-instance values,
still works: its solves just form groups of one.

A group is solved in chunks of at most `CHUNK` solves, in order of `Case.cost` and then
of the final time (a chunk runs until its longest member is done); a group whose
solver is [`gradflow.AutoStiff`][] is solved one member at a time by one compiled
program of one member (batched, all members would take W steps once one is stiff).
The programs of a group of more than `LONG_GROUP` solves (`--cases 100`) are compiled
with XLA's default optimization, those of smaller groups with its quickest. Programs
are built while another runs, in the order they will run (`_Gate`).

A group whose batched solve raises is solved again one instance at a time with
[`gradflow.flow`][], so an error names its instance; so is an instance whose batched
solve ended non-finite (inside the batched programs Equinox's runtime checks give NaN
instead of raising, see below).

**Programs on disk.** When JAX's persistent compilation cache is on (the command line
turns it on), each batched program is traced once, exported with `jax.export` and
kept beside JAX's cache (`gradflow.verify._cache`); a later run loads it instead of
tracing it, and JAX's cache supplies the compiled executable. A run whose programs are
all kept spends its time drawing, running the solves and computing residuals.
`gradflow.verify.registry.compiled_programs()` counts the programs traced and
loaded.

**Reproducibility.** Instance `k` of a check is drawn from the key
`fold_in(key(seed), crc32(name) + k)`, whatever else runs; `case=K` (`gradflow verify
--only NAME --case K`) draws and solves it alone. Its residual then agrees with the
batched run's to rounding: the solve is the same, but a batch of another size (or of a
group above `LONG_GROUP`, compiled with other options) is another compiled program.
"""

import concurrent.futures
import contextlib
import dataclasses
import heapq
import itertools
import math
import os
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from .. import _solve
from .. import observers as _observers
from . import _cache
from .._flow import FlowError, default_save_times, flow, gradient_evaluations
from .._status import Status
from ..solvers import AutoStiff
from ..trajectory import Trajectory

CHUNK = 32
"""The most solves integrated together; a larger group is solved in chunks of this size
(the last one padded by repeating members, so that every chunk has one compiled shape)."""

CORES = os.cpu_count() or 1
"""How many programs are built (traced and compiled) or run at once, at most (see
`_Gate`)."""

WORKERS = 16
"""How many groups of solves are in hand at once (threads). At most `CORES` of them are
at work and one runs (see `_Gate`); the others wait, with their programs built or not,
so that while a long chunk runs (`closed-form-odeco-cp`'s, 30 s on `--cases 100`),
the other cores build the programs of the groups that follow."""

_FLOW_KEYS = frozenset({"t1", "loss_tol", "loss_drop", "radius", "save_times", "observers",
                        "solver", "rtol", "atol", "max_steps", "throw"})
_BUILD_KEYS = ("t1", "loss_tol", "loss_drop", "radius", "rtol", "atol", "solver", "max_steps")


@dataclasses.dataclass
class Case:
    """One random instance of a check: what to integrate, and anything the residual needs.

    **Fields:** `model`, `objective`, `flow` (keyword arguments of
    [`gradflow.flow`][]: `t1`, `observers`, `save_times`, stops, tolerances, solver),
    `description` (shapes and scales, shown for the worst and the failing case),
    `extra` (free), `companions` (further [`gradflow.verify.Case`][]s to integrate
    with this one, e.g. a model with some components deleted; they are batched with
    the other solves of their shape, and their trajectories are in
    `companion_trajectories`, in order, when the residual runs), `cost` (optional: how
    long the solve runs compared with the other solves of its shape, in any unit, where
    its final time does not say; see `gradflow.verify.registry._solve_group`).
    """

    model: Any
    objective: Any
    flow: dict
    description: str = ""
    extra: dict = dataclasses.field(default_factory=dict)
    companions: tuple = ()
    companion_trajectories: list = dataclasses.field(default_factory=list, repr=False)
    cost: float = 0.0


@dataclasses.dataclass(frozen=True)
class Check:
    """A theorem check.

    **Fields:**

    - `name`: a short unique id (`"cp-lemma1"`).
    - `statement`: the statement checked, one line, with its section of the docs' Theory pages.
    - `preconditions`: when the statement applies (how the instances are drawn: the
      ranges of the random values).
    - `draw`: `key -> Case`, a random instance; or, when `buckets` is given,
      `(key, bucket) -> Case`, a random instance of the given shape bucket.
    - `residual`: `(trajectory, case) -> float`, the worst residual along the flow;
      the check passes when it is finite and at most `tolerance` on every instance.
    - `tolerance`: the bound the residual is held to.
    - `buckets`: optional, the shapes the instances are drawn from (dicts such as
      `{"order": 3, "dims": 3, "rank": 4}`); instance `k` is drawn in bucket
      `buckets[k % len(buckets)]`, so that instances of a bucket are solved together.
    """

    name: str
    statement: str
    preconditions: str
    draw: Callable[..., Case]
    residual: Callable[[Trajectory, Case], float]
    tolerance: float
    buckets: tuple = ()

    def key(self, k: int, seed: int = 0):
        """The PRNG key of instance `k`: `fold_in(key(seed), crc32(name) + k)`."""
        return jr.fold_in(jr.key(seed), zlib.crc32(self.name.encode()) + k)

    def bucket(self, k: int):
        """The shape bucket of instance `k` (None without buckets)."""
        return self.buckets[k % len(self.buckets)] if self.buckets else None

    def instance(self, k: int, seed: int = 0) -> Case:
        """Draw instance `k` (the same for the same `k` and `seed`, in any run)."""
        if self.buckets:
            return self.draw(self.key(k, seed), self.bucket(k))
        return self.draw(self.key(k, seed))


def describe_bucket(bucket) -> str:
    """A bucket in words: `order 3, dims 3, rank 4` for a dict, `str()` otherwise."""
    if isinstance(bucket, dict):
        return ", ".join(f"{k} {v}" for k, v in bucket.items())
    return str(bucket)


CHECKS: dict[str, Check] = {}
"""Every registered check by name; `gradflow verify` runs them all by default."""


def register(check: Check) -> Check:
    """Add `check` to [`gradflow.verify.CHECKS`][] (a name already taken is an error)."""
    if not isinstance(check, Check):
        raise TypeError(f"`check` must be a gradflow.verify.Check, got {check!r}.")
    if check.name in CHECKS:
        raise ValueError(f"`check.name`: a check named {check.name!r} is already registered.")
    CHECKS[check.name] = check
    return check


@dataclasses.dataclass(frozen=True)
class Result:
    """The outcome of one check over its cases.

    **Fields:** `name`, `statement`, `cases` (instances run), `worst` (the worst
    residual; NaN when an instance raised), `tolerance`, `worst_case` (that instance,
    described), `seconds` (drawing, this check's share of the batched solves, and the
    residuals), `error` (the first exception's text), `worst_index` (the instance
    number of `worst`), `failed_index` and `failed_case` (the first instance that
    failed, None and `""` when all passed), `residuals` (per instance, NaN where it
    raised), `instances` (the instance numbers run), `seed`, `compiles` (solve
    programs compiled for its solves in this run, a program shared with other checks
    counted for each; 0 when all were compiled before), `shapes` (the distinct solve
    shapes, i.e. batched programs, its instances used).
    """

    name: str
    statement: str
    cases: int
    worst: float
    tolerance: float
    worst_case: str
    seconds: float
    error: str | None = None
    worst_index: int | None = None
    failed_index: int | None = None
    failed_case: str = ""
    residuals: tuple = ()
    instances: tuple = ()
    seed: int = 0
    compiles: int = 0
    shapes: int = 0

    @property
    def passed(self) -> bool:
        return self.error is None and bool(np.isfinite(self.worst) and self.worst <= self.tolerance)

    def rerun(self, imports=()) -> str | None:
        """The command that re-runs the failing instance alone (None if it passed);
        `imports` are the `--import` arguments the check needs."""
        if self.failed_index is None:
            return None
        return " ".join(["gradflow verify", *(f"--import {m}" for m in imports),
                         f"--only {self.name} --case {self.failed_index}",
                         *([f"--seed {self.seed}"] if self.seed else [])])


def run_check(check: Check, cases: int = 3, seed: int = 0, case=None) -> Result:
    """Draw `cases` instances of `check`, integrate them, and keep the worst residual.

    Instance `k` uses the key `fold_in(key(seed), crc32(name) + k)`, so a run is
    reproducible and adding checks does not change the instances of others; `case=K`
    runs instance `K` alone (the same instance as in a run of `K + 1` cases or more),
    and a sequence of instance numbers runs those (`cases` is then ignored).
    A solve that fails, or a residual that raises, fails the instance with the error's
    text.
    """
    return _run([check], cases, seed, case, None)[0]


def run_checks(names=None, cases: int = 3, seed: int = 0, on_result=None,
               case=None) -> list[Result]:
    """Run the named checks (all registered ones by default) in registration order.

    **Arguments:**

    - `names`: check names, or None for all of [`gradflow.verify.CHECKS`][].
    - `cases`: random instances per check.
    - `seed`: the seed of every instance.
    - `on_result`: called with each [`gradflow.verify.Result`][] as it finishes.
    - `case`: run only instance `case` of each check (`gradflow verify --case K`), or
      the instances of a sequence of numbers; `cases` is then ignored.

    **Returns:** the list of results.
    """
    if names is None:
        names = list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        raise ValueError(f"`names`: unknown checks {unknown}; known: {sorted(CHECKS)}.")
    return _run([CHECKS[n] for n in names], cases, seed, case, on_result)


# --- the runner -----------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class _Solve:
    """One solve of an instance (its case or a companion), and what became of it."""

    case: Case
    owner: "_Instance"
    signature: Any = None  # None: solve alone with `flow`
    problem: Any = None
    save_ts: Any = None
    observers: Any = None
    observer_key: Any = None
    trajectory: Trajectory | None = None
    error: str | None = None
    seconds: float = 0.0


@dataclasses.dataclass(eq=False)
class _Instance:
    check: Check
    k: int
    description: str
    case: Case | None = None
    solves: list = dataclasses.field(default_factory=list)
    error: str | None = None
    value: float = float("nan")
    seconds: float = 0.0
    groups: set = dataclasses.field(default_factory=set)


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _run(checks, cases, seed, case, on_result) -> list[Result]:
    if not isinstance(cases, int) or isinstance(cases, bool) or cases < 1:
        raise ValueError(f"`cases` must be a positive int, got {cases!r}.")
    ks = list(range(cases)) if case is None else _case_list(case)
    instances = {check.name: [_draw(check, k, seed) for k in ks] for check in checks}
    groups: dict[Any, list[_Solve]] = {}
    for solve in (s for per in instances.values() for i in per for s in i.solves):
        if solve.signature is not None:
            groups.setdefault(solve.signature, []).append(solve)
    compiled: dict[Any, bool] = {}
    results = []
    # Groups are solved in the order the checks first need them, WORKERS at a time:
    # XLA compiles without holding the GIL, so groups compile while another one runs.
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=WORKERS)
    try:
        futures = {signature: pool.submit(_solve_group, group, priority)
                   for priority, (signature, group) in enumerate(groups.items())}
        for check in checks:
            for instance in instances[check.name]:
                for solve in instance.solves:
                    if solve.signature is None:
                        if solve.trajectory is None and solve.error is None:
                            _solve_alone(solve)
                    else:
                        compiled[solve.signature] = futures[solve.signature].result()
                        instance.groups.add(solve.signature)
                _residual(instance)
            result = _result(check, instances[check.name], seed, compiled)
            results.append(result)
            if on_result is not None:
                on_result(result)
    finally:  # an interrupted run does not wait for the groups not yet started
        pool.shutdown(wait=False, cancel_futures=True)
    return results


def _case_list(case: Any) -> list[int]:  # any value a user passed: checked here
    try:
        ks = [case] if isinstance(case, int) else list(case)  # (a bool is refused below)
    except TypeError:
        ks = None
    if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 0 for k in ks):
        raise ValueError("`case` must be a non-negative int, a non-empty sequence of them, "
                         f"or None, got {case!r}.")
    return list(dict.fromkeys(ks))


def _draw(check: Check, k: int, seed: int) -> _Instance:
    instance = _Instance(check, k, f"case {k}")
    start = time.perf_counter()
    try:
        case = check.instance(k, seed)
        instance.case = case
        instance.description = f"case {k}: {case.description}"
        for c in (case, *case.companions):
            instance.solves.append(_prepare(c, instance))
    except Exception as error:  # a check that cannot be drawn is a failed instance
        instance.error = _error_text(error)
    instance.seconds += time.perf_counter() - start
    return instance


def _prepare(case: Case, owner: _Instance) -> _Solve:
    """Validate a solve as `flow` does, and find its group; unknown or non-batchable
    settings (a progress bar) are left to `flow` itself."""
    solve = _Solve(case, owner)
    kwargs = dict(case.flow)
    if set(kwargs) - _FLOW_KEYS or not isinstance(case.flow, dict):
        return solve
    problem = _solve.build(case.model, case.objective,
                           **{k: kwargs[k] for k in _BUILD_KEYS if k in kwargs})
    t1 = kwargs["t1"]
    save_times = kwargs.get("save_times")
    save_times = _solve.check_save_times(
        default_save_times(float(t1)) if save_times is None else save_times, t1)
    observers = {name: _canonical(fn) for name, fn in
                 _observers.resolve(kwargs.get("observers")).items()}
    try:
        solve.signature = _signature(problem, save_times.shape)
        solve.observer_key = tuple((n, _function_key(f)) for n, f in observers.items())
        hash(solve.observer_key)
    except TypeError:  # something unhashable in the structure: solve it alone
        solve.signature = None
        return solve
    solve.problem = problem
    solve.save_ts = np.asarray(save_times, problem.time_dtype)
    solve.observers = observers
    return solve


_CANONICAL: dict = {}


def _function_key(fn):
    """Functions that compute the same thing get one key: the same object, or the same
    code (with the same globals) and no closure or defaults, as a lambda written in a
    draw function and created anew for every instance."""
    code = getattr(fn, "__code__", None)
    if code is not None and not getattr(fn, "__closure__", None) \
            and not getattr(fn, "__defaults__", None) and not getattr(fn, "__kwdefaults__", None):
        return ("code", code, id(getattr(fn, "__globals__", None)))
    try:
        hash(fn)
        return ("object", fn)
    except TypeError:
        return ("id", id(fn))


def _canonical(fn):
    """One function object per key, so that compiled solves are found again (only
    functions keyed by their code are kept: any other is its own key)."""
    key = _function_key(fn)
    return _CANONICAL.setdefault(key, fn) if key[0] == "code" else fn


def _signature(problem, save_shape):
    """What the batched solve program of `problem` depends on: its structure, its static
    values, the shapes of its arrays and the number of save times (not the observers:
    they are evaluated by a program of their own, so solves that observe different
    things share their solve)."""
    leaves, treedef = jax.tree.flatten(problem)
    shapes = tuple(("array", np.shape(x), str(x.dtype)) if eqx.is_array(x)
                   else ("value", type(x), x) for x in leaves)
    signature = (treedef, shapes, save_shape)
    hash(signature)
    return signature


_TRACES = [0]
_LOADED = [0]
_ALONE = [0]


def compiled_programs() -> dict:
    """What this process has built for verify so far: `traced`, the batched programs
    traced (a solve program per solve shape and batch size, an observer program per
    shape, observers and batch size); `loaded`, those loaded instead from the programs
    kept on disk by an earlier run (`gradflow.verify._cache`: no tracing, and the
    compiled executable from JAX's persistent compilation cache); `batched`, their sum;
    and `alone`, the solves run one at a time with [`gradflow.flow`][] (a check whose
    solves cannot be batched, or a member of a batch that did not finish)."""
    return {"batched": _TRACES[0] + _LOADED[0], "traced": _TRACES[0], "loaded": _LOADED[0],
            "alone": _ALONE[0]}


def _state(t, model, objective):
    return model


_STATE = {"state": _state}


COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
"""XLA options of verify's programs for a group of at most `LONG_GROUP` solves.
Compilation dominates a run of a few instances per check (a solve of a few hundred
steps on a few dozen weights runs in a tenth of a second): XLA's lowest backend
optimization level compiles them about 40% faster, and its classic CPU emitter (not the
MLIR fusion emitters, which compile every fused kernel through a pipeline of their own)
halves what is left, for a run time that stays far below the compile time."""

LONG_GROUP = CHUNK
"""A group of more solves than this (`gradflow verify --cases 100`) is compiled with
XLA's default options (`LONG_COMPILER_OPTIONS`): its programs run long enough that
XLA's optimized code, which runs the solves 2-3x faster, repays the 1.5x longer
compilation many times over."""

LONG_COMPILER_OPTIONS: dict = {}
"""XLA options of the programs of a group of more than `LONG_GROUP` solves."""

_PROGRAMS: dict = {}
"""The batched programs built in this process: `(kind, signature, ..., batch size)` ->
`(callable on a flat list of arrays, its entry name on disk or None, loaded)`."""


def _solve_function(static, dyn_treedef):
    """The vmapped solve of a shape on flat inputs (the dynamic leaves of the stacked
    problems, then the save times): it saves the state (the model) at the save times
    and at the end, and returns builtin containers of arrays (so that it can be
    exported): the saved states' and the final model's leaves, times, status, stats."""
    n = dyn_treedef.num_leaves

    def solve(args):

        def one(dyn, ts):
            out = _solve.run(eqx.combine(dyn, static), ts, _STATE)
            (saved, final), saved_ts = out.observed, out.observed_ts[0]
            states = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), saved["state"],
                                  final["state"])
            return dict(states=jax.tree.leaves(states), saved_ts=saved_ts, t=out.t,
                        model=jax.tree.leaves(out.model), status=out.status,
                        stats=dict(out.stats))

        return jax.vmap(one)(jax.tree.unflatten(dyn_treedef, args[:n]), args[n])

    return solve


def _observe_function(static, dyn_treedef, model_treedef, observers):
    """The observers of a shape on flat inputs (the saved states' leaves, their times,
    the dynamic leaves of the problems), evaluated on every saved state of every member,
    one state after the other (`lax.map`). They are kept out of the solve loop (compiled
    once instead of once per save site, and the solve program stays small), and they
    are not vmapped: XLA's CPU LAPACK kernels split a batch of matrices over the
    intra-op thread pool and wait for it, so two independent batched factorizations
    (an observer's SVD and another's eigendecomposition) running at once on a pool of
    two threads (two cores) wait for each other forever; one matrix at a time, they do
    not split."""
    m = model_treedef.num_leaves

    def observe(args):
        states = jax.tree.unflatten(model_treedef, args[:m])
        times = args[m]
        dynamic = jax.tree.unflatten(dyn_treedef, args[m + 1:])
        members, saves = times.shape

        def one(index):
            b, s = index // saves, index % saves
            model = jax.tree.map(lambda x: x[b, s], states)
            objective = eqx.combine(jax.tree.map(lambda x: x[b], dynamic), static).objective
            return {n: fn(times[b, s], model, objective) for n, fn in observers.items()}

        values = jax.lax.map(one, jnp.arange(members * saves))
        return jax.tree.map(lambda x: x.reshape(members, saves, *x.shape[1:]), values)

    return observe


def _avals(args) -> list:
    return [[list(np.shape(x)), str(x.dtype)] for x in args]


class _Gate:
    """Who may build a program and who may run one, in order of priority.

    At most one program of verify runs at a time (a batched solve or observer program,
    a solve alone, a residual): XLA's CPU LAPACK kernels split a batch over the
    intra-op thread pool and wait for it, so two programs with batched SVDs or LU
    factorizations running at once on a pool of two threads (two cores) wait for each
    other forever. A program is built (traced and compiled) only while fewer than
    `CORES` programs are being built or run (a run does not wait for builds). Waiting
    threads are let in by priority: the thread's `priority` (its group's place in the
    order the checks need them; the main thread's residuals first), then arrival. So
    the programs are built in the order they will run, and while a long chunk runs,
    the other cores build the programs of the groups that follow."""

    def __init__(self):
        self.condition = threading.Condition()
        self.running = False
        self.at_work = 0  # programs being built or run
        self.queues = {"run": [], "build": []}  # heaps of (priority, arrival)
        self.arrivals = itertools.count()

    def _free(self, kind) -> bool:
        return not self.running if kind == "run" else self.at_work < CORES

    @contextlib.contextmanager
    def enter(self, kind: str):
        """Wait for a turn to `"run"` or `"build"` a program; the time spent waiting is
        added up per thread (it is not a check's time)."""
        start = time.perf_counter()
        ticket = (getattr(_WAITED, "priority", -1), next(self.arrivals))
        queue = self.queues[kind]
        with self.condition:
            heapq.heappush(queue, ticket)
            self.condition.wait_for(lambda: queue[0] == ticket and self._free(kind))
            heapq.heappop(queue)
            self.at_work += 1
            self.running |= kind == "run"
            self.condition.notify_all()  # the next in the queue may be free to go too
        _WAITED.seconds = _waited() + time.perf_counter() - start
        try:
            yield
        finally:
            with self.condition:
                self.at_work -= 1
                if kind == "run":
                    self.running = False
                self.condition.notify_all()


_GATE = _Gate()

_WAITED = threading.local()
"""Per thread: `seconds` spent waiting at `_GATE`, and the thread's `priority` there."""


def _executing():
    """Run a program at `_GATE` (one at a time)."""
    return _GATE.enter("run")


def _building():
    """Build a program at `_GATE`."""
    return _GATE.enter("build")


def _waited() -> float:
    return getattr(_WAITED, "seconds", 0.0)


def _compile(function, args, trace: bool, options):
    """`function` jitted with the XLA `options` and compiled for `args` (traced in
    Equinox's nan mode when it is traced here)."""
    jitted = jax.jit(function, compiler_options=options)
    if not trace:
        return jitted.lower(args).compile()
    with _cache.errors_as_nan():
        return jitted.lower(args).compile()


def _build(name, describe, function, args, use_disk=True):
    """The compiled program `name`: already built, loaded from disk, or traced (and then
    exported and kept on disk when the folder of `_cache` is set and its key can be
    written); `((executable, entry name or None, loaded), whether built now)`. It is
    compiled with `LONG_COMPILER_OPTIONS` when the last item of `name` is true, else
    with `COMPILER_OPTIONS` (an exported program does not depend on them; JAX's cache
    keeps a compiled executable per options)."""
    if name in _PROGRAMS:
        return _PROGRAMS[name], False
    with _building():
        return _build_now(name, describe, function, args, use_disk), True


def _build_now(name, describe, function, args, use_disk):
    options = LONG_COMPILER_OPTIONS if name[-1] else COMPILER_OPTIONS
    entry = None
    if _cache.directory() is not None:
        try:
            entry = _cache.key(describe())
        except _cache.Uncacheable:
            entry = None
    exported = _cache.load(entry) if entry is not None and use_disk else None
    program = None
    if exported is not None:
        try:
            program = (_compile(exported.call, args, False, options), entry, True)
            _LOADED[0] += 1
        except Exception:  # an entry that does not compile: trace the program again
            _cache.discard(entry)
    if program is None and entry is not None:
        with _cache.errors_as_nan():
            try:
                exported = jax.export.export(jax.jit(function))(args)
            except Exception:  # not exportable (a host callback): an ordinary program
                exported = None
        if exported is not None:
            try:  # run what a later run will load, so that its compiled program is cached
                data = _cache.encode(exported)
                exported = _cache.decode(data)
                _cache.store(entry, data)
            except Exception:  # an output that cannot be written down: keep it in memory
                pass
            program = (_compile(exported.call, args, False, options), None, False)
    if program is None:
        program = (_compile(function, args, True, options), None, False)
    if not program[2]:
        _TRACES[0] += 1
    _PROGRAMS[name] = program
    return program


def _call(name, describe, function, args):
    """Run the program `name` on `args`; `(outputs, whether it was built now)`. A
    program loaded from disk that does not run is discarded and traced again."""
    (program, entry, loaded), built = _build(name, describe, function, args)
    try:
        with _executing():
            return jax.device_get(program(args)), built
    except Exception:
        if not loaded:
            raise
    _cache.discard(entry)
    _PROGRAMS.pop(name, None)
    (program, _, _), _ = _build(name, describe, function, args, use_disk=False)
    with _executing():
        return jax.device_get(program(args)), True


def _solve_group(group: list[_Solve], priority: int = 0) -> bool:
    """Integrate every pending solve of a group, in chunks; whether a program was built
    (traced or loaded) for it.

    The solves are taken in order of their `Case.cost`, then of their final time `t1`
    (a stable sort), rough measures of their length: a chunk runs until its longest
    member is done, every member paying for every step, so chunks of solves of like
    length waste the least (the CP family's group holds `cp-lemma1`'s solves to
    t = 60 |Ω| and `closed-form-odeco-cp`'s to 1e6). A group whose solver is
    [`gradflow.AutoStiff`][] is solved one member at a time, by one compiled program of
    one member re-run with each member's values: batched, a step is a W step for every
    member once any member is stiff, and such solves (`diagonal-limit`) differ in length
    by orders of magnitude; alone, each takes its own steps. A group of more than
    `LONG_GROUP` solves is compiled with `LONG_COMPILER_OPTIONS`."""
    _WAITED.priority = priority  # (a thread of the pool: this group's, until it is done)
    todo = [s for s in group if s.trajectory is None and s.error is None]
    if not todo:
        return False
    todo.sort(key=lambda s: (float(s.case.cost), float(np.asarray(s.problem.t1))))
    long = len(todo) > LONG_GROUP
    if _one_at_a_time(todo[0].problem):
        size = 1
    else:
        size = math.ceil(len(todo) / math.ceil(len(todo) / CHUNK))  # chunks of equal size
    built = False
    for i in range(0, len(todo), size):
        chunk = todo[i:i + size]
        members = chunk + [chunk[j % len(chunk)] for j in range(size - len(chunk))]
        start, waited = time.perf_counter(), _waited()
        try:
            out, observed, new = _solve_chunk(chunk[0].signature, members, long)
            built |= new
        except Exception:  # a member that cannot run: solve each alone, to name it
            for s in chunk:
                _solve_alone(s)
            continue
        share = (time.perf_counter() - start - (_waited() - waited)) / len(chunk)
        for j, s in enumerate(chunk):
            s.seconds += share
            s.owner.seconds += share
            if int(out["status"][j]) == Status.NON_FINITE:
                # maybe a failed runtime check (NaN inside the batch): `flow` names it
                _solve_alone(s)
                continue
            try:
                s.trajectory = _trajectory(out, observed[s.observer_key], j, s, len(chunk),
                                           share)
            except Exception as error:  # FlowError: a member that did not finish
                s.error = _error_text(error)
    return built


def _one_at_a_time(problem) -> bool:
    """Whether the solves of `problem`'s group are solved one by one (see `_solve_group`)."""
    return isinstance(problem.solver, AutoStiff)


def _solve_chunk(signature, members, long=False):
    """Solve `members` (one signature) with the batched programs: the solve's outputs
    and, per observer key, the observations at the save times and at the end. The
    solve is compiled with `LONG_COMPILER_OPTIONS` if `long`; the observers always with
    `COMPILER_OPTIONS`, so that a residual is computed by the same code in any run (XLA's
    optimized code rounds differently: at a stationary init of `htf-law`, where the
    rates are zero and the residual is relative to them, the unoptimized code's exact
    zeros became rounding noise of 1e-21, and the residual 0.33)."""
    parts = [eqx.partition(s.problem, eqx.is_array) for s in members]
    static = parts[0][1]
    # stacked in NumPy: jnp.stack would compile a program per leaf shape
    dyn_leaves, dyn_treedef = jax.tree.flatten(
        jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *[p[0] for p in parts]))
    model_treedef = jax.tree.structure(members[0].problem.model)
    save_ts = jnp.asarray(np.stack([s.save_ts for s in members]))
    size = len(members)
    args = [*dyn_leaves, save_ts]
    describe = lambda: ["solve", _cache.render(static), _avals(args)]
    out, built = _call(("solve", signature, size, long), describe,
                       _solve_function(static, dyn_treedef), args)
    if len(out["model"]) != model_treedef.num_leaves:
        raise RuntimeError("the solve program's model does not match the problem's")
    out["model"] = jax.tree.unflatten(model_treedef, out["model"])
    times = np.concatenate([out["saved_ts"], out["t"][:, None]], axis=1)
    observed = {}
    for s in members:
        if s.observer_key in observed:
            continue
        args = [*out["states"], jnp.asarray(times), *dyn_leaves]
        describe = lambda s=s, args=args: [
            "observe", _cache.render(static), _avals(args),
            [[n, _cache.render(f)] for n, f in s.observers.items()]]
        values, new = _call(("observe", signature, s.observer_key, size, False), describe,
                            _observe_function(static, dyn_treedef, model_treedef, s.observers),
                            args)
        built |= new
        observed[s.observer_key] = dict(saved=jax.tree.map(lambda x: x[:, :-1], values),
                                        final=jax.tree.map(lambda x: x[:, -1:], values))
    return out, observed, built


def _solve_alone(solve: _Solve) -> None:
    _ALONE[0] += 1
    with _executing():
        start = time.perf_counter()
        try:
            solve.trajectory = flow(solve.case.model, solve.case.objective, **solve.case.flow)
        except Exception as error:
            solve.error = _error_text(error)
        seconds = time.perf_counter() - start
    solve.seconds += seconds
    solve.owner.seconds += seconds


def _trajectory(out, observed, j, solve: _Solve, batch: int, wall: float) -> Trajectory:
    """Member `j` of a batched solve as the [`gradflow.Trajectory`][] `flow` returns."""
    row = lambda tree: jax.tree.map(lambda x: np.asarray(x[j]), tree)
    problem, kwargs = solve.problem, solve.case.flow
    saved, final = row(observed["saved"]), row(observed["final"])
    saved_ts = row(out["saved_ts"])
    t_final = float(out["t"][j])
    keep = saved_ts <= t_final
    saved_ts = saved_ts[keep]
    observations = jax.tree.map(lambda x: x[keep], saved)
    final = jax.tree.map(lambda x: x[0], final)
    if saved_ts.size == 0 or t_final > saved_ts[-1]:
        saved_ts = np.append(saved_ts, t_final)
        observations = jax.tree.map(lambda v, f: np.concatenate([v, f[None]]), observations, final)
    stats = row(out["stats"])
    trajectory = Trajectory(
        ts=saved_ts,
        observations=observations,
        t_final=t_final,
        final=final,
        model=jax.tree.map(lambda x: jnp.asarray(x[j]), out["model"]),
        status=Status(int(out["status"][j])).label,
        stats={
            "steps": int(stats["num_steps"]),
            "accepted_steps": int(stats["num_accepted_steps"]),
            "rejected_steps": int(stats["num_rejected_steps"]),
            "gradient_evaluations": gradient_evaluations(problem.solver, stats),
            "wall_time": wall,
            "batch": batch,
            **{k: int(v) for k, v in stats.items() if not k.startswith("num_")},
        },
        config={
            "solver": type(problem.solver).__name__,
            "t1": float(kwargs["t1"]),
            "loss_tol": kwargs.get("loss_tol"),
            "loss_drop": kwargs.get("loss_drop"),
            "radius": kwargs.get("radius"),
            "rtol": float(problem.rtol),
            "atol": float(problem.atol),
            "max_steps": problem.max_steps,
            "dtype": str(problem.dtype),
        },
    )
    if kwargs.get("throw", True) and not trajectory.ok:
        raise FlowError(trajectory)
    return trajectory


def _residual(instance: _Instance) -> None:
    if instance.error is not None:
        return
    failed = next((s for s in instance.solves if s.error is not None), None)
    if failed is not None:
        instance.error = failed.error
        return
    case = instance.case
    assert case is not None  # drawn: an instance without a case has an error
    case.companion_trajectories = [s.trajectory for s in instance.solves[1:]]
    with _executing():
        start = time.perf_counter()
        try:
            instance.value = float(instance.check.residual(instance.solves[0].trajectory,
                                                           case))
        except Exception as error:  # a residual that raises is a failed instance
            instance.error = _error_text(error)
        instance.seconds += time.perf_counter() - start


def _result(check: Check, instances: list[_Instance], seed: int, compiled: dict) -> Result:
    values = [np.nan if i.error is not None else i.value for i in instances]
    bad = lambda i, v: i.error is not None or not np.isfinite(v) or v > check.tolerance
    failed = next((i for i, v in zip(instances, values) if bad(i, v)), None)
    errored = next((i for i in instances if i.error is not None), None)
    non_finite = next((i for i, v in zip(instances, values) if not np.isfinite(v)), None)
    if non_finite is not None:
        worst_instance = errored or non_finite
    else:
        worst_instance = max(zip(instances, values), key=lambda iv: iv[1])[0]
    worst = values[instances.index(worst_instance)]
    groups = set().union(*(i.groups for i in instances))
    return Result(
        name=check.name, statement=check.statement, cases=len(instances), worst=float(worst),
        tolerance=check.tolerance, worst_case=worst_instance.description,
        seconds=sum(i.seconds for i in instances),
        error=None if errored is None else errored.error,
        worst_index=worst_instance.k,
        failed_index=None if failed is None else failed.k,
        failed_case="" if failed is None else failed.description,
        residuals=tuple(float(v) for v in values),
        instances=tuple(i.k for i in instances), seed=seed,
        compiles=sum(bool(compiled.get(g)) for g in groups),
        shapes=len(groups),
    )


def format_row(result: Result) -> str:
    """One line of the verdict table."""
    verdict = "PASS" if result.passed else ("ERROR" if result.error else "FAIL")
    at = "" if result.worst_index is None else f"#{result.worst_index}"
    return (f"{result.name:<26} {result.cases:>5} {result.worst:>11.3g} {at:>5} "
            f"{result.tolerance:>9.1g}  {verdict:<5} {result.seconds:>6.1f}s")


HEADER = (f"{'check':<26} {'cases':>5} {'worst':>11} {'at':>5} {'tolerance':>9}  {'':<5} "
          f"{'time':>7}")
"""The header of the verdict table: `at` is the instance with the worst residual."""
