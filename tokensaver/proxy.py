"""``tokensaver proxy``: the Messages API over HTTP, for agents that cannot call ``wrap()``.

Point an agent's Anthropic endpoint at the proxy (``ANTHROPIC_BASE_URL=http://127.0.0.1:8787``) and
every ``POST /v1/messages`` (JSON or SSE, with or without ``?beta=true``) runs through the same
:class:`~tokensaver.pipeline.Pipeline` as ``wrap()``: same plugins, config and run ledger, one code
path. Every other path (``count_tokens``, models, batches, files, ...) is forwarded untouched.

* Credentials (``x-api-key``, ``authorization``) go upstream as they came; the pipeline only ever
  sees a hash of them (memoized answers are namespaced by it), never the secret.
* Upstream errors come back unchanged (status, body, ``retry-after``, ``request-id``): the
  client's own retries keep working, and each attempt is recorded once.
* Streams pass through chunk by chunk while usage is read on the way; a client that disconnects
  closes its upstream request.
* Tools that plugins add (``tokensaver_*``) are answered here, as ``wrap()`` does: the agent never
  sees them, and a streamed answer keeps streaming across the rounds.
* Calls are grouped into one run per agent session (``X-Claude-Code-Session-Id``, or the session
  in ``metadata.user_id``); calls without one go to the proxy's default run.

Unsafe: anyone who can reach the proxy spends the API key they send through it, and reads
memoized answers of that key. It binds to loopback by default; any other address requires an
access token (``--token`` / ``$TOKENSAVER_PROXY_TOKEN``) that clients send as
``x-tokensaver-proxy-token`` (Claude Code: ``ANTHROPIC_CUSTOM_HEADERS``). The token is checked,
never forwarded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import statistics
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

import aiohttp
import pluggy
from aiohttp import web
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from multidict import CIMultiDict
from yarl import URL

from .config import Config, load_config
from .context import MODEL_CALL_TIMEOUT
from .errors import ModelCallError, TokensaverError
from .middleware import (
    MAX_PLUGIN_TOOL_ROUNDS,
    Splice,
    call_on_loop,
    end_exchange,
    next_round,
    plan_round,
    plugin_tools,
    read_message,
    request_phase,
    response_phase,
    thinking_on,
)
from .pipeline import Call, Pipeline, key_hash
from .plugins import get_plugin_manager
from .run import Run
from .sse import SSEAccumulator, message_to_sse, sse_error, sse_error_answer

__all__ = [
    "DEFAULT_UPSTREAM",
    "ProxyServer",
    "TokensaverProxy",
    "add_arguments",
    "check_bind",
    "measure_proxy_overhead",
    "run",
    "session_of",
]

log = logging.getLogger("tokensaver.proxy")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8787
DEFAULT_UPSTREAM = "https://api.anthropic.com"
MESSAGES_PATH = "/v1/messages"
CONTROL_PREFIX = "x-tokensaver-"
TOKEN_HEADER = "x-tokensaver-proxy-token"
RUN_HEADER = "x-tokensaver-run"
SESSION_HEADER = "x-claude-code-session-id"
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
MAX_BODY = 32 * 1024 * 1024  # the API refuses Messages requests over 32 MB (413 request_too_large)
MAX_SESSIONS = 256  # session pipelines kept open; an evicted session's run continues on its next call
# the proxy adds none of its own: the client's user agent (or none) goes upstream
SKIP_AUTO_HEADERS = ("User-Agent",)
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_USER_ID_SESSION = re.compile(r"session_([0-9A-Za-z][0-9A-Za-z_.-]{3,})")


# -- pure helpers ------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback name or address (only those are served without a token)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve a non-loopback address without an access token."""
    if not is_loopback(host) and not token:
        raise TokensaverError(
            f"refusing to bind {host}: anyone who can reach it could spend the API keys sent through it; "
            "set an access token with --token or TOKENSAVER_PROXY_TOKEN (clients send it as "
            f"{TOKEN_HEADER}), or bind 127.0.0.1"
        )


def session_of(headers: Mapping[str, str], body: Mapping[str, Any]) -> str | None:
    """The agent session a call belongs to: Claude Code's session header, else ``metadata.user_id``.

    ``user_id`` carries it as ``..._session_<uuid>`` (older Claude Code) or as JSON with
    ``session_id`` (newer).
    """
    for name, value in headers.items():
        if name.lower() == SESSION_HEADER and value.strip():
            return value.strip()
    meta = body.get("metadata")
    uid = meta.get("user_id") if isinstance(meta, dict) else None
    if not isinstance(uid, str) or not uid:
        return None
    if uid.lstrip().startswith("{"):
        try:
            parsed = json.loads(uid)
        except ValueError:
            parsed = None
        sid = parsed.get("session_id") if isinstance(parsed, dict) else None
        if isinstance(sid, str) and sid.strip():
            return sid.strip()
    m = _USER_ID_SESSION.search(uid)
    return m.group(1) if m else None


def session_run_name(session: str) -> str:
    """The run name of a session: ``session-<id>`` with characters a run name cannot hold replaced."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "-", session)[:96]
    return f"session-{safe}"


def _forward_headers(headers: Mapping[str, str], *, drop: frozenset[str] = frozenset()) -> CIMultiDict[str]:
    """Request headers to send upstream: minus hop-by-hop, host/length and tokensaver control headers."""
    items = list(headers.items())
    connection = {
        t.strip().lower() for k, v in items if k.lower() == "connection" for t in v.split(",") if t.strip()
    }
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in items:
        low = name.lower()
        if (
            low in HOP_BY_HOP
            or low in connection
            or low in ("host", "content-length")
            or (low == "content-encoding" and _decoded_here(value))
            or low in drop
            or low.startswith(CONTROL_PREFIX)
        ):
            continue
        out.add(name, value)
    return out


def _response_headers(headers: Mapping[str, str], *, decoded: bool) -> CIMultiDict[str]:
    """Upstream response headers to send back (length/encoding dropped when the body was decoded)."""
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        low = name.lower()
        if low in HOP_BY_HOP or (decoded and low in ("content-length", "content-encoding")):
            continue
        out.add(name, value)
    return out


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """An error in the Messages API's shape, made by the proxy itself."""
    payload = {"type": "error", "error": {"type": kind, "message": message}}
    return web.json_response(payload, status=status, headers=headers)


_ERROR_KINDS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def _error_kind(status: int) -> str:
    """The API's error type for a status (its docs: other 4xx are ``invalid_request_error``)."""
    return _ERROR_KINDS.get(status, "invalid_request_error" if status < 500 else "api_error")


def _too_large() -> web.Response:
    return _error(
        413,
        "request_too_large",
        f"tokensaver proxy: the request body is over the Messages API's {MAX_BODY // 2**20} MB limit",
    )


def _decoded_here(content_encoding: str) -> bool:
    """Whether aiohttp decodes a request body sent with this encoding as it reads it (we forward plain bytes)."""
    return content_encoding.lower() in ("gzip", "deflate", "br", "zstd")


def _unquoted(segment: str) -> str | None:
    """A path segment percent-decoded until nothing changes (``None``: not UTF-8, or still encoded after four rounds)."""
    for _ in range(4):
        try:  # an invalid UTF-8 escape (an overlong %C0%AE for '.') is no path the API has
            decoded = unquote(segment, errors="strict")
        except UnicodeDecodeError:
            return None
        if decoded == segment:
            return segment
        segment = decoded
    return None


def _confined_path(raw_path: str) -> str | None:
    """``raw_path`` as it is forwarded under the upstream's base path, or ``None`` if it cannot be.

    Empty and ``.`` segments are dropped and ``..`` removes the segment before it (``%2e`` is a
    dot: RFC 3986 6.2.2.2); other segments are kept as sent. Refused, because a server that reads
    paths leniently could still climb out of the base with them: a ``..`` above the root, an
    encoded slash, a backslash (raw or encoded), a control character, an escape that is not
    UTF-8 (``%C0%AE``), a dot-segment with parameters (``..;``) or encoded twice (``%252e``).
    """
    out: list[str] = []
    segments = raw_path.split("/")
    trailing = False
    for segment in segments:
        trailing = not segment
        if not segment:
            continue
        full = _unquoted(segment)
        once = unquote(segment)
        if full is None or "/" in full or "\\" in full or any(c < " " or c == "\x7f" for c in full):
            return None
        if full.split(";", 1)[0] in (".", ".."):
            if once != full or once not in (".", ".."):
                return None
            if once == "..":
                if not out:
                    return None
                out.pop()
            trailing = True
            continue
        out.append(segment)
    return "/" + "/".join(out) + ("/" if trailing and out else "")


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "a string" if isinstance(value, str) else "an array"


PARSE_ON_LOOP_BYTES = 256 * 1024  # parsing more than this would hold the event loop for milliseconds


def _parse_messages_body(raw: bytes, content_type: str = "") -> tuple[dict[str, Any] | None, str | None]:
    """A Messages request body as a JSON object, or why it is not one (the proxy answers that as a 400)."""
    if not raw.strip():
        return None, "the request body is empty; the Messages API takes a JSON object"
    try:
        body = json.loads(raw)
    except RecursionError:  # the C decoder counts its depth against the recursion limit: no stack overflow
        return None, "the request body nests too deeply to parse"
    except ValueError as exc:  # UnicodeDecodeError included
        where = (
            f"{exc.msg} at line {exc.lineno} column {exc.colno}"
            if isinstance(exc, json.JSONDecodeError)
            else "not UTF-8"
        )
        mime = content_type.split(";", 1)[0].strip().lower()
        hint = (
            ""
            if mime in ("", "application/json") or mime.endswith("+json")
            else f"; the Messages API takes application/json, not {mime}"
        )
        return None, f"the request body is not valid JSON ({where}){hint}"
    if not isinstance(body, dict):
        return None, f"the request body must be a JSON object, not {_json_kind(body)}"
    return body, None


@web.middleware
async def _api_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Errors raised while serving a request (aiohttp's own included), answered in the API's JSON shape."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kept = {k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")}
        return _error(exc.status, _error_kind(exc.status), f"tokensaver proxy: {exc.reason}", kept)
    except ConnectionResetError:  # the client went away: nobody to answer
        raise
    except Exception:
        if request.writer.output_size > 0:  # an answer is under way: aiohttp closes the connection
            raise
        log.exception("%s %s failed in the proxy", request.method, request.path_qs[:200])
        # the upstream may have answered (and billed) already: a retry could pay twice
        return _error(500, "api_error", "tokensaver proxy: internal error", {"x-should-retry": "false"})


class _ApiErrorHandler(RequestHandler):
    """aiohttp's connection handler, answering a request it cannot parse as HTTP with a JSON error."""

    __slots__ = ()

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            super().handle_error(request, status, exc, message)  # logs the traceback; raises if under way
            text = "tokensaver proxy: internal error"
        else:
            # not aiohttp's log line: its message can quote the start of a header value (a key)
            if request.writer.output_size > 0:
                raise ConnectionError("an answer is under way: cannot send an error")
            kind = type(exc).__name__ if exc is not None else HTTPStatus(status).phrase
            log.warning("unparsable request from %s: %s", request.remote, kind)
            text = f"tokensaver proxy: the request is not valid HTTP ({kind})"
        response = _error(status, _error_kind(status), text)
        response.force_close()
        return response


class _ApiErrorServer(web.Server):
    # aiohttp takes no handler class: build its own, then give it ours (same slots, one method more)
    def __call__(self) -> RequestHandler:
        handler = super().__call__()
        handler.__class__ = _ApiErrorHandler
        return handler


def _int(value: str | None) -> int:
    try:
        return max(0, int(value or 0))
    except ValueError:
        return 0


# -- the proxy ---------------------------------------------------------------------------------


class TokensaverProxy:
    """The aiohttp application: pipelines per session, an upstream client, the request handler."""

    def __init__(
        self,
        config: Config | dict[str, Any] | str | None = None,
        *,
        upstream: str = DEFAULT_UPSTREAM,
        token: str | None = None,
        run: Run | str | None = None,
        plugin_manager: pluggy.PluginManager | None = None,
        clock: Any = None,
    ) -> None:
        self.pm = plugin_manager or get_plugin_manager()
        self.config = config if isinstance(config, Config) else load_config(config, pm=self.pm)
        self.clock = clock
        # the default run (calls without a session) also owns the plugin state every session shares
        self.default = Pipeline(self.config, plugin_manager=self.pm, run=run, clock=clock)
        self._sessions: OrderedDict[str, Pipeline] = OrderedDict()
        self._lock = threading.Lock()
        self.upstream = URL(upstream.rstrip("/"))
        if not self.upstream.is_absolute():
            raise TokensaverError(f"--upstream must be an absolute URL, got {upstream!r}")
        self.token = token or None
        self.client: aiohttp.ClientSession | None = None

    # pipelines ---------------------------------------------------------------------------------

    def pipeline_for(self, name: str | None) -> Pipeline:
        """The pipeline recording into run ``name`` (``None``: the default run)."""
        if name is None or (self.default.run is not None and name == self.default.run.name):
            return self.default
        with self._lock:
            pipe = self._sessions.get(name)
            if pipe is not None:
                self._sessions.move_to_end(name)
                return pipe
            run = (
                Run(name, runs_dir=self.config.runs_dir, config=self.config.as_dict())
                if self.config.record
                else None
            )
            pipe = Pipeline(self.config, plugin_manager=self.pm, run=run, clock=self.clock)
            # plugin state lives as long as the proxy: keyed by conversation and content, never by run
            pipe.states = self.default.states
            pipe.shadows = self.default.shadows  # the API's prompt cache is per key, not per session
            self._sessions[name] = pipe
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
            return pipe

    def pipelines(self) -> list[Pipeline]:
        """The default pipeline and every session pipeline still open."""
        with self._lock:
            return [self.default, *self._sessions.values()]

    def _run_name(self, headers: Mapping[str, str], body: Mapping[str, Any]) -> str | None:
        explicit = headers.get(RUN_HEADER, "").strip()
        if explicit and _RUN_NAME.match(explicit):
            return explicit
        session = session_of(headers, body)
        return session_run_name(session) if session else None

    # application -------------------------------------------------------------------------------

    def app(self) -> web.Application:
        """The aiohttp application serving every path."""
        app = web.Application(client_max_size=MAX_BODY, middlewares=[_api_errors])
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    async def _open(self, app: web.Application) -> None:
        self.client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30),
            trust_env=True,
            auto_decompress=False,
        )

    async def _close(self, app: web.Application) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None

    def _url(self, request: web.Request) -> URL:
        tail = _confined_path(request.rel_url.raw_path)
        if tail is None:  # handle() refuses these before anything is sent
            raise TokensaverError(f"tokensaver proxy: refusing to forward {request.rel_url.raw_path[:200]!r}")
        path = self.upstream.raw_path.rstrip("/") + tail
        query = request.rel_url.raw_query_string
        return URL(f"{self.upstream.origin()}{path}" + (f"?{query}" if query else ""), encoded=True)

    def _model_caller(self, request: web.Request, loop: asyncio.AbstractEventLoop) -> Any:
        """``ctx.call_model`` for this request: plugins run in a worker thread, the call on ``loop``.

        Sent to the same upstream path with the caller's headers (credentials included), not streamed,
        bounded by ``MODEL_CALL_TIMEOUT`` (the worker thread waits no longer either).
        """

        async def post(body: dict[str, Any]) -> dict[str, Any]:
            up = await self._post(
                request,
                _encode({**body, "stream": False}),
                drop=_MODEL_CALL_DROP,
                timeout=aiohttp.ClientTimeout(total=MODEL_CALL_TIMEOUT),
            )
            try:
                payload = await up.read()
            finally:
                up.release()
            if not 200 <= up.status < 300:
                raise ModelCallError(
                    f"upstream answered HTTP {up.status}: {payload[:200]!r}", status=up.status
                )
            message = json.loads(payload)
            if not isinstance(message, dict):
                raise ModelCallError("upstream answer is not a Message")
            return message

        def call(body: dict[str, Any]) -> dict[str, Any]:
            return call_on_loop(loop, post(body), MODEL_CALL_TIMEOUT + 5)

        return call

    def _authorized(self, request: web.Request) -> bool:
        if self.token is None:
            return True
        given = request.headers.get(TOKEN_HEADER, "")
        if not given:
            scheme, _, value = request.headers.get("proxy-authorization", "").partition(" ")
            given = value.strip() if scheme.lower() == "bearer" else ""
        return hmac.compare_digest(given.encode(), self.token.encode())

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Every request: the access check, then Messages through the pipeline or a plain forward."""
        if not self._authorized(request):
            return _error(
                401,
                "authentication_error",
                f"tokensaver proxy: missing or wrong access token (send it as {TOKEN_HEADER})",
            )
        path = _confined_path(request.rel_url.raw_path)
        if path is None:
            log.warning(
                "%s %r refused: the path could leave the upstream's base",
                request.method,
                request.rel_url.raw_path[:200],
            )
            return _error(
                400,
                "invalid_request_error",
                "tokensaver proxy: the request path cannot be forwarded (a '..' above the root, an encoded "
                "slash, a backslash, a control character or a doubly encoded dot)",
            )
        if request.method == "POST" and unquote(path) == MESSAGES_PATH:
            return await self._messages(request)
        return await self._forward(request)

    # plain forwarding ----------------------------------------------------------------------------

    async def _forward(self, request: web.Request, raw: bytes | None = None) -> web.StreamResponse:
        """Forward a request untouched (bodies streamed both ways, encodings kept)."""
        assert self.client is not None
        headers = _forward_headers(request.headers)
        data: Any = None
        if raw is not None:
            data = raw
        elif request.body_exists:
            data = request.content.iter_any()
            # a body aiohttp decodes as it reads (gzip, ...) goes on chunked: its decoded length is unknown
            if request.content_length is not None and not _decoded_here(
                request.headers.get("content-encoding", "")
            ):
                headers["Content-Length"] = str(request.content_length)
        try:
            up = await self.client.request(
                request.method,
                self._url(request),
                headers=headers,
                data=data,
                skip_auto_headers=SKIP_AUTO_HEADERS,
                allow_redirects=False,
                auto_decompress=False,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            return self._unreachable(exc)
        try:
            response = web.StreamResponse(status=up.status, reason=up.reason)
            response.headers.extend(_response_headers(up.headers, decoded=False))
            await response.prepare(request)
            if request.method != "HEAD":
                async for chunk in up.content.iter_any():
                    await response.write(chunk)
            await response.write_eof()
            return response
        finally:
            up.close()

    def _unreachable(self, exc: BaseException) -> web.Response:
        log.warning("upstream %s unreachable: %s: %s", self.upstream, type(exc).__name__, exc)
        return _error(
            502, "api_error", f"tokensaver proxy: upstream {self.upstream} unreachable ({type(exc).__name__})"
        )

    # messages ------------------------------------------------------------------------------------

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/messages``: the pipeline, then the upstream call (or a short-circuit)."""
        if (request.content_length or 0) > MAX_BODY:
            return _too_large()  # not read: aiohttp drains and drops the rest
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _too_large()
        except RequestPayloadError as exc:  # says gzip and is not, a broken chunk
            log.warning("%s %s: unreadable body: %s", request.method, request.path_qs[:200], exc)
            return _error(
                400, "invalid_request_error", "tokensaver proxy: the request body could not be read"
            )
        content_type = request.headers.get("content-type", "")
        if len(raw) > PARSE_ON_LOOP_BYTES:  # a large body is parsed off the event loop
            parsed, problem = await request_phase(_parse_messages_body, raw, content_type)
        else:
            parsed, problem = _parse_messages_body(raw, content_type)
        if parsed is None:
            log.warning("%s %s refused: %s", request.method, request.path_qs[:200], problem)
            return _error(400, "invalid_request_error", f"tokensaver proxy: {problem}")
        body = parsed
        if not isinstance(body.get("messages"), list):
            log.warning(
                "%s %s: not a Messages request (no messages list): forwarded untouched, the API answers",
                request.method,
                request.path_qs[:200],
            )
            return await self._forward(request, raw=raw)
        headers = {k.lower(): v for k, v in request.headers.items()}
        secret = headers.get("x-api-key") or headers.get("authorization") or ""
        stream = bool(body.get("stream"))
        pipe = self.pipeline_for(self._run_name(headers, body))
        t0 = time.perf_counter()
        try:
            # plugins are sync and may wait (memoize's single-flight): keep the event loop free
            call = await request_phase(
                pipe.begin,
                body,
                headers=headers,
                key=key_hash(secret),
                stream=stream,
                surface="beta" if request.query.get("beta") == "true" else "messages",
                attempt=_int(headers.get("x-stainless-retry-count")),
                upstream=self._model_caller(request, asyncio.get_running_loop()),
                abandoned=lambda c: pipe.finish(c, None, status="incomplete", error="client disconnected"),
            )
        except TokensaverError as exc:  # strict mode: a plugin failed and the config says to stop
            return _error(500, "api_error", f"tokensaver: {exc}", {"x-should-retry": "false"})
        if call.short_circuit:
            await response_phase(pipe.finish, call, None)
            served = self._serve(call, stream)
            log.info(
                "%s %s short-circuit (%s) %.1fms",
                request.method,
                request.path_qs,
                call.short_circuit,
                (time.perf_counter() - t0) * 1000,
            )
            return served
        outcome = _Outcome()
        try:
            response = await self._upstream_messages(request, pipe, call, raw, outcome)
        finally:
            if not outcome.finishing:
                # cancelled (the client went away) or failed before an answer: record it once
                pipe.finish(call, None, status="incomplete", error="client disconnected")
        log.info(
            "%s %s -> %s %.1fms",
            request.method,
            request.path_qs,
            response.status,
            (time.perf_counter() - t0) * 1000,
        )
        return response

    def _serve(
        self,
        call: Call,
        stream: bool,
        message: dict[str, Any] | None = None,
        extra_headers: dict[str, str] | None = None,
    ) -> web.Response:
        """An answer made here: a short-circuit, or the end of a plugin-tool exchange."""
        message = message if message is not None else (call.response or {})
        headers = {
            "request-id": f"tokensaver-{call.ctx.call_id}",
            **call.ctx.response_headers,
            **(extra_headers or {}),
        }
        if call.short_circuit:
            headers["x-tokensaver-short-circuit"] = call.short_circuit
        if stream:
            headers["cache-control"] = "no-cache"
            return web.Response(
                body=message_to_sse(message),
                headers=headers,
                content_type="text/event-stream",
                charset="utf-8",
            )
        return web.Response(
            body=json.dumps(message).encode(), headers=headers, content_type="application/json"
        )

    async def _upstream_messages(
        self, request: web.Request, pipe: Pipeline, call: Call, raw: bytes, outcome: _Outcome
    ) -> web.StreamResponse:
        assert self.client is not None
        if plugin_tools(call.body):
            return await self._plugin_tool_exchange(request, pipe, call, outcome)
        if call.body is call.original:
            data = raw  # unchanged: the caller's bytes, exactly
        else:
            data = _encode(call.body)
        try:
            up = await self._post(request, data)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # recorded before the client hears of it: whoever reads the run next sees this call
            outcome.finishing = True
            pipe.finish(call, None, status="incomplete", error=f"upstream unreachable: {type(exc).__name__}")
            return self._unreachable(exc)
        try:
            out_headers = _response_headers(up.headers, decoded=True)
            if "text/event-stream" in up.headers.get("content-type", "") and 200 <= up.status < 300:
                out_headers.update(call.ctx.response_headers)
                return await self._stream(request, up, pipe, call, out_headers, outcome)
            try:
                payload = await up.read()
            except _UPSTREAM_BROKE as exc:  # nothing was sent to the client yet: it hears a retryable error
                return self._broke_off(pipe, call, outcome, exc)
            outcome.finishing = True
            if not 200 <= up.status < 300:
                pipe.finish(call, None, status=up.status, error=f"HTTP {up.status}")
                return web.Response(status=up.status, reason=up.reason, body=payload, headers=out_headers)
            out_headers.update(call.ctx.response_headers)
            try:
                message = json.loads(payload)
            except ValueError as exc:
                await response_phase(pipe.finish, call, None, status="unparsed", error=str(exc))
            else:
                await response_phase(
                    pipe.finish, call, message if isinstance(message, dict) else None, status=up.status
                )
            return web.Response(status=up.status, reason=up.reason, body=payload, headers=out_headers)
        finally:
            # not read to the end (client gone, upstream cut): closing aborts the upstream request
            up.close()

    def _broke_off(self, pipe: Pipeline, call: Call, outcome: _Outcome, exc: BaseException) -> web.Response:
        """An upstream answer that ended before it was whole (shorter than its Content-Length, a reset).

        Recorded as what it was; the client gets what an HTTP proxy answers, a 502 in the API's error
        shape, which the SDKs retry. The call is over: a claim it held (memoize) is released now.
        """
        what = "upstream truncated" if isinstance(exc, aiohttp.ClientPayloadError) else "upstream lost"
        outcome.finishing = True
        pipe.finish(call, None, status="incomplete", error=f"{what}: {type(exc).__name__}")
        log.warning("%s: %s", what, type(exc).__name__)
        return _error(502, "api_error", f"tokensaver proxy: the upstream answer broke off ({what})")

    async def _post(
        self,
        request: web.Request,
        data: bytes,
        drop: frozenset[str] = frozenset({"accept-encoding"}),
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> aiohttp.ClientResponse:
        """A Messages body upstream on the request's path, with the caller's headers minus ``drop``.

        We read what comes back (JSON or SSE): the client library picks an encoding it can decode.
        ``timeout`` bounds a plugin's own call; the caller's calls take as long as the API does.
        """
        assert self.client is not None
        headers = _forward_headers(request.headers, drop=drop)
        headers["Content-Type"] = "application/json"
        return await self.client.request(
            "POST",
            self._url(request),
            headers=headers,
            data=data,
            skip_auto_headers=SKIP_AUTO_HEADERS,
            allow_redirects=False,
            auto_decompress=True,
            timeout=timeout or self.client.timeout,
        )

    async def _plugin_tool_exchange(
        self, request: web.Request, pipe: Pipeline, call: Call, outcome: _Outcome
    ) -> web.StreamResponse:
        """Answer the tools plugins added (``tokensaver_*``) here, as ``wrap()`` does: the agent sees none.

        Streamed requests (without thinking) stream on as they come, joined into one message by
        :class:`~tokensaver.middleware.Splice`; other requests are read whole and the last round's
        answer is served (JSON, or replayed SSE).
        """
        stream = call.ctx.stream
        splice = Splice() if stream and not thinking_on(call.body) else None
        out: web.StreamResponse | None = None  # the caller's streamed response, once started
        first = call  # the caller's own request: the exchange's answer is stored under it
        for rounds in range(MAX_PLUGIN_TOOL_ROUNDS + 1):
            outcome.finishing = False
            try:
                up = await self._post(request, _encode(call.body))
            except (aiohttp.ClientError, TimeoutError) as exc:
                outcome.finishing = True
                pipe.finish(
                    call, None, status="incomplete", error=f"upstream unreachable: {type(exc).__name__}"
                )
                if out is None:
                    return self._unreachable(exc)
                await out.write(
                    sse_error("api_error", f"tokensaver proxy: upstream unreachable ({type(exc).__name__})")
                )
                await out.write_eof()
                return out
            try:
                if not 200 <= up.status < 300:
                    try:
                        payload = await up.read()
                    except _UPSTREAM_BROKE:
                        payload = b""
                    outcome.finishing = True
                    pipe.finish(call, None, status=up.status, error=f"HTTP {up.status}")
                    if out is None:
                        return web.Response(
                            status=up.status,
                            reason=up.reason,
                            body=payload,
                            headers=_response_headers(up.headers, decoded=True),
                        )
                    await out.write(sse_error_answer(payload, up.status))
                    await out.write_eof()
                    return out
                sse = "text/event-stream" in up.headers.get("content-type", "")
                try:
                    if splice is not None and sse:
                        if out is None:
                            out = web.StreamResponse(status=up.status, reason=up.reason)
                            out.headers.extend(_response_headers(up.headers, decoded=True))
                            out.headers.update(call.ctx.response_headers)
                            await out.prepare(request)
                        async for chunk in _upstream_chunks(up):
                            data = splice.feed(chunk)
                            if data:
                                await out.write(data)  # a failed write (our client gone) propagates
                        message = splice.acc.message
                    else:
                        message = read_message(up.headers.get("content-type", ""), await _upstream_body(up))
                except _UpstreamBroke as broke:
                    if out is None:
                        return self._broke_off(pipe, call, outcome, broke.exc)
                    outcome.finishing = True
                    pipe.finish(
                        call,
                        None,
                        status="incomplete",
                        error=f"upstream stream broke: {type(broke.exc).__name__}",
                    )
                    await out.write(sse_error("api_error", "tokensaver proxy: the upstream stream broke off"))
                    await out.write_eof()
                    return out
            finally:
                up.close()
            outcome.finishing = True
            if message is None:
                failure = splice.acc.failure if splice is not None and sse else "unreadable or cut-off answer"
                pipe.finish(call, None, status="incomplete", error=failure)
                if out is None:
                    return _error(502, "api_error", "tokensaver proxy: the upstream answer was cut off")
                await out.write_eof()
                return out
            results, reply = await response_phase(plan_round, pipe, call, message)
            last = results is None or rounds == MAX_PLUGIN_TOOL_ROUNDS
            joined = splice if last and out is not None else None  # the caller was streamed the rounds
            tail = joined.end() if joined is not None else b""
            if last:
                end_exchange(call, first, joined.answer if joined is not None else reply)
            await response_phase(pipe.finish, call, message)
            if last:
                if joined is not None and out is not None:
                    await out.write(tail)
                    await out.write_eof()
                    return out
                return self._serve(call, stream, reply, {"x-tokensaver-plugin-tool-rounds": str(rounds)})
            headers = {k.lower(): v for k, v in request.headers.items()}
            call = await request_phase(next_round, pipe, call, reply, results, headers)
            if splice is not None:
                splice.new_round()
        raise AssertionError("unreachable")

    async def _stream(
        self,
        request: web.Request,
        up: aiohttp.ClientResponse,
        pipe: Pipeline,
        call: Call,
        headers: CIMultiDict[str],
        outcome: _Outcome,
    ) -> web.StreamResponse:
        """Pass SSE through as it arrives while assembling the final message for the observers."""
        response = web.StreamResponse(status=up.status, reason=up.reason)
        response.headers.extend(headers)
        await response.prepare(request)
        acc = SSEAccumulator()
        try:
            # a failed write (our client went away) propagates as it is; only a failed read of the
            # upstream is the upstream's fault
            async for chunk in _upstream_chunks(up):
                acc.feed(chunk)
                try:
                    await response.write(chunk)
                except ConnectionResetError:
                    if acc.error is not None or acc.malformed:
                        # the upstream's own stream failed, and the client's SDK hung up on reading
                        # it: that failure is what happened to the call, not a client going away
                        outcome.finishing = True
                        pipe.finish(call, None, status="incomplete", error=acc.failure)
                    raise
        except _UpstreamBroke as broke:
            error = f"upstream stream broke: {type(broke.exc).__name__}"
            outcome.finishing = True
            pipe.finish(call, None, status="incomplete", error=error)
            await response.write(sse_error("api_error", f"tokensaver proxy: {error}"))
            await response.write_eof()
            return response
        acc.close()
        outcome.finishing = True
        if acc.message is not None:
            await response_phase(pipe.finish, call, acc.message)
        else:  # no observers run for it: nothing that could block the loop
            pipe.finish(call, None, status="incomplete", error=acc.failure)
        await response.write_eof()
        return response


_MODEL_CALL_DROP = frozenset({"accept-encoding", "accept"})  # a plugin's own call wants JSON
# an upstream answer that breaks off while it is read (cut short of its length, reset, timed out)
_UPSTREAM_BROKE = (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError)


class _UpstreamBroke(Exception):
    """Reading the upstream's answer failed: the upstream's fault, never our client's."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(type(exc).__name__)
        self.exc = exc


async def _upstream_chunks(up: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The upstream's body as it arrives; a read that breaks off raises :class:`_UpstreamBroke`.

    Told apart by where it happened, not by the exception's class: a reset while reading the
    upstream and a reset while writing to our client are both ConnectionResetErrors.
    """
    chunks = up.content.iter_any()
    while True:
        try:
            chunk = await chunks.__anext__()
        except StopAsyncIteration:
            return
        except _UPSTREAM_BROKE as exc:
            raise _UpstreamBroke(exc) from exc
        yield chunk


async def _upstream_body(up: aiohttp.ClientResponse) -> bytes:
    try:
        return await up.read()
    except _UPSTREAM_BROKE as exc:
        raise _UpstreamBroke(exc) from exc


def _encode(body: dict[str, Any]) -> bytes:
    """A transformed body as sent upstream (compact UTF-8 JSON)."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


class _Outcome:
    """What happened to one upstream call, for the record written when the handler unwinds."""

    __slots__ = ("finishing",)

    def __init__(self) -> None:
        self.finishing = False  # a finish() is under way or done: never record twice


# -- serving -----------------------------------------------------------------------------------


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError:
        sock.close()
        raise
    sock.listen(512)
    sock.setblocking(False)
    return sock


async def _start(app: web.Application, sock: socket.socket) -> web.AppRunner:
    # handler_cancellation: a client that disconnects cancels its handler, which closes the upstream call
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=5.0)
    await runner.setup()
    assert runner.server is not None
    runner.server.__class__ = _ApiErrorServer  # what aiohttp cannot parse is answered as JSON too
    await web.SockSite(runner, sock).start()
    return runner


class BackgroundApp:
    """An aiohttp application served from a background thread with its own event loop."""

    def __init__(self, app: web.Application, host: str = DEFAULT_HOST, port: int = 0) -> None:
        self.app = app
        self.host = host
        self._sock = _listen(host, port)
        self.port: int = self._sock.getsockname()[1]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://host:port``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> BackgroundApp:
        """Serve in a background thread; returns once the socket accepts requests."""
        if self._thread is not None:
            return self
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._runner = loop.run_until_complete(_start(self.app, self._sock))
        self._thread = threading.Thread(target=loop.run_forever, name="tokensaver-aiohttp", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, run the application's cleanup, close the loop."""
        loop, runner, thread = self._loop, self._runner, self._thread
        if loop is None or runner is None or thread is None:
            self._sock.close()
            return
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()
        self._sock.close()
        self._loop = self._runner = self._thread = None

    def __enter__(self) -> BackgroundApp:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ProxyServer(BackgroundApp):
    """The proxy in a background thread (tests, bench): ``with ProxyServer(cfg, upstream=u) as p: p.url``."""

    def __init__(
        self,
        config: Config | dict[str, Any] | str | None = None,
        *,
        upstream: str = DEFAULT_UPSTREAM,
        host: str = DEFAULT_HOST,
        port: int = 0,
        token: str | None = None,
        run: Run | str | None = None,
        plugin_manager: pluggy.PluginManager | None = None,
        clock: Any = None,
    ) -> None:
        check_bind(host, token)
        self.proxy = TokensaverProxy(
            config, upstream=upstream, token=token, run=run, plugin_manager=plugin_manager, clock=clock
        )
        super().__init__(self.proxy.app(), host, port)

    @property
    def pipeline(self) -> Pipeline:
        """The default run's pipeline (calls without a session)."""
        return self.proxy.default

    def records(self) -> list[dict[str, Any]]:
        """Every call record of this proxy, all runs (grouped by run)."""
        return [r for p in self.proxy.pipelines() for r in p.records]

    def start(self) -> ProxyServer:
        super().start()
        return self

    def __enter__(self) -> ProxyServer:
        return self.start()


# -- the command -------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``tokensaver proxy``."""
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument(
        "--upstream",
        default=os.environ.get("TOKENSAVER_UPSTREAM") or DEFAULT_UPSTREAM,
        help=f"the Messages API to forward to (default $TOKENSAVER_UPSTREAM or {DEFAULT_UPSTREAM})",
    )
    parser.add_argument(
        "--config", metavar="FILE", help="a tokensaver TOML file merged over the config sources"
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("TOKENSAVER_PROXY_TOKEN"),
        help=f"access token clients must send as {TOKEN_HEADER} "
        "(default $TOKENSAVER_PROXY_TOKEN; required to bind a non-loopback address)",
    )
    parser.add_argument("--run", help="name of the run for calls without a session (default: a new run)")


def run(args: argparse.Namespace) -> int:
    """``tokensaver proxy``: serve until interrupted."""
    check_bind(args.host, args.token)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    proxy = TokensaverProxy(args.config, upstream=args.upstream, token=args.token, run=args.run)
    try:
        sock = _listen(args.host, args.port)
    except OSError as exc:
        raise TokensaverError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from exc
    asyncio.run(_serve_forever(proxy, sock, args.host))
    return 0


async def _serve_forever(proxy: TokensaverProxy, sock: socket.socket, host: str) -> None:
    runner = await _start(proxy.app(), sock)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    runs = f"runs in {proxy.config.runs_dir}" if proxy.config.record else "runs not persisted"
    print(
        f"tokensaver proxy on http://{shown}:{port} -> {proxy.upstream} "
        f"(plugins: {', '.join(proxy.config.plugins) or 'none'}; {runs})\n"
        f"  export ANTHROPIC_BASE_URL=http://{shown}:{port}",
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


# -- overhead ----------------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def _bench_body(i: int, size_tokens: int, stream: bool) -> dict[str, Any]:
    words = max(1, size_tokens * 3 // 4)
    log_text = "\n".join(f"line {n}: step {n % 7} ok" for n in range(max(1, words // 6)))
    return {
        "model": "claude-sonnet-4-6",
        "max_tokens": 256,
        "stream": stream,
        "system": "You are a coding agent.",
        "messages": [
            {"role": "user", "content": f"Run the tests (call {i})."},
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": f"toolu_{i}", "name": "bash", "input": {"cmd": "make"}}
                ],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": f"toolu_{i}", "content": log_text}],
            },
        ],
        "tools": [{"name": "bash", "description": "run", "input_schema": {"type": "object"}}],
    }


def canned_upstream(message: dict[str, Any], *, chunks: int = 4) -> web.Application:
    """A Messages API stand-in that answers every ``POST /v1/messages`` with ``message`` at once.

    For timing: no validation or billing, and replies without the emulator's per-write stalls.
    """

    async def messages(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return web.json_response(message, headers={"request-id": "req_canned"})
        data = message_to_sse(message)
        response = web.StreamResponse(
            headers={"content-type": "text/event-stream", "request-id": "req_canned"}
        )
        await response.prepare(request)
        step = max(1, len(data) // chunks + 1)
        for i in range(0, len(data), step):
            await response.write(data[i : i + step])
        await response.write_eof()
        return response

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post(MESSAGES_PATH, messages)
    return app


CANNED_MESSAGE: dict[str, Any] = {
    "id": "msg_canned",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-6",
    "content": [{"type": "text", "text": "All 212 tests passed."}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 2000, "output_tokens": 9},
}


def measure_proxy_overhead(
    n_calls: int = 50,
    size_tokens: int = 2000,
    *,
    stream: bool = False,
    plugins: list[str] | None = None,
    warmup: int = 3,
) -> dict[str, Any]:
    """Time the proxy adds per Messages call: p50/p95 in ms.

    Each call is sent twice with the same body, directly to a canned upstream (``canned_upstream``:
    the emulator's unbuffered writes stall on delayed ACKs and would swamp what is measured) and
    through the proxy
    (same HTTP client); ``added_*`` is the per-call difference, ``pipeline_*`` the part the
    pipeline itself took (the ``overhead_ms`` wrap() records too), ``transport_*`` the rest.
    ``plugins=None`` uses the configured plugins; runs are not persisted.
    """
    import httpx2

    direct_ms: list[float] = []
    proxy_ms: list[float] = []
    with tempfile.TemporaryDirectory(prefix="tokensaver-bench-") as tmp:
        cfg: dict[str, Any] = {"record": False, "runs_dir": tmp}
        if plugins is not None:
            cfg["plugins"] = list(plugins)
        with (
            BackgroundApp(canned_upstream(CANNED_MESSAGE)) as emu,
            ProxyServer(cfg, upstream=emu.url) as proxy,
            httpx2.Client(timeout=60) as http,
        ):
            headers = {"x-api-key": "bench", "anthropic-version": "2023-06-01"}

            def timed(base: str, body: dict[str, Any]) -> float:
                t0 = time.perf_counter()
                r = http.post(f"{base}/v1/messages", json=body, headers=headers)
                r.read()
                r.raise_for_status()
                return (time.perf_counter() - t0) * 1000

            for i in range(max(0, warmup) + max(1, n_calls)):
                body = _bench_body(i, size_tokens, stream)
                d = timed(emu.url, body)
                p = timed(proxy.url, body)
                if i >= warmup:
                    direct_ms.append(d)
                    proxy_ms.append(p)
            pipeline_ms = [float(r["overhead_ms"]) for r in proxy.records()][max(0, warmup) :]
    added = [p - d for p, d in zip(proxy_ms, direct_ms, strict=True)]
    transport = [a - o for a, o in zip(added, pipeline_ms, strict=False)]
    out: dict[str, Any] = {"n_calls": len(added), "size_tokens": size_tokens, "stream": stream}
    for name, values in (
        ("direct", direct_ms),
        ("proxy", proxy_ms),
        ("added", added),
        ("pipeline", pipeline_ms),
        ("transport", transport),
    ):
        out[f"{name}_p50_ms"] = round(_percentile(values, 50), 3)
        out[f"{name}_p95_ms"] = round(_percentile(values, 95), 3)
    return out
