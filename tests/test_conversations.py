"""Conversations that open alike keep their own id and their own decisions (tokensaver.conversations).

Two agents given one task send the same first request and then diverge; before, the conversation id
was a hash of model + system + first message, so they shared prune's cut and cache_align's moved
lines (fleet-wide on Redis). Real parts: the SDK over HTTP to the emulator through ``wrap()``, a real
proxy process, two proxies on one real ``redis-server`` (as tests/test_replicas.py).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

import anthropic
from strategies import tool_loop

import tokensaver
from tokensaver.conversations import EmbeddedIndex, RedisIndex, base_of, chains, message_digest
from tokensaver.emulator import Emulator
from tokensaver.emulator.validation import EmulatorError
from tokensaver.run import load_run
from tokensaver.state import State
from tokensaver.testing import (
    TEST_API_KEY,
    RedisServer,
    no_redis,
    redis_url_for_test,
    start_proxy_process,
    stop_proxy_process,
)

MODEL = "claude-sonnet-4-6"
T0 = 1_700_000_000.0
TASK = "Fix the failing test in the repository and explain the fix."
PRUNE = {
    "max_tokens_budget": 10_000,
    "trigger": 1.0,
    "target": 0.5,
    "keep_tool_uses": 2,
    "keep_last_messages": 4,
    "clear_stale": False,  # the budget cuts alone
}


def _log(tag: str, words: int) -> str:
    return "\n".join(f"{tag} line {i}: ok passed {i * 7} checks" for i in range(words // 6))


def agent(tag: str, steps: int, words: int) -> list[dict[str, Any]]:
    """One agent's messages: the shared task, then its own tool steps (tool ids alike across agents)."""
    return tool_loop(
        TASK, [("bash", {"command": f"step {k}"}, _log(f"{tag}{k}", words)) for k in range(steps)]
    )


def requests(msgs: list[dict[str, Any]], system: Any = None) -> list[dict[str, Any]]:
    """The conversation's requests, each ending on a user turn (the first: the task alone)."""
    out = []
    for n in range(1, len(msgs) + 1, 2):
        body: dict[str, Any] = {"model": MODEL, "max_tokens": 64, "messages": copy.deepcopy(msgs[:n])}
        if system is not None:
            body["system"] = system(n) if callable(system) else system
        out.append(body)
    return out


def as_sent(msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with string contents as text blocks (what prune sends for them, unchanged)."""
    return [
        {**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m["content"], str) else m
        for m in msgs
    ]


def interleave(*convs: list[Any]) -> list[tuple[int, Any]]:
    """Call k of each conversation in turn: (which conversation, its call)."""
    out = []
    for k in range(max(len(c) for c in convs)):
        out += [(i, c[k]) for i, c in enumerate(convs) if k < len(c)]
    return out


def send_wrapped(emu: Emulator, config: dict[str, Any], calls: list[tuple[int, Any]]) -> tuple[Any, list]:
    """Each call through one wrapped client; (the client, per call: (conversation, body the API got))."""
    base = anthropic.Anthropic(base_url=emu.url, api_key=TEST_API_KEY, max_retries=2, timeout=30)
    client = tokensaver.wrap(base, config={"record": False, **config}, clock=emu.clock.now)
    out = []
    for which, body in calls:
        emu.clock.advance(20)  # type: ignore[union-attr]  # a virtual clock
        client.messages.create(**body)
        out.append((which, emu.last["body"]))
    return client, out


def test_two_agents_given_one_task_keep_their_own_prune_cuts(tmp_path: Path) -> None:
    # A's results are large (prune cuts it), B's small (never near the budget); both open alike,
    # with the same tool ids: on a shared id, A's cut cleared B's first results too
    a, b = requests(agent("A", 12, 700)), requests(agent("B", 12, 40))
    with Emulator(virtual_clock=True, start_time=T0) as emu:
        client, sent = send_wrapped(emu, {"plugins": ["prune"], "prune": PRUNE}, interleave(a, b))
        records = list(client.tokensaver.records)
    got_a = [body for which, body in sent if which == 0]
    got_b = [body for which, body in sent if which == 1]
    assert any(g["messages"] != r["messages"] for g, r in zip(got_a, a, strict=True))  # A was cut
    assert [as_sent(g["messages"]) for g in got_b] == [as_sent(r["messages"]) for r in b]  # B never was
    ids_a = [r["conversation"] for r, (which, _) in zip(records, interleave(a, b), strict=True) if which == 0]
    ids_b = [r["conversation"] for r, (which, _) in zip(records, interleave(a, b), strict=True) if which == 1]
    assert len(set(ids_a)) == 1  # every turn of A: one id
    assert len(set(ids_b[2:])) == 1 and ids_b[-1] != ids_a[0]  # B: its own from its third call on


def test_two_agents_keep_their_own_moved_volatile_lines(tmp_path: Path) -> None:
    # both start with the same system and date line; A's date changes (cache_align moves the line
    # out of the system from then on), B's never does: B's system must go out as B sent it
    def dated(day: int) -> list[dict[str, Any]]:
        return [
            {"type": "text", "text": "You are a careful coding agent. " + "Follow the rules. " * 200},
            {"type": "text", "text": f"Today's date: 2026-12-{day:02d}"},
        ]

    a = requests(agent("A", 8, 60), lambda n: dated(1 if n < 9 else 2))
    b = requests(agent("B", 8, 60), dated(1))
    with Emulator(virtual_clock=True, start_time=T0) as emu:
        _, sent = send_wrapped(emu, {"plugins": ["cache_align"]}, interleave(a, b))
    got_a = [body for which, body in sent if which == 0]
    got_b = [body for which, body in sent if which == 1]
    assert "2026-12-02" not in json.dumps(got_a[-1]["system"])  # A's changed line was moved
    assert all("2026-12-01" in json.dumps(g["system"]) for g in got_b)  # B's stays where B put it


def test_every_turn_and_retry_of_one_conversation_keeps_its_id(tmp_path: Path) -> None:
    # the system's date line rolls over mid-way (one conversation still: its history goes on)
    msgs = agent("A", 6, 60)
    calls = requests(
        msgs, lambda n: f"You are a coding agent.\nToday's date: 2026-12-{1 if n < 7 else 2:02d}"
    )
    with Emulator(virtual_clock=True, start_time=T0) as emu:
        emu.reply(EmulatorError(529, "overloaded_error", "Overloaded"))  # the first call is retried
        client, _ = send_wrapped(emu, {"plugins": ["prune", "cache_align"]}, [(0, c) for c in calls])
        last = calls[-1]["messages"]
        done = {"role": "assistant", "content": "Done."}
        # a side call branched off the latest request (Claude Code's forked calls) shares the id...
        client.messages.create(**{**calls[-1], "messages": [*last, done, _u("Suggest a next step.")]})
        # ...and the main line goes on under it
        client.messages.create(**{**calls[-1], "messages": [*last, done, _u("Now run the whole suite.")]})
        client.messages.create(
            **{
                **calls[-1],
                "messages": [*last, done, _u("Now run the whole suite."), _a("Ran."), _u("Thanks.")],
            }
        )
        records = list(client.tokensaver.records)
    assert [r["status"] for r in records[:2]] == [529, 200]  # a retry, recorded as its own attempt
    assert len({r["conversation"] for r in records}) == 1


def _proxy(emu: Emulator, tmp_path: Path, name: str, state: str) -> tuple[Any, str]:
    cfg = tmp_path / f"{name}.toml"
    prune = "".join(f"{k} = {json.dumps(v)}\n" for k, v in PRUNE.items())
    cfg.write_text(
        f'state = "{state}"\nruns_dir = "{tmp_path / "runs" / name}"\nplugins = ["prune"]\n[prune]\n{prune}'
    )
    env = {
        **os.environ,
        "TOKENSAVER_CONFIG": str(cfg),
        "TOKENSAVER_CACHE_DIR": str(tmp_path / "cache" / name),
    }
    return start_proxy_process("--upstream", emu.url, "--run", name, env=env)


def _through(urls: list[str], emu: Emulator, calls: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
    """Call k to ``urls[k % len(urls)]``: (which conversation, the body the API got)."""
    clients = [anthropic.Anthropic(base_url=u, api_key=TEST_API_KEY, max_retries=0, timeout=60) for u in urls]
    out = []
    try:
        for k, (which, body) in enumerate(calls):
            clients[k % len(clients)].messages.create(**body)
            out.append((which, emu.last["body"]))
    finally:
        for c in clients:
            c.close()
    return out


def _conversations(tmp_path: Path, names: list[str]) -> list[str]:
    records = [r for n in names for r in load_run(n, tmp_path / "runs" / n).records()]
    return [r["conversation"] for r in sorted(records, key=lambda r: r["t"])]


def test_through_a_proxy_and_two_proxies_on_redis_conversations_keep_apart(tmp_path: Path) -> None:
    a, b = requests(agent("A", 12, 700)), requests(agent("B", 12, 40))
    calls = interleave(a, b)
    with Emulator(virtual_clock=False) as emu:
        proc, url = _proxy(emu, tmp_path, "one", "embedded")
        try:
            sent = _through([url], emu, calls)
        finally:
            stop_proxy_process(proc)
        assert [as_sent(body["messages"]) for which, body in sent if which == 1] == [
            as_sent(r["messages"]) for r in b
        ]
        ids = _conversations(tmp_path, ["one"])
        with redis_url_for_test(tmp_path / "redis") as redis_url:
            procs = [_proxy(emu, tmp_path, n, redis_url) for n in ("r1", "r2")]
            try:
                fleet = _through([u for _, u in procs], emu, calls)
            finally:
                for p, _ in procs:
                    stop_proxy_process(p)
        fleet_ids = _conversations(tmp_path, ["r1", "r2"])
    # round-robin across two replicas on one Redis: the bodies and ids one proxy gave
    assert [body for _, body in fleet] == [body for _, body in sent]
    assert fleet_ids == ids
    of_a = {i for i, (which, _) in zip(ids, calls, strict=True) if which == 0}
    of_b = [i for i, (which, _) in zip(ids, calls, strict=True) if which == 1]
    assert len(of_a) == 1 and len(set(of_b[2:])) == 1 and of_b[-1] not in of_a


# -- the rules, on both indexes alike ------------------------------------------------------------


def _ids(index: Any, seq: list[list[dict[str, Any]]]) -> str:
    """Each request's conversation, named A, B, ... in order of appearance."""
    names: dict[str, str] = {}
    out = ""
    for msgs in seq:
        base = base_of({"model": MODEL}, message_digest(msgs[0]))
        cs = chains(base, msgs)
        cid = index.resolve("ns", base, cs[-1].hex(), cs)
        out += names.setdefault(cid, chr(65 + len(names)))
    return out


def _u(t: str) -> dict[str, Any]:
    return {"role": "user", "content": t}


def _a(t: str) -> dict[str, Any]:
    return {"role": "assistant", "content": t}


A1 = [_u("task")]
A2 = [*A1, _a("a"), _u("xA")]
A3 = [*A2, _a("a2"), _u("xA2")]
A4 = [*A3, _a("a3"), _u("xA3")]
B2 = [*A1, _a("a"), _u("xB")]
B3 = [*B2, _a("b2"), _u("xB2")]
B4 = [*B3, _a("b3"), _u("xB3")]
EDITED = [*A1, _a("a"), _u("xA, its result cleared by the caller"), _a("a2"), _u("xA2"), _a("a3"), _u("xA3")]
RULES = {
    "turns and retries": ([A1, A1, A2, A2, A3, A4], "AAAAAA"),
    "two agents, one task": ([A1, A1, A2, B2, A3, B3, A4, B4], "AAAAABAB"),
    "a side call, then the main line": ([A1, A2, [*A2, _a("a2"), _u("side")], A3, A4], "AAAAA"),
    "the task run again": ([A1, A2, A3, A1, [*A1, _a("z"), _u("y")]], "AAABB"),
    "the task run again, alike for two calls": ([A1, A2, A3, A1, A2, [*A2, _a("z"), _u("y")]], "AAABBB"),
    "the caller edits its history": ([A1, A2, A3, EDITED, [*EDITED, _a("q"), _u("r")]], "AAAAA"),
    "a call off an old point": ([A1, A2, A3, A4, [*A1, _a("a"), _u("side")]], "AAAAB"),
}


def test_the_rules_on_the_embedded_index_and_on_redis(tmp_path: Path) -> None:
    with redis_url_for_test(tmp_path / "redis") as url:
        state = State(url)
        try:
            for name, (seq, want) in RULES.items():
                state.backend.client.flushdb()  # type: ignore[attr-defined]
                assert _ids(EmbeddedIndex(), seq) == want, name
                assert _ids(RedisIndex(state.backend), seq) == want, name  # type: ignore[arg-type]
        finally:
            state.close()


def test_both_indexes_stay_bounded(tmp_path: Path) -> None:
    index = EmbeddedIndex(limit=50)
    for k in range(200):
        _ids(index, [[_u(f"task {k}")], [_u(f"task {k}"), _a("a"), _u("b")]])
    assert len(index._data) <= 50
    with redis_url_for_test(tmp_path / "redis") as url:
        state = State(url)
        try:
            client = state.backend.client  # type: ignore[attr-defined]
            client.flushdb()
            shared = RedisIndex(state.backend, limit=50)  # type: ignore[arg-type]
            for k in range(200):
                _ids(shared, [[_u(f"task {k}")], [_u(f"task {k}"), _a("a"), _u("b")]])
            keys = client.keys("tokensaver:conv:*")
            assert 0 < len(keys) <= 50 + 2  # the entries, and the namespace's order and sequence
            assert all(client.pttl(k) > 0 for k in keys)  # each with its TTL
        finally:
            state.close()


def test_a_plugin_tool_round_is_the_callers_request_it_continues() -> None:
    index = EmbeddedIndex()
    caller: dict[str, Any] = {"model": MODEL, "max_tokens": 64, "messages": A2}
    use = {"type": "tool_use", "id": "toolu_p1", "name": "tokensaver_expand", "input": {"ref": "r1"}}
    answer = {"type": "tool_result", "tool_use_id": "toolu_p1", "content": "the kept original"}
    rounds: list[dict[str, Any]] = [
        {
            **caller,
            "messages": [*A2, {"role": "assistant", "content": [use]}, {"role": "user", "content": [answer]}],
        }
    ]
    rounds.append(
        {
            **caller,
            "messages": [
                *rounds[0]["messages"],
                {"role": "assistant", "content": [use]},
                {"role": "user", "content": [answer]},
            ],
        }
    )
    ids = [index.identify(b, "k") for b in [{**caller, "messages": A1}, caller, *rounds]]
    ids.append(index.identify({**caller, "messages": A3}, "k"))  # the caller's next turn
    assert len(set(ids)) == 1


def test_with_the_state_lost_the_id_is_the_openings(tmp_path: Path) -> None:
    # a restart (a new pipeline's index) or Redis down: every replica gives the opening's id alike
    seq = [A1, A1, A2, B2, A3, B3, A4, B4]
    assert _ids(EmbeddedIndex(), seq) == "AAAAABAB"
    opening = base_of({"model": MODEL}, message_digest(A1[0]))
    if shutil.which("redis-server") is None:
        no_redis("no redis-server on PATH")
    server = RedisServer(tmp_path / "redis")
    server.start()
    state = State(server.url)
    try:
        shared = RedisIndex(state.backend)  # type: ignore[arg-type]
        assert _ids(shared, seq) == "AAAAABAB"
        server.stop()
        cs = chains(opening, B4)
        assert shared.resolve("ns", opening, cs[-1].hex(), cs) == opening
        assert state.lost
    finally:
        server.stop()
        state.close()
    cs = chains(opening, B4)
    assert EmbeddedIndex().resolve("ns", opening, cs[-1].hex(), cs) == opening
