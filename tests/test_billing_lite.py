"""Billing message by message (``billing.Lite``) gives the figures of billing block by block
(``billing.Prepared``): the same prefix hashes, token sums, level settings and breakpoints for any
body, resumed from an earlier body or a kept request or not; and the shadow caches' estimates of a
conversation replayed call by call are the same with it (memo on) as without it (memo off).
"""

from __future__ import annotations

import copy
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import conversations
from xxhash import xxh3_128_digest

from tokensaver.billing import Kept, Lite, Prepared, ShadowCaches, _keys, breakpoints
from tokensaver.pipeline import _digest_blocks
from tokensaver.pricing import PriceTable
from tokensaver.tokens import set_memo_enabled

CC5 = {"type": "ephemeral"}
CC1 = {"type": "ephemeral", "ttl": "1h"}


def _edit(body: dict[str, Any], op: str, at: int) -> dict[str, Any]:
    """``body`` after one change a stage or a caller's next turn might make (sharing the rest)."""
    msgs = list(body["messages"])
    if not msgs:
        return body
    i = at % len(msgs)
    m = msgs[i]
    content = m.get("content")
    blocks = list(content) if isinstance(content, list) else [{"type": "text", "text": str(content)}]
    j = at % len(blocks) if blocks else 0
    if op == "cc" and blocks:
        blocks[j] = {**blocks[j], "cache_control": CC1 if at % 3 == 0 else CC5}
        msgs[i] = {**m, "content": blocks}
    elif op == "drop":
        del msgs[i]
    elif op == "text":
        msgs[i] = {**m, "content": [*blocks, {"type": "text", "text": "  " if at % 2 else f"more {at}"}]}
    elif op == "string":
        msgs[i] = {**m, "content": f"said {at}" if at % 4 else ""}
    elif op == "empty":
        msgs[i] = {**m, "content": []}
    elif op == "replace" and blocks:
        blocks[j] = {"type": "text", "text": f"[{at} lines elided]"}
        msgs[i] = {**m, "content": blocks}
    elif op == "append":
        msgs.append(
            {"role": "user" if msgs[-1].get("role") == "assistant" else "assistant", "content": "next"}
        )
    elif op == "auto":
        return {**body, "cache_control": CC1 if at % 2 else CC5, "messages": msgs}
    elif op == "settings":
        return {**body, "speed": "fast", "tool_choice": {"type": "auto"}, "messages": msgs}
    elif op == "system":
        return {
            **body,
            "system": [{"type": "text", "text": f"s{at}", "cache_control": CC5}],
            "messages": msgs,
        }
    return {**body, "messages": msgs}


OPS = ["cc", "drop", "text", "string", "empty", "replace", "append", "auto", "settings", "system"]


def _same_figures(lite: Lite, prepared: Prepared, body: dict[str, Any]) -> None:
    assert [lite.hashes[j] for j in range(len(lite.hashes))] == prepared.hashes
    assert list(lite.prefix) == prepared.prefix
    assert lite.total == prepared.total
    assert lite.salts == prepared.salts
    assert lite.keys == _keys(prepared.blocks)
    for auto_only in (False, True):
        assert lite.breakpoints(body, auto_only) == breakpoints(body, prepared.blocks, auto_only=auto_only)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    conv=conversations(),
    edits=st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 60)), max_size=4),
    resume=st.sampled_from(["none", "like", "kept", "both"]),
)
def test_message_by_message_gives_the_block_by_block_figures(
    conv: dict[str, Any], edits: list[tuple[str, int]], resume: str
) -> None:
    body = copy.deepcopy(conv)
    memo: dict[int, Any] = {}
    digests = _digest_blocks(body, {}, memo).digests
    found: dict[int, Any] = {}
    first = Lite.of(body, memo, found, digests=digests)
    assert first is not None
    _same_figures(first, Prepared.of(body, {}), body)
    out = body
    for op, at in edits:
        out = _edit(out, op, at)
    like = first if resume in ("like", "both") else None
    also = Kept.of(first) if resume in ("kept", "both") else None
    later = Lite.of(out, memo, found, like=like, also=also)
    assert later is not None
    _same_figures(later, Prepared.of(out, {}), out)


def _estimates(calls: list[dict[str, Any]], memo_on: bool) -> list[tuple[float, float, tuple[float, ...]]]:
    """Each call's (counterfactual, auto, per-stage dollars) through one set of shadow caches, each
    call's stage bodies its request after one and two edits."""
    was = set_memo_enabled(memo_on)
    try:
        shadows = ShadowCaches(PriceTable())
        prices = PriceTable()
        out = []
        for n, (body, edits) in enumerate(calls):
            body = copy.deepcopy(body)
            facts: dict[int, Any] = {}
            digests = _digest_blocks(body, {}, facts).digests
            staged = [body]
            for op, at in edits:
                staged.append(_edit(staged[-1], op, at))
            # the stages' messages' digests by identity, as the pipeline finds them
            named = {id(m): (m, xxh3_128_digest(orjson.dumps(m))) for b in staged[1:] for m in b["messages"]}
            usage = {
                "input_tokens": 900,
                "cache_creation_input_tokens": 300,
                "cache_read_input_tokens": 2000 + n,
                "output_tokens": 50,
            }
            est = shadows.estimate(
                "k",
                1_700_000_000.0 + 30 * n,
                prices.get(str(body["model"])),
                body,
                staged[1:],
                usage=usage,
                sent=True,
                conversation="c",
                memo=facts,
                digests=digests,
                named=named,
            )
            out.append((est.counterfactual_usd, est.auto_usd, tuple(est.stage_usd)))
        return out
    finally:
        set_memo_enabled(was)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    conv=conversations(max_turns=6),
    edits=st.lists(
        st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 60)), min_size=1, max_size=2),
        min_size=1,
        max_size=6,
    ),
)
def test_a_conversations_estimates_are_the_same_billed_message_by_message(
    conv: dict[str, Any], edits: list[list[tuple[str, int]]]
) -> None:
    msgs = conv["messages"]
    # the conversation's calls: its growing prefixes (each ending with a user turn), in order
    ends = [k + 1 for k, m in enumerate(msgs) if m.get("role") == "user"]
    calls = [({**conv, "messages": msgs[:end]}, edits[k % len(edits)]) for k, end in enumerate(ends)]
    assert _estimates(calls, memo_on=True) == _estimates(calls, memo_on=False)
