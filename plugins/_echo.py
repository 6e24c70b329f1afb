"""A tool result that echoes its own tool use: numbered lines the call's input already holds become a pointer.

What it saves: an edit command's result shows the edited lines again, numbered (SWE-agent's
``edit 12:14`` prints the window ``12:new code``; Claude Code's Edit prints ``cat -n`` of the
snippet). Those lines are in the tool use's input, which the request already carries just before
the result. A run of at least ``min_lines`` consecutive numbered lines (``N:``, ``N→`` or ``N<tab>``,
no padding, counting up by one) whose text after the number is, in order, lines of one string
field of the input becomes one line naming the field and both ranges.

Lossless and safe against every cut: a tool use and its result are kept or dropped together (prune
clears a result's content, never the tool use), so what the pointer names is always in the
request, right before it. A pure function of the input and the result text: the same result gets
the same bytes on every call.
"""

from __future__ import annotations

import re
from typing import Any

_NUMBERED = re.compile(r"^(\d+)(→|\t|:)")
_SHOWN = {"→": "→", "\t": "\\t", ":": ":"}


def marker(first: int, last: int, sep: str, field: str, start: int, end: int) -> str:
    """The pointer line: result lines numbered ``first``-``last`` (``<n><sep><text>``) are lines
    ``start``-``end`` (1-based) of the input field."""
    return (
        f"[tokensaver: lines {first}-{last} (as {first}{_SHOWN[sep]}text) are lines {start}-{end} "
        f"of {field!r} in this tool use's input]"
    )


def _fields(tool_input: Any, min_lines: int) -> dict[str, list[str]]:
    if not isinstance(tool_input, dict):
        return {}
    return {
        k: v.split("\n")
        for k, v in tool_input.items()
        if isinstance(k, str) and isinstance(v, str) and v.count("\n") >= min_lines - 1
    }


def has_lines(tool_input: Any, min_lines: int = 3) -> bool:
    """Whether the input has a string field of at least ``min_lines`` lines (else nothing to point at)."""
    return isinstance(tool_input, dict) and any(
        isinstance(v, str) and v.count("\n") >= min_lines - 1 for v in tool_input.values()
    )


def rewrite(text: str, tool_input: Any, min_lines: int = 3, min_chars: int = 120) -> str:
    """``text`` with every long run of numbered lines found in ``tool_input`` as a pointer (else ``text``)."""
    fields = _fields(tool_input, min_lines)
    if not fields or "\n" not in text:
        return text
    where: dict[str, list[tuple[str, int]]] = {}
    for name, lines in fields.items():
        for p, ln in enumerate(lines):
            if len(ln.strip()) >= 4:
                where.setdefault(ln, []).append((name, p))
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    changed = False
    while i < len(lines):
        m = _NUMBERED.match(lines[i])
        spots = where.get(lines[i][m.end() :], ()) if m else ()
        best, at = 0, ("", 0)
        for name, p in spots:
            src = fields[name]
            n = 0
            while i + n < len(lines) and p + n < len(src):
                mm = _NUMBERED.match(lines[i + n])
                if not (
                    mm
                    and mm.group(2) == m.group(2)  # type: ignore[union-attr]
                    and int(mm.group(1)) == int(m.group(1)) + n  # type: ignore[union-attr]
                    and lines[i + n][mm.end() :] == src[p + n]
                ):
                    break
                n += 1
            if n > best:
                best, at = n, (name, p)
        if m is None or best < min_lines or sum(len(x) + 1 for x in lines[i : i + best]) < min_chars:
            out.append(lines[i])
            i += 1
            continue
        first = int(m.group(1))
        out.append(marker(first, first + best - 1, m.group(2), at[0], at[1] + 1, at[1] + best))
        i += best
        changed = True
    return "\n".join(out) if changed else text
