"""Property tests: every transform keeps every request valid and the prefix stable turn over turn."""

from __future__ import annotations

import copy
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import conversations, turns
from tokensaver_plugins import cache_align, prune
from tokensaver_plugins._blocks import block_hash, prefix_slots, request_problems, strip_cc

from tokensaver.context import make_context
from tokensaver.emulator import validate

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PRUNE_TIGHT = {**prune.DEFAULTS, "max_tokens_budget": 3000, "keep_tool_uses": 2, "keep_last_messages": 2}
# economic cuts only (the budget is never reached), made easy to trigger on small conversations
PRUNE_ECON = {
    **prune.DEFAULTS,
    "keep_tool_uses": 2,
    "keep_last_messages": 2,
    "clear_min_tokens": 300,
    "clear_payback": 0.1,
}


def run(
    plugin: Any, name: str, bodies: list[dict[str, Any]], conf: dict[str, Any]
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Each body through one plugin, in order, with one shared state; (sent body, notes) per call."""
    states: dict[str, dict[str, Any]] = {}
    out = []
    for k, body in enumerate(bodies):
        frozen = copy.deepcopy(body)
        ctx = make_context(body, plugin=name, settings=conf, now=1_700_000_000 + 30 * k, states=states)
        new = plugin.tokensaver_transform_request(body, ctx)
        assert body == frozen, f"{name} mutated its input"
        out.append((new if new is not None else body, ctx.notes.get(name, {})))
    return out


def assert_valid(body: dict[str, Any]) -> None:
    assert request_problems(body) == []
    validate(json.loads(json.dumps(body)))  # the emulator's full API validation


def thinking_blocks(body: dict[str, Any]) -> list[str]:
    return [
        json.dumps(b, sort_keys=True)
        for m in body["messages"]
        if isinstance(m["content"], list)
        for b in m["content"]
        if b.get("type") in ("thinking", "redacted_thinking")
    ]


def as_list(m: dict[str, Any]) -> list[Any]:
    return [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]


def hashes(body: dict[str, Any]) -> list[str]:
    return [block_hash(s.block) for s in prefix_slots(body)]


@SETTINGS
@given(conversations())
def test_generator_makes_valid_conversations(conv: dict[str, Any]) -> None:
    for body in turns(conv):
        assert_valid(body)


@SETTINGS
@given(conversations())
def test_cache_align_valid_and_prefix_stable(conv: dict[str, Any]) -> None:
    results = run(cache_align, "cache_align", turns(conv), dict(cache_align.DEFAULTS))
    prev: list[str] | None = None
    for (sent, notes), body in zip(results, turns(conv), strict=True):
        assert_valid(sent)
        n_bp = sum(
            1 for s in prefix_slots(sent) if isinstance(s.block, dict) and s.block.get("cache_control")
        )
        assert n_bp + (1 if sent.get("cache_control") else 0) <= 4
        assert sorted(thinking_blocks(sent)) == sorted(thinking_blocks(body))
        cur = hashes(sent)
        if prev is not None:
            assert cur[: len(prev)] == prev, notes.get("bust")
            assert "bust" not in notes
        prev = cur


@SETTINGS
@given(conversations())
def test_cache_align_is_deterministic_for_retries(conv: dict[str, Any]) -> None:
    states: dict[str, dict[str, Any]] = {}
    for body in turns(conv):
        a = cache_align.tokensaver_transform_request(
            body, make_context(body, plugin="cache_align", now=1e9, states=states)
        )
        b = cache_align.tokensaver_transform_request(
            body, make_context(body, plugin="cache_align", now=1e9, states=states)
        )
        assert json.dumps(a) == json.dumps(b)


def colliding(conv: dict[str, Any]) -> dict[str, Any]:
    """The conversation with its tool uses on three paths, some re-run and some writes: superseded results."""
    out = copy.deepcopy(conv)
    k = 0
    for m in out["messages"]:
        if m["role"] != "assistant" or not isinstance(m["content"], list):
            continue
        for b in m["content"]:
            if b.get("type") == "tool_use":
                b["input"] = {"path": f"/src/{k % 3}.py"}
                if k % 4 == 3:
                    b["input"]["new_string"] = f"v{k}"
                k += 1
    return out


@SETTINGS
@given(conversations(max_turns=10), st.sampled_from(["tight", "economic", "superseded"]))
def test_prune_valid_and_stable_between_cuts(conv: dict[str, Any], mode: str) -> None:
    if mode == "superseded":
        conv = colliding(conv)
    bodies = turns(conv)
    results = run(prune, "prune", bodies, PRUNE_TIGHT if mode == "tight" else PRUNE_ECON)
    prev: dict[str, Any] | None = None
    for (sent, notes), body in zip(results, bodies, strict=True):
        assert_valid(sent)
        # assistant turns (thinking blocks with them) are kept verbatim or dropped whole, never edited
        originals = [json.dumps(m, sort_keys=True) for m in body["messages"] if m["role"] == "assistant"]
        for m in sent["messages"]:
            if m["role"] == "assistant":
                assert json.dumps(m, sort_keys=True) in originals
        assert set(thinking_blocks(sent)) <= set(thinking_blocks(body))
        # the task and the latest turn are kept
        assert sent["messages"][0]["content"][: len(as_list(body["messages"][0]))] == as_list(
            body["messages"][0]
        )
        last_sent, last_body = as_list(sent["messages"][-1]), as_list(body["messages"][-1])
        assert len(last_sent) == len(last_body)
        for a, b in zip(last_sent, last_body, strict=True):
            assert a == b or "identical to the earlier result" in str(a.get("content"))
        assert sent.get("system") == body.get("system") or [
            {"type": "text", "text": body["system"]}
        ] == sent.get("system")
        assert len(sent.get("tools") or []) == len(body.get("tools") or [])
        if prev is not None and "cut" not in notes:
            old = [strip_cc(m) for m in prev["messages"]]
            new = [strip_cc(m) for m in sent["messages"]]
            assert new[: len(old)] == old, "the prefix changed between two cuts"
        prev = sent


@SETTINGS
@given(conversations(max_turns=10))
def test_prune_then_cache_align_valid_and_stable_between_cuts(conv: dict[str, Any]) -> None:
    states: dict[str, dict[str, Any]] = {}
    prev: list[str] | None = None
    for k, body in enumerate(turns(conv)):
        now = 1_700_000_000 + 30 * k
        ctx = make_context(body, plugin="prune", settings=PRUNE_TIGHT, now=now, states=states)
        pruned = prune.tokensaver_transform_request(body, ctx) or body
        cut = "cut" in ctx.notes.get("prune", {})
        ctx2 = make_context(
            pruned, plugin="cache_align", settings=dict(cache_align.DEFAULTS), now=now, states=states
        )
        sent = cache_align.tokensaver_transform_request(pruned, ctx2) or pruned
        assert_valid(sent)
        cur = hashes(sent)
        if prev is not None and not cut:
            assert cur[: len(prev)] == prev
        prev = cur
