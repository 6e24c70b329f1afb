"""route: requests sent to a cheaper model by rules, valid on the target, priced honestly.

Through wrap() and the proxy (a subprocess) against the emulator; the saving is checked against an
independent run of the same conversation on the model asked for, with no plugin at all.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

import tokensaver
from tokensaver import load_run
from tokensaver.emulator import Emulator
from tokensaver.pricing import PriceTable
from tokensaver.testing import TEST_API_KEY, start_proxy_process, stop_proxy_process
from tokensaver_plugins import route

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "route"
OPUS = "claude-opus-4-6"
HAIKU = "claude-haiku-4-5"
PRICES = PriceTable()
SUBAGENT_SYSTEM = "You are an agent for Claude Code, Anthropic's official CLI for Claude."
MAIN_SYSTEM = "You are Claude Code, Anthropic's official CLI for Claude."
READ = {"name": "Read", "description": "Read a file", "input_schema": {"type": "object", "properties": {}}}
TASK = {"name": "Task", "description": "Start a subagent", "input_schema": {"type": "object", "properties": {}}}
HEADERS = {"x-api-key": TEST_API_KEY, "anthropic-version": "2023-06-01", "content-type": "application/json"}

SUBAGENT_RULES = [
    {
        "name": "subagent",
        "when": {"system": ["You are an agent for Claude Code"], "model": ["claude-opus-*"]},
        "model": HAIKU,
    }
]


def client_for(emu: Emulator, tmp_path: Path, plugins: list[str], **tables: Any) -> Any:
    base = anthropic.Anthropic(base_url=emu.url, api_key=TEST_API_KEY, max_retries=0, timeout=30)
    config = {"plugins": plugins, "runs_dir": str(tmp_path / "runs"), **tables}
    return tokensaver.wrap(base, config=config)


def long_text(seed: int, words: int = 3000) -> str:
    return " ".join(f"w{seed}x{i % 997}" for i in range(words))


def conversation(client: Any, system: str, turns: int, *, model: str = OPUS, tools: list[Any] | None = None) -> list[Any]:
    """A conversation of ``turns`` calls, each answer appended, a long document in the first message."""
    msgs: list[dict[str, Any]] = [{"role": "user", "content": f"Summarize:\n{long_text(1)}"}]
    answers = []
    for k in range(turns):
        kwargs: dict[str, Any] = {"model": model, "max_tokens": 256, "system": system, "messages": msgs}
        if tools:
            kwargs["tools"] = tools
        msg = client.messages.create(**kwargs)
        answers.append(msg)
        msgs = [*msgs, {"role": "assistant", "content": msg.content[0].text}, {"role": "user", "content": f"And {k}?"}]
    return answers


def test_a_subagent_goes_to_haiku_and_stays_there_and_the_saving_is_against_the_model_asked(
    emu: Emulator, tmp_path: Path
) -> None:
    client = client_for(emu, tmp_path, ["route"], route={"rules": SUBAGENT_RULES})
    answers = conversation(client, SUBAGENT_SYSTEM, 4)
    assert [r.body["model"] for r in emu.requests] == [HAIKU] * 4
    assert {a.model for a in answers} == {HAIKU}  # the caller sees the model that answered
    routed_cost = sum(PRICES.get(HAIKU).cost(r.usage) for r in emu.requests)

    # the same conversation, independently, on the model asked for and with no plugin
    with Emulator() as other:
        plain = client_for(other, tmp_path / "plain", [])
        conversation(plain, SUBAGENT_SYSTEM, 4)
        assert [r.body["model"] for r in other.requests] == [OPUS] * 4
        asked_cost = sum(PRICES.get(OPUS).cost(r.usage) for r in other.requests)

    report = load_run(client.tokensaver.run.name, tmp_path / "runs").report().to_dict()
    totals = report["totals"]
    assert totals["cost_usd"] == pytest.approx(routed_cost, rel=1e-6)
    assert totals["counterfactual_usd"] == pytest.approx(asked_cost, rel=1e-4)
    assert totals["saved_usd"] == pytest.approx(asked_cost - routed_cost, rel=1e-4)
    (section,) = [s for s in report["sections"] if s["plugin"] == "route"]
    (row,) = section["rows"]
    assert row["rule"] == "subagent" and row["to"] == HAIKU and row["calls"] == 4 and row["conversations"] == 1
    assert row["saved_usd"] == pytest.approx(asked_cost - routed_cost, rel=1e-4)
    assert "4 calls routed" in section["summary"]
