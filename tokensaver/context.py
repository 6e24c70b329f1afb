"""What a plugin gets with each call: its settings, model facts, shared services and state."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from .errors import ModelCallError
from .pricing import ModelInfo, PriceTable, normalize_usage
from .state import State, open_state
from .tokens import TokenCounter, content_memo, fast_digest

_STATE_LOCK = threading.Lock()
log = logging.getLogger("tokensaver")

# the longest a plugin's own model call (ctx.call_model) may take before the plugin goes on without it
MODEL_CALL_TIMEOUT = 60.0

# who waits for the call being prepared: set by the async doors (the caller's task) for the threads
# they hand the pipeline to; unset, the current thread is the one waiting
_REQUESTER: contextvars.ContextVar[object | None] = contextvars.ContextVar(
    "tokensaver_requester", default=None
)


def requester() -> object:
    """Who waits for the call this thread is preparing: an asyncio task, or a thread.

    The async doors (async ``wrap()``, the proxy) run the pipeline in worker threads on behalf of a
    task; elsewhere the current task, else the current thread. Two calls of one requester never
    wait on each other: the requester may be the very one that has to finish the first.
    """
    current = _REQUESTER.get()
    if current is not None:
        return current
    try:
        task = asyncio.current_task()
    except RuntimeError:
        task = None
    return task if task is not None else threading.current_thread()


def for_requester(task: object) -> contextvars.Context:
    """A copy of the current context in which :func:`requester` is ``task`` (run worker code in it)."""
    ctx = contextvars.copy_context()
    ctx.run(_REQUESTER.set, task)
    return ctx


def conversation_id(body: dict[str, Any]) -> str:
    """The stateless id of a request's conversation: its base (model and first message).

    What a hook called directly gets; the pipeline tells conversations that open alike apart with
    :func:`tokensaver.conversations.identify`, which falls back to this id when it knows nothing.
    """
    from .conversations import conversation_id as base_id

    return base_id(body)


def plugin_notes(calls: list[dict[str, Any]], plugin: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """``(record, notes)`` for the call records where ``plugin`` stored notes with ``ctx.record()``."""
    out = []
    for call in calls:
        notes = (call.get("plugins") or {}).get(plugin)
        if isinstance(notes, dict) and notes:
            out.append((call, notes))
    return out


def strip_cache_control(value: Any) -> Any:
    """The value with every ``cache_control`` key removed, at any depth (for hashing and diffing).

    Read-only: a value with no ``cache_control`` anywhere is returned as it is (not copied), so its
    per-block counts and digests are found by identity.
    """
    if isinstance(value, dict | list) and not _has_cache_control(value):
        return value
    return _strip(value)


_CC = b'"cache_control"'


def _has_cache_control(value: Any) -> bool:
    """Whether a ``cache_control`` key may be in ``value`` (one orjson pass; a text quoting one: True)."""
    try:
        return _CC in orjson.dumps(value)
    except TypeError:  # not JSON orjson takes: look the slow way
        return True


def _strip(value: Any) -> Any:
    if isinstance(value, list):
        return [_strip(v) for v in value]
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k != "cache_control"}
    return value


@dataclass
class CallContext:
    """Per-call context handed to hooks. One instance per call; ``settings``/``plugin`` per stage."""

    model: ModelInfo
    counter: TokenCounter
    prices: PriceTable
    conversation: str
    key_hash: str
    call_id: str
    stream: bool = False
    headers: dict[str, str] = field(default_factory=dict)
    now: float = field(default_factory=time.time)
    # set by the core before each plugin's hook runs
    plugin: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    # set by the core before each transform stage (read it as ``message_digests``): each message's
    # digest (xxh3-128 of its orjson, keys as they come; None: not orjson's JSON) in the body the
    # stage gets, made on first read from what the core digested (the caller's messages, the
    # stages' rewrites), so a plugin's prefix check needs no pass of its own; None outside a stage
    _message_digests: Any = field(default=None, repr=False)
    # billed usage, normalized (set before tokensaver_observe_response)
    usage: dict[str, int] = field(default_factory=dict)
    # per-plugin state that lives as long as the wrapped client (keyed by plugin name)
    _states: dict[str, dict[str, Any]] = field(default_factory=dict)
    # per-plugin notes for this call's record (keyed by plugin name)
    notes: dict[str, dict[str, Any]] = field(default_factory=dict)
    # response headers the core adds (e.g. x-tokensaver-cache)
    response_headers: dict[str, str] = field(default_factory=dict)
    # the Messages calls plugins made themselves through call_model(), billed to this call
    side_calls: list[dict[str, Any]] = field(default_factory=list)
    # set by whoever runs the pipeline (wrap(), the proxy): sends a body upstream, returns the Message
    upstream: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    # run once when the call is over, whatever became of it (see at_end)
    _at_end: list[Callable[[], None]] = field(default_factory=list)
    ended: bool = False
    # monotonic time until which the running hook is in a bounded wait of the core's (see waiting)
    wait_deadline: float | None = None
    # set by the door on the last round of a plugin-tool exchange (``tokensaver_*`` tools answered by
    # the core), before its observers run: the body the exchange's first round sent (the caller's
    # request as transformed) and the message the caller was handed for it (streamed: rounds joined)
    exchange_request: dict[str, Any] | None = None
    exchange_answer: dict[str, Any] | None = None
    # the config's ``state`` (set by the pipeline): where ``store`` keeps what outlives a call
    state_url: str = "embedded"

    @property
    def state(self) -> dict[str, Any]:
        """This plugin's state across calls, for the life of the wrapped client (or proxy)."""
        return self._states.setdefault(self.plugin, {})

    def shared_state(self, **factories: Callable[[], Any]) -> dict[str, Any]:
        """This plugin's state, each missing entry made by its factory once, also with calls in parallel.

        ``ctx.shared_state(lock=threading.Lock, memo=dict)["memo"]``: hooks run in several threads
        (async clients and the proxy run plugins in worker threads), so a plugin's shared objects
        (locks, tables, open stores) are created under one lock.
        """
        state = self.state
        if any(name not in state for name in factories):
            with _STATE_LOCK:
                for name, make in factories.items():
                    if name not in state:
                        state[name] = make()
        return state

    @property
    def store(self) -> State:
        """The process's :class:`~tokensaver.state.State` for the config's ``state`` (embedded or Redis):
        ``ctx.store.space(name, ctx.key_hash, cap=...)`` is a namespace of this API key's entries."""
        return open_state(self.state_url)

    @contextlib.contextmanager
    def waiting(self, seconds: float) -> Iterator[None]:
        """A wait of at most ``seconds`` inside a hook, which the hook's own timeout does not cut short.

        For waits that have their own bound and end in an answer: a model call, an identical call in
        flight (memoize). The core does not abandon a hook while it waits here.
        """
        previous = self.wait_deadline
        self.wait_deadline = max(previous or 0.0, time.monotonic() + max(0.0, seconds) + 1.0)
        try:
            yield
        finally:
            self.wait_deadline = previous

    def at_end(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once when this call is over: answered, refused, cut off, timed out or abandoned.

        For what a plugin holds on the call's behalf (memoize's in-flight claim): the core calls
        :meth:`end` when it records the call, so nothing waits for a call that will never answer.
        """
        if self.ended:
            fn()
        else:
            self._at_end.append(fn)

    def end(self) -> None:
        """The call is over: run the ``at_end`` callbacks (once; a failing one is logged, never raised)."""
        if self.ended:
            return
        self.ended = True
        callbacks, self._at_end = self._at_end, []
        for fn in callbacks:
            try:
                fn()
            except Exception as exc:  # cleanup must not fail the call it cleans up after
                log.warning("a call's end callback failed: %s: %s", type(exc).__name__, exc)

    def record(self, **fields: Any) -> None:
        """Store JSON-serializable facts about this call in the run record, under this plugin."""
        self.notes.setdefault(self.plugin, {}).update(fields)

    def call_model(self, body: dict[str, Any]) -> dict[str, Any]:
        """Make a Messages call of this plugin's own (e.g. a summary by a cheaper model).

        The call goes to the API the caller chose, with the caller's credentials, outside the
        pipeline (no plugin sees it), never streamed. Its billed cost is charged to this plugin's
        stage: the run report shows it as a cost paid out of the savings.

        :param body: a complete Messages request body (``model``, ``max_tokens``, ``messages``...).
        :return: the Message (``content``, ``usage``...).
        :raises ModelCallError: when this pipeline has no upstream (a hook called directly, a
            test), the call failed, or it took longer than ``MODEL_CALL_TIMEOUT`` seconds; the
            plugin decides what to do without it.
        """
        if self.upstream is None:
            raise ModelCallError("no upstream for plugin model calls in this pipeline")
        entry: dict[str, Any] = {"plugin": self.plugin, "model": str(body.get("model", ""))}
        self.side_calls.append(entry)
        try:
            with self.waiting(MODEL_CALL_TIMEOUT + 5):
                message = self.upstream(body)
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"
            status = getattr(exc, "status", None) or getattr(exc, "status_code", None)
            raise ModelCallError(
                f"model call by {self.plugin!r} failed: {entry['error']}",
                status=status if isinstance(status, int) else None,
            ) from exc
        usage = message.get("usage") if isinstance(message, dict) else None
        entry["usage"] = normalize_usage(usage)
        entry["cost_usd"] = round(self.prices.get(entry["model"]).cost(entry["usage"]), 8)
        return message

    @property
    def message_digests(self) -> list[bytes | None] | None:
        """Each message's digest in the body this stage gets (see the field above), or None."""
        d = self._message_digests
        if callable(d):
            d = self._message_digests = d()
        return d  # type: ignore[no-any-return]

    @message_digests.setter
    def message_digests(
        self, value: list[bytes | None] | Callable[[], list[bytes | None] | None] | None
    ) -> None:
        self._message_digests = value

    def digest(self, value: Any) -> bytes:
        """A 17-byte digest of a block, message or any JSON value, ``cache_control`` aside at any
        depth: equal content, equal digest (orjson + xxh3, about a microsecond per KB).

        What to keep of an earlier request to compare the next one with (a digest per block or
        message instead of the body). In-process only: not stable across versions, never stored.
        """
        return fast_digest(strip_cache_control(value))

    def memo(self, kind: str, value: Any, compute: Callable[[Any], Any]) -> Any:
        """``compute(value)``, kept across calls by the value's content (a fast digest), for work a
        conversation repeats on every call (a block's rewrite, a scan of an old result).

        ``kind`` names the function (prefix it with your plugin's name, and change it when the
        function's settings change). The result is shared by later calls: treat it as immutable.
        Bounded (32 MB in all, oldest first); see :class:`tokensaver.tokens.ContentMemo`.
        """
        return content_memo().get(kind, value, compute)

    def count(self, obj: Any) -> int:
        """Tokens in a request body, message, content list, block or string (cached per block)."""
        if isinstance(obj, dict) and "messages" in obj:
            return self.counter.request(obj)
        if isinstance(obj, dict) and "role" in obj:
            return self.counter.message(obj)
        if isinstance(obj, list):
            return self.counter.content(obj)
        return self.counter.block(obj)


def make_context(
    body: dict[str, Any],
    *,
    plugin: str = "",
    settings: dict[str, Any] | None = None,
    now: float | None = None,
    states: dict[str, dict[str, Any]] | None = None,
    key_hash: str = "test",
    prices: PriceTable | None = None,
) -> CallContext:
    """A context for calling a hook directly (tests, replay tools), as the core would build it."""
    from .tokens import default_counter

    table = prices or PriceTable()
    return CallContext(
        model=table.get(str(body.get("model", ""))),
        counter=default_counter(),
        prices=table,
        conversation=conversation_id(body),
        key_hash=key_hash,
        call_id="c-test",
        stream=bool(body.get("stream")),
        now=time.time() if now is None else now,
        plugin=plugin,
        settings=dict(settings or {}),
        _states=states if states is not None else {},
    )
