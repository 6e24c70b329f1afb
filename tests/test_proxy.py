"""tokensaver proxy: the real anthropic SDK and plain HTTP through the proxy to the emulator.

Assertions are on what reached the emulator (bodies, headers), what the client got back, and
the records the pipeline wrote.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import pytest
from aiohttp import web

import tokensaver
from tokensaver.emulator import Emulator, EmulatorError
from tokensaver.errors import TokensaverError
from tokensaver.proxy import (
    CANNED_MESSAGE,
    BackgroundApp,
    ProxyServer,
    check_bind,
    measure_proxy_overhead,
    session_of,
    session_run_name,
)
from tokensaver.run import load_run
from tokensaver.sse import SSEAccumulator, message_to_sse
from tokensaver.testing import SystemTagger, start_proxy_process
from tokensaver.traces import Conversation, fixtures_dir, load_conversation

MODEL = "claude-sonnet-4-6"
KEY = "sk-ant-api03-proxytest-AAAA"
OTHER_KEY = "sk-ant-api03-proxytest-BBBB"
MSGS = [{"role": "user", "content": "What is the capital of France?"}]
BODY = {"model": MODEL, "max_tokens": 64, "messages": MSGS}
HEADERS = {"x-api-key": KEY, "anthropic-version": "2023-06-01", "content-type": "application/json"}


class Broken:
    @tokensaver.hookimpl
    def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> dict[str, Any]:
        raise KeyError("boom")


def redacted(key: str) -> str:
    """What the emulator records for a credential (it never keeps the secret itself)."""
    return "REDACTED:" + hashlib.sha256(key.encode()).hexdigest()[:12]


def make_proxy(
    emu_url: str, tmp_path: Path, plugins: dict[str, Any] | None = None, **cfg: Any
) -> ProxyServer:
    plugins = {"tag": SystemTagger()} if plugins is None else plugins
    pm = tokensaver.get_plugin_manager(plugins, load_entrypoints=False)
    config = {"plugins": list(plugins), "runs_dir": str(tmp_path / "runs"), **cfg}
    return ProxyServer(config, upstream=emu_url, plugin_manager=pm, run="proxy-default")


@pytest.fixture
def proxy(emu: Emulator, tmp_path: Path) -> Any:
    with make_proxy(emu.url, tmp_path) as p:
        yield p


def sdk(proxy: ProxyServer, **kw: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=proxy.url, api_key=kw.pop("api_key", KEY), max_retries=0, **kw)


def messages_records(p: ProxyServer) -> list[dict[str, Any]]:
    return p.records()


# -- the SDK through the proxy --------------------------------------------------------------------


def test_sdk_create_runs_the_pipeline_and_forwards_credentials(emu: Emulator, proxy: ProxyServer) -> None:
    anthropic.Anthropic(base_url=emu.url, api_key=KEY, max_retries=0).messages.create(
        model=MODEL, max_tokens=64, messages=MSGS
    )
    direct = emu.last
    client = sdk(proxy, default_headers={"x-tokensaver-note": "control"})
    msg = client.messages.create(model=MODEL, max_tokens=64, messages=MSGS, system="Be brief.")
    assert msg.content[0].text == "This is a reply from the tokensaver emulator."
    seen = emu.last
    assert seen.path == "/v1/messages"
    assert seen.body["system"] == "Be brief. [tagged]"  # transformed on the way
    for name in ("x-api-key", "authorization"):  # the caller's credentials, as they came
        assert seen.headers.get(name) == direct.headers.get(name)
    assert seen.headers.get("x-api-key") or seen.headers.get("authorization")
    assert not any(h.startswith("x-tokensaver-") for h in seen.headers)  # control headers stripped
    assert "host" in seen.headers and seen.headers["host"] != proxy.url.split("//")[1]
    (rec,) = messages_records(proxy)
    assert rec["status"] == 200 and rec["surface"] == "messages" and rec["stream"] is False
    assert [s["plugin"] for s in rec["stages"]] == ["tag"]
    assert rec["usage"]["input_tokens"] == seen.usage["input_tokens"]
    assert rec["usage"]["output_tokens"] == seen.usage["output_tokens"] > 0
    ledger = (Path(proxy.proxy.config.runs_dir) / "proxy-default.jsonl").read_text()
    assert rec["id"] in ledger and KEY not in ledger and "proxytest" not in ledger


def test_sdk_streams_and_usage_is_read_from_the_stream(emu: Emulator, proxy: ProxyServer) -> None:
    client = sdk(proxy)
    emu.reply("streamed answer " * 20)
    with client.messages.stream(model=MODEL, max_tokens=64, messages=MSGS) as stream:
        text = "".join(stream.text_stream)
    assert text == "streamed answer " * 20
    emu.reply([{"type": "tool_use", "name": "lookup", "input": {"q": "paris"}}])
    events = list(client.messages.create(model=MODEL, max_tokens=64, messages=MSGS, stream=True))
    assert events[-1].type == "message_stop"
    recs = messages_records(proxy)
    assert [r["stream"] for r in recs] == [True, True]
    assert all(r["status"] == 200 for r in recs)
    for rec, seen in zip(recs, emu.requests, strict=True):
        assert rec["usage"]["output_tokens"] == seen.usage["output_tokens"] > 0
        assert rec["usage"]["input_tokens"] == seen.usage["input_tokens"]


def test_beta_surface_keeps_the_query(emu: Emulator, proxy: ProxyServer) -> None:
    msg = sdk(proxy).beta.messages.create(model=MODEL, max_tokens=64, messages=MSGS, betas=["x-test-2025"])
    assert msg.content[0].text
    assert emu.last.headers["anthropic-beta"] == "x-test-2025"
    assert emu.last.body["system"] == " [tagged]"
    # what Claude Code sends: the beta surface as a query
    with httpx2.Client() as http:
        r = http.post(f"{proxy.url}/v1/messages?beta=true", json={**BODY, "stream": True}, headers=HEADERS)
    assert r.status_code == 200
    assert emu.last.path == "/v1/messages?beta=true"
    assert emu.last.body["system"] == " [tagged]"
    assert [r["surface"] for r in messages_records(proxy)] == ["messages", "beta"]


def test_sdk_async_client(emu: Emulator, proxy: ProxyServer) -> None:
    async def main() -> str:
        async with anthropic.AsyncAnthropic(base_url=proxy.url, api_key=KEY, max_retries=0) as client:
            async with client.messages.stream(model=MODEL, max_tokens=64, messages=MSGS) as stream:
                return await stream.get_final_text()

    assert asyncio.run(main()) == "This is a reply from the tokensaver emulator."
    assert emu.last.body["system"] == " [tagged]"


def test_other_paths_are_forwarded_untouched_and_not_recorded(emu: Emulator, proxy: ProxyServer) -> None:
    client = sdk(proxy)
    counted = client.messages.count_tokens(model=MODEL, messages=MSGS)
    assert counted.input_tokens > 0
    assert emu.last.path == "/v1/messages/count_tokens"
    assert "system" not in emu.last.body  # no transform on count_tokens
    with httpx2.Client() as http:
        direct = http.get(f"{emu.url}/v1/models", headers=HEADERS)
        via = http.get(f"{proxy.url}/v1/models?limit=3", headers=HEADERS)
    assert via.status_code == direct.status_code == 404
    assert via.json()["error"] == direct.json()["error"] | {"message": "Not found: GET /v1/models"}
    assert emu.last.path == "/v1/models?limit=3"
    assert emu.last.headers["x-api-key"] == redacted(KEY)
    assert messages_records(proxy) == []


# -- plain HTTP --------------------------------------------------------------------------------------


def test_plain_http_json_and_sse(emu: Emulator, proxy: ProxyServer) -> None:
    with httpx2.Client() as http:
        r = http.post(f"{proxy.url}/v1/messages", json=BODY, headers=HEADERS)
        assert r.status_code == 200
        assert r.json() == emu.last.response
        assert r.headers["request-id"] == "req_emu_000001"
        with http.stream(
            "POST", f"{proxy.url}/v1/messages", json={**BODY, "stream": True}, headers=HEADERS
        ) as s:
            assert s.headers["content-type"].startswith("text/event-stream")
            assert "content-length" not in s.headers
            raw = b"".join(s.iter_raw())
    # the stream's bytes arrive exactly as the upstream sent them
    assert raw == message_to_sse(emu.last.response)
    recs = messages_records(proxy)
    assert [(r["stream"], r["status"]) for r in recs] == [(False, 200), (True, 200)]


def test_unparsable_body_is_refused_as_the_api_would(emu: Emulator, proxy: ProxyServer) -> None:
    with httpx2.Client() as http:
        r = http.post(f"{proxy.url}/v1/messages", content=b"{not json", headers=HEADERS)
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert emu.requests == []  # answered by the proxy (tests/test_proxy_input.py has the rest)
    assert messages_records(proxy) == []


# -- errors ------------------------------------------------------------------------------------------


def test_upstream_error_comes_back_unchanged(emu: Emulator, proxy: ProxyServer) -> None:
    emu.reply(EmulatorError.rate_limited(retry_after=7), EmulatorError.overloaded(retry_after=3))
    with httpx2.Client() as http:
        r = http.post(f"{proxy.url}/v1/messages", json=BODY, headers=HEADERS)
        assert r.status_code == 429
        assert r.headers["retry-after"] == "7"
        assert r.headers["request-id"] == "req_emu_000001"
        assert r.json() == emu.last.response  # the body, byte for byte as JSON
        s = http.post(f"{proxy.url}/v1/messages", json={**BODY, "stream": True}, headers=HEADERS)
        assert s.status_code == 529 and s.headers["retry-after"] == "3"
        assert s.json()["error"]["type"] == "overloaded_error"
    recs = messages_records(proxy)
    assert [(r["status"], r["error"]) for r in recs] == [(429, "HTTP 429"), (529, "HTTP 529")]


def test_sdk_retries_through_the_proxy(emu: Emulator, proxy: ProxyServer) -> None:
    emu.reply(EmulatorError.overloaded(retry_after=0), "second time lucky")
    client = anthropic.Anthropic(base_url=proxy.url, api_key=KEY, max_retries=2)
    msg = client.messages.create(model=MODEL, max_tokens=64, messages=MSGS)
    assert msg.content[0].text == "second time lucky"
    assert [r.status for r in emu.requests] == [529, 200]
    recs = messages_records(proxy)
    assert [(r["attempt"], r["status"]) for r in recs] == [(0, 529), (1, 200)]


def test_upstream_unreachable_is_a_502_the_client_may_retry(tmp_path: Path) -> None:
    with BackgroundApp(web.Application()) as dead:
        url = dead.url
    with make_proxy(url, tmp_path) as p, httpx2.Client() as http:
        r = http.post(f"{p.url}/v1/messages", json=BODY, headers=HEADERS)
        assert r.status_code == 502
        assert r.json()["error"]["type"] == "api_error"
        (rec,) = p.records()
    assert rec["status"] == "incomplete" and rec["error"].startswith("upstream unreachable")


def test_failing_plugin_fails_open_or_strict(emu: Emulator, tmp_path: Path) -> None:
    with make_proxy(emu.url, tmp_path, {"broken": Broken()}) as p, httpx2.Client() as http:
        r = http.post(f"{p.url}/v1/messages", json=BODY, headers=HEADERS)
        assert r.status_code == 200
        (rec,) = p.records()
        assert rec["errors"][0]["plugin"] == "broken"
    n = len(emu.requests)
    with make_proxy(emu.url, tmp_path, {"broken": Broken()}, strict=True) as p, httpx2.Client() as http:
        r = http.post(f"{p.url}/v1/messages", json=BODY, headers=HEADERS)
        assert r.status_code == 500
        assert r.headers["x-should-retry"] == "false"
        assert "broken" in r.json()["error"]["message"]
    assert len(emu.requests) == n  # nothing went upstream


# -- streams: disconnects, concurrency --------------------------------------------------------------


class SlowUpstream:
    """Streams the start of a message, then holds the stream open until it is cancelled."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.cancelled = threading.Event()
        self.release = asyncio.Event()

    def app(self) -> web.Application:
        async def messages(request: web.Request) -> web.StreamResponse:
            await request.read()
            response = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await response.prepare(request)
            full = message_to_sse(
                {
                    "id": "msg_slow",
                    "type": "message",
                    "role": "assistant",
                    "model": MODEL,
                    "content": [{"type": "text", "text": "never finished"}],
                    "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": {"input_tokens": 5, "output_tokens": 3},
                }
            )
            await response.write(full[: full.index(b"event: ping")])
            self.started.set()
            try:
                await asyncio.wait_for(self.release.wait(), timeout=30)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
            return response

        app = web.Application()
        app.router.add_post("/v1/messages", messages)
        return app


def test_client_disconnect_cancels_the_upstream_request(tmp_path: Path) -> None:
    slow = SlowUpstream()
    with BackgroundApp(slow.app()) as up, make_proxy(up.url, tmp_path) as p:
        with httpx2.Client() as http:
            with http.stream(
                "POST", f"{p.url}/v1/messages", json={**BODY, "stream": True}, headers=HEADERS
            ) as s:
                first = next(s.iter_raw())
                assert first.startswith(b"event: message_start")  # passed through before the end
                assert slow.started.wait(10)
        # the client went away mid-stream: the proxy closes its upstream request
        assert slow.cancelled.wait(10)
        for _ in range(200):  # the handler unwinds on the proxy's loop; bounded wait for its record
            if p.records():
                break
            threading.Event().wait(0.05)
        (rec,) = p.records()
    assert rec["status"] == "incomplete"
    assert rec["error"] == "client disconnected"


def test_upstream_cut_mid_stream_ends_with_an_error_event(tmp_path: Path) -> None:
    async def messages(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        full = message_to_sse(
            {
                "id": "msg_cut",
                "type": "message",
                "role": "assistant",
                "model": MODEL,
                "content": [{"type": "text", "text": "cut short"}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": 5, "output_tokens": 3},
            }
        )
        await response.write(full[: len(full) // 2])
        assert request.transport is not None
        request.transport.abort()  # the upstream connection dies mid-stream
        return response

    app = web.Application()
    app.router.add_post("/v1/messages", messages)
    with BackgroundApp(app) as up, make_proxy(up.url, tmp_path) as p, httpx2.Client() as http:
        with http.stream("POST", f"{p.url}/v1/messages", json={**BODY, "stream": True}, headers=HEADERS) as s:
            acc = SSEAccumulator()
            for chunk in s.iter_raw():
                acc.feed(chunk)
        assert acc.message is None  # never completed
        assert acc.error is not None and "upstream stream broke" in acc.error["message"]
        (rec,) = p.records()
    assert rec["status"] == "incomplete" and rec["error"].startswith("upstream stream broke")


def test_concurrent_clients_are_served_at_once(emu: Emulator, proxy: ProxyServer) -> None:
    n = 6
    # every reply waits until all n requests are at the emulator: only concurrent serving passes
    barrier = threading.Barrier(n, timeout=20)

    def reply(body: dict[str, Any]) -> str:
        barrier.wait()
        return "together: " + body["messages"][0]["content"]

    emu.reply(*([reply] * n))
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            client = sdk(proxy)
            content = f"client {i}"
            if i % 2:
                with client.messages.stream(
                    model=MODEL, max_tokens=64, messages=[{"role": "user", "content": content}]
                ) as s:
                    results[i] = s.get_final_text()
            else:
                msg = client.messages.create(
                    model=MODEL, max_tokens=64, messages=[{"role": "user", "content": content}]
                )
                results[i] = msg.content[0].text
        except BaseException as exc:  # collected: the assertion below names it
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert results == {i: f"together: client {i}" for i in range(n)}
    assert sorted(r["status"] for r in messages_records(proxy)) == [200] * n


# -- sessions and runs -------------------------------------------------------------------------------


def test_session_of() -> None:
    assert session_of({"X-Claude-Code-Session-Id": "abc-123"}, {}) == "abc-123"
    user_json = json.dumps({"device_id": "d" * 64, "account_uuid": "", "session_id": "5f0c-11"})
    assert session_of({}, {"metadata": {"user_id": user_json}}) == "5f0c-11"
    legacy = "user_" + "a" * 64 + "_account__session_0b8d2f7e-1c2d-4e5f-8a9b-0c1d2e3f4a5b"
    assert session_of({}, {"metadata": {"user_id": legacy}}) == "0b8d2f7e-1c2d-4e5f-8a9b-0c1d2e3f4a5b"
    assert session_of({}, {"metadata": {"user_id": "plain-user"}}) is None
    assert session_of({}, {"metadata": "x"}) is None
    assert session_run_name("a/b c") == "session-a-b-c"


def test_calls_are_grouped_into_runs_by_session(emu: Emulator, proxy: ProxyServer) -> None:
    runs_dir = Path(proxy.proxy.config.runs_dir)
    a = sdk(proxy, default_headers={"X-Claude-Code-Session-Id": "sess-a"})
    for _ in range(2):
        a.messages.create(model=MODEL, max_tokens=64, messages=MSGS)
    b_meta = {"user_id": json.dumps({"device_id": "d", "session_id": "sess-b"})}
    sdk(proxy).messages.create(model=MODEL, max_tokens=64, messages=MSGS, metadata=b_meta)
    sdk(proxy).messages.create(model=MODEL, max_tokens=64, messages=MSGS)
    sdk(proxy, default_headers={"x-tokensaver-run": "named-run"}).messages.create(
        model=MODEL, max_tokens=64, messages=MSGS
    )
    assert len(load_run("session-sess-a", runs_dir).records()) == 2
    assert len(load_run("session-sess-b", runs_dir).records()) == 1
    assert len(load_run("proxy-default", runs_dir).records()) == 1
    assert len(load_run("named-run", runs_dir).records()) == 1
    # one report per agent session, with the stage's figures
    from tokensaver.cli import main

    assert main(["report", "session-sess-a", "--runs-dir", str(runs_dir), "-f", "json", "-o",
                 str(runs_dir / "a.json")]) == 0  # fmt: skip
    report = json.loads((runs_dir / "a.json").read_text())
    assert "tag" in json.dumps(report)


# -- memoize through the proxy: answers namespaced by the caller's key ------------------------------


def test_memoize_is_namespaced_by_the_callers_key(emu: Emulator, tmp_path: Path) -> None:
    pm = tokensaver.get_plugin_manager()
    cfg = {
        "plugins": ["memoize"],
        "runs_dir": str(tmp_path / "runs"),
        "memoize": {"dir": str(tmp_path / "m")},
    }
    with ProxyServer(cfg, upstream=emu.url, plugin_manager=pm) as p, httpx2.Client() as http:
        first = http.post(f"{p.url}/v1/messages", json=BODY, headers=HEADERS)
        again = http.post(f"{p.url}/v1/messages", json=BODY, headers=HEADERS)
        assert first.headers["x-tokensaver-cache"] == "miss"
        assert again.headers["x-tokensaver-cache"] == "hit"
        assert again.json()["content"] == first.json()["content"]
        assert len(emu.requests) == 1
        # the same answer, streamed, comes from the cache as SSE
        with http.stream("POST", f"{p.url}/v1/messages", json={**BODY, "stream": True}, headers=HEADERS) as s:
            acc = SSEAccumulator()
            for chunk in s.iter_raw():
                acc.feed(chunk)
        assert acc.message is not None and acc.message["content"] == first.json()["content"]
        assert len(emu.requests) == 1
        other = http.post(f"{p.url}/v1/messages", json=BODY, headers={**HEADERS, "x-api-key": OTHER_KEY})
        assert other.headers["x-tokensaver-cache"] == "miss"
        assert len(emu.requests) == 2
        assert [r["short_circuit"] for r in p.records()] == [None, "memoize", "memoize", None]
    for path in tmp_path.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert KEY.encode() not in data and OTHER_KEY.encode() not in data, path


# -- access -----------------------------------------------------------------------------------------


def test_binding_elsewhere_requires_a_token() -> None:
    with pytest.raises(TokensaverError, match="TOKENSAVER_PROXY_TOKEN"):
        check_bind("0.0.0.0", None)
    with pytest.raises(TokensaverError):
        ProxyServer({}, host="192.168.1.7", upstream="http://127.0.0.1:9")
    check_bind("0.0.0.0", "secret")
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    check_bind("localhost", None)


def test_access_token_is_checked_and_never_forwarded(emu: Emulator, tmp_path: Path) -> None:
    pm = tokensaver.get_plugin_manager({}, load_entrypoints=False)
    cfg = {"plugins": [], "runs_dir": str(tmp_path)}
    with ProxyServer(cfg, upstream=emu.url, token="t0ken", plugin_manager=pm) as p, httpx2.Client() as http:
        denied = http.post(f"{p.url}/v1/messages", json=BODY, headers=HEADERS)
        assert denied.status_code == 401
        assert denied.json()["error"]["type"] == "authentication_error"
        wrong = http.get(f"{p.url}/v1/models", headers={**HEADERS, "x-tokensaver-proxy-token": "nope"})
        assert wrong.status_code == 401
        assert emu.requests == []
        ok = http.post(
            f"{p.url}/v1/messages", json=BODY, headers={**HEADERS, "x-tokensaver-proxy-token": "t0ken"}
        )
        assert ok.status_code == 200
        bearer = http.post(
            f"{p.url}/v1/messages", json=BODY, headers={**HEADERS, "proxy-authorization": "Bearer t0ken"}
        )
        assert bearer.status_code == 200
    assert all("x-tokensaver-proxy-token" not in r.headers for r in emu.requests)
    assert all("proxy-authorization" not in r.headers for r in emu.requests)


# -- the command -------------------------------------------------------------------------------------


def test_command_serves_until_sigterm(emu: Emulator, tmp_path: Path) -> None:
    env = {**os.environ, "TOKENSAVER_RUNS_DIR": str(tmp_path / "runs"), "TOKENSAVER_PLUGINS": "summarize"}
    proc, url = start_proxy_process("--upstream", emu.url, "--run", "cmd-run", env=env, cwd=tmp_path)
    try:
        with httpx2.Client() as http:
            r = http.post(f"{url}/v1/messages", json=BODY, headers=HEADERS)
        assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    (rec,) = load_run("cmd-run", tmp_path / "runs").records()
    assert [s["plugin"] for s in rec["stages"]] == ["summarize"]


def test_command_refuses_a_public_bind_without_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TOKENSAVER_PROXY_TOKEN"}
    out = subprocess.run(
        [sys.executable, "-m", "tokensaver", "proxy", "--host", "0.0.0.0", "--port", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=tmp_path,
    )
    assert out.returncode == 2
    assert "refusing to bind 0.0.0.0" in out.stderr


# -- overhead ---------------------------------------------------------------------------------------


def test_measure_proxy_overhead_replays_a_real_conversation() -> None:
    fixtures = fixtures_dir()
    if fixtures is None:
        pytest.skip("the bundled fixtures/ folder is not here (not a source checkout)")
    conv = load_conversation(
        fixtures / "claude-code-spotter/6c2214d7-b87e-4432-8e41-22ba294ea584__agent-afc096d.json"
    )
    conv = Conversation(conv.id, conv.source, conv.calls[:4], conv.info)
    for stream in (False, True):
        result = measure_proxy_overhead([conv], 1, stream=stream, reps=1, plugins=[], band=1e9, spawn=False)
        assert result["n_calls"] == result["replayed_calls"] == 4 and result["stream"] is stream
        for name in ("direct", "proxy", "added", "pipeline", "proxy_own"):
            assert isinstance(result[f"{name}_p50_ms"], float)
            assert result[f"{name}_p95_ms"] >= result[f"{name}_p50_ms"]
        # every call went through the pipeline, whose own time is read from its record
        assert result["proxy_p50_ms"] > 0 and result["pipeline_p50_ms"] > 0


class _Clock:
    """A plugin with its own tool, answered by the proxy as wrap() does."""

    @tokensaver.hookimpl
    def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> dict[str, Any]:
        tool = {"name": "tokensaver_clock", "input_schema": {"type": "object"}}
        return {**body, "tools": [*(t for t in body.get("tools") or [] if t["name"] != tool["name"]), tool]}

    @tokensaver.hookimpl
    def tokensaver_answer_tool_use(self, tool_use: dict[str, Any], ctx: Any) -> str | None:
        return "12:00" if tool_use["name"] == "tokensaver_clock" else None


def _clock_use(tid: str = "toolu_c1") -> dict[str, Any]:
    return {"type": "tool_use", "id": tid, "name": "tokensaver_clock", "input": {}}


@pytest.mark.parametrize("stream", [False, True])
def test_the_proxy_answers_plugin_tools_and_the_client_sees_only_the_answer(
    emu: Emulator, tmp_path: Path, stream: bool
) -> None:
    seen: list[str] = []
    at_follow_up: list[str] = []

    def second(body: dict[str, Any]) -> str:
        # the client reads on its own thread: give it time to parse what it has (a buffering proxy
        # would have sent nothing yet, and this waits in vain)
        deadline = time.monotonic() + (5 if stream else 0)
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        at_follow_up.append("".join(seen))
        return "It is noon."

    emu.reply([{"type": "text", "text": "Let me look."}, _clock_use()], second)
    kw: dict[str, Any] = {
        "model": "claude-sonnet-4-6",
        "max_tokens": 20,
        "messages": [{"role": "user", "content": "time?"}],
    }
    with make_proxy(emu.url, tmp_path, {"clock": _Clock()}) as p:
        client = anthropic.Anthropic(base_url=p.url, api_key="k", max_retries=0)
        if stream:
            with client.messages.stream(**kw) as s:
                for event in s:
                    if event.type == "content_block_delta" and event.delta.type == "text_delta":
                        seen.append(event.delta.text)
                msg = s.get_final_message()
        else:
            msg = client.messages.create(**kw)
        records = p.records()
    texts = [b.text for b in msg.content if b.type == "text"]
    assert all(b.type == "text" for b in msg.content)  # the client never sees our tool
    assert len(emu.requests) == 2 and emu.requests[1].body["messages"][-1]["content"][0]["content"] == "12:00"
    # the tool stays in every request, so the cached prefix does too
    assert all(r.body["tools"][-1]["name"] == "tokensaver_clock" for r in emu.requests)
    if stream:  # streamed on as it came: the first round reached the client before the second was asked
        assert at_follow_up == ["Let me look."] and texts == ["Let me look.", "It is noon."]
    else:
        assert texts == ["It is noon."]
    assert [r["status"] for r in records] == [200, 200] and not any(r["errors"] for r in records)


def test_a_streamed_mixed_answer_through_the_proxy_keeps_only_the_clients_tool(
    emu: Emulator, tmp_path: Path
) -> None:
    user_tool = {"name": "read_file", "input_schema": {"type": "object", "properties": {}}}
    emu.reply([_clock_use(), {"type": "tool_use", "id": "toolu_r1", "name": "read_file", "input": {}}])
    with make_proxy(emu.url, tmp_path, {"clock": _Clock()}) as p:
        client = anthropic.Anthropic(base_url=p.url, api_key="k", max_retries=0)
        with client.messages.stream(
            model="claude-sonnet-4-6",
            max_tokens=20,
            tools=[user_tool],
            messages=[{"role": "user", "content": "read it"}],
        ) as s:
            msg = s.get_final_message()
    assert [(b.type, b.name) for b in msg.content] == [("tool_use", "read_file")]
    assert msg.stop_reason == "tool_use" and len(emu.requests) == 1


def test_the_proxy_door_imports_nothing_of_the_sdk_door() -> None:
    """The proxy speaks the protocol through ``tokensaver.exchange``: importing it loads neither the
    SDK middleware nor the anthropic SDK (checked in a fresh interpreter)."""
    code = (
        "import sys, tokensaver.proxy\n"
        "print(sorted(m for m in sys.modules if m in ('tokensaver.middleware', 'tokensaver._sdk')"
        " or m.split('.')[0] == 'anthropic'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_python_m_tokensaver_proxy_is_the_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tokensaver.proxy", "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "--upstream" in out.stdout and "--token" in out.stdout


# -- the bytes sent: orjson where it writes the stdlib's bytes, the stdlib elsewhere ---------------


class _Text(str):
    pass


def _bodies() -> list[dict[str, Any]]:
    rng = random.Random(12)
    floats = [rng.uniform(-1, 1) * 10 ** rng.randint(-330, 308) for _ in range(3000)]
    floats += [0.0, -0.0, 1.0, 0.1, 1e-4, 1e-5, 9.99e-5, 2.5e-7, 5e-324, 1e16, 1e22, 1.5e300]
    text = "".join(chr(c) for c in [*range(0, 0x80), 0x7F, 0xA0, 0x2028, 0x2029, 0xFEFF, 0x1F600])
    return [{**BODY, "temperature": f} for f in floats] + [
        {**BODY, "system": text},
        {**BODY, "temperature": float("nan")},
        {**BODY, "metadata": {"a": float("inf"), "b": [float("-inf")]}},
        {**BODY, "max_tokens": 2**63, "n": -(2**63)},
        {**BODY, "max_tokens": 2**70},
        {**BODY, "stop_sequences": None, "tools": [None, {"x": None}]},
        {**BODY, "system": _Text("a str subclass")},
        {**BODY, "messages": (MSGS[0],)},
        {**BODY, "metadata": {"nested": [[[[{"deep": 1.5e-9}]]]]}},
        {**BODY, "system": "text that looks numeric: 1e-5 2e-07 0.00001 :null ,null [null"},
        {**BODY, "system": 'JSON in text: {"a":null,"b":[null],"c":2.5e-7,"d":-0.00001} 405e-a70e-66b'},
        {**BODY, "metadata": {"a\\": float("nan"), "b\\\\": [1, float("inf")], "c": -2.5e-7}},
        {**BODY, "metadata": {"x": [-0.00001]}, "y": {"\\": -1e-300}},
    ]


def test_encode_body_writes_the_bytes_exchange_encode_writes() -> None:
    from tokensaver.exchange import encode
    from tokensaver.proxy.wire import encode_body

    for body in _bodies():
        assert encode_body(body) == encode(body), body
    for bad in ({**BODY, "x": {1, 2}}, {**BODY, "system": "\ud800"}):
        with pytest.raises(Exception) as slow:
            encode(bad)
        with pytest.raises(type(slow.value)):
            encode_body(bad)


def test_parse_messages_body_reads_what_the_stdlib_read() -> None:
    from tokensaver.proxy.wire import _parse_stdlib, parse_messages_body

    raws = [json.dumps(b).encode() for b in _bodies()] + [
        b'{"model":"m","x":NaN,"y":Infinity}',
        b'{"big":123456789012345678901234567890}',
        b'{"a": [1, -123456789012345678901234]}',
        b'{\n  "a":\n 18446744073709551616\n}',
        b'{"h":"abc123def456789012345678901234567890abcd","n":18446744073709551616}',
        b'{"h":"abc123def456789012345678901234567890abcd","n":1.8446744073709552e19}',
        b'{"s":"\\ud800"}',
        b'\xef\xbb\xbf{"bom":1}',
        json.dumps({"utf16": "x"}).encode("utf-16"),
        b'{"a":1,"b":2,"a":3}',
        b"[" * 5000 + b"]" * 5000,
        b'{"a":1',
        b"[1,2]",
        b"\xff\xfe",
        b'{"a":1e400}',
    ]
    for raw in raws:
        for content_type in ("application/json", "text/plain"):
            got, want = parse_messages_body(raw, content_type), _parse_stdlib(raw, content_type)
            assert repr(got) == repr(want), raw[:80]
            if got[0] is not None:  # same keys in the same order: the same bytes when re-encoded
                assert list(got[0]) == list(want[0])


class _TinyTemperature:
    """A plugin that sets a float the stdlib writes in exponent form (orjson would not)."""

    @tokensaver.hookimpl
    def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> dict[str, Any]:
        return {**body, "temperature": 1e-05, "system": "caf\u00e9 \u2028 \x01"}


def test_a_changed_body_goes_upstream_as_exchange_encode_writes_it(tmp_path: Path) -> None:
    from tokensaver.exchange import encode

    seen: list[bytes] = []

    async def messages(request: web.Request) -> web.Response:
        seen.append(await request.read())
        return web.json_response(CANNED_MESSAGE, headers={"request-id": "req_capture"})

    app = web.Application()
    app.router.add_post("/v1/messages", messages)
    with (
        BackgroundApp(app) as upstream,
        make_proxy(upstream.url, tmp_path, plugins={"tiny": _TinyTemperature()}, record=False) as p,
    ):
        r = httpx2.post(
            f"{p.url}/v1/messages", content=json.dumps(BODY).encode(), headers=HEADERS, timeout=30
        )
        assert r.status_code == 200
        # the caller's bytes, unchanged, go as they came; a changed body as the stdlib writes it
        raw = (
            b'{"model": "%s", "max_tokens": 64,   "messages": [{"role":"user","content":"hi"}]}'
            % MODEL.encode()
        )
        plain = make_proxy(upstream.url, tmp_path / "plain", plugins={}, record=False)
        with plain:
            assert (
                httpx2.post(f"{plain.url}/v1/messages", content=raw, headers=HEADERS, timeout=30).status_code
                == 200
            )
    sent = {**BODY, "temperature": 1e-05, "system": "caf\u00e9 \u2028 \x01"}
    assert seen[0] == encode(sent) and b'"temperature":1e-05' in seen[0]
    assert seen[1] == raw


class _ForwardProxy:
    """A plain-HTTP forward proxy stand-in: records each request line and answers a canned Message."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.lines.append(head.split(b"\r\n", 1)[0])
        length = next(
            (
                int(h.split(b":", 1)[1])
                for h in head.split(b"\r\n")
                if h.lower().startswith(b"content-length:")
            ),
            0,
        )
        await reader.readexactly(length)
        payload = json.dumps(CANNED_MESSAGE).encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (len(payload), payload)
        )
        await writer.drain()
        writer.close()


def test_the_environments_http_proxy_still_carries_the_upstream_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fwd = _ForwardProxy()
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(asyncio.start_server(fwd.serve, "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        with make_proxy("http://upstream.invalid:9", tmp_path, plugins={}, record=False) as p:
            # this client itself goes straight to the proxy
            r = httpx2.post(f"{p.url}/v1/messages", json=BODY, headers=HEADERS, timeout=30, trust_env=False)
        assert r.status_code == 200 and r.json()["id"] == CANNED_MESSAGE["id"]
        assert fwd.lines == [b"POST http://upstream.invalid:9/v1/messages HTTP/1.1"]
    finally:
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
