"""Prompt-cache billing against hand-computed cases (expected numbers from default_counter() block counts)."""

from __future__ import annotations

from typing import Any

import anthropic

from tokensaver.emulator import Emulator
from tokensaver.pricing import PriceTable
from tokensaver.tokens import MESSAGE_OVERHEAD, default_counter

MODEL = "claude-sonnet-4-6"
MIN = PriceTable().get(MODEL).min_cache
C = default_counter()
CC: dict[str, Any] = {"type": "ephemeral"}
CC1H: dict[str, Any] = {"type": "ephemeral", "ttl": "1h"}


def para(seed: int, words: int = 400) -> str:
    return " ".join(f"alpha{seed}x{i}" for i in range(words))


def text(t: str, cc: dict[str, Any] | None = None) -> dict[str, Any]:
    b: dict[str, Any] = {"type": "text", "text": t}
    if cc:
        b["cache_control"] = cc
    return b


def strip(b: Any) -> Any:
    return {k: v for k, v in b.items() if k != "cache_control"} if isinstance(b, dict) else b


def msg_tokens(m: dict[str, Any]) -> list[int]:
    """Per-block tokens of one message; the first block carries the message framing."""
    blocks = [m["content"]] if isinstance(m["content"], str) else m["content"]
    return [C.block(strip(b)) + (MESSAGE_OVERHEAD if i == 0 else 0) for i, b in enumerate(blocks)]


def usage(client: anthropic.Anthropic, **body: Any) -> dict[str, Any]:
    body.setdefault("model", MODEL)
    body.setdefault("max_tokens", 64)
    out = client.post("/v1/messages", body=body, cast_to=object)
    assert isinstance(out, dict)
    u = out["usage"]
    assert isinstance(u, dict)
    return u


def split(u: dict[str, Any]) -> tuple[int, int, int, int, int]:
    """(input, write 5m, write 1h, read, total input)."""
    cc = u["cache_creation"]
    w5, w1 = cc["ephemeral_5m_input_tokens"], cc["ephemeral_1h_input_tokens"]
    assert u["cache_creation_input_tokens"] == w5 + w1
    return (
        u["input_tokens"],
        w5,
        w1,
        u["cache_read_input_tokens"],
        u["input_tokens"] + w5 + w1 + u["cache_read_input_tokens"],
    )


SYSTEM = [text(para(1), CC)]
SYS_T = C.block(text(para(1)))


def test_big_text_is_above_minimum() -> None:
    assert SYS_T > MIN


def test_miss_then_hit(emulator_client: anthropic.Anthropic) -> None:
    msgs = [{"role": "user", "content": "What is this?"}]
    rest = sum(msg_tokens(msgs[0]))
    assert split(usage(emulator_client, system=SYSTEM, messages=msgs)) == (rest, SYS_T, 0, 0, SYS_T + rest)
    assert split(usage(emulator_client, system=SYSTEM, messages=msgs)) == (rest, 0, 0, SYS_T, SYS_T + rest)
    # total matches the counter's whole-request estimate
    assert SYS_T + rest == C.request({"system": SYSTEM, "messages": msgs})


def test_growing_conversation_reads_previous_writes_new(emulator_client: anthropic.Anthropic) -> None:
    u1 = {"role": "user", "content": [text(para(2), CC)]}
    t1 = sum(msg_tokens(u1))
    assert split(usage(emulator_client, messages=[u1])) == (0, t1, 0, 0, t1)
    u1_plain = {"role": "user", "content": [text(para(2))]}
    a1 = {"role": "assistant", "content": [text("Sure, here is the answer.")]}
    u2 = {"role": "user", "content": [text("And now in French?", CC)]}
    new = sum(msg_tokens(a1)) + sum(msg_tokens(u2))
    assert split(usage(emulator_client, messages=[u1_plain, a1, u2])) == (0, new, 0, t1, t1 + new)
    a2 = {"role": "assistant", "content": "Bien sûr."}
    u3 = {"role": "user", "content": [text("Thanks", CC)]}
    newer = sum(msg_tokens(a2)) + sum(msg_tokens(u3))
    u2_plain = {"role": "user", "content": [text("And now in French?")]}
    got = split(usage(emulator_client, messages=[u1_plain, a1, u2_plain, a2, u3]))
    assert got == (0, newer, 0, t1 + new, t1 + new + newer)


def _lookback(emu: Emulator, client: anthropic.Anthropic, distance: int) -> tuple[int, int, int, int, int]:
    """First request: a breakpoint on block 0; second: a breakpoint ``distance`` blocks later."""
    emu.reset()
    head = text(para(3))
    small = [text(f"note {i}") for i in range(distance)]
    first = {"role": "user", "content": [{**head, "cache_control": CC}]}
    usage(client, messages=[first])
    second = {"role": "user", "content": [head, *small[:-1], {**small[-1], "cache_control": CC}]}
    return split(usage(client, messages=[second]))


def test_lookback_edge(emulator: Emulator, emulator_client: anthropic.Anthropic) -> None:
    head_t = C.block(text(para(3))) + MESSAGE_OVERHEAD
    tail20 = sum(C.block(text(f"note {i}")) for i in range(20))
    tail21 = sum(C.block(text(f"note {i}")) for i in range(21))
    # breakpoint exactly 20 blocks after the cached one: found by the lookback
    assert _lookback(emulator, emulator_client, 20) == (0, tail20, 0, head_t, head_t + tail20)
    # 21 blocks after: out of reach, the whole prefix is written again
    assert _lookback(emulator, emulator_client, 21) == (0, head_t + tail21, 0, 0, head_t + tail21)


def test_below_minimum_is_never_cached(emulator: Emulator, emulator_client: anthropic.Anthropic) -> None:
    msgs = [{"role": "user", "content": [text("short question", CC)]}]
    t = sum(msg_tokens(msgs[0]))
    assert t < MIN
    for _ in range(2):
        assert split(usage(emulator_client, messages=msgs)) == (t, 0, 0, 0, t)
    assert emulator.cache_size() == 0


def test_ttl_expiry_and_refresh(emulator: Emulator, emulator_client: anthropic.Anthropic) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    rest = sum(msg_tokens(msgs[0]))
    assert split(usage(emulator_client, system=SYSTEM, messages=msgs))[1] == SYS_T
    emulator.clock.advance(300)  # type: ignore[union-attr]
    assert (
        split(usage(emulator_client, system=SYSTEM, messages=msgs))[3] == SYS_T
    )  # alive at 300 s, refreshed
    emulator.clock.advance(200)  # type: ignore[union-attr]
    assert split(usage(emulator_client, system=SYSTEM, messages=msgs))[3] == SYS_T  # 500 s after write
    emulator.clock.advance(301)  # type: ignore[union-attr]
    assert split(usage(emulator_client, system=SYSTEM, messages=msgs)) == (rest, SYS_T, 0, 0, SYS_T + rest)


def test_emulator_time_header_sets_clock(emulator: Emulator, emulator_client: anthropic.Anthropic) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    t0 = 1_800_000_000.0

    def call(t: float) -> tuple[int, int, int, int, int]:
        body = {"model": MODEL, "max_tokens": 8, "system": SYSTEM, "messages": msgs}
        out = emulator_client.post(
            "/v1/messages", body=body, cast_to=object, options={"headers": {"x-emulator-time": str(t)}}
        )
        assert isinstance(out, dict)
        return split(out["usage"])

    assert call(t0)[1] == SYS_T
    assert emulator.clock.now() == t0
    assert call(t0 + 299)[3] == SYS_T
    assert call(t0 + 299 + 301)[1] == SYS_T  # expired: written again


def test_1h_and_5m_split(emulator: Emulator, emulator_client: anthropic.Anthropic) -> None:
    system = [text(para(4), CC1H)]
    sys_t = C.block(text(para(4)))
    u = {"role": "user", "content": [text(para(5), CC)]}
    u_t = sum(msg_tokens(u))
    assert split(usage(emulator_client, system=system, messages=[u])) == (0, u_t, sys_t, 0, sys_t + u_t)
    emulator.clock.advance(301)  # the 5m entry is gone, the 1h entry is not
    assert split(usage(emulator_client, system=system, messages=[u])) == (0, u_t, 0, sys_t, sys_t + u_t)
    emulator.clock.advance(3601)
    assert split(usage(emulator_client, system=system, messages=[u])) == (0, u_t, sys_t, 0, sys_t + u_t)


def test_automatic_mode_with_tools(emulator_client: anthropic.Anthropic) -> None:
    tools = [
        {"name": f"tool_{i}", "description": para(10 + i, 60), "input_schema": {"type": "object"}}
        for i in range(3)
    ]
    tools_t = sum(C.block(t) for t in tools)
    msgs = [{"role": "user", "content": para(6)}]
    m_t = sum(msg_tokens(msgs[0]))
    total = tools_t + m_t
    assert split(usage(emulator_client, tools=tools, messages=msgs, cache_control=CC)) == (
        0,
        total,
        0,
        0,
        total,
    )
    assert split(usage(emulator_client, tools=tools, messages=msgs, cache_control=CC)) == (
        0,
        0,
        0,
        total,
        total,
    )
    # without any cache_control nothing is read: automatic mode must be asked for
    assert split(usage(emulator_client, tools=tools, messages=msgs)) == (total, 0, 0, 0, total)


def test_automatic_ttl_1h(emulator_client: anthropic.Anthropic) -> None:
    msgs = [{"role": "user", "content": para(7)}]
    t = sum(msg_tokens(msgs[0]))
    assert split(usage(emulator_client, messages=msgs, cache_control=CC1H)) == (0, 0, t, 0, t)


def test_different_model_is_a_miss(emulator_client: anthropic.Anthropic) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    rest = sum(msg_tokens(msgs[0]))
    usage(emulator_client, system=SYSTEM, messages=msgs)
    other = usage(emulator_client, model="claude-opus-4-8", system=SYSTEM, messages=msgs)
    assert split(other) == (rest, SYS_T, 0, 0, SYS_T + rest)


def test_two_breakpoints_write_entries_at_both(emulator_client: anthropic.Anthropic) -> None:
    """System and conversation breakpoints: a changed conversation still reads the system entry."""
    u = {"role": "user", "content": [text(para(8), CC)]}
    u_t = sum(msg_tokens(u))
    assert split(usage(emulator_client, system=SYSTEM, messages=[u])) == (0, SYS_T + u_t, 0, 0, SYS_T + u_t)
    v = {"role": "user", "content": [text(para(9), CC)]}
    v_t = sum(msg_tokens(v))
    assert split(usage(emulator_client, system=SYSTEM, messages=[v])) == (0, v_t, 0, SYS_T, SYS_T + v_t)


def test_tokens_after_last_breakpoint_are_input(emulator_client: anthropic.Anthropic) -> None:
    msgs = [
        {"role": "user", "content": [text(para(11), CC), text("a trailing question")]},
    ]
    head, tail = msg_tokens(msgs[0])
    assert split(usage(emulator_client, messages=msgs)) == (tail, head, 0, 0, head + tail)


def test_count_tokens_matches_billed_total(emulator_client: anthropic.Anthropic) -> None:
    msgs = [{"role": "user", "content": "How many?"}]
    n = emulator_client.messages.count_tokens(model=MODEL, system=SYSTEM, messages=msgs)  # type: ignore[arg-type]
    assert n.input_tokens == split(usage(emulator_client, system=SYSTEM, messages=msgs))[4]


# --- settings that invalidate a cache level without changing any block ------------------------------
# Per the "What invalidates the cache" table of the prompt-caching docs: tool_choice, the thinking
# settings (enable/disable, budget) and images anywhere in the prompt invalidate the messages cache
# only; speed invalidates the system and messages caches; the tools cache survives all of them.

LEVEL_TOOLS = [{"name": "lookup", "description": para(20, 40), "input_schema": {"type": "object"}}]
LEVEL_TOOLS_T = C.block(LEVEL_TOOLS[0])
LEVEL_MSG = {"role": "user", "content": [text(para(21), CC)]}
LEVEL_MSG_T = sum(msg_tokens(LEVEL_MSG))


def test_changed_tool_choice_misses_messages_only(emulator_client: anthropic.Anthropic) -> None:
    head = LEVEL_TOOLS_T + SYS_T  # the system breakpoint covers tools + system
    total = head + LEVEL_MSG_T

    def call(tool_choice: dict[str, Any]) -> tuple[int, int, int, int, int]:
        return split(
            usage(
                emulator_client,
                tools=LEVEL_TOOLS,
                tool_choice=tool_choice,
                system=SYSTEM,
                messages=[LEVEL_MSG],
            )
        )

    assert call({"type": "auto"}) == (0, total, 0, 0, total)
    # unchanged tool_choice: everything is read
    assert call({"type": "auto"}) == (0, 0, 0, total, total)
    # changed tool_choice: tools + system still read, the message block is written again
    assert call({"type": "any"}) == (0, LEVEL_MSG_T, 0, head, total)
    assert call({"type": "tool", "name": "lookup"}) == (0, LEVEL_MSG_T, 0, head, total)
    # back to the first setting: its entry is still alive
    assert call({"type": "auto"}) == (0, 0, 0, total, total)


def test_changed_thinking_misses_messages_only(emulator_client: anthropic.Anthropic) -> None:
    total = SYS_T + LEVEL_MSG_T

    def call(thinking: dict[str, Any] | None) -> tuple[int, int, int, int, int]:
        body: dict[str, Any] = {"max_tokens": 8000, "system": SYSTEM, "messages": [LEVEL_MSG]}
        if thinking is not None:
            body["thinking"] = thinking
        return split(usage(emulator_client, **body))

    enabled = {"type": "enabled", "budget_tokens": 2000}
    assert call(enabled) == (0, total, 0, 0, total)
    # unchanged thinking settings: everything is read
    assert call(dict(enabled)) == (0, 0, 0, total, total)
    # changed budget: system still read, the message block is written again
    assert call({"type": "enabled", "budget_tokens": 4000}) == (0, LEVEL_MSG_T, 0, SYS_T, total)
    # thinking switched off (field absent), then explicitly disabled: each is a new messages entry
    assert call(None) == (0, LEVEL_MSG_T, 0, SYS_T, total)
    assert call({"type": "disabled"}) == (0, LEVEL_MSG_T, 0, SYS_T, total)
    assert call(None) == (0, 0, 0, total, total)
    assert call(enabled) == (0, 0, 0, total, total)


def test_image_anywhere_misses_messages_only(emulator_client: anthropic.Anthropic) -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    later = {"role": "user", "content": [image, text("and this?", CC)]}
    reply = {"role": "assistant", "content": "Noted."}
    assert split(usage(emulator_client, system=SYSTEM, messages=[LEVEL_MSG]))[1] == SYS_T + LEVEL_MSG_T
    # an image added in a later turn: the earlier message entry is not reused, the system one is
    msgs = [{"role": "user", "content": [text(para(21))]}, reply, later]
    rest = sum(msg_tokens(reply)) + sum(msg_tokens(later))
    total = SYS_T + LEVEL_MSG_T + rest
    assert split(usage(emulator_client, system=SYSTEM, messages=msgs)) == (
        0,
        LEVEL_MSG_T + rest,
        0,
        SYS_T,
        total,
    )


def test_changed_speed_misses_system_and_messages(emulator_client: anthropic.Anthropic) -> None:
    big_tools = [
        {"name": "lookup", "description": para(22), "input_schema": {"type": "object"}, "cache_control": CC}
    ]
    tools_t = C.block(strip(big_tools[0]))
    assert tools_t > MIN
    total = tools_t + SYS_T + LEVEL_MSG_T

    def call(**extra: Any) -> tuple[int, int, int, int, int]:
        return split(usage(emulator_client, tools=big_tools, system=SYSTEM, messages=[LEVEL_MSG], **extra))

    assert call() == (0, total, 0, 0, total)
    assert call() == (0, 0, 0, total, total)
    # switching speed: the tools entry is still read, system and messages are written again
    assert call(speed="fast") == (0, SYS_T + LEVEL_MSG_T, 0, tools_t, total)
    assert call(speed="fast") == (0, 0, 0, total, total)


def test_string_content_and_its_text_block_are_one_prompt(emulator_client: anthropic.Anthropic) -> None:
    """A string content is shorthand for one text block: the cache entry written with one form is
    read with the other (system and messages), as the API does."""
    big = para(7)
    first = {"role": "user", "content": big}
    u1 = usage(emulator_client, system=para(8), messages=[first], cache_control=CC)
    total = split(u1)[4]
    assert split(u1) == (0, total, 0, 0, total)
    as_block = {"role": "user", "content": [text(big)]}
    got = split(usage(emulator_client, system=[text(para(8))], messages=[as_block], cache_control=CC))
    assert got == (0, 0, 0, total, total)
    # and back: the block's entry read by the string form
    got = split(usage(emulator_client, system=para(8), messages=[first], cache_control=CC))
    assert got == (0, 0, 0, total, total)
