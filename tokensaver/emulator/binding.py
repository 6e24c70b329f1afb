"""Preserved thinking: the prefix check ("conversation check") on ``thinking`` / ``redacted_thinking`` blocks.

On the models with preserved thinking (:func:`tokensaver.model_rules.prefix_check_enforcement`) a thinking
block sent back is bound to its prefix: the top-level ``system``, the set of ``tools`` and every message
before it. If that prefix changed since the block was produced, that block (and the rest of its turn's
consecutive thinking blocks) fails; since every thinking block already after an edit has the edit in its
own prefix, an edit fails "that block and every later thinking block" (docs: build-with-claude/
preserved-thinking, .../prefix-checks). The emulator cannot verify real signatures, so it binds at first
sight: the first time it sees a signature (per API key) it records the block's prefix digest; the blocks
it generates in its own replies are bound to the request they answer.

What the digest covers (the docs' "What counts as an edit"): ``system`` (a string is one text block),
``tools`` as a set (sorted by name; a ``defer_loading`` tool no ``tool_reference`` before the block names is
left out: a later load changes no earlier block's prefix),
the messages before the block and the blocks before it in its own message. Left out: ``cache_control``
markers everywhere, thinking blocks (not part of the prefix), ``None`` values (null is absent), JSON key
order and formatting. Everything else, whitespace inside strings included, is a change.

"Left out or moved": each block also records the thinking blocks the model saw before it (8-byte digests
of their signatures, oldest first). The thinking blocks kept before a block in a later request must be a
suffix of that record: removing a leading run (oldest first), a trailing run or all is fine; a gap, a
reordering, or putting back a block removed earlier fails.

Memory is bounded: :class:`BindingStore` is an LRU of bindings with a byte cap (an evicted signature is
bound again at its next sight, as if new).
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..billing import THINKING_TYPES
from ..model_rules import reads_thinking_of

BINDING_BETA = "thinking-binding-controls-2026-08-01"
DEFAULT_MAX_BYTES = 8 << 20
_ENTRY_OVERHEAD = 96  # a rough per-entry cost (key tuple, dataclass, dict slot) on top of the strings

# the 400 the API answers (preserved-thinking page, "What the API does with an invalid block")
MISMATCH_MESSAGE = (
    "{path}: Invalid `signature` in `thinking` block. The block is bound to a different conversation. "
    'Remove the block, or set `thinking.block_binding.prefix_mismatch_behavior` to "drop_block".'
)
NO_BETA_SUFFIX = f" That setting requires the `{BINDING_BETA}` value in the `anthropic-beta` header."


@dataclass(frozen=True, slots=True)
class Binding:
    """What a signature was bound to: its prefix digest, the kept thinking blocks before it, system and tools,
    and the model that wrote it ("" when the emulator first saw it in a request: the writer is unknown)."""

    prefix: bytes
    preds: bytes
    system: bytes
    tools: bytes
    model: str = ""

    @property
    def size(self) -> int:
        return len(self.prefix) + len(self.preds) + len(self.system) + len(self.tools) + len(self.model)


class BindingStore:
    """Bindings per (API key, signature): an LRU capped at ``max_bytes`` (approximate accounting)."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str], Binding] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes

    def get(self, key: str, sig: str) -> Binding | None:
        with self._lock:
            b = self._entries.get((key, sig))
            if b is not None:
                self._entries.move_to_end((key, sig))
            return b

    def put(self, key: str, sig: str, binding: Binding) -> None:
        cost = len(key) + len(sig) + binding.size + _ENTRY_OVERHEAD
        with self._lock:
            old = self._entries.pop((key, sig), None)
            if old is not None:
                self._bytes -= len(key) + len(sig) + old.size + _ENTRY_OVERHEAD
            if cost > self.max_bytes:
                return
            self._entries[(key, sig)] = binding
            self._bytes += cost
            while self._bytes > self.max_bytes and self._entries:
                (k, s), b = self._entries.popitem(last=False)
                self._bytes -= len(k) + len(s) + b.size + _ENTRY_OVERHEAD

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


# --- the digests ------------------------------------------------------------------------------------


def _canon(obj: Any) -> bytes:
    """Canonical JSON: sorted keys, no whitespace (JSON formatting and key order are not part of the prefix)."""
    try:
        return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # a key or value orjson does not take: the slow path, same canonical form
        return json.dumps(
            obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
        ).encode()


def _strip(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != "cache_control" and v is not None}


def _norm_block(b: Any) -> Any:
    if not isinstance(b, dict):
        return b
    out = _strip(b)
    inner = out.get("content")
    if out.get("type") == "tool_result":
        if isinstance(inner, str):
            out["content"] = [{"type": "text", "text": inner}]
        elif isinstance(inner, list):
            out["content"] = [_norm_block(x) for x in inner]
    return out


def _norm_content(content: Any) -> list[Any]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        return content
    return []


def is_thinking(b: Any) -> bool:
    return isinstance(b, dict) and b.get("type") in THINKING_TYPES


def signature_of(b: dict[str, Any]) -> str:
    """The identity of a thinking block: its ``signature`` (``data`` for ``redacted_thinking``)."""
    sig = b.get("signature") if b.get("type") == "thinking" else b.get("data")
    return sig if isinstance(sig, str) else ""


def _sig_digest(sig: str) -> bytes:
    return hashlib.blake2b(sig.encode(), digest_size=8).digest()


def _referenced_tools(block: Any) -> set[str]:
    """Tool names the ``tool_reference`` blocks inside ``block`` name: ``tool_name`` in a ``tool_result``'s
    content and a ``tool_search_tool_result``'s ``tool_references``; ``name`` in a ``tool_addition``."""
    names: set[str] = set()

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            if x.get("type") == "tool_reference":
                name = x.get("tool_name", x.get("name"))
                if isinstance(name, str):
                    names.add(name)
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(block)
    return names


def _system_digest(body: dict[str, Any]) -> bytes:
    system = body.get("system")
    blocks = [_norm_block(b) for b in _norm_content(system)] if system is not None else []
    return hashlib.blake2b(_canon(blocks), digest_size=8).digest()


class _Tools:
    """The set of ``tools`` a block sees: every tool but the ``defer_loading`` ones no ``tool_reference``
    before it names (a load is seen by the blocks after it, never by those before)."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
        self.deferred = {t.get("name") for t in self.tools if t.get("defer_loading")}
        self.loaded: set[Any] = set()
        self.digest = self._digest()

    def _digest(self) -> bytes:
        tools = [t for t in self.tools if not t.get("defer_loading") or t.get("name") in self.loaded]
        normed = sorted((_strip(t) for t in tools), key=lambda t: (str(t.get("name")), _canon(t)))
        return hashlib.blake2b(_canon(normed), digest_size=8).digest()

    def see(self, block: Any) -> None:
        """A block of the prefix: the deferred tools it references are loaded from here on."""
        if self.deferred and isinstance(block, dict | list):
            new = (_referenced_tools(block) & self.deferred) - self.loaded
            if new:
                self.loaded |= new
                self.digest = self._digest()

    def restart(self) -> None:
        """A compaction block: the prefix starts again there, and so do the loads."""
        if self.loaded:
            self.loaded = set()
            self.digest = self._digest()

    def copy(self) -> _Tools:
        out = copy.copy(self)
        out.loaded = set(self.loaded)
        return out


def _slot_prefix(h: hashlib.blake2b, tools: bytes) -> bytes:
    """A thinking block's prefix digest: the messages before it and the tools it sees."""
    out = h.copy()
    out.update(b"\x00T" + tools)
    return out.digest()


@dataclass
class Slot:
    """One thinking block of a request: where it is, its signature, its prefix digest and that of the
    tools it sees."""

    mi: int
    bi: int
    sig: str
    prefix: bytes
    tools: bytes = b""

    @property
    def path(self) -> str:
        return f"messages.{self.mi}.content.{self.bi}"


@dataclass
class Scan:
    """The thinking blocks of a request with their prefix digests, and the running hash past the last message."""

    system: bytes
    tools: bytes  # the tools the first message sees (no deferred tool loaded yet)
    slots: list[Slot] = field(default_factory=list)
    tail: Any = None  # a blake2b over system and every message (thinking blocks left out)
    seen: _Tools | None = None  # the tools the blocks after the last message see


def scan(body: dict[str, Any]) -> Scan:
    """Every thinking block of ``body['messages']`` with the digest of its prefix."""
    raw = body.get("messages")
    messages: list[Any] = raw if isinstance(raw, list) else []
    tools = _Tools(body)
    sd = _system_digest(body)
    h = hashlib.blake2b(digest_size=16)
    h.update(sd)
    out = Scan(sd, tools.digest)
    # server-side compaction: the checked prefix starts at the most recent compaction block before a block
    for mi, msg in enumerate(messages):
        if not isinstance(msg, dict):
            continue
        head = _canon(_strip({k: v for k, v in msg.items() if k != "content"}))
        blocks = _norm_content(msg.get("content"))
        inner = h.copy()
        inner.update(b"\x00M" + head)
        for bi, b in enumerate(blocks):
            if isinstance(b, dict) and b.get("type") == "compaction":
                inner = hashlib.blake2b(digest_size=16)
                inner.update(sd + b"\x00C")
                tools.restart()
            if is_thinking(b):
                out.slots.append(
                    Slot(mi, bi, signature_of(b), _slot_prefix(inner, tools.digest), tools.digest)
                )
                continue
            inner.update(b"\x00B" + _canon(_norm_block(b)))
            tools.see(b)
        h = inner
    out.tail = h
    out.seen = tools
    return out


def reply_slots(sc: Scan, reply: dict[str, Any]) -> list[Slot]:
    """The thinking blocks of a reply (the assistant message appended after the request's messages)."""
    h = sc.tail.copy()
    tools = sc.seen.copy() if sc.seen is not None else None
    head = {k: v for k, v in reply.items() if k == "role"}
    h.update(b"\x00M" + _canon(head))
    slots: list[Slot] = []
    for bi, b in enumerate(reply.get("content") or []):
        if isinstance(b, dict) and b.get("type") == "compaction":
            h = hashlib.blake2b(digest_size=16)
            h.update(sc.system + b"\x00C")
            if tools is not None:
                tools.restart()
        td = tools.digest if tools is not None else sc.tools
        if is_thinking(b):
            slots.append(Slot(-1, bi, signature_of(b), _slot_prefix(h, td), td))
            continue
        h.update(b"\x00B" + _canon(_norm_block(b)))
        if tools is not None:
            tools.see(b)
    return slots


# --- the check ----------------------------------------------------------------------------------------


@dataclass
class Verdict:
    """The outcome of the check on one request."""

    failed: list[Slot]  # in request order; the first one is the block a 400 names
    new: list[tuple[Slot, bytes]]  # first-seen blocks with the chain to bind them with
    chain: bytes  # the kept (not failed) thinking blocks, for the reply's blocks
    reasons: list[str]  # what changed, per the first failing block (the 400's last sentence)


def unreadable(store: BindingStore, key: str, body: dict[str, Any], model: str) -> list[Slot]:
    """The thinking blocks ``model`` cannot read (the model check): blocks the emulator wrote in a reply of a
    model whose thinking ``model`` does not read (:func:`tokensaver.model_rules.reads_thinking_of`)."""
    out: list[Slot] = []
    messages = body.get("messages")
    for mi, msg in enumerate(messages if isinstance(messages, list) else []):
        content = msg.get("content") if isinstance(msg, dict) else None
        if not isinstance(content, list):
            continue
        for bi, b in enumerate(content):
            if not is_thinking(b):
                continue
            sig = signature_of(b)
            bound = store.get(key, sig) if sig else None
            if bound is not None and bound.model and not reads_thinking_of(model, bound.model):
                out.append(Slot(mi, bi, sig, b""))
    return out


def check(store: BindingStore, key: str, sc: Scan, skip: frozenset[tuple[int, int]] = frozenset()) -> Verdict:
    """Which thinking blocks of a scanned request fail their binding (nothing is stored: see :func:`bind`).
    ``skip``: blocks the model check drops: not checked, but part of the chain (they were sent; the model
    that wrote a later block saw them as sent, and a reader that can read them gets them back)."""
    failed: list[Slot] = []
    new: list[tuple[Slot, bytes]] = []
    reasons: list[str] = []
    kept = b""
    cascade: tuple[int, int] | None = None  # (message, next block index) of a failing run
    for s in sc.slots:
        if (s.mi, s.bi) in skip:
            kept += _sig_digest(s.sig)
            continue
        if cascade == (s.mi, s.bi):
            failed.append(s)
            cascade = (s.mi, s.bi + 1)
            continue
        cascade = None
        bound = store.get(key, s.sig) if s.sig else None
        if bound is None:
            new.append((s, kept))
            kept += _sig_digest(s.sig)
            continue
        if bound.prefix == s.prefix and bound.preds.endswith(kept):
            kept += _sig_digest(s.sig)
            continue
        if not failed:
            if bound.system != sc.system:
                reasons.append("The `system` prompt differs from when the block was created.")
            if bound.tools != s.tools:
                reasons.append("The `tools` list differs from when the block was created.")
            if not reasons and bound.prefix == s.prefix:
                reasons.append("A thinking block before it was left out or moved.")
        failed.append(s)
        cascade = (s.mi, s.bi + 1)
    return Verdict(failed, new, kept, reasons)


def bind(
    store: BindingStore, key: str, sc: Scan, verdict: Verdict, reply: dict[str, Any] | None, model: str = ""
) -> None:
    """Record the request's first-seen blocks and the blocks of the emulator's own reply (written by ``model``)."""
    for s, preds in verdict.new:
        if s.sig:
            store.put(key, s.sig, Binding(s.prefix, preds, sc.system, s.tools))
    if reply is None:
        return
    chain = verdict.chain
    for s in reply_slots(sc, reply):
        if s.sig:
            store.put(key, s.sig, Binding(s.prefix, chain, sc.system, s.tools, model))
            chain += _sig_digest(s.sig)


def without(body: dict[str, Any], slots: list[Slot]) -> dict[str, Any]:
    """``body`` with the blocks at ``slots`` removed (messages copied where touched; the rest shared)."""
    drop: dict[int, set[int]] = {}
    for s in slots:
        drop.setdefault(s.mi, set()).add(s.bi)
    messages = list(body["messages"])
    for mi, idx in drop.items():
        msg = dict(messages[mi])
        msg["content"] = [b for bi, b in enumerate(_norm_content(msg.get("content"))) if bi not in idx]
        messages[mi] = msg
    return {**body, "messages": messages}


def transformations(
    slots: list[Slot], kind: str, reason: str = "prefix_binding_mismatch"
) -> list[dict[str, str]]:
    """``input_transformations`` entries (``thinking_dropped`` / ``thinking_mismatch_allowed``)."""
    return [{"type": kind, "path": s.path, "reason": reason} for s in slots]
