"""Strict, typed config loading: JSON file + ``--set`` overrides -> a tree of pydantic models.

Why strict: a typo such as ``"lerning_rate": 1e-5`` in a JSON config is silently ignored by
``dict.get`` style loaders, and the run trains for hours with the default. Here every unknown key, wrong
type, out-of-range value or missing required field raises a :class:`ConfigError` that names the full
dotted key, what was expected and what was given, before any model loads.

The models (``fastcps.config``) declare fields, defaults, ranges and cross-field checks, and pydantic
validates them, in its strict JSON mode: ``true`` is not an int, ``"3"`` is not a number, an int is a
float. This module adds what pydantic leaves out: ``--set dotted.key=value`` overrides (sections and
list elements absent from the file are filled from the defaults), rejection of duplicate JSON keys, and
one-line messages (with a "did you mean" for unknown keys) instead of pydantic's multi-line report.
It knows no field names: it is driven by the models' fields and annotations.

Typical use::

    cfg = load_config(TrainConfig, args.config, args.set)   # args.set = ["train.lr=1e-5", ...]
    validate_tree(cfg, world_size=dist.get_world_size())
    save_config(cfg, os.path.join(run_dir, "config.json"))  # re-loads to an equal object
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, TypeAdapter, ValidationError

__all__ = ["ConfigError", "from_dict", "load_config", "save_config", "to_dict", "validate_tree"]

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
        return (f"missing required config key '{path}' (type {_type_name(tp)}); "
                "set it in the JSON file or with --set")
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


def _validate(tp: Any, data: Any, context: Mapping | None) -> Any:
    """Strict validation of plain JSON data as ``tp`` (a model or any annotation)."""
    adapter = tp if _is_model(tp) else TypeAdapter(tp)
    validate_json = adapter.model_validate_json if _is_model(tp) else adapter.validate_json
    validate_py = adapter.model_validate if _is_model(tp) else adapter.validate_python
    try:
        text = json.dumps(data)
    except (TypeError, ValueError):  # not JSON data (objects set in code): pydantic's strict Python mode
        return validate_py(data, strict=True, context=context)
    # JSON mode: a JSON list is a tuple and an int a float, as in the file, while strict mode still
    # refuses what a lax parse would guess at ("3" as an int, 1 as a bool).
    return validate_json(text, strict=True, context=context)


# ------------------------------------------------------------------------------------------ conversion


def from_dict(cls: type, data: Any, path: str = "", context: Mapping | None = None) -> Any:
    """Build model ``cls`` from plain data, strictly.

    Raises :class:`ConfigError` for an unknown key (with the valid keys and a "did you mean"), a value of
    the wrong type or out of range (with the expected type and the value given), a missing required
    field, or a failed cross-field check. ``path`` is the dotted prefix used in messages (the location
    of ``data`` inside a larger config); ``context`` is pydantic's validation context
    (``{"world_size": n}`` turns on the checks that need the number of processes).
    """
    if not _is_model(cls):
        raise TypeError(f"from_dict needs a pydantic model type, got {cls!r}")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{_where(path)}: expected an object ({cls.__name__}), got {_show(data)}")
    try:
        return _validate(cls, to_dict(data), context)
    except ValidationError as err:
        raise _config_error(cls, err, path) from None


def to_dict(obj: Any) -> Any:
    """Plain JSON-able data from a model tree, in field order (tuples become lists)."""
    if isinstance(obj, BaseModel):
        # by_alias: a field renamed because its key clashes with pydantic's names keeps its key
        return to_dict(obj.model_dump(by_alias=True))
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# ------------------------------------------------------------------------------------------- overrides


def _parse_override_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _field_type(cls: type[BaseModel], name: str) -> Any:
    """The field's annotation with its constraints (``Field(ge=1)``), to check an override value."""
    field = cls.model_fields[name]
    return Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation


def _step(tp: Any, node: Any, seg: str, path: str, create: bool) -> tuple[Any, Any, Any]:
    """Resolve one path segment: returns (container, key, field annotation) for ``node[seg]``.

    ``node`` is the plain-data value at ``path`` (``tp`` its annotation). When ``create`` is set and
    the key is missing from the data, it is filled from the model's default, so that
    ``model.lr=...`` on a section absent from the file keeps the section's other defaults.
    """
    tp = _unwrap(tp)
    origin = typing.get_origin(tp)
    if _is_model(tp):
        if not isinstance(node, dict):
            raise ConfigError(f"{_where(path)}: expected an object ({tp.__name__}), got {_show(node)}")
        if seg not in tp.model_fields:
            raise _unknown_key_error(path, seg, list(tp.model_fields))
        if create and node.get(seg) is None:
            default = to_dict(tp.model_fields[seg].get_default(call_default_factory=True))
            node[seg] = {} if default is None else default
        return node, seg, _field_type(tp, seg)
    if origin is list:
        return _list_step(tp, node, seg, path)
    if origin is dict or tp is dict:
        if not isinstance(node, dict):
            raise ConfigError(f"{_where(path)}: expected an object, got {_show(node)}")
        if create and node.get(seg) is None:
            node[seg] = {}
        return node, seg, _child(tp, seg)
    raise ConfigError(
        f"cannot set '{_join(path, seg)}': '{path}' is a value of type {_type_name(tp)}, not a section"
    )


def _list_step(tp: Any, node: Any, seg: str, path: str) -> tuple[Any, Any, Any]:
    if not isinstance(node, list):
        raise ConfigError(f"{_where(path)}: expected a list, got {_show(node)}")
    try:
        index = int(seg)
    except ValueError:
        raise ConfigError(
            f"cannot set '{_join(path, seg)}': '{path}' is a list, index it with a number "
            f"(0..{len(node) - 1})"
        ) from None
    if not 0 <= index < len(node):
        raise ConfigError(
            f"cannot set '{_join(path, seg)}': index {index} out of range, '{path}' has "
            f"{len(node)} elements; to change the list's length set the whole list as JSON"
        )
    return node, index, _child(tp, index)


def _apply_override(cls: type, data: dict, override: str) -> None:
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"bad override '{override}': expected 'dotted.key=value', e.g. 'train.lr=1e-5'")
    segs = key.split(".")
    if any(not s for s in segs):
        raise ConfigError(f"bad override '{override}': empty segment in key '{key}'")
    tp, node, path = cls, data, ""
    for seg in segs[:-1]:
        container, k, tp = _step(tp, node, seg, path, create=True)
        node, path = container[k], _join(path, seg)
    container, k, field_tp = _step(tp, node, segs[-1], path, create=False)
    container[k] = _override_value(field_tp, text, key, override)


def _override_value(field_tp: Any, text: str, key: str, override: str) -> Any:
    """JSON first ("3" -> 3, "true" -> True, "[1,2]" -> list); when that does not fit the field but the
    raw text does (a str field set to "123" or "null"), the user meant the text."""
    value = _parse_override_value(text)
    try:
        _validate(field_tp, value, None)
    except ValidationError as err:
        try:
            _validate(field_tp, text, None)
        except ValidationError:
            raise ConfigError(f"{_config_error(field_tp, err, key)} (from override '{override}')") from None
        return text
    return value


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:  # json.load would silently keep the last one
            raise ConfigError(f"duplicate key '{k}' in config JSON")
        out[k] = v
    return out


def _deep_merge(base: dict, top: Mapping) -> dict:
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def _read_json(path: str | os.PathLike) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            loaded = json.load(fh, object_pairs_hook=_reject_duplicate_keys)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
    except ConfigError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path}: the top level must be a JSON object, got {_show(loaded)}")
    loaded.pop(SCHEMA_KEY, None)
    return loaded


def load_config(
    cls: type,
    path: str | os.PathLike | None,
    overrides: Sequence[str] = (),
    defaults: Mapping | None = None,
) -> Any:
    """Load ``cls`` from ``defaults`` <- JSON file at ``path`` <- ``overrides``, strictly.

    - ``defaults``: plain data deep-merged under the file (objects merge key by key, anything else is
      replaced). Unset keys fall back to the model defaults.
    - The file's top-level ``"$schema"`` key (for editors) is ignored.
    - ``overrides``: ``"a.b.c=value"``; the value is parsed as JSON when it parses (numbers,
      true/false, null, lists, objects), else taken as a plain string. A list element of a list of
      models is addressed by index: ``"rewards.0.weight=2"``. An unknown key or a key into a
      non-section raises :class:`ConfigError` like an unknown key in the file.
    """
    data: dict = copy.deepcopy(dict(defaults)) if defaults else {}
    if path is not None:
        _deep_merge(data, _read_json(path))
    if isinstance(overrides, str):  # a lone string would otherwise be iterated character by character
        overrides = [overrides]
    for override in overrides:
        _apply_override(cls, data, override)
    return from_dict(cls, data)


def save_config(obj: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as pretty JSON in field order; :func:`load_config` re-reads it equal."""
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(to_dict(obj), fh, indent=2, sort_keys=False)
        fh.write("\n")


# ------------------------------------------------------------------------------------------ validation


def validate_tree(obj: Any, world_size: int | None = None) -> None:
    """Validate the config again, now with the checks that need the number of processes.

    The models' validators read ``world_size`` from pydantic's validation context (None: those checks
    are skipped, as when a config loads). Runs before any model loads, so batch arithmetic that depends
    on the world size fails in seconds, not after the download; values changed in code since loading
    are checked too. A failed check raises :class:`ConfigError` prefixed with its section (``train: ...``).
    """
    if isinstance(obj, BaseModel):
        from_dict(type(obj), to_dict(obj), context={"world_size": world_size})
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            validate_tree(v, world_size)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            validate_tree(v, world_size)
