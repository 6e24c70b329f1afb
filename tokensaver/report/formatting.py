"""The formatters every rendering of tokensaver uses (reports, ``tokensaver runs``, the bench).

Dollars (:func:`fmt_usd`), token counts (:func:`fmt_int`), percentages (:func:`fmt_pct`, a ratio with
:func:`fmt_rate`), milliseconds, times, plugin section cells, Markdown cells and aligned text tables.
Each says ``n/a`` for a missing value.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any


def fmt_usd(value: float | None) -> str:
    """Dollars: 4 decimals, 6 for non-zero amounts under a cent (``$0.1234``, ``$0.000120``)."""
    if value is None:
        return "n/a"
    v = float(value)
    if v != 0 and abs(v) < 0.01:
        return f"${v:.6f}" if v > 0 else f"-${-v:.6f}"
    return f"${v:,.4f}" if v >= 0 else f"-${-v:,.4f}"


def fmt_int(value: float | None) -> str:
    """An integer with thousands separators (``12,345``)."""
    return "n/a" if value is None else f"{int(round(value)):,}"


def fmt_pct(value: float | None, signed: bool = False) -> str:
    """A percentage with one decimal (``12.3%``; ``signed``: ``+12.3%`` / ``-4.0%``)."""
    if value is None:
        return "n/a"
    return f"{value:+.1f}%" if signed else f"{value:.1f}%"


def fmt_rate(ratio: float | None) -> str:
    """A ratio (0..1) as a percentage with one decimal (``0.123`` -> ``12.3%``)."""
    return fmt_pct(None if ratio is None else 100 * ratio)


def fmt_ms(value: float | None, unit: str = " ms") -> str:
    """Milliseconds with one decimal (``12.3 ms``; ``unit=""`` where a header says ms)."""
    return "n/a" if value is None else f"{value:.1f}{unit}"


def fmt_time(epoch: float | None) -> str:
    """Local time ``YYYY-MM-DD HH:MM:SS``."""
    if not isinstance(epoch, int | float):
        return "n/a"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def fmt_value(value: Any) -> str:
    """A plugin section cell."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return str(value)


# the formats a row's cells can take (see :func:`cells`)
CELL_FORMATS: dict[str, Callable[[Any], str]] = {
    "text": str,
    "int": fmt_int,
    "usd": fmt_usd,
    "pct": fmt_pct,
    "signed_pct": lambda v: fmt_pct(v, signed=True),
    "rate": fmt_rate,
    "ms": fmt_ms,
    "bare_ms": lambda v: fmt_ms(v, unit=""),  # under a header that says ms
}


def cells(row: Mapping[str, Any], spec: str) -> list[str]:
    """A table row's cells: ``spec`` is space-separated ``key:format`` (a format of CELL_FORMATS)."""
    return [CELL_FORMATS[fmt](row[key]) for key, _, fmt in (col.partition(":") for col in spec.split())]


def md_cell(value: Any) -> str:
    """A Markdown table cell: backslashes and pipes escaped, newlines as spaces."""
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def text_table(headers: list[str], rows: list[list[str]], right: set[int] | None = None) -> list[str]:
    """Plain-text table lines with aligned columns (``right``: right-aligned column indexes)."""
    right = right or set()
    widths = [len(h) for h in headers]
    for r in rows:
        for i, cell in enumerate(r):
            widths[i] = max(widths[i], len(cell))

    def line(cells: list[str]) -> str:
        parts = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(cells)]
        return "  ".join(parts).rstrip()

    return [line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]
