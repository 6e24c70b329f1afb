"""The memos kept across calls change nothing: same bytes sent, same billed figures, same records.

Issue 12's regression test for the incremental pipeline. Each conversation is replayed in order
through ``wrap()`` (the real SDK over HTTP to the emulator) twice: once with every cross-call memo
off (``set_memo_enabled(False)``: each call counted, digested and billed from scratch, as a fresh
pipeline would for its blocks) and once with them on. The bodies that reached the emulator, the
usage it billed and the pipeline's records must be identical.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import orjson
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plugins import summarize
from tokensaver import _sdk, pipeline
from tokensaver.context import make_context
from tokensaver.emulator import Emulator
from tokensaver.middleware import wrap
from tokensaver.pipeline import Pipeline
from tokensaver.replay import replay
from tokensaver.tokens import ContentMemo, set_memo_enabled
from tokensaver.traces import fixtures_dir, load_conversation, shared_traces_dir

FIXTURES = fixtures_dir()
SMALL = [
    "claude-code-spotter/6c2214d7-b87e-4432-8e41-22ba294ea584__agent-afc096d.json",
    "claude-code-spotter/8463c716-a2ea-4c14-9efa-87158ebd9f20__agent-a7be2f0.json",
    "mini-swe-agent-gemini3/django__django-16527.json",
    "swe-agent/crypto__BabyEncryption.json",
    "tau-bench/gpt-4o-airline_task000_trial0.json",
]
# what differs between two runs of the same calls whatever the memos do
VOLATILE = ("id", "overhead_ms")


def stable(record: dict[str, Any]) -> dict[str, Any]:
    """A record without its call id and timings."""
    out = {k: v for k, v in record.items() if k not in VOLATILE}
    out["stages"] = [{k: v for k, v in s.items() if k != "ms"} for s in record.get("stages") or []]
    return out


@pytest.fixture(autouse=True)
def memo_back_on() -> Iterator[None]:
    yield
    set_memo_enabled(True)


def both_ways(run: Any) -> tuple[Any, Any]:
    """``run()`` with every cross-call memo off, then on."""
    set_memo_enabled(False)
    try:
        full = run()
    finally:
        set_memo_enabled(True)
    return full, run()


@pytest.mark.skipif(FIXTURES is None, reason="bundled fixtures/ not present")
@pytest.mark.parametrize("name", SMALL)
def test_replayed_conversation_same_bytes_and_bills(emu: Emulator, name: str) -> None:
    assert FIXTURES is not None
    conv = load_conversation(Path(FIXTURES) / name)
    config = {"record": False}
    full, inc = both_ways(lambda: replay([conv], config=config, emulator=emu, keep_bodies=True))
    assert len(full.sent) == len(conv.calls) - len(full.rejected)
    assert inc.sent == full.sent
    assert inc.billed == full.billed
    assert [stable(r) for r in inc.records] == [stable(r) for r in full.records]
    # the figures compared are not all zero (a replay that billed nothing would compare equal too)
    assert any(r["saved_usd"] for r in full.records) or any(r["stages"] for r in full.records)


# -- a caller that edits and reuses its own objects between calls ---------------------------------


def _base_messages(turns: int, words: int) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = [{"role": "user", "content": [{"type": "text", "text": "Fix the bug."}]}]
    for t in range(turns):
        out = "\n".join(f"line {i} of file{t}.py: value = {i * t}" for i in range(words))
        msgs.append(
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": f"toolu_{t}", "name": "read", "input": {"path": f"f{t}"}}
                ],
            }
        )
        msgs.append(
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": f"toolu_{t}", "content": out}],
            }
        )
    return msgs


EDITS = st.lists(
    st.tuples(
        st.sampled_from(["grow", "edit_text", "cache_control", "cut", "same"]),
        st.integers(min_value=0, max_value=1000),
    ),
    min_size=3,
    max_size=9,
)


def _replay_edits(emu: Emulator, edits: list[tuple[str, int]]) -> tuple[list[Any], list[Any], list[Any]]:
    """One conversation whose caller reuses and edits its message objects in place between calls."""
    emu.reset()
    base = anthropic.Anthropic(base_url=emu.url, api_key="test-key", max_retries=0)
    now = [1_700_000_000.0]
    client = wrap(base, {"record": False}, clock=lambda: now[0])
    messages = _base_messages(12, 40)
    shown = 3
    tools = [{"name": "read", "description": "Read a file", "input_schema": {"type": "object"}}]
    billed = []
    for op, n in edits:
        if op == "grow":
            shown = min(len(messages), shown + 2)
        elif op == "edit_text":
            tr = [
                m
                for m in messages[:shown]
                if m["role"] == "user" and m["content"][0].get("type") == "tool_result"
            ]
            if tr:
                block = tr[n % len(tr)]["content"][0]
                block["content"] = str(block["content"]) + f"\n(edited {n})"  # in place, same objects
        elif op == "cache_control":
            msg = messages[(n % shown) if n % shown % 2 == 0 else 0]
            msg["content"][-1]["cache_control"] = {"type": "ephemeral"}
        elif op == "cut" and shown > 5:
            del messages[1:3]  # the oldest tool round dropped: a cut, not an append
            shown -= 2
        now[0] += 7 + n % 400
        emu.clock.set(now[0])
        emu.reply([{"type": "text", "text": f"OK {n}."}])
        msg = client.messages.create(
            model="claude-sonnet-4-6",
            max_tokens=256,
            system="You are a coding agent.",
            tools=tools,
            messages=messages[:shown],
            timeout=60,
        )
        billed.append(msg.usage.model_dump())
    sent = [copy.deepcopy(r["body"]) for r in emu.requests]
    return sent, billed, [stable(r) for r in client.tokensaver.records]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=EDITS)
def test_edited_conversation_same_bytes_and_bills(emu: Emulator, edits: list[tuple[str, int]]) -> None:
    full, inc = both_ways(lambda: _replay_edits(emu, edits))
    assert inc[0] == full[0]
    assert inc[1] == full[1]
    assert inc[2] == full[2]


class _Capture(_sdk.Middleware):
    """Keeps the SDK's request object and sends it on unchanged."""

    def __init__(self) -> None:
        self.requests: list[Any] = []

    def handle(self, request: Any, call_next: Any) -> Any:
        self.requests.append(request)
        return call_next(request)


def test_with_body_is_request_copy_without_the_deep_copy(emu: Emulator) -> None:
    """The SDK door's outgoing request: every field as ``APIRequest.copy`` makes it, the body ours."""
    cap = _Capture()
    client: Any = anthropic.Anthropic(base_url=emu.url, api_key="test-key", max_retries=0).with_middleware(
        cap
    )
    client.messages.create(
        model="claude-sonnet-4-6",
        max_tokens=64,
        messages=[{"role": "user", "content": "hi"}],
        extra_body={"metadata": {"user_id": "u1"}},
        extra_query={"q": "1"},
    )
    request = cap.requests[0]
    before = copy.deepcopy(request.options.json_data)
    body = {
        "model": "claude-sonnet-4-6",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "hello"}],
    }
    headers = {"x-kept": "1"}
    mine, theirs = _sdk.with_body(request, body, headers), request.copy(body=body, headers=headers)
    assert mine.options.json_data is body
    assert mine.options.model_dump() == theirs.options.model_dump()
    for name in ("method", "url", "cast_to", "stream", "stream_cls", "retries_taken", "headers"):
        assert getattr(mine, name) == getattr(theirs, name), name
    assert mine.options.params == request.options.params == {"q": "1"}
    assert mine.options.params is not request.options.params  # copied, as the SDK does
    assert request.options.json_data == before  # the original request is left as it was


def test_content_memo_computes_once_per_content_within_its_byte_cap() -> None:
    """ctx.memo: a plugin's per-block work done once per distinct content, in bounded memory."""
    memo = ContentMemo(max_bytes=40_000)
    seen: list[Any] = []

    def rewrite(block: dict[str, Any]) -> dict[str, Any]:
        seen.append(block)
        return {**block, "content": str(block["content"]).upper()}

    def block(i: int) -> dict[str, Any]:  # a new object each time, as parsed from the wire
        return {"type": "tool_result", "tool_use_id": f"t{i}", "content": f"output {i} " * 40}

    first = [memo.get("test.rewrite", block(i), rewrite) for i in range(5)]
    again = [memo.get("test.rewrite", block(i), rewrite) for i in range(5)]
    assert again == first and len(seen) == 5  # equal content: no second computation
    assert memo.get("other.kind", block(0), rewrite) == first[0] and len(seen) == 6  # kinds apart
    for i in range(5, 200):
        memo.get("test.rewrite", block(i), rewrite)
    assert memo.nbytes <= memo.max_bytes and 0 < len(memo) < 200  # the oldest dropped
    set_memo_enabled(False)
    n = len(seen)
    memo.get("test.rewrite", block(199), rewrite)
    assert len(seen) == n + 1  # the full path computes again


def test_ctx_memo_is_shared_across_calls() -> None:
    body = {"model": "claude-sonnet-4-6", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}
    calls: list[str] = []

    def scan(text: str) -> int:
        calls.append(text)
        return len(text)

    for _ in range(3):
        ctx = make_context(body, plugin="test")
        assert ctx.memo("test.scan.v1", "some old tool output" * 3, scan) == 60
    assert len(calls) == 1


def test_ctx_digest_equal_content_equal_digest_breakpoints_aside() -> None:
    body = {"model": "claude-sonnet-4-6", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}
    ctx = make_context(body)
    block = {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "out"}]}
    marked = copy.deepcopy(block)
    marked["content"][0]["cache_control"] = {"type": "ephemeral"}  # nested: still the same content
    reordered = {"content": [{"text": "out", "type": "text"}], "tool_use_id": "t1", "type": "tool_result"}
    assert ctx.digest(block) == ctx.digest(marked) == ctx.digest(reordered)
    assert ctx.digest(block) != ctx.digest({**block, "content": [{"type": "text", "text": "out!"}]})
    assert ctx.digest("abc") != ctx.digest(["abc"]) and len(ctx.digest(block)) == 17


def test_summarize_memo_has_a_byte_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """summarize's per-content memo keeps at most MEMO_BYTES of text, whatever its entry limit."""
    monkeypatch.setattr(summarize, "MEMO_BYTES", 20_000, raising=False)  # a small cap, quickly reached
    body = {"model": "claude-sonnet-4-6", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}
    ctx = make_context(body, plugin="summarize")
    opts = summarize.options(None)
    for i in range(120):
        text = "\n".join(f"{i} row {j}: " + "abcdefgh" * 20 for j in range(1200))  # ~200 KB each
        assert summarize.shrink_cached(text, opts, ctx, 100_000).text
    memo = ctx.state["memo"]
    kept = [v[0] if isinstance(v, tuple) else v for v in getattr(memo, "data", memo).values()]
    assert 0 < len(kept) < 120
    assert sum(len(r.text) for r in kept) <= 20_000


# -- default plugins on real conversations: memos off, on, and a fresh process ---------------------

LONG = [  # real Claude Code sessions past 50k tokens (../shared/traces), their first calls
    ("claude-code-entire/a318ad73-17a2-4575-845d-8952a1e5958b.json", 130),
    ("claude-code-entire/f025f6b8-7e1e-41e7-89a0-a23c0b1ee192.json", 129),
]
_SENT_SCRIPT = """
import json, sys
from pathlib import Path
from tests.test_incremental import sent_digests
from tokensaver.traces import load_conversation
conv = load_conversation(Path(sys.argv[1]))
print(json.dumps(sent_digests(conv.calls[: int(sys.argv[2])])))
"""


def sent_digests(calls: list[Any], pipe: Pipeline | None = None) -> list[str]:
    """Each call replayed in order through one pipeline (default plugins): the sent body's digest."""
    pipe = pipe or Pipeline(config={"record": False})
    now = [1_700_000_000.0]
    pipe.clock = lambda: now[0]
    out = []
    for call in calls:
        now[0] = call.t if call.t is not None else now[0] + 30.0
        body = orjson.loads(orjson.dumps(call.body))  # as parsed from the wire: no shared objects
        run = pipe.begin(body, key="test")
        answer = {
            "id": "msg_test",
            "type": "message",
            "role": "assistant",
            "model": str(body.get("model", "")),
            "content": call.reply or [{"type": "text", "text": "OK."}],
            "stop_reason": "end_turn",
            "usage": dict(call.usage or {"input_tokens": 1, "output_tokens": 1}),
        }
        pipe.finish(run, answer)
        assert not run.errors, run.errors
        out.append(xxhash.xxh3_128_hexdigest(orjson.dumps(run.body)))
    return out


def _long_conversations() -> list[Any]:
    root = shared_traces_dir()
    found = [(root / name, n) for name, n in LONG] if root is not None else []
    return [(p, n) for p, n in found if p.exists()]


@pytest.mark.skipif(not _long_conversations(), reason="../shared/traces not present")
@pytest.mark.parametrize("path,n", _long_conversations(), ids=lambda v: str(v)[-20:])
def test_long_conversation_same_bytes_memos_off_on_and_fresh_process(path: Path, n: int) -> None:
    """What is sent is the same with every memo off, on (warm from earlier replays) and in a new process."""
    calls = load_conversation(path).calls[:n]
    full, inc = both_ways(lambda: sent_digests(calls))
    assert inc == full
    assert sent_digests(calls) == full  # again in this process: every memo warm from the run before
    fresh = subprocess.run(
        [sys.executable, "-c", _SENT_SCRIPT, str(path), str(n)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parent.parent,
        check=True,
    )
    assert json.loads(fresh.stdout.strip().splitlines()[-1]) == full
    # the plugins changed what is sent (a replay that changed nothing would compare equal too)
    assert any(
        d != xxhash.xxh3_128_hexdigest(orjson.dumps(orjson.loads(orjson.dumps(c.body))))
        for d, c in zip(full, calls, strict=True)
    )


@pytest.mark.skipif(not _long_conversations(), reason="../shared/traces not present")
def test_repeats_a_later_call_indexes_only_its_new_results(monkeypatch: pytest.MonkeyPatch) -> None:
    """prune's repeats pass: results an earlier call indexed are answered from the chain memo."""
    path, _ = _long_conversations()[0]
    conv = load_conversation(path)
    indexed: list[str] = []
    pipe = Pipeline(config={"record": False})  # loads the plugins: the module the pipeline uses
    repeats = sys.modules["tokensaver_plugins._repeats"]
    real = repeats.LineIndex.rewrite

    def counted(self: Any, tid: str, text: str) -> str:
        indexed.append(tid)
        return real(self, tid, text)

    monkeypatch.setattr(repeats.LineIndex, "rewrite", counted)
    calls = conv.calls  # all of it: prune cuts (and runs its repeats pass) past 80k tokens
    sent_digests(calls[:-1], pipe)
    assert indexed  # the repeats pass runs on this conversation
    results = sum(
        1
        for m in calls[-1].body["messages"]
        if isinstance(m.get("content"), list)
        for b in m["content"]
        if isinstance(b, dict) and b.get("type") == "tool_result"
    )
    assert results >= 10
    indexed.clear()
    sent_digests(calls[-1:], pipe)
    assert len(set(indexed)) <= 2, f"{len(set(indexed))} of {results} results indexed again"


def test_in_memory_records_have_a_byte_cap(emu: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """A long-lived pipeline keeps at most MEMORY_RECORDS_BYTES of records (each sized as JSON)."""
    monkeypatch.setattr(pipeline, "MEMORY_RECORDS_BYTES", 6_000, raising=False)
    base = anthropic.Anthropic(base_url=emu.url, api_key="test-key", max_retries=0)
    client = wrap(base, {"record": False})
    for i in range(12):
        emu.reply([{"type": "text", "text": f"OK {i}."}])
        client.messages.create(
            model="claude-sonnet-4-6",
            max_tokens=16,
            messages=[{"role": "user", "content": f"question {i}"}],
            timeout=60,
        )
    kept = list(client.tokensaver.records)
    assert 0 < len(kept) < 12
    assert sum(len(orjson.dumps(r)) for r in kept) <= 6_000
    assert kept[-1]["usage"]["output_tokens"] > 0  # the newest stay
