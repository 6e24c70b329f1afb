"""``tokensaver bench``: savings, fact retention and overhead, side by side, over recorded conversations.

Every conversation is replayed through the offline emulator (:func:`tokensaver.replay.replay`,
on the trace's own clock) under several configurations. The cache scope says what the prompt
cache is shared by:

* ``source`` (default): the conversations of one source (trace folder) are replayed back to back,
  per configuration, on one emulator whose prompt cache is not reset between them (and one memoize
  store), on a continuous clock (see :func:`sequence_conversations`): what a deployment sending
  them one after another is billed, where a breakpoint at the end of tools + system is shared;
* ``conversation``: each conversation alone from a cold prompt cache.

The configurations:

* ``none``: no tokensaver, no caching (the bodies as recorded);
* ``auto``: the API's automatic caching alone (top-level ``cache_control``), the baseline to beat;
* one per installed plugin, alone (``summarize``, ``prune``, ``cache_align``, ``memoize``);
* ``defaults``: what ``wrap()`` does with no config; ``all``: every built-in plugin;
* any config file given (``--configs my.toml``);
* ``headroom``: ``headroom.compress()`` then automatic caching, when ``headroom-ai`` is importable.

Each source's conversations are split into a *tuning* and a *validation* half by a fixed rule
(:func:`split_halves`); ``--half`` replays one half or both (``all``, each result tagged with its
half).

For each configuration and conversation it keeps the billed usage and dollars (from the
emulator's ``usage``), the per-stage savings from the pipeline's records, the requests the emulator
rejected, fact retention (see :mod:`tokensaver.bench_facts`) and what the lost facts cost: each
tool result a used fact was lost from is priced once as the round the agent makes to get it back
(:func:`lost_round_usd`), and the saving against automatic caching is also given net of it. Overhead (pipeline time per call
at ~10k/50k/200k tokens, and the peak memory of a replay) is in :mod:`tokensaver.bench_overhead`.
Renderings (table, Markdown, self-contained HTML with inline SVG, JSON) are in
:mod:`tokensaver.bench_render`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .emulator import Emulator
from .errors import TokensaverError
from .traces import (
    FORMAT,
    Conversation,
    TraceCall,
    fixtures_dir,
    iter_trace_files,
    load_conversation,
    shared_traces_dir,
)

SCHEMA = "tokensaver-bench/1"
BUILTIN_PLUGINS = ("summarize", "prune", "memoize", "cache_align")
DEFAULT_CONFIGS = (
    "none",
    "auto",
    "summarize",
    "prune",
    "cache_align",
    "memoize",
    "defaults",
    "all",
    "headroom",
)
QUICK_LIMIT_CALLS = 6
QUICK_SIZES = (10_000, 50_000)
SCOPES = ("source", "conversation")
DEFAULT_GAP_SECONDS = 30.0
HALVES = ("tuning", "validation", "all")
SPLIT_RULE = (
    "split by conversation, per source folder: the source's conversation files sorted by the sha256 of "
    "the file name's stem (no directory, no extension); positions 0, 2, 4, ... are the tuning half, "
    "1, 3, 5, ... the validation half"
)
LOST_READS = 20  # later calls that read a fetched-again result, at most
USAGE_KEYS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens")


# -- configurations -------------------------------------------------------------------------------


@dataclass
class ConfigSpec:
    """One configuration of the bench (picklable: sent to worker processes)."""

    name: str
    label: str
    kind: str  # "baseline" | "tokensaver" | "headroom"
    auto_cache: bool = False
    config: dict[str, Any] | None = None
    memo: bool = False
    note: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": self.label,
            "kind": self.kind,
            "auto_cache": self.auto_cache,
            "config": self.config,
            "note": self.note,
        }


def installed_plugins() -> list[str]:
    from .plugins import get_plugin_manager, installed

    return list(installed(get_plugin_manager()))


def _read_config_file(path: Path) -> dict[str, Any]:
    import tomllib

    from .config import _unwrap

    try:
        with path.open("rb") as fh:
            table = _unwrap(tomllib.load(fh))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TokensaverError(f"cannot read config file {path}: {exc}") from exc
    return dict(table)


def build_specs(names: list[str], plugins: list[str]) -> list[ConfigSpec]:
    """ConfigSpecs for configuration names (see module doc) and TOML config file paths."""
    specs: list[ConfigSpec] = []
    for name in names:
        if name == "none":
            specs.append(ConfigSpec("none", "no tokensaver, no caching", "baseline"))
        elif name == "auto":
            specs.append(ConfigSpec("auto", "API automatic caching alone", "baseline", auto_cache=True))
        elif name in BUILTIN_PLUGINS:
            if name not in plugins:
                continue
            specs.append(
                ConfigSpec(
                    name,
                    f"{name} alone",
                    "tokensaver",
                    config={"plugins": [name], "record": False},
                    memo=name == "memoize",
                    note=None if name == "cache_align" else "no cache_control at all (plugin alone)",
                )
            )
        elif name == "defaults":
            specs.append(
                ConfigSpec("defaults", "tokensaver defaults", "tokensaver", config={"record": False})
            )
        elif name == "all":
            enabled = [p for p in BUILTIN_PLUGINS if p in plugins]
            specs.append(
                ConfigSpec(
                    "all",
                    "all plugins (" + ", ".join(enabled) + ")",
                    "tokensaver",
                    config={"plugins": enabled, "record": False},
                    memo="memoize" in enabled,
                )
            )
        elif name == "headroom":
            specs.append(ConfigSpec("headroom", "headroom-ai compress + automatic caching", "headroom"))
        elif name.endswith(".toml") or Path(name).is_file():
            path = Path(name)
            if not path.is_file():
                raise TokensaverError(f"config file does not exist: {path}")
            table = _read_config_file(path)
            table["record"] = False
            wanted = table.get("plugins")
            memo = "memoize" in (wanted if isinstance(wanted, list) else [])
            specs.append(ConfigSpec(path.stem, f"config {path.name}", "tokensaver", config=table, memo=memo))
        else:
            raise TokensaverError(
                f"unknown configuration {name!r}; accepted: {', '.join(DEFAULT_CONFIGS)} or a TOML file"
            )
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise TokensaverError(f"configuration {s.name!r} given twice")
        seen.add(s.name)
    return specs


# -- conversations --------------------------------------------------------------------------------


@dataclass
class TraceRef:
    """A trace file to replay (the conversation is loaded in the process that replays it)."""

    path: str
    source: str
    size: int
    half: str | None = None  # "tuning" | "validation" (see split_halves)


def _split_key(path: str | Path) -> tuple[str, str]:
    stem = Path(path).stem
    return hashlib.sha256(stem.encode("utf-8")).hexdigest(), stem


def split_halves(paths: list[Any]) -> dict[str, list[Any]]:
    """The fixed tuning / validation split of conversation files (see ``SPLIT_RULE``).

    Per source (the file's folder, :func:`source_name`), the files are sorted by the sha256 of
    their name's stem; even positions (0, 2, 4, ...) are ``tuning``, odd ones ``validation``. The
    items of ``paths`` (str or Path) are returned as given, in that order.
    """
    by_source: dict[str, list[Any]] = {}
    for p in paths:
        by_source.setdefault(source_name(Path(p)), []).append(p)
    out: dict[str, list[Any]] = {"tuning": [], "validation": []}
    for src in sorted(by_source):
        for i, p in enumerate(sorted(by_source[src], key=_split_key)):
            out["tuning" if i % 2 == 0 else "validation"].append(p)
    return out


def split_counts(refs: list[TraceRef]) -> dict[str, dict[str, int]]:
    """Conversation files per source and half."""
    out: dict[str, dict[str, int]] = {}
    for r in refs:
        row = out.setdefault(r.source, {"tuning": 0, "validation": 0})
        row[r.half or "tuning"] += 1
    return dict(sorted(out.items()))


def _is_conversation_file(path: Path, data: bytes) -> bool:
    """A ``.jsonl`` file, or JSON in the conversation format (not e.g. a folder's SOURCES.json)."""
    if path.suffix != ".json":
        return True
    if FORMAT.encode() in data[:4096]:
        return True
    import json

    try:
        obj = json.loads(data)
    except ValueError:
        return True  # let load_conversation say what is wrong with it
    return not isinstance(obj, dict) or obj.get("format") == FORMAT or "segments" in obj


def source_name(path: Path) -> str:
    """The source of a trace: its folder's name (claude-code-spotter, tau-bench, ...)."""
    return path.parent.name or "traces"


def default_trace_dirs() -> list[Path]:
    dirs = [d for d in (fixtures_dir(), shared_traces_dir()) if d is not None]
    if not dirs:
        raise TokensaverError("no traces given and no fixtures/ or ../shared/traces folder found")
    return dirs


def find_traces(paths: list[str | Path], sources: list[str] | None = None) -> tuple[list[TraceRef], int]:
    """Trace files under ``paths``, identical files once (fixtures are copies of shared traces)."""
    seen: set[str] = set()
    refs: list[TraceRef] = []
    dupes = 0
    for f in iter_trace_files(list(paths)):
        if f.name.lower().startswith("readme"):
            continue
        data = f.read_bytes()
        if not _is_conversation_file(f, data):
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            dupes += 1
            continue
        seen.add(digest)
        src = source_name(f)
        if sources and src not in sources:
            continue
        refs.append(TraceRef(str(f), src, len(data)))
    halves = split_halves([r.path for r in refs])
    half_of = {p: h for h in halves for p in halves[h]}
    for r in refs:
        r.half = half_of[r.path]
    return refs, dupes


def load_ref(ref: TraceRef, limit_calls: int | None = None) -> Conversation:
    conv = load_conversation(ref.path)
    conv.source = ref.source
    if ref.half:
        conv.info["bench_half"] = ref.half
    if limit_calls:
        conv.calls = conv.calls[:limit_calls]
    return conv


# -- replaying conversations under every configuration ------------------------------------------

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


def _emulator() -> BenchEmulator:
    emu: BenchEmulator | None = _WORKER.get("emulator")
    if emu is None:
        emu = _WORKER["emulator"] = BenchEmulator(virtual_clock=True)
        emu.start()
    return emu


def _headroom() -> tuple[Any, str | None]:
    if "headroom" not in _WORKER:
        from .bench_headroom import make_prepare

        _WORKER["headroom"] = make_prepare()
    prep, why = _WORKER["headroom"]
    return prep, why


def close_worker() -> None:
    emu = _WORKER.pop("emulator", None)
    if emu is not None:
        emu.stop()


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))
    return round(s[k], 3)


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
    from .replay import DEFAULT_GAP

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
    info: Any, prefix_tokens: int, result_tokens: int, calls_left: int, reads: int = LOST_READS
) -> float:
    """What a lost tool result costs: the round the agent makes to get it back.

    One more call that reads the whole cached prefix of the call where the fact was needed
    (``cache_read`` x ``prefix_tokens``), the result written to the cache again (``cache_write_5m``
    x ``result_tokens``), and read again on the next calls (``cache_read`` x ``result_tokens`` x
    min(``reads``, ``calls_left``)). ``info`` is the model's :class:`tokensaver.pricing.ModelInfo`.
    """
    from .pricing import PER

    later = min(reads, max(0, calls_left))
    return (
        info.cache_read * prefix_tokens
        + info.cache_write_5m * result_tokens
        + info.cache_read * result_tokens * later
    ) / PER


def _replay_one(
    conv: Conversation,
    spec: ConfigSpec,
    emu: BenchEmulator,
    used: list[frozenset[str]],
    memo_dir: str | None,
    tick: Callable[[int], None] | None,
) -> dict[str, Any]:
    """Replay ``conv`` under ``spec`` on ``emu`` (reset by ``replay`` unless ``emu.keep_cache``)."""
    from .bench_facts import FactTracker
    from .pricing import PriceTable
    from .replay import auto_cache, replay
    from .tokens import default_counter

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
    from .bench_facts import FactTracker

    tracker = FactTracker()
    return [tracker.used(c.body, c.reply) for c in conv.calls]


def replay_conversation(
    conv: Conversation,
    specs: list[ConfigSpec],
    tick: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """``conversation`` scope: replay ``conv`` alone (cold cache, empty memo) under each spec.

    One result dict per spec (schema: see ``bench_render``).
    """
    emu = _emulator()
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
    emu = _emulator()
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


def measure_proxy(opts: BenchOptions) -> list[dict[str, Any]]:
    """The time ``tokensaver proxy`` adds per call, JSON and streamed, next to the pipeline's own."""
    try:
        from .proxy import measure_proxy_overhead
    except ImportError as exc:  # the proxy's server stack is missing
        return [{"error": f"proxy unavailable: {exc}"}]
    sizes = (2_000,) if opts.quick else (2_000, 10_000)
    out = []
    for size in sizes:
        for stream in (False, True):
            try:
                row = measure_proxy_overhead(
                    n_calls=max(5, opts.overhead_reps), size_tokens=size, stream=stream
                )
            except Exception as exc:  # a measurement must not sink the whole bench
                row = {
                    "error": f"proxy overhead ({size} tokens, stream={stream}): {type(exc).__name__}: {exc}"
                }
            out.append(row)
    return out


def _worker_task(ref: TraceRef, limit_calls: int | None, specs: list[ConfigSpec]) -> list[dict[str, Any]]:
    return replay_conversation(load_ref(ref, limit_calls), specs)


def _worker_source_task(
    refs: list[TraceRef], limit_calls: int | None, spec: ConfigSpec, gap_seconds: float
) -> list[dict[str, Any]]:
    return replay_source([load_ref(r, limit_calls) for r in refs], [spec], gap_seconds)


def _worker_init(env: dict[str, str]) -> None:
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


# -- the whole bench ------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        mem_gb = round(pages / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    commit = None
    try:
        import subprocess

        commit = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                cwd=Path(__file__).resolve().parent.parent,
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            or None
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=Path(__file__).resolve().parent.parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        if commit and dirty:
            commit += " + uncommitted changes"
    except Exception:
        pass
    from . import __version__ as ts_version

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": mem_gb,
        "os": platform.platform(),
        "python": platform.python_version(),
        "tokensaver": ts_version,
        "commit": commit,
    }


@dataclass
class BenchOptions:
    traces: list[str] = field(default_factory=list)
    configs: list[str] = field(default_factory=lambda: list(DEFAULT_CONFIGS))
    sources: list[str] | None = None
    limit_calls: int | None = None
    limit_conversations: int | None = None
    per_source: int | None = None
    jobs: int = 1
    quick: bool = False
    overhead: bool = True
    overhead_reps: int = 20
    memory: bool = True
    progress: bool = True
    scope: str = "source"
    gap_seconds: float = DEFAULT_GAP_SECONDS
    half: str = "all"


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    """Run the bench; the JSON-able result every rendering is made from."""
    from .bench_headroom import available as headroom_available
    from .bench_headroom import offline_env
    from .bench_headroom import version as headroom_version
    from .bench_render import aggregate

    started = time.time()
    t0 = time.perf_counter()
    machine = machine_info()  # before the replays: the commit measured is the one at the start
    if opts.quick:
        if opts.limit_calls is None:
            opts.limit_calls = QUICK_LIMIT_CALLS
        opts.overhead_reps = min(opts.overhead_reps, 5)
    paths: list[str | Path] = list(opts.traces) if opts.traces else []
    if not paths:
        fx = fixtures_dir()
        paths = [fx] if opts.quick and fx is not None else list(default_trace_dirs())
    if opts.half not in HALVES:
        raise TokensaverError(f"unknown half {opts.half!r}; accepted: {', '.join(HALVES)}")
    refs, dupes = find_traces(paths, opts.sources)
    split = {"rule": SPLIT_RULE, "counts": split_counts(refs)}  # of every file found, before limits
    if opts.half != "all":
        refs = [r for r in refs if r.half == opts.half]
    refs.sort(key=lambda r: (r.source, r.path))
    if opts.per_source:
        taken: dict[str, int] = {}
        keep = []
        for r in refs:
            taken[r.source] = taken.get(r.source, 0) + 1
            if taken[r.source] <= opts.per_source:
                keep.append(r)
        refs = keep
    if opts.limit_conversations:
        refs = refs[: opts.limit_conversations]
    if not refs:
        raise TokensaverError("no conversations to replay (check the paths and --sources)")
    if opts.scope not in SCOPES:
        raise TokensaverError(f"unknown cache scope {opts.scope!r}; accepted: {', '.join(SCOPES)}")
    if opts.gap_seconds < 0:
        raise TokensaverError("--gap-seconds must not be negative")
    by_source: dict[str, list[TraceRef]] = {}
    for r in refs:
        by_source.setdefault(r.source, []).append(r)
    plugins = installed_plugins()
    names = list(opts.configs)
    headroom_note = None
    if "headroom" in names and not headroom_available():
        headroom_note = "headroom-ai is not installed: pip install 'tokensaver[bench]' to compare with it"
        names.remove("headroom")
    specs = build_specs(names, plugins)

    # headroom reads its environment when it runs: set it for this process and the workers
    env = offline_env() if any(s.kind == "headroom" for s in specs) else {}
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        convs_meta: list[dict[str, Any]] = []
        results: list[dict[str, Any]] = []
        order = {r.path: i for i, r in enumerate(refs)}
        if opts.jobs > 1 and (len(refs) > 1 or (opts.scope == "source" and len(specs) > 1)):
            # calls are unknown until a file is read: count them here (cheap next to a replay)
            counts = {r.path: len(load_ref(r, opts.limit_calls).calls) for r in refs}
            bar = Progress(sum(counts.values()) * len(specs), enabled=opts.progress)
            import multiprocessing

            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(
                opts.jobs, mp_context=ctx, initializer=_worker_init, initargs=(env,)
            ) as pool:
                futures: dict[Any, int] = {}
                if opts.scope == "source":
                    # units of work: (source x configuration), the biggest first
                    units = sorted(
                        ((group, spec) for group in by_source.values() for spec in specs),
                        key=lambda u: -sum(r.size for r in u[0]),
                    )
                    for group, spec in units:
                        fut = pool.submit(
                            _worker_source_task, group, opts.limit_calls, spec, opts.gap_seconds
                        )
                        futures[fut] = sum(counts[r.path] for r in group)
                else:
                    for r in sorted(refs, key=lambda r: -r.size):
                        futures[pool.submit(_worker_task, r, opts.limit_calls, specs)] = counts[r.path] * len(
                            specs
                        )
                for fut in as_completed(futures):
                    results.extend(fut.result())
                    bar.update(futures[fut])
            bar.close()
            for r in refs:
                convs_meta.append(
                    {
                        "id": Path(r.path).stem,
                        "source": r.source,
                        "path": r.path,
                        "calls": counts[r.path],
                        "half": r.half,
                    }
                )
        else:
            convs = [load_ref(r, opts.limit_calls) for r in refs]
            bar = Progress(sum(len(c.calls) for c in convs) * len(specs), enabled=opts.progress)
            try:
                if opts.scope == "source":
                    for group in by_source.values():
                        group_convs = [convs[order[r.path]] for r in group]
                        results.extend(replay_source(group_convs, specs, opts.gap_seconds, tick=bar.update))
                else:
                    for conv in convs:
                        results.extend(replay_conversation(conv, specs, tick=bar.update))
            finally:
                bar.close()
            for conv, ref in zip(convs, refs, strict=True):
                convs_meta.append(
                    {
                        "id": conv.id,
                        "source": conv.source,
                        "path": ref.path,
                        "calls": len(conv.calls),
                        "half": ref.half,
                    }
                )
        # one order whatever the jobs: by configuration, then conversation as listed
        spec_order = {s.name: i for i, s in enumerate(specs)}
        conv_order = {(m["source"], m["id"]): i for i, m in enumerate(convs_meta)}
        results.sort(
            key=lambda r: (
                spec_order.get(r["config"], 0),
                conv_order.get((r["source"], r["conversation"]), 0),
            )
        )
        replay_seconds = time.perf_counter() - t0

        overhead: list[dict[str, Any]] = []
        proxy_overhead: list[dict[str, Any]] = []
        memory: dict[str, Any] = {}
        if opts.overhead or opts.memory:
            sample = [load_ref(r, None) for r in refs[:50]]
            if opts.overhead:
                from .bench_overhead import SIZES, measure_overhead

                sizes = QUICK_SIZES if opts.quick else SIZES
                try:
                    overhead = measure_overhead(sample, sizes=sizes, reps=opts.overhead_reps)
                except ValueError as exc:
                    overhead = [{"error": str(exc)}]
                proxy_overhead = measure_proxy(opts)
            if opts.memory:
                memory = measure_memory(sample, opts.limit_calls)
        headroom: dict[str, Any] = {"available": headroom_available(), "version": headroom_version()}
        hr_rows = [r for r in results if r["config"] == "headroom"]
        if headroom_note:
            headroom["note"] = headroom_note
        elif hr_rows and all(r.get("skipped") for r in hr_rows):
            headroom["note"] = hr_rows[0]["skipped"]
        elif hr_rows:
            headroom["note"] = "ran offline: HEADROOM_OFFLINE=1, HEADROOM_BEACON=off, temporary workspace"
            headroom["env"] = sorted(env)
    finally:
        close_worker()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    data: dict[str, Any] = {
        "schema": SCHEMA,
        "started": started,
        "duration_s": round(time.perf_counter() - t0, 1),
        "replay_s": round(replay_seconds, 1),
        "scope": opts.scope,
        "scope_note": scope_note(opts.scope, opts.gap_seconds),
        "half": opts.half,
        "split": split,
        "machine": machine,
        "options": {
            "traces": [str(p) for p in paths],
            "configs": [s.name for s in specs],
            "sources": opts.sources,
            "limit_calls": opts.limit_calls,
            "limit_conversations": opts.limit_conversations,
            "per_source": opts.per_source,
            "jobs": opts.jobs,
            "quick": opts.quick,
            "cache_scope": opts.scope,
            "gap_seconds": opts.gap_seconds,
            "half": opts.half,
            "duplicates_skipped": dupes,
        },
        "configs": [s.as_dict() for s in specs],
        "conversations": convs_meta,
        "results": results,
        "overhead": overhead,
        "proxy_overhead": proxy_overhead,
        "memory": memory,
        "headroom": headroom,
    }
    data.update(aggregate(data))
    return data


def scope_note(scope: str, gap_seconds: float = DEFAULT_GAP_SECONDS) -> str:
    """One sentence on what the cache scope means (said in every rendering)."""
    if scope == "source":
        return (
            "Cache scope 'source': the conversations of each source are replayed back to back, per "
            "configuration, on one prompt cache that is not reset between them (and one memoize store), on "
            "a continuous clock (recorded times kept, shifted forward only where they would go back; "
            f"conversations without times start {gap_seconds:g} s after the previous one's last call), as a "
            "deployment sending them one after another is billed: a breakpoint at the end of tools + system "
            "lets a new conversation read that prefix."
        )
    return (
        "Cache scope 'conversation': each conversation is replayed alone from a cold prompt cache (and an "
        "empty memoize store), so nothing is shared between conversations."
    )


def measure_memory(conversations: list[Conversation], limit_calls: int | None) -> dict[str, Any]:
    """Peak Python heap of replaying the longest conversation, with and without the default plugins."""
    from .bench_overhead import peak_memory
    from .replay import auto_cache, replay

    if not conversations:
        return {}
    conv = max(conversations, key=lambda c: len(c.calls))
    if limit_calls:
        conv = Conversation(conv.id, conv.source, conv.calls[:limit_calls], conv.info)
    emu = _emulator()
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


# -- CLI ------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``tokensaver bench``."""
    parser.add_argument(
        "traces", nargs="*", help="trace files or folders (default: fixtures/ and ../shared/traces)"
    )
    parser.add_argument(
        "--configs",
        help="comma-separated configurations: none, auto, summarize, prune, cache_align, memoize, "
        "defaults, all, headroom, or TOML config files (default: all of them)",
    )
    parser.add_argument("--format", "-f", choices=["table", "md", "html", "json"], default="table")
    parser.add_argument("-o", "--output", metavar="FILE", help="write the report to FILE")
    parser.add_argument(
        "--quick", action="store_true", help="a small subset in well under a minute (CI smoke)"
    )
    parser.add_argument(
        "--jobs",
        "-j",
        type=int,
        default=1,
        help="replay in N processes (units: conversations; in source scope, source x configuration)",
    )
    parser.add_argument("--sources", help="comma-separated trace folders to keep (e.g. tau-bench,swe-agent)")
    parser.add_argument("--limit-calls", type=int, help="replay at most N calls of each conversation")
    parser.add_argument("--limit-conversations", type=int, help="replay at most N conversations")
    parser.add_argument("--per-source", type=int, help="replay the first N conversations of each source")
    parser.add_argument("--no-overhead", action="store_true", help="skip the pipeline timing")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory replay")
    parser.add_argument("--reps", type=int, default=20, help="timed calls per request size (default 20)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    parser.add_argument(
        "--half",
        choices=list(HALVES),
        default="all",
        help="replay the tuning or the validation half of every source, or all (default; results "
        "tagged with their half): " + SPLIT_RULE,
    )
    parser.add_argument(
        "--cache-scope",
        "--scope",
        dest="cache_scope",
        choices=list(SCOPES),
        default="source",
        help="source (default): the conversations of a source share one prompt cache, replayed back to "
        "back per configuration; conversation: each conversation alone from a cold cache",
    )
    parser.add_argument(
        "--gap-seconds",
        type=float,
        default=DEFAULT_GAP_SECONDS,
        help="source scope: seconds between a conversation without recorded times and the previous "
        f"one's last call (default {DEFAULT_GAP_SECONDS:g})",
    )


def _split(value: str | None) -> list[str] | None:
    if not value:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def run(args: argparse.Namespace) -> int:
    """``tokensaver bench``: exit 0, or 1 when the emulator rejected a request."""
    from .bench_render import render

    if args.jobs < 1:
        raise TokensaverError("--jobs must be at least 1")
    opts = BenchOptions(
        traces=list(args.traces or []),
        configs=_split(args.configs) or list(DEFAULT_CONFIGS),
        sources=_split(args.sources),
        limit_calls=args.limit_calls,
        limit_conversations=args.limit_conversations,
        per_source=args.per_source,
        jobs=args.jobs,
        quick=args.quick,
        overhead=not args.no_overhead,
        overhead_reps=max(1, args.reps),
        memory=not args.no_memory,
        progress=not args.quiet,
        scope=args.cache_scope,
        gap_seconds=args.gap_seconds,
        half=args.half,
    )
    data = run_bench(opts)
    text = render(data, args.format)
    from .cli import write_output

    write_output(text, args.output, f"{args.format} bench report")
    rejected = sum(int(r.get("rejected") or 0) for r in data["results"])
    if rejected:
        print(f"tokensaver bench: the emulator rejected {rejected} request(s)", file=sys.stderr)
        return 1
    return 0


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None
