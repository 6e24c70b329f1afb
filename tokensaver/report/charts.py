"""SVG geometry of a report's bar charts (tokens before / after per call, billed cache use per call)."""

from __future__ import annotations

import math
from typing import Any

from .formatting import fmt_int

MAX_BARS = 120  # calls per chart before they are grouped into buckets


def _buckets(calls: list[dict[str, Any]], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """Per-call values, summed into at most ``MAX_BARS`` consecutive groups."""
    n = len(calls)
    size = max(1, math.ceil(n / MAX_BARS))
    out = []
    for start in range(0, n, size):
        chunk = calls[start : start + size]
        first, last = chunk[0].get("id") or f"#{start + 1}", chunk[-1].get("id") or f"#{start + len(chunk)}"
        label = f"call {first}" if len(chunk) == 1 else f"calls {first} to {last}"
        out.append({"label": label, **{k: sum(int(c.get(k) or 0) for c in chunk) for k in keys}})
    return out


def bar_chart(
    calls: list[dict[str, Any]], series: list[tuple[str, str, str]], stacked: bool
) -> dict[str, Any]:
    """SVG geometry for a bar chart: ``series`` is ``[(key, label, css class)]``."""
    width, height, left, right, top, bottom = 760, 220, 64, 8, 10, 24
    plot_w, plot_h = width - left - right, height - top - bottom
    groups = _buckets(calls, tuple(k for k, _, _ in series))
    if stacked:
        peak = max((sum(g[k] for k, _, _ in series) for g in groups), default=0)
    else:
        peak = max((g[k] for g in groups for k, _, _ in series), default=0)
    peak = max(peak, 1)
    slot = plot_w / max(len(groups), 1)
    bars = []
    for gi, g in enumerate(groups):
        x0 = left + gi * slot + slot * 0.1
        inner = slot * 0.8
        y_base = top + plot_h
        for si, (key, label, cls) in enumerate(series):
            h = plot_h * g[key] / peak
            if stacked:
                x, w = x0, inner
                y = y_base - h
                y_base = y
            else:
                w = inner / len(series)
                x = x0 + si * w
                y = top + plot_h - h
            bars.append(
                {
                    "x": round(x, 2),
                    "y": round(y, 2),
                    "w": round(max(w, 0.5), 2),
                    "h": round(h, 2),
                    "cls": cls,
                    "title": f"{g['label']}: {label} {g[key]:,}",
                }
            )
    ticks = [{"y": round(top + plot_h - plot_h * f, 2), "label": fmt_int(peak * f)} for f in (0.0, 0.5, 1.0)]
    return {
        "width": width,
        "height": height,
        "left": left,
        "right": width - right,
        "bottom": top + plot_h,
        "bars": bars,
        "ticks": ticks,
        "legend": [{"label": label, "cls": cls} for _, label, cls in series],
        "grouped": len(groups) < len(calls),
        "groups": len(groups),
    }
