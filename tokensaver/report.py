"""Run reports: what a run cost, what it would have cost, and which stage saved what.

``Report`` aggregates a run's call records (schema in ``docs/DESIGN.md``) and renders them as a
terminal table, Markdown, self-contained HTML (inline CSS and SVG, no scripts, no remote loads)
or JSON. Figures are either **billed** (summed from the API's ``usage`` and priced: input, cache
writes/reads, output tokens, ``cost_usd``) or **estimated**: local tiktoken counts (tokens before and
after tokensaver, per-stage tokens saved) and what the caller's own requests would have been billed
without tokensaver (``counterfactual_usd``) or with the API's automatic caching alone (``auto_usd``),
from the billing model of :mod:`tokensaver.billing` run beside the API. ``saved_usd`` =
``counterfactual_usd`` - ``cost_usd``. ``estimate_error_*`` says how far the model's figure for what
was sent was from the billed usage, on the calls where both exist. Short-circuited calls never
reached the API, so their usage is not counted as billed.

``Report.to_json()`` keys (stable; new keys may be added, none renamed):

- ``schema``: ``"tokensaver-report/1"``
- ``run``: ``{name, created, config}``
- ``totals``: ``{calls, short_circuited, api_errors, tokens_original, tokens_sent, tokens_saved,
  usage: {input_tokens, cache_creation_input_tokens, cache_creation_5m, cache_creation_1h,
  cache_read_input_tokens, output_tokens}, cost_usd, counterfactual_usd, auto_usd, saved_usd,
  saved_pct, saved_vs_auto_usd, saved_vs_auto_pct, estimated_calls, estimate_error_usd,
  estimate_error_pct}`` (``saved_pct`` of ``counterfactual_usd``; ``estimate_error_usd`` = the sum
  of each call's distance between the estimated and the billed input side, ``estimate_error_pct``
  that over the billed input side of those calls)
- ``cache``: ``{input_tokens, write_tokens, write_5m, write_1h, read_tokens, hit_rate}``
  (``hit_rate`` = cache reads / all billed input-side tokens, null without any)
- ``latency``: ``{samples, overhead_p50_ms, overhead_p95_ms, overhead_max_ms}`` (nearest rank)
- ``stages``: ``[{plugin, calls, touched, short_circuits, saved_tokens, saved_usd,
  short_circuit_usd, model_calls_usd, errors, ms}]`` (``saved_usd`` includes ``short_circuit_usd``
  and is net of ``model_calls_usd``, what the plugin's own model calls cost)
- ``short_circuits``: ``[{id, conversation, plugin, model, tokens_sent, saved_usd}]``
- ``errors``: ``[{call, plugin, hook, error}]`` (plugin errors; the call went on without the plugin)
- ``api_errors``: ``[{call, status, error}]``
- ``price_warnings``: ``[{warning, calls}]``
- ``conversations``: ``[{conversation, calls, short_circuited, tokens_original, tokens_sent,
  cache_read_input_tokens, cost_usd, counterfactual_usd, auto_usd, saved_usd}]``
- ``calls``: ``[{id, t, conversation, model, tokens_original, tokens_sent, input_tokens,
  cache_creation_input_tokens, cache_read_input_tokens, output_tokens, cost_usd, counterfactual_usd,
  auto_usd, saved_usd, estimate_error_usd, short_circuit, overhead_ms}]``
- ``sections``: ``[{plugin, title, summary, columns, rows, error}]`` (contributed by plugins)
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from typing import Any

import jinja2

from .pricing import normalize_usage

SCHEMA = "tokensaver-report/1"
USAGE_KEYS = (
    "input_tokens",
    "cache_creation_input_tokens",
    "cache_creation_5m",
    "cache_creation_1h",
    "cache_read_input_tokens",
    "output_tokens",
)
TRANSFORM_HOOK = "tokensaver_transform_request"
BILLED_NOTE = "billed: from the API's usage of each call (short-circuited calls excluded)"
ESTIMATED_NOTE = (
    "estimated: local tiktoken counts, and what your own requests (your cache_control as sent) would "
    "have been billed without tokensaver, from the API's cache rules run beside it"
)
MAX_BARS = 120  # calls per chart before they are grouped into buckets


# -- formatting ------------------------------------------------------------------------------


def fmt_usd(value: float | None) -> str:
    """Dollars: 4 decimals, 6 for non-zero amounts under a cent (``$0.1234``, ``$0.000120``)."""
    if value is None:
        return "n/a"
    v = float(value)
    if v != 0 and abs(v) < 0.01:
        return f"${v:.6f}" if v > 0 else f"-${-v:.6f}"
    return f"${v:,.4f}" if v >= 0 else f"-${-v:,.4f}"


def fmt_int(value: float | None) -> str:
    """An integer with thousands separators (``12,345``)."""
    return "n/a" if value is None else f"{int(round(value)):,}"


def fmt_pct(value: float | None) -> str:
    """A percentage with one decimal (``12.3%``)."""
    return "n/a" if value is None else f"{value:.1f}%"


def fmt_ms(value: float | None) -> str:
    """Milliseconds with one decimal."""
    return "n/a" if value is None else f"{value:.1f} ms"


def fmt_time(epoch: float | None) -> str:
    """Local time ``YYYY-MM-DD HH:MM:SS``."""
    if not isinstance(epoch, int | float):
        return "n/a"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def fmt_value(value: Any) -> str:
    """A plugin section cell."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return str(value)


# -- aggregation -----------------------------------------------------------------------------


def _num(value: Any) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return 0.0
    return f if math.isfinite(f) else 0.0


def _percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (a value that was observed), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def _usage(value: Any) -> dict[str, int]:
    try:
        return normalize_usage(value if isinstance(value, dict) else None)
    except (TypeError, ValueError, AttributeError, OverflowError):
        # a record someone edited by hand: show zeros rather than no report at all
        return normalize_usage(None)


def _short_circuit(rec: dict[str, Any]) -> str | None:
    sc = rec.get("short_circuit")
    if not sc:
        return None
    return sc if isinstance(sc, str) else str(sc)


def _call_errors(rec: dict[str, Any]) -> list[dict[str, str]]:
    """Plugin errors of a call: ``errors`` plus stage errors not already listed there."""
    out = []
    for e in rec.get("errors") or []:
        if isinstance(e, dict):
            out.append(
                {
                    "plugin": str(e.get("plugin") or "?"),
                    "hook": str(e.get("hook") or "?"),
                    "error": str(e.get("error") or ""),
                }
            )
    listed = {(e["plugin"], e["hook"]) for e in out}
    for st in rec.get("stages") or []:
        if isinstance(st, dict) and st.get("error"):
            plugin = str(st.get("plugin") or "?")
            if (plugin, TRANSFORM_HOOK) not in listed:
                out.append({"plugin": plugin, "hook": TRANSFORM_HOOK, "error": str(st["error"])})
    return out


def summarize(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Everything a report shows, computed from call records (the JSON keys minus run/sections)."""
    records = [r for r in records if isinstance(r, dict)]
    usage_tot = dict.fromkeys(USAGE_KEYS, 0)
    tot = dict.fromkeys(("tokens_original", "tokens_sent"), 0)
    money = dict.fromkeys(("cost_usd", "counterfactual_usd", "auto_usd", "saved_usd"), 0.0)
    est = {"calls": 0, "error_usd": 0.0, "billed_usd": 0.0}
    stages: dict[str, dict[str, Any]] = {}
    short_circuits: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    api_errors: list[dict[str, Any]] = []
    warnings: dict[str, int] = {}
    convs: dict[str, dict[str, Any]] = {}
    calls: list[dict[str, Any]] = []
    overheads: list[float] = []

    def stage_row(plugin: str) -> dict[str, Any]:
        return stages.setdefault(
            plugin,
            {
                "plugin": plugin,
                "calls": 0,
                "touched": 0,
                "short_circuits": 0,
                "saved_tokens": 0,
                "saved_usd": 0.0,
                "short_circuit_usd": 0.0,
                "model_calls_usd": 0.0,
                "errors": 0,
                "ms": 0.0,
            },
        )

    for i, rec in enumerate(records):
        cid = str(rec.get("id") or f"#{i + 1}")
        sc = _short_circuit(rec)
        usage = _usage(rec.get("usage"))
        billed = dict.fromkeys(USAGE_KEYS, 0) if sc else usage
        for k in USAGE_KEYS:
            usage_tot[k] += billed[k]
        t_orig, t_sent = int(_num(rec.get("tokens_original"))), int(_num(rec.get("tokens_sent")))
        cost, saved = _num(rec.get("cost_usd")), _num(rec.get("saved_usd"))
        # ledgers written before the counterfactual existed have only their baseline_usd
        base = _num(rec["counterfactual_usd"] if "counterfactual_usd" in rec else rec.get("baseline_usd"))
        auto = _num(rec.get("auto_usd"))
        tot["tokens_original"] += t_orig
        tot["tokens_sent"] += t_sent
        for k, v in (
            ("cost_usd", cost),
            ("counterfactual_usd", base),
            ("auto_usd", auto),
            ("saved_usd", saved),
        ):
            money[k] += v
        if rec.get("estimate_error_usd") is not None and rec.get("estimate_usd") is not None:
            err = _num(rec.get("estimate_error_usd"))
            est["calls"] += 1
            est["error_usd"] += abs(err)
            est["billed_usd"] += _num(rec.get("estimate_usd")) - err

        for st in rec.get("stages") or []:
            if not isinstance(st, dict):
                continue
            row = stage_row(str(st.get("plugin") or "?"))
            before, after = _num(st.get("before")), _num(st.get("after"))
            st_saved = _num(st["saved_tokens"]) if "saved_tokens" in st else before - after
            row["calls"] += 1
            # "changed" (when recorded) also counts rewrites that keep the token count, e.g. cache_control
            row["touched"] += 1 if (st.get("changed") or st_saved or before != after) else 0
            row["saved_tokens"] += int(st_saved)
            row["saved_usd"] += _num(st.get("saved_usd"))
            row["model_calls_usd"] += _num(st.get("model_calls_usd"))
            row["ms"] += _num(st.get("ms"))
        if sc:
            row = stage_row(sc)
            row["short_circuits"] += 1
            row["saved_tokens"] += t_sent
            # what avoiding the call saved; the call's own saved_usd is net of its stages' model calls
            sc_usd = _num(rec["short_circuit_usd"]) if "short_circuit_usd" in rec else saved
            row["saved_usd"] += sc_usd
            row["short_circuit_usd"] += sc_usd
            short_circuits.append(
                {
                    "id": cid,
                    "conversation": rec.get("conversation"),
                    "plugin": sc,
                    "model": rec.get("model"),
                    "tokens_sent": t_sent,
                    "saved_usd": saved,
                }
            )
        for e in _call_errors(rec):
            stage_row(e["plugin"])["errors"] += 1
            errors.append({"call": cid, **e})
        status = rec.get("status")
        if rec.get("error") or (isinstance(status, int) and status >= 400):
            api_errors.append({"call": cid, "status": status, "error": rec.get("error")})
        if rec.get("price_warning"):
            w = str(rec["price_warning"])
            warnings[w] = warnings.get(w, 0) + 1
        if rec.get("overhead_ms") is not None:
            overheads.append(_num(rec.get("overhead_ms")))

        conv_id = str(rec.get("conversation") or "(none)")
        conv = convs.setdefault(
            conv_id,
            {
                "conversation": conv_id,
                "calls": 0,
                "short_circuited": 0,
                "tokens_original": 0,
                "tokens_sent": 0,
                "cache_read_input_tokens": 0,
                "cost_usd": 0.0,
                "counterfactual_usd": 0.0,
                "auto_usd": 0.0,
                "saved_usd": 0.0,
            },
        )
        conv["calls"] += 1
        conv["short_circuited"] += 1 if sc else 0
        conv["tokens_original"] += t_orig
        conv["tokens_sent"] += t_sent
        conv["cache_read_input_tokens"] += billed["cache_read_input_tokens"]
        conv["cost_usd"] += cost
        conv["counterfactual_usd"] += base
        conv["auto_usd"] += auto
        conv["saved_usd"] += saved

        calls.append(
            {
                "id": cid,
                "t": rec.get("t"),
                "conversation": rec.get("conversation"),
                "model": rec.get("model"),
                "tokens_original": t_orig,
                "tokens_sent": t_sent,
                "input_tokens": billed["input_tokens"],
                "cache_creation_input_tokens": billed["cache_creation_input_tokens"],
                "cache_read_input_tokens": billed["cache_read_input_tokens"],
                "output_tokens": billed["output_tokens"],
                "cost_usd": cost,
                "counterfactual_usd": base,
                "auto_usd": auto,
                "saved_usd": saved,
                "estimate_error_usd": rec.get("estimate_error_usd"),
                "short_circuit": sc,
                "overhead_ms": rec.get("overhead_ms"),
            }
        )

    input_side = (
        usage_tot["input_tokens"]
        + usage_tot["cache_creation_input_tokens"]
        + usage_tot["cache_read_input_tokens"]
    )
    totals = {
        "calls": len(records),
        "short_circuited": len(short_circuits),
        "api_errors": len(api_errors),
        "tokens_original": tot["tokens_original"],
        "tokens_sent": tot["tokens_sent"],
        "tokens_saved": tot["tokens_original"] - tot["tokens_sent"],
        "usage": usage_tot,
        "cost_usd": money["cost_usd"],
        "counterfactual_usd": money["counterfactual_usd"],
        "auto_usd": money["auto_usd"],
        "saved_usd": money["saved_usd"],
        "saved_pct": _pct_of(money["saved_usd"], money["counterfactual_usd"]),
        "saved_vs_auto_usd": money["auto_usd"] - money["cost_usd"],
        "saved_vs_auto_pct": _pct_of(money["auto_usd"] - money["cost_usd"], money["auto_usd"]),
        "estimated_calls": est["calls"],
        "estimate_error_usd": est["error_usd"],
        "estimate_error_pct": _pct_of(est["error_usd"], est["billed_usd"]),
    }
    return {
        "totals": totals,
        "cache": {
            "input_tokens": usage_tot["input_tokens"],
            "write_tokens": usage_tot["cache_creation_input_tokens"],
            "write_5m": usage_tot["cache_creation_5m"],
            "write_1h": usage_tot["cache_creation_1h"],
            "read_tokens": usage_tot["cache_read_input_tokens"],
            "hit_rate": (usage_tot["cache_read_input_tokens"] / input_side) if input_side else None,
        },
        "latency": {
            "samples": len(overheads),
            "overhead_p50_ms": _percentile(overheads, 50),
            "overhead_p95_ms": _percentile(overheads, 95),
            "overhead_max_ms": max(overheads) if overheads else None,
        },
        "stages": list(stages.values()),
        "short_circuits": short_circuits,
        "errors": errors,
        "api_errors": api_errors,
        "price_warnings": [{"warning": w, "calls": n} for w, n in warnings.items()],
        "conversations": list(convs.values()),
        "calls": calls,
    }


def _pct_of(part: float, whole: float) -> float | None:
    return 100.0 * part / whole if whole > 0 else None


def run_summary(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Flat totals of a run (what ``Run.summary()`` returns)."""
    data = summarize(records)
    return {
        **data["totals"],
        "cache_hit_rate": data["cache"]["hit_rate"],
        "stages": {s["plugin"]: {k: v for k, v in s.items() if k != "plugin"} for s in data["stages"]},
        "plugin_errors": len(data["errors"]),
        "overhead_p50_ms": data["latency"]["overhead_p50_ms"],
        "overhead_p95_ms": data["latency"]["overhead_p95_ms"],
        "price_warnings": [w["warning"] for w in data["price_warnings"]],
    }


# -- plugin sections -------------------------------------------------------------------------


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
        add(_short_circuit(rec))
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
    return json.loads(json.dumps(out, default=str))


def collect_sections(
    plugin_manager: Any, meta: dict[str, Any], records: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Sections from the run's plugins; a failure becomes a section showing the error."""
    names = section_plugins(meta, records)
    if not names:
        return []
    try:
        from .plugins import report_sections

        if plugin_manager is None:
            from .plugins import get_plugin_manager

            plugin_manager = get_plugin_manager()
    except Exception as exc:  # a broken plugin setup must not stop the report
        return [_error_section("tokensaver", "Plugin sections unavailable", exc)]
    out: list[dict[str, Any]] = []
    for name in names:
        # one plugin at a time, so one failing section hook does not hide the others
        try:
            got = report_sections(plugin_manager, [name], records) or []
        except Exception as exc:
            out.append(_error_section(name, f"{name}: report section failed", exc))
            continue
        for sec in got:
            out.append(normalize_section(sec, name))
    return out


# -- charts ----------------------------------------------------------------------------------


def _buckets(calls: list[dict[str, Any]], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """Per-call values, summed into at most ``MAX_BARS`` consecutive groups."""
    n = len(calls)
    size = max(1, math.ceil(n / MAX_BARS))
    out = []
    for start in range(0, n, size):
        chunk = calls[start : start + size]
        first, last = chunk[0].get("id") or f"#{start + 1}", chunk[-1].get("id") or f"#{start + len(chunk)}"
        label = f"call {first}" if len(chunk) == 1 else f"calls {first} to {last}"
        out.append({"label": label, **{k: sum(int(c.get(k) or 0) for c in chunk) for k in keys}})
    return out


def _chart(calls: list[dict[str, Any]], series: list[tuple[str, str, str]], stacked: bool) -> dict[str, Any]:
    """SVG geometry for a bar chart: ``series`` is ``[(key, label, css class)]``."""
    width, height, left, right, top, bottom = 760, 220, 64, 8, 10, 24
    plot_w, plot_h = width - left - right, height - top - bottom
    groups = _buckets(calls, tuple(k for k, _, _ in series))
    if stacked:
        peak = max((sum(g[k] for k, _, _ in series) for g in groups), default=0)
    else:
        peak = max((g[k] for g in groups for k, _, _ in series), default=0)
    peak = max(peak, 1)
    slot = plot_w / max(len(groups), 1)
    bars = []
    for gi, g in enumerate(groups):
        x0 = left + gi * slot + slot * 0.1
        inner = slot * 0.8
        y_base = top + plot_h
        for si, (key, label, cls) in enumerate(series):
            h = plot_h * g[key] / peak
            if stacked:
                x, w = x0, inner
                y = y_base - h
                y_base = y
            else:
                w = inner / len(series)
                x = x0 + si * w
                y = top + plot_h - h
            bars.append(
                {
                    "x": round(x, 2),
                    "y": round(y, 2),
                    "w": round(max(w, 0.5), 2),
                    "h": round(h, 2),
                    "cls": cls,
                    "title": f"{g['label']}: {label} {g[key]:,}",
                }
            )
    ticks = [{"y": round(top + plot_h - plot_h * f, 2), "label": fmt_int(peak * f)} for f in (0.0, 0.5, 1.0)]
    return {
        "width": width,
        "height": height,
        "left": left,
        "right": width - right,
        "bottom": top + plot_h,
        "bars": bars,
        "ticks": ticks,
        "legend": [{"label": label, "cls": cls} for _, label, cls in series],
        "grouped": len(groups) < len(calls),
        "groups": len(groups),
    }


# -- rendering -------------------------------------------------------------------------------


def _md_cell(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


_env: jinja2.Environment | None = None


def _environment() -> jinja2.Environment:
    global _env
    if _env is None:
        env = jinja2.Environment(
            loader=jinja2.PackageLoader("tokensaver", "templates"),
            autoescape=lambda name: ".html" in (name or ""),
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
            undefined=jinja2.StrictUndefined,
        )
        env.filters.update(
            usd=fmt_usd,
            num=fmt_int,
            pct=fmt_pct,
            ms=fmt_ms,
            when=fmt_time,
            cell=fmt_value,
            md=_md_cell,
        )
        env.globals.update(auto_line=auto_line, estimate_line=estimate_line)
        _env = env
    return _env


def auto_line(totals: dict[str, Any]) -> str:
    """The reference line: automatic caching alone, and what tokensaver saved against it."""
    pct = totals.get("saved_vs_auto_pct")
    return (
        f"{fmt_usd(totals.get('auto_usd'))} (tokensaver saved {fmt_usd(totals.get('saved_vs_auto_usd'))}"
        + (f", {fmt_pct(pct)}" if pct is not None else "")
        + " against it)"
    )


def estimate_line(totals: dict[str, Any]) -> str:
    """How far the billing model's figure for what was sent was from the billed usage."""
    n = int(totals.get("estimated_calls") or 0)
    if not n:
        return "n/a (no call was both estimated and billed)"
    pct = totals.get("estimate_error_pct")
    return f"{fmt_usd(totals.get('estimate_error_usd'))} apart over {n:,} billed calls" + (
        f" ({fmt_pct(pct)} of their billed input side)" if pct is not None else ""
    )


def text_table(headers: list[str], rows: list[list[str]], right: set[int] | None = None) -> list[str]:
    """Plain-text table lines with aligned columns (``right``: right-aligned column indexes)."""
    right = right or set()
    widths = [len(h) for h in headers]
    for r in rows:
        for i, cell in enumerate(r):
            widths[i] = max(widths[i], len(cell))

    def line(cells: list[str]) -> str:
        parts = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)]
        return "  ".join(parts).rstrip()

    return [line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


class Report:
    """A rendered view of one run: totals, per-stage savings, errors, and plugin sections."""

    def __init__(
        self,
        meta: dict[str, Any],
        records: list[dict[str, Any]],
        sections: list[dict[str, Any]] | None = None,
    ) -> None:
        self.meta = dict(meta or {})
        self.records = list(records)
        self.sections = [
            normalize_section(s, str(s.get("plugin", "?")) if isinstance(s, dict) else "?")
            for s in sections or []
        ]
        self._data = summarize(self.records)

    @classmethod
    def from_run(cls, run: Any, plugin_manager: Any = None) -> Report:
        """The report of a :class:`~tokensaver.run.Run`, with sections from its plugins."""
        meta, records = run.meta, run.records()
        return cls(meta, records, collect_sections(plugin_manager, meta, records))

    @property
    def name(self) -> str:
        """The run's name."""
        return str(self.meta.get("name") or "")

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data (the keys documented in this module's docstring)."""
        config = self.meta.get("config") if isinstance(self.meta.get("config"), dict) else {}
        data = {
            "schema": SCHEMA,
            "run": {"name": self.name, "created": self.meta.get("created"), "config": config},
            **self._data,
            "sections": self.sections,
        }
        return json.loads(json.dumps(data, default=str))

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON (see the module docstring for the keys)."""
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def _context(self) -> dict[str, Any]:
        data = self.to_dict()
        calls = data["calls"]
        data["notes"] = {"billed": BILLED_NOTE, "estimated": ESTIMATED_NOTE}
        data["token_chart"] = (
            _chart(
                calls,
                [("tokens_original", "before (est.)", "before"), ("tokens_sent", "after (est.)", "after")],
                stacked=False,
            )
            if calls
            else None
        )
        billed_calls = [c for c in calls if not c["short_circuit"]]
        data["cache_chart"] = (
            _chart(
                billed_calls,
                [
                    ("cache_read_input_tokens", "cache read (billed)", "read"),
                    ("cache_creation_input_tokens", "cache write (billed)", "write"),
                    ("input_tokens", "uncached input (billed)", "input"),
                ],
                stacked=True,
            )
            if billed_calls
            else None
        )
        return data

    def to_markdown(self) -> str:
        """The report as Markdown."""
        return _environment().get_template("report.md.j2").render(**self._context())

    def to_html(self) -> str:
        """The report as one self-contained HTML page (inline CSS and SVG, nothing loaded)."""
        return _environment().get_template("report.html.j2").render(**self._context())

    def to_table(self) -> str:
        """The report as plain text with aligned columns, for a terminal."""
        d = self.to_dict()
        t, u, c, lat = d["totals"], d["totals"]["usage"], d["cache"], d["latency"]
        out = [
            f"tokensaver run {self.name}  (created {fmt_time(d['run']['created'])}, {t['calls']} calls)",
            f"  [billed] {BILLED_NOTE.split(': ', 1)[1]}",
            f"  [est.]   {ESTIMATED_NOTE.split(': ', 1)[1]}",
            "",
            "Totals",
        ]
        saved = fmt_usd(t["saved_usd"]) + (
            f" ({fmt_pct(t['saved_pct'])})" if t["saved_pct"] is not None else ""
        )
        saved += "  = cost without tokensaver - cost"
        pairs = [
            (
                "calls",
                f"{t['calls']:,} ({t['short_circuited']} short-circuited, {t['api_errors']} API errors)",
            ),
            ("input tokens [billed]", fmt_int(u["input_tokens"])),
            ("cache write tokens [billed]", fmt_int(u["cache_creation_input_tokens"])),
            ("cache read tokens [billed]", fmt_int(u["cache_read_input_tokens"])),
            ("output tokens [billed]", fmt_int(u["output_tokens"])),
            ("cost [billed]", fmt_usd(t["cost_usd"])),
            ("cost without tokensaver [est.]", fmt_usd(t["counterfactual_usd"])),
            ("saved", saved),
            ("with automatic caching alone [est.]", auto_line(t)),
            ("estimate vs billed", estimate_line(t)),
            (
                "tokens before -> after [est.]",
                f"{fmt_int(t['tokens_original'])} -> {fmt_int(t['tokens_sent'])} (-{fmt_int(t['tokens_saved'])})",
            ),
            ("cache hit rate [billed]", fmt_pct(None if c["hit_rate"] is None else 100 * c["hit_rate"])),
            (
                "pipeline overhead p50 / p95",
                f"{fmt_ms(lat['overhead_p50_ms'])} / {fmt_ms(lat['overhead_p95_ms'])}",
            ),
        ]
        width = max(len(k) for k, _ in pairs)
        out += [f"  {k.ljust(width)}  {v}" for k, v in pairs]

        out += ["", "Stages"]
        if d["stages"]:
            rows = [
                [
                    s["plugin"],
                    fmt_int(s["calls"]),
                    fmt_int(s["touched"]),
                    fmt_int(s["short_circuits"]),
                    fmt_int(s["saved_tokens"]),
                    fmt_usd(s["saved_usd"]),
                    fmt_usd(s["model_calls_usd"]),
                    fmt_int(s["errors"]),
                    f"{s['ms']:.1f}",
                ]
                for s in d["stages"]
            ]
            head = [
                "plugin",
                "calls",
                "touched",
                "short-circ.",
                "tokens saved [est.]",
                "$ saved (net)",
                "$ model calls",
                "errors",
                "ms",
            ]
            out += ["  " + x for x in text_table(head, rows, right=set(range(1, 9)))]
        else:
            out.append("  (no stages ran)")

        if d["short_circuits"]:
            out += ["", "Short-circuited calls (answered without the API)"]
            rows = [
                [
                    s["id"],
                    s["plugin"],
                    str(s["model"] or ""),
                    fmt_int(s["tokens_sent"]),
                    fmt_usd(s["saved_usd"]),
                ]
                for s in d["short_circuits"]
            ]
            out += [
                "  " + x
                for x in text_table(["call", "plugin", "model", "tokens [est.]", "$ saved"], rows, {3, 4})
            ]
        if d["errors"]:
            out += ["", "Plugin errors (the call went on without the plugin)"]
            rows = [[e["call"], e["plugin"], e["hook"], e["error"]] for e in d["errors"]]
            out += ["  " + x for x in text_table(["call", "plugin", "hook", "error"], rows)]
        if d["api_errors"]:
            out += ["", "API errors"]
            rows = [[e["call"], str(e["status"]), str(e["error"] or "")] for e in d["api_errors"]]
            out += ["  " + x for x in text_table(["call", "status", "error"], rows)]
        if d["price_warnings"]:
            out += ["", "Price warnings"]
            out += [f"  {w['warning']} ({w['calls']} calls)" for w in d["price_warnings"]]
        if d["conversations"]:
            out += ["", "Conversations"]
            rows = [
                [
                    cv["conversation"],
                    fmt_int(cv["calls"]),
                    fmt_int(cv["tokens_original"]),
                    fmt_int(cv["tokens_sent"]),
                    fmt_usd(cv["cost_usd"]),
                    fmt_usd(cv["counterfactual_usd"]),
                    fmt_usd(cv["saved_usd"]),
                ]
                for cv in d["conversations"]
            ]
            head = [
                "conversation",
                "calls",
                "before [est.]",
                "after [est.]",
                "cost [billed]",
                "without tokensaver [est.]",
                "saved",
            ]
            out += ["  " + x for x in text_table(head, rows, set(range(1, 7)))]
        for sec in d["sections"]:
            out += ["", f"{sec['title']}  [{sec['plugin']}]"]
            if sec["error"]:
                out.append(f"  error: {sec['error']}")
            if sec["summary"]:
                out.append(f"  {sec['summary']}")
            if sec["rows"]:
                rows = [[fmt_value(r.get(col)) for col in sec["columns"]] for r in sec["rows"]]
                out += ["  " + x for x in text_table(sec["columns"], rows)]
        return "\n".join(out) + "\n"
