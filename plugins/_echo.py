"""A tool result that echoes its own tool use: numbered lines the call's input already holds become a pointer.

What it saves: an edit command's result shows the edited lines again, numbered (SWE-agent's
``edit 12:14`` prints the window ``12:new code``; Claude Code's Edit prints ``cat -n`` of the
snippet). Those lines are in the tool use's input, which the request already carries just before
the result. A run of at least ``min_lines`` consecutive numbered lines (``N:``, ``N→`` or ``N<tab>``,
no padding, counting up by one) whose text after the number is, in order, lines of one string
field of the input (compared right-stripped: a diff shows a line of spaces as ``+``) becomes one line
naming the field and both ranges. So does a run of a diff's
added lines (``+text``: OpenHands' ``create`` answers with the new file as a diff of its
``file_text``, every line of it again).

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


def added_marker(count: int, field: str, start: int, end: int) -> str:
    """The pointer line: the next ``count`` added lines (``+<text>``) are lines ``start``-``end`` of the field."""
    return (
        f"[tokensaver: {count} added lines (as +text) are lines {start}-{end} "
        f"of {field!r} in this tool use's input]"
    )


def _form(line: str) -> tuple[str, int, str] | None:
    """(separator, number, text) of a numbered line, ("+", 0, text) of a diff's added line, else None."""
    m = _NUMBERED.match(line)
    if m is not None:
        return m.group(2), int(m.group(1)), line[m.end() :]
    if line.startswith("+") and not line.startswith("+++ "):
        return "+", 0, line[1:]
    return None


def _follows(line: str, sep: str, number: int, text: str) -> bool:
    """Whether ``line`` is the run's next line: the same form, the next number, ``text`` after it."""
    form = _form(line)
    return (
        form is not None
        and form[0] == sep
        and (sep == "+" or form[1] == number)
        and form[2].rstrip() == text.rstrip()
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
                where.setdefault(ln.rstrip(), []).append((name, p))
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    changed = False
    while i < len(lines):
        form = _form(lines[i])
        spots = where.get(form[2].rstrip(), ()) if form else ()
        best, at = 0, ("", 0)
        for name, p in spots:
            assert form is not None
            src = fields[name]
            n = 0
            while (
                i + n < len(lines)
                and p + n < len(src)
                and _follows(lines[i + n], form[0], form[1] + n, src[p + n])
            ):
                n += 1
            if n > best:
                best, at = n, (name, p)
        if form is None or best < min_lines or sum(len(x) + 1 for x in lines[i : i + best]) < min_chars:
            out.append(lines[i])
            i += 1
            continue
        sep, first = form[0], form[1]
        if sep == "+":
            out.append(added_marker(best, at[0], at[1] + 1, at[1] + best))
        else:
            out.append(marker(first, first + best - 1, sep, at[0], at[1] + 1, at[1] + best))
        i += best
        changed = True
    return "\n".join(out) if changed else text
