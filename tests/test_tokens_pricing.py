"""Token counting (offline, cached per block) and the price table."""

from __future__ import annotations

import pytest

from tokensaver.pricing import PriceTable, normalize_usage
from tokensaver.tokens import TokenCounter, count_text

TOOL = {
    "name": "read",
    "description": "Read a file",
    "input_schema": {"type": "object", "properties": {"p": {"type": "string"}}},
}


def test_counts_offline_and_cache_control_does_not_change_counts() -> None:
    assert count_text("hello world") == 2
    fresh = TokenCounter()
    with_cc = fresh.block({**TOOL, "cache_control": {"type": "ephemeral"}})
    assert with_cc == TokenCounter().block(TOOL) == fresh.block(TOOL)
    text = {"type": "text", "text": "some words here"}
    assert fresh.block({**text, "cache_control": {"type": "ephemeral"}}) == fresh.block(text)


def test_request_count_grows_with_content() -> None:
    c = TokenCounter()
    small = {"messages": [{"role": "user", "content": "hi"}]}
    big = {"system": "You are terse. " * 50, "tools": [TOOL], "messages": small["messages"]}
    assert c.request(big) > c.request(small) + 100


def test_prices_exact_prefix_and_family_fallback() -> None:
    table = PriceTable()
    assert table.get("claude-sonnet-4-5-20250929").name == "claude-sonnet-4-5"
    assert table.get("anthropic.claude-haiku-4-5-20251001-v1:0").name == "claude-haiku-4-5"
    info = table.get("claude-opus-9-9")
    assert info.family == "opus" and info.fallback_from == "claude-opus-9-9"
    assert any("claude-opus-9-9" in w for w in table.warnings)
    # cache reads are not 0.1x of input on every model
    ratios = {round(table.get(m).cache_read / table.get(m).input, 3) for m in table.known()}
    assert len(ratios) > 1


def test_overrides_and_cost() -> None:
    table = PriceTable({"claude-sonnet-4-6": {"input": 1.0}})
    info = table.get("claude-sonnet-4-6")
    usage = {
        "input_tokens": 1_000_000,
        "cache_creation_input_tokens": 1_000_000,
        "cache_creation": {"ephemeral_1h_input_tokens": 1_000_000, "ephemeral_5m_input_tokens": 0},
        "cache_read_input_tokens": 1_000_000,
        "output_tokens": 1_000_000,
    }
    assert info.cost(usage) == pytest.approx(1.0 + info.cache_write_1h + info.cache_read + info.output)
    assert normalize_usage({"cache_creation_input_tokens": 10})["cache_creation_5m"] == 10
