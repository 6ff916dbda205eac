"""Typed checks of settings: each value against its annotation, ranges named by key path, "did you mean".

Settings arrive from JSON files and command lines, where ``"steps": "ten"``, ``"steps": 2.5``,
``"lr": NaN`` or ``"data": "oops"`` are all one typo away. :func:`check_fields` checks every field of a
frozen settings dataclass against its type annotation (``int``, ``float``, ``bool``, ``str``, ``dict``,
``tuple[int, ...]``, ``X | None``, nested dataclasses) and raises :class:`~privimage.errors.ConfigError`
naming the key path (``pretrain.steps``) and what was found; :func:`need` is the range check that names the
key the same way. Conversions are the lossless ones only: an integer where a float belongs becomes a float,
an integral float (``2.0``) where an integer belongs becomes an int, a JSON list where a tuple belongs becomes
a tuple. Never a bool for a number, never a string for anything else, never NaN or ±inf.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Iterable

from privimage.errors import ConfigError

__all__ = ["MAX_INT", "check_fields", "describe", "need", "suggest"]

#: Integers beyond this (2**53, the largest a JSON number holds exactly) are refused everywhere.
MAX_INT = 2 ** 53


def describe(value: Any) -> str:
    """``'ten' (a string)``, ``2.5 (a number)``, ``[1, 2] (a list)``: what was found, for an error message."""
    kind = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list",
            tuple: "a list", dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{text[:60]}{'...' if len(text) > 60 else ''} ({kind})"


def suggest(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'embedded'?"`` for the closest of ``choices``, or ``""``."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def need(cond: bool, key: str, value: Any, expected: str) -> None:
    """Raise ``ConfigError("key=value: expected <expected>.")`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"{key}={value!r}: expected {expected}" + ("" if expected.endswith("?") else "."))


def check_fields(obj: Any, section: str = "") -> None:
    """Check (and losslessly convert) every field of the frozen dataclass ``obj`` against its annotation."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        checked = coerce(value, hints[f.name], f"{section}.{f.name}" if section else f.name)
        if checked is not value:
            object.__setattr__(obj, f.name, checked)


def coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` as type ``hint`` (lossless conversions only), or a :class:`ConfigError` naming ``key``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return coerce(value, option, key)
            except ConfigError as err:
                errors.append(err)
        if len(options) == 1:
            raise errors[0]
        raise ConfigError(f"{key}: expected {' or '.join(_name(a) for a in args)}, got {describe(value)}.")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, hint):
            raise ConfigError(f"{key}: expected a section (a JSON object), got {describe(value)}.")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {describe(value)}.")
        return value
    if hint is int:
        if isinstance(value, float) and not isinstance(value, bool) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {describe(value)}.")
        if abs(value) > MAX_INT:
            raise ConfigError(f"{key}={value}: expected an integer of magnitude at most 2**53.")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {describe(value)}.")
        try:
            number = float(value)
        except OverflowError:
            raise ConfigError(f"{key}: expected a finite number, got an integer too large for one.") from None
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}.")
        return number if type(value) is not float else value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {describe(value)}.")
        return value
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected an object, got {describe(value)}.")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {describe(value)}.")
        item = args[0]
        items = tuple(coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
        return items if items != value or type(value) is not tuple else value
    raise TypeError(f"check_fields: no rule for the annotation {hint!r} of {key}")  # a programming error


def _name(hint: Any) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", dict: "an object",
            type(None): "null"}.get(hint, getattr(hint, "__name__", str(hint)))
