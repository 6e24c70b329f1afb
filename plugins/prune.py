"""prune: keep a conversation under a token budget with rare, deep cuts that the prompt cache survives.

What it saves: every later call re-reads the history; old tool results (file reads, command
output) are most of it. Nothing changes until the request passes the *trigger* (``trigger`` x the
budget); then one cut brings it to the *target* (``target`` x the budget): stale tool results (all
but the last ``keep_tool_uses`` tool uses, ``exclude_tools`` never) are replaced by a short marker,
oldest first; if that is not enough, whole old turns after the task are dropped. The cut is kept
per conversation (which tool results are cleared, where turns were dropped), so between cuts every
older message gets exactly the same bytes and the cached prefix stays valid. Repeated identical
tool outputs (``dedupe``) are replaced in the *newer* copy by a pointer to the earlier one, which
never rewrites history; so are runs of at least ``repeat_min_lines`` lines (``repeat_min_chars``
characters) that an earlier result still sent in full shows in the same order (``repeats``: a
re-read of a file after an edit, a test suite run again), see ``_repeats``; a repeat pointer is in
summarize's short form, ``[tokensaver: repeats lines 8-14 of the toolu_X result]`` (one
implementation, ``_repeats.marker``; tuning half, net of lost facts: claude-code-entire 33.30% ->
33.40%, mini-swe-agent 17.44% -> 17.64%, swe-agent 28.20% -> 28.28%). Both are decided from
the blocks before each result, so a result gets the same bytes on every call, and a cut that clears
the earlier copy turns the pointer back into the lines. Error results count too (Claude Code marks a
command that exits non-zero, a failing test run, as an error; its re-run after the fix repeats most
of it): real Claude Code e2e session 10.3% -> 10.9% billed saving, claude-code-entire validation
half 23.2% -> 23.3% net of lost facts.

With ``clear_outline`` (off by default), a file read that a cut clears keeps its definition lines
(functions, types, modules, tests; at most 12% of the read) after the marker: what an agent names
when it comes back to a file it read long ago. Tuning half, net of lost facts: spotter 18.1% ->
19.5% (lost results 4 -> 3), claude-code-entire 26.8% -> 25.8% (gross 30.4% -> 29.0%, lost
results 38 -> 31); both Claude Code sources together 25.8% -> 25.2% (25.4% with a 5% outline,
25.5% with only reads superseded by an edit outlined, at 8%): the outline and the cuts it makes
smaller cost more in reads than the rounds it saves.

Never breaks a request: system, tools and the first user message (the task) are kept, the last
``keep_last_messages`` messages are untouched, tool_use/tool_result pairs stay together (the result
content becomes a marker), thinking blocks are never edited, roles stay alternating; a result that
fails the structural check is dropped (the request goes out unpruned, and the report says so).

Below the budget, an *economic* cut (``clear_stale``) clears stale tool results when that pays
for itself in cache prices. With prompt caching every call re-reads the whole history (cache read
price per token), so an old 10k-token file read costs 10k reads on every later call. Clearing
changes the prefix from the first cleared result on, and the API then reads only the longest
prefix it still has an unexpired entry for within 20 blocks of a breakpoint: for a change deep in
the history that is the end of tools + system (when that entry is still live) or nothing, so a
deep cut re-writes the whole prompt, not just what follows the change (:func:`rewrite_tokens`;
prune follows each conversation's billed calls: when it was last called, the TTL of its writes,
whether the tools + system entry was touched). Cost ~ (``cache_write_5m`` - ``cache_read``) x the
tokens re-written; after a pause longer than the TTL everything is written anyway and a cut costs
nothing. Benefit ~ ``cache_read`` x the tokens cleared x the calls still to come. The calls to come
are unknown: they are taken to be as many as the calls so far (the assistant turns in the request,
so a retry decides the same way), at least ``clear_min_future_calls``, at most
``clear_max_future_calls`` (a higher cap made cuts earlier and more often on the Claude Code
tuning half, and lost more facts than it saved: the benefit of cutting now is only the reads until
the next cut, which would clear the same results). The cut is made, clearing *every* stale result
at once (cut deep, then leave the prefix alone), when

* benefit >= ``clear_payback`` x cost, and
* the stale tokens are at least ``clear_min_tokens`` and ``clear_min_fraction`` of the request
  (hysteresis: no small cut every few turns).

Stale: the result of a tool use older than the last ``clear_keep_tool_uses`` ones (more than the
budget cut's ``keep_tool_uses``: an economic cut is optional, so it only clears what the model is
unlikely to quote again; on Claude Code traces agents quote file reads 20-50 tool uses later), not
in the last ``keep_last_messages`` messages, at least ``min_result_tokens``, tool not in
``exclude_tools``. The result of a tool use that is not a read of a file (command output, a search,
a listing) is stale sooner, once older than the last ``clear_keep_output_uses`` tool uses (16): the
agent names a file's contents again long after, what a command printed much less. With
``clear_quiet_tool_uses`` N, a read of a file (whole or a range) is stale
instead once none of the last N tool uses names the file (its read, an edit, a search, a command);
with ``clear_keep_quoted`` N, a result the agent quoted in one of its last N turns (an identifier,
path or file name of it that few results hold, in its text or tool inputs) is never stale, nor is
a read superseded by an edit.

Superseded (``clear_superseded``): a result is stale at any age (in both cuts; still never in the
last ``keep_last_messages`` messages, never an excluded tool) when a later tool use, whose result
is not an error, supersedes it: the same call again (same tool, identical input: a re-run shell
command, a re-read file range), or a whole read of the same resource after a read or write of it
(the same value under an input key named like a path or url: ``file_path``, ``path``,
``notebook_path``, ``filename``, ``url``, with no other input but a range), or, with
``superseded_by_write``, a write of the whole file (input with ``content``/``file_text``) after a
read of it: the read content is out of date and the agent quotes the newer state. An edit of a part
(``old_string``/``new_string``, ``edits``, ...) supersedes a read only with ``superseded_by_edit``:
the rest of the file is as read, and on the Claude Code tuning half half of the lost facts came
from Reads cleared that way; with ``edit_quiet_tool_uses`` N (8) the edit supersedes the read only
once none of the last N tool uses names the file (an agent still editing a file quotes the rest of
its read: until then it ages like any read). Tuning half, net of lost facts vs automatic caching,
both together (16 / 8 vs neither): claude-code-entire 33.2% -> 33.3%, lost results 27 -> 21 ($2.75 ->
$1.98), facts kept 99.6% -> 99.5% (more facts in each lost command output); claude-code-spotter
19.2% -> 20.0%, lost results 5 -> 4, facts kept 99.1% -> 99.8% (either alone: edits held 32.0% / 16.7%, outputs sooner 34.2% / 21.0% with facts kept 99.3% on entire; a
shorter window only for tool uses naming no path: 32.7%). Its marker names the
later use (fixed in the cut, so the same bytes on every call). On the claude-code-spotter traces
(whole sessions) superseding on writes too, with ``clear_keep_tool_uses`` 32, saved 17.9% vs the
API's automatic caching (15.9% before) with 99.56% of used facts kept (99.50% before); reads only
changed nothing; K=30 with writes saved 20.1% but kept 99.47%.

A cut invalidates the cached prefix after its first change: each cut records why it was made
(``trigger``: ``budget`` or ``economic``), the tokens removed, the prefix tokens invalidated and the
number of later calls it needs to pay back (economic cuts also the future calls estimated); the
report then measures each cut from the billed usage of the run (:func:`measured_cut`: the extra
cache writes it caused vs the cache reads it saved on that and every later call), so a prune that
costs more in cache writes than it saves in reads shows as a negative net in the report.

Settings: ``clear_stale`` (true/false, default true), ``clear_keep_tool_uses`` (non-negative
integer, default 32), ``clear_payback`` (number between 0.1 and 100, default 2.0),
``clear_max_future_calls`` (integer between 1 and 10000, default 20), ``clear_min_future_calls``
(non-negative integer, default 0), ``clear_quiet_tool_uses`` and ``clear_keep_quoted``
(non-negative integers, 0: off; defaults in ``DEFAULTS``), ``clear_keep_output_uses`` (non-negative
integer, default 16, 0 or more than ``clear_keep_tool_uses``: as that), ``edit_quiet_tool_uses`` (non-negative integer,
default 8, 0: an edit supersedes at once), ``clear_min_tokens``
(non-negative integer, default 4000), ``clear_min_fraction`` (number between 0.0 and 1.0, default
0.15), ``clear_superseded`` (true/false, default true), ``superseded_by_write`` (true/false,
default true), ``superseded_by_edit`` (true/false, default true), ``repeats`` (true/false, default true), ``repeat_min_lines`` (integer >= 3, default
3), ``repeat_min_chars`` (non-negative integer, default 150), ``repeat_moved_min_chars`` (non-negative
integer, default 300, never fewer than ``repeat_min_chars``: a run of numbered lines under other
numbers than where it points, its new numbers only in the pointer's range); the budget settings as above.

Unsafe when the model needs the exact text of an old tool result that it cannot fetch again. When
the request asks the API's server-side ``context_management`` to clear tool results or compact
(``clear_tool_uses_*``, ``compact_*``, any edit type not known to leave tool results alone), prune
stands aside; beside ``clear_thinking_*`` alone (real Claude Code sends it on every request) it works
as usual, since thinking blocks are never edited here.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import orjson
import xxhash

from tokensaver.billing import THINKING_TYPES
from tokensaver.context import plugin_notes
from tokensaver.hookspecs import hookimpl
from tokensaver.model_rules import prefix_check_enforcement
from tokensaver.settings import Schema, boolean, integer, number, strings
from tokensaver.tokens import content_hash, fast_digest, memo_enabled
from tokensaver.validate import asked_back

from ._blocks import (
    LOOKBACK_BLOCKS,
    TurnCheck,
    as_blocks,
    cache_control_problems,
    kept_digests,
    normalized,
    request_problems,
    strip_cc,
    tool_uses,
    with_cc,
)
from ._lru import SizedLRU
from ._repeats import SHORT_RESULT, RepeatIndex
from ._summarize_text import full_lines

PLUGIN = "prune"
MIN_CUT_FRACTION = 0.1  # a cut must remove at least this share of the request

SETTINGS = Schema(
    PLUGIN,
    {
        "max_tokens_budget": integer(
            None,
            "absolute budget; absent: budget_fraction x the model's context window",
            min=1000,
            unit="tokens",
            optional=True,
        ),
        "budget_fraction": number(0.5, "the budget as a share of the context window", min=0.05, max=1.0),
        "trigger": number(1.0, "cut when the request exceeds trigger x budget ...", min=0.1, max=1.0),
        "target": number(0.6, "... down to target x budget (below trigger)", min=0.05, max=1.0),
        "keep_tool_uses": integer(6, "results of the last K tool uses are never cleared", min=0),
        "keep_last_messages": integer(6, "the last N messages are never touched", min=2),
        "exclude_tools": strings([], "tools whose results are never cleared", item="tool names"),
        "min_result_tokens": integer(75, "smaller tool results are not worth a marker", min=0, unit="tokens"),
        "dedupe": boolean(True, "a newer identical tool output becomes a pointer to the earlier one"),
        "max_conversations": integer(512, "conversations whose cut is kept (LRU)", min=0),
        "clear_stale": boolean(
            True, "economic cuts below the budget, when the cache reads saved pay back the writes"
        ),
        "clear_keep_tool_uses": integer(32, "economic cuts keep the results of the last K tool uses", min=0),
        "clear_payback": number(
            2.0, "estimated saving must be >= this x the one-off re-write cost", min=0.1, max=100
        ),
        "clear_max_future_calls": integer(
            20,
            "cap on the calls still to come (estimated: the calls so far)",
            min=1,
            max=10_000,
            unit="calls",
        ),
        "clear_min_future_calls": integer(0, "floor on the calls still to come", min=0, unit="calls"),
        "clear_min_tokens": integer(
            4000, "stale tokens needed for an economic cut ...", min=0, unit="tokens"
        ),
        "clear_min_fraction": number(0.15, "... and this share of the request", min=0.0, max=1.0),
        "clear_superseded": boolean(
            True, "a result superseded by a later use of the same resource is stale at any age"
        ),
        "superseded_by_write": boolean(True, "a later Write of a whole file supersedes an earlier Read"),
        "superseded_by_edit": boolean(
            True, "... and so does an Edit of a part of it (with superseded_by_write)"
        ),
        "clear_quiet_tool_uses": integer(
            0, "a file read is stale once the last N tool uses did not name the file (0: off)", min=0
        ),
        "clear_keep_quoted": integer(
            3, "economic cuts keep a result the agent quoted in its last N turns (0: off)", min=0
        ),
        "clear_keep_output_uses": integer(
            16,
            "economic cuts keep the results of the last K tool uses that are not file reads "
            "(command output, searches; 0: as clear_keep_tool_uses)",
            min=0,
        ),
        "edit_quiet_tool_uses": integer(
            8,
            "a read superseded by an edit of a part is superseded only once the last N tool uses did "
            "not name the file (0: at once)",
            min=0,
        ),
        "repeats": boolean(
            True, "runs of lines an earlier result (still sent in full) shows become a pointer to it"
        ),
        "repeat_min_lines": integer(3, "shortest run of repeated lines", min=3, unit="lines"),
        "repeat_min_chars": integer(150, "... and its fewest characters", min=0, unit="characters"),
        "repeat_moved_min_chars": integer(
            300,
            "... and when its numbered lines are under other numbers than where it points (a re-read "
            "after lines above it moved; never fewer than repeat_min_chars)",
            min=0,
            unit="characters",
        ),
        "clear_outline": boolean(
            False, "a cleared file read keeps its definition lines (functions, types, tests)"
        ),
        "cut_thinking_turns": boolean(
            True,
            "on a model with preserved thinking, cut at a new user turn and drop the thinking of the "
            "turns after the cut (off: no cut before a thinking block)",
        ),
    },
    checks=[
        lambda s: (
            ("target", "must be below prune.trigger (cut deep: trigger high, target lower)")
            if s["target"] >= s["trigger"]
            else None
        )
    ],
)
DEFAULTS: dict[str, Any] = SETTINGS.defaults()
# it never edits a body or block it is given or returned: the core hands it the call's own blocks
tokensaver_read_only = True


@hookimpl
def tokensaver_configure(settings: dict[str, Any], source: str) -> dict[str, Any]:
    """The ``prune`` table checked against ``SETTINGS``, defaults filled in."""
    return SETTINGS.validate(settings, source)


def budget(settings: dict[str, Any], model: Any) -> int:
    """The token budget for this model."""
    if settings.get("max_tokens_budget"):
        return int(settings["max_tokens_budget"])
    return int(settings["budget_fraction"] * int(getattr(model, "context_window", 200_000)))


# -- markers (fixed text: the same cut gives the same bytes) -----------------------------------


def cleared_marker(tokens: int) -> str:
    """What a cleared tool result says (``tokens``: the original result's size, so the same bytes)."""
    return f"[tokensaver: earlier tool output cleared ({tokens} tokens); re-run the tool if you need it]"


def superseded_marker(by: str, tokens: int) -> str:
    """What a superseded tool result says (``by``: the later use, fixed when the cut is made)."""
    return f"[tokensaver: superseded by {by}; {tokens} tokens cleared]"


# a line that defines something, in most languages (after an optional line-number prefix): what an
# agent names when it comes back to a file it read long ago (a function, a type, a module, a test)
_DEFINITION = re.compile(
    r"^\s*(?:\d+(?:→|\t|:))?\s*(?:@\w+\s+)*"
    r"(?:(?:export|pub(?:\([^)]*\))?|public|private|protected|internal|static|async|abstract|final|"
    r"override|default|sealed|open|data|extern|unsafe)\s+)*"
    r"(?:def|defp|defmacrop?|defmodule|defstruct|defdelegate|defimpl|defprotocol|defguardp?|class|"
    r"interface|function|func|fn|struct|enum|trait|impl|type|module|describe|test|it|"
    r"schema|field|attr|slot|embed|has_many|belongs_to|CREATE|create)\b"
)
_OUTLINE_SHARE = 0.12  # an outline takes at most this share of the result it stands for ...
_OUTLINE_LINE_CHARS = 160  # ... each line cut to this many characters


def outline(inner: Any) -> list[str]:
    """The definition lines of a file read, in order, within ``_OUTLINE_SHARE`` of its size."""
    text = "\n".join(_texts(inner))
    budget = _OUTLINE_SHARE * len(text)
    out: list[str] = []
    used = 0
    for line in full_lines(text.split("\n")):  # a sparse read's lines with their numbers
        if not _DEFINITION.match(line):
            continue
        line = line.rstrip()[:_OUTLINE_LINE_CHARS]
        if used + len(line) + 1 > budget:
            break
        out.append(line)
        used += len(line) + 1
    return out


def with_outline(marker: str, inner: Any) -> str:
    """A cleared file read's marker followed by the read's definition lines (the same bytes for the
    same result: a pure function of its content)."""
    lines = outline(inner)
    if not lines:
        return marker
    return marker + "\n[its definition lines, as read:]\n" + "\n".join(lines)


def _file_reads(messages: list[Any], ids: set[str]) -> set[str]:
    """Those of ``ids`` whose tool use reads a file (whole or a range)."""
    out = set()
    for m in messages:
        if isinstance(m, dict) and m.get("role") == "assistant":
            for b in as_blocks(m.get("content")):
                if isinstance(b, dict) and b.get("type") == "tool_use" and str(b.get("id")) in ids:
                    acc = _access(b.get("input"))
                    if acc is not None and acc[0] in ("read", "part"):
                        out.add(str(b.get("id")))
    return out


def pointer_marker(tool_use_id: str) -> str:
    """What a repeated tool result says instead of its content."""
    return f"[tokensaver: identical to the earlier result of tool_use {tool_use_id}; see that result above]"


def dropped_marker(n_messages: int, tokens: int) -> dict[str, Any]:
    """The text block appended to the task message when earlier turns are dropped."""
    return {
        "type": "text",
        "text": f"[tokensaver: {n_messages} earlier messages ({tokens} tokens) after this one were removed to fit the context budget]",
    }


def _replace_result(block: dict[str, Any], text: str) -> dict[str, Any]:
    out = {k: v for k, v in block.items() if k not in ("content", "cache_control")}
    out["content"] = text
    if "cache_control" in block:
        out["cache_control"] = block["cache_control"]
    return out


# -- applying a cut spec (pure) ----------------------------------------------------------------


def _prefix_hash(messages: list[Any], d: int) -> str:
    return content_hash([strip_cc(m) for m in messages[:d]])[:24]


def apply_spec(messages: list[Any], spec: dict[str, Any], settings: dict[str, Any], count: Any) -> list[Any]:
    """The messages as the cut spec says: dropped turns, cleared results, deduped repeats.

    A pure function of (messages, spec, settings): between cuts it gives every older message the
    same bytes on every call.
    """
    msgs = _after_drop(messages, spec)
    walk = Walk(spec, settings, count, _outlined(msgs, spec, settings))
    walk.shift = len(messages) - len(msgs)
    return [walk.step(m) for m in msgs]


def _after_drop(messages: list[Any], spec: dict[str, Any]) -> list[Any]:
    """The messages with the spec's dropped turns out (a marker on the task says so), when they
    are still the turns the cut dropped."""
    drop = spec.get("drop")
    if drop and len(messages) > drop["d"] and _prefix_hash(messages, drop["d"]) == drop["h"]:
        first = messages[0]
        marker = dropped_marker(drop["d"] - 1, drop["tokens"])
        return [{**first, "content": [*as_blocks(first.get("content")), marker]}, *messages[drop["d"] :]]
    return list(messages)


def _outlined(msgs: list[Any], spec: dict[str, Any], settings: dict[str, Any]) -> set[str]:
    cleared = set(spec.get("cleared") or ())
    return _file_reads(msgs, cleared) if cleared and settings.get("clear_outline") else set()


class Walk:
    """:func:`apply_spec`'s walk, one message at a time, noting what a later call of the conversation
    needs to go on from where it stopped without walking the same messages again (see ``_Carry``):
    each block it changed and how (``edits``), each message's tokens as sent, each tool result's
    tokens as sent, the repeat index's chain key. ``count`` and the repeat index are the call's."""

    def __init__(
        self, spec: dict[str, Any], settings: dict[str, Any], count: Any, reads: set[str] | None = None
    ) -> None:
        self.cleared = set(spec.get("cleared") or ())
        self.sup = spec.get("superseded") or {}
        self.reads = reads or set()
        self.count = count
        self.dedupe = bool(settings.get("dedupe", True))
        self.min_tokens = int(settings["min_result_tokens"])
        self.seen: dict[bytes, str] = {}  # content digest -> id of the first result kept in full
        self.lines: RepeatIndex | None = (
            RepeatIndex(
                int(settings["repeat_min_lines"]),
                int(settings["repeat_min_chars"]),
                SHORT_RESULT,
                True,
                moved_min_chars=int(settings["repeat_moved_min_chars"]),
            )
            if settings.get("repeats")
            else None
        )
        self.unthink = [(int(a), int(b)) for a, b in spec.get("unthink") or ()]
        self.shift = 0  # messages the spec's drop took out (positions in what the caller sent: i + shift)
        self.track = False  # note tokens and results (the walk of what is sent)
        self.n = 0  # messages walked
        self.edits: list[tuple[int, int, tuple[Any, ...]]] = []  # (message, block, how)
        self.tokens: list[int] = []  # each message's tokens as sent
        self.results: list[tuple[int, int, str, int]] = []  # (message, block, tool_use id, tokens)

    def step(self, m: Any) -> Any:
        """The next message as the spec says."""
        i = self.n
        self.n += 1
        out = self._message(i, m)
        if self.track:
            self.tokens.append(self.count(out) if isinstance(out, dict) else 0)
        return out

    def _message(self, i: int, m: Any) -> Any:
        if not isinstance(m, dict) or m.get("role") != "user" or not isinstance(m.get("content"), list):
            if self.lines is not None and isinstance(m, dict) and isinstance(m.get("content"), list):
                for b in m["content"]:  # a file written or an edit's new text, read back later
                    if isinstance(b, dict) and b.get("type") == "tool_use":
                        self.lines.add_input(str(b.get("id")), b.get("input"))
            if self.unthink and isinstance(m, dict) and m.get("role") == "assistant":
                at = i + self.shift if i else 0
                if any(a <= at < b for a, b in self.unthink):
                    out = _without_thinking(m)
                    if out is not None:
                        self.edits.append((i, -1, ("unthink", ())))
                        return out
            return m
        content = m["content"]
        new: list[Any] | None = None
        for j, b in enumerate(content):
            if not isinstance(b, dict) or b.get("type") != "tool_result":
                continue
            tid = str(b.get("tool_use_id"))
            done = self._result(tid, b)
            if done is not None:
                if new is None:
                    new = list(content)
                new[j] = done[0]
                self.edits.append((i, j, done[1]))
            if self.track:
                self.results.append((i, j, tid, self.count(strip_cc(b if done is None else done[0]))))
        return m if new is None else {**m, "content": new}

    def _result(self, tid: str, b: dict[str, Any]) -> tuple[dict[str, Any], tuple[Any, ...]] | None:
        """A tool result's new block and how it was made, or None when it goes as it is."""
        count = self.count
        if tid in self.cleared:
            size = count(strip_cc(b))
            text = superseded_marker(self.sup[tid], size) if tid in self.sup else cleared_marker(size)
            if tid in self.reads:
                text = with_outline(text, b.get("content"))
            return _replace_result(b, text), ("text", text)
        inner = b.get("content")
        # error results too: a failing test run (Claude Code marks a non-zero exit as an error)
        # is in the context like any result, and its re-run after the fix repeats most of it
        if not (self.dedupe or self.lines is not None) or not inner:
            return None
        if self.dedupe:
            h = fast_digest(strip_cc(inner))
            if h in self.seen and count(strip_cc(b)) >= self.min_tokens:
                text = pointer_marker(self.seen[h])
                return _replace_result(b, text), ("text", text)
            self.seen.setdefault(h, tid)  # a copy too small for the pointer still has its lines
        if self.lines is not None:
            new_inner, keys = _without_repeats(inner, tid, self.lines)
            if keys:
                return {**b, "content": new_inner}, ("lines", keys)
        return None


def _without_repeats(inner: Any, tid: str, index: RepeatIndex) -> tuple[Any, tuple[Any, ...]]:
    """A result's content with runs of lines an earlier result shows as pointers (same object if
    none), and the chain key of each text rewritten (``(-1, key)`` for a string content, else
    ``(its index in the content, key)``), so a later call finds the rewrite again."""
    if isinstance(inner, str):
        text = index.rewrite(tid, inner)
        return (inner, ()) if text is inner else (text, ((-1, index.key),))
    if not isinstance(inner, list):
        return inner, ()
    out, keys = [], []
    for k, blk in enumerate(inner):
        if isinstance(blk, dict) and blk.get("type") == "text" and isinstance(blk.get("text"), str):
            text = index.rewrite(tid, blk["text"])
            if text is not blk["text"]:
                blk = {**blk, "text": text}
                keys.append((k, index.key))
        out.append(blk)
    return (out, tuple(keys)) if keys else (inner, ())


# -- superseded results ------------------------------------------------------------------------

# an input key that names the resource a tool reads or writes: file_path, path, notebook_path,
# filename, url, ...
_TARGET_KEY = re.compile(r"(?:^|_)(?:path|file|filename|url|uri)$", re.IGNORECASE)
# input keys that only narrow a read to a part of the resource
_RANGE_KEYS = frozenset(
    {"offset", "limit", "line_number", "start_line", "end_line", "view_range", "lines", "pages"}
)
# input keys that carry the whole new content of the resource (Write, create)
_WRITE_KEYS = frozenset({"content", "file_text"})
# input keys that change a part of it (Edit, MultiEdit, NotebookEdit, str_replace, ...)
_EDIT_KEYS = frozenset({"new_string", "old_string", "edits", "new_source", "new_str", "old_str"})
_MAX_TARGET_CHARS = 200
_BY_EDIT = "a later edit"  # how a read superseded by an edit of a part is described
_CHANGES = ("write", "edit")  # kinds of use that change the resource (never repeated as a call)


def _access(inp: Any) -> tuple[str, str] | None:
    """(kind, resource) of a tool use: kind "read" (whole), "part" (a range), "write" (the whole new
    content) or "edit" (a change to a part); None when the input names no single resource or also
    searches, prompts, ... (only identical calls then)."""
    if not isinstance(inp, dict):
        return None
    targets = [k for k, v in inp.items() if isinstance(v, str) and v and _TARGET_KEY.search(k)]
    if len(targets) != 1:
        return None
    key = targets[0]
    others = {k for k, v in inp.items() if k != key and v not in (None, "", False)}
    if others & _WRITE_KEYS:
        return "write", str(inp[key])
    if others & _EDIT_KEYS:
        return "edit", str(inp[key])
    if others <= _RANGE_KEYS:
        return ("part" if others else "read"), str(inp[key])
    return None


def superseded(messages: list[Any], settings: dict[str, Any]) -> dict[str, str]:
    """Tool results superseded by a later use of the same resource: tool_use id -> the later use.

    A result is superseded by the first later use (whose result is not an error) that repeats the
    same call (same tool, identical input; not for writes or edits), or that reads the whole of the
    same resource (same path or url) after a read, write or edit of it; with ``superseded_by_write``,
    also by a later write of the whole resource it read. The later use's facts are the newer ones. An
    edit of a part (``old_string``/``new_string``, ...) supersedes a read only with
    ``superseded_by_edit`` (described as ``_BY_EDIT``, so :func:`stale_results` can keep the ones the
    agent still quotes): the rest of what was read is still the file, and agents quote it after
    editing (on the tuning half of the Claude Code traces, half of the lost facts were from Reads
    cleared as superseded by a later Edit).
    """
    if not settings.get("clear_superseded", True):
        return {}
    scan = Supersession(settings)
    scan.feed(messages)
    return scan.out


class Supersession:
    """:func:`superseded`'s scan, fed the messages in order: kept per conversation, it goes on with
    a call's new messages (each later use's call kept as a digest, each resource's earlier uses)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.by_write = bool(settings.get("superseded_by_write", False))
        self.by_edit = self.by_write and bool(settings.get("superseded_by_edit", False))
        self.calls: dict[bytes, list[str]] = {}  # (tool, input) -> earlier uses not yet superseded
        self.reads: dict[str, list[tuple[str, str]]] = {}  # resource -> earlier (id, kind) not yet superseded
        self.out: dict[str, str] = {}
        self.errors: set[str] = set()
        self.uses: set[str] = set()  # the tool uses scanned

    def feed(self, messages: list[Any]) -> bool:
        """Scan the next messages; False (nothing scanned) when one of them says that a use already
        scanned failed: its later uses were taken to supersede, so the scan must start again."""
        errors = {
            str(b.get("tool_use_id"))
            for m in messages
            if isinstance(m, dict) and m.get("role") == "user"
            for b in as_blocks(m.get("content"))
            if isinstance(b, dict) and b.get("type") == "tool_result" and b.get("is_error")
        }
        if errors & self.uses:
            return False
        self.errors |= errors
        for m in messages:
            if not isinstance(m, dict) or m.get("role") != "assistant":
                continue
            for b in as_blocks(m.get("content")):
                if isinstance(b, dict) and b.get("type") == "tool_use":
                    self._use(b)
        return True

    def _use(self, b: dict[str, Any]) -> None:
        calls, reads, out = self.calls, self.reads, self.out
        tid, name, inp = str(b.get("id")), str(b.get("name", "")), b.get("input")
        self.uses.add(tid)
        acc = _access(inp)
        call = xxhash.xxh3_128_digest(json.dumps([name, inp], sort_keys=True, default=str).encode())
        if tid not in self.errors:
            if acc is None or acc[0] not in _CHANGES:
                for old in calls.pop(call, []):
                    out.setdefault(old, f"a later identical {name} call")
            if acc is not None and (
                acc[0] == "read"
                or (acc[0] == "write" and self.by_write)
                or (acc[0] == "edit" and self.by_edit)
            ):
                target = acc[1][:_MAX_TARGET_CHARS]
                keep = []
                for old, kind in reads.pop(acc[1], []):
                    if acc[0] == "read" or kind not in _CHANGES:
                        what = f"{_BY_EDIT} ({name})" if acc[0] == "edit" else f"a later {name}"
                        out.setdefault(old, f"{what} of {target}")
                    else:
                        keep.append((old, kind))
                if keep:
                    reads[acc[1]] = keep
        if tid in out:
            return
        if acc is None or acc[0] not in _CHANGES:
            calls.setdefault(call, []).append(tid)
        if acc is not None:
            reads.setdefault(acc[1], []).append((tid, acc[0]))


def _tokens(messages: list[Any], count: Any) -> int:
    return sum(count(m) for m in messages)


# -- deciding a cut ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizing:
    """What every plan of one call measures with: its messages, the settings, the counter, ``fixed``
    (the system + tools tokens)."""

    messages: list[Any]
    settings: dict[str, Any]
    count: Any
    fixed: int


def plan_cut(
    sz: Sizing, spec: dict[str, Any], target: int, sup: dict[str, str] | None = None
) -> dict[str, Any]:
    """A deeper spec that brings the request to ``target`` tokens.

    ``sup``: superseded results (see ``superseded``), stale whatever their age.
    """
    messages, settings, count, fixed = sz.messages, sz.settings, sz.count, sz.fixed
    sup = sup or {}
    new: dict[str, Any] = {
        "cleared": list(spec.get("cleared") or ()),
        "drop": spec.get("drop"),
        "superseded": dict(spec.get("superseded") or {}),
        **_unthink_of(spec),
    }
    cur = apply_spec(messages, new, settings, count)
    total = fixed + _tokens(cur, count)
    if total <= target:
        return new
    n = len(messages)
    protect_from = n - int(settings["keep_last_messages"])
    uses = tool_uses(messages)
    order = sorted(uses, key=lambda t: (uses[t][0], uses[t][1]))
    keep_ids = set(order[-int(settings["keep_tool_uses"]) :]) if int(settings["keep_tool_uses"]) else set()
    excluded = set(settings.get("exclude_tools") or ())
    cleared = set(new["cleared"])
    min_tokens = int(settings["min_result_tokens"])
    drop_d = new["drop"]["d"] if new["drop"] else 0
    # stale tool results, oldest first (positions in the original messages)
    for i, m in enumerate(messages):
        if total <= target:
            break
        if i == 0 or i >= protect_from or i < drop_d or m.get("role") != "user":
            continue
        for b in as_blocks(m.get("content")):
            if total <= target:
                break
            if not isinstance(b, dict) or b.get("type") != "tool_result":
                continue
            tid = str(b.get("tool_use_id"))
            if tid in cleared or (tid in keep_ids and tid not in sup):
                continue
            if uses.get(tid, (0, 0, ""))[2] in excluded:
                continue
            size = count(strip_cc(b))
            if size < min_tokens:
                continue
            marker = superseded_marker(sup[tid], size) if tid in sup else cleared_marker(size)
            gain = size - count(_replace_result(b, marker))
            if gain <= 0:
                continue
            cleared.add(tid)
            if tid in sup:
                new["superseded"][tid] = sup[tid]
            total -= gain
    new["cleared"] = sorted(cleared)
    cur = apply_spec(messages, new, settings, count)
    total = fixed + _tokens(cur, count)
    if total <= target:
        return new
    # not enough: drop whole old turns after the task; the kept part starts with an assistant turn
    base = 0 if not new["drop"] else new["drop"]["d"] - 1  # messages already dropped
    cur_protect = len(cur) - int(settings["keep_last_messages"])
    best = None
    running = 0
    for k in range(1, max(cur_protect, 1) + 1):
        if k >= len(cur):
            break
        if k > 1:
            running += count(cur[k - 1])
        if k >= 2 and cur[k].get("role") == "assistant":
            best = k
            if total - running <= target:
                break
    if best is None:
        return new
    d = best + base  # index in the original messages
    removed = _tokens(cur[1:best], count) + (new["drop"]["tokens"] if new["drop"] else 0)
    new["drop"] = {"d": d, "h": _prefix_hash(messages, d), "tokens": removed}
    return new


def thinking_from(messages: list[Any], k: int) -> int:
    """How many thinking blocks ``messages[k:]`` send back (each bound to everything before it on
    models with preserved thinking: a change before one makes it and every later one invalid)."""
    return sum(
        1
        for m in messages[k:]
        if isinstance(m, dict) and m.get("role") == "assistant"
        for b in as_blocks(m.get("content"))
        if isinstance(b, dict) and b.get("type") in THINKING_TYPES
    )


def _unthink_of(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec's ``unthink`` entry, to carry into a deeper spec (nothing when it has none): a
    thinking block left out once must stay out, or the ones the model wrote since fail the prefix check."""
    return {"unthink": [list(r) for r in spec["unthink"]]} if spec.get("unthink") else {}


def with_unthink(spec: dict[str, Any], lo: int, hi: int) -> dict[str, Any]:
    """``spec`` that also leaves out the thinking of the assistant turns ``messages[lo:hi]``
    (positions in the messages as the caller sent them), merged with the ranges it had."""
    ranges = sorted([*(tuple(r) for r in spec.get("unthink") or ()), (lo, hi)])
    merged: list[list[int]] = []
    for a, b in ranges:
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return {**spec, "unthink": merged}


def _without_thinking(m: dict[str, Any]) -> dict[str, Any] | None:
    """An assistant message without its thinking blocks (None: it has none, or nothing else)."""
    content = m.get("content")
    if not isinstance(content, list):
        return None
    kept = [b for b in content if not (isinstance(b, dict) and b.get("type") in THINKING_TYPES)]
    if not kept or len(kept) == len(content):
        return None
    return {**m, "content": kept}


def _first_diff(a: list[Any], b: list[Any]) -> int:
    k = 0
    while k < min(len(a), len(b)) and strip_cc(a[k]) == strip_cc(b[k]):
        k += 1
    return k


def stale_results(
    messages: list[Any],
    cur: list[Any],
    spec: dict[str, Any],
    settings: dict[str, Any],
    count: Any,
    sup: dict[str, str] | None = None,
    memo: dict[str, Any] | None = None,
) -> dict[str, int]:
    """Stale tool results as sent now (``cur``): tool_use id -> tokens, oldest first.

    Older than the last ``clear_keep_tool_uses`` tool uses (a read of a file, with
    ``clear_quiet_tool_uses``: none of the last that many tool uses names the file, see
    :func:`read_quiet`), outside the last ``keep_last_messages`` messages, not cleared yet, at
    least ``min_result_tokens`` as sent (a dedupe pointer is not), tool not excluded. A superseded
    result (``sup``) is stale whatever its age. With ``clear_keep_quoted``, a result the agent
    quoted in its last turns is not stale unless a newer copy superseded it (see
    :func:`quoted_recently`). ``memo`` keeps those scans per conversation. Tool use order and names
    come from the original ``messages``.
    """
    uses = tool_uses(messages)
    order = sorted(uses, key=lambda t: (uses[t][0], uses[t][1]))
    found = [
        (i, str(b.get("tool_use_id")), b)
        for i, m in enumerate(cur)
        if isinstance(m, dict) and m.get("role") == "user"
        for b in as_blocks(m.get("content"))
        if isinstance(b, dict) and b.get("type") == "tool_result"
    ]
    return _stale(
        messages,
        len(cur),
        found,
        (uses, order),
        spec,
        settings,
        sup or {},
        memo,
        lambda b: count(strip_cc(b)),
    )


def _stale(
    messages: list[Any],
    n_cur: int,
    found: Any,
    tool_order: tuple[dict[str, tuple[int, int, str]], list[str]],
    spec: dict[str, Any],
    settings: dict[str, Any],
    sup: dict[str, str],
    memo: dict[str, Any] | None,
    size: Any,
) -> dict[str, int]:
    """:func:`stale_results` of the tool results sent (``found``: (message index, tool_use id, x),
    oldest first; ``size(x)``: its tokens as sent), ``tool_order``: (:func:`tool_uses`, their ids
    in order)."""
    uses, order = tool_order
    n_keep = int(settings["clear_keep_tool_uses"])
    keep_ids = set(order[-n_keep:]) if n_keep else set()
    quiet_after = int(settings.get("clear_quiet_tool_uses") or 0)
    edit_quiet = int(settings.get("edit_quiet_tool_uses") or 0)
    n_out = int(settings.get("clear_keep_output_uses") or 0)
    out_ids = set(order[-n_out:]) if 0 < n_out < n_keep else keep_ids  # sooner, never later
    quiet = read_quiet(messages, order, memo) if quiet_after or edit_quiet or n_out else {}
    window = int(settings.get("clear_keep_quoted") or 0)
    quoted = quoted_recently(messages, window, memo) if window else set()
    excluded = set(settings.get("exclude_tools") or ())
    cleared = set(spec.get("cleared") or ())
    min_tokens = int(settings["min_result_tokens"])
    protect_from = n_cur - int(settings["keep_last_messages"])
    out: dict[str, int] = {}
    for i, tid, x in found:
        if i == 0 or i >= protect_from:
            continue
        if tid in cleared or tid not in uses or uses[tid][2] in excluded:
            continue
        if tid in quoted and (tid not in sup or sup[tid].startswith(_BY_EDIT)):
            continue
        held = (  # an edited file the agent still names: its read is not superseded yet
            edit_quiet
            and tid in sup
            and sup[tid].startswith(_BY_EDIT)
            and quiet.get(tid, edit_quiet) < edit_quiet
        )
        if tid not in sup or held:
            if quiet_after and tid in quiet:  # a read of a file: stale once nobody named it a while
                if quiet[tid] < quiet_after:
                    continue
            elif tid in (out_ids if n_out and tid not in quiet else keep_ids):
                continue
        n = size(x)
        if n >= min_tokens:
            out[tid] = n
    return out


# identifiers (snake_case, camelCase, with digits), paths and file names: what an agent quotes
_WORD, _PATH, _FILE = (
    r"[A-Za-z_][A-Za-z0-9_]*(?:_[A-Za-z0-9]+|[a-z][A-Z][A-Za-z0-9]*|\d)[A-Za-z0-9_]*",
    r"[\w.-]*/[\w./-]+",
    r"[\w-]+\.[A-Za-z]{1,5}\b",
)
# the words of a run with or without a slash (a path) and a dot (a file name): a branch that cannot
# match is left out, as it would retry along the whole run from every place of it
_QUOTABLE_IN: dict[tuple[bool, bool], re.Pattern[str]] = {
    (slash, dot): re.compile("|".join(p for p, on in ((_WORD, True), (_PATH, slash), (_FILE, dot)) if on))
    for slash in (False, True)
    for dot in (False, True)
}
_QUOTABLE = _QUOTABLE_IN[True, True]  # all three
_LONG_WORD = re.compile(r"[A-Za-z0-9_]{1000}")  # no identifier is this long: a blob, skipped
_MAX_QUOTE_SCAN = 60_000  # characters of one text scanned for quotable words
_MAX_QUOTE_RESULTS = 4  # a word in more results than this names none of them in particular


# a whole run of the characters a quotable word is made of, holding what any of them needs (an
# underscore, a digit, a slash, a dot, a lower-upper pair): no match spans two runs nor starts in one
# without these, so the words are those found in these runs alone (the same set, found faster)
_QUOTABLE_RUN = re.compile(r"(?<![\w./-])[\w./-]*(?:[_\d/.]|[a-z][A-Z])[\w./-]*")


def _quotable(text: str) -> set[str]:
    out: set[str] = set()
    for run in _QUOTABLE_RUN.findall(text[:_MAX_QUOTE_SCAN]):
        if len(run) < 5 or (len(run) >= 1000 and _LONG_WORD.search(run)):
            continue
        out.update(w for w in _QUOTABLE_IN["/" in run, "." in run].findall(run) if len(w) >= 5)
    return out


def _texts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [t for v in value for t in _texts(v)]
    if isinstance(value, dict):
        return [
            t
            for k, v in value.items()
            if k not in ("type", "id", "tool_use_id", "cache_control")
            for t in _texts(v)
        ]
    return []


def quoted_recently(messages: list[Any], window: int, memo: dict[str, Any] | None = None) -> set[str]:
    """Tool results the agent quoted in one of its last ``window`` turns: a word of the result (an
    identifier, a path, a file name that few results hold) in the turn's text or tool inputs. What
    an agent has just quoted it is working with, and quotes again. tool_use ids.

    ``memo`` (per conversation) makes it incremental: each message is scanned once.
    """
    memo = memo if memo is not None else {}
    state = memo.get("quotes")
    first = messages[0] if messages else None
    if state is None or state["first"] is not first and strip_cc(state["first"]) != strip_cc(first):
        state = memo["quotes"] = {"first": first, "seen": 0, "turn": 0, "index": {}, "last": {}}
    if state["seen"] > len(messages):
        state.update(seen=0, turn=0, index={}, last={})
    # word -> results holding it (a tuple: one per distinct word lives as long as the conversation,
    # and tuples of strings are not objects the garbage collector walks); past
    # _MAX_QUOTE_RESULTS holders a word names none of them, so no more are noted
    index: dict[str, tuple[str, ...]] = state["index"]
    last: dict[str, int] = state["last"]  # result -> the last turn quoting it
    for m in messages[state["seen"] :]:
        if not isinstance(m, dict):
            continue
        blocks = as_blocks(m.get("content"))
        if m.get("role") == "assistant":
            state["turn"] += 1
            words: set[str] = set()
            for b in blocks:
                if isinstance(b, dict) and b.get("type") in ("text", "tool_use"):
                    for t in _texts(b.get("text") if b.get("type") == "text" else b.get("input")):
                        words |= _quotable(t)
            for w in words:
                holders = index.get(w)
                if holders and len(holders) <= _MAX_QUOTE_RESULTS:
                    for tid in holders:
                        last[tid] = state["turn"]
        else:
            for b in blocks:
                if isinstance(b, dict) and b.get("type") == "tool_result":
                    tid = str(b.get("tool_use_id"))
                    for w in _quotable("\n".join(_texts(b.get("content")))):
                        holders = index.get(w, ())
                        if len(holders) <= _MAX_QUOTE_RESULTS and tid not in holders:
                            index[w] = (*holders, tid)
    state["seen"] = len(messages)
    turn = state["turn"]
    return {tid for tid, t in last.items() if turn - t < window}


def read_quiet(messages: list[Any], order: list[str], memo: dict[str, Any] | None = None) -> dict[str, int]:
    """For each read of a file (whole or a range): how many tool uses came after the last one that
    names the file (the read itself, an edit of it, a later read, a search or a command naming it).

    tool_use id -> quiet uses. A file the agent keeps naming is the one it is working on, and it
    quotes that read again (after editing a part of it too); one nobody has named for a while is
    not. ``memo`` (per conversation) makes it incremental: only new tool uses are scanned.
    """
    memo = (memo if memo is not None else {}).setdefault("reads", {})
    ids: list[str] = memo.get("ids") or []
    if len(ids) > len(order) or order[: len(ids)] != ids:
        memo.clear()
        ids = []
    last: dict[str, int] = memo.setdefault("last", {})  # path -> index of the last use naming it
    path_of: dict[str, str] = memo.setdefault("path_of", {})  # read id -> path
    quoted: dict[str, str] = memo.setdefault("quoted", {})  # path -> as inside a JSON string
    if len(ids) < len(order):
        inputs: dict[str, Any] = {}
        new = set(order[len(ids) :])
        for m in messages:
            if isinstance(m, dict) and m.get("role") == "assistant":
                for b in as_blocks(m.get("content")):
                    if isinstance(b, dict) and b.get("type") == "tool_use" and str(b.get("id")) in new:
                        inputs[str(b.get("id"))] = b.get("input")
        for j in range(len(ids), len(order)):
            tid = order[j]
            inp = inputs.get(tid)
            acc = _access(inp)
            if acc is not None and acc[0] in ("read", "part"):
                path_of[tid] = acc[1]
                quoted.setdefault(acc[1], json.dumps(acc[1])[1:-1])
                last[acc[1]] = j
            if last:
                text = json.dumps(inp, default=str)
                for path, q in quoted.items():
                    if q in text:
                        last[path] = j
        memo["ids"] = list(order)
    n = len(order)
    return {tid: n - 1 - last[path] for tid, path in path_of.items()}


def plan_economic(
    sz: Sizing,
    cur: list[Any],
    spec: dict[str, Any],
    total: int,
    model: Any,
    sup: dict[str, str] | None = None,
    memo: dict[str, Any] | None = None,
    cache: dict[str, Any] | None = None,
    run: Run | None = None,
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The spec that clears every stale result when that pays back in cache prices (else None).

    Also returns the figures of the decision: stale tokens, tokens cleared, tokens re-written,
    estimated future calls and the calls needed to pay back. With this call's ``run`` (what is
    sent, as :class:`Run` walked it), the stale results come from its notes, and a cut that cannot
    pay even if it removed an upper bound of what it removes (:meth:`Run.removable`) is not tried:
    the decision is monotone in the tokens removed, so it is the same without the trial.
    """
    messages, settings, count, fixed = sz.messages, sz.settings, sz.count, sz.fixed
    sup = sup or {}
    stale = (
        stale_results(messages, cur, spec, settings, count, sup, memo)
        if run is None
        else run.stale(sup, memo)
    )
    info: dict[str, Any] = {"stale_tokens": sum(stale.values())}
    need = max(int(settings["clear_min_tokens"]), int(settings["clear_min_fraction"] * total))
    read, write = float(model.cache_read), float(model.cache_write_5m)
    if not stale or info["stale_tokens"] < need or read <= 0 or write <= read:
        return None, info
    payback = float(settings["clear_payback"])
    future = future_calls(messages, settings, None if run is None else run.assistants)
    bound = None if run is None else run.removable(stale, sup, total)
    if bound is not None:
        if bound[0] < need:
            return None, info
        k, head = bound[1], bound[2]
        rewritten = rewrite_tokens(cur, total - bound[0], k, fixed, count, cache, head)
        if read * bound[0] * future < payback * ((write - read) * rewritten):
            return None, info
    new = {
        "cleared": sorted({*(spec.get("cleared") or ()), *stale}),
        "drop": spec.get("drop"),
        "superseded": {**(spec.get("superseded") or {}), **{t: sup[t] for t in stale if t in sup}},
        **_unthink_of(spec),
    }
    after_msgs = apply_spec(messages, new, settings, count)
    after = fixed + _tokens(after_msgs, count)
    removed = total - after
    if removed < need:
        return None, info
    k = _first_diff(cur, after_msgs)
    rewritten = rewrite_tokens(cur, after, k, fixed, count, cache)  # written again instead of read
    cost = (write - read) * rewritten
    benefit = read * removed * future
    info.update(
        cleared_tokens=removed,
        rewritten_tokens=rewritten,
        estimated_future_calls=future,
        payback_calls=round(cost / (read * removed), 1),
    )
    if benefit < payback * cost:
        return None, info
    return new, info


def future_calls(messages: list[Any], settings: dict[str, Any], so_far: int | None = None) -> int:
    """The calls still to come, estimated: the calls so far (the assistant turns in the request, so a
    retry decides the same way; ``so_far`` when counted), at least ``clear_min_future_calls``, at
    most ``clear_max_future_calls``."""
    if so_far is None:
        so_far = _assistants(messages)
    floor = int(settings.get("clear_min_future_calls") or 0)
    return min(max(so_far, floor), int(settings["clear_max_future_calls"]))


def _n_blocks(content: Any) -> int:
    """``len(as_blocks(content))`` without the copy."""
    if isinstance(content, list):
        return len(content)
    return 1 if isinstance(content, str) and content else 0


def _assistants(messages: list[Any]) -> int:
    return sum(1 for m in messages if isinstance(m, dict) and m.get("role") == "assistant")


def rewrite_tokens(
    cur: list[Any],
    after: int,
    k: int,
    fixed: int,
    count: Any,
    cache: dict[str, Any] | None,
    head: int | None = None,
) -> int:
    """Tokens a change at ``cur[k]`` makes the API write again instead of reading them.

    The API reads the longest cached prefix it finds at a breakpoint or up to 20 blocks before one,
    and only where an entry is still live. Entries are written at the end of each request; the
    breakpoints of the next one sit at its end and at the end of the previous request. So a change
    within 20 blocks of the end of the previous request re-writes from that change, a deeper one
    from the end of tools + system when that entry is still live (else from the start): a deep cut
    re-writes everything, not just what follows it. When the conversation's cache has expired
    (the last call longer ago than its TTL) everything is written anyway, so a cut costs nothing.
    ``cache``: ``cold``, ``fixed_live``, ``prev_messages`` (messages of the previous request), from
    the conversation's billed calls (see :func:`observe`); None: the old estimate (from the change).
    ``head``: the tokens of ``cur[:k]`` when known.
    """
    if cache is None:
        return after - fixed - (_tokens(cur[:k], count) if head is None else head)
    if cache.get("cold"):
        return 0
    prev = int(cache.get("prev_messages") or 0)
    blocks = sum(_n_blocks(m.get("content")) for m in cur[k:prev] if isinstance(m, dict))
    if k >= prev or blocks <= LOOKBACK_BLOCKS:
        return max(0, after - fixed - (_tokens(cur[:k], count) if head is None else head))
    return after - (fixed if cache.get("fixed_live") else 0)


# -- between cuts: what is new in a call ------------------------------------------------------

_CARRY_ENTRIES = 512  # conversations whose carry is kept (LRU) ...
_CARRY_BYTES = 16 * 1024 * 1024  # ... within this many bytes in all
_CARRY_MAX = 1024 * 1024  # one conversation's carry at most (else none: the full path)
_BOUND_SLACK = 200  # tokens added to Run.removable's bound (and 1% of the request)


def _breakpoints(messages: list[Any]) -> list[tuple[int, int]]:
    """(message, block) of each block that has a ``cache_control`` key, in order."""
    found: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):
            for b in content:
                if isinstance(b, dict) and "cache_control" in b:
                    found.extend(
                        (i, j) for j, b in enumerate(content) if isinstance(b, dict) and "cache_control" in b
                    )
                    break
    return found


_xxh = xxhash.xxh3_128_digest
_DIGEST = 16  # bytes of one message's digest


def _digests(
    messages: list[Any], at: int, breakpoints: list[tuple[int, int]], given: list[bytes | None] | None = None
) -> tuple[bytes | None, int, bytes] | None:
    """The messages' digests, their blocks' breakpoints (``breakpoints``) taken off: the digest of
    the first ``at`` messages' (None when there are fewer), how many there are, and the digest of
    all. An earlier call's (count, digest) equal to the first ``at`` messages' means its messages
    are the first ones of these, breakpoints aside. Each message's is the xxh3-128 of its orjson:
    ``given`` (the core's, None where it has none) for a message without breakpoints."""
    marked = {i for i, _ in breakpoints}
    parts: list[bytes] = []
    for i, m in enumerate(messages):
        d = given[i] if given is not None and i not in marked else None
        if d is None:
            if i in marked:
                m = {**m, "content": [with_cc(b, None) if isinstance(b, dict) else b for b in m["content"]]}
            try:
                d = _xxh(orjson.dumps(m))
            except TypeError:
                return None
        parts.append(d)
    joined = b"".join(parts)
    first = _xxh(joined[: at * _DIGEST]) if 0 < at <= len(parts) else None
    return first, len(parts), _xxh(joined)


class _Gone(Exception):
    """A carry's state is no longer all there (a rewrite it points to was dropped): the full path."""


@dataclass
class _Carry:
    """What a conversation's next call goes on from, per process: digests and indexes, no bodies.

    The messages seen (how many, twice, and the digest of their digests without ``cache_control``),
    the settings and spec they were walked with, the walk's notes (each block changed and how,
    each message's and tool result's tokens as sent, the dedupe hashes, the repeat chain's key),
    the tool uses in order, the supersession scan, the turn checks, the cut's bounds so far.
    """

    sig: bytes
    n: int
    size: int  # messages digested (:func:`_digests`)
    digest: bytes
    shift: int  # messages the spec's drop took out (the task's marker stands for them)
    seen: dict[bytes, str]
    chain: tuple[bytes, int] | None  # the repeat index's chain key and feeds
    edits: list[tuple[int, int, tuple[Any, ...]]]
    tokens: list[int]
    results: list[tuple[int, int, str, int]]
    uses: dict[str, tuple[int, int, str]]
    order: list[str]
    scan: Supersession | None
    check: TurnCheck
    assistants: int
    gains: dict[str, tuple[str | None, int]]

    def nbytes(self) -> int:
        """About the bytes it holds."""
        edits = sum(len(h[1]) if h[0] == "text" else 40 * len(h[1]) for _, _, h in self.edits)
        scan = 0 if self.scan is None else 120 * (len(self.scan.uses) + len(self.scan.out))
        rows = len(self.seen) + len(self.results) + 2 * len(self.uses) + len(self.check.seen_ids)
        return 400 + edits + scan + 120 * rows + 40 * len(self.tokens) + 60 * len(self.edits)


class _Carries:
    """The carries of a pipeline's conversations (each taken out while its call uses it)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.kept: SizedLRU[tuple[str, str], _Carry] = SizedLRU()

    def take(self, key: tuple[str, str]) -> _Carry | None:
        with self.lock:
            hit = self.kept.data.pop(key, None)
            if hit is None:
                return None
            self.kept.nbytes -= hit[1]
            return hit[0]

    def put(self, key: tuple[str, str], carry: _Carry) -> None:
        size = carry.nbytes()
        if size > _CARRY_MAX:
            return
        with self.lock:
            self.kept.put(key, carry, size, _CARRY_ENTRIES, _CARRY_BYTES)


class Run:
    """This call's walk of what is sent (``cur``, :func:`apply_spec` of the messages), and what the
    decisions read of it: each message's tokens, the tool results as sent, the tool uses in order,
    the superseded results, the turn checks.

    Between cuts a conversation's next call goes on from the carry of its last one: when its
    messages begin with the ones the carry saw (one digest of their JSON, ``cache_control``
    aside) and the spec and settings are the same, the blocks changed before are changed again as
    noted (a marker's text, a repeat's rewrite found again by its chain key) and only the new
    messages are walked, scanned and checked. Anything else (a cut, an edited or removed message,
    other settings, a rewrite no longer kept, memos off) walks all of them: the same ``cur``.
    """

    def __init__(
        self, messages: list[Any], spec: dict[str, Any], settings: dict[str, Any], count: Any
    ) -> None:
        self.messages, self.spec, self.settings, self.count = messages, spec, settings, count
        self.sig = fast_digest([spec, settings])
        self.cur: list[Any] = []
        self.walk = Walk(spec, settings, count)
        self.walk.track = True
        self.shift = 0
        self.uses: dict[str, tuple[int, int, str]] = {}
        self.order: list[str] = []
        self.scan: Supersession | None = None
        self.check = TurnCheck()
        self.assistants = 0
        self.gains: dict[str, tuple[str | None, int]] = {}
        self.at: dict[str, tuple[int, int, int]] | None = None  # tool_use id -> (message, block, tokens)
        self.seen_json: tuple[int, bytes] | None = None  # (messages, digest): _digests
        self.breakpoints: list[tuple[int, int]] | None = None  # of the messages (_breakpoints)
        self.resumed = False

    @classmethod
    def start(
        cls,
        messages: list[Any],
        spec: dict[str, Any],
        settings: dict[str, Any],
        count: Any,
        carry: _Carry | None = None,
        given: list[bytes | None] | None = None,
    ) -> Run:
        """The walk of ``messages`` under ``spec``: from ``carry`` when it fits, else from the start.
        ``given``: each message's digest, where the core has it (:func:`_digests`)."""
        run = cls(messages, spec, settings, count)
        if memo_enabled():
            run.breakpoints = _breakpoints(messages)
            digests = _digests(messages, carry.size if carry is not None else 0, run.breakpoints, given)
            if digests is not None:
                run.seen_json = (digests[1], digests[2])
                if carry is not None and run._fits(carry, digests):
                    try:
                        run._resume(carry)
                        run.resumed = True
                        return run
                    except _Gone:
                        breakpoints = run.breakpoints
                        run = cls(messages, spec, settings, count)
                        run.seen_json, run.breakpoints = (digests[1], digests[2]), breakpoints
        run._walk_all()
        return run

    def _fits(self, carry: _Carry, digests: tuple[bytes | None, int, bytes]) -> bool:
        n, drop = len(self.messages), self.spec.get("drop")
        if carry.sig != self.sig or n < carry.n:
            return False
        if drop and carry.n <= drop["d"] < n:
            return False  # the drop applies now and did not then
        if self.settings.get("clear_outline") and self.spec.get("cleared"):
            return False
        first, size, digest = digests
        if n == carry.n:
            return size == carry.size and digest == carry.digest
        return first == carry.digest

    def _walk_all(self) -> None:
        messages, spec = self.messages, self.spec
        msgs = _after_drop(messages, spec)
        self.shift = self.walk.shift = len(messages) - len(msgs)
        self.walk.reads = _outlined(msgs, spec, self.settings)
        self.cur = [self.walk.step(m) for m in msgs]
        self.uses = tool_uses(messages)
        self.order = sorted(self.uses, key=lambda t: (self.uses[t][0], self.uses[t][1]))
        for i, m in enumerate(self.cur):
            self.check.feed(i, m)
        self.assistants = _assistants(messages)

    def _resume(self, carry: _Carry) -> None:
        messages, walk = self.messages, self.walk
        if carry.chain is not None and (walk.lines is None or not walk.lines.resume(*carry.chain)):
            raise _Gone
        n_out = carry.n - carry.shift
        walk.seen, walk.edits, walk.tokens, walk.results = (
            carry.seen,
            carry.edits,
            carry.tokens,
            carry.results,
        )
        walk.n = n_out
        self.shift = walk.shift = carry.shift
        if carry.shift:
            first = messages[0]
            marked = {**first, "content": [*as_blocks(first.get("content")), _drop_marker(self.spec)]}
            head = [marked, *messages[carry.shift + 1 : carry.n]]
        else:
            head = messages[: carry.n]
        cur = _replay(head, carry.edits)
        new = messages[carry.n :]
        uses, order = carry.uses, carry.order
        for i, m in enumerate(new, carry.n):
            if isinstance(m, dict) and m.get("role") == "assistant":
                for j, b in enumerate(as_blocks(m.get("content"))):
                    if isinstance(b, dict) and b.get("type") in ("tool_use", "server_tool_use"):
                        tid = str(b.get("id"))
                        if tid in uses:
                            raise _Gone  # a tool use id seen before: tool_uses() keeps the later one
                        uses[tid] = (i, j, str(b.get("name", "")))
                        order.append(tid)
        for m in new:
            cur.append(walk.step(m))
        self.cur, self.uses, self.order = cur, uses, order
        self.scan = carry.scan if carry.scan is not None and carry.scan.feed(new) else None
        self.check = carry.check
        for i in range(n_out, len(cur)):
            self.check.feed(i, cur[i])
        self.assistants = carry.assistants + _assistants(new)
        self.gains = carry.gains

    def carry(self) -> _Carry | None:
        """What the conversation's next call goes on from (None: nothing to keep)."""
        if self.seen_json is None or not memo_enabled():
            return None
        lines = self.walk.lines
        return _Carry(
            sig=self.sig,
            n=len(self.messages),
            size=self.seen_json[0],
            digest=self.seen_json[1],
            shift=self.shift,
            seen=self.walk.seen,
            chain=None if lines is None or not lines.fed else (lines.key, len(lines.fed)),
            edits=self.walk.edits,
            tokens=self.walk.tokens,
            results=self.walk.results,
            uses=self.uses,
            order=self.order,
            scan=self.scan,
            check=self.check,
            assistants=self.assistants,
            gains=self.gains,
        )

    @property
    def tokens(self) -> int:
        """The tokens of the messages as sent."""
        return sum(self.walk.tokens)

    def superseded(self) -> dict[str, str]:
        """:func:`superseded` of the messages (the scan goes on from the carry's)."""
        if not self.settings.get("clear_superseded", True):
            return {}
        if self.scan is None:
            self.scan = Supersession(self.settings)
            self.scan.feed(self.messages)
        return self.scan.out

    def stale(self, sup: dict[str, str], memo: dict[str, Any] | None) -> dict[str, int]:
        """:func:`stale_results` of what is sent, from the walk's notes."""
        quotes = (memo or {}).get("quotes")
        if self.resumed and quotes is not None and quotes["first"] is not None:
            # the first message is the one the carry saw (breakpoints aside), as the conversation's
            # key says too: no need to compare it again
            quotes["first"] = self.messages[0] if self.messages else None
        found = ((i, tid, n) for i, _, tid, n in self.walk.results)
        return _stale(
            self.messages,
            len(self.cur),
            found,
            (self.uses, self.order),
            self.spec,
            self.settings,
            sup,
            memo,
            int,
        )

    def removable(
        self, stale: dict[str, int], sup: dict[str, str], total: int
    ) -> tuple[int, int, int] | None:
        """(an upper bound of the tokens clearing ``stale`` removes, the first message it changes,
        the tokens before that message); None when no bound is known.

        Each stale result gives up its tokens as sent less its marker's; clearing results never
        makes the others shorter by more than a few tokens (a pointer that names another result,
        a repeat found elsewhere: at most 12 tokens on the traces), which the slack covers."""
        if self.at is None:
            self.at = {tid: (i, j, n) for i, j, tid, n in self.walk.results}
        spec_sup = self.spec.get("superseded") or {}
        bound = 0
        first = None
        for tid in stale:
            i, j, n = self.at[tid]
            if first is None:
                first = i
                content = self.cur[i]["content"][j].get("content")
                if isinstance(content, str) and content.startswith("[tokensaver:"):
                    return None  # it may already read as its marker: the first change may be later
            desc = sup[tid] if tid in sup else spec_sup.get(tid)
            gain = self.gains.get(tid)
            if gain is None or gain[0] != desc:
                b = self.messages[i + self.shift]["content"][j]
                size = self.count(strip_cc(b))
                text = cleared_marker(size) if desc is None else superseded_marker(desc, size)
                gain = self.gains[tid] = (desc, n - self.count(_replace_result(b, text)))
            bound += gain[1]
        if first is None:
            return None
        head = sum(self.walk.tokens[:first])
        return bound + _BOUND_SLACK + total // 100, first, head

    def problems(self, body: dict[str, Any]) -> list[str]:
        """:func:`request_problems` of ``body`` (what is sent: ``cur`` as its messages; its blocks'
        breakpoints are the messages' own, the drop's aside: an edit keeps a block's)."""
        at = None
        if self.breakpoints is not None:
            d = self.shift + 1 if self.shift else 0
            at = [(i - self.shift if i >= d else i, j) for i, j in self.breakpoints if i == 0 or i >= d]
        if self.check.problems() or cache_control_problems(body, at):
            return request_problems(body)
        return []


def _drop_marker(spec: dict[str, Any]) -> dict[str, Any]:
    drop = spec["drop"]
    return dropped_marker(drop["d"] - 1, drop["tokens"])


def _replay(head: list[Any], edits: list[tuple[int, int, tuple[Any, ...]]]) -> list[Any]:
    """``head`` with the noted edits made again (each on the block it was made on)."""
    out = list(head)
    last, content = -1, None
    for i, j, how in edits:
        if j < 0:  # an assistant turn whose thinking the spec leaves out
            gone = _without_thinking(out[i]) if isinstance(out[i], dict) else None
            if gone is None:
                raise _Gone
            out[i], last = gone, -1
            continue
        if i != last:
            m = out[i]
            content = list(m["content"])
            out[i] = {**m, "content": content}
            last = i
        assert content is not None
        b = content[j]
        if not isinstance(b, dict) or b.get("type") != "tool_result":
            raise _Gone
        if how[0] == "text":
            content[j] = _replace_result(b, how[1])
        else:
            content[j] = {**b, "content": _rewritten(b.get("content"), how[1])}
    return out


def _rewritten(inner: Any, keys: tuple[Any, ...]) -> Any:
    """A result's content as its repeat rewrites (found by their chain keys) made it."""
    if keys[0][0] == -1:
        text = RepeatIndex.kept(keys[0][1])
        if text is None:
            raise _Gone
        return text
    out = list(inner)
    for k, key in keys:
        text = RepeatIndex.kept(key)
        if text is None:
            raise _Gone
        out[k] = {**inner[k], "text": text}
    return out


# -- the hooks ---------------------------------------------------------------------------------


# what a conversation's next calls are cut and decided from: through the state interface, so the
# replicas on one Redis continue each other's cuts (tokensaver.state.Decisions); "quiet" stays here
SHARED = ("spec", "cuts", "last_t", "prev_messages", "ttl", "fixed_t")


def _conversation(ctx: Any, body: dict[str, Any], limit: int) -> tuple[Any, dict[str, Any]]:
    """``((decisions, key), conv)``: the conversation's cut and cache tracking."""
    msgs = body.get("messages") or []
    # the core's conversation (tokensaver.conversations): two that open alike keep their own cuts
    first = strip_cc(msgs[0]) if msgs else None
    key = content_hash([str(body.get("model", "")), first, ctx.conversation])[:16]
    convs = ctx.shared_state(decisions=lambda: ctx.store.decisions("prune", SHARED, limit=limit))["decisions"]
    return (convs, key), convs.get(
        ctx.key_hash, key, lambda: {"spec": {"cleared": [], "drop": None}, "cuts": 0}
    )


_TTL_DEFAULT = 300.0
_MAX_PENDING = 256


def cache_state(conv: dict[str, Any], now: float, n_messages: int) -> dict[str, Any]:
    """What the API's cache still holds of this conversation, as far as its billed calls tell.

    ``cold``: the last call is longer ago than the TTL its writes used (every entry expired);
    ``fixed_live``: the entry at the end of tools + system was written or read within the TTL;
    ``prev_messages``: how many messages the previous request sent (its end has a live entry).
    A conversation with no billed call seen (a new one, or one begun before this process) is taken
    to be cached up to its previous turn, tools + system included.
    """
    last = conv.get("last_t")
    ttl = float(conv.get("ttl") or _TTL_DEFAULT)
    if last is None:
        return {"cold": False, "fixed_live": True, "prev_messages": max(0, n_messages - 2)}
    fixed_t = conv.get("fixed_t")
    return {
        "cold": now - last > ttl,
        "fixed_live": fixed_t is not None and now - fixed_t <= ttl,
        "prev_messages": conv.get("prev_messages", 0),
    }


def _expect(ctx: Any, conv: dict[str, Any], fixed: int, total: int, n_messages: int, where: Any) -> None:
    """Remember what this call sends, for :func:`observe` to read its billed usage against."""
    pending: OrderedDict[str, Any] = ctx.state.setdefault("pending", OrderedDict())
    pending[ctx.call_id] = (conv, fixed, total, n_messages, where)
    while len(pending) > _MAX_PENDING:
        pending.popitem(last=False)


def observe(ctx: Any) -> None:
    """Track the conversation's cache from a call's billed usage: when it was last touched, the TTL
    of its writes, whether the tools + system entry was written or read (the read stopped there)."""
    pending = ctx.state.get("pending")
    entry = pending.pop(ctx.call_id, None) if pending else None
    if entry is None:
        return
    conv, fixed, total, n_messages, (convs, key) = entry
    usage = ctx.usage or {}
    conv["last_t"] = ctx.now
    conv["prev_messages"] = n_messages
    if int(usage.get("cache_creation_1h") or 0):
        conv["ttl"] = 3600.0
    elif int(usage.get("cache_creation_5m") or 0):
        conv["ttl"] = _TTL_DEFAULT
    billed = sum(
        int(usage.get(k) or 0)
        for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    )
    read = int(usage.get("cache_read_input_tokens") or 0)
    scale = billed / total if total else 1.0
    if billed and read <= fixed * scale * 1.02 + 8:
        conv["fixed_t"] = ctx.now
    convs.put(ctx.key_hash, key, conv)


# server-side edits that leave tool results alone (Claude Code sends clear_thinking on every request)
_HARMLESS_EDITS = ("clear_thinking_",)


def server_side_conflict(cm: Any) -> str | None:
    """The server-side ``context_management`` edit that prune must not run beside, else None.

    Clearing thinking blocks never touches tool results, so prune works beside it; tool-result
    clearing (``clear_tool_uses_*``), compaction or any edit type not known to be harmless would
    clear or rewrite the same history as prune's cuts (and the pointers prune leaves to earlier
    copies), so prune stands aside.
    """
    if not cm:
        return None
    edits = cm.get("edits") if isinstance(cm, dict) else None
    if not isinstance(edits, list):
        return "context_management"
    for e in edits:
        kind = str(e.get("type", "")) if isinstance(e, dict) else ""
        if not kind.startswith(_HARMLESS_EDITS):
            return kind or "context_management"
    return None


def prune(body: dict[str, Any], ctx: Any) -> dict[str, Any] | None:
    """The pruned request, or None when nothing changes."""
    settings = {**DEFAULTS, **(ctx.settings or {})}
    conflict = server_side_conflict(body.get("context_management"))
    if conflict:
        ctx.record(stood_aside="context_management", server_edit=conflict)
        return None
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return None
    count = ctx.count
    norm = normalized(body)
    messages = norm["messages"]
    where, conv = _conversation(ctx, norm, int(settings["max_conversations"]))
    spec = conv["spec"]
    fixed = count({**norm, "messages": []})
    limit = budget(settings, ctx.model)
    trigger, target = int(settings["trigger"] * limit), int(settings["target"] * limit)
    carries = ctx.shared_state(carries=_Carries)["carries"]
    carry_key = (str(ctx.key_hash), str(where[1]))
    given = kept_digests(ctx.message_digests, msgs, messages)  # those normalizing left as they came
    run = Run.start(messages, spec, settings, count, carries.take(carry_key), given)
    cur = run.cur
    total = fixed + run.tokens
    notes: dict[str, Any] = {"budget": limit, "tokens": total}
    new_spec: dict[str, Any] | None = None
    reason = "budget"
    econ: dict[str, Any] = {}
    sup = run.superseded() if total > trigger or settings["clear_stale"] else {}
    cache = cache_state(conv, ctx.now, len(cur))
    if total > trigger:
        new_spec = plan_cut(Sizing(messages, settings, count, fixed), spec, target, sup)
        after_run = Run.start(messages, new_spec, settings, count, None, given)
        after_msgs = after_run.cur
        after = fixed + after_run.tokens
        if total - after < MIN_CUT_FRACTION * total:
            # a cut that removes little still re-writes the cache after it: not worth it
            notes["over_trigger_no_cut"] = {"could_remove": total - after}
            new_spec = None
    elif settings["clear_stale"]:
        new_spec, econ = plan_economic(
            Sizing(messages, settings, count, fixed),
            cur,
            spec,
            total,
            ctx.model,
            sup,
            conv.setdefault("quiet", {}),
            cache,
            run,
        )
        notes["stale_tokens"] = econ["stale_tokens"]
        if new_spec is not None:
            reason = "economic"
            after_run = Run.start(messages, new_spec, settings, count, None, given)
            after_msgs = after_run.cur
            after = fixed + after_run.tokens
    k = _first_diff(cur, after_msgs) if new_spec is not None else 0
    stripped = 0
    if new_spec is not None and prefix_check_enforcement(str(body.get("model") or "")):
        bound = thinking_from(cur, k)
        if bound and settings["cut_thinking_turns"] and asked_back(messages) is None:
            # the API binds each thinking block to what came before it: a cut before one fails the
            # prefix check, but leaving out every thinking block after the cut is valid (a trailing
            # run), and at a new user turn no tool loop needs its thinking. They stay out on every
            # later call; what the model thinks from here on is bound to the cut history.
            new_spec = with_unthink(new_spec, k + after_run.shift if k else 0, len(messages))
            after_run = Run.start(messages, new_spec, settings, count, None, given)
            after_msgs = after_run.cur
            after = fixed + after_run.tokens
            k = _first_diff(cur, after_msgs)
            stripped, bound = bound, thinking_from(after_msgs, k)
        if bound:
            # this model's history stays as sent (a cut would fail the prefix check: 400, or the
            # blocks dropped)
            notes.update(stood_aside="preserved_thinking", thinking_after_cut=bound)
            new_spec, stripped = None, 0
    if new_spec is not None:
        kept = fixed + _tokens(cur[:k], count)
        cut = {
            "trigger": reason,
            "tokens_before": total,
            "tokens_after": after,
            "removed_tokens": total - after,
            "prefix_invalidated_tokens": total - kept,
            "first_changed": f"messages[{k}]",
            "cleared_results": len(new_spec["cleared"]) - len(spec.get("cleared") or ()),
            "dropped_messages": (new_spec["drop"]["d"] - 1) if new_spec["drop"] else 0,
        }
        if stripped:
            cut["thinking_left_out"] = stripped
        m = ctx.model
        removed = max(total - after, 1)
        # one-off extra cost of re-writing what the API cannot read any more vs the reads it saves
        # per later call
        rewritten = rewrite_tokens(cur, after, k, fixed, count, cache)
        cut["rewritten_tokens"] = rewritten
        if cache.get("cold"):
            cut["cache_cold"] = True
        extra = (m.cache_write_5m - m.cache_read) * rewritten
        cut["break_even_calls"] = (
            round(max(extra, 0.0) / (removed * m.cache_read), 1) if m.cache_read else 0.0
        )
        if reason == "economic":
            cut["estimated_future_calls"] = econ["estimated_future_calls"]
        elif after > target:
            cut["over_target"] = True
        conv["spec"] = spec = new_spec
        conv["cuts"] += 1
        where[0].put(ctx.key_hash, where[1], conv)
        notes["cut"] = cut
        cur, total, run = after_msgs, after, after_run
    notes["tokens_sent"] = total
    notes["cleared_results"] = len(spec.get("cleared") or ())
    _expect(ctx, conv, fixed, total, len(cur), where)
    kept = run.carry()
    if kept is not None:
        carries.put(carry_key, kept)
    if cur == messages and norm["messages"] == body["messages"]:
        ctx.record(**notes)
        return None
    # string contents go out as block lists on every call, changed or not: the same bytes each turn
    out = {**norm, "messages": cur}
    problems = run.problems(out)
    if problems:
        notes["invalid_skipped"] = problems[:3]
        ctx.record(**notes)
        return None
    ctx.record(**notes)
    return out


@hookimpl
def tokensaver_transform_request(body: dict[str, Any], ctx: Any) -> dict[str, Any] | None:
    """Apply this conversation's cut; make a new, deeper one when the trigger is passed."""
    return prune(body, ctx)


@hookimpl
def tokensaver_observe_response(body: dict[str, Any], response: dict[str, Any], ctx: Any) -> None:
    """Track the conversation's cache from the billed usage; with server-side context management,
    record what the server cleared."""
    observe(ctx)
    cm = response.get("context_management") if isinstance(response, dict) else None
    if isinstance(cm, dict):
        edits = cm.get("applied_edits") or []
        ctx.record(server_cleared_tokens=sum(int(e.get("cleared_input_tokens") or 0) for e in edits))


def measured_cut(calls: list[dict[str, Any]], rec: dict[str, Any], cut: dict[str, Any]) -> dict[str, Any]:
    """What a cut cost and saved, from the billed usage of the run's calls (not prune's estimate).

    Cost: the cache writes billed on the cut call beyond the tokens the conversation added since its
    previous call (those would have been written anyway), priced as a write instead of a read.
    Saved: the removed tokens, read from the cache on the cut call and on every later call of the
    conversation in the run. Estimated tokens are scaled to billed ones by the cut call's ratio.
    Empty when the run lacks what this needs (usage, the previous call).
    """
    from tokensaver.pricing import PriceTable, normalize_usage

    conv = rec.get("conversation")
    same = [c for c in calls if c.get("conversation") == conv and c.get("status") == 200 and c.get("usage")]
    if rec not in same:
        return {}
    i = same.index(rec)
    if i == 0:
        return {}
    usage = normalize_usage(rec["usage"])
    billed_in = (
        usage["input_tokens"] + usage["cache_creation_input_tokens"] + usage["cache_read_input_tokens"]
    )
    sent = int(rec.get("tokens_sent") or 0)
    if not billed_in or not sent:
        return {}
    scale = billed_in / sent
    model = PriceTable().get(str(rec.get("priced_as") or rec.get("model") or ""))
    added = max(0, int(rec.get("tokens_original") or 0) - int(same[i - 1].get("tokens_original") or 0))
    written = usage["cache_creation_input_tokens"]
    extra = max(0.0, written - added * scale)
    write_price = (
        (
            usage["cache_creation_5m"] * model.cache_write_5m
            + usage["cache_creation_1h"] * model.cache_write_1h
        )
        / written
        if written
        else model.cache_write_5m
    )
    cost = extra * (write_price - model.cache_read) / 1e6
    later = len(same) - i - 1
    saved = cut["removed_tokens"] * scale * model.cache_read * (later + 1) / 1e6
    return {
        "calls_after": later,
        "cost_usd": round(cost, 6),
        "saved_usd": round(saved, 6),
        "net_usd": round(saved - cost, 6),
    }


@hookimpl
def tokensaver_report_section(plugin: str, calls: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Cuts (why, tokens removed vs prefix invalidated), calls over budget, server-side clearing."""
    notes = plugin_notes(calls, plugin)
    if not notes:
        return None
    cuts = [(c, n["cut"]) for c, n in notes if n.get("cut")]
    aside = sum(1 for _, n in notes if n.get("stood_aside") == "context_management")
    bound = sum(1 for _, n in notes if n.get("stood_aside") == "preserved_thinking")
    unthought = [cut["thinking_left_out"] for _, cut in cuts if cut.get("thinking_left_out")]
    server = sum(int(n.get("server_cleared_tokens") or 0) for _, n in notes)
    removed = sum(cut["removed_tokens"] for _, cut in cuts)
    invalid = sum(cut["prefix_invalidated_tokens"] for _, cut in cuts)
    rows = []
    for c, cut in cuts:
        row: dict[str, Any] = {
            "call": c.get("id"),
            "conversation": c.get("conversation"),
            "trigger": cut.get("trigger", "budget"),
            "before": cut["tokens_before"],
            "after": cut["tokens_after"],
            "removed": cut["removed_tokens"],
            "prefix_invalidated": cut["prefix_invalidated_tokens"],
            "first_changed": cut["first_changed"],
            "break_even_calls": cut.get("break_even_calls"),
        }
        row.update(measured_cut(calls, c, cut))
        rows.append(row)
    economic = sum(1 for _, cut in cuts if cut.get("trigger") == "economic")
    summary = (
        f"{len(notes)} calls, {len(cuts)} cuts ({economic} economic, {len(cuts) - economic} over budget): "
        f"{removed:,} tokens removed, "
        f"{invalid:,} cached prefix tokens invalidated by the cuts."
    )
    measured = [r for r in rows if r.get("net_usd") is not None]
    if measured:
        paid = sum(1 for r in measured if r["net_usd"] >= 0)
        net = sum(r["net_usd"] for r in measured)
        summary += (
            f" Measured from billed usage: {paid} of {len(measured)} cuts paid back so far, "
            f"net {'+' if net >= 0 else '-'}${abs(net):.4f} (the re-written cache vs the reads saved)."
        )
    if aside:
        summary += f" Stood aside on {aside} calls using server-side context_management"
        summary += f" (server cleared {server:,} tokens)." if server else "."
    if unthought:
        summary += (
            f" Preserved thinking: {len(unthought)} cuts at a new user turn left out the {sum(unthought):,} "
            "thinking blocks after them (the model's earlier reasoning; the API binds each block to what came before it)."
        )
    if bound:
        summary += f" Preserved thinking: no cut on {bound} calls inside a tool loop (a cut would unbind its thinking)."
    return {"title": "Pruning", "summary": summary, "rows": rows}
