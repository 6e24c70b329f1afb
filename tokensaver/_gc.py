"""Cyclic garbage collection held off while the pipeline works on a call.

A call's work makes tens of thousands of short-lived containers (the parsed body, the copies each
stage gets, billing's blocks). A collection that happens to run in the middle of it walks them all,
finds them alive and promotes them, so the full collections come often and each walks the whole
heap: on a ~200k-token Claude Code replay they were the slow calls (p95 199 ms against a 35 ms
median; the whole replay 34% more CPU than with collection held off during the pipeline's phases).
Held off, the same garbage is collected after the call, when it is garbage (refcounting frees
almost all of it at once; cycles wait for the next collection).

Process-wide and shared by threads: the first phase to begin turns collection off (only if it was
on: a caller that turned it off keeps it off), the last to end turns it back on. Under load,
phases can overlap without a gap; so a phase that ends while collection has been held off for more
than ``YOUNG_EVERY`` seconds collects the young generations, and one past ``FULL_EVERY`` collects
all, so cyclic garbage never waits long.
"""

from __future__ import annotations

import functools
import gc
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

YOUNG_EVERY = 0.5  # seconds collection may stay held off before the young generations are collected
FULL_EVERY = 10.0  # ... and before a full collection


class _Hold:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.depth = 0
        self.owned = False  # we turned collection off (it was on)
        self.since = 0.0  # when the young generations were last collected, or the hold began
        self.full = 0.0  # when all was last collected, or the hold began

    def enter(self) -> None:
        with self.lock:
            if self.depth == 0 and gc.isenabled():
                gc.disable()
                self.owned = True
                self.since = self.full = time.monotonic()
            self.depth += 1

    def exit(self) -> None:
        with self.lock:
            self.depth -= 1
            if not self.owned:
                return
            if self.depth == 0:
                self.owned = False
                gc.enable()
                return
            now = time.monotonic()
            if now - self.full > FULL_EVERY:
                gc.collect()
                self.since = self.full = now
            elif now - self.since > YOUNG_EVERY:
                gc.collect(1)
                self.since = now


_HOLD = _Hold()


def collection_held(fn: F) -> F:
    """``fn`` with cyclic garbage collection held off while it runs (see the module doc)."""

    @functools.wraps(fn)
    def held(*args: Any, **kwargs: Any) -> Any:
        _HOLD.enter()
        try:
            return fn(*args, **kwargs)
        finally:
            _HOLD.exit()

    return held  # type: ignore[return-value]
