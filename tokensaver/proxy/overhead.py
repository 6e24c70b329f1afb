"""How much time the proxy adds per Messages call (``tokensaver bench``'s proxy overhead)."""

from __future__ import annotations

import tempfile
import time
from typing import Any

import httpx2
from aiohttp import web

from .._stats import percentile
from ..exchange import MESSAGES_PATH
from ..sse import message_to_sse
from .server import BackgroundApp, ProxyServer
from .wire import MAX_BODY


def _bench_body(i: int, size_tokens: int, stream: bool) -> dict[str, Any]:
    words = max(1, size_tokens * 3 // 4)
    log_text = "\n".join(f"line {n}: step {n % 7} ok" for n in range(max(1, words // 6)))
    return {
        "model": "claude-sonnet-4-6",
        "max_tokens": 256,
        "stream": stream,
        "system": "You are a coding agent.",
        "messages": [
            {"role": "user", "content": f"Run the tests (call {i})."},
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": f"toolu_{i}", "name": "bash", "input": {"cmd": "make"}}
                ],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": f"toolu_{i}", "content": log_text}],
            },
        ],
        "tools": [{"name": "bash", "description": "run", "input_schema": {"type": "object"}}],
    }


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


def measure_proxy_overhead(
    n_calls: int = 50,
    size_tokens: int = 2000,
    *,
    stream: bool = False,
    plugins: list[str] | None = None,
    warmup: int = 3,
) -> dict[str, Any]:
    """Time the proxy adds per Messages call: p50/p95 in ms.

    Each call is sent twice with the same body, directly to a canned upstream (``canned_upstream``:
    the emulator's unbuffered writes stall on delayed ACKs and would swamp what is measured) and
    through the proxy
    (same HTTP client); ``added_*`` is the per-call difference, ``pipeline_*`` the part the
    pipeline itself took (the ``overhead_ms`` wrap() records too), ``transport_*`` the rest.
    ``plugins=None`` uses the configured plugins; runs are not persisted.
    """
    direct_ms: list[float] = []
    proxy_ms: list[float] = []
    with tempfile.TemporaryDirectory(prefix="tokensaver-bench-") as tmp:
        cfg: dict[str, Any] = {"record": False, "runs_dir": tmp}
        if plugins is not None:
            cfg["plugins"] = list(plugins)
        with (
            BackgroundApp(canned_upstream(CANNED_MESSAGE)) as emu,
            ProxyServer(cfg, upstream=emu.url) as proxy,
            httpx2.Client(timeout=60) as http,
        ):
            headers = {"x-api-key": "bench", "anthropic-version": "2023-06-01"}

            def timed(base: str, body: dict[str, Any]) -> float:
                t0 = time.perf_counter()
                r = http.post(f"{base}/v1/messages", json=body, headers=headers)
                r.read()
                r.raise_for_status()
                return (time.perf_counter() - t0) * 1000

            for i in range(max(0, warmup) + max(1, n_calls)):
                body = _bench_body(i, size_tokens, stream)
                d = timed(emu.url, body)
                p = timed(proxy.url, body)
                if i >= warmup:
                    direct_ms.append(d)
                    proxy_ms.append(p)
            pipeline_ms = [float(r["overhead_ms"]) for r in proxy.records()][max(0, warmup) :]
    added = [p - d for p, d in zip(proxy_ms, direct_ms, strict=True)]
    transport = [a - o for a, o in zip(added, pipeline_ms, strict=False)]
    out: dict[str, Any] = {"n_calls": len(added), "size_tokens": size_tokens, "stream": stream}
    for name, values in (
        ("direct", direct_ms),
        ("proxy", proxy_ms),
        ("added", added),
        ("pipeline", pipeline_ms),
        ("transport", transport),
    ):
        out[f"{name}_p50_ms"] = round(percentile(values, 50) or 0.0, 3)  # nearest rank, as every report
        out[f"{name}_p95_ms"] = round(percentile(values, 95) or 0.0, 3)
    return out
