"""Model summaries for summarize: long unstructured prose condensed by a cheaper Claude model.

Opt-in (``model_summaries = true``): a summary can drop what the agent needed, and it costs a model
call. What qualifies: the text of a tool result that the deterministic rewrites left as prose (a
fetched page, a report, documentation; never code, JSON, logs, listings or grep output) of at least
``summary_min_tokens``, in the request's newest message, when the call's model is not the summary
model itself and the saving pays for the summary (see :func:`worth_it`).

Prefix stability: the decision about a block (its summary, or "keep as is") is made once, the first
time the block is new, and stored per content (memory, and a private disk store so a restarted
process gives the same bytes); later turns reuse it. A block first seen in an older message, or
whose summary failed, is sent as it is for good: summarizing it then would rewrite history the
prompt cache already holds. The summary call is ``ctx.call_model()``: it goes to the caller's API
with the caller's key, and its billed cost is charged to summarize's stage in the report.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from typing import Any

from tokensaver.errors import ModelCallError

from . import _store as stores

log = logging.getLogger("tokensaver.plugins.summarize")

PROMPT_VERSION = "1"
ENTRY_MAGIC = b"tssum1\n"
SYSTEM = (
    "You condense one tool output for an AI agent, which will read your version instead of the "
    "original and cannot see the original. Keep, exactly as written, every identifier, name, number, "
    "date, version, path, URL, quoted string, error message and code fragment the output contains "
    "that the agent could need. Drop repetition, boilerplate, navigation, legal text, and filler. "
    "Keep the original's order and headings where they help. Write plain text or Markdown, at most "
    "{words} words. Answer with the condensed text only: no preamble, no comment on the task."
)
SUMMARY_HEADER = "[tokensaver: condensed by {model} from {tokens} tokens; details may be missing]\n"
REFUSED = (400, 401, 403, 404)  # answers that will not change on a retry
MAX_FUTURE_CALLS = 20  # the calls still to come are estimated as the calls so far, capped (Lindy)


def _state(ctx: Any) -> dict[str, Any]:
    return ctx.shared_state(summaries=OrderedDict, summary_stores=dict, summary_lock=threading.Lock)  # type: ignore[no-any-return]


def entry_key(text: str, ctx: Any, settings: dict[str, Any]) -> str:
    """Per caller key, summary model and prompt version: one key's summaries never serve another."""
    h = hashlib.sha256()
    for part in (
        ctx.key_hash,
        settings["summary_model"],
        PROMPT_VERSION,
        str(settings["summary_words"]),
        text,
    ):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def disk_store(ctx: Any, settings: dict[str, Any]) -> stores.SharedStore | None:
    """summarize's store on the config's state (embedded: ``summary_dir``): model summaries and kept
    originals; None if unusable."""
    directory = settings.get("summary_dir") or stores.cache_dir("summaries")
    state = _state(ctx)
    with state["summary_lock"]:
        st = state["summary_stores"].get(directory)
        if st is None:
            try:
                st = stores.open_store(ctx, "summaries", directory, 256 * 1024**2, "summarize")
            except Exception as e:  # no disk store: decisions live in memory only
                log.warning("summarize: cannot open summary store %s: %s", directory, e)
                ctx.record(summary_store_error=f"{type(e).__name__}: {e}")
                st = False
            state["summary_stores"][directory] = st
        return st or None


def _remember(
    ctx: Any, settings: dict[str, Any], key: str, decision: dict[str, Any], *, persist: bool = True
) -> None:
    state = _state(ctx)
    with state["summary_lock"]:
        memo = state["summaries"]
        memo[key] = decision
        while len(memo) > settings["memo_entries"]:
            memo.popitem(last=False)
    store = disk_store(ctx, settings) if persist else None
    if store is not None:
        try:
            store.set(key, stores.encode_entry(ENTRY_MAGIC, key, decision, time.time()), None)
        except Exception as e:
            log.warning("summarize: cannot store a summary: %s: %s", type(e).__name__, e)


def known(text: str, ctx: Any, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The decision already made for this text (``{"summary": str | None}``), else None."""
    key = entry_key(text, ctx, settings)
    state = _state(ctx)
    with state["summary_lock"]:
        hit = state["summaries"].get(key)
    if hit is not None:
        return hit  # type: ignore[no-any-return]
    store = disk_store(ctx, settings)
    if store is None:
        return None
    decision, _, problem = store.read(ENTRY_MAGIC, key)
    if problem:
        ctx.record(summary_warning=problem)
    if decision is None:
        return None
    with state["summary_lock"]:
        state["summaries"][key] = decision
    return decision


def off(ctx: Any) -> str | None:
    """Why model summaries are off for this client (the API refused a summary request), else None."""
    why: str | None = _state(ctx).get("summaries_off")
    return why


def keep(text: str, ctx: Any, settings: dict[str, Any]) -> None:
    """Remember (in memory) that this text is sent as it is: a block already sent is never condensed."""
    _remember(ctx, settings, entry_key(text, ctx, settings), {"summary": None}, persist=False)


def worth_it(tokens: int, ctx: Any, settings: dict[str, Any], calls_so_far: int) -> bool:
    """Whether condensing ``tokens`` pays: the cache writes and reads it avoids vs the summary call.

    Saved: the tokens the summary removes (it aims at ``summary_words``), written once to the cache
    and read on each call still to come (estimated as the calls so far, at most 20). Paid: the
    summary model reading the text and writing the summary.
    """
    main = ctx.model
    small = ctx.prices.get(settings["summary_model"])
    out = min(tokens // 3, int(settings["summary_words"] * 1.4))
    future = max(1, min(calls_so_far, MAX_FUTURE_CALLS))
    saved = (tokens - out) * (main.cache_write_5m + main.cache_read * future)
    cost = (tokens + 300) * small.input + out * small.output
    return bool(saved >= settings["summary_payback"] * cost)


def summarize_text(text: str, tokens: int, ctx: Any, settings: dict[str, Any]) -> str | None:
    """Ask the summary model for a condensed version; store the decision. None: keep the text."""
    model = settings["summary_model"]
    words = settings["summary_words"]
    body = {
        "model": model,
        "max_tokens": max(256, int(words * 2)),
        "system": SYSTEM.format(words=words),
        "messages": [{"role": "user", "content": f"<tool_output>\n{text}\n</tool_output>"}],
        "thinking": {"type": "disabled"},
    }
    key = entry_key(text, ctx, settings)
    try:
        message = ctx.call_model(body)
    except ModelCallError as e:
        # not stored: the block is sent as it is now, and later turns keep it (it is no longer new)
        ctx.record(summary_error=str(e))
        if e.status in REFUSED:  # the request itself is wrong (model name, key, settings): stop asking
            _state(ctx)["summaries_off"] = f"HTTP {e.status}: {e}"
            log.warning("summarize: model summaries off for this client: %s", e)
        return None
    summary = "".join(
        b.get("text", "")
        for b in message.get("content") or []
        if isinstance(b, dict) and b.get("type") == "text"
    ).strip()
    usable = bool(summary) and message.get("stop_reason") in ("end_turn", "max_tokens")
    condensed = SUMMARY_HEADER.format(model=model, tokens=tokens) + summary if usable else None
    if condensed is not None and len(condensed) > 0.6 * len(text):
        condensed = None  # not worth a lossy rewrite
    _remember(ctx, settings, key, {"summary": condensed, "model": model, "tokens": tokens})
    return condensed
