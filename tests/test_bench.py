"""tokensaver bench: fact extraction and retention, configurations, aggregation, renderings, --quick CLI."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import pytest

from tokensaver import bench
from tokensaver.bench import headroom as bench_headroom
from tokensaver.bench.aggregate import aggregate
from tokensaver.bench.facts import FactTracker, extract_facts, kept
from tokensaver.bench.render import render, svg_lines
from tokensaver.cli import main
from tokensaver.errors import TokensaverError
from tokensaver.traces import fixtures_dir, load_conversations

pytestmark = pytest.mark.skipif(fixtures_dir() is None, reason="needs the fixtures/ folder")


# -- facts ----------------------------------------------------------------------------------


def test_extract_facts_kinds() -> None:
    text = (
        'Traceback: File "/src/app/models.py", line 1234, in get_user_name\n'
        "getUserName failed for order ZFA04Y (version 3.2.1); see django/db/models/query.py and setup.cfg\n"
        "This Django thing is fine and the word Error alone is not a fact."
    )
    facts = extract_facts(text)
    for fact in (
        "/src/app/models.py",
        "1234",
        "get_user_name",
        "getUserName",
        "ZFA04Y",
        "3.2.1",
        "django/db/models/query.py",
        "setup.cfg",
    ):
        assert fact in facts, fact
    for noise in ("This", "Django", "Error", "line", "thing"):
        assert noise not in facts, noise


def _body(tool_text: str) -> dict:
    return {
        "model": "claude-sonnet-4-5",
        "max_tokens": 100,
        "messages": [
            {"role": "user", "content": "fix it"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "bash", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": tool_text}]},
        ],
    }


def test_facts_used_and_kept() -> None:
    original = _body("FAILED tests/test_api.py::test_login_ok - assert 401 == 200; user_id=98765 elsewhere")
    reply = [
        {"type": "text", "text": "The test test_login_ok fails with 401."},
        {"type": "tool_use", "id": "t2", "name": "bash", "input": {"cmd": "pytest tests/test_api.py"}},
    ]
    used = FactTracker().used(original, reply)
    # in the reply and in a tool output; 98765 / user_id were not used by the model
    assert {"test_login_ok", "401", "tests/test_api.py"} <= used
    assert "98765" not in used and "user_id" not in used
    assert kept(used, original) == len(used)
    cut = _body("[tool output summarized: 1 test failed]")
    assert kept(used, cut) == 0
    partial = _body("FAILED test_login_ok (401)")
    assert kept(used, partial) == 2  # the path was lost
    # a fact inside a longer token does not count as kept
    assert kept({"401"}, _body("code 4012")) == 0


# -- configurations ---------------------------------------------------------------------------------


def test_build_specs(tmp_path: Path) -> None:
    plugins = ["summarize", "prune", "cache_align", "memoize"]
    cfg = tmp_path / "mine.toml"
    cfg.write_text('plugins = ["prune", "cache_align"]\n[prune]\n', encoding="utf-8")
    specs = bench.build_specs(["none", "auto", "memoize", "all", "defaults", str(cfg)], plugins)
    by = {s.name: s for s in specs}
    assert [s.name for s in specs] == ["none", "auto", "memoize", "all", "defaults", "mine"]
    assert by["none"].kind == "baseline" and not by["none"].auto_cache
    assert by["auto"].auto_cache
    assert (
        by["memoize"].config == {"plugins": ["memoize"], "record": False, "plugin_timeout": 600.0}
        and by["memoize"].memo
    )
    assert by["all"].config is not None and by["all"].config["plugins"][-1] == "cache_align"
    assert by["defaults"].config == {"record": False, "plugin_timeout": 600.0}
    assert by["mine"].config is not None
    assert by["mine"].config["record"] is False and by["mine"].config["plugins"] == ["prune", "cache_align"]
    # a plugin that is not installed is left out; unknown names and duplicates are errors
    assert [s.name for s in bench.build_specs(["summarize"], ["prune"])] == []
    with pytest.raises(TokensaverError, match="unknown configuration"):
        bench.build_specs(["nope"], plugins)
    with pytest.raises(TokensaverError, match="twice"):
        bench.build_specs(["auto", "auto"], plugins)


def test_find_traces_dedupes_and_filters(tmp_path: Path) -> None:
    fx = fixtures_dir()
    assert fx is not None
    refs, dupes = bench.find_traces([fx, fx])
    assert dupes == len(refs) and refs
    assert {r.source for r in refs} >= {"tau-bench", "swe-agent"}
    only, _ = bench.find_traces([fx], ["tau-bench"])
    assert only and {r.source for r in only} == {"tau-bench"}


# -- aggregation --------------------------------------------------------------------------------------


def _res(config: str, conv: str, source: str, cost: float, **kw: object) -> dict:
    base = {
        "config": config,
        "conversation": conv,
        "source": source,
        "calls": 2,
        "rejected": 0,
        "input_tokens": 100,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 10,
        "cost_usd": cost,
        "input_cost_usd": cost,
        "facts_used": 4,
        "facts_kept": 4,
        "short_circuited": 0,
        "plugin_errors": 0,
        "tokens_original": 0,
        "tokens_sent": 0,
        "seconds": 0.1,
        "stages": {},
        "overhead_ms": [],
        "turn_cost_usd": [cost / 2, cost / 2],
    }
    base.update(kw)
    return base


def test_aggregate_compares_with_auto_per_source() -> None:
    data = {
        "configs": [{"name": "auto"}, {"name": "defaults"}],
        "results": [
            _res("auto", "a", "s1", 1.0),
            _res("auto", "b", "s2", 3.0),
            _res("defaults", "a", "s1", 0.5, facts_kept=2, cache_read_input_tokens=300),
            _res("defaults", "b", "s2", 3.0, overhead_ms=[1.0, 2.0, 9.0]),
        ],
    }
    agg = aggregate(data)
    t = agg["totals"]
    assert t["auto"]["vs_auto_pct"] == 0.0
    assert t["defaults"]["cost_usd"] == 3.5
    assert t["defaults"]["vs_auto_pct"] == pytest.approx(12.5)
    assert t["defaults"]["facts_kept_pct"] == pytest.approx(75.0)
    assert t["defaults"]["hit_rate"] == pytest.approx(300 / 500)
    assert t["defaults"]["overhead_p50_ms"] == 2.0 and t["defaults"]["overhead_p95_ms"] == 9.0
    assert agg["by_source"]["s1"]["defaults"]["vs_auto_pct"] == pytest.approx(50.0)
    assert agg["by_source"]["s2"]["defaults"]["vs_auto_pct"] == pytest.approx(0.0)
    assert agg["turns"]["defaults"] == [pytest.approx(0.875), pytest.approx(0.875)]


def test_one_percentile_and_one_set_of_formatters() -> None:
    """Bench, proxy and report share one percentile (``tokensaver._stats``) and the report's formatters (no copies)."""
    import tokensaver.report

    defs = re.compile(r"^def (_?percentile|_pct|median|fmt_\w+|_rate|_signed|_ms|_usd_or_na)\(", re.M)
    root = Path(tokensaver.report.__file__).parent.parent
    found = {
        f"{path.relative_to(root).as_posix()}:{m.group(1)}"
        for sub in ("bench", "proxy", "report", ".")
        for path in (root / sub).glob("*.py")
        for m in defs.finditer(path.read_text())
    }
    assert {f.split(":")[1] for f in found if f.startswith("bench/")} <= {"_ms"}  # overhead's rounding helper
    stats = {f for f in found if f.split(":")[1] in ("percentile", "_percentile", "_pct", "median")}
    assert stats == {"_stats.py:percentile"}
    agg = aggregate(
        {
            "configs": [{"name": "auto"}],
            "results": [{"config": "auto", "conversation": "c", "source": "s", "overhead_ms": [4, 1, 3, 2]}],
        }
    )
    assert agg["totals"]["auto"]["overhead_p50_ms"] == tokensaver.report.percentile([1, 2, 3, 4], 50) == 2


def test_svg_lines_scale() -> None:
    svg = svg_lines([("x", [0.0, 1.0, None, 2.0])], "t")
    pts = re.search(r'points="([^"]+)"', svg)
    assert pts is not None
    ys = [float(p.split(",")[1]) for p in pts.group(1).split()]
    assert len(ys) == 3 and ys[0] > ys[1] > ys[2]  # higher cost is drawn higher


def test_progress_without_a_terminal() -> None:
    out = io.StringIO()
    bar = bench.Progress(20, stream=out)
    for _ in range(20):
        bar.update()
    bar.close()
    lines = out.getvalue().splitlines()
    assert 10 <= len(lines) <= 12 and "20/20 calls" in lines[-1]


# -- a real --quick run ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick() -> dict:
    opts = bench.BenchOptions(quick=True, progress=False, overhead_reps=3)
    return bench.run_bench(opts)


def test_quick_run_figures(quick: dict) -> None:
    names = [c["name"] for c in quick["configs"]]
    assert names[:2] == ["none", "auto"] and "defaults" in names and "all" in names
    n_conv = len(quick["conversations"])
    assert n_conv >= 4 and len(quick["results"]) == n_conv * len(names)
    t = quick["totals"]
    for name in names:
        if t[name].get("skipped"):
            continue
        assert t[name]["rejected"] == 0, quick["results"]
        assert t[name]["calls"] == sum(c["calls"] for c in quick["conversations"])
    # the same replies everywhere: output is identical; caching makes auto cheaper than none
    assert len({t[n]["output_tokens"] for n in names if not t[n].get("skipped")}) == 1
    assert t["auto"]["cost_usd"] < t["none"]["cost_usd"]
    assert t["none"]["cache_read_input_tokens"] == 0 and t["auto"]["cache_read_input_tokens"] > 0
    # bodies sent unchanged keep every fact; some facts are used at all
    assert t["none"]["facts_used"] > 0 and t["none"]["facts_kept"] == t["none"]["facts_used"]
    assert t["auto"]["facts_kept_pct"] == 100.0
    # per-stage savings come from the pipeline's records
    assert set(t["defaults"]["stages"]) >= {"cache_align"}
    assert t["defaults"]["overhead_p50_ms"] is not None
    assert sum(r["cost_usd"] for r in quick["results"] if r["config"] == "auto") == pytest.approx(
        t["auto"]["cost_usd"], abs=1e-5
    )
    assert quick["overhead"] and quick["overhead"][0]["tokens"] >= 10_000
    assert quick["overhead"][0]["p95_ms"] >= quick["overhead"][0]["p50_ms"] > 0
    # the proxy's added time, JSON and streamed, next to the library pipeline's
    proxy = quick["proxy_overhead"]
    assert [p["stream"] for p in proxy] == [False, True]
    assert all(p["added_p95_ms"] >= p["added_p50_ms"] and p["pipeline_p50_ms"] > 0 for p in proxy)
    assert quick["memory"]["peak_mb_defaults"] > 0


def test_quick_renderings(quick: dict) -> None:
    table = render(quick, "table")
    md = render(quick, "md")
    page = render(quick, "html")
    again = json.loads(render(quick, "json"))
    assert again["schema"] == "tokensaver-bench/1" and again["totals"].keys() == quick["totals"].keys()
    for name in quick["totals"]:
        assert re.search(rf"^{name}\s", table, re.M), name
        assert f"| {name} |" in md
    assert "Machine:" in table and "| configuration | calls |" in md
    assert page.count("<svg") >= 2 and "<polyline" in page
    # self-contained: no scripts and nothing loaded from the network
    assert "<script" not in page
    assert not re.search(r'(src|href)="https?:', page)


def test_cli_quick_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(bench_headroom, "available", lambda: False)
    out = tmp_path / "b.json"
    rc = main(
        [
            "bench",
            "--quick",
            "--configs",
            "none,auto,headroom",
            "--sources",
            "tau-bench,claude-code-spotter",
            "--limit-calls",
            "3",
            "--per-source",
            "1",
            "--no-overhead",
            "--no-memory",
            "-f",
            "json",
            "-o",
            str(out),
        ]
    )
    assert rc == 0
    data = json.loads(out.read_text())
    assert [c["name"] for c in data["configs"]] == ["none", "auto"]  # headroom not installed: left out
    assert "not installed" in data["headroom"]["note"]
    assert sorted(c["source"] for c in data["conversations"]) == ["claude-code-spotter", "tau-bench"]
    assert all(c["calls"] <= 3 for c in data["conversations"])
    assert data["overhead"] == [] and data["memory"] == {}
    err = capsys.readouterr().err
    assert "calls" in err and "wrote json bench report" in err


def test_cli_rejects_bad_input(capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "--quick", "--configs", "bogus", "--quiet"]) == 2
    assert "unknown configuration" in capsys.readouterr().err


def test_load_ref_limits_calls() -> None:
    fx = fixtures_dir()
    assert fx is not None
    refs, _ = bench.find_traces([fx])
    conv = bench.load_ref(refs[0], 2)
    assert len(conv.calls) == 2 and conv.source == refs[0].source
    assert len(load_conversations([refs[0].path])[0].calls) >= 2


# -- cache scope -------------------------------------------------------------------------------------

_SYSTEM = " ".join(
    f"Rule {i}: when a customer asks about order {1000 + i}, check the ledger entry {i * 7} first."
    for i in range(250)
)  # several thousand tokens: cacheable on every model


def _conv_file(folder: Path, name: str, question: str, start: float | None) -> Path:
    """A two-call conversation (tokensaver-conversation/1) sharing ``_SYSTEM`` and the tools."""
    call_times = [None, None] if start is None else [start, start + 20]
    data = {
        "format": "tokensaver-conversation/1",
        "id": name,
        "segments": [
            {
                "request": {
                    "model": "claude-sonnet-4-5",
                    "max_tokens": 256,
                    "system": _SYSTEM,
                    "tools": [
                        {
                            "name": "lookup",
                            "description": "Look an order up.",
                            "input_schema": {"type": "object", "properties": {"id": {"type": "string"}}},
                        }
                    ],
                    "messages": [
                        {"role": "user", "content": question},
                        {"role": "assistant", "content": f"Looking into it ({name})."},
                        {"role": "user", "content": "Thanks, anything else?"},
                        {"role": "assistant", "content": "No, that is all."},
                    ],
                },
                "calls": [
                    {"n_messages": 1, **({"t": call_times[0]} if start is not None else {})},
                    {"n_messages": 3, **({"t": call_times[1]} if start is not None else {})},
                ],
            }
        ],
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _scope_run(tmp_path: Path, scope: str) -> dict:
    opts = bench.BenchOptions(
        traces=[str(tmp_path)],
        configs=["auto", "cache_align"],
        scope=scope,
        overhead=False,
        memory=False,
        progress=False,
    )
    return bench.run_bench(opts)


def test_source_scope_shares_the_system_prefix(tmp_path: Path) -> None:
    folder = tmp_path / "shop"
    folder.mkdir()
    # b was recorded before a: in source scope it is shifted to start after a's last call
    _conv_file(folder, "a", "Where is order 1001?", 1_750_000_000.0)
    _conv_file(folder, "b", "Can I return order 1042?", 1_749_000_000.0)
    shared = _scope_run(tmp_path, "source")
    alone = _scope_run(tmp_path, "conversation")

    def first_call(data: dict, config: str, conv: str) -> tuple[float | None, dict]:
        (row,) = [r for r in data["results"] if r["config"] == config and r["conversation"] == conv]
        assert row["rejected"] == 0, row
        return row["turn_hit_rate"][0], row

    # cache_align's breakpoint after tools + system: the second conversation reads it at once
    hit, row = first_call(shared, "cache_align", "b")
    assert hit is not None and hit > 0.5
    assert row["start_t"] == 1_750_000_020.0  # shifted: times never go backwards
    hit, _ = first_call(alone, "cache_align", "b")
    assert not hit
    # the API's automatic caching alone (last block only) cannot share it
    hit, _ = first_call(shared, "auto", "b")
    assert not hit
    # the first conversation is billed alike in both scopes; sharing makes cache_align cheaper
    a_shared = first_call(shared, "cache_align", "a")[1]
    a_alone = first_call(alone, "cache_align", "a")[1]
    assert a_shared["cost_usd"] == a_alone["cost_usd"]
    assert shared["totals"]["cache_align"]["cost_usd"] < alone["totals"]["cache_align"]["cost_usd"]
    assert shared["scope"] == "source" and alone["scope"] == "conversation"
    for fmt in ("table", "md", "html"):
        assert "cache scope: source" in render(shared, fmt)
        assert "cache scope: conversation" in render(alone, fmt)
    assert json.loads(render(shared, "json"))["scope"] == "source"


def test_sequence_conversations_clock() -> None:
    from tokensaver.replay import DEFAULT_GAP
    from tokensaver.traces import Conversation, TraceCall

    def conv(name: str, times: list[float | None]) -> Conversation:
        return Conversation(name, "s", [TraceCall(body={"n": k}, t=t) for k, t in enumerate(times)])

    seq = bench.sequence_conversations(
        [
            conv("untimed", [None, None]),
            conv("later", [2e9, 2e9 + 5]),
            conv("earlier", [1e9, 1e9 + 100]),
            conv("untimed2", [None]),
        ],
        gap_seconds=30,
    )
    times = [[c.t for c in s.calls] for s in seq]
    start = 1_700_000_000.0 + DEFAULT_GAP
    assert times[0] == [start, start + DEFAULT_GAP]  # as replay() alone would place it
    assert times[1] == [2e9, 2e9 + 5]  # recorded times kept
    assert times[2] == [2e9 + 5, 2e9 + 105]  # shifted forward, its gap kept
    assert times[3] == [2e9 + 135]  # previous last call + gap
    assert seq[1].calls[0].body is not None and [c.id for c in seq] == [
        "untimed",
        "later",
        "earlier",
        "untimed2",
    ]


# -- tuning / validation split ------------------------------------------------------------------------


def test_split_halves_rule_balanced_disjoint_covering() -> None:
    import hashlib
    import random

    paths = [f"/x/tau/conv{i:02d}.json" for i in range(9)] + [f"/y/swe/run-{i}.jsonl" for i in range(6)]
    halves = bench.split_halves(paths)
    tuning, validation = halves["tuning"], halves["validation"]
    assert set(tuning) | set(validation) == set(paths)  # covering
    assert not set(tuning) & set(validation) and len(tuning) + len(validation) == len(paths)  # disjoint
    for src, n in (("tau", 9), ("swe", 6)):  # balanced per source: the tuning half takes the odd one
        t = [p for p in tuning if f"/{src}/" in p]
        v = [p for p in validation if f"/{src}/" in p]
        assert len(t) == (n + 1) // 2 and len(v) == n // 2
    # the documented rule: sorted by sha256 of the stem, even positions tuning
    tau = sorted(
        (p for p in paths if "/tau/" in p), key=lambda p: hashlib.sha256(Path(p).stem.encode()).hexdigest()
    )
    assert [p for p in tuning if "/tau/" in p] == tau[0::2]
    assert [p for p in validation if "/tau/" in p] == tau[1::2]
    # deterministic: the order given and the directory above the source do not matter
    shuffled = paths[:]
    random.Random(7).shuffle(shuffled)
    again = bench.split_halves([Path("/elsewhere" + p) for p in shuffled])
    assert sorted(Path(p).name for p in again["tuning"]) == sorted(Path(p).name for p in tuning)


def test_find_traces_tags_halves_and_skips_non_conversation_json(tmp_path: Path) -> None:
    folder = tmp_path / "shop"
    folder.mkdir()
    for name in ("a", "b", "c"):
        _conv_file(folder, name, f"Where is order {name}?", None)
    (folder / "SOURCES.json").write_text('{"a": "some/repo"}', encoding="utf-8")  # not a conversation
    refs, _ = bench.find_traces([tmp_path])
    assert sorted(Path(r.path).name for r in refs) == ["a.json", "b.json", "c.json"]
    halves = bench.split_halves([r.path for r in refs])
    assert {r.path: r.half for r in refs} == {p: h for h in halves for p in halves[h]}
    assert bench.split_counts(refs) == {"shop": {"tuning": 2, "validation": 1}}
    opts = bench.BenchOptions(
        traces=[str(tmp_path)],
        configs=["auto"],
        half="validation",
        overhead=False,
        memory=False,
        progress=False,
    )
    data = bench.run_bench(opts)
    assert [c["half"] for c in data["conversations"]] == ["validation"]
    assert data["split"]["counts"] == {"shop": {"tuning": 2, "validation": 1}}
    assert "tuning/validation): shop 2/1" in render(data, "md")


# -- lost facts ------------------------------------------------------------------------------------------

_FACT = "compute_ledger_total_v2"
_READ = "\n".join(f"line {i}: total += entry_{i} * rate  # ledger arithmetic" for i in range(120))
_READ = _READ + f"\ndef {_FACT}(entries): return sum(entries)\n"
_BASH = "\n".join(f"test {i} passed in 0.0{i % 10}s" for i in range(150))


def _replayed(folder: Path, **options: Any) -> dict:
    """``run_bench`` over ``folder`` with ``options``, no timing, memory or progress bar."""
    opts = bench.BenchOptions(traces=[str(folder)], overhead=False, memory=False, progress=False, **options)
    return bench.run_bench(opts)


def _write_conv(folder: Path, name: str, messages: list[dict], calls: list[int]) -> Path:
    """``folder/name.json``: one segment of ``messages`` on Sonnet 4.5, a call at each message count."""
    data = {
        "format": "tokensaver-conversation/1",
        "id": name,
        "segments": [
            {
                "request": {"model": "claude-sonnet-4-5", "max_tokens": 256, "messages": messages},
                "calls": [{"n_messages": n} for n in calls],
            }
        ],
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _lost_fact_conv(folder: Path) -> Path:
    """Read a file, run the tests, then quote the file's function: 4 calls, the quote at call 3."""
    msgs = [
        {"role": "user", "content": "Find the ledger bug."},
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "t1", "name": "Read", "input": {"file_path": "/src/ledger.py"}}
            ],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": _READ}]},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "t2", "name": "Bash", "input": {"command": "pytest"}}],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t2", "content": _BASH}]},
        {"role": "assistant", "content": f"The bug is in {_FACT}: it ignores the rate."},
        {"role": "user", "content": "Thanks."},
        {"role": "assistant", "content": "You are welcome."},
    ]
    return _write_conv(folder, "ledger", msgs, [1, 3, 5, 7])


def test_lost_round_usd_by_hand() -> None:
    from tokensaver.pricing import PriceTable

    info = PriceTable().get("claude-sonnet-4-5")  # read $0.30, 5-minute write $3.75 per MTok
    assert (info.cache_read, info.cache_write_5m) == (0.3, 3.75)
    # 50k prefix read, 2k result written again and read on the next 20 of 30 calls left
    assert bench.lost_round_usd(info, 50_000, 2_000, 30) == pytest.approx(
        (0.3 * 50_000 + 3.75 * 2_000 + 0.3 * 2_000 * 20) / 1e6
    )
    assert bench.lost_round_usd(info, 50_000, 2_000, 3) == pytest.approx(
        (0.3 * 50_000 + 3.75 * 2_000 + 0.3 * 2_000 * 3) / 1e6
    )
    assert bench.lost_round_usd(info, 1_000, 100, 0) == pytest.approx((300 + 375) / 1e6)


def test_lost_results_names_each_result_once() -> None:
    original = _body(f"{_FACT} and other_fact_9 in one file")
    cut = _body("[cleared]")
    tracker = FactTracker()
    used = frozenset({_FACT, "other_fact_9"})
    n_kept, lost = tracker.lost_results(used, original, cut)
    assert n_kept == 0 and list(lost) == ["t1"]  # two facts, one result
    assert tracker.lost_results(used, original, original) == (2, {})


def _cut_config(tmp_path: Path, budget: int, keep: int) -> Path:
    """A config file of prune alone that cuts as soon as ``budget`` tokens are passed."""
    cfg = tmp_path / "cut.toml"
    cfg.write_text(
        f'plugins = ["prune"]\n[prune]\nmax_tokens_budget = {budget}\nkeep_tool_uses = {keep}\n'
        "keep_last_messages = 2\nclear_stale = false\n",
        encoding="utf-8",
    )
    return cfg


def test_bench_prices_a_cut_result_the_agent_quotes(tmp_path: Path) -> None:
    from tokensaver.pricing import PriceTable
    from tokensaver.tokens import TokenCounter, count_text

    folder = tmp_path / "ledgers"
    folder.mkdir()
    _lost_fact_conv(folder)
    cfg = _cut_config(tmp_path, budget=1000, keep=0)
    opts = bench.BenchOptions(
        traces=[str(folder)],
        configs=["auto", str(cfg)],
        scope="conversation",
        overhead=False,
        memory=False,
        progress=False,
    )
    data = bench.run_bench(opts)
    by = {r["config"]: r for r in data["results"]}
    assert by["auto"]["lost_results"] == 0 and by["auto"]["lost_fact_usd"] == 0
    row = by["cut"]
    assert row["rejected"] == 0 and row["facts_used"] >= 1 and row["facts_kept"] < row["facts_used"]
    assert row["lost_results"] == 1
    (sample,) = row["lost_samples"]
    assert sample["call"] == 2 and sample["tool_use_id"] == "t1"
    # the round by hand: the call's whole prefix read, the Read result written again, read on 1 later call
    block = {"type": "tool_result", "tool_use_id": "t1", "content": _READ}
    result_tokens = TokenCounter().block(block)  # the result as the API counts it: its text + block overhead
    assert count_text(_READ) <= result_tokens <= count_text(_READ) + 10
    assert sample["result_tokens"] == result_tokens
    assert count_text(_BASH) < sample["prefix_tokens"] < count_text(_READ) + count_text(_BASH)
    info = PriceTable().get("claude-sonnet-4-5")
    by_hand = (
        info.cache_read * sample["prefix_tokens"]
        + info.cache_write_5m * result_tokens
        + info.cache_read * result_tokens * 1
    ) / 1e6
    assert row["lost_fact_usd"] == pytest.approx(by_hand, abs=1e-8)
    t = data["totals"]
    auto_in, cut_in = t["auto"]["input_cost_usd"], t["cut"]["input_cost_usd"]
    assert t["cut"]["net_vs_auto_input_pct"] == pytest.approx(
        100 * (auto_in - cut_in - by_hand) / auto_in, abs=0.01
    )
    assert t["cut"]["net_vs_auto_input_pct"] < t["cut"]["vs_auto_input_pct"]
    md = render(data, "md")
    assert "Savings net of lost facts" in md and "| ledgers | cut |" in md


def test_bench_configs_do_not_let_a_busy_machine_cut_a_plugin_off(tmp_path: Path) -> None:
    """Replays bill what the plugins do: the live 2 s hook timeout would skip a plugin under load."""
    from tokensaver.bench.specs import build_specs
    from tokensaver.config import load_config

    own = tmp_path / "own.toml"
    own.write_text("plugins = ['prune']\nplugin_timeout = 5\n")
    bare = tmp_path / "bare.toml"
    bare.write_text("plugins = ['prune']\n")
    specs = {s.name: s for s in build_specs(["defaults", "prune", "all", str(own), str(bare)], ["prune"])}
    assert {n: s.config["plugin_timeout"] for n, s in specs.items()} == {
        "defaults": 600.0,
        "prune": 600.0,
        "all": 600.0,
        "own": 5,
        "bare": 600.0,
    }
    assert all(s.config["record"] is False for s in specs.values())
    assert load_config(specs["defaults"].config, cwd=tmp_path).plugin_timeout == 600.0


def _thinking_conv(folder: Path, turns: int = 12) -> Path:
    """A Claude Code-like tool loop whose assistant turns start with a signed thinking block."""
    messages: list[dict] = [{"role": "user", "content": "Fix the failing test."}]
    for k in range(turns):
        messages.append(
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "thinking",
                        "thinking": f"Step {k}: read the next file.",
                        "signature": f"sig-{k}",
                    },
                    {
                        "type": "tool_use",
                        "id": f"t{k}",
                        "name": "Read",
                        "input": {"file_path": f"/src/m{k}.py"},
                    },
                ],
            }
        )
        body = "\n".join(f"def handler_{k}_{i}(value): return value + {i}" for i in range(60))
        messages.append(
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"t{k}", "content": body}]}
        )
    return _write_conv(folder, "thinking-loop", messages, list(range(1, len(messages) + 1, 2)))


def test_as_model_replays_on_a_model_with_preserved_thinking(tmp_path: Path) -> None:
    """--as-model runs every call as if sent to that model: on Opus 5.5 the emulator binds each
    thinking block to what came before it, so a cut before one would be refused; prune makes none."""
    folder = tmp_path / "loops"
    folder.mkdir()
    _thinking_conv(folder)
    cfg = _cut_config(tmp_path, budget=2000, keep=1)

    def replay(model: str | None) -> dict:
        opts = bench.BenchOptions(
            traces=[str(folder)],
            configs=[str(cfg)],
            scope="conversation",
            overhead=False,
            memory=False,
            progress=False,
            model=model,
        )
        return bench.run_bench(opts)

    plain, bound = replay(None), replay("claude-opus-5-5")
    (row,) = plain["results"]
    assert row["rejected"] == 0 and row["tokens_sent"] < row["tokens_original"]  # cut on Sonnet 4.5
    (row,) = bound["results"]
    assert row["rejected"] == 0 and row["tokens_sent"] == row["tokens_original"]  # no cut on Opus 5.5
    assert "as if sent to claude-opus-5-5" in render(bound, "md")


def _read_conv(folder: Path) -> Path:
    """A Claude Code-like conversation: a padded, arrow-numbered Read result and a Grep result."""
    from tokensaver.bench.corpus import MALWARE_REMINDER

    code = "\n".join(f"{n:6d}→line {n} of the file" for n in range(1, 41)) + MALWARE_REMINDER
    messages = [
        {"role": "user", "content": "Read app.py and find foo."},
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "toolu_r", "name": "Read", "input": {"file_path": "/w/app.py"}},
                {"type": "tool_use", "id": "toolu_g", "name": "Grep", "input": {"pattern": "foo"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_r", "content": code},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_g",
                    "content": [{"type": "text", "text": "     7→foo"}],
                },
            ],
        },
        {"role": "assistant", "content": "foo is on line 7."},
    ]
    return _write_conv(folder, "reads", messages, [1, 3])


def test_read_form_today_numbers_read_results_as_todays_claude_code(tmp_path: Path) -> None:
    """--read-form today: Read results' numbered lines as `12\\tcode` (every line, every byte of code
    kept) and without the trailing malware reminder; other tools' results untouched; the replay
    sends fewer tokens and the report says so."""
    from tokensaver.bench.corpus import TraceRef, load_ref

    folder = tmp_path / "claude-code"
    folder.mkdir()
    path = _read_conv(folder)
    conv = load_ref(TraceRef(str(path), "claude-code", 0, read_form="today"))
    results = conv.calls[-1].body["messages"][2]["content"]
    assert results[0]["content"] == "\n".join(f"{n}\tline {n} of the file" for n in range(1, 41))
    assert results[1]["content"] == [{"type": "text", "text": "     7→foo"}]
    assert conv.info["bench_read_rewritten"] == 1
    recorded = load_ref(TraceRef(str(path), "claude-code", 0))
    recorded_read = recorded.calls[-1].body["messages"][2]["content"][0]["content"]
    assert recorded_read.startswith("     1→line 1") and recorded_read.endswith("</system-reminder>\n")

    def run(form: str) -> dict:
        return _replayed(folder, configs=["none"], scope="conversation", read_form=form)

    before, after = run("recorded"), run("today")
    assert after["read_form"] == "today"
    assert after["results"][0]["input_tokens"] < before["results"][0]["input_tokens"]
    assert "--read-form today" in render(after, "md")
    assert "--read-form" not in render(before, "md")
    with pytest.raises(TokensaverError, match="unknown read form 'new'; accepted: recorded, today"):
        run("new")
