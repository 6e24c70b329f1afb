"""Emulator HTTP behaviour through the real SDK: replies, streaming (sync/async), logs, Claude Code traffic."""

from __future__ import annotations

import asyncio
from typing import Any

import anthropic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokensaver.emulator import Emulator, EmulatorError
from tokensaver.tokens import default_counter

MODEL = "claude-sonnet-4-6"
KW: dict[str, Any] = {"model": MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
C = default_counter()


def _dump(m: Any) -> dict[str, Any]:
    d = m.model_dump()
    d.pop("id")
    for b in d["content"]:
        b.pop("parsed_output", None)
    return d


def test_default_reply_and_usage(emulator: Emulator, emulator_client: anthropic.Anthropic) -> None:
    out = emulator_client.messages.create(**KW)
    assert out.id == "msg_emu_1"
    assert out.stop_reason == "end_turn"
    assert out.content[0].type == "text" and out.content[0].text
    assert out.usage.output_tokens == C.block({"type": "text", "text": out.content[0].text})
    rec = emulator.last
    assert rec.path == "/v1/messages"
    assert rec.status == 200
    assert rec.body["messages"] == KW["messages"]
    assert rec["usage"]["input_tokens"] == out.usage.input_tokens
    assert rec.headers["authorization"].startswith("REDACTED:") or rec.headers["x-api-key"].startswith(
        "REDACTED:"
    )
    assert "test-key" not in str(rec.headers)
    emulator.reset()
    assert emulator.requests == []


def test_scripted_replies(emulator: Emulator, emulator_client: anthropic.Anthropic) -> None:
    emulator.reply(
        "plain text",
        [{"type": "text", "text": "calling"}, {"type": "tool_use", "name": "lookup", "input": {"q": "x"}}],
        {"type": "message", "content": [{"type": "text", "text": "full"}], "stop_reason": "max_tokens"},
        lambda body: f"echo {len(body['messages'])}",
        EmulatorError.overloaded(retry_after=7),
    )
    assert emulator_client.messages.create(**KW).content[0].text == "plain text"  # type: ignore[union-attr]
    tool = emulator_client.messages.create(**KW)
    assert tool.stop_reason == "tool_use"
    assert tool.content[1].type == "tool_use" and tool.content[1].input == {"q": "x"}
    assert tool.content[1].id.startswith("toolu_")
    full = emulator_client.messages.create(**KW)
    assert full.stop_reason == "max_tokens" and full.content[0].text == "full"  # type: ignore[union-attr]
    assert emulator_client.messages.create(**KW).content[0].text == "echo 1"  # type: ignore[union-attr]
    with pytest.raises(anthropic.APIStatusError) as info:
        emulator_client.messages.create(**KW)
    assert info.value.status_code == 529
    assert info.value.response.headers["retry-after"] == "7"
    assert emulator.last.status == 529
    # queue empty again: default reply
    assert emulator_client.messages.create(**KW).stop_reason == "end_turn"


def test_stream_sync_matches_non_streamed(emulator_client: anthropic.Anthropic, emulator: Emulator) -> None:
    blocks = [
        {"type": "text", "text": "streamed answer " * 10},
        {"type": "tool_use", "id": "toolu_s", "name": "t", "input": {"a": [1]}},
    ]
    emulator.reply(blocks, blocks, blocks)
    plain = emulator_client.messages.create(**KW)
    with emulator_client.messages.stream(**KW) as s:
        final = s.get_final_message()
    types = [e.type for e in emulator_client.messages.create(**KW, stream=True)]
    assert _dump(final) == _dump(plain)
    assert types[0] == "message_start" and types[-1] == "message_stop" and "content_block_delta" in types
    assert emulator.last.stream and emulator.last.usage == plain.usage.model_dump(exclude_none=True)


def test_stream_async(emulator: Emulator) -> None:
    async def go() -> tuple[Any, Any, int]:
        client = anthropic.AsyncAnthropic(base_url=emulator.url, api_key="k", max_retries=0)
        plain = await client.messages.create(**KW)
        async with client.messages.stream(**KW) as s:
            final = await s.get_final_message()
        n = (await client.messages.count_tokens(model=MODEL, messages=KW["messages"])).input_tokens
        await client.close()
        return plain, final, n

    plain, final, n = asyncio.run(go())
    assert _dump(final) == _dump(plain)
    assert n == plain.usage.input_tokens


def test_async_fixture(async_emulator_client: anthropic.AsyncAnthropic) -> None:
    out = asyncio.run(async_emulator_client.messages.create(**KW))
    assert out.type == "message"


def claude_code_body(n_tools: int = 12) -> dict[str, Any]:
    tools = [
        {
            "name": f"Tool{i}",
            "description": f"does thing {i} " * 20,
            "input_schema": {"type": "object", "properties": {"arg": {"type": "string"}}},
        }
        for i in range(n_tools)
    ]
    return {
        "model": "claude-opus-5-5",
        "max_tokens": 32000,
        "system": [
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=2"},
            {"type": "text", "text": "You are Claude Code. " * 100, "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "Environment: linux " * 100, "cache_control": {"type": "ephemeral"}},
        ],
        "tools": tools,
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "fix the bug " * 50}]},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "I should read it", "signature": "EqMBCkgIBxAC"},
                    {"type": "tool_use", "id": "toolu_a", "name": "Tool1", "input": {"arg": "main.py"}},
                ],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "toolu_a", "content": "code " * 400}],
            },
            {
                "role": "system",
                "content": [
                    {"type": "text", "text": "reminder: be brief", "cache_control": {"type": "ephemeral"}}
                ],
                "output_config": {"effort": "medium"},  # Claude Code 2.1.33x sends this
            },
        ],
        "thinking": {"type": "adaptive"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "high"},
        "metadata": {"user_id": "user_abc_session_1"},
        "stream": True,
    }


def test_claude_code_request_accepted(emulator: Emulator, emulator_client: anthropic.Anthropic) -> None:
    body = claude_code_body()
    resp = emulator_client.post(
        "/v1/messages?beta=true",
        body=body,
        cast_to=anthropic.Stream[Any],
        stream=True,
        stream_cls=anthropic.Stream[Any],
    )
    events = list(resp)
    assert events[0]["type"] == "message_start"
    assert emulator.last.path == "/v1/messages?beta=true"
    assert emulator.last.status == 200
    u = emulator.last.usage
    assert u is not None
    assert u["cache_creation_input_tokens"] > 0
    assert u["input_tokens"] + u["cache_creation_input_tokens"] + u["cache_read_input_tokens"] == sum(
        C.block({k: v for k, v in b.items() if k != "cache_control"}) for b in body["tools"]
    ) + C.system(body["system"]) + sum(C.message(m) for m in body["messages"])
    assert emulator.last.response is not None
    assert emulator.last.response["context_management"] == {"applied_edits": []}


def test_beta_client_stream_with_context_management_clearing(
    emulator: Emulator, emulator_client: anthropic.Anthropic
) -> None:
    msgs: list[dict[str, Any]] = [{"role": "user", "content": "start"}]
    for i in range(4):
        msgs.append(
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": f"t{i}", "name": "read", "input": {"n": i}}],
            }
        )
        msgs.append(
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": f"t{i}", "content": "data " * 300}],
            }
        )
    edit = {
        "type": "clear_tool_uses_20250919",
        "trigger": {"type": "input_tokens", "value": 500},
        "keep": {"type": "tool_uses", "value": 1},
    }
    tools = [{"name": "read", "input_schema": {"type": "object"}}]
    kw: dict[str, Any] = {"model": MODEL, "tools": tools, "messages": msgs}
    full = emulator_client.messages.count_tokens(**kw).input_tokens
    with emulator_client.beta.messages.stream(
        **kw, max_tokens=100, context_management={"edits": [edit]}
    ) as s:  # type: ignore[arg-type]
        final = s.get_final_message()
    cm = final.context_management
    assert cm is not None
    applied = cm.applied_edits[0]
    assert applied.cleared_tool_uses == 3  # type: ignore[union-attr]
    billed = (
        final.usage.input_tokens
        + (final.usage.cache_read_input_tokens or 0)
        + (final.usage.cache_creation_input_tokens or 0)
    )
    assert billed == full - applied.cleared_input_tokens  # type: ignore[union-attr]
    assert applied.cleared_input_tokens > 0  # type: ignore[union-attr]


# --- hypothesis: valid conversations are accepted and usage adds up ----------------------------------


@st.composite
def conversations(draw: st.DrawFn) -> dict[str, Any]:
    n_turns = draw(st.integers(1, 5))
    msgs: list[dict[str, Any]] = []
    ids = 0
    pending: list[str] = []
    words = st.text(alphabet="abcdefgh ", min_size=1, max_size=40).filter(lambda s: s.strip() != "")
    for turn in range(n_turns):
        content: list[dict[str, Any]] = [
            {"type": "tool_result", "tool_use_id": tid, "content": draw(words)} for tid in pending
        ]
        if not content or draw(st.booleans()):
            content.append({"type": "text", "text": draw(words)})
        msgs.append({"role": "user", "content": content})
        pending = []
        if turn == n_turns - 1:
            break
        a: list[dict[str, Any]] = []
        if draw(st.booleans()):
            a.append({"type": "text", "text": draw(words)})
        for _ in range(draw(st.integers(0 if a else 1, 3))):
            ids += 1
            pending.append(f"toolu_{ids}")
            a.append({"type": "tool_use", "id": pending[-1], "name": "tool", "input": {"k": draw(words)}})
        msgs.append({"role": "assistant", "content": a})
    blocks = [b for m in msgs for b in m["content"]]
    for i in draw(st.lists(st.integers(0, len(blocks) - 1), max_size=4, unique=True)):
        blocks[i]["cache_control"] = {"type": "ephemeral"}
    system = [{"type": "text", "text": "sys " * draw(st.integers(1, 2000))}]
    if draw(st.booleans()):
        system[0]["cache_control"] = {"type": "ephemeral", "ttl": "1h"}
        for b in blocks:  # 1h must come first: keep later ones at 1h too
            if "cache_control" in b:
                b["cache_control"]["ttl"] = "1h"
        if sum("cache_control" in b for b in blocks) > 3:
            next(b for b in blocks if "cache_control" in b).pop("cache_control")
    return {
        "model": MODEL,
        "max_tokens": 50,
        "system": system,
        "tools": [{"name": "tool", "input_schema": {"type": "object"}}],
        "messages": msgs,
    }


def test_generated_conversations_accepted_and_add_up() -> None:
    with Emulator(virtual_clock=True) as emu:
        client = anthropic.Anthropic(base_url=emu.url, api_key="k", max_retries=0)

        @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(conversations(), st.booleans())
        def check(body: dict[str, Any], auto: bool) -> None:
            if auto and sum("cache_control" in b for m in body["messages"] for b in m["content"]) < 3:
                body["cache_control"] = {
                    "type": "ephemeral",
                    "ttl": "1h" if "cache_control" in body["system"][0] else "5m",
                }
            out = client.post("/v1/messages", body=body, cast_to=object)
            assert isinstance(out, dict)
            u = out["usage"]
            total = u["input_tokens"] + u["cache_creation_input_tokens"] + u["cache_read_input_tokens"]
            assert total == C.request(body)
            cc = u["cache_creation"]
            assert (
                cc["ephemeral_5m_input_tokens"] + cc["ephemeral_1h_input_tokens"]
                == u["cache_creation_input_tokens"]
            )
            assert min(u["input_tokens"], u["cache_creation_input_tokens"], u["cache_read_input_tokens"]) >= 0

        check()
