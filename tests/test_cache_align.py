"""cache_align: each placement rule (lookback, minimum length, caller's breakpoints, TTL), stability, busts.

Unit tests call the hook with ``make_context``; integration tests go through ``tokensaver.wrap`` to the
emulator, which bills prompt caching like the API, and compare with the API's automatic caching.
"""

from __future__ import annotations

import copy
from dataclasses import fields, is_dataclass
from typing import Any

import anthropic
import pytest
from strategies import tool_loop, words
from tokensaver_plugins import cache_align
from tokensaver_plugins._blocks import prefix_slots, request_problems

import tokensaver
from tokensaver.context import make_context
from tokensaver.emulator import Emulator
from tokensaver.errors import ConfigError
from tokensaver.pricing import PriceTable
from tokensaver.state import State
from tokensaver.tokens import set_memo_enabled

MODEL = "claude-sonnet-4-6"  # min cacheable length 1024
T0 = 1_700_000_000.0


def align(
    body: dict[str, Any], states: dict[str, Any], now: float = T0, **conf: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    ctx = make_context(
        body, plugin="cache_align", settings={**cache_align.DEFAULTS, **conf}, now=now, states=states
    )
    out = cache_align.tokensaver_transform_request(body, ctx)
    assert out is not None
    assert request_problems(out) == []
    return out, ctx.notes["cache_align"]


def breakpoints(body: dict[str, Any]) -> dict[str, str]:
    return {
        s.loc: s.block["cache_control"].get("ttl", "5m")
        for s in prefix_slots(body)
        if isinstance(s.block, dict) and s.block.get("cache_control")
    }


def parallel_turn(k: int, n: int) -> list[dict[str, Any]]:
    """An assistant turn with ``n`` parallel tool calls and the user turn answering them."""
    uses = [{"type": "tool_use", "id": f"toolu_{k}_{i}", "name": "read", "input": {"i": i}} for i in range(n)]
    results = [
        {"type": "tool_result", "tool_use_id": f"toolu_{k}_{i}", "content": words(k * 100 + i, 40)}
        for i in range(n)
    ]
    return [{"role": "assistant", "content": uses}, {"role": "user", "content": results}]


TOOLS = [
    {
        "name": "read",
        "description": "read",
        "input_schema": {"type": "object", "properties": {"i": {"type": "integer"}}},
    }
]


def body_of(messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "max_tokens": 64,
        "tools": TOOLS,
        "system": words(1, 1500),
        "messages": messages,
        **extra,
    }


# -- placement rules ---------------------------------------------------------------------------


def test_places_final_previous_and_system_breakpoints() -> None:
    msgs = [{"role": "user", "content": words(2, 50)}, *parallel_turn(1, 2)]
    out, notes = align(body_of(msgs), {})
    bps = breakpoints(out)
    assert set(bps) == {"system[0]", "messages[0].content[0]", "messages[2].content[1]"}
    assert {b["why"] for b in notes["breakpoints"]} == {"tools+system", "previous", "final"}


def test_lookback_rule_breakpoint_at_previous_end_when_turn_adds_over_20_blocks() -> None:
    msgs = [{"role": "user", "content": words(2, 50)}, *parallel_turn(1, 15)]
    out, notes = align(body_of(msgs), {})
    why = {b["at"]: b["why"] for b in notes["breakpoints"]}
    assert why["messages[0].content[0]"] == "lookback"  # 30 blocks after the previous request's end
    # with few new blocks the same breakpoint is only insurance
    out2, notes2 = align(body_of([{"role": "user", "content": words(2, 50)}, *parallel_turn(1, 2)]), {})
    assert {b["at"]: b["why"] for b in notes2["breakpoints"]}["messages[0].content[0]"] == "previous"


def test_lookback_priority_when_caller_leaves_one_slot_free() -> None:
    msgs = [{"role": "user", "content": words(2, 50)}, *parallel_turn(1, 15)]
    system = [{"type": "text", "text": words(1, 500), "cache_control": {"type": "ephemeral"}}]
    tools = [
        {**TOOLS[0], "name": f"t{i}", "cache_control": {"type": "ephemeral"}}
        if i < 2
        else {**TOOLS[0], "name": f"t{i}"}
        for i in range(3)
    ]
    out, notes = align({**body_of(msgs), "system": system, "tools": tools}, {})
    assert len(breakpoints(out)) == 4
    assert [b["why"] for b in notes["breakpoints"]] == ["final"]
    # free slots: the previous request's end is 30 blocks before the final one, so it comes next
    out, notes = align({**body_of(msgs), "system": system}, {})
    assert sorted(b["why"] for b in notes["breakpoints"]) == ["final", "lookback"]


def test_minimum_cacheable_length_respected() -> None:
    short = {
        "model": MODEL,
        "max_tokens": 64,
        "system": "be brief",
        "messages": [{"role": "user", "content": "hi"}],
    }
    out, notes = align(short, {})
    assert breakpoints(out) == {}
    assert notes["breakpoints"] == []
    # a short system prompt gets no breakpoint of its own, the long final message does
    long_msg = {**short, "messages": [{"role": "user", "content": words(3, 1500)}]}
    out, notes = align(long_msg, {})
    assert list(breakpoints(out)) == ["messages[0].content[0]"]
    assert all(b["prefix_tokens"] >= 1024 for b in notes["breakpoints"])


def test_callers_breakpoints_kept_and_counted() -> None:
    msgs = [
        {
            "role": "user",
            "content": [{"type": "text", "text": words(2, 300), "cache_control": {"type": "ephemeral"}}],
        },
        *parallel_turn(1, 2),
    ]
    system = [
        {"type": "text", "text": words(1, 600), "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": words(4, 600), "cache_control": {"type": "ephemeral"}},
    ]
    out, notes = align(body_of(msgs, system=system), {})
    bps = breakpoints(out)
    assert len(bps) == 4
    assert {"system[0]", "system[1]", "messages[0].content[0]"} <= set(bps)
    assert notes["caller_breakpoints"] == 3
    # four of the caller's own: nothing added
    msgs[2] = {
        "role": "user",
        "content": [
            {**msgs[2]["content"][0]},
            {**msgs[2]["content"][1], "cache_control": {"type": "ephemeral"}},
        ],
    }
    out, notes = align(body_of(msgs, system=system), {})
    assert notes["breakpoints"] == []
    assert len(breakpoints(out)) == 4


def test_automatic_mode_counted_and_converted() -> None:
    msgs = [{"role": "user", "content": words(2, 50)}, *parallel_turn(1, 2)]
    out, notes = align(body_of(msgs, cache_control={"type": "ephemeral", "ttl": "1h"}), {})
    assert "cache_control" not in out
    assert notes["automatic_converted"] is True
    assert breakpoints(out)["messages[2].content[1]"] == "1h"  # the caller's TTL kept


def test_ttl_switches_to_1h_after_long_gaps_and_back_with_hysteresis() -> None:
    states: dict[str, Any] = {}
    msgs = [{"role": "user", "content": words(2, 3000)}]
    t = T0
    ttls = []
    for k in range(1, 12):
        gap = 900 if k in (2, 3) else 20  # two coffee breaks, then a busy agent loop
        t += gap
        msgs = [
            *msgs,
            {"role": "assistant", "content": f"answer {k}"},
            {"role": "user", "content": f"next {k}"},
        ]
        out, notes = align(body_of(msgs), states, now=t, checkpoint=False)  # the TTL alone
        ttls.append(notes["ttl"])
        assert set(breakpoints(out).values()) == {notes["ttl"]}
    assert ttls[0] == "5m"
    assert "1h" in ttls
    first_1h = ttls.index("1h")
    assert all(x == "1h" for x in ttls[first_1h : first_1h + 4])  # hysteresis: no flip back at once


def test_1h_never_after_callers_5m() -> None:
    msgs = [{"role": "user", "content": words(2, 50)}, *parallel_turn(1, 2)]
    system = [{"type": "text", "text": words(1, 1500), "cache_control": {"type": "ephemeral"}}]
    out, _ = align(body_of(msgs, system=system), {}, ttl="1h")
    assert set(breakpoints(out).values()) == {"5m"}
    system = [{"type": "text", "text": words(1, 1500), "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    out, _ = align(body_of(msgs, system=system), {}, ttl="5m")
    assert breakpoints(out)["system[0]"] == "1h"
    assert request_problems(out) == []


# -- stability ---------------------------------------------------------------------------------


def test_tools_sorted_and_schema_keys_sorted() -> None:
    a = {
        "name": "b",
        "input_schema": {"type": "object", "properties": {"y": {}, "x": {}}},
        "description": "B",
    }
    b = {"description": "A", "name": "a", "input_schema": {"properties": {"x": {}}, "type": "object"}}
    out1, _ = align(body_of([{"role": "user", "content": "hi"}], tools=[a, b]), {})
    out2, _ = align(body_of([{"role": "user", "content": "hi"}], tools=[b, a]), {})
    assert out1["tools"] == out2["tools"]
    assert [t["name"] for t in out1["tools"]] == ["a", "b"]
    assert list(out1["tools"][1]["input_schema"]["properties"]) == ["x", "y"]


def test_volatile_system_lines_moved_and_reproduced_on_later_turns() -> None:
    states: dict[str, Any] = {}
    msgs: list[dict[str, Any]] = [{"role": "user", "content": "Task: " + words(2, 50)}]
    sent = []
    for k in range(3):
        system = f"You are an agent.\nCurrent time: 2025-01-0{k + 1}T10:00:0{k}Z\n" + words(1, 1500)
        out, notes = align(body_of(msgs, system=system), states, now=T0 + 10 * k, move_volatile="always")
        assert "2025-01-0" not in str(out["system"])
        line = f"Current time: 2025-01-0{k + 1}T10:00:0{k}Z"
        assert notes["moved"]["lines"] == 1 and notes["moved"]["chars"] == len(line)  # no text in notes
        sent.append(out)
        msgs = [*msgs, {"role": "assistant", "content": f"ok {k}"}, {"role": "user", "content": f"go {k}"}]
    for prev, cur in zip(sent, sent[1:], strict=False):
        p = [cache_align.strip_cc(s.block) for s in prefix_slots(prev)]
        c = [cache_align.strip_cc(s.block) for s in prefix_slots(cur)]
        assert c[: len(p)] == p
    assert "2025-01-01" in str(sent[2]["messages"][0]) and "2025-01-03" in str(sent[2]["messages"][4])


def test_volatile_lines_move_only_once_they_change_by_default() -> None:
    states: dict[str, Any] = {}
    msgs: list[dict[str, Any]] = [{"role": "user", "content": "Task: " + words(2, 50)}]
    stamps = ["2025-01-01", "2025-01-01", "2025-01-02", "2025-01-03"]
    moved = []
    for k, stamp in enumerate(stamps):
        out, notes = align(body_of(msgs, system=f"Today is {stamp}.\n" + words(1, 1500)), states)
        moved.append("moved" in notes)
        assert (stamp in str(out["system"])) == (k < 2)
        msgs = [*msgs, {"role": "assistant", "content": f"ok {k}"}, {"role": "user", "content": f"go {k}"}]
    assert moved == [False, False, True, True]


def test_bust_diagnosis_names_block_and_char() -> None:
    states: dict[str, Any] = {}
    msgs = [
        {"role": "user", "content": words(2, 50)},
        {"role": "assistant", "content": "hello world"},
        {"role": "user", "content": "x"},
    ]
    align(body_of(msgs), states)
    edited = [msgs[0], {"role": "assistant", "content": "hello there"}, msgs[2]]
    _, notes = align(body_of(edited), states)
    assert notes["bust"]["at"] == "messages[1].content[0]"
    assert notes["bust"]["change"] == "text differs at char 6"
    assert notes["bust"]["invalidated_tokens"] > 0
    # appending is not a bust
    _, notes = align(
        body_of([*edited, {"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]), states
    )
    assert "bust" not in notes


# -- the per-conversation index: what is kept, and that a change is never missed ----------------


def _strings_held(root: Any) -> int:
    """Characters of text (and bytes) reachable from a plugin's state: containers and our objects."""
    seen: set[int] = set()
    todo = [root]
    total = 0
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, str | bytes):
            total += len(obj)
        elif isinstance(obj, dict):
            todo.extend(obj.keys())
            todo.extend(obj.values())
        elif isinstance(obj, list | tuple | set | frozenset):
            todo.extend(obj)
        elif type(obj).__module__.startswith(("tokensaver_plugins", "tokensaver.state")) and not isinstance(
            obj, State
        ):
            todo.extend(vars(obj).values() if hasattr(obj, "__dict__") else ())
            todo.extend(getattr(obj, name) for name in getattr(type(obj), "__slots__", ()))
            if is_dataclass(obj):
                todo.extend(getattr(obj, f.name) for f in fields(obj))
    return total


def test_state_keeps_no_conversations_blocks_beyond_its_byte_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per conversation, digests and counts; the previous request's blocks only within PREV_BLOCKS_BYTES."""
    monkeypatch.setattr(cache_align, "PREV_BLOCKS_BYTES", 100_000, raising=False)
    states: dict[str, Any] = {}
    for c in range(12):
        msgs: list[dict[str, Any]] = [{"role": "user", "content": f"task {c}: " + words(100 + c, 10_000)}]
        for k in range(3):
            align(body_of(msgs), states, now=T0 + 60 * k)
            msgs = [
                *msgs,
                {"role": "assistant", "content": f"ok {k}"},
                {"role": "user", "content": f"go {k}"},
            ]
    one = len(f"task 0: {words(100, 10_000)}")
    held = _strings_held(states)
    # what was kept before: every conversation's last prefix (12 x one)
    assert held < 100_000 + 3 * one, f"{held:,} characters held for 12 conversations of {one:,}"


def _replay_both_ways(bodies: list[dict[str, Any]], **conf: Any) -> list[tuple[Any, Any]]:
    """Each body aligned in turn with the conversation's index (memos on) and with every call
    computed from scratch (memos off), each in its own state: (output, notes) of both, per call."""
    out = []
    on: dict[str, Any] = {}
    off: dict[str, Any] = {}
    for k, body in enumerate(bodies):
        got = align(copy.deepcopy(body), on, now=T0 + 30 * k, **conf)
        was = set_memo_enabled(False)
        try:
            ref = align(copy.deepcopy(body), off, now=T0 + 30 * k, **conf)
        finally:
            set_memo_enabled(was)
        out.append((got, ref))
    return out


def _turns(n: int) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = [{"role": "user", "content": "Task: " + words(2, 300)}]
    for k in range(n):
        msgs += [
            {"role": "assistant", "content": [{"type": "text", "text": f"step {k}"}]},
            {"role": "user", "content": [{"type": "text", "text": words(10 + k, 200)}]},
        ]
    return msgs


def test_an_edited_old_block_is_counted_and_diagnosed_anew() -> None:
    """The caller edits (in its own copy) a block the index has seen: new counts, a bust there."""
    msgs = _turns(6)
    edited = copy.deepcopy(msgs)
    edited[3]["content"][0]["text"] += " " + words(99, 400)  # 400 more words in an old block
    same_length = copy.deepcopy(edited)
    old_text = same_length[3]["content"][0]["text"]
    same_length[3]["content"][0]["text"] = ("X" if old_text[0] != "X" else "Y") + old_text[1:]
    bodies = [body_of(msgs[:9]), body_of(msgs), body_of(edited), body_of(same_length)]
    runs = _replay_both_ways(bodies)
    for got, ref in runs:
        assert got == ref
    notes = [got[1] for got, _ in runs]
    assert notes[2]["prefix_tokens"] > notes[1]["prefix_tokens"] + 300
    assert notes[2]["bust"]["at"] == "messages[3].content[0]"
    assert notes[2]["bust"]["change"].startswith("text differs at char")
    assert notes[3]["bust"]["at"] == "messages[3].content[0]"  # the same count, other text
    assert "bust" not in notes[1]


def test_moved_caller_breakpoints_are_seen_though_the_content_is_the_same() -> None:
    """Only cache_control changes between calls: the caller's breakpoints are where they are now."""
    msgs = _turns(6)
    marked = copy.deepcopy(msgs)
    marked[5]["content"][0]["cache_control"] = {"type": "ephemeral"}
    moved = copy.deepcopy(msgs)
    moved[9]["content"][0]["cache_control"] = {"type": "ephemeral", "ttl": "1h"}
    bodies = [body_of(msgs), body_of(marked), body_of(moved), body_of(msgs)]
    runs = _replay_both_ways(bodies, ttl="5m")
    for got, ref in runs:
        assert got == ref
    outs = [got[0] for got, _ in runs]
    notes = [got[1] for got, _ in runs]
    assert [n["caller_breakpoints"] for n in notes] == [0, 1, 1, 0]
    assert outs[1]["messages"][5]["content"][0]["cache_control"] == {"type": "ephemeral"}
    assert "cache_control" not in outs[2]["messages"][5]["content"][0]
    assert breakpoints(outs[2])["messages[9].content[0]"] == "1h"
    # ours before the caller's 1h one are 1h too (align() checks the API's rules on every output)
    assert {b["ttl"] for b in notes[2]["breakpoints"] if b["at"].startswith("system")} == {"1h"}
    assert not any("bust" in n for n in notes)  # breakpoints are not content


def test_a_cut_conversation_is_counted_and_diagnosed_anew() -> None:
    """prune cuts old rounds (messages after the cut move up), then the conversation goes on."""
    msgs = _turns(8)
    cut = [msgs[0], *msgs[5:]]
    bodies = [body_of(msgs[:13]), body_of(msgs), body_of(cut), body_of([*cut, *_turns(9)[-2:]])]
    runs = _replay_both_ways(bodies)
    for got, ref in runs:
        assert got == ref
    notes = [got[1] for got, _ in runs]
    fresh = [align(copy.deepcopy(b), {})[1] for b in bodies]
    assert [n["prefix_tokens"] for n in notes] == [n["prefix_tokens"] for n in fresh]
    assert notes[2]["prefix_tokens"] < notes[1]["prefix_tokens"]
    assert notes[2]["bust"]["at"] == "messages[1].content[0]"
    assert (
        notes[2]["bust"]["kept_tokens"] == notes[1]["prefix_tokens"] - notes[2]["bust"]["invalidated_tokens"]
    )
    assert notes[2]["bust"]["invalidated_tokens"] > notes[1]["prefix_tokens"] - notes[2]["prefix_tokens"]
    assert "bust" not in notes[3]
    assert [b["prefix_tokens"] for b in notes[3]["breakpoints"]] == [
        b["prefix_tokens"] for b in fresh[3]["breakpoints"]
    ]


def test_configure_rejects_bad_values_and_fills_defaults() -> None:
    assert cache_align.tokensaver_configure({}, "t")["ttl"] == "auto"
    with pytest.raises(ConfigError, match="'auto', '5m' or '1h'"):
        cache_align.tokensaver_configure({"ttl": "2h"}, "t")
    with pytest.raises(ConfigError, match="unknown key"):
        cache_align.tokensaver_configure({"ttll": "5m"}, "t")
    with pytest.raises(ConfigError, match="regular expression"):
        cache_align.tokensaver_configure({"extra_volatile_patterns": ["("]}, "t")


def test_report_section_counts_busts_and_moves() -> None:
    calls = [
        {
            "id": "c1",
            "plugins": {
                "cache_align": {
                    "billed": {"read": 0, "write_5m": 2000, "write_1h": 0},
                    "input_usd": 0.01,
                    "uncached_usd": 0.006,
                }
            },
        },
        {
            "id": "c2",
            "plugins": {
                "cache_align": {
                    "billed": {"read": 2000, "write_5m": 100, "write_1h": 0},
                    "bust": {"at": "system[0]", "change": "text differs at char 3"},
                    "input_usd": 0.001,
                    "uncached_usd": 0.0063,
                }
            },
        },
    ]
    sec = cache_align.tokensaver_report_section("cache_align", calls)
    assert sec is not None
    assert "1 prefix busts" in sec["summary"] and "2,000" in sec["summary"]
    assert sec["rows"][0]["bust_at"] == "system[0]"
    assert cache_align.tokensaver_report_section("prune", calls) is None


# -- through wrap() against the emulator --------------------------------------------------------


def converse(
    client: Any, emu: Emulator, turns: list[list[dict[str, Any]]], gaps: list[float], **extra: Any
) -> list[dict[str, Any]]:
    """Send a growing conversation; return the billed usage of every call."""
    msgs: list[dict[str, Any]] = [{"role": "user", "content": "Task: " + words(2, 100)}]
    usages = []
    for turn, gap in zip([[], *turns], gaps, strict=True):
        msgs = [*msgs, *turn]
        emu.clock.advance(gap)
        resp = client.post("/v1/messages", body=body_of(msgs, **extra), cast_to=object)
        usages.append(resp["usage"])
    return usages


@pytest.fixture
def emu(emulator: Emulator) -> Emulator:
    """The shared emulator fixture, its clock at T0."""
    emulator.clock.set(T0)
    return emulator


def wrapped(emu: Emulator, tmp_path: Any) -> Any:
    base = anthropic.Anthropic(base_url=emu.url, api_key="k", max_retries=0)
    return tokensaver.wrap(
        base,
        config={"plugins": ["cache_align"], "record": False, "runs_dir": str(tmp_path)},
        clock=emu.clock.now,
    )


def test_emulator_parallel_tool_turn_reads_previous_prefix_where_automatic_mode_misses(
    emu: Emulator, tmp_path: Any
) -> None:
    turns = [parallel_turn(1, 15), parallel_turn(2, 15)]
    ours = converse(wrapped(emu, tmp_path), emu, turns, [1, 5, 5])
    emu.reset()
    plain = anthropic.Anthropic(base_url=emu.url, api_key="k", max_retries=0)
    auto = converse(plain, emu, turns, [1, 5, 5], cache_control={"type": "ephemeral"})
    # automatic mode: the 30 new blocks put the last write out of the 20-block lookback
    assert auto[2]["cache_read_input_tokens"] < ours[2]["cache_read_input_tokens"]
    assert (
        ours[2]["cache_read_input_tokens"]
        >= ours[1]["cache_read_input_tokens"] + ours[1]["cache_creation_input_tokens"]
    )
    assert emu.requests and request_problems(emu.requests[-1]["body"]) == []


def test_emulator_1h_ttl_survives_coffee_breaks(emu: Emulator, tmp_path: Any) -> None:
    turns = [
        [{"role": "assistant", "content": f"a{k}"}, {"role": "user", "content": words(10 + k, 200)}]
        for k in range(8)
    ]
    gaps = [1, 20, 600, 20, 600, 20, 600, 20, 600]
    ours = converse(wrapped(emu, tmp_path), emu, turns, gaps)
    emu.reset()
    plain = anthropic.Anthropic(base_url=emu.url, api_key="k", max_retries=0)
    auto = converse(plain, emu, turns, gaps, cache_control={"type": "ephemeral"})
    # after the first coffee break, the 1h entries let the later breaks read instead of re-writing
    assert ours[6]["cache_read_input_tokens"] > 0
    assert auto[6]["cache_read_input_tokens"] == 0
    m = PriceTable().get(MODEL)
    assert sum(m.input_cost(u) for u in ours) < sum(m.input_cost(u) for u in auto)


def checkpoint_client(emu: Emulator, tmp_path: Any, on: bool) -> Any:
    """A client with cache_align alone, its checkpoint on or off, on the emulator made cold again
    (its clock at T0)."""
    emu.reset()
    emu.clock.set(T0)
    base = anthropic.Anthropic(base_url=emu.url, api_key="k", max_retries=0)
    config = {"plugins": ["cache_align"], "record": False, "runs_dir": str(tmp_path)}
    return tokensaver.wrap(base, config={**config, "cache_align": {"checkpoint": on}}, clock=emu.clock.now)


def read_share(usage: dict[str, Any]) -> float:
    """The share of a call's cached prefix read, not written."""
    read = usage["cache_read_input_tokens"]
    return float(read / (read + usage["cache_creation_input_tokens"]))


def input_usd(usages: list[dict[str, Any]]) -> float:
    m = PriceTable().get(MODEL)
    return sum(m.input_cost(u) for u in usages)


def paused_session(
    emu: Emulator, client: Any, first: dict[str, Any], gaps: list[float], **extra: Any
) -> list[dict[str, Any]]:
    """``first``, then a read per gap after the first (each a "step k" text and the call), the last
    message's last block marked 5m as Claude Code and OpenClaw mark it; the billed usage of each call."""
    steps = [("read", {"i": k}, words(20 + k, 600)) for k in range(len(gaps) - 1)]
    msgs = [first, *tool_loop("", steps, narrate=True)[1:]]
    usages = []
    for k, gap in enumerate(gaps):
        sent = copy.deepcopy(msgs[: 1 + 2 * k])
        sent[-1]["content"][-1]["cache_control"] = {"type": "ephemeral"}
        emu.clock.advance(gap)
        resp = client.post("/v1/messages", body=body_of(sent, **extra), cast_to=object)
        usages.append(resp["usage"])
    return usages


def test_emulator_a_1h_checkpoint_keeps_the_prefix_through_a_pause_at_the_5m_price(
    emu: Emulator, tmp_path: Any
) -> None:
    """Once a conversation has paused 5-60 minutes, each call puts a 1h breakpoint on the first new
    block after the previous request (the reply it got): only that block is written at the 1h
    price, and the entry holds the whole prefix, so the next pause reads it instead of writing it
    all again. Off (``checkpoint = false``) the pause moves the whole conversation to 1h, which pays
    the 1h price on everything written after it: dearer."""
    steps = [("read", {"i": k}, words(10 + k, 600)) for k in range(9)]
    msgs = tool_loop("", steps, narrate=True)
    turns = [msgs[1 + 2 * k : 3 + 2 * k] for k in range(9)]
    gaps = [1, 20, 20, 900, 20, 20, 20, 20, 900, 20]  # a first pause, a busy loop, a second pause
    runs = {}
    for on in (True, False):
        client = checkpoint_client(emu, tmp_path, on)
        runs[on] = converse(client, emu, turns, gaps, tools=TOOLS)
        section = cache_align.tokensaver_report_section("cache_align", client.tokensaver.records)
        assert ("1h checkpoints on " in section["summary"]) is on
        for r in emu.requests:
            assert r.status == 200 and request_problems(r.body) == []  # 1h before 5m, at most 4
        ttls = [breakpoints(r.body) for r in emu.requests]
        if on:
            assert any(set(t.values()) == {"1h", "5m"} for t in ttls[4:])  # checkpoints after the pause
        else:
            assert any(set(t.values()) == {"1h"} for t in ttls[4:])  # the whole conversation on 1h
    on, off = runs[True], runs[False]
    after = gaps.index(900, 4)  # the call after the second pause
    assert on[after]["cache_read_input_tokens"] > 0.8 * sum(
        on[after][k] for k in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
    )
    assert input_usd(on) < input_usd(off)


def test_emulator_checkpoints_with_claude_codes_own_breakpoints(emu: Emulator, tmp_path: Any) -> None:
    """Claude Code marks two of its three system blocks and its last message, all 5m. On a slow
    conversation (a pause of a minute or more seen) the checkpoint goes between them: the caller's
    system breakpoints go on 1h (read from the cache, they write nothing), its last-message one
    stays 5m, every request is valid, and a 15-minute pause later reads the prefix."""
    system = [
        {"type": "text", "text": "x-anthropic-billing-header: cc_version=2"},
        {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": words(1, 1500), "cache_control": {"type": "ephemeral"}},
    ]
    first = {"role": "user", "content": [{"type": "text", "text": "Task: " + words(2, 100)}]}
    gaps = [1, 90, 20, 20, 900, 20, 20, 20]
    usages: dict[bool, list[dict[str, Any]]] = {}
    for on in (True, False):
        client = checkpoint_client(emu, tmp_path, on)
        usages[on] = paused_session(emu, client, first, gaps, system=system, tools=TOOLS)
        for r in emu.requests:
            assert r.status == 200 and request_problems(r.body) == []
        if on:
            late = emu.requests[-1].body
            assert [b.get("cache_control", {}).get("ttl") for b in late["system"][1:]] == ["1h", "1h"]
            assert breakpoints(late)[f"messages[{len(late['messages']) - 1}].content[0]"] == "5m"
            assert "1h" in [t for loc, t in breakpoints(late).items() if loc.startswith("messages")]
    after = gaps.index(900)
    assert read_share(usages[True][after]) > 0.6
    assert read_share(usages[False][after]) < 0.2
    assert input_usd(usages[True]) < input_usd(usages[False])


def test_emulator_checkpoints_with_openclaws_four_breakpoints(emu: Emulator, tmp_path: Any) -> None:
    """OpenClaw marks its last tool, its stable system block right after it, its first message and
    its last: no slot left. The tool's breakpoint is the system block's twin (the same prefix but
    one block, which the later one's lookback reaches), so a checkpoint takes its slot; every request
    is valid and a 15-minute pause later reads the prefix."""
    tools = [{**t, "cache_control": {"type": "ephemeral"}} for t in TOOLS]
    system = [
        {"type": "text", "text": words(1, 1500), "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "Current date: 2026-12-02"},
    ]
    first = {
        "role": "user",
        "content": [
            {"type": "text", "text": "Task: " + words(2, 100), "cache_control": {"type": "ephemeral"}}
        ],
    }
    gaps = [1, 90, 20, 20, 900, 20, 20]
    usages: dict[bool, list[dict[str, Any]]] = {}
    for on in (True, False):
        client = checkpoint_client(emu, tmp_path, on)
        usages[on] = paused_session(emu, client, first, gaps, system=system, tools=tools)
        for r in emu.requests:
            assert r.status == 200 and request_problems(r.body) == []
        late = emu.requests[-1].body
        if on:
            assert "cache_control" not in late["tools"][-1]  # its slot went to the checkpoint
            assert late["system"][0]["cache_control"].get("ttl") == "1h"
            assert late["messages"][0]["content"][0]["cache_control"].get("ttl") == "1h"
            assert late["messages"][-1]["content"][-1]["cache_control"].get("ttl", "5m") == "5m"
        else:
            assert "cache_control" in late["tools"][-1]
    after = gaps.index(900)
    assert read_share(usages[True][after]) > 0.6
    assert read_share(usages[False][after]) < 0.2
    assert input_usd(usages[True]) < input_usd(usages[False])


def test_a_borrowed_slot_the_checkpoint_does_not_get_is_given_back() -> None:
    """With the caller's four breakpoints, a turn of 15 parallel tool calls makes the lookback
    breakpoint come first: the slot borrowed for the checkpoint goes back to the caller's breakpoint
    (never five)."""
    tools = [{**t, "cache_control": {"type": "ephemeral"}} for t in TOOLS]
    system = [{"type": "text", "text": words(1, 1500), "cache_control": {"type": "ephemeral"}}]
    first = {
        "role": "user",
        "content": [{"type": "text", "text": words(2, 100), "cache_control": {"type": "ephemeral"}}],
    }
    msgs: list[dict[str, Any]] = [first]
    states: dict[str, Any] = {}
    t = T0
    for k, gap in enumerate([1, 90, 20]):
        msgs = [*msgs, *parallel_turn(k, 15 if k == 2 else 1)]
        sent = copy.deepcopy(msgs)
        sent[-1]["content"][-1]["cache_control"] = {"type": "ephemeral"}
        t += gap
        out, notes = align(body_of(sent, system=system, tools=tools), states, now=t)  # valid: <= 4
        assert len(breakpoints(out)) <= 4
    assert "checkpoint" not in notes and "cache_control" in out["tools"][-1]


def zod_tool(name: str, dialect: str, **extra: Any) -> dict[str, Any]:
    """A tool as zod-to-json-schema writes it (Claude Code's): the dialect URI in its input schema."""
    return {
        "name": name,
        "description": f"{name}: " + words(len(name), 30),
        "input_schema": {
            "$schema": dialect,
            "type": "object",
            "properties": {"path": {"type": "string"}, "limit": {"type": "integer", "exclusiveMinimum": 0}},
            "required": ["path"],
            "additionalProperties": False,
        },
        **extra,
    }


DRAFT_07 = "http://json-schema.org/draft-07/schema#"
DRAFT_2020 = "https://json-schema.org/draft/2020-12/schema"
DRAFT_04 = "http://json-schema.org/draft-04/schema#"


def test_the_schema_dialect_uri_is_dropped_where_it_reads_as_the_default_one() -> None:
    tools = [
        zod_tool("Read", DRAFT_2020),
        zod_tool("Bash", DRAFT_07),
        zod_tool("Old", DRAFT_04),  # its exclusiveMinimum would be a boolean: the URI says so
        zod_tool("Strict", DRAFT_07, strict=True),  # the API compiles a strict tool's schema
    ]
    body = body_of([{"role": "user", "content": "hi"}], tools=copy.deepcopy(tools))
    out, notes = align(body, {})
    schemas = {t["name"]: t["input_schema"] for t in out["tools"]}
    assert "$schema" not in schemas["Read"] and "$schema" not in schemas["Bash"]
    assert schemas["Old"]["$schema"] == DRAFT_04 and schemas["Strict"]["$schema"] == DRAFT_07
    assert notes["schema_dialects_dropped"] == 2
    # everything else as the caller wrote it, and the same bytes on the next call
    for t in tools:
        rest = {k: v for k, v in t["input_schema"].items() if k != "$schema"}
        assert {k: v for k, v in schemas[t["name"]].items() if k != "$schema"} == rest
    again, _ = align(copy.deepcopy(body), {})
    assert again["tools"] == out["tools"]
    assert body["tools"] == tools  # the caller's request is not edited in place


def test_emulator_bills_fewer_tokens_without_the_dialect_uris(emu: Emulator, tmp_path: Any) -> None:
    tools = [zod_tool(n, DRAFT_07) for n in ("Bash", "Edit", "Glob", "Grep", "Read", "Write")]
    msgs = [{"role": "user", "content": "Task: " + words(2, 100)}]
    body = body_of(msgs, tools=tools)
    ours = wrapped(emu, tmp_path).post("/v1/messages", body=copy.deepcopy(body), cast_to=object)
    sent = emu.requests[-1].body
    assert all("$schema" not in t["input_schema"] for t in sent["tools"])
    emu.reset()
    plain = anthropic.Anthropic(base_url=emu.url, api_key="k", max_retries=0)
    theirs = plain.post("/v1/messages", body=body, cast_to=object)

    def billed(u: dict[str, Any]) -> int:
        return int(u["input_tokens"] + u["cache_creation_input_tokens"] + u["cache_read_input_tokens"])

    # the URI costs tokens on every call of the conversation (written once, then read)
    assert billed(ours["usage"]) < billed(theirs["usage"]) - 6 * 10
