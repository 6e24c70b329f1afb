"""Plugin sections of a report: which plugins took part in a run, and what each contributes.

A section is ``{plugin, title, summary, columns, rows, error}`` (:func:`normalize_section`); a plugin
whose section hook fails gets a section showing the error instead (:func:`collect_sections`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from .. import plugins
from .aggregate import short_circuit


def section_plugins(meta: dict[str, Any], records: Iterable[dict[str, Any]]) -> list[str]:
    """Plugins that took part in a run: those in config, then any named in the records."""
    names: list[str] = []

    def add(name: Any) -> None:
        if isinstance(name, str) and name and name not in names:
            names.append(name)

    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    for p in (config or {}).get("plugins") or []:
        add(p if isinstance(p, str) else (p.get("name") if isinstance(p, dict) else None))
    for rec in records:
        if not isinstance(rec, dict):
            continue
        for p in rec.get("plugins") or {}:
            add(p)
        for st in rec.get("stages") or []:
            if isinstance(st, dict):
                add(st.get("plugin"))
        add(short_circuit(rec))
    return names


def _error_section(plugin: str, title: str, exc: BaseException | str) -> dict[str, Any]:
    msg = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return {"plugin": plugin, "title": title, "summary": "", "columns": [], "rows": [], "error": msg}


def normalize_section(section: Any, plugin: str = "?") -> dict[str, Any]:
    """A plugin section as ``{plugin, title, summary, columns, rows, error}``, JSON-safe."""
    if not isinstance(section, dict):
        return _error_section(plugin, plugin, f"section is a {type(section).__name__}, not a dict")
    rows_in = section.get("rows") or []
    if not isinstance(rows_in, list):
        rows_in = [rows_in]
    rows = [r if isinstance(r, dict) else {"value": r} for r in rows_in]
    columns: list[str] = []
    for r in rows:
        for k in r:
            if str(k) not in columns:
                columns.append(str(k))
    out = {
        "plugin": str(section.get("plugin") or plugin),
        "title": str(section.get("title") or section.get("plugin") or plugin),
        "summary": str(section.get("summary") or ""),
        "columns": columns,
        "rows": [{str(k): v for k, v in r.items()} for r in rows],
        "error": str(section["error"]) if section.get("error") else None,
    }
    plain: dict[str, Any] = json.loads(json.dumps(out, default=str))
    return plain


def collect_sections(
    plugin_manager: Any, meta: dict[str, Any], records: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Sections from the run's plugins; a failure becomes a section showing the error."""
    names = section_plugins(meta, records)
    if not names:
        return []
    try:
        if plugin_manager is None:
            plugin_manager = plugins.get_plugin_manager()
    except Exception as exc:  # a broken plugin setup must not stop the report
        return [_error_section("tokensaver", "Plugin sections unavailable", exc)]
    out: list[dict[str, Any]] = []
    for name in names:
        # one plugin at a time, so one failing section hook does not hide the others
        try:
            got = plugins.report_sections(plugin_manager, [name], records) or []
        except Exception as exc:
            out.append(_error_section(name, f"{name}: report section failed", exc))
            continue
        for sec in got:
            out.append(normalize_section(sec, name))
    return out
