"""JSON records as lines and tables with what they share said once: fewer tokens, every value kept.

What it saves: an API that answers with records (tau-bench's reservations, users and flight
searches, any REST listing) repeats every key on every record, quotes every string, and often has
the same value in every record (the searched date, ``"status":"available"``); a search for
connecting flights repeats each leg in every itinerary it is part of. :func:`render` writes:

* an object as one ``key: value`` line per key, an object of plain values inside it as
  ``key: a=1, b=x`` on one line;
* a list of two or more records as a table, ``key (N records): col|col`` then one line per record
  (nested objects of plain values as dotted columns), a column equal in every record said once in
  the header (``; every record has k=v``); an object of records that each hold their own key in a
  field (``{"card_1": {"id": "card_1", ...}}``) as a table ``key, keyed by id (N records)``;
* a list of record lists (itineraries) as one table under a ``#`` column: a group number on each
  record, or, when shorter, each distinct record once and the lists as their numbers
  (``key lists (G, by record #): [[0,1],[0,2]]``);
* at the top, a list of records as ``N records: col|col`` (no key);
* anything else as compact JSON after its ``key:``.

Lossless: :func:`parse` gives the JSON value back (a test checks it on every tau-bench tool result).
A string is bare only when nothing else can read the same (JSON numbers, ``true``, ``false``,
``null``, anything with a quote, ``|``, a backslash, a line break, edge spaces, or an opening
bracket is written as JSON; inside an object line or a header also ``=``, ``,`` and ``;``); a missing
key is an empty cell, an empty string ``""``. Keys must be plain names (letters, digits, ``_``,
``-``), else the value is left as it was. Numbers come as ``_summarize_text.load_json`` parses
them (a ``str`` subclass holding the number as written) and are written back as they came.
Deterministic: a pure function of the value. :func:`smaller` gives the rewrite only when it counts
fewer tokens than the compact JSON it would replace.

Unsafe when something other than the model reads the tool result as JSON after tokensaver (nothing
in a Messages request does: the caller's code never sees what is sent).
"""

from __future__ import annotations

import json
import re
from typing import Any

from tokensaver.tokens import count_text

MIN_ROWS = 2  # a list of records shorter than this stays JSON
HOIST_ROWS = 2  # a column equal in every record is said once from this many records on
# the share of the compact JSON's tokens the rewrite must save (summarize's own 2%): below it the
# JSON stays JSON, so an object fetched again is still one prune's ``repeats`` sends as the values
# that changed (a GitHub PR's JSON, one long body: 0.5% fewer tokens as lines, and no such pointer)
MIN_SAVING = 0.02

_KEY = re.compile(r"^[A-Za-z_][\w-]*$")
_NUMBER = re.compile(r"^-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?$")
# a string that could be read as something else when bare: another JSON value, a cell boundary
_UNSAFE = re.compile(r'^$|^\s|\s$|[|\n\r\t\\"]|^(?:null|true|false)$|^[\[{]')
_INLINE_UNSAFE = re.compile(r"[=,;]")  # ... and in an object line or a table's header
_SAME = "; every record has "


class _Refused(Exception):
    """The value has something the format cannot say (a key that is not a plain name)."""


class _Number(str):
    """A number made here (a record's ``#``), written bare like load_json's."""


def _raw_number(v: Any) -> bool:
    return isinstance(v, str) and type(v) is not str  # load_json's numbers, kept as written


def _scalar(v: Any) -> bool:
    return not isinstance(v, (dict, list))


def dump(v: Any) -> str:
    """Compact JSON, key order kept, numbers as written."""
    if _raw_number(v):
        if not _NUMBER.match(v):
            raise _Refused(v)  # NaN, Infinity: not JSON
        return str(v)
    if isinstance(v, dict):
        return "{" + ",".join(json.dumps(k, ensure_ascii=False) + ":" + dump(x) for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ",".join(dump(x) for x in v) + "]"
    return json.dumps(v, ensure_ascii=False)


def cell(v: Any, inline: bool = False) -> str:
    """One value: a string bare when no reader could take it for another value, else JSON."""
    if (
        isinstance(v, str)
        and not _raw_number(v)
        and not _UNSAFE.search(v)
        and not _NUMBER.match(v)
        and not (inline and _INLINE_UNSAFE.search(v))
    ):
        return v
    return dump(v)


def _key(k: Any) -> str:
    if not isinstance(k, str) or not _KEY.match(k):
        raise _Refused(k)
    return k


def _flat(rec: Any) -> dict[str, Any] | None:
    """A record with nested objects of plain values as dotted columns (None: not a record)."""
    if not isinstance(rec, dict) or not rec:
        return None
    out: dict[str, Any] = {}
    for k, v in rec.items():
        _key(k)
        if isinstance(v, dict) and v and all(_scalar(x) for x in v.values()):
            for kk, x in v.items():
                out[f"{k}.{_key(kk)}"] = x
        else:
            out[k] = v
    return out


def _records(v: Any) -> list[dict[str, Any]] | None:
    """``v`` as flattened records when it is a list of at least MIN_ROWS non-empty objects."""
    if not isinstance(v, list) or len(v) < MIN_ROWS:
        return None
    flat = [_flat(x) for x in v]
    return None if any(f is None for f in flat) else flat  # type: ignore[return-value]


def _keyed(v: dict[str, Any]) -> tuple[str, list[dict[str, Any]]] | None:
    """An object of records each holding its own key in one field as that field and the records."""
    if len(v) < MIN_ROWS or not all(isinstance(x, dict) and x for x in v.values()):
        return None
    for f in next(iter(v.values())):
        if all(type(x.get(f)) is str and x.get(f) == k for k, x in v.items()):
            recs = [_flat(x) for x in v.values()]
            return (f, recs) if all(r is not None for r in recs) else None  # type: ignore[return-value]
    return None


def columns(rows: list[dict[str, Any]]) -> list[str]:
    """The keys of ``rows``, each once, in the order they first come: a table's columns."""
    cols: list[str] = []
    seen: set[str] = set()
    for r in rows:
        for k in r:
            if k not in seen:
                seen.add(k)
                cols.append(k)
    return cols


def _table(head: str, rows: list[dict[str, Any]]) -> str:
    cols = columns(rows)
    same: dict[str, str] = {}
    if len(rows) >= HOIST_ROWS:
        for c in cols:
            first = rows[0].get(c)
            if c != "#" and all(c in r for r in rows) and _scalar(first):
                text = cell(first, inline=True)
                if not _INLINE_UNSAFE.search(text) and all(dump(r[c]) == dump(first) for r in rows):
                    same[c] = text
    shown = [c for c in cols if c not in same]
    lines = [f"{head}: " + "|".join(shown)]
    if same:
        lines[0] += _SAME + ", ".join(f"{c}={t}" for c, t in same.items())
    for r in rows:
        lines.append("|".join((cell(r[c]) if _scalar(r[c]) else dump(r[c])) if c in r else "" for c in shown))
    return "\n".join(lines)


def _head(key: str | None, n: int, by: str | None = None) -> str:
    """A table's head: ``key (N records)``, ``key, keyed by F (N records)``; at the top ``N records``."""
    if key is None:
        return f"{n} records"
    return f"{key}{f', keyed by {by}' if by else ''} ({n} records)"


def _lists_head(key: str | None, n: int) -> str:
    return f"{n} lists, by record #" if key is None else f"{key} lists ({n}, by record #)"


def _grouped(key: str | None, lists: Any) -> str | None:
    """A list of record lists: one table, the shorter of a group number on every record and the
    distinct records once with the lists as their numbers."""
    if not isinstance(lists, list) or len(lists) < 2 or not all(isinstance(x, list) and x for x in lists):
        return None
    flat = [[_flat(y) for y in x] for x in lists]
    if any(f is None for x in flat for f in x):
        return None
    rows = [{"#": _Number(i), **y} for i, x in enumerate(flat) for y in x if y is not None]
    out = _table(_head(key, len(rows)), rows) if len(rows) >= MIN_ROWS else None
    distinct: list[dict[str, Any]] = []
    index: dict[str, int] = {}
    groups: list[list[int]] = []
    for x in flat:
        groups.append([])
        for y in x:
            assert y is not None
            k = dump(y)
            if k not in index:
                index[k] = len(distinct)
                distinct.append(y)
            groups[-1].append(index[k])
    if len(rows) > len(distinct) >= MIN_ROWS:
        once = (
            _table(_head(key, len(distinct)), [{"#": _Number(i), **y} for i, y in enumerate(distinct)])
            + f"\n{_lists_head(key, len(groups))}: "
            + json.dumps(groups, separators=(",", ":"))
        )
        out = once if out is None or len(once) < len(out) else out
    return out


def _object(value: dict[str, Any]) -> str:
    lines: list[str] = []
    for k, v in value.items():
        _key(k)
        if _scalar(v):
            lines.append(f"{k}: {cell(v, inline=True)}")
            continue
        if isinstance(v, dict) and v and all(_scalar(x) for x in v.values()):
            parts = [(_key(a), cell(x, inline=True)) for a, x in v.items()]
            if not any(_INLINE_UNSAFE.search(t) for _, t in parts):
                lines.append(f"{k}: " + ", ".join(f"{a}={t}" for a, t in parts))
                continue
        keyed = _keyed(v) if isinstance(v, dict) else None
        recs = _records(v)
        grouped = _grouped(k, v) if recs is None and keyed is None else None
        if keyed is not None:
            lines.append(_table(_head(k, len(keyed[1]), _key(keyed[0])), keyed[1]))
        elif recs is not None:
            lines.append(_table(_head(k, len(recs)), recs))
        elif grouped is not None:
            lines.append(grouped)
        else:
            lines.append(f"{k}: {dump(v)}")
    return "\n".join(lines)


def render(value: Any) -> str | None:
    """``value`` (parsed by ``_summarize_text.load_json``) as lines and tables; None when it is not
    an object or a list of records or record lists, or has a key that is not a plain name."""
    try:
        if isinstance(value, dict) and value:
            return _object(value)
        recs = _records(value)
        if recs is not None:
            return _table(_head(None, len(recs)), recs)
        return _grouped(None, value)
    except (_Refused, RecursionError):
        return None


def smaller(value: Any, compact: str, max_rows: int = 400) -> str:
    """:func:`render` of ``value`` when it counts at least ``MIN_SAVING`` fewer tokens than ``compact``
    (summarize's JSON for the same value) in at most ``max_rows`` lines, else ``compact``."""
    out = render(value)
    if out is None or out.count("\n") > max_rows or len(out) >= len(compact):
        return compact
    return out if count_text(out) <= (1 - MIN_SAVING) * count_text(compact) else compact


# -- reading it back (the proof it is lossless; also for whoever needs the value again) -----------


def _literal(text: str) -> Any:
    if text[:1] in ('"', "[", "{") or _NUMBER.match(text) or text in ("true", "false", "null"):
        return json.loads(text)
    return text


def _cells(line: str) -> list[str | None]:
    """A table row's cells as their texts (None: an empty cell)."""
    out: list[str | None] = []
    i, n = 0, len(line)
    dec = json.JSONDecoder()
    while True:
        if i < n and line[i] in '"[{':
            _, end = dec.raw_decode(line, i)
            out.append(line[i:end])
            i = end
        else:
            j = line.find("|", i)
            j = n if j < 0 else j
            out.append(line[i:j] or None)
            i = j
        if i >= n:
            return out
        if line[i] != "|":
            raise ValueError(f"bad row: {line!r}")
        i += 1
        if i == n:
            out.append(None)
            return out


def _unflat(rec: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in rec.items():
        if "." in k:
            a, b = k.split(".", 1)
            out.setdefault(a, {})[b] = v
        else:
            out[k] = v
    return out


_HEAD = re.compile(
    r"^(?:([A-Za-z_][\w-]*)(?:, keyed by ([A-Za-z_][\w-]*))? \((\d+) records\)|(\d+) records): (.*)$"
)
_LISTS = re.compile(r"^(?:[A-Za-z_][\w-]* lists \(\d+, by record #\)|\d+ lists, by record #): (.*)$")
_INLINE_OBJECT = re.compile(r"^[A-Za-z_][\w-]*=")


def _read_table(lines: list[str], i: int) -> tuple[list[dict[str, Any]], int]:
    """The records of the table whose head is ``lines[i]``, and the index of the line after it."""
    m = _HEAD.match(lines[i])
    assert m is not None
    n = int(m.group(3) or m.group(4))
    cols_text, _, same_text = m.group(5).partition(_SAME)
    cols = cols_text.split("|") if cols_text else []
    same = {}
    if same_text:
        for part in same_text.split(", "):
            k, _, t = part.partition("=")
            same[k] = _literal(t)
    rows = []
    for line in lines[i + 1 : i + 1 + n]:
        texts = _cells(line) if cols_text else []
        rec = {c: _literal(t) for c, t in zip(cols, texts, strict=True) if t is not None}
        rows.append(_unflat({**rec, **same}))
    return rows, i + 1 + n


def _regroup(rows: list[dict[str, Any]], lines: list[str], i: int) -> tuple[list[list[dict[str, Any]]], int]:
    """Record lists from a table under a ``#`` column (and the lists line after it, if any)."""
    m = _LISTS.match(lines[i]) if i < len(lines) else None
    if m is None:
        out: list[list[dict[str, Any]]] = []
        for r in rows:
            if r.pop("#") == len(out):
                out.append([])
            out[-1].append(r)
        return out, i
    by_number = {r.pop("#"): r for r in rows}
    return [[by_number[j] for j in g] for g in json.loads(m.group(1))], i + 1


def parse(text: str) -> Any:
    """The JSON value :func:`render` wrote as ``text`` (numbers as Python numbers)."""
    lines = text.split("\n")
    head = _HEAD.match(lines[0])
    if head is not None and head.group(4) is not None:  # a list at the top
        rows, i = _read_table(lines, 0)
        return _regroup(rows, lines, i)[0] if "#" in rows[0] else rows
    out: dict[str, Any] = {}
    i = 0
    while i < len(lines):
        head = _HEAD.match(lines[i])
        if head is not None:
            key, by = head.group(1), head.group(2)
            rows, i = _read_table(lines, i)
            if by:
                out[key] = {r[by]: r for r in rows}
            elif "#" in rows[0]:
                out[key], i = _regroup(rows, lines, i)
            else:
                out[key] = rows
            continue
        key, _, rest = lines[i].partition(": ")
        if _INLINE_OBJECT.match(rest):
            out[key] = {a: _literal(t) for a, _, t in (p.partition("=") for p in rest.split(", "))}
        else:
            out[key] = _literal(rest)
        i += 1
    return out
