"""One exchange behind every door: the Messages protocol tokensaver speaks, without I/O.

The doors (the sync and async SDK middleware, the proxy) only read and write bytes. What a request
is, what its answer means, what is recorded and what the caller is handed is decided here, once,
in plain functions the doors share (as the SDK's ``lib/middleware/_fallbacks.py`` does):

* **request preparation**: :func:`messages_body`, :func:`prepare` (headers, key hash, stream flag,
  surface, attempt), :func:`control_headers`;
* **a stored answer served** (a short-circuit, the end of a plugin-tool exchange) as JSON or SSE
  with its headers: :func:`serve`;
* **a whole JSON answer** read and recorded: :func:`finish_json`;
* **stream observation**: :class:`StreamWatch` assembles the message from SSE bytes on the way
  (Bedrock's binary event-stream too);
* **the plugin-tool round loop**: :class:`PluginToolExchange`, a state machine the doors feed with
  each round's answer (rounds joined into one streamed message by :class:`Splice`);
* **failure outcomes**: :class:`Outcome` and :class:`Failure`, recorded in the ledger with the
  same status strings as ever (``incomplete``, ``unparsed``, ``timeout``...; an HTTP status as int).

Pipeline work here (``finish``, plugin tool answers, the next round's ``begin``) is sync: async
doors run it in :mod:`tokensaver.phases`' threads, never on the event loop.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .billing import THINKING_TYPES
from .pipeline import Call, Pipeline, is_plugin_tool_use, key_hash, plugin_tools
from .sse import (
    EVENTSTREAM_CONTENT_TYPE,
    SSEAccumulator,
    is_stream,
    message_to_eventstream,
    message_to_sse,
    sse_error_answer,
    sse_event,
    stream_accumulator,
)
from .threads import CREATE_ONLY, thread_of
from .validate import asked_back

__all__ = [
    "BINDING_BETA",
    "CONTROL_PREFIX",
    "MAX_PLUGIN_TOOL_ROUNDS",
    "MESSAGES_PATH",
    "Failure",
    "Outcome",
    "PluginToolExchange",
    "Prepared",
    "Served",
    "Splice",
    "Step",
    "StreamWatch",
    "control_headers",
    "encode",
    "end_exchange",
    "finish_json",
    "follow_up",
    "messages_body",
    "next_round",
    "plan_round",
    "plugin_tools",
    "prepare",
    "read_message",
    "serve",
    "short_circuit",
    "splices",
    "strip_known_unbound",
    "strip_thinking_from",
    "thinking_on",
    "unbound_beta",
    "unbound_message",
    "unbound_retry",
    "with_beta",
]

MESSAGES_PATH = "/v1/messages"
CONTROL_PREFIX = "x-tokensaver-"  # tokensaver's own request headers: read here, never sent upstream
MAX_PLUGIN_TOOL_ROUNDS = 3
SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"


# -- failure outcomes --------------------------------------------------------------------------


class Outcome(enum.StrEnum):
    """What became of a call that got no answer to record; the value is the ledger's status string."""

    INCOMPLETE = "incomplete"  # an answer began and did not end whole, the caller left, a read broke
    UNPARSED = "unparsed"  # a whole answer that is not JSON
    TIMEOUT = "timeout"  # the SDK's timeout: no answer in time
    CONNECTION_ERROR = "connection_error"  # the SDK could not reach the API
    CANCELLED = "cancelled"  # the caller's task was cancelled
    ERROR = "error"  # any other exception from the SDK's call


@dataclass(frozen=True)
class Failure:
    """A call's failed outcome as recorded: an :class:`Outcome` or the API's HTTP status, and why."""

    status: Outcome | int
    error: str | None

    @classmethod
    def http(cls, status: int) -> Failure:
        """The API refused the call with ``status`` (its answer goes to the caller untouched)."""
        return cls(status, f"HTTP {status}")

    @classmethod
    def incomplete(cls, error: str | None) -> Failure:
        """No whole answer: ``error`` says why."""
        return cls(Outcome.INCOMPLETE, error)

    @classmethod
    def upstream(cls, what: str, exc: BaseException) -> Failure:
        """The upstream failed (``what``: ``"upstream unreachable"``, ``"upstream truncated"``...)."""
        return cls(Outcome.INCOMPLETE, f"{what}: {type(exc).__name__}")

    @property
    def recorded_status(self) -> int | str:
        """The ledger's ``status`` value (a plain string or int, as reports read it)."""
        return self.status.value if isinstance(self.status, Outcome) else self.status

    def record(self, pipeline: Pipeline, call: Call) -> dict[str, Any]:
        """Record ``call`` with this outcome (its observers do not run: there is no answer)."""
        return pipeline.finish(call, None, status=self.recorded_status, error=self.error)


CLIENT_GONE = Failure.incomplete("client disconnected")
CLOSED_EARLY = Failure.incomplete("stream closed early")
CANCELLED = Failure(Outcome.CANCELLED, "CancelledError")
UNREADABLE = Failure.incomplete("unreadable or cut-off answer")


# -- request preparation -----------------------------------------------------------------------


def messages_body(body: Any) -> dict[str, Any] | None:
    """``body`` if it is a Messages request (a JSON object with a ``messages`` list), else None."""
    if isinstance(body, dict) and isinstance(body.get("messages"), list):
        return body
    return None


@dataclass(frozen=True)
class Prepared:
    """What the pipeline is told about a Messages request besides its body."""

    headers: dict[str, Any]  # the request's headers, names lower-cased (secrets included: never stored)
    key: str  # the hash of the caller's credential, which namespaces what is stored for it
    stream: bool
    surface: str  # "messages" or "beta"
    attempt: int  # retries the client had taken before this attempt

    def begin(self, pipeline: Pipeline, body: dict[str, Any], upstream: Any) -> Call:
        """The pipeline's request phase for this request (from async code: in the request phase)."""
        return pipeline.begin(
            body,
            headers=self.headers,
            key=self.key,
            stream=self.stream,
            surface=self.surface,
            attempt=self.attempt,
            upstream=upstream,
        )


def prepare(
    headers: Mapping[Any, Any],
    body: dict[str, Any],
    *,
    stream: bool = False,
    beta: bool = False,
    attempt: int = 0,
    default_key: str | None = None,
) -> Prepared:
    """The request's headers (lower-cased), key hash, stream flag, surface and attempt.

    The key is the hash of ``x-api-key`` (else ``authorization``); ``default_key`` (else the hash of
    no key) when the request carries neither, e.g. an SDK client that authenticates otherwise.
    """
    low = {str(k).lower(): v for k, v in headers.items()}
    secret = low.get("x-api-key") or low.get("authorization")
    if isinstance(secret, str) and secret:
        key = key_hash(secret)
    else:
        key = default_key if default_key is not None else key_hash("")
    return Prepared(
        headers=low,
        key=key,
        stream=bool(stream or body.get("stream")),
        surface="beta" if beta else "messages",
        attempt=attempt,
    )


def control_headers(headers: Mapping[str, Any]) -> list[str]:
    """The names of tokensaver's own control headers in ``headers`` (dropped before sending)."""
    return [k for k in headers if str(k).lower().startswith(CONTROL_PREFIX)]


def encode(body: dict[str, Any]) -> bytes:
    """A transformed body as sent upstream (compact UTF-8 JSON)."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


# -- answers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    """An answer made here, ready for a door to hand over: bytes, content type, headers."""

    body: bytes
    content_type: str
    headers: dict[str, str]


def serve(
    call: Call,
    stream: bool,
    message: dict[str, Any] | None = None,
    rounds: int | None = None,
    *,
    eventstream: bool = False,
) -> Served:
    """A stored answer (``message``, default the short-circuit's) served as SSE or JSON with its headers.

    ``rounds``: the plugin-tool rounds it took (``x-tokensaver-plugin-tool-rounds``). ``eventstream``:
    the caller reads streams as AWS event-stream (a Bedrock client), so a stream is served in that form.
    """
    message = message if message is not None else (call.response or {})
    headers = {"request-id": f"tokensaver-{call.ctx.call_id}", **call.ctx.response_headers}
    if rounds is not None:
        headers["x-tokensaver-plugin-tool-rounds"] = str(rounds)
    if call.short_circuit:
        headers["x-tokensaver-short-circuit"] = call.short_circuit
    if stream:
        headers["cache-control"] = "no-cache"
        if eventstream:
            return Served(message_to_eventstream(message), EVENTSTREAM_CONTENT_TYPE, headers)
        return Served(message_to_sse(message), SSE_CONTENT_TYPE, headers)
    return Served(json.dumps(message).encode(), "application/json", headers)


def short_circuit(pipeline: Pipeline, call: Call, stream: bool, *, eventstream: bool = False) -> Served:
    """Record a short-circuited call (its stored answer) and serve that answer (see :func:`serve`)."""
    pipeline.finish(call, None)
    return serve(call, stream, eventstream=eventstream)


def finish_json(pipeline: Pipeline, call: Call, raw: bytes, status: int = 200) -> dict[str, Any]:
    """Record a whole JSON answer (``unparsed`` if it is not JSON; its observers run if it is a Message)."""
    try:
        message = json.loads(raw)
    except ValueError as exc:
        return Failure(Outcome.UNPARSED, str(exc)).record(pipeline, call)
    return pipeline.finish(call, message if isinstance(message, dict) else None, status=status)


def read_message(content_type: str, raw: bytes) -> dict[str, Any] | None:
    """The Message in a whole answer body, JSON, SSE or event-stream (None when cut off or unreadable)."""
    if is_stream(content_type):
        acc = stream_accumulator(content_type)
        acc.feed(raw)
        acc.close()
        return acc.message
    try:
        message = json.loads(raw)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


class StreamWatch:
    """Assembles the final message from stream bytes passing through, and records the call once.

    ``content_type``: the answer's; Bedrock's event-stream is read as such, anything else as SSE.
    """

    def __init__(self, pipeline: Pipeline, call: Call, content_type: str = "") -> None:
        self.pipeline, self.call = pipeline, call
        self.acc = stream_accumulator(content_type)
        self.done = False  # recorded (or being recorded): never twice

    def feed(self, chunk: bytes) -> None:
        """A chunk of the stream as it passes."""
        self.acc.feed(chunk)

    def eof(self) -> None:
        """The stream ended: a last event not followed by a blank line still counts."""
        self.acc.close()

    @property
    def complete(self) -> bool:
        """Whether the stream parsed cleanly to ``message_stop`` (its observers will run)."""
        return self.acc.message is not None

    @property
    def failed(self) -> bool:
        """Whether the stream carried its own failure (an error event, a malformed event)."""
        return self.acc.error is not None or self.acc.malformed

    def fail(self, failure: Failure) -> None:
        """Record the call as ``failure`` (unless already recorded)."""
        if not self.done:
            self.done = True
            failure.record(self.pipeline, self.call)

    def record(self) -> None:
        """Record the call: the assembled message, else ``incomplete`` with what the stream lacked."""
        if self.done:
            return
        self.done = True
        if self.acc.message is not None:
            self.pipeline.finish(self.call, self.acc.message)
        else:
            Failure.incomplete(self.acc.failure).record(self.pipeline, self.call)


# -- tools that plugins answer themselves ------------------------------------------------------


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
    answers = {"role": "user", "content": results}
    if thread_of(body) is not None and isinstance(message.get("id"), str):
        # a thread holds the model's tool call: the next round continues it with the answers alone
        rest = {k: v for k, v in body.items() if k not in CREATE_ONLY}
        thread = {"type": "continue", "previous_message_id": message["id"]}
        return {**rest, "thread": thread, "messages": [answers]}
    turn = [{"role": "assistant", "content": message.get("content") or []}, answers]
    return {**body, "messages": [*body["messages"], *turn]}


def end_exchange(call: Call, first: Call, answer: dict[str, Any] | None) -> None:
    """Mark ``call`` as the last round of the exchange ``first`` began, ``answer`` what the caller got.

    Set before the round's observers run: the answer to the caller's request is the exchange's
    (memoize stores it under the first round's body), not this round's message, which may call a
    plugin's tool or continue a body the caller never sent.
    """
    call.ctx.exchange_request = first.body
    call.ctx.exchange_answer = answer


def thinking_on(body: dict[str, Any]) -> bool:
    """Whether a request asks for thinking (enabled or adaptive)."""
    thinking = body.get("thinking")
    return isinstance(thinking, dict) and thinking.get("type") != "disabled"


def splices(stream: bool, body: dict[str, Any]) -> bool:
    """Stream a plugin-tool exchange on as it comes, rather than buffer it: streamed, without thinking.

    With thinking on, the answer is buffered and only the final round handed back: a message that
    joined several rounds would carry thinking blocks the API did not produce in that order. A thread
    request is buffered too: the caller must be handed the last round's id, the one its thread
    continues from (a spliced stream begins with the first round's).
    """
    return stream and not thinking_on(body) and thread_of(body) is None


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


@dataclass(frozen=True)
class Step:
    """A round's answer planned and recorded: the exchange ends here, or goes on with ``results``."""

    last: bool
    reply: dict[str, Any]  # the message to hand back (the last round), or the round's message
    results: list[dict[str, Any]] | None  # the plugins' tool results for the next round
    tail: bytes  # a spliced stream's closing events (the last round)


class PluginToolExchange:
    """The plugin-tool round loop of one caller's request, as a state machine without I/O.

    A door sends ``exchange.call`` (the current round's call) upstream and feeds the answer in:

    1. refused: :meth:`refused` records it; the door hands the API's error back (mid-stream:
       :meth:`refused_in_stream`'s error event);
    2. a streamed round passes through :meth:`feed` (the bytes the caller gets now), a whole one
       is read with :func:`read_message`; no message: :meth:`fail`;
    3. :meth:`conclude` answers the plugins' tools and records the round (response phase);
    4. ``step.last``: the door hands back ``step.tail`` (streamed) or :meth:`served`; else
       :meth:`advance` begins the next round (request phase) and the door sends it.

    The caller's streamed response, once begun (:meth:`start_stream`), joins every round into one
    message (:class:`Splice`).
    """

    def __init__(
        self,
        pipeline: Pipeline,
        call: Call,
        headers: dict[str, Any],
        *,
        splice: bool,
        eventstream: bool = False,
    ) -> None:
        self.pipeline, self.headers = pipeline, headers
        self.eventstream = eventstream  # the caller reads streams as AWS event-stream (see serve)
        self.first = self.call = call  # first: the caller's own request; the answer is stored under it
        self.rounds = 0
        self.splice = Splice() if splice else None
        self.streaming = False  # the caller's streamed response has begun

    def start_stream(self) -> None:
        """The caller's streamed response begins: rounds are spliced into it from now on."""
        assert self.splice is not None
        self.streaming = True

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to hand the caller now, for a chunk of this round's stream."""
        assert self.splice is not None
        return self.splice.feed(chunk)

    @property
    def streamed_message(self) -> dict[str, Any] | None:
        """This round's message, assembled from what was fed."""
        return self.splice.acc.message if self.splice is not None else None

    def streamed_failure(self) -> Failure:
        """Why this streamed round has no message."""
        return Failure.incomplete(self.splice.acc.failure if self.splice is not None else None)

    def fail(self, failure: Failure) -> None:
        """This round ends the exchange without an answer (unless it was recorded already)."""
        if not self.call.recorded:
            failure.record(self.pipeline, self.call)

    def refused(self, status: int) -> None:
        """The API refused this round with ``status``: recorded; its answer goes back as it is."""
        self.fail(Failure.http(status))

    def refused_in_stream(self, status: int, payload: bytes) -> bytes:
        """A round the API refused after the caller's stream began: recorded, told as an error event."""
        self.refused(status)
        return sse_error_answer(payload, status)

    def conclude(self, message: dict[str, Any]) -> Step:
        """Answer this round's plugin tools, decide whether the exchange ends, record the round.

        Pipeline work (plugins answer, observers run): from async code, in the response phase.
        """
        results, reply = plan_round(self.pipeline, self.call, message)
        last = results is None or self.rounds == MAX_PLUGIN_TOOL_ROUNDS
        tail = b""
        if last:
            answer: dict[str, Any] | None = reply
            if self.streaming and self.splice is not None:  # the caller was streamed the rounds
                tail = self.splice.end()
                answer = self.splice.answer
            end_exchange(self.call, self.first, answer)
        self.pipeline.finish(self.call, message)
        return Step(last, reply, results, tail)

    def advance(self, step: Step) -> Call:
        """Begin the next round: the request continued with the plugins' answers, through the pipeline.

        Pipeline work (transforms may wait): from async code, in the request phase.
        """
        assert step.results is not None
        self.call = next_round(self.pipeline, self.call, step.reply, step.results, self.headers)
        self.rounds += 1
        if self.splice is not None:
            self.splice.new_round()
        return self.call

    def served(self, stream: bool, step: Step) -> Served:
        """The last round's answer as the caller gets it when it was not streamed on."""
        return serve(self.call, stream, step.reply, rounds=self.rounds, eventstream=self.eventstream)


# -- a thinking block the API refused: bound to another prefix -----------------------------------

BOUND_ELSEWHERE = "bound to a different conversation"
_BLOCK_PATH = re.compile(r"messages\.(\d+)\.content\.(\d+)")


def _sig(block: Any) -> bytes | None:
    """A thinking block's identity: 8 bytes of its signature (or redacted data)."""
    if not isinstance(block, dict) or block.get("type") not in THINKING_TYPES:
        return None
    sig = block.get("signature") if block.get("type") == "thinking" else block.get("data")
    return hashlib.blake2b(str(sig).encode(), digest_size=8).digest() if sig else None


BINDING_BETA = "thinking-binding-controls-2026-08-01"  # the beta that lets a request set block_binding


def strip_thinking_from(
    messages: list[Any],
    at: tuple[int, int],
    only: frozenset[bytes] | set[bytes] | None = None,
    keep: int | None = None,
) -> tuple[list[Any], list[bytes], list[bytes]]:
    """``messages`` without the thinking blocks of assistant turns from ``at`` = (message, block) on
    (with ``only``: just those whose :func:`_sig` is in it), the removed blocks' identities, and
    those of the blocks left in message ``keep`` (the turn whose thinking the API asks back while
    a tool loop goes on: "a final assistant message must start with a thinking block").
    Removing a trailing run of thinking blocks keeps the earlier ones valid (the prefix-check rules);
    an assistant turn that would be left empty keeps its blocks, so no turn is ever emptied."""
    out = list(messages)
    removed: list[bytes] = []
    held: list[bytes] = []
    for i in range(at[0], len(out)):
        m = out[i]
        if not isinstance(m, dict) or m.get("role") != "assistant" or not isinstance(m.get("content"), list):
            continue
        first = at[1] if i == at[0] else 0
        kept, gone = [], []
        for j, b in enumerate(m["content"]):
            sig = _sig(b) if j >= first else None
            if sig is not None and (only is None or sig in only):
                gone.append(sig)
            else:
                kept.append(b)
        if i == keep:
            held += gone
        elif kept and gone:
            removed += gone
            out[i] = {**m, "content": kept}
    return out, removed, held


def _asked_back(body: dict[str, Any]) -> int | None:
    """The message whose thinking the API asks back (:func:`~tokensaver.validate.asked_back`), when
    thinking is on, else None."""
    thinking = body.get("thinking")
    if not isinstance(thinking, dict) or thinking.get("type") in (None, "disabled"):
        return None
    return asked_back(body.get("messages") or [])


def _drop_unbound(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` asking the API to drop the thinking blocks that fail the prefix check itself
    (``block_binding.prefix_mismatch_behavior: "drop_block"``; the doors add :data:`BINDING_BETA`)."""
    thinking = body["thinking"]
    binding = thinking.get("block_binding")
    return {
        **body,
        "thinking": {
            **thinking,
            "block_binding": {
                **(binding if isinstance(binding, dict) else {}),
                "prefix_mismatch_behavior": "drop_block",
            },
        },
    }


def with_beta(value: str | None, beta: str) -> str:
    """An ``anthropic-beta`` header value with ``beta`` among its comma-separated betas."""
    betas = [b.strip() for b in (value or "").split(",") if b.strip()]
    return ", ".join(betas if beta in betas else [*betas, beta])


def unbound_beta(call: Call) -> str | None:
    """The beta a call needs on its ``anthropic-beta`` header (it asks the API to drop blocks), else None."""
    return BINDING_BETA if (call.unbound or {}).get("drop_block") else None


class _Unbound:
    """Per API key and conversation, the thinking blocks stripped after the API refused them: the
    later calls strip the same blocks before sending (what the model wrote since is bound to a
    history without them, and a block put back fails the check). LRU, bounded."""

    MAX_CONVERSATIONS = 4096
    MAX_BLOCKS = 4096  # per conversation

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.convs: OrderedDict[tuple[str, str], set[bytes]] = OrderedDict()

    def get(self, key: tuple[str, str]) -> frozenset[bytes]:
        with self.lock:
            sigs = self.convs.get(key)
            if sigs is None:
                return frozenset()
            self.convs.move_to_end(key)
            return frozenset(sigs)

    def add(self, key: tuple[str, str], sigs: list[bytes]) -> None:
        with self.lock:
            known = self.convs.setdefault(key, set())
            self.convs.move_to_end(key)
            known.update(sigs[: max(0, self.MAX_BLOCKS - len(known))])
            while len(self.convs) > self.MAX_CONVERSATIONS:
                self.convs.popitem(last=False)


_UNBOUND_STATE = "tokensaver.unbound"  # the pipeline-wide state entry (never a plugin's name)


def _unbound_of(call: Call) -> tuple[_Unbound, tuple[str, str]]:
    state = call.ctx._states.setdefault(_UNBOUND_STATE, {})
    table = state.get("table")
    if table is None:
        table = state.setdefault("table", _Unbound())
    return table, (str(call.ctx.key_hash), str(call.ctx.conversation))


def strip_known_unbound(call: Call) -> int:
    """Before sending: strip the thinking blocks this conversation had refused earlier
    (:func:`unbound_retry` remembers them); how many. Sets ``call.body`` when any."""
    table, key = _unbound_of(call)
    known = table.get(key)
    if not known:
        return 0
    body = call.body
    messages, removed, held = strip_thinking_from(
        list(body.get("messages") or []), (0, 0), known, _asked_back(body)
    )
    if removed or held:
        call.body = {**body, "messages": messages}
        call.unbound = {"stripped_known": len(removed)}
        if held:  # in the turn the API asks back: the API drops them itself
            call.body = _drop_unbound(call.body)
            call.unbound["drop_block"] = len(held)
    return len(removed) + len(held)


def unbound_retry(call: Call, status: int, raw: bytes) -> dict[str, Any] | None:
    """The body to send once more when the API refused a thinking block as bound to a different
    conversation (models with preserved thinking: something before the block changed since the
    model wrote it -- a rewrite tokensaver could not repeat, after a restart or a stage that failed
    open), else None.

    The documented gateway answer: strip the thinking from the failing block on and send again,
    and say so (the call's record gets ``thinking_unbound``). The last assistant turn's thinking,
    which the API asks back while a tool loop goes on, is not stripped: the request asks the API
    to drop what fails there (``prefix_mismatch_behavior: "drop_block"``, with its beta). A caller that asked for the error
    (``thinking.block_binding.prefix_mismatch_behavior: "error"``) gets it untouched, as does any
    other error. Sets ``call.body`` and ``call.unbound``; only the first such answer is retried. The
    stripped blocks are remembered: the conversation's later calls strip them before sending
    (:func:`strip_known_unbound`), so one refusal does not cost a second request on every call.
    """
    if status != 400 or (call.unbound or {}).get("from") or BOUND_ELSEWHERE.encode() not in raw:
        return None
    body = call.body
    thinking = body.get("thinking")
    binding = thinking.get("block_binding") if isinstance(thinking, dict) else None
    if isinstance(binding, dict) and binding.get("prefix_mismatch_behavior") == "error":
        return None
    try:
        message = str(json.loads(raw)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return None
    where = _BLOCK_PATH.search(message)
    at = (int(where.group(1)), int(where.group(2))) if where else (0, 0)
    messages, removed, held = strip_thinking_from(
        list(body.get("messages") or []), at, None, _asked_back(body)
    )
    if not removed and not held:
        return None
    table, key = _unbound_of(call)
    table.add(key, removed + held)
    call.unbound = {
        **(call.unbound or {}),
        "from": f"messages.{at[0]}.content.{at[1]}",
        "stripped_blocks": len(removed),
    }
    call.body = {**body, "messages": messages}
    if held:
        call.body = _drop_unbound(call.body)
        call.unbound["drop_block"] = len(held)
    return call.body


def unbound_message(call: Call) -> str:
    """The log line of a call :func:`unbound_retry` sent again."""
    u = call.unbound or {}
    return (
        f"the API refused a thinking block as bound to a different conversation ({u.get('from')}): "
        f"sent again with {u.get('stripped_blocks')} thinking blocks stripped from there on"
    )
