"""Bedrock and Vertex clients: the middleware sees the plain Messages body before the platform rewrites it.

These clients cannot reach the emulator (their URLs and bodies differ), so the SDK's httpx2
MockTransport stands in for the platform and we assert on the bodies it received.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import struct
import threading
import zlib
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx2
import pytest

import tokensaver
from tokensaver.sse import EventStreamAccumulator
from tokensaver.testing import stored_message


class SystemSetter:
    @tokensaver.hookimpl
    def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> dict[str, Any]:
        return {**body, "system": "tokensaver was here"}


PLATFORMS = [
    (
        anthropic.AnthropicBedrock,
        {"aws_region": "us-east-1", "aws_access_key": "a", "aws_secret_key": "b"},
        "/invoke",
    ),
    (
        anthropic.AnthropicVertex,
        {"region": "us-east5", "project_id": "p", "access_token": "t"},
        ":rawPredict",
    ),
]


@pytest.mark.parametrize(("cls", "kwargs", "suffix"), PLATFORMS)
def test_platform_clients_are_transformed_and_recorded(cls: Any, kwargs: dict[str, Any], suffix: str) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append((str(request.url), json.loads(request.content)))
        usage = {"input_tokens": 12, "output_tokens": 3}
        message = {
            "id": "m",
            "type": "message",
            "role": "assistant",
            "model": "x",
            "content": [{"type": "text", "text": "ok"}],
        }
        return httpx2.Response(
            200, json={**message, "stop_reason": "end_turn", "stop_sequence": None, "usage": usage}
        )

    client = cls(**kwargs, http_client=httpx2.Client(transport=httpx2.MockTransport(handler)))
    pm = tokensaver.get_plugin_manager({"setter": SystemSetter()}, load_entrypoints=False)
    wrapped = tokensaver.wrap(client, config={"plugins": ["setter"], "record": False}, plugin_manager=pm)
    assert isinstance(wrapped, cls)
    msg = wrapped.messages.create(
        model="claude-sonnet-4-6", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
    )
    assert msg.content[0].text == "ok"
    url, body = seen[-1]
    assert url.endswith(suffix)  # the platform's own URL and body shape...
    assert (
        body["system"] == "tokensaver was here" and "anthropic_version" in body
    )  # ...with our transform inside
    record = wrapped.tokensaver.records[-1]
    assert record["status"] == 200 and record["usage"]["input_tokens"] == 12


# -- Bedrock streamed: AWS's binary event-stream ------------------------------------------------

BEDROCK_KW = {"aws_region": "us-east-1", "aws_access_key": "a", "aws_secret_key": "b"}
BOUND = 30.0  # seconds: a regression fails instead of hanging CI
LONG = "Please answer briefly. " + "padding " * 400


def _frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One event-stream message: prelude (lengths, CRC), string headers, payload, message CRC."""
    head = b"".join(
        bytes([len(k)]) + k.encode() + b"\x07" + struct.pack(">H", len(v.encode())) + v.encode()
        for k, v in headers.items()
    )
    prelude = struct.pack(">II", 16 + len(head) + len(payload), len(head))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    message = prelude + head + payload
    return message + struct.pack(">I", zlib.crc32(message))


def _chunk(event: dict[str, Any]) -> bytes:
    """A Bedrock ``chunk`` event carrying one Messages stream event (base64 JSON in ``bytes``)."""
    data = base64.b64encode(json.dumps(event).encode()).decode()
    payload = json.dumps({"bytes": data, "p": "abcdefghij"}).encode()
    return _frame(
        {":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"}, payload
    )


BEDROCK_EVENTS: list[dict[str, Any]] = [
    {
        "type": "message_start",
        "message": {
            "id": "msg_bdrk_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-6",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 40, "output_tokens": 1},
        },
    },
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Paris, "}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "of course."}},
    {"type": "content_block_stop", "index": 0},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": 7},
    },
    {
        "type": "message_stop",
        "amazon-bedrock-invocationMetrics": {"inputTokenCount": 40, "outputTokenCount": 7},
    },
]


LOOKUP_TOOL = {
    "name": "tokensaver_lookup",
    "description": "Look a note up.",
    "input_schema": {"type": "object"},
}
TOOL_ROUND_EVENTS: list[dict[str, Any]] = [
    {**BEDROCK_EVENTS[0], "message": {**BEDROCK_EVENTS[0]["message"], "id": "msg_bdrk_0"}},
    {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "tool_use", "id": "toolu_p", "name": "tokensaver_lookup", "input": {}},
    },
    {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "input_json_delta", "partial_json": '{"k": 1}'},
    },
    {"type": "content_block_stop", "index": 0},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"output_tokens": 4},
    },
    {"type": "message_stop"},
]


class Lookup:
    """Offers a tool of its own and answers it (a plugin-tool exchange the caller never sees)."""

    @tokensaver.hookimpl
    def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> dict[str, Any]:
        return {**body, "tools": [*(body.get("tools") or []), LOOKUP_TOOL]}

    @tokensaver.hookimpl
    def tokensaver_answer_tool_use(self, tool_use: dict[str, Any], ctx: Any) -> str | None:
        return "the note" if tool_use["name"] == LOOKUP_TOOL["name"] else None


class Shortener:
    """Cuts the long first message down (a saving the record must show)."""

    @tokensaver.hookimpl
    def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> dict[str, Any]:
        return {**body, "messages": [{"role": "user", "content": "Please answer briefly."}]}


@pytest.fixture
def bedrock() -> Iterator[tuple[str, list[tuple[str, dict[str, Any]]]]]:
    """A tiny local Bedrock runtime: invoke-with-response-stream answers real event-stream frames."""
    seen: list[tuple[str, dict[str, Any]]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("content-length") or 0))
            sent = json.loads(raw)
            seen.append((self.path, sent))
            # a request offering a plugin's tool, before that tool was answered: the model calls it
            answered = any(
                isinstance(b, dict) and b.get("type") == "tool_result"
                for m in sent["messages"]
                for b in (m["content"] if isinstance(m["content"], list) else [])
            )
            asks = any(t.get("name") == LOOKUP_TOOL["name"] for t in sent.get("tools") or []) and not answered
            body = b"".join(_chunk(e) for e in (TOOL_ROUND_EVENTS if asks else BEDROCK_EVENTS))
            self.send_response(200)
            self.send_header("content-type", "application/vnd.amazon.eventstream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for i in range(0, len(body), 37):  # frames split across chunks
                piece = body[i : i + 37]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def _bedrock_pipeline() -> Any:
    pm = tokensaver.get_plugin_manager({"shortener": Shortener()}, load_entrypoints=False)
    return tokensaver.Pipeline({"plugins": ["shortener"], "record": False}, plugin_manager=pm)


def _check_bedrock_record(text: str, pipe: Any, seen: list[tuple[str, dict[str, Any]]]) -> None:
    assert text == "Paris, of course."  # the SDK's own event-stream decoder read the frames
    path, sent = seen[-1]
    assert path.endswith("/invoke-with-response-stream")
    assert sent["messages"] == [{"role": "user", "content": "Please answer briefly."}]
    [record] = pipe.records
    assert record["status"] == 200, record
    assert record["usage"]["input_tokens"] == 40 and record["usage"]["output_tokens"] == 7
    assert record["cost_usd"] > 0 and record["saved_usd"] > 0


def test_bedrock_stream_is_recorded(bedrock: tuple[str, list[tuple[str, dict[str, Any]]]]) -> None:
    url, seen = bedrock
    client = anthropic.AnthropicBedrock(**BEDROCK_KW, base_url=url, timeout=BOUND, max_retries=0)
    pipe = _bedrock_pipeline()
    wrapped = tokensaver.wrap(client, pipeline=pipe)
    with wrapped.messages.stream(
        model="claude-sonnet-4-6", max_tokens=50, messages=[{"role": "user", "content": LONG}]
    ) as stream:
        text = "".join(stream.text_stream)
    _check_bedrock_record(text, pipe, seen)


def test_bedrock_stream_is_recorded_async(bedrock: tuple[str, list[tuple[str, dict[str, Any]]]]) -> None:
    url, seen = bedrock
    pipe = _bedrock_pipeline()

    async def go() -> str:
        client = anthropic.AsyncAnthropicBedrock(**BEDROCK_KW, base_url=url, timeout=BOUND, max_retries=0)
        wrapped = tokensaver.wrap(client, pipeline=pipe)
        async with wrapped.messages.stream(
            model="claude-sonnet-4-6", max_tokens=50, messages=[{"role": "user", "content": LONG}]
        ) as stream:
            return "".join([t async for t in stream.text_stream])

    text = asyncio.run(asyncio.wait_for(go(), BOUND))
    _check_bedrock_record(text, pipe, seen)


def test_eventstream_frames_read_at_any_boundary_and_checked() -> None:
    stream = b"".join(_chunk(e) for e in BEDROCK_EVENTS)
    acc = EventStreamAccumulator()
    for i in range(len(stream)):  # one byte at a time: every frame split everywhere
        acc.feed(stream[i : i + 1])
    acc.close()
    assert acc.message is not None and acc.message["content"] == [
        {"type": "text", "text": "Paris, of course."}
    ]
    assert acc.message["usage"] == {"input_tokens": 40, "output_tokens": 7}

    bad = bytearray(stream)
    bad[len(_chunk(BEDROCK_EVENTS[0])) + 20] ^= 1  # a payload byte of the second frame: its CRC fails
    acc = EventStreamAccumulator()
    acc.feed(bytes(bad))
    acc.close()
    assert acc.message is None and acc.failure == "malformed stream event"

    acc = EventStreamAccumulator()  # cut off mid-frame
    acc.feed(stream[:-5])
    acc.close()
    assert acc.message is None and acc.failure == "stream ended before message_stop"

    throttled = _frame(
        {
            ":exception-type": "throttlingException",
            ":content-type": "application/json",
            ":message-type": "exception",
        },
        b'{"message":"Too many requests"}',
    )
    acc = EventStreamAccumulator()
    acc.feed(_chunk(BEDROCK_EVENTS[0]) + throttled)
    acc.close()
    assert acc.error == {"type": "throttlingException", "message": "Too many requests"}
    assert acc.message is None and acc.failure == "stream error event"


class StoredAnswer:
    """Answers every call from a store (a short-circuit: the platform is never asked)."""

    @tokensaver.hookimpl
    def tokensaver_lookup_response(self, body: dict[str, Any], ctx: Any) -> dict[str, Any] | None:
        return stored_message(
            body["model"],
            "from the store",
            tool_input={"a": [1, 2]},
            usage={"input_tokens": 5, "output_tokens": 3},
        )


def _stored_client(cls: Any, bedrock_url: str) -> Any:
    pm = tokensaver.get_plugin_manager({"stored": StoredAnswer()}, load_entrypoints=False)
    client = cls(**BEDROCK_KW, base_url=bedrock_url, timeout=BOUND, max_retries=0)
    return tokensaver.wrap(client, config={"plugins": ["stored"], "record": False}, plugin_manager=pm)


def test_bedrock_stream_served_from_store(bedrock: tuple[str, list[tuple[str, dict[str, Any]]]]) -> None:
    """A stored answer reaches a streamed Bedrock call as event-stream, the form its SDK decodes."""
    url, seen = bedrock
    wrapped = _stored_client(anthropic.AnthropicBedrock, url)
    kw: dict[str, Any] = {
        "model": "claude-sonnet-4-6",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "hi"}],
    }
    with wrapped.messages.stream(**kw) as stream:
        message = stream.get_final_message()
    assert [b.model_dump(exclude_none=True) for b in message.content] == [
        {"type": "text", "text": "from the store"},
        {"type": "tool_use", "id": "toolu_1", "name": "t", "input": {"a": [1, 2]}},
    ]
    assert message.stop_reason == "tool_use" and message.usage.output_tokens == 3
    assert wrapped.messages.create(**kw).content[0].text == "from the store"  # JSON as before
    assert seen == [] and [r["short_circuit"] for r in wrapped.tokensaver.records] == ["stored", "stored"]


def test_bedrock_stream_served_from_store_async(
    bedrock: tuple[str, list[tuple[str, dict[str, Any]]]],
) -> None:
    url, seen = bedrock

    async def go() -> Any:
        wrapped = _stored_client(anthropic.AsyncAnthropicBedrock, url)
        kw = {"model": "claude-sonnet-4-6", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
        async with wrapped.messages.stream(**kw) as stream:
            return await stream.get_final_message()

    message = asyncio.run(asyncio.wait_for(go(), BOUND))
    assert message.content[0].text == "from the store" and message.content[1].input == {"a": [1, 2]}
    assert seen == []


@pytest.mark.parametrize("asynchronous", [False, True])
def test_bedrock_stream_plugin_tools(
    bedrock: tuple[str, list[tuple[str, dict[str, Any]]]], asynchronous: bool
) -> None:
    """A plugin-tool exchange on a streamed Bedrock call: the caller's stream is event-stream with the answer."""
    url, seen = bedrock
    pm = tokensaver.get_plugin_manager({"lookup": Lookup()}, load_entrypoints=False)
    pipe = tokensaver.Pipeline({"plugins": ["lookup"], "record": False}, plugin_manager=pm)
    kw: dict[str, Any] = {
        "model": "claude-sonnet-4-6",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "hi"}],
    }

    async def go_async() -> Any:
        client = anthropic.AsyncAnthropicBedrock(**BEDROCK_KW, base_url=url, timeout=BOUND, max_retries=0)
        async with tokensaver.wrap(client, pipeline=pipe).messages.stream(**kw) as stream:
            return await stream.get_final_message()

    if asynchronous:
        message = asyncio.run(asyncio.wait_for(go_async(), BOUND))
    else:
        client = anthropic.AnthropicBedrock(**BEDROCK_KW, base_url=url, timeout=BOUND, max_retries=0)
        with tokensaver.wrap(client, pipeline=pipe).messages.stream(**kw) as stream:
            message = stream.get_final_message()
    assert [b.type for b in message.content] == ["text"] and message.content[0].text == "Paris, of course."
    assert len(seen) == 2 and seen[1][1]["messages"][-1]["content"][0]["content"] == "the note"
    assert [r["status"] for r in pipe.records] == [200, 200]
    assert [r["usage"]["output_tokens"] for r in pipe.records] == [4, 7]
