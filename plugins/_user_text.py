"""User turns that are tool output in all but name: their repeats of earlier turns sent as pointers.

What it saves: agents that speak to the model without tools (SWE-agent's XML and ``thought_action``
modes, many home-made loops) send each command's output as the text of the next user turn, not
as a ``tool_result``, so neither summarize's rewrites nor prune's repeat pointers saw it. In a text
of a user turn after the first (the task), every run of at least ``MIN_LINES`` lines
(``MIN_CHARS`` characters) that an earlier user turn's text shows in the same order (a file window
shown again after an edit or a scroll, the same listing, a test run repeated) becomes one pointer
line naming that turn: ``[tokensaver: lines 1374-1450 as in user turn 6 above]`` (``_repeats``,
with turns in place of tool results; turn 1 is the task). Only the two agent framings that cannot be
a person's own words are rewritten besides: SWE-agent's three state lines at the end (``(Open
file: F)``, ``(Current directory: D)``, ``bash-$``) as one ``[open: F, cwd: D]`` line, and
mini-swe-agent's ``<returncode>``/``<output>`` tags as one ``[returncode N]`` line (in both, a
traceback's frame lines short, ``compact_frames``; SWE-agent's review note after an edit, once an
earlier observation shows it, as ``NOTE_POINTER``); text a person
typed or pasted (JSON, code, a log) keeps its bytes apart from the pointers. Only in requests that
declare no tools: in a tool loop (Claude Code's user turns) prune's budget cut drops whole old
turns (see below), so there the user turns are only indexed, as they came (targets for
``assistant``'s pointers); on claude-code-entire, pointing there too gave +0.2 pts net on the tuning
half and +1.2 on the validation half, with 3 more lost results there. SWE-agent tuning half: net 15.7% -> 22.4% (its tool-less XML runs).

With ``assistant`` (the ``assistant_texts`` setting, off by default) the model's own text blocks
are indexed and pointed from too (the code it quotes from an earlier turn's text, a file it writes
again in a heredoc); a pointer only ever names a user or assistant turn's text.

Prefix-stable: a text's rewrite depends only on the turns before it (their texts as the client sent
them) and the settings, so it gets the same bytes on every call that resends it; the rewrites are
kept across calls by ``_repeats``' chain keys. Pointers never name tool results: prune never clears
a turn's text (it clears results, which would leave a pointer to nothing). Unsafe when something
downstream drops a whole turn that a later turn points to (prune's budget cut drops whole old
turns; a pointer into a dropped turn then names lines the request no longer holds).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, NamedTuple

from ._repeats import RepeatIndex
from ._summarize_text import (
    STATE_FULL_EVERY,
    compact_frames,
    returncode_header,
    split_state,
    state_cwd,
    unwrap_returncode,
    without_cwd,
)

MIN_LINES = 3  # shortest run of repeated lines sent as a pointer (prune's repeat_min_lines default)
MIN_CHARS = 300  # ... and its fewest characters (prune's repeat_min_chars default before 150)
NOUN = "{}"  # a pointer names the turn it points to: "user turn 6" (1-based, turn 1 is the task)


def framing(text: str) -> tuple[str, str]:
    """A user text without the agent framing that cannot be a person's words (SWE-agent's state
    lines, mini-swe-agent's tags), and what was rewritten (``""``: nothing)."""
    state = split_state(text) if text.endswith("bash-$") else None
    if state is not None:
        return compact_frames(state[0], state_cwd(text)) + state[1], "state"
    wrapped = unwrap_returncode(text) if text.startswith("<returncode>") else None
    if wrapped is not None:
        return returncode_header(wrapped[0]) + compact_frames(wrapped[1]), "returncode"
    return text, ""


def _observations(m: Any, end: int | None = None) -> list[str]:
    """The texts of a user message's tool results and text blocks (those before block ``end``)."""
    content = m.get("content") if isinstance(m, dict) and m.get("role") == "user" else None
    if isinstance(content, str):
        return [content] if end is None else []
    if not isinstance(content, list):
        return []
    out: list[str] = []
    for b in content[:end]:
        if not isinstance(b, dict):
            continue
        if b.get("type") == "text" and isinstance(b.get("text"), str):
            out.append(b["text"])
        elif b.get("type") == "tool_result":
            c = b.get("content")
            if isinstance(c, str):
                out.append(c)
            elif isinstance(c, list):
                out.extend(t["text"] for t in c if isinstance(t, dict) and isinstance(t.get("text"), str))
    return out


def cwd_named(messages: list[Any], i: int, bi: int, cwd: str) -> bool:
    """Whether an earlier SWE-agent observation (a tool result or user text before block ``bi``
    of message ``i``, as the client sent them) names ``cwd`` in full: the run of state lines with
    that directory just before it is not a multiple of ``STATE_FULL_EVERY`` long (0: the first,
    named in full; every 5th is too, so the last few results keep one). A pure function of what
    comes before the block: the same answer on every call that resends it."""
    run = 0
    for j in range(i, -1, -1):
        texts = _observations(messages[j], bi if j == i and bi >= 0 else (0 if j == i else None))
        for text in reversed(texts):
            seen = state_cwd(text)
            if seen is None:
                continue
            if seen != cwd:
                return run % STATE_FULL_EVERY != 0
            run += 1
    return run % STATE_FULL_EVERY != 0


def _before(messages: list[Any], i: int, bi: int) -> Iterator[str]:
    """The observations before block ``bi`` of message ``i``, the nearest first."""
    for j in range(i, -1, -1):
        texts = _observations(messages[j], bi if j == i and bi >= 0 else (0 if j == i else None))
        yield from reversed(texts)


# what SWE-agent says after every edit; after the first, a pointer to it (every 5th in full again)
REVIEW_NOTE = (
    "File updated. Please review the changes and make sure they are correct "
    "(correct indentation, no duplicate lines, etc). Edit the file again if necessary."
)
NOTE_POINTER = "File updated. [tokensaver: review note as above]"
_NOTE_RE = re.compile("^" + re.escape(REVIEW_NOTE) + "$", re.MULTILINE)


def note_shown(messages: list[Any], i: int, bi: int) -> bool:
    """Whether SWE-agent's review note, in an observation before block ``bi`` of message ``i`` (as
    the client sent them), is shown in full in what is sent: the number of earlier observations
    with the note is not a multiple of ``STATE_FULL_EVERY`` (0: the first, sent in full; so is
    every 5th, so one of the last few edits keeps it). A pure function of what comes before."""
    n = sum(1 for text in _before(messages, i, bi) if REVIEW_NOTE in text and _NOTE_RE.search(text))
    return n % STATE_FULL_EVERY != 0


def in_context(text: str, messages: list[Any], i: int, bi: int, original: str) -> str:
    """``text`` (the rewrite of ``original``, a SWE-agent observation, block ``bi`` of message
    ``i``) without what an earlier observation already says: the directory of its state line
    (``named_once``) and the review note after an edit (``note_shown``: ``NOTE_POINTER``)."""
    text = named_once(text, messages, i, bi, original)
    if REVIEW_NOTE in text and state_cwd(original) is not None and _NOTE_RE.search(text):
        if note_shown(messages, i, bi):
            text = _NOTE_RE.sub(NOTE_POINTER, text)
    return text


def named_once(text: str, messages: list[Any], i: int, bi: int, original: str) -> str:
    """``text`` (the rewrite of ``original``, block ``bi`` of message ``i``) without the directory
    in its state line when an earlier observation names it (``cwd_named``)."""
    cwd = state_cwd(original)
    if cwd is None or not text.endswith(f", cwd: {cwd}]") or not cwd_named(messages, i, bi, cwd):
        return text
    return without_cwd(text, cwd)


class State(NamedTuple):
    """What one call's pass left, for the next call of the conversation to go on from: after each
    message, the repeat index's chain key, its feeds and the turns so far; and each text rewritten
    (message, block or -1 for a string content, text as sent, kind, characters before)."""

    checkpoints: tuple[tuple[bytes, int, int, int], ...]
    edits: tuple[tuple[int, int, str, str, int], ...]
    users: bool  # whether user turns were rewritten (else only indexed)

    def nbytes(self) -> int:
        return 64 * len(self.checkpoints) + sum(100 + len(e[2]) for e in self.edits)


def rewrite(
    messages: list[Any],
    stats: dict[str, Any],
    assistant: bool = False,
    state: State | None = None,
    same: int = 0,
    users: bool = True,
    short: bool = False,
) -> tuple[list[Any] | None, State]:
    """The messages with the text of each user turn after the first without its agent framing and
    with its repeats of earlier turns' texts as pointers; with ``assistant`` the model's text blocks
    too (never reframed). None when nothing changed. Per kind rewritten, blocks and characters
    before/after go into ``stats['kinds']``.

    ``state`` is what the last call of the conversation left and ``same`` how many leading messages
    are as it had them: their rewrites are re-applied and the pass goes on from there (the repeat
    index resumed from its chain key), with the same bytes as a pass over them all. With ``users``
    false the user turns are only indexed, as they came (for the model's pointers); ``short``: the
    pointers without the words their ranges imply (``_repeats.marker``)."""
    index = RepeatIndex(MIN_LINES, MIN_CHARS, NOUN, short)
    out: list[Any] | None = None
    turns = {"user": 0, "assistant": 0}
    checkpoints: list[tuple[bytes, int, int, int]] = []
    edits: list[tuple[int, int, str, str, int]] = []
    start = 0
    if state is not None and state.users == users and 0 < same <= len(state.checkpoints):
        key, fed, n_users, n_assistants = state.checkpoints[same - 1]
        if fed == 0 or index.resume(key, fed):
            start = same
            turns = {"user": n_users, "assistant": n_assistants}
            checkpoints = list(state.checkpoints[:same])
            edits = [e for e in state.edits if e[0] < same]
            for i, bi, text, kind, before in edits:
                out = out if out is not None else list(messages)
                m = out[i]
                if bi < 0:
                    out[i] = {**m, "content": text}
                else:
                    parts = list(m["content"])
                    parts[bi] = {**parts[bi], "text": text}
                    out[i] = {**m, "content": parts}
                tally(stats, kind, before, len(text))
    for i in range(start, len(messages)):
        m = messages[i]
        role = m.get("role") if isinstance(m, dict) else None
        if role == "user" or (assistant and role == "assistant"):
            turns[role] += 1
            turn = (role, turns[role])
            content = m.get("content")
            if isinstance(content, str):
                new = _text(content, turn, index, stats, edits, i, -1, users, messages)
                if new is not content:
                    out = out if out is not None else list(messages)
                    out[i] = {**m, "content": new}
            elif isinstance(content, list):
                blocks: list[Any] | None = None
                for bi, b in enumerate(content):
                    if not (
                        isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
                    ):
                        continue
                    new = _text(b["text"], turn, index, stats, edits, i, bi, users, messages)
                    if new is not b["text"]:
                        blocks = blocks if blocks is not None else list(content)
                        blocks[bi] = {**b, "text": new}
                if blocks is not None:
                    out = out if out is not None else list(messages)
                    out[i] = {**m, "content": blocks}
        checkpoints.append((index.key, len(index.fed), turns["user"], turns["assistant"]))
    return out, State(tuple(checkpoints), tuple(edits), users)


def tally(stats: dict[str, Any], kind: str, before: int, after: int) -> None:
    k = stats.setdefault("kinds", {}).setdefault(kind, {"blocks": 0, "chars_before": 0, "chars_after": 0})
    k["blocks"] += 1
    k["chars_before"] += before
    k["chars_after"] += after


def _text(
    text: str,
    turn: tuple[str, int],
    index: RepeatIndex,
    stats: dict[str, Any],
    edits: list[tuple[int, int, str, str, int]],
    i: int,
    bi: int,
    users: bool,
    messages: list[Any],
) -> str:
    """One turn's text as sent (the same object when unchanged); indexed for the turns after it."""
    role, n = turn
    name = f"{role} turn {n}"
    if role == "user" and not users:
        index.add_text(name, text)
        return text
    if (role == "user" and n == 1) or not text:
        index.rewrite(name, text)  # the task: indexed, never rewritten (nothing is before it)
        return text
    framed, kind = framing(text) if role == "user" else (text, "")
    if kind == "state":
        framed = in_context(framed, messages, i, bi, text)
    new = index.rewrite(name, framed)
    if new == text:
        return text
    kind = f"{role}_text:" + (kind or "kept") + ("+repeats" if new != framed else "")
    edits.append((i, bi, new, kind, len(text)))
    tally(stats, kind, len(text), len(new))
    return new
