"""Renderings of a report: :class:`Report` as a terminal table, Markdown, self-contained HTML, JSON.

Markdown and HTML come from the Jinja templates in ``tokensaver/report/templates`` (HTML: inline CSS
and SVG, no scripts, no remote loads).
"""

from __future__ import annotations

import functools
import json
from typing import Any

import jinja2

from .aggregate import summarize
from .charts import bar_chart
from .formatting import (
    cells,
    fmt_int,
    fmt_ms,
    fmt_pct,
    fmt_rate,
    fmt_time,
    fmt_usd,
    fmt_value,
    md_cell,
    text_table,
)
from .sections import collect_sections, normalize_section

SCHEMA = "tokensaver-report/1"
BILLED_NOTE = "billed: from the API's usage of each call (short-circuited calls excluded)"
ESTIMATED_NOTE = (
    "estimated: local tiktoken counts, and what your own requests (your cache_control as sent) would "
    "have been billed without tokensaver, from the API's cache rules run beside it"
)


STAGE_HEADERS = [
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
STAGE_CELLS = "plugin:text calls:int touched:int short_circuits:int saved_tokens:int saved_usd:usd model_calls_usd:usd errors:int ms:bare_ms"  # fmt: skip


def template_environment(package: str, autoescape: Any, **options: Any) -> jinja2.Environment:
    """The Jinja environment of ``package``'s ``templates`` folder (undefined names raise)."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader(package, "templates"),
        autoescape=autoescape,
        undefined=jinja2.StrictUndefined,
        **options,
    )


@functools.cache
def _environment() -> jinja2.Environment:
    env = template_environment(
        "tokensaver.report",
        lambda name: ".html" in (name or ""),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(
        usd=fmt_usd, num=fmt_int, pct=fmt_pct, ms=fmt_ms, when=fmt_time, cell=fmt_value, md=md_cell
    )
    env.globals.update(
        auto_line=auto_line,
        estimate_line=estimate_line,
        state_lost_line=state_lost_line,
        unbound_line=unbound_line,
    )
    return env


def auto_line(totals: dict[str, Any]) -> str:
    """The reference line: automatic caching alone, and what tokensaver saved against it."""
    pct = totals.get("saved_vs_auto_pct")
    return (
        f"{fmt_usd(totals.get('auto_usd'))} (tokensaver saved {fmt_usd(totals.get('saved_vs_auto_usd'))}"
        + (f", {fmt_pct(pct)}" if pct is not None else "")
        + " against it)"
    )


def _calls_line(totals: dict[str, Any], key: str, text: str) -> str:
    """``text`` with the number of calls ``totals[key]`` counts ({n}, {s} for the plural); "" for none."""
    n = int(totals.get(key) or 0)
    return text.format(n=f"{n:,}", s="s" if n != 1 else "") if n else ""


def state_lost_line(totals: dict[str, Any]) -> str:
    """What the calls made without the shared state mean; "" when there were none."""
    return _calls_line(
        totals,
        "state_lost",
        "state lost on {n} call{s}: the shared state was unreachable, so they went on without it "
        "(answered; a replica may have sent other bytes than the others would)",
    )


def unbound_line(totals: dict[str, Any]) -> str:
    """What the calls sent without some thinking blocks mean; "" when there were none."""
    return _calls_line(
        totals,
        "thinking_unbound",
        "thinking stripped on {n} call{s}: the API refused a thinking block as bound to a different "
        "conversation (something before it changed since the model wrote it), so the call went again "
        "without it and the blocks after it",
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
        plain: dict[str, Any] = json.loads(json.dumps(data, default=str))
        return plain

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON (see the module docstring for the keys)."""
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)

    def _context(self) -> dict[str, Any]:
        data = self.to_dict()
        calls = data["calls"]
        data["notes"] = {"billed": BILLED_NOTE, "estimated": ESTIMATED_NOTE}
        data["token_chart"] = (
            bar_chart(
                calls,
                [("tokens_original", "before (est.)", "before"), ("tokens_sent", "after (est.)", "after")],
                stacked=False,
            )
            if calls
            else None
        )
        billed_calls = [c for c in calls if not c["short_circuit"]]
        data["cache_chart"] = (
            bar_chart(
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
            ("cache hit rate [billed]", fmt_rate(c["hit_rate"])),
            (
                "pipeline overhead p50 / p95",
                f"{fmt_ms(lat['overhead_p50_ms'])} / {fmt_ms(lat['overhead_p95_ms'])}",
            ),
        ]
        if t.get("state_lost"):
            pairs.append(("shared state", state_lost_line(t)))
        if t.get("thinking_unbound"):
            pairs.append(("thinking", unbound_line(t)))
        width = max(len(k) for k, _ in pairs)
        out += [f"  {k.ljust(width)}  {v}" for k, v in pairs]

        out += ["", "Stages"]
        if d["stages"]:
            rows = [cells(s, STAGE_CELLS) for s in d["stages"]]
            out += ["  " + x for x in text_table(STAGE_HEADERS, rows, right=set(range(1, 9)))]
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
            spec = "conversation:text calls:int tokens_original:int tokens_sent:int cost_usd:usd counterfactual_usd:usd saved_usd:usd"  # fmt: skip
            rows = [cells(cv, spec) for cv in d["conversations"]]
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
