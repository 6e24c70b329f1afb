"""Pure text transforms behind the summarize plugin: classify a tool output, then shrink it.

Every function here is a pure function of its arguments (no clock, no state, no randomness), so the
same tool output always gives the same bytes and prompt-cache prefixes stay stable turn after turn.

Order of preference: lossless rewrites first (ANSI codes, carriage-return progress, trailing
whitespace, JSON re-encoded compactly or as a table, formats known by their shape (``SHAPES``: grep
hits and context lines grouped by file, go test runs, GitHub Actions logs, git diffs, ls -R as a
tree), ls -l columns that are the same on every line); lossy only for clearly repetitive logs
(runs of lines that differ only in numbers) and very long logs (head + tail + every line with an
error, warning, trace frame or a path not shown elsewhere). Source code and numbered file
contents (``cat -n``, ``12:``) are never elided: the model quotes them back when it edits; only
the padding before their line numbers goes (``     12→code`` to ``12→code``, every number kept).
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from . import _json_records, _ls_tree

# -- classification ---------------------------------------------------------------------------

ANSI_RE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
NUMBERED_RE = re.compile(r"^\s*\d+(?:[\t:│|]|\s{2,}|→)")
# (``\s*+`` possessive: every alternative starts past the indent, and retrying one from inside a long
# run of spaces made the check quadratic in the run, seconds on a line of 20,000 spaces)
CODE_LINE_RE = re.compile(
    r"^\s*+(?:def |class |import |from \S+ import |return\b|if .*:$|for .*:$|elif |else:|try:|except\b|"
    r"function\b|const |let |var |public |private |#include|package |func |fn |impl |@\w+|"
    r"[}\])];?$|.*[{;]$)"
)
IMPORTANT_RE = re.compile(
    r"error|exception|traceback|warn|fail|fatal|panic|critical|denied|refused|timeout|timed out|"
    r"not found|no such|cannot|can't|unable|invalid|undefined|assert|abort|segfault|killed|"
    r"^\s+File \"|^\s+at \S|^\s*\w*Error\b|^E\s",
    re.IGNORECASE,
)
PATH_RE = re.compile(
    r"(?:[\w.@~-]+)?(?:/[\w.@+-]+)+/?|\b[\w-]+\.(?:py|js|ts|tsx|jsx|go|rs|rb|java|c|h|cpp|ex|exs|json|ya?ml|toml|md|txt|html|css|sh|sql)\b"
)
# path:line:text (grep -n) or path:text (grep -r); the path needs a slash or a file extension
GREP_RE = re.compile(
    r"^((?:\.{0,2}/)?(?:[\w.@+-]+/)*[\w@+-][\w.@+-]*\.[A-Za-z]\w{0,5}|(?:\.{0,2}/)?(?:[\w.@+-]+/)+[\w.@+-]+)"
    r":(?:(\d+)([:-]))?(.*)$"
)
# grep -n context lines (-A/-B/-C): path-line-text; the path needs a file extension
GREP_CONTEXT_RE = re.compile(
    r"^((?:\.{0,2}/|~/)?(?:[\w.@+-]+/)*[\w@+-][\w.@+-]*\.[A-Za-z]\w{0,5})-(\d+)-(.*)$"
)
GO_PACKAGE_RE = re.compile(r"^(ok  |\?   )\t(\S+)\t(\(cached\)|\[no test files\])$")
ACTIONS_RE = re.compile(r"^([^\t\n]+)\t([^\t\n]+)\t(\d{4}-\d\d-\d\d)T(\d\d:\d\d:\d\d(?:\.\d+)?Z(?: .*)?)$")
DIFF_RE = re.compile(r"^diff --git a/(.+) b/(.+)$")
GO_TEST_STEP_RE = re.compile(r"^=== (RUN|PAUSE|CONT|NAME) +(\S+)\s*$")
GO_TEST_RESULT_RE = re.compile(r"^\s*--- (?:PASS|FAIL|SKIP): (\S+) \(")
LS_RE = re.compile(
    r"^([-dlcbps][-rwxsStT]{9}[.+@]?)\s+(\d+)\s+(\S+)\s+(\S+)\s+(\d+|\d+,\s*\d+)\s+"
    r"(\w{3}\s+\d{1,2}\s+(?:\d{1,2}:\d{2}|\d{4})|\d{4}-\d{2}-\d{2}\s+\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:\s+[+-]\d{4})?)\s+(.+)$"
)
B64_RE = re.compile(r"(?:data:[\w/+.-]+;base64,)?[A-Za-z0-9+/]{240,}={0,2}")
WORD_RE = re.compile(r"[A-Za-z]{3,}")


def strip_ansi(text: str) -> str:
    """Remove terminal escape sequences (colours, cursor moves, OSC titles/links)."""
    return ANSI_RE.sub("", text) if "\x1b" in text else text


def resolve_cr(text: str) -> str:
    """CRLF to LF, and for progress lines redrawn with a bare CR keep only what was finally shown."""
    if "\r" not in text:
        return text
    text = text.replace("\r\n", "\n")
    if "\r" not in text:
        return text
    return "\n".join(
        line.rsplit("\r", 1)[-1] if "\r" in line.rstrip("\r") else line.rstrip("\r")
        for line in text.split("\n")
    )


def is_code(lines: list[str]) -> bool:
    """Numbered file contents or source code: shown exactly, never elided."""
    nonblank = [ln for ln in lines if ln.strip()]
    if not nonblank:
        return False
    numbered = sum(1 for ln in nonblank if NUMBERED_RE.match(ln))
    if numbered >= 0.5 * len(nonblank):
        return True
    code = sum(1 for ln in nonblank if CODE_LINE_RE.match(ln))
    return code >= 0.2 * len(nonblank)


_LINE_NUMBER_RE = re.compile(r"^ *(\d+)(?=→|\t)")


def compact_line_numbers(lines: list[str]) -> list[str]:
    """Numbered file lines (``cat -n``, Claude Code's Read) without the padding before each number.

    ``     12→code`` becomes ``12→code`` and ``  1914\tcode`` becomes ``1914\tcode``: every line
    number and every byte after the separator stay, so nothing is lost. Only lines of a run with
    consecutive numbers (at least two) are touched, so a stray indented number is left alone.
    """
    nums: list[int | None] = []
    for ln in lines:
        m = _LINE_NUMBER_RE.match(ln)
        nums.append(int(m.group(1)) if m else None)
    out = []
    for i, ln in enumerate(lines):
        n = nums[i]
        run = n is not None and (
            (i > 0 and nums[i - 1] == n - 1) or (i + 1 < len(nums) and nums[i + 1] == n + 1)
        )
        out.append(ln.lstrip(" ") if run and ln.startswith(" ") else ln)
    return out


_SPARSE_LINE_RE = re.compile(r"^(\d+)(→|\t)")
# content that would read as a line number or a marker if its own number were left out
_AMBIGUOUS_RE = re.compile(r"^ *\d+(?:→|\t|:)|^\[")
SPARSE_NOTE_START = "[tokensaver: line numbers shown on every "


def sparse_note(step: int) -> str:
    """The line before a result's first sparse run: what the model needs to count the lines."""
    return (
        f"{SPARSE_NOTE_START}{step}th line and each run's first and last; "
        "the lines between are consecutive, each line's text exact]"
    )


def sparse_line_numbers(lines: list[str], step: int, min_run: int) -> list[str]:
    """Compact numbered lines with the number kept only where it anchors the count.

    In a run of at least ``min_run`` lines numbered ``n, n+1, n+2, ...`` (``N→text`` or
    ``N<tab>text``, one separator, no padding: after :func:`compact_line_numbers`) the number stays
    on the run's first and last lines, on every line whose number is a multiple of ``step``, and on
    any line whose text would read as a number or a marker without it; the others lose only
    ``N<sep>``, every byte after the separator kept. One :func:`sparse_note` line goes before the
    first such run. The same lines when no run is long enough; :func:`full_lines` undoes it."""
    nums: list[tuple[int, str] | None] = []
    for ln in lines:
        m = _SPARSE_LINE_RE.match(ln)
        nums.append((int(m.group(1)), m.group(2)) if m else None)
    out: list[str] = []
    i, n = 0, len(lines)
    noted = False
    while i < n:
        first = nums[i]
        j = i + 1
        if first is not None:
            while j < n and nums[j] == (first[0] + j - i, first[1]):
                j += 1
        if first is None or j - i < min_run:
            out.extend(lines[i:j])
            i = j
            continue
        if not noted:
            out.append(sparse_note(step))
            noted = True
        for k in range(i, j):
            number = first[0] + k - i
            ln = lines[k]
            if k in (i, j - 1) or number % step == 0:
                out.append(ln)
                continue
            cut = len(str(number)) + len(first[1])
            body = ln[cut:]
            out.append(ln if _AMBIGUOUS_RE.match(body) else body)
        i = j
    return out


def full_lines(lines: list[str]) -> list[str]:
    """Lines of a text as they read with every number shown: a sparse run's unnumbered lines (see
    :func:`sparse_line_numbers`) with their numbers back, line for line (the same list when the
    text has no sparse note). A line counts only in a gap that adds up: between two numbered lines
    ``a`` and ``b`` with the same separator and ``b - a - 1`` unnumbered lines between them."""
    if not any(ln.startswith(SPARSE_NOTE_START) for ln in lines):
        return lines
    out = list(lines)
    prev: tuple[int, int, str] | None = None  # (index, number, separator) of the last numbered line
    for k, ln in enumerate(lines):
        if ln.startswith("[tokensaver:"):
            prev = None
            continue
        m = _SPARSE_LINE_RE.match(ln)
        if m is None:
            continue
        number, sep = int(m.group(1)), m.group(2)
        if prev is not None and prev[2] == sep and number - prev[1] == k - prev[0] and k - prev[0] > 1:
            for g in range(prev[0] + 1, k):
                out[g] = f"{prev[1] + g - prev[0]}{sep}{lines[g]}"
        prev = (k, number, sep)
    return out


def keep_anchored(out: list[str], source: list[int | None], lines: list[str], full: list[str]) -> list[str]:
    """``out`` (lines of ``lines`` in order, ``source[k]`` the index each came from, None for a
    pointer put in place of some) with the number back on each unnumbered line of a sparse run that
    no longer sits between the lines it sat between, so every gap still adds up (``full``:
    ``full_lines(lines)``; ``out`` itself when ``lines`` has no sparse run)."""
    if full is lines:
        return out
    last = len(out) - 1
    res = list(out)
    for k, s in enumerate(source):
        if s is None or full[s] is lines[s] or full[s] == lines[s]:
            continue
        if not (k > 0 and source[k - 1] == s - 1 and k < last and source[k + 1] == s + 1):
            res[k] = full[s]
    return res


def without_idle_note(lines: list[str]) -> list[str]:
    """``lines`` without their sparse note when no line is left for it to explain (pointers took
    every unnumbered line of the runs): ``lines`` itself otherwise."""
    if not any(ln.startswith(SPARSE_NOTE_START) for ln in lines) or full_lines(lines) != lines:
        return lines
    return [ln for ln in lines if not ln.startswith(SPARSE_NOTE_START)]


def is_binary(text: str) -> bool:
    """Mostly control characters or replacement characters: not text meant for a reader."""
    if not text:
        return False
    sample = text[:4096]
    bad = sum(1 for ch in sample if (ord(ch) < 32 and ch not in "\n\r\t\x1b") or ch == "\ufffd")
    return bad > 0.1 * len(sample)


# -- JSON -------------------------------------------------------------------------------------


class _RawNumber(str):
    """A JSON number kept as written (1.50 stays 1.50, 1e3 stays 1e3)."""


def _num(s: str) -> _RawNumber:
    return _RawNumber(s)


def load_json(text: str) -> Any:
    """One JSON text, its numbers kept as written (:func:`dump` writes them back the same)."""
    return json.loads(text, parse_float=_num, parse_int=_num, parse_constant=_num)


def parse_json(text: str) -> Any:
    """JSON or JSON Lines (one object per line, returned as a list); raise ValueError if neither."""
    s = text.strip()
    if not s or s[0] not in "[{":
        raise ValueError("not JSON")
    try:
        return load_json(s)
    except ValueError:
        rows = [ln for ln in s.split("\n") if ln.strip()]
        if len(rows) < 2 or not all(r.lstrip().startswith("{") for r in rows):
            raise
        return [load_json(r) for r in rows]


def dump(value: Any) -> str:
    """Compact JSON, key order kept, numbers as written, UTF-8 kept."""
    if isinstance(value, _RawNumber):
        return str(value)
    if isinstance(value, _Ref):
        return f"<{value}>"
    if isinstance(value, dict):
        return (
            "{" + ",".join(json.dumps(k, ensure_ascii=False) + ":" + dump(v) for k, v in value.items()) + "}"
        )
    if isinstance(value, list):
        return "[" + ",".join(dump(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


_BARE_UNSAFE = re.compile(r"^$|^\s|\s$|[|\n\r\t\\\"]|^(?:null|true|false|-?\d[\d.eE+-]*)$|^[\[{<]")


def cell(value: Any) -> str:
    """One table cell: strings bare when unambiguous, everything else as compact JSON."""
    if (
        isinstance(value, str)
        and not isinstance(value, (_RawNumber, _Ref))
        and not _BARE_UNSAFE.search(value)
    ):
        return value
    return dump(value)


def _flatten(rec: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in rec.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and all(isinstance(x, str) for x in v) and "." not in k:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _records(value: Any) -> list[dict[str, Any]] | None:
    if isinstance(value, list) and len(value) >= 3 and all(isinstance(x, dict) for x in value):
        if all(not any("." in k for k in x) for x in value):
            return value
    return None


def table(rows: list[dict[str, Any]], name: str) -> str:
    """A list of records as ``col|col`` rows under one schema line; nested objects become dotted columns."""
    flat = [_flatten(r) for r in rows]
    cols = _json_records.columns(flat)
    # a missing key is an empty cell; an empty string is "" (so the table stays lossless)
    lines = [f"{name}: {len(rows)} records; columns: " + "|".join(cols)]
    for r in flat:
        lines.append("|".join(cell(r[c]) if c in r else "" for c in cols))
    return "\n".join(lines)


def json_compact(value: Any, *, max_rows: int) -> tuple[str, bool]:
    """Record lists as tables (a placeholder in the compact JSON points at each), else compact JSON.

    Tables longer than ``max_rows`` keep the first and last rows, every row that mentions an error,
    warning or failure, and the number elided: the only lossy case (returns lossy=True).
    """
    tables: list[str] = []
    lossy = False

    def walk(v: Any) -> Any:
        nonlocal lossy
        recs = _records(v)
        if recs is not None:
            slot = len(tables)
            name = f"table{slot + 1}"
            tables.append("")  # reserved, so nested tables number after their parent
            rows = [{k: walk(x) for k, x in r.items()} for r in recs]
            t, cut = _cap_rows(rows, name, max_rows)
            lossy = lossy or cut
            tables[slot] = t
            return _Ref(name)
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            # lists of record lists (e.g. itineraries of flights) become one table with a group column
            if len(v) >= 2 and all(
                isinstance(x, list) and x and all(isinstance(y, dict) for y in x) for x in v
            ):
                flat = [{"#": _RawNumber(str(i)), **y} for i, x in enumerate(v) for y in x]
                if len(flat) >= 3 and all("#" not in y for x in v for y in x):
                    return walk(flat)
            return [walk(x) for x in v]
        return v

    top = walk(value)
    if isinstance(top, _Ref):
        return "\n".join(tables), lossy
    head = dump(top)
    return "\n".join([head, *tables]) if tables else head, lossy


class _Ref(str):
    """A placeholder for a table, dumped as <tableN>."""


def _cap_rows(rows: list[dict[str, Any]], name: str, max_rows: int) -> tuple[str, bool]:
    if len(rows) <= max_rows:
        return table(rows, name), False
    head, tail = max_rows * 2 // 3, max_rows // 3
    keep = set(range(head)) | set(range(len(rows) - tail, len(rows)))
    for i, r in enumerate(rows):
        if IMPORTANT_RE.search(dump(r)):
            keep.add(i)
    kept = [rows[i] for i in sorted(keep)]
    t = table(kept, name)
    return (
        t
        + f"\n[{name}: {len(rows) - len(kept)} of {len(rows)} records elided; kept first, last and any with errors]",
        True,
    )


# -- lines: logs, listings, grep --------------------------------------------------------------


def _mask(line: str) -> str:
    # only free-standing numbers (counters, times, sizes), never digits inside a name like fixture1.json
    return re.sub(r"(?<![\w.])\d+(?:\.\d+)?(?![\w])", "0", re.sub(r"\b[0-9a-f]{7,}\b", "H", line))


def collapse_repeats(lines: list[str], min_run: int) -> tuple[list[str], bool]:
    """Exact repeats become one line plus a count; runs of >= min_run lines differing only in numbers
    keep first and last (lossy). Lines with errors or warnings are always kept."""
    out: list[str] = []
    lossy = False
    i = 0
    n = len(lines)
    while i < n:
        j = i + 1
        while j < n and lines[j] == lines[i]:
            j += 1
        if j - i >= 3 and lines[i].strip():
            out.append(lines[i])
            out.append(f"[previous line repeated {j - i - 1} more times]")
            i = j
            continue
        m = _mask(lines[i])
        j = i + 1
        while j < n and lines[j].strip() and _mask(lines[j]) == m and not IMPORTANT_RE.search(lines[j]):
            j += 1
        if j - i >= min_run and lines[i].strip() and not IMPORTANT_RE.search(lines[i]) and m != lines[i]:
            out.append(lines[i])
            out.append(f"[… {j - i - 2} similar lines (differing only in numbers) …]")
            out.append(lines[j - 1])
            lossy = True
            i = j
            continue
        out.append(lines[i])
        i += 1
    return out, lossy


def is_prose(lines: list[str]) -> bool:
    """Documents and reports (long lines of words, Markdown): never cut, whatever their length."""
    nonblank = [ln for ln in lines if ln.strip()]
    if not nonblank:
        return False
    prose = 0
    for ln in nonblank:
        words = ln.split()
        if len(words) >= 8 and sum(1 for w in words if WORD_RE.match(w)) >= 0.6 * len(words):
            prose += 1
    if prose >= 0.2 * len(nonblank):
        return True
    headings = sum(1 for ln in nonblank if re.match(r"#{1,6} \S", ln))
    tables = any(re.match(r"\|?\s*:?-{3,}:?\s*\|", ln) for ln in nonblank)
    return headings >= 3 or (tables and headings >= 1)


def cap_lines(lines: list[str], max_lines: int, head: int, tail: int) -> tuple[list[str], bool]:
    """Keep head, tail and every middle line that has an error/warning/trace frame or a path not
    already shown; mark each elided stretch with its line count."""
    if len(lines) <= max_lines:
        return lines, False
    keep = [False] * len(lines)
    for i in range(min(head, len(lines))):
        keep[i] = True
    for i in range(max(0, len(lines) - tail), len(lines)):
        keep[i] = True
    shown: set[str] = set()
    for i, ln in enumerate(lines):
        if keep[i]:
            shown.update(PATH_RE.findall(ln))
    for i, ln in enumerate(lines):
        if keep[i]:
            continue
        if IMPORTANT_RE.search(ln):
            keep[i] = True
        else:
            paths = set(PATH_RE.findall(ln)) - shown
            if paths:
                keep[i] = True
                shown |= paths
    out: list[str] = []
    gap = 0
    for i, ln in enumerate(lines):
        if keep[i]:
            if gap:
                out.append(f"[… {gap} lines elided …]")
                gap = 0
            out.append(ln)
        else:
            gap += 1
    if gap:
        out.append(f"[… {gap} lines elided …]")
    return out, any(not k for k in keep)


def _grep_line(line: str, context: bool = True) -> tuple[str, str] | None:
    """(path, what follows it as sent under the path's header) for a grep hit or context line."""
    m = GREP_RE.match(line)
    if m:
        path, num, sep, rest = m.groups()
        return path, (f"  {num}{sep}{rest}" if num else f"  {rest}")
    m = GREP_CONTEXT_RE.match(line) if context else None
    if m:
        return m.group(1), f"  {m.group(2)}-{m.group(3)}"
    return None


def _same_file(a: str, b: str) -> bool:
    # ripgrep names a file relative on match lines and absolute on context lines
    return a == b or a.endswith("/" + b.lstrip("./")) or b.endswith("/" + a.lstrip("./"))


def group_grep(lines: list[str], context: bool = True) -> list[str] | None:
    """``path:line:text`` hits and ``path-line-context`` lines grouped under each file (lossless).

    None if this is not grep output. A file named two ways (relative and absolute) gets one header
    naming both; ``--`` hunk separators stay where they were. ``context=False`` is the older rule
    (hits only, a ``--`` ends a file's group, one spelling per group), kept for ``shapes``
    without ``grep``.
    """
    nonblank = [ln for ln in lines if ln.strip() and (context or ln != "--")]
    parsed = [_grep_line(ln, context) for ln in nonblank]
    if sum(1 for p in parsed if p) < max(4, 0.7 * len(parsed)):
        return None
    # runs of lines of one file: [spellings, body lines]
    groups: list[tuple[list[str], list[str]] | str] = []
    current: tuple[list[str], list[str]] | None = None
    for ln in lines:
        hit = _grep_line(ln, context) if ln.strip() else None
        if hit is None:
            if ln == "--" and current is not None and context:
                current[1].append(ln)
            elif ln.strip():
                groups.append(ln)
                current = None
            continue
        path, rest = hit
        if current is not None and (
            path == current[0][0] or (context and any(_same_file(path, p) for p in current[0]))
        ):
            if path not in current[0]:
                current[0].append(path)
        else:
            current = ([path], [])
            groups.append(current)
        current[1].append(rest)
    out: list[str] = []
    for g in groups:
        if isinstance(g, str):
            out.append(g)
            continue
        names, body = g
        tail = bool(body) and body[-1] == "--"  # a separator between files goes between the groups
        if tail:
            body.pop()
        out.append(f"{names[0]} ({', '.join(names[1:])}):" if len(names) > 1 else f"{names[0]}:")
        out.extend(body)
        if tail:
            out.append("--")
    return out


def compact_go_test(lines: list[str]) -> list[str] | None:
    """``go test`` output without the lines that repeat what other lines say (no fact lost).

    Verbose runs lose the ``=== RUN/PAUSE/CONT/NAME`` lines of tests that report a result, unless
    output follows the line (it says whose output that is): the ``--- PASS/FAIL/SKIP: name (time)``
    line stays, and so does every other line; a test with no result line (it hung or panicked)
    keeps its ``=== RUN`` line. Runs of 3 or more packages that were cached or have no test files
    become one ``ok (cached):`` / ``? [no test files]:`` line and each package path under it, in
    order. None if this is not go test output.
    """
    steps = sum(1 for ln in lines if GO_TEST_STEP_RE.match(ln))
    done = {m.group(1) for ln in lines if (m := GO_TEST_RESULT_RE.match(ln))}
    packages = sum(1 for ln in lines if GO_PACKAGE_RE.match(ln))
    if not ((steps >= 4 and done) or packages >= 3):
        return None
    out: list[str] = []
    i = 0
    while i < len(lines):
        ln = lines[i]
        m = GO_TEST_STEP_RE.match(ln)
        if m and m.group(2) in done:
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            if GO_TEST_STEP_RE.match(nxt) or GO_TEST_RESULT_RE.match(nxt):
                i += 1
                continue  # a step line stays only when output follows it: it says whose it is
        p = GO_PACKAGE_RE.match(ln)
        if p:
            j = i
            while j < len(lines) and (q := GO_PACKAGE_RE.match(lines[j])) and q.group(3) == p.group(3):
                j += 1
            if j - i >= 3:
                out.append(f"{p.group(1).strip()} {p.group(3)}:")
                out.extend(f"  {GO_PACKAGE_RE.match(x).group(2)}" for x in lines[i:j])  # type: ignore[union-attr]
                i = j
                continue
        out.append(ln)
        i += 1
    return out if out != lines else None


def compact_actions_log(lines: list[str]) -> list[str] | None:
    """GitHub Actions logs (``gh run view --log``): job, step and date once per run of lines.

    Each line ``job<TAB>step<TAB>2026-02-21T21:32:11.6077979Z text`` keeps its time and text
    (``21:32:11.6077979Z text``) under a ``job<TAB>step<TAB>2026-02-21:`` line written when any of
    the three changes: nothing is lost. None unless most lines have that shape.
    """
    nonblank = [ln for ln in lines if ln.strip()]
    parsed = [ACTIONS_RE.match(ln) for ln in nonblank]
    if sum(1 for m in parsed if m) < max(4, 0.8 * len(nonblank)):
        return None
    out: list[str] = []
    current = None
    for ln in lines:
        m = ACTIONS_RE.match(ln)
        if not m:
            out.append(ln)
            current = None
            continue
        head = m.groups()[:3]
        if head != current:
            out.append("\t".join(head) + ":")
            current = head
        out.append(m.group(4))
    return out


def compact_diff(lines: list[str]) -> list[str] | None:
    """Unified git diffs without the ``--- a/x`` / ``+++ b/x`` pair that ``diff --git a/x b/x`` implies.

    Only that exact pair, in a file's header (before its first ``@@``), goes; a new or deleted file
    (``/dev/null``), a rename or a quoted path keeps its lines. None if this is not a git diff.
    """
    if not any(ln.startswith("diff --git a/") for ln in lines):
        return None
    out: list[str] = []
    names: tuple[str, str] | None = None
    i = 0
    while i < len(lines):
        ln = lines[i]
        m = DIFF_RE.match(ln)
        if m:
            names = (m.group(1), m.group(2))
        elif ln.startswith("@@"):
            names = None
        elif (
            names and ln == f"--- a/{names[0]}" and i + 1 < len(lines) and lines[i + 1] == f"+++ b/{names[1]}"
        ):
            names = None
            i += 2
            continue
        out.append(ln)
        i += 1
    return out if len(out) < len(lines) else None


def compact_ls(lines: list[str]) -> list[str] | None:
    """``ls -l`` listings without the owner/group/link columns when they are the same everywhere."""
    rows = [(ln, LS_RE.match(ln)) for ln in lines]
    matched = [m for _, m in rows if m]
    if len(matched) < 4 or len(matched) < 0.8 * len([ln for ln in lines if ln.strip()]):
        return None
    owners = {(m.group(3), m.group(4)) for m in matched}
    if len(owners) != 1:
        return None
    owner, group = owners.pop()
    common = _common_date(matched)
    head = f"[ls -l; owner {owner}, group {group} on every entry; columns: mode links size date name"
    out = [head + (f"; date {common} where none is shown]" if common else "]")]
    for ln, m in rows:
        if m:
            mode, links, _, _, size, date, name = m.groups()
            date = " ".join(date.split())
            out.append(
                f"{mode} {links} {size} {name}" if date == common else f"{mode} {links} {size} {date} {name}"
            )
        else:
            out.append(ln)
    return out


_DATE_START = re.compile(r"^(?:\w{3}\s+\d{1,2}\s+(?:\d{1,2}:\d{2}|\d{4})|\d{4}-\d{2}-\d{2})(?:\s|$)")


def _common_date(matched: list[re.Match[str]]) -> str | None:
    """The date most entries of an ``ls -l`` listing share (a checkout's files), said once in the
    header and left out of their lines, when at least 4 entries and half of them have it and no
    name starts like a date (a line without one then still reads one way only); else None."""
    dates = Counter(" ".join(m.group(6).split()) for m in matched)
    common, n = dates.most_common(1)[0]
    if n < 4 or 2 * n < len(matched) or any(_DATE_START.match(m.group(7)) for m in matched):
        return None
    return common


# -- HTML, blobs ------------------------------------------------------------------------------

_HTML_DROP = re.compile(r"<(script|style|noscript|svg|head)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_HTML_BREAK = re.compile(
    r"<\s*(?:br|/p|/div|/li|/h[1-6]|/tr|/table|/section|/article|p|div|li|h[1-6]|tr)\b[^>]*>", re.IGNORECASE
)
_HTML_LINK = re.compile(
    r"<a\b[^>]*?href\s*=\s*[\"']([^\"']+)[\"'][^>]*>(.*?)</a\s*>", re.IGNORECASE | re.DOTALL
)
_HTML_TAG = re.compile(r"<[^>]+>")


def is_web_page(text: str) -> bool:
    """A fetched HTML page (doctype or <html> root plus head/script/style), not a snippet being edited."""
    head = text.lstrip()[:512].lower()
    if not (head.startswith("<!doctype html") or head.startswith("<html")):
        return False
    low = text.lower()
    return "<head" in low and ("<script" in low or "<style" in low or "<meta" in low)


def html_to_text(text: str) -> str:
    """Visible text of a page, links kept as ``text (url)``, title kept."""
    title = re.search(r"<title[^>]*>(.*?)</title\s*>", text, re.IGNORECASE | re.DOTALL)
    body = _HTML_DROP.sub(" ", text)
    body = re.sub(r"<!--.*?-->", " ", body, flags=re.DOTALL)
    body = _HTML_LINK.sub(lambda m: f"{m.group(2)} ({m.group(1)})", body)
    body = _HTML_BREAK.sub("\n", body)
    body = html.unescape(_HTML_TAG.sub(" ", body))
    lines = [re.sub(r"[ \t\u00a0]+", " ", ln).strip() for ln in body.split("\n")]
    out = [ln for ln in lines if ln]
    if title:
        out.insert(0, "Title: " + " ".join(html.unescape(title.group(1)).split()))
    return "\n".join(out)


def elide_blobs(text: str) -> tuple[str, bool]:
    """Long base64 runs (and data: URIs) replaced by their length and a short sha256."""
    changed = False

    def sub(m: re.Match[str]) -> str:
        nonlocal changed
        s = m.group(0)
        if not re.search(r"\d", s) or not re.search(r"[A-Z]", s) or not re.search(r"[a-z]", s):
            return s  # long words of one kind are not base64 data
        changed = True
        h = hashlib.sha256(s.encode()).hexdigest()[:12]
        return f"[base64 data: {len(s)} chars, sha256 {h}]"

    return B64_RE.sub(sub, text), changed


def describe_binary(text: str) -> str:
    """A short description of binary output: size, hash and its printable strings."""
    h = hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:12]
    strings = re.findall(r"[\x20-\x7e]{6,}", text)
    shown = " ".join(strings)[:400]
    return f"[binary output: {len(text)} chars, sha256 {h}; printable strings: {shown}]"


# -- the entry point --------------------------------------------------------------------------


# line-based shapes, tried in order before the code and text rules (each lossless); "diff" first
_PIP_SATISFIED_RE = re.compile(r"^Requirement already satisfied: (\S.*?) in (/\S+)(.*)$")
_PIP_HEAD = "Requirement already satisfied in "


def compact_pip(lines: list[str]) -> list[str] | None:
    """pip's ``Requirement already satisfied: SPEC in PATH ...`` lines with the path once (no byte lost).

    A run of 3 or more such lines with the same install path becomes one
    ``Requirement already satisfied in PATH:`` line and, under it, each line's ``SPEC`` and what
    followed the path (``(from pkg) (1.2.3)``), in order: each line is the head line's words around
    its own. None if there is no such run (or a line already reads like the head line)."""
    if not any(ln.startswith("Requirement already satisfied: ") for ln in lines[:400]) or any(
        ln.startswith(_PIP_HEAD) for ln in lines
    ):
        return None
    out: list[str] = []
    changed = False
    i = 0
    while i < len(lines):
        m = _PIP_SATISFIED_RE.match(lines[i])
        if m:
            j = i
            while j < len(lines) and (q := _PIP_SATISFIED_RE.match(lines[j])) and q.group(2) == m.group(2):
                j += 1
            if j - i >= 3:
                out.append(f"{_PIP_HEAD}{m.group(2)}:")
                for x in lines[i:j]:
                    q = _PIP_SATISFIED_RE.match(x)
                    out.append(f"  {q.group(1)}{q.group(3)}")  # type: ignore[union-attr]
                i = j
                changed = True
                continue
        out.append(lines[i])
        i += 1
    return out if changed else None


SHAPES = (
    ("grep", group_grep),
    ("test", compact_go_test),
    ("ci", compact_actions_log),
    ("pip", compact_pip),
    ("ls_r", _ls_tree.compact),
)
SHAPE_NAMES = ("diff", *(k for k, _ in SHAPES), "returncode", "state")

# mini-swe-agent's observation: the exit status and the output between tags, every call
_RETURNCODE_RE = re.compile(r"\A<returncode>(-?\d+)</returncode>\n<output>\n(.*)</output>\Z", re.DOTALL)


def unwrap_returncode(text: str) -> tuple[str, str] | None:
    """``(status, output)`` of a ``<returncode>N</returncode><output>...</output>`` observation, else None."""
    m = _RETURNCODE_RE.match(text)
    if m is None or "</output>" in m.group(2) or "<output>" in m.group(2):
        return None
    return m.group(1), m.group(2)


# SWE-agent's state lines, after every observation
_STATE_RE = re.compile(r"(?:\A|\n)\(Open file: ([^\n]*)\)\n\(Current directory: ([^\n]*)\)\nbash-\$\Z")


def split_state(text: str) -> tuple[str, str] | None:
    """``(observation, state line)`` of a SWE-agent observation that ends with its open file,
    directory and prompt, else None. The state line ``[open: F, cwd: D]`` names the open file
    relative to the directory when it is under it (``n/a`` and other absolute paths as they are),
    and starts with the newline that parted it from the observation (none when there is none); so
    do the observation's ``[File: P (N lines total)]`` lines (``relative_files``): the directory is
    named once, in the same text."""
    parts = _state_parts(text)
    if parts is None:
        return None
    start, file, cwd = parts
    sep = "\n" if text[start : start + 1] == "\n" else ""
    return relative_files(text[:start], cwd), f"{sep}[open: {file}, cwd: {cwd}]"


def _state_parts(text: str) -> tuple[int, str, str] | None:
    """Where a SWE-agent observation's state lines start, the open file as the state line names it
    (relative to the directory when under it) and the directory; None when ``split_state`` leaves
    the text alone."""
    m = _STATE_RE.search(text) if text.endswith("bash-$") else None
    if m is None:
        return None
    file, cwd = m.group(1), m.group(2)
    if not cwd.startswith("/") or "]" in cwd or ", cwd: " in file + cwd:
        return None
    if file.startswith(cwd.rstrip("/") + "/") and len(cwd) > 1:
        file = file[len(cwd.rstrip("/")) + 1 :]
    elif not (file.startswith("/") or file == "n/a"):
        return None  # a relative name would read as one under the directory
    return m.start(), file, cwd


_FILE_LINE_RE = re.compile(r"^\[File: (/[^\n]*) \((\d+) lines total\)\]$", re.MULTILINE)


def relative_files(observation: str, cwd: str) -> str:
    """SWE-agent's ``[File: /repo/src/x.py (N lines total)]`` lines with the path relative to
    ``cwd`` when it is under it (``[File: src/x.py (N lines total)]``): the state line after them
    names the directory. Other lines, and paths elsewhere, as they are."""
    base = cwd.rstrip("/")
    if not base or "[File: " + base + "/" not in observation:
        return observation

    def sub(m: re.Match[str]) -> str:
        path = m.group(1)
        if not path.startswith(base + "/") or len(path) == len(base) + 1:
            return m.group(0)
        return f"[File: {path[len(base) + 1 :]} ({m.group(2)} lines total)]"

    return _FILE_LINE_RE.sub(sub, observation)


# a Python traceback's frame line; its path without a colon or quote, so the short form reads back
_FRAME_RE = re.compile(r'^( +)File "([^":\n]+)", line (\d+), in ([^\n]*)$', re.MULTILINE)
TRACEBACK_HEAD = "Traceback (most recent call last):"


def compact_frames(text: str, base: str | None = None) -> str:
    """A Python traceback's frame lines ``  File "/repo/pkg/x.py", line 12, in func`` as
    ``  pkg/x.py:12 in func`` (the path relative to ``base`` when under it, else as it is): the
    file, line and function all kept, the code line under each frame as it is. Only in a text
    that shows a traceback (its ``Traceback (most recent call last):`` line); other lines, and
    paths elsewhere, as they are."""
    if TRACEBACK_HEAD not in text or 'File "' not in text:
        return text
    root = base.rstrip("/") + "/" if base and base.startswith("/") and base.rstrip("/") else ""

    def sub(m: re.Match[str]) -> str:
        path = m.group(2)
        if root and path.startswith(root) and len(path) > len(root):
            path = path[len(root) :]
        return f"{m.group(1)}{path}:{m.group(3)} in {m.group(4)}"

    return _FRAME_RE.sub(sub, text)


def state_cwd(text: str) -> str | None:
    """The directory a SWE-agent observation's state lines name (as :func:`split_state` reads them), else None."""
    parts = _state_parts(text)
    return parts[2] if parts is not None else None


STATE_FULL_EVERY = 5  # the directory is named again on every 5th state line in a row with the same one


def without_cwd(text: str, cwd: str) -> str:
    """A rewritten observation whose last line is ``[open: F, cwd: D]`` (``D`` = ``cwd``) with
    ``[open: F]`` instead: for an observation whose directory is the one an earlier state line,
    at most ``STATE_FULL_EVERY - 1`` observations before, names (F relative to it as there)."""
    tail = f", cwd: {cwd}]"
    if not text.endswith(tail):
        return text
    start = text.rfind("\n") + 1
    if not text.startswith("[open: ", start):
        return text
    return text[: len(text) - len(tail)] + "]"


def returncode_header(status: str) -> str:
    """The line that stands for the tags: ``[returncode 0]``, the output after it byte for byte."""
    return f"[returncode {status}]\n"


@dataclass(frozen=True)
class Options:
    """Knobs for :func:`shrink` (from the plugin's settings)."""

    min_chars: int = 400
    max_lines: int = 400
    head_lines: int = 120
    tail_lines: int = 80
    min_run: int = 5
    max_rows: int = 400
    html: bool = True
    lossy: bool = True
    # numbered file lines: "compact" (no padding), "sparse" (compact, and in a run of at least
    # ``sparse_min_lines`` lines only every ``line_number_step``th number and the run's ends kept)
    # or "keep"
    line_numbers: str = "compact"
    line_number_step: int = 10
    sparse_min_lines: int = 20
    sparse_tools: tuple[str, ...] = ("Read",)  # whose results are made sparse (empty: every tool's)
    shapes: tuple[str, ...] = SHAPE_NAMES  # formats recognized by their shape (see SHAPES)


@dataclass(frozen=True)
class Result:
    """The shrunk text, what it was taken for and whether anything was dropped."""

    text: str
    kind: str
    lossy: bool


def shrink(text: str, opts: Options) -> Result:
    """Shrink one tool output by what it is; the input unchanged (kind ``small``/``kept``) when nothing helps.

    A mini-swe-agent observation (``shapes`` has ``"returncode"``) loses its tags at any size: the
    exit status on one line, then the output, itself shrunk by what it is, its traceback's frame
    lines short (``compact_frames``, paths as they are: the model quotes them back whole). A
    SWE-agent observation (``"state"``) ends with one ``[open: F, cwd: D]`` line instead of its
    three state lines, its frame lines short with paths relative to D (as its ``[File: ]`` lines)."""
    state = split_state(text) if "state" in opts.shapes else None
    if state is not None:
        inner = shrink(state[0], opts)
        kind = "state" if inner.kind == "small" or inner.kind.endswith(":kept") else inner.kind
        # frames made short after the output's own rewrites: a long log's cut picks frame lines as written
        out = compact_frames(inner.text, state_cwd(text)) + state[1]
        # at any size: the framing goes whatever the output saves (a large one saved under 2%)
        return Result(out, kind, inner.lossy) if len(out) < len(text) else _best(text, out, kind, inner.lossy)
    wrapped = unwrap_returncode(text) if "returncode" in opts.shapes and text[:1] == "<" else None
    if wrapped is not None:
        inner = shrink(wrapped[1], opts)
        kind = "returncode" if inner.kind == "small" or inner.kind.endswith(":kept") else inner.kind
        out = returncode_header(wrapped[0]) + compact_frames(inner.text)
        return Result(out, kind, inner.lossy) if len(out) < len(text) else _best(text, out, kind, inner.lossy)
    if len(text) < opts.min_chars:
        return Result(text, "small", False)
    t = resolve_cr(strip_ansi(text))
    if is_binary(t):
        return _best(text, describe_binary(t), "binary", True)
    try:
        value = parse_json(t)
    except (ValueError, RecursionError):
        value = None
    if value is not None:
        out, lossy = json_compact(value, max_rows=opts.max_rows if opts.lossy else 10**9)
        out = out if lossy else _json_records.smaller(value, out, opts.max_rows)
        return _best(text, out, "json", lossy)
    if opts.html and is_web_page(t):
        return _best(text, html_to_text(t), "html", True)
    lines = t.split("\n")
    # shapes recognized first: grep hits, test runs and diffs often look like source code
    diff = compact_diff(lines) if "diff" in opts.shapes else None
    if diff is not None:
        return _best(text, "\n".join(diff), "diff", False)  # code: never elided
    stripped = [ln.rstrip() for ln in lines]
    for kind, recognize in SHAPES:
        shaped = recognize(stripped) if kind in opts.shapes else None
        if shaped is not None:
            return _shaped(text, shaped, kind, opts)
    if is_code(lines):
        # exact contents: only escape codes, CRs and the padding before line numbers are removed
        if opts.line_numbers in ("compact", "sparse"):
            t = "\n".join(compact_line_numbers(lines))
        return _best(text, t, "code", False)
    lines = [ln.rstrip() for ln in lines]
    kind = "text"
    grouped = group_grep(lines, context=False) if "grep" not in opts.shapes else None
    ls = compact_ls(lines) if grouped is None else None
    if grouped is not None:
        lines, kind = grouped, "grep"
    elif ls is not None:
        lines, kind = ls, "listing"
    return _shaped(text, lines, kind, opts)


def _shaped(text: str, lines: list[str], kind: str, opts: Options) -> Result:
    """Lines of a known shape (or plain text) with the lossy steps that suit it, then blobs."""
    lossy = False
    if opts.lossy and kind not in ("grep", "ci", "ls_r"):  # lossless in full: never cut
        lines, cut = collapse_repeats(lines, opts.min_run)
        lossy = lossy or cut
        if not is_prose(lines):
            lines, cut = cap_lines(lines, opts.max_lines, opts.head_lines, opts.tail_lines)
            lossy = lossy or cut
        if cut or lossy:
            kind = "log" if kind == "text" else kind
    out = "\n".join(lines)
    if opts.lossy:
        out, blobs = elide_blobs(out)
        if blobs:
            lossy = True
            kind = "blob" if kind == "text" else kind
    return _best(text, out, kind, lossy)


def _best(original: str, new: str, kind: str, lossy: bool) -> Result:
    # a rewrite that saves under 2% is not worth changing what the model is used to reading
    if len(new) >= 0.98 * len(original):
        return Result(original, kind if new == original else f"{kind}:kept", False)
    return Result(new, kind, lossy)
