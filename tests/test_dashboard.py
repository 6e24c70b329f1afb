"""The proxy's live page: its figures are the ledger's, it follows new calls, it never gets in the way.

The browser test drives Debian's chromium, headless, over the DevTools protocol (a websocket, with
aiohttp): the page is loaded once from a real ``tokensaver proxy`` process in front of the emulator,
its rendered figures are compared with the run ledgers, more calls go through the SDK and the same
page must show them without a reload; a screenshot is taken and checked. It is skipped, saying why,
when chromium is not installed, unless ``TOKENSAVER_REQUIRE_BROWSER=1`` (CI) makes that a failure.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import httpx2
import pytest

from tokensaver.emulator import Emulator
from tokensaver.proxy import ProxyServer
from tokensaver.report import fmt_int, fmt_usd
from tokensaver.run import load_run
from tokensaver.testing import TEST_API_KEY, start_proxy_process, stop_process, stop_proxy_process

MODEL = "claude-sonnet-4-5"
# long enough to be cached: cache_align's breakpoints make the saving, so "saved" is not just $0
SYSTEM = "You are a careful assistant who answers in one short sentence. " * 300
FEED = "/_tokensaver/sessions.json"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1200,1000",
    "--remote-debugging-port=0",
    "--remote-debugging-address=127.0.0.1",
]


def _calls(base_url: str, run: str, n: int, start: int = 0) -> None:
    client = anthropic.Anthropic(
        base_url=base_url, api_key=TEST_API_KEY, max_retries=0, default_headers={"x-tokensaver-run": run}
    )
    try:
        for i in range(start, start + n):
            client.messages.create(
                model=MODEL,
                max_tokens=32,
                system=SYSTEM,
                messages=[{"role": "user", "content": f"question {i}: what is {i} + {i}?"}],
            )
    finally:
        client.close()


def _expected(runs_dir: Path, name: str) -> dict[str, Any]:
    """What the page must show for run ``name``, summed straight from its ledger file."""
    records = load_run(name, runs_dir).records()
    cost = sum(r["cost_usd"] for r in records)
    counterfactual = sum(r["counterfactual_usd"] for r in records)
    stages: dict[str, float] = {}
    for r in records:
        for st in r["stages"]:
            stages[st["plugin"]] = stages.get(st["plugin"], 0.0) + st["saved_usd"]
    assert abs(sum(r["saved_usd"] for r in records) - (counterfactual - cost)) < 1e-9
    return {
        "calls": fmt_int(len(records)),
        "cost": fmt_usd(cost),
        "counterfactual": fmt_usd(counterfactual),
        "saved": fmt_usd(counterfactual - cost),
        "saved_usd": counterfactual - cost,
        "stages": {k: fmt_usd(v) for k, v in stages.items()},
    }


# -- the feed over plain HTTP ------------------------------------------------------------------------


@pytest.fixture
def proxy(emu: Emulator, tmp_path: Path) -> Iterator[ProxyServer]:
    with ProxyServer({"runs_dir": str(tmp_path / "runs")}, upstream=emu.url, run="dash-default") as p:
        yield p


def test_feed_is_the_ledger_per_session(proxy: ProxyServer, tmp_path: Path) -> None:
    with httpx2.Client(timeout=30) as http:
        empty = http.get(proxy.url + FEED)
        assert empty.status_code == 200 and empty.json()["sessions"] == []
        _calls(proxy.url, "dash-a", 3)
        _calls(proxy.url, "dash-b", 1)
        r = http.get(proxy.url + FEED)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    assert r.headers["cache-control"] == "no-store"
    feed = r.json()
    assert feed["schema"] == "tokensaver-dashboard/1"
    runs = {s["run"]: s for s in feed["sessions"]}
    assert set(runs) == {"dash-a", "dash-b"}  # the default run has no calls: not listed
    assert [s["run"] for s in feed["sessions"]] == ["dash-b", "dash-a"]  # latest call first
    for name, n in (("dash-a", 3), ("dash-b", 1)):
        want, got = _expected(tmp_path / "runs", name), runs[name]
        records = load_run(name, tmp_path / "runs").records()
        assert got["totals"]["calls"] == n == len(records)
        assert got["totals"]["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in records))
        assert got["totals"]["saved_usd"] == pytest.approx(want["saved_usd"])
        shown = {f["k"]: f for f in got["figures"]}
        assert shown["cost"]["value"] == want["cost"] and shown["cost"]["tag"] == "billed"
        assert shown["counterfactual"]["tag"] == "est" and shown["auto"]["tag"] == "est"
        assert shown["saved"]["value"].split(" ")[0] == want["saved"]
        assert shown["auto"]["detail"].startswith(shown["auto"]["value"] + " (tokensaver saved ")
        assert {row[0]: row[5] for row in got["stage_rows"]} == want["stages"]
        assert len(got["recent_rows"]) == n
    assert _expected(tmp_path / "runs", "dash-a")["saved_usd"] > 0
    assert feed["all"]["totals"]["calls"] == 4
    assert feed["all"]["totals"]["cost_usd"] == pytest.approx(
        runs["dash-a"]["totals"]["cost_usd"] + runs["dash-b"]["totals"]["cost_usd"]
    )
    assert TEST_API_KEY not in r.text


def test_feed_without_a_ledger_shows_the_records_in_memory(emu: Emulator) -> None:
    with ProxyServer({"record": False}, upstream=emu.url) as p, httpx2.Client(timeout=30) as http:
        _calls(p.url, "dash-a", 2)
        client = anthropic.Anthropic(base_url=p.url, api_key=TEST_API_KEY, max_retries=0)
        client.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}])
        client.close()
        feed = http.get(p.url + FEED).json()
        kept = {pipe.run is None for pipe in p.proxy.pipelines()}
        by_run = {s["run"]: s["totals"] for s in feed["sessions"]}
        costs = [sum(r["cost_usd"] for r in pipe.records) for pipe in p.proxy.pipelines()]
    assert kept == {True}  # nothing written: the page is all there is
    assert {k: v["calls"] for k, v in by_run.items()} == {
        "dash-a (not recorded)": 2,
        "default run (not recorded)": 1,
    }
    assert sorted(v["cost_usd"] for v in by_run.values()) == pytest.approx(sorted(costs))


def test_the_proxy_starts_without_the_page_s_imports() -> None:
    # the page's renderer loads on its first request: the proxy's start (issue 13: under a second) pays nothing
    code = "import sys, tokensaver.proxy.server; print(sorted({'jinja2', 'tokensaver.report'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_page_and_prefix_are_local_and_forwarding_is_untouched(proxy: ProxyServer, emu: Emulator) -> None:
    with httpx2.Client(timeout=30) as http:
        page = http.get(proxy.url + "/")
        head = http.head(proxy.url + "/")
        other = http.get(proxy.url + "/_tokensaver/../_tokensaver/nothing")
        post_feed = http.post(proxy.url + FEED, json={"messages": []})
        post_messages = http.post(proxy.url + "/_tokensaver/v1/messages", json={"messages": []})
        assert emu.requests == []  # none of these went upstream
        models = http.get(proxy.url + "/v1/models", headers={"x-api-key": TEST_API_KEY})
        root_post = http.post(proxy.url + "/", json={"x": 1}, headers={"x-api-key": TEST_API_KEY})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "http://" not in page.text and "https://" not in page.text  # nothing loaded from elsewhere
    assert "<script src" not in page.text and "<link" not in page.text
    assert head.status_code == 200
    assert other.status_code == 404 and other.json()["error"]["type"] == "not_found_error"
    assert post_feed.status_code == 405
    assert post_messages.status_code == 404
    # every other path and method still goes upstream, as before
    assert [(r.method, r.path) for r in emu.requests] == [("GET", "/v1/models"), ("POST", "/")]
    assert models.status_code == emu.requests[0].status and root_post.status_code == emu.requests[1].status
    _calls(proxy.url, "dash-a", 1)  # the Messages route itself is unchanged
    assert emu.requests[-1].path == "/v1/messages"


def test_page_needs_the_access_token(emu: Emulator, tmp_path: Path) -> None:
    cfg = {"runs_dir": str(tmp_path / "runs")}
    with ProxyServer(cfg, upstream=emu.url, token="t0ken") as p, httpx2.Client(timeout=30) as http:
        for path in ("/", FEED):
            denied = http.get(p.url + path)
            assert denied.status_code == 401 and denied.headers["www-authenticate"].startswith("Basic ")
            assert http.get(p.url + path, auth=("me", "wrong")).status_code == 401
            assert http.get(p.url + path, auth=("anyone", "t0ken")).status_code == 200
            assert http.get(p.url + path, headers={"x-tokensaver-proxy-token": "t0ken"}).status_code == 200
    assert emu.requests == []


def test_page_answers_a_loopback_host_only(proxy: ProxyServer, emu: Emulator) -> None:
    # a site whose name was made to resolve to 127.0.0.1 (DNS rebinding) must not read the figures
    port = proxy.url.rsplit(":", 1)[1]
    with httpx2.Client(timeout=30) as http:
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example"):
            for path in ("/", FEED):
                assert http.get(proxy.url + path, headers={"host": host}).status_code == 403, (host, path)
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
            assert http.get(proxy.url + FEED, headers={"host": host}).status_code == 200, host
    assert emu.requests == []


# -- in a real browser ---------------------------------------------------------------------------------


def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.access("/usr/bin/chromium", os.X_OK):
        found = "/usr/bin/chromium"
    if found is None:
        reason = "chromium is not installed (Debian: apt-get install chromium); the live page was not checked"
        if os.environ.get("TOKENSAVER_REQUIRE_BROWSER") == "1":
            pytest.fail(f"TOKENSAVER_REQUIRE_BROWSER=1 but {reason}")
        print(f"SKIPPED test_dashboard browser test: {reason}")
        pytest.skip(reason)
    return found


class _Page:
    """One browser tab over the DevTools protocol: commands by id, events kept."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self._next = 0
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self._waiting:
                self._waiting.pop(data["id"]).set_result(data)
            elif "method" in data:
                self.events.append(data)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._next += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[self._next] = future
        await self.ws.send_json({"id": self._next, "method": method, "params": params})
        answer = await asyncio.wait_for(future, 30)
        assert "error" not in answer, f"{method}: {answer['error']}"
        return answer["result"]

    async def js(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    async def until(self, expression: str, want: Any, timeout: float = 30) -> None:
        """Wait until ``expression`` is ``want`` (bounded: a page that never updates fails here)."""
        deadline = time.monotonic() + timeout
        while (got := await self.js(expression)) != want:
            assert time.monotonic() < deadline, f"{expression} is {got!r}, still not {want!r}"
            await asyncio.sleep(0.2)


@asynccontextmanager
async def _browser(chromium: str, profile: Path) -> Any:
    log = open(profile.parent / "chromium.log", "w")
    proc = subprocess.Popen(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=log,
        stderr=log,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().count("\n") >= 1):
            assert proc.poll() is None, f"chromium exited: {(profile.parent / 'chromium.log').read_text()}"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split("\n")[0])
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                targets = await r.json()
            (target,) = [t for t in targets if t["type"] == "page"]
            async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=64 * 2**20) as ws:
                page = _Page(ws)
                try:
                    yield page
                finally:
                    page._reader.cancel()
    finally:
        stop_process(proc, grace=20)
        log.close()


# what the page shows: each run's section, its cards' values and its stage table, as text
READ_PAGE = """JSON.stringify(Array.from(document.querySelectorAll("section.run")).map(function (s) {
  var cards = {};
  s.querySelectorAll(".card").forEach(function (c) { cards[c.dataset.k] = c.querySelector("b").textContent; });
  var stages = {};
  s.querySelectorAll("table.stages tr").forEach(function (tr, i) {
    if (i) stages[tr.cells[0].textContent] = tr.cells[5].textContent;
  });
  return {run: s.dataset.run, cards: cards, stages: stages};
}))"""


def _png_facts(png: bytes) -> tuple[int, int, int]:
    """(width, height, distinct pixel bytes) of a PNG screenshot (8-bit, no interlace, as chromium writes)."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    pos, idat = 8, b""
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind = png[pos + 4 : pos + 8]
        if kind == b"IDAT":
            idat += png[pos + 8 : pos + 8 + length]
        pos += 12 + length
    return width, height, len(set(zlib.decompress(idat)))


def test_live_page_in_headless_chromium(emu: Emulator, tmp_path: Path) -> None:
    chromium = _chromium()
    assert chromium is not None
    runs_dir = tmp_path / "runs"
    env = {**os.environ, "TOKENSAVER_RUNS_DIR": str(runs_dir)}
    proc, url = start_proxy_process("--upstream", emu.url, "--run", "dash-default", env=env, cwd=tmp_path)
    profile = tmp_path / "profile"
    profile.mkdir()
    shot = tmp_path / "dashboard.png"

    def shown(sections: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {s["run"]: s for s in sections}

    def check(sections: list[dict[str, Any]], name: str) -> None:
        want, got = _expected(runs_dir, name), shown(sections)[name]
        assert got["cards"]["calls"] == want["calls"]
        assert got["cards"]["cost"] == want["cost"]
        assert got["cards"]["counterfactual"] == want["counterfactual"]
        assert got["cards"]["saved"].split(" ")[0] == want["saved"]
        assert got["stages"] == want["stages"]

    async def scenario() -> None:
        async with _browser(chromium, profile) as page:
            await page.send("Network.enable")
            await page.send("Page.enable")
            await page.send("Page.navigate", url=url + "/")
            await page.until("document.body && document.body.dataset.calls", "0")
            await asyncio.to_thread(_calls, url, "dash-a", 2)
            await asyncio.to_thread(_calls, url, "dash-b", 1)
            # the page loaded before these calls: it shows them only by updating itself
            await page.until("document.body.dataset.calls", "3")
            sections = json.loads(await page.js(READ_PAGE))
            assert [s["run"] for s in sections] == ["all sessions", "dash-b", "dash-a"]
            check(sections, "dash-a")
            check(sections, "dash-b")
            assert _expected(runs_dir, "dash-a")["saved_usd"] > 0
            assert shown(sections)["all sessions"]["cards"]["calls"] == "3"

            await asyncio.to_thread(_calls, url, "dash-a", 2, 2)
            await page.until("document.body.dataset.calls", "5")
            await page.until(
                "document.querySelector('section[data-run=\"dash-a\"] .card.calls b').textContent", "4"
            )
            sections = json.loads(await page.js(READ_PAGE))
            check(sections, "dash-a")
            check(sections, "dash-b")
            text = await page.js("document.body.innerText")
            assert "with automatic caching alone" in text and "billed" in text and "estimated" in text
            assert TEST_API_KEY not in await page.js("document.documentElement.outerHTML")

            png = base64.b64decode((await page.send("Page.captureScreenshot", format="png"))["data"])
            shot.write_bytes(png)
            # nothing but the proxy itself was asked for anything
            asked = {
                e["params"]["request"]["url"]
                for e in page.events
                if e["method"] == "Network.requestWillBeSent"
            }
            assert asked and all(u.startswith(url + "/") for u in asked), asked

    try:
        asyncio.run(asyncio.wait_for(scenario(), 180))
    finally:
        stop_proxy_process(proc)
    png = shot.read_bytes()
    width, height, distinct = _png_facts(png)
    print(f"dashboard screenshot: {shot} ({len(png):,} bytes, {width}x{height})")
    assert width == 1200 and height > 600  # the window, less what headless keeps for itself
    assert len(png) > 20_000  # a blank 1200x1000 PNG is a few kB
    assert distinct > 50  # text, tags and borders, not one flat colour
