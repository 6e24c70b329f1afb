"""Messages API server-sent events: a complete Message to its event stream, and back.

``message_to_sse(message)`` renders the exact event sequence the Messages API streams for a finished
Message (``message_start``, ``ping``, per block ``content_block_start`` / deltas / ``content_block_stop``,
``message_delta``, ``message_stop``). ``SSEAccumulator`` does the reverse: fed raw bytes with any
chunk boundaries, it assembles the final Message JSON, merging ``usage`` the way the anthropic SDK does
(``message_delta`` usage counts are cumulative totals and overwrite the ``message_start`` ones).
``EventStreamAccumulator`` reads the same events from AWS's binary event-stream, as Bedrock streams them
(``application/vnd.amazon.eventstream``: CRC-checked frames whose ``chunk`` payloads carry each event's
JSON, base64-encoded, in ``bytes``); ``stream_accumulator(content_type)`` picks the reader for an answer.
"""

from __future__ import annotations

import base64
import copy
import json
import struct
import zlib
from typing import Any

__all__ = [
    "EVENTSTREAM_CONTENT_TYPE",
    "EventStreamAccumulator",
    "SSEAccumulator",
    "eventstream_frame",
    "is_stream",
    "message_events",
    "message_to_eventstream",
    "message_to_sse",
    "sse_error",
    "sse_error_answer",
    "sse_event",
    "stream_accumulator",
]

EVENTSTREAM_CONTENT_TYPE = "application/vnd.amazon.eventstream"  # Bedrock's invoke-with-response-stream

# Block types whose ``input`` streams as ``input_json_delta`` (the start event carries ``input: {}``).
TOOL_INPUT_BLOCKS = ("tool_use", "server_tool_use", "mcp_tool_use")
# Usage fields a ``message_delta`` repeats as cumulative totals (omitted there when null).
DELTA_USAGE_FIELDS = (
    "input_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "server_tool_use",
    "output_tokens_details",
)
TEXT_CHUNK = 24  # characters per text/thinking delta
JSON_CHUNK = 16  # characters per input_json_delta


def sse_event(event: str, data: dict[str, Any]) -> bytes:
    """One ``event: X`` / ``data: {json}`` frame, blank-line terminated."""
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"event: {event}\ndata: {payload}\n\n".encode()


def sse_error(error_type: str, message: str) -> bytes:
    """An ``event: error`` frame as the API sends mid-stream (e.g. ``overloaded_error``)."""
    return sse_event("error", {"type": "error", "error": {"type": error_type, "message": message}})


def sse_error_answer(payload: bytes, status: int) -> bytes:
    """An API error answer (JSON ``{"error": {type, message}}``), told to a caller already streaming."""
    try:
        error = json.loads(payload).get("error") or {}
    except (ValueError, AttributeError):
        error = {}
    return sse_error(str(error.get("type") or "api_error"), str(error.get("message") or f"HTTP {status}"))


def _chunks(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def _text_start(block: dict[str, Any]) -> dict[str, Any]:
    start = {k: v for k, v in block.items() if k not in ("text", "citations")}
    start["text"] = ""
    citations = block.get("citations")
    if isinstance(citations, list):
        start["citations"] = []
    elif "citations" in block:
        start["citations"] = citations
    return start


def _text_deltas(block: dict[str, Any]) -> list[dict[str, Any]]:
    citations = block.get("citations")
    out: list[dict[str, Any]] = [
        {"type": "citations_delta", "citation": c} for c in (citations if isinstance(citations, list) else [])
    ]
    out.extend({"type": "text_delta", "text": piece} for piece in _chunks(block.get("text", ""), TEXT_CHUNK))
    return out


def _tool_input_deltas(block: dict[str, Any]) -> list[dict[str, Any]]:
    raw = block.get("input")
    if not raw:
        return [{"type": "input_json_delta", "partial_json": ""}]
    text = json.dumps(raw, separators=(",", ":"), ensure_ascii=False)
    return [{"type": "input_json_delta", "partial_json": piece} for piece in _chunks(text, JSON_CHUNK)]


def _thinking_start(block: dict[str, Any]) -> dict[str, Any]:
    start = {k: v for k, v in block.items() if k not in ("thinking", "signature")}
    start["thinking"] = ""
    start["signature"] = ""
    return start


def _thinking_deltas(block: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [
        {"type": "thinking_delta", "thinking": piece}
        for piece in _chunks(block.get("thinking", ""), TEXT_CHUNK)
    ]
    if block.get("signature"):
        out.append({"type": "signature_delta", "signature": block["signature"]})
    return out


def _block_events(index: int, block: dict[str, Any]) -> list[dict[str, Any]]:
    kind = block.get("type")
    if kind == "text":
        start, deltas = _text_start(block), _text_deltas(block)
    elif kind in TOOL_INPUT_BLOCKS:
        start, deltas = {**block, "input": {}}, _tool_input_deltas(block)
    elif kind == "thinking":
        start, deltas = _thinking_start(block), _thinking_deltas(block)
    else:  # redacted_thinking, server tool results, ...: whole in the start event
        start, deltas = block, []
    out: list[dict[str, Any]] = [{"type": "content_block_start", "index": index, "content_block": start}]
    out.extend({"type": "content_block_delta", "index": index, "delta": d} for d in deltas)
    out.append({"type": "content_block_stop", "index": index})
    return out


def _message_delta(message: dict[str, Any], usage: dict[str, Any]) -> dict[str, Any]:
    d: dict[str, Any] = {
        "stop_reason": message.get("stop_reason"),
        "stop_sequence": message.get("stop_sequence"),
    }
    if "stop_details" in message:
        d["stop_details"] = message["stop_details"]
    if message.get("container") is not None:
        d["container"] = message["container"]
    delta_usage: dict[str, Any] = {"output_tokens": int(usage.get("output_tokens") or 0)}
    for field in DELTA_USAGE_FIELDS:
        if usage.get(field) is not None:
            delta_usage[field] = usage[field]
    md: dict[str, Any] = {"type": "message_delta", "delta": d, "usage": delta_usage}
    if message.get("context_management") is not None:
        md["context_management"] = message["context_management"]
    return md


def message_events(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The events the Messages API streams for ``message``, in order (each one's name is its ``type``)."""
    usage = dict(message.get("usage") or {})
    start_msg = {
        k: copy.deepcopy(v) for k, v in message.items() if k not in ("content", "usage", "context_management")
    }
    start_msg["content"] = []
    start_msg["stop_reason"] = None
    start_msg["stop_sequence"] = None
    if "stop_details" in start_msg:
        start_msg["stop_details"] = None
    start_usage = dict(usage)
    start_usage["output_tokens"] = min(1, int(usage.get("output_tokens") or 0))
    start_msg["usage"] = start_usage
    events: list[dict[str, Any]] = [{"type": "message_start", "message": start_msg}, {"type": "ping"}]
    for i, block in enumerate(message.get("content") or []):
        events.extend(_block_events(i, block))
    events.append(_message_delta(message, usage))
    events.append({"type": "message_stop"})
    return events


def message_to_sse(message: dict[str, Any]) -> bytes:
    """The byte stream the Messages API sends for ``message`` when ``stream: true``."""
    return b"".join(sse_event(e["type"], e) for e in message_events(message))


class SSEAccumulator:
    """Assembles the final Message JSON from a Messages SSE byte stream fed in arbitrary chunks."""

    def __init__(self) -> None:
        self._buf = b""
        self._event: str | None = None
        self._data: list[str] = []
        self._msg: dict[str, Any] | None = None
        self._json_bufs: dict[int, str] = {}
        self.complete = False
        self.error: dict[str, Any] | None = None
        self.malformed = False  # an event that is not the API's (data not a JSON object, bad fields)
        self.events: list[tuple[str, dict[str, Any]]] = []

    @property
    def message(self) -> dict[str, Any] | None:
        """The assembled Message once the stream parsed cleanly to ``message_stop``, else ``None``.

        A stream with an ``error`` event or an event that does not parse is no answer, even when a
        ``message_stop`` follows: the client's SDK raised on it.
        """
        return self._msg if self.complete and self.error is None and not self.malformed else None

    @property
    def failure(self) -> str | None:
        """Why there is no message: an error event, a malformed event, or a stream cut short."""
        if self.error is not None:
            return "stream error event"
        if self.malformed:
            return "malformed stream event"
        if not self.complete or self._msg is None:
            return "stream ended before message_stop"
        return None

    @property
    def snapshot(self) -> dict[str, Any] | None:
        """The message assembled so far (even before ``message_stop``)."""
        return self._msg

    def feed(self, chunk: bytes) -> None:
        """Consume raw bytes; any boundary (mid-line, mid-UTF-8, between ``\\r`` and ``\\n``) is fine."""
        self._buf += chunk
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                return
            line = self._buf[:nl]
            self._buf = self._buf[nl + 1 :]
            if line.endswith(b"\r"):
                line = line[:-1]
            self._line(line.decode("utf-8", errors="replace"))

    def close(self) -> None:
        """End of stream: dispatch a final event not followed by a blank line."""
        if self._buf:
            rest, self._buf = self._buf, b""
            self._line(rest.rstrip(b"\r").decode("utf-8", errors="replace"))
        self._line("")

    def _line(self, line: str) -> None:
        if not line:
            if self._data or self._event:
                self._dispatch(self._event, "\n".join(self._data))
            self._event, self._data = None, []
            return
        if line.startswith(":"):
            return
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "event":
            self._event = value
        elif field == "data":
            self._data.append(value)

    def _dispatch(self, event: str | None, raw: str) -> None:
        # the SDK skips pings and unnamed events unread, and raises on any other that does not parse
        strict = event not in (None, "ping")
        try:
            data = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            self.malformed |= strict
            return
        if not isinstance(data, dict):
            self.malformed |= strict
            return
        try:
            self._apply(event or "message", data)
        except (ValueError, TypeError, AttributeError, KeyError, IndexError):
            self.malformed = True  # fields of the wrong shape (an index that is not a number, ...)

    def _apply(self, event: str, data: dict[str, Any]) -> None:
        kind = data.get("type", event)
        self.events.append((kind, data))
        if kind == "error":
            self.error = data.get("error") if isinstance(data.get("error"), dict) else data
            return
        if kind == "message_start":
            self._msg = copy.deepcopy(data.get("message") or {})
            self._msg.setdefault("content", [])
            self._json_bufs = {}
            return
        msg = self._msg
        if msg is None:
            return
        if kind == "content_block_start":
            self._block_start(msg, data)
        elif kind == "content_block_delta":
            self._delta(msg, int(data.get("index", 0)), data.get("delta") or {})
        elif kind == "content_block_stop":
            idx = int(data.get("index", 0))
            buf = self._json_bufs.pop(idx, "")
            if buf and idx < len(msg["content"]):
                msg["content"][idx]["input"] = json.loads(buf)
        elif kind == "message_delta":
            self._message_delta(msg, data)
        elif kind == "message_stop":
            self.complete = True

    @staticmethod
    def _block_start(msg: dict[str, Any], data: dict[str, Any]) -> None:
        block = copy.deepcopy(data.get("content_block") or {})
        content = msg.setdefault("content", [])
        idx = int(data.get("index", len(content)))
        while len(content) < idx:
            content.append({})
        if idx < len(content):
            content[idx] = block
        else:
            content.append(block)

    @staticmethod
    def _message_delta(msg: dict[str, Any], data: dict[str, Any]) -> None:
        d = data.get("delta") or {}
        msg["stop_reason"] = d.get("stop_reason")
        msg["stop_sequence"] = d.get("stop_sequence")
        if "stop_details" in d or "stop_details" in msg:
            msg["stop_details"] = d.get("stop_details")
        if d.get("container") is not None:
            msg["container"] = d["container"]
        if data.get("context_management") is not None:
            msg["context_management"] = data["context_management"]
        u = data.get("usage") or {}
        usage = msg.setdefault("usage", {})
        if "output_tokens" in u:
            usage["output_tokens"] = u["output_tokens"]
        for field in DELTA_USAGE_FIELDS:
            if u.get(field) is not None:
                usage[field] = u[field]

    def _delta(self, msg: dict[str, Any], idx: int, d: dict[str, Any]) -> None:
        if idx >= len(msg["content"]):
            return
        block = msg["content"][idx]
        dt = d.get("type")
        if dt == "text_delta":
            block["text"] = block.get("text", "") + d.get("text", "")
        elif dt == "input_json_delta":
            self._json_bufs[idx] = self._json_bufs.get(idx, "") + d.get("partial_json", "")
        elif dt == "thinking_delta":
            block["thinking"] = block.get("thinking", "") + d.get("thinking", "")
        elif dt == "signature_delta":
            block["signature"] = d.get("signature", "")
        elif dt == "citations_delta":
            if block.get("citations"):
                block["citations"].append(d.get("citation"))
            else:
                block["citations"] = [d.get("citation")]


# -- AWS event-stream (Bedrock) ------------------------------------------------------------------

_PRELUDE = 12  # total length, headers length, prelude CRC (big-endian uint32 each)
# header value sizes by type (0/1: booleans without a value; 6/7: bytes/string with a uint16 length)
_HEADER_SIZES = {0: 0, 1: 0, 2: 1, 3: 2, 4: 4, 5: 8, 8: 8, 9: 16}


def _eventstream_headers(raw: bytes) -> dict[str, str]:
    """A frame's string headers (``:message-type``, ``:event-type``...); other types are skipped."""
    out: dict[str, str] = {}
    i = 0
    while i < len(raw):
        n = raw[i]
        name = raw[i + 1 : i + 1 + n].decode()
        kind = raw[i + 1 + n]
        i += n + 2
        if kind in (6, 7):
            (size,) = struct.unpack_from(">H", raw, i)
            if kind == 7:
                out[name] = raw[i + 2 : i + 2 + size].decode()
            i += 2 + size
        else:
            i += _HEADER_SIZES[kind]  # KeyError: not a header type event-stream has
    return out


def eventstream_frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One event-stream message: prelude (lengths, CRC32), string headers, payload, message CRC32."""
    head = b"".join(
        bytes([len(k)]) + k.encode() + b"\x07" + struct.pack(">H", len(v.encode())) + v.encode()
        for k, v in headers.items()
    )
    prelude = struct.pack(">II", _PRELUDE + len(head) + len(payload) + 4, len(head))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    frame = prelude + head + payload
    return frame + struct.pack(">I", zlib.crc32(frame))


_CHUNK_HEADERS = {":event-type": "chunk", ":content-type": "application/json", ":message-type": "event"}


def message_to_eventstream(message: dict[str, Any]) -> bytes:
    """The byte stream Bedrock's ``invoke-with-response-stream`` sends for ``message``.

    One ``chunk`` frame per Messages event (its JSON, base64-encoded, in ``bytes``); Bedrock sends
    no ``ping``.
    """
    frames = []
    for event in message_events(message):
        if event["type"] == "ping":
            continue
        data = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
        payload = json.dumps({"bytes": base64.b64encode(data).decode()}).encode()
        frames.append(eventstream_frame(_CHUNK_HEADERS, payload))
    return b"".join(frames)


class EventStreamAccumulator(SSEAccumulator):
    """:class:`SSEAccumulator` for Bedrock's binary event-stream, fed in arbitrary chunks.

    Each frame is checked as the SDK's decoder (botocore) checks it: a CRC that does not match, or
    a frame that does not parse, is a malformed stream (the SDK raised on it). An ``exception`` or
    ``error`` frame is the stream's error event; ``chunk`` events carry the Messages events.
    """

    def feed(self, chunk: bytes) -> None:
        """Consume raw bytes; frames may be split anywhere."""
        self._buf += chunk
        while not self.malformed and len(self._buf) >= _PRELUDE:
            total, head_len, prelude_crc = struct.unpack_from(">III", self._buf)
            if zlib.crc32(self._buf[:8]) != prelude_crc or total < _PRELUDE + head_len + 4:
                self.malformed = True
                return
            if len(self._buf) < total:
                return
            frame, self._buf = self._buf[:total], self._buf[total:]
            if zlib.crc32(frame[:-4]) != struct.unpack_from(">I", frame, total - 4)[0]:
                self.malformed = True
                return
            try:
                headers = _eventstream_headers(frame[_PRELUDE : _PRELUDE + head_len])
                self._frame(headers, frame[_PRELUDE + head_len : -4])
            except (ValueError, TypeError, KeyError, IndexError, struct.error):
                self.malformed = True  # binascii.Error and UnicodeDecodeError are ValueErrors

    def close(self) -> None:
        """End of stream: a frame cut off is dropped (the stream then lacks its ``message_stop``)."""
        self._buf = b""

    def _frame(self, headers: dict[str, str], payload: bytes) -> None:
        kind = headers.get(":message-type", "event")
        if kind in ("exception", "error"):
            body = json.loads(payload) if payload else {}
            body = body if isinstance(body, dict) else {}
            code = headers.get(":exception-type") or headers.get(":error-code") or "api_error"
            message = body.get("message") or body.get("Message") or headers.get(":error-message") or ""
            self._apply("error", {"type": "error", "error": {"type": code, "message": str(message)}})
            return
        if headers.get(":event-type") != "chunk":
            return  # not a response-stream chunk: botocore yields nothing for it
        data = json.loads(payload)
        raw = base64.b64decode(data["bytes"], validate=True).decode()
        try:
            event = json.loads(raw)
        except ValueError:
            event = None
        if isinstance(event, dict) and not isinstance(event.get("type"), str) and "completion" not in event:
            return  # the SDK skips a chunk with no event name to route it by
        name = (
            event["type"] if isinstance(event, dict) and isinstance(event.get("type"), str) else "completion"
        )
        self._dispatch(name, raw)


def is_stream(content_type: str) -> bool:
    """Whether an answer with ``content_type`` is a stream of Messages events (SSE or event-stream)."""
    return "text/event-stream" in content_type or EVENTSTREAM_CONTENT_TYPE in content_type


def stream_accumulator(content_type: str) -> SSEAccumulator:
    """The reader for a streamed answer of ``content_type``: event-stream (Bedrock) or SSE."""
    return EventStreamAccumulator() if EVENTSTREAM_CONTENT_TYPE in content_type else SSEAccumulator()
