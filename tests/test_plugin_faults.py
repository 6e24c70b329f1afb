"""Plugin faults are contained: a stage that hangs, raises, edits its input in place or emits a request
the API would refuse is discarded and blamed by name, and the caller's original request goes out;
a lookup answer that is not a Message is not served. Through wrap() and the proxy, to the emulator.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import conversations, turns

import tokensaver
from tokensaver.emulator import Emulator, EmulatorError, validate
from tokensaver.errors import ConfigError
from tokensaver.pipeline import Pipeline
from tokensaver.plugins import get_plugin_manager
from tokensaver.proxy import ProxyServer
from tokensaver.testing import stored_message

MODEL = "claude-sonnet-4-6"
HEADERS = {"x-api-key": "test-key", "anthropic-version": "2023-06-01"}
BOUND = 30.0  # every wait in this file is bounded: a regression fails instead of hanging CI

# a conversation with a tool round and thinking: enough structure for every invalid output below
ORIGINAL: dict[str, Any] = {
    "model": MODEL,
    "max_tokens": 2048,
    "thinking": {"type": "enabled", "budget_tokens": 1024},
    "system": [{"type": "text", "text": "You are a careful agent."}],
    "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Read the file."}]},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "I should read it.", "signature": "sig-1"},
                {"type": "tool_use", "id": "toolu_1", "name": "read_file", "input": {"path": "a.py"}},
            ],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "print('hello')"}],
        },
    ],
    "tools": [
        {"name": "read_file", "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}}
    ],
}


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """Set at teardown: lets the hanging plugins' threads finish."""
    event = threading.Event()
    yield event
    event.set()


def _config(tmp_path: Path, order: list[str], **cfg: Any) -> dict[str, Any]:
    return {"plugins": order, "runs_dir": str(tmp_path / "runs"), "record": False, **cfg}


def _wrap(emu: Emulator, tmp_path: Path, plugins: dict[str, Any], **cfg: Any) -> Any:
    pm = get_plugin_manager(plugins, load_entrypoints=False)
    base = anthropic.Anthropic(base_url=emu.url, api_key="test-key", max_retries=0)
    return tokensaver.wrap(base, config=_config(tmp_path, list(plugins), **cfg), plugin_manager=pm)


def _proxy(emu: Emulator, tmp_path: Path, plugins: dict[str, Any], **cfg: Any) -> ProxyServer:
    pm = get_plugin_manager(plugins, load_entrypoints=False)
    return ProxyServer(
        _config(tmp_path, list(plugins), **cfg), upstream=emu.url, plugin_manager=pm, run="faults"
    )


def _bounded(fn: Any, *args: Any) -> Any:
    """Run ``fn`` in a thread; fail the test if it has not finished within BOUND seconds."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn, *args).result(timeout=BOUND)


def _blame(record: dict[str, Any], plugin: str) -> list[str]:
    return [e["kind"] for e in record["errors"] if e["plugin"] == plugin]


def _send(door: str, emu: Emulator, tmp_path: Path, plugins: dict[str, Any], body: dict[str, Any]) -> Any:
    """Send ``body`` through wrap() or the proxy; return (the answer's text, the call's record)."""
    if door == "wrap":
        client = _wrap(emu, tmp_path, plugins)
        msg = _bounded(lambda: client.messages.create(**copy.deepcopy(body)))
        return msg.content[-1].text, client.tokensaver.records[-1]
    with _proxy(emu, tmp_path, plugins) as p, httpx2.Client(timeout=BOUND) as http:
        r = http.post(f"{p.url}/v1/messages", json=body, headers=HEADERS)
        assert r.status_code == 200, r.text
        return r.json()["content"][-1]["text"], p.records()[-1]


# -- plugins that misbehave ----------------------------------------------------------------------


class Hang:
    """Hangs in its transform (and lookup) until released, 60 s at most."""

    def __init__(self, release: threading.Event, *, lookup: bool = False) -> None:
        self.release = release
        self.lookup = lookup

    @tokensaver.hookimpl
    def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> dict[str, Any] | None:
        if not self.lookup:
            self.release.wait(60)
            body["messages"][0]["content"][0]["text"] = "edited after the timeout"
            return {**body, "system": "too late"}
        return None

    @tokensaver.hookimpl
    def tokensaver_lookup_response(self, body: dict[str, Any], ctx: Any) -> dict[str, Any] | None:
        if self.lookup:
            self.release.wait(60)
        return None


class MutateThenRaise:
    @tokensaver.hookimpl
    def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> dict[str, Any]:
        body["messages"][0]["content"][0]["text"] = "SECRET REWRITE"  # a shared block, in place
        body["system"][0]["text"] = "rewritten"
        raise RuntimeError("half done")


class Emit:
    """Returns whatever ``make(body)`` builds: an invalid request."""

    def __init__(self, make: Any) -> None:
        self.make = make

    @tokensaver.hookimpl
    def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> dict[str, Any]:
        return self.make(body)  # type: ignore[no-any-return]


class Answer:
    """A lookup that answers with ``value``."""

    def __init__(self, value: Any) -> None:
        self.value = value

    @tokensaver.hookimpl
    def tokensaver_lookup_response(self, body: dict[str, Any], ctx: Any) -> Any:
        return self.value


def _orphan(body: dict[str, Any]) -> dict[str, Any]:
    # drops the tool_use but keeps its tool_result: an orphan the API refuses
    msgs = body["messages"]
    turn = {**msgs[1], "content": [msgs[1]["content"][0], {"type": "text", "text": "Reading."}]}
    return {**body, "messages": [msgs[0], turn, msgs[2]]}


def _breakpoints(body: dict[str, Any]) -> dict[str, Any]:
    # 1 on the tool, 4 on the system prompt, 1 on the first message: 6, the API takes 4
    cc = {"type": "ephemeral"}
    first = body["messages"][0]
    first = {**first, "content": [{**first["content"][0], "cache_control": cc}]}
    return {
        **body,
        "tools": [{**t, "cache_control": cc} for t in body["tools"]],
        "system": [{"type": "text", "text": f"part {i}", "cache_control": cc} for i in range(4)],
        "messages": [first, *body["messages"][1:]],
    }


def _oversized(body: dict[str, Any]) -> dict[str, Any]:
    big = "x" * (33 * 1024 * 1024)  # over the API's 32 MB request limit
    msgs = body["messages"]
    last = {**msgs[-1], "content": [{**msgs[-1]["content"][0], "content": big}]}
    return {**body, "messages": [*msgs[:-1], last]}


def _unsigned(body: dict[str, Any]) -> dict[str, Any]:
    msgs = body["messages"]
    thinking = {k: v for k, v in msgs[1]["content"][0].items() if k != "signature"}
    turn = {**msgs[1], "content": [thinking, *msgs[1]["content"][1:]]}
    return {**body, "messages": [msgs[0], turn, msgs[2]]}


INVALID = {
    "orphan_tool_result": (_orphan, "tool_result"),
    "six_breakpoints": (_breakpoints, "breakpoints"),
    "over_32_mb": (_oversized, "size"),
    "dropped_signature": (_unsigned, "thinking"),
}


# -- config --------------------------------------------------------------------------------------


def test_plugin_timeout_is_validated(tmp_path: Path) -> None:
    pm = get_plugin_manager({"hang": Hang(threading.Event())}, load_entrypoints=False)
    cfg = tokensaver.load_config({"plugins": ["hang"], "plugin_timeout": 0.25}, pm=pm)
    assert cfg.timeout_for("hang") == 0.25
    cfg = tokensaver.load_config({"plugins": ["hang"], "plugin_timeouts": {"hang": 9}}, pm=pm)
    assert cfg.timeout_for("hang") == 9 and cfg.plugin_timeout == 2.0
    for bad in ({"plugin_timeout": 0}, {"plugin_timeout": True}, {"plugin_timeout": "2"}):
        with pytest.raises(ConfigError, match="plugin_timeout"):
            tokensaver.load_config({"plugins": ["hang"], **bad}, pm=pm)
    with pytest.raises(ConfigError, match="nope"):
        tokensaver.load_config({"plugins": ["hang"], "plugin_timeouts": {"nope": 1}}, pm=pm)


# -- hanging plugins -----------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["transform", "lookup"])
def test_hanging_plugin_is_cut_at_its_timeout_and_blamed(
    emu: Emulator, tmp_path: Path, release: threading.Event, where: str
) -> None:
    client = _wrap(emu, tmp_path, {"hang": Hang(release, lookup=where == "lookup")}, plugin_timeout=0.3)
    emu.reply("answered")
    msg = _bounded(lambda: client.messages.create(**copy.deepcopy(ORIGINAL)))
    assert msg.content[-1].text == "answered"
    assert emu.last.body == ORIGINAL
    hook = "tokensaver_transform_request" if where == "transform" else "tokensaver_lookup_response"
    (err,) = client.tokensaver.records[-1]["errors"]
    assert (err["plugin"], err["hook"], err["kind"]) == ("hang", hook, "timeout")
    if where == "transform":
        release.set()  # the late thread wakes up and edits its copy: nothing already sent changes
        for _ in range(100):
            if not any(
                t.name.startswith("tokensaver-plugin") and t.is_alive() for t in threading.enumerate()
            ):
                break
            threading.Event().wait(0.05)
        assert emu.last.body == ORIGINAL and emu.requests[-1].body == ORIGINAL


def test_hanging_plugins_do_not_stall_the_proxy(
    emu: Emulator, tmp_path: Path, release: threading.Event
) -> None:
    plugins = {f"hang{i}": Hang(release) for i in range(6)}
    emu.reply("answered")
    with _proxy(emu, tmp_path, plugins, plugin_timeout=0.2) as p, httpx2.Client(timeout=BOUND) as http:

        def post(_: int) -> int:
            return http.post(f"{p.url}/v1/messages", json=ORIGINAL, headers=HEADERS).status_code

        with ThreadPoolExecutor(10) as pool:
            statuses = list(pool.map(post, range(10), timeout=BOUND))
        # an unrelated call after them: no thread of the proxy is left waiting on a plugin
        r = http.post(f"{p.url}/v1/messages", json={**ORIGINAL, "max_tokens": 3000}, headers=HEADERS)
        assert r.status_code == 200
        records = p.records()
    assert statuses == [200] * 10
    assert all(req.body["messages"] == ORIGINAL["messages"] for req in emu.requests)
    assert len(records) == 11
    for rec in records:
        kinds = {e["plugin"]: e["kind"] for e in rec["errors"]}
        assert set(kinds) == set(plugins)  # every hanging plugin blamed on every call
        assert set(kinds.values()) <= {"timeout", "saturated"}
    assert "saturated" in {e["kind"] for e in records[-1]["errors"]}  # stuck threads are capped


# -- raising after an in-place edit ----------------------------------------------------------------


def test_raising_plugin_that_mutated_a_block_sends_the_original(emu: Emulator, tmp_path: Path) -> None:
    emu.reply("fine")
    client = _wrap(emu, tmp_path, {"half": MutateThenRaise()})
    body = copy.deepcopy(ORIGINAL)
    client.messages.create(**body)
    assert emu.last.body == ORIGINAL
    assert body == ORIGINAL  # the caller's own objects are untouched
    assert _blame(client.tokensaver.records[-1], "half") == ["raised"]

    async def main() -> None:
        pm = get_plugin_manager({"half": MutateThenRaise()}, load_entrypoints=False)
        base = anthropic.AsyncAnthropic(base_url=emu.url, api_key="test-key", max_retries=0)
        aclient = tokensaver.wrap(base, config=_config(tmp_path, ["half"]), plugin_manager=pm)
        await aclient.messages.create(**copy.deepcopy(ORIGINAL))

    asyncio.run(asyncio.wait_for(main(), BOUND))
    assert emu.last.body == ORIGINAL
    with pytest.raises(tokensaver.TransformError, match="half.*RuntimeError"):
        _wrap(emu, tmp_path, {"half": MutateThenRaise()}, strict=True).messages.create(**copy.deepcopy(body))


class MutateInPlace:
    """Edits a block of its input in place and returns nothing: the edit must not leak."""

    @tokensaver.hookimpl
    def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> None:
        body["messages"][2]["content"][0]["content"] = "cut"


def test_in_place_edit_is_discarded_and_blamed(emu: Emulator, tmp_path: Path) -> None:
    emu.reply("fine")
    _, record = _send("wrap", emu, tmp_path, {"inplace": MutateInPlace()}, ORIGINAL)
    assert emu.last.body == ORIGINAL
    assert _blame(record, "inplace") == ["mutated_input"]


class Look:
    """Keeps the first block of each body it gets; with ``read_only`` it declares it never edits them."""

    def __init__(self, read_only: bool) -> None:
        self.seen: list[Any] = []
        if read_only:
            self.tokensaver_read_only = True

    @tokensaver.hookimpl
    def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> None:
        self.seen.append(body["messages"][0]["content"][0])


def test_a_read_only_plugin_gets_the_calls_own_blocks_and_the_others_copies(
    emu: Emulator, tmp_path: Path
) -> None:
    # a plugin that declares tokensaver_read_only is handed the blocks the call holds (no copy to
    # make, none to check); one that does not gets its own copy, equal to them
    emu.reply("fine")
    mine, theirs, also = Look(read_only=True), Look(read_only=False), Look(read_only=True)
    _send("wrap", emu, tmp_path, {"mine": mine, "theirs": theirs, "also": also}, ORIGINAL)
    assert emu.last.body == ORIGINAL
    assert mine.seen[0] == theirs.seen[0] == ORIGINAL["messages"][0]["content"][0]
    assert theirs.seen[0] is not mine.seen[0]
    assert also.seen[0] is mine.seen[0]


# -- invalid output ------------------------------------------------------------------------------


@pytest.mark.parametrize("door", ["wrap", "proxy"])
@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_output_is_discarded_and_blamed(emu: Emulator, tmp_path: Path, door: str, case: str) -> None:
    make, rule = INVALID[case]
    if case == "over_32_mb":  # the API refuses it with a 413 (the emulator has no size limit)
        assert len(json.dumps(make(ORIGINAL))) > 32 * 1024 * 1024
    else:
        with pytest.raises(EmulatorError):  # the API would refuse what the stage emits
            validate(make(copy.deepcopy(ORIGINAL)))
    emu.reply("fine")
    text, record = _send(door, emu, tmp_path, {"bad": Emit(make)}, ORIGINAL)
    assert text == "fine"
    assert emu.last.body == ORIGINAL
    (kind,) = _blame(record, "bad")
    assert kind.startswith(f"invalid_output: {rule}")
    assert record["errors"][0]["hook"] == "tokensaver_transform_request"


def test_strict_mode_raises_on_invalid_output(emu: Emulator, tmp_path: Path) -> None:
    client = _wrap(emu, tmp_path, {"bad": Emit(_orphan)}, strict=True)
    with pytest.raises(tokensaver.TransformError, match="'bad'.*invalid_output: tool_result"):
        client.messages.create(**copy.deepcopy(ORIGINAL))
    assert emu.requests == []


def test_a_stage_is_not_blamed_for_the_callers_own_problem(emu: Emulator, tmp_path: Path) -> None:
    cc = {"type": "ephemeral"}
    body = {**ORIGINAL, "system": [{"type": "text", "text": f"s{i}", "cache_control": cc} for i in range(5)]}

    class Noop:
        @tokensaver.hookimpl
        def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> dict[str, Any]:
            return {**body, "metadata": {"user_id": "u"}}

    client = _wrap(emu, tmp_path, {"noop": Noop()})
    with pytest.raises(anthropic.BadRequestError):  # the API's refusal passes through
        client.messages.create(**copy.deepcopy(body))
    assert client.tokensaver.records[-1]["errors"] == []
    assert emu.last.body["metadata"] == {"user_id": "u"}


# -- lookup answers ------------------------------------------------------------------------------


@pytest.mark.parametrize("door", ["wrap", "proxy"])
@pytest.mark.parametrize(
    "answer",
    ["a string", {"type": "message", "role": "assistant", "usage": {}}, {"content": []}],
    ids=["str", "no_content", "not_a_message"],
)
def test_lookup_answer_that_is_not_a_message_is_not_served(
    emu: Emulator, tmp_path: Path, door: str, answer: Any
) -> None:
    emu.reply("from upstream")
    text, record = _send(door, emu, tmp_path, {"lookup": Answer(answer)}, ORIGINAL)
    assert text == "from upstream" and len(emu.requests) == 1
    assert record["short_circuit"] is None
    (kind,) = _blame(record, "lookup")
    assert kind.startswith("invalid_output: not a Message")


def test_lookup_answer_that_is_a_message_is_served(emu: Emulator, tmp_path: Path) -> None:
    answer = stored_message(MODEL, "stored")
    text, record = _send("proxy", emu, tmp_path, {"lookup": Answer(answer)}, ORIGINAL)
    assert text == "stored" and emu.requests == [] and record["short_circuit"] == "lookup"


# -- property: what is sent is the stage's valid output or the original ------------------------


def _mutations() -> st.SearchStrategy[Any]:
    """What a buggy stage might do to the body it gets (``(name, index)`` pairs, applied in order)."""
    kinds = [
        "drop_message",
        "drop_block",
        "duplicate_block",
        "swap_messages",
        "add_breakpoints",
        "strip_signature",
        "edit_thinking",
        "append_assistant",
        "empty_content",
        "in_place_text",
        "drop_max_tokens",
        "shorten_text",
        "raise",
        "return_list",
        "return_none",
    ]
    return st.lists(st.tuples(st.sampled_from(kinds), st.integers(0, 50)), min_size=1, max_size=4)


def _apply(body: dict[str, Any], steps: list[tuple[str, int]]) -> Any:
    out: Any = {**body, "messages": list(body["messages"])}
    msgs = out["messages"]
    for kind, i in steps:
        m = i % len(msgs) if msgs else 0
        content = msgs[m].get("content") if msgs else None
        blocks = content if isinstance(content, list) else None
        if kind == "drop_message" and len(msgs) > 1:
            del msgs[m]
        elif kind == "drop_block" and blocks:
            msgs[m] = {**msgs[m], "content": [b for j, b in enumerate(blocks) if j != i % len(blocks)]}
        elif kind == "duplicate_block" and blocks:
            msgs[m] = {**msgs[m], "content": [*blocks, blocks[i % len(blocks)]]}
        elif kind == "swap_messages" and len(msgs) > 1:
            msgs[m], msgs[m - 1] = msgs[m - 1], msgs[m]
        elif kind == "add_breakpoints":
            cc = {"type": "ephemeral"}
            out["system"] = [{"type": "text", "text": f"s{k}", "cache_control": cc} for k in range(1 + i % 6)]
        elif kind in ("strip_signature", "edit_thinking"):
            for k, msg in enumerate(msgs):
                c = msg.get("content")
                if isinstance(c, list) and any(b.get("type") == "thinking" for b in c):
                    new = [
                        (
                            {k2: v for k2, v in b.items() if k2 != "signature"}
                            if kind == "strip_signature"
                            else {**b, "thinking": "changed"}
                        )
                        if b.get("type") == "thinking"
                        else b
                        for b in c
                    ]
                    msgs[k] = {**msg, "content": new}
                    break
        elif kind == "append_assistant":
            msgs.append({"role": "assistant", "content": "Sure,"})
        elif kind == "empty_content" and msgs:
            msgs[m] = {**msgs[m], "content": []}
        elif kind == "in_place_text" and blocks:
            b = blocks[i % len(blocks)]
            if b.get("type") == "text":
                b["text"] = "edited in place"  # the stage's input, edited (a buggy plugin)
        elif kind == "drop_max_tokens":
            out.pop("max_tokens", None)
        elif kind == "shorten_text" and blocks:
            j = i % len(blocks)
            if blocks[j].get("type") == "text":
                msgs[m] = {
                    **msgs[m],
                    "content": [*blocks[:j], {**blocks[j], "text": "short"}, *blocks[j + 1 :]],
                }
        elif kind == "raise":
            raise RuntimeError("buggy stage")
        elif kind == "return_list":
            return [out]
        elif kind == "return_none":
            return None
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv=conversations(max_turns=4), pick=st.integers(0, 10), steps=_mutations())
def test_what_is_sent_is_the_stages_valid_output_or_the_original(
    conv: dict[str, Any], pick: int, steps: list[tuple[str, int]]
) -> None:
    bodies = turns(conv)
    original = bodies[pick % len(bodies)]
    validate(original)  # the strategy draws requests the API accepts
    frozen = copy.deepcopy(original)
    emitted: list[Any] = []

    class Buggy:
        @tokensaver.hookimpl
        def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> Any:
            out = _apply(body, steps)
            emitted.append(out)
            return out

    pm = get_plugin_manager({"buggy": Buggy()}, load_entrypoints=False)
    pipe = Pipeline({"plugins": ["buggy"], "record": False}, plugin_manager=pm)
    call = pipe.begin(original)
    assert original == frozen  # the caller's request is never edited
    sent = call.body
    if sent is original:
        assert sent == frozen
    else:
        assert emitted and sent is emitted[-1] and not call.errors
    validate(sent)  # whatever goes out, the API accepts
