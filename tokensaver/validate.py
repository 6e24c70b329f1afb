"""The API's request rules a transform stage must keep, and the shape of a Message a lookup may serve.

No I/O. The pipeline checks every stage's output against its input before the next stage sees it:
``stage_problem(output, given, model)`` names the first rule the output breaks that the input kept
(a caller's own invalid request is not blamed on a stage; the API says what is wrong with it).
``message_problem(answer)`` says why a lookup answer is not a Message.

The rules are a subset of what :func:`tokensaver.emulator.validate` enforces, chosen for what a
transform can break: role alternation, tool_use / tool_result pairing, at most 4 cache breakpoints
(1h before 5m), thinking blocks kept byte for byte, no new trailing assistant message (prefill), a
serialized body under the API's 32 MB request limit, and the body's required fields. They are
relative to the stage's input and never reject fields the emulator does not know. Unifying the two
(the emulator raising API errors built from these checks) is left for when the emulator's billing
split has landed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import orjson

MAX_REQUEST_BYTES = 32 * 1024 * 1024  # the Messages API's request size limit
MAX_BREAKPOINTS = 4
THINKING_TYPES = ("thinking", "redacted_thinking")
# a JSON string costs at most 6 bytes per character (\u00XX escapes) plus its quotes
_MAX_BYTES_PER_CHAR = 6


_T = TypeVar("_T")
Sizes = dict[int, tuple[Any, int]]  # id(block) -> (the block, kept alive; its _chars)
# id(body) -> (the body, kept alive; its thinking blocks with their message index)
Scans = dict[int, tuple[Any, list[tuple[int, dict[str, Any]]]]]


def stage_problem(
    output: Any, given: dict[str, Any], sizes: Sizes | None = None, scans: Scans | None = None
) -> str | None:
    """The first API rule ``output`` breaks that ``given`` (the stage's input) kept, or None.

    :param sizes: per-block sizes by identity, filled and reused by later calls given the same dict
        (a call's stage outputs share the blocks they did not change, which nothing edits).
    :param scans: each body's thinking blocks by identity, filled and reused the same way (a stage's
        output is the next stage's input: scanned once).
    """
    problems = request_problems(output, sizes)
    if problems:
        before = set(request_problems(given, sizes))
        for rule in problems:
            if rule not in before:
                return rule
        return None
    return thinking_problem(output, given, scans)


def request_problems(body: Any, sizes: Sizes | None = None) -> list[str]:
    """The rules ``body`` breaks, as ``"rule: what"`` strings (thinking blocks aside)."""
    if not isinstance(body, dict):
        return ["shape: not a JSON object"]
    out: list[str] = []
    model, messages, max_tokens = body.get("model"), body.get("messages"), body.get("max_tokens")
    if (
        not isinstance(model, str)
        or not model
        or not isinstance(messages, list)
        or not messages
        or not isinstance(max_tokens, int)
        or isinstance(max_tokens, bool)
        or max_tokens < 1
    ):
        return ["shape: model, messages and max_tokens are required"]
    out.extend(_message_problems(messages))
    n, order_ok = _breakpoints(body)
    if n > MAX_BREAKPOINTS:
        out.append(f"breakpoints: more than {MAX_BREAKPOINTS} cache_control blocks")
    if not order_ok:
        out.append("breakpoints: a 1h cache_control after a 5m one")
    if _too_large(body, sizes):
        out.append(f"size: over {MAX_REQUEST_BYTES // (1024 * 1024)} MB serialized")
    return out


def _message_problems(messages: list[Any]) -> list[str]:
    out: list[str] = []
    prev: str | None = None
    pending: set[str] = set()  # tool_use ids the previous assistant message asked for
    seen_ids: set[str] = set()
    conv = [m for m in messages if not (isinstance(m, dict) and m.get("role") == "system")]
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ("user", "assistant", "system"):
            return ["content: a message is not {role, content}"]
        role, content = msg["role"], msg.get("content")
        if isinstance(content, str):
            if _blank(content):
                out.append("content: an empty message")
            blocks: list[Any] = []
        elif isinstance(content, list) and content:
            blocks = content
            for b in blocks:
                if not isinstance(b, dict) or not isinstance(b.get("type"), str):
                    return ["content: a block without a type"]
                if b["type"] == "text" and not (isinstance(b.get("text"), str) and not _blank(b["text"])):
                    out.append("content: an empty text block")
        elif not (i == len(messages) - 1 and role == "assistant" and content == []):
            return ["content: a message without content"]
        else:
            blocks = []
        if role == "system":
            continue
        if prev is None and role != "user":
            out.append("roles: the first message is not the user's")
        if role == prev:
            out.append("roles: two messages in a row from the same role")
        if role == "user":
            answered: set[str] = set()
            other = False
            for b in blocks:
                if b["type"] == "tool_use":
                    out.append("tool_use: in a user message")
                elif b["type"] == "tool_result":
                    if other:
                        out.append("tool_result: not first in its user message")
                    tid = b.get("tool_use_id")
                    if tid not in pending:
                        out.append("tool_result: answers no tool_use of the previous message")
                    answered.add(str(tid))
                else:
                    other = True
            if pending - answered:
                out.append("tool_use: not answered in the next user message")
            pending = set()
        else:
            if pending:
                out.append("tool_use: not answered in the next user message")
            pending = set()
            for b in blocks:
                if b["type"] == "tool_result":
                    out.append("tool_result: in an assistant message")
                elif b["type"] == "tool_use":
                    tid = b.get("id")
                    if not isinstance(tid, str) or tid in seen_ids:
                        out.append("tool_use: a missing or repeated id")
                    else:
                        seen_ids.add(tid)
                        pending.add(tid)
        prev = role
    if pending:
        out.append("tool_use: not answered in the next user message")
    if conv and not out and conv[-1].get("role") == "assistant":
        out.append("prefill: ends with an assistant message")
    return sorted(set(out), key=out.index)


def thinking_problem(output: dict[str, Any], given: dict[str, Any], scans: Scans | None = None) -> str | None:
    """Thinking blocks are the model's, signed: none may change or appear, the last turn's stay."""
    had = _scanned(given, scans)
    if not had:
        return None if not _scanned(output, scans) else "thinking: a thinking block the input had not"
    known: dict[str, list[dict[str, Any]]] = {}
    for _, b in had:
        known.setdefault(_thinking_key(b), []).append(b)
    for _, b in _scanned(output, scans):
        if b not in known.get(_thinking_key(b), ()):
            return "thinking: a thinking block or its signature changed"
    last_in = _last_assistant_thinking(given)
    if last_in and _last_assistant_thinking(output) != last_in:
        return "thinking: the last assistant turn lost its thinking blocks"
    return None


def _by_identity(memo: dict[int, tuple[Any, _T]], obj: Any, compute: Callable[[Any], _T]) -> _T:
    """``compute(obj)``, kept in ``memo`` by ``obj``'s identity (``obj`` kept alive, so its id is not reused)."""
    seen = memo.get(id(obj))
    if seen is not None and seen[0] is obj:
        return seen[1]
    value = compute(obj)
    memo[id(obj)] = (obj, value)
    return value


def _scanned(body: dict[str, Any], scans: Scans | None) -> list[tuple[int, dict[str, Any]]]:
    """``_thinking_blocks(body)``, kept in ``scans`` by the body's identity."""
    if scans is None:
        return _thinking_blocks(body)
    return _by_identity(scans, body, _thinking_blocks)


def _thinking_blocks(body: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    out: list[tuple[int, dict[str, Any]]] = []
    for i, m in enumerate(body.get("messages") or []):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            out.extend((i, b) for b in content if isinstance(b, dict) and b.get("type") in THINKING_TYPES)
    return out


def _thinking_key(block: dict[str, Any]) -> str:
    return str(block.get("signature") if block.get("type") == "thinking" else block.get("data"))


def _last_assistant_thinking(body: dict[str, Any]) -> list[dict[str, Any]]:
    for m in reversed(body.get("messages") or []):
        if isinstance(m, dict) and m.get("role") == "assistant":
            content = m.get("content")
            if not isinstance(content, list):
                return []
            return [b for b in content if isinstance(b, dict) and b.get("type") in THINKING_TYPES]
    return []


def _breakpoints(body: dict[str, Any]) -> tuple[int, bool]:
    """How many breakpoints the API counts (explicit, plus the automatic one), and 1h-before-5m."""
    ttls: list[str] = []
    last_cacheable: dict[str, Any] | None = None

    def scan(seq: Any) -> None:
        nonlocal last_cacheable
        if not isinstance(seq, list):
            return
        for b in seq:
            if not isinstance(b, dict):
                continue
            cc = b.get("cache_control")
            if cc:
                ttls.append(str(cc.get("ttl", "5m")) if isinstance(cc, dict) else "5m")
            if b.get("type") not in THINKING_TYPES:
                last_cacheable = b

    scan(body.get("tools"))
    scan(body.get("system"))
    for m in body.get("messages") or []:
        if isinstance(m, dict):
            scan(m.get("content"))
    n = len(ttls)
    auto = body.get("cache_control")
    if auto and (last_cacheable is None or not last_cacheable.get("cache_control")):
        n += 1
        ttls.append(str(auto.get("ttl", "5m")) if isinstance(auto, dict) else "5m")
    order_ok = all(not (a == "5m" and b == "1h") for i, a in enumerate(ttls) for b in ttls[i + 1 :])
    return n, order_ok


def _blank(text: str) -> bool:
    """``not text.strip()``, without copying the text."""
    return not text or text.isspace()


def _too_large(body: dict[str, Any], sizes: Sizes | None = None) -> bool:
    try:
        # cheap bound, one C pass: the check's encoding (ASCII escapes) takes at most 6 bytes for
        # each UTF-8 byte of orjson's compact one
        if len(orjson.dumps(body)) * _MAX_BYTES_PER_CHAR < MAX_REQUEST_BYTES:
            return False
    except TypeError:  # not JSON orjson takes (huge ints, non-string keys): the Python walk
        if _body_chars(body, sizes) * _MAX_BYTES_PER_CHAR < MAX_REQUEST_BYTES:
            return False  # cheap bound: no encoding of this body can reach the limit
    return len(json.dumps(body, separators=(",", ":")).encode()) > MAX_REQUEST_BYTES


def _body_chars(body: dict[str, Any], sizes: Sizes | None) -> int:
    """``_chars(body)``, each block's share taken from (and kept in) ``sizes`` by identity."""
    if sizes is None:
        return _chars(body)

    def block(b: Any) -> int:
        return _by_identity(sizes, b, _chars)

    def blocks(seq: list[Any]) -> int:
        return 2 + sum(block(b) + 1 for b in seq)

    total = 2
    for key, value in body.items():
        total += len(str(key)) + 2
        if key == "messages" and isinstance(value, list):
            total += 2
            for m in value:
                if isinstance(m, dict):
                    total += 3 + sum(
                        len(str(k)) + 2 + (blocks(v) if k == "content" and isinstance(v, list) else _chars(v))
                        for k, v in m.items()
                    )
                else:
                    total += _chars(m) + 1
        elif key in ("system", "tools") and isinstance(value, list):
            total += blocks(value)
        else:
            total += _chars(value)
    return total


def _chars(node: Any) -> int:
    """Characters of the strings in ``node``, plus a few per container and scalar (an upper bound / 6)."""
    if isinstance(node, str):
        return len(node) + 1
    if isinstance(node, dict):
        return 2 + sum(len(str(k)) + 2 + _chars(v) for k, v in node.items())
    if isinstance(node, list):
        return 2 + sum(_chars(v) + 1 for v in node)
    return 4


# -- lookup answers ------------------------------------------------------------------------------


def message_problem(answer: Any) -> str | None:
    """Why ``answer`` is not a Messages API Message the core could serve, or None."""
    if not isinstance(answer, dict):
        return f"not a Message: a {type(answer).__name__}"
    if answer.get("type") != "message":
        return "not a Message: type is not 'message'"
    if answer.get("role") != "assistant":
        return "not a Message: role is not 'assistant'"
    content = answer.get("content")
    if not isinstance(content, list):
        return "not a Message: content is not a list of blocks"
    if not all(isinstance(b, dict) and isinstance(b.get("type"), str) for b in content):
        return "not a Message: a content block without a type"
    if not isinstance(answer.get("usage"), dict):
        return "not a Message: no usage"
    return None
