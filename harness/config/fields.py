"""Field-level conversion and checks: one YAML value -> the annotated type, and the ranges declared with `rule`.

`convert_field(cls, name, value)` converts or raises ValueError saying what was expected; `check_rules(obj)` lists
(field, message) for every value outside its declared range. Both are pure functions of the dataclass.

What this module does not hold: the dataclasses (schema.py) or checks that involve several fields (load.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin


class _Bad(Exception):
    pass


def suggest(word: str, candidates: typing.Iterable[str], noun: str = "keys") -> str:
    """'did you mean X? Valid keys: a, b.' (or only the list when nothing is close)."""
    candidates = list(candidates)
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.5)
    valid = ", ".join(candidates)
    if close:
        return f"did you mean '{close[0]}'? Valid {noun}: {valid}."
    return f"valid {noun}: {valid}."


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        parts = [a for a in get_args(tp) if a is not type(None)]
        inner = " or ".join(_type_name(a) for a in parts)
        return f"{inner} or null" if len(parts) < len(get_args(tp)) else inner
    if origin is tuple:
        return f"a list of {_type_name(get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", Path: "a path"}.get(
        tp, str(tp)
    )


def _convert(value: Any, tp: Any) -> Any:
    """`value` from YAML converted to the annotated type, or _Bad with what was expected."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg)
            except _Bad:
                continue
        raise _Bad(f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in get_args(tp) and type(value) is type(get_args(tp)[0]):
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in get_args(tp)], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise _Bad(f"expected {_type_name(tp)}, got {value!r}{hint}")
    if origin is tuple:
        if isinstance(value, (str, dict)) or not isinstance(value, (list, tuple)):
            raise _Bad(f"expected {_type_name(tp)}, got {value!r}; write it as a YAML list: [a, b]")
        return tuple(_convert(v, get_args(tp)[0]) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Bad(f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Bad(f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Bad(f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Bad(f"expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, str) and value.strip():
            return Path(value).expanduser()
        raise _Bad(f"expected a path, got {value!r}")
    raise TypeError(f"unsupported field type {tp}")


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def convert_field(cls: type, name: str, value: Any) -> Any:
    """Converts one YAML value to the type of `cls.name`; raises ValueError with the expectation."""
    try:
        return _convert(value, _hints(cls)[name])
    except _Bad as e:
        raise ValueError(str(e)) from None


def field_names(cls: type) -> list[str]:
    return list(_field_names(cls))


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


@functools.cache
def in_identity(cls: type, name: str) -> bool:
    """False for fields declared `rule(..., identity=False)`: they do not change what is trained. Cached: a big
    grid asks it for every field of every point."""
    return next(f for f in dataclasses.fields(cls) if f.name == name).metadata.get("identity", True)


def _number(value: float) -> str:
    return f"{value:g}"


def range_problem(value: Any, meta: typing.Mapping[str, Any]) -> str | None:
    """Why `value` is outside the range in `meta` (a field's rule), or None."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    low, gt, high, below, step = (meta.get(k) for k in ("min", "gt", "max", "below", "multiple_of"))
    null = f" or null ({meta['null']})" if "null" in meta else ""
    problem = None
    if step is not None and (value < (low or step) or value % step):
        fix = max(step, round(value / step) * step)
        problem = f"must be a positive multiple of {step}, got {value}; use {fix}"
    elif low is not None and below is not None and not low <= value < below:
        problem = f"must be in [{_number(low)}, {_number(below)}), got {value}"
    elif low is not None and value < low:
        bound = "0 or more" if low == 0 else f"at least {_number(low)}"
        problem = f"must be {bound}{null}, got {value}"
    elif gt is not None and not value > gt:
        problem = f"must be above {_number(gt)}{null}, got {value}"
    elif high is not None and value > high:
        problem = f"must be at most {_number(high)}, got {value}"
    elif below is not None and not value < below:
        problem = f"must be below {_number(below)}, got {value}"
    if problem is None:
        return None
    return f"{problem}; {meta['hint']}." if "hint" in meta else f"{problem}."


def check_rules(obj: Any) -> list[tuple[str, str]]:
    """(field, message) for every field of the dataclass `obj` whose value is outside its declared range."""
    out = []
    for f in dataclasses.fields(obj):
        message = range_problem(getattr(obj, f.name), f.metadata)
        if message:
            out.append((f.name, message))
    return out
