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
rejected, fact retention (see :mod:`tokensaver.bench.facts`) and what the lost facts cost: each
tool result a used fact was lost from is priced once as the round the agent makes to get it back
(:func:`lost_round_usd`), and the saving against automatic caching is also given net of it.

The package, one module per seam:

* :mod:`~tokensaver.bench.specs`: the configurations (:func:`build_specs`) and cache scopes;
* :mod:`~tokensaver.bench.corpus`: the trace files, deduplicated and split in halves;
* :mod:`~tokensaver.bench.runner`: replaying them (one process or several);
* :mod:`~tokensaver.bench.facts`: fact retention; :mod:`~tokensaver.bench.headroom`: the headroom-ai
  comparison;
* :mod:`~tokensaver.bench.overhead`: pipeline time per call at ~10k/50k/200k tokens, the proxy's
  added time, the peak memory of a replay;
* :mod:`~tokensaver.bench.aggregate` and :mod:`~tokensaver.bench.render`: totals, and the renderings
  (table, Markdown, self-contained HTML with inline SVG, JSON);
* :mod:`~tokensaver.bench.main`: :func:`run_bench` and the command line.
"""

from __future__ import annotations

from .aggregate import aggregate
from .corpus import (
    HALVES,
    SPLIT_RULE,
    TraceRef,
    default_trace_dirs,
    find_traces,
    load_ref,
    source_name,
    split_counts,
    split_halves,
)
from .main import SCHEMA, BenchOptions, add_arguments, machine_info, run, run_bench
from .render import render
from .runner import (
    LOST_READS,
    BenchEmulator,
    Progress,
    close_worker,
    lost_round_usd,
    replay_conversation,
    replay_source,
    sequence_conversations,
)
from .specs import (
    BUILTIN_PLUGINS,
    DEFAULT_CONFIGS,
    DEFAULT_GAP_SECONDS,
    SCOPES,
    ConfigSpec,
    build_specs,
    installed_plugins,
    scope_note,
)

__all__ = [
    "BUILTIN_PLUGINS",
    "DEFAULT_CONFIGS",
    "DEFAULT_GAP_SECONDS",
    "HALVES",
    "LOST_READS",
    "SCHEMA",
    "SCOPES",
    "SPLIT_RULE",
    "BenchEmulator",
    "BenchOptions",
    "ConfigSpec",
    "Progress",
    "TraceRef",
    "add_arguments",
    "aggregate",
    "build_specs",
    "close_worker",
    "default_trace_dirs",
    "find_traces",
    "installed_plugins",
    "load_ref",
    "lost_round_usd",
    "machine_info",
    "render",
    "replay_conversation",
    "replay_source",
    "run",
    "run_bench",
    "scope_note",
    "sequence_conversations",
    "source_name",
    "split_counts",
    "split_halves",
]
