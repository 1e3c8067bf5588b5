"""Dataclass configs: per-field help, CLI flags, ``--config file.yaml``, saved next to outputs.

Every stage has one config dataclass. Each field is declared with :func:`opt`, whose help text
becomes the ``--help`` line, so documentation and behaviour cannot drift apart. Precedence:
flags given on the command line > values in ``--config`` YAML > dataclass defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from nla.errors import NLAError
from nla.meta import read_yaml, write_yaml

T = TypeVar("T")

_UNSET = object()


def opt(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:
    """A config field with its help text (shown by ``--help``)."""
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for ``X | None`` annotations."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return tp, False


def add_config_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per field; defaults are left unset so we can tell what the user actually gave."""
    hints = typing.get_type_hints(cls)
    parser.add_argument("--config", metavar="YAML", help="read settings from a YAML file (flags override it)")
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        tp, _ = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None
        )
        help_text = f.metadata.get("help", "")
        if default is not None and default != "" and tp is not bool:
            help_text += f" (default: {default})"
        kw: dict[str, Any] = {"dest": f.name, "default": _UNSET, "help": help_text}
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp) or (str,)
            parser.add_argument(flag, nargs="*", type=item, **kw)
        elif typing.get_origin(tp) is dict or tp is dict:
            continue  # structured fields come from YAML only
        else:
            parser.add_argument(flag, type=tp, **kw)


def config_from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise NLAError(f"{where}: unknown setting {unknown[0]!r} for {cls.__name__}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise NLAError(f"{where}: {exc}") from None


def resolve_config(cls: type[T], args: argparse.Namespace, section: str | None = None) -> T:
    """defaults < YAML (the whole file, or its ``section`` mapping) < explicit flags."""
    values: dict[str, Any] = {}
    path = getattr(args, "config", None)
    if path:
        data = read_yaml(path)
        if section and isinstance(data.get(section), dict):
            data = data[section]
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        values.update({k: v for k, v in data.items() if k in names})
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        given = getattr(args, f.name, _UNSET)
        if given is not _UNSET:
            values[f.name] = given
    return config_from_dict(cls, values, where=str(path or "flags"))


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    """Record the resolved config next to a stage's output (secrets are never config fields)."""
    write_yaml(path, config_to_dict(config))
