"""Aggregation of a ``tokensaver bench`` result: ``totals``, ``by_source``, ``by_half`` and ``turns``.

The JSON (``schema: tokensaver-bench/1``) holds everything: ``machine``, ``options``, ``configs``,
``conversations``, ``scope`` (``source`` or ``conversation``: what the prompt cache is shared by),
``scope_note`` (one sentence on it), ``results`` (one per configuration and conversation: billed
``input_tokens``, ``cache_creation_input_tokens``, ``cache_read_input_tokens``, ``output_tokens``,
``cost_usd``, ``input_cost_usd``, ``rejected`` (+ samples), ``start_t`` (the first call's time on the
replay clock), ``stages`` (per plugin: ``saved_tokens``, ``saved_usd``,
``changed``, ``errors``, ``ms``), ``plugin_errors``, ``facts_used``, ``facts_kept``,
``short_circuited``, ``turn_cost_usd`` and ``turn_hit_rate`` per call, ``overhead_ms`` per call),
then ``totals`` (per configuration), ``by_source`` (source -> per configuration), ``turns`` (mean
billed $ per call at each turn, per configuration), ``overhead`` and ``memory``.
Percentages ``vs_auto_pct`` / ``vs_none_pct`` are the saving on total billed dollars against the
``auto`` / ``none`` configurations over the same conversations (positive = cheaper).

Lost facts: each result also has ``half`` (``tuning`` / ``validation``, see
:func:`tokensaver.bench.split_halves`), ``lost_results`` (tool results a used fact was lost from,
once per conversation), ``lost_fact_usd`` (their price, :func:`tokensaver.bench.lost_round_usd`) and
``lost_samples``. Every aggregate row has ``vs_auto_input_pct`` (saving on input-side $ against
``auto``) and ``net_vs_auto_input_pct`` (the same, net of ``lost_fact_usd``); ``by_half`` holds
``totals`` and ``by_source`` per half.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from ..report.aggregate import percentile

SUM_KEYS = (
    "calls",
    "rejected",
    "input_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
    "output_tokens",
    "cost_usd",
    "input_cost_usd",
    "facts_used",
    "facts_kept",
    "lost_results",
    "lost_fact_usd",
    "short_circuited",
    "plugin_errors",
    "tokens_original",
    "tokens_sent",
    "seconds",
)
HALF_ORDER = ("tuning", "validation", "all")


def _sum(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {k: 0 for k in SUM_KEYS}
    out["cost_usd"] = out["input_cost_usd"] = out["seconds"] = out["lost_fact_usd"] = 0.0
    stages: dict[str, dict[str, Any]] = {}
    overhead: list[float] = []
    skipped = None
    for r in rows:
        if r.get("skipped"):
            skipped = r["skipped"]
            continue
        for k in SUM_KEYS:
            out[k] += r.get(k) or 0
        for plugin, s in (r.get("stages") or {}).items():
            row = stages.setdefault(plugin, {"saved_tokens": 0, "saved_usd": 0.0, "changed": 0, "errors": 0})
            for k in row:
                row[k] += s.get(k) or 0
        overhead.extend(r.get("overhead_ms") or [])
    out["conversations"] = len({r["conversation"] for r in rows if not r.get("skipped")})
    out["cost_usd"] = round(out["cost_usd"], 6)
    out["input_cost_usd"] = round(out["input_cost_usd"], 6)
    out["lost_fact_usd"] = round(out["lost_fact_usd"], 6)
    out["seconds"] = round(out["seconds"], 1)
    for row in stages.values():
        row["saved_usd"] = round(row["saved_usd"], 6)
    out["stages"] = stages
    billed_in = sum(
        out[k] for k in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    )
    out["hit_rate"] = round(out["cache_read_input_tokens"] / billed_in, 4) if billed_in else None
    out["facts_kept_pct"] = (
        round(100 * out["facts_kept"] / out["facts_used"], 2) if out["facts_used"] else None
    )
    out["overhead_p50_ms"] = percentile(overhead, 50)
    out["overhead_p95_ms"] = percentile(overhead, 95)
    if skipped and not out["conversations"]:
        out["skipped"] = skipped
    return out


def _compare(group: dict[str, dict[str, Any]]) -> None:
    for ref, key in (("auto", "vs_auto_pct"), ("none", "vs_none_pct")):
        base = group.get(ref)
        for row in group.values():
            b = base["cost_usd"] if base else 0
            row[key] = round(100 * (b - row["cost_usd"]) / b, 2) if b and not row.get("skipped") else None
    base = group.get("auto")
    b_in = base["input_cost_usd"] if base else 0
    for row in group.values():
        ok = bool(b_in) and not row.get("skipped")
        row["vs_auto_input_pct"] = round(100 * (b_in - row["input_cost_usd"]) / b_in, 2) if ok else None
        row["net_vs_auto_input_pct"] = (
            round(100 * (b_in - row["input_cost_usd"] - row["lost_fact_usd"]) / b_in, 2) if ok else None
        )


def _group(by_cfg: dict[str, list[dict[str, Any]]], order: list[str]) -> dict[str, Any]:
    """``totals`` and ``by_source`` of some results (per configuration)."""
    totals = {name: _sum(by_cfg.get(name, [])) for name in order}
    _compare(totals)
    sources = sorted({r["source"] for rows in by_cfg.values() for r in rows})
    by_source: dict[str, dict[str, dict[str, Any]]] = {}
    for src in sources:
        group = {name: _sum([r for r in by_cfg.get(name, []) if r["source"] == src]) for name in order}
        _compare(group)
        by_source[src] = group
    return {"totals": totals, "by_source": by_source}


def aggregate(data: dict[str, Any]) -> dict[str, Any]:
    """``totals``, ``by_source`` and ``turns`` from ``data["results"]``."""
    order = [c["name"] for c in data["configs"]]
    results = data["results"]
    # only conversations every configuration replayed are compared
    by_cfg: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        by_cfg[r["config"]].append(r)
    whole = _group(by_cfg, order)
    totals, by_source = whole["totals"], whole["by_source"]
    by_half: dict[str, Any] = {}
    for half in HALF_ORDER:
        rows = {name: [r for r in v if (r.get("half") or "all") == half] for name, v in by_cfg.items()}
        if any(rows.values()):
            by_half[half] = _group(rows, order)
    turns: dict[str, list[float | None]] = {}
    n_conv = len({r["conversation"] for r in results})
    need = max(1, min(3, n_conv))
    for name in order:
        sums: dict[int, list[float]] = defaultdict(list)
        for r in by_cfg.get(name, []):
            for k, c in enumerate(r.get("turn_cost_usd") or []):
                if c is not None:
                    sums[k].append(c)
        last = max((k for k, v in sums.items() if len(v) >= need), default=-1)
        turns[name] = [
            round(sum(sums[k]) / len(sums[k]), 8) if sums.get(k) else None for k in range(last + 1)
        ]
    return {"totals": totals, "by_source": by_source, "by_half": by_half, "turns": turns}
