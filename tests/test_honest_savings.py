""" "saved" is what the caller would have been billed without tokensaver minus what was billed.

Real HTTP to the emulator. The caller's counterfactual is checked against the caller's own requests
sent straight to a second, fresh emulator: what they would really have been billed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anthropic
import pytest

import tokensaver
from tokensaver.emulator import Emulator
from tokensaver.pricing import PriceTable
from tokensaver.proxy import ProxyServer
from tokensaver.report import Report

MODEL = "claude-sonnet-4-6"
PRICE = PriceTable().get(MODEL)
CC: dict[str, Any] = {"type": "ephemeral"}
CC1H: dict[str, Any] = {"type": "ephemeral", "ttl": "1h"}
TOOLS = [
    {
        "name": "run",
        "description": "run a shell command " + " ".join(f"opt{i}" for i in range(300)),
        "input_schema": {"type": "object", "properties": {"cmd": {"type": "string"}}},
    }
]
SYSTEM = "You are a careful coding agent. " + " ".join(f"rule{i} applies" for i in range(900))


def log(turn: int) -> str:
    return "LOG:" + " ".join(f"line{turn}x{i} ok" for i in range(500))


def conversation(mode: str, turns: int = 4) -> list[dict[str, Any]]:
    """The caller's own requests: a growing agent conversation, cache_control set as ``mode`` says."""
    bodies = []
    for n in range(1, turns + 1):
        msgs: list[dict[str, Any]] = [
            {"role": "user", "content": [{"type": "text", "text": "Fix the build."}]}
        ]
        for t in range(1, n):
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": f"Ran step {t}."}]})
            msgs.append({"role": "user", "content": [{"type": "text", "text": log(t)}]})
        tools = [dict(t) for t in TOOLS]
        system: list[dict[str, Any]] = [{"type": "text", "text": SYSTEM}]
        body: dict[str, Any] = {"model": MODEL, "max_tokens": 64, "tools": tools, "system": system}
        users = [m for m in msgs if m["role"] == "user"]
        if mode == "auto":
            body["cache_control"] = CC
        elif mode == "auto_1h":
            body["cache_control"] = CC1H
        elif mode == "own_1":
            system[0]["cache_control"] = CC
        elif mode in ("own_4", "own_1h", "own_4_fresh"):
            tools[-1]["cache_control"] = CC1H if mode == "own_1h" else CC
            system[0]["cache_control"] = CC1H if mode == "own_1h" else CC
            for m in users[-2:]:
                m["content"][-1] = {**m["content"][-1], "cache_control": CC}
            if mode == "own_4_fresh":
                # OpenClaw's shape: a fresh context block after its last breakpoint, not kept on the next
                # turn; automatic caching alone (its breakpoints dropped) would miss on every call
                users[-1]["content"].append({"type": "text", "text": f"Context: turn {n}, clock {n * 61}s."})
        body["messages"] = msgs
        bodies.append(body)
    return bodies


MODES = ["none", "auto", "auto_1h", "own_1", "own_4", "own_1h", "own_4_fresh"]
GAPS = [10.0, 400.0, 10.0, 10.0, 10.0]  # the 400 s gap expires 5m entries, not 1h ones


class Shrink:
    """Cuts each LOG text to its first words: the same bytes every turn, so prefixes stay cached."""

    @tokensaver.hookimpl
    def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> dict[str, Any]:
        for m in body["messages"]:
            m["content"] = [
                {**b, "text": b["text"][:200]}
                if b.get("type") == "text" and b["text"].startswith("LOG:")
                else b
                for b in m["content"]
            ]
        return body


class AddAuto:
    """Turns on automatic caching (what a cache-placing stage does for a caller without any)."""

    @tokensaver.hookimpl(trylast=True)
    def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> dict[str, Any] | None:
        if body.get("cache_control") or _has_breakpoints(body):
            return None
        return {**body, "cache_control": CC}


def _has_breakpoints(body: dict[str, Any]) -> bool:
    blocks = [*body.get("tools", []), *body.get("system", [])]
    blocks += [b for m in body["messages"] for b in m["content"]]
    return any("cache_control" in b for b in blocks)


def send(client: Any, emu: Emulator, bodies: list[dict[str, Any]], clock: list[float]) -> None:
    for i, body in enumerate(bodies):
        clock[0] += GAPS[i % len(GAPS)]
        emu.clock.set(clock[0])  # type: ignore[union-attr]
        emu.reply("Done.")
        client.messages.create(**body)


def direct_costs(bodies: list[dict[str, Any]], auto_only: bool = False) -> list[float]:
    """What each request is billed sent as it is (or with automatic caching added) to a fresh API."""
    costs = []
    with Emulator(virtual_clock=True) as emu:
        client = anthropic.Anthropic(base_url=emu.url, api_key="sk-direct", max_retries=0, timeout=30)
        t = 1_700_000_000.0
        for i, body in enumerate(bodies):
            t += GAPS[i % len(GAPS)]
            emu.clock.set(t)  # type: ignore[union-attr]
            emu.reply("Done.")
            if auto_only and _explicit(body) < 4 and "cache_control" not in body:
                # the one line any user can add: their own breakpoints stay (4 of them leave no slot)
                body = {**body, "cache_control": CC}
            msg = client.messages.create(**body)
            costs.append(PRICE.cost(msg.usage.model_dump()))
    return costs


def _explicit(body: dict[str, Any]) -> int:
    blocks = [*body["tools"], *body["system"], *(b for m in body["messages"] for b in m["content"])]
    return sum(1 for b in blocks if "cache_control" in b)


def wrapped_run(
    tmp_path: Path, plugins: dict[str, Any], bodies: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    pm = tokensaver.get_plugin_manager(plugins, load_entrypoints=False)
    clock = [1_700_000_000.0]
    with Emulator(virtual_clock=True) as emu:
        base = anthropic.Anthropic(base_url=emu.url, api_key="sk-caller", max_retries=0, timeout=30)
        client = tokensaver.wrap(
            base,
            config={"plugins": list(plugins), "runs_dir": str(tmp_path / "runs")},
            plugin_manager=pm,
            run="honest",
            clock=lambda: clock[0],
        )
        send(client, emu, bodies, clock)
        return list(client.tokensaver.records)


@pytest.mark.parametrize("mode", MODES)
def test_no_plugins_saves_exactly_nothing_whatever_the_callers_caching(tmp_path: Path, mode: str) -> None:
    bodies = conversation(mode)
    records = wrapped_run(tmp_path, {}, bodies)
    direct = direct_costs(bodies)
    assert [r["cost_usd"] for r in records] == pytest.approx(direct, abs=1e-9)
    for r in records:
        assert r["counterfactual_usd"] == pytest.approx(r["cost_usd"], abs=1e-9)
        assert r["saved_usd"] == pytest.approx(0.0, abs=1e-9)
        assert r["estimate_error_usd"] == pytest.approx(0.0, abs=1e-9)  # the emulator bills as the model
    totals = Report({"name": "honest"}, records).to_dict()["totals"]
    assert totals["saved_usd"] == pytest.approx(0.0, abs=1e-8)
    assert totals["counterfactual_usd"] == pytest.approx(sum(direct), abs=1e-8)
    assert totals["auto_usd"] == pytest.approx(sum(direct_costs(bodies, auto_only=True)), abs=1e-8)
    if mode.startswith("auto"):
        # the line is there already: the reference is the request as sent
        assert totals["auto_usd"] == pytest.approx(totals["counterfactual_usd"], abs=1e-8)
    if mode == "own_4_fresh":
        # its own breakpoints kept: never the every-call miss of automatic caching with them dropped
        assert totals["auto_usd"] < 1.05 * totals["counterfactual_usd"]
    assert totals["estimate_error_usd"] == pytest.approx(0.0, abs=1e-8)


@pytest.mark.parametrize("mode", ["none", "auto", "own_1", "own_4"])
def test_credited_only_with_what_the_stages_changed(tmp_path: Path, mode: str) -> None:
    bodies = conversation(mode)
    records = wrapped_run(tmp_path, {"shrink": Shrink(), "add_auto": AddAuto()}, bodies)
    direct = direct_costs(bodies)
    billed = [r["cost_usd"] for r in records]
    assert [r["counterfactual_usd"] for r in records] == pytest.approx(direct, abs=1e-9)
    assert [r["saved_usd"] for r in records] == pytest.approx(
        [d - b for d, b in zip(direct, billed, strict=True)], abs=1e-9
    )
    add_auto = [s["saved_usd"] for r in records for s in r["stages"] if s["plugin"] == "add_auto"]
    if mode == "none":
        assert sum(add_auto) > 0  # the caller had no caching: turning it on is a saving
    else:
        assert add_auto == [0.0] * len(records)  # the caller cached already: nothing to credit
    assert sum(r["saved_usd"] for r in records) > 0  # shrinking the logs is a saving in every mode


def test_stage_dollars_add_up_to_the_total(tmp_path: Path) -> None:
    records = wrapped_run(tmp_path, {"shrink": Shrink(), "add_auto": AddAuto()}, conversation("none", 5))
    for r in records:
        assert sum(s["saved_usd"] for s in r["stages"]) == pytest.approx(r["saved_usd"], abs=1e-7)
    d = Report({"name": "honest"}, records).to_dict()
    assert sum(s["saved_usd"] for s in d["stages"]) == pytest.approx(d["totals"]["saved_usd"], abs=1e-6)
    assert d["totals"]["saved_usd"] == pytest.approx(
        d["totals"]["counterfactual_usd"] - d["totals"]["cost_usd"], abs=1e-6
    )
    assert all(s["saved_usd"] > 0 for s in d["stages"])


def test_proxy_and_wrap_report_the_same_figures(tmp_path: Path) -> None:
    bodies = conversation("own_1")
    plugins = {"shrink": Shrink(), "add_auto": AddAuto()}
    via_wrap = wrapped_run(tmp_path / "w", plugins, bodies)
    pm = tokensaver.get_plugin_manager(plugins, load_entrypoints=False)
    clock = [1_700_000_000.0]
    with Emulator(virtual_clock=True) as emu:
        config = {"plugins": list(plugins), "runs_dir": str(tmp_path / "p")}
        with ProxyServer(config, upstream=emu.url, plugin_manager=pm, run="px", clock=lambda: clock[0]) as px:
            client = anthropic.Anthropic(base_url=px.url, api_key="sk-caller", max_retries=0, timeout=30)
            send(client, emu, bodies, clock)
            via_proxy = [r for r in px.records() if r.get("type", "call") == "call"]
    keys = ("cost_usd", "counterfactual_usd", "auto_usd", "saved_usd", "estimate_error_usd")
    assert len(via_proxy) == len(via_wrap) == len(bodies)
    for a, b in zip(via_wrap, via_proxy, strict=True):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
        assert [s["saved_usd"] for s in a["stages"]] == [s["saved_usd"] for s in b["stages"]]
    assert sum(r["saved_usd"] for r in via_proxy) > 0


def test_a_memoized_call_saves_its_counterfactual_cost(tmp_path: Path) -> None:
    body = conversation("auto", 2)[-1]
    clock = [1_700_000_000.0]
    with Emulator(virtual_clock=True) as emu:
        base = anthropic.Anthropic(base_url=emu.url, api_key="sk-caller", max_retries=0, timeout=30)
        config = {"plugins": ["memoize"], "memoize": {"dir": str(tmp_path / "m")}, "runs_dir": str(tmp_path)}
        client = tokensaver.wrap(base, config=config, run="memo", clock=lambda: clock[0])
        send(client, emu, [body, body], clock)
        assert len(emu.requests) == 1
        first, second = client.tokensaver.records
    assert second["short_circuit"] == "memoize" and second["cost_usd"] == 0
    # without tokensaver the second call is sent again, and reads what the first one cached
    direct = direct_costs([body, body])
    assert second["counterfactual_usd"] == pytest.approx(direct[1], abs=1e-9)
    assert second["saved_usd"] == pytest.approx(direct[1], abs=1e-9)
    assert first["saved_usd"] == pytest.approx(0.0, abs=1e-9)
    d = Report({"name": "memo"}, [first, second]).to_dict()
    memo = next(s for s in d["stages"] if s["plugin"] == "memoize")
    assert memo["saved_usd"] == pytest.approx(d["totals"]["saved_usd"], abs=1e-8)


def test_demo_headline_is_the_billed_saving_against_automatic_caching(tmp_path: Path) -> None:
    from tokensaver.replay import demo
    from tokensaver.traces import fixtures_dir, load_conversations

    folder = fixtures_dir()
    assert folder is not None
    convs = [c for c in load_conversations([folder]) if c.id == "tool_heavy"]
    out = demo(convs, config={"runs_dir": str(tmp_path)})
    billed_saving = out["auto_billed_usd"] - out["billed_usd"]
    assert out["headline_saved_usd"] == pytest.approx(billed_saving, abs=1e-6)
    assert out["headline_saved_pct"] == pytest.approx(100 * billed_saving / out["auto_billed_usd"], abs=1e-3)
    assert f"${out['headline_saved_usd']:,.4f}" in out["headline"]
    billed_input = out["base"].totals()["input_cost_usd"] - out["ours"].totals()["input_cost_usd"]
    assert billed_input == pytest.approx(billed_saving, abs=1e-6)  # the answers cost the same
    assert out["headline_saved_input_pct"] == pytest.approx(
        100 * billed_input / out["base"].totals()["input_cost_usd"], abs=1e-3
    )
    assert f"{out['headline_saved_input_pct']:.1f}% of the input side" in out["headline"]


def test_runs_lists_cost_counterfactual_and_saving(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tokensaver import cli

    records = wrapped_run(tmp_path, {"shrink": Shrink()}, conversation("own_1", 3))
    assert cli.main(["runs", "--runs-dir", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    saved = sum(r["saved_usd"] for r in records)
    without = sum(r["counterfactual_usd"] for r in records)
    assert "without [est.]" in out and f"${without:,.4f}" in out and f"${saved:,.4f}" in out
