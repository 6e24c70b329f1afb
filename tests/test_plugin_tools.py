"""Tools that plugins answer themselves (``tokensaver_*``): the caller's agent only sees the final answer."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import anthropic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tokensaver
from tokensaver.emulator import Emulator

MODEL = "claude-sonnet-4-6"
USER_TOOL = {
    "name": "read_file",
    "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}},
}


class Clock:
    """A plugin with its own tool: adds it to every request and answers it."""

    @tokensaver.hookimpl
    def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> dict[str, Any]:
        tool = {"name": "tokensaver_clock", "input_schema": {"type": "object", "properties": {}}}
        tools = [t for t in body.get("tools") or [] if t.get("name") != "tokensaver_clock"]
        return {**body, "tools": [*tools, tool]}

    @tokensaver.hookimpl
    def tokensaver_answer_tool_use(self, tool_use: dict[str, Any], ctx: Any) -> str | None:
        return "12:00" if tool_use["name"] == "tokensaver_clock" else None


def _use(name: str, tid: str, **inp: Any) -> dict[str, Any]:
    return {"type": "tool_use", "id": tid, "name": name, "input": inp}


def _client(
    emu: Emulator, tmp_path: Any, plugins: dict[str, Any], asynchronous: bool = False, **cfg: Any
) -> Any:
    cls = anthropic.AsyncAnthropic if asynchronous else anthropic.Anthropic
    base = cls(base_url=emu.url, api_key="k", max_retries=0)
    pm = tokensaver.get_plugin_manager(plugins, load_entrypoints=False) if plugins else None
    config = {"plugins": list(plugins) or ["summarize"], "runs_dir": str(tmp_path), **cfg}
    return tokensaver.wrap(base, config=config, plugin_manager=pm)


@pytest.mark.parametrize("mode", ["create", "stream", "async"])
def test_plugin_tool_is_answered_inside_the_middleware(emu: Emulator, tmp_path: Any, mode: str) -> None:
    emu.reply([_use("tokensaver_clock", "toolu_c1")], "It is noon.")
    kw: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "time?"}],
    }
    if mode == "async":

        async def go() -> Any:
            client = _client(emu, tmp_path, {"clock": Clock()}, asynchronous=True)
            return await client.messages.create(**kw), client

        msg, client = asyncio.run(go())
    else:
        client = _client(emu, tmp_path, {"clock": Clock()})
        if mode == "stream":
            with client.messages.stream(**kw) as s:
                msg = s.get_final_message()
        else:
            msg = client.messages.create(**kw)
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text == "It is noon."
    assert len(emu.requests) == 2
    follow_up = emu.requests[1].body["messages"]
    assert follow_up[-2]["content"][0]["name"] == "tokensaver_clock"
    assert follow_up[-1]["content"][0] == {
        "type": "tool_result",
        "tool_use_id": "toolu_c1",
        "content": "12:00",
    }
    assert [r["status"] for r in client.tokensaver.records] == [200, 200]  # both rounds billed and recorded


def test_mixed_tool_calls_hand_back_only_the_callers_tools(emu: Emulator, tmp_path: Any) -> None:
    emu.reply([_use("tokensaver_clock", "toolu_c1"), _use("read_file", "toolu_r1", path="a.py")])
    client = _client(emu, tmp_path, {"clock": Clock()})
    msg = client.messages.create(
        model=MODEL, max_tokens=100, tools=[USER_TOOL], messages=[{"role": "user", "content": "read a.py"}]
    )
    assert [(b.type, b.name) for b in msg.content] == [("tool_use", "read_file")]
    assert len(emu.requests) == 1


def _job() -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """A long repetitive log from a bash tool (summarize shortens it, lossy), the messages, the tools."""
    log = "".join(
        f"2026-01-01 12:00:{i % 60:02d} INFO worker {i} processed batch {i * 7}\n" for i in range(900)
    )
    messages = [
        {"role": "user", "content": "run the job"},
        {"role": "assistant", "content": [_use("bash", "toolu_b1", command="./job")]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_b1", "content": log}]},
    ]
    schema = {"type": "object", "properties": {"command": {"type": "string"}}}
    return log, messages, [{"name": "bash", "input_schema": schema}]


def test_summarize_retrieval_hands_back_the_original(emu: Emulator, tmp_path: Any) -> None:
    log, messages, tools = _job()
    refs: list[str] = []

    def ask_for_original(body: dict[str, Any]) -> list[dict[str, Any]]:
        sent = body["messages"][2]["content"][0]["content"]
        ref = re.search(r"with ref ([0-9a-f]+)", sent)
        assert ref is not None and len(sent) < len(log)  # shortened, with its ref
        refs.append(ref.group(1))
        return [_use("tokensaver_retrieve", "toolu_t1", ref=ref.group(1))]

    emu.reply(ask_for_original, "Batch 6293 was processed by worker 899.")
    client = _client(emu, tmp_path, {}, summarize={"retrieval": True})
    msg = client.messages.create(model=MODEL, max_tokens=100, tools=tools, messages=messages)
    assert msg.content[0].text.startswith("Batch 6293")
    assert [t["name"] for t in emu.requests[0].body["tools"]] == ["bash", "tokensaver_retrieve"]
    answer = emu.requests[1].body["messages"][-1]["content"][0]
    assert (
        answer["tool_use_id"] == "toolu_t1" and answer["content"] == log
    )  # the original, not shortened again
    # the round that asked records what was handed back
    assert client.tokensaver.records[0]["plugins"]["summarize"]["found"] is True


def test_retrieval_originals_survive_a_restart_and_stay_per_key(emu: Emulator, tmp_path: Any) -> None:
    """Originals go to summarize's private disk store: a new process answers the ref, another key does not."""
    log, messages, tools = _job()
    cfg = {"retrieval": True, "summary_dir": str(tmp_path / "store")}
    emu.reply("ok")
    _client(emu, tmp_path, {}, summarize=cfg).messages.create(
        model=MODEL, max_tokens=100, tools=tools, messages=messages
    )
    ref = re.search(r"with ref ([0-9a-f]+)", emu.requests[0].body["messages"][2]["content"][0]["content"])
    assert ref is not None

    def ask(body: dict[str, Any]) -> list[dict[str, Any]]:
        return [_use("tokensaver_retrieve", "toolu_t9", ref=ref.group(1))]

    later = [
        *messages,
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "which batch was last?"},
    ]
    # the other key's conversation does not hold the log: only the ref could hand it over
    guess = [{"role": "user", "content": f"fetch ref {ref.group(1)}"}]
    for key, conv, expected in (
        ("k", later, log),
        ("other-key", guess, f"no original is kept under ref {ref.group(1)!r}"),
    ):
        emu.reply(ask, "done")
        base = anthropic.Anthropic(base_url=emu.url, api_key=key, max_retries=0)
        fresh = tokensaver.wrap(  # a new wrap: nothing in memory, only the disk store
            base, config={"plugins": ["summarize"], "runs_dir": str(tmp_path), "summarize": cfg}
        )
        fresh.messages.create(model=MODEL, max_tokens=100, tools=tools, messages=conv)
        assert emu.requests[-1].body["messages"][-1]["content"][0]["content"] == expected


# -- streamed exchanges go on streaming ------------------------------------------------------


def _stream_kw(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 100, "messages": [{"role": "user", "content": "time?"}], **extra}


def test_a_streamed_exchange_streams_the_first_round_before_the_second_is_asked(
    emu: Emulator, tmp_path: Any
) -> None:
    seen: list[str] = []
    at_follow_up: list[list[str]] = []

    def second(body: dict[str, Any]) -> str:
        at_follow_up.append(list(seen))  # what the caller had read when the follow-up went out
        return "It is noon."

    emu.reply([{"type": "text", "text": "Let me look."}, _use("tokensaver_clock", "toolu_c1")], second)
    client = _client(emu, tmp_path, {"clock": Clock()})
    with client.messages.stream(**_stream_kw()) as s:
        for event in s:
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                seen.append(event.delta.text)
            if event.type == "content_block_start":
                seen.append(f"start:{event.index}:{event.content_block.type}")
        msg = s.get_final_message()
    assert "".join(x for x in at_follow_up[0] if not x.startswith("start:")) == "Let me look."
    assert [(b.type, b.text) for b in msg.content] == [("text", "Let me look."), ("text", "It is noon.")]
    assert msg.stop_reason == "end_turn"
    assert [x for x in seen if x.startswith("start:")] == ["start:0:text", "start:1:text"]  # ours held back
    assert [r["status"] for r in client.tokensaver.records] == [200, 200]
    assert emu.requests[1].body["messages"][-1]["content"][0]["content"] == "12:00"


def test_a_streamed_mixed_answer_hands_back_only_the_callers_tool(emu: Emulator, tmp_path: Any) -> None:
    emu.reply([_use("tokensaver_clock", "toolu_c1"), _use("read_file", "toolu_r1", path="a.py")])
    client = _client(emu, tmp_path, {"clock": Clock()})
    with client.messages.stream(**_stream_kw(tools=[USER_TOOL])) as s:
        msg = s.get_final_message()
    assert [(b.type, b.name) for b in msg.content] == [("tool_use", "read_file")]
    assert msg.stop_reason == "tool_use" and len(emu.requests) == 1


def test_an_async_streamed_exchange_is_joined_too(emu: Emulator, tmp_path: Any) -> None:
    emu.reply([{"type": "text", "text": "One moment."}, _use("tokensaver_clock", "toolu_c1")], "Noon.")

    async def go() -> Any:
        client = _client(emu, tmp_path, {"clock": Clock()}, asynchronous=True)
        async with client.messages.stream(**_stream_kw()) as s:
            return await s.get_final_message(), client

    msg, client = asyncio.run(go())
    assert [b.text for b in msg.content] == ["One moment.", "Noon."]
    assert [r["status"] for r in client.tokensaver.records] == [200, 200]


def test_a_refused_follow_up_reaches_the_streaming_caller_as_an_error(emu: Emulator, tmp_path: Any) -> None:
    from tokensaver.emulator import EmulatorError

    emu.reply([_use("tokensaver_clock", "toolu_c1")], EmulatorError(529, "overloaded_error", "Overloaded"))
    client = _client(emu, tmp_path, {"clock": Clock()})
    with pytest.raises(anthropic.APIStatusError, match="Overloaded"):
        with client.messages.stream(**_stream_kw()) as s:
            s.get_final_message()
    assert [r["status"] for r in client.tokensaver.records] == [200, 529]


def test_with_thinking_on_the_exchange_is_buffered_and_only_the_last_round_handed_back(
    emu: Emulator, tmp_path: Any
) -> None:
    # manual thinking: every turn starts with a thinking block (the API asks the loop's back)
    first = [{"type": "thinking", "thinking": "The time."}, {"type": "text", "text": "Checking."}]
    emu.reply([*first, _use("tokensaver_clock", "toolu_c1")], "Noon.")
    client = _client(emu, tmp_path, {"clock": Clock()})
    kw = _stream_kw(max_tokens=3000, thinking={"type": "enabled", "budget_tokens": 1024})
    with client.messages.stream(**kw) as s:
        msg = s.get_final_message()
    assert [b.text for b in msg.content if b.type == "text"] == ["Noon."]


# -- the splice, property-tested ---------------------------------------------------------------

_text = st.builds(lambda t: {"type": "text", "text": t}, st.text(min_size=1, max_size=60))
_theirs = st.builds(
    lambda i, p: {"type": "tool_use", "id": f"toolu_u{i}", "name": "read_file", "input": {"path": p}},
    st.integers(0, 999),
    st.text(max_size=20),
)
_ours = st.builds(
    lambda i: {
        "type": "tool_use",
        "id": f"toolu_p{i}",
        "name": "tokensaver_retrieve",
        "input": {"ref": str(i)},
    },
    st.integers(0, 999),
)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.one_of(_text, _theirs, _ours), min_size=1, max_size=5), min_size=1, max_size=4),
    st.lists(st.integers(1, 400), max_size=12),
)
def test_splice_joins_rounds_into_one_valid_message(
    rounds: list[list[dict[str, Any]]], cuts: list[int]
) -> None:
    """Whatever the rounds and however the bytes are cut, the caller gets one well-formed message:
    every block of every round but ours, in order, indices 0..n-1, one message_start, one stop."""
    from tokensaver.exchange import Splice
    from tokensaver.sse import SSEAccumulator, message_to_sse

    splice, out = Splice(), b""
    for k, content in enumerate(rounds):
        if k:
            splice.new_round()
        stop = "tool_use" if any(b["type"] == "tool_use" for b in content) else "end_turn"
        msg = {
            "id": f"msg_{k}",
            "type": "message",
            "role": "assistant",
            "model": MODEL,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {"input_tokens": 5, "output_tokens": 7},
        }
        data, pos = message_to_sse(msg), 0
        for c in sorted({c % (len(data) + 1) for c in cuts}) + [len(data)]:
            out += splice.feed(data[pos:c])
            pos = c
        assert splice.acc.message is not None and splice.acc.message["content"] == content  # the round, whole
    out += splice.end()
    acc = SSEAccumulator()
    acc.feed(out)
    assert acc.complete and acc.error is None
    starts = [e for e, _ in acc.events if e == "message_start"]
    assert len(starts) == 1 and [e for e, _ in acc.events].count("message_stop") == 1
    expected = [b for content in rounds for b in content if b.get("name") != "tokensaver_retrieve"]
    assert acc.message["content"] == expected
    indices = [d["index"] for e, d in acc.events if e == "content_block_start"]
    assert indices == list(range(len(expected)))
    last = rounds[-1]
    theirs_left = any(b["type"] == "tool_use" and b["name"] == "read_file" for b in last)
    ours_last = any(b.get("name") == "tokensaver_retrieve" for b in last)
    if ours_last and not theirs_left:
        assert acc.message["stop_reason"] == "end_turn"  # no tool left for the caller to call
    else:
        assert acc.message["stop_reason"] == ("tool_use" if theirs_left else "end_turn")
