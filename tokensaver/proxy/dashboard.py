"""The proxy's live page: each session's calls, billed cost, honest saving and per-stage figures.

``GET /`` on the proxy's own address serves one self-contained page (inline CSS and script, nothing
loaded from anywhere else); the page asks ``GET /_tokensaver/sessions.json`` for fresh figures every
second, so it follows an agent while it works. Every path under ``/_tokensaver/`` is answered here and
never forwarded; ``/`` is not a Messages route, and every other path is forwarded as before.

The figures are the run ledger's, computed and formatted by :mod:`tokensaver.report` (``summarize``,
its formatters, ``auto_line``): the same numbers ``tokensaver report`` prints for that run, labelled
billed or estimated the same way. A session whose ledger was not written (``record = false``) shows
the proxy's in-memory records. Sessions the proxy no longer keeps open (over ``MAX_SESSIONS``) leave
the page; their ledgers stay.

Unsafe: the page shows run names, models, token counts and dollars of every session, never request
text or keys (the ledger holds neither). It is behind the proxy's access token when there is one: a
browser asks for it (HTTP Basic, any user name, the token as the password).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hmac
import ipaddress
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..pipeline import Pipeline
from .wire import api_error

if TYPE_CHECKING:
    import jinja2

    from .app import TokensaverProxy

PREFIX = "/_tokensaver/"  # reserved: answered by the proxy itself, never forwarded
FEED = PREFIX + "sessions.json"
SCHEMA = "tokensaver-dashboard/1"
POLL_MS = 1000
RECENT_CALLS = 10  # the last calls of each session listed on the page
CALL_COLUMNS = ["call", "model", "tokens before -> after [est.]", "cost [billed]", "saved"]


@functools.cache
def _environment() -> jinja2.Environment:
    # tokensaver.report and jinja2 are imported on the page's first request: the proxy starts without them
    from ..report.render import template_environment

    return template_environment("tokensaver.proxy", autoescape=True)


def _template() -> jinja2.Template:
    return _environment().get_template("dashboard.html.j2")


def _figures(t: dict[str, Any], cache: dict[str, Any], latency: dict[str, Any]) -> list[dict[str, Any]]:
    """The headline figures of a summary, as label, billed/estimated tag and shown value."""
    from ..report import auto_line, fmt_int, fmt_ms, fmt_pct, fmt_rate, fmt_usd

    saved = fmt_usd(t["saved_usd"]) + (f" ({fmt_pct(t['saved_pct'])})" if t["saved_pct"] is not None else "")
    return [
        {
            "k": "calls",
            "label": "calls",
            "tag": None,
            "value": fmt_int(t["calls"]),
            "detail": f"{t['short_circuited']} short-circuited, {t['api_errors']} API errors",
        },
        {"k": "cost", "label": "cost", "tag": "billed", "value": fmt_usd(t["cost_usd"]), "detail": ""},
        {
            "k": "counterfactual",
            "label": "without tokensaver",
            "tag": "est",
            "value": fmt_usd(t["counterfactual_usd"]),
            "detail": "",
        },
        {
            "k": "saved",
            "label": "saved",
            "tag": None,
            "value": saved,
            "detail": "cost without tokensaver - cost",
        },
        {
            "k": "auto",
            "label": "with automatic caching alone",
            "tag": "est",
            "value": fmt_usd(t["auto_usd"]),
            "detail": auto_line(t),
        },
        {
            "k": "tokens",
            "label": "tokens before -> after",
            "tag": "est",
            "value": f"{fmt_int(t['tokens_original'])} -> {fmt_int(t['tokens_sent'])}",
            "detail": f"-{fmt_int(t['tokens_saved'])}",
        },
        {
            "k": "hit_rate",
            "label": "cache hit rate",
            "tag": "billed",
            "value": fmt_rate(cache["hit_rate"]),
            "detail": "",
        },
        {
            "k": "overhead",
            "label": "pipeline overhead p50 / p95",
            "tag": None,
            "value": f"{fmt_ms(latency['overhead_p50_ms'])} / {fmt_ms(latency['overhead_p95_ms'])}",
            "detail": "",
        },
    ]


def _call_cells(c: dict[str, Any]) -> list[str]:
    from ..report import fmt_int, fmt_usd

    return [
        str(c["id"]),
        str(c["model"] or ""),
        f"{fmt_int(c['tokens_original'])} -> {fmt_int(c['tokens_sent'])}",
        "short-circuited" if c["short_circuit"] else fmt_usd(c["cost_usd"]),
        fmt_usd(c["saved_usd"]),
    ]


def view(name: str, created: Any, records: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's part of the feed: the report's totals and stages, and the same figures as shown."""
    from ..report import fmt_time, summarize
    from ..report.formatting import cells
    from ..report.render import STAGE_CELLS

    data = summarize(records)
    t = data["totals"]
    times = [r["t"] for r in records if isinstance(r.get("t"), int | float)]
    last = max(times) if times else None
    return {
        "run": name,
        "created": created,
        "created_shown": fmt_time(created),
        "last_call": last,
        "last_call_shown": fmt_time(last),
        "totals": t,
        "cache": data["cache"],
        "stages": data["stages"],
        "figures": _figures(t, data["cache"], data["latency"]),
        "stage_rows": [cells(s, STAGE_CELLS) for s in data["stages"]],
        "recent_rows": [_call_cells(c) for c in data["calls"][-RECENT_CALLS:]][::-1],
    }


class Dashboard:
    """The page and its feed for one proxy: sessions read from their ledgers, summaries kept per file state."""

    def __init__(self, proxy: TokensaverProxy) -> None:
        self.proxy = proxy
        # per ledger file (or in-memory run): its state when read, its records, its view
        self._cache: dict[str, tuple[Any, list[dict[str, Any]], dict[str, Any]]] = {}
        self._all: tuple[tuple[Any, ...], dict[str, Any]] = ((None,), {})
        self._last: dict[str, Any] | None = None  # the latest feed, and until when it is served as is
        self._quiet_until = 0.0
        self._lock = threading.Lock()

    def install(self, app: web.Application) -> None:
        """Add ``GET /`` and the reserved prefix to ``app`` (before its catch-all forwarder)."""
        app.router.add_get("/", self.page)
        app.router.add_route("*", PREFIX + "{tail:.*}", self.reserved)

    # data ----------------------------------------------------------------------------------------

    def _session(
        self, name: str | None, pipe: Pipeline
    ) -> tuple[str, Any, list[dict[str, Any]], dict[str, Any]] | None:
        """(cache key, file state, records, view) of a pipeline's run; None when it has no calls yet."""
        run = pipe.run
        if run is None:  # not persisted: this process's records are all there is
            records = list(pipe.records)
            if not records:
                return None
            key, state = f"memory:{id(pipe)}", (len(records), id(records[-1]))
        else:
            try:
                st = os.stat(run.path)
            except OSError:
                return None  # no call recorded yet
            key, state = str(run.path), (st.st_size, st.st_mtime_ns)
        with self._lock:
            kept = self._cache.get(key)
        if kept is not None and kept[0] == state:
            return key, state, kept[1], kept[2]
        if run is None:
            shown = view(f"{name or 'default run'} (not recorded)", None, records)
        else:
            records = run.records()
            if not records:
                return None
            shown = view(run.name, run.meta.get("created"), records)
        with self._lock:
            self._cache[key] = (state, records, shown)
        return key, state, records, shown

    def feed(self) -> dict[str, Any]:
        """Everything the page shows: every open session (latest call first) and all of them together.

        Reading and summing a ledger is linear in its calls (about 0.1 ms a call): after a read that
        took long, the same figures are served for nine times as long, so a page kept open on long
        sessions costs the proxy at most a tenth of a core. The figures say when they were read.
        """
        from .. import report  # noqa: F401  (imported before the clock starts: the first read is not slow)

        with self._lock:
            if self._last is not None and time.monotonic() < self._quiet_until:
                return self._last
        started = time.monotonic()
        data = self._read()
        with self._lock:
            self._last, self._quiet_until = data, time.monotonic() + 9 * (time.monotonic() - started)
        return data

    def _read(self) -> dict[str, Any]:
        from ..report import BILLED_NOTE, ESTIMATED_NOTE, fmt_time
        from ..report.render import STAGE_HEADERS

        sessions = [s for s in (self._session(n, p) for n, p in self.proxy.sessions.named()) if s is not None]
        sessions.sort(key=lambda s: s[3]["last_call"] or 0, reverse=True)
        states = tuple((key, state) for key, state, _, _ in sessions)
        with self._lock:
            # sessions the proxy closed leave the page, and their records this cache
            for key in set(self._cache) - {key for key, _ in states}:
                del self._cache[key]
            everything = self._all if self._all[0] == states else None
        if everything is None:
            if len(sessions) == 1:  # the same records: the same figures
                one = {**sessions[0][3], "run": "all sessions", "created": None, "created_shown": "n/a"}
                everything = (states, one)
            else:
                everything = (states, view("all sessions", None, [r for s in sessions for r in s[2]]))
            with self._lock:
                self._all = everything
        now = time.time()
        return {
            "schema": SCHEMA,
            "updated": now,
            "updated_shown": fmt_time(now),
            "poll_ms": POLL_MS,
            "notes": {"billed": BILLED_NOTE, "estimated": ESTIMATED_NOTE},
            "stage_columns": STAGE_HEADERS,
            "call_columns": CALL_COLUMNS,
            "all": everything[1],
            "sessions": [s[3] for s in sessions],
        }

    # handlers ------------------------------------------------------------------------------------

    def _refusal(self, request: web.Request) -> web.Response | None:
        """Why ``request`` may not see the page (a response), or None when it may.

        Without a token the proxy serves loopback only, and the page answers only to a loopback
        ``Host``: a web page whose name was made to resolve to 127.0.0.1 (DNS rebinding) cannot
        read it. With a token: the proxy's access check, or the token as an HTTP Basic password
        (what a browser can send).
        """
        token = self.proxy.token
        if token is None:
            if _loopback_host(request.host):
                return None
            return web.Response(
                status=403,
                text="tokensaver proxy: this page answers at a loopback address only (127.0.0.1, localhost)\n",
            )
        password = _basic_password(request)
        if self.proxy._authorized(request) or (
            password is not None and hmac.compare_digest(password.encode(), token.encode())
        ):
            return None
        return web.Response(
            status=401,
            text="tokensaver proxy: this page needs the proxy's access token (as the password)\n",
            headers={"WWW-Authenticate": 'Basic realm="tokensaver proxy", charset="UTF-8"'},
        )

    def allowed(self, request: web.Request) -> bool:
        """Whether ``request`` may read what the proxy serves about itself (this page, its feed, metrics)."""
        return self._refusal(request) is None

    _allowed = allowed  # the name the /metrics route was first written against

    async def page(self, request: web.Request) -> web.StreamResponse:
        """``GET /``: the page, with the figures of now (it fetches the next ones itself)."""
        refused = self._refusal(request)
        if refused is not None:
            return refused
        html = await asyncio.to_thread(lambda: _template().render(data=self.feed(), feed=FEED))
        return web.Response(
            text=html, content_type="text/html", headers={**_NO_STORE, "Content-Security-Policy": CSP}
        )

    async def reserved(self, request: web.Request) -> web.StreamResponse:
        """Every path under ``/_tokensaver/``: the feed on ``GET``, otherwise 404 or 405, never forwarded."""
        refused = self._refusal(request)
        if refused is not None:
            return refused
        if request.path != FEED:
            return api_error(404, "not_found_error", f"tokensaver proxy: nothing at {request.path[:200]!r}")
        if request.method not in ("GET", "HEAD"):
            return api_error(405, "invalid_request_error", f"tokensaver proxy: {FEED} answers GET only")
        data = await asyncio.to_thread(self.feed)
        return web.json_response(data, headers=_NO_STORE)


def _loopback_host(host: str) -> bool:
    """Whether a ``Host`` header names a loopback address (``localhost``, ``127.0.0.1:8787``, ``[::1]``)."""
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or "]:" in host else host
    name = name.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _basic_password(request: web.Request) -> str | None:
    """The password of an HTTP Basic ``Authorization`` header, None without a readable one."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        return base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
    except (binascii.Error, UnicodeDecodeError):
        return None


# nothing but the page's own script, styles and feed: no other origin, no frames, no forms
CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
    "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_NO_STORE = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
