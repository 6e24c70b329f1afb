"""summarize: shrink large tool results by what they are (JSON, logs, grep, listings, HTML, blobs).

Saves the tokens of bulky tool output that agents resend on every later turn. Results under
``min_chars`` (default 400) are left alone. Lossless rewrites come first (ANSI codes, progress redraws, trailing
whitespace, compact JSON and record tables, grep hits and context lines grouped by file, repeated
ls -l columns; by ``shapes``: go test runs without the step lines of tests that report a result,
GitHub Actions logs with job, step and date once per run of lines, git diffs without the file lines
their ``diff --git`` line implies);
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

import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from tokensaver.errors import ConfigError
from tokensaver.hookspecs import hookimpl
from tokensaver.tokens import canonical_json

from . import _model_summary
from ._store import encode_entry
from ._summarize_text import SHAPE_NAMES, Options, Result, is_prose, shrink

log = logging.getLogger("tokensaver.plugins.summarize")

DEFAULTS: dict[str, Any] = {
    **asdict(Options()),
    "keep_originals": False,
    "retrieval": False,
    "memo_entries": 20_000,
    # opt-in: long prose condensed by a cheaper model (see _model_summary)
    "model_summaries": False,
    "summary_model": "claude-haiku-5-5",
    "summary_min_tokens": 2000,
    "summary_words": 400,
    "summary_payback": 2.0,
    "summary_dir": None,  # None: $TOKENSAVER_CACHE_DIR/summaries or ~/.cache/tokensaver/summaries
}
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
_INTS = {f.name for f in fields(Options) if f.type in ("int", int)} | {
    "memo_entries",
    "summary_min_tokens",
    "summary_words",
}
_BOOLS = {f.name for f in fields(Options) if f.type in ("bool", bool)} | {
    "keep_originals",
    "retrieval",
    "model_summaries",
}


@hookimpl
def tokensaver_configure(settings: dict[str, Any], source: str) -> dict[str, Any]:
    """Validate ``[summarize]``: thresholds (ints > 0), ``lossy``/``html``/``keep_originals`` (booleans)."""
    settings = dict(settings or {})
    for k in sorted(settings):
        if k == "enabled":
            continue
        if k not in DEFAULTS:
            raise ConfigError(
                f"unknown summarize setting {k!r}; accepted: {', '.join(sorted(DEFAULTS))}",
                key=k,
                source=source,
            )
        v = settings[k]
        if k in _BOOLS and not isinstance(v, bool):
            raise ConfigError(f"summarize.{k} must be true or false; got {v!r}", key=k, source=source)
        if k in _INTS and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise ConfigError(f"summarize.{k} must be a positive integer; got {v!r}", key=k, source=source)
        if k == "summary_model" and not (isinstance(v, str) and v.strip()):
            raise ConfigError(
                f"summarize.summary_model must be a model name; got {v!r}", key=k, source=source
            )
        if k == "summary_payback" and (
            isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.1 <= v <= 100
        ):
            raise ConfigError(
                f"summarize.summary_payback must be a number between 0.1 and 100; got {v!r}",
                key=k,
                source=source,
            )
        if k == "line_numbers" and v not in ("compact", "keep"):
            raise ConfigError(
                f'summarize.line_numbers must be "compact" or "keep"; got {v!r}', key=k, source=source
            )
        if k == "shapes" and not (
            isinstance(v, (list, tuple)) and all(isinstance(x, str) and x in SHAPE_NAMES for x in v)
        ):
            raise ConfigError(
                f"summarize.shapes must be a list of {', '.join(SHAPE_NAMES)}; got {v!r}",
                key=k,
                source=source,
            )
        if k == "summary_dir" and v is not None and not (isinstance(v, str) and v.strip()):
            raise ConfigError(
                f"summarize.summary_dir must be a directory path; got {v!r}", key=k, source=source
            )
    out = {**DEFAULTS, **settings}
    out["shapes"] = tuple(out["shapes"])
    if out["summary_dir"]:
        out["summary_dir"] = str(Path(out["summary_dir"]).expanduser())
    if out["min_run"] < 3:
        raise ConfigError("summarize.min_run must be at least 3", key="min_run", source=source)
    if out["head_lines"] + out["tail_lines"] > out["max_lines"]:
        raise ConfigError(
            "summarize.head_lines + tail_lines must not exceed max_lines", key="max_lines", source=source
        )
    return out


def _settings(ctx: Any) -> dict[str, Any]:
    """This stage's settings, normalized (defaults when a hook is called directly)."""
    s = ctx.settings
    return s if s and "min_chars" in s else tokensaver_configure(s, "defaults")


def options(settings: dict[str, Any] | None) -> Options:
    """The text-transform options from a (normalized or partial) settings table."""
    s = {**DEFAULTS, **(settings or {})}
    s["shapes"] = tuple(s["shapes"])
    return Options(**{f.name: s[f.name] for f in fields(Options)})


def _memo(ctx: Any) -> OrderedDict[str, Result]:
    state = ctx.shared_state(memo=OrderedDict, lock=threading.Lock)
    return state["memo"]  # type: ignore[no-any-return]


def shrink_cached(text: str, opts: Options, ctx: Any, limit: int) -> Result:
    """``shrink`` memoized per content hash and options in the plugin state (same input, same bytes)."""
    if len(text) < opts.min_chars:
        return Result(text, "small", False)
    memo = _memo(ctx)
    key = hashlib.sha256((canonical_json(asdict(opts)) + "\0" + text).encode()).hexdigest()
    lock = ctx.state["lock"]
    with lock:
        hit = memo.get(key)
        if hit is not None:
            memo.move_to_end(key)
            return hit
    res = shrink(text, opts)
    with lock:
        memo[key] = res
        while len(memo) > limit:
            memo.popitem(last=False)
    return res


def _rewrite(
    text: str, opts: Options, ctx: Any, settings: dict[str, Any], stats: dict[str, Any], newest: bool
) -> str:
    """One tool-output text as it is sent: shrunk by content type, then perhaps condensed by a model."""
    res = shrink_cached(text, opts, ctx, settings.get("memo_entries", DEFAULTS["memo_entries"]))
    # about 2 characters a token at the least: a cheap test before counting
    if settings.get("model_summaries") and len(res.text) >= 2 * settings["summary_min_tokens"]:
        condensed = _condensed(res, ctx, settings, stats, newest)
        if condensed is not None:
            res = Result(condensed, "model_summary", True)
    _tally(stats, text, res, ctx, settings)
    return _with_ref(res, text, ctx, settings) if res.text != text else text


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


def _shrink_content(
    content: Any, opts: Options, ctx: Any, settings: dict[str, Any], stats: dict[str, Any], newest: bool
) -> Any:
    """The tool_result's content with its text shrunk, or the same object when nothing changed."""
    if isinstance(content, str):
        return _rewrite(content, opts, ctx, settings, stats, newest)
    if isinstance(content, list):
        new: list[Any] = []
        changed = False
        for b in content:
            if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str):
                text = _rewrite(b["text"], opts, ctx, settings, stats, newest)
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
                c = _shrink_content(b["content"], opts, ctx, settings, stats, i == len(messages) - 1)
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
