"""The anthropic SDK middleware that runs every Messages call through the pipeline, and ``wrap()``.

Built on the SDK's own client middleware (``client.with_middleware``): the caller's client is never
mutated, every surface that goes through ``POST /v1/messages`` is covered (create, stream, beta,
raw and streaming responses, sync and async, ``with_options`` copies), other endpoints pass
through untouched. API errors pass through untouched too, so the SDK's retries keep working; the
middleware runs once per attempt and the pipeline records each attempt once, also one that got no
answer (a connection error, a timeout: recorded, then the SDK's exception goes on untouched).

Async clients (and the proxy) run the pipeline's sync work in tokensaver's own bounded threads
(``request_phase`` / ``response_phase``), never the event loop's default executor: a transform may
wait in ``ctx.call_model`` for a coroutine that itself needs that executor (name resolution, netrc).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import inspect
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import anthropic
import httpx2

from . import _sdk
from .context import MODEL_CALL_TIMEOUT, for_requester, requester
from .pipeline import Call, Pipeline, is_plugin_tool_use, key_hash, plugin_tools
from .sse import SSEAccumulator, message_to_sse, sse_error_answer, sse_event

log = logging.getLogger("tokensaver")
C = TypeVar("C")
T = TypeVar("T")

MESSAGES_PATH = "/v1/messages"
CONTROL_PREFIX = "x-tokensaver-"

# -- tokensaver's own threads for the pipeline's sync work, called from async code -------------

REQUEST_THREADS = 32  # begin(): transforms and lookups, which may wait (model calls, single-flight)
RESPONSE_THREADS = 8  # finish() and plugin tool answers: never wait on another call
_pools: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(name: str, size: int) -> concurrent.futures.ThreadPoolExecutor:
    with _pools_lock:
        pool = _pools.get(name)
        if pool is None:
            pool = _pools[name] = concurrent.futures.ThreadPoolExecutor(size, f"tokensaver-{name}")
        return pool


async def _in_pool(
    pool: concurrent.futures.ThreadPoolExecutor,
    fn: Callable[..., T],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    abandoned: Callable[[T], object] | None,
) -> T:
    # the work runs for the calling task: memoize tells its calls apart by task, not by thread
    context = for_requester(asyncio.current_task())
    future = pool.submit(context.run, functools.partial(fn, *args, **kwargs))
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        if abandoned is not None:  # the caller went away: whatever the work made is cleaned up once done

            def done(f: concurrent.futures.Future[T]) -> None:
                if not f.cancelled() and f.exception() is None:
                    abandoned(f.result())

            future.add_done_callback(done)
        raise


async def request_phase(
    fn: Callable[..., T], *args: Any, abandoned: Callable[[T], object] | None = None, **kwargs: Any
) -> T:
    """Run request-phase pipeline work (``begin``, a plugin-tool exchange's next call) in our threads.

    Not the loop's default executor: a transform waiting in ``ctx.call_model`` must not hold a thread
    that the model call's own coroutine needs. ``abandoned(result)`` runs if the caller is cancelled
    before the work is done (e.g. records the call it began).
    """
    return await _in_pool(_pool("request", REQUEST_THREADS), fn, args, kwargs, abandoned)


async def response_phase(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run response-phase pipeline work (``finish``, plugin tool answers) in threads of its own.

    Separate from the request phase: a call that finishes is never queued behind identical calls
    that wait for it (memoize's single-flight), however many there are.
    """
    return await _in_pool(_pool("response", RESPONSE_THREADS), fn, args, kwargs, None)


def as_requester(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(...)`` here, for whoever is calling (this thread or task), also in the hooks' worker threads."""
    return for_requester(requester()).run(fn, *args, **kwargs)


def call_on_loop(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T], timeout: float = MODEL_CALL_TIMEOUT
) -> T:
    """Run ``coro`` on ``loop`` from a worker thread and wait for it, ``timeout`` seconds at most.

    :raises TimeoutError: no result in time (the coroutine is cancelled).
    :raises RuntimeError: called on ``loop``'s own thread, where waiting would stall the loop for good.
    """
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        coro.close()
        raise RuntimeError("a plugin's model call cannot wait on the event loop it runs on")
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise TimeoutError(f"no answer within {timeout:g}s") from None


def _unanswered_status(exc: BaseException) -> str:
    if isinstance(exc, anthropic.APITimeoutError):
        return "timeout"
    if isinstance(exc, anthropic.APIConnectionError):
        return "connection_error"
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return "error"


def _messages_body(request: _sdk.APIRequest) -> dict[str, Any] | None:
    if request.method.lower() != "post":
        return None
    path = httpx2.URL(request.url).path
    if not path.endswith(MESSAGES_PATH):
        return None
    body = request.json
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return None
    return body


def _surface(request: _sdk.APIRequest) -> str:
    qualifiers = getattr(request.options, "qualifiers", None) or {}
    return "beta" if qualifiers.get("beta") == "true" else "messages"


class TokensaverMiddleware(_sdk.Middleware):
    """SDK middleware: transforms, short-circuits, observes and records Messages calls."""

    def __init__(self, pipeline: Pipeline, *, asynchronous: bool) -> None:
        self.pipeline = pipeline
        self.asynchronous = asynchronous
        self.client: Any = None
        self.secret_hash = key_hash("")
        self._side: Any = None

    def bind(self, client: Any) -> None:
        """Attach to the client this middleware serves (needed to build short-circuit responses)."""
        self.client = client
        self.secret_hash = key_hash(_sdk.client_secret(client))

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
                    self.pipeline.finish(call, None, status=_unanswered_status(exc), error=type(exc).__name__)
                except Exception as record_exc:  # recording must not replace the caller's exception
                    log.warning("could not record a failed attempt: %s", type(record_exc).__name__)
            raise

    def copy_for(self) -> TokensaverMiddleware:
        """A middleware sharing this pipeline, to be bound to a copy of the client."""
        return TokensaverMiddleware(self.pipeline, asynchronous=self.asynchronous)

    # -- helpers shared by sync and async ------------------------------------------------------

    def _prepare(self, request: _sdk.APIRequest, body: dict[str, Any]) -> tuple[dict[str, Any], str, bool]:
        headers = {str(k).lower(): v for k, v in dict(request.headers).items()}
        secret = headers.get("x-api-key") or headers.get("authorization")
        key = key_hash(secret) if isinstance(secret, str) and secret else self.secret_hash
        stream = bool(request.stream or body.get("stream"))
        return headers, key, stream

    def _outgoing(self, request: _sdk.APIRequest, call: Call, headers: dict[str, Any]) -> _sdk.APIRequest:
        control = [k for k in headers if k.startswith(CONTROL_PREFIX)]
        if call.body is call.original and not control:
            return request
        kept = {
            k: v for k, v in dict(request.headers).items() if not str(k).lower().startswith(CONTROL_PREFIX)
        }
        return request.copy(body=call.body, headers=kept)

    def _serve(
        self,
        request: _sdk.APIRequest,
        call: Call,
        message: dict[str, Any] | None = None,
        extra_headers: dict[str, str] | None = None,
    ) -> Any:
        """An SDK response for an answer built here: a short-circuit, or the end of a plugin-tool exchange."""
        message = message if message is not None else (call.response or {})
        headers = {
            "request-id": f"tokensaver-{call.ctx.call_id}",
            **call.ctx.response_headers,
            **(extra_headers or {}),
        }
        if call.short_circuit:
            headers["x-tokensaver-short-circuit"] = call.short_circuit
        if request.stream:
            content, ctype = message_to_sse(message), "text/event-stream; charset=utf-8"
        else:
            content, ctype = json.dumps(message).encode(), "application/json"
        return _sdk.synthetic_response(
            self.client,
            request,
            content=content,
            content_type=ctype,
            headers=headers,
            asynchronous=self.asynchronous,
        )

    def _count_params(self, body: dict[str, Any]) -> dict[str, Any]:
        accepted = set(inspect.signature(self.client.messages.count_tokens).parameters)
        return {k: v for k, v in body.items() if k in accepted}

    def _count_exact(self, call: Call) -> None:
        """Exact mode: count the original and the sent request with the free count_tokens endpoint."""
        try:
            original = self.client.messages.count_tokens(**self._count_params(call.original)).input_tokens
            sent = original
            if call.body is not call.original:
                sent = self.client.messages.count_tokens(**self._count_params(call.body)).input_tokens
            call.exact = {"tokens_original": original, "tokens_sent": sent}
        except Exception as exc:  # counting is best effort: the call itself must go through
            call.errors.append(
                {"plugin": "(core)", "hook": "count_tokens", "error": f"{type(exc).__name__}: {exc}"}
            )

    async def _count_exact_async(self, call: Call) -> None:
        """Async twin of ``_count_exact``."""
        try:
            original = (
                await self.client.messages.count_tokens(**self._count_params(call.original))
            ).input_tokens
            sent = original
            if call.body is not call.original:
                sent = (await self.client.messages.count_tokens(**self._count_params(call.body))).input_tokens
            call.exact = {"tokens_original": original, "tokens_sent": sent}
        except Exception as exc:
            call.errors.append(
                {"plugin": "(core)", "hook": "count_tokens", "error": f"{type(exc).__name__}: {exc}"}
            )

    def _pass_through(
        self,
        call: Call,
        response: Any,
        observer: type[_ObservedStream] | type[_AsyncObservedStream] | None,
    ) -> Any | None:
        """The response to hand back as it is (an API error, or a stream observed on the way), else None.

        ``observer`` None: a stream is not wrapped here (the caller reads it itself).

        API errors pass through untouched (the SDK raises and retries them); the attempt is recorded.
        """
        http = response.http_response
        if not http.is_success:
            self.pipeline.finish(call, None, status=http.status_code, error=f"HTTP {http.status_code}")
            return response
        for name, value in call.ctx.response_headers.items():
            http.headers[name] = value
        if observer is not None and "text/event-stream" in http.headers.get("content-type", ""):
            return _sdk.replace_body_stream(response, observer(self.pipeline, call, http))
        return None

    def _finish_json(self, call: Call, response: Any, raw: bytes) -> None:
        try:
            message = json.loads(raw)
        except ValueError as exc:
            self.pipeline.finish(call, None, status="unparsed", error=str(exc))
            return
        self.pipeline.finish(call, message if isinstance(message, dict) else None)

    def _handle_plugin_tools(
        self, request: _sdk.APIRequest, call: Call, headers: dict[str, Any], call_next: Any
    ) -> Any:
        """Send the call; answer tool calls addressed to plugins until the model answers the caller."""
        first = call
        for rounds in range(MAX_PLUGIN_TOOL_ROUNDS + 1):
            with self._attempt(call):
                response = call_next(self._outgoing(request, call, headers))
                http = response.http_response
                if not http.is_success:
                    self.pipeline.finish(
                        call, None, status=http.status_code, error=f"HTTP {http.status_code}"
                    )
                    return response
                raw = http.read()
            message = read_message(http.headers.get("content-type", ""), raw)
            if message is None:
                self.pipeline.finish(call, None, status="incomplete", error="unreadable response")
                return response
            results, reply = plan_round(self.pipeline, call, message)  # answers' notes go in this record
            last = results is None or rounds == MAX_PLUGIN_TOOL_ROUNDS
            if last:
                end_exchange(call, first, reply)
            self.pipeline.finish(call, message)
            if last:
                return self._serve(request, call, reply, {"x-tokensaver-plugin-tool-rounds": str(rounds)})
            call = as_requester(next_round, self.pipeline, call, reply, results, headers)
        raise AssertionError("unreachable")

    async def _handle_plugin_tools_async(
        self, request: _sdk.APIRequest, call: Call, headers: dict[str, Any], call_next: Any
    ) -> Any:
        """Async twin of ``_handle_plugin_tools``."""
        first = call
        for rounds in range(MAX_PLUGIN_TOOL_ROUNDS + 1):
            with self._attempt(call):
                response = await call_next(self._outgoing(request, call, headers))
                http = response.http_response
                if not http.is_success:
                    self.pipeline.finish(
                        call, None, status=http.status_code, error=f"HTTP {http.status_code}"
                    )
                    return response
                raw = await http.aread()
            message = read_message(http.headers.get("content-type", ""), raw)
            if message is None:
                self.pipeline.finish(call, None, status="incomplete", error="unreadable response")
                return response
            results, reply = await response_phase(plan_round, self.pipeline, call, message)
            last = results is None or rounds == MAX_PLUGIN_TOOL_ROUNDS
            if last:
                end_exchange(call, first, reply)
            await response_phase(self.pipeline.finish, call, message)
            if last:
                return self._serve(request, call, reply, {"x-tokensaver-plugin-tool-rounds": str(rounds)})
            call = await request_phase(next_round, self.pipeline, call, reply, results, headers)
        raise AssertionError("unreachable")

    def _stream_plugin_tools(
        self, request: _sdk.APIRequest, call: Call, headers: dict[str, Any], call_next: Any
    ) -> Any:
        """A streamed call whose answer may ask for plugin tools: streamed on as it comes (see ``Splice``)."""
        with self._attempt(call):
            response = call_next(self._outgoing(request, call, headers))
            passed = self._pass_through(call, response, None)
            if passed is not None:
                return passed
            http = response.http_response
            if "text/event-stream" not in http.headers.get("content-type", ""):
                self._finish_json(call, response, http.read())  # a JSON answer to a streamed request
                return response
        return _sdk.replace_body_stream(
            response, _SplicedStream(self, request, call, headers, call_next, http)
        )

    async def _stream_plugin_tools_async(
        self, request: _sdk.APIRequest, call: Call, headers: dict[str, Any], call_next: Any
    ) -> Any:
        """Async twin of ``_stream_plugin_tools``."""
        with self._attempt(call):
            response = await call_next(self._outgoing(request, call, headers))
            passed = self._pass_through(call, response, None)
            if passed is not None:
                return passed
            http = response.http_response
            raw = None if "text/event-stream" in http.headers.get("content-type", "") else await http.aread()
        if raw is not None:  # a JSON answer to a streamed request
            await response_phase(self._finish_json, call, response, raw)
            return response
        stream = _AsyncSplicedStream(self, request, call, headers, call_next, http)
        return _sdk.replace_body_stream(response, stream)

    # -- sync ------------------------------------------------------------------------------------

    def handle(self, request: _sdk.APIRequest, call_next: Any) -> Any:
        body = _messages_body(request)
        if body is None:
            return call_next(request)
        headers, key, stream = self._prepare(request, body)
        call = as_requester(
            self.pipeline.begin,
            body,
            headers=headers,
            key=key,
            stream=stream,
            surface=_surface(request),
            attempt=request.retries_taken,
            upstream=self.call_model,
        )
        if self.pipeline.config.token_count == "exact":
            self._count_exact(call)
        if call.short_circuit:
            self.pipeline.finish(call, None)
            return self._serve(request, call)
        if plugin_tools(call.body):
            if _splice_stream(request, call):
                return self._stream_plugin_tools(request, call, headers, call_next)
            return self._handle_plugin_tools(request, call, headers, call_next)
        with self._attempt(call):
            response = call_next(self._outgoing(request, call, headers))
            passed = self._pass_through(call, response, _ObservedStream)
            if passed is not None:
                return passed
            http = response.http_response
            t0 = time.perf_counter()
            raw = http.read()
            call.overhead_ms -= (time.perf_counter() - t0) * 1000  # reading the body is not our overhead
            self._finish_json(call, response, raw)
        return response

    # -- async -----------------------------------------------------------------------------------

    async def handle_async(self, request: _sdk.APIRequest, call_next: Any) -> Any:
        body = _messages_body(request)
        if body is None:
            return await call_next(request)
        headers, key, stream = self._prepare(request, body)
        # plugins are sync (and may wait, e.g. memoize's single-flight): keep the event loop free
        call = await request_phase(
            self.pipeline.begin,
            body,
            headers=headers,
            key=key,
            stream=stream,
            surface=_surface(request),
            attempt=request.retries_taken,
            upstream=self.upstream_async(asyncio.get_running_loop()),
            abandoned=self._abandoned,
        )
        if self.pipeline.config.token_count == "exact":
            await self._count_exact_async(call)
        if call.short_circuit:
            self.pipeline.finish(call, None)
            return self._serve(request, call)
        if plugin_tools(call.body):
            if _splice_stream(request, call):
                return await self._stream_plugin_tools_async(request, call, headers, call_next)
            return await self._handle_plugin_tools_async(request, call, headers, call_next)
        with self._attempt(call):
            response = await call_next(self._outgoing(request, call, headers))
            passed = self._pass_through(call, response, _AsyncObservedStream)
            if passed is not None:
                return passed
            raw = await response.http_response.aread()
        await response_phase(self._finish_json, call, response, raw)
        return response

    def _abandoned(self, call: Call) -> None:
        """A call begun for a caller that was cancelled meanwhile: recorded (and its claims released)."""
        if not call.recorded:
            self.pipeline.finish(call, None, status="cancelled", error="CancelledError")


# -- tools that plugins answer themselves -----------------------------------------------------

MAX_PLUGIN_TOOL_ROUNDS = 3


def read_message(content_type: str, raw: bytes) -> dict[str, Any] | None:
    """The Message in a whole answer body, JSON or SSE (None when cut off or unreadable)."""
    if "text/event-stream" in content_type:
        acc = SSEAccumulator()
        acc.feed(raw)
        acc.close()
        return acc.message
    try:
        message = json.loads(raw)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def plan_round(
    pipeline: Pipeline, call: Call, message: dict[str, Any]
) -> tuple[list[dict[str, Any]] | None, dict[str, Any]]:
    """Answers for a response that asks only for plugin tools, else None and the message to hand back.

    A response that mixes plugin tools with the caller's own is handed back without the plugin's
    tool_use blocks: the caller answers its own tools and never sees ours.
    """
    if message.get("stop_reason") != "tool_use":
        return None, message
    content = [b for b in message.get("content") or [] if isinstance(b, dict)]
    ours = [b for b in content if is_plugin_tool_use(b)]
    if not ours:
        return None, message
    if any(b.get("type") == "tool_use" and b not in ours for b in content):
        return None, {**message, "content": [b for b in content if b not in ours]}
    results = []
    for block in ours:
        answer = pipeline.answer_tool_use(call, block)
        result: dict[str, Any] = {"type": "tool_result", "tool_use_id": block.get("id")}
        if answer is None:
            result.update(content=f"no plugin answers {block.get('name')}", is_error=True)
        else:
            result["content"] = answer
        results.append(result)
    return results, message


def next_round(
    pipeline: Pipeline,
    call: Call,
    message: dict[str, Any],
    results: list[dict[str, Any]],
    headers: dict[str, Any],
) -> Call:
    """The next call of a plugin-tool exchange, through the whole pipeline (from async code: in a thread)."""
    return pipeline.begin(
        follow_up(call, message, results),
        headers=headers,
        key=call.ctx.key_hash,
        stream=call.ctx.stream,
        surface=call.surface,
        upstream=call.ctx.upstream,
    )


def follow_up(call: Call, message: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    """The caller's request continued with the model's plugin-tool call and the plugins' answers."""
    body = call.original
    turn = [
        {"role": "assistant", "content": message.get("content") or []},
        {"role": "user", "content": results},
    ]
    return {**body, "messages": [*body["messages"], *turn]}


def end_exchange(call: Call, first: Call, answer: dict[str, Any] | None) -> None:
    """Mark ``call`` as the last round of the exchange ``first`` began, ``answer`` what the caller got.

    Set before the round's observers run: the answer to the caller's request is the exchange's
    (memoize stores it under the first round's body), not this round's message, which may call a
    plugin's tool or continue a body the caller never sent.
    """
    call.ctx.exchange_request = first.body
    call.ctx.exchange_answer = answer


def _splice_stream(request: _sdk.APIRequest, call: Call) -> bool:
    """Stream a plugin-tool exchange on as it comes, rather than buffer it: streamed, without thinking.

    With thinking on, the answer is buffered and only the final round handed back: a message that
    joined several rounds would carry thinking blocks the API did not produce in that order.
    """
    return bool(request.stream) and not thinking_on(call.body)


def thinking_on(body: dict[str, Any]) -> bool:
    """Whether a request asks for thinking (enabled or adaptive)."""
    thinking = body.get("thinking")
    return isinstance(thinking, dict) and thinking.get("type") != "disabled"


class Splice:
    """Joins the SSE rounds of a plugin-tool exchange into the one message the caller streams.

    Events pass on as they arrive, except: the ``tool_use`` blocks addressed to plugins (held back:
    the caller never sees a tool it did not define), later rounds' ``message_start`` (one message),
    and each round's ``message_delta``/``message_stop`` (held until the exchange ends). Block indices
    are renumbered so the caller sees 0, 1, 2... across rounds.
    """

    def __init__(self) -> None:
        self.rounds = 0
        self.next_index = 0
        self.acc = SSEAccumulator()
        self._seen = 0
        self._map: dict[int, int | None] = {}
        self._held: list[tuple[str, dict[str, Any]]] = []
        self._dropped = False
        self._callers_tools = False
        self.sent = SSEAccumulator()  # what the caller was handed, all rounds: the exchange's answer

    @property
    def answer(self) -> dict[str, Any] | None:
        """The message the caller assembles from what was handed out (complete once ``end()`` ran)."""
        return self.sent.message

    def new_round(self) -> None:
        self.rounds += 1
        self.acc = SSEAccumulator()
        self._seen, self._map, self._held = 0, {}, []
        self._dropped = self._callers_tools = False

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to hand the caller now, for a chunk of this round's stream."""
        self.acc.feed(chunk)
        out: list[bytes] = []
        for kind, data in self.acc.events[self._seen :]:
            out.extend(self._event(kind, data))
        self._seen = len(self.acc.events)
        handed = b"".join(out)
        self.sent.feed(handed)
        return handed

    def _event(self, kind: str, data: dict[str, Any]) -> list[bytes]:
        if kind == "message_start":
            return [sse_event(kind, data)] if self.rounds == 0 else []
        if kind in ("message_delta", "message_stop"):
            self._held.append((kind, data))
            return []
        if kind.startswith("content_block_"):
            idx = int(data.get("index", 0))
            if kind == "content_block_start":
                block = data.get("content_block") or {}
                ours = is_plugin_tool_use(block)
                self._dropped |= ours
                self._callers_tools |= block.get("type") == "tool_use" and not ours
                self._map[idx] = None if ours else self.next_index
                if not ours:
                    self.next_index += 1
            to = self._map.get(idx)
            return [] if to is None else [sse_event(kind, {**data, "index": to})]
        return [sse_event(kind, data)]  # ping, error

    def end(self) -> bytes:
        """The held ``message_delta``/``message_stop`` of the last round, closing the caller's message."""
        out = []
        for kind, data in self._held:
            delta = data.get("delta")
            if (
                kind == "message_delta"
                and isinstance(delta, dict)
                and delta.get("stop_reason") == "tool_use"
                and self._dropped
                and not self._callers_tools
            ):
                data = {**data, "delta": {**delta, "stop_reason": "end_turn"}}  # no tool left to call
            out.append(sse_event(kind, data))
        handed = b"".join(out)
        self.sent.feed(handed)
        return handed


class _SplicedStream(httpx2.SyncByteStream):
    """Streams a plugin-tool exchange on: answers plugin tools and continues with the next round."""

    def __init__(
        self,
        mw: TokensaverMiddleware,
        request: _sdk.APIRequest,
        call: Call,
        headers: dict[str, Any],
        call_next: Any,
        http: httpx2.Response,
    ) -> None:
        self.mw, self.request, self.call, self.headers, self.call_next = mw, request, call, headers, call_next
        self.first = call  # the caller's own request: the exchange's answer is stored under it
        self.http: httpx2.Response | None = http

    def __iter__(self) -> Iterator[bytes]:
        pipeline, splice = self.mw.pipeline, Splice()
        try:
            while self.http is not None:
                for chunk in self.http.iter_bytes():
                    out = splice.feed(chunk)
                    if out:
                        yield out
                self.http.close()
                self.http = None
                message = splice.acc.message
                if message is None:
                    self._incomplete(splice)
                    return
                results, reply = plan_round(pipeline, self.call, message)
                last = results is None or splice.rounds == MAX_PLUGIN_TOOL_ROUNDS
                tail = splice.end() if last else b""
                if last:
                    end_exchange(self.call, self.first, splice.answer)
                pipeline.finish(self.call, message)
                if last:
                    yield tail
                    return
                self.call = as_requester(next_round, pipeline, self.call, reply, results, self.headers)
                with self.mw._attempt(self.call):
                    response = self.call_next(self.mw._outgoing(self.request, self.call, self.headers))
                    http = response.http_response
                    if not http.is_success:
                        http.read()
                if not http.is_success:
                    yield self._failed(http)
                    return
                splice.new_round()
                self.http = http
        finally:
            self.close()

    def _incomplete(self, splice: Splice) -> None:
        self.mw.pipeline.finish(self.call, None, status="incomplete", error=splice.acc.failure)

    def _failed(self, http: httpx2.Response) -> bytes:
        """A follow-up round the API refused: recorded, and told to the caller as a stream error."""
        self.mw.pipeline.finish(self.call, None, status=http.status_code, error=f"HTTP {http.status_code}")
        return sse_error_answer(http.content, http.status_code)

    def close(self) -> None:
        if self.http is not None:
            self.http.close()
            self.http = None
        if not self.call.recorded:  # the caller stopped reading mid-round
            self.mw.pipeline.finish(self.call, None, status="incomplete", error="stream closed early")


class _AsyncSplicedStream(_SplicedStream, httpx2.AsyncByteStream):  # type: ignore[misc]
    """Async twin of ``_SplicedStream``."""

    async def __aiter__(self) -> AsyncIterator[bytes]:  # type: ignore[override]
        pipeline, splice = self.mw.pipeline, Splice()
        try:
            while self.http is not None:
                async for chunk in self.http.aiter_bytes():
                    out = splice.feed(chunk)
                    if out:
                        yield out
                await self.http.aclose()
                self.http = None
                message = splice.acc.message
                if message is None:
                    self._incomplete(splice)  # no observers run for it: nothing that could block the loop
                    return
                results, reply = await response_phase(plan_round, pipeline, self.call, message)
                last = results is None or splice.rounds == MAX_PLUGIN_TOOL_ROUNDS
                tail = splice.end() if last else b""
                if last:
                    end_exchange(self.call, self.first, splice.answer)
                await response_phase(pipeline.finish, self.call, message)
                if last:
                    yield tail
                    return
                self.call = await request_phase(next_round, pipeline, self.call, reply, results, self.headers)
                with self.mw._attempt(self.call):
                    response = await self.call_next(self.mw._outgoing(self.request, self.call, self.headers))
                    http = response.http_response
                    if not http.is_success:
                        await http.aread()
                if not http.is_success:
                    yield self._failed(http)
                    return
                splice.new_round()
                self.http = http
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        if self.http is not None:
            await self.http.aclose()
            self.http = None
        if not self.call.recorded:
            self.mw.pipeline.finish(self.call, None, status="incomplete", error="stream closed early")


class _StreamObserver:
    """Assembles the final message from SSE bytes passing through, and records the call once."""

    def __init__(self, pipeline: Pipeline, call: Call, http: httpx2.Response) -> None:
        self.pipeline, self.call, self.http = pipeline, call, http
        self.acc = SSEAccumulator()
        self.done = False

    def _done(self) -> None:
        if self.done:
            return
        self.done = True
        if self.acc.message is not None:
            self.pipeline.finish(self.call, self.acc.message)
        else:
            self.pipeline.finish(self.call, None, status="incomplete", error=self.acc.failure)


class _ObservedStream(_StreamObserver, httpx2.SyncByteStream):
    """Passes SSE bytes through as they arrive while assembling the final message."""

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self.http.iter_bytes():
                self.acc.feed(chunk)
                yield chunk
        finally:
            self._done()

    def close(self) -> None:
        try:
            self.http.close()
        finally:
            self._done()


class _AsyncObservedStream(_StreamObserver, httpx2.AsyncByteStream):
    """Async twin of ``_ObservedStream``."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.http.aiter_bytes():
                self.acc.feed(chunk)
                yield chunk
            if self.acc.message is not None:  # observers run off the loop (they store answers...)
                await response_phase(self._done)
        finally:
            self._done()

    async def aclose(self) -> None:
        try:
            await self.http.aclose()
        finally:
            self._done()


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
        raise TypeError(f"tokensaver.wrap() expects an anthropic client, got {type(client).__name__}")
    pipe = pipeline or Pipeline(config, plugin_manager=plugin_manager, run=run, clock=clock)
    mw = TokensaverMiddleware(pipe, asynchronous=_sdk.is_async_client(client))
    wrapped = client.with_middleware(mw)  # type: ignore[attr-defined]
    mw.bind(wrapped)
    _install_copy_hook(wrapped, mw)
    wrapped.tokensaver = pipe  # type: ignore[attr-defined]
    return wrapped
