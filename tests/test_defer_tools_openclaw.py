"""defer_tools' OpenClaw profile, and a deferred tool the model calls without loading it.

Through wrap() and the real SDK over HTTP to the emulator, which validates and bills each request and
runs the preserved-thinking prefix check on the models that have it.
"""

from __future__ import annotations

from typing import Any

import anthropic
import pytest
from tokensaver_plugins import defer_tools

import tokensaver
from tokensaver.emulator import Emulator

SCHEMA = {"type": "object", "properties": {"path": {"type": "string"}}}
# what OpenClaw 2026.9 sends with its Tool Search on (the default): the core coding tools, the search
# controls and its direct-only tools; its breakpoint on the last tool
OPENCLAW_EAGER = [
    "apply_patch",
    "computer",
    "edit",
    "exec",
    "ls",
    "openclaw",
    "process",
    "read",
    "sessions_yield",
    "tool_call",
    "tool_describe",
    "tool_search",
    "view_image",
    "write",
]
# with tools.toolSearch = false it sends its catalogue eagerly (a part of it here)
OPENCLAW_CATALOGUE = [
    "browser",
    "canvas",
    "cron",
    "heartbeat_respond",
    "message",
    "mobile_ui",
    "nodes",
    "secrets",
    "web_fetch",
]


def _tools(names: list[str]) -> list[dict[str, Any]]:
    tools: list[dict[str, Any]] = [
        {"name": n, "description": f"The {n} tool. " + f"{n} details. " * 40, "input_schema": SCHEMA}
        for n in names
    ]
    tools[-1] = {**tools[-1], "cache_control": {"type": "ephemeral"}}
    return tools


def _use(name: str, tid: str, **inp: Any) -> dict[str, Any]:
    return {"type": "tool_use", "id": tid, "name": name, "input": inp}


def _deferred(body: dict[str, Any]) -> set[str]:
    return {t["name"] for t in body["tools"] if t.get("defer_loading")}


def _client(emu: Emulator, tmp_path: Any) -> Any:
    base = anthropic.Anthropic(base_url=emu.url, api_key="k-openclaw", max_retries=0)
    return tokensaver.wrap(base, config={"runs_dir": str(tmp_path)})  # the defaults


def test_the_defaults_defer_openclaws_direct_only_tools_and_load_them_on_demand(
    emu: Emulator, tmp_path: Any
) -> None:
    client = _client(emu, tmp_path)
    emu.reply(
        [_use(defer_tools.LOAD_TOOL, "toolu_l1", names=["computer", "exec"])],
        [_use("computer", "toolu_c1", path="screen")],
    )
    body = {"model": "claude-sonnet-4-6", "max_tokens": 200, "tools": _tools(OPENCLAW_EAGER)}
    msg = client.messages.create(**body, messages=[{"role": "user", "content": "what is on the screen?"}])
    assert [(b.type, b.name) for b in msg.content] == [("tool_use", "computer")]
    sent = emu.requests[0].body
    assert _deferred(sent) == {"computer", "openclaw", "sessions_yield", "view_image"}
    by_name = {t["name"]: t for t in sent["tools"]}
    assert by_name["write"]["cache_control"] == {"type": "ephemeral"}  # the caller's breakpoint stays
    assert "- computer: The computer tool" in by_name[defer_tools.LOAD_TOOL]["description"]
    # the loader loads what this call deferred (not exec, which is eager)
    answer = emu.requests[1].body["messages"][-1]["content"][0]["content"]
    assert answer == [{"type": "tool_reference", "tool_name": "computer"}]


def test_with_its_catalogue_sent_eagerly_the_tools_outside_openclaws_coding_profile_are_deferred(
    emu: Emulator, tmp_path: Any
) -> None:
    client = _client(emu, tmp_path)
    emu.reply("ok", "ok")
    tools = _tools(sorted(OPENCLAW_EAGER + OPENCLAW_CATALOGUE))
    body = {"model": "claude-sonnet-4-6", "max_tokens": 200, "tools": tools}
    client.messages.create(**body, messages=[{"role": "user", "content": "hi"}])
    # message and heartbeat_respond may be a run's only way to answer: never deferred; cron and
    # web_fetch are in OpenClaw's coding profile; secrets (credentials a task may need) stays
    assert _deferred(emu.last.body) == {
        "browser",
        "canvas",
        "computer",
        "mobile_ui",
        "nodes",
        "openclaw",
        "sessions_yield",
        "view_image",
    }
    # another agent that happens to have a `computer` tool: no OpenClaw fingerprint, nothing deferred
    other = _tools(["computer", "read", "write", "bash"])
    client.messages.create(**{**body, "tools": other}, messages=[{"role": "user", "content": "hi"}])
    assert _deferred(emu.last.body) == set()


def _direct_call(emu: Emulator, client: Any, model: str) -> list[dict[str, Any]]:
    """The model calls a deferred tool straight away, thinking first, without loading it; the agent
    runs it and sends the result back. Returns the second request's messages as the API got them."""
    emu.reply(
        [{"type": "thinking", "thinking": "A screenshot will show it."}, _use("computer", "toolu_c1")],
        "It shows a terminal.",
    )
    body = {
        "model": model,
        "max_tokens": 2000,
        "tools": _tools(OPENCLAW_EAGER),
        "thinking": {"type": "adaptive"},
    }
    ask = [{"role": "user", "content": "what is on the screen?"}]
    first = client.messages.create(**body, messages=ask)
    assert [b.type for b in first.content] == ["thinking", "tool_use"] and first.content[1].name == "computer"
    history = [
        *ask,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_c1", "content": "a terminal"}],
        },
    ]
    assert client.messages.create(**body, messages=history).content[0].text == "It shows a terminal."
    assert [r.status for r in emu.requests] == [200, 200]
    return emu.requests[1].body["messages"]  # type: ignore[no-any-return]


def test_a_direct_call_of_a_deferred_tool_gets_a_loading_round_made_before_it(
    emu: Emulator, tmp_path: Any
) -> None:
    client = _client(emu, tmp_path)
    sent = _direct_call(emu, client, "claude-sonnet-4-6")  # no prefix check on this model
    assert [m["role"] for m in sent] == ["user", "assistant", "user", "assistant", "user"]
    assert sent[1]["content"][0]["name"] == defer_tools.LOAD_TOOL
    assert sent[2]["content"][0]["content"] == [{"type": "tool_reference", "tool_name": "computer"}]
    notes = client.tokensaver.records[-1]["plugins"]["defer_tools"]
    assert notes["made_loads"] == 1 and "unloaded_calls" not in notes


@pytest.mark.parametrize("model", ["claude-fable-5-2", "claude-opus-5-5"])
def test_a_direct_call_that_thinks_on_a_preserved_thinking_model_is_sent_as_written(
    emu: Emulator, tmp_path: Any, model: str
) -> None:
    # a round made before the turn would change the prefix its thinking block is bound to: the API
    # refuses the block (400) and the call breaks; the turn goes as the model wrote it instead
    client = _client(emu, tmp_path)
    sent = _direct_call(emu, client, model)
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert [b["type"] for b in sent[1]["content"]] == ["thinking", "tool_use"]
    assert _deferred(emu.requests[1].body) == {"computer", "openclaw", "sessions_yield", "view_image"}
    notes = client.tokensaver.records[-1]["plugins"]["defer_tools"]
    assert notes["made_loads"] == 0 and notes["unloaded_calls"] == 1
    assert "thinking_unbound" not in client.tokensaver.records[-1]


# -- OpenClaw's own directory of the tools its Tool Search defers --------------------------------------

DIRECTORY = (
    "## Tooling\n- read: Read files\n### Deferred Tool Schemas\nAvailable deferred-schema tools:\n"
    "- automations (core): Gateway scheduler: reminders, loops, recurring work. Never exec sleep/poll as "
    "timer. ACTIONS: status | list [includeDisabled,limit?,offset?...\n"
    "- canvas (canvas): Present, hide, or navigate the widget panel on a paired macOS node.\n"
    "- web_fetch (core): Fetch URL; extract readable markdown/text. Lightweight; no browser automation.\n"
    "\nPolicy-approved MCP and client tools may also be discoverable through search.\n"
    "- not an entry (x): after the directory. Left as it is.\n"
)
SHORT = (
    "## Tooling\n- read: Read files\n### Deferred Tool Schemas\nAvailable deferred-schema tools:\n"
    "- automations (core): Gateway scheduler: reminders, loops, recurring work\n"
    "- canvas (canvas): Present, hide, or navigate the widget panel on a paired macOS node.\n"
    "- web_fetch (core): Fetch URL; extract readable markdown/text\n"
    "\nPolicy-approved MCP and client tools may also be discoverable through search.\n"
    "- not an entry (x): after the directory. Left as it is.\n"
)
RULES = "You are a personal assistant running inside OpenClaw. " + " ".join(
    f"rule{i} holds" for i in range(900)
)


def _system(directory: str) -> list[dict[str, Any]]:
    return [
        {"type": "text", "text": RULES + "\n" + directory, "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "<!-- openclaw:attempt:DYNAMIC -->\nCurrent date: 2026-12-03"},
    ]


def test_openclaws_directory_of_its_deferred_tools_gives_each_tools_first_sentence(
    emu: Emulator, tmp_path: Any
) -> None:
    client, sent = _two_calls(emu, tmp_path, DIRECTORY)
    # the other block as it was, the caller's breakpoint kept (cache_align may add its own)
    assert [b["text"] for b in sent] == [b["text"] for b in _system(SHORT)]
    assert sent[0]["cache_control"] == {"type": "ephemeral"}
    assert client.tokensaver.records[0]["plugins"]["defer_tools"]["directory_chars"] > 0
    assert defer_tools.short_directory(SHORT) is None  # nothing left to cut


def _two_calls(emu: Emulator, tmp_path: Any, prompt: str) -> tuple[Any, list[dict[str, Any]]]:
    """Two calls of a conversation with ``prompt`` in OpenClaw's system prompt, through the defaults:
    the client and the system prompt sent, the same bytes both times (read from the cache)."""
    client = _client(emu, tmp_path)
    emu.reply("ok", "ok")
    body = {
        "model": "claude-sonnet-4-6",
        "max_tokens": 200,
        "tools": _tools(OPENCLAW_EAGER),
        "system": _system(prompt),
    }
    ask = [{"role": "user", "content": "hi"}]
    client.messages.create(**body, messages=ask)
    sent: list[dict[str, Any]] = emu.requests[0].body["system"]
    more = [*ask, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "and?"}]
    client.messages.create(**body, messages=more)
    assert emu.requests[1].body["system"] == sent
    assert emu.requests[1].usage["cache_read_input_tokens"] > 1000
    return client, sent


@pytest.mark.parametrize(
    ("settings", "tools"),
    [
        ({"directories": False}, OPENCLAW_EAGER),
        ({"profiles": False}, OPENCLAW_EAGER),
        ({}, ["read", "write", "bash", "computer"]),  # not OpenClaw's tools
    ],
)
def test_the_directory_is_sent_as_it_is_otherwise(
    emu: Emulator, tmp_path: Any, settings: dict[str, Any], tools: list[str]
) -> None:
    base = anthropic.Anthropic(base_url=emu.url, api_key="k-openclaw", max_retries=0)
    client = tokensaver.wrap(base, config={"runs_dir": str(tmp_path), "defer_tools": settings})
    emu.reply("ok")
    body = {
        "model": "claude-sonnet-4-6",
        "max_tokens": 200,
        "tools": _tools(tools),
        "system": _system(DIRECTORY),
    }
    client.messages.create(**body, messages=[{"role": "user", "content": "hi"}])
    assert [b["text"] for b in emu.last.body["system"]] == [b["text"] for b in _system(DIRECTORY)]


def test_a_string_system_prompt_and_a_text_without_the_directory() -> None:
    assert defer_tools.short_directories(RULES + "\n" + DIRECTORY) == RULES + "\n" + SHORT
    assert defer_tools.short_directories(RULES) is None
    # a heading with no entries under it is no directory
    assert defer_tools.short_directory("### Deferred Tool Schemas\nnone today.\nLater text. More.\n") is None


# -- OpenClaw's list of its skills ----------------------------------------------------------------------

SKILLS = (
    "## Skills\nScan <available_skills>. Clear match: read exact <location> with `read`; obey.\n\n"
    "<available_skills>\n"
    "  <skill>\n    <name>weather</name>\n    <description>Current weather and forecasts with web_fetch,\n"
    "      falling back to wttr.in curl.</description>\n"
    "    <location>/opt/openclaw/skills/weather/SKILL.md</location>\n  </skill>\n"
    "  <skill>\n    <name>tmux</name>\n    <description>Drive tmux sessions: send keys.</description>\n"
    "    <location>~/.openclaw/plugin-skills/tmux/SKILL.md</location>\n  </skill>\n"
    "</available_skills>\n\n## Skill Workshop\nMore rules.\n"
)
ONE_LINE = (
    "## Skills\nScan <available_skills>. Clear match: read exact <location> with `read`; obey.\n\n"
    "<available_skills>\n"
    "- weather: Current weather and forecasts with web_fetch, falling back to wttr.in curl. "
    "<location>/opt/openclaw/skills/weather/SKILL.md</location>\n"
    "- tmux: Drive tmux sessions: send keys. <location>~/.openclaw/plugin-skills/tmux/SKILL.md</location>\n"
    "</available_skills>\n\n## Skill Workshop\nMore rules.\n"
)


def test_openclaws_skills_are_sent_one_a_line_with_every_name_description_and_location(
    emu: Emulator, tmp_path: Any
) -> None:
    _, sent = _two_calls(emu, tmp_path, DIRECTORY + SKILLS)
    assert [b["text"] for b in sent] == [b["text"] for b in _system(SHORT + ONE_LINE)]


def test_a_skills_list_with_anything_else_in_it_is_left_as_it_is() -> None:
    odd = SKILLS.replace("  <skill>\n    <name>tmux", "  <note>new</note>\n  <skill>\n    <name>tmux")
    assert defer_tools.short_directory(odd) is None
    more = SKILLS.replace("</location>\n  </skill>", "</location>\n    <version>2</version>\n  </skill>", 1)
    assert defer_tools.short_directory(more) is None
    assert defer_tools.short_directory(ONE_LINE) is None  # nothing left to change
