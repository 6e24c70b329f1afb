"""The API's prompt-cache billing rules, in one place, with no I/O.

Used by the emulator (what it bills), the pipeline (what the caller's own requests would have been
billed: the counterfactual behind "saved", and each stage's dollars) and, through the emulator, the
bench. ``CacheModel().bill(body, now)`` returns a :class:`Billing` and updates the model's entries.

* The prompt is the ordered sequence of blocks: each tool definition, each system block, then each
  message's content blocks (a string is one block). The first block of a message also carries the
  per-message framing tokens, so the billed total equals ``TokenCounter.request(body)`` for bodies
  whose tool definitions carry no ``cache_control``.
* Some request settings change no block but still invalidate cache levels, per the docs' "What
  invalidates the cache" table: ``speed`` invalidates the system and messages levels; ``tool_choice``,
  the thinking settings (enable/disable, budget) and whether the prompt contains any image invalidate
  the messages level only. They are mixed into the prefix hash where their level starts.
* Breakpoints are blocks with ``cache_control`` plus, in automatic mode (top-level ``cache_control``),
  the last cacheable block; at most 4. Entries are keyed by (model, hash of the prefix up to the block).
* A request reads the longest cached prefix found at a breakpoint or up to 20 blocks before one
  (the lookback), refreshing that entry's TTL; it writes the tokens after the hit up to the last
  breakpoint whose prefix reaches the model's minimum cacheable length, split 5m / 1h by the TTL of the
  breakpoint that covers them, and stores an entry at each such breakpoint.
* ``context_management`` ``clear_tool_uses_20250919`` edits are applied before billing
  (:func:`apply_context_management`), as the API bills the edited prompt.

Cost: each block's content digest (orjson, xxh3-128: :func:`tokensaver.tokens.fast_digest`) and token count are computed once per
``memo`` (pass the same dict to several ``bill`` calls over bodies that share block objects, as the
pipeline's stages do) and token counts are kept by digest across calls; the prefix hashes chain those
digests, so billing a body is one digest pass plus O(blocks).
"""

from __future__ import annotations

import copy
import threading
from array import array
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import xxhash

from .pricing import ModelInfo, PriceTable
from .tokens import (
    MESSAGE_OVERHEAD,
    TokenCounter,
    canonical_json,
    default_counter,
    fast_digest,
    memo_enabled,
    strip_block_cache_control,
)

__all__ = [
    "LOOKBACK",
    "MAX_BREAKPOINTS",
    "TTL_SECONDS",
    "Billing",
    "CacheModel",
    "PromptBlock",
    "apply_context_management",
    "block_cacheable",
    "block_facts",
    "breakpoints",
    "deferred_tokens",
    "prefix_hashes",
    "price",
    "prompt_blocks",
    "tool_references",
]

LOOKBACK = 20
MAX_BREAKPOINTS = 4
TTL_SECONDS = {"5m": 300.0, "1h": 3600.0}
THINKING_TYPES = ("thinking", "redacted_thinking")
CLEARED_PLACEHOLDER = "[cleared to save context]"
AUTO: dict[str, Any] = {"type": "ephemeral"}
_xxh = xxhash.xxh3_128_digest
MAX_KEPT_BYTES = 16 * 1024 * 1024  # what ShadowCaches keeps of previous requests, all conversations

Memo = dict[int, tuple[Any, bytes, int, bool]]  # id(block) -> (block kept alive, digest, tokens, image)


# -- the prompt as a block sequence ---------------------------------------------------------------


@dataclass(slots=True)
class PromptBlock:
    where: tuple[str, int, int]  # ("tools", 3, 0), ("system", 0, 0), ("messages", 2, 1): message 2, block 1
    block: Any
    tokens: int
    tag: str  # section / role / message-start marker that goes into the prefix hash
    cacheable: bool
    cache_control: dict[str, Any] | None
    digest: bytes = b""  # fast_digest of the block without its cache_control
    image: bool = False  # the block is or contains an image
    loads: bool = False  # it holds tool_reference blocks billed as their deferred tools' definitions


class _Digests:
    """Token counts (and whether there is an image) by content digest, shared across calls (bounded:
    ``max_entries`` of about 150 bytes each, the oldest dropped first)."""

    def __init__(self, max_entries: int = 50_000) -> None:
        self.facts: dict[bytes, tuple[int, bool]] = {}
        self.max = max_entries
        self.lock = threading.Lock()

    def get(self, block: Any, counter: TokenCounter) -> tuple[bytes, int, bool]:
        # a string content (or system) is shorthand for one text block: the API caches the two
        # forms as the same prompt (Claude Code sends its environment message as a block on its
        # first call and as a string after), so they get one digest (their counts are equal)
        stripped = (
            {"type": "text", "text": block} if isinstance(block, str) else strip_block_cache_control(block)
        )
        digest = fast_digest(stripped)
        on = memo_enabled()
        if on:
            known = self.facts.get(digest)  # a dict read needs no lock
            if known is not None:
                return digest, known[0], known[1]
        facts = (counter.block(stripped), _has_image(stripped))
        if on:
            with self.lock:
                table = self.facts
                table[digest] = facts
                while len(table) > self.max:
                    del table[next(iter(table))]
        return digest, facts[0], facts[1]


_DIGESTS = _Digests()


def block_facts(block: Any) -> tuple[bytes, int, bool]:
    """A block's content digest (cache_control aside), its tokens and whether it holds an image.

    Kept per digest in a bounded table (50,000 entries, about 8 MB at most) across calls.
    """
    return _DIGESTS.get(block, default_counter())


def prompt_blocks(
    body: dict[str, Any],
    memo: Memo | None = None,
    like: list[PromptBlock] | None = None,
    made: dict[int, PromptBlock] | None = None,
) -> list[PromptBlock]:
    """The request as the ordered block sequence the prompt cache sees.

    :param memo: per-block digests and counts by object identity, reused by later calls given the
        same dict (bodies that share block objects, e.g. a request before and after each stage).
    :param like: the blocks of a similar body (the previous call of the conversation, the body
        before a stage): a block equal to the one at the same place there takes its digest and count
        (an equality test, not a serialization).
    :param made: the PromptBlocks made for earlier bodies of the same call, by block identity
        (and tag: a block that comes again under another tag is made again), reused as they are
        (their ``where`` is the place in the body they were made for).
    """
    counter = default_counter()
    out: list[PromptBlock] = []
    memo = {} if memo is None else memo
    seen_of = memo.get

    def add(where: tuple[str, int, int], block: Any, tag: str, extra: int = 0) -> None:
        if made is not None:
            known = made.get(id(block))
            if known is not None and known.block is block and known.tag == tag:
                out.append(known)
                return
        make(where, block, tag, extra)

    def make(where: tuple[str, int, int], block: Any, tag: str, extra: int) -> None:
        if isinstance(block, dict):
            cc = block.get("cache_control")
            kind = block.get("type")
            if kind == "text":
                text = block.get("text", "")
                text = text if isinstance(text, str) else str(text)
                cacheable = not (not text or text.isspace())  # (``text.strip()``, without the copy)
            else:
                cacheable = kind not in THINKING_TYPES
        else:
            cc = None
            cacheable = not (isinstance(block, str) and not block)
        seen = seen_of(id(block))
        i = len(out)
        if seen is not None and seen[0] is block:
            digest, tokens, image = seen[1], seen[2], seen[3]
        elif (
            like is not None
            and i < len(like)
            and like[i].tag == tag
            and not like[i].loads
            and like[i].block == block
        ):
            prev = like[i]
            out.append(PromptBlock(where, block, prev.tokens, tag, cacheable, cc, prev.digest, prev.image))
            # (same tag, same framing: a message's first block carries it, the memo keeps the block's own)
            memo[id(block)] = (block, prev.digest, prev.tokens - extra, prev.image)
            if made is not None:
                made[id(block)] = out[-1]
            return
        else:
            digest, tokens, image = _DIGESTS.get(block, counter)
            memo[id(block)] = (block, digest, tokens, image)
        made_block = PromptBlock(where, block, tokens + extra, tag, cacheable, cc, digest, image)
        out.append(made_block)
        if made is not None:
            made[id(block)] = made_block

    tools = body.get("tools") or []
    loads = _Loads.of(tools)
    for i, tool in enumerate(tools):
        if loads is not None and _deferred(tool):
            continue  # not part of the prompt until a tool_reference names it
        add(("tools", i, 0), tool, "tools")
    system = body.get("system")
    if isinstance(system, str):
        if system:
            add(("system", 0, 0), system, "system")
    elif isinstance(system, list):
        for i, b in enumerate(system):
            add(("system", i, 0), b, "system")
    known = (made if made is not None else {}).get
    append = out.append
    for mi, msg in enumerate(body.get("messages") or []):
        role = msg.get("role")
        tags = _ROLE_TAGS.get(role) if isinstance(role, str) else None
        if tags is None:
            tags = _role_tags(str(role))
        start, cont = tags
        content = msg.get("content")
        blocks = (content,) if isinstance(content, str) else content or ()
        tag = start
        for bi, b in enumerate(blocks):
            if (
                loads is not None
                and type(b) is dict
                and b.get("type") in _LOADERS
                and (names := tool_references(b)) is not None
            ):
                seen = seen_of(id(b))
                if seen is not None and seen[0] is b:
                    raw = seen[1]
                else:
                    raw, n, img = _DIGESTS.get(b, counter)
                    memo[id(b)] = (b, raw, n, img)
                facts = loads.block(b, names, raw)
                if facts is not None:  # (never taken from ``made`` or ``like``: it depends on the tools)
                    assert isinstance(b, dict)
                    append(
                        PromptBlock(
                            ("messages", mi, bi),
                            b,
                            facts[1] + (0 if bi else MESSAGE_OVERHEAD),
                            tag,
                            block_cacheable(b),
                            b.get("cache_control"),
                            facts[0],
                            facts[2],
                            True,
                        )
                    )
                    tag = cont
                    continue
            p = known(id(b))
            if p is not None and p.block is b and p.tag == tag:
                append(p)  # (inlined: the common case, a block this call has seen)
            elif (seen := seen_of(id(b))) is not None and seen[0] is b and isinstance(b, dict):
                # (inlined, as _make_known: a dict block whose facts the call has, as each block the
                # caller sent: the pipeline digested them first)
                cacheable = block_cacheable(b)
                p = PromptBlock(
                    ("messages", mi, bi),
                    b,
                    seen[2] + (0 if bi else MESSAGE_OVERHEAD),
                    tag,
                    cacheable,
                    b.get("cache_control"),
                    seen[1],
                    seen[3],
                )
                append(p)
                if made is not None:
                    made[id(b)] = p
            else:
                make(("messages", mi, bi), b, tag, 0 if bi else MESSAGE_OVERHEAD)
            tag = cont
    return out


# -- deferred tools (``defer_loading``) and the tool_reference blocks that load them ----------------

_LOADERS = ("tool_result", "tool_search_tool_result")  # the blocks a tool_reference sits in


def tool_references(b: Any) -> list[str] | None:
    """The tools the ``tool_reference`` blocks of ``b`` name, in order (a ``tool_result``'s content, a
    ``tool_search_tool_result``'s ``tool_references``); None: it holds none."""
    if not isinstance(b, dict):
        return None
    kind = b.get("type")
    if kind == "tool_result":
        refs = b.get("content")
    elif kind == "tool_search_tool_result":
        inner = b.get("content")
        refs = inner.get("tool_references") if isinstance(inner, dict) else None
    else:
        return None
    if not isinstance(refs, list):
        return None
    names = [
        x["tool_name"]
        for x in refs
        if isinstance(x, dict) and x.get("type") == "tool_reference" and isinstance(x.get("tool_name"), str)
    ]
    return names or None


def _deferred(tool: Any) -> bool:
    """A tool with ``defer_loading: true`` (no part of the prompt, in a body with a deferred tool)."""
    return isinstance(tool, dict) and tool.get("defer_loading") is True


def _unloaded(b: dict[str, Any], loaded: set[str]) -> dict[str, Any]:
    """``b`` without its tool_reference blocks that name a tool of ``loaded``."""

    def keep(x: Any) -> bool:
        return not (
            isinstance(x, dict) and x.get("type") == "tool_reference" and x.get("tool_name") in loaded
        )

    if b.get("type") == "tool_result":
        return {**b, "content": [x for x in b["content"] if keep(x)]}
    inner = b["content"]
    return {**b, "content": {**inner, "tool_references": [x for x in inner["tool_references"] if keep(x)]}}


class _Loads:
    """A body's deferred tools, as the tool_reference blocks naming them are billed.

    A tool with ``defer_loading: true`` is not part of the prompt; a ``tool_reference`` that names it is
    expanded by the API into the tool's definition where the reference sits. So a block holding such
    references counts as itself without them plus each named definition (its tokens as a tool, without
    ``defer_loading`` and ``cache_control``), and its digest is its own with each definition's digest
    folded in: a changed deferred definition changes the prefix from its first reference on, never
    before it. A reference to a tool that is not deferred (or not in ``tools``) is billed as sent.
    Made per body; a definition's facts once per body, when first named.
    """

    __slots__ = ("facts", "tools")

    def __init__(self, tools: dict[str, dict[str, Any]]) -> None:
        self.tools = tools
        self.facts: dict[str, tuple[bytes, int, bool]] = {}

    @classmethod
    def of(cls, tools: Any) -> _Loads | None:
        """The deferred tools of a body's ``tools``; None when there are none (every other path is as before)."""
        deferred: dict[str, dict[str, Any]] | None = None
        for t in tools if isinstance(tools, list) else ():
            if _deferred(t) and isinstance(t.get("name"), str):
                if deferred is None:
                    deferred = {}
                deferred.setdefault(t["name"], t)
        return None if deferred is None else cls(deferred)

    def definition(self, name: str) -> tuple[bytes, int, bool] | None:
        facts = self.facts.get(name)
        if facts is None:
            tool = self.tools.get(name)
            if tool is None:
                return None
            shown = {k: v for k, v in tool.items() if k not in ("defer_loading", "cache_control")}
            facts = self.facts[name] = _DIGESTS.get(shown, default_counter())
        return facts

    def block(self, b: Any, names: list[str], raw: bytes) -> tuple[bytes, int, bool] | None:
        """(digest, tokens, image) of block ``b`` whose references name ``names`` (``raw``: its own
        digest); None when none of them names a deferred tool (the block is billed as sent)."""
        loaded = [(name, f) for name in names if (f := self.definition(name)) is not None]
        if not loaded:
            return None
        _, tokens, image = _DIGESTS.get(_unloaded(b, {name for name, _ in loaded}), default_counter())
        digest = b"r" + _xxh(raw + b"".join(f[0] for _, f in loaded))  # (17 bytes, as fast_digest's)
        return digest, tokens + sum(f[1] for _, f in loaded), image or any(f[2] for _, f in loaded)

    def part(self, part: _Message, content: Any) -> _Message:
        """``part`` (a message's, made without deferred tools) with its reference blocks as this body bills them."""
        if not isinstance(content, list):
            return part
        links, tokens = list(part.links), list(part.tokens)
        keys = bytearray(part.keys)
        image, changed = part.image, False
        for j in part.refs:
            b = content[j]
            names = tool_references(b)
            link = links[j]
            # (a link is tag, digest, b"\1"; a block's digest is fast_digest's 17 bytes)
            facts = self.block(b, names, link[-18:-1]) if names is not None else None
            if facts is None:
                continue
            tag = link[:-18]
            links[j] = tag + facts[0] + b"\1"
            keys[j * _KEY : (j + 1) * _KEY] = _xxh(tag + facts[0])
            tokens[j] = facts[1] + (0 if j else MESSAGE_OVERHEAD)
            image = image or facts[2]
            changed = True
        if not changed:
            return part
        return _Message(
            part.n, bytes(keys), tuple(links), tuple(tokens), part.last_cacheable, part.ttls, image, part.refs
        )


def deferred_tokens(body: dict[str, Any], sent: Callable[[Any], int] | None = None) -> int:
    """What the deferred-tool rule changes in a body's tokens counted as sent (each tool and block as
    itself: :meth:`TokenCounter.request <tokensaver.tokens.TokenCounter.request>`, the pipeline's
    figures), for them to equal :func:`prompt_blocks`' total: each deferred tool's tokens out, and each
    block holding tool_reference blocks that name a deferred tool counted as :class:`_Loads` bills it
    (itself without them, plus their definitions) instead of as itself.

    0 without a deferred tool, after one pass over ``tools``. ``sent``: a block's tokens as sent (the
    caller's own count, e.g. by identity in its memo); by default its count by content digest.
    """
    tools = body.get("tools")
    loads = _Loads.of(tools)
    if loads is None or not isinstance(tools, list):  # (a deferred tool is in a list)
        return 0
    if sent is None:
        sent = _as_sent
    delta = 0
    for t in tools:
        if _deferred(t):
            delta -= sent(t)
    for msg in body.get("messages") or ():
        content = msg.get("content") if isinstance(msg, dict) else None
        if not isinstance(content, (list, tuple)):
            continue  # (a string holds no reference)
        for b in content:
            # (as prompt_blocks takes them; a string content, the common tool_result, holds none)
            if (
                type(b) is dict
                and b.get("type") in _LOADERS
                and type(b.get("content")) is not str
                and (names := tool_references(b)) is not None
                and (facts := loads.block(b, names, b"")) is not None
            ):
                delta += facts[1] - sent(b)
    return delta


def _as_sent(block: Any) -> int:
    """A block's tokens as sent, by its content digest (:func:`block_facts`' count)."""
    return _DIGESTS.get(block, default_counter())[1]


_ROLE_TAGS: dict[str, tuple[str, str]] = {}


def _role_tags(role: str) -> tuple[str, str]:
    """A role's (first block, later block) tags, made once per role (at most 64 kept)."""
    tags = (role + ":start", role + ":cont")
    if len(_ROLE_TAGS) < 64:
        _ROLE_TAGS[role] = tags
    return tags


def _has_image(node: Any) -> bool:
    if isinstance(node, dict):
        return node.get("type") == "image" or any(_has_image(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_image(v) for v in node)
    return False


def level_salts(body: dict[str, Any] | None, blocks: list[PromptBlock] | None = None) -> tuple[bytes, bytes]:
    """Request settings that invalidate the system / messages cache levels without changing any block.

    Per the "What invalidates the cache" table of the prompt-caching docs: the speed setting
    invalidates the system and messages caches; ``tool_choice``, the thinking settings
    (enable/disable, budget) and the presence of images anywhere in the prompt invalidate only the
    messages cache. Values are taken as sent (an absent field and its default are not equated).
    Empty when nothing is set, so such requests hash exactly as before.
    """
    if not body:
        return b"", b""
    if blocks is not None:
        images = any(b.image for b in blocks if b.tag != "tools")
    else:
        images = _has_image([body.get("system"), body.get("messages")])
    return _salts(body, images)


def _salts(body: dict[str, Any], images: bool) -> tuple[bytes, bytes]:
    """:func:`level_salts` once whether the prompt holds an image is known."""
    if not body:
        return b"", b""
    system: dict[str, Any] = {}
    if body.get("speed") is not None:
        system["speed"] = body["speed"]
    messages: dict[str, Any] = {}
    if body.get("tool_choice") is not None:
        messages["tool_choice"] = body["tool_choice"]
    th = body.get("thinking")
    if isinstance(th, dict):
        messages["thinking"] = [th.get("type"), th.get("budget_tokens")]
    if images:
        messages["images"] = True
    return (
        canonical_json(system).encode() if system else b"",
        canonical_json(messages).encode() if messages else b"",
    )


def prefix_hashes(blocks: list[PromptBlock], body: dict[str, Any] | None = None) -> list[bytes]:
    """Running hash of the prefix ending at each block; ``body`` supplies the level settings.

    The system-level settings are mixed in before the first non-tool block and the messages-level
    settings before the first message block, so a change in them misses at that level and after it
    while the levels before it still hit.
    """
    return Prepared.of(body or {}, blocks=blocks).hashes


def block_cacheable(b: dict[str, Any]) -> bool:
    """A dict block a breakpoint can mark: not thinking, not an empty or blank text."""
    if b.get("type") == "text":
        text = b.get("text", "")
        text = text if isinstance(text, str) else str(text)
        return not (not text or text.isspace())
    return b.get("type") not in THINKING_TYPES


class _Prefixed:
    """A prepared body's running token sums: ``total`` is the whole prompt's."""

    prefix: Sequence[int]

    @property
    def total(self) -> int:
        return self.prefix[-1] if self.prefix else 0


@dataclass
class Prepared(_Prefixed):
    """A body as the cache sees it: its blocks, the prefix hash and token sum at each block."""

    blocks: list[PromptBlock]
    hashes: list[bytes]
    prefix: list[int]
    salts: tuple[bytes, bytes]
    keys: bytes | None = None  # ``_keys(blocks)``, once made

    @classmethod
    def of(
        cls,
        body: dict[str, Any],
        memo: Memo | None = None,
        *,
        like: Prepared | Kept | None = None,
        blocks: list[PromptBlock] | None = None,
        made: dict[int, PromptBlock] | None = None,
    ) -> Prepared:
        """Prepare ``body``; the hashes of a leading run of blocks it shares with ``like`` are reused."""
        if blocks is None:
            blocks = prompt_blocks(body, memo, like.blocks if isinstance(like, Prepared) else None, made)
        salts = level_salts(body, blocks)
        same = 0
        hashes: list[bytes] = []
        prefix: list[int] = []
        if isinstance(like, Prepared) and like.salts == salts:
            old = like.blocks
            n = min(len(old), len(blocks))
            same = _shared_run(old, blocks, n)
            while same < n and old[same].digest == blocks[same].digest and old[same].tag == blocks[same].tag:
                same += 1
            hashes, prefix = like.hashes[:same], like.prefix[:same]
        keys = None
        if isinstance(like, Kept) and like.salts == salts:
            keys = _keys(blocks)
            same = like.common(keys)
            hashes, prefix = like.head(same)
        _chain(blocks, salts, same, hashes, prefix)
        return cls(blocks, hashes, prefix, salts, keys)


def _shared_run(old: list[PromptBlock], new: list[PromptBlock], n: int) -> int:
    """A length of leading blocks equal in both (the same objects, mostly: a stage's body shares
    the blocks of the one before), found by binary search on list slices (compared in C)."""
    if old[:n] == new[:n]:
        return n
    lo, hi = 0, n  # old[:lo] == new[:lo], old[:hi] != new[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if old[lo:mid] == new[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


_KEY = 16  # bytes of a block key and of a prefix hash (xxh3-128)


def _keys(blocks: list[PromptBlock]) -> bytes:
    """Each block's place-independent key (its tag and digest), 16 bytes each, joined."""
    tb = _TAG_BYTES.get
    return b"".join([_xxh((tb(b.tag) or _tag_bytes(b.tag))[1] + b.digest) for b in blocks])


_TAG_BYTES: dict[str, tuple[int, bytes]] = {}  # tag -> (its cache level, its bytes in a hash)


def _tag_bytes(tag: str) -> tuple[int, bytes]:
    """A tag's level and its bytes in the prefix hash and the block key (at most 256 tags kept)."""
    facts = (_level(tag), tag.encode() + b"\0")
    if len(_TAG_BYTES) < 256:
        _TAG_BYTES[tag] = facts
    return facts


@dataclass
class Kept:
    """What is kept of a conversation's previous request to bill the next one: no block, 40 bytes a block.

    Per block its key (tag and content digest), the prefix hash and the prefix token sum, so the
    next request resumes the hash chain after the blocks it repeats.
    """

    keys: bytes
    hashes: bytes
    prefix: array[int]
    salts: tuple[bytes, bytes]

    @classmethod
    def of(cls, prepared: Prepared | Lite) -> Kept:
        if isinstance(prepared, Lite):
            return cls(prepared.keys, prepared.hashes.raw, array("q", prepared.prefix), prepared.salts)
        keys = prepared.keys if prepared.keys is not None else _keys(prepared.blocks)
        return cls(keys, b"".join(prepared.hashes), array("q", prepared.prefix), prepared.salts)

    @property
    def nbytes(self) -> int:
        return len(self.keys) + len(self.hashes) + 8 * len(self.prefix) + 200

    def common(self, keys: bytes) -> int:
        """How many leading blocks ``keys`` shares with the kept request (binary search on slices)."""
        return _common(keys, self.keys)

    def head(self, n: int) -> tuple[list[bytes], list[int]]:
        """The prefix hashes and token sums of the first ``n`` blocks."""
        h = self.hashes
        return [h[i * _KEY : (i + 1) * _KEY] for i in range(n)], list(self.prefix[:n])


def _common(keys: bytes, other: bytes) -> int:
    """How many leading 16-byte block keys two key strings share (binary search on slices)."""
    n = min(len(keys), len(other)) // _KEY
    if keys[: n * _KEY] == other[: n * _KEY]:
        return n
    lo, hi = 0, n  # keys[:lo] equal, keys[:hi] not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if keys[: mid * _KEY] == other[: mid * _KEY]:
            lo = mid
        else:
            hi = mid
    return lo


# -- a body prepared message by message --------------------------------------------------------------


@dataclass(slots=True)
class _Message:
    """One message as the cache sees it, without its blocks: what :func:`prompt_blocks` makes of it
    (each block's key, hash input, tokens, cacheable flag, cache_control ttl and image flag), a pure
    function of the message's content (kept across calls by the message's serialization digest)."""

    n: int
    keys: bytes  # each block's ``_keys`` key, joined
    links: tuple[bytes, ...]  # each block's part of the prefix hash: tag, digest, b"\1"
    tokens: tuple[int, ...]  # each block's tokens (the first one's with the message framing)
    last_cacheable: int  # the last cacheable block's place in the message (-1: none)
    ttls: tuple[tuple[int, str], ...]  # (place, ttl) of each block with a cache_control
    image: bool
    refs: tuple[int, ...] = ()  # the places of blocks holding tool_reference blocks (:class:`_Loads`)

    @property
    def nbytes(self) -> int:
        # (measured: ~130 bytes a block in its tuples and bytes objects, ~300 for the rest)
        return 300 + 130 * self.n


MAX_MESSAGES_BYTES = 16 * 1024 * 1024  # what _MESSAGE_PARTS keeps in all (each entry sized by nbytes)


class _MessageParts:
    """Each message's :class:`_Message` by its serialization digest, across calls (bounded by bytes)."""

    def __init__(self, max_bytes: int = MAX_MESSAGES_BYTES) -> None:
        self.data: dict[bytes, _Message] = {}
        self.max_bytes, self.nbytes = max_bytes, 0
        self.lock = threading.Lock()

    def put(self, key: bytes, part: _Message) -> None:
        with self.lock:
            data = self.data
            old = data.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            data[key] = part
            self.nbytes += part.nbytes
            while self.nbytes > self.max_bytes and data:
                self.nbytes -= data.pop(next(iter(data))).nbytes


_MESSAGE_PARTS = _MessageParts()


def _message_part(msg: Any, memo: Memo) -> _Message | None:
    """What :func:`prompt_blocks` makes of one message (None: not a message it takes this way)."""
    if not isinstance(msg, dict):
        return None
    role = msg.get("role")
    tags = _ROLE_TAGS.get(role) if isinstance(role, str) else None
    if tags is None:
        tags = _role_tags(str(role))
    content = msg.get("content")
    if isinstance(content, str):
        blocks: Any = (content,)
    elif isinstance(content, list):
        blocks = content
    elif not content:
        blocks = ()
    else:
        return None
    tb = _TAG_BYTES.get
    start = tb(tags[0]) or _tag_bytes(tags[0])
    cont = tb(tags[1]) or _tag_bytes(tags[1])
    seen_of = memo.get
    counter = default_counter()
    keys: list[bytes] = []
    links: list[bytes] = []
    tokens: list[int] = []
    ttls: list[tuple[int, str]] = []
    last = -1
    image = False
    refs: list[int] = []
    for bi, b in enumerate(blocks):
        tag = cont[1] if bi else start[1]
        seen = seen_of(id(b))
        if seen is not None and seen[0] is b:
            digest, n, img = seen[1], seen[2], seen[3]
        else:
            digest, n, img = _DIGESTS.get(b, counter)
            memo[id(b)] = (b, digest, n, img)
        if isinstance(b, dict):
            cc = b.get("cache_control")
            cacheable = block_cacheable(b)
            if cc:
                ttls.append((bi, str(cc.get("ttl", "5m"))))
            if b.get("type") in _LOADERS and tool_references(b) is not None:
                refs.append(bi)
        else:
            cacheable = not (isinstance(b, str) and not b)
        if cacheable:
            last = bi
        image = image or img
        keys.append(_xxh(tag + digest))
        links.append(tag + digest + b"\1")
        tokens.append(n if bi else n + MESSAGE_OVERHEAD)
    return _Message(
        len(tokens), b"".join(keys), tuple(links), tuple(tokens), last, tuple(ttls), image, tuple(refs)
    )


class _Hashes:
    """Prefix hashes held as one string, 16 bytes each (indexed as a list of them)."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def __getitem__(self, j: int) -> bytes:
        if j < 0:
            j += len(self.raw) // _KEY
        return self.raw[j * _KEY : (j + 1) * _KEY]

    def __len__(self) -> int:
        return len(self.raw) // _KEY


# a message's serialization digest by its identity (the message kept alive so its id is its own)
Named = dict[int, tuple[Any, bytes]]
Found = dict[int, tuple[Any, Any, _Message]]  # id(first block) -> (role, content, its _Message), one call


@dataclass
class Lite(_Prefixed):
    """A body as the cache sees it, prepared message by message (:class:`Prepared`'s figures): its
    tools and system blocks, each message's :class:`_Message`, the prefix hashes and token sums."""

    head: list[PromptBlock]
    parts: list[_Message]
    starts: list[int]  # each message's first block's place
    hashes: _Hashes
    prefix: array[int]
    salts: tuple[bytes, bytes]
    keys: bytes
    # the message list it was made from, when no deferred tool made its parts this body's own: the
    # next body of the call that holds the same message objects from the start takes those parts
    messages: list[Any] | None = None

    @classmethod
    def of(
        cls,
        body: dict[str, Any],
        memo: Memo,
        found: Found,
        *,
        like: Prepared | Lite | Kept | None = None,
        also: Kept | None = None,
        digests: list[bytes | None] | None = None,
        named: Named | None = None,
    ) -> Lite | None:
        """Prepare ``body`` (None: a message it does not take this way). ``digests``: each message's
        serialization digest (the pipeline's), to find its part made on an earlier call; ``found``:
        the parts of the call's earlier bodies by their first block's identity. The prefix hashes
        of the leading blocks it shares with ``like`` or ``also`` (the longer run) are theirs."""
        messages = body.get("messages") or []
        if not isinstance(messages, list) or (digests is not None and len(digests) != len(messages)):
            return None
        head = prompt_blocks({k: body[k] for k in ("tools", "system") if k in body}, memo)
        # (a part is made and kept without the deferred tools: what its references load is this body's)
        loads = _Loads.of(body.get("tools"))
        table, get = _MESSAGE_PARTS, _MESSAGE_PARTS.data.get
        parts: list[_Message] = []
        add = parts.append
        # a stage's body holds its input's message objects where it kept them: the leading run of
        # those (by identity: blocks are never edited) has the parts made for them already
        skip = 0
        if loads is None and isinstance(like, Lite) and like.messages is not None:
            was_messages, lim = like.messages, min(len(messages), len(like.messages))
            while skip < lim and messages[skip] is was_messages[skip]:
                skip += 1
            parts.extend(like.parts[:skip])
        for i in range(skip, len(messages)):
            m = messages[i]
            content = m.get("content") if isinstance(m, dict) else None
            first = content[0] if isinstance(content, list) and content else content
            was = found.get(id(first)) if first is not None else None
            if (
                was is not None
                and was[0] == m.get("role")
                and (was[1] is content or (isinstance(content, list) and was[1] == content))
            ):
                add(was[2] if loads is None or not was[2].refs else loads.part(was[2], content))
                continue
            if digests is not None:
                d = digests[i]
            else:
                seen = named.get(id(m)) if named is not None else None
                d = seen[1] if seen is not None and seen[0] is m else None
            part = get(d) if d is not None else None
            if part is None:
                part = _message_part(m, memo)
                if part is None:
                    return None
                if d is not None:
                    table.put(d, part)
            if first is not None:
                found[id(first)] = (m.get("role"), content, part)
            add(part if loads is None or not part.refs else loads.part(part, content))
        n_head = len(head)
        starts = [n_head]
        for part in parts:
            starts.append(starts[-1] + part.n)
        keys = _keys(head) + b"".join([part.keys for part in parts])
        images = any(b.image for b in head if b.tag != "tools") or any(part.image for part in parts)
        salts = _salts(body, images)
        same = 0
        raw, prefix = b"", array("q")
        for run in (like, also):
            if isinstance(run, Lite | Kept) and run.salts == salts:
                longer = _common(keys, run.keys)
                if longer > same:
                    same = longer
                    raw = (run.hashes.raw if isinstance(run, Lite) else run.hashes)[: same * _KEY]
                    prefix = run.prefix[:same]
        hashes = bytearray(raw)
        h = raw[-_KEY:] if same else b""
        total = prefix[-1] if same else 0
        level = (_level(head[same - 1].tag) if same <= n_head else 2) if same else 0
        more: list[int] = []
        push = more.append
        tb = _TAG_BYTES.get
        for b in head[same:]:
            at, tag = tb(b.tag) or _tag_bytes(b.tag)
            h = _xxh(h + _mix(salts, level, at) + tag + b.digest + b"\1")
            level = max(level, at)
            hashes += h
            total += b.tokens
            push(total)
        if len(starts) > 1 and same < starts[-1]:
            k = bisect_right(starts, max(same, n_head)) - 1
            j = max(same, n_head) - starts[k]
            if level < 2:
                mix = _mix(salts, level, 2)
                level = 2
            else:
                mix = b""
            for part in parts[k:]:
                links, tokens = part.links, part.tokens
                while j < part.n:
                    h = _xxh(h + mix + links[j]) if mix else _xxh(h + links[j])
                    mix = b""
                    hashes += h
                    total += tokens[j]
                    push(total)
                    j += 1
                j = 0
        prefix.extend(more)
        return cls(
            head,
            parts,
            starts,
            _Hashes(bytes(hashes)),
            prefix,
            salts,
            keys,
            messages if loads is None else None,
        )

    def breakpoints(self, body: dict[str, Any], auto_only: bool = False) -> list[tuple[int, str]]:
        """:func:`breakpoints` of the body."""
        head, parts, starts = self.head, self.parts, self.starts
        bps = [(i, str(b.cache_control.get("ttl", "5m"))) for i, b in enumerate(head) if b.cache_control]
        for k, part in enumerate(parts):
            if part.ttls:
                bps.extend((starts[k] + j, ttl) for j, ttl in part.ttls)
        auto = _auto(body, bps, auto_only)
        if auto is not None:
            last = next(
                (
                    starts[k] + parts[k].last_cacheable
                    for k in range(len(parts) - 1, -1, -1)
                    if parts[k].last_cacheable >= 0
                ),
                None,
            )
            if last is None:
                last = next((i for i in range(len(head) - 1, -1, -1) if head[i].cacheable), None)
            if last is not None and all(i != last for i, _ in bps):
                bps.append((last, str(auto.get("ttl", "5m"))))
        return sorted(bps)


def _mix(salts: tuple[bytes, bytes], level: int, at: int) -> bytes:
    """The level settings mixed into the prefix hash going from ``level`` to ``at`` (as :func:`_chain`)."""
    mix = b""
    while level < at:
        level += 1
        if salts[level - 1]:
            mix += b"\2" + salts[level - 1] + b"\3"
    return mix


def thaw(value: Any) -> Any:
    """A copy of JSON containers (dicts and lists) all the way down; strings and numbers shared."""
    if isinstance(value, dict):
        out = dict(value)  # (one C copy; then only the values that are containers are walked)
        for k, v in out.items():
            if isinstance(v, dict | list):
                out[k] = thaw(v)
        return out
    if isinstance(value, list):
        return [thaw(v) if isinstance(v, dict | list) else v for v in value]
    return value


def _chain(
    blocks: list[PromptBlock],
    salts: tuple[bytes, bytes],
    start: int,
    hashes: list[bytes],
    prefix: list[int],
) -> None:
    """Extend ``hashes`` / ``prefix`` from block ``start``: each prefix hash is the hash of the one
    before, the level settings mixed in where their level starts, the block's tag and digest."""
    h = hashes[-1] if start else b""
    level = _level(blocks[start - 1].tag) if start else 0  # how far the settings have been mixed in
    total = prefix[-1] if start else 0
    tb = _TAG_BYTES.get
    add_hash, add_prefix = hashes.append, prefix.append
    for b in blocks[start:]:
        at, tag = tb(b.tag) or _tag_bytes(b.tag)
        if level < at:
            mix = b""
            while level < at:
                level += 1
                if salts[level - 1]:
                    mix += b"\2" + salts[level - 1] + b"\3"
            h = _xxh(h + mix + tag + b.digest + b"\1")
        else:
            h = _xxh(h + tag + b.digest + b"\1")
        add_hash(h)
        total += b.tokens
        add_prefix(total)


def _level(tag: str) -> int:
    return 0 if tag == "tools" else 1 if tag == "system" else 2


def _auto(body: dict[str, Any], explicit: list[tuple[int, str]], auto_only: bool) -> dict[str, Any] | None:
    """The request's automatic-caching ``cache_control``, or None.

    ``auto_only`` is the reference request "with automatic caching": the caller's own request with the
    one top-level line any user can add. Its own breakpoints stay; a top-level 5m ``cache_control`` is
    added when it has none and the API would take it (its explicit breakpoints leave a slot of the
    4); else the request is as sent (a caller with 4 breakpoints of its own cannot add the line).
    """
    auto = body.get("cache_control")
    if auto is None and auto_only and len(explicit) < MAX_BREAKPOINTS:
        return AUTO
    return auto if isinstance(auto, dict) else None


def breakpoints(
    body: dict[str, Any], blocks: list[PromptBlock], *, auto_only: bool = False
) -> list[tuple[int, str]]:
    """(block index, ttl) of every breakpoint, explicit and automatic, in prompt order.

    :param auto_only: the request with the API's automatic caching added (see :func:`_auto`).
    """
    bps = [(i, str(b.cache_control.get("ttl", "5m"))) for i, b in enumerate(blocks) if b.cache_control]
    auto = _auto(body, bps, auto_only)
    if auto is not None:
        last = next((i for i in range(len(blocks) - 1, -1, -1) if blocks[i].cacheable), None)
        if last is not None and all(i != last for i, _ in bps):
            bps.append((last, str(auto.get("ttl", "5m"))))
    return sorted(bps)


# -- context management ---------------------------------------------------------------------------


def apply_context_management(body: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Apply ``clear_tool_uses_20250919`` edits; returns (edited body, applied_edits)."""
    cm = body.get("context_management")
    edits = cm.get("edits") if isinstance(cm, dict) else None
    if not edits:
        return body, []
    applied: list[dict[str, Any]] = []
    for edit in edits:
        if not isinstance(edit, dict) or edit.get("type") != "clear_tool_uses_20250919":
            continue
        before = sum(b.tokens for b in prompt_blocks(body))
        trigger = (edit.get("trigger") or {}).get("value", 100_000)
        if before <= trigger:
            continue
        keep = int((edit.get("keep") or {}).get("value", 3))
        exclude = set(edit.get("exclude_tools") or [])
        uses = [
            b["id"]
            for m in body["messages"]
            if m.get("role") == "assistant" and isinstance(m.get("content"), list)
            for b in m["content"]
            if isinstance(b, dict) and b.get("type") == "tool_use" and b.get("name") not in exclude
        ]
        targets = set(uses[: max(0, len(uses) - keep)])
        edited = copy.deepcopy(body)
        cleared = 0
        for m in edited["messages"]:
            if m.get("role") != "user" or not isinstance(m.get("content"), list):
                continue
            for b in m["content"]:
                if (
                    isinstance(b, dict)
                    and b.get("type") == "tool_result"
                    and b.get("tool_use_id") in targets
                    and b.get("content") != CLEARED_PLACEHOLDER
                ):
                    b["content"] = CLEARED_PLACEHOLDER
                    cleared += 1
        if not cleared:
            continue
        after = sum(b.tokens for b in prompt_blocks(edited))
        at_least = (edit.get("clear_at_least") or {}).get("value", 0)
        if before - after < at_least:
            continue
        body = edited
        applied.append(
            {
                "type": "clear_tool_uses_20250919",
                "cleared_tool_uses": cleared,
                "cleared_input_tokens": before - after,
            }
        )
    return body, applied


# -- billing ----------------------------------------------------------------------------------------


@dataclass
class Billing:
    """The input side of one request as the API bills it (tokens), and where it hit and wrote."""

    input_tokens: int
    cache_read: int
    write_5m: int
    write_1h: int
    total: int
    hit_at: int | None = None
    written_at: list[int] = field(default_factory=list)

    def usage(self, output_tokens: int) -> dict[str, Any]:
        """The ``usage`` object of a response with this billing."""
        return {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": self.write_5m + self.write_1h,
            "cache_read_input_tokens": self.cache_read,
            "cache_creation": {
                "ephemeral_5m_input_tokens": self.write_5m,
                "ephemeral_1h_input_tokens": self.write_1h,
            },
            "output_tokens": output_tokens,
            "service_tier": "standard",
        }


def price(billing: Billing, model: ModelInfo, scale: float = 1.0) -> float:
    """Input-side dollars of ``billing``, its token counts multiplied by ``scale`` first."""
    return (
        (
            billing.input_tokens * model.input
            + billing.write_5m * model.cache_write_5m
            + billing.write_1h * model.cache_write_1h
            + billing.cache_read * model.cache_read
        )
        * scale
        / 1e6
    )


@dataclass
class _Entry:
    expires: float
    ttl: str


class CacheModel:
    """One prompt cache (an organization's, or a shadow of one): its entries and how it bills.

    :param max_entries: a cap on live entries (None: unbounded, as the emulator); past it the
        entries closest to expiry are dropped. Expired entries are purged as time passes.
    """

    def __init__(
        self, prices: PriceTable | None = None, *, max_entries: int | None = None, shared: Any = None
    ) -> None:
        self.prices = prices or PriceTable()
        self.max_entries = max_entries
        self.entries: dict[tuple[str, bytes], _Entry] = {}
        # the same cache's entries kept elsewhere too (tokensaver.state.SharedCache: replicas on one
        # Redis): the ones a request could read are pulled before it is billed, the ones it refreshed
        # or wrote pushed after; None: this process's entries only (no I/O)
        self.shared = shared
        self._lock = threading.RLock()
        self._purged = 0.0

    def clear(self) -> None:
        with self._lock:
            self.entries.clear()

    def size(self, now: float) -> int:
        """Live (unexpired) entries."""
        with self._lock:
            return sum(1 for e in self.entries.values() if e.expires >= now)

    def bill(
        self,
        body: dict[str, Any],
        now: float,
        *,
        memo: Memo | None = None,
        auto_only: bool = False,
        prepared: Prepared | Lite | None = None,
    ) -> Billing:
        """Prompt-cache accounting for a (validated) body at time ``now``; updates the entries.

        :param auto_only: bill the request with the API's automatic caching added (:func:`_auto`).
        :param prepared: ``Prepared.of(body)`` when the caller has it already.
        """
        model = str(body.get("model", ""))
        p = Prepared.of(body, memo) if prepared is None else prepared
        hashes, prefix, total = p.hashes, p.prefix, p.total
        if isinstance(p, Lite):
            bps = p.breakpoints(body, auto_only)
        else:
            bps = breakpoints(body, p.blocks, auto_only=auto_only)
        min_cache = self.prices.get(model).min_cache
        cache = self.entries
        shared, pulled = self.shared, None
        changed: dict[bytes, tuple[float, str]] = {}
        if shared is not None:
            pulled = shared.pull(
                model, {hashes[j] for bp, _ in bps for j in range(bp, max(-1, bp - LOOKBACK - 1), -1)}, now
            )
        with self._lock:
            self._purge(now)
            for h, (expires, ttl) in (pulled or {}).items():
                mine = cache.get((model, h))
                if mine is None or mine.expires < expires:
                    cache[(model, h)] = _Entry(expires, ttl)
            hit: int | None = None
            for bp, _ in bps:
                for j in range(bp, max(-1, bp - LOOKBACK - 1), -1):
                    entry = cache.get((model, hashes[j]))
                    if entry is not None and entry.expires >= now:
                        if hit is None or j > hit:
                            hit = j
                        break
            if hit is not None:
                entry = cache[(model, hashes[hit])]
                entry.expires = now + TTL_SECONDS[entry.ttl]
            read = prefix[hit] if hit is not None else 0
            w5 = w1 = 0
            written: list[int] = []
            prev_end = hit if hit is not None else -1
            for bp, ttl in bps:
                if bp <= prev_end or prefix[bp] < min_cache:
                    continue
                seg = prefix[bp] - (prefix[prev_end] if prev_end >= 0 else 0)
                if ttl == "1h":
                    w1 += seg
                else:
                    w5 += seg
                cache[(model, hashes[bp])] = _Entry(now + TTL_SECONDS[ttl], ttl)
                written.append(bp)
                prev_end = bp
            if self.max_entries is not None and len(cache) > self.max_entries:
                for k, _ in sorted(cache.items(), key=lambda kv: kv[1].expires)[
                    : len(cache) - self.max_entries
                ]:
                    del cache[k]
            if shared is not None:
                touched = [hashes[j] for j in ([] if hit is None else [hit]) + written]
                changed = {h: (e.expires, e.ttl) for h in touched if (e := cache.get((model, h))) is not None}
        if shared is not None and changed:
            shared.push(model, changed, now)
        return Billing(total - read - w5 - w1, read, w5, w1, total, hit, written)

    def _purge(self, now: float) -> None:
        # the emulator keeps expired entries (unbounded, harmless); shadow caches drop them a minute apart
        if self.max_entries is None or now - self._purged < 60:
            return
        self._purged = now
        for k in [k for k, e in self.entries.items() if e.expires < now]:
            del self.entries[k]


# -- the counterfactual: shadow caches -------------------------------------------------------------


@dataclass
class Estimate:
    """One call's figures from the shadow caches (dollars; input side unless said otherwise).

    ``counterfactual_usd`` and ``auto_usd`` include output (the billed output, or a stored answer's).
    ``estimate_usd`` is the model's figure for what was billed on the input side, and
    ``estimate_error_usd`` its distance from the billed figure (None when nothing was billed).
    ``stage_usd[k]``: what stage ``k``'s change saved (the body before it minus the body after it).
    """

    counterfactual_usd: float = 0.0
    auto_usd: float = 0.0
    estimate_usd: float | None = None
    estimate_error_usd: float | None = None
    stage_usd: list[float] = field(default_factory=list)
    scale: float = 1.0


class ShadowCaches:
    """Cache models standing beside the API's cache, per API-key hash, to price what did not happen.

    Per key: ``caller`` bills each request exactly as the caller sent it (their breakpoints, their
    automatic caching), ``auto`` the same request with automatic caching alone, and ``stage<k>`` the
    body after the k-th stage; the last stage's lane is what reached the API. State carries across the
    calls of a run; memory is bounded (keys LRU, entries capped, expired entries purged).
    """

    def __init__(
        self,
        prices: PriceTable | None = None,
        *,
        max_keys: int = 64,
        max_entries: int = 4096,
        shared: Callable[[str, str], Any] | None = None,
    ) -> None:
        self.prices = prices or PriceTable()
        # ``shared(key, lane)``: where a lane's entries are shared with other processes (the
        # replicas of a Redis state: tokensaver.state.shared_cache), so each bills the calls the
        # others served; None: this process's calls only
        self.shared = shared
        self.max_keys = max_keys
        self.max_entries = max_entries
        self._keys: OrderedDict[str, dict[str, CacheModel]] = OrderedDict()
        self._lock = threading.Lock()
        # what is kept of the caller's previous request per (key, conversation), 40 bytes a block:
        # the next one mostly repeats it; at most ``max_kept_bytes`` in all (least recent dropped)
        self._previous: OrderedDict[tuple[str, str], Kept] = OrderedDict()
        self._kept_bytes = 0
        self.max_kept_bytes = MAX_KEPT_BYTES

    def _keep(self, where: tuple[str, str], kept: Kept) -> None:
        with self._lock:
            previous = self._previous
            old = previous.pop(where, None)
            if old is not None:
                self._kept_bytes -= old.nbytes
            previous[where] = kept
            self._kept_bytes += kept.nbytes
            # (a conversation keeps its caller's request and each stage lane's: 16 per key)
            while previous and (len(previous) > 16 * self.max_keys or self._kept_bytes > self.max_kept_bytes):
                self._kept_bytes -= previous.popitem(last=False)[1].nbytes

    def lane(self, key: str, name: str) -> CacheModel:
        """The cache model of lane ``name`` for API-key hash ``key``."""
        with self._lock:
            lanes = self._keys.get(key)
            if lanes is None:
                lanes = self._keys[key] = {}
                while len(self._keys) > self.max_keys:
                    self._keys.popitem(last=False)
            else:
                self._keys.move_to_end(key)
            model = lanes.get(name)
            if model is None:
                shared = self.shared(key, name) if self.shared is not None else None
                model = lanes[name] = CacheModel(self.prices, max_entries=self.max_entries, shared=shared)
            return model

    def estimate(
        self,
        key: str,
        now: float,
        model: ModelInfo,
        original: dict[str, Any],
        bodies: list[dict[str, Any]],
        *,
        usage: dict[str, int] | None,
        sent: bool,
        caller: bool = True,
        conversation: str = "",
        memo: Memo | None = None,
        digests: list[bytes | None] | None = None,
        named: Named | None = None,
    ) -> Estimate:
        """Bill one call through the lanes and price it.

        :param bodies: the body after each stage (the last one is what was sent).
        :param usage: normalized usage: the billed one, or a short-circuited call's stored answer.
        :param sent: the call reached the API and was billed ``usage``. Not sent with a usage: a
            short-circuited call (only the counterfactual lanes move). Not sent without one: a
            failed call (nothing moves, nothing is estimated).
        :param caller: False for a request the caller never made (a plugin-tool follow-up round):
            its counterfactual is nothing and the counterfactual lanes do not move.
        :param memo: digests and counts of the call's blocks by identity, when the caller has them.
        :param digests: each message of ``original``'s serialization digest (xxh3-128 of its orjson),
            when the caller has them: a message billed on an earlier call is found by it.
        :param named: the same of other messages of ``bodies``, by identity (a stage's rewrites).
        """
        out = Estimate(stage_usd=[0.0] * len(bodies))
        if usage is None:
            return out
        memo = {} if memo is None else memo
        with self._lock:
            before = self._previous.get((key, conversation)) if memo_enabled() else None
        last: list[Any] = [None, before]  # the body prepared last, and how
        made: dict[int, PromptBlock] = {}  # the call's prompt blocks, by block identity
        found: Found = {}  # the call's messages as the cache sees them, by their first block's identity
        lite = memo_enabled()

        def kept(lane: str) -> Kept | None:
            with self._lock:
                return self._previous.get((key, f"{conversation}\0{lane}"))

        def bill(lane: str, body: dict[str, Any], auto_only: bool = False) -> Billing:
            edited, _ = apply_context_management(body)
            if last[0] is not edited:
                # a stage's body mostly shares its leading blocks with the one before: resume there
                # (message by message: a message of the call's earlier bodies, or of the
                # conversation's earlier calls, is not taken apart again)
                p: Prepared | Lite | None = None
                if lite:
                    p = Lite.of(
                        edited,
                        memo,
                        found,
                        like=last[1],
                        also=None if lane in ("caller", "auto") else kept(lane),
                        digests=digests if edited is original else None,
                        named=named,
                    )
                if p is None:
                    like = None if isinstance(last[1], Lite) else last[1]
                    p = Prepared.of(edited, memo, like=like, made=made)
                last[:] = [edited, p]
            return self.lane(key, lane).bill(edited, now, auto_only=auto_only, prepared=last[1])

        own = auto = None
        if caller:
            own = bill("caller", original)
            auto = bill("auto", original, auto_only=True)
            self._keep((key, conversation), Kept.of(last[1]))
        out_usd = usage["output_tokens"] * model.output / 1e6
        if not sent:
            if own is not None and auto is not None:
                out.counterfactual_usd = price(own, model) + out_usd
                out.auto_usd = price(auto, model) + out_usd
            return out
        staged: list[Billing] = []
        for k, b in enumerate(bodies, 1):
            staged.append(bill(f"stage{k}", b))
            if lite and isinstance(last[1], Lite):
                # what the lane's next call resumes from (a stage's body mostly repeats its last one's)
                self._keep((key, f"{conversation}\0stage{k}"), Kept.of(last[1]))
        final = staged[-1] if staged else own
        if final is None:
            return out
        billed_in = (
            usage["input_tokens"] + usage["cache_creation_input_tokens"] + usage["cache_read_input_tokens"]
        )
        # estimated tokens (tiktoken) -> billed tokens (Claude's tokenizer), per call
        out.scale = scale = billed_in / final.total if billed_in and final.total else 1.0
        # ``model`` is the one asked for (the counterfactual's); a stage may send the call to another
        # (route): each stage's body is priced at its own model, what was billed at the one sent to
        asked = str(original.get("model", ""))
        models = [
            model if b.get("model") == asked else self.prices.get(str(b.get("model", ""))) for b in bodies
        ]
        sent_model = models[-1] if models else model
        billed_usd = sent_model.input_cost(usage)
        est = price(final, sent_model, scale)
        out.estimate_usd = est
        out.estimate_error_usd = est - billed_usd
        if own is not None and auto is not None:
            # the model's error on what was sent is taken to be its error on the caller's own request
            # (same conversation, same cache history), so it cancels: with plugins = [] saved is 0
            # never below the output: when the API billed far less than the model says was sent
            # (its cache held more than the shadow's), the correction cannot make a request cost < 0
            out.counterfactual_usd = max(billed_usd + price(own, model, scale) - est, 0.0) + out_usd
            out.auto_usd = max(billed_usd + price(auto, model, scale) - est, 0.0) + out_usd
            prev, prev_model = price(own, model, scale), model
            for k, billed in enumerate(staged):
                cur = price(billed, models[k], scale)
                # a stage that changed the model also changed what the output is billed at
                out_delta = usage["output_tokens"] * (prev_model.output - models[k].output) / 1e6
                out.stage_usd[k] = prev - cur + out_delta
                prev, prev_model = cur, models[k]
        return out
