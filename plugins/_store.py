"""The stores the built-in plugins share, on the configured state (:mod:`tokensaver.state`).

Used by memoize (answers) and summarize (model summaries, kept originals). :func:`open_store` gives
a plugin its store on the backend the config's ``state`` names: private diskcache directories of
the machine (the default) or one Redis shared by every replica. Entries are never pickles: bytes
made of a magic line, the sha256 of the payload and the JSON payload, checked on every read, so a
damaged or foreign entry is a :class:`CorruptEntry` (the caller treats it as a miss), never a
wrong answer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from tokensaver.state import (
    EMBEDDED,
    CorruptEntry,
    Space,
    State,
    Store,
    cache_dir,
    decode_entry,
    encode_entry,
    open_state,
)

__all__ = ["CorruptEntry", "SharedStore", "Store", "cache_dir", "decode_entry", "encode_entry", "open_store"]

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

    def read(
        self, magic: bytes, key: str, check: Callable[[dict[str, Any]], None] | None = None
    ) -> tuple[dict[str, Any] | None, float, str | None]:
        """``(value, stored_at, problem)``: value None when absent, unreadable, corrupt or the state lost."""
        return self.space(key).read(magic, key, check)

    def get(self, key: str) -> Any:
        return self.space(key).get(key)

    def set(self, key: str, value: bytes, ttl: float | None) -> None:
        self.space(key).set(key, value, ttl)

    def delete(self, key: str) -> None:
        self.space(key).delete(key)


def open_store(ctx: Any, name: str, directory: str | None, size_limit: int, label: str) -> SharedStore:
    """The plugin's store ``name`` on the state ``ctx`` is configured with (``state`` in config).

    ``directory`` is where the embedded backend keeps it (Redis ignores it); ``size_limit`` caps the
    bytes of each API key's entries. Raises when the embedded directory cannot be used.
    """
    return SharedStore(open_state(getattr(ctx, "state_url", EMBEDDED)), name, directory, size_limit, label)
