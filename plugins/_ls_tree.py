"""An ``ls -R`` listing as a tree: one line per directory, its entries after the colon.

What it saves: ``ls -R`` prints every directory as its full path on a line, then one entry per
line, then a blank line; a checkout's listing is mostly those newlines and the paths said again
and again (``./django/conf/locale/fr/LC_MESSAGES:``). Here each directory is one line, ``name:
entry entry ...``, indented one space deeper than the directory it is in and named relative to it
(the first directory of a run, and one under none of the directories above, with its path as
``ls`` printed it); a directory whose directories hold none says them in its line, each after its
own name (``af: LC_MESSAGES{django.mo django.po}``). A marker line before the run says how to read
it. Lossless: the run of lines is rewritten only when reading the tree back gives it again
exactly (``expand``), and only when no name holds a space (entries are parted by spaces); lines
around the run as they came. About a
third of the listing's tokens (mini-swe-agent's ``ls -R`` of a Django checkout, its head and tail
as the agent cut them: 3,098 -> 2,022 tokens, cl100k; mini-swe-agent tuning half, net of lost
facts: 15.6% -> 16.3%, 16.4% with the directories in their directory's line).
"""

from __future__ import annotations

import re

MARKER = (
    "[tokensaver: ls -R below as a tree: a directory per line, its entries after the colon; "
    "an indented directory is in the nearest one above with one space less; name{a b}: "
    "a directory holding a and b]"
)
MIN_BLOCKS = 3  # directories in a run (one of them in another)
_HEADER = re.compile(r"[^\s:]+:")
_ENTRY = re.compile(r"[^\s<\[]\S*")  # never a tag line (``</output_head>``) or a marker


def compact(lines: list[str]) -> list[str] | None:
    """``lines`` with each run of ``ls -R`` directory listings as a tree after a marker line
    (None: no run found)."""
    out: list[str] = []
    i, n = 0, len(lines)
    changed = False
    while i < n:
        run = _run(lines, i) if _HEADER.fullmatch(lines[i]) else None
        if run is None:
            out.append(lines[i])
            i += 1
            continue
        end, blocks = run
        tree = _tree(blocks)
        if tree is not None and expand(inlined := _inline(tree)) == lines[i:end]:
            tree = inlined
        if tree is None or expand(tree) != lines[i:end]:
            out.extend(lines[i:end])  # a later start in the same run would not nest either
            i = end
            continue
        out.append(MARKER)
        out.extend(tree)
        i = end
        changed = True
    return out if changed else None


def _run(lines: list[str], start: int) -> tuple[int, list[tuple[str, list[str]]]] | None:
    """(end, [(path, entries)]) of the directory listings from ``start``: a header ``path:``,
    its entries one per line up to a blank line, a tag line (``</output_head>``) or the end, one
    blank line, the next header; None when fewer than ``MIN_BLOCKS`` of them."""
    blocks: list[tuple[str, list[str]]] = []
    i, n = start, len(lines)
    end = start
    while i < n and _HEADER.fullmatch(lines[i]):
        j = i + 1
        while j < n and _ENTRY.fullmatch(lines[j]) and not _HEADER.fullmatch(lines[j]):
            j += 1
        if j < n and lines[j] != "" and not lines[j].startswith("<"):
            break  # a line no entry reads as (a name with a space): this directory as it came
        blocks.append((lines[i][:-1], lines[i + 1 : j]))
        end = j
        if j + 1 < n and lines[j] == "" and _HEADER.fullmatch(lines[j + 1]):
            i = j + 1
        else:
            break
    if len(blocks) < MIN_BLOCKS:
        return None
    return end, blocks


def _tree(blocks: list[tuple[str, list[str]]]) -> list[str] | None:
    """The tree lines of a run of directories (None: no directory is in another one above)."""
    stack: list[str] = []  # stack[d]: the path of the latest directory sent at depth d
    out: list[str] = []
    nested = False
    for path, entries in blocks:
        while stack and not path.startswith(stack[-1] + "/"):
            stack.pop()
        name = path[len(stack[-1]) + 1 :] if stack else path
        nested = nested or bool(stack)
        out.append(" " * len(stack) + name + ":" + "".join(" " + e for e in entries))
        stack.append(path)
    return out if nested else None


def _depth(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _inline(tree: list[str]) -> list[str]:
    """The tree with the directories of a directory whose every directory holds none (a locale's
    ``LC_MESSAGES``) said in its line, each after its own name: ``LC_MESSAGES{django.mo django.po}``
    (never when a name has a brace)."""
    out: list[str] = []
    i = 0
    while i < len(tree):
        line, d = tree[i], _depth(tree[i])
        j = i + 1
        kids: dict[str, str] = {}
        while (
            j < len(tree)
            and _depth(tree[j]) == d + 1
            and (j + 1 == len(tree) or _depth(tree[j + 1]) <= d + 1)
        ):
            name, _, rest = tree[j].strip(" ").partition(":")
            kids[name] = rest.strip(" ")
            j += 1
        head, _, rest = line.partition(":")
        entries = rest.split()
        ok = (
            kids
            and (j == len(tree) or _depth(tree[j]) <= d)
            and list(kids) == [e for e in entries if e in kids]
            and "{" not in line + "".join(kids.values())
            and "}" not in line + "".join(kids.values())
        )
        if not ok:
            out.append(line)
            i += 1
            continue
        said = [e + "{" + kids[e] + "}" if e in kids else e for e in entries]
        out.append(head + ":" + "".join(" " + e for e in said))
        i = j
    return out


_ITEM = re.compile(r"([^\s{}]+)\{([^{}]*)\}|\S+")


def expand(tree: list[str]) -> list[str]:
    """The ``ls -R`` lines a tree stands for (the marker line left out)."""
    stack: list[str] = []
    out: list[str] = []
    for k, line in enumerate(tree):
        depth = _depth(line)
        head, _, rest = line[depth:].partition(":")
        path = stack[depth - 1] + "/" + head if 0 < depth <= len(stack) else head
        del stack[depth:]
        stack.append(path)
        if k:
            out.append("")
        out.append(path + ":")
        inner: list[tuple[str, str]] = []
        for m in _ITEM.finditer(rest):
            out.append(m.group(1) or m.group(0))
            if m.group(1):
                inner.append((m.group(1), m.group(2)))
        for name, entries in inner:  # ls -R lists a directory's directories after it, in its order
            out.extend(["", f"{path}/{name}:", *entries.split()])
    return out
