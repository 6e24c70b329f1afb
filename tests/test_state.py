"""tokensaver.state: one interface, two backends (private diskcache dirs, a real redis-server).

Both backends pass the same contract: TTLs on the caller's (virtual) clock and on the real one, byte
caps per namespace, namespaces per API-key hash, a corrupt entry is a miss, add-if-absent, and
claims made by several processes at once have exactly one winner. Then the fleet: three
``tokensaver proxy`` processes sharing one Redis with memoize on, a repeated request sent
round-robin is answered upstream once; Redis killed mid-run: calls still answered and the ledger
says the state was lost; Redis back: memoize works again.

Redis: ``$TOKENSAVER_TEST_REDIS_URL`` (``.ci/run`` starts one), else a ``redis-server`` started here
when it is on PATH; without either the Redis cases skip saying why, unless
``TOKENSAVER_REQUIRE_REDIS=1`` (CI), where they fail.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import pytest
from aiohttp import web
from tokensaver_plugins import _model_summary, memoize, summarize

from tokensaver.config import load_config
from tokensaver.context import make_context
from tokensaver.emulator import Emulator
from tokensaver.errors import ConfigError
from tokensaver.proxy import BackgroundApp
from tokensaver.run import load_run
from tokensaver.state import DEFAULT_MAGIC, EMBEDDED, State, encode_entry
from tokensaver.testing import (
    TEST_API_KEY,
    RedisServer,
    no_redis,
    redis_url_for_test,
    start_proxy_process,
    stop_proxy_process,
)

REDIS_BIN = shutil.which("redis-server")
MODEL = "claude-sonnet-4-5"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a redis-server for this module: CI's, else one started here."""
    with redis_url_for_test(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, which the test may kill and restart."""
    if not REDIS_BIN:
        no_redis("no redis-server on PATH: the outage cases kill and restart one of their own")
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["embedded", "redis"])
def state(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[State]:
    monkeypatch.setenv("TOKENSAVER_CACHE_DIR", str(tmp_path / "cache"))
    st = State(EMBEDDED if request.param == "embedded" else request.getfixturevalue("redis_url"))
    yield st
    st.close()


def _name() -> str:
    return "t" + uuid.uuid4().hex[:10]  # each test its own store on the shared Redis


# -- the contract, both backends --------------------------------------------------------------


def test_ttl_holds_on_the_callers_clock(state: State) -> None:
    sp = state.space(_name(), "kh-a", cap=1 << 20)
    assert sp.save("k", {"a": 1}, ttl=10, now=1_000.0)
    assert sp.load("k", now=1_005.0) == {"a": 1}
    assert sp.load("k", now=1_010.5) is None
    assert sp.save("forever", {"b": 2}, now=1_000.0)
    assert sp.load("forever", now=1e12) == {"b": 2}


def test_ttl_holds_on_the_real_clock(state: State) -> None:
    sp = state.space(_name(), "kh-a", cap=1 << 20)
    assert sp.save("k", {"a": 1}, ttl=0.3)
    assert sp.get("k") is not None
    deadline = time.monotonic() + 10
    while sp.get("k") is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sp.get("k") is None  # the backend dropped it, not only the read
    assert sp.load("k") is None


def test_a_namespace_keeps_its_live_bytes_under_its_cap(state: State) -> None:
    cap = 60_000
    name = _name()
    sp, other = state.space(name, "kh-a", cap=cap), state.space(name, "kh-b", cap=cap)
    assert other.save("b0", {"text": "b" * 5_000})
    for i in range(40):
        assert sp.save(f"k{i}", {"text": f"{i:04d}" + "x" * 5_000})
        assert sp.usage() <= cap
        assert sp.load(f"k{i}") is not None  # the entry just written is kept
    assert sp.load("k0") is None  # the oldest went first
    assert sp.load("k39") == {"text": "0039" + "x" * 5_000}
    assert sp.usage() > cap // 2  # evicting only what it must
    assert other.load("b0") == {"text": "b" * 5_000}  # another key's namespace is untouched
    assert not sp.save("huge", {"text": "y" * (cap + 1)})  # larger than the cap: not stored
    assert sp.load("huge") is None


def test_expired_entries_leave_the_namespace_usage(state: State) -> None:
    sp = state.space(_name(), "kh-a", cap=1 << 20)
    for i in range(3):
        assert sp.save(f"old{i}", {"text": "o" * 2_000}, ttl=0.3)
    deadline = time.monotonic() + 10
    while any(sp.get(f"old{i}") is not None for i in range(3)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sp.save("fresh", {"text": "f"})
    raw = sp.get("fresh")
    assert raw is not None and sp.usage() == len(raw)


def test_namespaces_are_per_api_key_hash(state: State) -> None:
    name = _name()
    a, b = state.space(name, "kh-a", cap=1 << 20), state.space(name, "kh-b", cap=1 << 20)
    assert a.save("same", {"who": "a"}) and b.save("same", {"who": "b"})
    assert a.load("same") == {"who": "a"} and b.load("same") == {"who": "b"}
    a.delete("same")
    assert a.load("same") is None and b.load("same") == {"who": "b"}


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: raw.replace(b'"4"', b'"5"'),  # a flipped answer must never be served
        lambda raw: raw[:-7],  # truncated
        lambda raw: b"\x80\x04\x95pickle.",  # not ours (a pickle is never loaded)
        lambda raw: encode_entry(DEFAULT_MAGIC, "another key", {"n": "4"}, 0.0),  # moved entry
    ],
)
def test_a_corrupt_entry_is_a_miss_and_is_deleted(state: State, damage: Any, caplog: Any) -> None:
    sp = state.space(_name(), "kh-a", cap=1 << 20)
    assert sp.save("k", {"n": "4"})
    raw = sp.get("k")
    assert isinstance(raw, bytes)
    sp.set("k", damage(raw), None)
    with caplog.at_level(logging.WARNING, logger="tokensaver.state"):
        value, _, problem = sp.read(None, "k")
    assert value is None and problem and "corrupt" in problem
    assert sp.get("k") is None
    with pytest.raises(TypeError):
        sp.set("k", {"n": "4"}, None)  # type: ignore[arg-type]  # only entry bytes, never objects


def test_add_stores_only_when_absent(state: State) -> None:
    sp = state.space(_name(), "kh-a", cap=1 << 20)
    assert sp.add("k", {"first": True})
    assert not sp.add("k", {"first": False})
    assert sp.load("k") == {"first": True}


def _claim_in_process(url: str, cache_dir: str, name: str, go: Any, out: Any) -> None:
    os.environ["TOKENSAVER_CACHE_DIR"] = cache_dir
    sp = State(url).space(name, "kh-a", cap=1 << 20)
    go.wait(30)
    out.put(sp.claim("flight", ttl=60) is not None)


def test_claims_from_several_processes_have_exactly_one_winner(state: State) -> None:
    name = _name()
    mp = multiprocessing.get_context("spawn")
    go, out = mp.Event(), mp.Queue()
    cache = os.environ["TOKENSAVER_CACHE_DIR"]
    procs = [mp.Process(target=_claim_in_process, args=(state.url, cache, name, go, out)) for _ in range(6)]
    for p in procs:
        p.start()
    try:
        time.sleep(0.5)  # let them reach the start line; the outcome does not depend on it
        go.set()
        results = [out.get(timeout=60) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert sorted(results) == [False] * 5 + [True]
    sp = state.space(name, "kh-a", cap=1 << 20)
    assert sp.claim("flight", ttl=60) is None  # still held by the winner
    other = state.space(name, "kh-b", cap=1 << 20).claim("flight", ttl=60)
    assert other is not None  # another key's claim is its own
    other.release()
    mine = sp.claim("other", ttl=60)
    assert mine is not None
    mine.release()
    assert sp.claim("other", ttl=60) is not None  # released: claimable again


def test_a_claim_ends_with_its_ttl(state: State) -> None:
    sp = state.space(_name(), "kh-a", cap=1 << 20)
    assert sp.claim("k", ttl=0.3) is not None
    deadline = time.monotonic() + 10
    while sp.claim("k", ttl=60) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert time.monotonic() < deadline  # the crashed holder's claim lapsed


# -- Redis going away -------------------------------------------------------------------------


def test_redis_going_away_fails_open_and_recovers(own_redis: RedisServer, caplog: Any) -> None:
    st = State(own_redis.url)
    sp = st.space(_name(), "kh-a", cap=1 << 20)
    assert sp.save("k", {"v": 1}) and sp.load("k") == {"v": 1}
    assert not st.lost
    own_redis.stop()
    with caplog.at_level(logging.WARNING, logger="tokensaver.state"):
        for _ in range(5):
            value, _, problem = sp.read(None, "k")
            assert value is None and problem and problem.startswith("state lost")
            assert not sp.save("k2", {"v": 2})
            assert sp.claim("c", ttl=5) is None
            sp.delete("k")
    assert st.lost and st.status() == {"backend": "redis", "lost": True, "losses": 1}
    assert sum("state lost" in r.getMessage() for r in caplog.records) == 1  # logged once per outage
    own_redis.start()
    deadline = time.monotonic() + 30
    while not sp.save("k3", {"v": 3}) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sp.load("k3") == {"v": 3} and not st.lost
    st.close()


# -- three proxies, one Redis -----------------------------------------------------------------


def _proxies(emu: Emulator, url: str, tmp_path: Path, n: int = 3) -> list[tuple[subprocess.Popen[str], str]]:
    return _proxies_to(emu.url, url, tmp_path, n)


def _proxies_to(
    upstream: str, url: str, tmp_path: Path, n: int = 3
) -> list[tuple[subprocess.Popen[str], str]]:
    """``n`` tokensaver proxy processes before ``upstream``, memoize on, all on the state ``url``."""
    out = []
    for i in range(n):
        cfg = tmp_path / f"p{i}.toml"
        cfg.write_text(f'plugins = ["memoize"]\nstate = "{url}"\nruns_dir = "{tmp_path / f"runs{i}"}"\n')
        env = {
            **os.environ,
            "TOKENSAVER_CONFIG": str(cfg),
            "TOKENSAVER_CACHE_DIR": str(tmp_path / f"cache{i}"),
        }
        out.append(start_proxy_process("--upstream", upstream, "--run", f"replica{i}", env=env))
    return out


def _ask(url: str, text: str) -> tuple[str, str]:
    client = anthropic.Anthropic(base_url=url, api_key=TEST_API_KEY, max_retries=0, timeout=30)
    try:
        raw = client.messages.with_raw_response.create(
            model=MODEL, max_tokens=64, messages=[{"role": "user", "content": text}]
        )
        msg = raw.parse()
        return raw.headers.get("x-tokensaver-cache", ""), msg.content[0].text  # type: ignore[union-attr]
    finally:
        client.close()


def test_three_proxies_share_memoized_answers_and_survive_redis_going_away(
    emu: Emulator, own_redis: RedisServer, tmp_path: Path
) -> None:
    procs = _proxies(emu, own_redis.url, tmp_path)
    urls = [u for _, u in procs]
    try:
        # a repeated request sent round-robin: stored by the first replica, served by the others
        got = [_ask(urls[i % 3], "the same question") for i in range(6)]
        assert [h for h, _ in got] == ["miss"] + ["hit"] * 5
        assert len({t for _, t in got}) == 1
        assert len(emu.requests) == 1

        # Redis killed mid-run: every call is still answered, each by the API
        own_redis.stop()
        lost = [_ask(urls[i % 3], "asked while redis is down") for i in range(3)]
        assert all(t for _, t in lost)
        assert len(emu.requests) == 4

        # Redis back (empty): a repeat is served from it again, by another replica
        own_redis.start()
        deadline, n = time.monotonic() + 40, 0
        while True:
            n += 1
            first = _ask(urls[n % 3], f"after the restart {n}")
            again = _ask(urls[(n + 1) % 3], f"after the restart {n}")
            if again[0] == "hit":
                assert again[1] == first[1]
                break
            assert time.monotonic() < deadline, "memoize never worked again after redis came back"
            time.sleep(0.25)
    finally:
        for p, _ in procs:
            stop_proxy_process(p)
    records = [r for i in range(3) for r in load_run(f"replica{i}", tmp_path / f"runs{i}").records()]
    notes = [(rec.get("plugins") or {}).get("memoize") or {} for rec in records]
    said_lost = [n for n in notes if "state lost" in str(n.get("warning", ""))]
    assert len(said_lost) >= 3  # every call made while Redis was down says so in its replica's ledger
    assert all(n.get("hit") is False and n.get("stored") is False for n in said_lost)
    assert all(n.get("reason") == "state lost" for n in said_lost)
    section = memoize.tokensaver_report_section("memoize", records)
    assert section is not None and f"state lost on {len(said_lost)} call(s)" in section["summary"]


# -- summarize's model summaries --------------------------------------------------------------


def test_a_model_summary_made_by_one_replica_is_known_to_another(redis_url: str, tmp_path: Path) -> None:
    text = "a long tool result " * 200 + uuid.uuid4().hex
    body = {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}

    def replica(i: int) -> tuple[Any, dict[str, Any]]:
        settings = summarize.tokensaver_configure({"summary_dir": str(tmp_path / f"summaries{i}")}, "t")
        ctx = make_context(body, plugin="summarize", settings=settings, key_hash="kh-a")
        ctx.state_url = redis_url
        return ctx, settings

    ctx, settings = replica(0)
    _model_summary._remember(
        ctx, settings, _model_summary.entry_key(text, ctx, settings), {"summary": "short"}
    )
    other, other_settings = replica(1)  # its own memory and its own directory: only Redis is shared
    assert _model_summary.known(text, other, other_settings) == {"summary": "short"}
    stranger = make_context(body, plugin="summarize", settings=other_settings, key_hash="kh-b")
    stranger.state_url = redis_url
    assert _model_summary.known(text, stranger, other_settings) is None  # another key's summaries are its own


# -- the config key ---------------------------------------------------------------------------


def test_the_state_config_key(tmp_path: Path) -> None:
    assert load_config({}, cwd=tmp_path).state == "embedded"
    cfg = load_config({"state": "redis://:secret@127.0.0.1:6390/2"}, cwd=tmp_path)
    assert cfg.state == "redis://:secret@127.0.0.1:6390/2"
    assert cfg.as_dict()["state"] == "redis"  # run headers never carry the URL (it may hold a password)
    for bad in ("memcached://x", "", 3):
        with pytest.raises(ConfigError, match="state"):
            load_config({"state": bad}, cwd=tmp_path)
    with pytest.raises(ValueError, match="state must be"):
        State("sqlite:///x")


# -- single flight across replicas ------------------------------------------------------------


class SlowUpstream:
    """A Messages API stand-in that takes ``delay`` seconds per answer and counts the calls."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.calls = 0
        self._lock = threading.Lock()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/messages", self._messages)
        return app

    async def _messages(self, request: web.Request) -> web.Response:
        body = await request.json()
        with self._lock:
            self.calls += 1
            n = self.calls
        await asyncio.sleep(self.delay)
        return web.json_response(
            {
                "id": f"msg_{n}",
                "type": "message",
                "role": "assistant",
                "model": body["model"],
                "content": [{"type": "text", "text": f"answer {n}"}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": 12, "output_tokens": 3},
            }
        )


def test_identical_calls_in_flight_on_three_replicas_make_one_upstream_call(
    redis_url: str, tmp_path: Path
) -> None:
    up = SlowUpstream(delay=3.0)
    with BackgroundApp(up.app()) as server:
        procs = _proxies_to(server.url, redis_url, tmp_path)
        try:
            with ThreadPoolExecutor(3) as pool:
                text = f"asked of three replicas at once {uuid.uuid4().hex}"
                got = list(pool.map(lambda u: _ask(u, text), [u for _, u in procs]))
        finally:
            for p, _ in procs:
                stop_proxy_process(p)
    assert up.calls == 1
    assert sorted(h for h, _ in got) == ["hit", "hit", "miss"]
    assert {t for _, t in got} == {"answer 1"}
