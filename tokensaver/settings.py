"""Declared plugin settings: each key once, with its type, range, default and doc.

A plugin declares its table as ``SETTINGS = Schema("name", {"key": integer(6, "doc", min=0), ...})``
(a module or class attribute). The core validates the plugin's merged table against it in ``wrap()``
before ``tokensaver_configure`` sees it: unknown keys, wrong types and values out of range are a
:class:`~tokensaver.errors.ConfigError` naming the key and the file; missing keys get their default.
``tokensaver plugins`` shows the declaration and the README's settings reference is generated from
it, so the three never disagree.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

# a check across keys: (key to blame, what is wrong: "must be ...") or None
Check = Callable[[dict[str, Any]], "tuple[str, str] | None"]

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 1024,
    "MB": 1024**2,
    "GB": 1024**3,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
}


class _Bad(ValueError):
    """A value a setting does not accept; ``detail`` says why beyond the accepted values."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True)
class Setting:
    """One key of a plugin's table. Build it with :func:`boolean`, :func:`integer`, ... below."""

    kind: str  # bool, int, number, choice, text, list, path, bytes
    default: Any
    doc: str
    min: float | None = None
    max: float | None = None
    positive: bool = False  # numbers: more than 0
    choices: tuple[Any, ...] = ()
    optional: bool = False  # None is accepted (TOML cannot say it: only a dict config or the default)
    none_means: str = ""
    item: str = ""  # lists and text: what a value is ("tool names", "a model name")
    unit: str = ""
    aliases: Mapping[Any, Any] = field(default_factory=dict)  # choices: bool -> choice
    item_check: Callable[[str], str | None] | None = None  # lists: a problem with one element

    def accepted(self) -> str:
        """What the key accepts, as an error message says it ("a number between 0.1 and 100")."""
        unit = f" ({self.unit})" if self.unit and self.kind in ("int", "number") else ""
        if self.kind == "bool":
            text = "true or false"
        elif self.kind in ("int", "number"):
            what = "an integer" if self.kind == "int" else "a number"
            lo, hi = self.min, self.max
            if lo is not None and hi is not None:
                text = f"{what} between {lo} and {hi}{unit}"
            elif self.positive or (self.kind == "int" and lo == 1):
                text = f"a positive {what.split()[-1]}{unit}"
            elif lo == 0:
                text = f"a non-negative {what.split()[-1]}{unit}"
            elif lo is not None:
                text = f"{what} of at least {lo}{unit}"
            else:
                text = f"{what}{unit}"
            if self.unit == "seconds" and self.positive:
                text = "a positive number of seconds"
        elif self.kind == "choice":
            text = _or([repr(c) for c in self.choices])
        elif self.kind == "text":
            text = self.item or "a non-empty string"
        elif self.kind == "list":
            text = f"a list of {self.item or 'strings'}"
            if self.choices:
                text += f" (each one of {_or([repr(c) for c in self.choices])})"
        elif self.kind == "path":
            text = "a directory path"
        else:  # bytes
            text = "a positive number of bytes or a string like '512MB' (B, KB, MB, GB)"
        if self.optional:
            text += f" or none{f' ({self.none_means})' if self.none_means else ''}"
        return text

    def type_label(self) -> str:
        """A short type for tables: ``int >= 0``, ``number 0.1..100``, ``'auto' | '5m' | '1h'``."""
        if self.kind in ("int", "number"):
            label = self.kind
            if self.min is not None and self.max is not None:
                label += f" {self.min}..{self.max}"
            elif self.positive:
                label += " > 0"
            elif self.min is not None:
                label += f" >= {self.min}"
            if self.unit:
                label += f" ({self.unit})"
        elif self.kind == "choice":
            label = " | ".join(repr(c) for c in self.choices)
        elif self.kind == "list":
            label = f"list of {self.item or 'strings'}"
            if self.choices:
                label = "list of " + " | ".join(repr(c) for c in self.choices)
        elif self.kind == "text":
            label = "string"
        else:
            label = self.kind
        return label + (" or none" if self.optional else "")

    def normalize(self, value: Any) -> Any:
        """The value as the plugin gets it; raises ``_Bad`` when the key does not accept it."""
        if value is None:
            if self.optional:
                return None
            raise _Bad()
        kind = self.kind
        if kind == "bool":
            if not isinstance(value, bool):
                raise _Bad()
            return value
        if kind in ("int", "number"):
            ok = int if kind == "int" else (int, float)
            if isinstance(value, bool) or not isinstance(value, ok):
                raise _Bad()
            if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
                raise _Bad()
            if self.positive and value <= 0:
                raise _Bad()
            return value if kind == "int" else float(value)
        if kind == "choice":
            if isinstance(value, bool) and value in self.aliases:
                value = self.aliases[value]
            if isinstance(value, bool) or value not in self.choices:
                raise _Bad()
            return value
        if kind == "text":
            if not isinstance(value, str) or not value.strip():
                raise _Bad()
            return value
        if kind == "list":
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise _Bad()
            for v in value:
                if self.choices and v not in self.choices:
                    raise _Bad(f"{v!r} is not one of them")
                problem = self.item_check(v) if self.item_check else None
                if problem:
                    raise _Bad(problem)
            return tuple(value) if isinstance(self.default, tuple) else list(value)
        if kind == "path":
            if not isinstance(value, str | os.PathLike) or not str(value).strip():
                raise _Bad()
            return str(Path(value).expanduser())
        return _bytes(value)


def _bytes(value: Any) -> int:
    if isinstance(value, bool):
        raise _Bad()
    if isinstance(value, int) and value > 0:
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", value.upper())
        if m and int(float(m.group(1)) * _UNITS[m.group(2) or ""]) > 0:
            return int(float(m.group(1)) * _UNITS[m.group(2) or ""])
    raise _Bad()


def _or(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def boolean(default: bool, doc: str) -> Setting:
    """``true`` or ``false``."""
    return Setting("bool", default, doc)


def integer(
    default: int | None,
    doc: str,
    *,
    min: int | None = None,
    max: int | None = None,
    unit: str = "",
    optional: bool = False,
    none_means: str = "",
) -> Setting:
    """An integer (never a boolean) in ``[min, max]``."""
    return Setting("int", default, doc, min=min, max=max, unit=unit, optional=optional, none_means=none_means)


def number(
    default: float | None,
    doc: str,
    *,
    min: float | None = None,
    max: float | None = None,
    positive: bool = False,
    unit: str = "",
    optional: bool = False,
    none_means: str = "",
) -> Setting:
    """A number in ``[min, max]`` (``positive``: more than 0), given to the plugin as a float."""
    return Setting(
        "number", default, doc, min, max, positive, unit=unit, optional=optional, none_means=none_means
    )


def choice(
    default: Any, choices: Iterable[Any], doc: str, *, aliases: Mapping[Any, Any] | None = None
) -> Setting:
    """One of ``choices`` (``aliases`` maps ``true``/``false`` to one of them)."""
    return Setting("choice", default, doc, choices=tuple(choices), aliases=dict(aliases or {}))


def text(default: str | None, doc: str, *, item: str = "", optional: bool = False) -> Setting:
    """A non-empty string (``item`` names what it is: "a model name")."""
    return Setting("text", default, doc, item=item, optional=optional)


def strings(
    default: list[str] | tuple[str, ...] | None,
    doc: str,
    *,
    item: str = "",
    choices: Iterable[str] = (),
    optional: bool = False,
    none_means: str = "",
    check: Callable[[str], str | None] | None = None,
) -> Setting:
    """A list of strings (a tuple when the default is one), each in ``choices`` and passing ``check``."""
    return Setting(
        "list",
        default,
        doc,
        item=item,
        choices=tuple(choices),
        optional=optional,
        none_means=none_means,
        item_check=check,
    )


def path(default: str | None, doc: str, *, optional: bool = False, none_means: str = "") -> Setting:
    """A directory path, ``~`` expanded."""
    return Setting("path", default, doc, optional=optional, none_means=none_means)


def size(default: int, doc: str) -> Setting:
    """A size in bytes: an integer, or a string like ``"512MB"``."""
    return Setting("bytes", default, doc)


def regex_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a regular expression, or None."""
    try:
        re.compile(pattern)
    except re.error as exc:
        return f"invalid regular expression {pattern!r}: {exc}"
    return None


class Schema:
    """A plugin's declared table: its settings, checks across keys and keys passed through unchecked."""

    def __init__(
        self,
        plugin: str,
        settings: dict[str, Setting],
        *,
        checks: Iterable[Check] = (),
        passthrough: Iterable[str] = (),
    ) -> None:
        self.plugin = plugin
        self.settings = dict(settings)
        self.checks = tuple(checks)
        self.passthrough = frozenset(passthrough)

    def defaults(self) -> dict[str, Any]:
        """Every key with its default (lists copied)."""
        return {
            k: list(s.default) if isinstance(s.default, list) else s.default for k, s in self.settings.items()
        }

    def validate(
        self, table: Mapping[str, Any] | None, source: str, *, name: str | None = None
    ) -> dict[str, Any]:
        """``table`` checked and normalized, defaults filled in; a ConfigError names the key and ``source``.

        :param name: the plugin's name in config, when it is installed under another than declared.
        """
        plugin = name or self.plugin
        table = dict(table or {})
        for key in sorted(table):
            if key not in self.settings and key not in self.passthrough:
                near = difflib.get_close_matches(key, list(self.settings), n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ConfigError(
                    f"{plugin}: unknown key {key!r}{hint}; accepted: {', '.join(sorted(self.settings))}",
                    key=key,
                    source=source,
                )
        out = {**self.defaults(), **table}
        for key, setting in self.settings.items():
            try:
                out[key] = setting.normalize(out[key])
            except _Bad as bad:
                detail = f": {bad.detail}" if bad.detail else ""
                raise ConfigError(
                    f"{plugin}.{key} must be {setting.accepted()}; got {_shown(out[key])}{detail}",
                    key=key,
                    source=source,
                ) from None
        for check in self.checks:
            problem = check(out)
            if problem:
                key, msg = problem
                raise ConfigError(f"{plugin}.{key} {msg}", key=key, source=source)
        return out

    def rows(self) -> list[dict[str, Any]]:
        """One row per key: ``key``, ``type``, ``default`` (JSON-able) and ``doc``."""
        return [
            {
                "key": k,
                "type": s.type_label(),
                "default": _jsonable(s.default),
                "doc": s.doc + (f"; none: {s.none_means}" if s.none_means else ""),
            }
            for k, s in self.settings.items()
        ]


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _shown(value: Any) -> str:
    return repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."


def shown_default(value: Any) -> str:
    """A default as TOML would write it (``true``, ``"auto"``, ``[]``); ``none`` for None."""
    return "none" if value is None else json.dumps(_jsonable(value), default=str)


def schema_of(plugin: object) -> Schema | None:
    """The :class:`Schema` a plugin declares as ``SETTINGS``, or None."""
    schema = getattr(plugin, "SETTINGS", None)
    return schema if isinstance(schema, Schema) else None


def reference(schemas: Mapping[str, Schema]) -> str:
    """The settings reference in Markdown: a table per plugin (the README's is generated by this)."""
    parts: list[str] = []
    for name, schema in schemas.items():
        parts.append(f"`[tool.tokensaver.{name}]`\n\n| key | type | default | meaning |\n|---|---|---|---|\n")
        for row in schema.rows():
            cells = [f"`{row['key']}`", row["type"], f"`{shown_default(row['default'])}`", row["doc"]]
            parts.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |\n")
        parts.append("\n")
    return "".join(parts)
