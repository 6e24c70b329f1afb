"""Deferred tools (``defer_loading: true``) and the ``tool_reference`` blocks that load them, over the real SDK
and HTTP to the emulator.

A deferred tool is not part of the prompt: no tokens, not in the prefix, so changing it changes nothing until
a ``tool_reference`` names it (in a ``tool_result``'s content: a client tool search such as Claude Code's
ToolSearch). The API expands the reference into the tool's definition where it sits: it bills the
definition's tokens there, the prefix before it is untouched (the cache holds across the load), and a
changed definition changes the prefix from the reference on. A thinking block is bound to the deferred
tools referenced before it, never to a later load.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import anthropic
import pytest

import tokensaver
from tokensaver.emulator import Emulator
from tokensaver.emulator.binding import BINDING_BETA
from tokensaver.pricing import PriceTable
from tokensaver.testing import emulator_clients

MODEL = "claude-sonnet-4-6"
PRICE = PriceTable().get(MODEL)
CC: dict[str, Any] = {"type": "ephemeral"}
SEARCH: dict[str, Any] = {
    "name": "ToolSearch",
    "description": "Load deferred tools: select:<name>. " + " ".join(f"hint{i}" for i in range(600)),
    "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}},
}
GLOB: dict[str, Any] = {
    "name": "Glob",
    "description": "Find files by pattern. " + " ".join(f"glob{i}" for i in range(300)),
    "input_schema": {"type": "object", "properties": {"pattern": {"type": "string"}}},
    "defer_loading": True,
}
PLACEHOLDER: dict[str, Any] = {
    "name": "DeferredToolPlaceholder",
    "description": "Never call this tool. " + " ".join(f"held{i}" for i in range(200)),
    "input_schema": {"type": "object", "properties": {}},
    "defer_loading": True,
}
SYSTEM = "You are a coding agent. " + " ".join(f"rule{i} holds" for i in range(400))


def eager(tool: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in tool.items() if k != "defer_loading"}


def changed(tool: dict[str, Any]) -> dict[str, Any]:
    return {**tool, "description": tool["description"] + " Changed."}


def search_use(tid: str) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": [{"type": "tool_use", "id": tid, "name": "ToolSearch", "input": {}}],
    }


def load(tid: str, *names: str) -> dict[str, Any]:
    refs = [{"type": "tool_reference", "tool_name": n} for n in names]
    return {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tid, "content": refs}]}


def history(turns: int) -> list[dict[str, Any]]:
    """An agent loop: find the tests, load Glob through ToolSearch, use it, read what it found."""
    msgs: list[dict[str, Any]] = [{"role": "user", "content": "Find the tests."}]
    steps = [
        (search_use("toolu_s"), load("toolu_s", "Glob")),
        (
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "toolu_g", "name": "Glob", "input": {}}],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "toolu_g", "content": "tests/test_a.py"}],
            },
        ),
        (
            {"role": "assistant", "content": [{"type": "text", "text": "Found tests/test_a.py."}]},
            {"role": "user", "content": "Now run it. " + " ".join(f"log{i}" for i in range(200))},
        ),
    ]
    for a, u in steps[: turns - 1]:
        msgs += [a, u]
    return msgs


def body(tools: list[dict[str, Any]], messages: list[dict[str, Any]], **over: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 64,
        "system": SYSTEM,
        "tools": copy.deepcopy(tools),
        "messages": copy.deepcopy(messages),
        "cache_control": CC,
    }
    out.update(over)
    return out


def full_usage(client: anthropic.Anthropic, b: dict[str, Any]) -> dict[str, Any]:
    out = client.post("/v1/messages", body=b, cast_to=object)
    assert isinstance(out, dict)
    u = out["usage"]
    assert isinstance(u, dict)
    return u


def usage(client: anthropic.Anthropic, b: dict[str, Any]) -> dict[str, Any]:
    u = full_usage(client, b)
    return {k: u[k] for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")}


def count(client: anthropic.Anthropic, b: dict[str, Any]) -> int:
    b = {k: v for k, v in b.items() if k != "max_tokens"}
    return int(client.messages.count_tokens(**b).input_tokens)


def total(u: dict[str, Any]) -> int:
    return int(u["input_tokens"] + u["cache_creation_input_tokens"] + u["cache_read_input_tokens"])


def test_unreferenced_deferred_tools_bill_nothing() -> None:
    """Usage with deferred tools nobody loads equals usage without them, even when they change."""
    with Emulator(virtual_clock=True) as deferred, Emulator(virtual_clock=True) as plain:
        dc, pc = emulator_clients(deferred)[0], emulator_clients(plain)[0]
        for turn in (1, 2, 3):
            msgs = [{"role": "user", "content": "Find the tests."}]
            for t in range(1, turn):
                msgs += [
                    {"role": "assistant", "content": f"Step {t} done."},
                    {"role": "user", "content": " ".join(f"out{t}x{i}" for i in range(300))},
                ]
            placeholder = changed(PLACEHOLDER) if turn == 3 else PLACEHOLDER  # unreferenced: no effect
            with_deferred = body([SEARCH, placeholder, GLOB], msgs)
            without = body([SEARCH], msgs)
            for emu in (deferred, plain):
                emu.clock.advance(10)  # type: ignore[union-attr]
            assert count(dc, with_deferred) == count(pc, without)
            got, want = usage(dc, with_deferred), usage(pc, without)
            assert got == want
            if turn > 1:
                assert got["cache_read_input_tokens"] > 0


def test_a_reference_bills_the_definition_where_it_sits(emulator_client: anthropic.Anthropic) -> None:
    client = emulator_client
    loaded = body([SEARCH, GLOB], history(2))
    unloaded = copy.deepcopy(loaded)
    unloaded["messages"][-1]["content"][0]["content"] = []
    first = history(1)
    definition = count(client, body([SEARCH, eager(GLOB)], first)) - count(client, body([SEARCH], first))
    assert definition > 300
    assert count(client, loaded) == count(client, unloaded) + definition
    # a reference to a tool that is not deferred is billed as sent: that tool is in the prompt already
    as_sent = body([SEARCH, eager(GLOB)], history(2))
    assert count(client, as_sent) < count(client, body([SEARCH, eager(GLOB)], history(1))) + definition


def test_the_cache_holds_across_a_load(emulator: Emulator, emulator_client: anthropic.Anthropic) -> None:
    client = emulator_client
    tools = [SEARCH, GLOB, PLACEHOLDER]
    u1 = usage(client, body(tools, history(1)))
    assert u1["cache_creation_input_tokens"] == total(u1)
    emulator.clock.advance(10)  # type: ignore[union-attr]
    u2 = usage(client, body(tools, history(2)))  # the load: read up to it, Glob's definition written after
    assert u2["cache_read_input_tokens"] == total(u1)
    emulator.clock.advance(10)  # type: ignore[union-attr]
    u3 = usage(client, body(tools, history(3)))  # after the load: all of it read
    assert u3["cache_read_input_tokens"] == total(u2)
    emulator.clock.advance(10)  # type: ignore[union-attr]
    # Glob changed: the prefix changes from its reference on, not before it (the tools before it hit)
    u4 = usage(client, body([SEARCH, changed(GLOB), PLACEHOLDER], history(3)))
    assert u4["cache_read_input_tokens"] == total(u1)
    grown = count(client, body([SEARCH, eager(changed(GLOB))], history(1))) - count(
        client, body([SEARCH, eager(GLOB)], history(1))
    )
    assert grown > 0
    assert total(u4) == total(u3) + grown


# -- preserved thinking: a block is bound to the deferred tools loaded before it --------------------------

THINKING_MODEL = "claude-fable-5-1"
DROP: Any = {"type": "adaptive", "block_binding": {"prefix_mismatch_behavior": "drop_block"}}


def test_a_thinking_block_is_bound_to_the_tools_loaded_before_it(emu: Emulator) -> None:
    client = emulator_clients(emu)[0]
    tools = [SEARCH, GLOB, PLACEHOLDER]

    def create(tools: list[dict[str, Any]], messages: list[Any], **kw: Any) -> Any:
        opts = {"model": THINKING_MODEL, "max_tokens": 512, "system": SYSTEM, "tools": tools, **kw}
        if kw.get("thinking"):
            return client.beta.messages.create(messages=messages, betas=[BINDING_BETA], **opts)
        return client.messages.create(messages=messages, **opts)

    emu.reply(
        [{"type": "thinking", "thinking": "Load Glob first."}, {"type": "tool_use", "name": "ToolSearch"}],
        [{"type": "thinking", "thinking": "Now glob."}, {"type": "tool_use", "name": "Glob"}],
    )
    messages: list[Any] = [{"role": "user", "content": "Find the tests."}]
    r1 = create(tools, messages)
    messages += [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in r1.content]},
        load(r1.content[1].id, "Glob"),
    ]
    r2 = create(tools, messages)
    messages += [
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in r2.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": r2.content[1].id, "content": "a.py"}],
        },
    ]
    # unchanged: the later load does not move the first block's prefix
    emu.reply("Done.")
    assert create(tools, messages).content[0].text == "Done."
    # an unreferenced deferred tool is no part of any prefix
    emu.reply("Done.")
    assert create([SEARCH, GLOB, changed(PLACEHOLDER)], messages).content[0].text == "Done."
    # Glob changed: only the block after its load fails; the one before it is kept
    edited = [SEARCH, changed(GLOB), PLACEHOLDER]
    emu.reply("Done.")
    reply = create(edited, messages, thinking=DROP)
    assert [(t.type, t.path, t.reason) for t in reply.input_transformations] == [
        ("thinking_dropped", "messages.3.content.0", "prefix_binding_mismatch")
    ]
    with pytest.raises(anthropic.BadRequestError) as info:
        create(edited, messages)
    message = info.value.body["error"]["message"]  # type: ignore[index]
    assert message.startswith("messages.3.content.0: Invalid `signature` in `thinking` block.")
    assert message.endswith("The `tools` list differs from when the block was created.")


# -- wrap() with no plugins: saved is 0 on a conversation that defers and loads tools ----------------------


def test_no_plugins_saves_nothing_on_a_deferring_conversation(tmp_path: Path) -> None:
    bodies = [body([SEARCH, GLOB, PLACEHOLDER], history(n)) for n in (1, 2, 3)]
    # a deferred definition changed after its load (the per-message tables must not keep the old one)
    bodies.append(body([SEARCH, changed(GLOB), PLACEHOLDER], history(3)))
    pm = tokensaver.get_plugin_manager({}, load_entrypoints=False)
    clock = [1_700_000_000.0]
    with Emulator(virtual_clock=True) as emu:
        base = anthropic.Anthropic(base_url=emu.url, api_key="sk-caller", max_retries=0, timeout=30)
        client = tokensaver.wrap(
            base,
            config={"plugins": [], "runs_dir": str(tmp_path / "runs")},
            plugin_manager=pm,
            run="deferred",
            clock=lambda: clock[0],
        )
        for b in bodies:
            clock[0] += 10
            emu.clock.set(clock[0])  # type: ignore[union-attr]
            emu.reply("Done.")
            client.messages.create(**copy.deepcopy(b))
        records = list(client.tokensaver.records)
    # what the same requests cost sent straight to the API without the tool nobody loads
    direct = []
    with Emulator(virtual_clock=True) as emu:
        plain = emulator_clients(emu)[0]
        t = 1_700_000_000.0
        for b in bodies:
            t += 10
            emu.clock.set(t)  # type: ignore[union-attr]
            emu.reply("Done.")
            b = {**b, "tools": [x for x in b["tools"] if x["name"] != PLACEHOLDER["name"]]}
            direct.append(PRICE.cost(full_usage(plain, b)))
    assert [r["cost_usd"] for r in records] == pytest.approx(direct, abs=1e-9)
    for r in records:
        assert r["counterfactual_usd"] == pytest.approx(r["cost_usd"], abs=1e-9)
        assert r["saved_usd"] == pytest.approx(0.0, abs=1e-9)
        assert r["estimate_error_usd"] == pytest.approx(0.0, abs=1e-9)


# -- the token figures (TokenCounter.request, the pipeline's records) follow the same rule ------------------


def _deferring_bodies() -> list[dict[str, Any]]:
    bodies = [body([SEARCH, GLOB, PLACEHOLDER], history(n)) for n in (1, 2, 3)]
    bodies.append(body([SEARCH, changed(GLOB), PLACEHOLDER], history(3)))  # changed after its load
    # a reference to a tool that is not deferred is counted as sent
    bodies.append(body([SEARCH, eager(GLOB), PLACEHOLDER], history(3)))
    return bodies


def test_token_counts_follow_the_billing_rule(emulator_client: anthropic.Anthropic) -> None:
    from tokensaver.tokens import TokenCounter, default_counter

    for b in _deferring_bodies():
        want = count(emulator_client, b)
        memo: dict[int, Any] = {}
        assert default_counter().request(b) == want
        assert default_counter().request(b, memo) == want
        assert default_counter().request(b, memo) == want  # the memo's counts again
        assert TokenCounter().request(b) == want  # a cold cache
    # without deferred tools: as before, each tool counted
    plain = body([SEARCH, eager(GLOB)], history(1))
    assert default_counter().request(plain) == count(emulator_client, plain)


def test_the_records_token_figures_are_what_the_requests_bill(tmp_path: Path) -> None:
    """wrap() with no plugins: tokens_original = tokens_sent = count_tokens = the usage billed, on a
    conversation with a tool nobody loads, a load, and a loaded definition that changes."""
    bodies = _deferring_bodies()
    with Emulator(virtual_clock=True) as emu:
        base = anthropic.Anthropic(base_url=emu.url, api_key="sk-caller", max_retries=0, timeout=30)
        client = tokensaver.wrap(
            base,
            config={"plugins": [], "runs_dir": str(tmp_path / "runs")},
            plugin_manager=tokensaver.get_plugin_manager({}, load_entrypoints=False),
            run="deferred-counts",
        )
        for b in bodies:
            emu.reply("Done.")
            client.messages.create(**copy.deepcopy(b))
        counted = [count(emulator_clients(emu)[0], b) for b in bodies]
        billed = [total(r.usage or {}) for r in emu.requests if r.path == "/v1/messages"]
        records = list(client.tokensaver.records)
    assert billed == counted
    assert [r["tokens_original"] for r in records] == counted
    assert [r["tokens_sent"] for r in records] == counted
