"""Lines already in the context: a run of lines that an earlier tool result already shows becomes a pointer.

What it saves: agents re-read files they read before (after an edit, a wider range, the same range
again) and re-run commands whose output is mostly the same; every copy is billed again on every
later call. A run of at least ``min_lines`` consecutive lines (``min_chars`` characters) that an
earlier tool result, still sent in full, shows in the same order is replaced by one line naming
that result and where the run is in it (its line numbers for numbered file contents; a re-read
whose lines moved after an edit above them names both ranges, ``lines 151-160 as lines 150-159
of``, so every new number is still there). A JSON object result with the same keys, in the same
order, as an earlier object result (tau-bench's update calls return the whole record again) is sent
as a pointer to it and the values that differ, when that is under 70% of its size. A run that is,
in order, lines of a string field of an earlier tool use's input (a file Claude Code wrote with
``Write`` or the ``new_string`` of an ``Edit``, read back later) points at that field the same way
(``lines 12-30 (as 12→text) are lines 1-19 of 'content' in the tool_use X input above``). Lossless as
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
from collections.abc import Callable
from typing import Any

import xxhash

from tokensaver.tokens import memo_enabled

from . import _self_repeats
from ._lru import SizedLRU
from ._summarize_text import (
    SPARSE_NOTE_START,
    dump,
    full_lines,
    keep_anchored,
    load_json,
    without_idle_note,
)

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


RESULT = "the tool_use {} result"  # how a pointer names the earlier text (its id in the braces)
# ... and in the short pointers (``marker``'s ``short``: the tool use's id says it is one),
# ``[tokensaver: repeats lines 8-14 of the toolu_X result]``: prune's and summarize's pointers to a result
SHORT_RESULT = "the {} result"


def marker(
    tid: str,
    n: int,
    here: tuple[int, int] | None,
    there: tuple[int, int],
    noun: str = RESULT,
    short: bool = False,
) -> str:
    """The pointer line: ``here``/``there`` are line numbers when both copies are numbered, else
    ``there`` is the run's position (1-based line indexes) in the earlier result's text. ``noun``
    names the earlier text (``RESULT``: a tool result, by its tool use's id). ``short``: without the
    words the range already says (the count of lines, "above": what it names is always above),
    ``[tokensaver: repeats lines 3-14 of assistant turn 5's command]``."""
    what = noun.format(tid)
    if short:
        if here is None:
            return f"[tokensaver: repeats lines {there[0]}-{there[1]} of {what}]"
        if here == there:
            return f"[tokensaver: lines {here[0]}-{here[1]} as in {what}]"
        return f"[tokensaver: lines {here[0]}-{here[1]} as lines {there[0]}-{there[1]} of {what}]"
    if here is not None:
        if here == there:
            return f"[tokensaver: lines {here[0]}-{here[1]} as in {what} above]"
        return f"[tokensaver: lines {here[0]}-{here[1]} as lines {there[0]}-{there[1]} of {what} above]"
    return f"[tokensaver: {n} lines as lines {there[0]}-{there[1]} of {what} above]"


_SHOWN = {"→": "→", "\t": "\\t", ":": ":"}


def input_marker(
    tid: str, field: str, n: int, here: tuple[int, str] | str | None, there: tuple[int, int]
) -> str:
    """The pointer line for a run found in an earlier tool use's input field: ``here`` is the
    run's first line number and separator when its lines are numbered (``<n><sep><text>``, one
    more on each line), or the character before each line in a diff (``+``, ``-`` or a space);
    ``there`` is the run's 1-based line range in the field."""
    where = f"lines {there[0]}-{there[1]} of {field!r} in the tool_use {tid} input above"
    if here is None:
        return f"[tokensaver: {n} lines as {where}]"
    if isinstance(here, str):
        return f"[tokensaver: {n} lines as {where}, each after {here!r}]"
    first, sep = here
    return f"[tokensaver: lines {first}-{first + n - 1} (as {first}{_SHOWN[sep]}text) are {where}]"


_NUMBERED_INPUT = re.compile(r"^(\d+)(→|\t|:)")


def _before(spots: tuple[tuple[int, int], ...], n: int) -> tuple[tuple[int, int], ...]:
    """The places of ``spots`` in the first ``n`` texts (or inputs): the same tuple when all are."""
    return spots if not spots or spots[-1][0] < n else tuple(s for s in spots if s[0] < n)


class _Pointing:
    """How an index points: its shortest run (lines, characters; at least ``moved_min_chars`` for a
    run of numbered lines now under other numbers than where it points), the noun
    its pointers name the earlier text by, their form; ``_begin`` makes the rest of its state."""

    def __init__(
        self,
        min_lines: int,
        min_chars: int,
        noun: str = RESULT,
        short: bool = False,
        within: Callable[[str], str] | None = None,
        moved_min_chars: int | None = None,
    ) -> None:
        self.min_lines = min_lines
        self.min_chars = min_chars
        # a moved run's pointer gives its new numbers only as a range (``lines 267-271 as lines
        # 225-229 of``): the model counts to find one, and a short run of common code (the same
        # few lines in two functions) matches by chance there
        self.moved_min_chars = max(min_chars, moved_min_chars or 0)
        self.noun = noun  # how a pointer names the earlier text (see ``marker``)
        self.short = short  # the short pointer lines (see ``marker``)
        # a text rewritten also gets its runs of its own lines above as pointers (``_self_repeats``,
        # after the pointers to earlier texts, counted in it as sent); ``within(tid)`` names it there
        self.within = within
        self._begin()

    def _begin(self) -> None:
        raise NotImplementedError

    def _line_index(self) -> LineIndex:
        """A new :class:`LineIndex` pointing as this one does."""
        return LineIndex(
            self.min_lines, self.min_chars, self.noun, self.short, self.within, self.moved_min_chars
        )


class LineIndex(_Pointing):
    """The lines of the tool results sent so far, for finding runs a new result repeats."""

    def _begin(self) -> None:
        # (tool_use id, lines, keys, line numbers)
        self.texts: list[tuple[str, list[str], list[str], list[int | None]]] = []
        # key -> (text index, line index), oldest first; tuples, not lists: a long-lived index holds
        # one per distinct line, and tuples of ints are not objects the garbage collector walks
        self.where: dict[str, tuple[tuple[int, int], ...]] = {}
        # JSON objects sent in full: (tool_use id, keys in order, each value as compact JSON)
        self.objects: list[tuple[str, tuple[str, ...], dict[str, str]]] = []
        # string fields of earlier tool uses' inputs: (tool_use id, field, lines); where_in: line ->
        # (input index, line index)
        self.inputs: list[tuple[str, str, list[str]]] = []
        self.where_in: dict[str, tuple[tuple[int, int], ...]] = {}
        # RepeatIndex's chain key, object and input counts after each text or input it was fed
        # (when it is what feeds this one)
        self.marks: list[tuple[bytes, int, int, int]] = []

    def fork(self, marks: int) -> LineIndex:
        """A new index in this one's state after its first ``marks`` feeds (the lines shared, the
        lookups copied): this one goes on along its own results."""
        new = self._line_index()
        texts, objects, inputs = self.marks[marks - 1][1:] if marks else (0, 0, 0)
        new.texts, new.objects, new.inputs = self.texts[:texts], self.objects[:objects], self.inputs[:inputs]
        new.marks = self.marks[:marks]
        new.where = {k: _before(spots, texts) for k, spots in self.where.items()}
        new.where_in = {k: _before(spots, inputs) for k, spots in self.where_in.items()}
        return new

    def mark(self, key: bytes) -> None:
        """Note the state after a feed under RepeatIndex's chain ``key``."""
        self.marks.append((key, len(self.texts), len(self.objects), len(self.inputs)))

    def add_input(self, tid: str, fields: dict[str, str]) -> None:
        """Index the string fields of a tool use's input (``input_fields``) as lines a later
        result may repeat."""
        for name, value in fields.items():
            lines = value.split("\n")
            k = len(self.inputs)
            self.inputs.append((tid, name, lines))
            for p, ln in enumerate(lines):
                if len(ln.strip()) >= 4 and not ln.startswith("[tokensaver:"):
                    spots = self.where_in.get(ln, ())
                    if len(spots) < _MAX_CANDIDATES:
                        self.where_in[ln] = (*spots, (k, p))

    def _input_run(
        self, lines: list[str], i: int, diff: bool
    ) -> tuple[int, tuple[int, int], tuple[int, str] | str | None]:
        """The longest run from ``lines[i]`` that is, in order, lines of one indexed input field:
        (length, (input index, line index), how each line is written: (first number, separator)
        when the run is numbered, the character before each line of a diff's hunk when ``diff``)."""
        m = _NUMBERED_INPUT.match(lines[i])
        mark = lines[i][:1] if diff and m is None and lines[i][:1] in ("+", "-", " ") else ""
        body = lines[i][m.end() :] if m else lines[i][len(mark) :]
        best, at = 0, (0, 0)
        for k, p in self.where_in.get(body, ()):
            src = self.inputs[k][2]
            n = 0
            while i + n < len(lines) and p + n < len(src):
                ln = lines[i + n]
                if m is None:
                    if ln != mark + src[p + n]:
                        break
                else:
                    mm = _NUMBERED_INPUT.match(ln)
                    if not (
                        mm
                        and mm.group(2) == m.group(2)
                        and int(mm.group(1)) == int(m.group(1)) + n
                        and ln[mm.end() :] == src[p + n]
                    ):
                        break
                n += 1
            if n > best:
                best, at = n, (k, p)
        return best, at, ((int(m.group(1)), m.group(2)) if m else mark or None)

    def add(self, tid: str, lines: list[str]) -> None:
        """Index the lines of a result as sent (markers are not content: they are left out; a sparse
        run's lines under the numbers they stand for, ``full_lines``)."""
        nums, keys = _keys(full_lines(lines))
        t = len(self.texts)
        self.texts.append((tid, lines, keys, nums))
        for p, k in enumerate(keys):
            if len(k) >= 4 and not k.startswith("[tokensaver:"):
                spots = self.where.get(k, ())
                if len(spots) < _MAX_CANDIDATES:
                    self.where[k] = (*spots, (t, p))

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
        # a sparse run's unnumbered lines compared, and pointed to, under their numbers
        full = full_lines(lines)
        nums, keys = _keys(full)
        hunks = bool(self.where_in) and ("\n@@ " in text or text.startswith("@@ "))
        out: list[str] = []
        source: list[int | None] = []  # the line of ``lines`` each of ``out`` is (None: a pointer)
        i = 0
        changed = False
        while i < len(lines):
            best, at = 0, (0, 0)
            for t, p in self.where.get(keys[i], ()) if len(keys[i]) >= 4 else ():
                n = _run(keys, nums, i, self.texts[t][2], self.texts[t][3], p)
                if n > best:
                    best, at = n, (t, p)
            n_in, at_in, here_in = self._input_run(full, i, hunks) if self.where_in else (0, (0, 0), None)
            if n_in > best and self._long(lines, i, n_in):
                k, p = at_in
                in_tid, field, _ = self.inputs[k]
                out.append(input_marker(in_tid, field, n_in, here_in, (p + 1, p + n_in)))
                source.append(None)
                i += n_in
                changed = True
                continue
            moved = best > 0 and nums[i] is not None and nums[i] != self.texts[at[0]][3][at[1]]
            if self._long(lines, i, best, moved):
                t, p = at
            else:
                out.append(lines[i])
                source.append(i)
                i += 1
                continue
            old_tid, _, _, old_nums = self.texts[t]
            first, last = nums[i], nums[i + best - 1]
            first0, last0 = old_nums[p], old_nums[p + best - 1]
            if None not in (first, last, first0, last0):
                m = marker(old_tid, best, (first, last), (first0, last0), self.noun, self.short)  # type: ignore[arg-type]
            else:
                m = marker(old_tid, best, None, (p + 1, p + best), self.noun, self.short)
            out.append(m)
            source.append(None)
            i += best
            changed = True
        if changed:
            # (before the self-repeats and the index: they count this text's lines as sent)
            out = without_idle_note(keep_anchored(out, source, lines, full))
        if self.within is not None:
            joined = "\n".join(out) if changed else text
            own = _self_repeats.rewrite(joined, self.min_lines, self.min_chars, self.short, self.within(tid))
            if own is not joined:
                out, changed = own.split("\n"), True
        self.add(tid, out)
        return "\n".join(out) if changed else text

    def _long(self, lines: list[str], i: int, n: int, moved: bool = False) -> bool:
        """Whether ``n`` lines from ``lines[i]`` are long enough for a pointer (``moved``: numbered
        lines under other numbers than where it points)."""
        least = self.moved_min_chars if moved else self.min_chars
        return n >= self.min_lines and sum(len(ln) + 1 for ln in lines[i : i + n]) >= least

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
            out = object_marker(old_tid, len(changed), len(keys), self.noun, self.short) + "\n" + body
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


def input_fields(tool_input: Any, min_lines: int, min_chars: int) -> dict[str, str]:
    """The string fields of a tool use's input long enough to hold a run (else empty): top-level
    ``str`` values of at least ``min_lines`` lines and ``min_chars`` characters."""
    if not isinstance(tool_input, dict):
        return {}
    return {
        k: v
        for k, v in tool_input.items()
        if isinstance(k, str)
        and isinstance(v, str)
        and len(v) >= min_chars
        and v.count("\n") >= min_lines - 1
    }


def object_marker(tid: str, changed: int, keys: int, noun: str = RESULT, short: bool = False) -> str:
    """The pointer line before the values that differ from the earlier result's object."""
    where = "" if short else " above"
    return f"[tokensaver: as {noun.format(tid)}{where}, with {changed} of its {keys} keys now:]"


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
        if keys[i + n].startswith(SPARSE_NOTE_START):
            break  # the note stays with the lines it is about
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


def _input_text(fields: dict[str, str]) -> str:
    """A tool use's indexed fields as one text for the chain key (tagged apart from any result)."""
    return "\0input\0" + "\0".join(f"{k}\0{len(v)}\0{v}" for k, v in fields.items())


class RepeatIndex(_Pointing):
    """:class:`LineIndex` as a request's results (and tool uses' inputs) are fed to it, its
    rewrites kept across calls.

    A result's rewrite depends only on what was fed before it (and the two settings): it is kept
    under a chain key, the digest of the previous key and this result (tool_use id and text) or
    input. On a later call the results already seen are answered from their keys without indexing
    anything; from the first feed not seen (the new ones, or all after a cut) the index is resumed
    from where the last seen one left it (its lines kept once per conversation, not per call;
    forked when it has moved on along other results) or, when it is gone, rebuilt from what was fed
    so far. Same text out as a fresh :class:`LineIndex` (with memos off,
    ``set_memo_enabled(False)``, it is one).
    """

    def _begin(self) -> None:
        # another noun or pointer form, other pointers: its own chains (the results' chain keys are
        # as they were); one ``within`` per kind of index (a module's function, named in the tag)
        tag = ("" if self.noun == RESULT else "\0" + self.noun) + ("\0short" if self.short else "")
        if self.within is not None:
            tag += f"\0within\0{self.within.__module__}.{self.within.__qualname__}"
        if self.moved_min_chars != self.min_chars:
            tag += f"\0moved\0{self.moved_min_chars}"
        seed = f"repeats\0{self.min_lines}\0{self.min_chars}{tag}"
        self.start = self.key = xxhash.xxh3_128_digest(seed.encode())
        # what was fed so far, for a rebuild: (tool_use id, result text) or (id, input fields)
        self.fed: list[tuple[str, str | tuple[str] | dict[str, str]]] = []
        self.index: LineIndex | None = None  # the last hit's index, then the one this request extends
        self.plain = self._line_index() if not memo_enabled() else None

    def rewrite(self, tid: str, text: str) -> str:
        """``LineIndex.rewrite(tid, text)`` for what was fed so far."""
        if self.plain is not None:
            return self.plain.rewrite(tid, text)
        return self._feed(tid, text, text)

    def add_text(self, tid: str, text: str) -> None:
        """Index ``text`` as it is (no pointer made in it) for the texts after it."""
        if self.plain is not None:
            self.plain.add(tid, text.split("\n"))
            return
        self._feed(tid, (text,), _chain_text((text,)))

    def add_input(self, tid: str, tool_input: Any) -> None:
        """Index a tool use's input (its long string fields) for the results after it."""
        fields = input_fields(tool_input, self.min_lines, self.min_chars)
        if not fields:
            return
        if self.plain is not None:
            self.plain.add_input(tid, fields)
            return
        self._feed(tid, fields, _input_text(fields))

    def _feed(self, tid: str, item: str | tuple[str] | dict[str, str], text: str) -> str:
        previous, n = self.key, len(self.fed)
        self.key = key = _step(previous, tid, text)
        self.fed.append((tid, item))
        hit = _CHAIN.get(key)
        if hit is not None:
            self.index = hit.index
            return text if hit.out is None else hit.out
        with _CHAIN.lock:
            index = self._at(previous, n)
            out = _apply(index, tid, item)
            index.mark(key)
            self.index = index
            size = len(text) + (len(out) if out is not text else 0)
            _CHAIN.put(key, _Entry(None if out is text else out, index), size)
        return out

    def _at(self, previous: bytes, n: int) -> LineIndex:
        """An index in the state after the first ``n`` feeds (under the chain lock): the one the
        last of them was indexed in (a fork of it when it went on along other results: a cut spec
        prune tries and the one it sends each keep theirs), or a new one fed them all again."""
        index = self.index
        if index is not None and n >= 1 and len(index.marks) >= n and index.marks[n - 1][0] == previous:
            return index if len(index.marks) == n else index.fork(n)
        index = self._line_index()
        key = self.start
        for tid, item in self.fed[:n]:
            key = _step(key, tid, _chain_text(item))
            _apply(index, tid, item)
            index.mark(key)
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


def _chain_text(item: str | tuple[str] | dict[str, str]) -> str:
    """What a feed adds to the chain key: a result's text, a text indexed as it is (tagged), or an
    input's fields (tagged)."""
    if isinstance(item, str):
        return item
    if isinstance(item, tuple):
        return "\0text\0" + item[0]
    return _input_text(item)


def _apply(index: LineIndex, tid: str, item: str | tuple[str] | dict[str, str]) -> str:
    """Feed one result (its rewrite returned), one text to index as it is (``(text,)``) or one
    input's fields (both return "") to ``index``."""
    if isinstance(item, str):
        return index.rewrite(tid, item)
    if isinstance(item, tuple):
        index.add(tid, item[0].split("\n"))
        return ""
    index.add_input(tid, item)
    return ""
