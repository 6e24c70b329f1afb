"""A byte-capped LRU table for the plugins' per-process memos (summarize's, repeats' chain,
cache_align's previous blocks).

Unsafe: it takes no lock; its users hold their own around each call.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class SizedLRU(Generic[K, V]):
    """Values kept by key, newest last, within an entry count and a byte cap (oldest out first).

    The newest entry always stays, however large.
    """

    def __init__(self) -> None:
        self.data: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self.nbytes = 0  # the sum of the kept entries' sizes

    def __len__(self) -> int:
        return len(self.data)

    def get(self, key: K) -> V | None:
        """The value kept under ``key`` (now the newest), else None."""
        hit = self.data.get(key)
        if hit is None:
            return None
        self.data.move_to_end(key)
        return hit[0]

    def put(self, key: K, value: V, size: int, max_entries: int, max_bytes: int) -> None:
        """Keep ``value`` (``size`` bytes) under ``key``, then drop the oldest over either cap."""
        old = self.data.pop(key, None)
        if old is not None:
            self.nbytes -= old[1]
        self.data[key] = (value, size)
        self.nbytes += size
        while len(self.data) > 1 and (len(self.data) > max_entries or self.nbytes > max_bytes):
            self.nbytes -= self.data.popitem(last=False)[1][1]
