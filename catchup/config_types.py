"""A recipe value against its type annotation: conversion (int -> float, scalar -> one-item list) and a
readable name of the expected type for error messages."""
from __future__ import annotations

import types
import typing
from typing import Any, Mapping


class Mismatch(Exception):
    """A value does not fit a type annotation (turned into a CatchupError by the caller)."""


_NAMES = {bool: ("a bool (true/false)", "bools"), int: ("an int", "ints"), float: ("a float", "floats"),
          str: ("a string", "strings"), dict: ("a mapping", "mappings")}


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def describe(tp: Any, plural: bool = False) -> str:
    if _is_union(tp):
        args = typing.get_args(tp)
        text = " or ".join(describe(a, plural) for a in args if a is not type(None))
        return text + " or null" if type(None) in args else text
    if typing.get_origin(tp) is list:
        return "lists" if plural else f"a list of {describe(typing.get_args(tp)[0], plural=True)}"
    return _NAMES[typing.get_origin(tp) or tp][1 if plural else 0]


def coerce(value: Any, tp: Any) -> Any:
    """`value` converted to annotation `tp` (int -> float, scalar -> one-item list), or Mismatch."""
    if _is_union(tp):
        if value is None and type(None) in typing.get_args(tp):
            return None
        for arg in typing.get_args(tp):
            try:
                return coerce(value, arg)
            except Mismatch:
                continue
        raise Mismatch
    if typing.get_origin(tp) is list:
        items = value if isinstance(value, (list, tuple)) else [value]  # `--wandb-tags baseline` works
        return [coerce(v, typing.get_args(tp)[0]) for v in items]
    if (typing.get_origin(tp) or tp) is dict and isinstance(value, Mapping):
        return dict(value)
    if tp is bool and isinstance(value, bool) or tp is str and isinstance(value, str):
        return value
    if tp in (int, float) and isinstance(value, int) and not isinstance(value, bool):
        return tp(value)
    if tp is float and isinstance(value, float):
        return value
    raise Mismatch
