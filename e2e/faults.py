"""The fault suite: tokensaver as a hostile world uses it, on loopback, bounded in count and time.

    python e2e/faults.py [--out docs/faults-latest.md] [--only GROUP,...] [--quick] [--readme]

It starts a fault-injecting Messages API (``fault_upstream.py``: the offline emulator's answers,
or the fault a request asks for), real ``tokensaver proxy`` processes in front of it, in-process
proxies and ``wrap()`` clients with misbehaving plugins (``fault_plugins.py``), and sends every
request with the real anthropic SDK (raw HTTP only for bodies the SDK cannot send). Each scenario
says what correct means; each request it sends is counted as

* **answered correctly**: the answer is the one the API gave this API key for this request (same
  message, content and billed usage), and every check the scenario names held;
* **failed as the API would**: the request fails the way it fails talking to the API directly
  (same SDK exception class, HTTP status, error type and ``retry-after``; for a connection the
  upstream broke, a failure the SDK retries, in the API's JSON error shape);
* **lost**: no answer in time, or a failure where the API would have answered;
* **wrong**: anything else the caller got (another request's or another key's answer, an answer
  whose stream failed served again, an error of another kind or shape, a paid call that should
  not have been made, prompt text in the ledger, a file others can read, a ledger record lost).

"lost" and "wrong" must be 0: the suite exits 1 otherwise (CI fails), 2 on a harness error.
The table goes to ``--out`` (Markdown); ``--readme`` also refreshes the README's quoted table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import posixpath
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp  # noqa: E402
import fault_harness  # noqa: E402
import fault_plugins as fp  # noqa: E402
from aiohttp import web  # noqa: E402
from fault_harness import (  # noqa: E402
    KEY_A,
    KEY_B,
    KINDS,
    LABELS,
    ProxyProcess,
    Scenario,
    agent_body,
    api_error_of,
    api_shaped,
    ask,
    ask_sync,
    async_client,
    await_until,
    describe_raw,
    expect_answer,
    expect_failure,
    expect_retryable,
    in_thread,
    modes_problems,
    raw_exchange,
    raw_request,
    retryable,
    small_body,
    sync_client,
)
from fault_upstream import FAULT_HEADER, FaultUpstream  # noqa: E402

import tokensaver  # noqa: E402
from tokensaver.proxy import BackgroundApp, ProxyServer  # noqa: E402
from tokensaver.run import load_run  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RUN_HEADER = "x-tokensaver-run"
GROUPS = ("load", "upstream faults", "plugins", "memoize", "bad input", "privacy", "kill -9")
DEFAULT_PLUGINS = ["summarize", "prune", "cache_align"]
MAX_RSS_MB = 1024  # the main proxy after the load (the issue saw 140 -> 189 MB over 3,200 requests)
FD_SLACK = 8  # idle sockets may exceed those before the load by this much
MAX_OTHER_FDS = (
    256  # files a proxy holds when idle (thread-local store connections): bounded, not per request
)
MEMO_WAIT = 10.0  # memoize's single-flight wait in the suite's proxies (default 120 s): bounds a stuck claim
PLUGIN_TIMEOUT = 2.0  # set on any plugin-timeout setting the core declares (see plugin_timeout_settings)
README_BEGIN = "<!-- fault-suite:begin -->"
README_END = "<!-- fault-suite:end -->"


def plugin_timeout_settings() -> dict[str, Any]:
    """``{key: 2 s}`` for each top-level config key about timeouts the core declares (none: {})."""
    from tokensaver import config

    out: dict[str, Any] = {}
    for key, spec in getattr(config, "CORE_KEYS", {}).items():
        types = spec[0] if isinstance(spec, tuple) and spec and isinstance(spec[0], tuple) else ()
        if "timeout" in key and (float in types or int in types):
            out[key] = PLUGIN_TIMEOUT if float in types else int(PLUGIN_TIMEOUT)
    return out


class Suite:
    """The upstream, the proxies and the scenarios; ``results`` holds one :class:`Scenario` each."""

    def __init__(
        self, root: Path, *, quick: bool = False, inprocess: bool = False, select: list[str] | None = None
    ) -> None:
        self.root = root
        self.select = select  # run only scenarios whose name contains one of these (None: all)
        self.quick = quick
        self.inprocess = inprocess  # the main proxy in this process (tests) instead of a subprocess
        self.up = FaultUpstream()
        self.results: list[Scenario] = []
        self.runs_dir = root / "runs-main"
        self.cache_dir = root / "cache-main"
        self.memo_dir = root / "memo-main"
        self.main_url = ""
        self._main_proc: ProxyProcess | None = None
        self._main_server: ProxyServer | None = None
        self._procs: list[ProxyProcess] = []
        self._servers: list[ProxyServer] = []
        self.timeouts = plugin_timeout_settings()
        self.finals: list[Callable[[], Awaitable[None]]] = []  # checks that run after every group
        self._rng = random.Random(10)

    # setup ---------------------------------------------------------------------------------------

    def proxy_config(self, runs_dir: Path, memo_dir: Path | None, plugins: list[str] | None = None) -> dict:
        cfg: dict[str, Any] = {
            "plugins": list(DEFAULT_PLUGINS if plugins is None else plugins),
            "runs_dir": str(runs_dir),
            "record": True,
            **self.timeouts,
        }
        if memo_dir is not None:
            cfg["plugins"].append("memoize")
            cfg["memoize"] = {"dir": str(memo_dir), "wait": MEMO_WAIT}
        return cfg

    def start(self) -> Suite:
        """Start the upstream and the main proxy (defaults + memoize)."""
        self.up.start()
        cfg = self.proxy_config(self.runs_dir, self.memo_dir)
        if self.inprocess:
            os.environ.setdefault("TOKENSAVER_CACHE_DIR", str(self.cache_dir))
            self._main_server = ProxyServer(cfg, upstream=self.up.api_url).start()
            self.main_url = self._main_server.url
        else:
            self._main_proc = ProxyProcess(self.root, "main", self.up.api_url, cfg, self.cache_dir).start()
            self._procs.append(self._main_proc)
            self.main_url = self._main_proc.url
        return self

    def stop(self) -> None:
        """Stop every proxy and the upstream (bounded)."""
        for server in self._servers + ([self._main_server] if self._main_server else []):
            try:
                server.stop()
            except Exception:  # noqa: BLE001 - shutting down: keep going
                pass
        for proc in self._procs:
            proc.stop()
        self.up.stop()

    # running -------------------------------------------------------------------------------------

    async def scenario(
        self, group: str, name: str, means: str, body: Callable[[Scenario], Awaitable[None]], limit: float
    ) -> Scenario:
        """Run one scenario within ``limit`` seconds; a harness error is counted as wrong, loudly."""
        sc = Scenario(group, name, means)
        if self.select is not None and not any(s in name for s in self.select):
            return sc
        self.results.append(sc)
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(body(sc), limit)
        except TimeoutError:
            sc.add("lost", f"the scenario hit its {limit:.0f} s limit")
        except Exception as exc:  # noqa: BLE001
            sc.add("wrong", f"harness error {type(exc).__name__}: {exc}")
            traceback.print_exc()
        sc.seconds = time.monotonic() - t0
        state = "ok" if sc.ok else "FAIL"
        counts = " ".join(f"{k}={sc.counts[k]}" for k in KINDS)
        print(f"[{state}] {group} / {name}: sent={sc.sent} {counts} ({sc.seconds:.1f} s)", flush=True)
        for note, n in sc.notes.most_common(10):
            print(f"       {n} x {note}", flush=True)
        return sc

    async def run(self, groups: list[str]) -> None:
        table: dict[str, Callable[[], Awaitable[None]]] = {
            "load": self.g_load,
            "upstream faults": self.g_upstream,
            "plugins": self.g_plugins,
            "memoize": self.g_memoize,
            "bad input": self.g_bad_input,
            "privacy": self.g_privacy,
            "kill -9": self.g_kill,
        }
        for group in groups:
            await table[group]()
        for final in self.finals:
            await final()

    # shared checks -------------------------------------------------------------------------------

    def ledger(self, run: str, runs_dir: Path | None = None) -> list[dict[str, Any]]:
        try:
            return load_run(run, runs_dir or self.runs_dir).records()
        except tokensaver.TokensaverError:
            return []

    async def check_recorded(
        self, sc: Scenario, run: str, expected: int, runs_dir: Path | None = None
    ) -> None:
        """Each attempt through a proxy is in its run's ledger (waits a little for the last writes)."""
        await await_until(lambda: len(self.ledger(run, runs_dir)) >= expected, 5.0)
        missing = expected - len(self.ledger(run, runs_dir))
        if missing > 0:
            sc.demote(missing, "wrong", "attempt missing from the run ledger")

    async def clients(self, base: str) -> dict[str, Any]:
        return {KEY_A: async_client(base, KEY_A), KEY_B: async_client(base, KEY_B)}

    @staticmethod
    async def close(clients: dict[str, Any]) -> None:
        for c in clients.values():
            await c.close()

    # load ----------------------------------------------------------------------------------------

    async def g_load(self) -> None:
        sessions, turns = (8, 2) if self.quick else (50, 4)
        proc = self._main_proc
        fds0, rss0 = (proc.fds(), proc.rss_mb()) if proc else (None, None)

        def measure(sc: Scenario) -> None:
            """The main proxy's memory after the load, and (at the end of the suite) its idle fds."""
            if proc is None or fds0 is None or rss0 is None:
                return
            rss1, fds1 = proc.rss_mb() or 0.0, proc.fds() or (0, 0)
            sc.facts.append(f"proxy RSS {rss0:.0f} -> {rss1:.0f} MB")
            if rss1 > MAX_RSS_MB:
                sc.demote(1, "wrong", f"proxy RSS {rss1:.0f} MB after the load (limit {MAX_RSS_MB} MB)")

            async def idle_fds() -> None:
                """At the end of the suite (idle keep-alives long closed): sockets back, other fds bounded."""

                def settled() -> bool:
                    now = proc.fds() or (0, 0)
                    return now[0] <= fds0[0] + FD_SLACK and now[1] <= MAX_OTHER_FDS

                ok = await await_until(settled, 30.0, 0.5)
                end = proc.fds() or (0, 0)
                sc.facts.append(
                    f"proxy sockets {fds0[0]} before, {fds1[0]} after the load, {end[0]} idle at the end; "
                    f"other fds {fds0[1]} / {fds1[1]} / {end[1]}"
                )
                if not ok:
                    sc.demote(1, "wrong", f"file descriptors not released when idle: {fds1} -> {end}")

            self.finals.append(idle_fds)

        async def body(sc: Scenario) -> None:
            run = "faults-load"
            clients = await self.clients(self.main_url)

            async def session(i: int) -> None:
                key = KEY_A if i % 2 == 0 else KEY_B
                for t in range(1, turns + 1):
                    nonce = f"load-{i}-{t}"
                    b, text = agent_body(
                        nonce, session=f"load{i}", turns=t, first_tokens=10_000, turn_tokens=13_000,
                        stream=(i + t) % 2 == 0,
                    )  # fmt: skip
                    got = await ask(clients[key], b, headers={RUN_HEADER: run}, timeout=90)
                    expect_answer(sc, self.up, got, nonce, key, text)

            try:
                await asyncio.gather(*(session(i) for i in range(sessions)))
            finally:
                await self.close(clients)
            await self.check_recorded(sc, run, sc.sent)

        await self.scenario(
            "load",
            f"{sessions} concurrent agent sessions x {turns} turns, JSON and SSE, 10k-49k tokens, 2 keys",
            "every answer is the upstream's answer to that request for that key (content, usage), "
            "every call in the ledger",
            body,
            240,
        )

        many = 40 if self.quick else 200

        async def burst(sc: Scenario) -> None:
            run = "faults-burst"
            clients = await self.clients(self.main_url)
            jobs = []
            for i in range(many):
                key = (KEY_A, KEY_B)[i % 2]
                nonce = f"burst-{i}"
                b, text = agent_body(nonce, session=f"burst{i}", first_tokens=10_000, stream=i % 3 == 0)
                jobs.append((nonce, key, text, ask(clients[key], b, headers={RUN_HEADER: run}, timeout=120)))
            try:
                gots = await asyncio.gather(*(j[3] for j in jobs))
            finally:
                await self.close(clients)
            for (nonce, key, text, _), got in zip(jobs, gots, strict=True):
                expect_answer(sc, self.up, got, nonce, key, text)
            await self.check_recorded(sc, run, sc.sent)
            measure(sc)

        await self.scenario(
            "load",
            f"{many} clients at once, one 10k-token call each, JSON and SSE, 2 keys",
            "every answer is the upstream's answer to that request for that key; every call in the ledger; "
            f"the proxy's RSS under {MAX_RSS_MB} MB after the load; when idle at the end of the suite its "
            f"sockets are closed and it holds at most {MAX_OTHER_FDS} other fds",
            burst,
            180,
        )

    # upstream faults -----------------------------------------------------------------------------

    async def g_upstream(self) -> None:
        up, main = self.up, self.main_url
        reps = 1 if self.quick else 2

        async def api_errors(sc: Scenario) -> None:
            run = "faults-api-errors"
            direct, via = await self.clients(up.api_url), await self.clients(main)
            try:
                for fault in ("status:429:2", "status:529:1", "status:500", "status:502", "status:503:5"):
                    for stream in (False, True):
                        b, _ = small_body(f"ref-{fault}-{stream}", stream=stream)
                        ref = await ask(direct[KEY_A], b, headers={FAULT_HEADER: fault}, timeout=15)
                        for r in range(reps):
                            b, _ = small_body(f"err-{fault}-{stream}-{r}", stream=stream)
                            got = await ask(
                                via[KEY_A], b, headers={FAULT_HEADER: fault, RUN_HEADER: run}, timeout=15
                            )
                            expect_failure(sc, got, ref)
            finally:
                await self.close(direct)
                await self.close(via)
            await self.check_recorded(sc, run, sc.sent)

        await self.scenario(
            "upstream faults",
            "429 / 529 / 500 / 502 / 503 with retry-after, JSON and SSE",
            "the SDK raises what it raises talking to the upstream directly (class, status, error type, "
            "retry-after); each attempt recorded",
            api_errors,
            60,
        )

        async def resets(sc: Scenario) -> None:
            run = "faults-resets"
            via = await self.clients(main)
            try:
                for stream in (False, True):
                    for r in range(reps * 2):
                        b, _ = small_body(f"reset-{stream}-{r}", stream=stream)
                        got = await ask(
                            via[KEY_A], b, headers={FAULT_HEADER: "reset", RUN_HEADER: run}, timeout=15
                        )
                        expect_retryable(sc, got)
            finally:
                await self.close(via)
            await self.check_recorded(sc, run, sc.sent)

        await self.scenario(
            "upstream faults",
            "connection reset before the headers",
            "a failure the SDK retries (directly: APIConnectionError), in the API's JSON shape; recorded",
            resets,
            60,
        )

        async def wrap_errors(sc: Scenario) -> None:
            runs = self.root / "runs-wrap-errors"
            cfg = {"plugins": DEFAULT_PLUGINS, "runs_dir": str(runs), "record": True, **self.timeouts}
            client = tokensaver.wrap(sync_client(up.api_url, KEY_A, timeout=1.0), config=cfg)
            direct = sync_client(up.api_url, KEY_A, timeout=1.0)
            for fault in ("reset", "slow:3", "status:529:1"):
                for stream in (False, True):
                    b, _ = small_body(f"wrap-{fault}-{stream}", stream=stream)
                    ref = await in_thread(ask_sync, direct, b, {FAULT_HEADER: fault}, timeout=15)
                    got = await in_thread(ask_sync, client, b, {FAULT_HEADER: fault}, timeout=15)
                    expect_failure(sc, got, ref, fault)
            run = client.tokensaver.run
            recorded = len(load_run(run.name, runs).records()) if run is not None else 0
            if recorded < sc.sent:
                sc.demote(
                    sc.sent - recorded, "wrong", "wrap(): a failed attempt is missing from the run ledger"
                )

        await self.scenario(
            "upstream faults",
            "wrap() (sync): connection reset, a timeout (slow upstream, 1 s client timeout), 529",
            "the SDK raises what it raises without tokensaver; every attempt is in the run ledger",
            wrap_errors,
            60,
        )

        async def broken_streams(sc: Scenario) -> None:
            """A fault, then the identical request again: it must be answered fresh, not from memoize."""
            run = "faults-broken-streams"
            direct, via = await self.clients(up.api_url), await self.clients(main)
            try:
                for fault, stream in (
                    ("reset_mid_stream", True),
                    ("truncate", False),
                    ("garbage_sse", True),
                    ("error_then_stop", True),
                    ("late_error", True),
                ):
                    b, _ = small_body(f"ref-{fault}", stream=stream)
                    ref = await ask(direct[KEY_A], b, headers={FAULT_HEADER: fault}, timeout=15)
                    for r in range(reps):
                        nonce = f"broken-{fault}-{r}"
                        b, text = small_body(nonce, stream=stream)
                        got = await ask(
                            via[KEY_A], b, headers={FAULT_HEADER: fault, RUN_HEADER: run}, timeout=15
                        )
                        if fault in ("reset_mid_stream", "truncate"):
                            # the proxy cannot reproduce a broken connection once it has answered: any
                            # failure the SDK retries (or a stream that raises) is what the API would do
                            if fault == "reset_mid_stream" and got.error is not None and not got.timed_out:
                                sc.add("failed_api")
                            else:
                                expect_retryable(sc, got, fault)
                        else:
                            expect_failure(sc, got, ref, fault)
                        retry = await ask(via[KEY_A], b, headers={RUN_HEADER: run}, timeout=MEMO_WAIT - 2)
                        expect_answer(sc, up, retry, nonce, KEY_A, text, f"retry after {fault}")
            finally:
                await self.close(direct)
                await self.close(via)
            await self.check_recorded(sc, run, sc.sent)
            blamed_client = [r for r in self.ledger(run) if "client disconnected" in str(r.get("error"))]
            if blamed_client:
                sc.demote(len(blamed_client), "wrong", "an upstream fault recorded as 'client disconnected'")
            # the same through wrap() with memoize: a stream the SDK raised on is never stored
            cfg = {
                "plugins": ["memoize"],
                "runs_dir": str(self.root / "runs-broken-wrap"),
                "memoize": {"dir": str(self.root / "memo-broken-wrap"), "wait": MEMO_WAIT},
            }
            client = tokensaver.wrap(sync_client(up.api_url, KEY_A), config=cfg)
            plain = sync_client(up.api_url, KEY_A)
            for fault in ("reset_mid_stream", "garbage_sse", "error_then_stop", "late_error"):
                nonce = f"broken-wrap-{fault}"
                b, text = small_body(nonce, stream=True)
                ref = await in_thread(
                    ask_sync,
                    plain,
                    small_body(f"ref-wrap-{fault}", stream=True)[0],
                    {FAULT_HEADER: fault},
                    timeout=15,
                )
                got = await in_thread(ask_sync, client, b, {FAULT_HEADER: fault}, timeout=15)
                if fault == "reset_mid_stream" and got.error is not None:
                    sc.add("failed_api")
                else:
                    expect_failure(sc, got, ref, f"wrap() {fault}")
                retry = await in_thread(ask_sync, client, b, timeout=MEMO_WAIT - 2)
                expect_answer(sc, up, retry, nonce, KEY_A, text, f"wrap() retry after {fault}")

        await self.scenario(
            "upstream faults",
            "reset mid-stream, truncated 200 (body < Content-Length), garbage SSE lines, an error event "
            "(early or after message_delta) then message_stop; each followed by the identical request (proxy with memoize; wrap() with memoize)",
            "the fault fails as it does directly (a cut connection: a failure the SDK retries); the identical "
            f"retry is answered at once (< {MEMO_WAIT - 2:.0f} s) by a new upstream call, never the broken answer",
            broken_streams,
            120,
        )

        async def slow(sc: Scenario) -> None:
            run = "faults-slow"
            via = await self.clients(main)
            jobs = []
            for i, (fault, stream) in enumerate(
                [("slow:2", False), ("slow:2", True), ("slow_stream:0.15", True)] * reps
            ):
                nonce = f"slow-{i}"
                b, text = small_body(nonce, stream=stream)
                jobs.append(
                    (
                        nonce,
                        text,
                        ask(via[KEY_B], b, headers={FAULT_HEADER: fault, RUN_HEADER: run}, timeout=30),
                    )
                )
            try:
                gots = await asyncio.gather(*(j[2] for j in jobs))
            finally:
                await self.close(via)
            for (nonce, text, _), got in zip(jobs, gots, strict=True):
                expect_answer(sc, up, got, nonce, KEY_B, text)
            await self.check_recorded(sc, run, sc.sent)

        await self.scenario(
            "upstream faults",
            "slow upstream (2 s before the headers; 150 ms between SSE events)",
            "answered correctly",
            slow,
            60,
        )

        async def disconnect(sc: Scenario) -> None:
            run = "faults-disconnect"
            headers = {"x-api-key": KEY_A, "anthropic-version": "2023-06-01", RUN_HEADER: run}
            via = await self.clients(main)
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
                    for r in range(reps):
                        nonce = f"disconnect-{r}"
                        b, _ = small_body(nonce, stream=True)
                        resp = await http.post(
                            f"{main}/v1/messages",
                            json=b,
                            headers={**headers, FAULT_HEADER: "slow_stream:0.2"},
                        )
                        await resp.content.readany()
                        resp.close()  # the client goes away mid-stream
                        if await await_until(lambda n=nonce: up.disconnects[n] > 0, 8.0):
                            sc.add("correct")
                        else:
                            sc.add("wrong", "the proxy kept reading the upstream after its client left")
                        nonce = f"after-disconnect-{r}"
                        b, text = small_body(nonce)
                        got = await ask(via[KEY_A], b, headers={RUN_HEADER: run}, timeout=15)
                        expect_answer(sc, up, got, nonce, KEY_A, text)
            finally:
                await self.close(via)
            await self.check_recorded(sc, run, sc.sent)

        await self.scenario(
            "upstream faults",
            "client disconnects mid-stream, then a new request",
            "the proxy closes its upstream request (< 8 s), records the call, and answers the next one",
            disconnect,
            60,
        )

    # plugins -------------------------------------------------------------------------------------

    async def inprocess_proxy(self, plugins: dict[str, Any], order: list[str], name: str) -> ProxyServer:
        pm = tokensaver.get_plugin_manager(plugins)
        cfg = {"plugins": order, "runs_dir": str(self.root / f"runs-{name}"), "record": True, **self.timeouts}
        server = ProxyServer(cfg, upstream=self.up.api_url, plugin_manager=pm)
        await asyncio.to_thread(server.start)
        self._servers.append(server)
        return server

    def wrapped(self, plugins: dict[str, Any], order: list[str], name: str, key: str = KEY_A) -> Any:
        pm = tokensaver.get_plugin_manager(plugins)
        cfg = {"plugins": order, "runs_dir": str(self.root / f"runs-{name}"), "record": True, **self.timeouts}
        return tokensaver.wrap(sync_client(self.up.api_url, key), config=cfg, plugin_manager=pm)

    @staticmethod
    def blamed(records: list[dict[str, Any]], plugin: str) -> int:
        """Records whose errors (or stages) name ``plugin``."""
        n = 0
        for r in records:
            errs = [e for e in r.get("errors") or [] if e.get("plugin") == plugin]
            stages = [s for s in r.get("stages") or [] if s.get("plugin") == plugin and s.get("error")]
            n += bool(errs or stages)
        return n

    async def g_plugins(self) -> None:
        up = self.up
        hang_limit = PLUGIN_TIMEOUT + 8 if self.timeouts else 15.0
        n_hang = 6  # as many as the default executor has threads here (min(32, cpus + 4))

        async def hang_proxy(sc: Scenario) -> None:
            hang = fp.Hang(hold=40)
            server = await self.inprocess_proxy({"hang": hang}, ["hang"], "hang")
            via = await self.clients(server.url)
            try:
                jobs = []
                for i in range(n_hang):
                    b, text = small_body(f"hang-{i}", marker=fp.HANG, stream=i % 2 == 1)
                    jobs.append((f"hang-{i}", text, ask(via[KEY_A], b, timeout=hang_limit)))
                await asyncio.sleep(0.5)  # the hanging calls are in the plugin before the others arrive
                for i in range(4):
                    b, text = small_body(f"unrelated-{i}", stream=i % 2 == 1)
                    jobs.append((f"unrelated-{i}", text, ask(via[KEY_A], b, timeout=8)))
                gots = await asyncio.gather(*(j[2] for j in jobs))
                for (nonce, text, _), got in zip(jobs, gots, strict=True):
                    expect_answer(sc, up, got, nonce, KEY_A, text, nonce.rsplit("-", 1)[0])
                answered = [r for r in server.records() if r.get("status") == 200]
                unblamed = n_hang - self.blamed(answered, "hang")
                if unblamed > 0 and sc.counts["correct"] >= n_hang:
                    sc.demote(unblamed, "wrong", "the record does not blame the hanging plugin")
            finally:
                hang.release.set()
                await self.close(via)

        await self.scenario(
            "plugins",
            f"{n_hang} calls hang in a plugin, 4 unrelated calls through the same proxy",
            f"every call answered (hanging ones within {hang_limit:.0f} s, the plugin skipped and blamed in "
            "the record; unrelated ones within 8 s)",
            hang_proxy,
            60,
        )

        async def hang_wrap(sc: Scenario) -> None:
            hang = fp.Hang(hold=40)
            client = self.wrapped({"hang": hang}, ["hang"], "hang-wrap")
            try:
                b, text = small_body("hang-wrap", marker=fp.HANG)
                got = await in_thread(ask_sync, client, b, timeout=hang_limit)
                expect_answer(sc, up, got, "hang-wrap", KEY_A, text)
            finally:
                hang.release.set()

        await self.scenario(
            "plugins",
            "a plugin hangs under wrap() (sync)",
            f"answered within {hang_limit:.0f} s, the plugin skipped",
            hang_wrap,
            40,
        )

        async def raising(sc: Scenario) -> None:
            server = await self.inprocess_proxy({"raise": fp.Raise()}, ["raise"], "raise")
            via = await self.clients(server.url)
            try:
                for i in range(4):
                    b, text = small_body(f"raise-{i}", marker=fp.RAISE, stream=i % 2 == 1)
                    got = await ask(via[KEY_A], b, timeout=15)
                    expect_answer(sc, up, got, f"raise-{i}", KEY_A, text)
            finally:
                await self.close(via)
            unblamed = sc.counts["correct"] - self.blamed(server.records(), "raise")
            sc.demote(unblamed, "wrong", "the record does not blame the raising plugin")

        await self.scenario(
            "plugins",
            "a plugin raises in its transform and its observer",
            "answered correctly, the plugin named in the record's errors",
            raising,
            40,
        )

        async def invalid(sc: Scenario) -> None:
            server = await self.inprocess_proxy({"invalid": fp.Invalid()}, ["invalid"], "invalid")
            via = await self.clients(server.url)
            try:
                for marker, n in ((fp.ORPHAN, 2), (fp.BREAKPOINTS, 2), (fp.HUGE, 1)):
                    for i in range(n):
                        nonce = f"invalid-{marker.strip('[]')}-{i}"
                        b, text = small_body(nonce, marker=marker, stream=i % 2 == 1)
                        got = await ask(via[KEY_A], b, timeout=60)
                        expect_answer(sc, up, got, nonce, KEY_A, text, marker.strip("[]"))
            finally:
                await self.close(via)
            unblamed = sc.counts["correct"] - self.blamed(server.records(), "invalid")
            sc.demote(unblamed, "wrong", "the record does not blame the plugin whose output was invalid")

        await self.scenario(
            "plugins",
            "a stage emits an invalid request: an orphaned tool_result, 6 breakpoints, a 42 MB body",
            "the stage is discarded, the caller's request goes out and is answered; the record blames it",
            invalid,
            90,
        )

        async def mutating(sc: Scenario) -> None:
            client = self.wrapped({"mutate": fp.MutateThenRaise()}, ["mutate"], "mutate-wrap")
            for i in range(2):
                nonce = f"mutate-wrap-{i}"
                b, text = small_body(nonce, marker=fp.MUTATE)
                got = await in_thread(ask_sync, client, b, timeout=20)
                expect_answer(sc, up, got, nonce, KEY_A, text, "wrap()")
            server = await self.inprocess_proxy(
                {"mutate": fp.MutateThenRaise()}, ["mutate", "cache_align"], "mutate-proxy"
            )
            via = await self.clients(server.url)
            try:
                for i in range(2):
                    nonce = f"mutate-proxy-{i}"
                    b, text = small_body(nonce, marker=fp.MUTATE, stream=i % 2 == 1)
                    got = await ask(via[KEY_A], b, timeout=20)
                    expect_answer(sc, up, got, nonce, KEY_A, text, "proxy")
            finally:
                await self.close(via)

        await self.scenario(
            "plugins",
            "a plugin edits its input in place, then raises (wrap(); proxy with cache_align after it)",
            "the upstream receives the caller's text unchanged, the call is answered",
            mutating,
            60,
        )

        async def junk(sc: Scenario) -> None:
            server = await self.inprocess_proxy({"junk": fp.JunkLookup()}, ["junk"], "junk")
            client = self.wrapped({"junk": fp.JunkLookup()}, ["junk"], "junk-wrap")
            via = await self.clients(server.url)
            try:
                for i, (what, _) in enumerate(fp.JUNK_VALUES):
                    for stream in (False, True):
                        nonce = f"junk-{i}-{stream}"
                        b, text = small_body(nonce, marker=fp.junk_marker(i), stream=stream)
                        got = await ask(via[KEY_A], b, timeout=15)
                        expect_answer(sc, up, got, nonce, KEY_A, text, f"proxy, {what}")
                    nonce = f"junk-wrap-{i}"
                    b, text = small_body(nonce, marker=fp.junk_marker(i))
                    got = await in_thread(ask_sync, client, b, timeout=15)
                    expect_answer(sc, up, got, nonce, KEY_A, text, f"wrap(), {what}")
            finally:
                await self.close(via)

        await self.scenario(
            "plugins",
            "a lookup hook returns junk (a dict without content, a string, content null); proxy and wrap()",
            "the junk is ignored (not a Message) and the call is answered by the upstream",
            junk,
            60,
        )

        n_summaries = 8

        async def summaries(sc: Scenario) -> None:
            cfg = self.proxy_config(self.root / "runs-summaries", None)
            cfg["summarize"] = {"model_summaries": True}
            # a host name, as api.anthropic.com is: its lookup needs the event loop's executor
            upstream = up.api_url.replace("127.0.0.1", "localhost")
            proc = ProxyProcess(self.root, "summaries", upstream, cfg, self.root / "cache-summaries")
            self._procs.append(proc)
            await asyncio.to_thread(proc.start)
            via = await self.clients(proc.url)
            before = up.attempts.get("", 0)
            try:
                jobs = []
                for i in range(n_summaries):
                    nonce = f"summary-{i}"
                    b, text = agent_body(
                        nonce, session=f"summary{i}", first_tokens=7000, output=fault_harness.build_prose
                    )
                    jobs.append((nonce, text, ask(via[KEY_A], b, timeout=30)))
                for i in range(4):
                    b, text = small_body(f"summary-unrelated-{i}")
                    jobs.append((f"summary-unrelated-{i}", text, ask(via[KEY_A], b, timeout=30)))
                gots = await asyncio.gather(*(j[2] for j in jobs))
                for (nonce, text, _), got in zip(jobs, gots, strict=True):
                    expect_answer(sc, up, got, nonce, KEY_A, text, nonce.rsplit("-", 1)[0])
            finally:
                await self.close(via)
                await asyncio.to_thread(proc.stop)
            sc.facts.append(f"summary calls upstream: {up.attempts.get('', 0) - before}")

        await self.scenario(
            "plugins",
            f"summarize.model_summaries: {n_summaries} calls at once each need a new summary (ctx.call_model), "
            "4 unrelated calls; upstream named by host name",
            "every call answered within 30 s (a summary that cannot be made leaves the output as it was)",
            summaries,
            60,
        )

    # memoize -------------------------------------------------------------------------------------

    def singleflight_check(self, sc: Scenario, nonces: list[str], want: int) -> None:
        for nonce in nonces:
            extra = self.up.attempts[nonce] - want
            if extra > 0:
                sc.demote(
                    extra,
                    "wrong",
                    f"identical requests made {self.up.attempts[nonce]} upstream calls, not {want}",
                )

    async def g_memoize(self) -> None:
        up = self.up
        n_procs, n_bodies = (2, 6) if self.quick else (4, 16)

        async def cross_process(sc: Scenario) -> None:
            memo = self.root / "memo-shared"
            runs = self.root / "runs-memo"
            cfg = self.proxy_config(runs, memo)
            procs = [
                ProxyProcess(self.root, f"memo{i}", up.api_url, cfg, self.root / "cache-memo")
                for i in range(n_procs)
            ]
            self._procs.extend(procs)
            await asyncio.gather(*(asyncio.to_thread(p.start) for p in procs))
            clients = [await self.clients(p.url) for p in procs]
            sem = asyncio.Semaphore(16)
            bodies = [agent_body(f"memo-{j}", session=f"memo{j}", first_tokens=1500) for j in range(n_bodies)]

            async def one(j: int, key: str, target: int, stream: bool) -> None:
                b, text = bodies[j]
                async with sem:
                    got = await ask(clients[target][key], {**b, "stream": stream}, timeout=30)
                expect_answer(sc, up, got, f"memo-{j}", key, text)

            try:
                await asyncio.gather(
                    *(
                        one(j, k, (j + n) % n_procs, False)
                        for j in range(n_bodies)
                        for n, k in enumerate((KEY_A, KEY_B))
                    )
                )
                later = [
                    one(j, k, self._rng.randrange(n_procs), bool(r % 2))
                    for r in range(2)
                    for j in range(n_bodies)
                    for k in (KEY_A, KEY_B)
                ]
                self._rng.shuffle(later)
                await asyncio.gather(*later)
            finally:
                for c in clients:
                    await self.close(c)
                for p in procs:
                    await asyncio.to_thread(p.stop)
            self.singleflight_check(sc, [f"memo-{j}" for j in range(n_bodies)], 2)

        await self.scenario(
            "memoize",
            f"{n_procs} proxy processes share one memo dir; 2 keys send the same {n_bodies} bodies, 3 rounds",
            "each key gets its own answer (never the other key's), later rounds from the store: one upstream "
            "call per body and key",
            cross_process,
            120,
        )

        async def corrupt_store(sc: Scenario) -> None:
            memo = self.root / "memo-corrupt"
            cfg = self.proxy_config(self.root / "runs-corrupt", memo)
            proc = ProxyProcess(self.root, "corrupt", up.api_url, cfg, self.root / "cache-corrupt")
            self._procs.append(proc)
            bodies = [small_body(f"corrupt-{i}", stream=i % 2 == 1) for i in range(8)]

            async def send(items: list[tuple[int, tuple[dict[str, Any], str]]], label: str) -> None:
                via = await self.clients(proc.url)
                try:
                    for i, (b, text) in items:
                        got = await ask(via[KEY_A], b, timeout=20)
                        expect_answer(sc, up, got, f"corrupt-{i}", KEY_A, text, label)
                finally:
                    await self.close(via)

            try:
                await asyncio.to_thread(proc.start)
                await send(list(enumerate(bodies[:4])), "stored")
                await asyncio.to_thread(proc.stop)
                for path in sorted(memo.rglob("*")):
                    if path.is_file():  # cut every file of the store in half, as a crash or full disk would
                        data = path.read_bytes()
                        path.write_bytes(data[: len(data) // 2])
                await asyncio.to_thread(proc.start)
                calls = sum(up.attempts[f"corrupt-{i}"] for i in range(8))
                await send(list(enumerate(bodies)), "after the store was cut")
                calls = sum(up.attempts[f"corrupt-{i}"] for i in range(8)) - calls
                sc.facts.append(f"upstream calls after the cut: {calls} for 8 requests (4 stored before)")
            finally:
                await asyncio.to_thread(proc.stop)

        await self.scenario(
            "memoize",
            "the memo store's files cut in half between two runs of a proxy",
            "every call answered correctly (a damaged store is a miss, never a wrong answer or an error)",
            corrupt_store,
            60,
        )

        async def concurrent_proxy(sc: Scenario) -> None:
            via = await self.clients(self.main_url)
            groups = [("sf-12", 12)] + [(f"sf-4-{g}", 4) for g in range(2 if self.quick else 4)]
            jobs = []
            for nonce, n in groups:
                b, text = small_body(nonce)
                for i in range(n):
                    jobs.append(
                        (
                            nonce,
                            text,
                            ask(
                                via[KEY_A],
                                {**b, "stream": i % 2 == 1},
                                headers={FAULT_HEADER: "slow:1"},
                                timeout=20,
                            ),
                        )
                    )
            try:
                gots = await asyncio.gather(*(j[2] for j in jobs))
            finally:
                await self.close(via)
            for (nonce, text, _), got in zip(jobs, gots, strict=True):
                expect_answer(sc, up, got, nonce, KEY_A, text)
            self.singleflight_check(sc, [g[0] for g in groups], 1)

        await self.scenario(
            "memoize",
            "identical concurrent requests through the proxy (12 at once, groups of 4), slow upstream",
            "all answered with the same answer from one upstream call per group",
            concurrent_proxy,
            60,
        )

        async def concurrent_async_wrap(sc: Scenario) -> None:
            cfg = {
                "plugins": ["memoize"],
                "runs_dir": str(self.root / "runs-sf"),
                "memoize": {"dir": str(self.root / "memo-sf"), "wait": MEMO_WAIT},
            }
            client = tokensaver.wrap(async_client(up.api_url, KEY_A), config=cfg)
            b, text = small_body("sf-async")
            try:
                gots = await asyncio.gather(
                    *(ask(client, b, headers={FAULT_HEADER: "slow:1"}, timeout=20) for _ in range(8))
                )
            finally:
                await client.close()
            for got in gots:
                expect_answer(sc, up, got, "sf-async", KEY_A, text, "async wrap()")
            b, text = small_body("sf-threads")
            sync = tokensaver.wrap(sync_client(up.api_url, KEY_A), config=cfg)
            gots = await asyncio.gather(
                *(in_thread(ask_sync, sync, b, {FAULT_HEADER: "slow:1"}, timeout=20) for _ in range(8))
            )
            for got in gots:
                expect_answer(sc, up, got, "sf-threads", KEY_A, text, "sync wrap()")
            self.singleflight_check(sc, ["sf-async", "sf-threads"], 1)

        await self.scenario(
            "memoize",
            "8 identical concurrent requests with async wrap(), 8 with sync wrap() in threads",
            "all answered with the same answer from one upstream call each",
            concurrent_async_wrap,
            60,
        )

    # bad input -----------------------------------------------------------------------------------

    async def g_bad_input(self) -> None:
        main, up = self.main_url, self.up

        def judge(sc: Scenario, resp: Any, want: str) -> None:
            if resp is None:
                sc.add("lost", "no answer (connection dropped or timed out)")
            elif (api_error_of(resp) or "").startswith(want):
                sc.add("failed_api")
            else:
                sc.add("wrong", f"{describe_raw(resp)} (the API answers {want} as JSON)")

        async def deep(sc: Scenario) -> None:
            depth = 100_000
            payload = (
                b'{"model":"claude-sonnet-4-6","max_tokens":5,"messages":'
                + b"[" * depth
                + b"]" * depth
                + b"}"
            )
            for _ in range(2):
                judge(
                    sc, await raw_request(main, "POST", "/v1/messages", payload), "400 invalid_request_error"
                )

        await self.scenario("bad input", "100k-deep JSON", "400 invalid_request_error as JSON", deep, 60)

        async def oversize(sc: Scenario) -> None:
            payload = (
                b'{"model":"claude-sonnet-4-6","max_tokens":5,"messages":[{"role":"user","content":"'
                + b"x" * (65 * 1024 * 1024)
                + b'"}]}'
            )
            judge(
                sc,
                await raw_request(main, "POST", "/v1/messages", payload, timeout=60),
                "413 request_too_large",
            )

        await self.scenario("bad input", "a 65 MB body", "413 request_too_large as JSON", oversize, 90)

        async def malformed(sc: Scenario) -> None:
            for payload in (
                b'{"model": "claude-sonnet-4-6", "messages": [',
                b"[]",
                b'"just a string"',
                b'{"model": "claude-sonnet-4-6", "max_tokens": 5, "messages": "not a list"}',
            ):
                judge(
                    sc, await raw_request(main, "POST", "/v1/messages", payload), "400 invalid_request_error"
                )

        await self.scenario(
            "bad input",
            "malformed JSON (cut off, not an object, messages not a list)",
            "400 invalid_request_error as JSON",
            malformed,
            60,
        )

        async def dots(sc: Scenario) -> None:
            targets = [
                "/../../secret-0",
                "/v1/../../secret-1",
                "/v1/messages/../../../../secret-2",
                "/%2e%2e/%2e%2e/secret-3",
                "/v1/%2E%2E/%2E%2E/%2E%2E/secret-4",
                "/..%2f..%2fsecret-5",
            ]
            for i, target in enumerate(targets):
                for method in ("GET", "POST"):
                    resp = await raw_request(main, method, target, b"{}" if method == "POST" else b"")
                    escaped = [
                        p for p in list(up.paths)
                        if f"secret-{i}" in unquote(p) and not posixpath.normpath(unquote(p.split("?")[0])).startswith("/base/")
                    ]  # fmt: skip
                    if escaped:
                        sc.add(
                            "wrong",
                            f"{method} {target} reached {escaped[-1]} on the upstream host, outside /base",
                        )
                    elif resp is None:
                        sc.add("lost", f"{method} {target}: no answer")
                    elif 400 <= resp.status < 500:
                        sc.add("failed_api")
                    else:
                        sc.add("wrong", f"{method} {target}: {describe_raw(resp)}")
            via = await self.clients(main)
            try:
                b, text = small_body("after-bad-input")
                expect_answer(sc, up, await ask(via[KEY_A], b, timeout=15), "after-bad-input", KEY_A, text)
            finally:
                await self.close(via)

        async def elsewhere(sc: Scenario) -> None:
            """Requests that try to make the proxy talk to another server: a decoy on loopback counts them."""
            hits: list[str] = []

            async def decoy_handler(request: web.Request) -> web.Response:
                hits.append(request.raw_path)
                return web.Response(text="decoy")

            decoy_app = web.Application()
            decoy_app.router.add_route("*", "/{tail:.*}", decoy_handler)
            decoy = BackgroundApp(decoy_app)
            await asyncio.to_thread(decoy.start)
            d = decoy.url
            dhost = d.removeprefix("http://")
            body = json.dumps(small_body("elsewhere")[0]).encode()
            phost = main.removeprefix("http://")
            smuggled = (
                f"POST /v1/messages HTTP/1.1\r\nHost: {phost}\r\nContent-Type: application/json\r\n"
                f"x-api-key: {KEY_A}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                f"0\r\n\r\nGET {d}/smuggled HTTP/1.1\r\nHost: {dhost}\r\n\r\n"
            ).encode()
            cases: list[tuple[str, Awaitable[Any]]] = [
                ("absolute-form GET", raw_request(main, "GET", f"{d}/v1/models")),
                ("absolute-form POST", raw_request(main, "POST", f"{d}/v1/messages", body)),
                ("Host of the decoy", raw_request(main, "GET", "/v1/models", host_header=dhost)),
                (
                    "Host of the decoy, Messages",
                    raw_request(main, "POST", "/v1/messages", body, host_header=dhost),
                ),
                ("Content-Length with Transfer-Encoding", raw_exchange(main, smuggled)),
            ]
            try:
                for what, request in cases:
                    before = len(hits)
                    resp = await request
                    if len(hits) > before:
                        sc.add("wrong", f"{what}: reached the decoy server ({hits[-1]})")
                    elif resp is not None and resp.status >= 500:
                        sc.add("wrong", f"{what}: {describe_raw(resp)}")
                    else:
                        sc.add("failed_api")  # refused, or answered by the upstream: never elsewhere
                await asyncio.sleep(0.5)  # a smuggled request would arrive after its carrier
                if len(hits) > 0 and sc.counts["wrong"] == 0:
                    sc.demote(1, "wrong", f"a smuggled request reached the decoy server ({hits[-1]})")
            finally:
                await asyncio.to_thread(decoy.stop)

        await self.scenario(
            "bad input",
            "absolute-form targets, a Host header naming another server, Content-Length with Transfer-Encoding",
            "nothing reaches any server but the upstream (a decoy on loopback counts); no 5xx",
            elsewhere,
            60,
        )

        await self.scenario(
            "bad input",
            "dot-segment paths (plain and %2e-encoded) with --upstream .../base, then a normal call",
            "nothing reaches the upstream host outside /base; a 4xx answer; the proxy still answers",
            dots,
            60,
        )

    # privacy -------------------------------------------------------------------------------------

    SECRET_MARKERS = ("zebracanary", "2-prod-secret", "DB_PASSWORD", "PORT=8080")

    @staticmethod
    def secret_system(version: int) -> str:
        """A system prompt whose timestamp line changes next to an environment file's secrets.

        cache_align moves the changed line out of the system prompt, so the block that changed is
        the one holding the key (what an agent that reads a .env into its prompt sends).
        """
        return (
            f"Now 2026-12-01T10:0{version}Z\n"
            "API_KEY=sk-ant-api03-zebracanary-0000000000000000000000\n"
            "DB_PASSWORD=2-prod-secret\nPORT=8080\n"
            "You are a deployment assistant for the service whose environment file is above.\n"
        )

    def leak_problems(self, paths: list[Path], keys: tuple[str, ...] = (KEY_A, KEY_B)) -> list[str]:
        found = []
        for path in paths:
            if not path.is_file():
                continue
            text = path.read_text(errors="replace")
            for marker in (*self.SECRET_MARKERS, *keys):
                if marker in text:
                    shown = marker if marker not in keys else "the API key"
                    found.append(f"{shown!r} in {path.name}")
        return found

    async def g_privacy(self) -> None:
        up = self.up

        async def via_proxy(sc: Scenario) -> None:
            run = "faults-privacy"
            via = await self.clients(self.main_url)
            try:
                for version in (1, 2):
                    nonce = f"privacy-proxy-{version}"
                    b, text = agent_body(
                        nonce, session="privacy", system=self.secret_system(version), first_tokens=800
                    )
                    got = await ask(via[KEY_A], b, headers={RUN_HEADER: run}, timeout=20)
                    expect_answer(sc, up, got, nonce, KEY_A, text, f"call {version}")
            finally:
                await self.close(via)
            await self.check_recorded(sc, run, sc.sent)
            ledger = [p for p in self.runs_dir.glob("*.jsonl")]
            logs = [self._main_proc.log_path] if self._main_proc else []
            for problem in self.leak_problems(ledger + logs):
                sc.demote(1, "wrong", f"prompt text or key written: {problem}")
            for problem in modes_problems(self.runs_dir, self.cache_dir, self.memo_dir):
                sc.demote(1, "wrong", f"not owner-only: {problem}")

        await self.scenario(
            "privacy",
            "an API key in a system block that changed between two calls (proxy)",
            "both calls answered; no prompt text, no API key in ledger or log; every file 0600, folder 0700",
            via_proxy,
            60,
        )

        async def via_wrap(sc: Scenario) -> None:
            runs = self.root / "runs-privacy-wrap"
            client = tokensaver.wrap(
                sync_client(up.api_url, KEY_A), config={"runs_dir": str(runs), "record": True}
            )
            for version in (1, 2):
                nonce = f"privacy-wrap-{version}"
                b, text = agent_body(
                    nonce, session="privacy-wrap", system=self.secret_system(version), first_tokens=800
                )
                got = await in_thread(ask_sync, client, b, timeout=20)
                expect_answer(sc, up, got, nonce, KEY_A, text, f"call {version}")
            for problem in self.leak_problems(list(runs.glob("*.jsonl"))):
                sc.demote(1, "wrong", f"prompt text or key written: {problem}")
            for problem in modes_problems(runs):
                sc.demote(1, "wrong", f"not owner-only: {problem}")

        await self.scenario(
            "privacy",
            "the same through wrap() (sync)",
            "both calls answered; no prompt text in the ledger; files 0600, folders 0700",
            via_wrap,
            40,
        )

    # kill -9 -------------------------------------------------------------------------------------

    async def g_kill(self) -> None:
        up = self.up

        async def kill(sc: Scenario) -> None:
            runs = self.root / "runs-kill"
            run = "faults-kill"
            proc = ProxyProcess(
                self.root, "kill", up.api_url, self.proxy_config(runs, None), self.root / "cache-kill"
            )
            self._procs.append(proc)
            await asyncio.to_thread(proc.start)
            via = await self.clients(proc.url)
            first, doomed = (4, 6) if self.quick else (8, 16)
            try:
                jobs = []
                for i in range(first):
                    b, text = small_body(f"kill-before-{i}", stream=i % 2 == 1)
                    jobs.append(
                        (f"kill-before-{i}", text, ask(via[KEY_A], b, headers={RUN_HEADER: run}, timeout=20))
                    )
                gots = await asyncio.gather(*(j[2] for j in jobs))
                for (nonce, text, _), got in zip(jobs, gots, strict=True):
                    expect_answer(sc, up, got, nonce, KEY_A, text)
                answered = sum(1 for g in gots if g.message is not None)
                inflight = []
                for i in range(doomed):
                    b, _ = small_body(f"kill-during-{i}", stream=i % 2 == 1)
                    inflight.append(
                        asyncio.ensure_future(
                            ask(via[KEY_A], b, headers={RUN_HEADER: run, FAULT_HEADER: "slow:5"}, timeout=20)
                        )
                    )
                await await_until(
                    lambda: sum(up.attempts[f"kill-during-{i}"] for i in range(doomed)) >= doomed, 8.0
                )
                await asyncio.to_thread(proc.kill9)
                for got in await asyncio.gather(*inflight):
                    # the process died under them: the SDK sees a dropped connection and retries
                    if got.error is not None and retryable(got.error) and api_shaped(got.error):
                        sc.add("failed_api")
                    elif got.timed_out:
                        sc.add("lost", got.describe())
                    else:
                        sc.add("wrong", f"{got.describe()} from a killed proxy")
            finally:
                await self.close(via)
            try:
                before = load_run(run, runs).records()
            except Exception as exc:  # noqa: BLE001
                sc.demote(1, "wrong", f"ledger unreadable after kill -9: {type(exc).__name__}: {exc}")
                return
            if len(before) < answered:
                sc.demote(
                    answered - len(before),
                    "wrong",
                    "an answered call is missing from the ledger after kill -9",
                )
            # a kill -9 in the middle of a write leaves a torn last line; the suite stands one in
            with open(runs / f"{run}.jsonl", "ab") as f:
                f.write(b'{"type":"call","id":"c-torn-by-kill","t":17')
            await asyncio.to_thread(proc.start)
            via = await self.clients(proc.url)
            after = 4 if self.quick else 8
            try:
                for i in range(after):
                    nonce = f"kill-after-{i}"
                    b, text = small_body(nonce, stream=i % 2 == 1)
                    got = await ask(via[KEY_A], b, headers={RUN_HEADER: run}, timeout=20)
                    expect_answer(sc, up, got, nonce, KEY_A, text)
            finally:
                await self.close(via)
                await asyncio.to_thread(proc.stop)
            try:
                records = load_run(run, runs).records()
            except Exception as exc:  # noqa: BLE001
                sc.demote(after, "wrong", f"ledger unreadable after the restart: {type(exc).__name__}")
                return
            lost = len(before) + after - len(records)
            if lost > 0:
                sc.demote(
                    lost,
                    "wrong",
                    "a call answered after the restart is missing from the ledger (torn last line)",
                )

        await self.scenario(
            "kill -9",
            "kill -9 of a proxy with calls in flight, a torn last ledger line, restart on the same run",
            "calls before: answered; in flight: a dropped connection the SDK retries; the ledger readable with "
            "every answered call; after the restart every call answered and appended",
            kill,
            90,
        )


# -- the report ------------------------------------------------------------------------------------


def totals(results: list[Scenario], group: str | None = None) -> dict[str, int]:
    rows = [r for r in results if group is None or r.group == group]
    out = {"sent": sum(r.sent for r in rows)}
    for k in KINDS:
        out[k] = sum(r.counts[k] for r in rows)
    return out


def group_table(results: list[Scenario]) -> str:
    """The table the README quotes: one row per scenario group, and the total."""
    head = "| scenario group | sent | " + " | ".join(LABELS[k] for k in KINDS) + " |"
    lines = [head, "|---|" + "---:|" * (len(KINDS) + 1)]
    for group in GROUPS:
        if not any(r.group == group for r in results):
            continue
        t = totals(results, group)
        lines.append(f"| {group} | {t['sent']:,} | " + " | ".join(_cell(k, t[k]) for k in KINDS) + " |")
    t = totals(results)
    lines.append(
        f"| **all** | **{t['sent']:,}** | " + " | ".join(f"**{_cell(k, t[k])}**" for k in KINDS) + " |"
    )
    return "\n".join(lines)


def _cell(kind: str, n: int) -> str:
    return f"{n:,}" + (" ✗" if kind in ("lost", "wrong") and n else "")


def render(results: list[Scenario], meta: dict[str, str]) -> str:
    """The Markdown report: the group table, then every scenario with what correct means and what it got."""
    t = totals(results)
    verdict = (
        "**lost 0, wrong 0**"
        if t["lost"] == 0 and t["wrong"] == 0
        else f"**FAILED: {t['lost']} lost, {t['wrong']} wrong**"
    )
    out = [
        "# Fault suite: latest run",
        "",
        f"`python e2e/faults.py --out docs/faults-latest.md` at commit {meta['commit']}, {meta['date']}, "
        f"{meta['machine']}, {meta['seconds']} s. {verdict}.",
        "",
        "Loopback only: a fault-injecting Messages API (the offline emulator's answers, or the fault a "
        "request asks for) behind real `tokensaver proxy` processes, in-process proxies and `wrap()` "
        "clients with misbehaving plugins, every request sent with the anthropic SDK. A request is "
        "*answered correctly* when it gets the answer the API gave that key for that request (content "
        "and billed usage) and the scenario's checks held; *failed as the API would* when the SDK raises "
        "what it raises talking to the API directly; *lost* when no answer came in time or it failed where "
        "the API answers; *wrong* otherwise (another answer, another error, a paid call too many, prompt "
        "text on disk, a lost ledger record). CI fails unless lost and wrong are 0.",
        "",
        group_table(results),
        "",
        "## Scenarios",
        "",
        "| group | scenario | correct means | sent | correct | failed as API | lost | wrong | what the failures got; measured |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        notes = "; ".join(f"{n} × {note}" for note, n in r.notes.most_common(8))
        if r.facts:
            notes = (notes + "; " if notes else "") + "measured: " + ", ".join(r.facts)
        out.append(
            f"| {r.group} | {r.name} | {r.means} | {r.sent} | {r.counts['correct']} | "
            f"{r.counts['failed_api']} | {r.counts['lost']} | {r.counts['wrong']} | {_md(notes)} |"
        )
    return "\n".join(out) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def meta(seconds: float) -> dict[str, str]:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    try:
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT, capture_output=True, text=True, timeout=10,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        status = ""
    # only changes to what runs count (the report and the README are rewritten by the suite itself)
    dirty = [
        line[3:].strip()
        for line in status.splitlines()
        if line[3:].strip().startswith(("tokensaver/", "plugins/", "e2e/", "pyproject.toml"))
    ]
    if dirty and commit:
        shown = ", ".join(dirty[:3]) + (f" and {len(dirty) - 3} more" if len(dirty) > 3 else "")
        commit += f" (plus uncommitted changes to {shown})"
    return {
        "commit": commit or "unknown",
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": f"{os.cpu_count()} cores, {platform.system()}, Python {platform.python_version()}",
        "seconds": f"{seconds:.0f}",
    }


def update_readme(results: list[Scenario], readme: Path, meta_: dict[str, str]) -> bool:
    """Replace the quoted table between the README's fault-suite markers (False: no markers)."""
    text = readme.read_text()
    pattern = re.compile(re.escape(README_BEGIN) + r".*?" + re.escape(README_END), re.S)
    if not pattern.search(text):
        return False
    block = (
        f"{README_BEGIN}\nLatest run (commit {meta_['commit']}, {meta_['date']}, {meta_['seconds']} s on "
        f"{meta_['machine']}; every scenario in [docs/faults-latest.md](docs/faults-latest.md)):\n\n"
        f"{group_table(results)}\n{README_END}"
    )
    readme.write_text(pattern.sub(lambda _: block, text, count=1))
    return True


def exit_code(results: list[Scenario]) -> int:
    """0 when nothing was lost or wrong, 2 on a harness error, 1 otherwise."""
    if any(note.startswith("wrong: harness error") for r in results for note in r.notes):
        return 2
    return 0 if all(r.ok for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="e2e/faults.py", description=__doc__.split("\n")[0])
    parser.add_argument("--out", metavar="FILE", help="write the Markdown report here")
    parser.add_argument("--only", help=f"comma-separated groups (default all: {', '.join(GROUPS)})")
    parser.add_argument("--quick", action="store_true", help="fewer requests per scenario")
    parser.add_argument("--readme", action="store_true", help="also refresh the table the README quotes")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (runs, logs)")
    args = parser.parse_args(argv)
    groups = [g.strip() for g in args.only.split(",")] if args.only else list(GROUPS)
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        parser.error(f"unknown group(s) {unknown}; known: {', '.join(GROUPS)}")
    tmp = Path(tempfile.mkdtemp(prefix="tokensaver-faults-"))
    # in-process proxies and wrap() log every skipped plugin: the report says what matters
    logging.getLogger("tokensaver").setLevel(logging.CRITICAL)
    # wrap() and in-process proxies write their plugin stores here, never to ~/.cache
    os.environ["TOKENSAVER_CACHE_DIR"] = str(tmp / "cache-inprocess")
    t0 = time.monotonic()
    suite = Suite(tmp, quick=args.quick)
    try:
        suite.start()
        asyncio.run(suite.run(groups))
    finally:
        suite.stop()
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    m = meta(time.monotonic() - t0)
    report = render(suite.results, m)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report)
        print(f"wrote {args.out}", file=sys.stderr)
    if args.readme and not update_readme(suite.results, ROOT / "README.md", m):
        print(f"README.md has no {README_BEGIN} ... {README_END} block to refresh", file=sys.stderr)
    print(group_table(suite.results))
    code = exit_code(suite.results)
    if code:
        t = totals(suite.results)
        print(
            f"fault suite FAILED: {t['lost']} lost, {t['wrong']} wrong (see the scenarios above)",
            file=sys.stderr,
        )
    return code


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # a thread a hung plugin (or a stuck wait) still holds must not keep the process alive
    os._exit(status)
