"""defer_tools: rarely used tools deferred, loaded by a round tokensaver answers, that round put back later.

Through wrap() and the real SDK over HTTP to the emulator, which validates each request (a deferred
tool is loaded by a ``tool_reference`` before a turn calls it) and bills it.
"""

from __future__ import annotations

import contextlib
from typing import Any

import anthropic
import pytest
from tokensaver_plugins import defer_tools

import tokensaver
from tokensaver.emulator import Emulator
from tokensaver.proxy import ProxyServer
from tokensaver.report import summarize

MODEL = "claude-sonnet-4-6"
SCHEMA = {"type": "object", "properties": {"path": {"type": "string"}}}
TOOLS = [
    {"name": "read_file", "description": "Read a file. Returns its text.", "input_schema": SCHEMA},
    {
        "name": "deploy",
        "description": "Deploy the service to production. Use only when asked to ship. " + "Details. " * 300,
        "input_schema": {"type": "object", "properties": {"target": {"type": "string"}}},
    },
    {
        "name": "rollback",
        "description": "Roll the last deploy back. " + "More details. " * 200,
        "input_schema": {"type": "object", "properties": {}},
    },
]


def _use(name: str, tid: str, **inp: Any) -> dict[str, Any]:
    return {"type": "tool_use", "id": tid, "name": name, "input": inp}


def _client(
    emu: Emulator, tmp_path: Any, plugins: tuple[str, ...] = ("defer_tools",), **settings: Any
) -> Any:
    base = anthropic.Anthropic(base_url=emu.url, api_key="k-defer", max_retries=0)
    config = {
        "plugins": list(plugins),
        "runs_dir": str(tmp_path),
        "defer_tools": {"tools": ["deploy", "rollback"], **settings},
    }
    return tokensaver.wrap(base, config=config)


def _first(messages: list[dict[str, Any]]) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 200, "tools": TOOLS, "messages": messages}


def _config(tmp_path: Any) -> dict[str, Any]:
    return {
        "plugins": ["defer_tools"],
        "runs_dir": str(tmp_path),
        "defer_tools": {"tools": ["deploy", "rollback"]},
    }


def _ask(client: Any, body: dict[str, Any], stream: bool) -> Any:
    if not stream:
        return client.messages.create(**body)
    with client.messages.stream(**body) as s:
        return s.get_final_message()


@pytest.mark.parametrize("door", ["wrap", "stream", "proxy"])
def test_deferred_tools_load_through_a_hidden_round_put_back_on_the_next_call(
    emu: Emulator, tmp_path: Any, door: str
) -> None:
    with contextlib.ExitStack() as stack:
        if door == "proxy":
            proxy = stack.enter_context(ProxyServer(_config(tmp_path), upstream=emu.url, run="defer"))
            client = anthropic.Anthropic(base_url=proxy.url, api_key="k-defer", max_retries=0)
            records = proxy.records
        else:
            client = _client(emu, tmp_path)
            records = lambda: list(client.tokensaver.records)  # noqa: E731
        _round_trip(emu, client, records, door == "stream")


def _round_trip(emu: Emulator, client: Any, records: Any, stream: bool) -> None:
    ask = [{"role": "user", "content": "ship it to prod"}]
    emu.reply(
        [_use(defer_tools.LOAD_TOOL, "toolu_l1", names=["deploy"])],
        [_use("deploy", "toolu_d1", target="prod")],
    )
    msg = _ask(client, _first(ask), stream)
    # the caller sees only its own tool
    assert [(b.type, b.name) for b in msg.content] == [("tool_use", "deploy")]
    sent = emu.requests[0].body
    flags = {t["name"]: t.get("defer_loading") for t in sent["tools"]}
    assert flags == {"read_file": None, "deploy": True, "rollback": True, defer_tools.LOAD_TOOL: None}
    assert "- deploy: Deploy the service to production" in sent["tools"][-1]["description"]
    follow = emu.requests[1].body["messages"]
    assert follow[-1]["content"][0]["content"] == [{"type": "tool_reference", "tool_name": "deploy"}]
    # the next call: the caller's history holds its answer; the round goes back before it, as sent
    history = [
        *ask,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in msg.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_d1", "content": "deployed"}],
        },
    ]
    emu.reply("Shipped.")
    assert _ask(client, _first(history), stream).content[0].text == "Shipped."
    third = emu.requests[2].body["messages"]
    assert third[: len(follow)] == follow  # the same bytes up to the loading round's answer
    assert third[len(follow)]["content"][0]["id"] == "toolu_d1" and len(third) == len(follow) + 2
    notes = [r["plugins"]["defer_tools"] for r in records()]
    assert any(n.get("loads") == 1 for n in notes) and all(not n.get("made_loads") for n in notes)


def test_a_turn_without_a_kept_round_gets_one_made(emu: Emulator, tmp_path: Any) -> None:
    """A transcript replayed (or a restart): a turn calls a deferred tool no round is known for."""
    history = [
        {"role": "user", "content": "roll back"},
        {"role": "assistant", "content": [_use("rollback", "toolu_r1")]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_r1", "content": "done"}]},
    ]
    emu.reply("Rolled back.", "Still rolled back.")
    client = _client(emu, tmp_path)
    client.messages.create(**_first(history))
    sent = emu.requests[0].body["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user", "assistant", "user"]
    made = sent[1]["content"][0]
    assert made["name"] == defer_tools.LOAD_TOOL and made["id"].startswith(defer_tools.MADE_ID)
    assert sent[2]["content"][0]["content"] == [{"type": "tool_reference", "tool_name": "rollback"}]
    assert client.tokensaver.records[0]["plugins"]["defer_tools"]["made_loads"] == 1
    # the same turn on the next call: the same round (the same bytes), not priced again
    longer = [
        *history,
        {"role": "assistant", "content": [{"type": "text", "text": "Rolled back."}]},
        {"role": "user", "content": "and now?"},
    ]
    client.messages.create(**_first(longer))
    assert emu.requests[1].body["messages"][:5] == sent
    assert client.tokensaver.records[1]["plugins"]["defer_tools"]["made_loads"] == 0


@pytest.mark.parametrize(
    ("model", "tools", "why"),
    [
        ("claude-opus-4-1", TOOLS, "model"),  # no tool search before Claude 4.5
        (MODEL, TOOLS[:1], "few_tools"),
    ],
)
def test_stands_aside(
    emu: Emulator, tmp_path: Any, model: str, tools: list[dict[str, Any]], why: str
) -> None:
    emu.reply("ok")
    client = _client(emu, tmp_path)
    client.messages.create(
        model=model, max_tokens=50, tools=tools, messages=[{"role": "user", "content": "hi"}]
    )
    assert emu.requests[0].body["tools"] == tools
    assert client.tokensaver.records[0]["plugins"]["defer_tools"]["stood_aside"] == why


def test_never_defers_a_tool_the_caller_caches_or_forces() -> None:
    body = {"tool_choice": {"type": "tool", "name": "deploy"}}
    cached = {**TOOLS[2], "cache_control": {"type": "ephemeral"}}
    assert not defer_tools.deferrable(TOOLS[1], body)
    assert not defer_tools.deferrable(cached, {})
    assert not defer_tools.deferrable({"type": "web_search_20250305", "name": "web_search"}, {})
    assert defer_tools.deferrable(TOOLS[2], body)


def test_unknown_names_get_a_plain_answer(emu: Emulator, tmp_path: Any) -> None:
    emu.reply([_use(defer_tools.LOAD_TOOL, "toolu_l1", names=["format_disk"])], "I cannot do that.")
    client = _client(emu, tmp_path)
    msg = client.messages.create(**_first([{"role": "user", "content": "wipe it"}]))
    assert msg.content[0].text == "I cannot do that."
    answer = emu.requests[1].body["messages"][-1]["content"][0]["content"]
    assert isinstance(answer, str) and "format_disk" in answer


def test_settings_are_checked() -> None:
    with pytest.raises(tokensaver.ConfigError, match="min_tools"):
        defer_tools.tokensaver_configure({"min_tools": 0}, "t")


def test_cache_align_never_marks_a_deferred_tool(emu: Emulator, tmp_path: Any) -> None:
    """cache_align sorts tools by name and marks the static prefix: a deferred tool (here the last by
    name) cannot take the breakpoint (the API refuses one there)."""
    tools = [*TOOLS, {**TOOLS[2], "name": "zz_rarely"}]
    client = _client(emu, tmp_path, ("defer_tools", "cache_align"), tools=["deploy", "zz_rarely"])
    emu.reply("ok")
    big = "Please look at this. " * 800
    client.messages.create(
        model=MODEL, max_tokens=50, tools=tools, messages=[{"role": "user", "content": big}]
    )
    sent = emu.requests[0].body["tools"]
    assert [t["name"] for t in sent][-1] == "zz_rarely" and sent[-1].get("defer_loading") is True
    assert not any("cache_control" in t for t in sent if t.get("defer_loading"))


def test_the_docs_configs_are_valid_and_name_tools_the_agents_send() -> None:
    import json
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    tau = sorted((root / "fixtures" / "tau-bench").glob("*.json"))[0]
    segments = json.loads(tau.read_text())["segments"]
    offered = {t["name"] for seg in segments for t in seg["request"].get("tools") or []}
    for path in sorted((root / "docs" / "defer").glob("*.toml")):
        table = tomllib.loads(path.read_text())
        assert table["plugins"][-1] == "cache_align" and "defer_tools" in table["plugins"], path
        settings = defer_tools.tokensaver_configure(table["defer_tools"], str(path))
        assert settings["tools"], path
        if "tau-bench" in path.name:
            assert set(settings["tools"]) <= offered


def test_the_callers_tool_breakpoint_never_lands_on_a_deferred_tool(emu: Emulator, tmp_path: Any) -> None:
    """OpenClaw marks its last tool: cache_align keeps a caller's tool breakpoints at their places in
    name order, where a deferred tool may now sit; the breakpoint goes to the eager tool before it."""
    tools = [
        *TOOLS,
        {**TOOLS[2], "name": "yy_view"},
        {**TOOLS[0], "name": "zz_write", "cache_control": {"type": "ephemeral"}},
    ]
    client = _client(emu, tmp_path, ("defer_tools", "cache_align"), tools=["deploy", "yy_view"])
    emu.reply("ok")
    client.messages.create(
        model=MODEL, max_tokens=50, tools=tools, messages=[{"role": "user", "content": "hi"}]
    )
    assert emu.requests[0].status == 200
    sent = emu.requests[0].body["tools"]
    marked = [t["name"] for t in sent if "cache_control" in t]
    assert defer_tools.LOAD_TOOL in marked  # the eager tool just before the deferred yy_view
    assert not any(t.get("defer_loading") for t in sent if "cache_control" in t)


# -- the token figures follow the billing rule: a deferred tool is no part of the prompt -----------------


def _count(emu: Emulator, body: dict[str, Any]) -> int:
    """input_tokens of the emulator's count_tokens for ``body`` (what its usage bills)."""
    plain = anthropic.Anthropic(base_url=emu.url, api_key="k-count", max_retries=0)
    params = {k: v for k, v in body.items() if k not in ("max_tokens", "stream")}
    return int(plain.messages.count_tokens(**params).input_tokens)


def _billed(usage: dict[str, Any]) -> int:
    return int(
        usage["input_tokens"] + usage["cache_creation_input_tokens"] + usage["cache_read_input_tokens"]
    )


def test_the_token_figures_leave_the_deferred_tools_out(emu: Emulator, tmp_path: Any) -> None:
    """tokens_sent is what the sent request bills (its deferred tools not in it), below tokens_original by
    about the deferred tools' tokens; the report's defer_tools stage saved them; and a call whose round
    loads a tool (a tool_reference) counts that tool's definition where the reference sits."""
    client = _client(emu, tmp_path)
    ask = [{"role": "user", "content": "ship it to prod"}]
    emu.reply("Not now.")
    client.messages.create(**_first(ask))
    record = client.tokensaver.records[0]
    sent = emu.requests[0]
    assert any(t.get("defer_loading") for t in sent.body["tools"])
    assert record["tokens_original"] == _count(emu, _first(ask))
    assert record["tokens_sent"] == _count(emu, sent.body) == _billed(sent.usage or {})
    deferred = _count(emu, _first(ask)) - _count(emu, {**_first(ask), "tools": TOOLS[:1]})
    assert deferred > 1000
    load_tool = _count(emu, sent.body) - _count(emu, {**sent.body, "tools": TOOLS[:1]})
    assert record["tokens_original"] - record["tokens_sent"] == deferred - load_tool
    assert record["tokens_original"] - record["tokens_sent"] > 0.8 * deferred
    stage = next(s for s in record["stages"] if s["plugin"] == "defer_tools")
    assert stage["before"] - stage["after"] == deferred - load_tool
    totals = summarize(client.tokensaver.records)
    row = next(s for s in totals["stages"] if s["plugin"] == "defer_tools")
    assert row["saved_tokens"] > 0.8 * deferred
    assert totals["totals"]["tokens_saved"] > 0.8 * deferred

    # a call whose history the loading round goes back into: deploy's definition is billed at its reference
    emu.reply([_use(defer_tools.LOAD_TOOL, "toolu_l1", names=["deploy"])], [_use("deploy", "toolu_d1")])
    msg = client.messages.create(**_first(ask))
    history = [
        *ask,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in msg.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_d1", "content": "ok"}]},
    ]
    emu.reply("Shipped.")
    client.messages.create(**_first(history))
    last, record = emu.requests[-1], client.tokensaver.records[-1]
    refs = [b for m in last.body["messages"] for b in m["content"] if isinstance(b, dict)]
    assert any(b.get("content") == [{"type": "tool_reference", "tool_name": "deploy"}] for b in refs)
    assert record["tokens_original"] == _count(emu, _first(history))
    assert record["tokens_sent"] == _count(emu, last.body) == _billed(last.usage or {})


def test_a_round_that_loaded_nothing_new_goes_back_too(emu: Emulator, tmp_path: Any) -> None:
    """The model loads a tool it already has: that round was sent, so it is put back as sent."""
    client = _client(emu, tmp_path)
    first = [
        {"role": "user", "content": "roll back"},
        {"role": "assistant", "content": [_use("rollback", "toolu_r1")]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_r1", "content": "done"}]},
    ]
    emu.reply([_use(defer_tools.LOAD_TOOL, "toolu_l2", names=["rollback"])], [_use("rollback", "toolu_r2")])
    msg = client.messages.create(**_first(first))
    follow = emu.requests[1].body["messages"]
    history = [
        *first,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in msg.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_r2", "content": "done"}]},
    ]
    emu.reply("Done twice.")
    client.messages.create(**_first(history))
    assert emu.requests[2].body["messages"][: len(follow)] == follow


def test_auto_defers_what_the_earlier_conversations_never_called(emu: Emulator, tmp_path: Any) -> None:
    """auto: rates learned from this key's conversations as they come; a conversation keeps the set
    decided at its first call."""
    client = _client(emu, tmp_path, tools=[], auto=True, min_conversations=3, max_use_rate=0.0, keep_top=1)

    def flags() -> dict[str, Any]:
        return {t["name"]: t.get("defer_loading") for t in emu.requests[-1].body["tools"]}

    for k in range(3):
        emu.reply([_use("read_file", f"toolu_f{k}", path="a.py")])
        client.messages.create(**_first([{"role": "user", "content": f"task {k}: read a.py"}]))
        assert all(v is None for v in flags().values())  # nothing learned enough yet
    emu.reply("Done.")
    client.messages.create(**_first([{"role": "user", "content": "task 3: what is in a.py?"}]))
    assert flags() == {"read_file": None, "deploy": True, "rollback": True, defer_tools.LOAD_TOOL: None}
    # conversation 0, decided before anything was learned, stays as it was on its next call
    emu.reply("It prints hello.")
    again = [
        {"role": "user", "content": "task 0: read a.py"},
        {"role": "assistant", "content": [_use("read_file", "toolu_f0", path="a.py")]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_f0", "content": "print(1)"}],
        },
    ]
    client.messages.create(**_first(again))
    assert all(v is None for v in flags().values())


def _cc_tools() -> list[dict[str, Any]]:
    """Claude Code's eager tools as 2.1.3xx sends them (short descriptions; the shapes are its own)."""
    names = ["Agent", "Bash", "Edit", "Glob", "Grep", "ListAgents", "Read", "ReportFindings"]
    names += ["ScheduleWakeup", "Skill", "ToolSearch", "Workflow", "Write"]
    tools: list[dict[str, Any]] = [
        {"name": n, "description": f"The {n} tool. " + "Usage notes. " * 40, "input_schema": SCHEMA}
        for n in names
    ]
    tools.append(
        {
            "name": "DeferredToolPlaceholder",
            "description": "placeholder",
            "input_schema": SCHEMA,
            "defer_loading": True,
        }
    )
    return tools


def test_the_defaults_defer_what_claude_code_seldom_calls_and_load_it_on_demand(
    emu: Emulator, tmp_path: Any
) -> None:
    # default config (no defer_tools table): Claude Code's own tool set gets its four seldom called
    # tools deferred; the loader loads what this call deferred and nothing else
    base = anthropic.Anthropic(base_url=emu.url, api_key="k-defer", max_retries=0)
    client = tokensaver.wrap(base, config={"runs_dir": str(tmp_path)})
    emu.reply(
        [_use(defer_tools.LOAD_TOOL, "toolu_l1", names=["Workflow", "Bash", "deploy"])],
        [_use("Workflow", "toolu_w1", path="ci.yml")],
    )
    body = {"model": "claude-opus-4-6", "max_tokens": 200, "tools": _cc_tools()}
    msg = client.messages.create(**body, messages=[{"role": "user", "content": "run the release workflow"}])
    assert [(b.type, b.name) for b in msg.content] == [("tool_use", "Workflow")]
    flags = {t["name"]: t.get("defer_loading") for t in emu.requests[0].body["tools"]}
    deferred = {n for n, f in flags.items() if f}
    assert deferred == {
        "ListAgents",
        "ReportFindings",
        "ScheduleWakeup",
        "Workflow",
        "DeferredToolPlaceholder",
    }
    assert defer_tools.LOAD_TOOL in flags
    answer = emu.requests[1].body["messages"][-1]["content"][0]["content"]
    assert answer == [{"type": "tool_reference", "tool_name": "Workflow"}]
    # another agent's tools (no Claude Code fingerprint), and Claude Code's with profiles off: as sent
    emu.reply("ok")
    other = [t for t in _cc_tools() if t["name"] not in ("Agent", "ToolSearch")]
    client.messages.create(**{**body, "tools": other}, messages=[{"role": "user", "content": "hi"}])
    assert _deferred(emu.last.body) == {"DeferredToolPlaceholder"}
    off = tokensaver.wrap(base, config={"runs_dir": str(tmp_path), "defer_tools": {"profiles": False}})
    emu.reply("ok")
    off.messages.create(**body, messages=[{"role": "user", "content": "hi"}])
    assert _deferred(emu.last.body) == {"DeferredToolPlaceholder"}


def _deferred(body: dict[str, Any]) -> set[str]:
    """The deferred tools a request sends; none of tokensaver's loader in it."""
    names = [t["name"] for t in body["tools"]]
    assert defer_tools.LOAD_TOOL not in names
    return {t["name"] for t in body["tools"] if t.get("defer_loading")}
