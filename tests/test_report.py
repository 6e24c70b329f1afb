"""Reports: each format shows the figures computed from the records, billed vs estimated."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokensaver.hookspecs import hookimpl
from tokensaver.report import (
    MAX_BARS,
    Report,
    collect_sections,
    fmt_int,
    fmt_pct,
    fmt_usd,
)
from tokensaver.run import Run

WARNING = "unknown model 'claude-sonnet-9': priced as claude-sonnet-4-5 (family sonnet)"
META = {
    "type": "run",
    "name": "sample",
    "created": 1764130000.0,
    "config": {"plugins": ["summarize", "prune"]},
}


def records() -> list[dict[str, Any]]:
    """Four calls: two conversations, a stage error, a short-circuit, a price warning, an API error."""
    return [
        {
            "type": "call",
            "id": "c-1",
            "t": 1764130001.0,
            "conversation": "aaaaaaaaaaaaaaaa",
            "model": "claude-sonnet-4-5",
            "priced_as": "claude-sonnet-4-5",
            "price_warning": None,
            "status": 200,
            "error": None,
            "tokens_original": 12000,
            "tokens_sent": 9000,
            "stages": [
                {
                    "plugin": "summarize",
                    "before": 12000,
                    "after": 9000,
                    "ms": 3.0,
                    "error": None,
                    "saved_tokens": 3000,
                    "saved_usd": 0.0090,
                },
                {
                    "plugin": "prune",
                    "before": 9000,
                    "after": 9000,
                    "ms": 0.5,
                    "error": "KeyError: 'x'",
                    "saved_tokens": 0,
                    "saved_usd": 0.0,
                },
                {
                    "plugin": "cache_align",
                    "before": 9000,
                    "after": 9000,
                    "ms": 0.25,
                    "error": None,
                    "changed": True,
                    "saved_tokens": 0,
                    "saved_usd": 0.0,
                },
            ],
            "short_circuit": None,
            "usage": {
                "input_tokens": 1000,
                "cache_creation_input_tokens": 2000,
                "cache_read_input_tokens": 5000,
                "output_tokens": 400,
            },
            "cost_usd": 0.1234,
            "counterfactual_usd": 0.2000,
            "auto_usd": 0.1500,
            "estimate_usd": 0.1100,
            "estimate_error_usd": 0.0020,
            "saved_usd": 0.0766,
            "overhead_ms": 1.0,
            "errors": [{"plugin": "prune", "hook": "tokensaver_transform_request", "error": "KeyError: 'x'"}],
            "plugins": {"notes": {"kept": 3}},
        },
        {
            "type": "call",
            "id": "c-2",
            "conversation": "aaaaaaaaaaaaaaaa",
            "model": "claude-sonnet-4-5",
            "tokens_original": 9500,
            "tokens_sent": 9500,
            "stages": [],
            "short_circuit": "memoize",
            # the stored answer's usage: never billed again
            "usage": {"input_tokens": 9000, "output_tokens": 300},
            "cost_usd": 0.0,
            "counterfactual_usd": 0.0500,
            "auto_usd": 0.0400,
            "estimate_usd": None,
            "estimate_error_usd": None,
            "saved_usd": 0.0500,
            "short_circuit_usd": 0.0500,
            "overhead_ms": 0.5,
            "errors": [],
        },
        {
            "type": "call",
            "id": "c-3",
            "conversation": "bbbbbbbbbbbbbbbb",
            "model": "claude-sonnet-9",
            "priced_as": "claude-sonnet-4-5",
            "price_warning": WARNING,
            "tokens_original": 4000,
            "tokens_sent": 3500,
            "stages": [
                {
                    "plugin": "summarize",
                    "before": 4000,
                    "after": 3500,
                    "ms": 2.0,
                    "error": None,
                    "saved_tokens": 500,
                    "saved_usd": 0.0015,
                }
            ],
            "usage": {"input_tokens": 2000, "cache_read_input_tokens": 1500, "output_tokens": 100},
            "cost_usd": 0.0300,
            "counterfactual_usd": 0.0400,
            "auto_usd": 0.0350,
            "estimate_usd": 0.0270,
            "estimate_error_usd": -0.0010,
            "saved_usd": 0.0100,
            "overhead_ms": 3.0,
            "errors": [
                {
                    "plugin": "cache_align",
                    "hook": "tokensaver_observe_response",
                    "error": "ValueError: <b>bad</b>",
                }
            ],
        },
        {
            "type": "call",
            "id": "c-4",
            "conversation": "bbbbbbbbbbbbbbbb",
            "model": "claude-sonnet-4-5",
            "status": 529,
            "error": "overloaded_error",
            "tokens_original": 100,
            "tokens_sent": 100,
            "stages": [],
            "usage": None,
            "cost_usd": 0.0,
            "counterfactual_usd": 0.0,
            "auto_usd": 0.0,
            "estimate_usd": None,
            "estimate_error_usd": None,
            "saved_usd": 0.0,
            "overhead_ms": 7.0,
        },
    ]


def expected() -> dict[str, Any]:
    recs = records()
    billed = [r for r in recs if not r.get("short_circuit")]

    def usage(key: str) -> int:
        return sum((r.get("usage") or {}).get(key, 0) for r in billed)

    cost = sum(r["cost_usd"] for r in recs)
    baseline = sum(r["counterfactual_usd"] for r in recs)
    auto = sum(r["auto_usd"] for r in recs)
    saved = sum(r["saved_usd"] for r in recs)
    estimated = [r for r in recs if r["estimate_error_usd"] is not None]
    error = sum(abs(r["estimate_error_usd"]) for r in estimated)
    billed_in = sum(r["estimate_usd"] - r["estimate_error_usd"] for r in estimated)
    return {
        "input": usage("input_tokens"),
        "write": usage("cache_creation_input_tokens"),
        "read": usage("cache_read_input_tokens"),
        "output": usage("output_tokens"),
        "cost": cost,
        "baseline": baseline,
        "saved": saved,
        "saved_pct": 100 * saved / baseline,
        "auto": auto,
        "saved_vs_auto": auto - cost,
        "saved_vs_auto_pct": 100 * (auto - cost) / auto,
        "error": error,
        "error_pct": 100 * error / billed_in,
        "summarize_tokens": sum(
            s["saved_tokens"] for r in recs for s in r["stages"] if s["plugin"] == "summarize"
        ),
        "summarize_usd": sum(s["saved_usd"] for r in recs for s in r["stages"] if s["plugin"] == "summarize"),
    }


@pytest.fixture
def report() -> Report:
    return Report(META, records())


def test_totals_count_billed_usage_only_for_calls_that_reached_the_api(report: Report) -> None:
    e = expected()
    d = report.to_dict()
    t = d["totals"]
    assert t["calls"] == 4 and t["short_circuited"] == 1 and t["api_errors"] == 1
    assert t["usage"]["input_tokens"] == e["input"] == 3000  # not the stored answer's 9,000
    assert t["usage"]["cache_creation_input_tokens"] == e["write"]
    assert t["usage"]["cache_creation_5m"] == e["write"]  # no TTL split given: all 5m
    assert t["usage"]["cache_read_input_tokens"] == e["read"]
    assert t["usage"]["output_tokens"] == e["output"]
    assert t["cost_usd"] == pytest.approx(e["cost"])
    assert t["counterfactual_usd"] == pytest.approx(e["baseline"])
    assert t["saved_usd"] == pytest.approx(e["saved"])
    assert t["saved_pct"] == pytest.approx(e["saved_pct"])  # of what the caller would have paid
    assert t["auto_usd"] == pytest.approx(e["auto"])
    assert t["saved_vs_auto_usd"] == pytest.approx(e["saved_vs_auto"])
    assert t["saved_vs_auto_pct"] == pytest.approx(e["saved_vs_auto_pct"])
    # distance between estimate and billed, on the two calls that have both, each counted apart
    assert t["estimated_calls"] == 2
    assert t["estimate_error_usd"] == pytest.approx(e["error"]) == pytest.approx(0.003)
    assert t["estimate_error_pct"] == pytest.approx(e["error_pct"])
    assert t["tokens_original"] == 25600 and t["tokens_sent"] == 22100
    assert d["cache"]["hit_rate"] == pytest.approx(e["read"] / (e["input"] + e["write"] + e["read"]))
    # nearest rank over [0.5, 1, 3, 7]
    assert d["latency"]["overhead_p50_ms"] == 1.0 and d["latency"]["overhead_p95_ms"] == 7.0


def test_stage_rows(report: Report) -> None:
    stages = {s["plugin"]: s for s in report.to_dict()["stages"]}
    e = expected()
    assert stages["summarize"]["calls"] == 2 and stages["summarize"]["touched"] == 2
    assert stages["summarize"]["saved_tokens"] == e["summarize_tokens"]
    assert stages["summarize"]["saved_usd"] == pytest.approx(e["summarize_usd"])
    assert stages["summarize"]["ms"] == pytest.approx(5.0)
    # the stage error also listed in "errors" is counted once
    assert stages["prune"]["errors"] == 1 and stages["prune"]["touched"] == 0
    assert stages["cache_align"]["errors"] == 1
    assert stages["cache_align"]["touched"] == 1  # changed the body without changing its size
    assert stages["memoize"]["short_circuits"] == 1
    assert stages["memoize"]["short_circuit_usd"] == pytest.approx(0.05)


def test_rows_per_conversation_error_and_short_circuit(report: Report) -> None:
    d = report.to_dict()
    convs = {c["conversation"]: c for c in d["conversations"]}
    assert convs["aaaaaaaaaaaaaaaa"]["calls"] == 2
    assert convs["aaaaaaaaaaaaaaaa"]["saved_usd"] == pytest.approx(0.0766 + 0.05)
    assert convs["bbbbbbbbbbbbbbbb"]["cost_usd"] == pytest.approx(0.03)
    assert [(e["call"], e["plugin"], e["hook"]) for e in d["errors"]] == [
        ("c-1", "prune", "tokensaver_transform_request"),
        ("c-3", "cache_align", "tokensaver_observe_response"),
    ]
    assert d["api_errors"] == [{"call": "c-4", "status": 529, "error": "overloaded_error"}]
    assert [s["id"] for s in d["short_circuits"]] == ["c-2"]
    assert d["price_warnings"] == [{"warning": WARNING, "calls": 1}]


def test_json_round_trips_with_documented_keys(report: Report) -> None:
    data = json.loads(report.to_json())
    assert data == report.to_dict()
    assert data["schema"] == "tokensaver-report/1"
    assert set(data) == {
        "schema", "run", "totals", "cache", "latency", "stages", "short_circuits", "errors",
        "api_errors", "price_warnings", "conversations", "calls", "sections",
    }  # fmt: skip
    assert data["run"]["name"] == "sample"
    assert [c["id"] for c in data["calls"]] == ["c-1", "c-2", "c-3", "c-4"]
    import tokensaver.report as mod

    for key in data:  # every top-level key is documented in the module docstring
        assert f"``{key}``" in (mod.__doc__ or "")


def _figures() -> list[str]:
    e = expected()
    return [
        fmt_usd(e["cost"]),
        fmt_usd(e["baseline"]),
        fmt_usd(e["saved"]),
        fmt_usd(e["auto"]),
        fmt_usd(e["saved_vs_auto"]),
        fmt_usd(e["error"]),
        fmt_pct(e["saved_pct"]),
        fmt_int(e["input"]),
        fmt_int(e["write"]),
        fmt_int(e["read"]),
        fmt_int(e["output"]),
        fmt_int(e["summarize_tokens"]),
        fmt_usd(e["summarize_usd"]),
        "KeyError: 'x'",
        "c-2",
        "memoize",
        "aaaaaaaaaaaaaaaa",
        "bbbbbbbbbbbbbbbb",
        "overloaded_error",
    ]


def test_markdown_shows_the_figures(report: Report) -> None:
    md = report.to_markdown()
    for fig in _figures():
        assert fig in md, fig
    assert WARNING in md
    assert "**billed**" in md.lower() and "**estimated**" in md.lower()
    assert "| summarize | 2 | 2 |" in md
    # every table row has as many cells as its header
    for block in re.split(r"\n\n", md):
        rows = [x for x in block.splitlines() if x.startswith("|")]
        if rows:
            widths = {len(re.findall(r"(?<!\\)\|", x)) for x in rows}
            assert len(widths) == 1, block


def test_table_shows_the_figures_in_aligned_columns(report: Report) -> None:
    text = report.to_table()
    for fig in _figures():
        assert fig in text, fig
    assert "[billed]" in text and "[est.]" in text
    lines = text.splitlines()
    start = lines.index("Stages") + 1
    block = []
    for line in lines[start:]:
        if not line.strip():
            break
        block.append(line)
    assert len(block) == 2 + 4  # header, rule, summarize, prune, memoize, cache_align
    assert len({len(x) for x in block}) == 1  # right-aligned last column: same width
    header = block[0]
    col = header.index("$ saved") + len("$ saved")
    assert all(line[col - 1] != " " for line in block[2:])  # dollar figures end under the header


def test_html_is_self_contained_escaped_and_charted(report: Report) -> None:
    html = report.to_html()
    for fig in _figures():
        assert fig.replace("'", "&#39;") in html, fig
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html.lower() and "<link" not in html.lower() and "src=" not in html
    assert "<style>" in html and "<svg" in html
    # autoescape: a plugin's error text cannot inject markup
    assert "<b>bad</b>" not in html and "&lt;b&gt;bad&lt;/b&gt;" in html
    assert html.count('<rect class="before"') == 4 and html.count('<rect class="after"') == 4
    assert '<rect class="read"' in html  # billed cache reads per call
    # bars are labelled by call id; the short-circuited call has no billed bar
    assert "call c-3: cache read (billed) 1,500" in html
    assert "call c-2: cache read" not in html
    assert "billed" in html and "estimated" in html


def test_chart_groups_many_calls(tmp_path: Path) -> None:
    recs = [dict(records()[0], id=f"c-{i}") for i in range(3 * MAX_BARS + 7)]
    html = Report(META, recs).to_html()
    assert 0 < html.count('<rect class="before"') <= MAX_BARS
    assert "grouped" in html


def test_empty_run_renders_every_format(tmp_path: Path) -> None:
    report = Run("empty", runs_dir=tmp_path).report(plugin_manager=None)
    assert report.to_dict()["totals"]["calls"] == 0
    assert "No calls" in report.to_html()
    assert "empty" in report.to_markdown()
    assert "(no stages ran)" in report.to_table()
    assert json.loads(report.to_json())["totals"]["saved_pct"] is None


class Notes:
    @hookimpl
    def tokensaver_report_section(self, plugin: str, calls: list[dict[str, Any]]) -> dict[str, Any]:
        kept = sum((c.get("plugins") or {}).get(plugin, {}).get("kept", 0) for c in calls)
        return {
            "title": "Notes kept",
            "summary": f"kept {kept} notes <i>",
            "rows": [{"call": c["id"]} for c in calls],
        }


class Broken:
    @hookimpl
    def tokensaver_report_section(self, plugin: str, calls: list[dict[str, Any]]) -> dict[str, Any]:
        raise RuntimeError("section exploded")


def _pm(**plugins: object) -> Any:
    from tokensaver.plugins import get_plugin_manager

    return get_plugin_manager(extra=plugins, load_entrypoints=False)


def test_plugin_sections_from_the_run(tmp_path: Path) -> None:
    run = Run("s", runs_dir=tmp_path, config={"plugins": ["prune"]})
    for rec in records():
        run.append(rec)
    report = run.report(_pm(notes=Notes(), prune=Broken()))
    sections = {s["plugin"]: s for s in report.to_dict()["sections"]}
    assert sections["notes"]["summary"] == "kept 3 notes <i>"  # "notes" only appears in records
    assert sections["notes"]["columns"] == ["call"] and len(sections["notes"]["rows"]) == 4
    assert "section exploded" in sections["prune"]["summary"] + str(sections["prune"]["error"])
    md, html, table = report.to_markdown(), report.to_html(), report.to_table()
    assert "Notes kept" in md and "Notes kept" in html and "Notes kept" in table
    assert "section exploded" in md and "section exploded" in html
    assert "kept 3 notes &lt;i&gt;" in html


def test_a_section_hook_failure_is_shown_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    import tokensaver.plugins

    def boom(pm: Any, names: list[str], recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        raise RuntimeError(f"cannot report {names[0]}")

    monkeypatch.setattr(tokensaver.plugins, "report_sections", boom)
    sections = collect_sections(object(), META, records())
    assert {s["plugin"] for s in sections} >= {"summarize", "prune", "memoize", "notes"}
    assert all(s["error"] and "cannot report" in s["error"] for s in sections)
    assert "cannot report summarize" in Report(META, records(), sections).to_markdown()


def test_missing_plugin_module_is_shown_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    import tokensaver.plugins

    def broken() -> Any:  # what a plugin module that fails to import does to the plugin manager
        raise ImportError("No module named 'tokensaver_notes'")

    monkeypatch.setattr(tokensaver.plugins, "get_plugin_manager", broken)
    sections = collect_sections(None, META, records())
    assert len(sections) == 1 and "tokensaver_notes" in sections[0]["error"]
    assert "Plugin sections unavailable" in Report(META, records(), sections).to_table()


_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True), st.text(max_size=8)
)
_stage = st.fixed_dictionaries(
    {},
    optional={
        "plugin": st.one_of(st.sampled_from(["prune", "summarize", "<x>"]), _scalars),
        "before": _scalars,
        "after": _scalars,
        "ms": _scalars,
        "error": _scalars,
        "saved_tokens": _scalars,
        "saved_usd": _scalars,
    },
)
_record = st.fixed_dictionaries(
    {},
    optional={
        "id": _scalars,
        "conversation": _scalars,
        "model": _scalars,
        "price_warning": _scalars,
        "status": _scalars,
        "error": _scalars,
        "tokens_original": _scalars,
        "tokens_sent": _scalars,
        "stages": st.one_of(st.none(), st.lists(st.one_of(_stage, _scalars), max_size=3)),
        "short_circuit": _scalars,
        "usage": st.one_of(
            _scalars,
            st.dictionaries(st.sampled_from(["input_tokens", "output_tokens", "cache_creation"]), _scalars),
        ),
        "cost_usd": _scalars,
        "baseline_usd": _scalars,
        "saved_usd": _scalars,
        "overhead_ms": _scalars,
        "errors": st.one_of(
            st.none(),
            st.lists(
                st.one_of(_scalars, st.dictionaries(st.sampled_from(["plugin", "hook", "error"]), _scalars)),
                max_size=2,
            ),
        ),
    },
)


@settings(max_examples=60, deadline=None)
@given(st.lists(_record, max_size=6))
def test_odd_records_never_break_a_report(recs: list[dict[str, Any]]) -> None:
    report = Report(META, recs)
    assert json.loads(report.to_json())["totals"]["calls"] == len(recs)
    assert report.to_markdown() and report.to_table()
    assert "<script" not in report.to_html()


def test_old_ledgers_show_their_baseline_as_the_cost_without_tokensaver() -> None:
    old = {"type": "call", "id": "c-1", "usage": {"input_tokens": 10}, "cost_usd": 0.1, "baseline_usd": 0.3}
    old["saved_usd"] = 0.2
    t = Report(META, [old]).to_dict()["totals"]
    assert t["counterfactual_usd"] == pytest.approx(0.3) and t["saved_pct"] == pytest.approx(200 / 3)
    assert t["estimated_calls"] == 0 and t["estimate_error_pct"] is None


def test_every_format_says_what_is_billed_and_what_is_estimated(report: Report) -> None:
    for text in (report.to_table(), report.to_markdown(), report.to_html()):
        assert "would have been billed without tokensaver" in text
        assert "automatic caching alone" in text
        assert "apart over 2 billed calls" in text
