"""Typed experiment configurations, and the command-line flags built from them.

An experiment module defines `NAME`, a frozen dataclass `Config` whose fields (with
the paper's defaults) are its settings, and `run(config, out=None, progress=False)
-> dict`, which returns its results (and, given a folder `out`, writes its figure and
`summary.json` there). A script calls it without argparse:

    from gradflow.experiments import htf_incremental
    result = htf_incremental.run(htf_incremental.Config(widths=(64, 64)))

The command line (`gradflow run NAME --flag ...`) is a thin layer: one flag per field
(`--field-name`, help and choices from the field's `metadata`), parsed into a `Config`
whose `__post_init__` validates it; a `ValueError` there becomes an argparse error
naming the flag (exit status 2), before any output folder is created.

`__post_init__` checks every field with [`check`][] (or the helpers built on it), which
raises a [`SettingError`][] (a `ValueError`) naming the field in backquotes. A check
that needs the data (e.g. classes present in a data set) is made by `run` with
`check` too, before anything is written. `run` creates `out` only when it first
writes there, and writes `summary.json` with [`write_summary`][].
"""

import argparse
import dataclasses
import json
import math
import numbers
import os
import types
import typing
from pathlib import Path

import jax
import numpy as np

HELP = "help"
CHOICES = "choices"
MIN_RTOL_EPS = 10
"""The smallest `rtol` a solve accepts, in machine epsilons (as `gradflow.flow`)."""


class SettingError(ValueError):
    """An invalid experiment setting; its message names the field in backquotes."""


def setting(default, help: str, choices=None) -> typing.Any:
    """A `Config` field with its command-line help (and allowed values); typed `Any`, as
    `dataclasses.field` is, so that a field's declared type is what a checker sees."""
    metadata: dict[str, typing.Any] = {HELP: help}
    if choices is not None:
        metadata[CHOICES] = tuple(choices)
    if isinstance(default, (list, tuple)):
        return dataclasses.field(default=tuple(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, config_cls, exclude=()) -> None:
    """One flag per field of `config_cls` (but those in `exclude`), its default shown in
    the help."""
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        if field.name in exclude:
            continue
        kind, nargs = _kind(hints[field.name])
        kwargs: dict[str, typing.Any] = dict(default=field.default, help=_help(field))
        if CHOICES in field.metadata:
            kwargs["choices"] = field.metadata[CHOICES]
        if kind is bool:
            parser.add_argument(flag(field.name), action=argparse.BooleanOptionalAction,
                                **kwargs)
            continue
        if nargs is not None:
            kwargs["nargs"] = nargs
        parser.add_argument(flag(field.name), type=kind, **kwargs)


def from_args(config_cls, args: argparse.Namespace, parser: argparse.ArgumentParser,
              exclude=()):
    """The `Config` of parsed `args` (fields in `exclude` at their defaults); an invalid
    value is an argparse error naming the flag (exit status 2)."""
    values = {}
    for field in dataclasses.fields(config_cls):
        if field.name in exclude:
            continue
        value = getattr(args, field.name)
        values[field.name] = tuple(value) if isinstance(value, list) else value
    try:
        return config_cls(**values)
    except (TypeError, ValueError) as error:
        parser.error(as_flags(str(error), config_cls))


def check(condition: bool | np.bool_, name: str, expected: str, value) -> None:
    """In `__post_init__`: raise a [`SettingError`][] naming field `name` unless
    `condition`."""
    if not condition:
        raise SettingError(f"`{name}` must be {expected}, got {value!r}.")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
            and math.isfinite(value))


def check_int(config, name: str, minimum: int = 1, maximum: int | None = None,
              optional: bool = False) -> None:
    """Field `name` is an int in `[minimum, maximum]` (or None if `optional`)."""
    value = getattr(config, name)
    if optional and value is None:
        return
    expected = (f"an int >= {minimum}" if maximum is None
                else f"an int in [{minimum}, {maximum}]")
    check(_is_int(value) and value >= minimum and (maximum is None or value <= maximum),
          name, expected + (" (or unset)" if optional else ""), value)


def check_ints(config, name: str, minimum: int = 1, maximum: int | None = None,
               distinct: bool = False, optional: bool = False) -> None:
    """Field `name` is a non-empty tuple of ints in `[minimum, maximum]`."""
    values = getattr(config, name)
    if optional and values is None:
        return
    where = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    expected = f"one or more{' distinct' if distinct else ''} ints {where}"
    ok = (isinstance(values, tuple) and len(values) >= 1
          and all(_is_int(v) and v >= minimum and (maximum is None or v <= maximum)
                  for v in values)
          and (not distinct or len(set(values)) == len(values)))
    check(ok, name, expected + (" (or unset)" if optional else ""), values)


def _in_range(value, low, high, low_open, high_open) -> bool:
    return (_is_real(value) and (low is None or (value > low if low_open else value >= low))
            and (high is None or (value < high if high_open else value <= high)))


def _range_text(low, high, low_open, high_open) -> str:
    if high is None:
        return "" if low is None else f" {'>' if low_open else '>='} {low:g}"
    if low is None:
        return f" {'<' if high_open else '<='} {high:g}"
    return (f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")


def check_number(config, name: str, low: float | None = 0.0, high: float | None = None, *,
                 low_open: bool = True, high_open: bool = True,
                 optional: bool = False) -> None:
    """Field `name` is a finite number in the range (by default > 0)."""
    value = getattr(config, name)
    if optional and value is None:
        return
    expected = "a finite number" + _range_text(low, high, low_open, high_open)
    check(_in_range(value, low, high, low_open, high_open), name,
          expected + (" (or unset)" if optional else ""), value)


def check_numbers(config, name: str, low: float | None = 0.0, high: float | None = None, *,
                  low_open: bool = True, high_open: bool = True, distinct: bool = False,
                  length: int | None = None) -> None:
    """Field `name` is a non-empty tuple (of `length`, if given) of finite numbers in
    the range (by default > 0)."""
    values = getattr(config, name)
    count = "one or more" if length is None else str(length)
    expected = (f"{count}{' distinct' if distinct else ''} finite numbers"
                + _range_text(low, high, low_open, high_open))
    ok = (isinstance(values, tuple) and len(values) >= 1
          and (length is None or len(values) == length)
          and all(_in_range(v, low, high, low_open, high_open) for v in values)
          and (not distinct or len(set(values)) == len(values)))
    check(ok, name, expected, values)


def check_rtol(config, name: str = "rtol") -> None:
    """Field `name` is a solver tolerance: in (0, 1), and at least `MIN_RTOL_EPS`
    machine epsilons of the solve's float dtype (float64, or float32 with
    `GRADFLOW_FLOAT32=1`)."""
    check_number(config, name, 0.0, 1.0)
    dtype = np.float64 if jax.config.read("jax_enable_x64") else np.float32
    floor = MIN_RTOL_EPS * float(np.finfo(dtype).eps)
    value = getattr(config, name)
    check(value >= floor, name, f">= {floor:.1e} ({MIN_RTOL_EPS} machine epsilons of "
          f"{np.dtype(dtype).name}, the solve's precision)", value)


def check_choice(config, name: str, choices) -> None:
    """Field `name` is one of `choices` (a tuple field: each of its values)."""
    value = getattr(config, name)
    values = value if isinstance(value, tuple) else (value,)
    check(len(values) >= 1 and all(v in choices for v in values), name,
          f"one of {', '.join(map(repr, choices))}", value)


@typing.overload
def output(out: None) -> None: ...


@typing.overload
def output(out: str | os.PathLike) -> Path: ...


def output(out) -> Path | None:
    """`out` as a folder, created (with its parents) if it does not exist: called by
    an experiment's `run` when it first writes, so that a run refused by its checks
    leaves nothing behind."""
    if out is None:
        return None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_summary(out, summary: dict) -> Path:
    """Write `summary` to `out/summary.json` (the folder created if needed), indented,
    NumPy arrays and scalars as lists and numbers, anything else unknown as its
    `str`; return the file's path."""
    if out is None:
        raise ValueError("`out`: `write_summary` needs a folder, got None.")
    path = output(out) / "summary.json"
    path.write_text(json.dumps(summary, indent=2, default=_json))
    return path


def _json(value):
    if isinstance(value, (np.generic, np.ndarray)):
        return np.asarray(value).tolist()
    return str(value)


def _help(field) -> str:
    default = field.default
    shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
    return f"{field.metadata.get(HELP, '')} (default: {shown})"


def _kind(hint):
    """(element type, argparse `nargs` or None) of a field's type hint: `tuple[X, ...]`
    is one or more values, `tuple[X, X]` exactly two."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        origin = typing.get_origin(hint)
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return args[0], "+"
        return args[0], len(args)
    return hint, None


def as_flags(message: str, config_cls) -> str:
    """`message` with every field name of `config_cls` in backquotes as its flag."""
    for field in dataclasses.fields(config_cls):
        message = message.replace(f"`{field.name}`", f"`{flag(field.name)}`")
    return message
