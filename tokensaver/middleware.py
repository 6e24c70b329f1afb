"""The anthropic SDK middleware that runs every Messages call through the pipeline, and ``wrap()``.

Built on the SDK's own client middleware (``client.with_middleware``): the caller's client is never
mutated, every surface that goes through ``POST /v1/messages`` is covered (create, stream, beta,
raw and streaming responses, sync and async, ``with_options`` copies), other endpoints pass
through untouched. API errors pass through untouched too, so the SDK's retries keep working; the
middleware runs once per attempt and the pipeline records each attempt once, also one that got no
answer (a connection error, a timeout: recorded, then the SDK's exception goes on untouched).

This module is a door: it reads and writes the SDK's requests and responses; every decision (what
a request is, what to record, plugin-tool rounds, stored answers) is :mod:`tokensaver.exchange`'s,
shared with the proxy. ``handle`` and ``handle_async`` are thin twins over those decisions. Async
clients run the pipeline's sync work in tokensaver's own threads (:mod:`tokensaver.phases`).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, TypeVar

import anthropic
import httpx2

from . import _sdk
from .context import MODEL_CALL_TIMEOUT
from .exchange import (
    CANCELLED,
    CLOSED_EARLY,
    CONTROL_PREFIX,
    MESSAGES_PATH,
    UNREADABLE,
    Failure,
    Outcome,
    PluginToolExchange,
    Prepared,
    Served,
    StreamWatch,
    control_headers,
    finish_json,
    messages_body,
    plugin_tools,
    prepare,
    read_message,
    short_circuit,
    splices,
    strip_known_unbound,
    unbound_beta,
    unbound_message,
    unbound_retry,
    with_beta,
)
from .phases import as_requester, call_on_loop, request_phase, response_phase
from .pipeline import Call, Pipeline, key_hash
from .sse import is_stream

log = logging.getLogger("tokensaver")
C = TypeVar("C")


def _unanswered(exc: BaseException) -> Failure:
    """An attempt that ended in an SDK exception, as recorded."""
    if isinstance(exc, anthropic.APITimeoutError):
        outcome = Outcome.TIMEOUT
    elif isinstance(exc, anthropic.APIConnectionError):
        outcome = Outcome.CONNECTION_ERROR
    elif isinstance(exc, asyncio.CancelledError):
        outcome = Outcome.CANCELLED
    else:
        outcome = Outcome.ERROR
    return Failure(outcome, type(exc).__name__)


def _messages_body(request: _sdk.APIRequest) -> dict[str, Any] | None:
    if request.method.lower() != "post" or not httpx2.URL(request.url).path.endswith(MESSAGES_PATH):
        return None
    return messages_body(request.json)


def _beta(request: _sdk.APIRequest) -> bool:
    qualifiers = getattr(request.options, "qualifiers", None) or {}
    return qualifiers.get("beta") == "true"


def _is_sse(http: httpx2.Response) -> bool:
    return "text/event-stream" in http.headers.get("content-type", "")


def _counted(call: Call) -> tuple[dict[str, Any], dict[str, Any]]:
    """The caller's request and the sent one, for count_tokens: a thread continue's whole conversations
    (count_tokens knows no threads), else the bodies themselves (the same object when unchanged)."""
    if call.thread is not None and call.view is not None and not call.thread.opaque:
        return call.thread.original, call.view
    return call.original, call.body


def _unbound_refusal(call: Call, raw: bytes) -> bool:
    """Whether a 400 answer (``raw``) refused a thinking block as bound to another prefix, the block
    now stripped from ``call``'s body to send again (``unbound_retry``; said in the log)."""
    if unbound_retry(call, 400, raw) is None:
        return False
    log.warning("%s", unbound_message(call))
    return True


class TokensaverMiddleware(_sdk.Middleware):
    """SDK middleware: transforms, short-circuits, observes and records Messages calls."""

    def __init__(self, pipeline: Pipeline, *, asynchronous: bool) -> None:
        self.pipeline = pipeline
        self.asynchronous = asynchronous
        self.client: Any = None
        self.secret_hash = key_hash("")
        self.eventstream = False  # set by bind()
        self._side: Any = None

    def bind(self, client: Any) -> None:
        """Attach to the client this middleware serves (needed to build short-circuit responses)."""
        self.client = client
        self.secret_hash = key_hash(_sdk.client_secret(client))
        # Bedrock's SDK clients read every stream as AWS event-stream: answers made here must be too
        self.eventstream = isinstance(client, (anthropic.AnthropicBedrock, anthropic.AsyncAnthropicBedrock))

    def _side_client(self) -> Any:
        """The bound client minus this middleware: plugins' own calls skip the pipeline."""
        if self._side is None:
            others = [m for m in _sdk.client_middleware(self.client) if m is not self]
            self._side = self.client.with_options(middleware=others)
        return self._side

    def call_model(self, body: dict[str, Any]) -> dict[str, Any]:
        """``ctx.call_model`` for sync clients: the call is made with the caller's client and key."""
        body = {k: v for k, v in body.items() if k not in ("stream", "timeout")}
        message = self._side_client().messages.create(**body, timeout=MODEL_CALL_TIMEOUT)
        return message.to_dict()  # type: ignore[no-any-return]

    def upstream_async(self, loop: asyncio.AbstractEventLoop) -> Any:
        """``ctx.call_model`` for async clients: plugins run in a worker thread; the call runs on ``loop``."""

        async def create(body: dict[str, Any]) -> dict[str, Any]:
            message = await self._side_client().messages.create(**body, timeout=MODEL_CALL_TIMEOUT)
            return message.to_dict()  # type: ignore[no-any-return]

        def call(body: dict[str, Any]) -> dict[str, Any]:
            body = {k: v for k, v in body.items() if k not in ("stream", "timeout")}
            return call_on_loop(loop, create(body))

        return call

    @contextlib.contextmanager
    def _attempt(self, call: Call) -> Iterator[None]:
        """An attempt that ends in an exception (no answer: connection error, timeout...) is recorded.

        The exception itself goes on untouched: the SDK retries or raises it as it would without us.
        """
        try:
            yield
        except BaseException as exc:
            if not call.recorded:
                try:
                    _unanswered(exc).record(self.pipeline, call)
                except Exception as record_exc:  # recording must not replace the caller's exception
                    log.warning("could not record a failed attempt: %s", type(record_exc).__name__)
            raise

    def copy_for(self) -> TokensaverMiddleware:
        """A middleware sharing this pipeline, to be bound to a copy of the client."""
        return TokensaverMiddleware(self.pipeline, asynchronous=self.asynchronous)

    # -- I/O shared by sync and async -------------------------------------------------------------

    def _prepare(self, request: _sdk.APIRequest, body: dict[str, Any]) -> Prepared:
        return prepare(
            dict(request.headers),
            body,
            stream=bool(request.stream),
            beta=_beta(request),
            attempt=request.retries_taken,
            default_key=self.secret_hash,
        )

    def _outgoing(self, request: _sdk.APIRequest, call: Call, headers: dict[str, Any]) -> _sdk.APIRequest:
        beta = unbound_beta(call)
        if call.body is call.original and not control_headers(headers) and beta is None:
            return request
        kept = {
            k: v for k, v in dict(request.headers).items() if not str(k).lower().startswith(CONTROL_PREFIX)
        }
        if beta is not None:  # the request asks the API to drop unbound thinking: its beta too
            name = next((k for k in kept if str(k).lower() == "anthropic-beta"), "anthropic-beta")
            theirs = kept.get(name)
            kept[name] = with_beta(theirs if isinstance(theirs, str) else None, beta)
        return _sdk.with_body(request, call.body, kept)

    def _response(self, request: _sdk.APIRequest, served: Served) -> Any:
        """An SDK response for an answer built here: a short-circuit, or the end of a plugin-tool exchange."""
        return _sdk.synthetic_response(
            self.client,
            request,
            content=served.body,
            content_type=served.content_type,
            headers=served.headers,
            asynchronous=self.asynchronous,
        )

    def _count_params(self, body: dict[str, Any]) -> dict[str, Any]:
        accepted = set(inspect.signature(self.client.messages.count_tokens).parameters)
        return {k: v for k, v in body.items() if k in accepted}

    def _count_failed(self, call: Call, exc: Exception) -> None:
        # counting is best effort: the call itself must go through
        call.errors.append(
            {"plugin": "(core)", "hook": "count_tokens", "error": f"{type(exc).__name__}: {exc}"}
        )

    def _count_exact(self, call: Call) -> None:
        """Exact mode: count the original and the sent request with the free count_tokens endpoint."""
        try:
            whole, view = _counted(call)
            original = self.client.messages.count_tokens(**self._count_params(whole)).input_tokens
            sent = original
            if view is not whole:
                sent = self.client.messages.count_tokens(**self._count_params(view)).input_tokens
            call.exact = {"tokens_original": original, "tokens_sent": sent}
        except Exception as exc:
            self._count_failed(call, exc)

    async def _count_exact_async(self, call: Call) -> None:
        """Async twin of ``_count_exact``."""
        try:
            count = self.client.messages.count_tokens
            whole, view = _counted(call)
            original = (await count(**self._count_params(whole))).input_tokens
            sent = original
            if view is not whole:
                sent = (await count(**self._count_params(view))).input_tokens
            call.exact = {"tokens_original": original, "tokens_sent": sent}
        except Exception as exc:
            self._count_failed(call, exc)

    def _served(self, request: _sdk.APIRequest, call: Call) -> Any | None:
        """The response of a call a plugin answered (a stored answer), else None."""
        if not call.short_circuit:
            return None
        return self._response(
            request, short_circuit(self.pipeline, call, bool(request.stream), eventstream=self.eventstream)
        )

    def _tool_loop(self, request: _sdk.APIRequest, call: Call) -> str | None:
        """The plugin-tool loop a thread continue takes (the thread's tools): "stream" (spliced) or "json",
        else None."""
        if not plugin_tools(call.view or call.body):
            return None
        return "stream" if splices(bool(request.stream), call.body) and not self.eventstream else "json"

    def _send(
        self,
        request: _sdk.APIRequest,
        call: Call,
        headers: dict[str, Any],
        call_next: Any,
        retry: bool = True,
    ) -> Any:
        """``call`` sent; a first 400 refusing a thinking block as bound to another prefix gets the
        block stripped and the call sent again, once (:func:`_unbound_refusal`)."""
        response = call_next(self._outgoing(request, call, headers))
        http = response.http_response
        if retry and http.status_code == 400 and _unbound_refusal(call, http.read()):
            http.close()
            response = call_next(self._outgoing(request, call, headers))
        return response

    async def _send_async(
        self,
        request: _sdk.APIRequest,
        call: Call,
        headers: dict[str, Any],
        call_next: Any,
        retry: bool = True,
    ) -> Any:
        """Async twin of ``_send``."""
        response = await call_next(self._outgoing(request, call, headers))
        http = response.http_response
        if retry and http.status_code == 400 and _unbound_refusal(call, await http.aread()):
            await http.aclose()
            response = await call_next(self._outgoing(request, call, headers))
        return response

    def _pass_through(self, call: Call, response: Any, observer: type[_ObservedStream] | None) -> Any | None:
        """The response to hand back as it is (an API error, or a stream observed on the way), else None.

        ``observer`` None: a stream is not wrapped here (the caller reads it itself).

        API errors pass through untouched (the SDK raises and retries them); the attempt is recorded.
        """
        http = response.http_response
        if not http.is_success:
            Failure.http(http.status_code).record(self.pipeline, call)
            return response
        for name, value in call.ctx.response_headers.items():
            http.headers[name] = value
        content_type = http.headers.get("content-type", "")
        if observer is not None and is_stream(content_type):  # SSE, or Bedrock's event-stream
            watch = StreamWatch(self.pipeline, call, content_type)
            return _sdk.replace_body_stream(response, observer(watch, http))
        return None

    # -- sync ------------------------------------------------------------------------------------

    def handle(self, request: _sdk.APIRequest, call_next: Any) -> Any:
        body = _messages_body(request)
        if body is None:
            return call_next(request)
        prep = self._prepare(request, body)
        call = as_requester(prep.begin, self.pipeline, body, self.call_model)
        if self.pipeline.config.token_count == "exact":
            self._count_exact(call)
        served = self._served(request, call)
        if served is not None:
            return served
        loop = self._tool_loop(request, call)
        if loop == "stream":
            return self._stream_plugin_tools(request, call, prep, call_next)
        if loop == "json":
            return self._plugin_tools(request, call, prep, call_next)
        strip_known_unbound(call)
        with self._attempt(call):
            response = self._send(request, call, prep.headers, call_next)
            passed = self._pass_through(call, response, _ObservedStream)
            if passed is not None:
                return passed
            t0 = time.perf_counter()
            raw = response.http_response.read()
            call.overhead_ms -= (time.perf_counter() - t0) * 1000  # reading the body is not our overhead
            finish_json(self.pipeline, call, raw)
        return response

    def _plugin_tools(self, request: _sdk.APIRequest, call: Call, prep: Prepared, call_next: Any) -> Any:
        """Send the call; answer tool calls addressed to plugins until the model answers the caller."""
        ex = PluginToolExchange(self.pipeline, call, prep.headers, splice=False, eventstream=self.eventstream)
        strip_known_unbound(call)
        while True:
            with self._attempt(ex.call):
                # (only the caller's own round is sent again: a follow-up carries what it sent)
                response = self._send(request, ex.call, prep.headers, call_next, retry=ex.call is call)
                http = response.http_response
                if not http.is_success:
                    ex.refused(http.status_code)
                    return response
                raw = http.read()
            message = read_message(http.headers.get("content-type", ""), raw)
            if message is None:
                ex.fail(UNREADABLE)
                return response
            step = ex.conclude(message)  # answers' notes go in this round's record
            if step.last:
                return self._response(request, ex.served(bool(request.stream), step))
            as_requester(ex.advance, step)

    def _stream_plugin_tools(
        self, request: _sdk.APIRequest, call: Call, prep: Prepared, call_next: Any
    ) -> Any:
        """A streamed call whose answer may ask for plugin tools: streamed on as it comes (see ``Splice``)."""
        strip_known_unbound(call)
        with self._attempt(call):
            response = self._send(request, call, prep.headers, call_next)
            passed = self._pass_through(call, response, None)
            if passed is not None:
                return passed
            http = response.http_response
            if not _is_sse(http):
                finish_json(self.pipeline, call, http.read())  # a JSON answer to a streamed request
                return response
        ex = PluginToolExchange(self.pipeline, call, prep.headers, splice=True)
        return _sdk.replace_body_stream(response, _SplicedStream(self, request, ex, call_next, http))

    # -- async -----------------------------------------------------------------------------------

    async def handle_async(self, request: _sdk.APIRequest, call_next: Any) -> Any:
        body = _messages_body(request)
        if body is None:
            return await call_next(request)
        prep = self._prepare(request, body)
        # plugins are sync (and may wait, e.g. memoize's single-flight): keep the event loop free
        upstream = self.upstream_async(asyncio.get_running_loop())
        call = await request_phase(prep.begin, self.pipeline, body, upstream, abandoned=self._abandoned)
        if self.pipeline.config.token_count == "exact":
            await self._count_exact_async(call)
        served = self._served(request, call)
        if served is not None:
            return served
        loop = self._tool_loop(request, call)
        if loop == "stream":
            return await self._stream_plugin_tools_async(request, call, prep, call_next)
        if loop == "json":
            return await self._plugin_tools_async(request, call, prep, call_next)
        strip_known_unbound(call)
        with self._attempt(call):
            response = await self._send_async(request, call, prep.headers, call_next)
            passed = self._pass_through(call, response, _AsyncObservedStream)
            if passed is not None:
                return passed
            raw = await response.http_response.aread()
        await response_phase(finish_json, self.pipeline, call, raw)
        return response

    async def _plugin_tools_async(
        self, request: _sdk.APIRequest, call: Call, prep: Prepared, call_next: Any
    ) -> Any:
        """Async twin of ``_plugin_tools``."""
        ex = PluginToolExchange(self.pipeline, call, prep.headers, splice=False, eventstream=self.eventstream)
        strip_known_unbound(call)
        while True:
            with self._attempt(ex.call):
                response = await self._send_async(
                    request, ex.call, prep.headers, call_next, retry=ex.call is call
                )
                http = response.http_response
                if not http.is_success:
                    ex.refused(http.status_code)
                    return response
                raw = await http.aread()
            message = read_message(http.headers.get("content-type", ""), raw)
            if message is None:
                ex.fail(UNREADABLE)
                return response
            step = await response_phase(ex.conclude, message)
            if step.last:
                return self._response(request, ex.served(bool(request.stream), step))
            await request_phase(ex.advance, step)

    async def _stream_plugin_tools_async(
        self, request: _sdk.APIRequest, call: Call, prep: Prepared, call_next: Any
    ) -> Any:
        """Async twin of ``_stream_plugin_tools``."""
        strip_known_unbound(call)
        with self._attempt(call):
            response = await self._send_async(request, call, prep.headers, call_next)
            passed = self._pass_through(call, response, None)
            if passed is not None:
                return passed
            http = response.http_response
            raw = None if _is_sse(http) else await http.aread()
        if raw is not None:  # a JSON answer to a streamed request
            await response_phase(finish_json, self.pipeline, call, raw)
            return response
        ex = PluginToolExchange(self.pipeline, call, prep.headers, splice=True)
        return _sdk.replace_body_stream(response, _AsyncSplicedStream(self, request, ex, call_next, http))

    def _abandoned(self, call: Call) -> None:
        """A call begun for a caller that was cancelled meanwhile: recorded (and its claims released)."""
        if not call.recorded:
            CANCELLED.record(self.pipeline, call)


class _SplicedStream(httpx2.SyncByteStream):
    """Streams a plugin-tool exchange on: feeds each round to the exchange, sends the next round."""

    def __init__(
        self,
        mw: TokensaverMiddleware,
        request: _sdk.APIRequest,
        ex: PluginToolExchange,
        call_next: Any,
        http: httpx2.Response,
    ) -> None:
        self.mw, self.request, self.ex, self.call_next = mw, request, ex, call_next
        self.http: httpx2.Response | None = http
        ex.start_stream()

    def _send(self) -> Any:
        return self.call_next(self.mw._outgoing(self.request, self.ex.call, self.ex.headers))

    def __iter__(self) -> Iterator[bytes]:
        ex = self.ex
        try:
            while self.http is not None:
                for chunk in self.http.iter_bytes():
                    out = ex.feed(chunk)
                    if out:
                        yield out
                self.http.close()
                self.http = None
                message = ex.streamed_message
                if message is None:
                    ex.fail(ex.streamed_failure())
                    return
                step = ex.conclude(message)
                if step.last:
                    yield step.tail
                    return
                as_requester(ex.advance, step)
                with self.mw._attempt(ex.call):
                    http = self._send().http_response
                    if not http.is_success:
                        http.read()
                if not http.is_success:
                    yield ex.refused_in_stream(http.status_code, http.content)
                    return
                self.http = http
        finally:
            self.close()

    def close(self) -> None:
        if self.http is not None:
            self.http.close()
            self.http = None
        self.ex.fail(CLOSED_EARLY)  # unless recorded: the caller stopped reading mid-round


class _AsyncSplicedStream(_SplicedStream, httpx2.AsyncByteStream):
    """Async twin of ``_SplicedStream``."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        ex = self.ex
        try:
            while self.http is not None:
                async for chunk in self.http.aiter_bytes():
                    out = ex.feed(chunk)
                    if out:
                        yield out
                await self.http.aclose()
                self.http = None
                message = ex.streamed_message
                if message is None:
                    ex.fail(
                        ex.streamed_failure()
                    )  # no observers run for it: nothing that could block the loop
                    return
                step = await response_phase(ex.conclude, message)
                if step.last:
                    yield step.tail
                    return
                await request_phase(ex.advance, step)
                with self.mw._attempt(ex.call):
                    http = (await self._send()).http_response
                    if not http.is_success:
                        await http.aread()
                if not http.is_success:
                    yield ex.refused_in_stream(http.status_code, http.content)
                    return
                self.http = http
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        if self.http is not None:
            await self.http.aclose()
            self.http = None
        self.ex.fail(CLOSED_EARLY)


class _ObservedStream(httpx2.SyncByteStream):
    """Passes SSE bytes through as they arrive while the watch assembles the final message."""

    def __init__(self, watch: StreamWatch, http: httpx2.Response) -> None:
        self.watch, self.http = watch, http

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self.http.iter_bytes():
                self.watch.feed(chunk)
                yield chunk
        finally:
            self.watch.record()

    def close(self) -> None:
        try:
            self.http.close()
        finally:
            self.watch.record()


class _AsyncObservedStream(_ObservedStream, httpx2.AsyncByteStream):
    """Async twin of ``_ObservedStream``."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.http.aiter_bytes():
                self.watch.feed(chunk)
                yield chunk
            if self.watch.complete:  # observers run off the loop (they store answers...)
                await response_phase(self.watch.record)
        finally:
            self.watch.record()

    async def aclose(self) -> None:
        try:
            await self.http.aclose()
        finally:
            self.watch.record()


def _install_copy_hook(client: Any, mw: TokensaverMiddleware) -> None:
    """Make ``with_options()``/``copy()`` copies carry a middleware bound to the copy itself.

    A copy may use another API key: memoized answers must be namespaced by the copy's key, and
    short-circuit responses built with the copy's settings. Only this instance is touched.
    """
    cls_copy = type(client).copy

    def copy(*args: Any, **kwargs: Any) -> Any:
        new = cls_copy(client, *args, **kwargs)
        if not any(m is mw for m in _sdk.client_middleware(new)):
            return new  # the caller replaced the middleware list explicitly
        mw2 = mw.copy_for()
        new = cls_copy(new, middleware=[mw2 if m is mw else m for m in _sdk.client_middleware(new)])
        mw2.bind(new)
        _install_copy_hook(new, mw2)
        new.tokensaver = mw2.pipeline
        return new

    client.copy = copy
    client.with_options = copy


def wrap(
    client: C,
    config: dict[str, Any] | str | None = None,
    *,
    run: Any = None,
    plugin_manager: Any = None,
    pipeline: Pipeline | None = None,
    clock: Any = None,
) -> C:
    """Return a copy of ``client`` (same class) whose Messages calls go through the tokensaver pipeline.

    :param config: a dict, or a TOML file path, merged over the config files and environment.
    :param run: a run name or :class:`tokensaver.Run` to record into (default: a new named run).
    :param plugin_manager: a prepared plugin manager (tests); default: discovered entry points.
    :param pipeline: share one pipeline between several clients (bench, proxy).
    :param clock: a callable returning epoch seconds, for replays that follow recorded call times.
    """
    if not _sdk.is_client(client):
        # a framework's model (LangChain's ChatAnthropic), else a TypeError that says what to do
        from .frameworks import wrap_framework

        opts = {"run": run, "plugin_manager": plugin_manager, "pipeline": pipeline, "clock": clock}
        return wrap_framework(client, config, **opts)  # type: ignore[no-any-return]
    pipe = pipeline or Pipeline(config, plugin_manager=plugin_manager, run=run, clock=clock)
    mw = TokensaverMiddleware(pipe, asynchronous=_sdk.is_async_client(client))
    wrapped: Any = client.with_middleware(mw)  # type: ignore[attr-defined]
    mw.bind(wrapped)
    _install_copy_hook(wrapped, mw)
    wrapped.tokensaver = pipe
    result: C = wrapped
    return result
