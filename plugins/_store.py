"""Disk stores the built-in plugins share: private diskcache directories of checksummed JSON entries.

Used by memoize (answers) and summarize (model summaries). Entries are never pickles: bytes made of
a magic line, the sha256 of the payload and the JSON payload, checked on every read, so a damaged
or foreign entry is a :class:`CorruptEntry` (the caller treats it as a miss), never a wrong answer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokensaver.tokens import canonical_json

log = logging.getLogger("tokensaver.plugins")


def cache_dir(name: str) -> str:
    """``$TOKENSAVER_CACHE_DIR/<name>``, else ``$XDG_CACHE_HOME/tokensaver/<name>``, else ``~/.cache/tokensaver/<name>``."""
    env = os.environ.get("TOKENSAVER_CACHE_DIR")
    if env:
        return str(Path(env).expanduser() / name)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return str(base / "tokensaver" / name)


class CorruptEntry(ValueError):
    """A stored entry that fails its checksum, its key check or its shape."""


def encode_entry(magic: bytes, key: str, value: dict[str, Any], stored_at: float) -> bytes:
    """Entry bytes: ``magic``, sha256 of the payload, then JSON of {key, stored_at, message}."""
    payload = canonical_json({"key": key, "stored_at": stored_at, "message": value}).encode()
    return magic + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload


def decode_entry(magic: bytes, key: str, raw: Any) -> tuple[dict[str, Any], float]:
    """The stored value and its store time; raise CorruptEntry on any mismatch."""
    if isinstance(raw, str):
        raw = raw.encode()
    if not isinstance(raw, (bytes, bytearray)) or not raw.startswith(magic):
        raise CorruptEntry("not an entry of this store")
    rest = bytes(raw[len(magic) :])
    digest, sep, payload = rest.partition(b"\n")
    if not sep or hashlib.sha256(payload).hexdigest().encode() != digest:
        raise CorruptEntry("checksum mismatch")
    try:
        doc = json.loads(payload)
    except ValueError as e:
        raise CorruptEntry(f"bad JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("key") != key:
        raise CorruptEntry("entry stored under another key")
    value = doc.get("message")
    if not isinstance(value, dict):
        raise CorruptEntry("stored value is not an object")
    return value, float(doc.get("stored_at") or 0.0)


def _private_dir(path: str) -> None:
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = p.stat()
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise PermissionError(f"cache dir {path} is owned by another user")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(p, 0o700)


def _private_files(path: str) -> None:
    for child in Path(path).rglob("*"):
        try:
            want = 0o700 if child.is_dir() else 0o600
            if stat.S_IMODE(child.stat().st_mode) != want:
                os.chmod(child, want)
        except OSError:
            pass


class Store:
    """A diskcache directory private to the user, holding checksummed JSON entries (never pickles)."""

    def __init__(self, directory: str, size_limit: int, label: str = "store") -> None:
        import diskcache

        _private_dir(directory)
        # values up to 8 MiB stay in SQLite; whatever diskcache writes is made 0600 below
        self.cache = diskcache.Cache(directory, size_limit=size_limit, disk_min_file_size=8 * 1024**2)
        self.directory = directory
        self.label = label
        _private_files(directory)

    def read(
        self, magic: bytes, key: str, check: Callable[[dict[str, Any]], None] | None = None
    ) -> tuple[dict[str, Any] | None, float, str | None]:
        """``(value, stored_at, problem)``: value None when absent, unreadable or corrupt.

        A corrupt entry (checksum, key, shape, or ``check`` raising :class:`CorruptEntry`) is
        deleted; unreadable and corrupt entries are logged, and ``problem`` says what happened.
        """
        try:
            raw = self.get(key)
        except Exception as e:
            log.warning("%s entry unreadable (%s): %s: %s", self.label, key[:24], type(e).__name__, e)
            return None, 0.0, f"unreadable entry: {type(e).__name__}"
        if raw is None:
            return None, 0.0, None
        try:
            value, stored_at = decode_entry(magic, key, raw)
            if check is not None:
                check(value)
        except CorruptEntry as e:
            log.warning("%s entry corrupt, ignored and deleted (%s): %s", self.label, key[:24], e)
            try:
                self.delete(key)
            except Exception:
                pass
            return None, 0.0, f"corrupt entry: {e}"
        return value, stored_at, None

    def get(self, key: str) -> Any:
        return self.cache.get(key, default=None, retry=True)

    def set(self, key: str, value: bytes, ttl: float | None) -> None:
        self.cache.set(key, value, expire=ttl, retry=True)
        if len(value) >= 8 * 1024**2:
            _private_files(self.directory)

    def delete(self, key: str) -> None:
        self.cache.delete(key, retry=True)

    def close(self) -> None:
        self.cache.close()
