"""Overhead for ``tokensaver bench``: time the pipeline adds per call, and peak memory of a replay.

Synthetic agent requests of about 10k, 50k and 200k tokens are built from the tool_use /
tool_result turns of a real trace, repeated with fresh ids and a per-copy suffix (so every block is
distinct, as in a real conversation, and no dedupe triggers on identical outputs). Each size gets
a fresh :class:`tokensaver.pipeline.Pipeline` with the default plugins; the first ``begin()`` runs
with a cold token cache (reported on its own), the next ``reps`` calls on the same body are timed
for p50 / p95 (what an agent loop pays on each turn once its history has been counted).

Also here: the peak memory of a replay (:func:`measure_memory`, :func:`peak_memory`) and the time
``tokensaver proxy`` adds per call (:func:`measure_proxy`).
"""

from __future__ import annotations

import gc
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

from ..pipeline import Pipeline
from ..replay import auto_cache, replay
from ..report.aggregate import percentile
from ..tokens import default_counter
from ..traces import Conversation
from .runner import worker_emulator

try:
    from ..proxy import measure_proxy_overhead
except ImportError as exc:  # the proxy's server stack is missing: the bench runs without that table
    PROXY_UNAVAILABLE: str | None = f"proxy unavailable: {exc}"
else:
    PROXY_UNAVAILABLE = None

SIZES = (10_000, 50_000, 200_000)


def _turns(
    conversations: list[Conversation],
) -> tuple[dict[str, Any], list[tuple[dict[str, Any], dict[str, Any]]]]:
    """The richest conversation's last body, and its (assistant tool_use, user tool_result) pairs."""
    best: tuple[int, dict[str, Any], list[tuple[dict[str, Any], dict[str, Any]]]] | None = None
    for conv in conversations:
        body = conv.calls[-1].body
        msgs = body.get("messages") or []
        pairs = []
        for a, u in zip(msgs, msgs[1:], strict=False):
            if (
                a.get("role") == "assistant"
                and u.get("role") == "user"
                and isinstance(a.get("content"), list)
                and isinstance(u.get("content"), list)
                and any(isinstance(b, dict) and b.get("type") == "tool_use" for b in a["content"])
                and all(isinstance(b, dict) and b.get("type") == "tool_result" for b in u["content"])
            ):
                pairs.append((a, u))
        size = sum(len(str(u)) for _, u in pairs)
        if pairs and (best is None or size > best[0]):
            best = (size, body, pairs)
    if best is None:
        raise ValueError("no conversation with tool_use / tool_result turns to build requests from")
    return best[1], best[2]


def _relabel(value: Any, suffix: str) -> Any:
    if isinstance(value, str):
        return value + suffix
    if isinstance(value, list):
        return [_relabel(v, suffix) for v in value]
    if isinstance(value, dict) and value.get("type") == "text":
        return {**value, "text": str(value.get("text", "")) + suffix}
    return value


def synthetic_request(conversations: list[Conversation], tokens: int, tag: str = "") -> dict[str, Any]:
    """An agent-like request of about ``tokens`` (estimated) tokens built from real tool turns."""
    base, pairs = _turns(conversations)
    counter = default_counter()
    first = (base.get("messages") or [{"role": "user", "content": "Start."}])[0]
    if first.get("role") != "user":
        first = {"role": "user", "content": "Start."}
    fixed = counter.request({**base, "messages": [first]})
    messages: list[dict[str, Any]] = [first]
    total, copy = fixed, 0
    while total < tokens:
        for a, u in pairs:
            copy += 1
            suffix = f"\n[{tag} copy {copy}]"
            ids: dict[str, str] = {}
            new_a = []
            for b in a["content"]:
                if b.get("type") == "tool_use":
                    ids[b["id"]] = f"toolu_bench_{tag}_{copy}_{len(ids)}"
                    new_a.append({**b, "id": ids[b["id"]]})
                elif b.get("type") in ("thinking", "redacted_thinking"):
                    continue
                else:
                    new_a.append(b)
            new_u = [
                {
                    **b,
                    "tool_use_id": ids.get(b["tool_use_id"], b["tool_use_id"]),
                    "content": _relabel(b.get("content", ""), suffix),
                }
                for b in u["content"]
            ]
            if set(ids) != {b["tool_use_id"] for b in u["content"]} or not new_a:
                continue
            pair = [{"role": "assistant", "content": new_a}, {"role": "user", "content": new_u}]
            messages.extend(pair)
            total += sum(counter.message(m) for m in pair)
            if total >= tokens:
                break
        if copy > 100_000:  # pragma: no cover - no usable pair
            break
    # end on a user turn that asks for the next step (tool results already are a user turn)
    return {**base, "messages": messages}


def _ms(values: list[float], p: float) -> float | None:
    """The ``p`` percentile of some timings, to 0.01 ms (None without timings)."""
    v = percentile(values, p)
    return None if v is None else round(v, 2)


def measure_overhead(
    conversations: list[Conversation],
    sizes: tuple[int, ...] = SIZES,
    reps: int = 20,
    config: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Per size: tokens, cold first call, p50 / p95 / max of ``reps`` warm calls, per-stage p50 (ms)."""
    out = []
    for size in sizes:
        body = synthetic_request(conversations, size, tag=f"{size}-{time.time_ns()}")
        pipe = Pipeline(config=dict(config or {"record": False}))
        t0 = time.perf_counter()
        call = pipe.begin(body)
        cold = (time.perf_counter() - t0) * 1000
        times: list[float] = []
        stage_ms: dict[str, list[float]] = {}
        for _ in range(reps):
            t0 = time.perf_counter()
            call = pipe.begin(body)
            times.append((time.perf_counter() - t0) * 1000)
            for s in call.stages:
                stage_ms.setdefault(s["plugin"], []).append(float(s["ms"]))
        out.append(
            {
                "target_tokens": size,
                "tokens": call.tokens_original,
                "tokens_sent": call.tokens_sent,
                "messages": len(body["messages"]),
                "plugins": list(pipe.config.plugins),
                "cold_ms": round(cold, 2),
                "p50_ms": _ms(times, 50),
                "p95_ms": _ms(times, 95),
                "max_ms": round(max(times), 2) if times else None,
                "reps": reps,
                "stages_p50_ms": {k: _ms(v, 50) for k, v in stage_ms.items()},
            }
        )
        if progress:
            progress(f"overhead {size:,} tokens: p50 {out[-1]['p50_ms']} ms")
    return out


def peak_memory(run: Callable[[], Any]) -> dict[str, float]:
    """Peak Python heap (tracemalloc) while ``run()`` executes, in MB, and the wall time it took."""
    gc.collect()
    was = tracemalloc.is_tracing()
    if not was:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    t0 = time.perf_counter()
    try:
        run()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        if not was:
            tracemalloc.stop()
    return {"peak_mb": round((peak - base) / 1e6, 1), "seconds": round(time.perf_counter() - t0, 1)}


def measure_memory(conversations: list[Conversation], limit_calls: int | None) -> dict[str, Any]:
    """Peak Python heap of replaying the longest conversation, with and without the default plugins."""
    if not conversations:
        return {}
    conv = max(conversations, key=lambda c: len(c.calls))
    if limit_calls:
        conv = Conversation(conv.id, conv.source, conv.calls[:limit_calls], conv.info)
    emu = worker_emulator()
    # warm-up (untraced): loads the vocabulary, the SDK and the price table, fills the token cache
    replay([conv], wrap_client=False, prepare=auto_cache, emulator=emu)
    replay([conv], config={"record": False}, emulator=emu)
    emu.reset()
    base = peak_memory(lambda: replay([conv], wrap_client=False, prepare=auto_cache, emulator=emu))
    emu.reset()
    ours = peak_memory(lambda: replay([conv], config={"record": False}, emulator=emu))
    emu.reset()
    return {
        "conversation": conv.id,
        "source": conv.source,
        "calls": len(conv.calls),
        "peak_mb_defaults": ours["peak_mb"],
        "peak_mb_auto": base["peak_mb"],
        "peak_mb_tokensaver": round(ours["peak_mb"] - base["peak_mb"], 1),
        "note": "tracemalloc peak of the whole replay in one process after an untraced warm-up (SDK, "
        "emulator and its recorded requests included); peak_mb_tokensaver = defaults minus automatic "
        "caching alone",
    }


def measure_proxy(quick: bool, reps: int) -> list[dict[str, Any]]:
    """The time ``tokensaver proxy`` adds per call, JSON and streamed, next to the pipeline's own."""
    if PROXY_UNAVAILABLE is not None:
        return [{"error": PROXY_UNAVAILABLE}]
    sizes = (2_000,) if quick else (2_000, 10_000)
    out = []
    for size in sizes:
        for stream in (False, True):
            try:
                row = measure_proxy_overhead(n_calls=max(5, reps), size_tokens=size, stream=stream)
            except Exception as exc:  # a measurement must not sink the whole bench
                row = {
                    "error": f"proxy overhead ({size} tokens, stream={stream}): {type(exc).__name__}: {exc}"
                }
            out.append(row)
    return out
