"""Every request the emulator refuses, sent with the real anthropic SDK over HTTP."""

from __future__ import annotations

import copy
from typing import Any

import anthropic
import pytest

from tokensaver.emulator import Emulator

U = {"role": "user", "content": "hello"}
A = {"role": "assistant", "content": "hi there"}
CC = {"type": "ephemeral"}
TOOL = {"name": "get_weather", "description": "w", "input_schema": {"type": "object", "properties": {}}}


def base(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "claude-sonnet-4-6", "max_tokens": 64, "messages": [U]}
    body.update(over)
    return body


def tool_turn(tid: str = "toolu_1") -> list[dict[str, Any]]:
    return [
        U,
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": tid, "name": "get_weather", "input": {}}],
        },
    ]


def result(tid: str, text: str = "sunny") -> dict[str, Any]:
    return {"type": "tool_result", "tool_use_id": tid, "content": text}


DEFERRED = {"name": "glob", "description": "g", "input_schema": {"type": "object"}, "defer_loading": True}


def loaded(name: str) -> list[dict[str, Any]]:
    """A client tool search (get_weather standing in for it) whose result loads ``name``."""
    return [
        *tool_turn(),
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_1",
                    "content": [{"type": "tool_reference", "tool_name": name}],
                }
            ],
        },
    ]


def drop(key: str) -> dict[str, Any]:
    b = base()
    del b[key]
    return b


REJECTED: list[tuple[str, dict[str, Any], str]] = [
    ("missing model", drop("model"), "model: Field required"),
    ("missing max_tokens", drop("max_tokens"), "max_tokens: Field required"),
    ("missing messages", drop("messages"), "messages: Field required"),
    ("unknown field", base(frobnicate=1), "frobnicate: Extra inputs are not permitted"),
    ("empty messages", base(messages=[]), "at least one message"),
    ("first not user", base(messages=[A, U]), 'first message must use the "user" role'),
    ("two users", base(messages=[U, U]), 'multiple "user" roles in a row'),
    ("two assistants", base(messages=[U, A, A, U]), 'multiple "assistant" roles in a row'),
    ("bad role", base(messages=[{"role": "tool", "content": "x"}]), "messages.0.role"),
    ("empty string content", base(messages=[{"role": "user", "content": ""}]), "non-empty content"),
    ("empty list content", base(messages=[{"role": "user", "content": []}]), "non-empty content"),
    (
        "empty text block",
        base(messages=[{"role": "user", "content": [{"type": "text", "text": ""}]}]),
        "text content blocks must be non-empty",
    ),
    (
        "whitespace text block",
        base(messages=[{"role": "user", "content": [{"type": "text", "text": "  \n"}]}]),
        "non-whitespace text",
    ),
    (
        "tool_use unanswered",
        base(tools=[TOOL], messages=[*tool_turn(), U]),
        "`tool_use` ids were found without `tool_result` blocks immediately after: toolu_1",
    ),
    (
        "tool_result not first",
        base(
            tools=[TOOL],
            messages=[
                *tool_turn(),
                {"role": "user", "content": [{"type": "text", "text": "x"}, result("toolu_1")]},
            ],
        ),
        "`tool_result` blocks must come first",
    ),
    (
        "tool_result with unknown id",
        base(
            tools=[TOOL],
            messages=[*tool_turn(), {"role": "user", "content": [result("toolu_1"), result("toolu_zzz")]}],
        ),
        "unexpected `tool_use_id` found in `tool_result` blocks: toolu_zzz",
    ),
    (
        "tool_result without any tool_use",
        base(messages=[U, A, {"role": "user", "content": [result("toolu_9")]}]),
        "unexpected `tool_use_id`",
    ),
    (
        "duplicate tool_use ids",
        base(
            tools=[TOOL],
            messages=[
                *tool_turn("toolu_d"),
                {"role": "user", "content": [result("toolu_d")]},
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": "toolu_d", "name": "get_weather", "input": {}}],
                },
                {"role": "user", "content": [result("toolu_d")]},
            ],
        ),
        "ids must be unique",
    ),
    (
        "five breakpoints",
        base(
            system=[{"type": "text", "text": f"part {i}", "cache_control": CC} for i in range(3)],
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "text", "text": f"q{i}", "cache_control": CC} for i in range(2)],
                }
            ],
        ),
        "A maximum of 4 blocks with cache_control may be provided. Found 5.",
    ),
    (
        "four breakpoints plus automatic",
        base(
            cache_control=CC,
            system=[{"type": "text", "text": f"part {i}", "cache_control": CC} for i in range(4)],
        ),
        "Found 5",
    ),
    (
        "cache_control on thinking",
        base(
            messages=[
                U,
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "hmm", "signature": "s", "cache_control": CC},
                        {"type": "text", "text": "ok"},
                    ],
                },
                U,
            ]
        ),
        "cache_control cannot be set on thinking blocks",
    ),
    (
        "cache_control on empty text",
        base(messages=[{"role": "user", "content": [{"type": "text", "text": "", "cache_control": CC}]}]),
        "cache_control cannot be set for empty text blocks",
    ),
    (
        "1h after 5m",
        base(
            system=[{"type": "text", "text": "sys", "cache_control": CC}],
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "q", "cache_control": {**CC, "ttl": "1h"}}],
                }
            ],
        ),
        "a ttl='1h' cache_control block must not come after a ttl='5m' cache_control block",
    ),
    (
        "bad ttl",
        base(system=[{"type": "text", "text": "sys", "cache_control": {**CC, "ttl": "10m"}}]),
        "cache_control.ttl",
    ),
    (
        "prefill on opus 4.6",
        base(model="claude-opus-4-6", messages=[U, A]),
        "does not support assistant message prefill",
    ),
    (
        "prefill on 5.x",
        base(model="claude-sonnet-5", messages=[U, A]),
        "does not support assistant message prefill",
    ),
    (
        "prefill with thinking",
        base(max_tokens=4000, thinking={"type": "enabled", "budget_tokens": 2000}, messages=[U, A]),
        "prefill is not supported when thinking is enabled",
    ),
    (
        "manual thinking: the tool loop's last assistant turn without its thinking",
        base(
            max_tokens=4000,
            thinking={"type": "enabled", "budget_tokens": 2000},
            tools=[{"name": "read", "input_schema": {"type": "object"}}],
            messages=[
                U,
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": "toolu_1", "name": "read", "input": {}}],
                },
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "x"}],
                },
            ],
        ),
        "messages.1.content.0.type: Expected `thinking` or `redacted_thinking`, but found `tool_use`",
    ),
    (
        "prefill on sonnet 4.6",
        base(messages=[U, A]),
        "This model does not support assistant message prefill. The conversation must end with a user message.",
    ),
    (
        "temperature on opus 4.7",
        base(model="claude-opus-4-7", temperature=0.5),
        "`temperature` is deprecated for this model.",
    ),
    ("top_k on 5.x", base(model="claude-opus-5-5", top_k=5), "`top_k` is deprecated for this model."),
    ("top_p on 5.x", base(model="claude-haiku-5-5", top_p=0.9), "`top_p` is deprecated for this model."),
    (
        "temperature and top_p on opus 4.1",
        base(model="claude-opus-4-1-20250805", temperature=0.5, top_p=0.9),
        "`temperature` and `top_p` cannot both be specified for this model. Please use only one.",
    ),
    (
        "budget thinking on opus 4.7",
        base(model="claude-opus-4-7", max_tokens=4000, thinking={"type": "enabled", "budget_tokens": 2000}),
        '"thinking.type.enabled" is not supported for this model. Use "thinking.type.adaptive" and '
        '"output_config.effort" to control thinking behavior.',
    ),
    (
        "budget thinking on opus 4.8",
        base(model="claude-opus-4-8", max_tokens=4000, thinking={"type": "enabled", "budget_tokens": 2000}),
        '"thinking.type.enabled" is not supported for this model.',
    ),
    (
        "adaptive thinking on sonnet 4.5",
        base(model="claude-sonnet-4-5-20250929", thinking={"type": "adaptive"}),
        "adaptive thinking is not supported on this model",
    ),
    (
        "temperature with thinking",
        base(model="claude-opus-4-8", thinking={"type": "adaptive"}, temperature=0.3),
        "`temperature` may only be set to 1 when thinking is enabled or in adaptive mode. Please consult our "
        "documentation at https://platform.claude.com/docs/en/build-with-claude/extended-thinking",
    ),
    (
        "temperature and top_p on 4.5",
        base(model="claude-sonnet-4-5-20250929", temperature=0.5, top_p=0.9),
        "`temperature` and `top_p` cannot both be specified",
    ),
    (
        "budget >= max_tokens",
        base(max_tokens=2000, thinking={"type": "enabled", "budget_tokens": 2000}),
        "`max_tokens` must be greater than `thinking.budget_tokens`",
    ),
    (
        "budget < 1024",
        base(max_tokens=4000, thinking={"type": "enabled", "budget_tokens": 1000}),
        "greater than or equal to 1024",
    ),
    (
        "every tool deferred",
        base(tools=[{**TOOL, "defer_loading": True}]),
        "At least one tool must have defer_loading=false. All tools cannot be deferred.",
    ),
    (
        "deferred tool with cache_control",
        base(tools=[TOOL, {**DEFERRED, "cache_control": CC}]),
        "Tool 'glob' cannot have both defer_loading=true and cache_control set. "
        "Tools with defer_loading cannot use prompt caching.",
    ),
    (
        "tool_reference to an unknown tool",
        base(tools=[TOOL, DEFERRED], messages=loaded("grep")),
        "Tool reference 'grep' not found in available tools",
    ),
    (
        "tool search result naming an unknown tool",
        base(
            tools=[TOOL, DEFERRED],
            messages=[
                U,
                {
                    "role": "assistant",
                    "content": [
                        {
                            "type": "server_tool_use",
                            "id": "srvtoolu_1",
                            "name": "tool_search_tool_regex",
                            "input": {"pattern": "grep"},
                        },
                        {
                            "type": "tool_search_tool_result",
                            "tool_use_id": "srvtoolu_1",
                            "content": {
                                "type": "tool_search_tool_search_result",
                                "tool_references": [{"type": "tool_reference", "tool_name": "grep"}],
                            },
                        },
                    ],
                },
                {"role": "user", "content": "go on"},
            ],
        ),
        "Tool reference 'grep' not found in available tools",
    ),
    ("duplicate tool names", base(tools=[TOOL, TOOL]), "Tool names must be unique"),
    ("invalid tool name", base(tools=[{**TOOL, "name": "get weather!"}]), "String should match pattern"),
    (
        "tool_choice unknown tool",
        base(tools=[TOOL], tool_choice={"type": "tool", "name": "nope"}),
        "Tool 'nope' not found",
    ),
]


@pytest.mark.parametrize(("body", "needle"), [(b, n) for _, b, n in REJECTED], ids=[r[0] for r in REJECTED])
def test_rejected(
    emulator: Emulator, emulator_client: anthropic.Anthropic, body: dict[str, Any], needle: str
) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        emulator_client.post("/v1/messages", body=copy.deepcopy(body), cast_to=object)
    err = info.value
    assert err.status_code == 400
    assert isinstance(err.body, dict)
    assert err.body["type"] == "error"
    assert err.body["error"]["type"] == "invalid_request_error"
    assert needle in err.body["error"]["message"]
    assert err.body["request_id"] == err.response.headers["request-id"]
    assert emulator.last.status == 400
    assert emulator.last.usage is None  # nothing billed
    assert emulator.cache_size() == 0


ACCEPTED: list[tuple[str, dict[str, Any]]] = [
    ("plain", base()),
    ("prefill on opus 4.5", base(model="claude-opus-4-5", messages=[U, A])),
    ("prefill on sonnet 4.5", base(model="claude-sonnet-4-5-20250929", messages=[U, A])),
    # a dated id is not a minor version: claude-opus-4-20250514 is Opus 4, which takes a prefill
    ("prefill on dated opus 4", base(model="claude-opus-4-20250514", messages=[U, A])),
    ("adaptive thinking on sonnet 4.6", base(thinking={"type": "adaptive"})),
    (
        "budget thinking on opus 4.6",
        base(model="claude-opus-4-6", max_tokens=4000, thinking={"type": "enabled", "budget_tokens": 2000}),
    ),
    ("a deferred tool beside an eager one", base(tools=[TOOL, DEFERRED])),
    ("a tool_reference loading a deferred tool", base(tools=[TOOL, DEFERRED], messages=loaded("glob"))),
    ("temperature alone on 4.5", base(model="claude-sonnet-4-5", temperature=0.2)),
    ("temperature and top_p on sonnet 4", base(model="claude-sonnet-4", temperature=0.2, top_p=0.9)),
    ("adaptive thinking", base(model="claude-opus-5-5", thinking={"type": "adaptive"})),
    (
        "four breakpoints",
        base(system=[{"type": "text", "text": f"p{i}", "cache_control": CC} for i in range(4)]),
    ),
    (
        "1h before 5m",
        base(
            system=[{"type": "text", "text": "sys", "cache_control": {**CC, "ttl": "1h"}}],
            messages=[{"role": "user", "content": [{"type": "text", "text": "q", "cache_control": CC}]}],
        ),
    ),
    (
        "parallel tool calls answered",
        base(
            tools=[TOOL],
            messages=[
                U,
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "checking"},
                        {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"c": "Paris"}},
                        {"type": "tool_use", "id": "t2", "name": "get_weather", "input": {"c": "Rome"}},
                    ],
                },
                {"role": "user", "content": [result("t2"), result("t1"), {"type": "text", "text": "thanks"}]},
            ],
        ),
    ),
    (
        "thinking in history",
        base(
            model="claude-opus-5-5",
            max_tokens=8000,
            thinking={"type": "enabled", "budget_tokens": 2000},
            messages=[
                U,
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "let me see", "signature": "EqQBCkYIBx=="},
                        {"type": "redacted_thinking", "data": "abc"},
                        {"type": "text", "text": "answer"},
                    ],
                },
                U,
            ],
        ),
    ),
]


@pytest.mark.parametrize("body", [b for _, b in ACCEPTED], ids=[a[0] for a in ACCEPTED])
def test_accepted(emulator_client: anthropic.Anthropic, body: dict[str, Any]) -> None:
    out = emulator_client.post("/v1/messages", body=copy.deepcopy(body), cast_to=object)
    assert isinstance(out, dict)
    assert out["type"] == "message"


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_zero_prewarms_the_cache(
    emulator: Emulator, emulator_client: anthropic.Anthropic, stream: bool
) -> None:
    system: Any = [{"type": "text", "text": "policy " * 3000, "cache_control": CC}]
    user: Any = [U]
    emulator.reply("a scripted reply, left for the next request")
    warm: Any
    if stream:
        with emulator_client.messages.stream(
            model="claude-sonnet-4-6", max_tokens=0, system=system, messages=user
        ) as s:
            warm = s.get_final_message()
    else:
        warm = emulator_client.messages.create(
            model="claude-sonnet-4-6", max_tokens=0, system=system, messages=user
        )
    assert warm.content == []
    assert warm.stop_reason == "max_tokens"
    assert warm.usage.output_tokens == 0
    assert warm.usage.cache_creation_input_tokens and warm.usage.cache_creation_input_tokens > 1024
    hot = emulator_client.messages.create(
        model="claude-sonnet-4-6", max_tokens=64, system=system, messages=user
    )
    assert hot.usage.cache_read_input_tokens == warm.usage.cache_creation_input_tokens
    assert (
        hot.content[0].type == "text" and hot.content[0].text == "a scripted reply, left for the next request"
    )


def test_consecutive_roles_allowed_when_not_strict() -> None:
    with Emulator(strict_roles=False) as emu:
        client = anthropic.Anthropic(base_url=emu.url, api_key="k", max_retries=0)
        out = client.post("/v1/messages", body=base(messages=[U, U]), cast_to=object)
        assert isinstance(out, dict) and out["type"] == "message"


def test_unknown_path_is_json_404(emulator_client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as info:
        emulator_client.models.list()
    assert isinstance(info.value.body, dict)
    assert info.value.body["error"]["type"] == "not_found_error"
