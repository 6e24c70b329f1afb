"""A run of lines a tool output repeats from its own earlier lines, as a pointer to them.

What it saves: one output that says the same lines twice or more: a chained Python traceback
("During handling of the above exception, another exception occurred") whose second traceback
repeats the first one's frames, a test run printing the same failure for every case, a script that
prints its settings before each step. A run of at least ``MIN_LINES`` lines (``MIN_CHARS``
characters) that the output, as it is sent, shows above it in the same order becomes one line:
``[tokensaver: 5 lines as lines 3-7 of this output above]`` (lines counted in the output as sent,
from 1). Lossless (lines compared right-stripped, as ``_repeats`` does); a function of the text
alone, so the same bytes on every call.
"""

from __future__ import annotations

from ._summarize_text import SPARSE_NOTE_START, full_lines, keep_anchored

MIN_LINES = 3
MIN_CHARS = 100  # twice its short pointer or more (``[tokensaver: repeats lines 3-7 of this output]``)
_MAX_CANDIDATES = 8  # earlier places of one line tried as the start of a run
_POINTER = "[tokensaver:"


def marker(n: int, first: int, short: bool = False, noun: str = "this output") -> str:
    if short:  # the count and "above" are what the range says
        return f"[tokensaver: repeats lines {first}-{first + n - 1} of {noun}]"
    return f"[tokensaver: {n} lines as lines {first}-{first + n - 1} of {noun} above]"


def rewrite(
    text: str,
    min_lines: int = MIN_LINES,
    min_chars: int = MIN_CHARS,
    short: bool = False,
    noun: str = "this output",
) -> str:
    """``text`` with each long run of lines it already showed above as a pointer (the same object
    when there is none); ``short``: ``[tokensaver: repeats lines 3-7 of this output]`` (``noun``:
    how the pointer names the text it is in)."""
    lines = text.split("\n")
    if len(lines) < 2 * min_lines or len(text) < 2 * min_chars:
        return text
    # a sparse run's lines compared under their numbers (the same code twice in a file is no repeat)
    full = full_lines(lines)
    keys = [ln.rstrip() for ln in full]
    out: list[str] = []  # lines as sent
    source: list[int | None] = []  # the line of ``lines`` each of ``out`` is (None: a pointer)
    out_keys: list[str] = []
    where: dict[str, list[int]] = {}  # key -> its places in ``out`` (literal lines only)
    i = 0
    changed = False
    while i < len(lines):
        best, at = 0, 0
        if len(keys[i]) >= 4 and not keys[i].startswith(_POINTER):
            for p in where.get(keys[i], ()):
                n = 0
                while (
                    i + n < len(lines)
                    and p + n < len(out_keys)
                    and keys[i + n] == out_keys[p + n]
                    and not keys[i + n].startswith(SPARSE_NOTE_START)
                ):
                    n += 1
                if n > best:
                    best, at = n, p
        if best >= min_lines and sum(len(ln) + 1 for ln in lines[i : i + best]) >= min_chars:
            m = marker(best, at + 1, short, noun)
            out.append(m)
            out_keys.append(m)
            source.append(None)
            i += best
            changed = True
            continue
        spots = where.setdefault(keys[i], [])
        if len(spots) < _MAX_CANDIDATES and not keys[i].startswith(_POINTER):
            spots.append(len(out))
        out.append(lines[i])
        out_keys.append(keys[i])
        source.append(i)
        i += 1
    return "\n".join(keep_anchored(out, source, lines, full)) if changed else text
