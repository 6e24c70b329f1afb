"""cache_align: place prompt-cache breakpoints where they pay, and keep the cached prefix byte-stable.

What it saves: every call of a conversation re-sends the history; with breakpoints in the right
places the API bills that history as cache reads (0.1x the input price) instead of fresh input.
It places at most 4 breakpoints (the caller's own and the automatic mode counted):

- on the last cacheable block of the final message (what the next turn will read);
- on the last block of the message that ended the previous request (the previous turn's final
  breakpoint, so this turn reads it exactly), first of all when more than 20 blocks came after it
  (parallel tool results): the API's 20-block lookback would miss it otherwise;
- at the end of tools + system (survives a prune cut and is shared by conversations);
- never where the prefix is shorter than the model's minimum cacheable length, never on thinking
  or empty blocks; the caller's breakpoints stay where they are.

It also keeps the prefix stable: tools in name order with schema keys sorted (and without the
``$schema`` dialect URI of a non-strict tool's input schema, a validator's concern), and volatile lines of
the system prompt (dates, times, UUIDs, request ids, counters; ``volatile_patterns``) moved out of
the system prompt into the user message where they first appeared, remembered per conversation so
later turns reproduce the same bytes. TTL: 1h when the gaps between a conversation's calls make the
dearer 1h write pay for itself, 5m otherwise, switched with hysteresis; and a 1h checkpoint on the
first block the call adds after the previous request when that costs less (only that block is
written at the 1h price, and a 5-60 minute pause then re-writes only what followed it). Busts (a request that stops
sharing the previous request's prefix) are diagnosed in the report: first differing block and what
changed.

By default (``move_volatile = "changed"``) lines move only once they change within a conversation
(a stamp that stays the same costs nothing where it is); ``"always"`` also moves fixed ones, which
lets conversations that differ only by the stamp share the system prefix.

Unsafe when: the model must see volatile system content *in the system prompt* (set
``move_volatile = "never"``); tool order carries meaning to the caller (``sort_tools = false``). The
moved-lines memory is per wrapped client (per process; shared by the replicas of one ``state =
"redis://..."``): a new client mid-conversation re-anchors them once (one cache write).

Per call, the work is one serialization of each message (the prefix check against the
conversation's previous request) plus what is new: earlier blocks keep their digests and token
counts. Per conversation it keeps 16-byte digests and a count per block, never the blocks; the
previous request's blocks (for the bust diagnosis's first differing character) only for the newest
conversations, within ``PREV_BLOCKS_BYTES`` per pipeline.
"""

from __future__ import annotations

import json
import re
import threading
from array import array
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate
from typing import Any

import orjson
import xxhash

from tokensaver.context import plugin_notes
from tokensaver.hookspecs import hookimpl
from tokensaver.pricing import normalize_usage
from tokensaver.settings import Schema, boolean, choice, integer, regex_problem, strings
from tokensaver.tokens import MESSAGE_OVERHEAD, content_hash, fast_digest, memo_enabled

from ._blocks import (
    LOOKBACK_BLOCKS,
    MAX_BREAKPOINTS,
    Slot,
    as_blocks,
    block_hash,
    cacheable,
    cc_ttl,
    kept_digests,
    normalized,
    strip_cc,
    with_cc,
)
from ._lru import SizedLRU

PLUGIN = "cache_align"

DEFAULT_VOLATILE_PATTERNS = [
    # ISO dates and datetimes: 2024-05-15, 2024-05-15T15:00:00Z, 2024-05-15 15:00:00
    r"\b\d{4}-\d{2}-\d{2}(?:[T ]\d{1,2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?\b",
    # clock times 15:00:00
    r"\b\d{1,2}:\d{2}:\d{2}\b",
    # written dates: May 15, 2024 / 15 May 2024
    r"\b(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)[a-z]*\.? \d{1,2}(?:st|nd|rd|th)?,? \d{4}\b",
    r"\b\d{1,2} (?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)[a-z]* \d{4}\b",
    # UUIDs
    r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b",
    # epoch seconds / milliseconds (2001..2286)
    r"\b1\d{9}(?:\d{3})?(?:\.\d+)?\b",
    # request / trace / session ids
    r"\b(?:req|request|trace|session|run|msg)[_-]?id\s*[:=]\s*\S+",
    r"\breq_[A-Za-z0-9]{8,}\b",
    # counters: "turn count: 7", "iteration #3", "request number 12"
    r"\b(?:turn|iteration|request|call|step)[ _-]?(?:count|number|no\.?|#|index)\s*[:=#]?\s*\d+\b",
]
MAX_MOVED_CHARS = 400  # a longer line is not moved (it is instructions, not a stamp)

SETTINGS = Schema(
    PLUGIN,
    {
        "ttl": choice(
            "auto",
            ("auto", "5m", "1h"),
            "cache TTL of the breakpoints; auto: 1h when the conversation's gaps call for it",
        ),
        "sort_tools": boolean(
            True,
            "tools in name order with schema keys sorted, so the tools prefix stays cached; a non-strict "
            "tool's $schema dialect URI dropped when it reads as the API's default",
        ),
        "move_volatile": choice(
            "changed",
            ("changed", "always", "never"),
            "volatile system lines (dates, ids, counters) moved out of the cached prefix: "
            "once one changes in a conversation, always or never",
            aliases={True: "always", False: "never"},
        ),
        "volatile_patterns": strings(
            None,
            "regular expressions of volatile lines; absent: the built-in list",
            item="regular expressions",
            optional=True,
            check=regex_problem,
        ),
        "extra_volatile_patterns": strings(
            [],
            "regular expressions added to the list in use",
            item="regular expressions",
            check=regex_problem,
        ),
        "diagnose": boolean(True, "name what busted the cache (the first changed block) in the report"),
        "checkpoint": boolean(
            True,
            "with ttl auto: a 1h breakpoint on the first new block after the previous request when it "
            "costs less than the conversation's TTL (the prefix before it survives a 5-60 min pause)",
        ),
        "max_conversations": integer(512, "conversations whose state is kept (LRU)", min=1),
    },
)
DEFAULTS: dict[str, Any] = SETTINGS.defaults()
# it never edits a body or block it is given or returned: the core hands it the call's own blocks
tokensaver_read_only = True

# TTL decision (see _choose_ttl): a gap in [FIVE_MIN, ONE_HOUR) is one the 5m entry misses and a
# 1h entry survives; UP/DOWN give hysteresis so the TTL does not flip-flop.
FIVE_MIN = 300.0
ONE_HOUR = 3600.0
GAP_WINDOW = 20
TTL_UP = 1.0
TTL_DOWN = 0.4
# the checkpoint's prior: once a conversation has paused a minute or more (a person, a slow tool),
# a 5-60 minute pause is expected at PRIOR_LONG in PRIOR_GAPS calls before one is seen (the shared
# Claude Code sessions' tuning half: 61 in 2,907 calls, 2.1%)
SLOW_GAP = 60.0
PRIOR_LONG = 0.25
PRIOR_GAPS = 20


@hookimpl
def tokensaver_configure(settings: dict[str, Any], source: str) -> dict[str, Any]:
    """The ``cache_align`` table checked against ``SETTINGS``, defaults filled in."""
    return SETTINGS.validate(settings, source)


def _settings(ctx: Any) -> dict[str, Any]:
    s = ctx.settings or {}
    return {**DEFAULTS, **s}


# -- stable tools ----------------------------------------------------------------------------


def sort_keys_deep(value: Any) -> Any:
    """The value with every dict's keys in sorted order (lists keep their order)."""
    if isinstance(value, dict):
        return {k: sort_keys_deep(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [sort_keys_deep(v) for v in value]
    return value


# JSON Schema dialects whose keywords mean what the API's default dialect (2020-12) means for the
# keywords a tool schema uses (draft-04 is not one: its exclusiveMinimum/Maximum are booleans)
SAME_DIALECT = re.compile(
    r"^https?://json-schema\.org/(?:draft-0[67]/schema|draft/20(?:19-09|20-12)/schema)#?$"
)


def without_dialect(tool: dict[str, Any]) -> dict[str, Any]:
    """``tool`` without its input schema's ``$schema`` URI when that dialect reads as the default one
    (zod-to-json-schema writes one into every tool: Claude Code's cost ~17 tokens each, on every call).
    The URI tells a validator which draft to apply, nothing the model uses; a ``strict`` tool keeps
    it (the API compiles its schema)."""
    schema = tool.get("input_schema")
    if tool.get("strict") or not isinstance(schema, dict):
        return tool
    uri = schema.get("$schema")
    if not isinstance(uri, str) or not SAME_DIALECT.match(uri):
        return tool
    return {**tool, "input_schema": {k: v for k, v in schema.items() if k != "$schema"}}


def _dialects(tools: list[Any]) -> int:
    """How many of ``tools`` name a dialect (``$schema``) in their input schema."""
    return sum(
        1
        for t in tools
        if isinstance(t, dict) and isinstance(t.get("input_schema"), dict) and "$schema" in t["input_schema"]
    )


def stable_tools(tools: list[Any]) -> list[Any]:
    """Tools in name order, keys sorted, the dialect URI dropped (:func:`without_dialect`); the
    caller's breakpoints stay at the same positions."""
    ccs = [t.get("cache_control") if isinstance(t, dict) else None for t in tools]
    bare = [without_dialect(sort_keys_deep(strip_cc(t))) if isinstance(t, dict) else t for t in tools]
    order = sorted(
        range(len(bare)), key=lambda i: (str(bare[i].get("name", "")) if isinstance(bare[i], dict) else "", i)
    )
    out = [bare[i] for i in order]
    for pos, cc in enumerate(ccs):
        if cc is None:
            continue
        # a deferred tool is no part of the prompt and the API refuses a breakpoint on it: the nearest
        # eager tool before it (else after it) ends the same prefix
        at = next(
            (
                j
                for j in [*range(pos, -1, -1), *range(pos + 1, len(out))]
                if isinstance(out[j], dict)
                and not out[j].get("defer_loading")
                and "cache_control" not in out[j]
            ),
            None,
        )
        if at is not None:
            out[at] = {**out[at], "cache_control": cc}
    return out


# -- volatile system content -----------------------------------------------------------------


@lru_cache(maxsize=32)
def _compiled(pats: tuple[str, ...]) -> tuple[str, list[re.Pattern[str]]]:
    """The memo kind of the volatile split with these patterns, and the patterns compiled."""
    return "cache_align.stable_system:" + content_hash(list(pats))[:16], [re.compile(p) for p in pats]


def _patterns(settings: dict[str, Any]) -> tuple[str, list[re.Pattern[str]]]:
    pats = settings.get("volatile_patterns")
    if pats is None:
        pats = DEFAULT_VOLATILE_PATTERNS
    return _compiled(tuple([*pats, *(settings.get("extra_volatile_patterns") or [])]))


def split_volatile(text: str, patterns: list[re.Pattern[str]]) -> tuple[str, list[str]]:
    """(text without its volatile lines, the lines moved). A line is cut at sentences when long."""
    kept: list[str] = []
    moved: list[str] = []
    for line in text.split("\n"):
        if not any(p.search(line) for p in patterns):
            kept.append(line)
            continue
        if len(line) <= MAX_MOVED_CHARS:
            moved.append(line.strip())
            continue
        # a long line: move only its volatile sentences, if they are short
        parts = re.split(r"(?<=[.!?])\s+", line)
        keep_parts = []
        for part in parts:
            if any(p.search(part) for p in patterns) and len(part) <= MAX_MOVED_CHARS:
                moved.append(part.strip())
            else:
                keep_parts.append(part)
        kept.append(" ".join(keep_parts))
    return "\n".join(kept), [m for m in moved if m]


def _stable_system(system: list[Any], patterns: list[re.Pattern[str]]) -> tuple[list[Any], list[str]]:
    out: list[Any] = []
    moved: list[str] = []
    for b in system:
        if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str):
            text, lines = split_volatile(b["text"], patterns)
            if lines:
                moved.extend(lines)
                if not text.strip():
                    continue  # the whole block was volatile
                b = {**b, "text": text}
        out.append(b)
    return out, moved


def moved_block(lines: list[str]) -> dict[str, Any]:
    """The text block that carries volatile system lines, appended to a user message."""
    return {"type": "text", "text": "<system-context>\n" + "\n".join(lines) + "\n</system-context>"}


# -- per-conversation state ------------------------------------------------------------------


# what fixes the bytes of a conversation's later calls (moved lines and where, the TTL and its gap
# history): through the state interface, so replicas on one Redis continue each other's decisions
# (tokensaver.state.Decisions); the bust diagnosis's previous slots stay in the process
SHARED = (
    "attach",
    "gaps",
    "ttl",
    "t_last",
    "growth",
    "prefix_tokens",
    "volatile_first",
    "volatile_active",
    "slow",
)


def _conversation(ctx: Any, key: str, limit: int) -> tuple[Any, dict[str, Any]]:
    convs = ctx.shared_state(decisions=lambda: ctx.store.decisions("cache_align", SHARED, limit=limit))[
        "decisions"
    ]
    return convs, convs.get(ctx.key_hash, key, lambda: {"attach": {}, "gaps": [], "ttl": "5m"})


def _message_key(i: int, message: dict[str, Any]) -> str:
    return content_hash([i, message.get("role"), strip_cc(as_blocks(message.get("content")))])[:24]


def _attach_volatile(
    body: dict[str, Any], lines: list[str], conv: dict[str, Any]
) -> tuple[dict[str, Any], str | None]:
    """Re-attach remembered volatile lines to their messages; attach new ones to the last user message.

    A key names a message's index and content, so a key whose index is known here (``attach_at``,
    kept in the process) is checked against that one message; only a key this process has not seen
    placed (another replica's) makes it key every message.
    """
    msgs = list(body["messages"])
    attach: dict[str, list[str]] = conv["attach"]
    at: dict[str, int] = conv.setdefault("attach_at", {})
    for k in [k for k in at if k not in attach]:
        del at[k]
    if any(k not in at for k in attach):
        for i, m in enumerate(msgs):
            k = _message_key(i, m)
            if k in attach:
                at[k] = i
    present = {k: i for k, i in at.items() if i < len(msgs) and _message_key(i, msgs[i]) == k}
    where = None
    if lines and not any(attach[k] == lines for k in present):
        target = next((i for i in range(len(msgs) - 1, -1, -1) if msgs[i].get("role") == "user"), None)
        if target is not None:
            key = _message_key(target, msgs[target])
            attach[key] = list(lines)
            present[key] = at[key] = target
            where = f"messages[{target}]"
            while len(attach) > 256:
                attach.pop(next(iter(attach)))
    for k, i in sorted(present.items(), key=lambda item: item[1]):
        m = msgs[i]
        msgs[i] = {**m, "content": [*as_blocks(m.get("content")), moved_block(attach[k])]}
    return {**body, "messages": msgs}, where


# -- TTL -------------------------------------------------------------------------------------


def _choose_ttl(
    conv: dict[str, Any], now: float, prefix_tokens: int, model: Any
) -> tuple[str, dict[str, Any]]:
    """5m or 1h for this conversation, from its call gaps, with hysteresis.

    Per call, 5m risks re-writing the whole prefix when the next gap is between 5 minutes and an
    hour: p * S * (w5m - read). 1h costs more on every write: new_tokens * (w1h - w5m). Switch up
    when the expected loss exceeds the extra cost, back down only below TTL_DOWN of it.
    """
    last = conv.get("t_last")
    if last is not None and now - last > 0.5:
        conv["gaps"] = [*conv["gaps"], now - last][-GAP_WINDOW:]
        if now - last >= SLOW_GAP:
            conv["slow"] = True
    conv["t_last"] = now
    gaps = conv["gaps"]
    prev_prefix = conv.get("prefix_tokens", 0)
    growth = max(prefix_tokens - prev_prefix, 0) if prev_prefix else prefix_tokens
    conv["growth"] = growth = (0.5 * conv.get("growth", growth) + 0.5 * growth) if prev_prefix else growth
    conv["prefix_tokens"] = prefix_tokens
    n_long = sum(1 for g in gaps if FIVE_MIN <= g < ONE_HOUR)
    p = n_long / (len(gaps) + 1)  # +1: one unseen gap of prior, so a single call does not decide
    loss_5m = p * prefix_tokens * (model.cache_write_5m - model.cache_read)
    cost_1h = max(growth, 1.0) * (model.cache_write_1h - model.cache_write_5m)
    ttl = conv.get("ttl", "5m")
    if ttl == "5m" and loss_5m > TTL_UP * cost_1h:
        ttl = "1h"
    elif ttl == "1h" and loss_5m < TTL_DOWN * cost_1h:
        ttl = "5m"
    switched = ttl != conv.get("ttl", "5m")
    conv["ttl"] = ttl
    # the checkpoint costs little: it may insure before the first long pause, on a slow conversation
    p_ck = (n_long + PRIOR_LONG) / (len(gaps) + PRIOR_GAPS) if conv.get("slow") else p
    return ttl, {"p_long_gap": round(p, 3), "switched": switched, "p": max(p, p_ck), "growth": growth}


# -- the prefix, digested once per call --------------------------------------------------------

# The prefix in groups: the tools, the system prompt, then each message (group i + 2). Each call
# serializes every group once (orjson, cache_control aside) to check it against the conversation's
# previous request; a group seen there keeps its blocks' digests and token counts, and only the
# blocks of a new group are digested and counted one by one.
_SORTED = orjson.OPT_SORT_KEYS
_CC = b'"cache_control"'
_xxh = xxhash.xxh3_128_digest
_D = 16  # bytes per digest
_TOOLS, _SYSTEM, _MSG0 = 0, 1, 2
# the previous request's blocks, kept only to name what changed in a bust (the first differing
# character, the old block's hash): the newest conversations' within this many bytes in all
PREV_BLOCKS_BYTES = 8 * 1024 * 1024
_BLOCK_BYTES = 64  # what a block costs beyond its JSON, roughly (the dict and its strings)
_BYTES_PER_TOKEN = 4  # JSON bytes of a message per token, roughly
_NOT_A_TOOL = object()  # a tools entry that is not a dict has no name


def _digest(value: Any) -> tuple[bytes, int, bool]:
    """(a 16-byte digest of ``value`` without cache_control at any depth, its JSON length, whether a
    cache_control may be in it): one orjson pass unless it holds one."""
    try:
        raw = orjson.dumps(value, option=_SORTED)
    except TypeError:  # not JSON orjson takes
        return fast_digest(strip_cc(value))[1:], 0, True
    if _CC in raw:
        return fast_digest(strip_cc(value))[1:], len(raw), True
    return _xxh(raw), len(raw), False


def _where(starts: list[int], k: int) -> Slot:
    """Where block ``k`` of a prefix grouped at ``starts`` is (the Slot without its block)."""
    g = bisect_right(starts, k) - 1
    j = k - starts[g]
    if g == _TOOLS:
        return Slot(f"tools[{j}]", "tools", j, -1, None)
    if g == _SYSTEM:
        return Slot(f"system[{j}]", "system", j, -1, None)
    i = g - _MSG0
    return Slot(f"messages[{i}].content[{j}]", "messages", i, j, None)


@dataclass(frozen=True)
class Seen:
    """What is kept of a conversation's latest request: digests and token counts, no blocks."""

    raws: list[bytes | None]  # a digest per group as sent, cache_control included (None: not JSON)
    groups: list[bytes]  # a digest per group, cache_control aside
    starts: list[int]  # each group's first block
    digests: bytes  # 16 bytes per block, cache_control aside
    tokens: array[int]  # each block's tokens (a message's framing counted at its first block)
    cc_groups: frozenset[int]  # groups that hold a cache_control (their counts are not reused)
    marked: list[int]  # blocks that carry one
    names: list[Any]  # each tool's name (_NOT_A_TOOL: not a dict)


@dataclass
class Prefix:
    """A request's cacheable prefix: its blocks in groups, each block's tokens to its end."""

    groups: list[list[Any]]
    n: int  # blocks in all
    seen: Seen
    cum: list[int]
    marked: list[int]  # blocks carrying the caller's cache_control
    nbytes: int  # the blocks' size, roughly (JSON + a little per block)

    def block(self, k: int) -> Any:
        return _block_at(self.groups, self.seen.starts, k)

    def slot(self, k: int) -> Slot:
        w = _where(self.seen.starts, k)
        return Slot(w.loc, w.section, w.i, w.j, self.block(k))

    def message_blocks(self, i: int) -> range:
        """The block indices of message ``i``."""
        starts = self.seen.starts
        g = i + _MSG0
        return range(starts[g], starts[g + 1] if g + 1 < len(starts) else self.n)


def _block_at(groups: list[list[Any]], starts: list[int], k: int) -> Any:
    g = bisect_right(starts, k) - 1
    return groups[g][k - starts[g]]


def _content(message: Any) -> list[Any]:
    c = message.get("content") if isinstance(message, dict) else None
    return c if type(c) is list else as_blocks(c) if isinstance(message, dict) else []


def _raw_digest(group: list[Any]) -> bytes | None:
    try:
        return _xxh(orjson.dumps(group))
    except TypeError:
        return None


def _holds_cc(group: list[Any]) -> bool:
    """Whether a block of ``group``, or a block inside a tool result of it, has a cache_control
    key (where the API takes one; a digest keeps one deeper, in a tool's input, as content)."""
    for b in group:
        if type(b) is dict:
            if "cache_control" in b:
                return True
            inner = b.get("content")
            if type(inner) is list and any(type(x) is dict and "cache_control" in x for x in inner):
                return True
    return False


def digest_prefix(
    body: dict[str, Any],
    prev: Seen | None,
    count: Callable[[Any], int],
    given: list[bytes | None] | None = None,
) -> Prefix:
    """The prefix of ``body``: what ``prev`` holds of a group with the same content is taken from it.

    Each group is serialized once (a message's group as its whole message: ``given`` holds the
    core's digests of them, None where it has none). The groups ``body`` shares with ``prev`` from
    the start, breakpoints included, keep everything (one slice of each of prev's arrays). After the
    first change, a group is compared without its cache_control: the same content (the caller moved
    a breakpoint) keeps its blocks' digests, a message moved by a cut is found by its digest, else
    the group is new: its blocks digested and counted one by one.
    """
    tools = body.get("tools") or []
    system = body.get("system")
    messages = body.get("messages") or []
    groups: list[list[Any]] = [list(tools), as_blocks(system) if system is not None else []]
    groups.extend(_content(m) for m in messages)
    ends = list(accumulate(map(len, groups)))
    starts = [0, *ends[:-1]]
    n_blocks = ends[-1]
    # the prefix check: each group as sent (orjson, keys as they come), the messages' as handed
    handed = given if given is not None and len(given) == len(messages) else [None] * len(messages)
    raws: list[bytes | None] = []
    nbytes = 0
    guessed: list[int] = []  # the groups of handed messages (their bytes from their tokens below)
    for g, value in enumerate((groups[_TOOLS], groups[_SYSTEM], *messages)):
        d = handed[g - _MSG0] if g >= _MSG0 else None
        if d is not None:
            guessed.append(g)
        else:
            try:
                raw = orjson.dumps(value)
            except TypeError:  # not JSON orjson takes (a group of it is never taken as seen)
                pass
            else:
                d = _xxh(raw)
                nbytes += len(raw)
        raws.append(d)
    nbytes += _BLOCK_BYTES * n_blocks
    reuse = prev is not None and memo_enabled()
    same = 0  # groups equal to prev's from the start, breakpoints included
    if reuse:
        assert prev is not None
        n = min(len(prev.raws), len(raws))
        if prev.raws[:n] == raws[:n] and None not in raws[:n]:
            same = n
        else:
            same = next(g for g in range(n) if raws[g] is None or prev.raws[g] != raws[g])
    n_same = starts[same] if same < len(groups) else n_blocks

    def counted(g: int) -> list[int]:
        counts = [count(b) for b in groups[g]]
        if counts and g >= _MSG0:
            counts[0] += MESSAGE_OVERHEAD
        return counts

    digests: list[bytes] = []
    parts: list[bytes] = []
    tokens: array[int] = array("q")
    marked: list[int] = []
    cc_groups: set[int] = set()
    if same:
        assert prev is not None
        digests.extend(prev.groups[:same])
        parts.append(prev.digests[: n_same * _D])
        tokens.extend(prev.tokens[:n_same])
        cc_groups.update(g for g in prev.cc_groups if g < same)
        marked.extend(k for k in prev.marked if k < n_same)
    index: dict[bytes, int] | None = None  # prev's message groups by digest, made on a first change
    for g in range(same, len(groups)):
        group = groups[g]
        cc = raws[g] is None or _holds_cc(group)
        d = fast_digest(strip_cc(group) if cc else group)[1:]  # keys sorted, cache_control aside
        if cc:
            cc_groups.add(g)
            s = starts[g]
            marked.extend(
                s + j for j, b in enumerate(group) if isinstance(b, dict) and b.get("cache_control")
            )
        digests.append(d)
        if not group:
            continue
        h = None
        if reuse:
            assert prev is not None
            if g < len(prev.groups) and prev.groups[g] == d:
                h = g
            elif g >= _MSG0 and same < len(prev.groups):  # not an append: a cut may have moved it
                if index is None:
                    index = {prev.groups[i]: i for i in range(len(prev.groups) - 1, _MSG0 - 1, -1)}
                h = index.get(d)
        if h is None:
            parts.extend(_digest(b)[0] for b in group)
            tokens.extend(counted(g))
            continue
        assert prev is not None
        a = prev.starts[h]
        parts.append(prev.digests[a * _D : (a + len(group)) * _D])
        if cc or h in prev.cc_groups:  # counted again: a cache_control inside may count
            tokens.extend(counted(g))
        else:
            tokens.extend(prev.tokens[a : a + len(group)])
    names = [t.get("name") if isinstance(t, dict) else _NOT_A_TOOL for t in groups[_TOOLS]]
    seen = Seen(raws, digests, starts, b"".join(parts), tokens, frozenset(cc_groups), marked, names)
    cum = list(accumulate(tokens))
    for g in guessed:  # a handed message's JSON, from its tokens (a rough size is all the byte cap needs)
        if ends[g] > starts[g]:
            nbytes += _BYTES_PER_TOKEN * (cum[ends[g] - 1] - (cum[starts[g] - 1] if starts[g] else 0))
    return Prefix(groups, n_blocks, seen, cum, marked, nbytes)


# -- breakpoints -----------------------------------------------------------------------------


def _prev_end(messages: list[Any]) -> int | None:
    """Index of the message that ended the previous request: the last user message followed by an
    assistant message, other than the final message."""
    last = len(messages) - 1
    for i in range(last - 1, -1, -1):
        if messages[i].get("role") == "user" and i + 1 < last and messages[i + 1].get("role") == "assistant":
            return i
    return None


def _last_cacheable(p: Prefix, min_cache: int, ks: range) -> int | None:
    """The last block index in ``ks`` that may carry a breakpoint."""
    for k in reversed(ks):
        if cacheable(p.block(k)) and p.cum[k] >= min_cache:
            return k
    return None


def _checkpoint_block(p: Prefix, messages: list[Any], min_cache: int) -> tuple[int, int] | None:
    """(the first block after the previous request's end that may carry a breakpoint, that end's
    block, -1: none): the reply the previous call got, its first block that is not thinking. Everything
    before it was read from the cache in this call, so a 1h breakpoint there writes only the tokens
    between at the dearer 1h price, and the entry it leaves holds the whole prefix up to it for an hour."""
    prev_i = _prev_end(messages)
    if prev_i is None or prev_i + 1 >= len(messages) - 1:
        return None
    ends = p.message_blocks(prev_i)
    for k in p.message_blocks(prev_i + 1):
        if cacheable(p.block(k)) and p.cum[k] >= min_cache:
            return k, (ends[-1] if ends else -1)
    return None


def _checkpoint_pays(
    p: Prefix, k: int, prev_end: int, ttl: str, p_long: float, growth: float, model: Any
) -> bool:
    """Whether a 1h checkpoint at block ``k`` (the rest on 5m) costs less, per call, than ``ttl``
    for every breakpoint. Expected cost of a 5-60 minute pause (``p_long`` per call): on 5m the whole
    prefix is written again, with the checkpoint only what follows it; the 1h price is paid on what
    is written at 1h: the tokens between the previous request's end and ``k``, or all the call
    writes (``growth``) when everything is on 1h."""
    total = p.cum[-1]
    seg = p.cum[k] - (p.cum[prev_end] if prev_end >= 0 else 0)
    rewrite, dearer = model.cache_write_5m - model.cache_read, model.cache_write_1h - model.cache_write_5m
    with_checkpoint = max(seg, 1) * dearer + p_long * (total - p.cum[k]) * rewrite
    without = max(growth, 1.0) * dearer if ttl == "1h" else p_long * total * rewrite
    return bool(with_checkpoint < without)


def plan_breakpoints(
    p: Prefix, messages: list[Any], min_cache: int, slots_free: int, checkpoint: int | None = None
) -> list[tuple[int, str]]:
    """Where to put new breakpoints: [(block index, reason)], by priority, at most ``slots_free``."""
    taken = set(p.marked)
    chosen: list[tuple[int, str]] = []
    n = p.n

    def add(k: int | None, why: str) -> None:
        if k is None or k in taken or len(chosen) >= slots_free:
            return
        taken.add(k)
        chosen.append((k, why))

    def covered(q: int) -> bool:
        return any(0 <= b - q < LOOKBACK_BLOCKS for b in taken)

    first_msg = p.seen.starts[_MSG0] if len(p.seen.starts) > _MSG0 else n
    last = _last_cacheable(p, min_cache, range(n)) if messages else None
    prev_i = _prev_end(messages)
    prev = _last_cacheable(p, min_cache, p.message_blocks(prev_i)) if prev_i is not None else None
    sys_end = _last_cacheable(p, min_cache, range(first_msg)) if first_msg else None
    add(last, "final")
    if prev is not None and not covered(prev):
        add(prev, "lookback")  # more than 20 blocks since the previous request's end
    add(checkpoint, "checkpoint")
    add(sys_end, "tools+system")
    add(prev, "previous")
    return chosen


def _redundant_caller_breakpoint(p: Prefix) -> int | None:
    """A caller's breakpoint in the tools or system prompt with another of its breakpoints a few
    blocks later there (OpenClaw marks its last tool and the system block after it): the later one
    reads and writes the same prefix, and its lookback finds an entry the earlier one left."""
    static = [c for c in sorted(p.marked) if p.slot(c).section in ("tools", "system")]
    for c, later in zip(static, static[1:], strict=False):
        if later - c < LOOKBACK_BLOCKS:
            return c
    return None


def _assign_ttls(
    p: Prefix,
    chosen: dict[int, str],
    want: str,
    upgrade: list[int] | None = None,
    borrowed: int | None = None,
) -> dict[int, str]:
    """TTL per new breakpoint: ``want`` (1h for a checkpoint and every breakpoint before it),
    bent so 1h breakpoints never follow 5m ones; the caller's breakpoints in ``upgrade`` on 1h,
    ``borrowed``'s taken off ("")."""
    caller = {k: cc_ttl(p.block(k)["cache_control"]) for k in p.marked if k != borrowed}
    caller.update(dict.fromkeys(upgrade or (), "1h"))
    ck = max((k for k, why in chosen.items() if why == "checkpoint"), default=-1)
    out = {}
    for k in chosen:
        ttl = "1h" if k <= ck else want
        if any(t == "5m" and c < k for c, t in caller.items()):
            ttl = "5m"
        if any(t == "1h" and c > k for c, t in caller.items()):
            ttl = "1h"
        out[k] = ttl
    out.update(dict.fromkeys(upgrade or (), "1h"))
    if borrowed is not None:
        out[borrowed] = ""
    return out


def _mark(block: Any, cc: dict[str, Any] | None) -> Any:
    """``block`` with the breakpoint ``cc``, or without one (None)."""
    return strip_cc(block) if cc is None else with_cc(block, cc)


def _apply(body: dict[str, Any], p: Prefix, ttls: dict[int, str]) -> dict[str, Any]:
    """``body`` with each block of ``ttls`` marked on its TTL ("": its breakpoint taken off)."""
    tools = list(body.get("tools") or [])
    system = list(body.get("system") or []) if isinstance(body.get("system"), list) else body.get("system")
    msgs = list(body["messages"])
    for k, ttl in ttls.items():
        s = p.slot(k)
        cc = ({"type": "ephemeral", "ttl": "1h"} if ttl == "1h" else {"type": "ephemeral"}) if ttl else None
        if s.section == "tools":
            tools[s.i] = _mark(tools[s.i], cc)
        elif s.section == "system":
            assert isinstance(system, list)
            system[s.i] = _mark(system[s.i], cc)
        else:
            m = msgs[s.i]
            content = list(m["content"])
            content[s.j] = _mark(content[s.j], cc)
            msgs[s.i] = {**m, "content": content}
    out = {**body, "messages": msgs}
    if "tools" in body:
        out["tools"] = tools
    if "system" in body:
        out["system"] = system
    return out


# -- bust diagnosis --------------------------------------------------------------------------


def _first_difference(a: bytes, b: bytes) -> int:
    """The first block at which two digest strings differ (the shorter one's length if none does)."""
    n = min(len(a), len(b)) // _D
    lo, hi = 0, n
    if a[: n * _D] == b[: n * _D]:
        return n
    while hi - lo > 1:  # a and b agree on lo blocks, not on hi
        mid = (lo + hi) // 2
        if a[: mid * _D] == b[: mid * _D]:
            lo = mid
        else:
            hi = mid
    return lo


def _kind(block: Any) -> Any:
    return block.get("type") if isinstance(block, dict) else "str"


def diagnose(prev: Seen, old: list[list[Any]] | None, cur: Prefix) -> dict[str, Any] | None:
    """Where ``cur`` stops sharing ``prev``'s prefix, and what changed (None: cur extends prev).

    Structural only, never prompt text (it goes into the run ledger): the block's location and
    index, its kind, the first differing character, and short hashes of the old and new block.
    ``old`` is the previous request's blocks by group, if still kept: without them, the character and the
    old block's hash and kind are not known.
    """
    n_prev, n_cur = len(prev.digests) // _D, cur.n
    k = _first_difference(prev.digests, cur.seen.digests)
    if k == n_prev:
        return None
    a = _where(prev.starts, k)
    if k == n_cur:
        return {"at": a.loc, "index": k, "change": "blocks removed from the end"}
    b = cur.slot(k)
    was = _block_at(old, prev.starts, k) if old is not None else None
    tb = _kind(b.block)
    out: dict[str, Any] = {"at": b.loc, "index": k, "kind": str(tb)}
    if old is not None:
        out["was_hash"] = block_hash(was)[:12]
    out["now_hash"] = block_hash(b.block)[:12]
    if a.section != b.section or (a.section == "messages" and (a.i, a.j) != (b.i, b.j)):
        what = "block added" if n_cur > n_prev else "block removed"
        return {**out, "change": f"{what} ({a.loc} became {b.loc})"}
    if a.section == "tools":
        prev_names = [n for n in prev.names if n is not _NOT_A_TOOL]
        cur_names = [n for n in cur.seen.names if n is not _NOT_A_TOOL]
        if sorted(map(str, prev_names)) == sorted(map(str, cur_names)) and prev_names != cur_names:
            return {**out, "change": "tool order changed"}
        if prev.names[a.i] != cur.seen.names[b.i]:
            # tool names are identifiers the API restricts to [a-zA-Z0-9_-], not prompt text
            return {**out, "change": f"tool {prev.names[a.i]!r} became {cur.seen.names[b.i]!r}"}
    if old is None:
        return {**out, "change": "block changed (the earlier one is no longer kept)"}
    ta = _kind(was)
    if ta != tb:
        return {**out, "change": f"block type {ta} became {tb}"}
    sa = json.dumps(strip_cc(was), sort_keys=True, ensure_ascii=False)
    sb = json.dumps(strip_cc(b.block), sort_keys=True, ensure_ascii=False)
    field = "text" if ta == "text" else "content"
    if ta == "text" and isinstance(was, dict) and isinstance(b.block, dict):
        sa, sb = str(was.get("text", "")), str(b.block.get("text", ""))
    c = 0
    while c < min(len(sa), len(sb)) and sa[c] == sb[c]:
        c += 1
    return {**out, "change": f"{field} differs at char {c}", "char": c}


def _bust(prev: Seen, old: list[list[Any]] | None, cur: Prefix) -> dict[str, Any] | None:
    """The bust note: :func:`diagnose` with the tokens it kept and invalidated."""
    bust = diagnose(prev, old, cur)
    if bust is None:
        return None
    k = bust.pop("index")
    prev_cum = list(accumulate(prev.tokens))
    bust["block"] = k
    bust["kept_tokens"] = prev_cum[k - 1] if 0 < k <= len(prev_cum) else 0
    bust["invalidated_tokens"] = (prev_cum[-1] if prev_cum else 0) - bust["kept_tokens"]
    if "now_hash" in bust:  # the changed block's own size, before and after
        bust["was_tokens"] = prev.tokens[k] if k < len(prev.tokens) else 0
        bust["now_tokens"] = cur.seen.tokens[k] if k < len(cur.seen.tokens) else 0
    return bust


# -- the hooks -------------------------------------------------------------------------------


def _previous_blocks(
    ctx: Any,
) -> tuple[threading.Lock, SizedLRU[tuple[str, str], tuple[Seen, list[list[Any]]]]]:
    state = ctx.shared_state(prev_lock=threading.Lock, prev_blocks=SizedLRU)
    return state["prev_lock"], state["prev_blocks"]


def align(body: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """The aligned request: stable tools and system, breakpoints placed (pure apart from ctx.state)."""
    settings = _settings(ctx)
    notes: dict[str, Any] = {}
    out = normalized(body)
    if settings["sort_tools"] and isinstance(out.get("tools"), list) and out["tools"]:
        tools = ctx.memo("cache_align.stable_tools", out["tools"], stable_tools)
        dropped = _dialects(out["tools"]) - _dialects(tools)
        if dropped:
            notes["schema_dialects_dropped"] = dropped
        if [t.get("name") for t in tools if isinstance(t, dict)] != [
            t.get("name") for t in out["tools"] if isinstance(t, dict)
        ]:
            notes["tools_sorted"] = True
        out["tools"] = tools
    kind, patterns = _patterns(settings)
    moved: list[str] = []
    mode = {True: "always", False: "never"}.get(settings["move_volatile"], settings["move_volatile"])
    stable_sys: list[Any] = []
    if isinstance(out.get("system"), list):
        stable_sys, moved = ctx.memo(kind, out["system"], lambda system: _stable_system(system, patterns))
    msgs = out["messages"]
    first = strip_cc(as_blocks(msgs[0].get("content"))) if msgs and isinstance(msgs[0], dict) else None
    # within the core's conversation (tokensaver.conversations): two that open alike keep their own
    conv_key = content_hash([str(out.get("model", "")), strip_cc(stable_sys), first, ctx.conversation])[:16]
    limit = settings["max_conversations"]
    convs, conv = _conversation(ctx, conv_key, limit)
    if mode == "changed" and moved:
        # moving costs a few tokens on every call: only worth it once the lines actually change
        seen = conv.setdefault("volatile_first", list(moved))
        conv["volatile_active"] = conv.get("volatile_active") or seen != moved
    active = mode == "always" or (mode == "changed" and conv.get("volatile_active"))
    if active and moved:
        out["system"] = list(stable_sys)
    else:
        moved = []
    if active and msgs:
        out, where = _attach_volatile(out, list(moved), conv)
        if where:
            # counts and a hash, never the lines: they are prompt text and go into the ledger
            notes["moved"] = {
                "lines": len(moved),
                "chars": sum(len(line) for line in moved),
                "hash": content_hash(moved)[:12],
                "to": where,
            }
    # automatic mode counts as a breakpoint; convert it to explicit placement at the same spot
    auto = out.pop("cache_control", None)
    want_ttl = settings["ttl"]
    if auto is not None:
        notes["automatic_converted"] = True
        if settings["ttl"] == "auto" and cc_ttl(auto) == "1h":
            want_ttl = "1h"
    prev: Seen | None = conv.get("prev")
    # the core's digests of the messages as they came, where normalizing and moving left them so
    given = kept_digests(ctx.message_digests, body.get("messages"), out["messages"])
    p = digest_prefix(out, prev, ctx.count, given)  # the one pass over the whole prefix
    caller = len(p.marked)
    free = max(0, MAX_BREAKPOINTS - caller)
    min_cache = int(getattr(ctx.model, "min_cache", 1024))
    total = p.cum[-1] if p.cum else 0
    checkpoint = borrowed = None
    upgrade: list[int] = []
    if want_ttl == "auto":
        want_ttl, ttl_notes = _choose_ttl(conv, float(ctx.now), total, ctx.model)
        if ttl_notes["switched"]:
            notes["ttl_switched"] = want_ttl
        notes["p_long_gap"] = ttl_notes["p_long_gap"]
        if settings["checkpoint"] and ttl_notes["p"] > 0:
            at = _checkpoint_block(p, out["messages"], min_cache)
            if at is not None and _checkpoint_pays(
                p, at[0], at[1], want_ttl, ttl_notes["p"], ttl_notes["growth"], ctx.model
            ):
                checkpoint = at[0]
                if not free:  # the caller's four: one it has twice in the static part gives its slot
                    borrowed = _redundant_caller_breakpoint(p)
                    free = 1 if borrowed is not None else 0
    chosen = plan_breakpoints(p, out["messages"], min_cache, free, checkpoint)
    if borrowed is not None and checkpoint not in dict(chosen):  # the slot went elsewhere: give it back
        borrowed, chosen = None, plan_breakpoints(p, out["messages"], min_cache, 0)
    reasons = dict(chosen)
    if checkpoint is not None and checkpoint in reasons:
        want_ttl = "5m"
        notes["checkpoint"] = p.slot(checkpoint).loc
        # 1h entries come before 5m ones: the caller's 5m breakpoints before it go on 1h (read from
        # the cache in this call, they write nothing; Claude Code marks its system blocks)
        upgrade = [
            c
            for c in p.marked
            if c < checkpoint and c != borrowed and cc_ttl(p.block(c)["cache_control"]) == "5m"
        ]
        if upgrade:
            notes["caller_breakpoints_on_1h"] = len(upgrade)
        if borrowed is not None:
            notes["caller_breakpoint_moved"] = p.slot(borrowed).loc
    ttls = _assign_ttls(p, reasons, want_ttl, upgrade, borrowed)
    if auto is not None and not chosen:
        out["cache_control"] = auto  # nothing of ours to place: leave the caller's automatic mode
        notes.pop("automatic_converted", None)
    out = _apply(out, p, ttls)
    notes["breakpoints"] = [
        {"at": p.slot(k).loc, "why": why, "ttl": ttls[k], "prefix_tokens": p.cum[k]}
        for k, why in sorted(chosen)
    ]
    notes["caller_breakpoints"] = caller + (
        1 if auto is not None and "automatic_converted" not in notes else 0
    )
    notes["ttl"] = want_ttl
    notes["prefix_tokens"] = total
    if settings["diagnose"]:
        lock, kept = _previous_blocks(ctx)
        where_kept = (str(ctx.key_hash), conv_key)
        if prev is not None:
            with lock:
                hit = kept.get(where_kept)
            old = hit[1] if hit is not None and hit[0] is prev else None
            bust = _bust(prev, old, p)
            if bust is not None:
                notes["bust"] = bust
        with lock:
            kept.put(where_kept, (p.seen, p.groups), p.nbytes, limit, PREV_BLOCKS_BYTES)
    conv["prev"] = p.seen
    convs.put(ctx.key_hash, conv_key, conv)
    ctx.record(**notes)
    return out


@hookimpl(trylast=True)
def tokensaver_transform_request(body: dict[str, Any], ctx: Any) -> dict[str, Any] | None:
    """Place breakpoints on the final prefix and keep it byte-stable."""
    if not isinstance(body.get("messages"), list) or not body["messages"]:
        return None
    return align(body, ctx)


@hookimpl
def tokensaver_observe_response(body: dict[str, Any], response: dict[str, Any], ctx: Any) -> None:
    """Record the billed cache reads and writes against the same tokens billed uncached."""
    u = normalize_usage(ctx.usage or response.get("usage"))
    m = ctx.model
    billed_in = u["input_tokens"] + u["cache_creation_input_tokens"] + u["cache_read_input_tokens"]
    ctx.record(
        billed={
            "input": u["input_tokens"],
            "write_5m": u["cache_creation_5m"],
            "write_1h": u["cache_creation_1h"],
            "read": u["cache_read_input_tokens"],
        },
        input_usd=round(m.input_cost(u), 8),
        uncached_usd=round(billed_in * m.input / 1e6, 8),
    )


def _moved_text(moved: Any) -> str:
    """A moved note as "2 lines to messages[3]" (older ledgers kept the lines: only count them)."""
    if not isinstance(moved, dict):
        return ""
    n = moved.get("lines", 0)
    n = len(n) if isinstance(n, list) else int(n or 0)
    return f"{n} line{'s' if n != 1 else ''} to {moved.get('to', '?')}"


@hookimpl
def tokensaver_report_section(plugin: str, calls: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Cache reads/writes, input cost vs uncached, busts and what moved."""
    notes = plugin_notes(calls, plugin)
    if not notes:
        return None
    read = sum(n.get("billed", {}).get("read", 0) for _, n in notes)
    w5 = sum(n.get("billed", {}).get("write_5m", 0) for _, n in notes)
    w1 = sum(n.get("billed", {}).get("write_1h", 0) for _, n in notes)
    in_usd = sum(n.get("input_usd", 0.0) for _, n in notes)
    unc_usd = sum(n.get("uncached_usd", 0.0) for _, n in notes)
    busts = [(c, n) for c, n in notes if n.get("bust")]
    moved = [(c, n) for c, n in notes if n.get("moved")]
    rows = []
    for c, n in notes:
        if n.get("bust") or n.get("moved") or n.get("ttl_switched"):
            b = n.get("bust") or {}
            rows.append(
                {
                    "call": c.get("id"),
                    "conversation": c.get("conversation"),
                    "bust_at": b.get("at", ""),
                    "change": b.get("change", ""),
                    "invalidated_tokens": b.get("invalidated_tokens", 0),
                    "moved": _moved_text(n.get("moved")),
                    "ttl": n.get("ttl_switched", ""),
                }
            )
    summary = (
        f"{len(notes)} calls: cache reads {read:,} tokens, writes {w5:,} (5m) + {w1:,} (1h); "
        f"input side ${in_usd:.4f} billed vs ${unc_usd:.4f} uncached; "
        f"{len(busts)} prefix busts, volatile system lines moved on {len(moved)} calls."
    )
    checkpoints = sum(1 for _, n in notes if n.get("checkpoint"))
    if checkpoints:
        summary += f" 1h checkpoints on {checkpoints} calls (the prefix kept through 5-60 minute pauses)."
    return {"title": "Cache alignment", "summary": summary, "rows": rows[:200]}
