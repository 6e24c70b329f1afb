"""A stage's output messages found in the per-message table (a rewrite the stage made on the
conversation's previous call, parsed anew) take their record, size and counts from it: the stage check
and the counts must be those a fresh process gives, and a message whose serialization hides a type
(a tuple for a list) is never taken from the table. The records' rule results, found once per call,
are shared by the bodies whose records are equal, never by one that differs.
"""

from __future__ import annotations

import copy
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import conversations
from test_core_incremental import OPS, _edit

from tokensaver import pipeline
from tokensaver.pipeline import _digest_blocks, _MessageTable, _stage_facts
from tokensaver.tokens import default_counter
from tokensaver.validate import facts_stage_problem, stage_problem


def _check(given_body: dict[str, Any], out: dict[str, Any]) -> tuple[Any, ...]:
    """What the core finds of ``out`` as a stage's output of ``given_body`` (both parsed anew)."""
    given_body, out = orjson.loads(orjson.dumps(given_body)), orjson.loads(orjson.dumps(out))
    memo: dict[int, Any] = {}
    facts: dict[int, Any] = {}
    given_facts = _digest_blocks(given_body, memo, facts)
    out_facts = _stage_facts(out, given_body, given_facts, default_counter(), memo, facts)
    problem = facts_stage_problem(out, out_facts, given_body, given_facts)
    assert problem == stage_problem(out, given_body)
    if problem is None:
        out_facts.count()
        assert out_facts.head + sum(out_facts.tokens) == default_counter().request(out)
    return problem, out_facts.records, out_facts.tokens if problem is None else None, out_facts.sizes


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    conv=conversations(),
    edits=st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 50)), min_size=1, max_size=3),
)
def test_a_stage_output_seen_before_gives_the_facts_a_fresh_table_gives(
    conv: dict[str, Any], edits: list[tuple[str, int]]
) -> None:
    body = copy.deepcopy(conv)
    out = body
    for op, at in edits:
        if out["messages"]:
            try:
                out = _edit(out, op, at)
            except ZeroDivisionError:  # (the helper's breakpoint edit on a message emptied before)
                continue
    if not isinstance(out.get("messages"), list):
        return
    kept = pipeline._MESSAGES
    try:
        pipeline._MESSAGES = _MessageTable()
        fresh = _check(body, out)
        again = _check(body, out)  # the same output on the next call: its messages are in the table
    finally:
        pipeline._MESSAGES = kept
    assert again == fresh


def test_a_tuple_content_is_not_taken_for_the_list_it_serializes_as() -> None:
    msgs: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "text", "text": "hello"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "hi"}]},
        {"role": "user", "content": [{"type": "text", "text": "again"}]},
    ]
    body = {"model": "claude-sonnet-4-6", "max_tokens": 8, "messages": msgs}
    edited = {**body, "messages": [*msgs[:2], {"role": "user", "content": [{"type": "text", "text": "new"}]}]}
    kept = pipeline._MESSAGES
    try:
        pipeline._MESSAGES = _MessageTable()
        assert _check(body, edited)[0] is None  # a list: valid, and now in the table
        memo: dict[int, Any] = {}
        facts: dict[int, Any] = {}
        given_facts = _digest_blocks(body, memo, facts)
        as_tuple = {
            **edited,
            "messages": [*msgs[:2], {"role": "user", "content": ({"type": "text", "text": "new"},)}],
        }
        out_facts = _stage_facts(as_tuple, body, given_facts, default_counter(), memo, facts)
        problem = facts_stage_problem(as_tuple, out_facts, body, given_facts)
    finally:
        pipeline._MESSAGES = kept
    assert problem == stage_problem(as_tuple, body) is not None


def test_equal_records_share_their_rule_results_and_others_do_not() -> None:
    msgs: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "text", "text": "hello"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "x", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]},
    ]
    body = {"model": "claude-sonnet-4-6", "max_tokens": 8, "messages": msgs}
    given_facts = _digest_blocks(body, {}, {})
    # a stage that shortened the result: the same records (the rules see the same shape)
    shorter = {
        **body,
        "messages": [*msgs[:2], {**msgs[2], "content": [{**msgs[2]["content"][0], "content": "k"}]}],
    }
    out_facts = _stage_facts(shorter, body, given_facts, default_counter(), {})
    assert facts_stage_problem(shorter, out_facts, body, given_facts) is None
    # the next stage drops the tool_result: its records differ, its rules are found anew
    broken = {
        **shorter,
        "messages": [*msgs[:2], {"role": "user", "content": [{"type": "text", "text": "x"}]}],
    }
    broken_facts = _stage_facts(broken, shorter, out_facts, default_counter(), {})
    problem = facts_stage_problem(broken, broken_facts, shorter, out_facts)
    assert problem == stage_problem(broken, shorter) is not None
