"""Strict, typed config loading: JSON file + ``--set`` overrides -> a tree of pydantic models.

Why strict: a typo such as ``"lerning_rate": 1e-5`` in a JSON config is silently ignored by
``dict.get`` style loaders, and the run trains for hours with the default. Here every unknown key, wrong
type, out-of-range value or missing required field raises a :class:`ConfigError` that names the full
dotted key, what was expected and what was given, before any model loads.

The models (``fastcps.config.models``) declare fields, defaults, ranges and cross-field checks, and pydantic
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
import json
import os
import typing
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

from pydantic import BaseModel, TypeAdapter, ValidationError

__all__ = ["from_dict", "load_config", "save_config", "to_dict", "validate_tree"]

from fastcps.config.errors import (  # the message side of the same rules: one package, two files
    SCHEMA_KEY,
    ConfigError,
    _child,
    _config_error,
    _is_model,
    _join,
    _show,
    _type_name,
    _unknown_key_error,
    _unwrap,
    _where,
)


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
