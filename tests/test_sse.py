"""tokensaver.sse: message -> SSE bytes -> message, checked against the real anthropic SDK."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import anthropic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokensaver.sse import SSEAccumulator, message_to_sse, sse_error

USAGE = {
    "input_tokens": 12,
    "cache_creation_input_tokens": 300,
    "cache_read_input_tokens": 4000,
    "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200},
    "output_tokens": 87,
    "service_tier": "standard",
}

RICH: dict[str, Any] = {
    "id": "msg_01",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-6",
    "content": [
        {"type": "thinking", "thinking": "Let me think about this. " * 5, "signature": "sig-abc=="},
        {"type": "redacted_thinking", "data": "opaque-redacted-blob"},
        {"type": "text", "text": "Héllo wörld, ünïcode ✓ and a longer sentence to split in chunks."},
        {
            "type": "tool_use",
            "id": "toolu_1",
            "name": "read_file",
            "input": {"path": "/etc/hosts", "opts": {"lines": [1, 2, 3], "follow": True}, "s": 'é"q'},
        },
        {"type": "tool_use", "id": "toolu_2", "name": "noop", "input": {}},
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": USAGE,
}


def accumulate(data: bytes, cuts: list[int] | None = None) -> SSEAccumulator:
    acc = SSEAccumulator()
    points = sorted({c for c in (cuts or []) if 0 < c < len(data)})
    prev = 0
    for p in [*points, len(data)]:
        acc.feed(data[prev:p])
        prev = p
    return acc


def test_event_sequence_and_format() -> None:
    raw = message_to_sse(RICH)
    frames = raw.decode().split("\n\n")
    assert frames[-1] == ""
    names = [f.split("\n")[0] for f in frames[:-1]]
    assert names[0] == "event: message_start"
    assert names[1] == "event: ping"
    assert names[-2:] == ["event: message_delta", "event: message_stop"]
    assert names.count("event: content_block_start") == 5
    assert names.count("event: content_block_stop") == 5
    start = json.loads(frames[0].split("\n")[1].removeprefix("data: "))
    assert start["message"]["content"] == []
    assert start["message"]["stop_reason"] is None
    assert start["message"]["usage"]["cache_read_input_tokens"] == 4000
    assert start["message"]["usage"]["cache_creation"] == USAGE["cache_creation"]
    assert start["message"]["usage"]["output_tokens"] == 1
    delta = json.loads(frames[-3].split("\n")[1].removeprefix("data: "))
    assert delta["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 87
    assert delta["usage"]["input_tokens"] == 12
    assert delta["usage"]["cache_read_input_tokens"] == 4000
    kinds = [json.loads(f.split("\n")[1][6:])["delta"]["type"] for f in frames if "content_block_delta" in f]
    assert {"text_delta", "input_json_delta", "thinking_delta", "signature_delta"} <= set(kinds)
    # tool_use starts with empty input, redacted_thinking arrives whole
    starts = [json.loads(f.split("\n")[1][6:]) for f in frames if f.startswith("event: content_block_start")]
    assert starts[3]["content_block"]["input"] == {}
    assert starts[1]["content_block"] == RICH["content"][1]


def test_roundtrip_rich_every_single_byte_chunking() -> None:
    raw = message_to_sse(RICH)
    acc = accumulate(raw, list(range(len(raw))))
    assert acc.complete
    assert acc.message == RICH
    assert acc.error is None


def test_crlf_and_incomplete() -> None:
    raw = message_to_sse(RICH).replace(b"\n", b"\r\n")
    acc = accumulate(raw, [5, 17, len(raw) // 2, len(raw) // 2 + 1])
    assert acc.message == RICH
    partial = accumulate(message_to_sse(RICH)[:-20])
    assert not partial.complete
    assert partial.message is None
    assert partial.snapshot is not None and partial.snapshot["id"] == "msg_01"


def test_error_event() -> None:
    raw = message_to_sse(RICH)
    cut = raw.index(b"event: message_delta")
    acc = accumulate(raw[:cut] + sse_error("overloaded_error", "Overloaded"))
    assert acc.error == {"type": "overloaded_error", "message": "Overloaded"}
    assert not acc.complete


def test_citations_and_message_delta_merge() -> None:
    citation = {
        "type": "char_location",
        "cited_text": "abc",
        "document_index": 0,
        "document_title": None,
        "start_char_index": 0,
        "end_char_index": 3,
    }
    msg = {**RICH, "content": [{"type": "text", "text": "cited", "citations": [citation, citation]}]}
    acc = accumulate(message_to_sse(msg))
    assert acc.message == msg


# --- property: accumulate(message_to_sse(m)) == m under random chunkings -------------------------

texts = st.text(min_size=1, max_size=80)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
blocks = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, texts),
    st.builds(
        lambda i, n, inp: {"type": "tool_use", "id": f"toolu_{i}", "name": n, "input": inp},
        st.integers(0, 10**6),
        st.from_regex(r"[a-zA-Z][a-zA-Z0-9_]{0,20}", fullmatch=True),
        st.dictionaries(st.text(max_size=10), json_values, max_size=5),
    ),
    st.builds(lambda t, s: {"type": "thinking", "thinking": t, "signature": s}, texts, st.text(max_size=30)),
    st.builds(lambda d: {"type": "redacted_thinking", "data": d}, st.text(min_size=1, max_size=40)),
)
usages = st.builds(
    lambda i, w5, w1, r, o: {
        "input_tokens": i,
        "cache_creation_input_tokens": w5 + w1,
        "cache_read_input_tokens": r,
        "cache_creation": {"ephemeral_5m_input_tokens": w5, "ephemeral_1h_input_tokens": w1},
        "output_tokens": o,
    },
    *(st.integers(0, 100_000) for _ in range(5)),
)
messages = st.builds(
    lambda content, usage, stop: {
        "id": "msg_x",
        "type": "message",
        "role": "assistant",
        "model": "claude-opus-4-6",
        "content": content,
        "stop_reason": stop,
        "stop_sequence": "STOP" if stop == "stop_sequence" else None,
        "usage": usage,
    },
    st.lists(blocks, max_size=6),
    usages,
    st.sampled_from(["end_turn", "tool_use", "max_tokens", "stop_sequence"]),
)


@settings(max_examples=100, deadline=None)
@given(messages, st.lists(st.integers(0, 5000), max_size=30), st.booleans())
def test_property_roundtrip(msg: dict[str, Any], cuts: list[int], crlf: bool) -> None:
    raw = message_to_sse(msg)
    if crlf:
        raw = raw.replace(b"\n", b"\r\n")
    acc = accumulate(raw, cuts)
    assert acc.complete
    assert acc.message == msg


# --- the real SDK parses the stream into the same Message -----------------------------------------


@pytest.fixture(scope="module")
def sse_server() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            if body.get("stream"):
                payload, ctype = message_to_sse(RICH), "text/event-stream"
            else:
                payload, ctype = json.dumps(RICH).encode(), "application/json"
            self.send_response(200)
            self.send_header("content-type", ctype)
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            step = max(1, len(payload) // 7)
            for i in range(0, len(payload), step):
                self.wfile.write(payload[i : i + step])
                self.wfile.flush()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _dump(m: Any) -> Any:
    """model_dump without the SDK's streaming-only ``parsed_output`` helper field."""
    d = m.model_dump()
    for b in d["content"]:
        b.pop("parsed_output", None)
    return d


KW: dict[str, Any] = {
    "model": "claude-sonnet-4-6",
    "max_tokens": 100,
    "messages": [{"role": "user", "content": "hi"}],
}


def test_sdk_stream_helper_matches_non_streamed(sse_server: str) -> None:
    client = anthropic.Anthropic(base_url=sse_server, api_key="x", max_retries=0)
    plain = client.messages.create(**KW)
    with client.messages.stream(**KW) as stream:
        final = stream.get_final_message()
    assert _dump(final) == _dump(plain)
    assert plain.usage.cache_creation is not None
    assert plain.usage.cache_creation.ephemeral_1h_input_tokens == 200
    assert final.content[3].input == RICH["content"][3]["input"]  # type: ignore[union-attr]


def test_sdk_raw_stream_events_accumulate(sse_server: str) -> None:
    from anthropic.lib.streaming._messages import accumulate_event  # the SDK's own assembler

    client = anthropic.Anthropic(base_url=sse_server, api_key="x", max_retries=0)
    plain = client.messages.create(**KW)
    snapshot: Any = None
    bufs: dict[int, bytes] = {}
    kinds = []
    for event in client.messages.create(**KW, stream=True):
        kinds.append(event.type)
        snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=bufs)
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert _dump(snapshot) == _dump(plain)


def test_sdk_async_stream(sse_server: str) -> None:
    import asyncio

    async def go() -> tuple[Any, Any]:
        client = anthropic.AsyncAnthropic(base_url=sse_server, api_key="x", max_retries=0)
        plain = await client.messages.create(**KW)
        async with client.messages.stream(**KW) as stream:
            final = await stream.get_final_message()
        return plain, final

    plain, final = asyncio.run(go())
    assert _dump(final) == _dump(plain)
