"""How much time the proxy adds per Messages call (``tokensaver bench``'s proxy overhead).

Real conversations replayed in order (:func:`measure_proxy_overhead`): each call's body, as the
agent sent it, goes once straight to an upstream that answers at once with the call's recorded reply
(:func:`replay_upstream`) and once through a real proxy in front of that upstream; the difference is
what the proxy adds. The proxy records into a run ledger, as ``tokensaver proxy`` does.
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from typing import Any

import httpx2
import orjson
from aiohttp import web

from .._stats import percentile
from ..exchange import MESSAGES_PATH
from ..pipeline import Pipeline
from ..sse import message_events, message_to_sse, sse_event
from ..tokens import default_counter
from ..traces import Conversation
from .server import BackgroundApp, ProxyServer
from .sessions import SESSION_HEADER, session_run_name
from .wire import MAX_BODY


def canned_upstream(message: dict[str, Any], *, chunks: int = 4) -> web.Application:
    """A Messages API stand-in that answers every ``POST /v1/messages`` with ``message`` at once.

    For timing: no validation or billing, and replies without the emulator's per-write stalls.
    """

    async def messages(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if not body.get("stream"):
            return web.json_response(message, headers={"request-id": "req_canned"})
        data = message_to_sse(message)
        response = web.StreamResponse(
            headers={"content-type": "text/event-stream", "request-id": "req_canned"}
        )
        await response.prepare(request)
        step = max(1, len(data) // chunks + 1)
        for i in range(0, len(data), step):
            await response.write(data[i : i + step])
        await response.write_eof()
        return response

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post(MESSAGES_PATH, messages)
    return app


CANNED_MESSAGE: dict[str, Any] = {
    "id": "msg_canned",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-6",
    "content": [{"type": "text", "text": "All 212 tests passed."}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 2000, "output_tokens": 9},
}


# -- real conversations replayed in order ------------------------------------------------------


class Reply:
    """The answer the replay upstream gives next: the call's recorded reply, as JSON and as SSE events."""

    def __init__(self) -> None:
        self.json = orjson.dumps(CANNED_MESSAGE)
        self.events: list[bytes] = [sse_event(e["type"], e) for e in message_events(CANNED_MESSAGE)]

    def set(self, message: dict[str, Any]) -> None:
        self.json = orjson.dumps(message)
        self.events = [sse_event(e["type"], e) for e in message_events(message)]


def replay_upstream(reply: Reply) -> web.Application:
    """A Messages API stand-in answering with ``reply`` at once: JSON, or SSE one event per write.

    The body is read, not parsed (only its stream flag is looked for): the upstream's own time is
    the same whether the call comes straight or through the proxy, and is subtracted.
    """
    headers = {"request-id": "req_replay", "anthropic-organization-id": "org-bench"}

    async def messages(request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        if b'"stream":true' not in raw:
            return web.Response(body=reply.json, content_type="application/json", headers=headers)
        response = web.StreamResponse(
            headers={**headers, "content-type": "text/event-stream", "cache-control": "no-cache"}
        )
        await response.prepare(request)
        for event in reply.events:
            await response.write(event)
        await response.write_eof()
        return response

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post(MESSAGES_PATH, messages)
    return app


def agent_headers(session: str) -> dict[str, str]:
    """The headers Claude Code sends with a Messages call (its session's id among them)."""
    return {
        "accept": "application/json",
        "accept-encoding": "gzip, deflate, br, zstd",
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,"
        "fine-grained-tool-streaming-2025-05-14",
        "anthropic-dangerous-direct-browser-access": "true",
        "anthropic-version": "2023-06-01",
        "content-type": "application/json",
        "user-agent": "claude-cli/2.0.14 (external, cli)",
        "x-api-key": "sk-ant-bench-not-a-key",
        "x-app": "cli",
        SESSION_HEADER: session,
        "x-stainless-arch": "x64",
        "x-stainless-lang": "js",
        "x-stainless-os": "Linux",
        "x-stainless-package-version": "0.60.0",
        "x-stainless-retry-count": "0",
        "x-stainless-runtime": "node",
        "x-stainless-runtime-version": "v22.19.0",
        "x-stainless-timeout": "600",
    }


Timing = tuple[float, float, float, float, float, float]


class _PipelineCPU:
    """CPU time of the whole process spent in ``Pipeline.begin`` / ``finish`` (their hooks' worker
    threads included: the proxy's other threads wait meanwhile), while installed."""

    def __init__(self) -> None:
        self.ms = 0.0
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> _PipelineCPU:
        for name in ("begin", "finish"):
            original = self._saved[name] = getattr(Pipeline, name)
            setattr(Pipeline, name, self._timed(original))
        return self

    def _timed(self, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.ms += (time.process_time() - t0) * 1000

        return timed

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            setattr(Pipeline, name, original)


def replay_through_proxy(
    sample: list[Conversation], *, stream: bool, plugins: list[str] | None = None
) -> list[list[Timing]]:
    """Per conversation, per call: wall ms direct, wall ms through the proxy, the pipeline's wall ms
    (its record's ``overhead_ms``), then the same three in CPU ms of this process.

    One proxy (recording into a run ledger in a temporary folder) for all the conversations, their
    calls in order; each call's bytes are sent first straight to the replay upstream, then through
    the proxy, by one keep-alive HTTP client; wall time to the answer's last byte. Client, upstream
    and proxy share this process, so a call's CPU time is theirs together: through the proxy minus
    direct is the proxy's, which other load on the machine does not inflate. The pipeline's CPU time
    is the process's during ``begin`` and ``finish`` (``finish`` writes the ledger line).
    """
    reply = Reply()
    clock = [1_700_000_000.0]
    out: list[list[Timing]] = []
    with tempfile.TemporaryDirectory(prefix="tokensaver-bench-") as tmp:
        cfg: dict[str, Any] = {"record": True, "runs_dir": tmp}
        if plugins is not None:
            cfg["plugins"] = list(plugins)
        with (
            BackgroundApp(replay_upstream(reply)) as upstream,
            ProxyServer(cfg, upstream=upstream.url, clock=lambda: clock[0]) as proxy,
            httpx2.Client(timeout=120) as http,
            _PipelineCPU() as pipeline_cpu,
        ):

            def timed(base: str, data: bytes, headers: dict[str, str]) -> tuple[float, float]:
                c0, t0 = time.process_time(), time.perf_counter()
                r = http.post(f"{base}{MESSAGES_PATH}", content=data, headers=headers)
                r.read()
                ms = (time.perf_counter() - t0) * 1000
                cpu = (time.process_time() - c0) * 1000
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {r.content[:300]!r}")
                return ms, cpu

            for n, conv in enumerate(sample):
                session = f"replay-{n}-{conv.id}"[:60]
                headers = agent_headers(session)
                run = session_run_name(session)
                rows: list[Timing] = []
                for call in conv.calls:
                    clock[0] = max(clock[0] + 1.0, call.t if call.t is not None else clock[0] + 30.0)
                    data = orjson.dumps({**call.body, "stream": stream})  # as the agent sent it
                    reply.set(call.message())
                    direct, direct_cpu = timed(upstream.url, data, headers)
                    before = pipeline_cpu.ms
                    through, through_cpu = timed(proxy.url, data, headers)
                    records = proxy.proxy.pipeline_for(run).records
                    record = records[-1] if records else {}
                    pipe_ms = float(record.get("overhead_ms") or 0.0)
                    rows.append((direct, through, pipe_ms, direct_cpu, through_cpu, pipeline_cpu.ms - before))
                out.append(rows)
    return out


def _ms(values: list[float], p: float) -> float:
    return round(percentile(values, p) or 0.0, 3)  # nearest rank, as every report


def measure_proxy_overhead(
    sample: list[Conversation],
    size_tokens: int,
    *,
    stream: bool = False,
    reps: int = 3,
    plugins: list[str] | None = None,
    band: float = 0.25,
    spawn: bool = True,
) -> dict[str, Any]:
    """Time the proxy adds per Messages call on real conversations replayed in order: p50/p95 in ms.

    ``sample``'s conversations are replayed ``reps`` times (each time in a new process with a new
    proxy, as a proxy starts; ``spawn=False``: in this process), their calls in order
    (:func:`replay_through_proxy`). Of the calls whose original body counts ``size_tokens`` to
    ``band`` over it, each one's direct and proxied times are their least over the ``reps``;
    ``added`` is the difference, ``pipeline`` the pipeline's own time in the proxy (the
    ``overhead_ms`` its record holds, from the repetition with the least proxied time) and
    ``proxy_own`` the rest: HTTP, body read and parse, headers, forwarding, the answer's relay, the
    ledger. ``plugins=None`` uses the configured plugins.
    """
    counter = default_counter()
    lo, hi = size_tokens, size_tokens * (1 + band)
    sizes = [[counter.request(c.body) for c in conv.calls] for conv in sample]
    inside = [[lo <= n <= hi for n in row] for row in sizes]
    tokens = [float(n) for row in sizes for n in row if lo <= n <= hi]
    runs = []
    for _ in range(max(1, reps)):
        if spawn:
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                runs.append(
                    pool.apply(replay_through_proxy, (sample,), {"stream": stream, "plugins": plugins})
                )
        else:
            runs.append(replay_through_proxy(sample, stream=stream, plugins=plugins))
    series: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        series.setdefault(name, []).append(value)

    for c, flags in enumerate(inside):
        for i, flag in enumerate(flags):
            if not flag:
                continue
            for unit, (d_at, p_at, pipe_at) in (("", (0, 1, 2)), ("cpu_", (3, 4, 5))):
                d = min(run[c][i][d_at] for run in runs)
                best = min(runs, key=lambda run: run[c][i][p_at])[c][i]
                p, ms = best[p_at], best[pipe_at]
                add(f"{unit}direct", d)
                add(f"{unit}proxy", p)
                add(f"{unit}added", p - d)
                add(f"{unit}pipeline", ms)
                add(f"{unit}proxy_own", p - d - ms)
    out: dict[str, Any] = {
        "size_tokens": size_tokens,
        "tokens": int(percentile(tokens, 50) or 0),
        "stream": stream,
        "n_calls": len(series.get("added", [])),
        "conversations": len(sample),
        "replayed_calls": sum(len(conv.calls) for conv in sample),
        "reps": max(1, reps),
    }
    for name, values in series.items():
        out[f"{name}_p50_ms"] = _ms(values, 50)
        out[f"{name}_p95_ms"] = _ms(values, 95)
    out["note"] = (
        "wall ms to the answer's last byte, real conversations replayed in order through one proxy "
        "(run ledger on), least of reps fresh processes; added = proxied - direct to the same instant "
        "upstream; proxy_own = added - the pipeline's own time; cpu_*: the same in CPU ms of the "
        "process (client, upstream and proxy in one), which other load does not inflate"
    )
    return out
