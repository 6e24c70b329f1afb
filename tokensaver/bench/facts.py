"""Fact retention for ``tokensaver bench``: did the facts the model used survive the transforms?

For call k of a conversation: the *facts* of a text are the tokens that look like identifiers
(snake_case / camelCase / with digits, at least 4 characters), numbers (3+ digits, or with a dot),
paths (a ``/`` with a leading ``/``, ``.``, ``~`` or two slashes, or a file extension) and quoted
strings. A fact is **used** when it occurs in a tool output of the original request *and* in the
real assistant reply at call k (the model read it there and quoted it). It is **kept** when it
still occurs, as a whole word, anywhere in the body the emulator received for that call.

A used fact that is not kept is **lost**; :meth:`FactTracker.lost_results` names the tool result it
came from (the latest one in the original request that holds it), so the bench can price the round
the agent would make to get it back once per result (see :func:`tokensaver.bench.runner.lost_round_usd`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

_IDENT = re.compile(r"(?<![\w])[A-Za-z_][A-Za-z0-9_]{3,}(?![\w])")
_NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)+(?![\w])|(?<![\w.])\d{3,}(?![\w])")
_PATHISH = re.compile(
    r"(?<![\w/.~-])[\w.~-]*(?:/[\w.-]+)+/?|(?<![\w/.-])[\w-]+\.[A-Za-z][A-Za-z0-9]{0,4}(?![\w])"
)
_QUOTED = re.compile(r"\"([^\"\n]{3,80})\"|(?<![\w])'([^'\n]{3,80})'(?![\w])|`([^`\n]{3,80})`")
_EXTENSIONS = frozenset(
    "py js ts tsx jsx json md txt rst toml yaml yml cfg ini sh go rs java c h cc cpp hpp rb php html "
    "css scss sql csv log xml lock pyi ex exs swift kt scala vue svelte env conf".split()
)
_BLOCK_KEYS = frozenset({"id", "tool_use_id", "role", "model", "name"})
_MAX_TEXT = 400_000  # per text, to bound the cost on huge blobs


def _is_ident(tok: str) -> bool:
    if "_" in tok.strip("_") or any(c.isdigit() for c in tok):
        return True
    return any(c.isupper() for c in tok[1:])


def _is_path(tok: str) -> bool:
    if len(tok) < 4:
        return False
    if "/" in tok:
        if "://" in tok or tok.startswith(("/", "./", "../", "~")) or tok.count("/") >= 2:
            return any(c.isalpha() for c in tok)
        tail = tok.rsplit("/", 1)[-1]
        return "." in tail and tail.rsplit(".", 1)[-1].lower() in _EXTENSIONS
    ext = tok.rsplit(".", 1)[-1].lower() if "." in tok else ""
    return ext in _EXTENSIONS


def extract_facts(text: str) -> set[str]:
    """The facts (identifiers, numbers, paths, quoted strings) that occur in ``text``."""
    if not text:
        return set()
    text = text[:_MAX_TEXT]
    out: set[str] = set()
    for m in _IDENT.finditer(text):
        tok = m.group(0)
        if _is_ident(tok):
            out.add(tok)
    out.update(m.group(0) for m in _NUMBER.finditer(text))
    for m in _PATHISH.finditer(text):
        tok = m.group(0).rstrip(".")
        if _is_path(tok):
            out.add(tok)
    for m in _QUOTED.finditer(text):
        q = next(g for g in m.groups() if g is not None).strip()
        if len(q) >= 3:
            out.add(q)
    return out


def iter_strings(obj: Any) -> Iterator[str]:
    """Every string value inside a JSON value (keys and block types excluded)."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, list):
        for v in obj:
            yield from iter_strings(v)
    elif isinstance(obj, dict):
        block = "type" in obj or "role" in obj
        for k, v in obj.items():
            if k in ("type", "cache_control", "signature") or (block and k in _BLOCK_KEYS):
                continue
            yield from iter_strings(v)


def tool_results(body: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every tool_result block in a request body, in order."""
    for m in body.get("messages") or []:
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            continue
        for b in content:
            if isinstance(b, dict) and b.get("type") == "tool_result":
                yield b


def tool_outputs(body: dict[str, Any]) -> Iterator[str]:
    """The text of every tool_result block in a request body."""
    for b in tool_results(body):
        yield "\n".join(iter_strings(b.get("content")))


def reply_text(reply: Iterable[dict[str, Any]] | None) -> str:
    """Text of the real assistant reply: text blocks and tool_use inputs (thinking excluded)."""
    parts: list[str] = []
    for b in reply or []:
        if not isinstance(b, dict):
            continue
        if b.get("type") == "text":
            parts.append(str(b.get("text", "")))
        elif b.get("type") == "tool_use":
            parts.extend(iter_strings(b.get("input")))
    return "\n".join(parts)


def _occurs(fact: str, blob: str) -> bool:
    """``fact`` occurs in ``blob`` as a whole token (not inside a longer word or number)."""
    start = 0
    n = len(fact)
    while True:
        i = blob.find(fact, start)
        if i < 0:
            return False
        before = blob[i - 1] if i > 0 else " "
        after = blob[i + n] if i + n < len(blob) else " "
        if not (before.isalnum() or before == "_") and not (after.isalnum() or after == "_"):
            return True
        start = i + 1


class FactTracker:
    """Facts used per call of one conversation (computed once, shared by every configuration)."""

    def __init__(self) -> None:
        self._cache: dict[str, frozenset[str]] = {}

    def _facts(self, text: str) -> frozenset[str]:
        hit = self._cache.get(text)
        if hit is None:
            hit = self._cache[text] = frozenset(extract_facts(text))
        return hit

    def used(self, body: dict[str, Any], reply: list[dict[str, Any]] | None) -> frozenset[str]:
        """Facts in the reply that also occur in a tool output of ``body``."""
        said = extract_facts(reply_text(reply))
        if not said:
            return frozenset()
        seen: set[str] = set()
        for text in tool_outputs(body):
            seen |= self._facts(text) & said
            if len(seen) == len(said):
                break
        return frozenset(seen)

    def lost_results(
        self, used: Iterable[str], original: dict[str, Any], sent_body: Any
    ) -> tuple[int, dict[str, dict[str, Any]]]:
        """How many of ``used`` were kept in ``sent_body``, and the tool results the others came from.

        The second item maps a tool_use_id to its tool_result block in ``original`` (the request as
        recorded): for each lost fact, the latest result there that holds it. Several lost facts
        of one result name it once.
        """
        facts = list(used)
        if not facts:
            return 0, {}
        blob = "\n".join(iter_strings(sent_body))
        lost = [f for f in facts if not _occurs(f, blob)]
        if not lost:
            return len(facts), {}
        results = list(tool_results(original))
        out: dict[str, dict[str, Any]] = {}
        for fact in lost:
            for b in reversed(results):
                if fact in self._facts("\n".join(iter_strings(b.get("content")))):
                    out.setdefault(str(b.get("tool_use_id")), b)
                    break
        return len(facts) - len(lost), out


def kept(facts: Iterable[str], sent_body: Any) -> int:
    """How many of ``facts`` still occur somewhere in the body that was sent."""
    facts = list(facts)
    if not facts:
        return 0
    blob = "\n".join(iter_strings(sent_body))
    return sum(1 for f in facts if _occurs(f, blob))
