"""prune works on the request shapes today's real agents send (seen in the e2e coding sessions).

Claude Code 2.1.33x puts a ``system`` message inside ``messages`` (after the first user turn);
OpenClaw sends a user text message of its own after each tool result message (two user messages in a
row, which the API combines). Both are requests the API accepts; prune's own check of its output
called them invalid and skipped every call, so a re-read file went out in full.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import pytest

import tokensaver
from tokensaver.emulator import Emulator

FILE = "\n".join(
    f"{n}\tdef function_{n}(value):  # line {n} of a module the agent reads twice" for n in range(1, 41)
)


def _read(tid: str) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": [{"type": "tool_use", "id": tid, "name": "Read", "input": {"file_path": "/repo/mod.py"}}],
    }


def _result(tid: str) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tid, "content": FILE}]}


def claude_code_messages() -> list[dict[str, Any]]:
    return [
        {"role": "user", "content": [{"type": "text", "text": "Read mod.py twice."}]},
        {"role": "system", "content": [{"type": "text", "text": "# Environment\nWorking directory: /repo"}]},
        _read("toolu_1"),
        _result("toolu_1"),
        _read("toolu_2"),
        _result("toolu_2"),
    ]


def openclaw_messages() -> list[dict[str, Any]]:
    context = {"role": "user", "content": [{"type": "text", "text": "<<<INTERNAL_CONTEXT>>> none"}]}
    return [
        {"role": "user", "content": [{"type": "text", "text": "Read mod.py twice."}]},
        _read("toolu_1"),
        _result("toolu_1"),
        context,
        _read("toolu_2"),
        _result("toolu_2"),
        context,
    ]


@pytest.mark.parametrize(
    "messages", [claude_code_messages(), openclaw_messages()], ids=["claude-code", "openclaw"]
)
def test_repeats_reach_real_agent_shapes(tmp_path: Any, messages: list[dict[str, Any]]) -> None:
    tools = [
        {"name": "Read", "description": "Read a file", "input_schema": {"type": "object", "properties": {}}}
    ]
    body = {"model": "claude-sonnet-4-6", "max_tokens": 256, "tools": tools, "messages": messages}
    with Emulator(strict_roles=False) as emu:
        base = anthropic.Anthropic(base_url=emu.url, api_key="k", max_retries=0, timeout=30)
        client = tokensaver.wrap(
            base, config={"plugins": ["prune"], "record": False, "runs_dir": str(tmp_path)}
        )
        resp = client.post("/v1/messages", body=body, cast_to=object)
        assert isinstance(resp, dict) and resp["type"] == "message"
        assert emu.last.status == 200
        sent = emu.last["body"]
    # the first read goes out in full, the re-read as a pointer to it (dedupe or repeats); the turns stay
    first, second = (
        b
        for m in sent["messages"]
        for b in m["content"]
        if isinstance(b, dict) and b.get("type") == "tool_result"
    )
    assert first["content"] == FILE
    text = json.dumps(second)
    assert "[tokensaver:" in text and "toolu_1" in text and "function_20" not in text
    assert [m["role"] for m in sent["messages"]] == [m["role"] for m in messages]


def test_turn_order_checks_look_past_system_messages_only() -> None:
    """A system message between a tool_use and its result is outside the turns; the checks that
    guard the API's rules still hold around it."""
    from tokensaver_plugins._blocks import request_problems

    system = {"role": "system", "content": [{"type": "text", "text": "reminder"}]}
    user = {"role": "user", "content": [{"type": "text", "text": "go"}]}
    ok = [user, _read("toolu_1"), system, _result("toolu_1"), user]
    assert request_problems({"messages": ok}) == []
    two_assistants = [user, _read("toolu_1"), {"role": "assistant", "content": "again"}, _result("toolu_1")]
    assert any("twice in a row" in p for p in request_problems({"messages": two_assistants}))
    unanswered = [user, _read("toolu_1"), system, user]
    assert any("no tool_result" in p for p in request_problems({"messages": unanswered}))
    assert request_problems({"messages": [system, _read("toolu_1")]})[0].startswith("messages[0]: first")
