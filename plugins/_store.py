"""The stores the built-in plugins share, on the configured state (:mod:`tokensaver.state`).

Used by memoize (answers) and summarize (model summaries, kept originals). :func:`open_store` gives
a plugin its store on the backend the config's ``state`` names: private diskcache directories of
the machine (the default) or one Redis shared by every replica. Entries are never pickles: bytes
made of a magic line, the sha256 of the payload and the JSON payload, checked on every read, so a
damaged or foreign entry is a :class:`CorruptEntry` (the caller treats it as a miss), never a
wrong answer.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from tokensaver.state import (
    EMBEDDED,
    Claim,
    CorruptEntry,
    Space,
    State,
    Store,
    cache_dir,
    decode_entry,
    encode_entry,
    open_state,
)

__all__ = [
    "CorruptEntry",
    "SharedStore",
    "Store",
    "cache_dir",
    "decode_entry",
    "encode_entry",
    "fleet_flight",
    "open_store",
]

log = logging.getLogger("tokensaver.plugins")


class SharedStore:
    """One store name on a :class:`~tokensaver.state.State`, with the raw-entry API of :class:`Store`.

    Each key goes to the namespace of the API-key hash it starts with (``<key hash[:16]>:...``,
    as memoize's keys do), else to the store's shared namespace (keys that are digests of the key
    hash and their content, as summarize's). Opening it opens the embedded directory (an unusable
    one raises here, so the plugin can turn itself off).
    """

    def __init__(self, state: State, name: str, directory: str | None, size_limit: int, label: str) -> None:
        self.state, self.name, self.directory, self.size_limit, self.label = (
            state,
            name,
            directory,
            size_limit,
            label,
        )
        self._shared = self._space("")

    def _space(self, key_hash: str) -> Space:
        return self.state.space(
            self.name, key_hash, cap=self.size_limit, directory=self.directory, label=self.label
        )

    def space(self, key: str) -> Space:
        """The namespace ``key`` belongs to."""
        head, sep, _ = key.partition(":")
        return self._space(head) if sep and 0 < len(head) <= 16 else self._shared

    @property
    def cache(self) -> Any:
        """The embedded backend's diskcache (tests and tools); None on Redis."""
        return self._shared.cache

    @property
    def lost(self) -> bool:
        return self.state.lost

    @property
    def shared(self) -> bool:
        """Shared by other machines and replicas (Redis), not only this machine's processes."""
        return self.state.url != EMBEDDED

    def read(
        self, magic: bytes, key: str, check: Callable[[dict[str, Any]], None] | None = None
    ) -> tuple[dict[str, Any] | None, float, str | None]:
        """``(value, stored_at, problem)``: value None when absent, unreadable, corrupt or the state lost."""
        return self.space(key).read(magic, key, check)

    def get(self, key: str) -> Any:
        return self.space(key).get(key)

    def set(self, key: str, value: bytes, ttl: float | None) -> bool:
        """Store entry bytes; False when not stored (the state lost, over the cap). Disk errors raise."""
        return self.space(key).set(key, value, ttl)

    def delete(self, key: str) -> None:
        self.space(key).delete(key)


POLL = 0.05  # seconds between looks for the answer of a call another replica has in flight


def fleet_flight(
    ctx: Any, store: SharedStore, key: str, wait: float, read: Callable[[], dict[str, Any] | None]
) -> dict[str, Any] | None:
    """Single flight across replicas for a call that is the first of its process for ``key``.

    On a shared state, the call claims ``key`` for the fleet (released when the call is over, at
    most ``wait`` seconds) and goes upstream: None. When another replica holds the claim, it waits
    (``wait`` at most) for that replica's answer, ``read()`` polled: the answer, else None when the
    claim ended without one (this call then holds it), the wait ran out or the state was lost. The
    embedded state and a lost one: None at once (each process makes its own call).
    """
    if not store.shared or store.lost:
        return None
    space = store.space(key)
    claim = space.claim(key, wait)
    if claim is not None or store.lost:
        _hold(ctx, claim)
        return None
    deadline = time.monotonic() + wait
    waiting = getattr(ctx, "waiting", None)  # the core does not cut a bounded wait short
    with waiting(wait) if callable(waiting) else contextlib.nullcontext():
        while time.monotonic() < deadline:
            time.sleep(POLL)
            hit = read()
            if hit is not None:
                ctx.record(single_flight="waited for another replica")
                return hit
            claim = space.claim(key, max(POLL, deadline - time.monotonic()))
            if claim is not None or store.lost:  # its call ended without an answer: this one goes
                _hold(ctx, claim)
                ctx.record(single_flight="another replica's call ended without an answer")
                return None
    ctx.record(single_flight="timed out waiting for another replica")
    return None


def _hold(ctx: Any, claim: Claim | None) -> None:
    if claim is None:
        return
    at_end = getattr(ctx, "at_end", None)
    if callable(at_end):
        at_end(claim.release)  # after the answer is stored: the waiters find it, then the claim goes
    # else the claim lapses with its TTL


def open_store(ctx: Any, name: str, directory: str | None, size_limit: int, label: str) -> SharedStore:
    """The plugin's store ``name`` on the state ``ctx`` is configured with (``state`` in config).

    ``directory`` is where the embedded backend keeps it (Redis ignores it); ``size_limit`` caps the
    bytes of each API key's entries. Raises when the embedded directory cannot be used.
    """
    return SharedStore(open_state(getattr(ctx, "state_url", EMBEDDED)), name, directory, size_limit, label)
