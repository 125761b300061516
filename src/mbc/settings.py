"""Settings classes: pydantic dataclasses whose limits sit beside their fields, with one-line errors.

A settings class (``MBCConfig``, ``TrainConfig``, ``EvalConfig``, ``DecodingConfig``,
``FinetuneConfig``, ``TokenMemoryConfig``) is declared with ``@settings``, its limits written into
its annotations (``Annotated[int, Field(ge=1)]``, ``Literal["l2", "cosine"]``). Checking is strict: a
whole number where ``int`` (``true`` is no number), ``true``/``false`` where ``bool``, no NaN or
infinity; an ``int`` is taken where ``float``. A value outside its limits raises one ``MBCError``
line naming the field, what it accepts and what it got. ``parse_overrides`` turns ``KEY=VALUE``
strings from the command line into values of each field's type.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing

import pydantic
import pydantic.dataclasses
from pydantic import ConfigDict, Field  # noqa: F401  (Field: re-exported for the settings classes)

from mbc.errors import MBCError

_STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


def settings(cls):
    """``cls`` as a checked pydantic dataclass; its ``__post_init__`` runs after the field checks."""
    checked = pydantic.dataclasses.dataclass(cls, config=_STRICT)
    init = checked.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        try:
            init(self, *args, **kwargs)
        except pydantic.ValidationError as error:
            raise MBCError(_one_line(checked, error)) from None

    checked.__init__ = __init__
    return checked


_TYPE_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}
_BOUND_KINDS = ("greater_than_equal", "less_than_equal", "greater_than", "less_than")


def _one_line(cls, error: pydantic.ValidationError) -> str:
    first = error.errors()[0]
    kind, value = first["type"], first.get("input")
    where = first["loc"][0] if first["loc"] else cls.__name__
    name = dataclasses.fields(cls)[where].name if isinstance(where, int) else str(where)  # given by position
    hint = typing.get_type_hints(cls, include_extras=True).get(name)
    if kind == "unexpected_keyword_argument":
        return f"unknown setting '{name}'; known settings are {', '.join(f.name for f in dataclasses.fields(cls))}"
    if kind in _BOUND_KINDS:
        return f"{name} must be {_bounds(hint)}, got {value}"
    if kind == "finite_number":
        return f"{name} must be a finite number, got {value}"
    choices = _choices(hint)
    if choices:
        return f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}"
    kinds, optional = _kinds(hint)
    return f"{name} must be {_describe(kinds, optional)}, got {value!r} ({type(value).__name__})"


def _limits(hint) -> dict:
    """The ge / le / gt / lt bounds declared anywhere in ``hint`` (also inside ``X | None``)."""
    found = {}
    if typing.get_origin(hint) is typing.Annotated:
        for extra in hint.__metadata__:
            for item in getattr(extra, "metadata", [extra]):
                found.update({k: getattr(item, k) for k in ("ge", "le", "gt", "lt") if hasattr(item, k)})
    for arg in typing.get_args(hint):
        found.update(_limits(arg))
    return found


def _bounds(hint) -> str:
    limits = _limits(hint)
    low = f"at least {limits['ge']}" if "ge" in limits else f"above {limits['gt']}" if "gt" in limits else None
    high = f"at most {limits['le']}" if "le" in limits else f"below {limits['lt']}" if "lt" in limits else None
    if "ge" in limits and "le" in limits:
        return f"between {limits['ge']} and {limits['le']}"
    return " and ".join(b for b in (low, high) if b)


def _choices(hint) -> tuple:
    """The values a ``Literal`` in ``hint`` accepts (None among them where the field may be unset)."""
    if typing.get_origin(hint) is typing.Literal:
        return typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        found = [c for arg in typing.get_args(hint) for c in (_choices(arg) or ((None,) if arg is type(None) else ()))]
        return tuple(found) if any(c is not None for c in found) else ()
    return ()


def _kinds(hint) -> tuple[tuple[type, ...], bool]:
    """(accepted types, whether None is accepted) of an annotation, its limits and choices stripped."""
    if typing.get_origin(hint) is typing.Annotated:
        hint = typing.get_args(hint)[0]
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    options = typing.get_args(hint) if union else (hint,)
    kinds = []
    for option in options:
        if typing.get_origin(option) is typing.Annotated:
            option = typing.get_args(option)[0]
        if typing.get_origin(option) is typing.Literal:
            kinds.extend(type(v) for v in typing.get_args(option) if v is not None)
        elif option is not type(None):
            kinds.append(typing.get_origin(option) or option)
    return tuple(dict.fromkeys(kinds)), type(None) in options or None in _choices(hint)


@functools.cache
def _field_types(cls) -> dict[str, tuple[tuple[type, ...], bool]]:
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: _kinds(hints[f.name]) for f in dataclasses.fields(cls)}


def _describe(kinds: tuple[type, ...], optional: bool) -> str:
    words = " or ".join(_TYPE_WORDS.get(k, k.__name__) for k in kinds)
    return words + (" or null" if optional else "")


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
