"""memoize with plugin tools (summarize's ``tokensaver_retrieve``): what the caller received is what is stored.

A plugin-tool exchange is one caller request answered in several rounds (wrap() and the proxy
answer our own tool calls). memoize must store, under the caller's request, the message the caller
was handed (the last round's, or the rounds joined when streamed), never a round that calls our
tool, and never a follow-up round's body, which the caller never sent. Real HTTP to the emulator
with scripted replies, through wrap() (sync and async) and the in-process proxy.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import anthropic
import diskcache
import pytest

import tokensaver
from tokensaver.emulator import Emulator
from tokensaver.proxy import ProxyServer

MODEL = "claude-sonnet-4-6"
KEY = "sk-test-memo-tools"
FINAL = "Batch 6293 was processed by worker 899."
USER_TOOL = {
    "name": "read_file",
    "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}},
}
DOORS = ["wrap", "wrap_async", "proxy"]
TIMEOUT = 30.0  # every client call is bounded: a regression fails instead of hanging


def _use(name: str, tid: str, **inp: Any) -> dict[str, Any]:
    return {"type": "tool_use", "id": tid, "name": name, "input": inp}


def _request() -> dict[str, Any]:
    """A conversation whose long tool output summarize shortens (with a ref, retrieval on)."""
    log = "".join(
        f"2026-01-01 12:00:{i % 60:02d} INFO worker {i} processed batch {i * 7}\n" for i in range(900)
    )
    schema = {"type": "object", "properties": {"command": {"type": "string"}}}
    return {
        "model": MODEL,
        "max_tokens": 100,
        "tools": [{"name": "bash", "input_schema": schema}, USER_TOOL],
        "messages": [
            {"role": "user", "content": "run the job"},
            {"role": "assistant", "content": [_use("bash", "toolu_b1", command="./job")]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_b1", "content": log}]},
        ],
    }


def _asks_for_original(*before: dict[str, Any], also: dict[str, Any] | None = None) -> Any:
    """A scripted reply: the model calls tokensaver_retrieve with the ref summarize put in the request."""

    def reply(body: dict[str, Any]) -> list[dict[str, Any]]:
        ref = re.search(r"with ref ([0-9a-f]+)", body["messages"][2]["content"][0]["content"])
        assert ref is not None
        return [*before, _use("tokensaver_retrieve", "toolu_t1", ref=ref.group(1)), *([also] if also else [])]

    return reply


def _config(tmp_path: Path) -> dict[str, Any]:
    return {
        "plugins": ["summarize", "memoize"],
        "summarize": {"retrieval": True, "summary_dir": str(tmp_path / "summaries")},
        "memoize": {"dir": str(tmp_path / "memo")},
        "runs_dir": str(tmp_path / "runs"),
    }


def _ask(client: Any, stream: bool) -> dict[str, Any]:
    """One call as a caller makes it; the message it received, as a dict."""
    kw = _request()
    if stream:
        with client.messages.stream(**kw, timeout=TIMEOUT) as s:
            return s.get_final_message().to_dict()  # type: ignore[no-any-return]
    return client.messages.create(**kw, timeout=TIMEOUT).to_dict()  # type: ignore[no-any-return]


async def _ask_async(client: Any, stream: bool) -> dict[str, Any]:
    kw = _request()
    if stream:
        async with client.messages.stream(**kw, timeout=TIMEOUT) as s:
            return (await s.get_final_message()).to_dict()  # type: ignore[no-any-return]
    return (await client.messages.create(**kw, timeout=TIMEOUT)).to_dict()  # type: ignore[no-any-return]


def _run(door: str, emu: Emulator, tmp_path: Path, *streams: bool) -> tuple[list[dict[str, Any]], Any]:
    """The same request through ``door``, once per entry of ``streams`` (streamed or not): answers, records."""
    config = _config(tmp_path)
    if door == "proxy":
        with ProxyServer(config, upstream=emu.url, run="memo-tools") as p:
            client = anthropic.Anthropic(base_url=p.url, api_key=KEY, max_retries=0)
            return [_ask(client, s) for s in streams], p.records()
    if door == "wrap":
        client = tokensaver.wrap(
            anthropic.Anthropic(base_url=emu.url, api_key=KEY, max_retries=0), config=config
        )
        return [_ask(client, s) for s in streams], list(client.tokensaver.records)

    async def go() -> tuple[list[dict[str, Any]], Any]:
        client = tokensaver.wrap(
            anthropic.AsyncAnthropic(base_url=emu.url, api_key=KEY, max_retries=0), config=config
        )
        answers = [await asyncio.wait_for(_ask_async(client, s), TIMEOUT) for s in streams]
        return answers, list(client.tokensaver.records)

    return asyncio.run(go())


def _stored(tmp_path: Path) -> list[dict[str, Any]]:
    """Every message in memoize's store (read straight from its diskcache directory)."""
    out = []
    with diskcache.Cache(str(tmp_path / "memo")) as cache:
        for key in cache.iterkeys():
            raw = cache.get(key)
            payload = bytes(raw).split(b"\n", 2)[2]  # magic line, checksum line, JSON
            out.append(json.loads(payload)["message"])
    return out


def _plugin_tool_calls(message: dict[str, Any]) -> list[str]:
    return [
        b["name"]
        for b in message.get("content") or []
        if b.get("type") == "tool_use" and b.get("name", "").startswith("tokensaver_")
    ]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("door", DOORS)
def test_an_identical_request_gets_the_exchange_answer_never_our_tool_call(
    emu: Emulator, tmp_path: Path, door: str, stream: bool
) -> None:
    emu.reply(_asks_for_original({"type": "text", "text": "Let me look."}), FINAL)
    (first, second), records = _run(door, emu, tmp_path, stream, stream)
    assert len(emu.requests) == 2  # the exchange's two rounds; the repeat never reached the network
    assert _plugin_tool_calls(first) == [] and first["content"][-1]["text"] == FINAL
    assert (
        second["content"] == first["content"] and second["stop_reason"] == first["stop_reason"] == "end_turn"
    )
    assert records[-1]["short_circuit"] == "memoize"
    # the one entry stored is what the caller was handed (streamed: the rounds joined), under its request
    stored = _stored(tmp_path)
    assert len(stored) == 1
    assert stored[0]["content"] == first["content"] and stored[0]["stop_reason"] == "end_turn"
    if stream:
        assert [b.get("text") for b in first["content"]] == ["Let me look.", FINAL]


@pytest.mark.parametrize("door", DOORS)
def test_a_streamed_exchange_serves_a_later_plain_request_and_back(
    emu: Emulator, tmp_path: Path, door: str
) -> None:
    emu.reply(_asks_for_original({"type": "text", "text": "Let me look."}), FINAL)
    (first, second), _ = _run(door, emu, tmp_path, True, False)
    assert len(emu.requests) == 2 and second["content"] == first["content"]
    assert _plugin_tool_calls(second) == []


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("door", DOORS)
def test_a_mixed_answer_is_stored_as_handed_back_without_our_tool(
    emu: Emulator, tmp_path: Path, door: str, stream: bool
) -> None:
    """The model calls our tool and the caller's at once: the caller gets its own tool only, then and later."""
    emu.reply(_asks_for_original(also=_use("read_file", "toolu_r1", path="a.py")))
    (first, second), _ = _run(door, emu, tmp_path, stream, stream)
    assert len(emu.requests) == 1
    assert [(b["type"], b["name"]) for b in first["content"]] == [("tool_use", "read_file")]
    assert second["content"] == first["content"] and second["stop_reason"] == "tool_use"
    assert [m["content"] for m in _stored(tmp_path)] == [first["content"]]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
@pytest.mark.parametrize("door", DOORS)
def test_a_follow_up_round_is_neither_looked_up_nor_stored(
    emu: Emulator, tmp_path: Path, door: str, stream: bool
) -> None:
    """The follow-up body (our tool call and its answer appended) is ours, not a request of the caller's."""
    emu.reply(_asks_for_original(), FINAL)
    (answer,), records = _run(door, emu, tmp_path, stream)
    assert [bool(r.get("follow_up")) for r in records] == [False, True]
    caller, follow_up = ((r.get("plugins") or {}).get("memoize") or {} for r in records)
    assert caller.get("hit") is False  # the caller's request: one miss
    assert (
        "hit" not in follow_up and follow_up.get("follow_up") is True
    )  # not looked up: not a request of theirs
    assert [m["content"] for m in _stored(tmp_path)] == [answer["content"]]
