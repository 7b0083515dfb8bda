"""Strict, typed config loading: JSON file + ``--set`` overrides -> a tree of dataclasses.

Why strict: a typo such as ``"lerning_rate": 1e-5`` in a JSON config is silently ignored by
``dict.get`` style loaders, and the run trains for hours with the default. Here every unknown key, wrong
type or missing required field raises a :class:`ConfigError` that names the full dotted key, what was
expected and what was given, before any model loads.

This module knows no field names: it is driven only by the dataclass annotations of ``cls``.

Supported field types: ``int`` (``bool`` is rejected), ``float`` (``int`` accepted and converted),
``str``, ``bool``, ``Optional[X]`` / ``X | None``, other unions, ``Literal[...]``, ``list[X]``,
``tuple[X, Y]`` / ``tuple[X, ...]``, ``dict[str, X]``, ``Any`` and nested dataclasses (also inside lists
and dicts). Annotations are resolved with :func:`typing.get_type_hints`, so modules that use
``from __future__ import annotations`` work.

Typical use::

    cfg = load_config(TrainConfig, args.config, args.set)   # args.set = ["train.lr=1e-5", ...]
    validate_tree(cfg, world_size=dist.get_world_size())
    save_config(cfg, os.path.join(run_dir, "config.json"))  # re-loads to an equal object
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

__all__ = ["ConfigError", "from_dict", "load_config", "save_config", "to_dict", "validate_tree"]

_MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A config problem a user can fix: the message names the key, what was expected and what was given."""


# ---------------------------------------------------------------------------------------------- helpers


def _join(path: str, key: str | int) -> str:
    return f"{path}.{key}" if path else str(key)


def _where(path: str) -> str:
    return f"config key '{path}'" if path else "config root"


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and typing.get_origin(tp) is None:
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


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_union(origin: Any) -> bool:
    return origin is Union or origin is types.UnionType


def _strip_optional(tp: Any) -> Any:
    """``Optional[X]`` -> ``X`` (only when exactly one non-None member); anything else unchanged."""
    if _is_union(typing.get_origin(tp)):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return tp


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except NameError as e:  # a developer error, but say which class so it is quick to find
        raise TypeError(
            f"cannot resolve the annotations of {cls.__qualname__}: {e}. Config dataclasses must be "
            "defined at module level so typing.get_type_hints can see their names."
        ) from e


def _init_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _unknown_key_error(path: str, key: str, valid: Sequence[str], what: str = "key") -> ConfigError:
    full = _join(path, key)
    msg = f"unknown config {what} '{full}'"
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    if close:
        msg += f"; did you mean '{_join(path, close[0])}'?"
    section = f"under '{path}'" if path else "at the top level"
    msg += f" Valid keys {section}: {', '.join(valid) if valid else '(none)'}"
    return ConfigError(msg)


# ------------------------------------------------------------------------------------------ conversion


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Check ``value`` (plain JSON data) against annotation ``tp`` and build the typed value."""
    if tp is Any or tp is object:
        return value
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            value = to_dict(value)  # re-check it like any other input
        return from_dict(tp, value, path)

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if _is_union(origin):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{_where(path)}: expected {_type_name(tp)}, got null")
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:  # Optional[X]: X's own error message is the most useful one
            return _convert(members[0], value, path)
        # Prefer a member the value already is exactly (int | float keeps 3 an int).
        members.sort(key=lambda a: 0 if type(value) is a else 1)
        for member in members:
            try:
                return _convert(member, value, path)
            except ConfigError:
                continue
        raise ConfigError(f"{_where(path)}: expected {_type_name(tp)}, got {_show(value)}")

    if origin is Literal:
        # type() check too: 1 == True and 0 == False would otherwise slip through.
        if any(value == c and type(value) is type(c) for c in args):
            return value
        choices = ", ".join(json.dumps(c) if _jsonable(c) else repr(c) for c in args)
        raise ConfigError(f"{_where(path)}: expected one of {choices}; got {_show(value)}")

    if origin in (list, Sequence) or tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{_where(path)}: expected a list ({_type_name(tp)}), got {_show(value)}")
        item_tp = args[0] if args else Any
        return [_convert(item_tp, v, _join(path, i)) for i, v in enumerate(value)]

    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{_where(path)}: expected a list ({_type_name(tp)}), got {_show(value)}")
        if not args:
            return tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, _join(path, i)) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(
                f"{_where(path)}: expected {len(args)} elements ({_type_name(tp)}), "
                f"got {len(value)}: {_show(value)}"
            )
        return tuple(_convert(a, v, _join(path, i)) for i, (a, v) in enumerate(zip(args, value)))

    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{_where(path)}: expected an object ({_type_name(tp)}), got {_show(value)}")
        key_tp, val_tp = args if args else (Any, Any)
        out = {}
        for k, v in value.items():
            if key_tp is str and not isinstance(k, str):
                raise ConfigError(f"{_where(path)}: keys must be strings, got {_show(k)}")
            out[k] = _convert(val_tp, v, _join(path, k))
        return out

    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{_where(path)}: expected bool (true/false), got {_show(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):  # True is an int in Python, not here
            return value
        raise ConfigError(f"{_where(path)}: expected int, got {_show(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{_where(path)}: expected float, got {_show(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{_where(path)}: expected str, got {_show(value)}")

    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"{_where(path)}: expected {_type_name(tp)}, got {_show(value)}")
    raise TypeError(f"{_where(path)}: unsupported annotation {tp!r} in a config dataclass")


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from plain data, strictly.

    Raises :class:`ConfigError` for an unknown key (with the valid keys and a "did you mean"), a value of
    the wrong type (with the expected type and the value given) or a missing required field. ``path``
    is the dotted prefix used in messages (the location of ``data`` inside a larger config).
    """
    if not _is_dataclass_type(cls):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{_where(path)}: expected an object ({cls.__name__}), got {_show(data)}")
    fields = _init_fields(cls)
    names = [f.name for f in fields]
    for key in data:
        if key not in names:
            raise _unknown_key_error(path, str(key), names)
    hints = _hints(cls)
    kwargs = {}
    for f in fields:
        key = _join(path, f.name)
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name], key)
        elif f.default is _MISSING and f.default_factory is _MISSING:
            raise ConfigError(
                f"missing required config key '{key}' (type {_type_name(hints[f.name])}); "
                "set it in the JSON file or with --set"
            )
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Plain JSON-able data from a dataclass tree, in field order (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in _init_fields(type(obj))}
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


def _default_data(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return to_dict(f.default)
    if f.default_factory is not _MISSING:
        return to_dict(f.default_factory())
    return _MISSING


def _step(tp: Any, node: Any, seg: str, path: str, create: bool) -> tuple[Any, Any, Any]:
    """Resolve one path segment: returns (container, key, field annotation) for ``node[seg]``.

    ``node`` is the plain-data value at ``path`` (``tp`` its annotation). When ``create`` is set and
    the key is missing from the data, it is filled from the dataclass default, so that
    ``model.lr=...`` on a section absent from the file keeps the section's other defaults.
    """
    tp = _strip_optional(tp)
    origin = typing.get_origin(tp)
    if _is_dataclass_type(tp):
        if not isinstance(node, dict):
            raise ConfigError(f"{_where(path)}: expected an object ({tp.__name__}), got {_show(node)}")
        fields = {f.name: f for f in _init_fields(tp)}
        if seg not in fields:
            raise _unknown_key_error(path, seg, list(fields))
        if create and node.get(seg) is None:
            default = _default_data(fields[seg])
            node[seg] = {} if default is _MISSING or default is None else default
        return node, seg, _hints(tp)[seg]
    if origin is list:
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
        args = typing.get_args(tp)
        return node, index, args[0] if args else Any
    if origin is dict:
        if not isinstance(node, dict):
            raise ConfigError(f"{_where(path)}: expected an object, got {_show(node)}")
        args = typing.get_args(tp)
        if create and node.get(seg) is None:
            node[seg] = {}
        return node, seg, args[1] if args else Any
    raise ConfigError(
        f"cannot set '{_join(path, seg)}': '{path}' is a value of type {_type_name(tp)}, not a section"
    )


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

    # JSON first ("3" -> 3, "true" -> True, "[1,2]" -> list); when that does not fit the field but the
    # raw text does (a str field set to "123" or "null"), the user meant the text.
    value = _parse_override_value(text)
    try:
        _convert(field_tp, copy.deepcopy(value), key)
    except ConfigError as e:
        try:
            _convert(field_tp, text, key)
        except ConfigError:
            raise ConfigError(f"{e} (from override '{override}')") from None
        value = text
    container[k] = value


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


def load_config(
    cls: type,
    path: str | os.PathLike | None,
    overrides: Sequence[str] = (),
    defaults: Mapping | None = None,
) -> Any:
    """Load ``cls`` from ``defaults`` <- JSON file at ``path`` <- ``overrides``, strictly.

    - ``defaults``: plain data deep-merged under the file (objects merge key by key, anything else is
      replaced). Unset keys fall back to the dataclass defaults.
    - ``overrides``: ``"a.b.c=value"``; the value is parsed as JSON when it parses (numbers,
      true/false, null, lists, objects), else taken as a plain string. A list element of a list of
      dataclasses is addressed by index: ``"rewards.0.weight=2"``. An unknown key or a key into a
      non-section raises :class:`ConfigError` like an unknown key in the file.
    """
    data: dict = copy.deepcopy(dict(defaults)) if defaults else {}
    if path is not None:
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
        _deep_merge(data, loaded)
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


def validate_tree(obj: Any, world_size: int | None = None, _path: str = "") -> None:
    """Call ``validate(world_size)`` on every dataclass in the tree, children before parents.

    Children first, so a parent's check may rely on its sections being valid. Runs before any model
    loads, so batch arithmetic that depends on the world size fails in seconds, not after the download.
    A ``ValueError`` raised by a hook is re-raised as :class:`ConfigError` prefixed with the section.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            validate_tree(getattr(obj, f.name), world_size, _join(_path, f.name))
        hook = getattr(obj, "validate", None)
        if callable(hook):
            try:
                hook(world_size)
            except ValueError as e:  # ConfigError included
                raise ConfigError(f"{_path}: {e}" if _path else str(e)) from e
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            validate_tree(v, world_size, _join(_path, i))
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            validate_tree(v, world_size, _join(_path, k))
