"""Typed settings: the small machinery every settings dataclass in mmdist uses.

A leaf module (it imports nothing from mmdist), so that the settings beside each
component (models, data, training) can use it without importing the composed
run config in mmdist/config, which imports them.

Each component declares its settings as a dataclass next to the code that uses
it, with every field made by :func:`setting` so that it carries a one-line doc.
This module turns plain dicts (from YAML and dotted CLI overrides) into those
dataclasses and back, and checks them:

* unknown keys are errors, with a "did you mean" suggestion;
* types and allowed values are checked from the annotations (``Literal`` gives
  the choices), so most components need no hand-written checks;
* every problem is collected and reported at once, each naming its dotted key
  and the file it came from, before any model is loaded.

We write this by hand (rather than use OmegaConf/pydantic) because we want
exactly three things (strict keys, collected errors, field docs) and nothing
of the interpolation machinery those libraries bring.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterator
from typing import Any, Literal, Union, get_args, get_origin

__all__ = [
    "ConfigError",
    "NamedSetting",
    "Problem",
    "SettingsBase",
    "setting",
    "from_dict",
    "to_dict",
    "explain",
    "collect_problems",
]


class ConfigError(ValueError):
    """A config could not be used; the message lists every problem found."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        lines = [f"{len(problems)} problem(s) in the configuration:"]
        lines += [f"  - {p}" for p in problems]
        super().__init__("\n".join(lines))


@dataclasses.dataclass
class Problem:
    """One problem: which key, where it came from, and what is wrong."""

    key: str
    message: str
    source: str = ""

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        return f"{where}{self.key or '<root>'}: {self.message}"


def setting(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Any = None) -> Any:
    """A dataclass field with a one-line doc (shown by ``mmdist config --explain``).

    Use ``factory`` for mutable defaults (lists, dicts, nested settings).
    """
    if not doc:
        raise TypeError("every setting needs a one-line doc")
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


class SettingsBase:
    """Mixin for settings dataclasses.

    Subclasses may override :meth:`check` to add rules that the annotations
    cannot express (cross-field rules). It returns ``(key, message)`` pairs with
    keys relative to this node; the caller prefixes the dotted path.
    """

    def check(self) -> list[tuple[str, str]]:
        return []


class NamedSetting:
    """Base of a setting written in YAML as a name and held as the object of that name (the run's stage).

    The name is parsed once, where the config is read (:func:`from_dict`); code
    that reads the config gets the object and asks it for facts. :func:`to_dict`
    writes the name back. Subclasses give :meth:`named` and :meth:`names`.
    """

    name: str

    @classmethod
    def named(cls, name: str) -> NamedSetting:
        """The object called ``name``; KeyError for an unknown one."""
        raise NotImplementedError

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """Every name :meth:`named` knows, in the order a person reads them."""
        raise NotImplementedError


# ---------------------------------------------------------------------------
# type helpers


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) < len(get_args(tp)):
            return True, (args[0] if len(args) == 1 else Union[tuple(args)])
    return False, tp


def _type_name(tp: Any) -> str:
    optional, inner = _is_optional(tp)
    if optional:
        return f"{_type_name(inner)} or null"
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if _is_named(tp):
        return " | ".join(repr(n) for n in tp.names())
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def _is_named(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, NamedSetting)


def _coerce(value: Any, tp: Any, key: str, source: str, problems: list[Problem]) -> Any:
    """Check ``value`` against annotation ``tp``; return the (lightly coerced) value."""
    optional, inner = _is_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        problems.append(Problem(key, f"must not be null (expected {_type_name(tp)})", source))
        return None
    tp = inner
    if tp is Any:
        return value
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(Problem(key, f"expected a section (mapping), got {type(value).__name__}", source))
            return tp()
        return _build(tp, value, key, source, problems)
    if _is_named(tp):
        if isinstance(value, tp):
            return value
        try:
            return tp.named(value)
        except (KeyError, TypeError):
            close = difflib.get_close_matches(str(value), list(tp.names()), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            choices = ", ".join(repr(n) for n in tp.names())
            problems.append(Problem(key, f"{value!r} is not one of {choices}{hint}", source))
            return value
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(
                Problem(key, f"{value!r} is not one of {', '.join(repr(c) for c in choices)}{hint}", source)
            )
        return value
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            trial: list[Problem] = []
            out = _coerce(value, arg, key, source, trial)
            if not trial:
                return out
        problems.append(Problem(key, f"expected {_type_name(tp)}, got {value!r}", source))
        return value
    if origin in (list, tuple):
        if (
            isinstance(value, (str, int, float))
            and not isinstance(value, bool)
            and get_args(tp)
            and get_args(tp)[0] is str
        ):
            value = [str(value)]
        if not isinstance(value, (list, tuple)):
            problems.append(Problem(key, f"expected a list, got {type(value).__name__}", source))
            return []
        args = get_args(tp)
        if args:
            return [_coerce(v, args[0], f"{key}[{i}]", source, problems) for i, v in enumerate(value)]
        return list(value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            problems.append(Problem(key, f"expected a mapping, got {type(value).__name__}", source))
            return {}
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(Problem(key, f"expected true or false, got {value!r}", source))
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            problems.append(Problem(key, f"expected an integer, got {value!r}", source))
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads "1e-4" (no dot) as a string; accept numeric strings.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            problems.append(Problem(key, f"expected a number, got {value!r}", source))
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            problems.append(Problem(key, f"expected a string, got {value!r}", source))
        return value
    return value


def _build(cls: type, data: dict, prefix: str, source: str, problems: list[Problem]) -> Any:
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else ""
            problems.append(Problem(full, f"unknown key{hint} (known: {', '.join(fields)})", source))
            continue
        kwargs[key] = _coerce(value, hints[key], full, source, problems)
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(Problem(f"{prefix}.{name}" if prefix else name, "is required", source))
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field was missing; already reported
        problems.append(Problem(prefix, str(exc), source))
        return None


def from_dict(cls: type, data: dict, source: str = "") -> Any:
    """Build settings ``cls`` from ``data``; raise :class:`ConfigError` listing every problem."""
    problems: list[Problem] = []
    obj = _build(cls, data or {}, "", source, problems)
    if obj is not None:
        problems += collect_problems(obj, source=source)
    if problems:
        raise ConfigError(problems)
    return obj


def _walk(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    yield prefix, obj
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _walk(value, f"{prefix}.{f.name}" if prefix else f.name)


def collect_problems(obj: Any, source: str = "") -> list[Problem]:
    """Run every node's :meth:`SettingsBase.check`, prefixing keys with the node's path."""
    problems: list[Problem] = []
    for prefix, node in _walk(obj):
        if isinstance(node, SettingsBase):
            try:
                found = node.check()
            except (TypeError, ValueError, AttributeError):
                # A value of the wrong type was already reported by the type check;
                # the cross-field rules of this node cannot run on it.
                found = []
            for key, message in found:
                full = ".".join(p for p in (prefix, key) if p)
                problems.append(Problem(full, message, source))
    return problems


def _plain(items: list[tuple[str, Any]]) -> dict:
    return {key: value.name if isinstance(value, NamedSetting) else value for key, value in items}


def to_dict(obj: Any) -> dict:
    """Plain-dict form of a settings tree (what is dumped as the resolved config); a named setting as its name."""
    return dataclasses.asdict(obj, dict_factory=_plain)


def explain(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Rows of (dotted key, type, default, doc) for every setting under ``cls``."""
    rows: list[tuple[str, str, str, str]] = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        _, inner = _is_optional(tp)
        if dataclasses.is_dataclass(inner):
            rows.append((key, "section", "", f.metadata.get("doc", "")))
            rows += explain(inner, key)
            continue
        if isinstance(f.default, NamedSetting):
            default = repr(f.default.name)
        elif f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        rows.append((key, _type_name(tp), default, f.metadata.get("doc", "")))
    return rows
