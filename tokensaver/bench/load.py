"""``tokensaver bench --load``: requests per second and added latency of ``tokensaver proxy`` under load.

A bounded load test, never a timed test: a fixed number of requests sent by a fixed number of
concurrent clients, each stopped at a time limit. The requests are agent conversations growing turn
by turn (:func:`tokensaver.bench.overhead.synthetic_request` from real traces, at ~10k and ~50k
tokens; each turn is the previous one plus one tool_use / tool_result pair), each conversation's
turns sent in order by one client, so cache_align, prune, summarize and memoize do their normal work.
The upstream is :func:`tokensaver.proxy.overhead.canned_upstream` (an instant answer, no
validation), served in this process.

Setups, each on the same requests: the upstream called directly (the reference), one proxy, and
three proxies behind a client-side round-robin balancer (every request to the next replica, so the
turns of one conversation visit all three). The proxies are ``tokensaver proxy`` subprocesses with
the same config file, ``state = "redis://..."`` on one ``redis-server`` (``redis_url``, else one
started here on a free loopback port). "Added" latency is the setup's p50 / p95 minus the direct
run's (nearest rank, :func:`tokensaver._stats.percentile`); requests per second are the requests
answered over the wall time of the run. Each setup uses its own API key, so its Redis namespaces start
empty. The bodies that reach the upstream are hashed per (conversation, turn): the three replicas'
must be the single proxy's, byte for byte.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._stats import percentile
from ..errors import TokensaverError
from ..report.formatting import text_table
from ..tokens import default_counter
from ..traces import Conversation
from .overhead import synthetic_request

if TYPE_CHECKING:
    from aiohttp import web

    from ..testing import RedisServer

SIZES = (10_000, 50_000)
PLUGINS = ["summarize", "prune", "cache_align", "memoize"]
LOAD_ID = "x-bench-load-id"  # "conversation/turn", read by the recording upstream (forwarded by the proxy)


@dataclass
class LoadOptions:
    requests: int = 240
    clients: int = 8
    turns: int = 15  # user turns per conversation at most (fewer where a size has fewer tool pairs)
    replicas: tuple[int, ...] = (1, 3)
    sizes: tuple[int, ...] = SIZES
    time_limit: float = 300.0  # seconds per setup; requests not sent by then are counted, not sent
    request_timeout: float = 60.0
    warmup: int = 2  # requests per proxy (and direct) before a setup is timed
    redis_url: str | None = None
    plugins: tuple[str, ...] = tuple(PLUGINS)


def _tagged_first(message: dict[str, Any], cid: str) -> dict[str, Any]:
    """The first user message with the conversation's name in front (conversations differ from turn 1)."""
    content = message.get("content")
    if isinstance(content, list):
        return {**message, "content": [{"type": "text", "text": f"[task {cid}]"}, *content]}
    return {**message, "content": f"[task {cid}]\n{content}"}


def build_conversations(
    sources: list[Conversation], sizes: tuple[int, ...], requests: int, turns: int, tag: str = "load"
) -> list[tuple[str, list[dict[str, Any]]]]:
    """Conversations of ``requests`` bodies in all, the same share at each size, in turn by size.

    Each is the last (at most) ``turns`` user turns of a synthetic request of about that size, each
    turn the previous one plus one tool_use / tool_result pair.
    """
    per_size: list[list[tuple[str, list[dict[str, Any]]]]] = []
    for k, size in enumerate(sizes):
        quota = requests // len(sizes) + (1 if k < requests % len(sizes) else 0)
        group: list[tuple[str, list[dict[str, Any]]]] = []
        while quota > 0:
            cid = f"{tag}{len(group)}-{size // 1000}k"
            full = synthetic_request(sources, size, tag=cid)
            msgs = [_tagged_first(full["messages"][0], cid), *full["messages"][1:]]
            ends = list(range(len(msgs), 0, -2))[: min(turns, quota)][::-1]  # prefixes ending on a user turn
            group.append((cid, [{**full, "messages": msgs[:j], "stream": False} for j in ends]))
            quota -= len(ends)
        per_size.append(group)
    return [c for batch in itertools.zip_longest(*per_size) for c in batch if c is not None]


def body_tokens(convs: list[tuple[str, list[dict[str, Any]]]]) -> dict[str, list[int]]:
    """Per size label: the estimated tokens of the smallest and the largest body sent."""
    counter = default_counter()
    out: dict[str, list[int]] = {}
    for cid, bodies in convs:
        label = cid.rsplit("-", 1)[1]
        first, last = counter.request(bodies[0]), counter.request(bodies[-1])
        lo, hi = out.get(label, [first, last])
        out[label] = [min(lo, first), max(hi, last)]
    return out


class Recorder:
    """The canned upstream with a middleware hashing every body it receives, by the load id header."""

    def __init__(self) -> None:
        self.bodies: dict[str, str] = {}

    def app(self) -> web.Application:
        from aiohttp import web

        from ..proxy.overhead import CANNED_MESSAGE, canned_upstream

        app = canned_upstream(CANNED_MESSAGE)

        @web.middleware
        async def record(request: web.Request, handler: Callable[..., Any]) -> web.StreamResponse:
            raw = await request.read()  # cached: the handler's request.json() reads it again
            lid = request.headers.get(LOAD_ID)
            if lid:
                self.bodies[lid] = hashlib.sha256(raw).hexdigest()
            return await handler(request)  # type: ignore[no-any-return]

        app.middlewares.append(record)
        return app


async def _drive(
    targets: list[str],
    convs: list[tuple[str, list[dict[str, Any]]]],
    clients: int,
    api_key: str,
    time_limit: float,
    request_timeout: float,
) -> dict[str, Any]:
    """Send every conversation's turns in order, ``clients`` conversations at once, requests round-robin."""
    import aiohttp

    rr = itertools.count()
    queue: asyncio.Queue[tuple[str, list[dict[str, Any]]]] = asyncio.Queue()
    for c in convs:
        queue.put_nowait(c)
    latencies: list[float] = []
    errors: list[str] = []
    answered = 0
    headers = {"x-api-key": api_key, "anthropic-version": "2023-06-01", "content-type": "application/json"}
    t0 = time.perf_counter()
    deadline = t0 + time_limit
    timeout = aiohttp.ClientTimeout(total=request_timeout)
    connector = aiohttp.TCPConnector(limit=0)

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal answered
        while not queue.empty():
            cid, bodies = queue.get_nowait()
            for turn, body in enumerate(bodies):
                if time.perf_counter() >= deadline:
                    return
                base = targets[next(rr) % len(targets)]
                data = _dumps(body)
                start = time.perf_counter()
                try:
                    async with session.post(
                        f"{base}/v1/messages", data=data, headers={**headers, LOAD_ID: f"{cid}/{turn}"}
                    ) as r:
                        await r.read()
                        if r.status != 200:
                            errors.append(f"{cid}/{turn}: HTTP {r.status}")
                            continue
                except (TimeoutError, aiohttp.ClientError) as exc:
                    errors.append(f"{cid}/{turn}: {type(exc).__name__}")
                    continue
                latencies.append((time.perf_counter() - start) * 1000)
                answered += 1

    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await asyncio.gather(*(client(session) for _ in range(max(1, clients))))
    seconds = time.perf_counter() - t0
    total = sum(len(b) for _, b in convs)
    return {
        "requests": total,
        "answered": answered,
        "errors": len(errors),
        "error_samples": errors[:5],
        "not_sent": total - answered - len(errors),
        "seconds": round(seconds, 2),
        "rps": round(answered / seconds, 1) if seconds > 0 else None,
        "p50_ms": _p(latencies, 50),
        "p95_ms": _p(latencies, 95),
    }


def _dumps(body: dict[str, Any]) -> bytes:
    import orjson

    return orjson.dumps(body)


def _p(values: list[float], p: float) -> float | None:
    v = percentile(values, p)
    return None if v is None else round(v, 1)


def _start_redis(workdir: str) -> RedisServer:
    """A ``redis-server`` of the bench's own (:class:`tokensaver.testing.RedisServer`), started."""
    from ..testing import RedisServer

    if not shutil.which("redis-server"):
        raise TokensaverError(
            "the load test needs Redis: no redis-server on PATH (apt-get install redis-server) "
            "and no --load-redis URL"
        )
    server = RedisServer(workdir)
    try:
        server.start()
    except RuntimeError as exc:
        raise TokensaverError(str(exc)) from exc
    return server


def _start_proxies(
    n: int, upstream: str, state: str, plugins: tuple[str, ...], tmp: Path, label: str
) -> list[Any]:
    from ..testing import start_proxy_process

    procs = []
    try:
        for i in range(n):
            cfg = tmp / f"{label}-p{i}.toml"
            names = ", ".join(f'"{p}"' for p in plugins)
            cfg.write_text(
                f'plugins = [{names}]\nstate = "{state}"\nruns_dir = "{tmp / f"{label}-runs{i}"}"\n'
            )
            env = {
                **os.environ,
                "TOKENSAVER_CONFIG": str(cfg),
                "TOKENSAVER_CACHE_DIR": str(tmp / f"{label}-cache{i}"),
            }
            procs.append(start_proxy_process("--upstream", upstream, "--run", f"{label}-{i}", env=env))
    except BaseException:
        _stop(procs)
        raise
    return procs


def _stop(procs: list[Any]) -> None:
    from ..testing import stop_proxy_process

    for p, _ in procs:
        stop_proxy_process(p)


def _pipeline_ms(tmp: Path, label: str, n: int, skip: int) -> dict[str, Any]:
    """p50 / p95 of the pipeline's own time per call (its ledgers' overhead_ms), warm-up calls left out."""
    from ..run import load_run

    values: list[float] = []
    for i in range(n):
        try:
            records = load_run(f"{label}-{i}", tmp / f"{label}-runs{i}").records()
        except Exception:  # a replica that recorded nothing: no figure, not a failed bench
            continue
        values += [float(r.get("overhead_ms") or 0.0) for r in records[skip:]]
    return {"pipeline_p50_ms": _p(values, 50), "pipeline_p95_ms": _p(values, 95)}


def measure_load(
    sources: list[Conversation],
    opts: LoadOptions | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The load test: a row per setup (direct, 1 proxy, N proxies round-robin) and the bodies check."""
    from ..proxy import BackgroundApp

    opts = opts or LoadOptions()
    convs = build_conversations(sources, opts.sizes, max(1, opts.requests), max(1, opts.turns))
    warm = build_conversations(sources, (min(opts.sizes),), max(1, opts.warmup), opts.warmup, tag="warm")
    recorder = Recorder()
    rows: list[dict[str, Any]] = []
    seen: dict[int, dict[str, str]] = {}
    with tempfile.TemporaryDirectory(prefix="tokensaver-load-") as tmpdir:
        tmp = Path(tmpdir)
        redis = None if opts.redis_url else _start_redis(tmpdir)
        state = opts.redis_url or (redis.url if redis else "")
        try:
            with BackgroundApp(recorder.app()) as up:
                for n in (0, *opts.replicas):
                    label = "direct" if n == 0 else f"load{n}"
                    procs = _start_proxies(n, up.url, state, opts.plugins, tmp, label) if n else []
                    try:
                        targets = [u for _, u in procs] or [up.url]
                        key = f"bench-load-{n}-{os.getpid()}-{time.time_ns()}"  # fresh namespaces
                        for t in targets:  # warm each target (vocabulary, pools, connections)
                            asyncio.run(_drive([t], warm, 1, key + "-warm", 60.0, opts.request_timeout))
                        recorder.bodies.clear()
                        row = asyncio.run(
                            _drive(targets, convs, opts.clients, key, opts.time_limit, opts.request_timeout)
                        )
                        seen[n] = dict(recorder.bodies)
                    finally:
                        _stop(procs)
                    if n:
                        row.update(_pipeline_ms(tmp, label, n, skip=len(warm[0][1])))
                    row = {
                        "setup": "direct"
                        if n == 0
                        else f"{n} prox{'y' if n == 1 else 'ies'}" + (", round-robin" if n > 1 else ""),
                        "proxies": n,
                        "clients": opts.clients,
                        **row,
                    }
                    rows.append(row)
                    if progress:
                        progress(f"load {row['setup']}: {row['rps']} rps, p50 {row['p50_ms']} ms")
        finally:
            if redis is not None:
                redis.stop()
    direct = rows[0]
    for row in rows:
        for p in ("p50", "p95"):
            a, b = row[f"{p}_ms"], direct[f"{p}_ms"]
            row[f"added_{p}_ms"] = None if a is None or b is None else round(a - b, 1)
    bodies: dict[str, Any] = {}
    transformed = 0
    proxied = [n for n in opts.replicas if n in seen]
    if proxied:
        ref_n = min(proxied)
        ref = seen[ref_n]
        direct_seen = seen.get(0, {})
        transformed = sum(1 for k, v in ref.items() if k in direct_seen and direct_seen[k] != v)
        for n in proxied:
            if n == ref_n:
                continue
            common = sorted(set(ref) & set(seen[n]))
            differ = [k for k in common if ref[k] != seen[n][k]]
            bodies[f"{n}_vs_{ref_n}"] = {
                "compared": len(common),
                "identical": len(common) - len(differ),
                "differ": differ[:10],
            }
    return {
        "rows": rows,
        "bodies": bodies,
        "transformed": transformed,  # requests whose body the (first) proxy setup changed on the way
        "conversations": len(convs),
        "turns": max(len(b) for _, b in convs),
        "body_tokens": body_tokens(convs),
        "sizes": list(opts.sizes),
        "clients": opts.clients,
        "plugins": list(opts.plugins),
        "state": "redis" + (" (given URL)" if opts.redis_url else " (redis-server started by the bench)"),
        "time_limit_s": opts.time_limit,
        "upstream": "canned (tokensaver.proxy.overhead.canned_upstream, in the load driver's process)",
        "note": "the machine's cores are shared by the proxies, Redis, the upstream and the load driver; "
        "added = the setup's percentile minus the direct run's; pipeline = the proxies' own "
        "per-call pipeline time (their ledgers' overhead_ms)",
    }


# -- rendering -------------------------------------------------------------------------------------

LOAD_HEADERS = [
    "setup",
    "clients",
    "requests",
    "answered",
    "rps",
    "p50",
    "p95",
    "added p50",
    "added p95",
    "pipeline p50",
    "pipeline p95",
]


def load_rows(load: dict[str, Any]) -> list[list[str]]:
    if "error" in load:
        return [[str(load["error"])] + [""] * (len(LOAD_HEADERS) - 1)]

    def ms(v: Any) -> str:
        return "n/a" if v is None else f"{v:.1f} ms"

    return [
        [
            r["setup"],
            str(r["clients"]),
            str(r["requests"]),
            str(r["answered"]),
            "n/a" if r["rps"] is None else f"{r['rps']:.1f}",
            ms(r["p50_ms"]),
            ms(r["p95_ms"]),
            "" if r["proxies"] == 0 else ms(r["added_p50_ms"]),
            "" if r["proxies"] == 0 else ms(r["added_p95_ms"]),
            "" if r["proxies"] == 0 else ms(r.get("pipeline_p50_ms")),
            "" if r["proxies"] == 0 else ms(r.get("pipeline_p95_ms")),
        ]
        for r in load["rows"]
    ]


def load_title(load: dict[str, Any]) -> str:
    if "error" in load:
        return "Load: tokensaver proxy under concurrent clients"
    sizes = ", ".join(f"{lo:,}-{hi:,}" for lo, hi in load.get("body_tokens", {}).values())
    return (
        f"Load: {load['conversations']} conversations of up to {load['turns']} turns (bodies of {sizes} "
        f"tokens), "
        f"{load['clients']} clients, plugins {', '.join(load['plugins'])}, state {load['state']}"
    )


def load_notes(load: dict[str, Any]) -> list[str]:
    if "error" in load:
        return []
    out = [f"Upstream: {load['upstream']}; {load['note']}."]
    if load.get("transformed") is not None and load["rows"]:
        out.append(
            f"Bodies the proxy changed on the way: {load['transformed']} of {load['rows'][0]['requests']}."
        )
    for name, b in load.get("bodies", {}).items():
        out.append(
            f"Bodies reaching the upstream, {name.replace('_vs_', ' proxies vs ')}: "
            f"{b['identical']} of {b['compared']} identical."
        )
    return out


def load_table(load: dict[str, Any], md: bool) -> list[str]:
    """The load section's lines (plain text or Markdown)."""
    rows = load_rows(load)
    if md:
        out = [f"### {load_title(load)}", ""]
        out += ["| " + " | ".join(LOAD_HEADERS) + " |", "|" + "|".join("---" for _ in LOAD_HEADERS) + "|"]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
        return [*out, "", *(f"- {line}" for line in load_notes(load))]
    return [
        load_title(load),
        *text_table(LOAD_HEADERS, rows, right=set(range(1, len(LOAD_HEADERS)))),
        *load_notes(load),
    ]
