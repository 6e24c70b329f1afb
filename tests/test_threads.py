"""Message threads through tokensaver: the SDK's ``beta.messages.tool_runner`` with its defaults (a thread
create, then continues holding only the new messages), over HTTP to the emulator, through wrap() and the proxy.

Every request is one the API accepts, the tool loop completes, the ledger bills what the emulator billed, and
the counterfactual is what the caller's untransformed whole-history requests cost (a run with no plugins and
``thread=False``). Plugin-tool rounds continue the thread and hand the caller the last reply's id; an expired
thread is replayed in full and goes on.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import anthropic
import pytest
from anthropic import beta_async_tool, beta_tool

import tokensaver
from tokensaver.context import strip_cache_control
from tokensaver.emulator import Emulator, VirtualClock
from tokensaver.pricing import PriceTable, normalize_usage
from tokensaver.run import load_run
from tokensaver.testing import TEST_API_KEY, start_proxy_process, stop_proxy_process, wrap_one

MODEL = "claude-sonnet-4-6"
BOUND = 60.0
SYSTEM = "You are a careful weather assistant. " + " ".join(
    f"Rule {i}: answer briefly and cite the city." for i in range(300)
)
CITIES = ["Paris", "Rome", "Oslo"]
PRICE = PriceTable().get(MODEL)


def report(city: str) -> str:
    """A long tool output (prune and summarize have something to do)."""
    return f"sunny in {city}\n" + "".join(
        f"2026-01-01 12:00:{i % 60:02d} INFO station {i} in {city} reports 21 C, wind {i % 7} km/h\n"
        for i in range(300)
    )


@beta_tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    return report(city)


@beta_async_tool
async def get_weather_async(city: str) -> str:
    """The weather in a city."""
    return report(city)


def script(emu: Emulator, name: str = "get_weather") -> None:
    emu.reply(*([{"type": "tool_use", "name": name, "input": {"city": c}}] for c in CITIES), "All sunny.")


def loop_kwargs(**over: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "max_tokens": 256,
        "system": SYSTEM,
        "tools": [get_weather],
        "messages": [{"role": "user", "content": "What is the weather in three cities?"}],
        **over,
    }


def run_loop(client: Any, mode: str = "sync", **over: Any) -> list[str | None]:
    """The tool loop with the SDK's defaults; the stop reason of each reply."""
    if mode == "async":

        async def go() -> list[str | None]:
            runner = client.beta.messages.tool_runner(**loop_kwargs(tools=[get_weather_async], **over))
            return [m.stop_reason async for m in runner]

        return asyncio.run(asyncio.wait_for(go(), BOUND))
    if mode == "stream":
        return [
            s.get_final_message().stop_reason
            for s in client.beta.messages.tool_runner(**loop_kwargs(stream=True, **over))
        ]
    return [m.stop_reason for m in client.beta.messages.tool_runner(**loop_kwargs(**over))]


def wrapped(emu: Emulator, tmp_path: Path, asynchronous: bool = False, **cfg: Any) -> Any:
    cls = anthropic.AsyncAnthropic if asynchronous else anthropic.Anthropic
    base = cls(base_url=emu.url, api_key=TEST_API_KEY, max_retries=0, timeout=BOUND)
    return tokensaver.wrap(base, config={"runs_dir": str(tmp_path / "runs"), **cfg})


def one_plugin_wrapped(emu: Emulator, plugin: object, name: str, runs_dir: Path) -> Any:
    """A sync client for ``emu`` wrapped with only ``plugin`` (as ``name``), its runs under ``runs_dir``."""
    base = anthropic.Anthropic(base_url=emu.url, api_key=TEST_API_KEY, max_retries=0, timeout=BOUND)
    return wrap_one(base, plugin, name=name, runs_dir=runs_dir)


def loop_through_proxy(emu: Emulator, tmp_path: Path, run: str, mode: str = "sync") -> list[str | None]:
    """:func:`run_loop` through a ``tokensaver proxy`` process in front of ``emu`` (config
    ``tmp_path/tokensaver.toml``, run ``run``), returning once its runs dir holds four records (or after
    BOUND seconds); the stop reasons."""
    runs = tmp_path / "runs"
    proc, url = start_proxy_process(
        "--upstream", emu.url, "--run", run, "--config", str(tmp_path / "tokensaver.toml"), cwd=tmp_path
    )
    try:
        with anthropic.Anthropic(base_url=url, api_key=TEST_API_KEY, max_retries=0, timeout=BOUND) as client:
            stops = run_loop(client, mode)
            deadline = time.monotonic() + BOUND
            while len(load_run(run, runs).records()) < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        stop_proxy_process(proc)
    return stops


def breakpoints(value: Any) -> int:
    if isinstance(value, dict):
        return ("cache_control" in value) + sum(breakpoints(v) for v in value.values())
    if isinstance(value, list):
        return sum(breakpoints(v) for v in value)
    return 0


def check_thread_requests(emu: Emulator) -> None:
    """Every request accepted; each continue holds only new messages and names the reply before it."""
    assert [r.status for r in emu.requests] == [200] * len(emu.requests)
    ids = [f"msg_emu_{i}" for i in range(1, len(emu.requests) + 1)]
    assert emu.requests[0].body["thread"] == {"type": "create"}
    for i, rec in enumerate(emu.requests[1:]):
        assert rec.body["thread"] == {"type": "continue", "previous_message_id": ids[i]}
        assert "system" not in rec.body and "tools" not in rec.body
        assert len(rec.body["messages"]) == 1
        assert rec.expanded is not None and breakpoints(rec.expanded) <= 4


def check_billing(records: list[dict[str, Any]], emu: Emulator) -> None:
    """The ledger bills what the emulator billed, call by call."""
    assert [r["status"] for r in records] == [200] * len(emu.requests)
    assert [r["usage"] for r in records] == [normalize_usage(r.usage) for r in emu.requests]
    for rec, req in zip(records, emu.requests, strict=True):
        assert rec["cost_usd"] == pytest.approx(PRICE.cost(normalize_usage(req.usage)), abs=1e-8)


def untransformed_run(tmp_path: Path, mode: str = "sync") -> list[dict[str, Any]]:
    """The caller's own requests: no plugins, the whole history sent each turn; their records."""
    with Emulator(virtual_clock=True) as full:
        script(full, "get_weather_async" if mode == "async" else "get_weather")
        client = wrapped(full, tmp_path / "full", asynchronous=mode == "async", plugins=[])
        assert run_loop(client, mode, thread=False) == ["tool_use"] * 3 + ["end_turn"]
        assert all("thread" not in r.body for r in full.requests)
        records = list(client.tokensaver.records)
        check_billing(records, full)
        return records


def untransformed_costs(tmp_path: Path, mode: str = "sync") -> list[float]:
    """What the caller's own requests cost: no plugins, the whole history sent each turn."""
    return [r["cost_usd"] for r in untransformed_run(tmp_path, mode)]


@pytest.mark.parametrize("mode", ["sync", "stream", "async"])
def test_tool_runner_through_wrap_transforms_only_new_messages(
    emu: Emulator, tmp_path: Path, mode: str
) -> None:
    script(emu, "get_weather_async" if mode == "async" else "get_weather")
    client = wrapped(emu, tmp_path, asynchronous=mode == "async")
    assert run_loop(client, mode) == ["tool_use"] * 3 + ["end_turn"]
    check_thread_requests(emu)
    records = list(client.tokensaver.records)
    check_billing(records, emu)
    assert all(not r["errors"] for r in records)
    # the transforms reached the continues (the new tool results), not just the create
    assert any(s["changed"] for r in records[1:] for s in r["stages"])
    # the honest counterfactual: the caller's untransformed whole-history requests
    expected = untransformed_costs(tmp_path, mode)
    assert [r["counterfactual_usd"] for r in records] == pytest.approx(expected, abs=1e-8)
    assert sum(r["cost_usd"] for r in records) < sum(expected)


def test_without_plugins_a_thread_costs_what_it_billed(emu: Emulator, tmp_path: Path) -> None:
    script(emu)
    client = wrapped(emu, tmp_path, plugins=[])
    assert run_loop(client) == ["tool_use"] * 3 + ["end_turn"]
    check_thread_requests(emu)
    records = list(client.tokensaver.records)
    check_billing(records, emu)
    costs = [r["cost_usd"] for r in records]
    assert [r["counterfactual_usd"] for r in records] == pytest.approx(costs, abs=1e-8)
    full = untransformed_run(tmp_path)
    assert costs == pytest.approx([r["cost_usd"] for r in full], abs=1e-8)
    # the token figures follow the thread's whole conversation too, as the unthreaded requests'
    for key in ("tokens_original", "tokens_sent", "conversation"):
        assert [r[key] for r in records] == [r[key] for r in full]


def test_tool_runner_through_the_proxy(emu: Emulator, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    (tmp_path / "tokensaver.toml").write_text(f'runs_dir = "{runs}"\n')
    script(emu)
    assert loop_through_proxy(emu, tmp_path, "threads") == ["tool_use"] * 3 + ["end_turn"]
    check_thread_requests(emu)
    records = load_run("threads", runs).records()
    check_billing(records, emu)
    assert any(s["changed"] for r in records[1:] for s in r["stages"])
    assert [r["counterfactual_usd"] for r in records] == pytest.approx(
        untransformed_costs(tmp_path), abs=1e-8
    )


def _ask_for_original(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The model calls summarize's retrieval tool for the ref in the latest tool result."""
    sent = body["messages"][-1]["content"][0]["content"]
    text = sent if isinstance(sent, str) else " ".join(b.get("text", "") for b in sent)
    ref = re.search(r"with ref ([0-9a-f]+)", text)
    assert ref is not None, "the tool result was not shortened with a ref"
    return [
        {"type": "tool_use", "id": "toolu_r1", "name": "tokensaver_retrieve", "input": {"ref": ref.group(1)}}
    ]


@pytest.mark.parametrize("mode", ["sync", "stream", "async"])
def test_a_plugin_tool_round_continues_the_thread(emu: Emulator, tmp_path: Path, mode: str) -> None:
    name = "get_weather_async" if mode == "async" else "get_weather"
    emu.reply(
        [{"type": "tool_use", "name": name, "input": {"city": "Paris"}}],
        _ask_for_original,  # on the continue with the shortened result: a round the caller never sees
        [{"type": "tool_use", "name": name, "input": {"city": "Rome"}}],
        "All sunny.",
    )
    client = wrapped(
        emu, tmp_path, asynchronous=mode == "async", plugins=["summarize"], summarize={"retrieval": True}
    )
    assert run_loop(client, mode) == ["tool_use", "tool_use", "end_turn"]
    check_thread_requests(emu)
    # the plugin's round continued the thread with the original alone
    (answer,) = emu.requests[2].body["messages"][0]["content"]
    assert answer == {"type": "tool_result", "tool_use_id": "toolu_r1", "content": report("Paris")}
    # the caller was handed the last round's reply: its next continue names that id (checked above)
    records = list(client.tokensaver.records)
    check_billing(records, emu)
    assert [bool(r.get("follow_up")) for r in records] == [False, False, True, False]
    assert records[2]["counterfactual_usd"] == 0.0  # a round the caller never asked for


def test_an_expired_thread_is_replayed_in_full(emu: Emulator, tmp_path: Path) -> None:
    clock = emu.clock
    assert isinstance(clock, VirtualClock)
    calls: list[str] = []

    @beta_tool
    def slow_weather(city: str) -> str:
        """The weather in a city, after a long wait (the thread expires meanwhile)."""
        calls.append(city)
        if city == "Rome":
            clock.advance(301)
        return report(city)

    emu.reply(
        *([{"type": "tool_use", "name": "slow_weather", "input": {"city": c}}] for c in CITIES), "All sunny."
    )
    client = wrapped(emu, tmp_path)
    assert run_loop(client, tools=[slow_weather]) == ["tool_use"] * 3 + ["end_turn"]
    statuses = [r.status for r in emu.requests]
    assert statuses == [200, 200, 404, 200, 200]
    replay = emu.requests[3].body
    assert replay["thread"] == {"type": "create"} and len(replay["messages"]) == 5
    assert emu.requests[4].body["thread"]["type"] == "continue"  # the replay's reply goes on
    # the transforms are per message: the replay gives the API the prefix the lost thread held
    held = emu.requests[1].expanded
    assert held is not None and emu.requests[1].response is not None
    lost = [*held["messages"], {"role": "assistant", "content": emu.requests[1].response["content"]}]
    assert strip_cache_control(replay["messages"][:4]) == strip_cache_control(lost)
    records = list(client.tokensaver.records)
    assert [r["status"] for r in records] == statuses
    assert all(not r["errors"] for r in records)
    ok = [r for r in records if r["status"] == 200]
    billed = [req for req in emu.requests if req.status == 200]
    assert [r["usage"] for r in ok] == [normalize_usage(r.usage) for r in billed]
    # the continue after the replay is known as the whole conversation: counted and billed as such
    create, last = records[3], records[4]
    assert last["tokens_original"] > create["tokens_original"]
    assert last["counterfactual_usd"] > create["counterfactual_usd"]
    assert any(s["changed"] for s in last["stages"])


def test_memoize_leaves_thread_requests_to_the_api(emu: Emulator, tmp_path: Path) -> None:
    """A stored answer's id is unknown to the API: a thread served from memory could not be continued."""
    client = wrapped(
        emu,
        tmp_path,
        plugins=["memoize", "summarize", "prune", "cache_align"],
        memoize={"dir": str(tmp_path / "m")},
    )
    for _ in range(2):
        script(emu)
        assert run_loop(client) == ["tool_use"] * 3 + ["end_turn"]
    assert [r.status for r in emu.requests] == [200] * 8
    assert [r.body["thread"]["type"] for r in emu.requests] == (["create"] + ["continue"] * 3) * 2
    assert not any(r["short_circuit"] for r in client.tokensaver.records)


def test_continue_stays_within_the_breakpoints_the_create_left(emu: Emulator, tmp_path: Path) -> None:
    """The create's system and tools breakpoints count on every continue: cache_align adds none past 4."""
    cc = {"type": "ephemeral"}
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    system = [{"type": "text", "text": f"{SYSTEM} Part {i}.", "cache_control": cc} for i in range(3)]
    tools = [
        {"name": "get_weather", "description": "The weather.", "input_schema": schema, "cache_control": cc}
    ]
    emu.reply("one", "two")
    client = wrapped(emu, tmp_path)
    common: dict[str, Any] = {"model": MODEL, "max_tokens": 64, "betas": ["message-threads-2026-08-12"]}
    first = client.beta.messages.create(
        **common,
        thread={"type": "create"},
        system=system,
        tools=tools,
        messages=[{"role": "user", "content": "hi"}],
    )
    client.beta.messages.create(
        **common,
        thread={"type": "continue", "previous_message_id": first.id},
        messages=[{"role": "user", "content": report("Rome")}],  # long enough for a breakpoint of its own
    )
    assert [r.status for r in emu.requests] == [200, 200]
    assert emu.requests[1].expanded is not None and breakpoints(emu.requests[1].expanded) == 4


def test_a_plugin_tool_call_beside_the_callers_is_answered_on_the_next_continue(
    emu: Emulator, tmp_path: Path
) -> None:
    """The caller never sees the plugin's tool call the thread holds; its continue answers only its own."""

    def both(body: dict[str, Any]) -> list[dict[str, Any]]:
        (retrieve,) = _ask_for_original(body)
        return [
            retrieve,
            {"type": "tool_use", "id": "toolu_w2", "name": "get_weather", "input": {"city": "Rome"}},
        ]

    emu.reply([{"type": "tool_use", "name": "get_weather", "input": {"city": "Paris"}}], both, "All sunny.")
    client = wrapped(emu, tmp_path, plugins=["summarize"], summarize={"retrieval": True})
    assert run_loop(client) == ["tool_use", "tool_use", "end_turn"]
    check_thread_requests(emu)
    results = emu.requests[2].body["messages"][0]["content"]
    assert {b["tool_use_id"] for b in results} == {"toolu_r1", "toolu_w2"}
    records = list(client.tokensaver.records)
    check_billing(records, emu)


@pytest.mark.parametrize("stream", [False, True])
def test_a_plugin_tool_round_continues_the_thread_through_the_proxy(
    emu: Emulator, tmp_path: Path, stream: bool
) -> None:
    runs = tmp_path / "runs"
    toml = f'plugins = ["summarize"]\nruns_dir = "{runs}"\n[summarize]\nretrieval = true\n'
    (tmp_path / "tokensaver.toml").write_text(toml)
    emu.reply(
        [{"type": "tool_use", "name": "get_weather", "input": {"city": "Paris"}}],
        _ask_for_original,
        [{"type": "tool_use", "name": "get_weather", "input": {"city": "Rome"}}],
        "All sunny.",
    )
    stops = loop_through_proxy(emu, tmp_path, "rounds", "stream" if stream else "sync")
    assert stops == ["tool_use", "tool_use", "end_turn"]
    check_thread_requests(emu)
    (answer,) = emu.requests[2].body["messages"][0]["content"]
    assert answer == {"type": "tool_result", "tool_use_id": "toolu_r1", "content": report("Paris")}
    records = load_run("rounds", runs).records()
    check_billing(records, emu)
    assert [bool(r.get("follow_up")) for r in records] == [False, False, True, False]


def _four_breakpoints_create(client: Any) -> Any:
    cc = {"type": "ephemeral"}
    system = [{"type": "text", "text": f"{SYSTEM} Part {i}.", "cache_control": cc} for i in range(4)]
    return client.beta.messages.create(
        model=MODEL,
        max_tokens=64,
        betas=["message-threads-2026-08-12"],
        thread={"type": "create"},
        system=system,
        messages=[{"role": "user", "content": "hi"}],
    )


def _continue_with_rome(client: Any, previous_message_id: str) -> Any:
    """A continue of that thread whose new message is Rome's weather report."""
    return client.beta.messages.create(
        model=MODEL,
        max_tokens=64,
        betas=["message-threads-2026-08-12"],
        thread={"type": "continue", "previous_message_id": previous_message_id},
        messages=[{"role": "user", "content": report("Rome")}],
    )


def test_a_thread_not_seen_here_is_continued_untransformed(emu: Emulator, tmp_path: Path) -> None:
    """Another process made the thread: its history is unknown here, so its continue goes as it came."""
    emu.reply("one", "two")
    first = _four_breakpoints_create(wrapped(emu, tmp_path / "a"))
    other = wrapped(emu, tmp_path / "b")
    _continue_with_rome(other, first.id)
    assert [r.status for r in emu.requests] == [200, 200]
    assert emu.requests[1].body["messages"] == [{"role": "user", "content": report("Rome")}]
    (record,) = other.tokensaver.records
    assert record["status"] == 200 and record["stages"] == [] and not record["errors"]
    assert record["usage"] == normalize_usage(emu.requests[1].usage)


def test_what_a_pipeline_keeps_of_threads_is_bounded(emu: Emulator, tmp_path: Path) -> None:
    """A byte cap on the threads kept: the least recently used go, and their continues still work."""
    client = wrapped(emu, tmp_path)
    cap = 60_000  # one of these threads at its second turn, not two
    client.tokensaver.threads.max_bytes = cap
    script(emu)
    script(emu)
    one = client.beta.messages.tool_runner(**loop_kwargs())
    two = client.beta.messages.tool_runner(**loop_kwargs())
    stops: list[list[str | None]] = [[], []]
    runners = [iter(one), iter(two)]
    done = [False, False]
    while not all(done):  # the two tool loops interleaved, one reply each in turn
        for k, runner in enumerate(runners):
            message = None if done[k] else next(runner, None)
            if message is None:
                done[k] = True
                continue
            stops[k].append(message.stop_reason)
            assert client.tokensaver.threads.nbytes <= cap
    assert all(s[-1] == "end_turn" for s in stops)
    assert [r.status for r in emu.requests] == [200] * 8
    records = list(client.tokensaver.records)
    check_billing(records, emu)
    # a continue whose thread was let go is sent as it came: no stage ran on it
    assert any(r["stages"] == [] for r in records)
    assert len(client.tokensaver.threads) <= 1


def test_exact_token_counts_count_the_whole_conversation(emu: Emulator, tmp_path: Path) -> None:
    """count_tokens knows no threads: exact mode counts the conversations a continue stands for."""
    script(emu)
    client = wrapped(emu, tmp_path, token_count="exact")
    assert run_loop(client) == ["tool_use"] * 3 + ["end_turn"]
    records = list(client.tokensaver.records)
    assert all(not r["errors"] for r in records)
    originals = [r["tokens_original_exact"] for r in records]
    assert originals == sorted(originals) and len(set(originals)) == 4  # the history grows each turn
    assert all(r["tokens_sent_exact"] <= r["tokens_original_exact"] for r in records)


def test_a_proxy_session_continues_a_thread_another_session_made(emu: Emulator, tmp_path: Path) -> None:
    """The API's threads are per key, not per tokensaver session: a continue in another run is known."""
    runs = tmp_path / "runs"
    (tmp_path / "tokensaver.toml").write_text(f'runs_dir = "{runs}"\n')
    emu.reply("one", "two")
    proc, url = start_proxy_process(
        "--upstream", emu.url, "--run", "first", "--config", str(tmp_path / "tokensaver.toml"), cwd=tmp_path
    )
    try:
        opts: dict[str, Any] = {"base_url": url, "api_key": TEST_API_KEY, "max_retries": 0, "timeout": BOUND}
        with anthropic.Anthropic(**opts) as one:
            first = _four_breakpoints_create(one)
        with anthropic.Anthropic(**opts, default_headers={"x-tokensaver-run": "second"}) as two:
            _continue_with_rome(two, first.id)
        deadline = time.monotonic() + BOUND
        while not load_run("second", runs).records() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop_proxy_process(proc)
    assert [r.status for r in emu.requests] == [200, 200]
    (created,) = load_run("first", runs).records()
    (continued,) = load_run("second", runs).records()
    assert continued["stages"] and not continued["errors"]  # its stages ran on the whole conversation
    assert continued["conversation"] == created["conversation"]
    assert continued["tokens_original"] > created["tokens_original"]


class Stamp:
    """A plugin that rewrites the system prompt on every call and every tool result it sees."""

    calls = 0

    @tokensaver.hookimpl
    def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> dict[str, Any]:
        Stamp.calls += 1
        msgs = [
            {
                **m,
                "content": [
                    {**b, "content": "short"} if b.get("type") == "tool_result" else b for b in m["content"]
                ],
            }
            if isinstance(m.get("content"), list)
            else m
            for m in body["messages"]
        ]
        return {**body, "system": f"call {Stamp.calls}", "messages": msgs}


class Shorten:
    """A plugin that shortens every tool result it sees, old or new."""

    @tokensaver.hookimpl
    def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> dict[str, Any]:
        def short(b: Any) -> Any:
            if isinstance(b, dict) and b.get("type") == "tool_result" and isinstance(b.get("content"), str):
                return {**b, "content": b["content"][:40]}
            return b

        msgs = [
            {**m, "content": [short(b) for b in m["content"]]} if isinstance(m.get("content"), list) else m
            for m in body["messages"]
        ]
        return {**body, "messages": msgs}


def test_a_stage_that_would_change_the_threads_system_is_discarded(emu: Emulator, tmp_path: Path) -> None:
    """A stage changing system on a continue is discarded (the API refuses system there, and keeps the
    create's); the request goes as the stages before it left it."""
    script(emu)
    client = one_plugin_wrapped(emu, Stamp(), "stamp", tmp_path / "runs")
    assert run_loop(client) == ["tool_use"] * 3 + ["end_turn"]
    check_thread_requests(emu)
    assert emu.requests[0].body["system"] == "call 1"
    records = list(client.tokensaver.records)
    assert [[e["kind"] for e in r["errors"]] for r in records] == [[], ["thread"], ["thread"], ["thread"]]
    assert all(rec.body["messages"][0]["content"][0]["content"] != "short" for rec in emu.requests[1:])


def test_a_stage_editing_held_messages_keeps_its_edit_of_the_new_ones(emu: Emulator, tmp_path: Path) -> None:
    script(emu)
    client = one_plugin_wrapped(emu, Shorten(), "shorten", tmp_path / "runs")
    assert run_loop(client) == ["tool_use"] * 3 + ["end_turn"]
    check_thread_requests(emu)
    for i, rec in enumerate(emu.requests[1:]):
        (result,) = rec.body["messages"][0]["content"]
        assert result["content"] == report(CITIES[i])[:40]  # the new result, shortened
    records = list(client.tokensaver.records)
    assert all(not r["errors"] for r in records) and all(r["stages"][0]["changed"] for r in records[1:])
    check_billing(records, emu)
    # the same figures as the same plugin on the unthreaded loop (it shortens the whole history each turn)
    with Emulator(virtual_clock=True) as full:
        script(full)
        plain = one_plugin_wrapped(full, Shorten(), "shorten", tmp_path / "full")
        assert run_loop(plain, thread=False) == ["tool_use"] * 3 + ["end_turn"]
        unthreaded = list(plain.tokensaver.records)
    for key in ("tokens_original", "tokens_sent", "cost_usd", "counterfactual_usd"):
        assert [r[key] for r in records] == [r[key] for r in unthreaded], key
