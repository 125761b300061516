"""Settings dataclasses checked against their annotations and declared limits, with one-line errors.

Each settings class (``MBCConfig``, ``TrainConfig``, ``EvalConfig``, ``DecodingConfig``) calls
``check(self, limits)`` in ``__post_init__``: every field must have its declared type (a whole
number where ``int``, ``true``/``false`` where ``bool``; an ``int`` is taken where ``float``), and,
where ``limits`` names it, lie in its range or among its choices. ``parse_overrides`` turns
``KEY=VALUE`` strings from the command line into values of each field's type.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from functools import cache

from mbc.errors import MBCError


@dataclass(frozen=True)
class Range:
    low: float | None = None
    high: float | None = None

    def accepts(self, value) -> bool:
        return (self.low is None or value >= self.low) and (self.high is None or value <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"at least {self.low}"
        if self.low is None:
            return f"at most {self.high}"
        return f"between {self.low} and {self.high}"


Limit = Range | tuple  # a range, or the accepted choices


@cache
def _field_types(cls) -> dict[str, tuple[tuple[type, ...], bool]]:
    """field name -> (accepted types, whether None is accepted), from the class's annotations."""
    hints = typing.get_type_hints(cls)
    result = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        options = typing.get_args(hint) if union else (hint,)
        result[f.name] = (
            tuple(typing.get_origin(o) or o for o in options if o is not type(None)),
            type(None) in options,
        )
    return result


_TYPE_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}


def _describe(kinds: tuple[type, ...], optional: bool) -> str:
    words = " or ".join(_TYPE_WORDS.get(k, k.__name__) for k in kinds)
    return words + (" or null" if optional else "")


def _typed(name: str, value, kinds: tuple[type, ...], optional: bool):
    """``value`` as the field's type (an int becomes a float where float is declared), or an error."""
    if value is None and optional:
        return value
    for kind in kinds:
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise MBCError(f"{name} must be a finite number, got {value}")
            return float(value)
        if kind is int and isinstance(value, bool):
            continue
        if isinstance(value, kind):
            return value
    raise MBCError(f"{name} must be {_describe(kinds, optional)}, got {value!r} ({type(value).__name__})")


def check(instance, limits: dict[str, Limit] | None = None) -> None:
    """Every field of ``instance`` against its annotation, then against ``limits``."""
    for name, (kinds, optional) in _field_types(type(instance)).items():
        value = _typed(name, getattr(instance, name), kinds, optional)
        object.__setattr__(instance, name, value)
        limit = (limits or {}).get(name)
        if value is None or limit is None:
            continue
        if isinstance(limit, Range) and not limit.accepts(value):
            raise MBCError(f"{name} must be {limit}, got {value}")
        if isinstance(limit, tuple) and value not in limit:
            raise MBCError(f"{name} must be one of {', '.join(map(repr, limit))}; got {value!r}")


def from_dict(cls, values: dict, what: str = "config"):
    """``cls(**values)``, with unknown keys named."""
    if not isinstance(values, dict):
        raise MBCError(f"a {what} must be a JSON object of fields, got {type(values).__name__}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise MBCError(f"unknown {what} keys {unknown}; known keys are {sorted(known)}")
    return cls(**values)


_TRUE, _FALSE, _NULL = ("true", "yes", "1"), ("false", "no", "0"), ("null", "none")


def _parse(name: str, raw: str, kinds: tuple[type, ...], optional: bool):
    if optional and raw.lower() in _NULL:
        return None
    for kind in kinds:
        try:
            if kind is bool and raw.lower() in _TRUE + _FALSE:
                return raw.lower() in _TRUE
            if kind is int:
                return int(raw)
            if kind is float:
                return float(raw)
            if kind is str:
                return raw
            if kind in (dict, list):
                value = json.loads(raw)
                if isinstance(value, kind):
                    return value
        except ValueError:
            continue
    raise MBCError(f"{name} must be {_describe(kinds, optional)}, got {raw!r}")


def parse_overrides(cls, values: dict, overrides: list[str]) -> dict:
    """``KEY=VALUE`` strings into ``values``, each VALUE read as its field's type (``true``/``false``,
    a number, ``null`` where the field may be unset, JSON for a dict or list)."""
    fields = _field_types(cls)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise MBCError(f"overrides take KEY=VALUE, got '{item}'")
        if key not in fields:
            raise MBCError(f"unknown setting '{key}'; known settings are {', '.join(sorted(fields))}")
        values[key] = _parse(key, raw.strip(), *fields[key])
    return values
