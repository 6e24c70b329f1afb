"""The model's own turns: a run of lines an earlier turn or tool result already shows, as a pointer.

What it saves: an agent's model writes the same lines again and again: a reproduction script
written with a heredoc, then written once more with one line changed; the code it read, quoted in
its reasoning; the command it ran, run again with a longer pipe. Every copy is read again on every
later call. In the model's turns (its text blocks and the ``command`` of its tool uses), every run
of at least ``MIN_LINES`` lines (``MIN_CHARS`` characters) that an earlier turn of the model, an
earlier tool result or the task (the first user message) shows in the same order becomes one pointer line (``_repeats``): ``[tokensaver:
12 lines as lines 3-14 of assistant turn 5's command above]`` (the model's turns counted from 1, as
``_user_text`` counts the user's; a turn's id would say it too, at twice the pointer's tokens),
``... of the tool_use X result above``, ``... of the task above``; code it read with ``nl -ba``
(``cat -n``: a number and a tab before each line) and quotes without the numbers, ``... of the
tool_use X result, its line numbers left out, above`` (mini-swe-agent tuning half, net of lost
facts: 16.27% -> 16.33%: the runs it quotes whole are short). Lossless: every line is in the
request, where the pointer says (compared right-stripped, as ``_repeats`` does). Tuning half of mini-swe-agent, net of lost
facts: 10.9% -> 14.8% with the model's turns as targets, 15.2% with the tool results too, 15.3%
with the task too.

Which tool results are targets: only those prune sends as summarize does, so their line numbering
holds. Prune's repeat pointers shorten a result that shows a run of lines an earlier result or
tool input shows (at least 3 lines, its shortest ``repeat_min_lines``) and its ``dedupe`` replaces
a copy of an earlier result: a result either could change (``GUARD_LINES`` lines, whatever their
characters, fed in prune's order) is never pointed to. A result prune's cut clears later takes
the lines pointed to with it, as it takes the rest of the result: the model sees the result
cleared and runs the command again. Results whose content is a list of blocks are not targets.

A turn with a thinking block is indexed, never rewritten (on models with preserved thinking the
API binds the block to its turn). Prefix-stable: a turn's rewrite depends only on the messages
before it, as sent, so it gets the same bytes on every call that resends it (the rewrites are kept
across calls by ``_repeats``' chain keys). Unsafe when a whole earlier turn is left out of a later
request (prune's budget cut drops whole old turns when clearing tool results is not enough to get
under its budget): a pointer into a dropped turn names lines the request no longer holds.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import xxhash

from ._repeats import RESULT, SHORT_RESULT, RepeatIndex
from ._user_text import tally

MIN_LINES = 3  # shortest run sent as a pointer
# ... and its fewest characters (mini-swe-agent tuning half, turns only, before the ls -l date:
# 300 -> 13.5%, 200 -> 14.0%, 150 -> 14.2%, 100 -> 14.2%); with the short pointers (~70 characters,
# ``short_pointers``) a 100-character run pays too: 150 -> 100 with self_repeats' likewise, net of
# lost facts 16.89% -> 17.09%
MIN_CHARS = 100
NOUN = "{}"  # a pointer names the earlier text in full ("assistant turn 5's command")
FIELDS = ("command",)  # the tool-use input fields rewritten and pointed to (a shell command)
_THINKING = ("thinking", "redacted_thinking")
GUARD_LINES = 3  # prune's shortest repeat run (``repeat_min_lines`` is at least 3)
# a numbered file's lines (``nl -ba``, ``cat -n``: the number, a tab) as the model quotes them
UNNUMBERED = "the tool_use {} result, its line numbers left out,"
# the same places named by the short pointers (``_repeats.marker``'s ``short``, ``SHORT_RESULT``):
# ``[tokensaver: repeats lines 3-9 of the toolu_X result without its line numbers]``
SHORT_UNNUMBERED = "the {} result without its line numbers"
_NUMBERED = re.compile(r"^ *\d+\t", re.MULTILINE)


class State(NamedTuple):
    """What one call's pass left, for the conversation's next call to go on from (as
    ``_user_text.State``): after each message, both repeat indexes' chain keys and feeds, the model's
    turns and the results' digests so far; each text rewritten (message, block, input field or None
    for a text block, text as sent, kind, characters before); the results' digests in order."""

    checkpoints: tuple[tuple[bytes, int, bytes, int, int, int], ...]
    edits: tuple[tuple[int, int, str | None, str, str, int], ...]
    digests: tuple[bytes, ...]

    def nbytes(self) -> int:
        return 96 * len(self.checkpoints) + 16 * len(self.digests) + sum(100 + len(e[3]) for e in self.edits)


def rewrite(
    messages: list[Any],
    stats: dict[str, Any],
    results: bool = True,
    state: State | None = None,
    same: int = 0,
    short: bool = False,
    own: bool = False,
) -> tuple[list[Any] | None, State]:
    """The messages with every long run of lines in a model turn that an earlier model turn (or,
    with ``results``, a tool result prune leaves as it is) shows as a pointer to it (None: nothing
    changed); per kind, blocks and characters before/after go
    into ``stats['kinds']``.

    ``state`` is what the conversation's last call left and ``same`` how many leading messages are
    as it had them: their rewrites are re-applied and the pass goes on from there (both repeat
    indexes resumed from their chain keys), with the same bytes as a pass over them all.

    ``short``: the pointers without the words their ranges imply (``_repeats.marker``); ``own``: a
    run a text or command repeats from its own lines above is a pointer too (``this_text``)."""
    within = this_text if own else None
    index = RepeatIndex(MIN_LINES, MIN_CHARS, NOUN, short, within)
    names = (SHORT_RESULT, SHORT_UNNUMBERED) if short else (RESULT, UNNUMBERED)
    # what prune's repeat pointers could change: a result with any run of 3 lines an earlier
    # result or tool input shows (its shortest run, whatever its characters), or a copy of one
    guard = RepeatIndex(GUARD_LINES, 0) if results else None
    out: list[Any] | None = None
    turn = 0
    digests: list[bytes] = []  # the results' digests, in order (``copies`` as a set)
    checkpoints: list[tuple[bytes, int, bytes, int, int, int]] = []
    edits: list[tuple[int, int, str | None, str, str, int]] = []
    start = 0
    if state is not None and guard is not None and 0 < same <= len(state.checkpoints):
        key, fed, gkey, gfed, n_turns, n_digests = state.checkpoints[same - 1]
        if (fed == 0 or index.resume(key, fed)) and (gfed == 0 or guard.resume(gkey, gfed)):
            start, turn = same, n_turns
            checkpoints = list(state.checkpoints[:same])
            digests = list(state.digests[:n_digests])
            edits = [e for e in state.edits if e[0] < same]
            for i, bi, field, text, kind, before in edits:
                out = out if out is not None else list(messages)
                parts = list(out[i]["content"])
                b = parts[bi]
                parts[bi] = (
                    {**b, "text": text} if field is None else {**b, "input": {**b["input"], field: text}}
                )
                out[i] = {**out[i], "content": parts}
                tally(stats, kind, before, len(text))
        else:  # (an index no longer kept: the pass goes over them all again)
            index = RepeatIndex(MIN_LINES, MIN_CHARS, NOUN, short, within)
            guard = RepeatIndex(GUARD_LINES, 0)
    copies: set[bytes] = set(digests)
    for i in range(start, len(messages)):
        m = messages[i]
        if i == 0 and isinstance(m, dict) and m.get("role") == "user":
            for k, task in enumerate(_texts(m.get("content"))):  # never dropped, never rewritten
                index.add_text("the task" + (f" {k + 1}" if k else ""), task)
        if guard is not None and isinstance(m, dict) and m.get("role") == "user":
            _results(m, index, guard, copies, digests, names)
            checkpoints.append(_checkpoint(index, guard, turn, digests))
            continue
        if not isinstance(m, dict) or m.get("role") != "assistant" or not isinstance(m.get("content"), list):
            checkpoints.append(_checkpoint(index, guard, turn, digests))
            continue
        turn += 1
        content = m["content"]
        frozen = any(isinstance(b, dict) and b.get("type") in _THINKING for b in content)
        blocks: list[Any] | None = None
        texts = 0
        for bi, b in enumerate(content):
            if not isinstance(b, dict):
                continue
            if b.get("type") == "text" and isinstance(b.get("text"), str):
                texts += 1
                name = f"assistant turn {turn}'s text" + (f" {texts}" if texts > 1 else "")
                new = _one(index, name, b["text"], frozen, stats, "assistant_text:repeats")
                if new is not b["text"]:
                    edits.append((i, bi, None, new, "assistant_text:repeats", len(b["text"])))
                    blocks = blocks if blocks is not None else list(content)
                    blocks[bi] = {**b, "text": new}
            elif b.get("type") == "tool_use" and isinstance(b.get("input"), dict):
                given = b["input"]
                changed: dict[str, Any] | None = None
                for f in FIELDS:
                    value = given.get(f)
                    if not isinstance(value, str):
                        continue
                    name = f"assistant turn {turn}'s {f}"
                    new = _one(index, name, value, frozen, stats, f"tool_use_{f}:repeats")
                    if new is not value:
                        edits.append((i, bi, f, new, f"tool_use_{f}:repeats", len(value)))
                        changed = {**(changed or given), f: new}
                if changed is not None:
                    blocks = blocks if blocks is not None else list(content)
                    blocks[bi] = {**b, "input": changed}
        if blocks is not None:
            out = out if out is not None else list(messages)
            out[i] = {**m, "content": blocks}
        if guard is not None:  # prune indexes the inputs as sent, after this pass
            for b in blocks if blocks is not None else content:
                if isinstance(b, dict) and b.get("type") == "tool_use":
                    guard.add_input(str(b.get("id")), b.get("input"))
        checkpoints.append(_checkpoint(index, guard, turn, digests))
    return out, State(tuple(checkpoints), tuple(edits), tuple(digests))


def this_text(name: str) -> str:
    """How a pointer in a model turn's text or command names the text it is in: ``this text``,
    ``this command`` (``name``: ``assistant turn 5's command``, ``... text 2``)."""
    return "this " + name.rsplit("'s ", 1)[-1].split(" ", 1)[0]


def _checkpoint(
    index: RepeatIndex, guard: RepeatIndex | None, turn: int, digests: list[bytes]
) -> tuple[bytes, int, bytes, int, int, int]:
    """Where the pass is after a message: both indexes' chain keys and feeds, the turns, the digests."""
    gkey, gfed = (guard.key, len(guard.fed)) if guard is not None else (b"", 0)
    return (index.key, len(index.fed), gkey, gfed, turn, len(digests))


def _texts(content: Any) -> list[str]:
    """The texts of a message's content (a string, or its text blocks)."""
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        return []
    return [
        b["text"]
        for b in content
        if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
    ]


def _results(
    m: dict[str, Any],
    index: RepeatIndex,
    guard: RepeatIndex,
    copies: set[bytes],
    digests: list[bytes],
    names: tuple[str, str] = (RESULT, UNNUMBERED),
) -> None:
    """Index a user message's tool results that prune sends as they are (no run of lines an
    earlier result or input shows, not a copy of one) as places a later turn of the model may
    point to: ``the tool_use X result``, its lines numbered as summarize sends it (``names``: how a
    pointer names a result and a result without its line numbers)."""
    content = m.get("content")
    if not isinstance(content, list):
        return
    for b in content:
        if not isinstance(b, dict) or b.get("type") != "tool_result":
            continue
        tid, c = str(b.get("tool_use_id")), b.get("content")
        if isinstance(c, list):  # its lines have no one numbering to name: only fed, as prune feeds it
            for t in c:
                if isinstance(t, dict) and t.get("type") == "text" and isinstance(t.get("text"), str):
                    guard.rewrite(tid, t["text"])
            continue
        if not isinstance(c, str):
            continue
        digest = xxhash.xxh3_128_digest(c.encode("utf-8", "surrogatepass"))
        seen = digest in copies
        copies.add(digest)
        digests.append(digest)
        if guard.rewrite(tid, c) is c and not seen:
            index.add_text(names[0].format(tid), c)
            bare = unnumbered(c)
            if bare is not None:  # code the model read, quoted without the numbers `nl -ba` put before it
                index.add_text(names[1].format(tid), bare)


def _one(index: RepeatIndex, name: str, text: str, frozen: bool, stats: dict[str, Any], kind: str) -> str:
    """One text as sent (the same object when unchanged); indexed for the turns after it."""
    if frozen:
        index.add_text(name, text)
        return text
    new = index.rewrite(name, text)
    if new == text:
        return text
    tally(stats, kind, len(text), len(new))
    return new


def unnumbered(text: str) -> str | None:
    """``text`` with the number and tab before each of its numbered lines left out (``nl -ba``,
    ``cat -n``), line for line (None: fewer than ``MIN_LINES`` numbered lines)."""
    if text.count("\t") < MIN_LINES:
        return None
    bare, n = _NUMBERED.subn("", text)
    return bare if n >= MIN_LINES else None
