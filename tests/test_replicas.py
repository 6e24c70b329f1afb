"""Three ``tokensaver proxy`` replicas on one Redis send the bytes one proxy sends (issue 14, item 2).

Real trace conversations (the bundled fixtures: a 152-call Claude Code session long enough for
prune to cut, and a shorter one given a system prompt whose clock line changes on every call, so
cache_align moves it) are sent call by call round-robin across three proxy processes sharing one
real ``redis-server``, in front of one emulator; then the same calls through a single proxy with
the embedded state. The bodies that reach the emulator are byte-identical, the cache reads the
same, and the ledgers' saved figures the same. Redis killed mid-run: every call is still answered,
the records of the calls that ran without it carry the core ``state_lost`` flag and the report
says so; Redis back, the flag goes away.

Redis as in tests/test_state.py: ``$TOKENSAVER_TEST_REDIS_URL``, else a ``redis-server`` started
here; ``TOKENSAVER_REQUIRE_REDIS=1`` (CI) fails instead of skipping.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import anthropic
import pytest
from test_state import RedisServer, own_redis, redis_url  # noqa: F401  (fixtures)

from tokensaver.emulator import Emulator
from tokensaver.replay import _create_params
from tokensaver.report import Report
from tokensaver.run import load_run
from tokensaver.testing import TEST_API_KEY, start_proxy_process, stop_proxy_process
from tokensaver.traces import Conversation, fixtures_dir, load_conversation

FIXTURES = fixtures_dir()
LONG = "claude-code-spotter/258c7280-ae70-4798-800f-63464d01a85d.json"  # prune cuts twice
SHORT = "claude-code-spotter/6c2214d7-b87e-4432-8e41-22ba294ea584__agent-afc096d.json"
SYSTEM = "You are a careful coding agent working in the user's repository.\n"


def _stamped(conv: Conversation) -> Conversation:
    """``conv`` with a system prompt whose last line is the call's clock (a volatile line)."""
    calls = []
    for k, call in enumerate(conv.calls):
        t = call.t if call.t is not None else 1_700_000_000.0 + 60 * k
        stamp = datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")
        body = {**call.body, "system": SYSTEM + f"Current time: {stamp} UTC"}
        calls.append(type(call)(body=body, t=call.t, usage=call.usage, reply=call.reply))
    return Conversation(id=conv.id + "-stamped", source=conv.source, calls=calls, info=conv.info)


@pytest.fixture(scope="module")
def conversations() -> list[Conversation]:
    if FIXTURES is None:
        pytest.skip("the bundled fixtures/ folder is not here (not a source checkout)")
    return [load_conversation(FIXTURES / LONG), _stamped(load_conversation(FIXTURES / SHORT))]


def _start(emu: Emulator, state: str, tmp_path: Path, names: list[str]) -> list[tuple[Any, str]]:
    """One proxy per name, the default plugins, state ``state``, each its own runs and cache dirs."""
    out = []
    for name in names:
        cfg = tmp_path / f"{name}.toml"
        cfg.write_text(f'state = "{state}"\nruns_dir = "{tmp_path / "runs" / name}"\n')
        env = {
            **os.environ,
            "TOKENSAVER_CONFIG": str(cfg),
            "TOKENSAVER_CACHE_DIR": str(tmp_path / "cache" / name),
        }
        out.append(start_proxy_process("--upstream", emu.url, "--run", name, env=env))
    return out


def _stop(procs: list[tuple[subprocess.Popen[str], str]]) -> None:
    for p, _ in procs:
        stop_proxy_process(p)


class Sent:
    """What one run of the conversations produced: bodies that reached the emulator, usage, failures."""

    def __init__(self) -> None:
        self.bodies: list[str] = []
        self.usage: list[dict[str, Any]] = []
        self.failed: list[str] = []


def _send(
    emu: Emulator,
    urls: list[str],
    conversations: list[Conversation],
    *,
    between: Any = None,
) -> Sent:
    """Each conversation's calls in order, call k to ``urls[k % len(urls)]``; ``between(n)`` before call n."""
    emu.reset()
    clients = {
        u: anthropic.Anthropic(base_url=u, api_key=TEST_API_KEY, max_retries=0, timeout=60) for u in urls
    }
    accepted = {"model", "max_tokens", "messages", "system", "tools", "tool_choice", "temperature"}
    out, n = Sent(), 0
    try:
        for conv in conversations:
            t = 1_700_000_000.0
            for k, call in enumerate(conv.calls):
                if between is not None:
                    between(n)
                n += 1
                t = call.t if call.t is not None else t + 15.0
                emu.clock.set(t)  # type: ignore[union-attr]  # the fixture's clock is virtual
                emu.reply(call.reply or [{"type": "text", "text": "OK."}])
                before = len(emu.requests)
                try:
                    clients[urls[k % len(urls)]].messages.create(
                        **_create_params(accepted, call.body), timeout=60
                    )
                except anthropic.APIError as e:
                    out.failed.append(f"{conv.id} call {k}: {e}")
                    emu.replies.clear()
                    continue
                assert len(emu.requests) == before + 1, "a plugin called the model: replies would shift"
                rec = emu.requests[-1]
                out.bodies.append(json.dumps(rec.body, ensure_ascii=False))
                out.usage.append(dict(rec.usage or {}))
    finally:
        for c in clients.values():
            c.close()
    return out


def _records(tmp_path: Path, names: list[str]) -> list[dict[str, Any]]:
    return [r for name in names for r in load_run(name, tmp_path / "runs" / name).records()]


def _saved(records: list[dict[str, Any]]) -> list[tuple[str, float, float]]:
    """Per call (in time order of the conversation): conversation, saved and counterfactual dollars."""
    rows = [(str(r.get("conversation")), float(r.get("t") or 0), r) for r in records]
    rows.sort(key=lambda x: (x[0], x[1]))
    return [
        (c, round(float(r["saved_usd"]), 6), round(float(r["counterfactual_usd"]), 6)) for c, _, r in rows
    ]


FLEET = [f"replica{i}" for i in range(3)]  # the replicas' run names
R = TypeVar("R")


def _fleet_then_single(
    emu: Emulator, state: str, tmp_path: Path, send: Callable[[list[str]], R]
) -> tuple[R, R]:
    """``send`` round-robin through the FLEET of proxies on ``state``, then through one proxy ("single")
    on the embedded state: (what the fleet gave, what the single proxy gave)."""
    procs = _start(emu, state, tmp_path, FLEET)
    try:
        three = send([u for _, u in procs])
    finally:
        _stop(procs)
    procs = _start(emu, "embedded", tmp_path, ["single"])
    try:
        one = send([procs[0][1]])
    finally:
        _stop(procs)
    return three, one


def _first_difference(a: list[str], b: list[str]) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            c = next((j for j in range(min(len(x), len(y))) if x[j] != y[j]), min(len(x), len(y)))
            return f"call {i} differs at char {c}: {x[max(0, c - 80) : c + 80]!r} vs {y[max(0, c - 80) : c + 80]!r}"
    return f"{len(a)} vs {len(b)} calls"


def test_three_replicas_on_one_redis_send_the_bytes_of_one_proxy(
    emu: Emulator,
    redis_url: str,  # noqa: F811
    conversations: list[Conversation],
    tmp_path: Path,
) -> None:
    three, one = _fleet_then_single(emu, redis_url, tmp_path, lambda urls: _send(emu, urls, conversations))

    assert not one.failed and not three.failed
    n = sum(len(c.calls) for c in conversations)
    assert len(one.bodies) == len(three.bodies) == n
    # the run had the decisions the test is about: prune cut and cache_align moved the clock line
    single = _records(tmp_path, ["single"])
    notes = [r.get("plugins") or {} for r in single]
    assert sum(1 for p in notes if (p.get("prune") or {}).get("cut")) >= 1
    assert sum(1 for p in notes if (p.get("cache_align") or {}).get("moved")) >= 1
    assert "Current time" not in one.bodies[-1].split('"messages"')[0]  # moved out of system

    assert three.bodies == one.bodies, _first_difference(three.bodies, one.bodies)
    reads = [u.get("cache_read_input_tokens", 0) for u in one.usage]
    assert [u.get("cache_read_input_tokens", 0) for u in three.usage] == reads
    assert sum(reads) > 0
    assert _saved(_records(tmp_path, FLEET)) == _saved(single)
    assert not any(r.get("state_lost") for r in _records(tmp_path, FLEET))


def test_redis_going_away_mid_run_fails_open_flags_the_calls_and_recovers(
    emu: Emulator,
    own_redis: RedisServer,  # noqa: F811
    conversations: list[Conversation],
    tmp_path: Path,
) -> None:
    procs = _start(emu, own_redis.url, tmp_path, FLEET)
    conv = conversations[1]  # the stamped one: cache_align's moved line is a shared decision
    marks: dict[str, float] = {}

    def between(n: int) -> None:
        if n == 6:
            own_redis.stop()
            marks["down"] = time.time()
        if n == 12:
            own_redis.start()
            time.sleep(BACKOFF_WAIT)  # the replicas try again within their backoff (5 s at most)
            marks["up"] = time.time()

    try:
        sent = _send(emu, [u for _, u in procs], [conv], between=between)
        # and a new conversation after the outage: shared again, nothing lost
        again = _send(emu, [u for _, u in procs], [_renamed(conv)])
    finally:
        _stop(procs)
    assert not sent.failed and not again.failed  # every call answered
    assert len(sent.bodies) == len(conv.calls)
    records = _records(tmp_path, FLEET)
    lost = [r for r in records if r.get("state_lost")]
    during = [r for r in records if marks["down"] <= float(r.get("t") or 0) < marks["up"]]
    assert len(during) >= 6 and all(r.get("state_lost") for r in during)
    after = [r for r in records if float(r.get("t") or 0) >= marks["up"]]
    assert len(after) >= len(conv.calls) and not any(r.get("state_lost") for r in after)
    for name in FLEET:  # each replica's report says how many of its calls ran without the state
        run = load_run(name, tmp_path / "runs" / name)
        n = sum(1 for r in run.records() if r.get("state_lost"))
        report = Report.from_run(run)
        assert report.to_dict()["totals"]["state_lost"] == n
        if n:
            assert f"state lost on {n} call" in report.to_table()
            assert f"state lost on {n} call" in report.to_markdown()
    assert len(lost) >= 6


BACKOFF_WAIT = 6.0


def _renamed(conv: Conversation) -> Conversation:
    tag = uuid.uuid4().hex[:8]
    calls = []
    for call in conv.calls:
        msgs = [dict(m) for m in call.body["messages"]]
        first = msgs[0]
        content = first.get("content")
        if isinstance(content, str):
            first["content"] = f"[{tag}] " + content
        else:
            first["content"] = [{"type": "text", "text": f"[{tag}]"}, *list(content or [])]
        calls.append(type(call)(body={**call.body, "messages": msgs}, t=call.t, reply=call.reply))
    return Conversation(id=conv.id + tag, source=conv.source, calls=calls)


THREADS = ["message-threads-2026-08-12"]
RULES = "You are a careful weather assistant. " + " ".join(f"Rule {i}: answer briefly." for i in range(300))


def _station_log(city: str) -> str:
    return f"sunny in {city}\n" + "".join(
        f"2026-01-01 12:00:{i % 60:02d} INFO station {i} in {city} reports 21 C\n" for i in range(300)
    )


def _thread_run(emu: Emulator, urls: list[str]) -> list[str]:
    """A message thread: its create to ``urls[0]``, each continue to the next replica round-robin."""
    emu.reset()
    emu.reply(*[f"answer {i}" for i in range(5)])
    clients = [anthropic.Anthropic(base_url=u, api_key=TEST_API_KEY, max_retries=0, timeout=60) for u in urls]
    try:
        msg = clients[0].beta.messages.create(
            model="claude-sonnet-4-6",
            max_tokens=64,
            betas=THREADS,
            thread={"type": "create"},
            system=RULES,
            messages=[{"role": "user", "content": _station_log("Paris")}],
        )
        for i, city in enumerate(["Rome", "Oslo", "Lima", "Kyiv"], 1):
            msg = clients[i % len(clients)].beta.messages.create(
                model="claude-sonnet-4-6",
                max_tokens=64,
                betas=THREADS,
                thread={"type": "continue", "previous_message_id": msg.id},
                messages=[{"role": "user", "content": _station_log(city)}],
            )
    finally:
        for c in clients:
            c.close()
    assert [r.status for r in emu.requests] == [200] * 5
    ids = [r.response["id"] for r in emu.requests if r.response]  # the emulator's ids go on counting
    out = [json.dumps(r.body, ensure_ascii=False) for r in emu.requests]
    return [_renumber(b, ids) for b in out]


def _renumber(body: str, ids: list[str]) -> str:
    for i, rid in enumerate(ids):
        body = body.replace(f'"{rid}"', f'"reply {i}"')
    return body


def test_a_thread_continued_on_another_replica_is_known_there(
    emu: Emulator,
    redis_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    three, one = _fleet_then_single(emu, redis_url, tmp_path, lambda urls: _thread_run(emu, urls))
    assert three == one, _first_difference(three, one)
    records = _records(tmp_path, FLEET)
    assert len(records) == 5
    assert all(r["stages"] and not r["errors"] for r in records)  # every continue was transformed
    assert _saved(records) == _saved(_records(tmp_path, ["single"]))
