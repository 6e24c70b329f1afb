"""What a report shows, computed from a run's call records: :func:`summarize` and :func:`run_summary`.

The keys are documented in :mod:`tokensaver.report`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from .._stats import percentile as percentile  # re-exported: the report's public percentile
from ..pricing import normalize_usage

USAGE_KEYS = (
    "input_tokens",
    "cache_creation_input_tokens",
    "cache_creation_5m",
    "cache_creation_1h",
    "cache_read_input_tokens",
    "output_tokens",
)
TRANSFORM_HOOK = "tokensaver_transform_request"


def _num(value: Any) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return 0.0
    return f if math.isfinite(f) else 0.0


def _usage(value: Any) -> dict[str, int]:
    try:
        return normalize_usage(value if isinstance(value, dict) else None)
    except (TypeError, ValueError, AttributeError, OverflowError):
        # a record someone edited by hand: show zeros rather than no report at all
        return normalize_usage(None)


def short_circuit(rec: dict[str, Any]) -> str | None:
    sc = rec.get("short_circuit")
    if not sc:
        return None
    return sc if isinstance(sc, str) else str(sc)


def _call_errors(rec: dict[str, Any]) -> list[dict[str, str]]:
    """Plugin errors of a call: ``errors`` plus stage errors not already listed there."""
    out = []
    for e in rec.get("errors") or []:
        if isinstance(e, dict):
            out.append(
                {
                    "plugin": str(e.get("plugin") or "?"),
                    "hook": str(e.get("hook") or "?"),
                    "error": str(e.get("error") or ""),
                }
            )
    listed = {(e["plugin"], e["hook"]) for e in out}
    for st in rec.get("stages") or []:
        if isinstance(st, dict) and st.get("error"):
            plugin = str(st.get("plugin") or "?")
            if (plugin, TRANSFORM_HOOK) not in listed:
                out.append({"plugin": plugin, "hook": TRANSFORM_HOOK, "error": str(st["error"])})
    return out


def summarize(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Everything a report shows, computed from call records (the JSON keys minus run/sections)."""
    records = [r for r in records if isinstance(r, dict)]
    usage_tot = dict.fromkeys(USAGE_KEYS, 0)
    tot = dict.fromkeys(("tokens_original", "tokens_sent"), 0)
    money = dict.fromkeys(("cost_usd", "counterfactual_usd", "auto_usd", "saved_usd"), 0.0)
    est = {"calls": 0, "error_usd": 0.0, "billed_usd": 0.0}
    stages: dict[str, dict[str, Any]] = {}
    short_circuits: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    api_errors: list[dict[str, Any]] = []
    warnings: dict[str, int] = {}
    convs: dict[str, dict[str, Any]] = {}
    calls: list[dict[str, Any]] = []
    overheads: list[float] = []

    def stage_row(plugin: str) -> dict[str, Any]:
        return stages.setdefault(
            plugin,
            {
                "plugin": plugin,
                "calls": 0,
                "touched": 0,
                "short_circuits": 0,
                "saved_tokens": 0,
                "saved_usd": 0.0,
                "short_circuit_usd": 0.0,
                "model_calls_usd": 0.0,
                "errors": 0,
                "ms": 0.0,
            },
        )

    for i, rec in enumerate(records):
        cid = str(rec.get("id") or f"#{i + 1}")
        sc = short_circuit(rec)
        usage = _usage(rec.get("usage"))
        billed = dict.fromkeys(USAGE_KEYS, 0) if sc else usage
        for k in USAGE_KEYS:
            usage_tot[k] += billed[k]
        t_orig, t_sent = int(_num(rec.get("tokens_original"))), int(_num(rec.get("tokens_sent")))
        cost, saved = _num(rec.get("cost_usd")), _num(rec.get("saved_usd"))
        # ledgers written before the counterfactual existed have only their baseline_usd
        base = _num(rec["counterfactual_usd"] if "counterfactual_usd" in rec else rec.get("baseline_usd"))
        auto = _num(rec.get("auto_usd"))
        tot["tokens_original"] += t_orig
        tot["tokens_sent"] += t_sent
        for k, v in (
            ("cost_usd", cost),
            ("counterfactual_usd", base),
            ("auto_usd", auto),
            ("saved_usd", saved),
        ):
            money[k] += v
        if rec.get("estimate_error_usd") is not None and rec.get("estimate_usd") is not None:
            err = _num(rec.get("estimate_error_usd"))
            est["calls"] += 1
            est["error_usd"] += abs(err)
            est["billed_usd"] += _num(rec.get("estimate_usd")) - err

        for st in rec.get("stages") or []:
            if not isinstance(st, dict):
                continue
            row = stage_row(str(st.get("plugin") or "?"))
            before, after = _num(st.get("before")), _num(st.get("after"))
            st_saved = _num(st["saved_tokens"]) if "saved_tokens" in st else before - after
            row["calls"] += 1
            # "changed" (when recorded) also counts rewrites that keep the token count, e.g. cache_control
            row["touched"] += 1 if (st.get("changed") or st_saved or before != after) else 0
            row["saved_tokens"] += int(st_saved)
            row["saved_usd"] += _num(st.get("saved_usd"))
            row["model_calls_usd"] += _num(st.get("model_calls_usd"))
            row["ms"] += _num(st.get("ms"))
        if sc:
            row = stage_row(sc)
            row["short_circuits"] += 1
            row["saved_tokens"] += t_sent
            # what avoiding the call saved; the call's own saved_usd is net of its stages' model calls
            sc_usd = _num(rec["short_circuit_usd"]) if "short_circuit_usd" in rec else saved
            row["saved_usd"] += sc_usd
            row["short_circuit_usd"] += sc_usd
            short_circuits.append(
                {
                    "id": cid,
                    "conversation": rec.get("conversation"),
                    "plugin": sc,
                    "model": rec.get("model"),
                    "tokens_sent": t_sent,
                    "saved_usd": saved,
                }
            )
        for e in _call_errors(rec):
            stage_row(e["plugin"])["errors"] += 1
            errors.append({"call": cid, **e})
        status = rec.get("status")
        if rec.get("error") or (isinstance(status, int) and status >= 400):
            api_errors.append({"call": cid, "status": status, "error": rec.get("error")})
        if rec.get("price_warning"):
            w = str(rec["price_warning"])
            warnings[w] = warnings.get(w, 0) + 1
        if rec.get("overhead_ms") is not None:
            overheads.append(_num(rec.get("overhead_ms")))

        conv_id = str(rec.get("conversation") or "(none)")
        conv = convs.setdefault(
            conv_id,
            {
                "conversation": conv_id,
                "calls": 0,
                "short_circuited": 0,
                "tokens_original": 0,
                "tokens_sent": 0,
                "cache_read_input_tokens": 0,
                "cost_usd": 0.0,
                "counterfactual_usd": 0.0,
                "auto_usd": 0.0,
                "saved_usd": 0.0,
            },
        )
        conv["calls"] += 1
        conv["short_circuited"] += 1 if sc else 0
        conv["tokens_original"] += t_orig
        conv["tokens_sent"] += t_sent
        conv["cache_read_input_tokens"] += billed["cache_read_input_tokens"]
        conv["cost_usd"] += cost
        conv["counterfactual_usd"] += base
        conv["auto_usd"] += auto
        conv["saved_usd"] += saved

        calls.append(
            {
                "id": cid,
                "t": rec.get("t"),
                "conversation": rec.get("conversation"),
                "model": rec.get("model"),
                "tokens_original": t_orig,
                "tokens_sent": t_sent,
                "input_tokens": billed["input_tokens"],
                "cache_creation_input_tokens": billed["cache_creation_input_tokens"],
                "cache_read_input_tokens": billed["cache_read_input_tokens"],
                "output_tokens": billed["output_tokens"],
                "cost_usd": cost,
                "counterfactual_usd": base,
                "auto_usd": auto,
                "saved_usd": saved,
                "estimate_error_usd": rec.get("estimate_error_usd"),
                "short_circuit": sc,
                "overhead_ms": rec.get("overhead_ms"),
            }
        )

    input_side = (
        usage_tot["input_tokens"]
        + usage_tot["cache_creation_input_tokens"]
        + usage_tot["cache_read_input_tokens"]
    )
    totals = {
        "calls": len(records),
        # calls made while the shared state (Redis) was unreachable: they went on without it
        "state_lost": sum(1 for r in records if r.get("state_lost")),
        "thinking_unbound": sum(1 for r in records if r.get("thinking_unbound")),
        "short_circuited": len(short_circuits),
        "api_errors": len(api_errors),
        "tokens_original": tot["tokens_original"],
        "tokens_sent": tot["tokens_sent"],
        "tokens_saved": tot["tokens_original"] - tot["tokens_sent"],
        "usage": usage_tot,
        "cost_usd": money["cost_usd"],
        "counterfactual_usd": money["counterfactual_usd"],
        "auto_usd": money["auto_usd"],
        "saved_usd": money["saved_usd"],
        "saved_pct": _pct_of(money["saved_usd"], money["counterfactual_usd"]),
        "saved_vs_auto_usd": money["auto_usd"] - money["cost_usd"],
        "saved_vs_auto_pct": _pct_of(money["auto_usd"] - money["cost_usd"], money["auto_usd"]),
        "estimated_calls": est["calls"],
        "estimate_error_usd": est["error_usd"],
        "estimate_error_pct": _pct_of(est["error_usd"], est["billed_usd"]),
    }
    return {
        "totals": totals,
        "cache": {
            "input_tokens": usage_tot["input_tokens"],
            "write_tokens": usage_tot["cache_creation_input_tokens"],
            "write_5m": usage_tot["cache_creation_5m"],
            "write_1h": usage_tot["cache_creation_1h"],
            "read_tokens": usage_tot["cache_read_input_tokens"],
            "hit_rate": (usage_tot["cache_read_input_tokens"] / input_side) if input_side else None,
        },
        "latency": {
            "samples": len(overheads),
            "overhead_p50_ms": percentile(overheads, 50),
            "overhead_p95_ms": percentile(overheads, 95),
            "overhead_max_ms": max(overheads) if overheads else None,
        },
        "stages": list(stages.values()),
        "short_circuits": short_circuits,
        "errors": errors,
        "api_errors": api_errors,
        "price_warnings": [{"warning": w, "calls": n} for w, n in warnings.items()],
        "conversations": list(convs.values()),
        "calls": calls,
    }


def _pct_of(part: float, whole: float) -> float | None:
    return 100.0 * part / whole if whole > 0 else None


def run_summary(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Flat totals of a run (what ``Run.summary()`` returns)."""
    data = summarize(records)
    return {
        **data["totals"],
        "cache_hit_rate": data["cache"]["hit_rate"],
        "stages": {s["plugin"]: {k: v for k, v in s.items() if k != "plugin"} for s in data["stages"]},
        "plugin_errors": len(data["errors"]),
        "overhead_p50_ms": data["latency"]["overhead_p50_ms"],
        "overhead_p95_ms": data["latency"]["overhead_p95_ms"],
        "price_warnings": [w["warning"] for w in data["price_warnings"]],
    }
