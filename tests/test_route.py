"""route: requests sent to a cheaper model by rules, valid on the target, priced honestly.

Through wrap() and the proxy (a subprocess) against the emulator; the saving is checked against an
independent run of the same conversation on the model asked for, with no plugin at all.
"""

from __future__ import annotations

import json
import os
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from tokensaver_plugins import route

import tokensaver
from tests.test_threads import BOUND, loop_kwargs, script
from tokensaver import load_run
from tokensaver.emulator import Emulator
from tokensaver.pricing import PriceTable
from tokensaver.testing import TEST_API_KEY, redis_url_for_test, start_proxy_process, stop_proxy_process

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "route"
OPENCLAW = json.loads((DOCS / "openclaw-captured.json").read_text())  # what OpenClaw 2026.9.6 sent
OPUS = "claude-opus-4-6"
HAIKU = "claude-haiku-4-5"
PRICES = PriceTable()
SUBAGENT_SYSTEM = "You are an agent for Claude Code, Anthropic's official CLI for Claude."
MAIN_SYSTEM = "You are Claude Code, Anthropic's official CLI for Claude."
READ = {"name": "Read", "description": "Read a file", "input_schema": {"type": "object", "properties": {}}}
TASK = {
    "name": "Task",
    "description": "Start a subagent",
    "input_schema": {"type": "object", "properties": {}},
}
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


def conversation(
    client: Any, system: str, turns: int, *, model: str = OPUS, tools: list[Any] | None = None
) -> list[Any]:
    """A conversation of ``turns`` calls, each answer appended, a long document in the first message."""
    msgs: list[dict[str, Any]] = [{"role": "user", "content": f"Summarize:\n{long_text(1)}"}]
    answers = []
    for k in range(turns):
        kwargs: dict[str, Any] = {"model": model, "max_tokens": 256, "system": system, "messages": msgs}
        if tools:
            kwargs["tools"] = tools
        msg = client.messages.create(**kwargs)
        answers.append(msg)
        msgs = [
            *msgs,
            {"role": "assistant", "content": msg.content[0].text},
            {"role": "user", "content": f"And {k}?"},
        ]
    return answers


def test_a_subagent_goes_to_haiku_and_stays_there_and_the_saving_is_against_the_model_asked(
    emu: Emulator, tmp_path: Path
) -> None:
    client = client_for(emu, tmp_path, ["route"], route={"rules": SUBAGENT_RULES})
    answers = conversation(client, SUBAGENT_SYSTEM, 4)
    assert [r.body["model"] for r in emu.requests] == [HAIKU] * 4
    assert {a.model for a in answers} == {HAIKU}  # the caller sees the model that answered
    routed_cost = sum(PRICES.get(HAIKU).cost(r.usage or {}) for r in emu.requests)

    # the same conversation, independently, on the model asked for and with no plugin
    with Emulator() as other:
        plain = client_for(other, tmp_path / "plain", [])
        conversation(plain, SUBAGENT_SYSTEM, 4)
        assert [r.body["model"] for r in other.requests] == [OPUS] * 4
        asked_cost = sum(PRICES.get(OPUS).cost(r.usage or {}) for r in other.requests)

    report = load_run(client.tokensaver.run.name, tmp_path / "runs").report().to_dict()
    totals = report["totals"]
    assert totals["cost_usd"] == pytest.approx(routed_cost, rel=1e-6)
    assert totals["counterfactual_usd"] == pytest.approx(asked_cost, rel=1e-4)
    assert totals["saved_usd"] == pytest.approx(asked_cost - routed_cost, rel=1e-4)
    (section,) = [s for s in report["sections"] if s["plugin"] == "route"]
    (row,) = section["rows"]
    assert (
        row["rule"] == "subagent" and row["to"] == HAIKU and row["calls"] == 4 and row["conversations"] == 1
    )
    assert row["saved_usd"] == pytest.approx(asked_cost - routed_cost, rel=1e-4)
    assert "4 calls routed" in section["summary"]


def test_the_main_conversation_stays_on_its_model_and_a_subagent_beside_it_is_routed(
    emu: Emulator, tmp_path: Path
) -> None:
    client = client_for(emu, tmp_path, ["route"], route={"rules": SUBAGENT_RULES})
    conversation(client, MAIN_SYSTEM, 2, tools=[READ, TASK])
    conversation(client, SUBAGENT_SYSTEM, 2, tools=[READ])
    assert [r.body["model"] for r in emu.requests] == [OPUS, OPUS, HAIKU, HAIKU]


def test_a_conversation_started_on_its_model_stays_there_when_a_later_call_matches(
    emu: Emulator, tmp_path: Path
) -> None:
    # the rule matches from the third message on; without switch = true the conversation keeps its model
    rules = [{"name": "later", "when": {"first": False}, "model": HAIKU}]
    client = client_for(emu, tmp_path, ["route"], route={"rules": rules})
    conversation(client, MAIN_SYSTEM, 3)
    assert [r.body["model"] for r in emu.requests] == [OPUS] * 3


def test_a_switch_that_does_not_pay_is_not_made_and_one_that_pays_is(emu: Emulator, tmp_path: Path) -> None:
    rules = [{"name": "later", "when": {"first": False}, "model": HAIKU, "switch": True}]
    # second call: one call so far, so one to come is expected; Haiku writing the whole prefix again
    # ($1.25/M) instead of Opus reading it ($0.50/M) is not paid back twice by one call's saving
    client = client_for(emu, tmp_path, ["route"], route={"rules": rules})
    conversation(client, MAIN_SYSTEM, 2)
    assert [r.body["model"] for r in emu.requests] == [OPUS, OPUS]
    # the same rule expecting the calls to come pays: the switch is made, and kept from there on
    emu.requests.clear()
    client = client_for(emu, tmp_path / "b", ["route"], route={"rules": rules, "switch_payback": 0.5})
    conversation(client, SUBAGENT_SYSTEM, 4)
    models = [r.body["model"] for r in emu.requests]
    assert models == [OPUS, HAIKU, HAIKU, HAIKU]
    # the switch threw the prompt cache away: Haiku wrote the whole prefix again
    assert (emu.requests[1].usage or {})["cache_read_input_tokens"] == 0
    report = load_run(client.tokensaver.run.name, tmp_path / "b" / "runs").report().to_dict()
    (section,) = [s for s in report["sections"] if s["plugin"] == "route"]
    (row,) = section["rows"]
    assert row["switches"] == 1 and row["switch_write_tokens"] > 3000 and row["calls"] == 3


def test_requests_are_fitted_to_the_target_and_the_emulator_accepts_them(
    emu: Emulator, tmp_path: Path
) -> None:
    rules = [{"name": "all", "when": {}, "model": HAIKU}]
    client = client_for(emu, tmp_path, ["route"], route={"rules": rules})
    # Claude Code's shape on a 4.6+ model: adaptive thinking, effort, a 128k max_tokens
    msg = client.messages.create(
        model="claude-opus-5-5",
        max_tokens=128_000,
        thinking={"type": "adaptive"},
        extra_body={
            "thinking": {"type": "adaptive", "display": "omitted"},
            "output_config": {"effort": "medium"},
            "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        },
        system=SUBAGENT_SYSTEM,
        messages=[{"role": "user", "content": "hi"}],
    )
    sent = emu.last.body
    assert emu.last.status == 200 and msg.model == HAIKU
    assert sent["model"] == HAIKU and sent["max_tokens"] == 64_000
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 32_000}  # Haiku 4.5 has no adaptive
    assert "output_config" not in sent  # nor effort
    assert sent["context_management"]["edits"][0]["type"] == "clear_thinking_20251015"  # thinking stays on
    # too few max_tokens for a 1024-token budget: thinking off, and clear_thinking (which needs it) goes
    small = route.fit(
        {**sent, "model": "claude-opus-5-5", "max_tokens": 1000, "thinking": {"type": "adaptive"}}, HAIKU
    )
    assert small["thinking"] == {"type": "disabled"} and "context_management" not in small
    # samplers a thinking request may not carry on the target are dropped
    client.messages.create(
        model="claude-sonnet-4-5",
        max_tokens=4000,
        extra_body={"temperature": 0.2, "top_p": 0.9},
        messages=[{"role": "user", "content": "hello"}],
    )
    assert emu.last.status == 200 and "top_p" not in emu.last.body and emu.last.body["temperature"] == 0.2


def test_a_prefill_is_not_routed_to_a_model_that_refuses_it(emu: Emulator, tmp_path: Path) -> None:
    rules = [{"name": "all", "when": {}, "model": "claude-sonnet-4-6"}]
    client = client_for(emu, tmp_path, ["route"], route={"rules": rules})
    prefill: list[Any] = [{"role": "user", "content": "Give JSON"}, {"role": "assistant", "content": "{"}]
    msg = client.messages.create(model="claude-opus-4-5", max_tokens=100, messages=prefill)
    assert emu.last.status == 200 and emu.last.body["model"] == "claude-opus-4-5" and msg.content
    # the emulator refuses the prefill on the target: proof the case is real
    direct = anthropic.Anthropic(base_url=emu.url, api_key=TEST_API_KEY, max_retries=0)
    with pytest.raises(anthropic.BadRequestError, match="prefill"):
        direct.messages.create(model="claude-sonnet-4-6", max_tokens=100, messages=prefill)
    (rec,) = client.tokensaver.records
    assert rec["plugins"]["route"]["kept"] == "prefill"


def test_rules_are_checked_in_wrap(emu: Emulator, tmp_path: Path) -> None:
    with pytest.raises(tokensaver.ConfigError, match="unknown condition 'tool'"):
        client_for(emu, tmp_path, ["route"], route={"rules": [{"when": {"tool": ["Read"]}, "model": HAIKU}]})
    with pytest.raises(tokensaver.ConfigError, match="model"):
        client_for(emu, tmp_path, ["route"], route={"rules": [{"when": {}}]})


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    with redis_url_for_test(tmp_path) as url:
        yield url


def test_replicas_on_a_shared_state_route_a_conversation_alike(
    emu: Emulator, tmp_path: Path, redis_url: str
) -> None:
    # the second replica sees the first's decision, though its own rule would not match the later call
    rules = [{"name": "first", "when": {"first": True}, "model": HAIKU}]
    a = client_for(emu, tmp_path / "a", ["route"], route={"rules": rules}, state=redis_url)
    b = client_for(emu, tmp_path / "b", ["route"], route={"rules": rules}, state=redis_url)
    alone = client_for(emu, tmp_path / "c", ["route"], route={"rules": rules})
    q: list[Any] = [{"role": "user", "content": "q"}]
    first = a.messages.create(model=OPUS, max_tokens=50, system=MAIN_SYSTEM, messages=q)
    msgs: list[Any] = [
        *q,
        {"role": "assistant", "content": first.content[0].text},
        {"role": "user", "content": "more"},
    ]
    b.messages.create(model=OPUS, max_tokens=50, system=MAIN_SYSTEM, messages=msgs)
    # a process on its own (embedded state) never saw the first call: the conversation stays on Opus
    alone.messages.create(model=OPUS, max_tokens=50, system=MAIN_SYSTEM, messages=msgs)
    assert [r.body["model"] for r in emu.requests] == [HAIKU, HAIKU, OPUS]


def test_the_decisions_kept_are_bounded(emu: Emulator, tmp_path: Path) -> None:
    rules = [{"name": "all", "when": {}, "model": HAIKU}]
    client = client_for(emu, tmp_path, ["route"], route={"rules": rules, "max_bytes": 16 * 512})
    for k in range(40):
        client.messages.create(model=OPUS, max_tokens=20, messages=[{"role": "user", "content": f"q{k}"}])
    (decisions,) = client.tokensaver.states["route"]["decisions"].values()
    assert 0 < len(decisions._local) <= 16


@pytest.mark.parametrize("rule_set", ["claude-code", "openclaw"])
def test_each_example_rule_set_through_the_proxy(emu: Emulator, tmp_path: Path, rule_set: str) -> None:
    path = DOCS / f"{rule_set}.toml"
    names = [r["name"] for r in tomllib.loads(path.read_text())["route"]["rules"]]
    env = {
        **os.environ,
        "TOKENSAVER_CONFIG": str(path),
        "TOKENSAVER_RUNS_DIR": str(tmp_path / "runs"),
    }
    emu.strict_roles = False  # the API takes consecutive user messages as one turn (OpenClaw sends two)
    proc, url = start_proxy_process("--upstream", emu.url, "--run", "route-run", env=env, cwd=tmp_path)
    try:
        with httpx.Client(timeout=30) as http:

            def post(body: dict[str, Any]) -> dict[str, Any]:
                r = http.post(f"{url}/v1/messages", json=body, headers=HEADERS)
                assert r.status_code == 200, r.text
                return r.json()

            main = {"model": OPUS, "max_tokens": 32000, "system": MAIN_SYSTEM, "tools": [READ, TASK]}
            answer = post({**main, "messages": [{"role": "user", "content": long_text(2, 500)}]})
            assert answer["model"] == OPUS
            if rule_set == "claude-code":
                sub = {"model": OPUS, "max_tokens": 32000, "system": SUBAGENT_SYSTEM, "tools": [READ]}
                side = {"model": "claude-sonnet-4-6", "max_tokens": 512, "system": MAIN_SYSTEM}
                asks = [sub, side]
                text = ["Explore the repository", "Write a 5-10 word title for this conversation"]
                for ask, words in zip(asks, text, strict=True):
                    got = post({**ask, "messages": [{"role": "user", "content": words}]})
                    assert got["model"] == HAIKU  # the caller sees the model that answered
            else:
                # the heartbeat OpenClaw sent (an isolated session), and a side call asked of Opus
                beat = {k: v for k, v in OPENCLAW["heartbeat"].items() if k != "stream"}
                assert beat["model"] == "claude-opus-4-6"
                assert post(beat)["model"] == HAIKU
                side = {
                    "model": OPUS,
                    "max_tokens": 512,
                    "messages": [{"role": "user", "content": "Name it"}],
                }
                assert post(side)["model"] == HAIKU
    finally:
        stop_proxy_process(proc)
    assert [r.body["model"] for r in emu.requests] == [OPUS, HAIKU, HAIKU]
    assert all(r.status == 200 for r in emu.requests)
    report = load_run("route-run", tmp_path / "runs").report().to_dict()
    (section,) = [s for s in report["sections"] if s["plugin"] == "route"]
    assert sorted(row["rule"] for row in section["rows"]) == sorted(names)
    assert all(row["calls"] == 1 and row["saved_usd"] > 0 for row in section["rows"])


def test_a_replay_bills_a_routed_call_at_the_model_that_answered(tmp_path: Path) -> None:
    from tokensaver.replay import replay
    from tokensaver.traces import load_conversation

    conv = load_conversation(REPO / "fixtures" / "claude-code-spotter" / "tool_heavy.json")
    rules = [{"name": "all", "when": {"model": ["claude-opus-*"]}, "model": HAIKU}]
    result = replay([conv], config={"plugins": ["route"], "record": False, "route": {"rules": rules}})
    assert result.billed and {b["model"] for b in result.billed} == {HAIKU}
    for billed, rec in zip(result.billed, result.records, strict=True):
        assert billed["cost_usd"] == pytest.approx(PRICES.get(HAIKU).cost(billed["usage"]))
        assert billed["cost_usd"] == pytest.approx(rec["cost_usd"])


# -- message threads: the SDK's tool runner (a create, then continues holding only the new messages) -----------

SONNET = "claude-sonnet-4-6"
SWITCH_LATER = [{"name": "later", "when": {"first": False}, "model": HAIKU, "switch": True}]
ALL_SONNET = [{"name": "sonnet", "when": {"model": ["claude-sonnet-*"]}, "model": HAIKU}]


def route_toml(path: Path, runs: Path, rules: list[dict[str, Any]], **extra: Any) -> None:
    """A config file with only ``route`` and ``rules`` (written out as TOML tables)."""
    lines = [f'runs_dir = "{runs}"', 'plugins = ["route"]', "[route]"]
    lines += [f"{k} = {v}" for k, v in extra.items()]
    for r in rules:
        when = ", ".join(
            f"{k} = {str(v).lower() if isinstance(v, bool) else json.dumps(v)}" for k, v in r["when"].items()
        )
        lines += [
            "[[route.rules]]",
            f'name = "{r["name"]}"',
            f"when = {{ {when} }}",
            f'model = "{r["model"]}"',
        ]
        if r.get("switch"):
            lines.append("switch = true")
    path.write_text("\n".join(lines) + "\n")


def tool_loop(
    emu: Emulator, tmp_path: Path, door: str, rules: list[dict[str, Any]], **over: Any
) -> tuple[list[Any], list[dict[str, Any]]]:
    """The weather tool loop (tests.test_threads) asked of Sonnet through wrap() or a proxy process with
    ``route`` and ``rules``: the messages the caller got, and the run's records."""
    script(emu)
    tmp_path.mkdir(parents=True, exist_ok=True)
    runs = tmp_path / "runs"
    kwargs = loop_kwargs(model=SONNET, **over)
    if door == "wrap":
        client = client_for(emu, tmp_path, ["route"], route={"rules": rules, "switch_payback": 0.1})
        messages = list(client.beta.messages.tool_runner(**kwargs))
        return messages, list(client.tokensaver.records)
    route_toml(tmp_path / "tokensaver.toml", runs, rules, switch_payback=0.1)
    proc, url = start_proxy_process(
        "--upstream", emu.url, "--run", "loop", "--config", str(tmp_path / "tokensaver.toml"), cwd=tmp_path
    )
    try:
        with anthropic.Anthropic(base_url=url, api_key=TEST_API_KEY, max_retries=0, timeout=BOUND) as client:
            messages = list(client.beta.messages.tool_runner(**kwargs))
        deadline = time.monotonic() + BOUND
        while len(load_run("loop", runs).records()) < len(emu.requests) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop_proxy_process(proc)
    return messages, load_run("loop", runs).records()


def thread_kinds(emu: Emulator) -> list[str]:
    return [str((r.body.get("thread") or {}).get("type")) for r in emu.requests]


@pytest.mark.parametrize("door", ["wrap", "proxy"])
def test_a_thread_stays_on_the_model_its_create_was_given(emu: Emulator, tmp_path: Path, door: str) -> None:
    # routed at its create: each continue holds only its new message and names the target too
    messages, records = tool_loop(emu, tmp_path / "routed", door, ALL_SONNET)
    assert [m.stop_reason for m in messages] == ["tool_use"] * 3 + ["end_turn"]
    assert thread_kinds(emu) == ["create", "continue", "continue", "continue"]
    assert all(r.status == 200 for r in emu.requests)
    assert all(len(r.body["messages"]) == 1 and "system" not in r.body for r in emu.requests[1:])
    assert [r.body["model"] for r in emu.requests] == [HAIKU] * 4
    assert [m.model for m in messages] == [HAIKU] * 4  # the caller sees the model that answered
    assert [r["plugins"]["route"]["target"] for r in records] == [HAIKU] * 4
    # the same loop without a thread switches to Haiku at its second call (the switch pays at payback 0.1)
    emu.requests.clear()
    tool_loop(emu, tmp_path / "plain", "wrap", SWITCH_LATER, thread=False)
    assert [r.body["model"] for r in emu.requests] == [SONNET, HAIKU, HAIKU, HAIKU]
    # on a message thread no switch is made: the continues stay on the model the thread was created on
    emu.requests.clear()
    messages, records = tool_loop(emu, tmp_path / "switch", door, SWITCH_LATER)
    assert [m.stop_reason for m in messages] == ["tool_use"] * 3 + ["end_turn"]
    assert thread_kinds(emu) == ["create", "continue", "continue", "continue"]
    assert all(r.status == 200 for r in emu.requests)
    assert [r.body["model"] for r in emu.requests] == [SONNET] * 4
    assert [m.model for m in messages] == [SONNET] * 4
    assert [(r["plugins"].get("route") or {}).get("kept") for r in records] == [None] + [
        "thread continue"
    ] * 3


def test_a_thread_is_not_routed_to_a_model_without_message_threads(emu: Emulator, tmp_path: Path) -> None:
    old = "claude-3-5-haiku-20241022"
    rules = [{"name": "old", "when": {}, "model": old}]
    messages, records = tool_loop(emu, tmp_path, "wrap", rules)
    assert [m.stop_reason for m in messages] == ["tool_use"] * 3 + ["end_turn"]
    assert all(r.status == 200 for r in emu.requests)
    assert thread_kinds(emu) == ["create", "continue", "continue", "continue"]
    assert [r.body["model"] for r in emu.requests] == [SONNET] * 4
    assert [r["plugins"]["route"]["kept"] for r in records] == ["message threads"] * 4
    # the emulator refuses a thread on that model: proof the case is real
    direct = anthropic.Anthropic(base_url=emu.url, api_key=TEST_API_KEY, max_retries=0)
    with pytest.raises(anthropic.BadRequestError, match="not supported"):
        direct.beta.messages.create(
            model=old,
            max_tokens=10,
            messages=[{"role": "user", "content": "hi"}],
            thread={"type": "create"},
            betas=["message-threads-2026-08-12"],
        )


def test_a_request_the_target_cannot_take_stays_on_its_model_and_the_report_says_why(
    emu: Emulator, tmp_path: Path
) -> None:
    old = "claude-3-5-haiku-20241022"
    rules = [
        {"name": "to-old", "when": {"system": ["old"]}, "model": old},
        {"name": "to-haiku", "when": {}, "model": HAIKU},
    ]
    client = client_for(emu, tmp_path, ["route"], route={"rules": rules})
    search = {"type": "tool_search_tool_regex_20251119", "name": "tool_search_tool_regex"}
    advisor = {"type": "advisor_20260301", "name": "advisor", "model": "claude-opus-4-7"}
    q: list[Any] = [{"role": "user", "content": "q"}]

    def ask(system: str, tools: list[Any], content: Any = q, model: str = "claude-opus-4-7") -> None:
        client.messages.create(model=model, max_tokens=50, system=system, tools=tools, messages=content)

    ask("old: search", [search, READ])  # tool search needs a 4.5+ model
    ask("old: advise", [advisor])  # Haiku 3.5 is no executor the advisor's pairs list
    ask("new: advise", [advisor])  # Haiku 4.5 with an Opus advisor is a pair the docs accept
    ask("new: search", [search, READ])  # Haiku 4.5 has tool search
    # over Haiku 4.5's 200k context window (the price table's), which Opus 4.7's 1M takes
    big = [{"role": "user", "content": long_text(3, 120_000)}]
    ask("new: long", [], big)
    assert all(r.status == 200 for r in emu.requests)
    assert [r.body["model"] for r in emu.requests] == [
        "claude-opus-4-7",
        "claude-opus-4-7",
        HAIKU,
        HAIKU,
        "claude-opus-4-7",
    ]
    notes = [r["plugins"]["route"] for r in client.tokensaver.records]
    assert [n.get("kept") for n in notes] == ["tool search", "advisor pair", None, None, "context window"]
    assert notes[4]["tokens"] > notes[4]["window"] == 200_000
    report = load_run(client.tokensaver.run.name, tmp_path / "runs").report().to_dict()
    (section,) = [s for s in report["sections"] if s["plugin"] == "route"]
    assert "2 calls routed" in section["summary"]
    for why in ("advisor pair", "context window", "tool search"):
        assert f"1 kept ({why})" in section["summary"]


def sse_models(text: str) -> list[str]:
    """The ``model`` each SSE event of a Messages stream names (message_start's message)."""
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            event = json.loads(line[6:])
            if event.get("type") == "message_start":
                out.append(event["message"]["model"])
    return out


def test_the_caller_sees_the_model_that_answered_in_json_and_sse(emu: Emulator, tmp_path: Path) -> None:
    rules = [{"name": "all", "when": {}, "model": HAIKU}]
    ask: dict[str, Any] = {"model": OPUS, "max_tokens": 50, "messages": [{"role": "user", "content": "q"}]}
    client = client_for(emu, tmp_path, ["route"], route={"rules": rules})
    assert client.messages.create(**ask).model == HAIKU
    with client.messages.stream(**ask) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert [e.message.model for e in events if e.type == "message_start"] == [HAIKU] and final.model == HAIKU
    raw = client.messages.with_raw_response.create(**ask, stream=True)
    assert sse_models(raw.http_response.read().decode()) == [HAIKU]
    route_toml(tmp_path / "tokensaver.toml", tmp_path / "runs", rules)
    proc, url = start_proxy_process(
        "--upstream", emu.url, "--run", "sse", "--config", str(tmp_path / "tokensaver.toml"), cwd=tmp_path
    )
    try:
        with httpx.Client(timeout=30) as http:
            got = http.post(f"{url}/v1/messages", json=ask, headers=HEADERS)
            assert got.status_code == 200 and got.json()["model"] == HAIKU
            with http.stream(
                "POST", f"{url}/v1/messages", json={**ask, "stream": True}, headers=HEADERS
            ) as r:
                assert r.status_code == 200
                assert sse_models(r.read().decode()) == [HAIKU]
    finally:
        stop_proxy_process(proc)
    assert [r.body["model"] for r in emu.requests] == [HAIKU] * 5
