"""Message threads (beta ``message-threads-2026-08-12``) as the pipeline sees them.

A ``thread: {"type": "create"}`` request is an ordinary one whose conversation (``system``, ``tools``, the
messages as sent and the reply) the API keeps under the reply's id. A ``{"type": "continue",
"previous_message_id": ...}`` request holds only the new messages; it must carry no ``system`` or ``tools``
and the API rebuilds the whole conversation before validating and billing it.

The pipeline keeps, per thread (by the latest reply id, per key hash), what the API holds (the conversation
as sent, ``cache_control`` of earlier messages dropped as the API drops it) and what the caller's own
requests would have been without tokensaver (its untransformed ``system``/``tools`` and messages, the answer
it was handed). A continue is then given to the stages as the whole conversation the API will rebuild
(:attr:`ThreadView.given`), so each plugin sees every breakpoint that counts toward the 4 and the history it
builds on; what a stage does to the messages the API already holds is undone (:meth:`ThreadLog.project`),
and a stage that changes ``system`` or ``tools`` beyond their breakpoints is refused: only the new messages
are transformed. What is sent is the continue again, with the transformed new messages only
(:meth:`ThreadLog.wire`). Accounting bills the whole conversations: the counterfactual the caller's
untransformed one (:attr:`ThreadView.original`), the stages' saving the conversation as sent.

Memory is bounded: only a thread's latest reply is kept (a thread is linear), entries go 330 s after their
last use (the API's threads expire after 300 s), and all entries of a pipeline share a byte cap (the least
recently used go first). A continue of a thread not kept here (evicted, or begun by another process) is
sent untransformed and billed as what it is. On a Redis ``state`` each thread's latest entry is also kept
there (``shared``: a namespace per key hash, 330 s), so a continue reaching another replica is known.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import orjson

from .billing import thaw
from .context import strip_cache_control

__all__ = ["CREATE_ONLY", "THREAD_BYTES", "THREAD_KEEP_SECONDS", "ThreadLog", "ThreadProblem", "ThreadView"]

CREATE_ONLY = ("system", "tools")  # a continue must not carry them: the thread keeps the create's
THREAD_KEEP_SECONDS = 330.0  # the API's threads expire 300 s after their last request
THREAD_BYTES = 64 * 1024 * 1024  # all threads a pipeline keeps, serialized
PLUGIN_TOOL_PREFIX = "tokensaver_"
UNANSWERED = "(answered by tokensaver: not needed)"


class ThreadProblem(ValueError):
    """A stage's output would change what the thread already holds."""


def thread_of(body: dict[str, Any]) -> dict[str, Any] | None:
    """The request's ``thread`` field when it is a create or a continue, else None."""
    thread = body.get("thread")
    if isinstance(thread, dict) and thread.get("type") in ("create", "continue"):
        return thread
    return None


def _size(value: Any) -> int:
    try:
        return len(orjson.dumps(value))
    except TypeError:
        return 0


def _plugin_tool_ids(content: Any) -> list[str]:
    if not isinstance(content, list):
        return []
    return [
        str(b.get("id"))
        for b in content
        if isinstance(b, dict)
        and b.get("type") == "tool_use"
        and str(b.get("name", "")).startswith(PLUGIN_TOOL_PREFIX)
    ]


@dataclass
class Held:
    """One thread at its latest reply."""

    orig_fields: dict[str, Any]  # the caller's create's system / tools, untransformed
    orig_messages: list[dict[str, Any]]  # the caller's conversation, ending with the answer it was handed
    sent_fields: dict[str, Any]  # system / tools as the create sent them
    sent_messages: list[dict[str, Any]]  # the conversation as the API holds it, ending with the reply
    pending: bool  # the reply called plugins' tools: the caller has not been handed an answer yet
    unanswered: list[str]  # plugin tool_use ids in the reply the caller never saw (it answers its own only)
    nbytes: int
    last_used: float


@dataclass
class ThreadView:
    """A thread request as the pipeline handles it."""

    kind: str  # "create" or "continue"
    key: str
    thread: dict[str, Any]  # the request's thread field, as sent
    original: dict[str, Any]  # the caller's request as a whole conversation, untransformed (counterfactual)
    given: dict[str, Any]  # what the stages get: the whole conversation as the API will rebuild it
    held: Held | None = None  # the thread continued (None: a create, or a thread not kept here)
    n: int = 0  # leading messages of ``given`` the API already holds
    # given's system / tools (a continue's: the create's)
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def opaque(self) -> bool:
        """A continue of a thread not kept here: sent as it came, untransformed."""
        return self.kind == "continue" and self.held is None


class ThreadLog:
    """The threads one pipeline has seen, by (key hash, latest reply id); bounded in bytes and time."""

    def __init__(
        self,
        max_bytes: int = THREAD_BYTES,
        keep_seconds: float = THREAD_KEEP_SECONDS,
        shared: Callable[[str], Any] | None = None,
    ) -> None:
        self.max_bytes, self.keep_seconds = max_bytes, keep_seconds
        # ``shared(key)``: the key's namespace of a Redis state (tokensaver.state.Space), where the
        # replicas keep each thread's latest entry too; None: this process only
        self.shared = shared
        self._held: OrderedDict[tuple[str, str], Held] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def open(self, body: dict[str, Any], key: str, now: float) -> ThreadView | None:
        """The thread view of a request, or None when it is not a thread request."""
        thread = thread_of(body)
        if thread is None:
            return None
        if thread["type"] == "create":
            return ThreadView(
                "create", key, thread, body, body, fields={k: body[k] for k in CREATE_ONLY if k in body}
            )
        prev = thread.get("previous_message_id")
        held = None
        with self._lock:
            self._purge(now)
            if isinstance(prev, str):
                held = self._held.get((key, prev))
                if held is not None:
                    held.last_used = now
                    self._held.move_to_end((key, prev))
        if held is None and self.shared is not None and isinstance(prev, str):
            held = self._pull(key, prev, now)
        new = body.get("messages")
        if held is None or not isinstance(new, list) or any(k in body for k in CREATE_ONLY):
            return ThreadView("continue", key, thread, body, body)  # opaque: sent as it came
        rest = {k: v for k, v in body.items() if k not in CREATE_ONLY}
        given_new = _answer_unseen(new, held.unanswered)
        given = {**rest, **held.sent_fields, "messages": [*held.sent_messages, *given_new]}
        if held.pending:
            # a plugin-tool round the caller never sent: nothing of the caller's to bill
            original = given
        else:
            original = {**rest, **held.orig_fields, "messages": [*held.orig_messages, *new]}
        return ThreadView(
            "continue",
            key,
            thread,
            original,
            given,
            held=held,
            n=len(held.sent_messages),
            fields=held.sent_fields,
        )

    def project(self, view: ThreadView, result: dict[str, Any]) -> dict[str, Any]:
        """A stage's output with the thread's history and ``system``/``tools`` as the API holds them.

        Raises :class:`ThreadProblem` when that cannot be done without breaking the request (a stage
        that dropped or added messages within the history, or changed ``system``/``tools`` other than
        their breakpoints).
        """
        if view.kind != "continue" or view.held is None:
            return result
        out = dict(result)
        for k in CREATE_ONLY:
            if out.get(k) is view.fields.get(k):
                continue
            if strip_cache_control(out.get(k)) != strip_cache_control(view.fields.get(k)):
                raise ThreadProblem(f"thread: a continue keeps the create's {k}")
            if k in view.fields:
                out[k] = view.fields[k]
            else:
                out.pop(k, None)
        msgs, given = out.get("messages"), view.given["messages"]
        if not isinstance(msgs, list) or len(msgs) <= view.n:
            raise ThreadProblem("thread: the new messages were dropped")
        history = given[: view.n]
        if len(msgs) != len(given) and any(a != b for a, b in zip(msgs[: view.n], history, strict=True)):
            raise ThreadProblem("thread: messages the API holds were added or removed")
        if any(a is not b for a, b in zip(msgs[: view.n], history, strict=True)):
            out["messages"] = [*history, *msgs[view.n :]]
        return out

    def wire(self, view: ThreadView, final: dict[str, Any]) -> dict[str, Any]:
        """What is sent for a transformed continue: its fields, the new messages, no system/tools."""
        out = {k: v for k, v in final.items() if k not in CREATE_ONLY}
        out["messages"] = final["messages"][view.n :]
        out["thread"] = view.thread
        return out

    def commit(
        self,
        view: ThreadView,
        final: dict[str, Any],
        reply: dict[str, Any],
        answer: dict[str, Any] | None,
        now: float,
    ) -> None:
        """Keep the thread at ``reply`` (its id): ``final`` the conversation sent (the stages' last view),
        ``answer`` what the caller was handed for it (None: a plugin-tool round goes on)."""
        rid = reply.get("id")
        if view.opaque or not isinstance(rid, str) or not isinstance(final.get("messages"), list):
            return
        content: list[Any] = reply["content"] if isinstance(reply.get("content"), list) else []
        said = {"role": "assistant", "content": thaw(content)}
        held = view.held
        if held is None:  # a create
            sent_fields = {k: thaw(final[k]) for k in CREATE_ONLY if k in final}
            orig_fields = {k: thaw(view.original[k]) for k in CREATE_ONLY if k in view.original}
            sent_new, sent_base = final["messages"], []
            orig_new, orig_base = view.original["messages"], []
            grown = _size([sent_fields, orig_fields])
        else:
            sent_fields, orig_fields = held.sent_fields, held.orig_fields
            sent_base, sent_new = held.sent_messages, final["messages"][view.n :]
            orig_base = held.orig_messages
            orig_new = [] if held.pending else view.original["messages"][len(held.orig_messages) :]
            grown = held.nbytes
        sent_add = [thaw(strip_cache_control(m)) for m in sent_new]
        orig_add = [thaw(strip_cache_control(m)) for m in orig_new]
        if answer is not None:
            orig_add.append({"role": "assistant", "content": thaw(answer.get("content") or [])})
        grown += _size([sent_add, orig_add, said])
        entry = Held(
            orig_fields=orig_fields,
            orig_messages=[*orig_base, *orig_add],
            sent_fields=sent_fields,
            sent_messages=[*sent_base, *sent_add, said],
            pending=answer is None,
            unanswered=_unseen(content, answer),
            nbytes=grown,
            last_used=now,
        )
        prev = view.thread.get("previous_message_id")
        if self.shared is not None:
            self._push(
                view.key,
                prev if held is not None and isinstance(prev, str) else None,
                rid,
                entry if entry.nbytes <= self.max_bytes else None,
            )
        with self._lock:
            if held is not None and isinstance(prev, str):
                old = self._held.pop((view.key, prev), None)
                if old is not None:
                    self._bytes -= old.nbytes
            if entry.nbytes > self.max_bytes:
                return  # too big to keep: its continues go untransformed
            self._held[(view.key, rid)] = entry
            self._bytes += entry.nbytes
            while self._bytes > self.max_bytes and self._held:
                _, gone = self._held.popitem(last=False)
                self._bytes -= gone.nbytes

    def _pull(self, key: str, rid: str, now: float) -> Held | None:
        """The thread another replica kept at ``rid``, kept here too; None when there is none."""
        assert self.shared is not None
        doc = self.shared(key).load(rid, now=now)
        raw = doc.get("d") if doc is not None else None
        try:
            got = orjson.loads(raw) if isinstance(raw, str) else None
            held = Held(**{f.name: got[f.name] for f in fields(Held)}) if isinstance(got, dict) else None
        except (ValueError, KeyError, TypeError):
            held = None
        if held is None:
            return None
        held.last_used = now
        with self._lock:
            old = self._held.pop((key, rid), None)
            if old is not None:
                self._bytes -= old.nbytes
            self._held[(key, rid)] = held
            self._bytes += held.nbytes
        return held

    def _push(self, key: str, prev: str | None, rid: str, entry: Held | None) -> None:
        assert self.shared is not None
        space = self.shared(key)
        if entry is not None:
            space.save(rid, {"d": orjson.dumps(entry).decode()}, ttl=self.keep_seconds, now=entry.last_used)
        if prev is not None:
            space.delete(prev)

    def _purge(self, now: float) -> None:
        for k in [k for k, h in self._held.items() if now - h.last_used > self.keep_seconds]:
            self._bytes -= self._held.pop(k).nbytes


def _unseen(content: list[Any], answer: dict[str, Any] | None) -> list[str]:
    """Plugin tool_use ids in a reply that the answer handed to the caller left out."""
    if answer is None:
        return []
    seen = set(_plugin_tool_ids(answer.get("content")))
    return [i for i in _plugin_tool_ids(content) if i not in seen]


def _answer_unseen(new: list[Any], ids: list[str]) -> list[Any]:
    """The new messages with a tool_result for each plugin tool call the caller never saw (the API needs
    one for every tool_use of the reply it holds), at the front of the first user message."""
    if not ids or not new or not isinstance(new[0], dict) or new[0].get("role") != "user":
        return new
    first = new[0]
    content = first.get("content")
    blocks = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
    answered = {
        b.get("tool_use_id") for b in blocks if isinstance(b, dict) and b.get("type") == "tool_result"
    }
    results = [
        {"type": "tool_result", "tool_use_id": i, "content": UNANSWERED} for i in ids if i not in answered
    ]
    if not results:
        return new
    return [{**first, "content": [*results, *blocks]}, *new[1:]]
