"""Hostile and broken input to ``tokensaver proxy``: paths, bodies, HTTP it cannot parse.

A real proxy (in-process, or ``tokensaver proxy`` as a subprocess where the failure would be the
process's) in front of a small upstream with a base path that records every request it gets.
Assertions are on what reached the upstream and on the answers: every error the proxy makes
itself is JSON in the API's shape.
"""

from __future__ import annotations

import gzip
import http.client
import json
import logging
import os
import posixpath
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from aiohttp import web

import tokensaver
from tokensaver.proxy import CANNED_MESSAGE, PARSE_ON_LOOP_BYTES, BackgroundApp, ProxyServer
from tokensaver.testing import start_proxy_process, stop_proxy_process

KEY = "sk-ant-api03-proxyinput-AAAA"
HEADERS = {"x-api-key": KEY, "anthropic-version": "2023-06-01", "content-type": "application/json"}
BODY = {"model": "claude-sonnet-4-6", "max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}]}
BASE = "/base"
TIMEOUT = 60


class Upstream:
    """An upstream that records what it receives (raw path, headers, body) and answers JSON."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.server = BackgroundApp(app)

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.seen.append({"path": request.raw_path, "headers": dict(request.headers), "body": raw})
        if request.method == "POST" and request.path.endswith("/v1/messages"):
            return web.json_response(CANNED_MESSAGE)
        return web.json_response({"path": request.raw_path})

    @property
    def paths(self) -> list[str]:
        return [s["path"] for s in self.seen]


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    up = Upstream()
    with up.server:
        yield up


@pytest.fixture
def proxy(upstream: Upstream, tmp_path: Path) -> Iterator[ProxyServer]:
    pm = tokensaver.get_plugin_manager({}, load_entrypoints=False)
    config = {"plugins": [], "runs_dir": str(tmp_path / "runs")}
    with ProxyServer(config, upstream=upstream.server.url + BASE, plugin_manager=pm, run="input") as p:
        yield p


@pytest.fixture(scope="module")
def command(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Upstream]]:
    """``tokensaver proxy`` as a subprocess in front of a recording upstream: (its URL, the upstream)."""
    tmp = tmp_path_factory.mktemp("command")
    up = Upstream()
    with up.server:
        env = {
            **os.environ,
            "TOKENSAVER_RUNS_DIR": str(tmp / "runs"),
            "TOKENSAVER_CACHE_DIR": str(tmp / "cache"),
        }
        proc, url = start_proxy_process("--upstream", up.server.url + BASE, env=env, cwd=tmp)
        try:
            yield url, up
        finally:
            stop_proxy_process(proc)


def send(
    url: str, method: str, target: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, str, bytes]:
    """One request with ``target`` on the request line exactly as given: (status, content type, body)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=TIMEOUT)
    try:
        conn.request(method, target, body=body, headers={**HEADERS, **(headers or {})})
        r = conn.getresponse()
        return r.status, r.getheader("content-type") or "", r.read()
    finally:
        conn.close()


def send_raw(url: str, data: bytes) -> tuple[int, str, bytes]:
    """Bytes straight onto the socket (for requests no client library would send)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=TIMEOUT) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    head, _, payload = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    ctype = next(
        (v.strip() for k, _, v in (h.partition(":") for h in lines[1:]) if k.lower() == "content-type"), ""
    )
    return status, ctype, payload


def api_error(status: int, ctype: str, body: bytes) -> dict[str, Any]:
    """The proxy's own error: JSON in the API's shape. Returns its ``error`` object."""
    assert ctype.startswith("application/json"), (status, ctype, body[:200])
    payload = json.loads(body)
    assert payload["type"] == "error", payload
    assert isinstance(payload["error"]["type"], str) and isinstance(payload["error"]["message"], str)
    return payload["error"]


def resolved(raw_path: str) -> str:
    """A received path as a lenient upstream would read it: decoded, backslashes as slashes, dots resolved."""
    path = raw_path.split("?", 1)[0]
    for _ in range(3):
        path = unquote(path)
    return posixpath.normpath(path.replace("\\", "/"))


# -- paths ---------------------------------------------------------------------------------------

ESCAPES = [
    "/../../x",
    "/../x",
    "/v1/../../x",
    "/v1/%2e%2e/%2e%2e/x",
    "/v1/%2E%2E/%2e%2E/x",
    "/v1/.%2e/.%2e/x",
    "/v1/..%2f..%2fx",
    "/v1/..%2F..%2Fx",
    "/v1/..\\..\\x",
    "/v1/..%5c..%5cx",
    "/v1/%252e%252e/%252e%252e/x",
    "/v1/..;/..;/x",
    "/v1/%00/x",
    "/v1/%C0%AE%C0%AE/%C0%AE%C0%AE/x",
]


@pytest.mark.parametrize("target", ESCAPES)
def test_a_path_that_would_leave_the_base_is_refused_and_never_forwarded(
    upstream: Upstream, proxy: ProxyServer, target: str
) -> None:
    for method, body in (("GET", None), ("POST", json.dumps(BODY).encode())):
        status, ctype, payload = send(proxy.url, method, target, body)
        assert status == 400, (target, status, payload[:200])
        err = api_error(status, ctype, payload)
        assert err["type"] == "invalid_request_error"
    assert upstream.paths == []
    assert proxy.records() == []


@pytest.mark.parametrize(
    ("target", "forwarded"),
    [
        ("//x", "/base/x"),
        ("//evil.example/x", "/base/evil.example/x"),
        ("/v1//models", "/base/v1/models"),
        ("/v1/./models", "/base/v1/models"),
        ("/v1/files/../models?limit=3", "/base/v1/models?limit=3"),
        ("/v1/%2e/models", "/base/v1/models"),
        ("/v1/models/", "/base/v1/models/"),
        ("http://evil.example/v1/models", "/base/v1/models"),
    ],
)
def test_a_path_is_normalized_under_the_base(
    upstream: Upstream, proxy: ProxyServer, target: str, forwarded: str
) -> None:
    status, _, payload = send(proxy.url, "GET", target)
    assert status == 200, payload[:200]
    assert upstream.paths == [forwarded]


def test_messages_with_dot_segments_still_run_through_the_pipeline(
    upstream: Upstream, proxy: ProxyServer
) -> None:
    status, _, payload = send(proxy.url, "POST", "/v1/./files/../messages", json.dumps(BODY).encode())
    assert status == 200 and json.loads(payload)["id"] == CANNED_MESSAGE["id"]
    assert upstream.paths == ["/base/v1/messages"]
    assert len(proxy.records()) == 1  # not forwarded around the pipeline


def test_nothing_the_command_forwards_leaves_the_base(command: tuple[str, Upstream]) -> None:
    url, upstream = command
    start = len(upstream.seen)
    for target in [*ESCAPES, "//x", "/v1/./models", "/v1/messages/count_tokens"]:
        status, ctype, payload = send(url, "GET", target)
        if status != 200:
            assert api_error(status, ctype, payload)["type"] == "invalid_request_error"
    received = upstream.paths[start:]
    assert received == ["/base/x", "/base/v1/models", "/base/v1/messages/count_tokens"]
    assert all(resolved(p).startswith(BASE + "/") for p in received)


# -- bodies --------------------------------------------------------------------------------------


def test_deeply_nested_json_is_a_400_and_the_command_answers_the_next_request(
    command: tuple[str, Upstream],
) -> None:
    url, upstream = command
    start = len(upstream.seen)
    depth = 100_000
    deeps = (
        b"[" * depth + b"]" * depth,
        b'{"model":"m","max_tokens":1,"messages":' + b"[" * depth + b"]" * depth + b"}",
        b'{"messages":[{"role":"user","content":' + b'{"a":' * depth + b"1" + b"}" * depth + b"}]}",
        # over PARSE_ON_LOOP_BYTES: parsed in the proxy's own threads, with the same answer
        b"[" * (6 * depth) + b"]" * (6 * depth),
    )
    assert len(deeps[-1]) > PARSE_ON_LOOP_BYTES > len(deeps[0])
    for deep in deeps:
        status, ctype, payload = send(url, "POST", "/v1/messages", deep)
        assert status == 400, payload[:200]
        err = api_error(status, ctype, payload)
        assert err["type"] == "invalid_request_error" and "nest" in err["message"]
    assert upstream.paths[start:] == []
    status, _, payload = send(url, "POST", "/v1/messages", json.dumps(BODY).encode())
    assert status == 200 and json.loads(payload)["id"] == CANNED_MESSAGE["id"]
    big = {**BODY, "messages": [{"role": "user", "content": "word " * (PARSE_ON_LOOP_BYTES // 2)}]}
    status, _, payload = send(url, "POST", "/v1/messages", json.dumps(big).encode())
    assert status == 200 and json.loads(payload)["id"] == CANNED_MESSAGE["id"]


def test_a_body_over_the_api_limit_is_a_json_413(command: tuple[str, Upstream]) -> None:
    url, upstream = command
    start = len(upstream.seen)
    big = b'{"messages":[{"role":"user","content":"' + b"x" * (33 * 1024 * 1024) + b'"}]}'
    status, ctype, payload = send(url, "POST", "/v1/messages", big)
    assert status == 413
    err = api_error(status, ctype, payload)
    assert err["type"] == "request_too_large" and "32 MB" in err["message"]
    # without a Content-Length (chunked), read until the limit
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=TIMEOUT)
    try:
        conn.request(
            "POST",
            "/v1/messages",
            body=iter([big[i : i + (1 << 20)] for i in range(0, len(big), 1 << 20)]),
            headers=HEADERS,
            encode_chunked=True,
        )
        r = conn.getresponse()
        status, ctype, payload = r.status, r.getheader("content-type") or "", r.read()
    finally:
        conn.close()
    assert status == 413
    assert api_error(status, ctype, payload)["type"] == "request_too_large"
    assert upstream.paths[start:] == []


@pytest.mark.parametrize(
    ("body", "ctype", "says"),
    [
        (b"", "application/json", "empty"),
        (b"{not json", "application/json", "not valid JSON"),
        (b'{"model": "m", "messages": [', "application/json", "not valid JSON"),
        (b"\xff\xfe\x00garbage", "application/json", "not valid JSON"),
        (b"[1, 2, 3]", "application/json", "JSON object"),
        (b'"a string"', "application/json", "JSON object"),
        (b"null", "application/json", "JSON object"),
        (b"model=m&max_tokens=1", "application/x-www-form-urlencoded", "application/json"),
        (
            b"--b\r\nContent-Disposition: form-data\r\n\r\nx\r\n--b--",
            "multipart/form-data; boundary=b",
            "JSON",
        ),
    ],
)
def test_a_body_that_is_not_a_json_object_gets_the_apis_400(
    upstream: Upstream, proxy: ProxyServer, body: bytes, ctype: str, says: str
) -> None:
    status, got_ctype, payload = send(proxy.url, "POST", "/v1/messages", body, {"content-type": ctype})
    assert status == 400, payload[:200]
    err = api_error(status, got_ctype, payload)
    assert err["type"] == "invalid_request_error" and says in err["message"], err
    assert upstream.paths == []
    assert proxy.records() == []


def test_json_under_another_content_type_is_still_served(upstream: Upstream, proxy: ProxyServer) -> None:
    status, _, payload = send(
        proxy.url, "POST", "/v1/messages", json.dumps(BODY).encode(), {"content-type": "text/plain"}
    )
    assert status == 200 and json.loads(payload)["id"] == CANNED_MESSAGE["id"]
    assert upstream.paths == ["/base/v1/messages"]
    assert upstream.seen[0]["headers"]["Content-Type"] == "application/json"


def test_an_object_without_messages_goes_to_the_api_with_a_log_line(
    upstream: Upstream, proxy: ProxyServer, caplog: pytest.LogCaptureFixture
) -> None:
    body = json.dumps({"model": "m", "max_tokens": 1, "messages": "hi"}).encode()
    with caplog.at_level(logging.WARNING, logger="tokensaver.proxy"):
        status, _, _ = send(proxy.url, "POST", "/v1/messages", body)
    assert status == 200  # what the upstream said (the API would say 400)
    assert [s["body"] for s in upstream.seen] == [body]  # byte for byte
    assert proxy.records() == []
    (line,) = [r.getMessage() for r in caplog.records if r.name == "tokensaver.proxy"]
    assert "not a Messages request" in line and "forwarded untouched" in line


def test_a_compressed_body_goes_upstream_decoded(upstream: Upstream, proxy: ProxyServer) -> None:
    data = gzip.compress(json.dumps(BODY).encode())
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        status, _, payload = send(proxy.url, "POST", path, data, {"content-encoding": "gzip"})
        assert status == 200, payload[:200]
    assert [s["path"] for s in upstream.seen] == ["/base/v1/messages", "/base/v1/messages/count_tokens"]
    for seen in upstream.seen:
        assert "Content-Encoding" not in seen["headers"]
        assert json.loads(seen["body"]) == BODY
    assert len(proxy.records()) == 1
    # a body that says gzip and is not
    status, ctype, payload = send(
        proxy.url, "POST", "/v1/messages", b"not gzip", {"content-encoding": "gzip"}
    )
    assert status == 400
    assert api_error(status, ctype, payload)["type"] == "invalid_request_error"
    assert len(upstream.seen) == 2


# -- HTTP the proxy cannot parse -----------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"GET * HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n",
    ],
)
def test_a_request_aiohttp_cannot_parse_gets_a_json_error(
    upstream: Upstream, proxy: ProxyServer, data: bytes
) -> None:
    status, ctype, payload = send_raw(proxy.url, data)
    assert 400 <= status < 500
    assert api_error(status, ctype, payload)["type"] == "invalid_request_error"
    assert upstream.paths == []


def test_the_command_answers_unparsable_http_as_json(command: tuple[str, Upstream]) -> None:
    url, _ = command
    status, ctype, payload = send_raw(url, b"GET * HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 400
    assert api_error(status, ctype, payload)["type"] == "invalid_request_error"


def test_an_unparsable_header_keeps_the_key_out_of_logs_and_answer(
    upstream: Upstream, proxy: ProxyServer, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "sk-ant-api03-SECRET-in-a-broken-header"
    with caplog.at_level(logging.DEBUG):
        for data in (
            f"GET /v1/models HTTP/1.1\r\nHost: x\r\nx-api-key: {secret}{'a' * 9000}\r\n\r\n".encode(),
            f"GET /v1/models HTTP/1.1\r\nHost: x\r\nx-api-key: {secret}\x01\r\n\r\n".encode(),
        ):
            status, ctype, payload = send_raw(proxy.url, data)
            assert status == 400
            assert api_error(status, ctype, payload)["type"] == "invalid_request_error"
            assert b"SECRET" not in payload
    logged = "\n".join(r.getMessage() + (caplog.text if r.exc_info else "") for r in caplog.records)
    assert "SECRET" not in logged and "SECRET" not in caplog.text
    assert upstream.paths == []


# -- what the proxy tells about the paths it does not optimize (issue 13: LiteLLM's /v1/v1/messages) --


def _proxy_lines(caplog: pytest.LogCaptureFixture, n: int = 0) -> list[str]:
    """The proxy's log lines, once there are ``n`` of them (a line is written once the answer is
    out, so the client may read it first)."""
    for _ in range(500):
        lines = [r.getMessage() for r in caplog.records if r.name == "tokensaver.proxy"]
        if len(lines) >= n:
            break
        time.sleep(0.01)
    return lines


def test_a_base_url_ending_in_v1_is_still_optimized(upstream: Upstream, proxy: ProxyServer) -> None:
    """The real SDK with ``base_url=.../v1`` (LiteLLM's ``api_base`` habit) sends ``/v1/v1/messages``:
    it runs through the pipeline, and goes upstream as the Messages API's own path."""
    import anthropic

    client = anthropic.Anthropic(base_url=proxy.url + "/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT)
    message = client.messages.create(**BODY)
    assert message.id == CANNED_MESSAGE["id"]
    assert upstream.paths == ["/base/v1/messages"]
    (record,) = proxy.records()
    assert (
        record["status"] == 200 and record["usage"]["input_tokens"] == CANNED_MESSAGE["usage"]["input_tokens"]
    )
    # however many /v1 the base path repeats, the query kept
    status, _, _ = send(proxy.url, "POST", "/v1/v1/v1/messages?beta=true", json.dumps(BODY).encode())
    assert status == 200 and upstream.paths[-1] == "/base/v1/messages?beta=true"
    assert len(proxy.records()) == 2 and proxy.records()[-1]["surface"] == "beta"


def test_every_forwarded_request_leaves_one_log_line(
    upstream: Upstream, proxy: ProxyServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="tokensaver.proxy"):
        status, _, _ = send(proxy.url, "GET", "/v1/models?limit=2")
        assert status == 200
        status, _, _ = send(proxy.url, "POST", "/v1/messages/count_tokens", json.dumps(BODY).encode())
        assert status == 200
        lines = _proxy_lines(caplog, 2)
    assert len(lines) == 2, lines
    assert "GET /v1/models?limit=2 -> 200" in lines[0] and "not optimized" in lines[0]
    assert "POST /v1/messages/count_tokens -> 200" in lines[1] and "not optimized" in lines[1]
    assert KEY not in caplog.text


def test_the_openai_compatible_endpoint_is_forwarded_and_named_in_the_log(
    upstream: Upstream, proxy: ProxyServer, caplog: pytest.LogCaptureFixture
) -> None:
    body = json.dumps(
        {"model": "claude-sonnet-4-6", "messages": [{"role": "user", "content": "Hi"}]}
    ).encode()
    with caplog.at_level(logging.INFO, logger="tokensaver.proxy"):
        status, _, _ = send(proxy.url, "POST", "/v1/chat/completions", body)
        (line,) = _proxy_lines(caplog, 1)
    assert status == 200 and upstream.paths == ["/base/v1/chat/completions"]
    assert [s["body"] for s in upstream.seen] == [body]  # untouched
    assert proxy.records() == []
    assert "POST /v1/chat/completions -> 200" in line and "not optimized" in line
    assert "OpenAI-compatible" in line and "/v1/messages" in line
