"""prune: trigger/target cuts, pairs kept, stability between cuts, dedupe, server-side context management."""

from __future__ import annotations

import json
import re
from typing import Any

import anthropic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import tool_loop, words
from tokensaver_plugins import prune
from tokensaver_plugins._blocks import request_problems, strip_cc

import tokensaver
from tokensaver.context import make_context
from tokensaver.emulator import Emulator
from tokensaver.errors import ConfigError
from tokensaver.pricing import PriceTable

MODEL = "claude-sonnet-4-6"
T0 = 1_700_000_000.0


def conversation(n_turns: int, size: int = 400, names: list[str] | None = None) -> list[dict[str, Any]]:
    """Task, then ``n_turns`` tool calls each answered with a ``size``-token result."""
    msgs: list[dict[str, Any]] = [{"role": "user", "content": "Task: fix the bug"}]
    for k in range(n_turns):
        name = (names or ["read"])[k % len(names or ["read"])]
        msgs.append(
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": f"step {k}", "signature": "s"},
                    {"type": "tool_use", "id": f"toolu_{k:03d}", "name": name, "input": {"k": k}},
                ],
            }
        )
        msgs.append(
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": f"toolu_{k:03d}", "content": words(k, size)}
                ],
            }
        )
    return msgs


def body_of(messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 64, "system": "You fix bugs.", "messages": messages, **extra}


def run(body: dict[str, Any], states: dict[str, Any], **conf: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    ctx = make_context(body, plugin="prune", settings={**prune.DEFAULTS, **conf}, now=T0, states=states)
    out = prune.tokensaver_transform_request(body, ctx)
    sent = out if out is not None else body
    assert request_problems(sent) == []
    return sent, ctx.notes.get("prune", {})


def result_text(body: dict[str, Any], tid: str) -> str:
    for m in body["messages"]:
        for b in m["content"] if isinstance(m["content"], list) else []:
            if b.get("type") == "tool_result" and b["tool_use_id"] == tid:
                return str(b["content"])
    raise KeyError(tid)


TIGHT = {
    "max_tokens_budget": 10_000,
    "trigger": 1.0,
    "target": 0.5,
    "keep_tool_uses": 3,
    "keep_last_messages": 4,
    "clear_stale": False,  # the budget cuts alone (economic cuts have their own tests)
}


def test_nothing_changes_below_trigger() -> None:
    body = body_of(conversation(5))
    sent, notes = run(body, {}, **TIGHT)
    # only the string contents become block lists (the same every call)
    assert [strip_cc(m) for m in sent["messages"][1:]] == body["messages"][1:]
    assert "cut" not in notes and notes["tokens"] < 10_000


def test_one_deep_cut_to_target_then_stable_until_next_trigger() -> None:
    states: dict[str, Any] = {}
    msgs = conversation(40, size=100)  # ~400 tokens a turn
    sent_by_turn = []
    cuts = []
    for n in range(3, len(msgs) + 1, 2):
        sent, notes = run(body_of(msgs[:n]), states, **TIGHT)
        sent_by_turn.append(sent)
        if "cut" in notes:
            cuts.append((n, notes["cut"]))
            assert notes["cut"]["tokens_after"] <= 5_000  # down to the target
            assert notes["cut"]["tokens_before"] > 10_000  # only past the trigger
            assert notes["cut"]["prefix_invalidated_tokens"] >= notes["cut"]["removed_tokens"]
        else:
            assert notes["tokens_sent"] <= 10_000
    assert 1 <= len(cuts) <= 4  # rare steps, not a little every turn
    cut_turns = {(n - 3) // 2 for n, _ in cuts}
    for k in range(1, len(sent_by_turn)):
        if k in cut_turns:
            continue
        prev, cur = sent_by_turn[k - 1]["messages"], sent_by_turn[k]["messages"]
        assert [strip_cc(m) for m in cur[: len(prev)]] == [strip_cc(m) for m in prev]


def test_cut_keeps_task_pairs_thinking_and_recent_tool_uses() -> None:
    msgs = conversation(30, size=100)
    sent, notes = run(body_of(msgs), {}, **TIGHT)
    assert "cut" in notes and notes["cut"]["dropped_messages"] == 0
    assert sent["messages"][0]["content"][0] == {"type": "text", "text": "Task: fix the bug"}
    for k in range(27, 30):  # the last 3 tool uses
        assert result_text(sent, f"toolu_{k:03d}") == words(k, 100)
    assert "earlier tool output cleared" in result_text(sent, "toolu_000")
    # every assistant message that is still there is untouched (thinking blocks included)
    originals = [json.dumps(m, sort_keys=True) for m in msgs if m["role"] == "assistant"]
    assert all(
        json.dumps(m, sort_keys=True) in originals for m in sent["messages"] if m["role"] == "assistant"
    )
    assert sent["system"] == [{"type": "text", "text": "You fix bugs."}] or sent["system"] == "You fix bugs."


def test_excluded_tools_never_cleared() -> None:
    msgs = conversation(30, size=100, names=["read", "memory"])
    sent, notes = run(body_of(msgs), {}, **{**TIGHT, "target": 0.85, "exclude_tools": ["memory"]})
    assert "cut" in notes and notes["cut"]["dropped_messages"] == 0
    for k in range(1, 30, 2):
        assert result_text(sent, f"toolu_{k:03d}") == words(k, 100)
    assert "earlier tool output cleared" in result_text(sent, "toolu_000")


def test_drops_old_turns_when_clearing_is_not_enough() -> None:
    msgs: list[dict[str, Any]] = [{"role": "user", "content": "Task"}]
    for k in range(30):  # no tool results at all: only whole turns can go
        msgs += [
            {"role": "assistant", "content": words(k, 300)},
            {"role": "user", "content": words(100 + k, 300)},
        ]
    sent, notes = run(body_of(msgs), {}, **TIGHT)
    cut = notes["cut"]
    assert cut["dropped_messages"] > 0 and cut["tokens_after"] <= 5_000
    assert sent["messages"][1]["role"] == "assistant"
    assert "earlier messages" in sent["messages"][0]["content"][-1]["text"]
    assert sent["messages"][-4:] == [
        {**m, "content": [{"type": "text", "text": m["content"]}]} for m in msgs[-4:]
    ]


def test_dedupe_replaces_the_newer_copy_and_never_rewrites_history() -> None:
    same = words(7, 300)
    msgs = conversation(2)
    msgs[2]["content"][0]["content"] = same
    before, _ = run(body_of(msgs), {})
    msgs += [
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_again", "name": "read", "input": {}}],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_again", "content": same}]},
    ]
    after, _ = run(body_of(msgs), {})
    assert result_text(after, "toolu_000") == same  # the earlier copy stays
    assert "identical to the earlier result of tool_use toolu_000" in result_text(after, "toolu_again")
    assert [strip_cc(m) for m in after["messages"][: len(before["messages"])]] == [
        strip_cc(m) for m in before["messages"]
    ]
    off, _ = run(body_of(msgs), {}, dedupe=False)
    assert result_text(off, "toolu_again") == same


def test_stands_aside_for_server_side_context_management() -> None:
    cm = {"edits": [{"type": "clear_tool_uses_20250919"}]}
    body = body_of(conversation(40), context_management=cm)
    sent, notes = run(body, {}, **TIGHT)
    assert sent is body and notes["stood_aside"] == "context_management"
    ctx = make_context(body, plugin="prune", now=T0)
    prune.tokensaver_observe_response(
        body, {"context_management": {"applied_edits": [{"cleared_input_tokens": 1234}]}}, ctx
    )
    assert ctx.notes["prune"]["server_cleared_tokens"] == 1234
    sec = prune.tokensaver_report_section(
        "prune", [{"id": "c", "plugins": {"prune": {**notes, **ctx.notes["prune"]}}}]
    )
    assert sec is not None and "server cleared 1,234 tokens" in sec["summary"]


def test_budget_from_context_window_fraction() -> None:
    model = PriceTable().get(MODEL)
    assert prune.budget({**prune.DEFAULTS}, model) == int(0.5 * model.context_window)
    assert prune.budget({**prune.DEFAULTS, "max_tokens_budget": 50_000}, model) == 50_000


def test_budget_follows_the_model_pages_windows() -> None:
    # Opus 4.6 and Sonnet 4.6 have 1M windows (their model pages); Opus 4.5 / Sonnet 4.5 200K: a 150k
    # conversation is over the default budget only on the latter
    prices = PriceTable()
    for model, window in (("claude-opus-4-6", 1_000_000), ("claude-sonnet-4-6", 1_000_000)):
        assert prune.budget({**prune.DEFAULTS}, prices.get(model)) == window // 2
    assert prune.budget({**prune.DEFAULTS}, prices.get("claude-sonnet-4-5")) == 100_000


def test_configure_validates() -> None:
    assert prune.tokensaver_configure({}, "t")["target"] == 0.6
    with pytest.raises(ConfigError, match="below prune.trigger"):
        prune.tokensaver_configure({"trigger": 0.5, "target": 0.6}, "t")
    with pytest.raises(ConfigError, match="unknown key"):
        prune.tokensaver_configure({"budget": 3}, "t")
    with pytest.raises(ConfigError, match="list of tool names"):
        prune.tokensaver_configure({"exclude_tools": "read"}, "t")


def test_report_rows_show_removed_vs_invalidated() -> None:
    states: dict[str, Any] = {}
    _, notes = run(body_of(conversation(30)), states, **TIGHT)
    sec = prune.tokensaver_report_section("prune", [{"id": "c1", "plugins": {"prune": notes}}])
    assert sec is not None and len(sec["rows"]) == 1
    row = sec["rows"][0]
    assert row["removed"] > 0 and row["prefix_invalidated"] >= row["removed"] and row["break_even_calls"] > 0


def test_with_cache_align_through_emulator_costs_less_than_cache_align_alone(tmp_path: Any) -> None:
    msgs = conversation(60, size=500)
    costs = {}
    m = PriceTable().get(MODEL)
    for plugins in (["cache_align"], ["prune", "cache_align"]):
        with Emulator(virtual_clock=True, start_time=T0) as emu:
            base = anthropic.Anthropic(base_url=emu.url, api_key="k", max_retries=0)
            client = tokensaver.wrap(
                base,
                config={
                    "plugins": plugins,
                    "record": False,
                    "runs_dir": str(tmp_path),
                    "prune": {"max_tokens_budget": 16_000},
                },
                clock=emu.clock.now,
            )
            total = 0.0
            for n in range(3, len(msgs) + 1, 2):
                emu.clock.advance(10)
                resp = client.post("/v1/messages", body=body_of(msgs[:n]), cast_to=object)
                total += m.input_cost(resp["usage"])
                assert request_problems(emu.last["body"]) == []
            costs[tuple(plugins)] = total
    assert costs[("prune", "cache_align")] < costs[("cache_align",)]


# -- economic cuts (below the budget) ---------------------------------------------------------


def turns_of(
    msgs: list[dict[str, Any]], states: dict[str, Any], **conf: Any
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Every call of the conversation through prune with one shared state: (sent, notes) per call."""
    return [run(body_of(msgs[:n]), states, **conf) for n in range(3, len(msgs) + 1, 2)]


def test_economic_cut_fires_on_a_long_conversation_with_big_stale_results() -> None:
    results = turns_of(conversation(90, size=200), {})
    cuts = [notes["cut"] for _, notes in results if "cut" in notes]
    assert cuts and all(c["trigger"] == "economic" for c in cuts)
    limit = prune.budget(prune.DEFAULTS, PriceTable().get(MODEL))
    for c in cuts:
        assert c["tokens_before"] < limit  # far below the budget trigger
        assert c["removed_tokens"] >= prune.DEFAULTS["clear_min_tokens"]
        assert c["removed_tokens"] >= prune.DEFAULTS["clear_min_fraction"] * c["tokens_before"]
        # it pays back within the calls expected to come
        assert c["break_even_calls"] <= c["estimated_future_calls"]
        assert c["prefix_invalidated_tokens"] >= c["removed_tokens"]
    assert len(cuts) <= 6  # deep and rare, not a little every turn
    sent, notes = results[-1]
    keep = prune.DEFAULTS["clear_keep_output_uses"]  # no file reads: output goes stale sooner
    for k in range(90 - keep, 90):  # the last tool uses are kept in full
        assert result_text(sent, f"toolu_{k:03d}") == words(k, 200)
    marker = result_text(sent, "toolu_000")
    assert marker.startswith("[tokensaver: earlier tool output cleared (") and "re-run the tool" in marker
    assert len(marker) < 120
    # thinking and tool_use blocks untouched, the task kept
    originals = [
        json.dumps(m, sort_keys=True) for m in conversation(90, size=200) if m["role"] == "assistant"
    ]
    assert all(
        json.dumps(m, sort_keys=True) in originals for m in sent["messages"] if m["role"] == "assistant"
    )
    assert sent["messages"][0]["content"] == [{"type": "text", "text": "Task: fix the bug"}]


def test_no_economic_cut_on_a_short_conversation() -> None:
    for _, notes in turns_of(conversation(25, size=500), {}):
        assert "cut" not in notes
    # nor when switched off, however long
    for _, notes in turns_of(conversation(90, size=200), {}, clear_stale=False):
        assert "cut" not in notes


def test_economic_cut_waits_until_it_pays_back() -> None:
    # big recent results after the first stale one: clearing it re-writes them all, which the
    # reads saved pay back only once more results are stale and more calls are expected
    msgs = conversation(20, size=800)
    results = turns_of(msgs, {}, clear_keep_tool_uses=6, clear_min_tokens=1000, clear_min_fraction=0.0)
    first = next(k for k, (_, notes) in enumerate(results) if notes.get("stale_tokens"))
    _, notes = results[first]
    assert "cut" not in notes  # stale, but too few calls so far to expect the saving back
    cuts = [n["cut"] for _, n in results if "cut" in n]  # later, with more history, it cuts
    assert cuts and cuts[0]["break_even_calls"] <= cuts[0]["estimated_future_calls"]


def test_prefix_byte_identical_between_economic_cuts_and_same_marker_bytes() -> None:
    msgs = conversation(100, size=200, names=["read", "bash"])
    states: dict[str, Any] = {}
    conf = {"clear_keep_tool_uses": 10}
    results = turns_of(msgs, states, **conf)
    assert sum("cut" in n for _, n in results) >= 2
    for (prev, _), (cur, notes) in zip(results, results[1:], strict=False):
        if "cut" in notes:
            continue
        a = json.dumps([strip_cc(m) for m in prev["messages"]], sort_keys=True)
        b = json.dumps([strip_cc(m) for m in cur["messages"][: len(prev["messages"])]], sort_keys=True)
        assert a == b
    # a retry of the last call (same state) and a fresh replay give the same bytes
    again, notes = run(body_of(msgs), states, **conf)
    assert "cut" not in notes and json.dumps(again) == json.dumps(results[-1][0])
    fresh = turns_of(msgs, {}, **conf)
    assert json.dumps(fresh[-1][0]) == json.dumps(results[-1][0])


def test_economic_cut_respects_exclude_tools_and_context_management() -> None:
    msgs = conversation(90, size=200, names=["read", "memory"])
    results = turns_of(
        msgs, {}, exclude_tools=["memory"], clear_keep_tool_uses=10, clear_max_future_calls=100
    )
    sent, _ = results[-1]
    assert any("cut" in n for _, n in results)
    for k in range(1, 90, 2):
        assert result_text(sent, f"toolu_{k:03d}") == words(k, 200)
    cm = {"edits": [{"type": "clear_tool_uses_20250919"}]}
    sent, notes = run(body_of(msgs, context_management=cm), {})
    assert notes == {"stood_aside": "context_management", "server_edit": "clear_tool_uses_20250919"}


def test_configure_validates_economic_settings() -> None:
    out = prune.tokensaver_configure({"clear_payback": 2, "clear_min_fraction": 0}, "t")
    assert out["clear_payback"] == 2.0 and out["clear_min_fraction"] == 0.0 and out["clear_stale"] is True
    for key, bad, msg in (
        ("clear_stale", "yes", "true or false"),
        ("clear_payback", 0, "between 0.1 and 100"),
        ("clear_max_future_calls", 0, "between 1 and 10000"),
        ("clear_min_tokens", -1, "non-negative integer"),
        ("clear_min_fraction", 1.5, "between 0.0 and 1.0"),
    ):
        with pytest.raises(ConfigError, match=f"prune.{key} must be .*{msg}"):
            prune.tokensaver_configure({key: bad}, "t")


def test_report_tells_economic_cuts_apart() -> None:
    results = turns_of(conversation(90, size=200), {})
    calls = [{"id": f"c{k}", "plugins": {"prune": n}} for k, (_, n) in enumerate(results)]
    sec = prune.tokensaver_report_section("prune", calls)
    assert sec is not None and sec["rows"] and all(r["trigger"] == "economic" for r in sec["rows"])
    assert f"({len(sec['rows'])} economic, 0 over budget)" in sec["summary"]


def test_defaults_with_cache_align_through_emulator_cost_less_than_cache_align_alone(tmp_path: Any) -> None:
    """No budget set: the economic trigger alone makes prune pay on a long agent conversation."""
    msgs = conversation(100, size=200)
    costs = {}
    m = PriceTable().get(MODEL)
    for plugins in (["cache_align"], ["prune", "cache_align"]):
        with Emulator(virtual_clock=True, start_time=T0) as emu:
            base = anthropic.Anthropic(base_url=emu.url, api_key="k", max_retries=0)
            client = tokensaver.wrap(
                base,
                config={"plugins": plugins, "record": False, "runs_dir": str(tmp_path)},
                clock=emu.clock.now,
            )
            total = 0.0
            for n in range(3, len(msgs) + 1, 2):
                emu.clock.advance(10)
                resp = client.post("/v1/messages", body=body_of(msgs[:n]), cast_to=object)
                total += m.input_cost(resp["usage"])
                assert request_problems(emu.last["body"]) == []
            costs[tuple(plugins)] = total
    assert costs[("prune", "cache_align")] < 0.95 * costs[("cache_align",)]


def reads_of(paths: list[str], size: int = 300, writes: frozenset[int] = frozenset()) -> list[dict[str, Any]]:
    """Task, then one Read (or, at the indexes in ``writes``, an Edit) of each path in turn."""
    msgs: list[dict[str, Any]] = [{"role": "user", "content": "Task: fix the bug"}]
    for k, path in enumerate(paths):
        inp: dict[str, Any] = {"file_path": path}
        name = "Read"
        if k in writes:
            name, inp = (
                "Edit",
                {"file_path": path, "old_string": "a", "new_string": "b", "replace_all": False},
            )
        tid = f"toolu_{k:03d}"
        msgs.append(
            {"role": "assistant", "content": [{"type": "tool_use", "id": tid, "name": name, "input": inp}]}
        )
        msgs.append(
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": tid, "content": words(k, size)}],
            }
        )
    return msgs


ECON_EASY = {"clear_min_tokens": 0, "clear_min_fraction": 0.0, "clear_payback": 0.1, "keep_last_messages": 2}


def test_superseded_result_cleared_while_one_of_the_same_age_is_kept() -> None:
    # /a.py and /b.py read first, then /a.py again at the end; all within clear_keep_tool_uses
    msgs = reads_of(["/a.py", "/b.py", "/c.py", "/d.py", "/a.py", "/e.py"])
    sent, notes = run(body_of(msgs), {}, **ECON_EASY)
    assert notes["cut"]["trigger"] == "economic"
    marker = result_text(sent, "toolu_000")
    assert re.fullmatch(
        r"\[tokensaver: superseded by a later identical Read call; \d+ tokens cleared\]", marker
    )
    for k in range(1, 6):  # same age or newer, not superseded: kept in full
        assert result_text(sent, f"toolu_{k:03d}") == words(k, 300)
    # switched off: nothing is stale at this age
    _, notes = run(body_of(msgs), {}, clear_superseded=False, **ECON_EASY)
    assert "cut" not in notes


def test_superseded_by_identical_call_partial_read_and_write() -> None:
    def use(tid: str, name: str, inp: dict[str, Any]) -> dict[str, Any]:
        return {"type": "tool_use", "id": tid, "name": name, "input": inp}

    msgs: list[dict[str, Any]] = [
        {"role": "assistant", "content": [use("t1", "Bash", {"command": "pytest -q"})]},
        {
            "role": "assistant",
            "content": [use("t2", "Read", {"file_path": "/x.py", "offset": 10, "limit": 5})],
        },
        {"role": "assistant", "content": [use("t3", "Grep", {"pattern": "foo", "path": "/x.py"})]},
        {"role": "assistant", "content": [use("t4", "Read", {"file_path": "/y.py"})]},
        {"role": "assistant", "content": [use("t5", "Bash", {"command": "pytest -q"})]},
        {"role": "assistant", "content": [use("t6", "Read", {"file_path": "/x.py"})]},
        {"role": "assistant", "content": [use("t7", "Grep", {"pattern": "bar", "path": "/x.py"})]},
        {"role": "assistant", "content": [use("t8", "Write", {"file_path": "/y.py", "content": "b"})]},
        {"role": "assistant", "content": [use("t9", "Write", {"file_path": "/y.py", "content": "b"})]},
    ]
    sup = prune.superseded(msgs, prune.DEFAULTS)
    assert sup == {
        "t1": "a later identical Bash call",
        "t2": "a later Read of /x.py",
        "t4": "a later Write of /y.py",
    }  # a search of the same path supersedes nothing, nor is it superseded; a Write is never repeated
    assert prune.superseded(msgs, {**prune.DEFAULTS, "superseded_by_write": False}) == {
        "t1": "a later identical Bash call",
        "t2": "a later Read of /x.py",
    }
    # a later call that failed supersedes nothing
    errs = [
        *msgs[:5],
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "t5", "is_error": True, "content": "x"}],
        },
    ]
    assert "t1" not in prune.superseded(errs, prune.DEFAULTS)


def test_an_edit_of_a_part_supersedes_a_read_only_when_asked() -> None:
    """The agent quotes the rest of a file after editing a part of it: without
    ``superseded_by_edit`` only a whole Write (or a whole re-read) makes the read out of date."""

    def use(tid: str, name: str, inp: dict[str, Any]) -> dict[str, Any]:
        return {"type": "tool_use", "id": tid, "name": name, "input": inp}

    edit = {"file_path": "/y.py", "old_string": "a", "new_string": "b", "replace_all": False}
    msgs: list[dict[str, Any]] = [
        {"role": "assistant", "content": [use("t1", "Read", {"file_path": "/y.py"})]},
        {"role": "assistant", "content": [use("t2", "Edit", edit)]},
        {"role": "assistant", "content": [use("t3", "MultiEdit", {"file_path": "/y.py", "edits": [edit]})]},
        {"role": "assistant", "content": [use("t4", "Edit", edit)]},  # the same edit again
        {"role": "assistant", "content": [use("t5", "Read", {"file_path": "/z.py", "limit": 9})]},
        {"role": "assistant", "content": [use("t6", "Write", {"file_path": "/z.py", "content": "z"})]},
    ]
    parts = {**prune.DEFAULTS, "superseded_by_edit": False}
    assert prune.superseded(msgs, parts) == {"t5": "a later Write of /z.py"}
    # a whole re-read supersedes the read and the edits' results before it
    again = [*msgs, {"role": "assistant", "content": [use("t7", "Read", {"file_path": "/y.py"})]}]
    assert set(prune.superseded(again, parts)) == {"t1", "t2", "t3", "t4", "t5"}
    # with it, the first edit supersedes the read (the marker says it was an edit of a part)
    by_edit = prune.superseded(msgs, {**prune.DEFAULTS, "superseded_by_edit": True})
    assert by_edit == {"t1": "a later edit (Edit) of /y.py", "t5": "a later Write of /z.py"}


def test_superseded_results_stable_between_cuts_and_never_in_the_last_messages() -> None:
    paths = [f"/f{k % 7}.py" for k in range(60)]
    msgs = reads_of(paths, size=200, writes=frozenset(range(3, 60, 11)))
    results = turns_of(msgs, {}, clear_keep_tool_uses=40)
    assert any("cut" in n for _, n in results)
    for (prev, _), (cur, notes) in zip(results, results[1:], strict=False):
        if "cut" in notes:
            continue
        a = json.dumps([strip_cc(m) for m in prev["messages"]], sort_keys=True)
        b = json.dumps([strip_cc(m) for m in cur["messages"][: len(prev["messages"])]], sort_keys=True)
        assert a == b
    sent, _ = results[-1]
    texts = [result_text(sent, f"toolu_{k:03d}") for k in range(60)]
    assert any(t.startswith("[tokensaver: superseded by a later ") for t in texts)
    assert texts[-3:] == [words(k, 200) for k in range(57, 60)]  # the last messages untouched


def _call(
    cid: str, original: int, sent: int, written: int, read: int, cut: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "id": cid,
        "conversation": "v",
        "status": 200,
        "priced_as": "claude-sonnet-4-6",
        "tokens_original": original,
        "tokens_sent": sent,
        "usage": {
            "input_tokens": 0,
            "cache_creation_input_tokens": written,
            "cache_read_input_tokens": read,
            "output_tokens": 5,
        },
        "plugins": {"prune": {"cut": cut} if cut else {"tokens": sent}},
    }


@pytest.mark.parametrize(("later_calls", "paid"), [(2, False), (40, True)])
def test_report_measures_each_cut_from_billed_usage(later_calls: int, paid: bool) -> None:
    """Hand-computed at Sonnet 4.6 prices (write $3.75, read $0.30 per million tokens)."""
    cut = {
        "tokens_before": 12_000,
        "tokens_after": 7_000,
        "removed_tokens": 5_000,
        "prefix_invalidated_tokens": 6_000,
        "first_changed": "messages[2]",
        "trigger": "economic",
    }
    calls = [
        _call("c0", 10_000, 10_000, 10_000, 0),
        # the cut call wrote its whole 7,000-token prefix; 2,000 tokens were new since c0 anyway
        _call("c1", 12_000, 7_000, 7_000, 0, cut),
        *[_call(f"c{k}", 12_000 + 100 * k, 7_000 + 100 * k, 100, 7_000) for k in range(2, 2 + later_calls)],
    ]
    sec = prune.tokensaver_report_section("prune", calls)
    assert sec is not None
    (row,) = sec["rows"]
    assert row["calls_after"] == later_calls
    assert row["cost_usd"] == pytest.approx(5_000 * (3.75 - 0.30) / 1e6)
    assert row["saved_usd"] == pytest.approx(5_000 * 0.30 * (later_calls + 1) / 1e6)
    assert (row["net_usd"] >= 0) is paid
    assert f"{int(paid)} of 1 cuts paid back" in sec["summary"]


# -- what real Claude Code sends ----------------------------------------------------------------


def claude_code_request(msgs: list[dict[str, Any]], edits: list[dict[str, Any]]) -> dict[str, Any]:
    """A request shaped like real Claude Code's: three system blocks (two with their own breakpoints),
    thinking on, ``context_management`` with the edits given."""
    return {
        "model": MODEL,
        "max_tokens": 32000,
        "system": [
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.37"},
            {"type": "text", "text": "You are Claude Code. " * 60, "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "Environment: linux. " * 60, "cache_control": {"type": "ephemeral"}},
        ],
        "tools": [{"name": "read", "description": "Read a file", "input_schema": {"type": "object"}}],
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "context_management": {"edits": edits},
        "messages": msgs,
    }


def _prune_client(emu: Emulator, tmp_path: Any) -> Any:
    """A client through prune + cache_align to ``emu``, on its virtual clock, recording nothing."""
    base = anthropic.Anthropic(base_url=emu.url, api_key="k", max_retries=0)
    return tokensaver.wrap(
        base,
        config={"plugins": ["prune", "cache_align"], "record": False, "runs_dir": str(tmp_path)},
        clock=emu.clock.now,
    )


@pytest.mark.parametrize(
    ("edits", "pruned"),
    [
        ([{"type": "clear_thinking_20251015", "keep": "all"}], True),
        ([{"type": "clear_thinking_20251015", "keep": {"type": "thinking_turns", "value": 1}}], True),
        ([{"type": "clear_thinking_20251015", "keep": "all"}, {"type": "clear_tool_uses_20250919"}], False),
        ([{"type": "compact_20260112"}], False),
    ],
)
def test_prunes_what_real_claude_code_sends_and_stands_aside_only_from_clearing(
    tmp_path: Any, edits: list[dict[str, Any]], pruned: bool
) -> None:
    """clear_thinking never touches tool results: prune works beside it (every Claude Code request
    carries it); server-side tool-result clearing or compaction would conflict, so prune stands aside."""
    msgs = conversation(90, size=200)
    with Emulator(virtual_clock=True, start_time=T0) as emu:
        client = _prune_client(emu, tmp_path)
        markers = 0
        for n in range(3, len(msgs) + 1, 2):
            emu.clock.advance(10)
            body = claude_code_request(msgs[:n], edits)
            resp = client.post("/v1/messages?beta=true", body=body, cast_to=object)
            assert isinstance(resp, dict) and resp["type"] == "message"
            sent = emu.last["body"]
            assert request_problems(sent) == []
            assert sent["context_management"] == body["context_management"]
            assert [strip_cc(b) for b in sent["system"]] == [strip_cc(b) for b in body["system"]]
            markers = sum("[tokensaver:" in json.dumps(m) for m in sent["messages"])
    assert (markers > 0) is pruned


# -- what a cut really re-writes ----------------------------------------------------------------


def _replay_prune(
    tmp_path: Any, msgs: list[dict[str, Any]], gaps: dict[int, float] | None = None
) -> list[Any]:
    """Each call of ``msgs`` through prune + cache_align to the emulator, 10 s apart (``gaps``: call
    index -> seconds before it); (prune's notes, billed usage) per call."""
    out = []
    with Emulator(virtual_clock=True, start_time=T0) as emu:
        client = _prune_client(emu, tmp_path)
        for k, n in enumerate(range(3, len(msgs) + 1, 2)):
            emu.clock.advance((gaps or {}).get(k, 10))
            resp = client.post("/v1/messages", body=body_of(msgs[:n]), cast_to=object)
            rec = client.tokensaver.records[-1]
            out.append(((rec.get("plugins") or {}).get("prune") or {}, resp["usage"]))
    return out


def test_a_deep_cut_is_costed_as_the_whole_re_write_the_api_bills(tmp_path: Any) -> None:
    """The API looks back 20 blocks from a breakpoint and the older entries have expired: a cut far
    back re-writes the whole prompt, not just what follows the first change."""
    calls = _replay_prune(tmp_path, conversation(90, size=200))
    cuts = [(notes["cut"], usage) for notes, usage in calls if "cut" in notes]
    assert cuts
    for cut, usage in cuts:
        billed_in = (
            usage["input_tokens"] + usage["cache_creation_input_tokens"] + usage["cache_read_input_tokens"]
        )
        scale = billed_in / cut["tokens_after"]
        assert usage["cache_read_input_tokens"] == 0  # nothing before the change could be read
        assert cut["rewritten_tokens"] * scale == pytest.approx(
            usage["cache_creation_input_tokens"], rel=0.02
        )
        assert cut["rewritten_tokens"] > cut["prefix_invalidated_tokens"] - cut["removed_tokens"]


def test_a_cut_after_the_cache_expired_costs_nothing_and_is_made_then(tmp_path: Any) -> None:
    """After a pause longer than the TTL every entry has expired: the call writes everything anyway,
    so prune clears what is stale then (cost 0), not later on a warm cache."""
    msgs = conversation(90, size=200)
    warm = _replay_prune(tmp_path, msgs)
    first_warm = next(k for k, (notes, _) in enumerate(warm) if "cut" in notes)
    pause = first_warm - 8
    assert warm[pause][0].get("stale_tokens")  # stale already, but not worth a cut on a warm cache
    cold = _replay_prune(tmp_path, msgs, gaps={pause: 400})
    notes, usage = cold[pause]
    assert notes["cut"]["cache_cold"] is True and notes["cut"]["rewritten_tokens"] == 0
    assert notes["cut"]["break_even_calls"] == 0.0
    assert usage["cache_read_input_tokens"] == 0


# -- keeping what the agent will quote again ----------------------------------------------------


def _stale(msgs: list[dict[str, Any]], **conf: Any) -> dict[str, int]:
    settings = {**prune.DEFAULTS, **conf}
    ctx = make_context(body_of(msgs), plugin="prune", settings=settings, now=T0)
    return prune.stale_results(msgs, msgs, {}, settings, ctx.count, prune.superseded(msgs, settings), {})


def test_a_result_the_agent_just_quoted_is_kept() -> None:
    msgs = conversation(60, size=200)
    last_use = msgs[-2]
    quote = {"type": "text", "text": "As the third result showed, w3x17 and w3x19 are the ones to change."}
    msgs[-2] = {**last_use, "content": [quote, *last_use["content"]]}
    stale = _stale(msgs, clear_keep_quoted=3)
    assert "toolu_003" not in stale and "toolu_004" in stale and "toolu_002" in stale
    assert "toolu_003" in _stale(msgs, clear_keep_quoted=0)
    # quoted a few turns back only: out of a window of 3 turns, inside one of 10
    msgs = conversation(60, size=200)
    use = msgs[-8]
    msgs[-8] = {**use, "content": [quote, *use["content"]]}
    assert "toolu_003" in _stale(msgs, clear_keep_quoted=3)
    assert "toolu_003" not in _stale(msgs, clear_keep_quoted=10)


def test_a_read_of_a_file_stays_while_the_agent_names_the_file() -> None:
    paths = [f"/src/f{k}.py" for k in range(40)]
    msgs = reads_of(paths, size=200)
    # the last tool uses run the tests of f1.py and edit it
    msgs[-2]["content"][0]["input"] = {"command": "pytest /src/f1.py -q"}
    msgs[-2]["content"][0]["name"] = "Bash"
    stale = _stale(msgs, clear_quiet_tool_uses=10, clear_keep_tool_uses=32, superseded_by_edit=False)
    assert "toolu_001" not in stale  # named by the last tool use
    assert {"toolu_000", "toolu_002", "toolu_020"} <= set(stale)  # nobody named them for 10 uses
    assert "toolu_030" not in stale  # named by its own read 9 uses ago
    # without it, reads age like any result: only those older than the last 32 tool uses
    aged = _stale(msgs, clear_quiet_tool_uses=0, clear_keep_tool_uses=32)
    assert "toolu_001" in aged and "toolu_020" not in aged


# -- error results as repeats ---------------------------------------------------------------------


def _test_run(failing: bool) -> str:
    lines = [f"test_case_{i} (tests.test_mod_{i % 7}.ModTest.test_case_{i}) ... ok" for i in range(30)]
    if failing:
        lines[29] = lines[29].replace("... ok", "... FAIL")
        lines += ["", "FAIL: test_case_29", "AssertionError: Decimal('4.35') != Decimal('33.30')"]
    return "\n".join(["Exit code 1" if failing else "", *lines, "", "Ran 30 tests"]).lstrip("\n")


def _bash_turns(outputs: list[tuple[str, bool]]) -> list[dict[str, Any]]:
    steps = [("Bash", {"command": f"run {k}"}, text) for k, (text, _) in enumerate(outputs)]
    errors = {k for k, (_, err) in enumerate(outputs) if err}
    msgs = tool_loop("Task: make the tests pass", steps, errors=errors, narrate=True)
    msgs.append({"role": "assistant", "content": [{"type": "text", "text": "done"}]})
    msgs.append({"role": "user", "content": "thanks"})
    return msgs


def test_a_failing_test_run_is_a_source_for_the_passing_re_run_and_an_identical_error_points_back(
    tmp_path: Any,
) -> None:
    """Claude Code marks a command that exits non-zero (a failing test suite) as an error result;
    its lines are in the context like any other, so the re-run after the fix points at them, and a
    second identical failure is a pointer to the first. Lossless: every line of the re-run is either
    kept or named by a pointer to a result still sent in full; the error flag stays."""
    fail, ok = _test_run(True), _test_run(False)
    msgs = _bash_turns([(fail, True), ("edited", False), (ok, False), (fail, True)])
    sent, _ = run(body_of(msgs), {})
    assert result_text(sent, "toolu_000") == fail  # the first failure goes as it came
    rerun = result_text(sent, "toolu_002")
    assert rerun.startswith("[tokensaver: ") and "toolu_000" in rerun.split("\n")[0]
    assert len(rerun) < 0.3 * len(ok) and "Ran 30 tests" in rerun
    again = next(
        b
        for m in sent["messages"]
        if isinstance(m["content"], list)
        for b in m["content"]
        if b.get("tool_use_id") == "toolu_003"
    )
    assert again["is_error"] is True and again["content"] == prune.pointer_marker("toolu_000")
    # lossless: the pointers expanded from the first run give the re-run back
    first_lines = fail.split("\n")
    expanded = []
    for ln in rerun.split("\n"):
        m = re.fullmatch(r"\[tokensaver: repeats lines (\d+)-(\d+) of the toolu_000 result\]", ln)
        expanded += first_lines[int(m[1]) - 1 : int(m[2])] if m else [ln]
    assert "\n".join(expanded) == ok
    # prefix-stable: the same bytes on the next call, and the API accepts it
    nxt, _ = run(
        body_of([*msgs, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]), {}
    )
    assert nxt["messages"][: len(sent["messages"]) - 2] == sent["messages"][:-2]
    # the API accepts it: through wrap() to the emulator, error results pointed at and all
    with Emulator() as emu:
        base = anthropic.Anthropic(base_url=emu.url, api_key="k", max_retries=0)
        client = tokensaver.wrap(
            base, config={"plugins": ["prune"], "record": False, "runs_dir": str(tmp_path)}
        )
        resp = client.messages.create(**body_of(msgs))
        assert resp.type == "message" and emu.last["status"] == 200
        assert json.dumps(prune.pointer_marker("toolu_000"))[1:-1] in json.dumps(emu.last["body"])


# -- outline of a cleared file read -----------------------------------------------------------------


def _source_file(k: int) -> str:
    """A numbered file read (Claude Code's ``N→`` form): a module of functions with bodies."""
    lines: list[str] = [f'"""module_{k}: helpers."""', ""]
    for f in range(6):
        lines += [f"def compute_part_{k}_{f}(values, scale=2):", '    """Scale and sum."""']
        lines += [f"    total_{i} = sum(v * scale for v in values[{i}:])  # step {i}" for i in range(8)]
        lines += ["    return total_0", ""]
    lines += [f"class Store{k}:", "    pass"]
    return "\n".join(f"{n + 1:6d}→{ln}" for n, ln in enumerate(lines))


def _reads_and_runs(n: int) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = [{"role": "user", "content": "Task: fix the bug"}]
    for k in range(n):
        tid = f"toolu_{k:03d}"
        if k % 2 == 0:
            use = {"type": "tool_use", "id": tid, "name": "Read", "input": {"file_path": f"/r/mod_{k}.py"}}
            text = _source_file(k)
        else:
            use = {"type": "tool_use", "id": tid, "name": "Bash", "input": {"command": f"make check {k}"}}
            text = "\n".join(f"check {k} line {i}: def not_a_definition_{i} ok" for i in range(60))
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": f"step {k}"}, use]})
        msgs.append(
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tid, "content": text}]}
        )
    return msgs


def test_a_cleared_file_read_keeps_its_definition_lines_and_nothing_else_changes(tmp_path: Any) -> None:
    """With ``clear_outline``, a file read an economic cut clears keeps the lines that define its
    functions, classes and tests (what an agent names when it comes back to a file long after
    reading it), within 12% of the read; other results get the plain marker; the bytes are the same
    on every later call, and the API accepts the request."""
    msgs = _reads_and_runs(60)
    conf = {**ECON_EASY, "clear_keep_tool_uses": 10, "clear_outline": True}
    results = turns_of(msgs, {}, **conf)
    assert any("cut" in n for _, n in results)
    sent, _ = results[-1]
    read0, bash1 = result_text(sent, "toolu_000"), result_text(sent, "toolu_001")
    assert read0.startswith("[tokensaver: earlier tool output cleared (")
    kept = read0.split("\n")[2:]
    assert kept[0] == '     1→"""module_0: helpers."""' or kept[0].startswith("     3→def compute_part_0_0(")
    assert "     3→def compute_part_0_0(values, scale=2):" in kept
    assert not any("total_3 = sum" in ln for ln in kept)  # bodies are gone
    assert len(read0) < 0.15 * len(_source_file(0))
    assert bash1 == prune.cleared_marker(int(bash1.split("(")[1].split(" ")[0]))  # no outline
    # off (the default): the plain marker
    plain, _ = turns_of(msgs, {}, **{**conf, "clear_outline": False})[-1]
    assert result_text(plain, "toolu_000").startswith("[tokensaver: earlier tool output cleared (")
    assert "compute_part_0_0" not in result_text(plain, "toolu_000")
    # prefix-stable: between cuts, every message already sent keeps its bytes
    for (prev, _), (cur, notes) in zip(results, results[1:], strict=False):
        if "cut" not in notes:
            n = len(prev["messages"])
            assert json.dumps(cur["messages"][: n - 1]) == json.dumps(prev["messages"][: n - 1])
    # the API accepts it: through wrap() to the emulator
    with Emulator() as emu:
        base = anthropic.Anthropic(base_url=emu.url, api_key="k", max_retries=0)
        client = tokensaver.wrap(
            base, config={"plugins": ["prune"], "record": False, "runs_dir": str(tmp_path), "prune": conf}
        )
        resp = client.messages.create(**body_of(sent["messages"]))
        assert resp.type == "message" and emu.last["status"] == 200


# -- preserved thinking: a thinking block is bound to everything before it ---------------------


def _unique_signatures(msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = json.loads(json.dumps(msgs))
    for i, m in enumerate(out):
        for b in m["content"] if isinstance(m["content"], list) else []:
            if b.get("type") == "thinking":
                b["signature"] = f"sig-{i}"
    return out


@pytest.mark.parametrize(
    ("model", "thinking", "cut"),
    [
        ("claude-opus-5-5", True, False),  # preserved thinking: a cut before a thinking block fails
        ("claude-opus-5-5", False, True),  # nothing bound: the same cut is made
        ("claude-opus-4-6", True, True),  # no prefix check on this model
    ],
)
def test_no_cut_before_a_thinking_block_on_a_model_with_preserved_thinking(
    model: str, thinking: bool, cut: bool
) -> None:
    msgs = conversation(30, size=100)
    if not thinking:
        for m in msgs:
            if m["role"] == "assistant":
                m["content"] = [b for b in m["content"] if b["type"] != "thinking"]
    sent, notes = run({**body_of(msgs), "model": model}, {}, **TIGHT)
    assert ("cut" in notes) is cut
    if not cut:
        assert notes["stood_aside"] == "preserved_thinking" and notes["thinking_after_cut"] > 0
        assert [strip_cc(m) for m in sent["messages"][1:]] == msgs[1:]


def test_a_model_with_preserved_thinking_gets_every_call_through_the_prefix_check(tmp_path: Any) -> None:
    """The emulator binds each thinking block to the prefix it was first sent with (as the API does):
    a cut before one would answer 400. prune keeps such a history as sent, and every call is answered."""
    msgs = _unique_signatures(conversation(40, size=100))
    config = {"plugins": ["prune", "cache_align"], "record": False, "runs_dir": str(tmp_path), "prune": TIGHT}
    with Emulator(virtual_clock=True, start_time=T0) as emu:
        client = tokensaver.wrap(
            anthropic.Anthropic(base_url=emu.url, api_key="k", max_retries=0),
            config=config,
            clock=emu.clock.now,
        )
        stood = 0
        for n in range(3, len(msgs) + 1, 2):
            emu.clock.advance(10)
            body = {**body_of(msgs[:n]), "model": "claude-opus-5-5", "thinking": {"type": "adaptive"}}
            resp = client.post("/v1/messages", body=body, cast_to=object)
            assert isinstance(resp, dict) and resp["type"] == "message"
            notes = (client.tokensaver.records[-1].get("plugins") or {}).get("prune") or {}
            assert "cut" not in notes
            stood += notes.get("stood_aside") == "preserved_thinking"
    assert stood > 0  # past the budget: a cut was planned and not made


def _user_turns(parts: int, per: int, size: int) -> list[dict[str, Any]]:
    """A task in ``parts`` user turns, each ``per`` tool calls (``size``-token results) then an
    answer; every assistant turn thinks first (unique signatures)."""
    msgs: list[dict[str, Any]] = [{"role": "user", "content": "Task: fix the bug, part 0"}]
    for p in range(parts):
        for k in range(per):
            tid = f"toolu_{p:02d}_{k:02d}"
            msgs.append(
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": f"part {p} step {k}", "signature": f"sig-{p}-{k}"},
                        {"type": "tool_use", "id": tid, "name": "read", "input": {"p": p, "k": k}},
                    ],
                }
            )
            msgs.append(
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": tid, "content": words(p * 100 + k, size)}
                    ],
                }
            )
        msgs.append(
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": f"part {p} done", "signature": f"sig-{p}-end"},
                    {"type": "text", "text": f"Part {p} is done."},
                ],
            }
        )
        msgs.append({"role": "user", "content": f"Now part {p + 1}."})
    return msgs


def _signatures(body: dict[str, Any]) -> list[str]:
    return [
        str(b["signature"])
        for m in body["messages"]
        if m["role"] == "assistant"
        for b in m["content"]
        if b.get("type") == "thinking"
    ]


@pytest.mark.parametrize("cut_thinking_turns", [True, False])
def test_on_a_model_with_preserved_thinking_a_cut_at_a_new_user_turn_leaves_out_the_thinking_after_it(
    tmp_path: Any, cut_thinking_turns: bool
) -> None:
    """At a new user turn no tool loop asks for earlier thinking: a cut there leaves out every
    thinking block after its first change (a trailing run, which the prefix check allows), and they
    stay out on every later call, so the blocks the model writes from then on stay valid. The
    emulator runs the API's prefix check: every call is answered. Off: no cut before a thinking block."""
    msgs = _user_turns(6, 5, 150)
    conf = {**TIGHT, "keep_last_messages": 2, "cut_thinking_turns": cut_thinking_turns}
    config = {"plugins": ["prune"], "record": False, "runs_dir": str(tmp_path), "prune": conf}
    with Emulator(virtual_clock=True, start_time=T0) as emu:
        client = tokensaver.wrap(
            anthropic.Anthropic(base_url=emu.url, api_key="k", max_retries=0),
            config=config,
            clock=emu.clock.now,
        )
        cuts: list[tuple[int, dict[str, Any]]] = []
        left_out: set[str] = set()
        for n in range(1, len(msgs) + 1):
            if msgs[n - 1]["role"] != "user":
                continue
            emu.clock.advance(10)
            body = {**body_of(msgs[:n]), "model": "claude-opus-5-5", "thinking": {"type": "adaptive"}}
            resp = client.post("/v1/messages", body=body, cast_to=object)
            assert isinstance(resp, dict) and resp["type"] == "message", resp
            sent = emu.requests[-1].body
            notes = (client.tokensaver.records[-1].get("plugins") or {}).get("prune") or {}
            if "cut" in notes:
                cuts.append((n, notes["cut"]))
            signed = set(_signatures(sent))
            assert not (signed & left_out)  # a block left out is never put back
            left_out |= set(_signatures(body)) - signed
        summary = prune.tokensaver_report_section("prune", client.tokensaver.records)["summary"]
    if not cut_thinking_turns:
        assert not cuts and not left_out
        assert "Preserved thinking: no cut on " in summary
        return
    assert cuts and left_out
    assert f"Preserved thinking: {len(cuts)} cuts at a new user turn left out the " in summary
    for n, cut in cuts:
        assert isinstance(msgs[n - 1]["content"], str)  # each made at a new user turn
        assert cut["thinking_left_out"] > 0
    assert len(cuts) < len(msgs) // 2  # later calls go on with the cut: not a cut per call


_QUOTE_CHARS = "aZ_9./- \n→é"


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet=_QUOTE_CHARS, max_size=80) | st.text(max_size=40))
def test_quotable_words_are_those_the_word_pattern_finds_in_the_whole_text(text: str) -> None:
    """prune's quoted-word scan looks only inside runs that can hold a quotable word: the same words
    the pattern finds over the whole text (it no longer retries every place of a long plain run)."""
    whole = {w for w in prune._QUOTABLE.findall(text) if len(w) >= 5}
    assert prune._quotable(text) == whole


def test_quotable_words_of_a_long_plain_run() -> None:
    run = "a" * 900
    text = f"{run} {run}_tail see src/pkg/mod.py and camelCaseName, x{run}9"
    assert prune._quotable(text) == {f"{run}_tail", "src/pkg/mod.py", "camelCaseName", f"x{run}9"}


def test_quotable_words_leave_out_blobs_and_cost_no_retries_along_long_runs() -> None:
    """A run with a 1,000-character identifier in it is a blob (base64, a bit string), no word; a
    long run with no slash or no dot has no path or file name to find, so nothing retries along it."""
    blob = "Ab" * 600 + "/x_1"
    assert prune._quotable(f"see {blob} and src/mod_a.py") == {"src/mod_a.py"}
    assert prune._quotable("-" * 20_000 + "0 then pkg/mod.py") == {"pkg/mod.py"}
    dotted = "a." * 10_000 + "b"
    assert prune._quotable(dotted) == {w for w in prune._QUOTABLE.findall(dotted) if len(w) >= 5}
