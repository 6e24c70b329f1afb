"""The fault suite's own harness (e2e/faults.py): a few of its scenarios, quickly, against an in-process proxy.

The full suite runs in CI as its own step (``python e2e/faults.py --out docs/faults-latest.md``);
these tests check that the harness tells outcomes apart: API errors through the real proxy count
as "failed as the API would", and a proxy that serves one stored answer to every request is
caught as "wrong" (and fails the suite).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "e2e"))

import faults  # noqa: E402

from tokensaver.proxy import BackgroundApp  # noqa: E402


def _run(suite: Any, groups: list[str], limit: float = 90.0) -> None:
    asyncio.run(asyncio.wait_for(suite.run(groups), limit))


def test_api_errors_and_resets_through_the_proxy_fail_as_the_api_would(tmp_path: Path) -> None:
    suite = faults.Suite(tmp_path, quick=True, inprocess=True, select=["429", "reset before"]).start()
    try:
        _run(suite, ["upstream faults"])
    finally:
        suite.stop()
    assert [r.name for r in suite.results] == [
        "429 / 529 / 500 / 502 / 503 with retry-after, JSON and SSE",
        "connection reset before the headers",
    ]
    for r in suite.results:
        assert r.sent > 0 and r.counts["failed_api"] == r.sent, (r.name, dict(r.counts), dict(r.notes))
    assert faults.exit_code(suite.results) == 0
    assert "| upstream faults | 14 | 0 | 14 | 0 | 0 |" in faults.group_table(suite.results)


def _liar(upstream: str) -> web.Application:
    """A "proxy" that forwards the first JSON and the first SSE request, then serves those answers to all."""
    import aiohttp

    kept: dict[bool, tuple[int, str, bytes]] = {}
    lock: list[asyncio.Lock] = []

    async def handle(request: web.Request) -> web.Response:
        raw = await request.read()
        stream = b'"stream":true' in raw.replace(b" ", b"")
        if not lock:
            lock.append(asyncio.Lock())
        async with lock[0]:
            if stream not in kept:
                headers = {
                    k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")
                }
                async with aiohttp.ClientSession() as http:
                    async with http.post(f"{upstream}/v1/messages", data=raw, headers=headers) as up:
                        kept[stream] = (up.status, up.headers.get("content-type", ""), await up.read())
        status, ctype, body = kept[stream]
        return web.Response(status=status, body=body, headers={"content-type": ctype})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/messages", handle)
    return app


def test_a_proxy_that_serves_other_requests_answers_is_caught_as_wrong(tmp_path: Path) -> None:
    suite = faults.Suite(tmp_path, quick=True, inprocess=True, select=["slow upstream (2 s"]).start()
    liar = BackgroundApp(_liar(suite.up.api_url)).start()
    suite.main_url = liar.url
    try:
        _run(suite, ["upstream faults"])
    finally:
        liar.stop()
        suite.stop()
    (slow,) = suite.results
    assert slow.counts["wrong"] > 0, dict(slow.counts)
    assert any("another request" in note for note in slow.notes), dict(slow.notes)
    assert faults.exit_code(suite.results) == 1
    report = faults.render(suite.results, faults.meta(1.0))
    assert "FAILED" in report and "an answer to another request" in report


@pytest.mark.parametrize("text", ["[nonce:abc-1]", "Say it. [hang][nonce:abc-1]"])
def test_the_upstream_reads_the_nonce_of_the_last_user_message(text: str) -> None:
    from fault_upstream import nonce_text

    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]}
    assert nonce_text(body) == ("abc-1", text)
    assert nonce_text({"messages": [{"role": "user", "content": "no nonce here"}]}) == (None, "")
