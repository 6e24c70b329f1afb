"""An offline stand-in for the Anthropic Messages API: validation, prompt-cache billing, SSE, a clock.

``with Emulator() as emu: anthropic.Anthropic(base_url=emu.url, api_key="x")``. Every module measures
its savings against the usage this server bills, so its prompt-cache billing follows the API's rules.
Those rules (blocks, level settings, breakpoints, lookback, TTLs, minimum cacheable length, automatic
caching, context-management edits) live in :mod:`tokensaver.billing`, the one implementation shared
with the pipeline's counterfactual; this module adds validation, replies, SSE and the HTTP server.

The emulator imports only ``tokensaver.billing``, ``tokensaver.tokens``, ``tokensaver.pricing`` and ``tokensaver.sse``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from tokensaver.billing import (
    CLEARED_PLACEHOLDER,
    LOOKBACK,
    MAX_BREAKPOINTS,
    THINKING_TYPES,
    TTL_SECONDS,
    Billing,
    CacheModel,
    PromptBlock,
    apply_context_management,
    level_salts,
    prefix_hashes,
    prompt_blocks,
)
from tokensaver.billing import breakpoints as _breakpoints
from tokensaver.pricing import PriceTable
from tokensaver.sse import message_to_sse
from tokensaver.tokens import default_counter

__all__ = [
    "CLEARED_PLACEHOLDER",
    "LOOKBACK",
    "TTL_SECONDS",
    "Emulator",
    "EmulatorError",
    "PromptBlock",
    "RecordedRequest",
    "VirtualClock",
    "WallClock",
    "apply_context_management",
    "prompt_blocks",
    "serve",
]

DEFAULT_REPLY = "This is a reply from the tokensaver emulator."
DEFAULT_START = 1_700_000_000.0
# the names this module used before the rules moved to tokensaver.billing
_Billing = Billing
_prefix_hashes = prefix_hashes
_level_salts = level_salts

ALLOWED_FIELDS = frozenset(
    {
        "model",
        "max_tokens",
        "messages",
        "system",
        "tools",
        "tool_choice",
        "metadata",
        "stop_sequences",
        "stream",
        "temperature",
        "top_p",
        "top_k",
        "thinking",
        "service_tier",
        "container",
        "mcp_servers",
        "context_management",
        "output_config",
        "output_format",
        "cache_control",
        "speed",
        "inference_geo",
        # sent by SDK 2.14 clients (some on the beta surface only)
        "diagnostics",
        "billing_policy",
        "compaction",
        "fallbacks",
        "fallback_credit_token",
        "thread",
    }
)
COUNT_TOKENS_FIELDS = frozenset(
    {
        "model",
        "messages",
        "system",
        "tools",
        "tool_choice",
        "thinking",
        "mcp_servers",
        "context_management",
        "output_config",
        "output_format",
        "cache_control",
        "speed",
    }
)
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")


# --- public helpers --------------------------------------------------------------------------------


class EmulatorError(Exception):
    """An API error response: scripted as a reply, or raised by validation (400)."""

    def __init__(
        self,
        status: int,
        type: str,
        message: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status} {type}: {message}")
        self.status = status
        self.type = type
        self.message = message
        self.headers = dict(headers or {})

    @classmethod
    def overloaded(cls, retry_after: float | None = None) -> EmulatorError:
        """529 ``overloaded_error`` (optionally with a ``retry-after`` header)."""
        headers = {"retry-after": str(retry_after)} if retry_after is not None else {}
        return cls(529, "overloaded_error", "Overloaded", headers)

    @classmethod
    def rate_limited(cls, retry_after: float | None = None) -> EmulatorError:
        """429 ``rate_limit_error``."""
        headers = {"retry-after": str(retry_after)} if retry_after is not None else {}
        return cls(429, "rate_limit_error", "Number of request tokens has exceeded your rate limit.", headers)


def _invalid(message: str) -> EmulatorError:
    return EmulatorError(400, "invalid_request_error", message)


class WallClock:
    """Real time."""

    def now(self) -> float:
        return time.time()


class VirtualClock:
    """A clock that only moves when told to (``set`` / ``advance``), so TTL tests never wait."""

    def __init__(self, start: float | None = None) -> None:
        self._t = float(DEFAULT_START if start is None else start)
        self._lock = threading.Lock()

    def now(self) -> float:
        return self._t

    def set(self, t: float) -> None:
        with self._lock:
            self._t = float(t)

    def advance(self, seconds: float) -> float:
        with self._lock:
            self._t += float(seconds)
            return self._t


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

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)


Reply = Any  # str | list[dict] | dict | EmulatorError | Callable[[dict], Any]


# --- model facts -----------------------------------------------------------------------------------

_MODEL_RE = re.compile(
    r"claude-(?:(?P<fam>[a-z]+)-(?P<maj>\d+)(?:-(?P<min>\d{1,2}))?|(?P<omaj>\d+)(?:-(?P<omin>\d))?-(?P<ofam>[a-z]+))"
)


def model_version(model: str) -> tuple[str, int, int]:
    """(family, major, minor) of a Claude model id; ("", 0, 0) when it does not parse."""
    m = _MODEL_RE.search(model.lower())
    if not m:
        return ("", 0, 0)
    if m.group("fam"):
        return (m.group("fam"), int(m.group("maj")), int(m.group("min") or 0))
    return (m.group("ofam"), int(m.group("omaj")), int(m.group("omin") or 0))


def refuses_prefill(model: str) -> bool:
    fam, major, minor = model_version(model)
    return major >= 5 or (fam == "opus" and (major, minor) >= (4, 6))


def refuses_sampling(model: str) -> bool:
    fam, major, minor = model_version(model)
    return major >= 5 or (fam == "opus" and (major, minor) >= (4, 7))


def refuses_temperature_with_top_p(model: str) -> bool:
    _, major, minor = model_version(model)
    return (major, minor) in ((4, 5), (4, 6))


# --- validation -------------------------------------------------------------------------------------


def _text_problem(where: str, block: dict[str, Any]) -> str | None:
    text = block.get("text")
    if not isinstance(text, str):
        return f"{where}.text: Field required"
    if block.get("cache_control") and not text.strip():
        return f"{where}.text: cache_control cannot be set for empty text blocks"
    if not text:
        return f"{where}: text content blocks must be non-empty"
    if not text.strip():
        return f"{where}: text content blocks must contain non-whitespace text"
    return None


def _check_cache_control(where: str, cc: Any) -> None:
    if not isinstance(cc, dict) or cc.get("type") != "ephemeral":
        raise _invalid(f"{where}.cache_control.type: Input should be 'ephemeral'")
    if "ttl" in cc and cc["ttl"] not in TTL_SECONDS:
        raise _invalid(f"{where}.cache_control.ttl: Input should be '5m' or '1h'")
    extra = set(cc) - {"type", "ttl"}
    if extra:
        raise _invalid(f"{where}.cache_control.{sorted(extra)[0]}: Extra inputs are not permitted")


def _thinking_enabled(body: dict[str, Any]) -> bool:
    th = body.get("thinking")
    return isinstance(th, dict) and th.get("type") in ("enabled", "adaptive")


def validate(body: Any, *, strict_roles: bool = True, count_tokens: bool = False) -> None:
    """Raise ``EmulatorError(400, "invalid_request_error", ...)`` where the API would refuse ``body``."""
    if not isinstance(body, dict):
        raise _invalid("Request body must be a JSON object")
    allowed = COUNT_TOKENS_FIELDS if count_tokens else ALLOWED_FIELDS
    required = ("model", "messages") if count_tokens else ("model", "max_tokens", "messages")
    for name in required:
        if name not in body:
            raise _invalid(f"{name}: Field required")
    for name in body:
        if name not in allowed:
            raise _invalid(f"{name}: Extra inputs are not permitted")
    model = body["model"]
    if not isinstance(model, str) or not model:
        raise _invalid("model: Input should be a valid string")
    if not count_tokens:
        mt = body["max_tokens"]
        if not isinstance(mt, int) or isinstance(mt, bool) or mt < 1:
            raise _invalid("max_tokens: Input should be greater than or equal to 1")
    messages = body["messages"]
    if not isinstance(messages, list):
        raise _invalid("messages: Input should be a valid list")
    if not messages:
        raise _invalid("messages: at least one message is required")

    _validate_sampling_and_thinking(body, model, count_tokens)
    _validate_tools(body)
    _validate_messages(body, messages, model, strict_roles)
    _validate_breakpoints(body)


def _validate_sampling_and_thinking(body: dict[str, Any], model: str, count_tokens: bool) -> None:
    present = [p for p in ("temperature", "top_p", "top_k") if body.get(p) is not None]
    if present and refuses_sampling(model):
        raise _invalid(f"`{present[0]}` is not supported for this model; remove it from the request.")
    if "temperature" in present and "top_p" in present and refuses_temperature_with_top_p(model):
        raise _invalid(
            "`temperature` and `top_p` cannot both be specified for this model. Please use only one."
        )
    th = body.get("thinking")
    if th is None:
        return
    if not isinstance(th, dict) or th.get("type") not in ("enabled", "disabled", "adaptive"):
        raise _invalid("thinking.type: Input should be 'enabled', 'disabled' or 'adaptive'")
    if th["type"] == "enabled":
        budget = th.get("budget_tokens")
        if not isinstance(budget, int) or isinstance(budget, bool):
            raise _invalid("thinking.enabled.budget_tokens: Field required")
        if budget < 1024:
            raise _invalid("thinking.enabled.budget_tokens: Input should be greater than or equal to 1024")
        if not count_tokens and budget >= body["max_tokens"]:
            raise _invalid(
                "`max_tokens` must be greater than `thinking.budget_tokens`. Please consult our documentation "
                "at https://docs.claude.com/en/docs/build-with-claude/extended-thinking#max-tokens-and-context-window-size"
            )
    if th["type"] in ("enabled", "adaptive"):
        temp = body.get("temperature")
        if temp is not None and temp != 1:
            raise _invalid("`temperature` may only be set to 1 when thinking is enabled or in adaptive mode.")
        if body.get("top_k") is not None:
            raise _invalid("`top_k` is not supported when thinking is enabled or in adaptive mode.")


def _validate_tools(body: dict[str, Any]) -> set[str]:
    tools = body.get("tools")
    names: set[str] = set()
    if tools is None:
        tools = []
    if not isinstance(tools, list):
        raise _invalid("tools: Input should be a valid list")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise _invalid(f"tools.{i}: Input should be a valid dictionary")
        name = tool.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise _invalid(f"tools.{i}.custom.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'")
        if name in names:
            raise _invalid(f"tools: Tool names must be unique. Duplicate name: {name!r}")
        names.add(name)
        if tool.get("type") in (None, "custom") and "input_schema" not in tool:
            raise _invalid(f"tools.{i}.custom.input_schema: Field required")
    tc = body.get("tool_choice")
    if tc is not None:
        if not isinstance(tc, dict) or tc.get("type") not in ("auto", "any", "tool", "none"):
            raise _invalid("tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'")
        if tc["type"] == "tool":
            if not isinstance(tc.get("name"), str):
                raise _invalid("tool_choice.tool.name: Field required")
            if tc["name"] not in names:
                raise _invalid(
                    f"tool_choice.tool.name: Tool '{tc['name']}' not found in the provided `tools`"
                )
        if tc["type"] in ("any", "tool") and not names:
            raise _invalid("tool_choice: `tool_choice` may only be specified while providing tools.")
    return names


def _validate_messages(body: dict[str, Any], messages: list[Any], model: str, strict_roles: bool) -> None:
    seen_ids: set[str] = set()
    prev_role: str | None = None
    first_conv: int | None = None
    last_conv: int | None = None
    pending: tuple[int, list[str]] | None = None  # (assistant index, tool_use ids awaiting results)
    for mi, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise _invalid(f"messages.{mi}: Input should be a valid dictionary")
        role = msg.get("role")
        if role not in ("user", "assistant", "system"):
            raise _invalid(f"messages.{mi}.role: Input should be 'user', 'assistant' or 'system'")
        if "content" not in msg:
            raise _invalid(f"messages.{mi}.content: Field required")
        # a mid-conversation system message may carry its own output settings (Claude Code 2.1.33x)
        allowed = {"role", "content", "output_config"} if role == "system" else {"role", "content"}
        extra = set(msg) - allowed
        if extra:
            raise _invalid(f"messages.{mi}.{sorted(extra)[0]}: Extra inputs are not permitted")
        content = msg["content"]
        if content == "" or content == []:
            raise _invalid(
                f"messages.{mi}: all messages must have non-empty content except for the optional final assistant message"
            )
        if not isinstance(content, str | list):
            raise _invalid(f"messages.{mi}.content: Input should be a valid string or list")
        if isinstance(content, str) and not content.strip():
            raise _invalid(f"messages.{mi}: text content blocks must contain non-whitespace text")
        blocks = content if isinstance(content, list) else []
        for bi, b in enumerate(blocks):
            _validate_block(f"messages.{mi}.content.{bi}", b, role, seen_ids)
        if role == "system":
            continue
        if first_conv is None:
            first_conv = mi
            if role != "user":
                raise _invalid('messages: first message must use the "user" role')
        if strict_roles and role == prev_role:
            raise _invalid(
                f'messages: roles must alternate between "user" and "assistant", but found multiple "{role}" roles in a row'
            )
        kinds = [b.get("type") for b in blocks if isinstance(b, dict)]
        if role == "user":
            results = [b for b in blocks if isinstance(b, dict) and b.get("type") == "tool_result"]
            if results:
                first_other = next((i for i, k in enumerate(kinds) if k != "tool_result"), len(kinds))
                later = [i for i, k in enumerate(kinds) if k == "tool_result" and i > first_other]
                if later:
                    raise _invalid(
                        f"messages.{mi}.content.{later[0]}: `tool_result` blocks must come first in the user "
                        "message content, before any other block"
                    )
            answered = {b.get("tool_use_id") for b in results}
            expected = set(pending[1]) if pending else set()
            if pending:
                missing = [i for i in pending[1] if i not in answered]
                if missing:
                    raise _invalid(
                        f"messages.{mi}: `tool_use` ids were found without `tool_result` blocks immediately after: "
                        f"{', '.join(missing)}. Each `tool_use` block must have a corresponding `tool_result` block "
                        "in the next message."
                    )
            for bi, b in enumerate(blocks):
                if (
                    isinstance(b, dict)
                    and b.get("type") == "tool_result"
                    and b.get("tool_use_id") not in expected
                ):
                    raise _invalid(
                        f"messages.{mi}.content.{bi}: unexpected `tool_use_id` found in `tool_result` blocks: "
                        f"{b.get('tool_use_id')}. Each `tool_result` block must have a corresponding `tool_use` "
                        "block in the previous message."
                    )
            pending = None
        else:
            if pending:
                raise _invalid(
                    f"messages.{mi}: `tool_use` ids were found without `tool_result` blocks immediately after: "
                    f"{', '.join(pending[1])}. Each `tool_use` block must have a corresponding `tool_result` "
                    "block in the next message."
                )
            ids = [str(b.get("id")) for b in blocks if isinstance(b, dict) and b.get("type") == "tool_use"]
            pending = (mi, ids) if ids else None
        prev_role = role
        last_conv = mi
    if first_conv is None:
        raise _invalid('messages: first message must use the "user" role')
    if last_conv is not None and messages[last_conv]["role"] == "assistant":
        if _thinking_enabled(body):
            raise _invalid(
                "Assistant message prefill is not supported when thinking is enabled. "
                "The conversation must end with a user message."
            )
        if refuses_prefill(model):
            raise _invalid(
                "This model does not support assistant message prefill. The conversation must end with a user message."
            )


def _validate_block(where: str, b: Any, role: str, seen_ids: set[str]) -> None:
    if not isinstance(b, dict) or not isinstance(b.get("type"), str):
        raise _invalid(f"{where}.type: Field required")
    kind = b["type"]
    if "cache_control" in b:
        if kind in THINKING_TYPES:
            raise _invalid(f"{where}.{kind}.cache_control: cache_control cannot be set on {kind} blocks")
        _check_cache_control(where, b["cache_control"])
    if kind == "text":
        problem = _text_problem(where, b)
        if problem:
            raise _invalid(problem)
    elif kind == "tool_use":
        if role != "assistant":
            raise _invalid(f"{where}: `tool_use` blocks may only appear in assistant messages")
        tid = b.get("id")
        if not isinstance(tid, str) or not tid:
            raise _invalid(f"{where}.tool_use.id: Field required")
        if tid in seen_ids:
            raise _invalid(f"{where}: `tool_use` ids must be unique; {tid} appears more than once")
        seen_ids.add(tid)
        if not isinstance(b.get("name"), str) or not isinstance(b.get("input", {}), dict):
            raise _invalid(f"{where}.tool_use: `name` (string) and `input` (object) are required")
    elif kind == "tool_result":
        if role != "user":
            raise _invalid(f"{where}: `tool_result` blocks may only appear in user messages")
        if not isinstance(b.get("tool_use_id"), str):
            raise _invalid(f"{where}.tool_result.tool_use_id: Field required")
        inner = b.get("content")
        if isinstance(inner, list):
            for ii, ib in enumerate(inner):
                if isinstance(ib, dict) and ib.get("type") == "text":
                    problem = _text_problem(f"{where}.content.{ii}", ib)
                    if problem:
                        raise _invalid(problem)
    elif kind == "thinking":
        if not isinstance(b.get("thinking"), str) or not isinstance(b.get("signature"), str):
            raise _invalid(f"{where}.thinking: `thinking` and `signature` are required")


def _validate_breakpoints(body: dict[str, Any]) -> None:
    for i, tool in enumerate(body.get("tools") or []):
        if "cache_control" in tool:
            _check_cache_control(f"tools.{i}", tool["cache_control"])
    system = body.get("system")
    if isinstance(system, list):
        for i, b in enumerate(system):
            if not isinstance(b, dict) or b.get("type") != "text":
                raise _invalid(f"system.{i}.type: Input should be 'text'")
            problem = _text_problem(f"system.{i}", b)
            if problem:
                raise _invalid(problem)
            if "cache_control" in b:
                _check_cache_control(f"system.{i}", b["cache_control"])
    elif system is not None and not isinstance(system, str):
        raise _invalid("system: Input should be a valid string or list of text blocks")
    if body.get("cache_control") is not None:
        _check_cache_control("", body["cache_control"])
    bps = _breakpoints(body, prompt_blocks(body))
    if len(bps) > MAX_BREAKPOINTS:
        raise _invalid(
            f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. Found {len(bps)}."
        )
    seen_5m = False
    for _, ttl in bps:
        if ttl == "5m":
            seen_5m = True
        elif seen_5m:
            raise _invalid(
                "a ttl='1h' cache_control block must not come after a ttl='5m' cache_control block. "
                "Note that blocks are processed in the following order: `tools`, `system`, `messages`."
            )


# --- the emulator --------------------------------------------------------------------------------------


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
    ) -> None:
        self.host = host
        self.port = port
        self.strict_roles = strict_roles
        self.prices = prices or PriceTable()
        self.default_reply = default_reply
        self.clock: WallClock | VirtualClock = VirtualClock(start_time) if virtual_clock else WallClock()
        self.replies: deque[Reply] = deque(replies or [])
        self.requests: list[RecordedRequest] = []
        self.cache = CacheModel(self.prices)
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
        self._server = _Server((self.host, self.port), _Handler)
        self._server.emulator = self
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.02},
            name="tokensaver-emulator",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
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
        """Forget requests, queued replies and the prompt cache."""
        with self._lock:
            self.requests.clear()
            self.replies.clear()
            self.cache.clear()

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
                raise _invalid("There was an error parsing the body of your request as JSON")
            if url.path == "/v1/messages/count_tokens":
                validate(body, strict_roles=self.strict_roles, count_tokens=True)
                edited, _ = apply_context_management(body)
                total = sum(b.tokens for b in prompt_blocks(edited))
                return self._json(rec, 200, {"input_tokens": total}, out_headers)
            validate(body, strict_roles=self.strict_roles)
            item = self._next_reply(body)
            if isinstance(item, EmulatorError):
                raise item
            edited, applied = apply_context_management(body)
            with self._lock:
                billing = self.bill(edited, now)
                msg = self._build_message(item, body, n, billing)
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
            err = {"type": "error", "error": {"type": e.type, "message": e.message}, "request_id": request_id}
            return self._json(rec, e.status, err, {**out_headers, **e.headers})

    def _json(
        self, rec: RecordedRequest, status: int, payload: dict[str, Any], headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        rec.status = status
        if status != 200:
            rec.response = payload
        return status, {**headers, "content-type": "application/json"}, json.dumps(payload).encode()


def _redact(headers: dict[str, str]) -> dict[str, str]:
    out = dict(headers)
    for k in ("x-api-key", "authorization"):
        if k in out:
            out[k] = "REDACTED:" + hashlib.sha256(out[k].encode()).hexdigest()[:12]
    return out


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    emulator: Emulator


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # small responses would otherwise wait ~40 ms each for Nagle + delayed ACK
    disable_nagle_algorithm = True
    server: _Server

    def _serve(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        status, headers, payload = self.server.emulator.handle(
            self.command, self.path, dict(self.headers), raw
        )
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if isinstance(payload, bytes):
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        else:
            self.send_header("transfer-encoding", "chunked")
            self.send_header("cache-control", "no-cache")
            self.end_headers()
            for chunk in payload:
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    do_POST = _serve
    do_GET = _serve
    do_PUT = _serve
    do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve(host: str = "127.0.0.1", port: int = 8787, **kwargs: Any) -> None:
    """Run an emulator in the foreground until interrupted (``tokensaver emulator --port N``)."""
    emu = Emulator(host=host, port=port, **kwargs).start()
    print(f"tokensaver emulator listening on {emu.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        emu.stop()
