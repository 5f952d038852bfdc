"""The type and range checks of the config dataclasses, read from their
field annotations, and their JSON round trip: the one validation boundary of
settings, whether they come from a file, an option or a caller."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import fields
from typing import Any, Mapping

from deepmask_cli.core.errors import ConfigError


def _spec(spec: str) -> tuple[bool, list[str] | None, str]:
    """A field annotation's text (int, float, bool, str, X | None,
    tuple[X, ...], tuple[X, Y]) as ``(optional, tuple's item types or None,
    type)``."""
    spec = spec.strip()
    if spec.endswith("| None"):
        return True, *_spec(spec[: -len("| None")])[1:]
    if spec.startswith("tuple["):
        return False, [t.strip() for t in spec[len("tuple["):-1].split(",")], "tuple"
    return False, None, spec


def _type_ok(value: Any, spec: str) -> bool:
    """Whether ``value`` has the field type ``spec`` (:func:`_spec`). Numbers
    must be finite; a bool is not an int; an int is a float."""
    optional, items, kind = _spec(spec)
    if value is None:
        return optional
    if items is not None:
        if not isinstance(value, (tuple, list)):
            return False
        if items[-1] == "...":
            return all(_type_ok(v, items[0]) for v in value)
        return len(value) == len(items) and all(_type_ok(v, t) for v, t in zip(value, items))
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "str":
        return isinstance(value, str)
    return True  # nested configs check themselves


def check_range(cfg: Any, name: str, lo: float | None = None, hi: float | None = None) -> None:
    """Refuse (:class:`ConfigError`) field ``name`` of ``cfg`` outside ``lo``..``hi`` (either may be open)."""
    v = getattr(cfg, name)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        where = f"at least {lo}" if hi is None else f"at most {hi}" if lo is None else f"in {lo}..{hi}"
        raise ConfigError(f"{name} must be {where}, got {v}")


def _type_words(spec: str) -> str:
    """The type ``spec`` (:func:`_spec`) in words, for messages."""
    optional, items, kind = _spec(spec)
    words = {"int": "an integer", "float": "a finite number", "bool": "true or false", "str": "a string"}
    if items is not None:
        item = _type_words(items[0]).removeprefix("an ").removeprefix("a ")
        text = f"a list of {item}s" if items[-1] == "..." else f"a list of {len(items)} {item}s"
    else:
        text = words.get(kind, kind)
    return f"{text} or null" if optional else text


class Serialisable:
    """``to_dict``/``from_dict`` for the JSON files (config.json, checkpoints),
    and the type check every field gets where a config is made (from a file,
    an option or a caller): the one validation boundary of settings."""

    def check_types(self) -> None:
        """Refuse (:class:`ConfigError`) a field whose value is not of its annotated type."""
        for f in fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if not _type_ok(v, str(f.type)):
                raise ConfigError(f"{type(self).__name__}.{f.name} must be {_type_words(str(f.type))}, got {v!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        """Build from a mapping, refusing unknown keys: the inverse of
        :meth:`to_dict` through JSON (lists become tuples, nested configs
        are rebuilt)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{cls.__name__} must be a JSON object, got {type(data).__name__}")
        by_name = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(by_name))
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
        nested = {name: f.default_factory for name, f in by_name.items()  # type: ignore[misc]
                  if isinstance(f.default_factory, type) and issubclass(f.default_factory, Serialisable)}
        values = {}
        for k, v in data.items():
            if k in nested and isinstance(v, Mapping):
                v = nested[k].from_dict(v)
            elif isinstance(v, list):
                v = tuple(v)
            values[k] = v
        return cls(**values)
