"""Renderings of a ``tokensaver bench`` result: table, Markdown, self-contained HTML (inline SVG), JSON.

The result's keys are described in :mod:`tokensaver.bench.aggregate`.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Callable
from typing import Any

import jinja2
from markupsafe import Markup

from ..report.formatting import cells, fmt_int, fmt_ms, fmt_rate, fmt_usd, text_table
from .aggregate import HALF_ORDER
from .load import load_table
from .specs import scope_note

PALETTE = (
    "#9aa5b1",
    "#4a4a4a",
    "#e0a030",
    "#8e5fb8",
    "#4f9d58",
    "#c9507a",
    "#2f6db0",
    "#17a2b8",
    "#d2691e",
    "#7a8b2f",
    "#5b6673",
)


# -- rows shared by every rendering ---------------------------------------------------------------

MAIN_HEADERS = [
    "configuration",
    "calls",
    "input",
    "cache write",
    "cache read",
    "output",
    "hit rate",
    "$ input side",
    "$ total",
    "vs auto",
    "rejected",
    "facts kept",
    "p50 ms",
]
SOURCE_HEADERS = [
    "source",
    "configuration",
    "conv",
    "calls",
    "$ total",
    "vs auto",
    "hit rate",
    "rejected",
    "facts kept",
]
NET_HEADERS = [
    "source",
    "configuration",
    "conv",
    "calls",
    "auto-caching $ (input)",
    "config $ (input)",
    "saving",
    "lost results",
    "lost-fact cost",
    "net saving",
    "facts kept",
    "rejected",
]
NET_TITLE = "Savings net of lost facts (input side, against automatic caching)"
NET_NOTE = (
    "Input-side $ (input + cache writes + cache reads) billed by the emulator. A lost fact is a used "
    "fact (in a tool output and in the model's next reply) missing from what was sent; each tool "
    "result it was lost from is priced once per conversation as the round the agent makes to get it "
    "back: one more call reading the whole prefix of the call that needed it from the cache (cache "
    "read x its tokens), the result written again (5-minute cache write x the result's tokens) and "
    "read on the next 20 calls (cache read x result tokens x min(20, calls left)). 'net saving' = "
    "(auto - config - lost-fact cost) / auto."
)
STAGE_HEADERS = ["configuration", "stage", "changed calls", "tokens saved", "$ saved", "errors"]
OVERHEAD_HEADERS = [
    "request",
    "tokens",
    "messages",
    "first call (cold)",
    "p50",
    "p95",
    "max",
    "per stage p50",
]


MAIN_CELLS = "calls:int input_tokens:int cache_creation_input_tokens:int cache_read_input_tokens:int output_tokens:int hit_rate:rate input_cost_usd:usd cost_usd:usd vs_auto_pct:signed_pct rejected:int facts_kept_pct:pct overhead_p50_ms:bare_ms"  # fmt: skip
NET_CELLS = "input_cost_usd:usd vs_auto_input_pct:pct lost_results:int lost_fact_usd:usd net_vs_auto_input_pct:pct facts_kept_pct:pct"  # fmt: skip
SOURCE_CELLS = "conversations:int calls:int cost_usd:usd vs_auto_pct:signed_pct hit_rate:rate rejected:int facts_kept_pct:pct"  # fmt: skip


def main_rows(data: dict[str, Any]) -> list[list[str]]:
    rows = []
    for c in data["configs"]:
        t = data["totals"][c["name"]]
        if t.get("skipped"):
            rows.append([c["name"], "skipped: " + str(t["skipped"])] + [""] * (len(MAIN_HEADERS) - 2))
            continue
        rows.append([c["name"], *cells(t, MAIN_CELLS)])
    return rows


def source_rows(data: dict[str, Any]) -> list[list[str]]:
    rows = []
    for src, group in data["by_source"].items():
        for c in data["configs"]:
            t = group[c["name"]]
            if t.get("skipped") or not t["calls"]:
                continue
            rows.append([src, c["name"], *cells(t, SOURCE_CELLS)])
    return rows


def net_rows(data: dict[str, Any], half: str) -> list[list[str]]:
    """Rows of the net-of-lost-facts table for one half: per source, then all sources."""
    part = (data.get("by_half") or {}).get(half)
    if not part:
        return []
    kinds = {c["name"]: c.get("kind") for c in data["configs"]}
    groups = [*part["by_source"].items(), ("all sources", part["totals"])]
    rows = []
    for src, group in groups:
        auto = group.get("auto")
        for name, t in group.items():
            if kinds.get(name) == "baseline" or t.get("skipped") or not t["calls"]:
                continue
            rows.append(
                [
                    src,
                    name,
                    *cells(t, "conversations:int calls:int"),
                    fmt_usd(auto["input_cost_usd"] if auto and auto["calls"] else None),
                    *cells(t, NET_CELLS),
                    fmt_int(t["rejected"] + (auto["rejected"] if auto else 0)),
                ]
            )
    return rows


def net_halves(data: dict[str, Any]) -> list[str]:
    """The halves with a net table, in order."""
    return [h for h in HALF_ORDER if net_rows(data, h)]


def half_title(half: str) -> str:
    return {"tuning": "tuning half", "validation": "validation half"}.get(half, "all conversations")


def split_line(data: dict[str, Any]) -> str | None:
    split = data.get("split")
    if not split:
        return None
    counts = ", ".join(f"{src} {c['tuning']}/{c['validation']}" for src, c in split["counts"].items())
    half = data.get("half") or "all"
    model = data.get("as_model")
    today = data.get("read_form") == "today"
    return (
        f"Halves: {split['rule']}. Conversation files per source (tuning/validation): {counts}. "
        f"Replayed: {half_title(half) if half != 'all' else 'both halves'}"
        + (f", every call as if sent to {model} (--as-model)" if model else "")
        + (", Read results numbered as today's Claude Code sends them (--read-form today)" if today else "")
        + "."
    )


def stage_rows(data: dict[str, Any]) -> list[list[str]]:
    rows = []
    for c in data["configs"]:
        for plugin, s in data["totals"][c["name"]].get("stages", {}).items():
            rows.append(
                [c["name"], plugin, *cells(s, "changed:int saved_tokens:int saved_usd:usd errors:int")]
            )
    return rows


def _measured_rows(
    items: list[dict[str, Any]] | None, width: int, row: Callable[[dict[str, Any]], list[str]]
) -> list[list[str]]:
    """A row per measurement; one that failed shows its error in the first of ``width`` cells."""
    return [[o["error"]] + [""] * (width - 1) if "error" in o else row(o) for o in items or []]


def _overhead_row(o: dict[str, Any]) -> list[str]:
    stages = ", ".join(f"{k} {fmt_ms(v, unit='')}" for k, v in o["stages_p50_ms"].items())
    return [
        f"~{o['target_tokens'] // 1000}k tokens",
        *cells(o, "tokens:int messages:int cold_ms:ms p50_ms:ms p95_ms:ms max_ms:ms"),
        stages + " ms",
    ]


def overhead_rows(data: dict[str, Any]) -> list[list[str]]:
    return _measured_rows(data.get("overhead"), len(OVERHEAD_HEADERS), _overhead_row)


def _proxy_row(o: dict[str, Any]) -> list[str]:
    return [
        f"~{fmt_int(o['size_tokens'])} tokens",
        "SSE" if o["stream"] else "JSON",
        *cells(o, "added_p50_ms:ms added_p95_ms:ms pipeline_p50_ms:ms pipeline_p95_ms:ms n_calls:int"),
    ]


PROXY_HEADERS = ["request", "stream", "added p50", "added p95", "pipeline p50", "pipeline p95", "calls"]


def proxy_rows(data: dict[str, Any]) -> list[list[str]]:
    return _measured_rows(data.get("proxy_overhead"), len(PROXY_HEADERS), _proxy_row)


PROXY_TITLE = (
    "tokensaver proxy: time added per call vs calling the upstream directly (pipeline = what wrap() adds)"
)


def machine_line(data: dict[str, Any]) -> str:
    m = data["machine"]
    mem = f", {m['memory_gb']} GB RAM" if m.get("memory_gb") else ""
    commit = f" @ {m['commit']}" if m.get("commit") else ""
    return (
        f"{m['cpu']} ({m['cores']} cores{mem}), {m['os']}, Python {m['python']}, "
        f"tokensaver {m['tokensaver']}{commit}"
    )


def scope_of(data: dict[str, Any]) -> str:
    """The cache scope of a result (results from before scopes existed were ``conversation``)."""
    return str(data.get("scope") or "conversation")


def scope_sentence(data: dict[str, Any]) -> str:
    if data.get("scope_note"):
        return str(data["scope_note"])
    return scope_note(scope_of(data))


def title(data: dict[str, Any]) -> str:
    """The header line of every rendering, with the cache scope."""
    return f"tokensaver bench (cache scope: {scope_of(data)})"


def summary_lines(data: dict[str, Any]) -> list[str]:
    n_conv = len(data["conversations"])
    n_calls = sum(c["calls"] for c in data["conversations"])
    o = data["options"]
    lines = [
        f"{n_conv} conversations, {n_calls:,} calls per configuration, {len(data['configs'])} configurations"
        + (f" (at most {o['limit_calls']} calls each)" if o.get("limit_calls") else "")
        + (f" (first {o['per_source']} conversations of each source)" if o.get("per_source") else "")
        + (" [--quick]" if o.get("quick") else "")
        + f"; ran {time.strftime('%Y-%m-%d %H:%M', time.localtime(data['started']))}"
        + f" in {data['duration_s']:.0f} s (replays {data['replay_s']:.0f} s, {o['jobs']} job(s)).",
        "Machine: " + machine_line(data) + ".",
        scope_sentence(data),
        *([line] if (line := split_line(data)) else []),
        "Billed figures: the emulator's usage for each request (API prompt-cache rules; Claude prices). "
        "'vs auto' = saving on total billed $ "
        "against the API's automatic caching alone. Plugins run alone send no cache_control unless "
        "they add it (only cache_align does).",
    ]
    mem = data.get("memory") or {}
    if mem:
        lines.append(
            f"Peak memory of a replay ({mem['calls']} calls of {mem['conversation']}): "
            f"{mem['peak_mb_defaults']} MB with the default plugins, {mem['peak_mb_auto']} MB without "
            f"tokensaver (tracemalloc, emulator included): tokensaver adds {mem['peak_mb_tokensaver']} MB."
        )
    hr = data.get("headroom") or {}
    if hr.get("note"):
        ver = f" {hr['version']}" if hr.get("version") else ""
        lines.append(f"headroom-ai{ver}: {hr['note']}.")
    return lines


def _problems(data: dict[str, Any]) -> list[str]:
    out = []
    for r in data["results"]:
        for e in r.get("rejected_errors") or []:
            out.append(f"REJECTED {r['config']} / {r['conversation']}: {e}")
        for e in r.get("plugin_error_samples") or []:
            out.append(f"plugin error {r['config']} / {r['conversation']}: {e}")
    return out[:20]


# -- renderings -----------------------------------------------------------------------------------


def to_table(data: dict[str, Any]) -> str:
    out = [title(data), ""]
    out += summary_lines(data)
    for half in net_halves(data):
        out += ["", f"{NET_TITLE}, {half_title(half)}"]
        out += text_table(NET_HEADERS, net_rows(data, half), right=set(range(2, 12)))
    if net_halves(data):
        out += [NET_NOTE]
    out += ["", "Totals per configuration"]
    out += text_table(MAIN_HEADERS, main_rows(data), right=set(range(1, 13)))
    out += ["", "Per source"]
    out += text_table(SOURCE_HEADERS, source_rows(data), right=set(range(2, 9)))
    stages = stage_rows(data)
    if stages:
        out += ["", "Per stage (estimated tokens removed; $ cache-weighted, as in run reports)"]
        out += text_table(STAGE_HEADERS, stages, right={2, 3, 4, 5})
    if data.get("overhead"):
        out += ["", "Pipeline overhead per call (default plugins, conversations replayed in order, CPU)"]
        out += text_table(OVERHEAD_HEADERS, overhead_rows(data), right={1, 2, 3, 4, 5, 6})
    if data.get("proxy_overhead"):
        out += ["", PROXY_TITLE]
        out += text_table(PROXY_HEADERS, proxy_rows(data), right={2, 3, 4, 5, 6})
    if data.get("load"):
        out += ["", *load_table(data["load"], md=False)]
    problems = _problems(data)
    if problems:
        out += ["", "Problems"] + problems
    return "\n".join(out) + "\n"


def _md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    def esc(c: str) -> str:
        return c.replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return out


def to_markdown(data: dict[str, Any]) -> str:
    out = ["## " + title(data), ""]
    out += summary_lines(data)
    halves = net_halves(data)
    if halves:
        out += ["", f"### {NET_TITLE}", "", NET_NOTE]
    for half in halves:
        out += ["", f"#### {half_title(half).capitalize()}", ""]
        out += _md_table(NET_HEADERS, net_rows(data, half))
    out += ["", "### Totals per configuration", ""]
    out += _md_table(MAIN_HEADERS, main_rows(data))
    out += ["", "### Per source", ""]
    out += _md_table(SOURCE_HEADERS, source_rows(data))
    stages = stage_rows(data)
    if stages:
        out += ["", "### Per stage", ""]
        out += _md_table(STAGE_HEADERS, stages)
    if data.get("overhead"):
        out += ["", "### Pipeline overhead per call (default plugins)", ""]
        out += _md_table(OVERHEAD_HEADERS, overhead_rows(data))
    if data.get("proxy_overhead"):
        out += ["", f"### {PROXY_TITLE}", ""]
        out += _md_table(PROXY_HEADERS, proxy_rows(data))
    if data.get("load"):
        out += ["", *load_table(data["load"], md=True)]
    problems = _problems(data)
    if problems:
        out += ["", "### Problems", ""] + [f"- {p}" for p in problems]
    return "\n".join(out) + "\n"


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def svg_lines(series: list[tuple[str, list[float | None]]], title: str, y_fmt: str = "${:.3f}") -> str:
    """A line chart (one polyline per series) as inline SVG."""
    width, height, left, right, top, bottom = 760, 300, 64, 150, 16, 36
    n = max((len(v) for _, v in series), default=0)
    ymax = max((x for _, v in series for x in v if x is not None), default=0.0) or 1.0
    pw, ph = width - left - right, height - top - bottom

    def xy(k: int, y: float) -> tuple[float, float]:
        x = left + (pw * k / max(1, n - 1))
        return round(x, 1), round(top + ph * (1 - y / ymax), 1)

    parts = [
        f'<svg role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'xmlns="http://www.w3.org/2000/svg"><title>{html.escape(title)}</title>'
    ]
    for i in range(5):
        yv = ymax * i / 4
        _, y = xy(0, yv)
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{y}" y2="{y}" stroke="#e6e9ee"/>')
        parts.append(
            f'<text x="{left - 6}" y="{y + 4}" text-anchor="end" font-size="10" fill="#5b6673">'
            f"{html.escape(y_fmt.format(yv))}</text>"
        )
    for k in sorted({0, n - 1, *range(0, n, max(1, n // 8))}):
        if k < 0:
            continue
        x, _ = xy(k, 0)
        parts.append(
            f'<text x="{x}" y="{height - bottom + 16}" text-anchor="middle" font-size="10" fill="#5b6673">{k + 1}</text>'
        )
    parts.append(
        f'<text x="{left + pw / 2}" y="{height - 4}" text-anchor="middle" font-size="11" fill="#5b6673">turn (call number in its conversation)</text>'
    )
    for i, (name, values) in enumerate(series):
        pts = " ".join(f"{x},{y}" for k, v in enumerate(values) if v is not None for x, y in [xy(k, v)])
        if not pts:
            continue
        parts.append(
            f'<polyline fill="none" stroke="{_color(i)}" stroke-width="1.6" points="{pts}">'
            f"<title>{html.escape(name)}</title></polyline>"
        )
        ly = top + 14 * i + 8
        parts.append(f'<rect x="{left + pw + 10}" y="{ly - 8}" width="10" height="10" fill="{_color(i)}"/>')
        parts.append(f'<text x="{left + pw + 24}" y="{ly + 1}" font-size="11">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_bars(items: list[tuple[str, float | None]], title: str) -> str:
    """Horizontal bars of fractions (0..1) as inline SVG."""
    width, left, bar, gap = 760, 130, 16, 6
    height = 20 + len(items) * (bar + gap)
    pw = width - left - 70
    parts = [
        f'<svg role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'xmlns="http://www.w3.org/2000/svg"><title>{html.escape(title)}</title>'
    ]
    for i, (name, v) in enumerate(items):
        y = 10 + i * (bar + gap)
        w = round(pw * (v or 0.0), 1)
        parts.append(
            f'<text x="{left - 6}" y="{y + 12}" text-anchor="end" font-size="11">{html.escape(name)}</text>'
        )
        parts.append(
            f'<rect x="{left}" y="{y}" width="{w}" height="{bar}" fill="{_color(i)}">'
            f"<title>{html.escape(name)}: {fmt_rate(v)}</title></rect>"
        )
        parts.append(f'<text x="{left + w + 6}" y="{y + 12}" font-size="11">{fmt_rate(v)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def to_html(data: dict[str, Any]) -> str:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("tokensaver.bench", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    names = [c["name"] for c in data["configs"] if not data["totals"][c["name"]].get("skipped")]
    cost_chart = svg_lines(
        [(n, data["turns"].get(n, [])) for n in names], "mean billed $ per call, by turn, per configuration"
    )
    hit_chart = svg_bars(
        [(n, data["totals"][n]["hit_rate"]) for n in names], "cache hit rate per configuration"
    )
    source_charts = []
    for src, group in data["by_source"].items():
        live = [n for n in names if group[n]["calls"]]
        source_charts.append(
            (src, Markup(svg_bars([(n, group[n]["hit_rate"]) for n in live], f"cache hit rate, {src}")))
        )
    return env.get_template("bench.html.j2").render(
        title=title(data),
        summary=summary_lines(data),
        main=(MAIN_HEADERS, main_rows(data)),
        net=[(half_title(h).capitalize(), net_rows(data, h)) for h in net_halves(data)],
        net_headers=NET_HEADERS,
        net_title=NET_TITLE,
        net_note=NET_NOTE,
        sources=(SOURCE_HEADERS, source_rows(data)),
        stages=(STAGE_HEADERS, stage_rows(data)),
        overhead=(OVERHEAD_HEADERS, overhead_rows(data)),
        proxy=(PROXY_HEADERS, proxy_rows(data)),
        proxy_title=PROXY_TITLE,
        problems=_problems(data),
        configs=data["configs"],
        cost_chart=Markup(cost_chart),
        hit_chart=Markup(hit_chart),
        source_charts=source_charts,
    )


def to_json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=1, default=str)


def render(data: dict[str, Any], fmt: str) -> str:
    """``data`` (from :func:`tokensaver.bench.run_bench`) as ``table``, ``md``, ``html`` or ``json``."""
    renderers = {"table": to_table, "md": to_markdown, "html": to_html, "json": to_json}
    if fmt not in renderers:
        raise ValueError(f"unknown format {fmt!r}")
    if "results" not in data and "load" in data:  # tokensaver bench --load: the load test alone
        return load_only(data, fmt)
    return renderers[fmt](data)


def load_only(data: dict[str, Any], fmt: str) -> str:
    """The report of ``tokensaver bench --load`` (no replays): the machine and the load table."""
    if fmt == "json":
        return to_json(data)
    head = "tokensaver bench --load"
    machine = f"Machine: {machine_line(data)}; ran in {data['duration_s']:.0f} s."
    if fmt == "table":
        return "\n".join([head, "", machine, "", *load_table(data["load"], md=False)]) + "\n"
    md = "\n".join([f"## {head}", "", machine, "", *load_table(data["load"], md=True)]) + "\n"
    if fmt == "md":
        return md
    return f"<!doctype html><meta charset=utf-8><title>{head}</title><pre>{html.escape(md)}</pre>\n"
