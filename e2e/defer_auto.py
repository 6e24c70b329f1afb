"""Measure defer_tools ``auto`` (README, "Deferred tools") on tau-bench.

One wrapped client over a half's conversations in order (the rates are learned as they come), against
the defaults the same way and the API's automatic caching; input-side $ billed, plus the extra loading
rounds priced as the bench prices them (``tokensaver.bench.runner._price_extra_rounds``).

    python e2e/defer_auto.py tuning        (or validation; ../shared/traces beside the checkout)
"""

from __future__ import annotations

import sys
from pathlib import Path

from tokensaver.bench.corpus import find_traces, split_halves
from tokensaver.bench.runner import EXTRA_ROUND_OUTPUT, USAGE_KEYS
from tokensaver.emulator import Emulator
from tokensaver.pricing import PER, PriceTable
from tokensaver.replay import auto_cache, replay
from tokensaver.traces import load_conversation

half = sys.argv[1]
refs, _ = find_traces([Path(__file__).resolve().parents[2] / "shared" / "traces"], ["tau-bench"])
convs = [load_conversation(p) for p in split_halves([r.path for r in refs])[half]]
prices = PriceTable()
base = {"record": False, "plugin_timeout": 600.0}
configs = {
    "auto-caching": None,
    "defaults": base,
    "auto 0.05/20": {
        **base,
        "plugins": ["summarize", "prune", "defer_tools", "cache_align"],
        "defer_tools": {"auto": True},
    },
    "auto 0.2/10": {
        **base,
        "plugins": ["summarize", "prune", "defer_tools", "cache_align"],
        "defer_tools": {"auto": True, "max_use_rate": 0.2, "min_conversations": 10},
    },
}
out = {}
with Emulator(virtual_clock=True) as emu:
    for name, cfg in configs.items():
        r = replay(
            convs,
            config=cfg,
            wrap_client=cfg is not None,
            prepare=auto_cache if cfg is None else None,
            emulator=emu,
        )
        t = r.totals()
        extra = usd = 0.0
        for rec in r.records:
            n = sum(
                int(v.get("extra_rounds") or 0)
                for v in (rec.get("plugins") or {}).values()
                if isinstance(v, dict)
            )
            if n:
                u = rec.get("usage") or {}
                info = prices.get(str(rec.get("model", "")))
                usd += (
                    n
                    * (
                        info.cache_read * sum(int(u.get(x) or 0) for x in USAGE_KEYS[:3])
                        + info.output * EXTRA_ROUND_OUTPUT
                    )
                    / PER
                )
                extra += n
        out[name] = (t["input_cost_usd"], extra, usd, t["rejected"])
ref = out["auto-caching"][0]
for name, (cost, extra, usd, rej) in out.items():
    print(
        f"{half:10} {name:14} input ${cost:.4f} extra rounds {int(extra)} (${usd:.4f}) net saving {(ref - cost - usd) / ref * 100:.1f}% rejected {rej}"
    )
