"""Message threads in the emulator, driven by the real SDK over HTTP (``beta.messages.tool_runner`` with its defaults).

A create stores the conversation under the reply's id; a continue sends only the new messages and is validated,
billed and cached as the whole conversation; a thread expires 5 minutes after its last stored reply; the errors
carry the ``error.details.error_code`` the SDK's thread helper reads.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import anthropic
import pytest
from anthropic import beta_async_tool, beta_tool

from tokensaver.emulator import Emulator, VirtualClock
from tokensaver.testing import emulator_clients

THREADS_BETA = "message-threads-2026-08-12"
MODEL = "claude-sonnet-4-6"
# long enough to pass the minimum cacheable prefix (1024 tokens on Sonnet 4.6)
SYSTEM = "You are a careful weather assistant. " + " ".join(
    f"Rule {i}: answer briefly and cite the city." for i in range(300)
)
CITIES = ["Paris", "Rome", "Oslo"]


@beta_tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


def tool_use(city: str) -> list[dict[str, Any]]:
    return [{"type": "tool_use", "name": "get_weather", "input": {"city": city}}]


def script(emu: Emulator) -> None:
    emu.reply(*(tool_use(c) for c in CITIES), "All sunny.")


def run_loop(client: anthropic.Anthropic, **kwargs: Any) -> list[Any]:
    runner = client.beta.messages.tool_runner(
        model=MODEL,
        max_tokens=256,
        system=SYSTEM,
        tools=[get_weather],
        cache_control={"type": "ephemeral"},
        messages=[{"role": "user", "content": "What is the weather in three cities?"}],
        **kwargs,
    )
    return list(runner)


def run_loop_streamed(client: anthropic.Anthropic) -> list[Any]:
    runner = client.beta.messages.tool_runner(
        model=MODEL,
        max_tokens=256,
        system=SYSTEM,
        tools=[get_weather],
        messages=[{"role": "user", "content": "What is the weather in three cities?"}],
        stream=True,
    )
    return list(runner)


def create(client: anthropic.Anthropic, **over: Any) -> Any:
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 64,
        "system": "be brief",
        "messages": [{"role": "user", "content": "hello"}],
        "thread": {"type": "create"},
        "betas": [THREADS_BETA],
    }
    kwargs.update(over)
    return client.beta.messages.create(**kwargs)


def cont(
    client: anthropic.Anthropic, prev: str, messages: list[dict[str, Any]] | None = None, **over: Any
) -> Any:
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "and then?"}] if messages is None else messages,
        "thread": {"type": "continue", "previous_message_id": prev},
        "betas": [THREADS_BETA],
    }
    kwargs.update(over)
    return client.beta.messages.create(**kwargs)


def advance(emu: Emulator, seconds: float) -> None:
    assert isinstance(emu.clock, VirtualClock)
    emu.clock.advance(seconds)


def error_code(err: anthropic.APIStatusError) -> Any:
    assert isinstance(err.body, dict)
    return err.body["error"].get("details", {}).get("error_code")


# --- the tool loop -------------------------------------------------------------------------------------------


def test_tool_runner_loop_runs_on_a_thread(emulator: Emulator, emulator_client: anthropic.Anthropic) -> None:
    script(emulator)
    replies = run_loop(emulator_client)

    assert [r.stop_reason for r in replies] == ["tool_use"] * 3 + ["end_turn"]
    assert [r.status for r in emulator.requests] == [200] * 4
    first, *rest = emulator.requests
    assert THREADS_BETA in first.headers["anthropic-beta"]
    assert first.body["thread"] == {"type": "create"}
    assert "system" in first.body and "tools" in first.body
    for i, rec in enumerate(rest):
        # only the new tool result, from the reply before it; system and tools come from the thread
        assert rec.body["thread"] == {"type": "continue", "previous_message_id": replies[i].id}
        assert "system" not in rec.body and "tools" not in rec.body
        assert len(rec.body["messages"]) == 1
        (result,) = rec.body["messages"][0]["content"]
        assert result["type"] == "tool_result" and result["content"] == f"sunny in {CITIES[i]}"
        # the API rebuilt the whole conversation: system, tools, every earlier turn
        assert rec.expanded is not None
        assert rec.expanded["system"] == SYSTEM
        assert [t["name"] for t in rec.expanded["tools"]] == ["get_weather"]
        assert len(rec.expanded["messages"]) == 3 + 2 * i
    assert len(emulator.threads) == 1


def test_streamed_and_async_tool_runners_run_on_a_thread(emulator: Emulator) -> None:
    sync_client, async_client = emulator_clients(emulator)
    script(emulator)
    finals = [s.get_final_message() for s in run_loop_streamed(sync_client)]
    assert [m.stop_reason for m in finals] == ["tool_use"] * 3 + ["end_turn"]

    @beta_async_tool
    async def get_weather_async(city: str) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    async def run_async() -> list[Any]:
        runner = async_client.beta.messages.tool_runner(
            model=MODEL,
            max_tokens=256,
            tools=[get_weather_async],
            messages=[{"role": "user", "content": "What is the weather in three cities?"}],
        )
        return [m async for m in runner]

    emulator.reply(
        *([{"type": "tool_use", "name": "get_weather_async", "input": {"city": c}}] for c in CITIES),
        "All sunny.",
    )
    replies = asyncio.run(asyncio.wait_for(run_async(), 30))
    assert [r.stop_reason for r in replies] == ["tool_use"] * 3 + ["end_turn"]
    assert [r.status for r in emulator.requests] == [200] * 8
    threads = [r.body["thread"]["type"] for r in emulator.requests]
    assert threads == (["create"] + ["continue"] * 3) * 2
    assert all(r.stream for r in emulator.requests[:4])
    for rec in emulator.requests[1:4] + emulator.requests[5:]:
        (result,) = rec.body["messages"][0]["content"]
        assert result["content"].startswith("sunny in ")


def test_a_thread_is_billed_and_cached_like_the_whole_conversation() -> None:
    with Emulator(virtual_clock=True) as threaded, Emulator(virtual_clock=True) as full:
        script(threaded)
        script(full)
        run_loop(emulator_clients(threaded)[0])
        run_loop(emulator_clients(full)[0], thread=False)

        assert all("thread" not in r.body for r in full.requests)
        assert [len(json.dumps(r.body)) for r in threaded.requests[1:]] < [
            len(json.dumps(r.body)) for r in full.requests[1:]
        ]
        # the conversation the API rebuilt is the one the unthreaded loop sent
        for t, f in zip(threaded.requests[1:], full.requests[1:], strict=True):
            assert t.expanded is not None
            assert t.expanded["messages"] == f.body["messages"]
        assert [r.usage for r in threaded.requests] == [r.usage for r in full.requests]
        usages = [r.usage for r in threaded.requests if r.usage is not None]
        assert len(usages) == len(threaded.requests)
        assert usages[0]["cache_creation_input_tokens"] > 1024
        assert all(
            u["cache_read_input_tokens"] >= usages[0]["cache_creation_input_tokens"] for u in usages[1:]
        )


def test_earlier_turns_breakpoints_do_not_carry_over(
    emulator: Emulator, emulator_client: anthropic.Anthropic
) -> None:
    cc = {"type": "ephemeral"}

    def user(text: str) -> dict[str, Any]:
        return {"role": "user", "content": [{"type": "text", "text": text, "cache_control": cc}]}

    # four breakpoints, the most a request takes: the system's and three on the first turn's messages
    first = create(
        emulator_client,
        system=[{"type": "text", "text": SYSTEM, "cache_control": cc}],
        messages=[
            user("one"),
            {"role": "assistant", "content": "ok"},
            user("two"),
            {"role": "assistant", "content": "ok"},
            user("three"),
        ],
    )
    # a continue with its own breakpoint: the system's stays, the earlier turn's were set for that turn
    second = cont(emulator_client, first.id, [user("four")])
    assert second.type == "message"
    assert emulator.last.usage is not None
    assert emulator.last.usage["cache_read_input_tokens"] > 1024


def test_tool_runner_replays_when_the_thread_expired(
    emulator: Emulator, emulator_client: anthropic.Anthropic
) -> None:
    @beta_tool
    def slow_weather(city: str) -> str:
        """The weather in a city, after a long wait."""
        advance(emulator, 301)  # past the thread's 5 minutes
        return f"rain in {city}"

    emulator.reply([{"type": "tool_use", "name": "slow_weather", "input": {"city": "Oslo"}}], "Rainy.")
    runner = emulator_client.beta.messages.tool_runner(
        model=MODEL,
        max_tokens=256,
        tools=[slow_weather],
        messages=[{"role": "user", "content": "weather in Oslo?"}],
    )
    replies = list(runner)

    assert [r.stop_reason for r in replies] == ["tool_use", "end_turn"]
    assert [r.status for r in emulator.requests] == [200, 404, 200]
    expired, replay = emulator.requests[1:]
    assert expired.body["thread"]["type"] == "continue"
    assert expired.response is not None
    assert expired.response["error"]["details"]["error_code"] == "thread_not_found"
    # the SDK sent the whole conversation again under a new thread
    assert replay.body["thread"] == {"type": "create"}
    assert len(replay.body["messages"]) == 3


def test_a_continue_refreshes_the_five_minutes(
    emulator: Emulator, emulator_client: anthropic.Anthropic
) -> None:
    first = create(emulator_client)
    advance(emulator, 299)
    second = cont(emulator_client, first.id, [{"role": "user", "content": "one"}])
    advance(emulator, 299)  # 598 s after the create, 299 s after the last reply
    third = cont(emulator_client, second.id, [{"role": "user", "content": "two"}])
    assert third.type == "message"
    advance(emulator, 300.5)
    with pytest.raises(anthropic.NotFoundError) as info:
        cont(emulator_client, third.id, [{"role": "user", "content": "three"}])
    assert error_code(info.value) == "thread_not_found"


def test_unsupported_model_falls_back_unthreaded(
    emulator: Emulator, emulator_client: anthropic.Anthropic
) -> None:
    emulator.reply(tool_use("Paris"), "ok")
    runner = emulator_client.beta.messages.tool_runner(
        model="claude-sonnet-4-20250514",
        max_tokens=256,
        tools=[get_weather],
        messages=[{"role": "user", "content": "weather?"}],
    )
    replies = list(runner)
    assert [r.stop_reason for r in replies] == ["tool_use", "end_turn"]
    statuses = [r.status for r in emulator.requests]
    assert statuses == [400, 200, 200]
    refused = emulator.requests[0].response
    assert refused is not None
    assert refused["error"]["details"] == {
        "error_code": "thread_unsupported_request",
        "unsupported": ["model"],
    }
    assert all("thread" not in r.body for r in emulator.requests[1:])


def test_pause_turn_resumes_from_an_empty_continue(
    emulator: Emulator, emulator_client: anthropic.Anthropic
) -> None:
    emulator.reply(
        {"role": "assistant", "content": [{"type": "text", "text": "working"}], "stop_reason": "pause_turn"}
    )
    first = create(emulator_client)
    assert first.stop_reason == "pause_turn"
    second = cont(emulator_client, first.id, [])
    assert second.type == "message"
    assert emulator.last.expanded is not None
    assert emulator.last.expanded["messages"][-1]["role"] == "assistant"


# --- errors --------------------------------------------------------------------------------------------------


def test_unknown_previous_message_id(emulator: Emulator, emulator_client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as info:
        cont(emulator_client, "msg_never_sent")
    assert info.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    assert error_code(info.value) == "thread_not_found"
    assert emulator.last.usage is None


def test_a_reply_continues_once(emulator: Emulator, emulator_client: anthropic.Anthropic) -> None:
    first = create(emulator_client)
    cont(emulator_client, first.id)
    with pytest.raises(anthropic.BadRequestError) as info:
        cont(emulator_client, first.id)
    assert error_code(info.value) == "thread_already_continued"


@pytest.mark.parametrize("field", ["system", "tools"])
def test_continue_leaves_system_and_tools_out(
    emulator: Emulator, emulator_client: anthropic.Anthropic, field: str
) -> None:
    first = create(emulator_client)
    value: Any = "other" if field == "system" else [get_weather.to_dict()]
    with pytest.raises(anthropic.BadRequestError) as info:
        cont(emulator_client, first.id, **{field: value})
    assert f"`{field}` cannot be set on a thread `continue` request" in info.value.message
    # a refused continue leaves the thread as it was
    assert cont(emulator_client, first.id).type == "message"


def test_continue_whose_messages_do_not_follow(
    emulator: Emulator, emulator_client: anthropic.Anthropic
) -> None:
    emulator.reply(tool_use("Paris"))
    first = create(emulator_client, tools=[get_weather.to_dict()])
    # the reply asked for a tool: a plain user message does not answer it
    with pytest.raises(anthropic.BadRequestError) as info:
        cont(emulator_client, first.id, [{"role": "user", "content": "never mind"}])
    assert "`tool_use` ids were found without `tool_result` blocks immediately after" in info.value.message
    # an assistant message right after the stored reply
    with pytest.raises(anthropic.BadRequestError) as info:
        cont(emulator_client, first.id, [{"role": "assistant", "content": "me again"}])
    assert 'multiple "assistant" roles in a row' in info.value.message
    tid = first.content[0].id
    ok = cont(
        emulator_client,
        first.id,
        [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": tid}]}],
    )
    assert ok.type == "message"


def test_thread_needs_the_beta_header(emulator: Emulator, emulator_client: anthropic.Anthropic) -> None:
    body = {
        "model": MODEL,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "hello"}],
        "thread": {"type": "create"},
    }
    with pytest.raises(anthropic.BadRequestError) as info:
        emulator_client.post("/v1/messages", body=body, cast_to=object)
    assert "thread: Extra inputs are not permitted" in info.value.message
    assert len(emulator.threads) == 0


def test_malformed_thread(emulator_client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        create(emulator_client, thread={"type": "resume"})
    assert "thread.type" in info.value.message
    with pytest.raises(anthropic.BadRequestError) as info:
        create(emulator_client, thread={"type": "continue"})
    assert "previous_message_id: Field required" in info.value.message


def test_a_continue_in_flight_blocks_another(emulator: Emulator) -> None:
    client, _ = emulator_clients(emulator, timeout=20)
    first = create(client)
    entered, release = threading.Event(), threading.Event()

    def slow(body: dict[str, Any]) -> str:
        entered.set()
        release.wait(10)
        return "slow answer"

    emulator.reply(slow)
    results: list[Any] = []
    worker = threading.Thread(target=lambda: results.append(cont(client, first.id)), daemon=True)
    worker.start()
    try:
        assert entered.wait(10)
        with pytest.raises(anthropic.BadRequestError) as info:
            cont(client, first.id)
        assert error_code(info.value) == "thread_continue_in_flight"
    finally:
        release.set()
        worker.join(10)
    assert len(results) == 1 and results[0].type == "message"
    with pytest.raises(anthropic.BadRequestError) as info:
        cont(client, first.id)
    assert error_code(info.value) == "thread_already_continued"
