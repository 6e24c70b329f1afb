"""Preserved thinking in the emulator: the prefix check on thinking blocks sent back, over the real SDK and HTTP.

A thinking block is bound to its prefix (``system``, ``tools``, every earlier message; not ``cache_control``).
An edit before it answers 400 ``invalid_request_error`` naming ``messages.i.content.j`` on the models that
enforce it, or, with ``thinking.block_binding.prefix_mismatch_behavior: "drop_block"`` and the
``thinking-binding-controls-2026-08-01`` beta, drops the block (billed without it) and lists it in
``input_transformations``. Models without preserved thinking are unaffected.
"""

from __future__ import annotations

import copy
from typing import Any

import anthropic
import pytest

from tokensaver.emulator import Emulator
from tokensaver.emulator.binding import BINDING_BETA, Binding, BindingStore
from tokensaver.testing import emulator_clients

MODEL = "claude-fable-5-1"
SYSTEM = "You fix failing tests."
TOOLS: list[dict[str, Any]] = [
    {"name": "read_file", "description": "Read a file.", "input_schema": {"type": "object"}},
    {"name": "run_tests", "description": "Run the tests.", "input_schema": {"type": "object"}},
]
DROP: Any = {"type": "adaptive", "block_binding": {"prefix_mismatch_behavior": "drop_block"}}
MISMATCH = (
    "messages.3.content.0: Invalid `signature` in `thinking` block. The block is bound to a different "
    'conversation. Remove the block, or set `thinking.block_binding.prefix_mismatch_behavior` to "drop_block".'
)


def thinking_turn(text: str, tool: str, path: str) -> list[dict[str, Any]]:
    return [
        {"type": "thinking", "thinking": text},
        {"type": "tool_use", "name": tool, "input": {"path": path}},
    ]


@pytest.fixture
def client(emu: Emulator) -> anthropic.Anthropic:
    return emulator_clients(emu)[0]


def create(client: anthropic.Anthropic, messages: list[Any], *, beta: bool = False, **kw: Any) -> Any:
    opts: dict[str, Any] = {"model": MODEL, "max_tokens": 512, "system": SYSTEM, "tools": TOOLS, **kw}
    if beta:
        return client.beta.messages.create(messages=messages, betas=[BINDING_BETA], **opts)
    return client.messages.create(messages=messages, **opts)


def session(emu: Emulator, client: anthropic.Anthropic, model: str = MODEL) -> list[Any]:
    """Three requests of a tool loop, each assistant turn sent back as returned (thinking included):
    messages 1 and 3 are assistant turns that start with a thinking block; the history ends on a user turn."""
    emu.reply(
        thinking_turn("Read the test first.", "read_file", "tests/test_auth.py"),
        thinking_turn("The fixture is wrong; run them.", "run_tests", "tests"),
    )
    messages: list[Any] = [{"role": "user", "content": "Fix the failing test."}]
    for result in ("def test_login(): ...", "1 failed"):
        reply = create(client, messages, model=model)
        tool_use = next(b for b in reply.content if b.type == "tool_use")
        messages.append({"role": "assistant", "content": reply.content})
        messages.append(
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": result}],
            }
        )
    assert [b.type for b in messages[1]["content"]] == ["thinking", "tool_use"]
    assert [b.type for b in messages[3]["content"]] == ["thinking", "tool_use"]
    return messages


def as_dicts(messages: list[Any]) -> list[dict[str, Any]]:
    """The history as plain JSON (the SDK's blocks dumped the way it sends them)."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [b if isinstance(b, dict) else b.model_dump(exclude_none=True) for b in content]
        out.append({**m, "content": copy.deepcopy(content)})
    return out


def cleared_first_result(messages: list[Any]) -> list[dict[str, Any]]:
    """What a deep cut does: the tool_result before the second thinking block is cleared in place."""
    edited = as_dicts(messages)
    edited[2]["content"][0]["content"] = "[cleared]"
    return edited


def test_unchanged_history_passes(emu: Emulator, client: anthropic.Anthropic) -> None:
    messages = session(emu, client)
    emu.reply("Fixed.")
    reply = create(client, messages)
    assert reply.content[0].text == "Fixed."
    # and again with the history as plain JSON (key order and nulls are not part of the prefix)
    emu.reply("Fixed.")
    assert create(client, as_dicts(messages)).content[0].text == "Fixed."


def test_changed_tool_result_before_a_thinking_block_is_a_400(
    emu: Emulator, client: anthropic.Anthropic
) -> None:
    messages = session(emu, client)
    emu.reply("Fixed.")
    with pytest.raises(anthropic.BadRequestError) as info:
        create(client, cleared_first_result(messages))
    assert info.value.status_code == 400
    error = info.value.body["error"]  # type: ignore[index]
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith(MISMATCH)
    # without the beta header the message says the setting needs it
    assert (
        f"That setting requires the `{BINDING_BETA}` value in the `anthropic-beta` header."
        in error["message"]
    )
    # with the beta (and no block_binding) the default is still "error" on a new account, without that sentence
    with pytest.raises(anthropic.BadRequestError) as info:
        create(client, cleared_first_result(messages), beta=True)
    assert info.value.body["error"]["message"].startswith(MISMATCH)  # type: ignore[index]
    assert BINDING_BETA not in info.value.body["error"]["message"]  # type: ignore[index]


def test_drop_block_bills_without_the_dropped_blocks(emu: Emulator, client: anthropic.Anthropic) -> None:
    messages = session(emu, client)
    edited = cleared_first_result(messages)
    emu.reply("Fixed.")
    reply = create(client, edited, beta=True, thinking=DROP)
    assert reply.content[0].text == "Fixed."
    assert [(t.type, t.path, t.reason) for t in reply.input_transformations] == [
        ("thinking_dropped", "messages.3.content.0", "prefix_binding_mismatch")
    ]
    # the same edited request where nothing is checked bills the thinking block too
    with Emulator(virtual_clock=True, preserved_thinking=False) as plain:
        plain.reply("Fixed.")
        unchecked = create(emulator_clients(plain)[0], edited, beta=True, thinking=DROP)
    assert unchecked.input_transformations == []
    assert reply.usage.input_tokens < unchecked.usage.input_tokens
    # the first thinking block (before the edit) was kept: only the second one is missing from what was billed
    seen = emu.last.body["messages"]
    assert seen[1]["content"][0]["type"] == "thinking"  # the emulator records the request as sent


def test_drop_block_without_the_beta_is_refused(emu: Emulator, client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(
            model=MODEL,
            max_tokens=64,
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"thinking": DROP},
        )
    assert info.value.body["error"]["message"].endswith("block_binding: Extra inputs are not permitted")  # type: ignore[index]


def test_every_later_thinking_block_fails_after_an_edit(emu: Emulator, client: anthropic.Anthropic) -> None:
    messages = session(emu, client)
    edited = as_dicts(messages)
    edited[0]["content"] = "Fix the failing tests."  # before both thinking blocks
    emu.reply("Fixed.")
    reply = create(client, edited, beta=True, thinking=DROP)
    assert [t.path for t in reply.input_transformations] == ["messages.1.content.0", "messages.3.content.0"]
    with pytest.raises(anthropic.BadRequestError) as info:
        create(client, edited)
    assert info.value.body["error"]["message"].startswith("messages.1.content.0: Invalid `signature`")  # type: ignore[index]


def test_system_and_tools_are_in_the_prefix(emu: Emulator, client: anthropic.Anthropic) -> None:
    messages = session(emu, client)
    with pytest.raises(anthropic.BadRequestError) as info:
        create(client, messages, system=SYSTEM + " Today is Wednesday.")
    assert "The `system` prompt differs" in info.value.body["error"]["message"]  # type: ignore[index]
    renamed = [{**TOOLS[0], "description": "Read one file."}, TOOLS[1]]
    with pytest.raises(anthropic.BadRequestError) as info:
        create(client, messages, tools=renamed)
    assert "The `tools` list differs" in info.value.body["error"]["message"]  # type: ignore[index]


def test_a_change_after_the_last_thinking_block_passes(emu: Emulator, client: anthropic.Anthropic) -> None:
    messages = session(emu, client)
    emu.reply("Fixed.", "Fixed.")
    create(client, messages)
    edited = as_dicts(messages)
    edited[4]["content"][0]["content"] = "[cleared]"  # the newest tool_result: after every thinking block
    edited[3]["content"][1]["input"] = {"path": "tests/"}  # the tool_use after the last thinking block
    assert create(client, edited).content[0].text == "Fixed."


def test_moving_cache_control_passes(emu: Emulator, client: anthropic.Anthropic) -> None:
    messages = session(emu, client)
    marked = as_dicts(messages)
    marked[2]["content"][0]["cache_control"] = {"type": "ephemeral"}
    emu.reply("Fixed.", "Fixed.", "Fixed.")
    create(client, marked)
    moved = as_dicts(messages)
    moved[4]["content"][0]["cache_control"] = {"type": "ephemeral", "ttl": "5m"}
    assert create(client, moved, cache_control={"type": "ephemeral"}).content[0].text == "Fixed."
    tools = [TOOLS[0], {**TOOLS[1], "cache_control": {"type": "ephemeral"}}]
    system = [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}]
    assert create(client, moved, tools=tools, system=system).content[0].text == "Fixed."


def test_thinking_blocks_left_out_or_moved(emu: Emulator, client: anthropic.Anthropic) -> None:
    messages = session(emu, client)
    emu.reply(thinking_turn("Now the fix.", "read_file", "src/auth.py"))
    third = create(client, messages)
    messages += [
        {"role": "assistant", "content": third.content},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": third.content[1].id, "content": "x"}],
        },
    ]

    def without_thinking(at: set[int]) -> list[dict[str, Any]]:
        out = as_dicts(messages)
        for i in at:
            out[i]["content"] = [b for b in out[i]["content"] if b["type"] != "thinking"]
        return out

    emu.reply("a", "b", "c")
    assert create(client, without_thinking({1})).content[0].text == "a"  # a leading run: fine
    assert create(client, without_thinking({1, 3, 5})).content[0].text == "b"  # all of them: fine
    assert create(client, without_thinking({5})).content[0].text == "c"  # a trailing run: fine
    with pytest.raises(anthropic.BadRequestError) as info:
        create(client, without_thinking({3}))  # a gap: the block after it fails
    assert info.value.body["error"]["message"].startswith("messages.5.content.0: Invalid `signature`")  # type: ignore[index]


def test_legacy_account_lets_failing_blocks_through() -> None:
    with Emulator(virtual_clock=True, legacy_account=True) as emu:
        client = emulator_clients(emu)[0]
        messages = session(emu, client)
        edited = cleared_first_result(messages)
        emu.reply("Fixed.")
        reply = create(client, edited, beta=True)
        assert [(t.type, t.path) for t in reply.input_transformations] == [
            ("thinking_mismatch_allowed", "messages.3.content.0")
        ]
        # setting the field opts the request into enforcement
        with pytest.raises(anthropic.BadRequestError):
            create(
                client,
                edited,
                beta=True,
                thinking={"type": "adaptive", "block_binding": {"prefix_mismatch_behavior": "error"}},
            )
        # Fable 5.2 enforces on every account
        messages = session(emu, client, model="claude-fable-5-2")
        with pytest.raises(anthropic.BadRequestError):
            create(client, cleared_first_result(messages), model="claude-fable-5-2")


@pytest.mark.parametrize("model", ["claude-opus-5", "claude-fable-5", "claude-sonnet-4-6"])
def test_models_without_preserved_thinking_are_unaffected(
    emu: Emulator, client: anthropic.Anthropic, model: str
) -> None:
    messages = session(emu, client, model=model)
    emu.reply("Fixed.", "Fixed.")
    assert create(client, cleared_first_result(messages), model=model).content[0].text == "Fixed."
    reply = create(client, cleared_first_result(messages), model=model, beta=True, thinking=DROP)
    assert reply.input_transformations == []


@pytest.mark.parametrize(
    "model",
    [
        "claude-fable-5-2",
        "claude-mythos-5-2",
        "claude-mythos-5-1",
        "claude-opus-5-5",
        "claude-sonnet-5-5",
        "claude-haiku-5-5",
    ],
)
def test_every_model_with_preserved_thinking_checks(
    emu: Emulator, client: anthropic.Anthropic, model: str
) -> None:
    messages = session(emu, client, model=model)
    with pytest.raises(anthropic.BadRequestError):
        create(client, cleared_first_result(messages), model=model)


def test_the_check_can_be_turned_off() -> None:
    with Emulator(virtual_clock=True, preserved_thinking=False) as emu:
        client = emulator_clients(emu)[0]
        messages = session(emu, client)
        emu.reply("Fixed.")
        assert create(client, cleared_first_result(messages)).content[0].text == "Fixed."


def test_streaming_reports_input_transformations_in_message_start(
    emu: Emulator, client: anthropic.Anthropic
) -> None:
    messages = session(emu, client)
    emu.reply("Fixed.")
    opts: dict[str, Any] = {"system": SYSTEM, "tools": TOOLS, "thinking": DROP, "betas": [BINDING_BETA]}
    opts["messages"] = cleared_first_result(messages)
    with client.beta.messages.stream(model=MODEL, max_tokens=512, **opts) as stream:
        events = list(stream)
        final = stream.get_final_message()
    start = next(e for e in events if e.type == "message_start")
    assert [t.path for t in start.message.input_transformations or []] == ["messages.3.content.0"]
    assert [t.path for t in final.input_transformations or []] == ["messages.3.content.0"]


def test_count_tokens_runs_the_same_check(emu: Emulator, client: anthropic.Anthropic) -> None:
    messages = session(emu, client)
    opts: dict[str, Any] = {"system": SYSTEM, "tools": TOOLS, "messages": cleared_first_result(messages)}
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.count_tokens(model=MODEL, **opts)
    assert info.value.body["error"]["message"].startswith(MISMATCH)  # type: ignore[index]
    dropped = client.beta.messages.count_tokens(model=MODEL, thinking=DROP, betas=[BINDING_BETA], **opts)
    with Emulator(virtual_clock=True, preserved_thinking=False) as off:
        plain = emulator_clients(off)[0].messages.count_tokens(model=MODEL, **opts)
    assert dropped.input_tokens < plain.input_tokens


def test_bindings_are_per_api_key(emu: Emulator, client: anthropic.Anthropic) -> None:
    messages = session(emu, client)
    other = anthropic.Anthropic(base_url=emu.url, api_key="another-key", max_retries=0)
    emu.reply("Fixed.")
    # a block this key never saw is bound at first sight: nothing to compare it with
    assert create(other, cleared_first_result(messages)).content[0].text == "Fixed."


def test_binding_memory_is_capped() -> None:
    store = BindingStore(max_bytes=4096)
    for i in range(1000):
        store.put("k", f"sig-{i}", Binding(b"p" * 16, b"", b"s" * 8, b"t" * 8))
    assert store.bytes <= 4096
    assert 0 < len(store) < 1000
    assert store.get("k", "sig-999") is not None  # the newest stay
    assert store.get("k", "sig-0") is None  # the oldest went


def test_empty_signature_is_always_refused(emu: Emulator, client: anthropic.Anthropic) -> None:
    messages: list[Any] = [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "", "signature": ""},
                {"type": "text", "text": "yo"},
            ],
        },
        {"role": "user", "content": "again"},
    ]
    with pytest.raises(anthropic.BadRequestError) as info:
        create(client, messages, beta=True, thinking=DROP)
    error: Any = info.value.body
    assert error["error"]["message"] == "messages.1.content.0: Invalid `signature` in `thinking` block"


def test_a_model_that_cannot_read_a_block_drops_it_without_an_error(
    emu: Emulator, client: anthropic.Anthropic
) -> None:
    """The model check: Opus 5 and Opus 5.5 do not read Fable 5.1 blocks; Fable 5.1 reads Opus 5.5's; a
    conversation that comes back to Fable 5.1 gets its blocks back (the API never edits ``messages``)."""
    messages = session(emu, client)  # two Fable 5.1 turns with thinking
    emu.reply(thinking_turn("Opus now.", "read_file", "src/auth.py"), "Done.", "Done.")
    opus = create(client, messages, model="claude-opus-5-5", beta=True)
    assert [(t.type, t.path, t.reason) for t in opus.input_transformations or []] == [
        ("thinking_dropped", "messages.1.content.0", "model_binding_mismatch"),
        ("thinking_dropped", "messages.3.content.0", "model_binding_mismatch"),
    ]
    messages += [
        {"role": "assistant", "content": opus.content},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": opus.content[1].id, "content": "x"}],
        },
    ]
    back = create(client, messages, beta=True)  # Fable 5.1 again: every block readable, chain intact
    assert back.input_transformations == []
    older = create(client, messages, model="claude-opus-5", beta=True)
    assert [t.path for t in older.input_transformations or []] == [
        "messages.1.content.0",
        "messages.3.content.0",
        "messages.5.content.0",
    ]
    assert emu.last.usage is not None and emu.requests[-2].usage is not None
    assert emu.last.usage["input_tokens"] < emu.requests[-2].usage["input_tokens"]
