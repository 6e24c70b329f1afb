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
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
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


def _missing_required(body: dict[str, Any]) -> bool:
    """``body`` lacks a model, a non-empty message list or a positive integer ``max_tokens``."""
    model, messages, max_tokens = body.get("model"), body.get("messages"), body.get("max_tokens")
    return (
        not isinstance(model, str)
        or not model
        or not isinstance(messages, list)
        or not messages
        or not isinstance(max_tokens, int)
        or isinstance(max_tokens, bool)
        or max_tokens < 1
    )


def request_problems(body: Any, sizes: Sizes | None = None) -> list[str]:
    """The rules ``body`` breaks, as ``"rule: what"`` strings (thinking blocks aside)."""
    if not isinstance(body, dict):
        return ["shape: not a JSON object"]
    out: list[str] = []
    if _missing_required(body):
        return ["shape: model, messages and max_tokens are required"]
    records = [message_record(m) for m in body["messages"]]
    out.extend(_record_problems(records))  # the rules of one implementation, as the core's facts use
    n, order_ok = _record_breakpoints(body, records)
    if n > MAX_BREAKPOINTS:
        out.append(f"breakpoints: more than {MAX_BREAKPOINTS} cache_control blocks")
    if not order_ok:
        out.append("breakpoints: a 1h cache_control after a 5m one")
    if _too_large(body, sizes):
        out.append(f"size: over {MAX_REQUEST_BYTES // (1024 * 1024)} MB serialized")
    return out


def thinking_problem(output: dict[str, Any], given: dict[str, Any], scans: Scans | None = None) -> str | None:
    """Thinking blocks are the model's, signed: none may change or appear, the last turn's stay
    (unless the request opens a new user turn)."""
    return _thinking_verdict(
        [b for _, b in _scanned(given, scans)],
        lambda: [b for _, b in _scanned(output, scans)],
        lambda: _loop_thinking(given),
        lambda: _loop_thinking(output),
    )


def _thinking_verdict(
    had: list[dict[str, Any]],
    sent: Callable[[], list[dict[str, Any]]],
    last_in: Callable[[], list[dict[str, Any]]],
    last_out: Callable[[], list[dict[str, Any]]],
) -> str | None:
    """:func:`thinking_problem`'s rule: the input's thinking blocks ``had``, the output's (``sent``),
    each body's last assistant turn's thinking (``last_in`` / ``last_out``; none at a new user turn), each made when needed."""
    if not had:
        return None if not sent() else "thinking: a thinking block the input had not"
    known: dict[str, list[dict[str, Any]]] = {}
    for b in had:
        known.setdefault(_thinking_key(b), []).append(b)
    for b in sent():
        if b not in known.get(_thinking_key(b), ()):
            return "thinking: a thinking block or its signature changed"
    last = last_in()
    if last and last_out() != last:
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


def asked_back(messages: list[Any]) -> int | None:
    """The message whose thinking the API asks back: the last assistant turn, unless the request
    opens a new user turn (a user message with no tool result after it: no tool-use loop going on)."""
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        role = m.get("role") if isinstance(m, dict) else None
        if role == "user":
            content = m.get("content")
            blocks = content if isinstance(content, list) else []
            if not any(isinstance(b, dict) and b.get("type") == "tool_result" for b in blocks):
                return None
        elif role == "assistant":
            return i
    return None


def _loop_thinking(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The thinking blocks of :func:`asked_back`'s message."""
    messages = body.get("messages") or []
    i = asked_back(messages)
    content = messages[i].get("content") if i is not None else None
    blocks = content if isinstance(content, list) else []
    return [b for b in blocks if isinstance(b, dict) and b.get("type") in THINKING_TYPES]


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


# -- incremental: per-message facts --------------------------------------------------------------

# What the rules need of one message, a function of the message alone (its place is the relational
# pass's): (validation summary, its cache_control ttls, whether its last cacheable block has a
# cache_control (None: it has none), its thinking blocks, its role if it is a dict, content is a list).
# The summary is ("F", why) for a message that ends the check, else (role, kind, local problems,
# tool items): kind "str" / "list" / "empty"; items ("u",) a tool_use in a user message, ("r", id,
# after another block) a tool_result, ("R",) a tool_result in an assistant message, ("U", id) a tool_use.
Record = tuple[Any, tuple[str, ...], bool | None, tuple[dict[str, Any], ...], str | None, bool]


def message_record(msg: Any) -> Record:
    """The facts the request rules need of one message (see ``Record``)."""
    if not isinstance(msg, dict):
        return (("F", "content: a message is not {role, content}"), (), None, (), None, False)
    role, content = msg.get("role"), msg.get("content")
    ttls: list[str] = []
    lastcc: bool | None = None
    thinking: list[dict[str, Any]] = []
    is_list = isinstance(content, list)
    if isinstance(content, list):
        for b in content:
            if not isinstance(b, dict):
                continue
            cc = b.get("cache_control")
            if cc:
                ttls.append(str(cc.get("ttl", "5m")) if isinstance(cc, dict) else "5m")
            if b.get("type") in THINKING_TYPES:
                thinking.append(b)
            else:
                lastcc = bool(cc)
    tail = (tuple(ttls), lastcc, tuple(thinking), role if isinstance(role, str) else None, is_list)
    summary: Any
    if role not in ("user", "assistant", "system"):
        summary = ("F", "content: a message is not {role, content}")
    elif isinstance(content, str):
        summary = (role, "str", ("content: an empty message",) if _blank(content) else (), ())
    elif is_list and content:
        local: list[str] = []
        items: list[tuple[Any, ...]] = []
        other = False
        summary = None
        for b in content:
            if not isinstance(b, dict) or not isinstance(b.get("type"), str):
                summary = ("F", "content: a block without a type")
                break
            kind = b["type"]
            if kind == "text" and not (isinstance(b.get("text"), str) and not _blank(b["text"])):
                local.append("content: an empty text block")
            if role == "user":
                if kind == "tool_use":
                    items.append(("u",))
                elif kind == "tool_result":
                    items.append(("r", b.get("tool_use_id"), other))
                else:
                    other = True
            elif role == "assistant":
                if kind == "tool_result":
                    items.append(("R",))
                elif kind == "tool_use":
                    items.append(("U", b.get("id")))
        if summary is None:
            summary = (role, "list", tuple(local), tuple(items))
    elif is_list:
        summary = (role, "empty", (), ())
    else:
        summary = ("F", "content: a message without content")
    return (summary, *tail)


@dataclass
class Facts:
    """One body's per-message records, token counts and serialized sizes (None: not orjson's JSON)."""

    records: list[Record]
    tokens: list[int]
    sizes: list[int | None]
    head: int = 0  # tokens of the tools and system prompt
    count: Callable[[], None] = lambda: None  # fills the counts not yet made (-1), once checked
    # each message's xxh3-128 of its orjson (None: not orjson's JSON), when the core made them
    digests: list[bytes | None] | None = None
    # what the request rules find in ``records`` alone, once found (a pure function of the records:
    # a body whose records equal another's takes them)
    record_problems: list[str] | None = None
    record_breakpoints: tuple[tuple[str, ...], bool | None] | None = None


def message_size(msg: Any) -> int | None:
    try:
        return len(orjson.dumps(msg))
    except TypeError:
        return None


def facts_like(
    messages: list[Any], like: list[Any], base: Facts, fresh: Callable[[Any], tuple[Record, int, int | None]]
) -> Facts:
    """The facts of ``messages``, taken from ``base`` (the facts of ``like``) for each message equal
    to the one at the same place there (from the start, from the end, or both lists' same place);
    ``fresh(message)`` for the others."""
    n, m = len(messages), len(like)
    recs: list[Any] = [None] * n
    toks = [0] * n
    sizes: list[int | None] = [None] * n
    done = [False] * n
    lim = min(n, m)
    i = 0
    while i < lim and messages[i] == like[i]:
        i += 1
    recs[:i], toks[:i], sizes[:i], done[:i] = base.records[:i], base.tokens[:i], base.sizes[:i], [True] * i
    j = 0
    while j < lim - i and messages[n - 1 - j] == like[m - 1 - j]:
        j += 1
    if j:
        recs[n - j :], toks[n - j :], sizes[n - j :] = (
            base.records[m - j :],
            base.tokens[m - j :],
            base.sizes[m - j :],
        )
        done[n - j :] = [True] * j
    for k in range(i, n - j):
        if n == m and messages[k] == like[k]:
            recs[k], toks[k], sizes[k] = base.records[k], base.tokens[k], base.sizes[k]
        else:
            recs[k], toks[k], sizes[k] = fresh(messages[k])
    return Facts(recs, toks, sizes)


# where the last passes over a conversation's records stopped: by the first record's identity, the
# records passed (kept alive, so identity stays theirs) and the pass's state after the last one
_CHECKPOINTS: OrderedDict[int, tuple[list[Record], _PassState]] = OrderedDict()
_MAX_CHECKPOINTS = 64
_LOCK = threading.Lock()


@dataclass
class _PassState:
    out: list[str]
    prev: str | None
    pending: set[str]
    seen_ids: set[str]
    last_conv: str | None

    def copy(self) -> _PassState:
        return _PassState(list(self.out), self.prev, set(self.pending), set(self.seen_ids), self.last_conv)


def _record_problems(records: list[Record]) -> list[str]:
    """``_message_problems`` from the messages' records.

    A conversation's next call resends its records (mostly the same objects, from the per-message
    table) and adds a few: the pass goes on from where the last one over equal leading records stopped.
    """
    n = len(records)
    start, st = 0, None
    if n:
        with _LOCK:
            seen = _CHECKPOINTS.get(id(records[0]))
            if seen is not None:
                _CHECKPOINTS.move_to_end(id(records[0]))
        if seen is not None:
            done, state = seen
            k = len(done)
            if k <= n and records[:k] == done:  # (equal records: the same problems)
                start, st = k, state.copy()
    if st is None:
        st = _PassState([], None, set(), set(), None)
    early = _pass(records, start, st)
    if early is not None:
        return early
    if n and records[-1][0][1] != "empty":  # (an empty last message is allowed only where it is last)
        with _LOCK:
            _CHECKPOINTS[id(records[0])] = (list(records), st)  # (never changed: a resume copies it)
            _CHECKPOINTS.move_to_end(id(records[0]))
            while len(_CHECKPOINTS) > _MAX_CHECKPOINTS:
                _CHECKPOINTS.popitem(last=False)
    out = list(st.out)
    if st.pending:
        out.append("tool_use: not answered in the next user message")
    if st.last_conv is not None and not out and st.last_conv == "assistant":
        out.append("prefill: ends with an assistant message")
    return sorted(set(out), key=out.index)


def _pass(records: list[Record], start: int, st: _PassState) -> list[str] | None:
    """The records from ``start`` on, through ``st``; a problem that ends the check at once."""
    out, prev, pending, seen_ids, last_conv = st.out, st.prev, st.pending, st.seen_ids, st.last_conv
    n = len(records)
    for i in range(start, n):
        summary = records[i][0]
        if summary[0] == "F":
            return [summary[1]]
        role, kind, local, items = summary
        if kind == "empty" and not (i == n - 1 and role == "assistant"):
            return ["content: a message without content"]
        out.extend(local)
        if role == "system":
            continue
        last_conv = role
        if prev is None and role != "user":
            out.append("roles: the first message is not the user's")
        if role == prev:
            out.append("roles: two messages in a row from the same role")
        if role == "user":
            answered: set[str] = set()
            for item in items:
                if item[0] == "u":
                    out.append("tool_use: in a user message")
                else:
                    if item[2]:
                        out.append("tool_result: not first in its user message")
                    if item[1] not in pending:
                        out.append("tool_result: answers no tool_use of the previous message")
                    answered.add(str(item[1]))
            if pending - answered:
                out.append("tool_use: not answered in the next user message")
            pending = set()
        else:
            if pending:
                out.append("tool_use: not answered in the next user message")
            pending = set()
            for item in items:
                if item[0] == "R":
                    out.append("tool_result: in an assistant message")
                else:
                    tid = item[1]
                    if not isinstance(tid, str) or tid in seen_ids:
                        out.append("tool_use: a missing or repeated id")
                    else:
                        seen_ids.add(tid)
                        pending.add(tid)
        prev = role
    st.prev, st.pending, st.last_conv = prev, pending, last_conv
    return None


def _records_ttls(records: list[Record]) -> tuple[tuple[str, ...], bool | None]:
    """The messages' cache_control ttls in order, and whether the last cacheable block has one
    (None: no message block decides it)."""
    ttls: list[str] = []
    last: bool | None = None
    for rec in records:
        if rec[1]:
            ttls.extend(rec[1])
        if rec[2] is not None:
            last = rec[2]
    return tuple(ttls), last


def _record_breakpoints(
    body: dict[str, Any], records: list[Record], facts: Facts | None = None
) -> tuple[int, bool]:
    """``_breakpoints`` from the messages' records (tools and system scanned)."""
    ttls: list[str] = []
    last: bool | None = None
    for seq in (body.get("tools"), body.get("system")):
        if isinstance(seq, list):
            for b in seq:
                if isinstance(b, dict):
                    cc = b.get("cache_control")
                    if cc:
                        ttls.append(str(cc.get("ttl", "5m")) if isinstance(cc, dict) else "5m")
                    if b.get("type") not in THINKING_TYPES:
                        last = bool(cc)
    if facts is not None:
        if facts.record_breakpoints is None:
            facts.record_breakpoints = _records_ttls(records)
        more, last_msg = facts.record_breakpoints
    else:
        more, last_msg = _records_ttls(records)
    ttls.extend(more)
    if last_msg is not None:
        last = last_msg
    n = len(ttls)
    auto = body.get("cache_control")
    if auto and not last:
        n += 1
        ttls.append(str(auto.get("ttl", "5m")) if isinstance(auto, dict) else "5m")
    order_ok = all(not (a == "5m" and b == "1h") for i, a in enumerate(ttls) for b in ttls[i + 1 :])
    return n, order_ok


def _facts_problems(body: dict[str, Any], facts: Facts, sizes: Sizes | None) -> list[str]:
    """``request_problems(body)`` from its facts (same rules, same order)."""
    if _missing_required(body):
        return ["shape: model, messages and max_tokens are required"]
    if facts.record_problems is None:
        facts.record_problems = _record_problems(facts.records)
    out = list(facts.record_problems)
    n, order_ok = _record_breakpoints(body, facts.records, facts)
    if n > MAX_BREAKPOINTS:
        out.append(f"breakpoints: more than {MAX_BREAKPOINTS} cache_control blocks")
    if not order_ok:
        out.append("breakpoints: a 1h cache_control after a 5m one")
    if _facts_too_large(body, facts, sizes):
        out.append(f"size: over {MAX_REQUEST_BYTES // (1024 * 1024)} MB serialized")
    return out


def _facts_too_large(body: dict[str, Any], facts: Facts, sizes: Sizes | None) -> bool:
    """``_too_large(body)``: an upper bound from the messages' sizes first (their orjson lengths)."""
    if None not in facts.sizes:
        try:
            rest = len(orjson.dumps({k: v for k, v in body.items() if k != "messages"}))
        except TypeError:
            rest = -1
        if rest >= 0:
            bound = rest + 16 + sum(facts.sizes) + len(facts.sizes)  # type: ignore[arg-type]
            if bound * _MAX_BYTES_PER_CHAR < MAX_REQUEST_BYTES:
                return False
    return _too_large(body, sizes)


def _facts_thinking(given: Facts, output: Facts) -> str | None:
    """``thinking_problem(output, given)`` from the two bodies' facts."""
    return _thinking_verdict(
        [b for rec in given.records for b in rec[3]],
        lambda: [b for rec in output.records for b in rec[3]],
        lambda: _loop_facts_thinking(given),
        lambda: _loop_facts_thinking(output),
    )


def _loop_facts_thinking(facts: Facts) -> list[dict[str, Any]]:
    """``_loop_thinking`` of the body from its facts."""
    for rec in reversed(facts.records):
        summary = rec[0]
        if rec[4] == "user" and not (summary[0] == "user" and any(item[0] == "r" for item in summary[3])):
            return []
        if rec[4] == "assistant":
            return list(rec[3]) if rec[5] else []
    return []


def facts_stage_problem(
    output: dict[str, Any],
    out_facts: Facts,
    given: dict[str, Any],
    given_facts: Facts,
    sizes: Sizes | None = None,
) -> str | None:
    """``stage_problem(output, given)`` from the bodies' per-message facts: where the output's
    message records equal the input's (the common case: a stage that changed block contents, not
    the conversation's shape), only what lies outside the messages is checked again."""
    same = out_facts.records == given_facts.records
    if same:  # what the records alone give is the input's (found once for the call's bodies)
        out_facts.record_problems = given_facts.record_problems
        out_facts.record_breakpoints = given_facts.record_breakpoints
    problems = _facts_problems(output, out_facts, sizes)
    if problems:
        before = set(_facts_problems(given, given_facts, sizes))
        for rule in problems:
            if rule not in before:
                return rule
        return None
    if same:
        return None
    return _facts_thinking(given_facts, out_facts)


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
