"""memoize: answer an identical request from a local store instead of paying for it again.

Saves the whole cost of a call whose request (model, system, messages, tools, every sampling and
output setting, beta flags) is byte-for-byte identical, after canonicalization, to one answered
within ``ttl``: re-run evaluations, retried pipelines, replayed agent loops, test suites.

Unsafe when the caller *wants* a fresh sample for an identical request (temperature > 0 used for
diversity, or answers that depend on the time of day): identical requests get the identical stored
answer for ``ttl`` seconds. A request opts out with the header ``x-tokensaver-memoize: off``
(``refresh`` skips the lookup but stores the new answer). Answers are namespaced by a hash of the
API key (``ctx.key_hash``): one key's answers never reach another, and the key itself is never
stored.
Answers live in the config's ``state``: the ``dir`` diskcache (embedded), or one Redis every
replica shares (``state = "redis://..."``; unreachable, it is a miss and the call goes upstream).

What is in the key and why:

- every body field except ``stream`` (a streamed and a non-streamed request share the answer: the
  core replays a stored Message as a stream when asked) and ``cache_control`` markers (they change
  what the call is billed, never what the model answers; a caching plugin that moves a breakpoint
  must not turn every call into a miss);
- the ``anthropic-beta`` and ``anthropic-version`` request headers (betas change behaviour and
  response shape); no other header (``x-stainless-*`` retry counters differ per attempt).

What is stored: only complete messages (``type: message``, ``stop_reason`` set, content a list),
never errors or cut-off streams, and never ``stop_reason: "refusal"`` (a refusal pinned for a day
would outlive whatever caused it; asking again is the caller's usual remedy). A plugin-tool
exchange (the core answers ``tokensaver_*`` tools, e.g. summarize's ``tokensaver_retrieve``) is
one caller request: what is stored under it is the message the caller was handed at the end (the
rounds joined, when streamed), never a round that calls a plugin's tool (the caller never offered
that tool), and a follow-up round's body (which the caller never sent) is neither looked up nor
stored under. The single-flight claim (below) covers the exchange's first round only: an identical
request sent during the follow-up rounds makes an exchange of its own. Each entry carries a
sha256 of its payload and the key it was stored under; an entry that fails either check is a miss
with a warning, and is deleted.

Concurrency: identical requests in flight in one wrapped client (or one proxy) make one upstream
call. The first claims the key for its call; the later ones wait (``wait`` seconds at most) for it
to finish, then read its answer. The claim ends with the call whatever its outcome (answered,
refused, cut off, timed out, the client gone): if the first fails, the others go to the network at
once. A call never waits on an event loop thread, nor on a call of its own requester (the same
asyncio task, or the same thread in sync code): that requester may be the one that still has to
read the first call's stream.
On a shared state (Redis), the first call of a process also claims the key for the fleet: an
identical call on another replica waits (``wait`` at most) for that replica's answer, polled from
the store, and goes upstream at once if that call ends without one or the state is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import threading
import time
import weakref
from typing import Any, cast

from tokensaver.context import requester
from tokensaver.hookspecs import hookimpl
from tokensaver.pipeline import calls_plugin_tool, is_follow_up
from tokensaver.settings import Schema, boolean, number, path, size
from tokensaver.tokens import canonical_json

from . import _store as stores
from ._store import CorruptEntry, SharedStore

log = logging.getLogger("tokensaver.plugins.memoize")

PLUGIN = "memoize"
OPT_OUT_HEADER = "x-tokensaver-memoize"
CACHE_HEADER = "x-tokensaver-cache"
KEY_HEADERS = ("anthropic-beta", "anthropic-version")
ENTRY_MAGIC = b"tsmemo1\n"
KEY_VERSION = "memoize-key/1"

SETTINGS = Schema(
    PLUGIN,
    {
        "dir": path(
            None,
            "the store's directory",
            optional=True,
            none_means="$TOKENSAVER_CACHE_DIR/memo or ~/.cache/tokensaver/memo",
        ),
        "size_limit": size(512 * 1024**2, "the store's size cap on disk"),
        "ttl": number(
            86_400.0,
            "seconds an answer is served",
            positive=True,
            unit="seconds",
            optional=True,
            none_means="never expire",
        ),
        "wait": number(
            120.0,
            "seconds an identical call waits for the one in flight instead of calling too",
            positive=True,
            unit="seconds",
        ),
        "store_refusals": boolean(False, "also store answers with stop_reason refusal"),
    },
    passthrough=("enabled",),
)
DEFAULTS: dict[str, Any] = SETTINGS.defaults()
# it never edits a body or block it is given or returned: the core hands it the call's own blocks
tokensaver_read_only = True


def default_dir() -> str:
    """``$TOKENSAVER_CACHE_DIR/memo``, else ``$XDG_CACHE_HOME/tokensaver/memo``, else ``~/.cache/tokensaver/memo``."""
    return stores.cache_dir("memo")


# -- configuration ----------------------------------------------------------------------------


@hookimpl
def tokensaver_configure(settings: dict[str, Any], source: str) -> dict[str, Any]:
    """The ``memoize`` table checked against ``SETTINGS``, defaults filled in (``dir``: :func:`default_dir`)."""
    out = SETTINGS.validate(settings, source)
    if out["dir"] is None:
        out["dir"] = default_dir()
    return out


# -- the key ----------------------------------------------------------------------------------


def _strip_cc(value: Any) -> Any:
    """Drop ``cache_control`` from content blocks and tool definitions (not from tool inputs)."""
    if isinstance(value, list):
        return [_strip_cc(v) for v in value]
    if isinstance(value, dict):
        return {k: (v if k == "input" else _strip_cc(v)) for k, v in value.items() if k != "cache_control"}
    return value


def canonical_request(body: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
    """What determines the answer: the body without ``stream``/``cache_control``, plus beta/version headers."""
    b = {k: v for k, v in body.items() if k not in ("stream", "cache_control")}
    for field in ("system", "messages", "tools"):
        if field in b:
            b[field] = _strip_cc(b[field])
    # a string system prompt and one text block say the same; keep them distinct (the API may not)
    hdrs = {k.lower(): v for k, v in (headers or {}).items()}
    h: dict[str, Any] = {}
    if hdrs.get("anthropic-beta"):
        h["anthropic-beta"] = sorted({p.strip() for p in hdrs["anthropic-beta"].split(",") if p.strip()})
    if hdrs.get("anthropic-version"):
        h["anthropic-version"] = hdrs["anthropic-version"].strip()
    return {"v": KEY_VERSION, "body": b, "headers": h}


def cache_key(body: dict[str, Any], headers: dict[str, str] | None, key_hash: str) -> str:
    """The store key: sha256 of the API-key namespace and the canonical request."""
    payload = canonical_json(canonical_request(body, headers))
    h = hashlib.sha256()
    h.update(f"ns:{key_hash}\n".encode())
    h.update(payload.encode())
    return f"{key_hash[:16]}:{h.hexdigest()}"


# -- entries ----------------------------------------------------------------------------------


def encode_entry(key: str, message: dict[str, Any], stored_at: float) -> bytes:
    """Entry bytes: magic, sha256 of the payload, then JSON of {key, stored_at, message}."""
    return stores.encode_entry(ENTRY_MAGIC, key, message, stored_at)


def decode_entry(key: str, raw: Any) -> tuple[dict[str, Any], float]:
    """The stored message and its store time; raise CorruptEntry on any mismatch."""
    msg, stored_at = stores.decode_entry(ENTRY_MAGIC, key, raw)
    _check_complete(msg)
    return msg, stored_at


def _check_complete(msg: dict[str, Any]) -> None:
    if not storable(msg, store_refusals=True):
        raise CorruptEntry("stored message is incomplete")


def storable(message: Any, *, store_refusals: bool = False) -> bool:
    """A complete assistant Message worth keeping (not an error, not cut off, not a refusal)."""
    if not isinstance(message, dict) or message.get("type") != "message":
        return False
    if message.get("role") != "assistant" or not isinstance(message.get("content"), list):
        return False
    reason = message.get("stop_reason")
    if reason is None:
        return False
    if reason == "refusal" and not store_refusals:
        return False
    return all(isinstance(b, dict) and b.get("type") for b in message["content"])


# -- the store --------------------------------------------------------------------------------


class _Flight:
    """One call's claim on a key: who made it (its requester), and an event set when the call is over."""

    __slots__ = ("event", "requester", "call_id", "started")

    def __init__(self, call_id: str) -> None:
        self.event = threading.Event()
        self.requester = requester()
        self.call_id = call_id
        self.started = time.monotonic()


def _shared(ctx: Any) -> dict[str, Any]:
    """This plugin's state: the open store and the in-flight table (created once, under a lock)."""
    return ctx.shared_state(lock=threading.Lock, inflight=dict, stores=dict)  # type: ignore[no-any-return]


def _store(ctx: Any) -> SharedStore | None:
    state = _shared(ctx)
    s = _settings(ctx)
    d = s["dir"]
    with state["lock"]:
        st = state["stores"].get(d)
        if st is None:
            try:
                st = stores.open_store(ctx, "memo", d, s["size_limit"], "memoize")  # the config's state
            except Exception as e:  # an unusable cache dir disables memoize, it never breaks the call
                log.warning("memoize disabled: cannot open %s: %s", d, e)
                ctx.record(error=f"cannot open store: {type(e).__name__}: {e}")
                state["stores"][d] = False
                return None
            state["stores"][d] = st
        return st or None


def _settings(ctx: Any) -> dict[str, Any]:
    s = ctx.settings
    if not s or "dir" not in s:
        s = tokensaver_configure(dict(s or {}), "defaults")
    return cast("dict[str, Any]", s)


def _mode(ctx: Any) -> str:
    v = (ctx.headers or {}).get(OPT_OUT_HEADER, "").strip().lower()
    if v in ("off", "0", "false", "no", "bypass"):
        return "off"
    if v == "refresh":
        return "refresh"
    return "on"


def _on_loop_thread() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _release(inflight: dict[str, _Flight], lock: threading.Lock, key: str, flight: _Flight) -> None:
    with lock:
        if inflight.get(key) is flight:
            del inflight[key]
    flight.event.set()


def _read(ctx: Any, store: SharedStore, key: str, settings: dict[str, Any]) -> dict[str, Any] | None:
    msg, stored_at, problem = store.read(ENTRY_MAGIC, key, _check_complete)
    if problem:
        ctx.record(warning=problem)
    if msg is None:
        return None
    ttl = settings["ttl"]
    if ttl is not None and ctx.now - stored_at > ttl:
        return None
    return msg


# -- hooks ------------------------------------------------------------------------------------


@hookimpl
def tokensaver_lookup_response(body: dict[str, Any], ctx: Any) -> dict[str, Any] | None:
    """Return the stored answer to an identical request, waiting on an identical one in flight."""
    mode = _mode(ctx)
    if mode == "off":
        ctx.response_headers[CACHE_HEADER] = "off"
        ctx.record(mode="off")
        return None
    if is_follow_up(body):  # a round of ours inside the caller's call, which already missed
        ctx.response_headers[CACHE_HEADER] = "refresh" if mode == "refresh" else "miss"
        ctx.record(follow_up=True, mode=mode)
        return None
    settings = _settings(ctx)
    store = _store(ctx)
    if store is None:
        return None
    key = cache_key(body, ctx.headers, ctx.key_hash)
    state = _shared(ctx)
    if mode == "on":
        hit = _read(ctx, store, key, settings)
        if hit is None:
            hit = _single_flight(ctx, state, store, key, settings)
        if hit is not None:
            return _serve(ctx, hit)
    else:
        _claim(ctx, state, key)
    ctx.response_headers[CACHE_HEADER] = "refresh" if mode == "refresh" else "miss"
    ctx.record(hit=False, mode=mode)
    return None


def _claim(ctx: Any, state: dict[str, Any], key: str) -> _Flight | None:
    """Become the one call for ``key`` in flight; return the flight already there otherwise."""
    with state["lock"]:
        current: _Flight | None = state["inflight"].get(key)
        if current is not None and time.monotonic() - current.started < _settings(ctx)["wait"]:
            return current
        flight = _Flight(str(getattr(ctx, "call_id", "")))
        state["inflight"][key] = flight
    _remember_claim(ctx, key, flight)
    release = functools.partial(_release, state["inflight"], state["lock"], key, flight)
    at_end = getattr(ctx, "at_end", None)
    if callable(at_end):
        at_end(release)  # the call is over, whatever the outcome: the claim goes with it
    # a call nobody records (a door that died mid-call): released when its context is collected
    try:
        weakref.finalize(ctx, release)
    except TypeError:  # a context that cannot be weak-referenced: waiters rely on the timeout
        pass
    return None


def _remember_claim(ctx: Any, key: str, flight: _Flight) -> None:
    # kept on the call's own context so observe releases exactly the claim this call made
    if hasattr(ctx, "__dict__"):
        ctx.__dict__.setdefault("_memoize_claims", {})[key] = flight


def _single_flight(
    ctx: Any, state: dict[str, Any], store: SharedStore, key: str, settings: dict[str, Any]
) -> dict[str, Any] | None:
    other = _claim(ctx, state, key)
    if other is None:  # the first here; on a shared state, maybe not of the fleet
        # (read once more: a call that missed just before the answer was stored may claim just after
        # its flight ended; it is then served, not sent again)
        again = _read(ctx, store, key, settings)
        if again is not None:
            return again
        return stores.fleet_flight(
            ctx, store, key, settings["wait"], lambda: _read(ctx, store, key, settings)
        )
    if other.requester is requester() or _on_loop_thread():
        # blocking here would stall the very task, thread or loop that must finish the first call
        ctx.record(single_flight="skipped: same requester or event loop")
        return None
    remaining = max(0.0, settings["wait"] - (time.monotonic() - other.started))
    waiting = getattr(ctx, "waiting", None)  # the core does not cut a bounded wait short
    with waiting(remaining) if callable(waiting) else contextlib.nullcontext():
        finished = other.event.wait(remaining)
    hit = _read(ctx, store, key, settings)
    ctx.record(single_flight="waited" if finished else "timed out")
    return hit


def _serve(ctx: Any, message: dict[str, Any]) -> dict[str, Any]:
    ctx.response_headers[CACHE_HEADER] = "hit"
    ctx.record(
        hit=True,
        model=message.get("model"),
        usage=message.get("usage") or {},
        stop_reason=message.get("stop_reason"),
    )
    # a fresh copy: the caller may mutate what it gets
    fresh: dict[str, Any] = json.loads(json.dumps(message))
    return fresh


@hookimpl
def tokensaver_observe_response(body: dict[str, Any], response: dict[str, Any], ctx: Any) -> None:
    """Store the caller's answer under its request's key and wake identical calls waiting on it.

    On the last round of a plugin-tool exchange, the answer is the one the door says the caller got,
    stored under the exchange's first body; its other rounds store nothing.
    """
    if _mode(ctx) == "off":
        return
    settings = _settings(ctx)
    key = cache_key(body, ctx.headers, ctx.key_hash)  # this round's claim, released below
    try:
        request, answer = getattr(ctx, "exchange_request", None), getattr(ctx, "exchange_answer", None)
        if isinstance(request, dict) and isinstance(answer, dict):
            store_key, message = cache_key(request, ctx.headers, ctx.key_hash), answer
        elif is_follow_up(body):
            ctx.record(stored=False, reason="a follow-up round of a plugin-tool exchange")
            return
        else:
            store_key, message = key, response
        if calls_plugin_tool(message):
            ctx.record(stored=False, reason="calls a plugin's tool: not what the caller is handed")
            return
        if not storable(message, store_refusals=settings["store_refusals"]):
            ctx.record(stored=False, reason=f"not storable (stop_reason={message.get('stop_reason')!r})")
            return
        store = _store(ctx)
        if store is None:
            return
        try:
            if store.set(store_key, encode_entry(store_key, message, ctx.now), settings["ttl"]):
                ctx.record(stored=True)
            else:
                ctx.record(stored=False, reason="state lost" if store.lost else "larger than size_limit")
        except Exception as e:
            log.warning("memoize could not store an answer: %s: %s", type(e).__name__, e)
            ctx.record(stored=False, reason=f"store failed: {type(e).__name__}")
    finally:
        state = _shared(ctx)
        claims = getattr(ctx, "__dict__", {}).get("_memoize_claims", {})
        flight = claims.pop(key, None)
        if flight is not None:
            _release(state["inflight"], state["lock"], key, flight)


@hookimpl
def tokensaver_report_section(plugin: str, calls: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Hits, misses, stores and the dollars the hits avoided."""
    notes: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for c in calls:
        n = (c.get("plugins") or {}).get(plugin)
        if isinstance(n, dict) and n:
            notes.append((c, n))
    if not notes:
        return None
    hits = [(c, n) for c, n in notes if n.get("hit")]
    misses = sum(1 for _, n in notes if n.get("hit") is False)
    stored = sum(1 for _, n in notes if n.get("stored"))
    lost = sum(1 for _, n in notes if str(n.get("warning", "")).startswith("state lost"))
    warnings = sum(1 for _, n in notes if n.get("warning") or n.get("error")) - lost
    saved = sum(float(c.get("saved_usd") or 0.0) for c, _ in hits)
    rows = [
        {
            "call": c.get("id"),
            "model": n.get("model") or c.get("model"),
            "input_tokens": (n.get("usage") or {}).get("input_tokens", 0),
            "output_tokens": (n.get("usage") or {}).get("output_tokens", 0),
            "saved_usd": round(float(c.get("saved_usd") or 0.0), 6),
        }
        for c, n in hits
    ]
    summary = f"{len(hits)} hit(s), {misses} miss(es), {stored} answer(s) stored; hits avoided ${saved:.4f}"
    if warnings:
        summary += f"; {warnings} unreadable/corrupt entr(y/ies) treated as misses"
    if lost:
        summary += f"; state lost on {lost} call(s): the shared store was unreachable, the API answered"
    return {
        "title": "memoize: identical requests answered from the local store",
        "summary": summary,
        "rows": rows,
    }
