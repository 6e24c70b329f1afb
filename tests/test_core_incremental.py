"""The pipeline core's incremental parts: a stage's output is checked from per-message facts (the
messages it kept take their input's), which must name the same rule the whole-body check names;
the per-message table those facts come from across calls has a byte cap.
"""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import conversations

from tokensaver import validate
from tokensaver.pipeline import _digest_blocks, _MessageTable, _stage_facts
from tokensaver.tokens import default_counter
from tokensaver.validate import facts_stage_problem, message_record, stage_problem

CC = {"type": "ephemeral"}


def _edit(body: dict[str, Any], op: str, at: int) -> dict[str, Any]:
    """``body`` after one edit a stage might make (valid or not), sharing what it did not change."""
    msgs = list(body["messages"])
    i = at % len(msgs)
    m = msgs[i]
    content = m.get("content")
    blocks = list(content) if isinstance(content, list) else [{"type": "text", "text": str(content)}]
    if op == "drop":
        del msgs[i]
    elif op == "repeat":
        msgs.insert(i, m)
    elif op == "role":
        msgs[i] = {**m, "role": "assistant" if m["role"] == "user" else "user"}
    elif op == "empty_text":
        msgs[i] = {**m, "content": [*blocks, {"type": "text", "text": "  "}]}
    elif op == "empty_content":
        msgs[i] = {**m, "content": []}
    elif op == "untyped":
        msgs[i] = {**m, "content": [*blocks, {"text": "no type"}]}
    elif op == "breakpoint" and blocks:
        j = at % len(blocks)
        blocks[j] = {**blocks[j], "cache_control": {"type": "ephemeral", "ttl": "1h" if at % 2 else "5m"}}
        msgs[i] = {**m, "content": blocks}
    elif op == "drop_block":
        msgs[i] = {**m, "content": blocks[:-1] or "x"}
    elif op == "unsign":
        blocks = [{k: v for k, v in b.items() if k != "signature"} for b in blocks]
        msgs[i] = {**m, "content": blocks}
    elif op == "prefill":
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": "Sure"}]})
    elif op == "system_bps":
        return {**body, "system": [{"type": "text", "text": f"s{k}", "cache_control": CC} for k in range(5)]}
    elif op == "auto":
        return {**body, "cache_control": CC, "messages": msgs}
    elif op == "unthink":  # an assistant turn's thinking left out (valid unless the API asks for it)
        msgs[i] = {**m, "content": [b for b in blocks if b.get("type") != "thinking"] or blocks}
    elif op == "user_turn":  # a new user turn: no tool loop going on
        msgs.append({"role": "user", "content": "next"})
    elif op == "no_messages":
        msgs = []
    return {**body, "messages": msgs}


OPS = [
    "drop",
    "repeat",
    "role",
    "empty_text",
    "empty_content",
    "untyped",
    "breakpoint",
    "drop_block",
    "unsign",
    "prefill",
    "system_bps",
    "auto",
    "unthink",
    "user_turn",
    "no_messages",
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv=conversations(), edits=st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 50)), max_size=3))
def test_stage_check_from_facts_names_the_rule_the_whole_body_check_names(
    conv: dict[str, Any], edits: list[tuple[str, int]]
) -> None:
    given_body = copy.deepcopy(conv)
    given_facts = _digest_blocks(given_body, {}, {})
    out = given_body
    for op, at in edits:
        if out["messages"]:
            out = _edit(out, op, at)
    if not isinstance(out.get("messages"), list):
        return
    out_facts = _stage_facts(out, given_body, given_facts, default_counter(), {})
    assert facts_stage_problem(out, out_facts, given_body, given_facts) == stage_problem(out, given_body)
    out_facts.count()
    assert out_facts.head + sum(out_facts.tokens) == default_counter().request(out)
    assert given_facts.head + sum(given_facts.tokens) == default_counter().request(given_body)


def test_message_table_keeps_at_most_its_byte_cap() -> None:
    table = _MessageTable(max_bytes=20_000)
    for i in range(500):
        msg = {"role": "user", "content": [{"type": "text", "text": f"message {i}"}]}
        table.put(i.to_bytes(16, "big"), (message_record(msg), 40, 10, ((b"d", 7, False),)))
        assert table.nbytes <= 20_000
    assert 0 < len(table.data) < 500
    assert table.get((499).to_bytes(16, "big")) is not None  # the newest kept, the oldest dropped
    assert table.get((0).to_bytes(16, "big")) is None


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv=conversations(), edits=st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 50)), max_size=3))
def test_record_pass_resumed_from_a_shorter_conversation_finds_what_a_whole_pass_finds(
    conv: dict[str, Any], edits: list[tuple[str, int]]
) -> None:
    """The message-rule pass goes on from its checkpoint of the same leading records (a conversation's
    earlier call): every prefix of the conversation, then the edited one, gives what a pass from the
    start gives."""
    body = conv
    for op, at in edits:
        if body["messages"]:
            body = _edit(body, op, at)
    msgs = body.get("messages")
    if not isinstance(msgs, list):
        return
    table = [message_record(m) for m in msgs]  # one object per message, as the per-message table holds
    validate._CHECKPOINTS.clear()
    for k in range(1, len(msgs) + 1):
        resumed = validate._record_problems(table[:k])
        with_none = dict(validate._CHECKPOINTS)
        validate._CHECKPOINTS.clear()
        assert resumed == validate._record_problems(table[:k]), k
        validate._CHECKPOINTS.update(with_none)
    # a later call that changed an earlier message takes no checkpoint it does not extend
    if len(msgs) > 2:
        changed = [*table[:1], message_record({"role": "assistant", "content": "x"}), *table[2:]]
        resumed = validate._record_problems(changed)
        validate._CHECKPOINTS.clear()
        assert resumed == validate._record_problems(changed)
