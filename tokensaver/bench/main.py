"""``tokensaver bench`` as a whole: :func:`run_bench` (options in :class:`BenchOptions`) and its command line."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__ as ts_version
from ..cli import write_output
from ..errors import TokensaverError
from ..traces import fixtures_dir
from . import headroom
from . import specs as bench_specs
from .aggregate import aggregate
from .corpus import (
    HALVES,
    READ_FORM_RULE,
    READ_FORMS,
    SPLIT_RULE,
    TraceRef,
    default_trace_dirs,
    find_traces,
    load_ref,
    split_counts,
)
from .load import LoadOptions, measure_load
from .overhead import SIZES, measure_memory, measure_overhead, measure_proxy
from .render import render
from .runner import (
    Progress,
    close_worker,
    replay_conversation,
    replay_source,
    worker_init,
    worker_source_task,
    worker_task,
)

SCHEMA = "tokensaver-bench/1"
QUICK_LIMIT_CALLS = 6
QUICK_SIZES = (10_000, 50_000)


def _git(*args: str) -> str:
    """What ``git args`` prints in tokensaver's checkout (stripped)."""
    done = subprocess.run(
        ["git", *args], cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=5
    )
    return done.stdout.strip()


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
        commit = _git("rev-parse", "--short", "HEAD") or None
        if commit and _git("status", "--porcelain", "--untracked-files=no"):
            commit += " + uncommitted changes"
    except Exception:
        pass
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
    configs: list[str] = field(default_factory=lambda: list(bench_specs.DEFAULT_CONFIGS))
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
    gap_seconds: float = bench_specs.DEFAULT_GAP_SECONDS
    half: str = "all"
    model: str | None = None  # --as-model
    read_form: str = "recorded"  # --read-form


def _select(opts: BenchOptions) -> tuple[list[str | Path], list[TraceRef], Any, dict[str, Any]]:
    """The trace paths, the conversations to replay (sorted, limited), the duplicates skipped, the split."""
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
    if opts.read_form not in READ_FORMS:
        raise TokensaverError(f"unknown read form {opts.read_form!r}; accepted: {', '.join(READ_FORMS)}")
    for r in refs:
        r.model = opts.model
        r.read_form = opts.read_form
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
    if opts.scope not in bench_specs.SCOPES:
        raise TokensaverError(
            f"unknown cache scope {opts.scope!r}; accepted: {', '.join(bench_specs.SCOPES)}"
        )
    if opts.gap_seconds < 0:
        raise TokensaverError("--gap-seconds must not be negative")
    return paths, refs, dupes, split


def _conv_meta(conv_id: str, source: str, ref: TraceRef, calls: int) -> dict[str, Any]:
    return {"id": conv_id, "source": source, "path": ref.path, "calls": calls, "half": ref.half}


def _replay_in_workers(
    opts: BenchOptions,
    refs: list[TraceRef],
    by_source: dict[str, list[TraceRef]],
    specs: list[bench_specs.ConfigSpec],
    env: dict[str, str],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Replay in ``opts.jobs`` processes: the results and the conversations' metadata."""
    results: list[dict[str, Any]] = []
    # calls are unknown until a file is read: count them here (cheap next to a replay)
    counts = {r.path: len(load_ref(r, opts.limit_calls).calls) for r in refs}
    bar = Progress(sum(counts.values()) * len(specs), enabled=opts.progress)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(opts.jobs, mp_context=ctx, initializer=worker_init, initargs=(env,)) as pool:
        futures: dict[Any, int] = {}
        if opts.scope == "source":
            # units of work: (source x configuration), the biggest first
            units = sorted(
                ((group, spec) for group in by_source.values() for spec in specs),
                key=lambda u: -sum(r.size for r in u[0]),
            )
            for group, spec in units:
                fut = pool.submit(worker_source_task, group, opts.limit_calls, spec, opts.gap_seconds)
                futures[fut] = sum(counts[r.path] for r in group)
        else:
            for r in sorted(refs, key=lambda r: -r.size):
                futures[pool.submit(worker_task, r, opts.limit_calls, specs)] = counts[r.path] * len(specs)
        for fut in as_completed(futures):
            results.extend(fut.result())
            bar.update(futures[fut])
    bar.close()
    return results, [_conv_meta(Path(r.path).stem, r.source, r, counts[r.path]) for r in refs]


def _replay_here(
    opts: BenchOptions,
    refs: list[TraceRef],
    by_source: dict[str, list[TraceRef]],
    specs: list[bench_specs.ConfigSpec],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Replay in this process: the results and the conversations' metadata."""
    results: list[dict[str, Any]] = []
    order = {r.path: i for i, r in enumerate(refs)}
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
    meta = [_conv_meta(c.id, c.source, r, len(c.calls)) for c, r in zip(convs, refs, strict=True)]
    return results, meta


def _measure(
    opts: BenchOptions, refs: list[TraceRef]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """The overhead (wrap, proxy) and memory measurements, on up to 50 conversations."""
    overhead: list[dict[str, Any]] = []
    proxy_overhead: list[dict[str, Any]] = []
    memory: dict[str, Any] = {}
    if opts.overhead or opts.memory:
        sample = [load_ref(r, None) for r in refs[:50]]
        if opts.overhead:
            sizes = QUICK_SIZES if opts.quick else SIZES
            try:
                overhead = measure_overhead(sample, sizes=sizes, reps=opts.overhead_reps)
            except ValueError as exc:
                overhead = [{"error": str(exc)}]
            proxy_overhead = measure_proxy(opts.quick, opts.overhead_reps, sample)
        if opts.memory:
            memory = measure_memory(sample, opts.limit_calls)
    return overhead, proxy_overhead, memory


def _headroom_info(results: list[dict[str, Any]], note: str | None, env: dict[str, str]) -> dict[str, Any]:
    """Whether headroom ran, its version, and how (or why not)."""
    info: dict[str, Any] = {"available": headroom.available(), "version": headroom.version()}
    hr_rows = [r for r in results if r["config"] == "headroom"]
    if note:
        info["note"] = note
    elif hr_rows and all(r.get("skipped") for r in hr_rows):
        info["note"] = hr_rows[0]["skipped"]
    elif hr_rows:
        info["note"] = "ran offline: HEADROOM_OFFLINE=1, HEADROOM_BEACON=off, temporary workspace"
        info["env"] = sorted(env)
    return info


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    """Run the bench; the JSON-able result every rendering is made from."""
    started = time.time()
    t0 = time.perf_counter()
    machine = machine_info()  # before the replays: the commit measured is the one at the start
    paths, refs, dupes, split = _select(opts)
    by_source: dict[str, list[TraceRef]] = {}
    for r in refs:
        by_source.setdefault(r.source, []).append(r)
    plugins = bench_specs.installed_plugins()
    names = list(opts.configs)
    headroom_note = None
    if "headroom" in names and not headroom.available():
        headroom_note = "headroom-ai is not installed: pip install 'tokensaver[bench]' to compare with it"
        names.remove("headroom")
    specs = bench_specs.build_specs(names, plugins)

    # headroom reads its environment when it runs: set it for this process and the workers
    env = headroom.offline_env() if any(s.kind == "headroom" for s in specs) else {}
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        if opts.jobs > 1 and (len(refs) > 1 or (opts.scope == "source" and len(specs) > 1)):
            results, convs_meta = _replay_in_workers(opts, refs, by_source, specs, env)
        else:
            results, convs_meta = _replay_here(opts, refs, by_source, specs)
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
        overhead, proxy_overhead, memory = _measure(opts, refs)
        headroom_info = _headroom_info(results, headroom_note, env)
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
        "scope_note": bench_specs.scope_note(opts.scope, opts.gap_seconds),
        "half": opts.half,
        "as_model": opts.model,
        "read_form": opts.read_form,
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
            "as_model": opts.model,
            "read_form": opts.read_form,
            "duplicates_skipped": dupes,
        },
        "configs": [s.as_dict() for s in specs],
        "conversations": convs_meta,
        "results": results,
        "overhead": overhead,
        "proxy_overhead": proxy_overhead,
        "memory": memory,
        "headroom": headroom_info,
    }
    data.update(aggregate(data))
    return data


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
        "--as-model",
        default=None,
        metavar="MODEL",
        help="replay every call as if sent to MODEL (priced and checked as that model; e.g. "
        "claude-opus-5-5, whose preserved thinking binds each thinking block to what came before it)",
    )
    parser.add_argument(
        "--read-form",
        choices=list(READ_FORMS),
        default="recorded",
        help="recorded (default): tool results as the traces hold them; " + READ_FORM_RULE,
    )
    parser.add_argument(
        "--cache-scope",
        "--scope",
        dest="cache_scope",
        choices=list(bench_specs.SCOPES),
        default="source",
        help="source (default): the conversations of a source share one prompt cache, replayed back to "
        "back per configuration; conversation: each conversation alone from a cold cache",
    )
    parser.add_argument(
        "--gap-seconds",
        type=float,
        default=bench_specs.DEFAULT_GAP_SECONDS,
        help="source scope: seconds between a conversation without recorded times and the previous "
        f"one's last call (default {bench_specs.DEFAULT_GAP_SECONDS:g})",
    )
    load = parser.add_argument_group("load test (tokensaver.bench.load; replaces the replays)")
    load.add_argument(
        "--load",
        action="store_true",
        help="only the load test: requests/s and added latency of 1 proxy and of 3 behind round-robin, "
        "Redis state, a canned upstream",
    )
    load.add_argument("--load-requests", type=int, default=240, help="requests per setup (default 240)")
    load.add_argument("--load-clients", type=int, default=8, help="concurrent clients (default 8)")
    load.add_argument(
        "--load-seconds", type=float, default=300.0, help="time limit per setup (default 300 s)"
    )
    load.add_argument(
        "--load-redis", metavar="URL", help="redis:// URL (default: a redis-server started here)"
    )


def _split(value: str | None) -> list[str] | None:
    if not value:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def run_load(opts: BenchOptions, load: LoadOptions) -> dict[str, Any]:
    """``tokensaver bench --load``: the load test alone (no replays), on synthetic requests from the traces."""
    started = time.time()
    t0 = time.perf_counter()
    machine = machine_info()
    paths, refs, _, _ = _select(opts)
    sample = [load_ref(r, None) for r in refs[:50]]
    result = measure_load(sample, load, progress=None if not opts.progress else _stderr)
    return {
        "schema": SCHEMA,
        "started": started,
        "duration_s": round(time.perf_counter() - t0, 1),
        "machine": machine,
        "options": {"traces": [str(p) for p in paths], "sources": opts.sources},
        "load": result,
    }


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def _run_load(args: argparse.Namespace) -> int:
    if args.load_requests < 1 or args.load_clients < 1 or args.load_seconds <= 0:
        raise TokensaverError(
            "--load-requests and --load-clients must be at least 1, --load-seconds positive"
        )
    opts = BenchOptions(
        traces=list(args.traces or []), sources=_split(args.sources), half=args.half, progress=not args.quiet
    )
    load = LoadOptions(
        requests=args.load_requests,
        clients=args.load_clients,
        time_limit=args.load_seconds,
        redis_url=args.load_redis,
    )
    data = run_load(opts, load)
    write_output(render(data, args.format), args.output, f"{args.format} bench load report")
    unanswered = sum(r["requests"] - r["answered"] for r in data["load"]["rows"])
    if unanswered:
        print(f"tokensaver bench --load: {unanswered} request(s) not answered", file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    """``tokensaver bench``: exit 0, or 1 when the emulator rejected a request."""
    if args.jobs < 1:
        raise TokensaverError("--jobs must be at least 1")
    if getattr(args, "load", False):
        return _run_load(args)
    opts = BenchOptions(
        traces=list(args.traces or []),
        configs=_split(args.configs) or list(bench_specs.DEFAULT_CONFIGS),
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
        model=args.as_model,
        read_form=args.read_form,
    )
    data = run_bench(opts)
    text = render(data, args.format)
    write_output(text, args.output, f"{args.format} bench report")
    rejected = sum(int(r.get("rejected") or 0) for r in data["results"])
    if rejected:
        print(f"tokensaver bench: the emulator rejected {rejected} request(s)", file=sys.stderr)
        return 1
    return 0
