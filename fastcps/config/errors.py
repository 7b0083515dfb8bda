"""Config errors a user can fix: pydantic's validation errors as one line that names the dotted key,
what was expected and what was given, with a "did you mean" for unknown keys."""

from __future__ import annotations

import difflib
import json
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ValidationError

__all__ = ["ConfigError", "NESTED_ERRORS", "SCHEMA_KEY"]

SCHEMA_KEY = "$schema"
"""A config file's top-level ``"$schema"`` (the JSON Schema an editor checks it against) is not config."""

NESTED_ERRORS = "config_errors"
"""``ctx`` key of a validator's ``PydanticCustomError`` carrying the errors of a model it validated itself
(``{"config_errors": err.errors(), "config_model": Model, "config_note": "..."}``): the message names the
key inside it, and ends with the note when one is given."""

_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


class ConfigError(ValueError):
    """A config problem a user can fix: the message names the key, what was expected and what was given."""


# ---------------------------------------------------------------------------------------------- helpers


def _join(path: str, key: str | int) -> str:
    return f"{path}.{key}" if path else str(key)


def _where(path: str) -> str:
    return f"config key '{path}'" if path else "config root"


def _is_union(origin: Any) -> bool:
    return origin is Union or origin is types.UnionType


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _unwrap(tp: Any) -> Any:
    """``Annotated[X, ...]`` -> X and ``Optional[X]`` -> X (one non-None member); anything else unchanged."""
    while True:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is Annotated:
            tp = args[0]
        elif _is_union(origin) and len([a for a in args if a is not type(None)]) == 1:
            tp = next(a for a in args if a is not type(None))
        else:
            return tp


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if tp is Ellipsis:
        return "..."
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return _type_name(args[0])
    if _is_union(origin):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(json.dumps(c) for c in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(_type_name(a) for a in args)}]"
    if isinstance(tp, type):
        return tp.__name__
    return repr(tp).replace("typing.", "")


def _show(value: Any) -> str:
    text = json.dumps(value) if _jsonable(value) else repr(value)
    if len(text) > 80:  # keep one error on one screen line even when a whole section is wrong
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _unknown_key_error(path: str, key: str, valid: Sequence[str], what: str = "key") -> ConfigError:
    full = _join(path, key)
    msg = f"unknown config {what} '{full}'"
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    msg += f"; did you mean '{_join(path, close[0])}'?" if close else "."
    section = f"under '{path}'" if path else "at the top level"
    msg += f" Valid keys {section}: {', '.join(valid) if valid else '(none)'}"
    return ConfigError(msg)


# ------------------------------------------------------------------- pydantic errors -> one-line messages


def _keys(model: type[BaseModel]) -> dict[str, Any]:
    """The model's keys (a field's alias where it has one: the key in the file) -> their fields."""
    return {field.alias or name: field for name, field in model.model_fields.items()}


def _child(tp: Any, part: Any) -> Any:
    """Annotation of ``tp``'s member ``part`` (a key, list index or dict key); None when it has none."""
    if _is_model(tp):
        field = _keys(tp).get(part)
        return None if field is None else field.annotation
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, Sequence) or tp is list:
        return args[0] if args else Any
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return args[0]
        return args[part] if isinstance(part, int) and part < len(args) else Any
    if origin in (dict, Mapping) or tp is dict:
        return args[1] if args else Any
    return None


def _locate(tp: Any, loc: Sequence[Any]) -> tuple[list[Any], list[Any], tuple]:
    """Follow a pydantic error location from annotation ``tp``: (keys, annotation after each, loc left).

    Stops where the annotation has no member ``part``: an unknown key, or a union of several types
    (pydantic's loc then names a member of the union, not a key: the message is about the whole union)."""
    keys, trail = [], [_unwrap(tp)]
    for i, part in enumerate(loc):
        child = _child(trail[-1], part)
        if child is None:
            return keys, trail, tuple(loc[i:])
        keys.append(part)
        trail.append(_unwrap(child))
    return keys, trail, ()


def _expected(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is bool:
        return "bool (true/false)"
    if _is_model(tp):
        return f"an object ({tp.__name__})"
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        return f"a list ({_type_name(tp)})"
    if origin in (dict, Mapping) or tp is dict:
        return f"an object ({_type_name(tp)})"
    return _type_name(tp)


def _message(root: Any, err: Mapping, prefix: str = "") -> str:
    """One line for pydantic error ``err`` (``loc`` relative to annotation ``root`` at key ``prefix``)."""
    kind, ctx, given = err["type"], err.get("ctx") or {}, err.get("input")
    keys, trail, rest = _locate(root, err["loc"])
    path = ".".join([prefix] * bool(prefix) + [str(k) for k in keys])
    tp, parent = trail[-1], trail[-2] if len(trail) > 1 else None
    if NESTED_ERRORS in ctx:  # a validator checked a model of its own (a reward's args): name the key in it
        note = f" ({ctx['config_note']})" if ctx.get("config_note") else ""
        return _message(ctx["config_model"], ctx[NESTED_ERRORS][0], path) + note
    if kind == "extra_forbidden" and _is_model(tp) and rest:
        return str(_unknown_key_error(path, str(rest[0]), list(_keys(tp))))
    if kind == "missing" and typing.get_origin(parent) is tuple:
        return _length_message(path.rpartition(".")[0], parent, given)
    if kind == "missing":
        return (
            f"missing required config key '{path}' (type {_type_name(tp)}); "
            "set it in the JSON file or with --set"
        )
    if kind in ("value_error", "assertion_error"):
        text = str(ctx.get("error", err["msg"]))
        if _is_model(tp):  # a section's cross-field check: prefixed with the section, as the check names keys
            return f"{path}: {text}" if path else text
        return f"{_where(path)}: {text}"
    return _value_message(path, tp, kind, ctx, given, err["msg"])


def _length_message(path: str, tp: Any, given: Any) -> str:
    n = len(typing.get_args(tp))
    size = len(given) if isinstance(given, (list, tuple)) else "?"
    return f"{_where(path)}: expected {n} elements ({_type_name(tp)}), got {size}: {_show(given)}"


def _value_message(path: str, tp: Any, kind: str, ctx: Mapping, given: Any, msg: str) -> str:
    """A value of the wrong type, out of range, or not among a Literal's choices."""
    bounds = [f"{op} {ctx[k]}" for k, op in _BOUNDS.items() if k in ctx]
    if bounds:
        return f"{_where(path)}: expected {_type_name(tp)} {' and '.join(bounds)}, got {_show(given)}"
    if kind in ("too_short", "too_long") and typing.get_origin(tp) is tuple:
        return _length_message(path, tp, given)
    if kind in ("too_short", "too_long"):
        bound = f"at least {ctx['min_length']}" if kind == "too_short" else f"at most {ctx['max_length']}"
        return f"{_where(path)}: expected {bound} elements, got {_show(given)}"
    if typing.get_origin(tp) is Literal:
        choices = ", ".join(json.dumps(c) for c in typing.get_args(tp))
        return f"{_where(path)}: expected one of {choices}; got {_show(given)}"
    if kind.endswith("_type") or kind.endswith("_parsing") or _is_union(typing.get_origin(tp)):
        return f"{_where(path)}: expected {_expected(tp)}, got {_show(given)}"
    return f"{_where(path)}: {msg}, got {_show(given)}"


def _config_error(root: Any, err: ValidationError, prefix: str = "") -> ConfigError:
    """The first of pydantic's errors (field order, as a reader checks the file), as a ConfigError."""
    return ConfigError(_message(root, err.errors()[0], prefix))
