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
re-read of a file after an edit, a test suite run again), see ``_repeats``. Both are decided from
the blocks before each result, so a result gets the same bytes on every call, and a cut that clears
the earlier copy turns the pointer back into the lines.

Never breaks a request: system, tools and the first user message (the task) are kept, the last
``keep_last_messages`` messages are untouched, tool_use/tool_result pairs stay together (the result
content becomes a marker), thinking blocks are never edited, roles stay alternating; a result that
fails the structural check is dropped (the request goes out unpruned, and the report says so).

Below the budget, an *economic* cut (``clear_stale``) clears stale tool results when that pays
for itself in cache prices. With prompt caching every call re-reads the whole history (cache read
price per token), so an old 10k-token file read costs 10k reads on every later call. Clearing
changes the prefix from the first cleared result on, so everything after it is written to the
cache once more: cost ~ (``cache_write_5m`` - ``cache_read``) x the tokens after the first change
(after the cut); benefit ~ ``cache_read`` x the tokens cleared x the calls still to come. The calls
to come are unknown: like a Lindy estimate, they are taken to be as many as the calls so far (the
assistant turns in the request, so a retry decides the same way), at most
``clear_max_future_calls``. The cut is made, clearing *every* stale result at once (cut deep, then
leave the prefix alone), when

* benefit >= ``clear_payback`` x cost, and
* the stale tokens are at least ``clear_min_tokens`` and ``clear_min_fraction`` of the request
  (hysteresis: no small cut every few turns).

Stale: the result of a tool use older than the last ``clear_keep_tool_uses`` ones (more than the
budget cut's ``keep_tool_uses``: an economic cut is optional, so it only clears what the model is
unlikely to quote again; on Claude Code traces agents quote file reads 20-50 tool uses later), not
in the last ``keep_last_messages`` messages, at least ``min_result_tokens``, tool not in
``exclude_tools``.

Superseded (``clear_superseded``): a result is stale at any age (in both cuts; still never in the
last ``keep_last_messages`` messages, never an excluded tool) when a later tool use, whose result
is not an error, supersedes it: the same call again (same tool, identical input: a re-run shell
command, a re-read file range), or a whole read of the same resource after a read or write of it
(the same value under an input key named like a path or url: ``file_path``, ``path``,
``notebook_path``, ``filename``, ``url``, with no other input but a range), or, with
``superseded_by_write``, a write of a file (input with ``content``/``new_string``/...) after a read
of it: the read content is out of date and the agent quotes the newer state. Its marker names the
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
``clear_max_future_calls`` (integer between 1 and 10000, default 20), ``clear_min_tokens``
(non-negative integer, default 4000), ``clear_min_fraction`` (number between 0.0 and 1.0, default
0.15), ``clear_superseded`` (true/false, default true), ``superseded_by_write`` (true/false,
default true), ``repeats`` (true/false, default true), ``repeat_min_lines`` (integer >= 3, default
8), ``repeat_min_chars`` (non-negative integer, default 400); the budget settings as above.

Unsafe when the model needs the exact text of an old tool result that it cannot fetch again. When
the request asks the API's server-side ``context_management`` to clear tool results or compact
(``clear_tool_uses_*``, ``compact_*``, any edit type not known to leave tool results alone), prune
stands aside; beside ``clear_thinking_*`` alone (real Claude Code sends it on every request) it works
as usual, since thinking blocks are never edited here.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from typing import Any

from tokensaver.context import plugin_notes
from tokensaver.errors import ConfigError
from tokensaver.hookspecs import hookimpl
from tokensaver.tokens import content_hash

from ._blocks import as_blocks, normalized, request_problems, strip_cc, tool_uses
from ._repeats import LineIndex

PLUGIN = "prune"
MIN_CUT_FRACTION = 0.1  # a cut must remove at least this share of the request

DEFAULTS: dict[str, Any] = {
    "max_tokens_budget": None,  # absolute budget in tokens; None: budget_fraction x context window
    "budget_fraction": 0.5,
    "trigger": 1.0,  # cut when the request exceeds trigger x budget ...
    "target": 0.6,  # ... down to target x budget
    "keep_tool_uses": 6,  # results of the last K tool uses are never cleared
    "keep_last_messages": 6,  # the last N messages are never touched
    "exclude_tools": [],  # tool names whose results are never cleared
    "min_result_tokens": 100,  # smaller tool results are not worth a marker
    "dedupe": True,  # newer identical tool output -> pointer to the earlier one
    "max_conversations": 512,
    # economic cuts below the budget: clear all stale tool results when the cache reads it saves
    # pay back the cache writes it causes
    "clear_stale": True,
    "clear_keep_tool_uses": 32,  # economic cuts keep the results of the last K tool uses
    "clear_payback": 2.0,  # estimated saving must be >= this x the one-off re-write cost
    "clear_max_future_calls": 20,  # cap on the calls still to come (estimated: the calls so far)
    "clear_min_tokens": 4000,  # stale tokens needed for a cut ...
    "clear_min_fraction": 0.15,  # ... and this share of the request
    # a result superseded by a later use of the same resource counts as stale at any age
    "clear_superseded": True,
    "superseded_by_write": True,  # a later Edit/Write of a file also supersedes an earlier Read
    # runs of lines an earlier result (still sent in full) shows become a pointer to it
    "repeats": True,
    "repeat_min_lines": 8,
    "repeat_min_chars": 400,
}


def _fail(msg: str, key: str, source: str) -> ConfigError:
    return ConfigError(f"prune.{key} {msg}", key=key, source=source)


@hookimpl
def tokensaver_configure(settings: dict[str, Any], source: str) -> dict[str, Any]:
    """Validate the ``prune`` table and fill in defaults."""
    unknown = set(settings) - set(DEFAULTS)
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(
            f"prune: unknown key {key!r}; accepted: {', '.join(sorted(DEFAULTS))}", key=key, source=source
        )
    out = {**DEFAULTS, **settings}
    b = out["max_tokens_budget"]
    if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1000):
        raise _fail("must be an integer >= 1000 (tokens) or absent", "max_tokens_budget", source)
    for key, lo, hi in (("budget_fraction", 0.05, 1.0), ("trigger", 0.1, 1.0), ("target", 0.05, 1.0)):
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
            raise _fail(f"must be a number between {lo} and {hi}", key, source)
        out[key] = float(v)
    if out["target"] >= out["trigger"]:
        raise _fail("must be below prune.trigger (cut deep: trigger high, target lower)", "target", source)
    for key in (
        "keep_tool_uses",
        "keep_last_messages",
        "min_result_tokens",
        "max_conversations",
        "clear_keep_tool_uses",
        "repeat_min_lines",
        "repeat_min_chars",
    ):
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise _fail("must be a non-negative integer", key, source)
    if out["keep_last_messages"] < 2:
        raise _fail("must be at least 2 (the latest turn is always kept)", "keep_last_messages", source)
    if not isinstance(out["exclude_tools"], list) or not all(
        isinstance(t, str) for t in out["exclude_tools"]
    ):
        raise _fail("must be a list of tool names", "exclude_tools", source)
    if out["repeat_min_lines"] < 3:
        raise _fail("must be at least 3 (lines)", "repeat_min_lines", source)
    for key in ("dedupe", "clear_stale", "clear_superseded", "superseded_by_write", "repeats"):
        if not isinstance(out[key], bool):
            raise _fail("must be true or false", key, source)
    v = out["clear_payback"]
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0.1 <= v <= 100:
        raise _fail("must be a number between 0.1 and 100 (saving / cost)", "clear_payback", source)
    out["clear_payback"] = float(v)
    v = out["clear_max_future_calls"]
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 10_000:
        raise _fail("must be an integer between 1 and 10000 (calls)", "clear_max_future_calls", source)
    v = out["clear_min_tokens"]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise _fail("must be a non-negative integer (tokens)", "clear_min_tokens", source)
    v = out["clear_min_fraction"]
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= v <= 1.0:
        raise _fail(
            "must be a number between 0.0 and 1.0 (share of the request)", "clear_min_fraction", source
        )
    out["clear_min_fraction"] = float(v)
    return out


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
    msgs = list(messages)
    drop = spec.get("drop")
    if drop and len(msgs) > drop["d"] and _prefix_hash(msgs, drop["d"]) == drop["h"]:
        first = msgs[0]
        marker = dropped_marker(drop["d"] - 1, drop["tokens"])
        msgs = [{**first, "content": [*as_blocks(first.get("content")), marker]}, *msgs[drop["d"] :]]
    cleared = set(spec.get("cleared") or ())
    sup = spec.get("superseded") or {}
    dedupe = settings.get("dedupe", True)
    min_tokens = int(settings.get("min_result_tokens", 100))
    seen: dict[str, str] = {}  # content hash -> id of the first result kept in full
    lines = (
        LineIndex(int(settings["repeat_min_lines"]), int(settings["repeat_min_chars"]))
        if settings.get("repeats")
        else None
    )
    out = []
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") != "user" or not isinstance(m.get("content"), list):
            out.append(m)
            continue
        content = list(m["content"])
        changed = False
        for j, b in enumerate(content):
            if not isinstance(b, dict) or b.get("type") != "tool_result":
                continue
            tid = str(b.get("tool_use_id"))
            if tid in cleared:
                size = count(strip_cc(b))
                text = superseded_marker(sup[tid], size) if tid in sup else cleared_marker(size)
                content[j] = _replace_result(b, text)
                changed = True
                continue
            inner = b.get("content")
            if not (dedupe or lines is not None) or not inner or b.get("is_error"):
                continue
            if dedupe:
                h = content_hash(strip_cc(inner))
                if h in seen:
                    if count(strip_cc(b)) >= min_tokens:
                        content[j] = _replace_result(b, pointer_marker(seen[h]))
                        changed = True
                    continue
                seen[h] = tid
            if lines is not None:
                new_inner = _without_repeats(inner, tid, lines)
                if new_inner is not inner:
                    content[j] = {**b, "content": new_inner}
                    changed = True
        out.append({**m, "content": content} if changed else m)
    return out


def _without_repeats(inner: Any, tid: str, index: LineIndex) -> Any:
    """A result's content with runs of lines an earlier result shows as pointers (same object if none)."""
    if isinstance(inner, str):
        return index.rewrite(tid, inner)
    if not isinstance(inner, list):
        return inner
    out, changed = [], False
    for blk in inner:
        if isinstance(blk, dict) and blk.get("type") == "text" and isinstance(blk.get("text"), str):
            text = index.rewrite(tid, blk["text"])
            if text is not blk["text"]:
                blk, changed = {**blk, "text": text}, True
        out.append(blk)
    return out if changed else inner


# -- superseded results ------------------------------------------------------------------------

# an input key that names the resource a tool reads or writes: file_path, path, notebook_path,
# filename, url, ...
_TARGET_KEY = re.compile(r"(?:^|_)(?:path|file|filename|url|uri)$", re.IGNORECASE)
# input keys that only narrow a read to a part of the resource
_RANGE_KEYS = frozenset(
    {"offset", "limit", "line_number", "start_line", "end_line", "view_range", "lines", "pages"}
)
# input keys that carry new content for the resource (Edit, Write, NotebookEdit, str_replace, ...)
_WRITE_KEYS = frozenset(
    {"content", "new_string", "old_string", "edits", "new_source", "file_text", "new_str", "old_str"}
)
_MAX_TARGET_CHARS = 200


def _access(inp: Any) -> tuple[str, str] | None:
    """(kind, resource) of a tool use: kind "read" (whole), "part" (a range) or "write"; None when
    the input names no single resource or also searches, prompts, ... (only identical calls then)."""
    if not isinstance(inp, dict):
        return None
    targets = [k for k, v in inp.items() if isinstance(v, str) and v and _TARGET_KEY.search(k)]
    if len(targets) != 1:
        return None
    key = targets[0]
    others = {k for k, v in inp.items() if k != key and v not in (None, "", False)}
    if others & _WRITE_KEYS:
        return "write", str(inp[key])
    if others <= _RANGE_KEYS:
        return ("part" if others else "read"), str(inp[key])
    return None


def superseded(messages: list[Any], settings: dict[str, Any]) -> dict[str, str]:
    """Tool results superseded by a later use of the same resource: tool_use id -> the later use.

    A result is superseded by the first later use (whose result is not an error) that repeats the
    same call (same tool, identical input; not for writes), or that reads the whole of the same
    resource (same path or url) after a read or a write of it; with ``superseded_by_write``, also
    by a later write of a resource it read. The later use's facts are the newer ones.
    """
    if not settings.get("clear_superseded", True):
        return {}
    errors = {
        str(b.get("tool_use_id"))
        for m in messages
        if isinstance(m, dict) and m.get("role") == "user"
        for b in as_blocks(m.get("content"))
        if isinstance(b, dict) and b.get("type") == "tool_result" and b.get("is_error")
    }
    by_write = bool(settings.get("superseded_by_write", False))
    calls: dict[str, list[str]] = {}  # (tool, input) -> earlier uses not yet superseded
    reads: dict[str, list[tuple[str, str]]] = {}  # resource -> earlier (id, kind) not yet superseded
    out: dict[str, str] = {}
    for m in messages:
        if not isinstance(m, dict) or m.get("role") != "assistant":
            continue
        for b in as_blocks(m.get("content")):
            if not isinstance(b, dict) or b.get("type") != "tool_use":
                continue
            tid, name, inp = str(b.get("id")), str(b.get("name", "")), b.get("input")
            acc = _access(inp)
            call = json.dumps([name, inp], sort_keys=True, default=str)
            if tid not in errors:
                if acc is None or acc[0] != "write":
                    for old in calls.pop(call, []):
                        out.setdefault(old, f"a later identical {name} call")
                if acc is not None and (acc[0] == "read" or (acc[0] == "write" and by_write)):
                    target = acc[1][:_MAX_TARGET_CHARS]
                    keep = []
                    for old, kind in reads.pop(acc[1], []):
                        if acc[0] == "read" or kind != "write":
                            out.setdefault(old, f"a later {name} of {target}")
                        else:
                            keep.append((old, kind))
                    if keep:
                        reads[acc[1]] = keep
            if tid in out:
                continue
            if acc is None or acc[0] != "write":
                calls.setdefault(call, []).append(tid)
            if acc is not None:
                reads.setdefault(acc[1], []).append((tid, acc[0]))
    return out


def _tokens(messages: list[Any], count: Any) -> int:
    return sum(count(m) for m in messages)


# -- deciding a cut ----------------------------------------------------------------------------


def plan_cut(
    messages: list[Any],
    spec: dict[str, Any],
    settings: dict[str, Any],
    count: Any,
    fixed: int,
    target: int,
    sup: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A deeper spec that brings the request to ``target`` tokens (``fixed``: system + tools).

    ``sup``: superseded results (see ``superseded``), stale whatever their age.
    """
    sup = sup or {}
    new: dict[str, Any] = {
        "cleared": list(spec.get("cleared") or ()),
        "drop": spec.get("drop"),
        "superseded": dict(spec.get("superseded") or {}),
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
) -> dict[str, int]:
    """Stale tool results as sent now (``cur``): tool_use id -> tokens, oldest first.

    Older than the last ``clear_keep_tool_uses`` tool uses, outside the last ``keep_last_messages``
    messages, not cleared yet, at least ``min_result_tokens`` as sent (a dedupe pointer is not),
    tool not excluded. A superseded result (``sup``) is stale whatever its age. Tool use order and
    names come from the original ``messages``.
    """
    sup = sup or {}
    uses = tool_uses(messages)
    order = sorted(uses, key=lambda t: (uses[t][0], uses[t][1]))
    n_keep = int(settings["clear_keep_tool_uses"])
    keep_ids = set(order[-n_keep:]) if n_keep else set()
    excluded = set(settings.get("exclude_tools") or ())
    cleared = set(spec.get("cleared") or ())
    min_tokens = int(settings["min_result_tokens"])
    protect_from = len(cur) - int(settings["keep_last_messages"])
    out: dict[str, int] = {}
    for i, m in enumerate(cur):
        if i == 0 or i >= protect_from or not isinstance(m, dict) or m.get("role") != "user":
            continue
        for b in as_blocks(m.get("content")):
            if not isinstance(b, dict) or b.get("type") != "tool_result":
                continue
            tid = str(b.get("tool_use_id"))
            if tid in cleared or (tid in keep_ids and tid not in sup):
                continue
            if tid not in uses or uses[tid][2] in excluded:
                continue
            size = count(strip_cc(b))
            if size >= min_tokens:
                out[tid] = size
    return out


def plan_economic(
    messages: list[Any],
    cur: list[Any],
    spec: dict[str, Any],
    settings: dict[str, Any],
    count: Any,
    fixed: int,
    total: int,
    model: Any,
    sup: dict[str, str] | None = None,
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The spec that clears every stale result when that pays back in cache prices (else None).

    Also returns the figures of the decision: stale tokens, tokens cleared, tokens re-written,
    estimated future calls and the calls needed to pay back.
    """
    sup = sup or {}
    stale = stale_results(messages, cur, spec, settings, count, sup)
    info: dict[str, Any] = {"stale_tokens": sum(stale.values())}
    need = max(int(settings["clear_min_tokens"]), int(settings["clear_min_fraction"] * total))
    read, write = float(model.cache_read), float(model.cache_write_5m)
    if not stale or info["stale_tokens"] < need or read <= 0 or write <= read:
        return None, info
    new = {
        "cleared": sorted({*(spec.get("cleared") or ()), *stale}),
        "drop": spec.get("drop"),
        "superseded": {**(spec.get("superseded") or {}), **{t: sup[t] for t in stale if t in sup}},
    }
    after_msgs = apply_spec(messages, new, settings, count)
    after = fixed + _tokens(after_msgs, count)
    removed = total - after
    if removed < need:
        return None, info
    k = _first_diff(cur, after_msgs)
    rewritten = after - fixed - _tokens(after_msgs[:k], count)  # written again instead of read
    future = min(
        sum(1 for m in messages if m.get("role") == "assistant"), int(settings["clear_max_future_calls"])
    )
    cost = (write - read) * rewritten
    benefit = read * removed * future
    info.update(
        cleared_tokens=removed,
        rewritten_tokens=rewritten,
        estimated_future_calls=future,
        payback_calls=round(cost / (read * removed), 1),
    )
    if benefit < float(settings["clear_payback"]) * cost:
        return None, info
    return new, info


# -- the hooks ---------------------------------------------------------------------------------


def _conversation(state: dict[str, Any], body: dict[str, Any], limit: int) -> dict[str, Any]:
    msgs = body.get("messages") or []
    key = content_hash([str(body.get("model", "")), strip_cc(msgs[0]) if msgs else None])[:16]
    convs: OrderedDict[str, dict[str, Any]] = state.setdefault("conversations", OrderedDict())
    conv = convs.get(key)
    if conv is None:
        conv = convs[key] = {"spec": {"cleared": [], "drop": None}, "cuts": 0}
    convs.move_to_end(key)
    while len(convs) > limit:
        convs.popitem(last=False)
    return conv


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
    conv = _conversation(ctx.state, norm, int(settings["max_conversations"]))
    spec = conv["spec"]
    fixed = count({**norm, "messages": []})
    limit = budget(settings, ctx.model)
    trigger, target = int(settings["trigger"] * limit), int(settings["target"] * limit)
    cur = apply_spec(messages, spec, settings, count)
    total = fixed + _tokens(cur, count)
    notes: dict[str, Any] = {"budget": limit, "tokens": total}
    new_spec: dict[str, Any] | None = None
    reason = "budget"
    econ: dict[str, Any] = {}
    sup = superseded(messages, settings) if total > trigger or settings["clear_stale"] else {}
    if total > trigger:
        new_spec = plan_cut(messages, spec, settings, count, fixed, target, sup)
        after_msgs = apply_spec(messages, new_spec, settings, count)
        after = fixed + _tokens(after_msgs, count)
        if total - after < MIN_CUT_FRACTION * total:
            # a cut that removes little still re-writes the cache after it: not worth it
            notes["over_trigger_no_cut"] = {"could_remove": total - after}
            new_spec = None
    elif settings["clear_stale"]:
        new_spec, econ = plan_economic(messages, cur, spec, settings, count, fixed, total, ctx.model, sup)
        notes["stale_tokens"] = econ["stale_tokens"]
        if new_spec is not None:
            reason = "economic"
            after_msgs = apply_spec(messages, new_spec, settings, count)
            after = fixed + _tokens(after_msgs, count)
    if new_spec is not None:
        k = _first_diff(cur, after_msgs)
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
        m = ctx.model
        removed = max(total - after, 1)
        # one-off extra cost of re-writing the changed part vs the reads it saves per later call
        extra = (after - kept) * m.cache_write_5m - (total - kept) * m.cache_read
        cut["break_even_calls"] = (
            round(max(extra, 0.0) / (removed * m.cache_read), 1) if m.cache_read else 0.0
        )
        if reason == "economic":
            cut["estimated_future_calls"] = econ["estimated_future_calls"]
        elif after > target:
            cut["over_target"] = True
        conv["spec"] = spec = new_spec
        conv["cuts"] += 1
        notes["cut"] = cut
        cur, total = after_msgs, after
    notes["tokens_sent"] = total
    notes["cleared_results"] = len(spec.get("cleared") or ())
    if cur == messages and norm["messages"] == body["messages"]:
        ctx.record(**notes)
        return None
    # string contents go out as block lists on every call, changed or not: the same bytes each turn
    out = {**norm, "messages": cur}
    problems = request_problems(out)
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
    """With server-side context management, record what the server cleared."""
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
    if plugin != PLUGIN:
        return None
    notes = plugin_notes(calls, PLUGIN)
    if not notes:
        return None
    cuts = [(c, n["cut"]) for c, n in notes if n.get("cut")]
    aside = sum(1 for _, n in notes if n.get("stood_aside"))
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
    return {"title": "Pruning", "summary": summary, "rows": rows}
