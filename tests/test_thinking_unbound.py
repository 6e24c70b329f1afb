"""A thinking block the API refuses as bound to a different conversation (preserved thinking).

On a model with preserved thinking the API binds each thinking block to everything before it; when
that prefix changed (a rewrite tokensaver made once and could not repeat: a restart, a stage that
failed open), it answers 400. The documented gateway answer: strip the thinking from the failing block
on, send again, say so. Through the emulator's prefix check, the real SDK, ``wrap()`` (sync, async,
streamed) and the proxy.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import anthropic
import pytest

import tokensaver
from tokensaver.emulator import Emulator
from tokensaver.exchange import strip_thinking_from
from tokensaver.proxy import ProxyServer
from tokensaver.report import Report

MODEL = "claude-opus-5-5"
TASK = "Task: fix the failing test in shop/cart.py"
THINKING = {"type": "adaptive"}
MANUAL = {"type": "enabled", "budget_tokens": 1024}  # every turn thinks: the API asks the loop's back
BETA = "thinking-binding-controls-2026-08-01"


class Forgetful:
    """Rewrites the task on its first call only, as a stage whose rewrite is lost after that call."""

    def __init__(self) -> None:
        self.calls = 0

    @tokensaver.hookimpl
    def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> dict[str, Any] | None:
        self.calls += 1
        if self.calls > 1:
            return None
        first = {"role": "user", "content": TASK + " (rewritten once)"}
        return {**body, "messages": [first, *body["messages"][1:]]}


def _config(tmp_path: Path) -> dict[str, Any]:
    return {"plugins": ["forgetful"], "record": False, "runs_dir": str(tmp_path)}


def _wrapped(emu: Emulator, tmp_path: Path, asynchronous: bool = False) -> Any:
    pm = tokensaver.get_plugin_manager({"forgetful": Forgetful()}, load_entrypoints=False)
    cls = anthropic.AsyncAnthropic if asynchronous else anthropic.Anthropic
    base = cls(base_url=emu.url, api_key="sk-ant-unbound", max_retries=0)
    return tokensaver.wrap(base, config=_config(tmp_path), plugin_manager=pm)


def _second_call(first_reply: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "max_tokens": 64,
        "thinking": THINKING,
        "messages": [
            {"role": "user", "content": TASK},
            {"role": "assistant", "content": first_reply},
            {"role": "user", "content": "Go on."},
        ],
        **extra,
    }


def _first_call() -> dict[str, Any]:
    return {
        "model": MODEL,
        "max_tokens": 64,
        "thinking": THINKING,
        "messages": [{"role": "user", "content": TASK}],
    }


def _reply_blocks(message: Any) -> list[dict[str, Any]]:
    data = message if isinstance(message, dict) else message.model_dump()
    return [{k: v for k, v in b.items() if v is not None} for b in data["content"]]


def _queue(emu: Emulator) -> None:
    emu.reply(
        [{"type": "thinking", "thinking": "Look at cart.py first."}, {"type": "text", "text": "Reading it."}]
    )
    emu.reply("Done.")


def test_strip_thinking_from_keeps_earlier_blocks_and_never_empties_a_turn() -> None:
    def turn(k: int, text: str) -> dict[str, Any]:
        thought = {"type": "thinking", "thinking": f"t{k}", "signature": f"s{k}"}
        return {"role": "assistant", "content": [thought, {"type": "text", "text": text}]}

    msgs: list[dict[str, Any]] = [
        {"role": "user", "content": "a"},
        turn(0, "x"),
        {"role": "user", "content": "b"},
        turn(1, "y"),
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "d"}]},
    ]
    out, removed, held = strip_thinking_from(msgs, (3, 0))
    assert len(removed) == 1 and held == []
    assert out[1] == msgs[1]  # before the failing block: kept
    assert out[3]["content"] == [{"type": "text", "text": "y"}]
    assert out[5] == msgs[5]  # a turn of thinking only is not emptied
    assert msgs[3]["content"][0]["type"] == "thinking"  # the caller's list is not changed


@pytest.mark.parametrize("stream", [False, True])
def test_wrap_strips_the_unbound_thinking_and_sends_again(
    emu: Emulator, tmp_path: Path, stream: bool
) -> None:
    _queue(emu)
    client = _wrapped(emu, tmp_path)
    first = client.messages.create(**_first_call())
    body = _second_call(_reply_blocks(first))
    if stream:
        with client.messages.stream(**body) as s:
            answer = s.get_final_message()
    else:
        answer = client.messages.create(**body)
    assert answer.content[0].text == "Done."  # type: ignore[union-attr]
    refused, resent = emu.requests[-2], emu.requests[-1]
    assert refused.status == 400 and "bound to a different conversation" in str(refused.response)
    assert resent.status == 200
    assert [b["type"] for b in resent.body["messages"][1]["content"]] == ["text"]
    rec = client.tokensaver.records[-1]
    assert rec["status"] == 200
    assert rec["thinking_unbound"] == {"from": "messages.1.content.0", "stripped_blocks": 1}


def test_later_calls_strip_the_same_blocks_before_sending(emu: Emulator, tmp_path: Path) -> None:
    """After one refusal the conversation's later calls go out without the refused block and keep
    what the model wrote since: one request each, no second 400."""
    _queue(emu)
    emu.reply(
        [{"type": "thinking", "thinking": "Now the test."}, {"type": "text", "text": "Next."}], "All done."
    )
    client = _wrapped(emu, tmp_path)
    first = client.messages.create(**_first_call())
    second = client.messages.create(**_second_call(_reply_blocks(first)))
    third = client.messages.create(**_second_call(_reply_blocks(first)))  # a retry of the same turn
    assert [r.status for r in emu.requests] == [200, 400, 200, 200]
    assert third.content and emu.requests[-1].body["messages"][1]["content"] == [
        {"type": "text", "text": "Reading it."}
    ]
    body = _second_call(_reply_blocks(first))
    body["messages"] += [
        {"role": "assistant", "content": _reply_blocks(third)},
        {"role": "user", "content": "And then?"},
    ]
    assert second.content
    fourth = client.messages.create(**body)
    assert fourth.content[0].text == "All done."  # type: ignore[union-attr]
    assert emu.requests[-1].status == 200 and len(emu.requests) == 5
    sent = emu.requests[-1].body["messages"]
    assert [b["type"] for b in sent[1]["content"]] == ["text"]  # the refused block: still stripped
    assert [b["type"] for b in sent[3]["content"]] == ["thinking", "text"]  # written since: kept
    assert client.tokensaver.records[-1]["thinking_unbound"] == {"stripped_known": 1}


def test_async_wrap_strips_the_unbound_thinking_and_sends_again(emu: Emulator, tmp_path: Path) -> None:
    _queue(emu)

    async def go() -> Any:
        client = _wrapped(emu, tmp_path, asynchronous=True)
        first = await client.messages.create(**_first_call())
        answer = await client.messages.create(**_second_call(_reply_blocks(first)))
        return client, answer

    client, answer = asyncio.run(go())
    assert answer.content[0].text == "Done."
    assert [r.status for r in emu.requests[-2:]] == [400, 200]
    assert client.tokensaver.records[-1]["thinking_unbound"]["stripped_blocks"] == 1


def test_a_caller_that_asks_for_the_error_gets_it_untouched(emu: Emulator, tmp_path: Path) -> None:
    _queue(emu)
    client = _wrapped(emu, tmp_path)
    first = client.messages.create(**_first_call())
    thinking = {**THINKING, "block_binding": {"prefix_mismatch_behavior": "error"}}
    body = _second_call(_reply_blocks(first), thinking=thinking)
    with pytest.raises(anthropic.BadRequestError, match="bound to a different conversation"):
        client.messages.create(**body, extra_headers={"anthropic-beta": BETA})
    assert emu.requests[-1].status == 400 and len(emu.requests) == 2  # not sent again


def test_the_proxy_strips_the_unbound_thinking_and_sends_again(emu: Emulator, tmp_path: Path) -> None:
    _queue(emu)
    pm = tokensaver.get_plugin_manager({"forgetful": Forgetful()}, load_entrypoints=False)
    config = {**_config(tmp_path), "record": True, "runs_dir": str(tmp_path / "runs")}
    with ProxyServer(config, upstream=emu.url, plugin_manager=pm, run="unbound") as proxy:
        client = anthropic.Anthropic(base_url=proxy.url, api_key="sk-ant-unbound", max_retries=0)
        first = client.messages.create(**_first_call())
        answer = client.messages.create(**_second_call(_reply_blocks(first)))
        records = proxy.records()
    assert answer.content[0].text == "Done."  # type: ignore[union-attr]
    assert [r.status for r in emu.requests[-2:]] == [400, 200]
    assert records[-1]["status"] == 200
    assert records[-1]["thinking_unbound"] == {"from": "messages.1.content.0", "stripped_blocks": 1}


def test_every_report_format_says_the_thinking_was_stripped(emu: Emulator, tmp_path: Path) -> None:
    _queue(emu)
    client = _wrapped(emu, tmp_path)
    first = client.messages.create(**_first_call())
    client.messages.create(**_second_call(_reply_blocks(first)))
    report = Report({"name": "unbound"}, client.tokensaver.records)
    assert report.to_dict()["totals"]["thinking_unbound"] == 1
    for text in (report.to_table(), report.to_markdown(), report.to_html()):
        assert "thinking stripped on 1 call" in text


def test_a_restart_after_cache_align_moved_a_changed_system_line_is_answered(
    emu: Emulator, tmp_path: Path
) -> None:
    """The caller's system prompt gets a new date mid-conversation: cache_align moves the line out of
    the cached prefix (the system changes: every thinking block before is refused once, stripped and
    sent again). A restarted client does not know the move and sends the system as it comes: refused
    once more, answered after the strip. Every call is answered; refusals cost one request each."""

    def client() -> Any:
        base = anthropic.Anthropic(base_url=emu.url, api_key="sk-ant-unbound", max_retries=0)
        return tokensaver.wrap(
            base, config={"record": False, "runs_dir": str(tmp_path), "plugins": ["cache_align"]}
        )

    def system(day: int) -> list[dict[str, Any]]:
        return [
            {"type": "text", "text": "You are a coding agent. " * 200 + f"\nToday's date: 2026-12-0{day}"}
        ]

    c = client()
    msgs: list[dict[str, Any]] = [{"role": "user", "content": TASK + " please" * 300}]
    unbound = []
    for k in range(6):
        if k == 4:
            c = client()  # a restart: the new process knows nothing of the conversation
        emu.reply([{"type": "thinking", "thinking": f"Step {k}."}, {"type": "text", "text": f"ok {k}"}])
        r = c.messages.create(
            model=MODEL, max_tokens=64, thinking=THINKING, system=system(1 if k < 2 else 2), messages=msgs
        )
        assert r.content[-1].text == f"ok {k}"  # type: ignore[union-attr]
        unbound.append(c.tokensaver.records[-1].get("thinking_unbound"))
        blocks = [b.model_dump(exclude_none=True) for b in r.content]
        msgs = [*msgs, {"role": "assistant", "content": blocks}, {"role": "user", "content": f"next {k}"}]
    statuses = [r.status for r in emu.requests]
    refused = statuses.count(400)
    assert (
        1 <= refused <= 2 and len(statuses) == 6 + refused
    )  # the date change; the restart at most once more
    assert "400, 400" not in str(statuses)  # a refused call is answered on its one retry
    assert sum(1 for u in unbound if u and "from" in u) == refused
    assert unbound[3] == {
        "stripped_known": unbound[2]["stripped_blocks"]
    }  # no second refusal after the first


def _loop_queue(emu: Emulator) -> None:
    emu.reply(
        [
            {"type": "thinking", "thinking": "Read cart.py."},
            {"type": "tool_use", "id": "toolu_1", "name": "read", "input": {"path": "shop/cart.py"}},
        ]
    )
    emu.reply("Fixed.")


def _in_the_loop(first_reply: list[dict[str, Any]], thinking: Any = THINKING) -> dict[str, Any]:
    return {
        "model": MODEL,
        "max_tokens": 2048,
        "thinking": thinking,
        "tools": [{"name": "read", "description": "Read a file", "input_schema": {"type": "object"}}],
        "messages": [
            {"role": "user", "content": TASK},
            {"role": "assistant", "content": first_reply},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "x = 1"}],
            },
        ],
    }


@pytest.mark.parametrize(
    ("door", "thinking"),
    [("wrap", THINKING), ("proxy", THINKING), ("wrap", MANUAL), ("proxy", MANUAL)],
)
def test_in_a_tool_loop_the_last_turns_thinking_stays_and_the_api_drops_it(
    emu: Emulator, tmp_path: Path, door: str, thinking: dict[str, Any]
) -> None:
    """While a tool loop goes on the API asks back the last assistant turn's thinking ("a final
    assistant message must start with a thinking block"): stripping it would be refused too. The
    request goes again with it, asking the API to drop what fails the prefix check
    (``block_binding.prefix_mismatch_behavior: "drop_block"``) under its beta, the caller's betas kept."""
    _loop_queue(emu)
    theirs = "interleaved-thinking-2025-05-14"
    if door == "wrap":
        client = _wrapped(emu, tmp_path)
        first = client.messages.create(**_first_call(), tools=_in_the_loop([])["tools"])
        answer = client.messages.create(
            **_in_the_loop(_reply_blocks(first), thinking), extra_headers={"anthropic-beta": theirs}
        )
        record = client.tokensaver.records[-1]
    else:
        pm = tokensaver.get_plugin_manager({"forgetful": Forgetful()}, load_entrypoints=False)
        config = {**_config(tmp_path), "record": True, "runs_dir": str(tmp_path / "runs")}
        with ProxyServer(config, upstream=emu.url, plugin_manager=pm, run="unbound-loop") as proxy:
            client = anthropic.Anthropic(base_url=proxy.url, api_key="sk-ant-unbound", max_retries=0)
            first = client.messages.create(**_first_call(), tools=_in_the_loop([])["tools"])
            answer = client.messages.create(
                **_in_the_loop(_reply_blocks(first), thinking), extra_headers={"anthropic-beta": theirs}
            )
            record = proxy.records()[-1]
    assert answer.content[0].text == "Fixed."  # type: ignore[union-attr]
    refused, resent = emu.requests[-2], emu.requests[-1]
    assert refused.status == 400 and resent.status == 200
    assert [b["type"] for b in resent.body["messages"][1]["content"]] == ["thinking", "tool_use"]
    assert resent.body["thinking"]["block_binding"] == {"prefix_mismatch_behavior": "drop_block"}
    betas = {b.strip() for b in resent.headers.get("anthropic-beta", "").split(",")}
    assert {BETA, theirs} <= betas
    dropped = [t for t in resent.response["input_transformations"] if t["type"] == "thinking_dropped"]
    assert [t["path"] for t in dropped] == ["messages.1.content.0"]
    assert record["thinking_unbound"] == {
        "from": "messages.1.content.0",
        "stripped_blocks": 0,
        "drop_block": 1,
    }


PROBE = {
    "name": "tokensaver_probe",
    "description": "A plugin's own tool (answered by tokensaver, never seen by the caller).",
    "input_schema": {"type": "object", "properties": {}},
}


class WithTool:
    """Offers a plugin tool on every call, as defer_tools' loader is: the call goes the plugin-tool way."""

    @tokensaver.hookimpl
    def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> dict[str, Any] | None:
        return {**body, "tools": [*(body.get("tools") or []), PROBE]}


def _plugins() -> Any:
    return tokensaver.get_plugin_manager(
        {"forgetful": Forgetful(), "probe": WithTool()}, load_entrypoints=False
    )


def _tool_config(tmp_path: Path) -> dict[str, Any]:
    return {"plugins": ["forgetful", "probe"], "record": True, "runs_dir": str(tmp_path / "runs")}


@pytest.mark.parametrize("route", ["sync", "stream", "async", "async_stream", "proxy", "proxy_stream"])
def test_a_call_with_a_plugin_tool_strips_the_unbound_thinking_and_sends_again(
    emu: Emulator, tmp_path: Path, route: str
) -> None:
    """The plugin-tool exchange (a loader on every call, as defer_tools' defaults add) recovers as a
    plain call does: the refused block stripped, sent again, recorded."""
    _queue(emu)
    stream = route.endswith("stream")

    def second(client: Any, first: Any) -> Any:
        body = _second_call(_reply_blocks(first))
        if not stream:
            return client.messages.create(**body)
        with client.messages.stream(**body) as s:
            return s.get_final_message()

    if route.startswith("proxy"):
        with ProxyServer(
            _tool_config(tmp_path), upstream=emu.url, plugin_manager=_plugins(), run="u"
        ) as proxy:
            client = anthropic.Anthropic(base_url=proxy.url, api_key="sk-ant-unbound", max_retries=0)
            answer = second(client, client.messages.create(**_first_call()))
            records = proxy.records()
    elif route.startswith("async"):

        async def go() -> Any:
            base = anthropic.AsyncAnthropic(base_url=emu.url, api_key="sk-ant-unbound", max_retries=0)
            client = tokensaver.wrap(base, config=_tool_config(tmp_path), plugin_manager=_plugins())
            first = await client.messages.create(**_first_call())
            body = _second_call(_reply_blocks(first))
            if not stream:
                return client, await client.messages.create(**body)
            async with client.messages.stream(**body) as s:
                return client, await s.get_final_message()

        client, answer = asyncio.run(go())
        records = client.tokensaver.records
    else:
        base = anthropic.Anthropic(base_url=emu.url, api_key="sk-ant-unbound", max_retries=0)
        client = tokensaver.wrap(base, config=_tool_config(tmp_path), plugin_manager=_plugins())
        answer = second(client, client.messages.create(**_first_call()))
        records = client.tokensaver.records
    assert answer.content[0].text == "Done."
    assert [r.status for r in emu.requests[-2:]] == [400, 200]
    assert [b["type"] for b in emu.requests[-1].body["messages"][1]["content"]] == ["text"]
    assert any(t["name"] == "tokensaver_probe" for t in emu.requests[-1].body["tools"])
    assert records[-1]["status"] == 200
    assert records[-1]["thinking_unbound"] == {"from": "messages.1.content.0", "stripped_blocks": 1}
