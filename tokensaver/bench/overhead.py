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
import multiprocessing
import os
import resource
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import orjson

from ..pipeline import Pipeline
from ..replay import auto_cache, replay
from ..report.aggregate import percentile
from ..tokens import default_counter
from ..traces import Conversation, TraceCall
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


def measure_proxy(
    quick: bool, reps: int, conversations: list[Conversation] | None = None
) -> list[dict[str, Any]]:
    """The time ``tokensaver proxy`` adds per call, JSON and streamed, next to the pipeline's own.

    The same conversations as :func:`measure_overhead` (the calls of each size's band, else one long
    session), replayed in order through a real proxy in front of an upstream that answers at once
    (:func:`tokensaver.proxy.overhead.measure_proxy_overhead`), least of up to 3 fresh processes
    (``quick``: ~10k tokens, two conversations, one pass).
    """
    if PROXY_UNAVAILABLE is not None:
        return [{"error": PROXY_UNAVAILABLE}]
    if not conversations:
        return [{"error": "proxy overhead: no conversations to replay"}]
    sizes = (10_000,) if quick else (50_000, 200_000)
    out: list[dict[str, Any]] = []
    for size in sizes:
        sample = _band_sample(conversations, size)[: 2 if quick else 6]
        long = None if sample else long_session(conversations, int(size * (1 + BAND)))
        if long is not None:
            sample = _band_sample([long], size)
        for stream in (False, True):
            if not sample:
                out.append(
                    {
                        "size_tokens": size,
                        "stream": stream,
                        "error": f"no conversation reaches ~{size // 1000}k tokens",
                    }
                )
                continue
            try:
                row = measure_proxy_overhead(
                    sample, size, stream=stream, reps=1 if quick else max(1, min(reps, 3)), band=BAND
                )
                row["chained"] = long is not None
            except Exception as exc:  # a measurement must not sink the whole bench
                row = {
                    "error": f"proxy overhead ({size} tokens, stream={stream}): {type(exc).__name__}: {exc}"
                }
            out.append(row)
    return out


# -- real conversations replayed in order ------------------------------------------------------

# the calls each size reports: those whose original body counts from the size to 25% over it
BAND = 0.25


# a call as the overhead replay needs it: its body as JSON bytes, its time, the Message it got
Packed = list[list[tuple[bytes, float | None, dict[str, Any]]]]


def pack(conversations: list[Conversation]) -> Packed:
    """The calls of ``conversations`` as JSON bytes (and each one's time and Message): what the replay
    holds while it is timed. Bytes, not parsed bodies: hundreds of whole request trees held in the
    timing process would make every full garbage collection there walk them, and those pauses (up to
    ~300 ms at ~200k tokens) are the harness's, not tokensaver's."""
    return [
        [(orjson.dumps(c.body), c.t, c.message("msg_bench")) for c in conv.calls] for conv in conversations
    ]


def replay_cpu(
    packed: Packed, config: dict[str, Any] | None = None
) -> list[list[tuple[int, float, dict[str, float]]]]:
    """Per conversation (:func:`pack`-ed), per call: (tokens of the original body, CPU ms of
    ``begin`` + ``finish``, each stage's ms).

    One pipeline for all of them, the calls in order, each body parsed anew from its JSON (as a
    caller or the proxy hands it over: no object shared with the previous call). CPU time of the
    whole process (the plugins' worker threads included), so other work on a shared machine does
    not count; the network call is not part of it.
    """
    pipe = Pipeline(config=dict(config or {"record": False}))
    out: list[list[tuple[int, float, dict[str, float]]]] = []
    clock = [1_700_000_000.0]
    pipe.clock = lambda: clock[0]
    for calls in packed:
        rows: list[tuple[int, float, dict[str, float]]] = []
        for raw, t, answer in calls:
            clock[0] = max(clock[0] + 1.0, t if t is not None else clock[0] + 30.0)
            body = orjson.loads(raw)
            t0 = time.process_time()
            run = pipe.begin(body, key="bench")
            pipe.finish(run, answer)
            ms = (time.process_time() - t0) * 1000
            rows.append((run.tokens_original, ms, {s["plugin"]: float(s["ms"]) for s in run.stages}))
        out.append(rows)
    return out


def long_session(conversations: list[Conversation], tokens: int) -> Conversation | None:
    """Real sessions of one source one after another as one conversation past ``tokens``.

    Each session's calls carry the earlier sessions' last messages (and their replies) before
    their own, as an agent that keeps its context across tasks would send them; None when all of
    them together stay under ``tokens``.
    """
    counter = default_counter()
    prefix: list[dict[str, Any]] = []
    calls: list[TraceCall] = []
    source = ""
    for conv in sorted(conversations, key=lambda c: (c.source, c.id)):
        msgs = conv.calls[-1].body.get("messages") if conv.calls else None
        if not isinstance(msgs, list) or not msgs or msgs[0].get("role") != "user":
            continue
        # a trace file loaded on its own has its path as its source: its folder is the source
        src = os.path.dirname(conv.source) if conv.source.endswith(".json") else conv.source
        if calls and src != source:
            continue
        source = src
        for call in conv.calls:
            body = {**call.body, "messages": [*prefix, *call.body.get("messages", [])]}
            calls.append(TraceCall(body=body, t=None, usage=call.usage, reply=call.reply))
        last = conv.calls[-1]
        prefix = [
            *prefix,
            *msgs,
            {"role": "assistant", "content": last.reply or [{"type": "text", "text": "OK."}]},
        ]
        if counter.request(calls[-1].body) >= tokens:
            return Conversation(f"long-session-{tokens}", conv.source, calls, {"sessions": "chained"})
    return None


def _replay_once(packed: Packed) -> list[list[tuple[int, float, dict[str, float]]]]:
    return replay_cpu(packed)


def _band_sample(conversations: list[Conversation], size: int) -> list[Conversation]:
    """Conversations with calls within the band of ``size``, cut after their last such call."""
    counter = default_counter()
    lo, hi = size, size * (1 + BAND)
    out = []
    for conv in conversations:
        sizes = [counter.request(c.body) for c in conv.calls]
        inside = [i for i, n in enumerate(sizes) if lo <= n <= hi]
        if inside:
            out.append(Conversation(conv.id, conv.source, conv.calls[: inside[-1] + 1], conv.info))
    return out


def measure_overhead(
    conversations: list[Conversation],
    sizes: tuple[int, ...] = SIZES,
    reps: int = 3,
    config: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
    max_conversations: int = 6,
) -> list[dict[str, Any]]:
    """Per size: the CPU time ``wrap()``'s pipeline adds per call on real conversations replayed in order.

    The conversations with calls from the size to 25% over it (else one long session of real sessions
    chained, :func:`long_session`) are replayed in order, each call's body parsed anew, through
    one pipeline with the default plugins, ``reps`` times, each time in a new process (cold
    per-process memos, as a new client starts); a call's time is its least of the ``reps`` (CPU
    time, the machine's other load aside). p50 / p95 / max over the calls in the band.
    """
    out = []
    reps = max(1, min(reps, 3))
    mp = multiprocessing.get_context("spawn")
    for size in sizes:
        sample = _band_sample(conversations, size)[:max_conversations]
        long = None if sample else long_session(conversations, int(size * (1 + BAND)))
        if long is not None:
            sample = _band_sample([long], size)
        if not sample:
            out.append({"target_tokens": size, "error": f"no conversation reaches ~{size // 1000}k tokens"})
            continue
        runs = []
        for _ in range(reps):
            with mp.Pool(1) as pool:
                runs.append(pool.apply(_replay_once, (pack(sample),)))
        lo, hi = size, size * (1 + BAND)
        times: list[float] = []
        tokens: list[int] = []
        stage_ms: dict[str, list[float]] = {}
        for c, conv_rows in enumerate(runs[0]):
            for i, (n, _, _) in enumerate(conv_rows):
                if not lo <= n <= hi:
                    continue
                best = min(range(reps), key=lambda r: runs[r][c][i][1])
                times.append(runs[best][c][i][1])
                tokens.append(n)
                for k, v in runs[best][c][i][2].items():
                    stage_ms.setdefault(k, []).append(v)
        out.append(
            {
                "target_tokens": size,
                "tokens": int(percentile([float(t) for t in tokens], 50) or 0),
                "messages": len(sample[-1].calls[-1].body.get("messages") or []),
                "calls": len(times),
                "conversations": [f"{conv.source}/{conv.id}" for conv in sample],
                "chained": long is not None,
                "plugins": list(Pipeline(config=dict(config or {"record": False})).config.plugins),
                "cold_ms": None,
                "p50_ms": _ms(times, 50),
                "p95_ms": _ms(times, 95),
                "max_ms": round(max(times), 2) if times else None,
                "reps": reps,
                "stages_p50_ms": {k: _ms(v, 50) for k, v in stage_ms.items()},
                "note": "CPU ms of begin() + finish() per call, least of reps fresh processes, "
                "real conversations replayed in order (stage ms are wall times)",
            }
        )
        if progress:
            progress(f"overhead ~{size // 1000}k tokens: p50 {out[-1]['p50_ms']} ms CPU")
    return out


def rss_mb() -> float:
    """This process's resident set now, in MB (Linux /proc; elsewhere its peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def measure_rss(conversations: list[Conversation], passes: int = 4, every: int = 50) -> dict[str, Any]:
    """RSS while one pipeline replays ``passes`` x the conversations in order (each pass's copies
    made new conversations by a tag on their first message), sampled every ``every`` conversations."""
    pipe = Pipeline(config={"record": False})
    clock = [1_700_000_000.0]
    pipe.clock = lambda: clock[0]
    samples: list[tuple[int, int, float]] = []
    done = calls = 0
    gc.collect()
    start = rss_mb()
    for p in range(passes):
        for conv in conversations:
            for call in conv.calls:
                clock[0] += 30.0
                body = orjson.loads(orjson.dumps(call.body))
                msgs = body.get("messages")
                if p and isinstance(msgs, list) and msgs and isinstance(msgs[0], dict):
                    first = msgs[0].get("content")
                    tag = {"type": "text", "text": f"[pass {p}]"}
                    msgs[0] = {
                        **msgs[0],
                        "content": [tag, *first]
                        if isinstance(first, list)
                        else [tag, {"type": "text", "text": str(first)}],
                    }
                run = pipe.begin(body, key="bench")
                pipe.finish(run, call.message("msg_bench"))
                calls += 1
            done += 1
            if done % every == 0:
                samples.append((done, calls, round(rss_mb(), 1)))
    gc.collect()
    samples.append((done, calls, round(rss_mb(), 1)))
    return {"conversations": done, "calls": calls, "rss_start_mb": round(start, 1), "samples": samples}
