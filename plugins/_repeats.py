"""Lines already in the context: a run of lines that an earlier tool result already shows becomes a pointer.

What it saves: agents re-read files they read before (after an edit, a wider range, the same range
again) and re-run commands whose output is mostly the same; every copy is billed again on every
later call. A run of at least ``min_lines`` consecutive lines (``min_chars`` characters) that an
earlier tool result, still sent in full, shows in the same order is replaced by one line naming
that result and where the run is in it (its line numbers for numbered file contents). Lossless as
long as the earlier result stays in the request: prune calls this from its pure ``apply_spec``, so
a result a cut clears is not pointed to, and a pointer to it becomes the lines again.

Deterministic: a block's rewrite depends only on the blocks before it, so between cuts a result
gets the same bytes on every call; a block is rewritten when it is new, never after it was sent.
Unsafe when the model cannot look back at the earlier result (a client that drops history).
"""

from __future__ import annotations

import re

_NUMBER_RE = re.compile(r"^ *(\d+)(?:→|\t)")
_MAX_CANDIDATES = 8  # earlier places of one line tried as the start of a run


def _key(line: str) -> str:
    """A line as compared. Line numbers count: a shifted re-read would lose the new numbers the
    model quotes (``sed -n 150,160p``), so only lines with the same number match."""
    return line.rstrip()


def _number(line: str) -> int | None:
    m = _NUMBER_RE.match(line)
    return int(m.group(1)) if m else None


def marker(tid: str, n: int, here: tuple[int, int] | None, there: tuple[int, int]) -> str:
    """The pointer line: ``here``/``there`` are line numbers when both copies are numbered, else
    ``there`` is the run's position (1-based line indexes) in the earlier result's text."""
    if here is not None:
        if here == there:
            return f"[tokensaver: lines {here[0]}-{here[1]} as in the tool_use {tid} result above]"
        return (
            f"[tokensaver: lines {here[0]}-{here[1]} as lines {there[0]}-{there[1]} "
            f"of the tool_use {tid} result above]"
        )
    return f"[tokensaver: {n} lines as lines {there[0]}-{there[1]} of the tool_use {tid} result above]"


class LineIndex:
    """The lines of the tool results sent so far, for finding runs a new result repeats."""

    def __init__(self, min_lines: int, min_chars: int) -> None:
        self.min_lines = min_lines
        self.min_chars = min_chars
        self.texts: list[tuple[str, list[str], list[str]]] = []  # (tool_use id, lines, keys)
        self.where: dict[str, list[tuple[int, int]]] = {}  # key -> (text index, line index)

    def add(self, tid: str, lines: list[str]) -> None:
        """Index the lines of a result as sent (markers are not content: they are left out)."""
        keys = [_key(ln) for ln in lines]
        t = len(self.texts)
        self.texts.append((tid, lines, keys))
        for p, k in enumerate(keys):
            if len(k) >= 4 and not k.startswith("[tokensaver:"):
                spots = self.where.setdefault(k, [])
                if len(spots) < _MAX_CANDIDATES:
                    spots.append((t, p))

    def rewrite(self, tid: str, text: str) -> str:
        """``text`` with every long run of lines already indexed replaced by a pointer; then indexed."""
        lines = text.split("\n")
        if len(lines) < self.min_lines:
            self.add(tid, lines)
            return text
        keys = [_key(ln) for ln in lines]
        out: list[str] = []
        i = 0
        changed = False
        while i < len(lines):
            best, at = 0, (0, 0)
            for t, p in self.where.get(keys[i], ()) if len(keys[i]) >= 4 else ():
                old = self.texts[t][2]
                n = 0
                while i + n < len(keys) and p + n < len(old) and keys[i + n] == old[p + n]:
                    n += 1
                if n > best:
                    best, at = n, (t, p)
            if best >= self.min_lines and sum(len(ln) + 1 for ln in lines[i : i + best]) >= self.min_chars:
                t, p = at
            else:
                out.append(lines[i])
                i += 1
                continue
            old_tid, old_lines, _ = self.texts[t]
            first, last = _number(lines[i]), _number(lines[i + best - 1])
            first0, last0 = _number(old_lines[p]), _number(old_lines[p + best - 1])
            if None not in (first, last, first0, last0):
                m = marker(old_tid, best, (first, last), (first0, last0))  # type: ignore[arg-type]
            else:
                m = marker(old_tid, best, None, (p + 1, p + best))
            out.append(m)
            i += best
            changed = True
        self.add(tid, out)
        return "\n".join(out) if changed else text
