"""Replaying conversations under every configuration of ``tokensaver bench``, in one or more processes.

Each conversation is replayed through the offline emulator (:func:`tokensaver.replay.replay`, on the
trace's own clock). In ``source`` scope a source's conversations run back to back on one emulator
whose prompt cache is kept between them (:class:`BenchEmulator`), on one continuous clock
(:func:`sequence_conversations`); in ``conversation`` scope each starts from a cold cache. Per
configuration and conversation it keeps the billed usage and dollars, the per-stage savings from the
pipeline's records, the requests the emulator rejected, fact retention (:mod:`tokensaver.bench.facts`)
and what the lost facts cost (:func:`lost_round_usd`).
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from ..emulator import Emulator
from ..pricing import PER, ModelInfo, PriceTable
from ..replay import DEFAULT_GAP, auto_cache, replay
from ..tokens import default_counter
from ..traces import Conversation, TraceCall
from . import headroom
from .corpus import TraceRef, load_ref
from .facts import FactTracker
from .specs import DEFAULT_GAP_SECONDS, ConfigSpec

LOST_READS = 20  # later calls that read a fetched-again result, at most
USAGE_KEYS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens")

_WORKER: dict[str, Any] = {}


class BenchEmulator(Emulator):
    """The emulator the bench replays on: ``keep_cache`` makes :meth:`reset` keep the prompt cache.

    :func:`tokensaver.replay.replay` resets the emulator it is given; in ``source`` scope the bench
    replays the conversations of a source one by one and must keep the cache between them (the
    requests and queued replies are still forgotten).
    """

    keep_cache = False

    def reset(self) -> None:
        if not self.keep_cache:
            super().reset()
            return
        with self._lock:
            self.requests.clear()
            self.replies.clear()


def worker_emulator() -> BenchEmulator:
    """This process's bench emulator (started on first use, stopped by :func:`close_worker`)."""
    emu: BenchEmulator | None = _WORKER.get("emulator")
    if emu is None:
        emu = _WORKER["emulator"] = BenchEmulator(virtual_clock=True)
        emu.start()
    return emu


def _headroom() -> tuple[Any, str | None]:
    if "headroom" not in _WORKER:
        _WORKER["headroom"] = headroom.make_prepare()
    prep, why = _WORKER["headroom"]
    return prep, why


def close_worker() -> None:
    emu = _WORKER.pop("emulator", None)
    if emu is not None:
        emu.stop()


def sequence_conversations(
    convs: list[Conversation], gap_seconds: float = DEFAULT_GAP_SECONDS
) -> list[Conversation]:
    """Copies of ``convs`` on one continuous clock, every call with an explicit time (``TraceCall.t``).

    A conversation with recorded times keeps them, unless it would start before the clock (the
    previous conversation's last call): then it is shifted forward to start there, its internal
    gaps preserved. A conversation without times starts ``gap_seconds`` after the previous one's
    last call (the first one where :func:`tokensaver.replay.replay` would start it) and spaces its
    calls like ``replay`` does. Calls without a time inside a timed conversation follow the call
    before them as in ``replay``. Bodies and replies are shared with the originals, not copied.
    """
    start_untimed = 1_700_000_000.0 + DEFAULT_GAP  # where replay() puts an untimed first call
    clock: float | None = None
    out: list[Conversation] = []
    for conv in convs:
        recorded = [c.t for c in conv.calls]
        first = next((k for k, t in enumerate(recorded) if t is not None), None)
        local: list[float] = []
        if first is None:
            t0 = start_untimed if clock is None else clock + gap_seconds
            local = [t0 + DEFAULT_GAP * k for k in range(len(conv.calls))]
        else:
            anchor = recorded[first]
            assert anchor is not None
            prev = anchor - DEFAULT_GAP * (first + 1)  # calls before the first timed one: DEFAULT_GAP apart
            for t in recorded:
                prev = t if t is not None else prev + DEFAULT_GAP
                local.append(prev)
            if clock is not None and local and local[0] < clock:
                shift = clock - local[0]
                local = [t + shift for t in local]
        calls = [
            TraceCall(body=c.body, t=t, usage=c.usage, reply=c.reply)
            for c, t in zip(conv.calls, local, strict=True)
        ]
        out.append(Conversation(conv.id, conv.source, calls, conv.info))
        if local:
            clock = max(local) if clock is None else max(clock, max(local))
    return out


def lost_round_usd(
    info: ModelInfo, prefix_tokens: int, result_tokens: int, calls_left: int, reads: int = LOST_READS
) -> float:
    """What a lost tool result costs: the round the agent makes to get it back.

    One more call that reads the whole cached prefix of the call where the fact was needed
    (``cache_read`` x ``prefix_tokens``), the result written to the cache again (``cache_write_5m``
    x ``result_tokens``), and read again on the next calls (``cache_read`` x ``result_tokens`` x
    min(``reads``, ``calls_left``)). ``info`` is the model's :class:`tokensaver.pricing.ModelInfo`.
    """
    later = min(reads, max(0, calls_left))
    return (
        info.cache_read * prefix_tokens
        + info.cache_write_5m * result_tokens
        + info.cache_read * result_tokens * later
    ) / PER


EXTRA_ROUND_OUTPUT = 40  # output tokens of a round the agent makes to load what it needs (a short tool call)


def _price_extra_rounds(rec: dict[str, Any], prices: PriceTable, res: dict[str, Any]) -> None:
    """A plugin's ``extra_rounds`` note: rounds the agent would have made that the replay did not (a tool
    loaded before a recorded turn could call it). Each is priced as one more call reading the call's
    whole billed prefix from the cache, plus its short output, and counted with the lost facts."""
    n = sum(
        int(v.get("extra_rounds") or 0) for v in (rec.get("plugins") or {}).values() if isinstance(v, dict)
    )
    if n <= 0 or rec.get("status") != 200:
        return
    usage = rec.get("usage") or {}
    info = prices.get(str(rec.get("model", "")))
    billed_in = sum(int(usage.get(x) or 0) for x in USAGE_KEYS[:3])
    usd = n * (info.cache_read * billed_in + info.output * EXTRA_ROUND_OUTPUT) / PER
    res["extra_rounds"] = res.get("extra_rounds", 0) + n
    res["lost_fact_usd"] = round(res["lost_fact_usd"] + usd, 8)


def _replay_one(
    conv: Conversation,
    spec: ConfigSpec,
    emu: BenchEmulator,
    used: list[frozenset[str]],
    memo_dir: str | None,
    tick: Callable[[int], None] | None,
) -> dict[str, Any]:
    """Replay ``conv`` under ``spec`` on ``emu`` (reset by ``replay`` unless ``emu.keep_cache``)."""
    prices = PriceTable()
    tracker = FactTracker()
    counter = default_counter()
    priced: set[str] = set()  # tool results already priced as lost (once per conversation)
    res: dict[str, Any] = {
        "config": spec.name,
        "conversation": conv.id,
        "source": conv.source,
        "calls": len(conv.calls),
        "facts_used": 0,
        "facts_kept": 0,
        "lost_results": 0,
        "lost_fact_usd": 0.0,
        "lost_samples": [],
        "half": conv.info.get("bench_half"),
        "short_circuited": 0,
        "turn_cost_usd": [None] * len(conv.calls),
        "turn_hit_rate": [None] * len(conv.calls),
        "start_t": conv.calls[0].t if conv.calls else None,
    }
    state = {"seen": 0}

    def progress(done: int, total: int) -> None:
        k = done - 1
        n = len(emu.requests)
        if n > state["seen"]:
            rec = emu.requests[-1]
            if rec.status == 200 and isinstance(rec.body, dict):
                usage = rec.usage or {}
                info = prices.get(str(rec.body.get("model", "")))
                billed_in = sum(int(usage.get(x) or 0) for x in USAGE_KEYS[:3])
                n_kept, lost = tracker.lost_results(used[k], conv.calls[k].body, rec.body)
                res["facts_used"] += len(used[k])
                res["facts_kept"] += n_kept
                for tid, block in lost.items():
                    if tid in priced:
                        continue
                    priced.add(tid)
                    tokens = counter.block(block)
                    usd = lost_round_usd(info, billed_in, tokens, len(conv.calls) - k - 1)
                    res["lost_results"] += 1
                    res["lost_fact_usd"] += usd
                    if len(res["lost_samples"]) < 5:
                        res["lost_samples"].append(
                            {
                                "call": k,
                                "tool_use_id": tid,
                                "prefix_tokens": billed_in,
                                "result_tokens": tokens,
                                "usd": round(usd, 6),
                            }
                        )
                res["turn_cost_usd"][k] = round(info.cost(usage), 8)
                if billed_in:
                    res["turn_hit_rate"][k] = round(
                        int(usage.get("cache_read_input_tokens") or 0) / billed_in, 4
                    )
            for r in emu.requests[state["seen"] :]:
                r.body = None  # free memory: a long replay would otherwise keep every body
                r.response = None
        else:
            res["short_circuited"] += 1
            res["turn_cost_usd"][k] = 0.0
        state["seen"] = n
        if tick:
            tick(1)

    prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = auto_cache if spec.auto_cache else None
    config = dict(spec.config) if spec.config is not None else None
    if memo_dir is not None and config is not None:
        config["memoize"] = {**(config.get("memoize") or {}), "dir": memo_dir}
    hr = None
    if spec.kind == "headroom":
        hr, why = _headroom()
        if hr is None:
            res["skipped"] = why
            if tick:
                tick(len(conv.calls))
            return res
        hr.ms.clear()
        hr.errors.clear()
        prepare = hr
    t0 = time.perf_counter()
    result = replay(
        [conv],
        config=config,
        wrap_client=spec.kind == "tokensaver",
        prepare=prepare,
        emulator=emu,
        label=spec.name,
        progress=progress,
    )
    res["seconds"] = round(time.perf_counter() - t0, 3)
    totals = result.totals()
    for k in USAGE_KEYS:
        res[k] = int(totals[k])
    res["cost_usd"] = round(totals["cost_usd"], 8)
    res["input_cost_usd"] = round(totals["input_cost_usd"], 8)
    res["lost_fact_usd"] = round(res["lost_fact_usd"], 8)
    res["rejected"] = len(result.rejected)
    res["rejected_errors"] = [r["error"][:300] for r in result.rejected[:3]]
    if tick and result.rejected:
        tick(len(result.rejected))
    stages: dict[str, dict[str, Any]] = {}
    overhead: list[float] = []
    plugin_errors: list[str] = []
    tokens_original = tokens_sent = 0
    for rec in result.records:
        _price_extra_rounds(rec, prices, res)
        overhead.append(float(rec.get("overhead_ms") or 0.0))
        tokens_original += int(rec.get("tokens_original") or 0)
        tokens_sent += int(rec.get("tokens_sent") or 0)
        for s in rec.get("stages") or []:
            row = stages.setdefault(
                s["plugin"], {"saved_tokens": 0, "saved_usd": 0.0, "changed": 0, "errors": 0, "ms": 0.0}
            )
            row["saved_tokens"] += int(s.get("saved_tokens") or 0)
            row["saved_usd"] = round(row["saved_usd"] + float(s.get("saved_usd") or 0.0), 8)
            row["changed"] += 1 if s.get("changed") else 0
            row["errors"] += 1 if s.get("error") else 0
            row["ms"] = round(row["ms"] + float(s.get("ms") or 0.0), 3)
        plugin_errors.extend(f"{e.get('plugin')}: {e.get('error')}"[:300] for e in rec.get("errors") or [])
    if hr is not None:
        overhead = list(hr.ms)
        plugin_errors = list(hr.errors)
        res["headroom_tokens_saved"] = hr.tokens_saved
    res["stages"] = stages
    res["plugin_errors"] = len(plugin_errors)
    res["plugin_error_samples"] = plugin_errors[:3]
    res["tokens_original"] = tokens_original
    res["tokens_sent"] = tokens_sent
    res["overhead_ms"] = [round(x, 3) for x in overhead]
    return res


def _facts_used(conv: Conversation) -> list[frozenset[str]]:
    tracker = FactTracker()
    return [tracker.used(c.body, c.reply) for c in conv.calls]


def replay_conversation(
    conv: Conversation,
    specs: list[ConfigSpec],
    tick: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """``conversation`` scope: replay ``conv`` alone (cold cache, empty memo) under each spec.

    One result dict per spec (schema: see :mod:`tokensaver.bench.render`).
    """
    emu = worker_emulator()
    emu.keep_cache = False
    used = _facts_used(conv)
    out: list[dict[str, Any]] = []
    for spec in specs:
        memo = tempfile.TemporaryDirectory(prefix="tokensaver-bench-memo-") if spec.memo else None
        try:
            out.append(_replay_one(conv, spec, emu, used, memo.name if memo else None, tick))
        finally:
            if memo is not None:
                memo.cleanup()
    return out


def replay_source(
    convs: list[Conversation],
    specs: list[ConfigSpec],
    gap_seconds: float = DEFAULT_GAP_SECONDS,
    tick: Callable[[int], None] | None = None,
    used: list[list[frozenset[str]]] | None = None,
) -> list[dict[str, Any]]:
    """``source`` scope: per spec, replay ``convs`` back to back on one prompt cache and one memo store.

    The cache is reset once per spec, before the first conversation; the conversations run on one
    continuous clock (:func:`sequence_conversations`); each gets its own wrapped client (a new
    session of the same agent). One result dict per spec and conversation.
    """
    emu = worker_emulator()
    seq = sequence_conversations(convs, gap_seconds)
    if used is None:
        used = [_facts_used(c) for c in convs]
    out: list[dict[str, Any]] = []
    for spec in specs:
        memo = tempfile.TemporaryDirectory(prefix="tokensaver-bench-memo-") if spec.memo else None
        emu.keep_cache = False
        emu.reset()
        emu.keep_cache = True
        try:
            for conv, u in zip(seq, used, strict=True):
                out.append(_replay_one(conv, spec, emu, u, memo.name if memo else None, tick))
        finally:
            emu.keep_cache = False
            if memo is not None:
                memo.cleanup()
    return out


def worker_task(ref: TraceRef, limit_calls: int | None, specs: list[ConfigSpec]) -> list[dict[str, Any]]:
    return replay_conversation(load_ref(ref, limit_calls), specs)


def worker_source_task(
    refs: list[TraceRef], limit_calls: int | None, spec: ConfigSpec, gap_seconds: float
) -> list[dict[str, Any]]:
    return replay_source([load_ref(r, limit_calls) for r in refs], [spec], gap_seconds)


def worker_init(env: dict[str, str]) -> None:
    os.environ.update(env)


# -- progress ---------------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on stderr (a line per 10% when stderr is not a terminal)."""

    def __init__(self, total: int, label: str = "bench", enabled: bool = True, stream: Any = None) -> None:
        self.total = max(1, total)
        self.done = 0
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.monotonic()
        self._last_decile = -1
        self._last_draw = 0.0
        self._lock = threading.Lock()

    def update(self, n: int = 1) -> None:
        with self._lock:
            self.done = min(self.total, self.done + n)
            self._draw()

    def _draw(self, final: bool = False) -> None:
        if not self.enabled:
            return
        frac = self.done / self.total
        elapsed = time.monotonic() - self.t0
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        text = f"{self.label} [{'#' * int(frac * 30):<30}] {frac:4.0%} {self.done:,}/{self.total:,} calls"
        text += f"  {_dur(elapsed)} elapsed" + ("" if final else f", ~{_dur(eta)} left")
        if self.tty:
            now = time.monotonic()
            if final or now - self._last_draw > 0.2:
                self._last_draw = now
                self.stream.write("\r" + text + ("\n" if final else ""))
                self.stream.flush()
        else:
            decile = int(frac * 10)
            if decile != self._last_decile or (final and self._last_decile != 10):
                self._last_decile = decile
                self.stream.write(text + "\n")
                self.stream.flush()

    def close(self) -> None:
        with self._lock:
            self._draw(final=True)


def _dur(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
