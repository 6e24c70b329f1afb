"""A Messages API that misbehaves on request, for the fault suite (``e2e/faults.py``).

It stands where the API stands (loopback only): every answer comes from the offline emulator
(``tokensaver.emulator.Emulator``: validation, prompt-cache billing), unless the request asks for a
fault, by the header ``x-fault: NAME[:ARG]`` (the proxy forwards it) or by a script per request
nonce (:meth:`FaultUpstream.script`, one fault per upstream call). Faults:

* ``status:CODE[:RETRY_AFTER]`` an API error (429 rate_limit_error, 529 overloaded_error, 5xx
  api_error) with ``retry-after``;
* ``reset`` the connection is dropped before any header; ``reset_mid_stream`` half an SSE answer,
  then dropped; ``truncate`` a JSON 200 whose body is shorter than its ``Content-Length``;
* ``slow:S`` S seconds before the headers; ``slow_stream:S`` S seconds between SSE events;
* ``garbage_sse`` unparseable ``data:`` lines inside an SSE answer; ``error_then_stop`` an SSE
  ``error`` event after the first text delta, followed by ``message_stop``; ``late_error`` the same
  after ``message_delta`` (the message looks complete but for the error).

Each request names itself with ``[nonce:ID]`` in its last user message. The answer text carries
that nonce and a digest of the text the upstream saw, and every answer produced is kept by message
id (:attr:`FaultUpstream.calls`), with the API key's hash it was produced for, so a checker can
tell an answer to this request, for this key, from any other. Like the API, bodies over 32 MB get
413 ``request_too_large`` and unparseable JSON (too deep included) 400 ``invalid_request_error``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import threading
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tokensaver.emulator import Emulator
from tokensaver.proxy import BackgroundApp
from tokensaver.sse import message_to_sse

FAULT_HEADER = "x-fault"
BASE = "/base"  # the API lives under a base path, so that a path escaping it is visible
API_MAX_BODY = 32 * 1024 * 1024
# faults after which the caller never got the answer: serving it later (memoized) is wrong
BROKEN_FAULTS = frozenset({"reset_mid_stream", "truncate", "garbage_sse", "error_then_stop", "late_error"})
NONCE = re.compile(r"\[nonce:([A-Za-z0-9_.-]+)\]")
FILLER = (
    "The build failed in the linker step; the log shows the missing symbol and the file that needs it. "
    "Re-run after adding the library to the link line."
)

logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)


def digest(text: str) -> str:
    """Short digest of a request's nonce text (what the answer proves the upstream saw)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def key_tag(secret: str | None) -> str:
    """Short hash of an API key, sent as ``x-api-key`` or ``Authorization: Bearer`` (never the key itself)."""
    secret = secret or ""
    if secret[:7].lower() == "bearer ":
        secret = secret[7:].strip()
    return hashlib.sha256(secret.encode()).hexdigest()[:12]


def nonce_text(body: Any) -> tuple[str | None, str]:
    """(nonce, the text carrying it) from the last user message of a request body."""
    if not isinstance(body, dict):
        return None, ""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs or not isinstance(msgs[-1], dict):
        return None, ""
    content = msgs[-1].get("content")
    texts: list[str] = []
    if isinstance(content, str):
        texts = [content]
    elif isinstance(content, list):
        texts = [b["text"] for b in content if isinstance(b, dict) and isinstance(b.get("text"), str)]
    for text in texts:
        m = NONCE.search(text)
        if m:
            return m.group(1), text
    return None, ""


def answer_text(body: dict[str, Any]) -> str:
    """The reply to a body: its nonce, a digest of the text that carried it, and some prose."""
    nonce, text = nonce_text(body)
    return f"Answer to [nonce:{nonce}] digest {digest(text)}. {FILLER}"


@dataclass
class UpstreamCall:
    """One answer the upstream produced (a 200), as the checker compares it."""

    id: str
    nonce: str | None
    key: str
    digest: str
    content: list[tuple[str, str]]
    usage: dict[str, int]
    stream: bool
    fault: str


def content_of(message: dict[str, Any]) -> list[tuple[str, str]]:
    """(type, text) of each content block: what "the same message content" compares."""
    out = []
    for b in message.get("content") or []:
        if isinstance(b, dict):
            out.append((str(b.get("type")), str(b.get("text", b.get("name", "")))))
    return out


USAGE_KEYS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def usage_of(message: dict[str, Any]) -> dict[str, int]:
    """The billed usage fields the checker compares (missing ones count as 0)."""
    usage = message.get("usage") or {}
    return {k: int(usage.get(k) or 0) for k in USAGE_KEYS}


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    payload = {"type": "error", "error": {"type": kind, "message": message}}
    return web.json_response(payload, status=status, headers=headers)


_ERROR_TYPES = {429: "rate_limit_error", 529: "overloaded_error", 413: "request_too_large"}


class FaultUpstream:
    """The fault-injecting API: ``with FaultUpstream() as up: up.api_url``."""

    def __init__(self) -> None:
        self.emu = Emulator()  # used in-process (its ``handle``), never started
        self.calls: dict[str, UpstreamCall] = {}
        self.attempts: Counter[str] = Counter()  # Messages requests per nonce (answered or not)
        self.disconnects: Counter[str] = Counter()  # answers whose reader went away mid-way
        self.paths: list[str] = []  # every raw request path received
        self._scripts: dict[str, deque[str]] = {}
        self._lock = threading.Lock()
        self._server: BackgroundApp | None = None

    # lifecycle ----------------------------------------------------------------------------------

    def start(self) -> FaultUpstream:
        """Serve on a free loopback port in a background thread."""
        app = web.Application(client_max_size=80 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._server = BackgroundApp(app, "127.0.0.1", 0).start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> FaultUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (the origin)."""
        assert self._server is not None
        return self._server.url

    @property
    def api_url(self) -> str:
        """Where the Messages API lives: the origin plus the base path."""
        return self.url + BASE

    # scripting and reading ----------------------------------------------------------------------

    def script(self, nonce: str, *faults: str) -> None:
        """The next upstream calls for ``nonce`` get these faults, one each ("" = a normal answer)."""
        with self._lock:
            self._scripts.setdefault(nonce, deque()).extend(faults)

    def calls_for(self, nonce: str) -> list[UpstreamCall]:
        """Answers produced for ``nonce``."""
        with self._lock:
            return [c for c in self.calls.values() if c.nonce == nonce]

    def check(self, message: dict[str, Any], nonce: str, key: str, text: str) -> str | None:
        """None when ``message`` is the answer this upstream gave ``key`` for this request, else why not."""
        mid = str(message.get("id"))
        with self._lock:
            call = self.calls.get(mid)
        if call is None:
            return f"an answer the upstream never gave (id {mid}, {len(message.get('content') or [])} blocks)"
        if call.key != key_tag(key):
            return "an answer produced for another API key"
        if call.nonce != nonce:
            return "an answer to another request"
        broken = call.fault.partition(":")[0]
        if broken in BROKEN_FAULTS:
            return f"the answer whose delivery failed ({broken}) was served again"
        if call.digest != digest(text):
            return "the upstream saw a different last message than the caller sent"
        if content_of(message) != call.content:
            return f"content differs from the upstream's: {content_of(message)[:2]!r}"
        if usage_of(message) != call.usage:
            return f"usage differs: {usage_of(message)} vs upstream {call.usage}"
        return None

    def _fault_for(self, request: web.Request, nonce: str | None) -> str:
        given = request.headers.get(FAULT_HEADER)
        if given:
            return given
        with self._lock:
            queue = self._scripts.get(nonce or "")
            return queue.popleft() if queue else ""

    # the handler --------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw_path = request.raw_path
        with self._lock:
            self.paths.append(raw_path)
        path, _, query = raw_path.partition("?")
        if not path.startswith(BASE + "/"):
            return _error(404, "not_found_error", "outside the API's base path")
        path = path[len(BASE) :]
        raw = await request.read()
        if len(raw) > API_MAX_BODY:
            return _error(413, "request_too_large", "Request exceeds the maximum allowed number of bytes.")
        if request.method != "POST" or path not in ("/v1/messages", "/v1/messages/count_tokens"):
            return _error(404, "not_found_error", f"Not found: {request.method} {path}")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            return _error(400, "invalid_request_error", "There was an error parsing the body as JSON")
        nonce, text = nonce_text(body)
        if path == "/v1/messages":
            with self._lock:
                self.attempts[nonce or ""] += 1  # "": calls without a nonce (plugins' own model calls)
        fault = self._fault_for(request, nonce) if path == "/v1/messages" else ""
        name, _, arg = fault.partition(":")
        if name == "status":
            code, _, retry_after = arg.partition(":")
            status = int(code)
            kind = _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
            headers = {"request-id": f"req_fault_{nonce}"}
            if retry_after:
                headers["retry-after"] = retry_after
            return _error(status, kind, f"injected {status}", headers)
        if name == "reset":
            _abort(request)
            return web.Response()
        if name == "slow":
            await asyncio.sleep(float(arg or 1))
        stream = isinstance(body, dict) and bool(body.get("stream"))
        if stream:  # the emulator answers JSON; the stream is made here, so faults can cut it anywhere
            raw = json.dumps({**body, "stream": False}).encode()
        headers = {k: v for k, v in request.headers.items()}
        self.emu.reply(answer_text)  # one callable per call: the queue's order never matters
        status, out_headers, payload = await asyncio.to_thread(
            self.emu.handle, "POST", path + (f"?{query}" if query else ""), headers, raw
        )
        assert isinstance(payload, bytes)
        if status != 200 or path != "/v1/messages":
            return web.Response(status=status, body=payload, headers=out_headers)
        message = json.loads(payload)
        call = UpstreamCall(
            id=message["id"],
            nonce=nonce,
            key=key_tag(request.headers.get("x-api-key") or request.headers.get("authorization")),
            digest=digest(text),
            content=content_of(message),
            usage=usage_of(message),
            stream=stream,
            fault=fault,
        )
        with self._lock:
            self.calls[call.id] = call
        if not stream:
            if name == "truncate":
                response = web.StreamResponse(headers={**out_headers, "content-length": str(len(payload))})
                await response.prepare(request)
                await response.write(payload[: len(payload) // 2])
                _abort(request)
                return response
            return web.Response(status=200, body=payload, headers=out_headers)
        return await self._sse(request, message, out_headers, name, arg, nonce or "")

    async def _sse(
        self,
        request: web.Request,
        message: dict[str, Any],
        headers: dict[str, str],
        name: str,
        arg: str,
        nonce: str,
    ) -> web.StreamResponse:
        data = message_to_sse(message)
        events = [e + b"\n\n" for e in data.split(b"\n\n") if e.strip()]
        first_delta = next((i for i, e in enumerate(events) if b"content_block_delta" in e), 1)
        if name == "garbage_sse":
            garbage = [
                b"event: content_block_delta\ndata: {not json at all\n\n",
                b"data: \x00\xff garbage\n\n",
            ]
            events = events[: first_delta + 1] + garbage + events[first_delta + 1 :]
        elif name in ("error_then_stop", "late_error"):
            error = b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'
            stop = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
            # early: after the first text delta; late: after message_delta (stop_reason and usage known)
            cut = first_delta + 1 if name == "error_then_stop" else len(events) - 1
            events = events[:cut] + [error, stop]
        out = {k: v for k, v in headers.items() if k.lower() not in ("content-type", "content-length")}
        response = web.StreamResponse(headers={**out, "content-type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        try:
            if name == "reset_mid_stream":
                await response.write(b"".join(events[: first_delta + 1]))
                await asyncio.sleep(0.05)
                _abort(request)
                return response
            if name == "slow_stream":
                for e in events:
                    await response.write(e)
                    await asyncio.sleep(float(arg or 0.2))
            else:
                blob = b"".join(events)
                step = max(1, len(blob) // 4 + 1)
                for i in range(0, len(blob), step):
                    await response.write(blob[i : i + step])
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            with self._lock:
                self.disconnects[nonce] += 1
            raise
        return response


def _abort(request: web.Request) -> None:
    """Drop the connection at once (no more bytes, no orderly end of the body)."""
    transport = request.transport
    if transport is not None:
        transport.abort()
