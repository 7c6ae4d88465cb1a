"""Validation of YAML recipes against their dataclasses, with the key path in every error.

A recipe is nested plain data (mappings, lists, scalars) that ends up as keyword arguments of
dataclasses (``Recipe``, ``TreeConfig``, ``TrainConfig``, ``StudySpec`` ...). Constructing them
directly turns a typo or a wrong type into a ``TypeError`` deep inside (``'<' not supported
between 'str' and 'int'``). :func:`check` walks the data against a :class:`Shape` first and raises
one ``ValueError`` naming the path, e.g. ``mavis.tree.k_root: expected an integer, got 'four'``.

A shape is built from a dataclass's type hints (:func:`shape_of`); fields annotated ``dict`` or
``list[dict]`` that hold nested settings get their own shape through ``nested``.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class Shape:
    """Allowed keys of a mapping and what each holds: a type annotation, a Shape, or ListOf."""

    keys: dict[str, Any]
    name: str = "mapping"


@dataclass(frozen=True)
class ListOf:
    """A list whose items have ``item`` (a type annotation or a Shape)."""

    item: Any


def shape_of(cls: type, name: str | None = None, **nested: Any) -> Shape:
    """The Shape of dataclass ``cls``: its fields with their annotations, ``nested`` overriding some."""
    if not is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    keys = {f.name: nested.get(f.name, hints[f.name]) for f in fields(cls) if f.init}
    return Shape(keys, name or cls.__name__)


def read_yaml_mapping(path: str | Path, what: str) -> dict:
    """Parse ``path`` as a YAML mapping; syntax errors, an empty file or a non-mapping are one-line
    ``ValueError``s naming the file (an empty recipe must not silently mean "all defaults")."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{what} {path}: YAML syntax error{where}: {problem}") from None
    if raw is None:
        raise ValueError(f"{what} {path} is empty; write the settings to change (an empty file would run every default)")
    if not isinstance(raw, dict):
        raise ValueError(f"{what} {path} must be a YAML mapping of settings, got a {type(raw).__name__}")
    return raw


def check(value: Any, spec: Any, path: str = "") -> None:
    """Raise ``ValueError("<path>: ...")`` where ``value`` does not fit ``spec``.

    ``spec``: a Shape, a ListOf, or a type annotation (int, float, str, bool, dict, list[X],
    X | None, Any). Integers are accepted where floats are expected; booleans are not numbers.
    """
    where = path or "recipe"
    if isinstance(spec, Shape):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping of {spec.name} settings, got {_show(value)}")
        for key, item in value.items():
            if key not in spec.keys:
                raise ValueError(f"{_join(path, key)}: unknown key; known: {', '.join(sorted(spec.keys))}")
            check(item, spec.keys[key], _join(path, key))
        return
    if isinstance(spec, ListOf):
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {_show(value)}")
        for i, item in enumerate(value):
            check(item, spec.item, f"{where}[{i}]")
        return
    _check_type(value, spec, where)


def _check_type(value: Any, tp: Any, where: str) -> None:
    if tp is Any:
        return
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        errors = []
        for option in options:
            try:
                _check_type(value, option, where)
                return
            except ValueError as err:
                errors.append(err)
        wanted = " or ".join(_describe(o) for o in options)
        raise ValueError(f"{where}: expected {wanted}, got {_show(value)}")
    if tp is type(None):
        if value is not None:
            raise ValueError(f"{where}: expected null, got {_show(value)}")
        return
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {_show(value)}")
        (item,) = typing.get_args(tp) or (Any,)
        for i, x in enumerate(value):
            _check_type(x, item, f"{where}[{i}]")
        return
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {_show(value)}")
        return
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {_show(value)}")
        return
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {_show(value)}")
        return
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint = ""
            if isinstance(value, str):
                try:
                    float(value)
                    hint = f" (YAML reads {value} as a string: write it with a dot, e.g. 1.0e-3)"
                except ValueError:
                    pass
            raise ValueError(f"{where}: expected a number, got {_show(value)}{hint}")
        if not math.isfinite(value):
            raise ValueError(f"{where}: expected a finite number, got {value}")
        return
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {_show(value)}")
        return
    raise TypeError(f"schema: unsupported annotation {tp!r} at {where}")


def _describe(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}.get(
        tp, "a list" if typing.get_origin(tp) is list else "a mapping" if tp is dict or typing.get_origin(tp) is dict else str(tp))


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)
