"""Shared helpers for walking Messages API bodies (used by cache_align and prune; read-only for others).

Nothing here saves tokens by itself. Every helper treats its input as immutable and returns new
objects, so a plugin can build its new body from them without touching the caller's dicts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tokensaver.billing import block_cacheable
from tokensaver.context import strip_cache_control
from tokensaver.tokens import MESSAGE_OVERHEAD, content_hash, content_memo

LOOKBACK_BLOCKS = 20
MAX_BREAKPOINTS = 4


strip_cc = strip_cache_control


def block_hash(block: Any) -> str:
    """A stable hash of a block's content, breakpoints excluded (kept by the block's fast digest,
    so a block seen before costs one orjson pass)."""
    return str(content_memo().get("_blocks.block_hash", block, _stripped_hash))


def _stripped_hash(block: Any) -> str:
    return content_hash(strip_cc(block))


def as_blocks(content: Any) -> list[Any]:
    """A message's (or system prompt's) content as a list of blocks; a string becomes one text block."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if isinstance(content, list):
        return list(content)
    return []


def normalized(body: dict[str, Any]) -> dict[str, Any]:
    """A shallow copy with ``system`` and every message's ``content`` as block lists.

    The same conversion every turn, so the bytes stay stable; it lets a breakpoint go on any block.
    """
    out = dict(body)
    if isinstance(body.get("system"), str):
        out["system"] = as_blocks(body["system"])
    msgs = []
    for m in body.get("messages") or []:
        if isinstance(m, dict) and isinstance(m.get("content"), str):
            m = {**m, "content": as_blocks(m["content"])}
        msgs.append(m)
    out["messages"] = msgs
    return out


def kept_digests(handed: Any, came: Any, messages: list[Any]) -> list[bytes | None] | None:
    """The core's digests of a stage's input messages (``handed``: ``ctx.message_digests`` of
    ``came``) for ``messages``, a list the stage made from them (:func:`normalized`...): a message's
    where it is the very one that came, None where the stage made it anew; None when none were handed."""
    if (
        not isinstance(handed, list)
        or not isinstance(came, list)
        or not len(handed) == len(came) == len(messages)
    ):
        return None
    return [d if a is b else None for a, b, d in zip(messages, came, handed, strict=True)]


@dataclass(frozen=True)
class Slot:
    """One block of the cacheable prefix, in the API's prefix order (tools, system, messages)."""

    loc: str  # "tools[i]", "system[i]" or "messages[i].content[j]"
    section: str  # "tools" | "system" | "messages"
    i: int  # index in tools/system, or message index
    j: int  # block index within the message (-1 outside messages)
    block: Any


def prefix_slots(body: dict[str, Any]) -> list[Slot]:
    """Every block of the request's prefix, in order, with its location."""
    out: list[Slot] = []
    for i, t in enumerate(body.get("tools") or []):
        out.append(Slot(f"tools[{i}]", "tools", i, -1, t))
    system = body.get("system")
    for i, b in enumerate(as_blocks(system) if system is not None else []):
        out.append(Slot(f"system[{i}]", "system", i, -1, b))
    for i, m in enumerate(body.get("messages") or []):
        if not isinstance(m, dict):
            continue
        for j, b in enumerate(as_blocks(m.get("content"))):
            out.append(Slot(f"messages[{i}].content[{j}]", "messages", i, j, b))
    return out


def cumulative_tokens(slots: list[Slot], count: Any) -> list[int]:
    """Tokens of the prefix up to and including each slot (message framing counted at its first block)."""
    total = 0
    out = []
    last_msg = -1
    for s in slots:
        if s.section == "messages" and s.i != last_msg:
            total += MESSAGE_OVERHEAD
            last_msg = s.i
        total += count(s.block)
        out.append(total)
    return out


def cacheable(block: Any) -> bool:
    """Whether a block may carry ``cache_control``: billing's rule (not thinking, not an empty text
    block), and not a ``defer_loading`` tool (the API refuses a breakpoint on one)."""
    return isinstance(block, dict) and not block.get("defer_loading") and block_cacheable(block)


def with_cc(block: dict[str, Any], cc: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of ``block`` with ``cache_control`` set (or removed when cc is None)."""
    out = {k: v for k, v in block.items() if k != "cache_control"}
    if cc is not None:
        out["cache_control"] = cc
    return out


def cc_ttl(cc: Any) -> str:
    """The TTL of a ``cache_control`` value ("5m" when not given)."""
    if isinstance(cc, dict) and cc.get("ttl") == "1h":
        return "1h"
    return "5m"


def tool_uses(messages: list[Any]) -> dict[str, tuple[int, int, str]]:
    """``tool_use`` id -> (message index, block index, tool name)."""
    out: dict[str, tuple[int, int, str]] = {}
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") != "assistant":
            continue
        for j, b in enumerate(as_blocks(m.get("content"))):
            if isinstance(b, dict) and b.get("type") in ("tool_use", "server_tool_use"):
                out[str(b.get("id"))] = (i, j, str(b.get("name", "")))
    return out


def iter_tool_results(messages: list[Any]) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """(message index, block index, block) of every ``tool_result`` block, oldest first."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") != "user":
            continue
        for j, b in enumerate(as_blocks(m.get("content"))):
            if isinstance(b, dict) and b.get("type") == "tool_result":
                yield i, j, b


def request_problems(body: dict[str, Any]) -> list[str]:
    """Why the API would reject this request's structure (empty list when it looks valid).

    Checks what transforms can break: role order, tool_use/tool_result pairing, empty content,
    duplicate tool ids, and the prompt-caching rules (at most 4 breakpoints, 1h before 5m, none on
    thinking or empty blocks). As the API does, a ``system`` message inside ``messages`` (Claude
    Code 2.1.33x) stands outside the turn order, and two user messages in a row are one turn
    (OpenClaw sends a context message after its tool results).
    """
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return ["messages: missing or empty"]
    check = TurnCheck()
    for i, m in enumerate(msgs):
        check.feed(i, m)
    return check.problems() + cache_control_problems(body)


class TurnCheck:
    """The turn-order checks of :func:`request_problems`, fed one message at a time.

    What a later message is checked against is kept (the tool_use ids so far, the previous turn's
    role and tool_use ids), not the messages: a caller that has checked a conversation's messages
    goes on with its new ones (prune, between cuts). The problems come in request_problems' order.
    """

    def __init__(self) -> None:
        self.turns = 0
        self.first_role: Any = None
        self.system: list[str] = []  # empty system messages
        self.found: list[str] = []  # the turns' problems, in order
        self.seen_ids: set[Any] = set()
        self.prev_role: Any = None
        self.prev_i = -1
        self.prev_uses: list[Any] = []  # the previous turn's tool_use ids (tool_use blocks only)

    def problems(self) -> list[str]:
        """What was found so far (before the cache_control rules)."""
        first = (
            []
            if self.turns and self.first_role == "user"
            else ["messages[0]: first message is not from the user"]
        )
        return first + self.system + self.found

    def feed(self, i: int, m: Any) -> None:
        """Check ``messages[i]`` after the messages fed before it."""
        if isinstance(m, dict) and m.get("role") == "system":
            if not as_blocks(m.get("content")):
                self.system.append(f"messages[{i}]: empty content")
            return
        found = self.found
        role = m.get("role")
        if self.turns == 0:
            self.first_role = role
        blocks = as_blocks(m.get("content"))
        if self.prev_role == "assistant" and self.prev_uses:
            # tool_use must be answered at the start of the next user message
            answered = {
                b.get("tool_use_id") for b in blocks if isinstance(b, dict) and b.get("type") == "tool_result"
            }
            for u in self.prev_uses:
                if u not in answered:
                    found.append(f"messages[{self.prev_i}]: tool_use {u} has no tool_result after it")
        if role not in ("user", "assistant"):
            found.append(f"messages[{i}]: bad role {role!r}")
        if role == "assistant" and self.turns and self.prev_role == role:
            found.append(f"messages[{i}]: role {role!r} twice in a row")
        if not blocks:
            found.append(f"messages[{i}]: empty content")
        for j, b in enumerate(blocks):
            if isinstance(b, dict) and b.get("type") == "text" and not b.get("text"):
                found.append(f"messages[{i}].content[{j}]: empty text block")
        uses = [b.get("id") for b in blocks if isinstance(b, dict) and b.get("type") == "tool_use"]
        for u in uses:
            if u in self.seen_ids:
                found.append(f"messages[{i}]: duplicate tool_use id {u}")
            self.seen_ids.add(u)
        if role == "user":
            prev_ids = set(self.prev_uses)
            seen_other = False
            for j, b in enumerate(blocks):
                if isinstance(b, dict) and b.get("type") == "tool_result":
                    if seen_other:
                        found.append(f"messages[{i}].content[{j}]: tool_result after other content")
                    if b.get("tool_use_id") not in prev_ids:
                        found.append(f"messages[{i}].content[{j}]: tool_result without its tool_use")
                else:
                    seen_other = True
        self.turns += 1
        self.prev_role, self.prev_i, self.prev_uses = role, i, uses


def _message_blocks(msgs: list[Any]) -> Iterator[tuple[int, int, Any]]:
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            continue
        content = m.get("content")
        for j, b in enumerate(content if isinstance(content, list) else as_blocks(content)):
            yield i, j, b


def _cc_of(block: Any) -> Any:
    return block.get("cache_control") if isinstance(block, dict) else None


def cache_control_problems(body: dict[str, Any], at: list[tuple[int, int]] | None = None) -> list[str]:
    """Breakpoint rules: at most 4 (top-level automatic mode counts), 1h before 5m, cacheable blocks.

    ``at``: (message, block) of every message block that may have one, in order, when known."""
    problems = []
    ttls = []
    system = body.get("system")
    for b in [*(body.get("tools") or []), *(as_blocks(system) if system is not None else [])]:
        cc = _cc_of(b)
        if cc is not None:
            ttls.append(cc_ttl(cc))
    msgs = body.get("messages") or []
    for i, j, b in _message_blocks(msgs) if at is None else ((i, j, msgs[i]["content"][j]) for i, j in at):
        cc = _cc_of(b)
        if cc is None:
            continue
        if not cacheable(b):
            problems.append(f"messages[{i}].content[{j}]: cache_control on a block that cannot carry one")
        ttls.append(cc_ttl(cc))
    if body.get("cache_control") is not None:
        ttls.append(cc_ttl(body["cache_control"]))
    if len(ttls) > MAX_BREAKPOINTS:
        problems.append(f"{len(ttls)} cache breakpoints (at most {MAX_BREAKPOINTS})")
    if "1h" in ttls and "5m" in ttls and ttls.index("5m") < len(ttls) - 1 - ttls[::-1].index("1h"):
        problems.append("a 1h cache breakpoint comes after a 5m one")
    return problems
