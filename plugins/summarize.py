"""summarize: shrink large tool results by what they are (JSON, logs, grep, listings, HTML, blobs).

Saves the tokens of bulky tool output that agents resend on every later turn. Results under
``min_chars`` (default 400) are left alone. Lossless rewrites come first (ANSI codes, progress redraws, trailing
whitespace, compact JSON and record tables, grep hits and context lines grouped by file, repeated
ls -l columns; by ``shapes``: go test runs without the step lines of tests that report a result,
GitHub Actions logs with job, step and date once per run of lines, git diffs without the file lines
their ``diff --git`` line implies, mini-swe-agent's ``<returncode>``/``<output>`` tags as one
``[returncode N]`` line at any size, SWE-agent's three state lines as one ``[open: F, cwd: D]``
line at any size; an edit's echo of its own tool use's input as a pointer to it);
lossy ones only for clearly repetitive logs (runs differing only in numbers, very long logs cut to
head + tail + every error/warning/trace line and every line with a path not shown elsewhere), long
base64 blobs, binary output and fetched web pages (to text). Source code and numbered file
contents are never elided; ``line_numbers = "compact"`` (default) only drops the padding before
their line numbers (``     12→code`` to ``12→code``: every number and every byte of the line kept),
``"keep"`` sends them as they came.

Unsafe when the model needs bytes that a lossy rewrite dropped (a number in the middle of a long
repetitive log, an HTML attribute of a fetched page): set ``lossy = false`` to keep only the
lossless rewrites. Every rewrite is a pure function of the block's text and the settings, so the
same tool result gives the same bytes on every turn and prompt-cache prefixes stay valid.

``retrieval = true`` (opt-in) keeps each original that a lossy rewrite shortened, ends the rewrite
with a line naming its ``ref``, and adds a ``tokensaver_retrieve`` tool (always, so the tool list
stays byte-stable); when the model calls it, the middleware answers with the original itself and
the caller's agent only sees the final answer. Originals are kept per API key: the newest 256 in
memory, all of them in the plugin's private disk store (``summary_dir``), so a restarted process
still answers a ref and a long-lived one does not grow without bound.

``model_summaries = true`` (opt-in) condenses long prose (``summary_min_tokens``, default 2000)
with a cheaper model (``summary_model``, default ``claude-haiku-5-5``) through ``ctx.call_model``,
when it pays ``summary_payback`` times for itself; the summary's cost is charged to this stage. Each
output is decided once, when it is new, and the decision is kept (memory and ``summary_dir``), so
later turns give the same bytes; see ``_model_summary``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, fields
from typing import Any, TypeVar

from tokensaver.hookspecs import hookimpl
from tokensaver.settings import Schema, boolean, choice, integer, number, path, strings, text
from tokensaver.tokens import canonical_json, fast_digest

from . import _echo, _model_summary
from ._lru import SizedLRU
from ._store import encode_entry
from ._summarize_text import SHAPE_NAMES, Options, Result, is_prose, shrink

_T = TypeVar("_T")
log = logging.getLogger("tokensaver.plugins.summarize")

SETTINGS = Schema(
    "summarize",
    {
        "min_chars": integer(
            Options.min_chars, "tool results shorter than this are left alone", min=1, unit="characters"
        ),
        "max_lines": integer(
            Options.max_lines,
            "a longer repetitive log is cut to head + tail + the lines that matter",
            min=1,
            unit="lines",
        ),
        "head_lines": integer(
            Options.head_lines, "lines kept at the start of a cut log", min=1, unit="lines"
        ),
        "tail_lines": integer(Options.tail_lines, "lines kept at the end of a cut log", min=1, unit="lines"),
        "min_run": integer(
            Options.min_run,
            "shortest run of lines differing only in numbers that is collapsed",
            min=3,
            unit="lines",
        ),
        "max_rows": integer(
            Options.max_rows,
            "a longer JSON table keeps its first and last rows and every row naming an error",
            min=1,
            unit="rows",
        ),
        "html": boolean(Options.html, "fetched web pages sent as text"),
        "lossy": boolean(Options.lossy, "lossy rewrites too (false: only the lossless ones)"),
        "line_numbers": choice(
            Options.line_numbers,
            ("compact", "keep"),
            "numbered file lines: compact drops the padding before the numbers, keep sends them as they came",
        ),
        "shapes": strings(Options.shapes, "formats recognized by their shape", choices=SHAPE_NAMES),
        "keep_originals": boolean(
            False,
            "keep the original of each block a lossy rewrite shortened (as retrieval does), without the tool",
        ),
        "retrieval": boolean(
            False, "keep originals and add a tokensaver_retrieve tool the model can call to get one back"
        ),
        "memo_entries": integer(
            20_000, "rewrites remembered per process (and kept originals per key)", min=1
        ),
        "model_summaries": boolean(False, "long prose condensed by a cheaper model when it pays for itself"),
        "summary_model": text("claude-haiku-5-5", "the model that writes the summaries", item="a model name"),
        "summary_min_tokens": integer(2000, "shortest prose summarized by the model", min=1, unit="tokens"),
        "summary_words": integer(400, "length asked of a summary", min=1, unit="words"),
        "summary_payback": number(2.0, "a summary must save this many times its own cost", min=0.1, max=100),
        "summary_dir": path(
            None,
            "where originals and summary decisions are stored",
            optional=True,
            none_means="$TOKENSAVER_CACHE_DIR/summaries or ~/.cache/tokensaver/summaries",
        ),
    },
    checks=[
        lambda s: (
            ("max_lines", "must be at least head_lines + tail_lines")
            if s["head_lines"] + s["tail_lines"] > s["max_lines"]
            else None
        )
    ],
    passthrough=("enabled",),
)
DEFAULTS: dict[str, Any] = SETTINGS.defaults()
ORIGINAL_MAGIC = b"tsorig1\n"
MEMORY_ORIGINALS = 256  # the newest kept originals also stay in memory (all of them go to disk)
RETRIEVE_TOOL = "tokensaver_retrieve"
RETRIEVE_DEFINITION: dict[str, Any] = {
    "name": RETRIEVE_TOOL,
    "description": (
        "Return the full original of a tool output that tokensaver shortened. Call it only when the "
        "shortened output lacks something you need; pass the ref shown at the end of that output."
    ),
    "input_schema": {
        "type": "object",
        "properties": {"ref": {"type": "string", "description": "the ref named in the shortened output"}},
        "required": ["ref"],
    },
}


@hookimpl
def tokensaver_configure(settings: dict[str, Any], source: str) -> dict[str, Any]:
    """The ``summarize`` table checked against ``SETTINGS``, defaults filled in."""
    return SETTINGS.validate(settings, source)


def _settings(ctx: Any) -> dict[str, Any]:
    """This stage's settings, normalized (defaults when a hook is called directly)."""
    s = ctx.settings
    return s if s and "min_chars" in s else tokensaver_configure(s, "defaults")


def options(settings: dict[str, Any] | None) -> Options:
    """The text-transform options from a (normalized or partial) settings table."""
    s = {**DEFAULTS, **(settings or {})}
    s["shapes"] = tuple(s["shapes"])
    return Options(**{f.name: s[f.name] for f in fields(Options)})


MEMO_BYTES = 16 * 1024 * 1024  # each of the plugin's two memos: the sum of its kept texts' lengths


_Memo = SizedLRU  # results kept by key within memo_entries and MEMO_BYTES


def _memoized(
    ctx: Any, slot: str, key: Any, compute: Callable[[], _T], size: Callable[[_T], int], limit: int
) -> _T:
    """``compute()`` kept in the plugin state's ``_Memo`` named ``slot`` under ``key`` (``size``: its bytes)."""
    state = ctx.shared_state(**{slot: _Memo}, lock=threading.Lock)
    memo, lock = state[slot], state["lock"]
    with lock:
        hit = memo.get(key)
        if hit is not None:
            return hit  # type: ignore[no-any-return]
    value = compute()
    with lock:
        memo.put(key, value, size(value), limit, MEMO_BYTES)
    return value


@functools.lru_cache(maxsize=64)
def _options_key(opts: Options) -> bytes:
    """The options' part of a memo key, made once per options (not once per block)."""
    return fast_digest(canonical_json(asdict(opts)))


def shrink_cached(text: str, opts: Options, ctx: Any, limit: int) -> Result:
    """``shrink`` memoized per content digest and options in the plugin state (same input, same bytes)."""
    if len(text) < opts.min_chars and not (
        (text[:12] == "<returncode>" and "returncode" in opts.shapes)
        or (text.endswith("bash-$") and "state" in opts.shapes)
    ):
        return Result(text, "small", False)
    key = (_options_key(opts), fast_digest(text))
    return _memoized(ctx, "memo", key, lambda: shrink(text, opts), lambda res: len(res.text), limit)


def _rewrite(
    text: str,
    opts: Options,
    ctx: Any,
    settings: dict[str, Any],
    stats: dict[str, Any],
    newest: bool,
    tool_input: Any = None,
) -> str:
    """One tool-output text as it is sent: shrunk by content type, then perhaps condensed by a model;
    numbered lines its own tool use's input holds (an edit's echo) become a pointer (``_echo``)."""
    res = shrink_cached(text, opts, ctx, settings.get("memo_entries", DEFAULTS["memo_entries"]))
    # about 2 characters a token at the least: a cheap test before counting
    if settings.get("model_summaries") and len(res.text) >= 2 * settings["summary_min_tokens"]:
        condensed = _condensed(res, ctx, settings, stats, newest)
        if condensed is not None:
            res = Result(condensed, "model_summary", True)
    if tool_input and not res.lossy:
        echoed = _echoed(res.text, tool_input, ctx, settings.get("memo_entries", DEFAULTS["memo_entries"]))
        if echoed != res.text:
            res = Result(
                echoed,
                "echo" if res.kind in ("small", "kept") or ":" in res.kind else res.kind + "+echo",
                False,
            )
    _tally(stats, text, res, ctx, settings)
    return _with_ref(res, text, ctx, settings) if res.text != text else text


def _echoed(text: str, tool_input: Any, ctx: Any, limit: int) -> str:
    """``_echo.rewrite`` memoized per (input, text) in the plugin state: an edit's result is
    scanned once, not on every later call that resends it."""
    if not _echo.has_lines(tool_input):
        return text
    key = (fast_digest(tool_input), fast_digest(text))
    return _memoized(ctx, "echo_memo", key, lambda: _echo.rewrite(text, tool_input), len, limit)


def _condensed(
    res: Result, ctx: Any, settings: dict[str, Any], stats: dict[str, Any], newest: bool
) -> str | None:
    """The model summary for prose (decided once per content, see ``_model_summary``), else None."""
    if res.kind.split(":")[0] not in ("text", "html") or not is_prose(res.text.split("\n")):
        return None
    decision = _model_summary.known(res.text, ctx, settings)
    if decision is not None:
        return decision.get("summary")  # type: ignore[no-any-return]
    if not newest:
        _model_summary.keep(res.text, ctx, settings)  # already sent as it is: it stays so
        return None
    if ctx.model.name == ctx.prices.get(settings["summary_model"]).name or _model_summary.off(ctx):
        return None
    tokens = ctx.count(res.text)
    if tokens < settings["summary_min_tokens"]:
        return None
    if not _model_summary.worth_it(tokens, ctx, settings, stats.get("calls_so_far", 0)):
        stats["summaries_not_worth_it"] = stats.get("summaries_not_worth_it", 0) + 1
        return None
    summary = _model_summary.summarize_text(res.text, tokens, ctx, settings)
    stats["model_summaries"] = stats.get("model_summaries", 0) + (summary is not None)
    return summary


def _map_texts(content: Any, rewrite: Callable[[str], str]) -> Any:
    """A tool_result's content with each text ``rewrite``'s, or the same object when nothing changed."""
    if isinstance(content, str):
        return rewrite(content)
    if isinstance(content, list):
        new: list[Any] = []
        changed = False
        for b in content:
            if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str):
                text = rewrite(b["text"])
                if text is not b["text"]:
                    b = {**b, "text": text}
                    changed = True
            new.append(b)
        return new if changed else content
    return content


def original_ref(original: str) -> str:
    """The ref under which a shortened output's original is kept (a content hash prefix)."""
    return hashlib.sha256(original.encode()).hexdigest()[:16]


def _original_key(ctx: Any, ref: str) -> str:
    # per API key: a ref never hands one key's tool output to another
    return hashlib.sha256(f"original\0{ctx.key_hash}\0{ref}".encode()).hexdigest()


def keep_original(original: str, ctx: Any, settings: dict[str, Any]) -> str:
    """Keep an original that a lossy rewrite shortened; return its ref.

    The newest ``MEMORY_ORIGINALS`` stay in memory; every one goes to the plugin's private disk
    store (``summary_dir``), written once, so memory stays bounded in a long-lived process and a
    restarted one still answers a ref.
    """
    ref = original_ref(original)
    state = ctx.shared_state(originals=OrderedDict, stored_refs=OrderedDict, lock=threading.Lock)
    with state["lock"]:
        originals, stored = state["originals"], state["stored_refs"]
        originals[ref] = original
        originals.move_to_end(ref)
        while len(originals) > MEMORY_ORIGINALS:
            originals.popitem(last=False)
        fresh = ref not in stored
        stored[ref] = None
        while len(stored) > settings.get("memo_entries", DEFAULTS["memo_entries"]):
            stored.popitem(last=False)
    store = _model_summary.disk_store(ctx, settings) if fresh else None
    if store is not None:
        key = _original_key(ctx, ref)
        try:
            if store.get(key) is None:
                store.set(key, encode_entry(ORIGINAL_MAGIC, key, {"text": original}, ctx.now), None)
        except Exception as e:  # memory still has it; the disk copy is a convenience
            log.warning("summarize: cannot store an original: %s: %s", type(e).__name__, e)
    return ref


def find_original(ref: str, ctx: Any, settings: dict[str, Any]) -> str | None:
    """The original kept under ``ref`` for this API key (memory, then disk), else None."""
    state = ctx.shared_state(originals=OrderedDict, stored_refs=OrderedDict, lock=threading.Lock)
    with state["lock"]:
        hit = state["originals"].get(ref)
    if hit is not None:
        return hit  # type: ignore[no-any-return]
    store = _model_summary.disk_store(ctx, settings)
    if store is None:
        return None
    value, _, problem = store.read(ORIGINAL_MAGIC, _original_key(ctx, ref))
    if problem:
        ctx.record(warning=problem)
    text = (value or {}).get("text")
    return text if isinstance(text, str) else None


def _with_ref(res: Result, original: str, ctx: Any, settings: dict[str, Any]) -> str:
    """The rewritten text, with the ref line when retrieval is on and the rewrite dropped something."""
    if not (settings.get("retrieval") and res.lossy):
        return res.text
    ref = keep_original(original, ctx, settings)
    return f"{res.text}\n[tokensaver: shortened; call {RETRIEVE_TOOL} with ref {ref} for the full output]"


def _tally(stats: dict[str, Any], original: str, res: Result, ctx: Any, settings: dict[str, Any]) -> None:
    if res.text == original:
        return
    kinds = stats.setdefault("kinds", {})
    k = kinds.setdefault(res.kind, {"blocks": 0, "chars_before": 0, "chars_after": 0})
    k["blocks"] += 1
    k["chars_before"] += len(original)
    k["chars_after"] += len(res.text)
    if res.lossy:
        stats["lossy_blocks"] = stats.get("lossy_blocks", 0) + 1
        if settings.get("keep_originals"):
            keep_original(original, ctx, settings)


@hookimpl
def tokensaver_transform_request(body: dict[str, Any], ctx: Any) -> dict[str, Any] | None:
    """Shrink every large tool_result in the conversation (the same block always to the same bytes)."""
    settings = _settings(ctx)
    opts = options(settings)
    stats: dict[str, Any] = {}
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    answered_by_us = {
        b.get("id")
        for m in messages
        if isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("content"), list)
        for b in m["content"]
        if isinstance(b, dict) and b.get("type") == "tool_use" and b.get("name") == RETRIEVE_TOOL
    }
    # each tool use's input, for results that echo it (its lines numbered, after an edit)
    inputs = {
        b.get("id"): b.get("input")
        for m in messages
        if isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("content"), list)
        for b in m["content"]
        if isinstance(b, dict) and b.get("type") == "tool_use"
    }
    stats["calls_so_far"] = sum(1 for m in messages if isinstance(m, dict) and m.get("role") == "assistant")
    new_messages: list[Any] = []
    changed = False
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), list)):
            new_messages.append(m)
            continue
        blocks: list[Any] = []
        mchanged = False
        for b in m["content"]:
            if isinstance(b, dict) and b.get("tool_use_id") in answered_by_us:
                blocks.append(b)  # an original we handed back on request: never shorten it again
                continue
            if isinstance(b, dict) and b.get("type") == "tool_result" and "content" in b:
                rewrite = functools.partial(
                    _rewrite,
                    opts=opts,
                    ctx=ctx,
                    settings=settings,
                    stats=stats,
                    newest=i == len(messages) - 1,
                    tool_input=inputs.get(b.get("tool_use_id")),
                )
                c = _map_texts(b["content"], rewrite)
                if c is not b["content"]:
                    b = {**b, "content": c}
                    mchanged = True
            blocks.append(b)
        if mchanged:
            m = {**m, "content": blocks}
            changed = True
        new_messages.append(m)
    stats.pop("calls_so_far")
    if stats:
        ctx.record(**stats)
    out = {**body, "messages": new_messages} if changed else body
    if settings.get("retrieval"):
        tools: list[Any] = out["tools"] if isinstance(out.get("tools"), list) else []
        if not any(isinstance(t, dict) and t.get("name") == RETRIEVE_TOOL for t in tools):
            out = {**out, "tools": [*tools, RETRIEVE_DEFINITION]}
    return out if out is not body else None


@hookimpl
def tokensaver_answer_tool_use(tool_use: dict[str, Any], ctx: Any) -> str | None:
    """The original output behind a ref, when the model calls ``tokensaver_retrieve``."""
    if tool_use.get("name") != RETRIEVE_TOOL:
        return None
    ref = str((tool_use.get("input") or {}).get("ref", ""))
    original = find_original(ref, ctx, _settings(ctx))
    ctx.record(retrieved=ref, found=original is not None)
    return original if original is not None else f"no original is kept under ref {ref!r}"


@hookimpl
def tokensaver_report_section(plugin: str, calls: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Per content kind: blocks rewritten and characters before/after, over the last call of each conversation."""
    # every turn resends earlier tool results; count each conversation once, at its largest call
    last: dict[str, dict[str, Any]] = {}
    for c in calls:
        n = (c.get("plugins") or {}).get(plugin)
        if not isinstance(n, dict) or not n.get("kinds"):
            continue
        conv = str(c.get("conversation") or c.get("id"))
        prev = last.get(conv)
        total = sum(k["chars_before"] for k in n["kinds"].values())
        if prev is None or total >= sum(k["chars_before"] for k in prev["kinds"].values()):
            last[conv] = n
    if not last:
        return None
    agg: dict[str, dict[str, int]] = {}
    lossy = 0
    for n in last.values():
        lossy += int(n.get("lossy_blocks", 0))
        for kind, k in n["kinds"].items():
            a = agg.setdefault(kind, {"blocks": 0, "chars_before": 0, "chars_after": 0})
            for f in a:
                a[f] += int(k.get(f, 0))
    rows: list[dict[str, Any]] = [
        {
            "kind": kind,
            "blocks": a["blocks"],
            "chars_before": a["chars_before"],
            "chars_after": a["chars_after"],
            "saved_pct": round(100 * (1 - a["chars_after"] / a["chars_before"]), 1)
            if a["chars_before"]
            else 0.0,
        }
        for kind, a in sorted(agg.items())
    ]
    before = sum(r["chars_before"] for r in rows)
    after = sum(r["chars_after"] for r in rows)
    return {
        "title": "summarize: large tool results rewritten by content type",
        "summary": f"{sum(r['blocks'] for r in rows)} tool results in {len(last)} conversation(s): "
        f"{before} → {after} chars ({lossy} with lossy elisions)",
        "rows": rows,
    }
