"""The proxy's aiohttp application: the access check, Messages through the pipeline, the rest forwarded.

This is a door: it reads requests and upstream answers and writes answers to the client. What a
request is, what to record, plugin-tool rounds and stored answers are :mod:`tokensaver.exchange`'s
decisions, the same the SDK middleware makes; this module only feeds them with aiohttp's I/O.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import Any
from urllib.parse import unquote

import aiohttp
import pluggy
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDict
from yarl import URL

from .. import exchange
from ..config import Config, load_config
from ..context import MODEL_CALL_TIMEOUT
from ..errors import ModelCallError, TokensaverError
from ..exchange import (
    CLIENT_GONE,
    UNREADABLE,
    Failure,
    PluginToolExchange,
    Prepared,
    Served,
    StreamWatch,
    finish_json,
    plugin_tools,
    prepare,
    read_message,
    short_circuit,
    splices,
)
from ..metrics import scrape_handler
from ..phases import call_on_loop, request_phase, response_phase
from ..pipeline import Call, Pipeline
from ..plugins import get_plugin_manager
from ..run import Run
from ..sse import sse_error
from .dashboard import Dashboard
from .sessions import Sessions, run_name
from .wire import (
    MAX_BODY,
    MODEL_CALL_DROP,
    PARSE_ON_LOOP_BYTES,
    SKIP_AUTO_HEADERS,
    TOKEN_HEADER,
    UPSTREAM_BROKE,
    UpstreamBroke,
    api_error,
    api_errors,
    confined_path,
    decoded_here,
    encode_body,
    env_route,
    forward_headers,
    header_int,
    messages_route,
    not_optimized,
    parse_messages_body,
    response_headers,
    shown_target,
    too_large,
    upstream_body,
    upstream_chunks,
    upstream_tail,
)

log = logging.getLogger("tokensaver.proxy")

DEFAULT_UPSTREAM = "https://api.anthropic.com"


def _respond(served: Served) -> web.Response:
    """An answer made here (a short-circuit, the end of a plugin-tool exchange) as aiohttp's response."""
    return web.Response(body=served.body, headers={**served.headers, "Content-Type": served.content_type})


def _is_sse(up: aiohttp.ClientResponse) -> bool:
    return "text/event-stream" in up.headers.get("content-type", "")


class _Outcome:
    """What happened to one upstream call, for the record written when the handler unwinds."""

    __slots__ = ("call", "finishing")

    def __init__(self, call: Call) -> None:
        self.call = call  # the exchange's current round
        self.finishing = False  # a finish() is under way or done: never record twice


class _Rounds:
    """A plugin-tool exchange through the proxy: the exchange, and the caller's streamed response once begun."""

    def __init__(self, request: web.Request, ex: PluginToolExchange) -> None:
        self.request, self.ex = request, ex
        self.out: web.StreamResponse | None = None

    async def begin(self, up: aiohttp.ClientResponse) -> web.StreamResponse:
        """Begin the caller's streamed response with the first streamed round's status and headers."""
        out = web.StreamResponse(status=up.status, reason=up.reason)
        out.headers.extend(response_headers(up.headers, decoded=True))
        out.headers.update(self.ex.call.ctx.response_headers)
        await out.prepare(self.request)
        self.ex.start_stream()
        self.out = out
        return out

    async def end(self, last: bytes = b"") -> web.StreamResponse:
        """End the caller's streamed response, ``last`` its final bytes."""
        assert self.out is not None
        if last:
            await self.out.write(last)
        await self.out.write_eof()
        return self.out


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
        self.sessions = Sessions(self.config, self.pm, run=run, clock=clock)
        self.upstream = URL(upstream.rstrip("/"))
        if not self.upstream.is_absolute():
            raise TokensaverError(f"--upstream must be an absolute URL, got {upstream!r}")
        self.token = token or None
        self.client: aiohttp.ClientSession | None = None
        self._route: tuple[URL | None, aiohttp.BasicAuth | None, aiohttp.BasicAuth | None] = (
            None,
            None,
            None,
        )

    # pipelines ---------------------------------------------------------------------------------

    @property
    def default(self) -> Pipeline:
        """The default run's pipeline (calls without a session); it owns the plugin state sessions share."""
        return self.sessions.default

    def pipeline_for(self, name: str | None) -> Pipeline:
        """The pipeline recording into run ``name`` (``None``: the default run)."""
        return self.sessions.pipeline_for(name)

    def pipelines(self) -> list[Pipeline]:
        """The default pipeline and every session pipeline still open."""
        return self.sessions.pipelines()

    # application -------------------------------------------------------------------------------

    def app(self) -> web.Application:
        """The aiohttp application serving every path."""
        app = web.Application(client_max_size=MAX_BODY, middlewares=[api_errors])
        dashboard = Dashboard(self)
        dashboard.install(app)  # GET / and /_tokensaver/...: the live page, never forwarded
        # GET /metrics: Prometheus text of this process's calls, behind the page's access check, never forwarded
        app.router.add_get("/metrics", scrape_handler(dashboard.allowed))
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_startup.append(self._open)
        app.on_cleanup.append(self._close)
        return app

    async def _open(self, app: web.Application) -> None:
        # the environment's proxy and netrc login for the upstream, looked up once (aiohttp's
        # trust_env reads them on every request, each time through a thread)
        self._route = await asyncio.to_thread(env_route, self.upstream)
        self.client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30),
            auto_decompress=False,
        )

    async def _close(self, app: web.Application) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None

    def _url(self, request: web.Request) -> URL:
        tail = confined_path(request.rel_url.raw_path)
        if tail is None:  # handle() refuses these before anything is sent
            raise TokensaverError(f"tokensaver proxy: refusing to forward {request.rel_url.raw_path[:200]!r}")
        path = self.upstream.raw_path.rstrip("/") + upstream_tail(tail)
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
                encode_body({**body, "stream": False}),
                drop=MODEL_CALL_DROP,
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
            return api_error(
                401,
                "authentication_error",
                f"tokensaver proxy: missing or wrong access token (send it as {TOKEN_HEADER})",
            )
        path = confined_path(request.rel_url.raw_path)
        if path is None:
            log.warning(
                "%s %r refused: the path could leave the upstream's base",
                request.method,
                request.rel_url.raw_path[:200],
            )
            return api_error(
                400,
                "invalid_request_error",
                "tokensaver proxy: the request path cannot be forwarded (a '..' above the root, an encoded "
                "slash, a backslash, a control character or a doubly encoded dot)",
            )
        if request.method == "POST" and messages_route(unquote(path)):
            return await self._messages(request)
        return await self._forward(request)

    # plain forwarding ----------------------------------------------------------------------------

    async def _forward(self, request: web.Request, raw: bytes | None = None) -> web.StreamResponse:
        """Forward a request untouched (bodies streamed both ways, encodings kept), with one log line."""
        status: int | str = "interrupted"  # unless it is answered (the client may leave first)
        try:
            response = await self._pass_on(request, raw)
            status = response.status
            return response
        finally:
            path = request.rel_url.path
            level, line = not_optimized(
                request.method, path, shown_target(path, request.rel_url.raw_query_string), status
            )
            log.log(level, "%s", line)

    async def _pass_on(self, request: web.Request, raw: bytes | None) -> web.StreamResponse:
        """The upstream's answer to the request as it came (``raw``: its body, read already)."""
        assert self.client is not None
        headers = forward_headers(request.headers)
        data: Any = None
        if raw is not None:
            data = raw
        elif request.body_exists:
            data = request.content.iter_any()
            # a body aiohttp decodes as it reads (gzip, ...) goes on chunked: its decoded length is unknown
            if request.content_length is not None and not decoded_here(
                request.headers.get("content-encoding", "")
            ):
                headers["Content-Length"] = str(request.content_length)
        try:
            up = await self._request(request, request.method, headers, data, decompress=False)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return self._unreachable(exc)
        try:
            response = web.StreamResponse(status=up.status, reason=up.reason)
            response.headers.extend(response_headers(up.headers, decoded=False))
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
        return api_error(
            502, "api_error", f"tokensaver proxy: upstream {self.upstream} unreachable ({type(exc).__name__})"
        )

    # messages ------------------------------------------------------------------------------------

    async def _read_messages_body(self, request: web.Request) -> tuple[bytes, dict[str, Any]] | web.Response:
        """The request's bytes and JSON object, or the 400/413 that answers it."""
        if (request.content_length or 0) > MAX_BODY:
            return too_large()  # not read: aiohttp drains and drops the rest
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return too_large()
        except RequestPayloadError as exc:  # says gzip and is not, a broken chunk
            log.warning("%s %s: unreadable body: %s", request.method, request.path_qs[:200], exc)
            return api_error(
                400, "invalid_request_error", "tokensaver proxy: the request body could not be read"
            )
        content_type = request.headers.get("content-type", "")
        if len(raw) > PARSE_ON_LOOP_BYTES:  # a large body is parsed off the event loop
            parsed, problem = await request_phase(parse_messages_body, raw, content_type)
        else:
            parsed, problem = parse_messages_body(raw, content_type)
        if parsed is None:
            log.warning("%s %s refused: %s", request.method, request.path_qs[:200], problem)
            return api_error(400, "invalid_request_error", f"tokensaver proxy: {problem}")
        return raw, parsed

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/messages``: the pipeline, then the upstream call (or a short-circuit)."""
        read = await self._read_messages_body(request)
        if isinstance(read, web.Response):
            return read
        raw, body = read
        if not isinstance(body.get("messages"), list):
            log.warning(
                "%s %s: not a Messages request (no messages list): forwarded untouched, the API answers",
                request.method,
                request.path_qs[:200],
            )
            return await self._forward(request, raw=raw)
        prep = prepare(
            request.headers,
            body,
            beta=request.query.get("beta") == "true",
            attempt=header_int(request.headers.get("x-stainless-retry-count")),
        )
        pipe = self.pipeline_for(run_name(prep.headers, body))
        t0 = time.perf_counter()
        try:
            # plugins are sync and may wait (memoize's single-flight): keep the event loop free
            call = await request_phase(
                prep.begin,
                pipe,
                body,
                self._model_caller(request, asyncio.get_running_loop()),
                abandoned=lambda c: CLIENT_GONE.record(pipe, c),
            )
        except TokensaverError as exc:  # strict mode: a plugin failed and the config says to stop
            return api_error(500, "api_error", f"tokensaver: {exc}", {"x-should-retry": "false"})
        if call.short_circuit:
            response: web.StreamResponse = _respond(
                await response_phase(short_circuit, pipe, call, prep.stream)
            )
            outcome_word = f"short-circuit ({call.short_circuit})"
        else:
            outcome = _Outcome(call)
            try:
                response = await self._upstream_messages(request, pipe, prep, raw, outcome)
            finally:
                if not outcome.finishing:
                    # cancelled (the client went away) or failed before an answer: record it once
                    CLIENT_GONE.record(pipe, outcome.call)
            outcome_word = f"-> {response.status}"
        ms = (time.perf_counter() - t0) * 1000
        log.info("%s %s %s %.1fms", request.method, request.path_qs, outcome_word, ms)
        return response

    async def _upstream_messages(
        self, request: web.Request, pipe: Pipeline, prep: Prepared, raw: bytes, outcome: _Outcome
    ) -> web.StreamResponse:
        assert self.client is not None
        call = outcome.call
        if plugin_tools(call.view or call.body):  # a thread continue: the thread's tools
            return await self._plugin_tool_exchange(request, pipe, prep, outcome)
        exchange.strip_known_unbound(call)
        data = raw if call.body is call.original else encode_body(call.body)  # unchanged: the caller's bytes
        try:
            up = await self._send(request, call, data)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # recorded before the client hears of it: whoever reads the run next sees this call
            outcome.finishing = True
            Failure.upstream("upstream unreachable", exc).record(pipe, call)
            return self._unreachable(exc)
        try:
            out_headers = response_headers(up.headers, decoded=True)
            if _is_sse(up) and 200 <= up.status < 300:
                out_headers.update(call.ctx.response_headers)
                return await self._stream(request, up, StreamWatch(pipe, call), out_headers, outcome)
            try:
                payload = await up.read()
            except UPSTREAM_BROKE as exc:  # nothing was sent to the client yet: it hears a retryable error
                return self._broke_off(pipe, call, outcome, exc)
            outcome.finishing = True
            if not 200 <= up.status < 300:
                Failure.http(up.status).record(pipe, call)
                return web.Response(status=up.status, reason=up.reason, body=payload, headers=out_headers)
            out_headers.update(call.ctx.response_headers)
            await response_phase(finish_json, pipe, call, payload, up.status)
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
        Failure.upstream(what, exc).record(pipe, call)
        log.warning("%s: %s", what, type(exc).__name__)
        return api_error(502, "api_error", f"tokensaver proxy: the upstream answer broke off ({what})")

    async def _send(
        self, request: web.Request, call: Call, data: bytes, retry: bool = True
    ) -> aiohttp.ClientResponse:
        """``data`` (``call``'s body) sent; a first 400 refusing a thinking block as bound to another
        prefix (``exchange.unbound_retry``) gets the block stripped and the call sent again, once."""
        up = await self._post(request, data, beta=exchange.unbound_beta(call))
        if retry and up.status == 400 and exchange.unbound_retry(call, 400, await up.read()) is not None:
            up.close()
            log.warning("%s", exchange.unbound_message(call))
            up = await self._post(request, encode_body(call.body), beta=exchange.unbound_beta(call))
        return up

    async def _post(
        self,
        request: web.Request,
        data: bytes,
        drop: frozenset[str] = frozenset({"accept-encoding"}),
        timeout: aiohttp.ClientTimeout | None = None,
        beta: str | None = None,
    ) -> aiohttp.ClientResponse:
        """A Messages body upstream on the request's path, with the caller's headers minus ``drop``.

        We read what comes back (JSON or SSE): the client library picks an encoding it can decode.
        ``timeout`` bounds a plugin's own call; the caller's calls take as long as the API does.
        """
        headers = forward_headers(request.headers, drop=drop)
        headers["Content-Type"] = "application/json"
        if beta is not None:  # ``beta`` added to the caller's anthropic-beta (the body needs it)
            headers["anthropic-beta"] = exchange.with_beta(headers.get("anthropic-beta"), beta)
        return await self._request(request, "POST", headers, data, decompress=True, timeout=timeout)

    async def _request(
        self,
        request: web.Request,
        method: str,
        headers: CIMultiDict[str],
        data: Any,
        *,
        decompress: bool,
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> aiohttp.ClientResponse:
        """The upstream request for ``request`` on its confined path: no redirects, no headers of ours."""
        assert self.client is not None
        proxy, proxy_auth, login = self._route
        return await self.client.request(
            method,
            self._url(request),
            headers=headers,
            data=data,
            skip_auto_headers=SKIP_AUTO_HEADERS,
            allow_redirects=False,
            auto_decompress=decompress,
            timeout=timeout or self.client.timeout,
            proxy=proxy,
            proxy_auth=proxy_auth,
            # the upstream's netrc login, unless the caller authorizes itself
            auth=None if "Authorization" in headers else login,
        )

    async def _plugin_tool_exchange(
        self, request: web.Request, pipe: Pipeline, prep: Prepared, outcome: _Outcome
    ) -> web.StreamResponse:
        """Answer the tools plugins added (``tokensaver_*``) here, as ``wrap()`` does: the agent sees none.

        The rounds are :class:`~tokensaver.exchange.PluginToolExchange`'s; this only sends them and
        writes what it says. Streamed requests (without thinking) stream on as they come; other
        requests are read whole and the last round's answer is served (JSON, or replayed SSE).
        """
        splice = splices(prep.stream, outcome.call.body)
        rounds = _Rounds(request, PluginToolExchange(pipe, outcome.call, prep.headers, splice=splice))
        ex = rounds.ex
        first = ex.call
        exchange.strip_known_unbound(first)
        while True:
            outcome.call, outcome.finishing = ex.call, False
            try:
                # (only the caller's own round is sent again: a follow-up carries what it sent)
                up = await self._send(request, ex.call, encode_body(ex.call.body), retry=ex.call is first)
            except (aiohttp.ClientError, TimeoutError) as exc:
                outcome.finishing = True
                ex.fail(Failure.upstream("upstream unreachable", exc))
                if rounds.out is None:
                    return self._unreachable(exc)
                error = f"tokensaver proxy: upstream unreachable ({type(exc).__name__})"
                return await rounds.end(sse_error("api_error", error))
            try:
                read = await self._read_round(rounds, up, outcome)
            finally:
                up.close()
            if isinstance(read, web.StreamResponse):
                return read
            message, failure = read
            outcome.finishing = True
            if message is None:
                ex.fail(failure)
                if rounds.out is None:
                    return api_error(502, "api_error", "tokensaver proxy: the upstream answer was cut off")
                return await rounds.end()
            step = await response_phase(ex.conclude, message)
            if step.last:
                if rounds.out is not None:
                    return await rounds.end(step.tail)
                return _respond(ex.served(prep.stream, step))
            await request_phase(ex.advance, step)

    async def _read_round(
        self, rounds: _Rounds, up: aiohttp.ClientResponse, outcome: _Outcome
    ) -> web.StreamResponse | tuple[dict[str, Any] | None, Failure]:
        """One round's upstream answer: its message (or why there is none), or the exchange's last response.

        A streamed round is written on to the caller as it comes (the caller's response begins with
        the first); a refusal or a read that breaks off ends the exchange.
        """
        ex = rounds.ex
        if not 200 <= up.status < 300:
            try:
                payload = await up.read()
            except UPSTREAM_BROKE:
                payload = b""
            outcome.finishing = True
            if rounds.out is not None:
                return await rounds.end(ex.refused_in_stream(up.status, payload))
            ex.refused(up.status)
            headers = response_headers(up.headers, decoded=True)
            return web.Response(status=up.status, reason=up.reason, body=payload, headers=headers)
        try:
            if ex.splice is None or not _is_sse(up):
                raw = await upstream_body(up)
                return read_message(up.headers.get("content-type", ""), raw), UNREADABLE
            out = rounds.out or await rounds.begin(up)
            async for chunk in upstream_chunks(up):
                data = ex.feed(chunk)
                if data:
                    await out.write(data)  # a failed write (our client gone) propagates
            return ex.streamed_message, ex.streamed_failure()
        except UpstreamBroke as broke:
            if rounds.out is None:
                return self._broke_off(ex.pipeline, ex.call, outcome, broke.exc)
            outcome.finishing = True
            ex.fail(Failure.upstream("upstream stream broke", broke.exc))
            return await rounds.end(sse_error("api_error", "tokensaver proxy: the upstream stream broke off"))

    async def _stream(
        self,
        request: web.Request,
        up: aiohttp.ClientResponse,
        watch: StreamWatch,
        headers: CIMultiDict[str],
        outcome: _Outcome,
    ) -> web.StreamResponse:
        """Pass SSE through as it arrives while the watch assembles the final message for the observers."""
        response = web.StreamResponse(status=up.status, reason=up.reason)
        response.headers.extend(headers)
        await response.prepare(request)
        try:
            # a failed write (our client went away) propagates as it is; only a failed read of the
            # upstream is the upstream's fault. Each chunk goes on before it is read here (the
            # client does not wait for our parse of it), and is read even when the write fails or
            # is cancelled: an error event the client hung up on is still what the stream carried
            async for chunk in upstream_chunks(up):
                try:
                    await response.write(chunk)
                finally:
                    watch.feed(chunk)
        except UpstreamBroke as broke:
            failure = Failure.upstream("upstream stream broke", broke.exc)
            outcome.finishing = True
            watch.fail(failure)
            await response.write(sse_error("api_error", f"tokensaver proxy: {failure.error}"))
            await response.write_eof()
            return response
        except BaseException:
            if watch.failed:
                # the upstream's own stream failed, and the client's SDK hung up on reading it (a failed
                # write, or the handler cancelled while the next chunk was awaited): that failure is
                # what happened to the call, not a client going away
                outcome.finishing = True
                watch.record()
            raise
        watch.eof()
        outcome.finishing = True
        if watch.complete:
            await response_phase(watch.record)
        else:  # no observers run for it: nothing that could block the loop
            watch.record()
        await response.write_eof()
        return response
