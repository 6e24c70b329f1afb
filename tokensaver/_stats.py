"""The one percentile of tokensaver (reports, ``Run.summary()``, the bench's and the proxy's timings).

Kept apart from :mod:`tokensaver.report` so that what must start fast (the proxy) can use it without
loading the report's renderers (jinja2).
"""

from __future__ import annotations

import math


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (a value that was observed), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]
