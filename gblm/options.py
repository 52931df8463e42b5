"""Typed options of plug-ins: each option's type and allowed values, declared beside it.

A plug-in (a method, an allocator, a weight update) takes its options as keyword arguments, and
each argument's annotation is its declaration: ``bool``, ``Annotated[int | float, Range(...)]``,
``str`` or ``Annotated[str, OneOf(values)]``, ``X | None``, ``list[X]``, ``dict[str, X]`` (the
rules: ``docs/methods.md``, "Options"). :func:`declared_options` reads a class's declarations (a
missing or unknown one is the plug-in's bug: a TypeError); :func:`check_value` checks a value,
refusing it with a :class:`gblm.errors.ConfigError` that names the key and the allowed values.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from gblm.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """The allowed interval of a number option; NaN is refused, infinities unless ``finite=False``."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    finite: bool = True

    def holds(self, x: float) -> bool:
        return not (
            math.isnan(x)
            or (self.finite and math.isinf(x))
            or (self.ge is not None and x < self.ge)
            or (self.gt is not None and x <= self.gt)
            or (self.le is not None and x > self.le)
            or (self.lt is not None and x >= self.lt)
        )

    def describe(self, noun: str) -> str:
        """``a finite number >= 0``, ``an integer in [1, 8]``, ..."""
        lo = "[" if self.ge is not None else "(" if self.gt is not None else ""
        hi = "]" if self.le is not None else ")" if self.lt is not None else ""
        low, high = (self.ge if lo == "[" else self.gt), (self.le if hi == "]" else self.lt)
        if lo and hi:
            where = f" in {lo}{low:g}, {high:g}{hi}"
        elif lo:
            where = f" {'>=' if lo == '[' else '>'} {low:g}"
        elif hi:
            where = f" {'<=' if hi == ']' else '<'} {high:g}"
        else:
            where = ""
        if noun == "integer":
            return f"an integer{where}"
        return f"a finite number{where}" if self.finite else f"a number{where} (or an infinity)"


@dataclass(frozen=True)
class OneOf:
    """The allowed values of a choice option (``Annotated[str, OneOf(("row", "layer"))]``)."""

    values: tuple[Any, ...]

    def __init__(self, values: Sequence[Any] | Mapping[Any, Any]) -> None:
        object.__setattr__(self, "values", tuple(values))


@dataclass(frozen=True)
class Option:
    """One declared option of a plug-in: its name, its annotation and its default."""

    name: str
    annotation: Any
    default: Any = inspect.Parameter.empty

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty


_SCALARS = {bool: bool, int: int, float: int | float, str: str}  # the types each one accepts


def _refuse(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{key}={value!r}: allowed values are {allowed}.")


def _whole(err: ConfigError, key: str, value: Any, annotation: Any) -> ConfigError:
    """A part's refusal restated with all that ``annotation`` allows; an item's (``key[i]``) kept."""
    return _refuse(key, value, describe(annotation)) if str(err).startswith(f"{key}=") else err


def describe(annotation: Any) -> str:
    """What values ``annotation`` allows, in words (for refusals and ``--help``)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        base, meta = args[0], args[1:]
        for m in meta:
            if isinstance(m, OneOf):
                listed = ", ".join(str(v) for v in m.values)
                return listed if len(m.values) == 1 else f"one of {listed}"
            if isinstance(m, Range):
                return m.describe("integer" if base is int else "number")
        return describe(base)
    if origin in (typing.Union, types.UnionType):
        parts = [describe(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (", or null" if type(None) in args else "")
    if origin in (list, Sequence):
        return f"a list (each {describe(args[0]) if args else 'any value'})"
    if origin in (dict, Mapping):
        return "a mapping of options"
    names = {bool: "true, false", str: "a string", int: "an integer", float: "a number"}
    return names.get(annotation, "any value")


def check_value(key: str, value: Any, annotation: Any) -> Any:
    """``value`` checked against ``annotation`` (an int given to a float option as a float).

    Raises:
        ConfigError: ``value`` is not allowed; the message names ``key`` and the allowed values.
    """
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        try:
            checked = check_value(key, value, args[0])
        except ConfigError as err:
            raise _whole(err, key, value, annotation) from None
        for meta in args[1:]:
            if isinstance(meta, OneOf) and checked not in meta.values:
                allowed = ", ".join(str(v) for v in meta.values)
                raise ConfigError(f"{key}={value!r} is not allowed: choose one of {allowed}.")
            if isinstance(meta, Range) and not meta.holds(checked):
                raise _refuse(key, value, describe(annotation))
        return checked
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        if value is None and len(members) < len(args):
            return None
        if len(members) == 1:
            try:
                return check_value(key, value, members[0])
            except ConfigError as err:
                raise _whole(err, key, value, annotation) from None
        for member in members:
            with contextlib.suppress(ConfigError):
                return check_value(key, value, member)
        raise _refuse(key, value, describe(annotation))
    if origin in (list, Sequence):
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise _refuse(key, value, describe(annotation))
        item = args[0] if args else Any
        return [check_value(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise _refuse(key, value, describe(annotation))
        item = args[1] if len(args) == 2 else Any
        return {k: check_value(f"{key}.{k}", v, item) for k, v in value.items()}
    if annotation is Any:
        return value
    if annotation in _SCALARS:
        bool_as_number = isinstance(value, bool) and annotation is not bool
        if bool_as_number or not isinstance(value, _SCALARS[annotation]):
            raise _refuse(key, value, describe(annotation))
        return float(value) if annotation is float else value
    raise TypeError(f"{key}: the annotation {annotation!r} is not an option declaration.")


def _declaration_problem(annotation: Any) -> str | None:
    """Why ``annotation`` does not declare an option (None when it does)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        base, meta = args[0], args[1:]
        if base in (int, float) and not any(isinstance(m, Range | OneOf) for m in meta):
            return f"a number needs its Range: Annotated[{base.__name__}, Range(...)]"
        return None if base in (int, float, str, bool) else _declaration_problem(base)
    if origin in (typing.Union, types.UnionType):
        problems = [_declaration_problem(a) for a in args if a is not type(None)]
        return next((p for p in problems if p), None)
    if origin in (list, Sequence):
        return _declaration_problem(args[0]) if args else "a list needs its item type: list[X]"
    if origin in (dict, Mapping):
        return None if len(args) == 2 and args[0] is str else "a mapping is dict[str, X]"
    if annotation in (int, float):
        return f"a number needs its Range: Annotated[{annotation.__name__}, Range(...)]"
    if annotation in (bool, str, Any):
        return None
    return f"{annotation!r} is not an option type (bool, int, float, str, list, dict, X | None)"


def declared_options(target: Callable[..., Any], skip: tuple[str, ...] = ()) -> dict[str, Option]:
    """The keyword arguments of ``target`` (a class: its ``__init__``) less ``skip``, declared.

    Raises:
        TypeError: an argument has no annotation or one that declares no option (the
            plug-in's bug; the tests run this on every registered plug-in).
    """
    init = target.__init__ if isinstance(target, type) else target
    hints = typing.get_type_hints(init, include_extras=True)
    options = {}
    for name, param in inspect.signature(target).parameters.items():
        if name in ("self", *skip) or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        where = f"{getattr(target, '__qualname__', target)}({name})"
        if name not in hints:
            raise TypeError(f"{where}: the option has no annotation (its type and range).")
        problem = _declaration_problem(hints[name])
        if problem:
            raise TypeError(f"{where}: {problem}.")
        options[name] = Option(name, hints[name], param.default)
    return options


def choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    """``value`` if it is one of ``allowed``, else the standard refusal naming ``key``."""
    return check_value(key, value, Annotated[str, OneOf(allowed)])


def positive_int(key: str, value: Any, minimum: int = 1, auto: bool = False) -> Any:
    """An integer >= ``minimum`` (or ``auto`` where allowed), else the refusal naming ``key``."""
    kind = Annotated[int, Range(ge=minimum)]
    return check_value(key, value, kind | Annotated[str, OneOf(("auto",))] if auto else kind)
