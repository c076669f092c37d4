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
naming the flag.
"""

import argparse
import dataclasses
import types
import typing

HELP = "help"
CHOICES = "choices"


def setting(default, help: str, choices=None):
    """A `Config` field with its command-line help (and allowed values)."""
    metadata = {HELP: help}
    if choices is not None:
        metadata[CHOICES] = tuple(choices)
    if isinstance(default, (list, tuple)):
        return dataclasses.field(default=tuple(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, config_cls) -> None:
    """One flag per field of `config_cls`, its default shown in the help."""
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        kind, many = _kind(hints[field.name])
        kwargs = dict(default=field.default, help=_help(field))
        if CHOICES in field.metadata:
            kwargs["choices"] = field.metadata[CHOICES]
        if kind is bool:
            parser.add_argument(flag(field.name), action=argparse.BooleanOptionalAction,
                                **kwargs)
            continue
        if many:
            kwargs["nargs"] = "+"
        parser.add_argument(flag(field.name), type=kind, **kwargs)


def from_args(config_cls, args: argparse.Namespace, parser: argparse.ArgumentParser):
    """The `Config` of parsed `args`; an invalid value is an argparse error (exit 2)."""
    values = {}
    for field in dataclasses.fields(config_cls):
        value = getattr(args, field.name)
        values[field.name] = tuple(value) if isinstance(value, list) else value
    try:
        return config_cls(**values)
    except (TypeError, ValueError) as error:
        parser.error(_as_flags(str(error), config_cls))


def check(condition: bool, name: str, expected: str, value) -> None:
    """In `__post_init__`: raise a `ValueError` naming field `name` unless `condition`."""
    if not condition:
        raise ValueError(f"`{name}` must be {expected}, got {value!r}.")


def _help(field) -> str:
    default = field.default
    shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
    return f"{field.metadata.get(HELP, '')} (default: {shown})"


def _kind(hint):
    """(element type, whether a tuple) of a field's type hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        origin = typing.get_origin(hint)
    if origin is tuple:
        return typing.get_args(hint)[0], True
    return hint, False


def _as_flags(message: str, config_cls) -> str:
    for field in dataclasses.fields(config_cls):
        message = message.replace(f"`{field.name}`", f"`{flag(field.name)}`")
    return message
