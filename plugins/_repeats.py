"""Lines already in the context: a run of lines that an earlier tool result already shows becomes a pointer.

What it saves: agents re-read files they read before (after an edit, a wider range, the same range
again) and re-run commands whose output is mostly the same; every copy is billed again on every
later call. A run of at least ``min_lines`` consecutive lines (``min_chars`` characters) that an
earlier tool result, still sent in full, shows in the same order is replaced by one line naming
that result and where the run is in it (its line numbers for numbered file contents; a re-read
whose lines moved after an edit above them names both ranges, ``lines 151-160 as lines 150-159
of``, so every new number is still there). A JSON object result with the same keys, in the same
order, as an earlier object result (tau-bench's update calls return the whole record again) is sent
as a pointer to it and the values that differ, when that is under 70% of its size. Lossless as
long as the earlier result stays in the request: prune calls this from its pure ``apply_spec``, so
a result a cut clears is not pointed to, and a pointer to it becomes the lines again.

Deterministic: a block's rewrite depends only on the blocks before it, so between cuts a result
gets the same bytes on every call; a block is rewritten when it is new, never after it was sent.
Unsafe when the model cannot look back at the earlier result (a client that drops history).
"""

from __future__ import annotations

import json
import re
import threading

import xxhash

from tokensaver.tokens import memo_enabled

from ._lru import SizedLRU
from ._summarize_text import dump, load_json

_NUMBER_RE = re.compile(r"^ *(\d+)(?:→|\t|:)")
_MAX_CANDIDATES = 8  # earlier places of one line tried as the start of a run


def _split(line: str) -> tuple[int | None, str]:
    """A line as compared: its line number (None when it has none) and the rest, right-stripped.

    A numbered line matches the same code under another number (a re-read after an edit above
    it): the run's numbers must then go up by one in both copies, and the pointer names both
    ranges, so every new number is still there to read (``lines 151-160 as lines 150-159 of``)."""
    m = _NUMBER_RE.match(line)
    if m is None:
        return None, line.rstrip()
    return int(m.group(1)), line[: m.start(1)].strip() + "\0" + line[m.end(1) :].rstrip()


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
        # (tool_use id, lines, keys, line numbers)
        self.texts: list[tuple[str, list[str], list[str], list[int | None]]] = []
        self.where: dict[str, list[tuple[int, int]]] = {}  # key -> (text index, line index)
        # JSON objects sent in full: (tool_use id, keys in order, each value as compact JSON)
        self.objects: list[tuple[str, tuple[str, ...], dict[str, str]]] = []
        # RepeatIndex's chain key and object count after each text (when it is what feeds this one)
        self.marks: list[tuple[bytes, int]] = []

    def fork(self, texts: int, objects: int) -> LineIndex:
        """A new index in this one's state after its first ``texts`` texts and ``objects`` objects
        (the lines shared, the lookup copied): this one goes on along its own results."""
        new = LineIndex(self.min_lines, self.min_chars)
        new.texts, new.objects, new.marks = self.texts[:texts], self.objects[:objects], self.marks[:texts]
        new.where = {k: [s for s in spots if s[0] < texts] for k, spots in self.where.items()}
        return new

    def add(self, tid: str, lines: list[str]) -> None:
        """Index the lines of a result as sent (markers are not content: they are left out)."""
        nums, keys = _keys(lines)
        t = len(self.texts)
        self.texts.append((tid, lines, keys, nums))
        for p, k in enumerate(keys):
            if len(k) >= 4 and not k.startswith("[tokensaver:"):
                spots = self.where.setdefault(k, [])
                if len(spots) < _MAX_CANDIDATES:
                    spots.append((t, p))

    def rewrite(self, tid: str, text: str) -> str:
        """``text`` with every long run of lines already indexed replaced by a pointer; then indexed.

        A JSON object with the same keys, in the same order, as one an earlier result sent in full
        becomes a pointer to it and the values that differ (an update that returns the record)."""
        obj = _object(text) if len(text) >= self.min_chars and text[:1] == "{" else None
        if obj is not None:
            diff = self._object_diff(obj, len(text))
            self.add(tid, text.split("\n") if diff is None else [])
            if diff is None:
                self.objects.append((tid, tuple(obj), obj))
                return text
            return diff
        lines = text.split("\n")
        if len(lines) < self.min_lines:
            self.add(tid, lines)
            return text
        nums, keys = _keys(lines)
        out: list[str] = []
        i = 0
        changed = False
        while i < len(lines):
            best, at = 0, (0, 0)
            for t, p in self.where.get(keys[i], ()) if len(keys[i]) >= 4 else ():
                n = _run(keys, nums, i, self.texts[t][2], self.texts[t][3], p)
                if n > best:
                    best, at = n, (t, p)
            if best >= self.min_lines and sum(len(ln) + 1 for ln in lines[i : i + best]) >= self.min_chars:
                t, p = at
            else:
                out.append(lines[i])
                i += 1
                continue
            old_tid, old_lines, _, _ = self.texts[t]
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

    def _object_diff(self, obj: dict[str, str], size: int) -> str | None:
        """The pointer and changed values against the earlier object that leaves the least, if it pays."""
        keys = tuple(obj)
        best: str | None = None
        for old_tid, old_keys, old in reversed(self.objects):
            if old_keys != keys:
                continue
            changed = {k: v for k, v in obj.items() if old[k] != v}
            if len(changed) > len(keys) // 2:
                continue
            body = (
                "{" + ",".join(json.dumps(k, ensure_ascii=False) + ":" + v for k, v in changed.items()) + "}"
            )
            out = object_marker(old_tid, len(changed), len(keys)) + "\n" + body
            if best is None or len(out) < len(best):
                best = out
        return best if best is not None and len(best) <= 0.7 * size else None


def _object(text: str) -> dict[str, str] | None:
    """A one-object JSON text as its top-level values in compact JSON (numbers as written), else None."""
    try:
        value = load_json(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict) or len(value) < 3:
        return None
    return {k: dump(v) for k, v in value.items()}


def object_marker(tid: str, changed: int, keys: int) -> str:
    """The pointer line before the values that differ from the earlier result's object."""
    return f"[tokensaver: as the tool_use {tid} result above, with {changed} of its {keys} keys now:]"


def _keys(lines: list[str]) -> tuple[list[int | None], list[str]]:
    split = [_split(ln) for ln in lines]
    return [n for n, _ in split], [k for _, k in split]


def _run(
    keys: list[str], nums: list[int | None], i: int, old: list[str], old_nums: list[int | None], p: int
) -> int:
    """How many lines from ``keys[i]`` repeat ``old[p:]`` in order: the same text, numbered lines
    under the same numbers, or (a shifted re-read) a run of numbered lines only, each one more than
    the line before in both copies, so the pointer's two ranges say where every line went."""
    n = 0
    shift: int | None = None
    plain = False
    while i + n < len(keys) and p + n < len(old) and keys[i + n] == old[p + n]:
        a, b = nums[i + n], old_nums[p + n]
        if (a is None) != (b is None):
            break
        if a is None or b is None:
            if shift:
                break
            plain = True
        elif shift is None:
            if a != b and plain:
                break
            shift = a - b
        elif a - b != shift or (shift and a != nums[i + n - 1] + 1):  # type: ignore[operator]
            break
        n += 1
    return n


# -- kept across calls -----------------------------------------------------------------------------

CHAIN_BYTES = 32 * 1024 * 1024  # the texts the kept entries' indexes hold, and their rewrites
CHAIN_ENTRIES = 200_000


class _Entry:
    __slots__ = ("index", "out")

    def __init__(self, out: str | None, index: LineIndex) -> None:
        self.out, self.index = out, index


class _Chain:
    """Each rewrite kept by its chain key (the results before it and itself), oldest out first."""

    def __init__(self) -> None:
        self.kept: SizedLRU[bytes, _Entry] = SizedLRU()
        self.lock = threading.RLock()  # also held while an entry's index is resumed and extended

    def get(self, key: bytes) -> _Entry | None:
        with self.lock:
            return self.kept.get(key)

    def put(self, key: bytes, entry: _Entry, size: int) -> None:
        with self.lock:
            self.kept.put(key, entry, size, CHAIN_ENTRIES, CHAIN_BYTES)


_CHAIN = _Chain()


def _step(key: bytes, tid: str, text: str) -> bytes:
    return xxhash.xxh3_128_digest(
        key + tid.encode("utf-8", "surrogatepass") + b"\0" + text.encode("utf-8", "surrogatepass")
    )


class RepeatIndex:
    """:class:`LineIndex` as a request's results are fed to it, its rewrites kept across calls.

    A result's rewrite depends only on the results fed before it (and the two settings): it is kept
    under a chain key, the digest of the previous key and this result (tool_use id and text). On a
    later call the results already seen are answered from their keys without indexing anything;
    from the first result not seen (the new ones, or all after a cut) the index is resumed from
    where the last seen one left it (its lines kept once per conversation, not per call; forked when
    it has moved on along other results) or, when it is gone, rebuilt from the results fed so far. Same text out as a fresh
    :class:`LineIndex` (with memos off, ``set_memo_enabled(False)``, it is one).
    """

    def __init__(self, min_lines: int, min_chars: int) -> None:
        self.min_lines, self.min_chars = min_lines, min_chars
        self.start = self.key = xxhash.xxh3_128_digest(f"repeats\0{min_lines}\0{min_chars}".encode())
        self.fed: list[tuple[str, str]] = []  # the results so far, for a rebuild
        self.index: LineIndex | None = None  # the last hit's index, then the one this request extends
        self.plain = LineIndex(min_lines, min_chars) if not memo_enabled() else None

    def rewrite(self, tid: str, text: str) -> str:
        """``LineIndex.rewrite(tid, text)`` for the results fed so far."""
        if self.plain is not None:
            return self.plain.rewrite(tid, text)
        previous, n = self.key, len(self.fed)
        self.key = key = _step(previous, tid, text)
        self.fed.append((tid, text))
        hit = _CHAIN.get(key)
        if hit is not None:
            self.index = hit.index
            return text if hit.out is None else hit.out
        with _CHAIN.lock:
            index = self._at(previous, n)
            out = index.rewrite(tid, text)
            index.marks.append((key, len(index.objects)))
            self.index = index
            size = len(text) + (len(out) if out is not text else 0)
            _CHAIN.put(key, _Entry(None if out is text else out, index), size)
        return out

    def _at(self, previous: bytes, n: int) -> LineIndex:
        """An index in the state after the first ``n`` results fed (under the chain lock): the one
        the last of them was indexed in (a fork of it when it went on along other results: a cut
        spec prune tries and the one it sends each keep theirs), or a new one fed them all again."""
        index = self.index
        if index is not None and n >= 1 and len(index.marks) >= n and index.marks[n - 1][0] == previous:
            return index if len(index.marks) == n else index.fork(n, index.marks[n - 1][1])
        index = LineIndex(self.min_lines, self.min_chars)
        key = self.start
        for tid, text in self.fed[:n]:
            key = _step(key, tid, text)
            index.rewrite(tid, text)
            index.marks.append((key, len(index.objects)))
        return index

    def resume(self, key: bytes, fed: int) -> bool:
        """Go on after ``fed`` feeds whose chain key is ``key`` (kept by an earlier call, without what
        was fed): False when the index they left is no longer kept (then feed them all again)."""
        hit = _CHAIN.get(key)
        marks = hit.index.marks if hit is not None else []
        if self.plain is not None or fed < 1 or len(marks) < fed or marks[fed - 1][0] != key:
            return False
        self.key, self.index, self.fed = key, hit.index, [None] * fed  # type: ignore[list-item,union-attr]
        return True

    @staticmethod
    def kept(key: bytes) -> str | None:
        """The rewrite kept under a chain key (None: the text went unchanged, or is no longer kept)."""
        hit = _CHAIN.get(key)
        return None if hit is None else hit.out
