"""Async parity: what tests/test_wrap.py and friends check for ``wrap(anthropic.Anthropic)``, checked for
``wrap(anthropic.AsyncAnthropic)`` over HTTP to the emulator: every surface streamed and not, a stored
answer served in each form, a failing plugin skipped (fail open), API errors and retries passed through,
early-closed streams, copies of the client, and a conversation billed and reported with the same figures
as through the sync client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anthropic
import pytest

import tokensaver
from tokensaver.emulator import Emulator, EmulatorError
from tokensaver.testing import (
    FULL_USAGE,
    SURFACES,
    TEST_API_KEY,
    ResponseObserver,
    SystemTagger,
    async_surface_text,
    one_plugin_client,
    stored_message,
    wrap_one,
)

MODEL = "claude-sonnet-4-6"
MSGS = [{"role": "user", "content": "What is the capital of France?"}]
KW: dict[str, Any] = {"model": MODEL, "max_tokens": 50, "messages": MSGS}
BOUND = 60.0  # seconds: every awaited call is bounded, so a regression fails instead of hanging CI
T = TypeVar("T")


def arun(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion on a fresh loop, bounded by BOUND."""

    async def bounded() -> T:
        return await asyncio.wait_for(make(), BOUND)

    return asyncio.run(bounded())


class Stored:
    """Serves a stored answer for 'again?' and leaves every other call to the network."""

    @tokensaver.hookimpl
    def tokensaver_lookup_response(self, body: dict[str, Any], ctx: Any) -> dict[str, Any] | None:
        if body["messages"][-1]["content"] != "again?":
            return None
        ctx.response_headers["x-stored"] = "yes"
        return stored_message(
            body["model"], "from the store", tool_input={"a": [1, 2]}, usage=dict(FULL_USAGE)
        )


class Faulty:
    """Raises in every hook it implements: each call must still be answered as without it."""

    def __init__(self) -> None:
        self.calls = 0

    @tokensaver.hookimpl
    def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> dict[str, Any]:
        self.calls += 1
        raise RuntimeError("transform exploded")

    @tokensaver.hookimpl
    def tokensaver_lookup_response(self, body: dict[str, Any], ctx: Any) -> dict[str, Any]:
        raise RuntimeError("lookup exploded")

    @tokensaver.hookimpl
    def tokensaver_observe_response(self, body: dict[str, Any], response: dict[str, Any], ctx: Any) -> None:
        raise RuntimeError("observe exploded")


@pytest.mark.parametrize("mode", SURFACES)
def test_every_surface_transforms_and_records(emu: Emulator, mode: str) -> None:
    base = anthropic.AsyncAnthropic(base_url=emu.url, api_key=TEST_API_KEY, max_retries=0)
    client = wrap_one(base, SystemTagger(), name="tagger")
    assert isinstance(client, anthropic.AsyncAnthropic) and client is not base
    emu.reply("Paris.")

    async def main() -> str:
        text = await async_surface_text(client, mode, **KW)
        await base.messages.create(**KW)
        return text

    assert arun(main) == "Paris."
    wrapped, own = emu.requests
    assert wrapped.body["system"] == " [tagged]"  # the transformed body reached the wire
    assert "system" not in own.body  # the caller's own client is not wrapped
    (record,) = client.tokensaver.records
    assert record["status"] == 200 and record["stages"][0]["plugin"] == "tagger"
    assert record["usage"]["input_tokens"] == wrapped["usage"]["input_tokens"]
    assert record["surface"] == ("beta" if mode == "beta" else "messages")


@pytest.mark.parametrize("mode", ["create", "create_stream", "stream_helper", "raw", "streaming_response"])
def test_a_stored_answer_never_reaches_the_network(emu: Emulator, mode: str) -> None:
    client = one_plugin_client(emu, Stored(), name="stored", asynchronous=True)
    kw = {**KW, "messages": [{"role": "user", "content": "again?"}]}

    async def main() -> Any:
        if mode == "create":
            return await client.messages.create(**kw)
        if mode == "create_stream":
            stream = await client.messages.create(**kw, stream=True)
            types = [e.type async for e in stream]
            assert types[0] == "message_start" and types[-1] == "message_stop"
            async with client.messages.stream(**kw) as s:
                return await s.get_final_message()
        if mode == "stream_helper":
            async with client.messages.stream(**kw) as s:
                return await s.get_final_message()
        if mode == "raw":
            raw = await client.messages.with_raw_response.create(**kw)
            assert raw.headers["x-stored"] == "yes"
            assert raw.headers["x-tokensaver-short-circuit"] == "stored"
            return await raw.parse()
        async with client.messages.with_streaming_response.create(**kw) as resp:
            return await resp.parse()

    message = arun(main)
    assert emu.requests == []
    assert message.content[0].text == "from the store" and message.content[1].input == {"a": [1, 2]}
    assert message.usage.input_tokens == 100
    record = client.tokensaver.records[-1]
    assert record["short_circuit"] == "stored" and record["cost_usd"] == 0 and record["saved_usd"] > 0


@pytest.mark.parametrize("mode", ["create", "stream_helper"])
def test_a_failing_plugin_is_skipped_and_blamed(emu: Emulator, mode: str) -> None:
    plugin = Faulty()
    client = one_plugin_client(emu, plugin, name="faulty", asynchronous=True)
    emu.reply("Paris.")
    assert arun(lambda: async_surface_text(client, mode, **KW)) == "Paris."
    sent = {k: v for k, v in emu.last.body.items() if k != "stream"}
    assert sent == KW and plugin.calls == 1  # the caller's own request went out
    blamed = {(e["plugin"], e["hook"]) for e in client.tokensaver.records[-1]["errors"]}
    assert blamed == {
        ("faulty", "tokensaver_transform_request"),
        ("faulty", "tokensaver_lookup_response"),
        ("faulty", "tokensaver_observe_response"),
    }


def test_strict_mode_raises_naming_the_plugin(emu: Emulator) -> None:
    client = one_plugin_client(emu, Faulty(), name="faulty", asynchronous=True, strict=True)
    with pytest.raises(tokensaver.TransformError, match="faulty"):
        arun(lambda: client.messages.create(**KW))
    assert emu.requests == []


def test_api_errors_pass_through_and_retries_run_the_pipeline_per_attempt(emu: Emulator) -> None:
    client = one_plugin_client(emu, SystemTagger(), name="tagger", asynchronous=True)
    emu.reply(EmulatorError.overloaded(retry_after=0))
    with pytest.raises(anthropic.APIStatusError) as info:
        arun(lambda: client.messages.create(**KW))
    assert info.value.status_code == 529
    assert client.tokensaver.records[-1]["status"] == 529 and client.tokensaver.records[-1]["saved_usd"] == 0

    base = anthropic.AsyncAnthropic(base_url=emu.url, api_key=TEST_API_KEY, max_retries=1)
    retrying = wrap_one(base, SystemTagger(), name="tagger")
    emu.reset()
    emu.reply(EmulatorError.overloaded(retry_after=0), "ok")
    assert arun(lambda: retrying.messages.create(**KW)).content[0].text == "ok"
    assert emu.requests[0].body == emu.requests[1].body  # the same transformed bytes on both attempts
    assert [(r["attempt"], r["status"]) for r in retrying.tokensaver.records] == [(0, 529), (1, 200)]


def test_with_options_copy_keeps_the_pipeline(emu: Emulator) -> None:
    client = one_plugin_client(emu, SystemTagger(), name="tagger", asynchronous=True)
    copy = client.with_options(timeout=30, api_key="sk-other-key")
    arun(lambda: copy.messages.create(**KW))
    assert emu.last.body["system"] == " [tagged]" and copy.tokensaver is client.tokensaver


def test_other_endpoints_pass_through(emu: Emulator) -> None:
    client = one_plugin_client(emu, SystemTagger(), name="tagger", asynchronous=True)
    assert arun(lambda: client.messages.count_tokens(model=MODEL, messages=MSGS)).input_tokens > 0
    assert "system" not in emu.last.body and list(client.tokensaver.records) == []


def test_a_stream_closed_early_is_incomplete_and_not_observed(emu: Emulator) -> None:
    observer = ResponseObserver()
    observed = observer.observed
    client = one_plugin_client(emu, observer, name="observer", asynchronous=True)

    async def main() -> None:
        emu.reply("a long answer " * 200)
        stream = await client.messages.create(**KW, stream=True)
        async for event in stream:
            if event.type == "content_block_start":
                break
        await stream.close()
        assert observed == [] and client.tokensaver.records[-1]["status"] == "incomplete"
        emu.reply("short")
        [e async for e in await client.messages.create(**KW, stream=True)]

    arun(main)
    assert observed[-1]["content"][0]["text"] == "short" and observed[-1]["usage"]["output_tokens"] > 0


def test_a_stream_record_has_the_usage_billed_in_its_events(emu: Emulator) -> None:
    client = one_plugin_client(emu, SystemTagger(), name="tagger", asynchronous=True)
    big = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "word " * 3000, "cache_control": {"type": "ephemeral"}}],
        }
    ]

    async def main() -> None:
        for _ in range(2):
            async with client.messages.stream(model=MODEL, max_tokens=50, messages=big) as s:
                await s.get_final_message()

    arun(main)
    first, second = client.tokensaver.records
    assert first["usage"]["cache_creation_input_tokens"] > 0
    assert second["usage"]["cache_read_input_tokens"] == first["usage"]["cache_creation_input_tokens"]


# -- the same conversation through both clients bills and reports the same ------------------

LOG = "".join(f"2026-01-01 12:00:{i % 60:02d} INFO worker {i} processed batch {i * 7}\n" for i in range(600))
BASH = {"name": "bash", "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}}}


def _turns() -> list[list[dict[str, Any]]]:
    """A growing agent conversation: each entry is the messages of one call."""
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "text", "text": "Run the job, then tell me about it. " * 300}]}
    ]
    calls = []
    for i in range(4):
        calls.append([*messages])
        tool_use = {
            "type": "tool_use",
            "id": f"toolu_{i}",
            "name": "bash",
            "input": {"command": f"./job {i}"},
        }
        messages += [
            {"role": "assistant", "content": [tool_use]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": f"toolu_{i}", "content": LOG}],
            },
        ]
    calls.append(messages)
    return calls


FIGURES = ("status", "usage", "cost_usd", "saved_usd", "tokens_original", "tokens_sent", "short_circuit")


def _figures(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for r in records:
        stages = [
            {k: s.get(k) for k in ("plugin", "before", "after", "saved_tokens", "error")} for s in r["stages"]
        ]
        out.append({**{k: r.get(k) for k in FIGURES}, "stages": stages, "errors": r.get("errors")})
    return out


def _conversation(
    asynchronous: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Any, list[Any]]:
    """The default plugins over one conversation, on a fresh emulator and a fresh cache dir."""
    side = "async" if asynchronous else "sync"
    monkeypatch.setenv("TOKENSAVER_CACHE_DIR", str(tmp_path / side / "cache"))
    with Emulator(virtual_clock=True, start_time=1_767_225_600.0) as emu:
        cls = anthropic.AsyncAnthropic if asynchronous else anthropic.Anthropic
        base = cls(base_url=emu.url, api_key=TEST_API_KEY, max_retries=0)
        client = tokensaver.wrap(
            base, config={"runs_dir": str(tmp_path / side)}, run="parity", clock=emu.clock.now
        )
        calls = [{"model": MODEL, "max_tokens": 200, "tools": [BASH], "messages": m} for m in _turns()]
        for kw in calls:
            emu.reply([{"type": "text", "text": f"noted {len(kw['messages'])}"}])
        if asynchronous:

            async def main() -> None:
                for kw in calls:
                    await client.messages.create(**kw)
                    emu.clock.advance(30)

            arun(main)
        else:
            for kw in calls:
                client.messages.create(**kw)
                emu.clock.advance(30)
        return client, [r.body for r in emu.requests]


def test_a_conversation_bills_and_reports_the_same_as_through_the_sync_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync, sync_sent = _conversation(False, tmp_path, monkeypatch)
    async_, async_sent = _conversation(True, tmp_path, monkeypatch)
    assert async_sent == sync_sent  # the same bytes on the wire
    sync_records, async_records = list(sync.tokensaver.records), list(async_.tokensaver.records)
    assert len(sync_records) == len(_turns())
    assert any(s["after"] < s["before"] for r in sync_records for s in r["stages"])  # the plugins did work
    assert _figures(async_records) == _figures(sync_records)
    sync_totals = sync.tokensaver.run.report().to_dict()["totals"]
    async_totals = async_.tokensaver.run.report().to_dict()["totals"]
    assert async_totals == sync_totals and sync_totals["saved_usd"] > 0
    assert sync_totals["usage"]["cache_read_input_tokens"] > 0  # cache_align's breakpoints were read back
