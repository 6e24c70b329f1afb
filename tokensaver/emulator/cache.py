"""Prompt-cache billing of the emulator: its clocks, and the API's cache rules applied to each call.

The rules (blocks, level settings, breakpoints, lookback, TTLs, minimum cacheable length, automatic
caching, context-management edits) live in :mod:`tokensaver.billing`, the one implementation shared
with the pipeline's counterfactual; this module applies them to a request the emulator accepted
(:meth:`Emulator.bill <tokensaver.emulator.Emulator.bill>`, :func:`count_tokens`) on the emulator's clock (:class:`WallClock` or
:class:`VirtualClock`, which only moves when told to, so TTL tests never wait).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from ..billing import apply_context_management, prompt_blocks

DEFAULT_START = 1_700_000_000.0


class WallClock:
    """Real time."""

    def now(self) -> float:
        return time.time()


class VirtualClock:
    """A clock that only moves when told to (``set`` / ``advance``), so TTL tests never wait."""

    def __init__(self, start: float | None = None) -> None:
        self._t = float(DEFAULT_START if start is None else start)
        self._lock = threading.Lock()

    def now(self) -> float:
        return self._t

    def set(self, t: float) -> None:
        with self._lock:
            self._t = float(t)

    def advance(self, seconds: float) -> float:
        with self._lock:
            self._t += float(seconds)
            return self._t


def count_tokens(body: dict[str, Any]) -> int:
    """``input_tokens`` of ``/v1/messages/count_tokens``: the prompt after context-management edits."""
    edited, _ = apply_context_management(body)
    return sum(b.tokens for b in prompt_blocks(edited))
