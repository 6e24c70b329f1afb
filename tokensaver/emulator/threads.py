"""Message threads (beta ``message-threads-2026-08-12``): the conversation the API holds between turns.

A request with ``thread: {"type": "create"}`` is an ordinary request whose conversation (its ``system``,
``tools`` and messages plus the reply) the server stores under the reply's ``id``. A request with
``thread: {"type": "continue", "previous_message_id": ...}`` sends only the messages since that reply and
leaves ``system`` and ``tools`` out; the server rebuilds the whole conversation before validating, billing and
caching it, so a continue is billed exactly like the same conversation sent in full (a thread does not cache
anything for you: breakpoints are those of the request, plus those of the create's ``system`` and ``tools``;
the ``cache_control`` of earlier turns' messages is not carried over, as the SDK's full replay drops it too).
A thread is linear (only its latest reply can be continued) and expires 5 minutes after its last stored
response, on the emulator's clock.

Where the API refuses (status, ``error.details.error_code``), as the SDK's thread helper reads it:

* unknown or expired ``previous_message_id``: 404 ``not_found_error``, ``thread_not_found``;
* a reply that was already continued: 400, ``thread_already_continued``;
* a continue of a thread whose previous continue is still being answered: 400, ``thread_continue_in_flight``;
* a model the beta does not support: 400, ``thread_unsupported_request`` with ``unsupported: ["model"]``;
* ``system`` or ``tools`` on a continue, a malformed ``thread``, or no beta header: 400.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from typing import Any

from .validation import EmulatorError, invalid, model_version

THREADS_BETA = "message-threads-2026-08-12"
THREAD_TTL_SECONDS = 300.0
CREATE_ONLY_FIELDS = ("system", "tools")


def supports_threads(model: str) -> bool:
    """Models the threads beta lists: every Claude 4.5 and later (Sonnet 4.5, Haiku 4.5, Opus 4.5 onward)."""
    _, major, minor = model_version(model)
    return (major, minor) >= (4, 5)


def _thread_error(status: int, type_: str, code: str, message: str, **details: Any) -> EmulatorError:
    return EmulatorError(status, type_, message, details={"error_code": code, **details})


def _without_cache_control(value: Any) -> Any:
    """A copy of a message without the ``cache_control`` of any block in it (set for the turn that sent it)."""
    if isinstance(value, dict):
        return {
            k: _without_cache_control(v) if k in ("content", "source") else v
            for k, v in value.items()
            if k != "cache_control"
        }
    if isinstance(value, list):
        return [_without_cache_control(v) for v in value]
    return value


@dataclass
class _Thread:
    fields: dict[str, Any]  # the create request's ``system`` / ``tools``, those it sent
    messages: list[dict[str, Any]]  # the whole conversation, the latest reply last
    head: str  # the reply a continue may name
    head_stop_reason: str | None
    last_used: float
    in_flight: bool = False
    ids: set[str] = field(default_factory=set)


@dataclass
class ThreadTurn:
    """One thread request being answered: the whole conversation it stands for, and how to store its reply."""

    kind: str  # "create" or "continue"
    full_body: dict[str, Any]  # the request as the API rebuilds it (no ``thread``), to validate and bill
    thread: _Thread | None = None
    resumes_pause: bool = False  # a continue with no messages after a ``pause_turn`` reply


class ThreadStore:
    """The threads one emulator holds, by reply id."""

    def __init__(self) -> None:
        self._by_id: dict[str, _Thread] = {}
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._by_id.clear()

    def __len__(self) -> int:
        with self._lock:
            return len({id(t) for t in self._by_id.values()})

    def begin(self, body: dict[str, Any], headers: dict[str, str], now: float) -> ThreadTurn:
        """Check the ``thread`` field of ``body`` and rebuild the conversation it continues; raises as the API does."""
        thread = body["thread"]
        betas = {b.strip() for b in headers.get("anthropic-beta", "").split(",")}
        if THREADS_BETA not in betas:
            raise invalid("thread: Extra inputs are not permitted")
        if not isinstance(thread, dict) or thread.get("type") not in ("create", "continue"):
            raise invalid("thread.type: Input should be 'create' or 'continue'")
        allowed = {"type"} if thread["type"] == "create" else {"type", "previous_message_id"}
        extra = sorted(set(thread) - allowed)
        if extra:
            raise invalid(f"thread.{thread['type']}.{extra[0]}: Extra inputs are not permitted")
        model = body.get("model")
        if isinstance(model, str) and not supports_threads(model):
            raise _thread_error(
                400,
                "invalid_request_error",
                "thread_unsupported_request",
                f"Message threads are not supported for the model {model!r}.",
                unsupported=["model"],
            )
        rest = {k: v for k, v in body.items() if k != "thread"}
        if thread["type"] == "create":
            return ThreadTurn("create", rest)
        prev = thread.get("previous_message_id")
        if not isinstance(prev, str) or not prev:
            raise invalid("thread.continue.previous_message_id: Field required")
        for name in CREATE_ONLY_FIELDS:
            if name in body:
                raise invalid(
                    f"{name}: `{name}` cannot be set on a thread `continue` request; the thread keeps the "
                    f"`{name}` of the request that created it."
                )
        with self._lock:
            held = self._by_id.get(prev)
            if held is not None and now - held.last_used > THREAD_TTL_SECONDS:
                for i in held.ids:
                    self._by_id.pop(i, None)
                held = None
            if held is None:
                raise _thread_error(
                    404,
                    "not_found_error",
                    "thread_not_found",
                    f"No thread holds previous_message_id {prev!r} (it may have expired). Send the whole "
                    'conversation again with `thread: {"type": "create"}`.',
                )
            if held.in_flight:
                raise _thread_error(
                    400,
                    "invalid_request_error",
                    "thread_continue_in_flight",
                    "Another request continuing this thread is still in progress.",
                )
            if held.head != prev:
                raise _thread_error(
                    400,
                    "invalid_request_error",
                    "thread_already_continued",
                    f"The response {prev!r} was already continued; continue from the thread's latest response "
                    'or send the whole conversation again with `thread: {"type": "create"}`.',
                )
            held.in_flight = True
            history = [_without_cache_control(m) for m in held.messages]
            fields = copy.deepcopy(held.fields)
        new = rest.get("messages")
        new_messages = list(new) if isinstance(new, list) else []
        full = {**rest, **fields, "messages": history + new_messages}
        return ThreadTurn(
            "continue",
            full,
            thread=held,
            resumes_pause=not new_messages and held.head_stop_reason == "pause_turn",
        )

    def abort(self, turn: ThreadTurn) -> None:
        """The request failed: the thread stays as it was."""
        if turn.thread is not None:
            with self._lock:
                turn.thread.in_flight = False

    def commit(self, turn: ThreadTurn, reply: dict[str, Any], now: float) -> None:
        """Store the conversation and ``reply`` under the reply's id; its 5 minutes start again."""
        stored_reply = {"role": "assistant", "content": copy.deepcopy(reply["content"])}
        messages = [*copy.deepcopy(turn.full_body["messages"]), stored_reply]
        with self._lock:
            if turn.thread is None:
                fields = {
                    k: copy.deepcopy(turn.full_body[k]) for k in CREATE_ONLY_FIELDS if k in turn.full_body
                }
                held = _Thread(fields, messages, reply["id"], reply.get("stop_reason"), now)
            else:
                held = turn.thread
                held.messages = messages
                held.head = reply["id"]
                held.head_stop_reason = reply.get("stop_reason")
                held.last_used = now
                held.in_flight = False
            held.ids.add(reply["id"])
            self._by_id[reply["id"]] = held
