"""The emulator itself: scripted replies, recorded requests, one Messages API call in, one answer out.

:meth:`Emulator.handle` is independent of HTTP (usable in-process): it validates the request
(:mod:`~tokensaver.emulator.validation`), bills it on the prompt cache
(:mod:`~tokensaver.emulator.cache`, rules in :mod:`tokensaver.billing`) and answers as JSON or SSE;
:mod:`~tokensaver.emulator.server` serves it over HTTP.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import secrets
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from ..billing import Billing, CacheModel, apply_context_management
from ..model_rules import prefix_check_enforcement
from ..pricing import PriceTable
from ..sse import message_to_sse
from ..tokens import default_counter
from . import binding as _binding
from .binding import BINDING_BETA, BindingStore
from .cache import VirtualClock, WallClock, count_tokens
from .server import start_server, stop_server
from .threads import ThreadStore, ThreadTurn
from .validation import EmulatorError, invalid, validate

DEFAULT_REPLY = "This is a reply from the tokensaver emulator."


@dataclass
class RecordedRequest:
    """One request the emulator received (``rec.usage`` and ``rec["usage"]`` both work)."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    status: int = 0
    usage: dict[str, Any] | None = None
    response: dict[str, Any] | None = None
    stream: bool = False
    t: float = 0.0
    # a message-thread request as the API rebuilt it (the whole conversation, no ``thread``); else None
    expanded: dict[str, Any] | None = None

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)


Reply = Any  # str | list[dict] | dict | EmulatorError | Callable[[dict], Any]


class Emulator:
    """A local Messages API server with scripted replies and the API's prompt-cache billing."""

    def __init__(
        self,
        replies: Iterable[Reply] | None = None,
        virtual_clock: bool = False,
        start_time: float | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        strict_roles: bool = True,
        prices: PriceTable | None = None,
        default_reply: str = DEFAULT_REPLY,
        preserved_thinking: bool = True,
        legacy_account: bool = False,
        binding_max_bytes: int = _binding.DEFAULT_MAX_BYTES,
    ) -> None:
        """``preserved_thinking``: run the prefix check on thinking blocks sent back to the models that have it
        (:mod:`~tokensaver.emulator.binding`). ``legacy_account``: answer as an account created before
        2026-08-31, on which Claude Fable 5.1 / Opus 5.5 (and Sonnet / Haiku 5.5) let failing blocks through
        unless the request sets ``prefix_mismatch_behavior``. ``binding_max_bytes``: the bindings' memory cap."""
        self.host = host
        self.port = port
        self.strict_roles = strict_roles
        self.preserved_thinking = preserved_thinking
        self.legacy_account = legacy_account
        self.bindings = BindingStore(binding_max_bytes)
        self.prices = prices or PriceTable()
        self.default_reply = default_reply
        self.clock: WallClock | VirtualClock = VirtualClock(start_time) if virtual_clock else WallClock()
        self.replies: deque[Reply] = deque(replies or [])
        self.requests: list[RecordedRequest] = []
        self.cache = CacheModel(self.prices)
        self.threads = ThreadStore()
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle
    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("Emulator is not started")
        return f"http://{self.host}:{self._server.server_port}"

    def start(self) -> Emulator:
        if self._server is not None:
            return self
        self._server, self._thread = start_server(self, self.host, self.port)
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        stop_server(self._server, self._thread)
        self._server = None
        self._thread = None

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # scripting and state
    def reply(self, *items: Reply) -> Emulator:
        """Queue replies (text, content blocks, a message dict, an ``EmulatorError`` or a callable)."""
        with self._lock:
            self.replies.extend(items)
        return self

    def reset(self) -> None:
        """Forget requests, queued replies, the prompt cache and the message threads."""
        with self._lock:
            self.requests.clear()
            self.replies.clear()
            self.cache.clear()
            self.threads.clear()
            self.bindings.clear()

    def clear_cache(self) -> None:
        with self._lock:
            self.cache.clear()

    def cache_size(self) -> int:
        """Live (unexpired) cache entries."""
        return self.cache.size(self.clock.now())

    @property
    def last(self) -> RecordedRequest:
        return self.requests[-1]

    # request processing (independent of HTTP, so it is also usable in-process)
    def bill(self, body: dict[str, Any], now: float | None = None) -> Billing:
        """Prompt-cache accounting for a validated body; updates the cache."""
        now = self.clock.now() if now is None else now
        with self._lock:
            return self.cache.bill(body, now)

    def _next_reply(self, body: dict[str, Any]) -> Any:
        with self._lock:
            item = self.replies.popleft() if self.replies else self.default_reply
        if callable(item) and not isinstance(item, EmulatorError):
            item = item(body)
        return item

    def _build_message(self, item: Any, body: dict[str, Any], n: int, billing: Billing) -> dict[str, Any]:
        given: dict[str, Any] = {}
        if isinstance(item, str):
            content: list[dict[str, Any]] = [{"type": "text", "text": item}]
        elif isinstance(item, dict) and "content" in item and ("type" in item or "role" in item):
            given = item
            c = item["content"]
            content = [{"type": "text", "text": c}] if isinstance(c, str) else list(c)
        elif isinstance(item, dict):
            content = [item]
        elif isinstance(item, list):
            content = [{"type": "text", "text": b} if isinstance(b, str) else dict(b) for b in item]
        else:
            raise TypeError(f"unsupported emulator reply: {item!r}")
        for k, b in enumerate(content):
            if b.get("type") == "tool_use":
                b.setdefault("id", f"toolu_emu_{n}_{k}")
                b.setdefault("input", {})
            elif b.get("type") == "thinking":
                b.setdefault("signature", f"sig_emu_{n}_{k}_{secrets.token_urlsafe(12)}")
            elif b.get("type") == "redacted_thinking":
                b.setdefault("data", f"data_emu_{n}_{k}_{secrets.token_urlsafe(12)}")
        counter = default_counter()
        output = sum(counter.block(b) for b in content)
        has_tool = any(b.get("type") == "tool_use" for b in content)
        msg: dict[str, Any] = {
            "id": f"msg_emu_{n}",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": content,
            "stop_reason": "tool_use" if has_tool else "end_turn",
            "stop_sequence": None,
            "usage": billing.usage(output),
        }
        for key, v in given.items():
            if key == "content":
                continue
            if key == "usage" and isinstance(v, dict):
                msg["usage"] = {**msg["usage"], **v}
            else:
                msg[key] = v
        return msg

    def handle(
        self, method: str, path: str, headers: dict[str, str], raw: bytes
    ) -> tuple[int, dict[str, str], bytes | list[bytes]]:
        """Process one HTTP request; returns (status, headers, body or body chunks)."""
        n = next(self._ids)
        request_id = f"req_emu_{n:06d}"
        url = urlsplit(path)
        hdrs = {k.lower(): v for k, v in headers.items()}
        rec = RecordedRequest(method, path, _redact(hdrs), None)
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None
            rec.body = raw.decode("utf-8", "replace")
        else:
            rec.body = body
        clock_header = hdrs.get("x-emulator-time")
        now = self.clock.now()
        if clock_header:
            try:
                now = float(clock_header)
            except ValueError:
                pass
            else:
                if isinstance(self.clock, VirtualClock):
                    self.clock.set(now)
        rec.t = now
        out_headers = {"request-id": request_id, "anthropic-organization-id": "emulator"}
        with self._lock:
            self.requests.append(rec)
        try:
            if method != "POST" or url.path not in ("/v1/messages", "/v1/messages/count_tokens"):
                raise EmulatorError(404, "not_found_error", f"Not found: {method} {url.path}")
            if body is None and raw:
                raise invalid("There was an error parsing the body of your request as JSON")
            betas = _betas(hdrs)
            key = _account_key(hdrs)
            if url.path == "/v1/messages/count_tokens":
                validate(body, strict_roles=self.strict_roles, count_tokens=True, betas=betas)
                seen, _, _ = self._prefix_check(body, key, betas)
                return self._json(rec, 200, {"input_tokens": count_tokens(seen)}, out_headers)
            turn: ThreadTurn | None = None
            if isinstance(body, dict) and body.get("thread") is not None:
                turn = self.threads.begin(body, hdrs, now)
                rec.expanded = turn.full_body
            try:
                full = body if turn is None else turn.full_body
                validate(
                    full,
                    strict_roles=self.strict_roles,
                    resumes_turn=turn is not None and turn.resumes_pause,
                    betas=betas,
                )
                # preserved thinking: what the model sees once failing thinking blocks are dropped
                seen, report, bound = self._prefix_check(full, key, betas)
                # max_tokens 0 pre-warms the cache: billed input, no reply generated (none consumed)
                prewarm = full.get("max_tokens") == 0
                item = [] if prewarm else self._next_reply(seen)
                if isinstance(item, EmulatorError):
                    raise item
                edited, applied = apply_context_management(seen)
                with self._lock:
                    billing = self.bill(edited, now)
                    msg = self._build_message(item, body, n, billing)
                if prewarm:
                    msg["stop_reason"] = "max_tokens"
                if report is not None:
                    msg["input_transformations"] = report
                if bound is not None:
                    _binding.bind(self.bindings, key, bound[0], bound[1], msg, str(full["model"]))
                if turn is not None:
                    self.threads.commit(turn, msg, now)
            except BaseException:
                if turn is not None:
                    self.threads.abort(turn)
                raise
            if body.get("context_management") is not None:
                msg.setdefault("context_management", {"applied_edits": applied})
            rec.usage = msg["usage"]
            rec.response = msg
            if body.get("stream"):
                rec.status = 200
                rec.stream = True
                data = message_to_sse(msg)
                step = max(1, len(data) // 4 + 1)
                chunks = [data[i : i + step] for i in range(0, len(data), step)]
                return 200, {**out_headers, "content-type": "text/event-stream; charset=utf-8"}, chunks
            return self._json(rec, 200, msg, out_headers)
        except EmulatorError as e:
            error: dict[str, Any] = {"type": e.type, "message": e.message}
            if e.details:
                error["details"] = e.details
            err = {"type": "error", "error": error, "request_id": request_id}
            return self._json(rec, e.status, err, {**out_headers, **e.headers})

    def _prefix_check(
        self, body: dict[str, Any], key: str, betas: frozenset[str]
    ) -> tuple[dict[str, Any], list[dict[str, str]] | None, tuple[_binding.Scan, _binding.Verdict] | None]:
        """The preserved-thinking prefix check: (the body the model sees, ``input_transformations`` or None
        without the beta, what to bind once the request succeeds or None); raises the API's 400."""
        report: list[dict[str, str]] | None = [] if BINDING_BETA in betas else None
        if not self.preserved_thinking:
            return body, report, None
        model = str(body["model"])
        # the model check (every model, every account): blocks this model cannot read are dropped, no error
        unread = _binding.unreadable(self.bindings, key, body, model) if len(self.bindings) else []
        enforcement = prefix_check_enforcement(model)
        if enforcement is None:
            if unread:
                if report is not None:
                    report.extend(
                        _binding.transformations(unread, "thinking_dropped", "model_binding_mismatch")
                    )
                body = _binding.without(body, unread)
            return body, report, None
        sc = _binding.scan(body)
        for s in sc.slots:
            if not s.sig:  # an empty signature is no signature: always a 400, whatever the behaviour
                raise invalid(f"{s.path}: Invalid `signature` in `thinking` block")
        verdict = _binding.check(self.bindings, key, sc, frozenset((s.mi, s.bi) for s in unread))
        th = body.get("thinking")
        bb = th.get("block_binding") if isinstance(th, dict) else None
        behavior = bb.get("prefix_mismatch_behavior") if isinstance(bb, dict) else None
        if behavior is None:
            enforced = enforcement == "all_accounts" or not self.legacy_account
            behavior = "error" if enforced else "allow"
        if verdict.failed and behavior == "error":
            message = _binding.MISMATCH_MESSAGE.format(path=verdict.failed[0].path)
            if BINDING_BETA not in betas:
                message += _binding.NO_BETA_SUFFIX
            if verdict.reasons:
                message += " " + " ".join(verdict.reasons)
            raise invalid(message)
        entries = _binding.transformations(unread, "thinking_dropped", "model_binding_mismatch")
        dropped = list(unread)
        if verdict.failed:
            kind = "thinking_dropped" if behavior == "drop_block" else "thinking_mismatch_allowed"
            entries += _binding.transformations(verdict.failed, kind)
            if behavior == "drop_block":
                dropped += verdict.failed
        if report is not None:
            report.extend(sorted(entries, key=_entry_order))
        if dropped:
            body = _binding.without(body, dropped)
        return body, report, (sc, verdict)

    def _json(
        self, rec: RecordedRequest, status: int, payload: dict[str, Any], headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        rec.status = status
        if status != 200:
            rec.response = payload
        return status, {**headers, "content-type": "application/json"}, json.dumps(payload).encode()


def _entry_order(entry: dict[str, str]) -> tuple[int, int]:
    """``input_transformations`` come in request order: by ``messages.i.content.j``."""
    _, i, _, j = entry["path"].split(".")
    return int(i), int(j)


def _betas(headers: dict[str, str]) -> frozenset[str]:
    """The request's ``anthropic-beta`` values (comma separated, possibly over several headers)."""
    raw = headers.get("anthropic-beta") or ""
    return frozenset(v.strip() for v in raw.split(",") if v.strip())


def _account_key(headers: dict[str, str]) -> str:
    """Whose thinking blocks these are: a digest of the API key (bindings are per key)."""
    secret = headers.get("x-api-key") or headers.get("authorization") or ""
    return hashlib.sha256(secret.encode()).hexdigest()[:16]


def _redact(headers: dict[str, str]) -> dict[str, str]:
    out = dict(headers)
    for k in ("x-api-key", "authorization"):
        if k in out:
            out[k] = "REDACTED:" + hashlib.sha256(out[k].encode()).hexdigest()[:12]
    return out
