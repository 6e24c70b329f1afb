"""The Messages API's request validation: where the API answers 400 ``invalid_request_error``.

:func:`validate` raises :class:`EmulatorError` with the API's own wording; the cache rules it checks
(breakpoints, TTLs, their order) come from :mod:`tokensaver.billing`. No I/O.
"""

from __future__ import annotations

import re
from typing import Any

from ..billing import MAX_BREAKPOINTS, THINKING_TYPES, TTL_SECONDS, prompt_blocks
from ..billing import breakpoints as _breakpoints
from ..model_rules import (  # re-exported: tokensaver.emulator names them
    model_version as model_version,
)
from ..model_rules import (
    refuses_budget_thinking as refuses_budget_thinking,
)
from ..model_rules import (
    refuses_prefill as refuses_prefill,
)
from ..model_rules import (
    refuses_sampling as refuses_sampling,
)
from ..model_rules import (
    refuses_temperature_with_top_p as refuses_temperature_with_top_p,
)
from ..model_rules import (
    supports_adaptive_thinking as supports_adaptive_thinking,
)
from .binding import BINDING_BETA

# the fields of a count_tokens request; a Messages request takes these and the rest below
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
ALLOWED_FIELDS = COUNT_TOKENS_FIELDS | {
    "max_tokens",
    "metadata",
    "stop_sequences",
    "stream",
    "temperature",
    "top_p",
    "top_k",
    "service_tier",
    "container",
    "inference_geo",
    # sent by SDK 2.14 clients (some on the beta surface only)
    "diagnostics",
    "billing_policy",
    "compaction",
    "fallbacks",
    "fallback_credit_token",
    "thread",
}
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")


class EmulatorError(Exception):
    """An API error response: scripted as a reply, or raised by validation (400)."""

    def __init__(
        self,
        status: int,
        type: str,
        message: str,
        headers: dict[str, str] | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{status} {type}: {message}")
        self.status = status
        self.type = type
        self.message = message
        self.headers = dict(headers or {})
        self.details = dict(details) if details else None  # ``error.details`` (``error_code`` ...)

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


def invalid(message: str) -> EmulatorError:
    return EmulatorError(400, "invalid_request_error", message)


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
        raise invalid(f"{where}.cache_control.type: Input should be 'ephemeral'")
    if "ttl" in cc and cc["ttl"] not in TTL_SECONDS:
        raise invalid(f"{where}.cache_control.ttl: Input should be '5m' or '1h'")
    extra = set(cc) - {"type", "ttl"}
    if extra:
        raise invalid(f"{where}.cache_control.{sorted(extra)[0]}: Extra inputs are not permitted")


def _thinking_enabled(body: dict[str, Any]) -> bool:
    th = body.get("thinking")
    return isinstance(th, dict) and th.get("type") in ("enabled", "adaptive")


def validate(
    body: Any,
    *,
    strict_roles: bool = True,
    count_tokens: bool = False,
    resumes_turn: bool = False,
    betas: frozenset[str] | None = None,
) -> None:
    """Raise ``EmulatorError(400, "invalid_request_error", ...)`` where the API would refuse ``body``.

    ``resumes_turn``: a thread continue that resumes a ``pause_turn`` reply, whose conversation ends with it.
    ``betas``: the request's ``anthropic-beta`` values, for fields only a beta admits (``None``: not checked).
    """
    if not isinstance(body, dict):
        raise invalid("Request body must be a JSON object")
    allowed = COUNT_TOKENS_FIELDS if count_tokens else ALLOWED_FIELDS
    required = ("model", "messages") if count_tokens else ("model", "max_tokens", "messages")
    for name in required:
        if name not in body:
            raise invalid(f"{name}: Field required")
    for name in body:
        if name not in allowed:
            raise invalid(f"{name}: Extra inputs are not permitted")
    model = body["model"]
    if not isinstance(model, str) or not model:
        raise invalid("model: Input should be a valid string")
    if not count_tokens:
        mt = body["max_tokens"]
        # 0 is allowed: it populates the prompt cache without generating a response (pre-warming)
        if not isinstance(mt, int) or isinstance(mt, bool) or mt < 0:
            raise invalid("max_tokens: Input should be greater than or equal to 0")
    messages = body["messages"]
    if not isinstance(messages, list):
        raise invalid("messages: Input should be a valid list")
    if not messages:
        raise invalid("messages: at least one message is required")

    _validate_sampling_and_thinking(body, model, count_tokens, betas)
    names = _validate_tools(body)
    _validate_messages(body, messages, model, strict_roles, resumes_turn, names)
    _validate_breakpoints(body)


def _validate_sampling_and_thinking(
    body: dict[str, Any], model: str, count_tokens: bool, betas: frozenset[str] | None = None
) -> None:
    th = body.get("thinking")
    if th is not None:
        _validate_thinking(body, th, model, count_tokens, betas)
    present = [p for p in ("temperature", "top_p", "top_k") if body.get(p) is not None]
    if present and refuses_sampling(model):
        raise invalid(f"`{present[0]}` is deprecated for this model.")
    if "temperature" in present and "top_p" in present and refuses_temperature_with_top_p(model):
        raise invalid(
            "`temperature` and `top_p` cannot both be specified for this model. Please use only one."
        )


def _validate_thinking(
    body: dict[str, Any], th: Any, model: str, count_tokens: bool, betas: frozenset[str] | None = None
) -> None:
    if not isinstance(th, dict) or th.get("type") not in ("enabled", "disabled", "adaptive"):
        raise invalid("thinking.type: Input should be 'enabled', 'disabled' or 'adaptive'")
    if "block_binding" in th:
        _validate_block_binding(th, betas)
    if th["type"] == "enabled":
        if refuses_budget_thinking(model):
            raise invalid(
                '"thinking.type.enabled" is not supported for this model. Use "thinking.type.adaptive" and '
                '"output_config.effort" to control thinking behavior.'
            )
        budget = th.get("budget_tokens")
        if not isinstance(budget, int) or isinstance(budget, bool):
            raise invalid("thinking.enabled.budget_tokens: Field required")
        if budget < 1024:
            raise invalid("thinking.enabled.budget_tokens: Input should be greater than or equal to 1024")
        if not count_tokens and budget >= body["max_tokens"]:
            raise invalid(
                "`max_tokens` must be greater than `thinking.budget_tokens`. Please consult our documentation "
                "at https://docs.claude.com/en/docs/build-with-claude/extended-thinking#max-tokens-and-context-window-size"
            )
    if th["type"] == "adaptive" and not supports_adaptive_thinking(model):
        raise invalid("adaptive thinking is not supported on this model")
    if th["type"] in ("enabled", "adaptive"):
        temp = body.get("temperature")
        if temp is not None and temp != 1:
            raise invalid(
                "`temperature` may only be set to 1 when thinking is enabled or in adaptive mode. Please consult "
                "our documentation at https://platform.claude.com/docs/en/build-with-claude/extended-thinking"
            )
        if body.get("top_k") is not None:
            raise invalid("`top_k` is not supported when thinking is enabled or in adaptive mode.")


def _validate_block_binding(th: dict[str, Any], betas: frozenset[str] | None) -> None:
    """``thinking.block_binding`` (preserved thinking): only with the thinking-binding-controls beta, only on
    ``enabled`` / ``adaptive``; ``null`` or ``{}`` means every default."""
    where = f"thinking.{th['type']}.block_binding"
    if th["type"] == "disabled" or (betas is not None and BINDING_BETA not in betas):
        raise invalid(f"{where}: Extra inputs are not permitted")
    bb = th["block_binding"]
    if bb is None:
        return
    if not isinstance(bb, dict):
        raise invalid(f"{where}: Input should be a valid dictionary or object")
    extra = set(bb) - {"prefix_mismatch_behavior"}
    if extra:
        raise invalid(f"{where}.{sorted(extra)[0]}: Extra inputs are not permitted")
    if bb.get("prefix_mismatch_behavior") not in (None, "error", "drop_block"):
        raise invalid(f"{where}.prefix_mismatch_behavior: Input should be 'error' or 'drop_block'")


def _validate_tools(body: dict[str, Any]) -> set[str]:
    tools = body.get("tools")
    names: set[str] = set()
    if tools is None:
        tools = []
    if not isinstance(tools, list):
        raise invalid("tools: Input should be a valid list")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise invalid(f"tools.{i}: Input should be a valid dictionary")
        name = tool.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise invalid(f"tools.{i}.custom.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'")
        if name in names:
            raise invalid(f"tools: Tool names must be unique. Duplicate name: {name!r}")
        names.add(name)
        if tool.get("type") in (None, "custom") and "input_schema" not in tool:
            raise invalid(f"tools.{i}.custom.input_schema: Field required")
        if "defer_loading" in tool:
            if not isinstance(tool["defer_loading"], bool):
                raise invalid(f"tools.{i}.custom.defer_loading: Input should be a valid boolean")
            if tool["defer_loading"] and tool.get("cache_control") is not None:
                raise invalid(
                    f"Tool '{name}' cannot have both defer_loading=true and cache_control set. "
                    "Tools with defer_loading cannot use prompt caching."
                )
    if tools and all(isinstance(t, dict) and t.get("defer_loading") is True for t in tools):
        raise invalid("At least one tool must have defer_loading=false. All tools cannot be deferred.")
    tc = body.get("tool_choice")
    if tc is not None:
        if not isinstance(tc, dict) or tc.get("type") not in ("auto", "any", "tool", "none"):
            raise invalid("tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'")
        if tc["type"] == "tool":
            if not isinstance(tc.get("name"), str):
                raise invalid("tool_choice.tool.name: Field required")
            if tc["name"] not in names:
                raise invalid(f"tool_choice.tool.name: Tool '{tc['name']}' not found in the provided `tools`")
        if tc["type"] in ("any", "tool") and not names:
            raise invalid("tool_choice: `tool_choice` may only be specified while providing tools.")
    return names


def _validate_messages(
    body: dict[str, Any],
    messages: list[Any],
    model: str,
    strict_roles: bool,
    resumes_turn: bool = False,
    tools: set[str] | None = None,
) -> None:
    seen_ids: set[str] = set()
    prev_role: str | None = None
    first_conv: int | None = None
    last_conv: int | None = None
    pending: tuple[int, list[str]] | None = None  # (assistant index, tool_use ids awaiting results)
    for mi, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise invalid(f"messages.{mi}: Input should be a valid dictionary")
        role = msg.get("role")
        if role not in ("user", "assistant", "system"):
            raise invalid(f"messages.{mi}.role: Input should be 'user', 'assistant' or 'system'")
        if "content" not in msg:
            raise invalid(f"messages.{mi}.content: Field required")
        # a mid-conversation system message may carry its own output settings (Claude Code 2.1.33x)
        allowed = {"role", "content", "output_config"} if role == "system" else {"role", "content"}
        extra = set(msg) - allowed
        if extra:
            raise invalid(f"messages.{mi}.{sorted(extra)[0]}: Extra inputs are not permitted")
        content = msg["content"]
        if content == "" or content == []:
            raise invalid(
                f"messages.{mi}: all messages must have non-empty content except for the optional final assistant message"
            )
        if not isinstance(content, str | list):
            raise invalid(f"messages.{mi}.content: Input should be a valid string or list")
        if isinstance(content, str) and not content.strip():
            raise invalid(f"messages.{mi}: text content blocks must contain non-whitespace text")
        blocks = content if isinstance(content, list) else []
        for bi, b in enumerate(blocks):
            _validate_block(f"messages.{mi}.content.{bi}", b, role, seen_ids, tools or set())
        if role == "system":
            continue
        if first_conv is None:
            first_conv = mi
            if role != "user":
                raise invalid('messages: first message must use the "user" role')
        if strict_roles and role == prev_role:
            raise invalid(
                f'messages: roles must alternate between "user" and "assistant", but found multiple "{role}" roles in a row'
            )
        kinds = [b.get("type") for b in blocks if isinstance(b, dict)]
        if role == "user":
            results = [b for b in blocks if isinstance(b, dict) and b.get("type") == "tool_result"]
            if results:
                first_other = next((i for i, k in enumerate(kinds) if k != "tool_result"), len(kinds))
                later = [i for i, k in enumerate(kinds) if k == "tool_result" and i > first_other]
                if later:
                    raise invalid(
                        f"messages.{mi}.content.{later[0]}: `tool_result` blocks must come first in the user "
                        "message content, before any other block"
                    )
            answered = {b.get("tool_use_id") for b in results}
            expected = set(pending[1]) if pending else set()
            if pending:
                missing = [i for i in pending[1] if i not in answered]
                if missing:
                    raise invalid(
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
                    raise invalid(
                        f"messages.{mi}.content.{bi}: unexpected `tool_use_id` found in `tool_result` blocks: "
                        f"{b.get('tool_use_id')}. Each `tool_result` block must have a corresponding `tool_use` "
                        "block in the previous message."
                    )
            pending = None
        else:
            if pending:
                raise invalid(
                    f"messages.{mi}: `tool_use` ids were found without `tool_result` blocks immediately after: "
                    f"{', '.join(pending[1])}. Each `tool_use` block must have a corresponding `tool_result` "
                    "block in the next message."
                )
            ids = [str(b.get("id")) for b in blocks if isinstance(b, dict) and b.get("type") == "tool_use"]
            pending = (mi, ids) if ids else None
        prev_role = role
        last_conv = mi
    if first_conv is None:
        raise invalid('messages: first message must use the "user" role')
    _check_loop_thinking(body, messages)
    if last_conv is not None and messages[last_conv]["role"] == "assistant" and not resumes_turn:
        if _thinking_enabled(body):
            raise invalid(
                "Assistant message prefill is not supported when thinking is enabled. "
                "The conversation must end with a user message."
            )
        if refuses_prefill(model):
            raise invalid(
                "This model does not support assistant message prefill. The conversation must end with a user message."
            )


def _check_loop_thinking(body: dict[str, Any], messages: list[Any]) -> None:
    """With manual thinking (``type: "enabled"``: every turn thinks) the API asks back the thinking of
    the tool loop going on: the last assistant turn before the closing tool results must start with
    a thinking block. Adaptive thinking, where a turn may not think, is not checked here."""
    th = body.get("thinking")
    if not isinstance(th, dict) or th.get("type") != "enabled":
        return
    last = messages[-1] if messages else None
    if not isinstance(last, dict) or last.get("role") != "user" or not isinstance(last.get("content"), list):
        return
    if not any(isinstance(b, dict) and b.get("type") == "tool_result" for b in last["content"]):
        return
    for mi in range(len(messages) - 2, -1, -1):
        m = messages[mi]
        if isinstance(m, dict) and m.get("role") == "assistant":
            blocks = m.get("content") if isinstance(m.get("content"), list) else []
            first = blocks[0].get("type") if blocks and isinstance(blocks[0], dict) else "text"
            if first not in THINKING_TYPES:
                raise invalid(
                    f"messages.{mi}.content.0.type: Expected `thinking` or `redacted_thinking`, but found "
                    f"`{first}`. When `thinking` is enabled, a final `assistant` message must start with a "
                    "thinking block (preceeding the lastmost set of `tool_use` and `tool_result` blocks). We "
                    "recommend you include thinking blocks from previous turns. To avoid this requirement, "
                    "disable `thinking`. Please consult our documentation at "
                    "https://docs.claude.com/en/docs/build-with-claude/extended-thinking"
                )
            return


def _check_reference(where: str, ref: dict[str, Any], tools: set[str]) -> None:
    """A ``tool_reference`` (client tool search result, server tool search result) names a tool of ``tools``."""
    name = ref.get("tool_name")
    if not isinstance(name, str):
        raise invalid(f"{where}.tool_name: Field required")
    if name not in tools:
        raise invalid(f"Tool reference '{name}' not found in available tools")


def _validate_block(where: str, b: Any, role: str, seen_ids: set[str], tools: set[str]) -> None:
    if not isinstance(b, dict) or not isinstance(b.get("type"), str):
        raise invalid(f"{where}.type: Field required")
    kind = b["type"]
    if "cache_control" in b:
        if kind in THINKING_TYPES:
            raise invalid(f"{where}.{kind}.cache_control: cache_control cannot be set on {kind} blocks")
        _check_cache_control(where, b["cache_control"])
    if kind == "text":
        problem = _text_problem(where, b)
        if problem:
            raise invalid(problem)
    elif kind == "tool_use":
        if role != "assistant":
            raise invalid(f"{where}: `tool_use` blocks may only appear in assistant messages")
        tid = b.get("id")
        if not isinstance(tid, str) or not tid:
            raise invalid(f"{where}.tool_use.id: Field required")
        if tid in seen_ids:
            raise invalid(f"{where}: `tool_use` ids must be unique; {tid} appears more than once")
        seen_ids.add(tid)
        if not isinstance(b.get("name"), str) or not isinstance(b.get("input", {}), dict):
            raise invalid(f"{where}.tool_use: `name` (string) and `input` (object) are required")
    elif kind == "tool_result":
        if role != "user":
            raise invalid(f"{where}: `tool_result` blocks may only appear in user messages")
        if not isinstance(b.get("tool_use_id"), str):
            raise invalid(f"{where}.tool_result.tool_use_id: Field required")
        inner = b.get("content")
        if isinstance(inner, list):
            for ii, ib in enumerate(inner):
                if isinstance(ib, dict) and ib.get("type") == "text":
                    problem = _text_problem(f"{where}.content.{ii}", ib)
                    if problem:
                        raise invalid(problem)
                elif isinstance(ib, dict) and ib.get("type") == "tool_reference":
                    _check_reference(f"{where}.content.{ii}", ib, tools)
    elif kind == "tool_search_tool_result":
        inner = b.get("content")
        refs = inner.get("tool_references") if isinstance(inner, dict) else None
        for ri, ref in enumerate(refs if isinstance(refs, list) else []):
            if isinstance(ref, dict):
                _check_reference(f"{where}.content.tool_references.{ri}", ref, tools)
    elif kind == "thinking":
        if not isinstance(b.get("thinking"), str) or not isinstance(b.get("signature"), str):
            raise invalid(f"{where}.thinking: `thinking` and `signature` are required")


def _validate_breakpoints(body: dict[str, Any]) -> None:
    for i, tool in enumerate(body.get("tools") or []):
        if "cache_control" in tool:
            _check_cache_control(f"tools.{i}", tool["cache_control"])
    system = body.get("system")
    if isinstance(system, list):
        for i, b in enumerate(system):
            if not isinstance(b, dict) or b.get("type") != "text":
                raise invalid(f"system.{i}.type: Input should be 'text'")
            problem = _text_problem(f"system.{i}", b)
            if problem:
                raise invalid(problem)
            if "cache_control" in b:
                _check_cache_control(f"system.{i}", b["cache_control"])
    elif system is not None and not isinstance(system, str):
        raise invalid("system: Input should be a valid string or list of text blocks")
    if body.get("cache_control") is not None:
        _check_cache_control("", body["cache_control"])
    bps = _breakpoints(body, prompt_blocks(body))
    if len(bps) > MAX_BREAKPOINTS:
        raise invalid(
            f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. Found {len(bps)}."
        )
    seen_5m = False
    for _, ttl in bps:
        if ttl == "5m":
            seen_5m = True
        elif seen_5m:
            raise invalid(
                "a ttl='1h' cache_control block must not come after a ttl='5m' cache_control block. "
                "Note that blocks are processed in the following order: `tools`, `system`, `messages`."
            )
