"""State kept across calls, behind one interface: embedded (private diskcache dirs) or Redis (a fleet).

Everything a plugin keeps past one call goes through a :class:`Space`: a namespace made of a store
name (``"memo"``, ``"summaries"``) and the caller's API-key hash (``ctx.key_hash``), so one key's
entries never reach another and each key has its own byte cap. A plugin reaches the process's
:class:`State` with ``ctx.store`` (the config key ``state``) and opens ``ctx.store.space(name,
ctx.key_hash, cap=...)``.

Backends (``state`` in config):

- ``"embedded"`` (the default, nothing to install): one private diskcache directory per store
  (0700, its files 0600), shared by the processes of one machine;
- ``"redis://host:port/db"`` (``rediss://`` for TLS): one Redis for every replica, through redis-py.

Values are JSON, never pickles: each entry is the bytes of a magic line, the sha256 of the payload
and the JSON payload ``{key, stored_at, message[, expires_at]}``, checked on every read, so a damaged
or foreign entry is a miss (deleted, logged, never a wrong answer). TTLs hold on the caller's clock
(``now``, which a trace replay drives) and on the backend's real one. ``add`` and ``claim`` are
atomic across processes and replicas (single flight). A namespace's cap bounds the bytes of its
live entries: the oldest stored go first, the entry just written stays; an entry larger than the
cap is not stored.

Redis fails open: when it cannot be reached (down, restarting, a network cut), reads are misses and
writes no-ops, so calls are answered; a warning is logged once per outage, :attr:`State.lost` is set
(``problem`` says ``state lost`` on reads, which plugins record in the run ledger), and the backend
tries again with a growing backoff (0.25 s to 5 s) until Redis answers. Socket timeouts are short
(``REDIS_TIMEOUT``, 0.5 s): an unreachable Redis never holds a call for long.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import stat
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._files import private_dir
from .tokens import canonical_json

log = logging.getLogger("tokensaver.state")

EMBEDDED = "embedded"
DEFAULT_MAGIC = b"tsstate1\n"
REDIS_TIMEOUT = 0.5  # seconds per Redis socket operation and connect
BACKOFF_MIN, BACKOFF_MAX = 0.25, 5.0
# the diskcache file's own overhead (SQLite pages, free pages) allowed on top of a namespace cap
DISK_OVERHEAD = 16 * 1024**2
BIG_VALUE = 8 * 1024**2  # values below stay inside SQLite
DECISIONS_CAP = 64 * 1024**2  # bytes of one plugin's shared conversation decisions per API key
DECISIONS_TTL = 7 * 86400.0  # seconds a conversation's decisions outlive its latest call


def check_url(value: str) -> str | None:
    """Why ``value`` is not an accepted ``state`` setting, else None."""
    if value == EMBEDDED:
        return None
    if value.startswith(("redis://", "rediss://", "unix://")):
        if importlib.util.find_spec("redis") is None:
            return "state = redis://... needs redis-py: pip install 'tokensaver[redis]'"
        return None
    return f"state must be 'embedded' or a redis:// (rediss://, unix://) URL, not {value!r}"


def cache_dir(name: str) -> str:
    """``$TOKENSAVER_CACHE_DIR/<name>``, else ``$XDG_CACHE_HOME/tokensaver/<name>``, else ``~/.cache/tokensaver/<name>``."""
    env = os.environ.get("TOKENSAVER_CACHE_DIR")
    if env:
        return str(Path(env).expanduser() / name)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return str(base / "tokensaver" / name)


# -- entries ----------------------------------------------------------------------------------


class CorruptEntry(ValueError):
    """A stored entry that fails its checksum, its key check or its shape."""


def encode_entry(
    magic: bytes, key: str, value: dict[str, Any], stored_at: float, expires_at: float | None = None
) -> bytes:
    """Entry bytes: ``magic``, sha256 of the payload, then JSON of {key, stored_at, message[, expires_at]}."""
    doc: dict[str, Any] = {"key": key, "stored_at": stored_at, "message": value}
    if expires_at is not None:
        doc["expires_at"] = expires_at
    payload = canonical_json(doc).encode()
    return magic + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload


def decode_doc(magic: bytes, key: str, raw: Any) -> dict[str, Any]:
    """The checked payload ``{key, stored_at, message, ...}``; raise CorruptEntry on any mismatch."""
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
    if not isinstance(doc.get("message"), dict):
        raise CorruptEntry("stored value is not an object")
    return doc


def decode_entry(magic: bytes, key: str, raw: Any) -> tuple[dict[str, Any], float]:
    """The stored value and its store time; raise CorruptEntry on any mismatch."""
    doc = decode_doc(magic, key, raw)
    return doc["message"], float(doc.get("stored_at") or 0.0)


# -- backends ---------------------------------------------------------------------------------


class Backend:
    """Raw entry bytes by (namespace, key).

    Redis fails open in every method (errors are misses and no-ops); the embedded backend raises
    what the disk raises, which :class:`Space` turns into misses and no-ops (its raw ``set`` excepted).
    """

    url = EMBEDDED
    lost = False  # the backend was unreachable at its latest attempt
    losses = 0  # outages seen by this process

    def where(self) -> str:
        """Where the state is, for logs and records (never credentials)."""
        return self.url

    def get(self, space: Space, key: str) -> bytes | None:
        raise NotImplementedError

    def get_many(self, space: Space, keys: list[str]) -> list[bytes | None]:
        """:meth:`get` of each key (one round trip on Redis)."""
        return [self.get(space, k) for k in keys]

    def put(self, space: Space, key: str, raw: bytes, ttl: float | None, *, only_new: bool = False) -> bool:
        """Store ``raw`` (``only_new``: only when absent, atomically); True when stored."""
        raise NotImplementedError

    def delete(self, space: Space, key: str) -> None:
        raise NotImplementedError

    def claim(self, space: Space, key: str, token: str, ttl: float) -> bool:
        """Hold ``key`` with ``token`` for ``ttl`` seconds unless it is held already, atomically; True: held."""
        raise NotImplementedError

    def release(self, space: Space, key: str, token: str) -> None:
        """Delete ``key`` if it still holds ``token`` (a claim's end), atomically."""
        raise NotImplementedError

    def usage(self, space: Space) -> int:
        """Bytes of the namespace's live entries."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def _private_files(path: str) -> None:
    for child in Path(path).rglob("*"):
        try:
            want = 0o700 if child.is_dir() else 0o600
            if stat.S_IMODE(child.stat().st_mode) != want:
                os.chmod(child, want)
        except OSError:
            pass


def _owned_private_dir(path: str) -> None:
    p = private_dir(path)
    st = p.stat()
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise PermissionError(f"cache dir {path} is owned by another user")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(p, 0o700)


class Store:
    """A diskcache directory private to the user, holding checksummed JSON entries (never pickles)."""

    def __init__(self, directory: str, size_limit: int, label: str = "store") -> None:
        import diskcache

        _owned_private_dir(directory)
        # values up to 8 MiB stay in SQLite; whatever diskcache writes is made 0600 below
        self.cache = diskcache.Cache(directory, size_limit=size_limit, disk_min_file_size=BIG_VALUE)
        self.directory = directory
        self.label = label
        self._claims: Any = None
        self._lock = threading.Lock()
        _private_files(directory)

    def read(
        self, magic: bytes, key: str, check: Callable[[dict[str, Any]], None] | None = None
    ) -> tuple[dict[str, Any] | None, float, str | None]:
        """``(value, stored_at, problem)``: value None when absent, unreadable or corrupt (see :func:`read_entry`)."""
        value, doc, problem = read_entry(self.get, self.delete, self.label, magic, key, check)
        return value, float((doc or {}).get("stored_at") or 0.0), problem

    def get(self, key: str) -> Any:
        return self.cache.get(key, default=None, retry=True)

    def set(self, key: str, value: bytes, ttl: float | None) -> None:
        if not isinstance(value, bytes):
            raise TypeError("a store holds entry bytes (JSON), never other objects")
        self.cache.set(key, value, expire=ttl, retry=True)
        if len(value) >= BIG_VALUE:
            _private_files(self.directory)

    def delete(self, key: str) -> None:
        self.cache.delete(key, retry=True)

    def claims(self) -> Any:
        """The directory's claims (a diskcache of its own under ``claims/``, made when first used)."""
        with self._lock:
            if self._claims is None:
                import diskcache

                path = os.path.join(self.directory, "claims")
                _owned_private_dir(path)
                self._claims = diskcache.Cache(path, size_limit=64 * 1024**2)
                _private_files(path)
            return self._claims

    def close(self) -> None:
        self.cache.close()
        if self._claims is not None:
            self._claims.close()


def read_entry(
    get: Callable[[str], Any],
    delete: Callable[[str], None],
    label: str,
    magic: bytes,
    key: str,
    check: Callable[[dict[str, Any]], None] | None = None,
    now: float | None = None,
) -> tuple[dict[str, Any] | None, dict[str, Any] | None, str | None]:
    """``(value, doc, problem)`` of one entry: value None when absent, expired, unreadable or corrupt.

    A corrupt entry (checksum, key, shape, or ``check`` raising :class:`CorruptEntry`) is deleted;
    unreadable and corrupt entries are logged, and ``problem`` says what happened.
    """
    try:
        raw = get(key)
    except Exception as e:
        log.warning("%s entry unreadable (%s): %s: %s", label, key[:24], type(e).__name__, e)
        return None, None, f"unreadable entry: {type(e).__name__}"
    if raw is None:
        return None, None, None
    try:
        doc = decode_doc(magic, key, raw)
        if check is not None:
            check(doc["message"])
    except CorruptEntry as e:
        log.warning("%s entry corrupt, ignored and deleted (%s): %s", label, key[:24], e)
        try:
            delete(key)
        except Exception:
            pass
        return None, None, f"corrupt entry: {e}"
    expires = doc.get("expires_at")
    if isinstance(expires, (int, float)) and (time.time() if now is None else now) >= expires:
        return None, None, None
    return doc["message"], doc, None


def _given(raw: Any) -> Callable[[str], Any]:
    """A ``get`` for :func:`read_entry` that answers ``raw`` (an entry read already)."""
    return lambda _key: raw


class Embedded(Backend):
    """Private diskcache directories, one per store (its ``directory``, else :func:`cache_dir`)."""

    def __init__(self) -> None:
        # open while a namespace (or a plugin's store) holds them: dirs of finished clients close
        self._stores: weakref.WeakValueDictionary[str, Store] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()

    def store(self, space: Space) -> Store:
        d = space.directory or cache_dir(space.name)
        with self._lock:
            st = self._stores.get(d)
            if st is None:
                st = self._stores[d] = Store(d, space.cap + DISK_OVERHEAD, space.label)
            return st

    def get(self, space: Space, key: str) -> bytes | None:
        return self.store(space).get(space.backend_key(key))  # type: ignore[no-any-return]

    def put(self, space: Space, key: str, raw: bytes, ttl: float | None, *, only_new: bool = False) -> bool:
        st = self.store(space)
        k = space.backend_key(key)
        if space.cap and len(raw) > space.cap:
            return False
        with st.cache.transact(retry=True):
            if only_new:
                if not st.cache.add(k, raw, expire=ttl, retry=True):
                    return False
            else:
                st.cache.set(k, raw, expire=ttl, retry=True)
            if space.cap and st.cache.volume() > space.cap:  # the file's size bounds the live bytes
                self._cull(st, space, k)
        if len(raw) >= BIG_VALUE:
            _private_files(st.directory)
        return True

    def _cull(self, st: Store, space: Space, keep: str) -> None:
        # the oldest entries of this namespace go until its live bytes fit the cap (the new one stays)
        rows = st.cache._sql(  # diskcache's own connection, inside the transaction
            "SELECT key, coalesce(length(value), size), store_time FROM Cache WHERE raw = 1 AND key >= ? AND key < ?"
            " AND (expire_time IS NULL OR expire_time > ?) ORDER BY store_time, rowid",
            (space.prefix, space.prefix + "\uffff", time.time()),
        ).fetchall()
        total = sum(n or 0 for _, n, _ in rows)
        for k, n, _ in rows:
            if total <= space.cap:
                break
            if k == keep:
                continue
            st.cache.delete(k, retry=True)
            total -= n or 0

    def delete(self, space: Space, key: str) -> None:
        self.store(space).delete(space.backend_key(key))

    def release(self, space: Space, key: str, token: str) -> None:
        claims = self.store(space).claims()
        k = space.backend_key(key)
        with claims.transact(retry=True):
            if claims.get(k, retry=True) == token:
                claims.delete(k, retry=True)

    def claim(self, space: Space, key: str, token: str, ttl: float) -> bool:
        return bool(self.store(space).claims().add(space.backend_key(key), token, expire=ttl, retry=True))

    def usage(self, space: Space) -> int:
        st = self.store(space)
        row = st.cache._sql(
            "SELECT sum(coalesce(length(value), size)) FROM Cache WHERE raw = 1 AND key >= ? AND key < ?"
            " AND (expire_time IS NULL OR expire_time > ?)",
            (space.prefix, space.prefix + "\uffff", time.time()),
        ).fetchone()
        return int(row[0] or 0)

    def close(self) -> None:
        with self._lock:
            for st in self._stores.values():
                st.close()
            self._stores.clear()


# KEYS: entry, sizes (hash member -> bytes), order (zset member -> seq), total, seq
# ARGV: member, value, ttl ms (0: none), cap (0: none), only_new (1/0), entry key prefix
# the oldest entries that expired leave the accounting as later ones are stored (a few per put), the
# oldest live ones go while the namespace is over its cap
_PUT = """
if ARGV[5] == '1' and redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local size = string.len(ARGV[2])
local cap = tonumber(ARGV[4])
if cap > 0 and size > cap then return 0 end
local ttl = tonumber(ARGV[3])
if ttl > 0 then redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl) else redis.call('SET', KEYS[1], ARGV[2]) end
local old = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
redis.call('HSET', KEYS[2], ARGV[1], size)
local total = redis.call('INCRBY', KEYS[4], size - old)
redis.call('ZADD', KEYS[3], redis.call('INCR', KEYS[5]), ARGV[1])
for _ = 1, 4 do
  local oldest = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
  if not oldest or oldest == ARGV[1] or redis.call('EXISTS', ARGV[6] .. oldest) == 1 then break end
  redis.call('ZREM', KEYS[3], oldest)
  local n = tonumber(redis.call('HGET', KEYS[2], oldest) or '0')
  redis.call('HDEL', KEYS[2], oldest)
  total = redis.call('INCRBY', KEYS[4], -n)
end
while cap > 0 and total > cap do
  local oldest = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
  if not oldest or oldest == ARGV[1] then break end
  redis.call('ZREM', KEYS[3], oldest)
  local n = tonumber(redis.call('HGET', KEYS[2], oldest) or '0')
  redis.call('HDEL', KEYS[2], oldest)
  redis.call('DEL', ARGV[6] .. oldest)
  total = redis.call('INCRBY', KEYS[4], -n)
end
return 1
"""
# KEYS: entry, sizes, order, total; ARGV: member
_DELETE = """
redis.call('DEL', KEYS[1])
local n = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if n > 0 then redis.call('DECRBY', KEYS[4], n) end
return 1
"""
# KEYS: claim; ARGV: token
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Redis(Backend):
    """One Redis for every replica (redis-py), failing open with a backoff while it is unreachable."""

    def __init__(self, url: str, *, prefix: str = "tokensaver:") -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.url = url
        self.prefix = prefix
        self.errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self.client = redis.Redis.from_url(
            url,
            socket_timeout=REDIS_TIMEOUT,
            socket_connect_timeout=REDIS_TIMEOUT,
            retry=Retry(NoBackoff(), 0),  # no hidden retries: a call never waits on a dead Redis
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self._put = self.client.register_script(_PUT)
        self._delete = self.client.register_script(_DELETE)
        self._release = self.client.register_script(_RELEASE)
        self._lock = threading.Lock()
        self._next_try = 0.0
        self._backoff = BACKOFF_MIN

    def _run(self, default: Any, fn: Callable[[], Any]) -> Any:
        if self.lost and time.monotonic() < self._next_try:
            return default
        try:
            out = fn()
        except self.errors as e:
            self._lose(e)
            return default
        if self.lost:
            with self._lock:
                if self.lost:
                    self.lost = False
                    self._backoff = BACKOFF_MIN
                    log.warning("state: %s answers again; shared state is back", self.where())
        return out

    def _lose(self, e: BaseException) -> None:
        with self._lock:
            if not self.lost:
                self.lost = True
                self.losses += 1
                log.warning(
                    "state lost: %s unreachable (%s: %s); calls go on without shared state until it returns",
                    self.where(),
                    type(e).__name__,
                    e,
                )
            else:
                self._backoff = min(BACKOFF_MAX, self._backoff * 2)
            self._next_try = time.monotonic() + self._backoff

    def where(self) -> str:
        kw = self.client.connection_pool.connection_kwargs
        if "path" in kw:
            return f"redis at {kw['path']}"
        return f"redis at {kw.get('host')}:{kw.get('port')}"

    def _keys(self, space: Space, key: str) -> list[str]:
        base = self.prefix + space.prefix
        return [base + key, base + "~sizes", base + "~order", base + "~total", base + "~seq"]

    def get(self, space: Space, key: str) -> bytes | None:
        return self._run(None, lambda: self.client.get(self._keys(space, key)[0]))  # type: ignore[no-any-return]

    def get_many(self, space: Space, keys: list[str]) -> list[bytes | None]:
        if not keys:
            return []
        base = self.prefix + space.prefix
        got = self._run(None, lambda: self.client.mget([base + k for k in keys]))
        return list(got) if got is not None else [None] * len(keys)

    def put(self, space: Space, key: str, raw: bytes, ttl: float | None, *, only_new: bool = False) -> bool:
        ms = 0 if ttl is None else max(1, int(ttl * 1000))
        args: list[bytes | str | int] = [
            key,
            raw,
            ms,
            space.cap or 0,
            1 if only_new else 0,
            self.prefix + space.prefix,
        ]
        return bool(self._run(0, lambda: self._put(keys=self._keys(space, key), args=args)))

    def delete(self, space: Space, key: str) -> None:
        self._run(None, lambda: self._delete(keys=self._keys(space, key)[:4], args=[key]))

    def claim(self, space: Space, key: str, token: str, ttl: float) -> bool:
        k = self.prefix + space.prefix + "~claim:" + key
        px = max(1, int(ttl * 1000))
        return bool(self._run(False, lambda: self.client.set(k, token, nx=True, px=px)))

    def release(self, space: Space, key: str, token: str) -> None:
        k = self.prefix + space.prefix + "~claim:" + key
        self._run(None, lambda: self._release(keys=[k], args=[token]))

    def usage(self, space: Space) -> int:
        return int(self._run(0, lambda: self.client.get(self._keys(space, "")[3])) or 0)

    def namespace(self, name: str, key_hash: str) -> str:
        """The key prefix of store ``name``'s entries for an API-key hash (for :meth:`script`)."""
        return f"{self.prefix}{name}:{key_hash[:16] or '-'}:"

    def script(self, source: str) -> Callable[[list[str], list[Any], Any], Any]:
        """A Lua script on this Redis: ``run(keys, args, default)`` runs it atomically in one round
        trip, and fails open like every call here (``default`` while Redis is unreachable)."""
        registered = self.client.register_script(source)
        return lambda keys, args, default: self._run(default, lambda: registered(keys=keys, args=args))

    def close(self) -> None:
        self.client.close()


# -- the interface plugins use ----------------------------------------------------------------


class Claim:
    """A key claimed by one call across processes and replicas; :meth:`release` ends it."""

    def __init__(self, space: Space, key: str, token: str) -> None:
        self.space, self.key, self.token = space, key, token

    def release(self) -> None:
        self.space.state.backend.release(self.space, self.key, self.token)


class Space:
    """One namespace (a store name and an API-key hash) of a :class:`State`.

    Keys are the plugin's own; the backend files them under the first 16 hex digits of the key
    hash (a key that already starts with ``<those 16>:`` is kept as it is).
    """

    def __init__(
        self,
        state: State,
        name: str,
        key_hash: str,
        *,
        cap: int,
        directory: str | None = None,
        label: str | None = None,
        magic: bytes = DEFAULT_MAGIC,
    ) -> None:
        self.state, self.name, self.key_hash = state, name, key_hash
        self.cap, self.directory, self.label, self.magic = int(cap), directory, label or name, magic
        ns = f"{key_hash[:16]}:" if key_hash else ""  # "": the store's shared namespace
        if isinstance(state.backend, Redis):
            self.prefix = f"{name}:{ns or '-:'}"
        else:
            self.prefix = ns
            self._pin = state.backend.store(self)  # type: ignore[attr-defined]  # raises if unusable

    def backend_key(self, key: str) -> str:
        """The key as the embedded backend files it (with the namespace's key-hash prefix)."""
        return key if key.startswith(self.prefix) else self.prefix + key

    @property
    def cache(self) -> Any:
        """The embedded backend's diskcache (tests and tools); None on Redis."""
        pin = getattr(self, "_pin", None)
        return pin.cache if pin is not None else None

    @property
    def lost(self) -> bool:
        return self.state.backend.lost

    # the JSON interface

    def read(
        self,
        magic: bytes | None,
        key: str,
        check: Callable[[dict[str, Any]], None] | None = None,
        *,
        now: float | None = None,
    ) -> tuple[dict[str, Any] | None, float, str | None]:
        """``(value, stored_at, problem)``: value None when absent, expired on ``now``, unreadable or
        corrupt; ``problem`` names a corrupt or unreadable entry, or ``state lost`` when the backend is gone."""
        b = self.state.backend
        value, doc, problem = read_entry(
            lambda k: b.get(self, k), self.delete, self.label, magic or self.magic, key, check, now
        )
        if problem is None and b.lost:
            problem = f"state lost: {b.where()} unreachable (a miss)"
        return value, float((doc or {}).get("stored_at") or 0.0), problem

    def load(
        self, key: str, *, magic: bytes | None = None, now: float | None = None
    ) -> dict[str, Any] | None:
        """The value stored under ``key``, else None (absent, expired, corrupt, backend lost)."""
        return self.read(magic, key, now=now)[0]

    def load_many(self, keys: list[str], *, now: float | None = None) -> list[dict[str, Any] | None]:
        """:meth:`load` of each key, read in one round trip on Redis."""
        raws: list[Any] = self._safe(
            [None] * len(keys), "read", lambda: self.state.backend.get_many(self, keys)
        )
        out = []
        for k, raw in zip(keys, raws, strict=True):
            out.append(read_entry(_given(raw), self.delete, self.label, self.magic, k, None, now)[0])
        return out

    def save(
        self,
        key: str,
        value: dict[str, Any],
        *,
        ttl: float | None = None,
        now: float | None = None,
        magic: bytes | None = None,
        only_new: bool = False,
    ) -> bool:
        """Store a JSON object for ``ttl`` seconds (on ``now``'s clock and the backend's); True when stored."""
        t = time.time() if now is None else now
        raw = encode_entry(magic or self.magic, key, value, t, None if ttl is None else t + ttl)
        return bool(
            self._safe(False, "store", lambda: self.state.backend.put(self, key, raw, ttl, only_new=only_new))
        )

    def add(self, key: str, value: dict[str, Any], **kw: Any) -> bool:
        """:meth:`save` only when ``key`` holds nothing, atomically across processes; True when stored."""
        return self.save(key, value, only_new=True, **kw)

    def delete(self, key: str) -> None:
        self._safe(None, "delete", lambda: self.state.backend.delete(self, key))

    def claim(self, key: str, ttl: float) -> Claim | None:
        """Claim ``key`` for ``ttl`` seconds at most (single flight across processes); None: claimed
        already, or the state cannot say (lost, a disk error)."""
        token = uuid.uuid4().hex
        held = self._safe(False, "claim", lambda: self.state.backend.claim(self, key, token, ttl))
        return Claim(self, key, token) if held else None

    def usage(self) -> int:
        """Bytes of this namespace's live entries."""
        return int(self._safe(0, "measure", lambda: self.state.backend.usage(self)))

    def _safe(self, default: Any, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as e:  # a broken disk store is a miss or a no-op, never the caller's failure
            log.warning("%s: cannot %s: %s: %s", self.label, what, type(e).__name__, e)
            return default

    # the raw-entry interface of plugins/_store.Store (entries made by encode_entry)

    def get(self, key: str) -> bytes | None:
        return self.state.backend.get(self, key)

    def set(self, key: str, value: bytes, ttl: float | None) -> bool:
        """Store entry bytes; False when not stored (the state lost, larger than the cap). Disk errors raise."""
        if not isinstance(value, bytes):
            raise TypeError("a state holds entry bytes (JSON), never other objects")
        return self.state.backend.put(self, key, value, ttl)


class Decisions:
    """Per-conversation decisions that fix the bytes of later calls (prune's cut, cache_align's moved
    lines and TTL), kept where the ``state`` setting says.

    :meth:`get` gives the conversation's dict, which the plugin reads and changes in place;
    :meth:`put` after a change publishes its ``shared`` keys. Embedded: the dicts stay in this
    process's memory (an LRU of ``limit`` conversations per plugin), nothing is copied, stored or
    read: today's path and speed. Redis: each :meth:`get` loads the ``shared`` keys another replica
    (or this one) last put, each :meth:`put` stores them (JSON in the order written, namespace
    ``name`` per API-key hash, ``ttl`` seconds from the latest put, ``cap`` bytes per namespace), so
    whichever replica serves the next call of a conversation sends the bytes one process would.
    Keys not listed in ``shared`` (caches, diagnostics) stay in the process. When Redis is lost the
    process's own copy is used (fail open: a replica without the latest decision may send other
    bytes; :attr:`State.lost` and the call record's ``state_lost`` say so). The calls of one
    conversation come one after another: the last put wins.
    """

    def __init__(
        self,
        state: State,
        name: str,
        shared: tuple[str, ...],
        *,
        limit: int,
        cap: int = DECISIONS_CAP,
        ttl: float = DECISIONS_TTL,
    ) -> None:
        self.state, self.name, self.shared = state, name, shared
        self.limit, self.cap, self.ttl = int(limit), int(cap), float(ttl)
        self.remote = isinstance(state.backend, Redis)
        self._local: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
        self._spaces: dict[str, Space] = {}
        self._lock = threading.Lock()

    def _space(self, key_hash: str) -> Space:
        sp = self._spaces.get(key_hash)
        if sp is None:
            sp = self._spaces[key_hash] = self.state.space(self.name, key_hash, cap=self.cap)
        return sp

    def get(self, key_hash: str, key: str, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The conversation ``key``'s decisions (``make()`` for one not seen), the newest put on Redis."""
        k = (key_hash, key)
        with self._lock:
            conv = self._local.get(k)
            if conv is None:
                conv = self._local[k] = make()
            self._local.move_to_end(k)
            while len(self._local) > self.limit:
                self._local.popitem(last=False)
        if self.remote:
            doc = self._space(key_hash).load(key)
            raw = doc.get("d") if doc is not None else None
            if isinstance(raw, str):
                try:
                    got = json.loads(raw)
                except ValueError:
                    got = None
                if isinstance(got, dict):
                    fresh = make()
                    for name in self.shared:
                        if name in got:
                            conv[name] = got[name]
                        elif name in fresh:
                            conv[name] = fresh[name]
                        else:
                            conv.pop(name, None)
        return conv

    def put(self, key_hash: str, key: str, conv: dict[str, Any]) -> None:
        """Publish the ``shared`` keys of ``conv`` (Redis; a no-op embedded, where the dict is the state)."""
        if not self.remote:
            return
        doc = {name: conv[name] for name in self.shared if name in conv}
        self._space(key_hash).save(key, {"d": json.dumps(doc, ensure_ascii=False)}, ttl=self.ttl)


class SharedCache:
    """One lane of a shadow prompt cache (:class:`tokensaver.billing.CacheModel`) kept in a namespace,
    so the replicas of one Redis state price each call against the calls the others served.

    An entry per (lane, model, prefix hash): ``{"e": expires, "t": "5m" | "1h"}``, kept until it
    expires (on the caller's clock and Redis's). Lost: the lane's own entries only (fail open: the
    counterfactual of a replica that cannot see the others' calls may differ).
    """

    def __init__(self, space: Space, lane: str) -> None:
        self.space, self.lane = space, lane

    def _key(self, model: str, h: bytes) -> str:
        return f"{self.lane}:{model}:{h.hex()}"

    def pull(self, model: str, hashes: set[bytes], now: float) -> dict[bytes, tuple[float, str]]:
        """The entries held elsewhere among ``hashes``: {hash: (expires, ttl)}."""
        order = list(hashes)
        docs = self.space.load_many([self._key(model, h) for h in order], now=now)
        out = {}
        for h, doc in zip(order, docs, strict=True):
            if doc is not None and isinstance(doc.get("e"), (int, float)) and doc.get("t") in ("5m", "1h"):
                out[h] = (float(doc["e"]), str(doc["t"]))
        return out

    def push(self, model: str, entries: dict[bytes, tuple[float, str]], now: float) -> None:
        """Store entries this process refreshed or wrote."""
        for h, (expires, ttl) in entries.items():
            self.space.save(
                self._key(model, h), {"e": expires, "t": ttl}, ttl=max(1.0, expires - now), now=now
            )


SHADOW_CAP = 64 * 1024**2  # bytes of shared shadow-cache entries per API key


THREADS_CAP = 256 * 1024**2  # bytes of message threads kept per API key (tokensaver.threads)


def shared_spaces(url: str, name: str, cap: int) -> Callable[[str], Space] | None:
    """``key_hash -> Space`` of store ``name`` on a Redis ``state`` (one namespace per key, made
    once); None for the embedded state, whose users keep to the process's memory."""
    if url == EMBEDDED:
        return None
    st = open_state(url)
    made: dict[str, Space] = {}
    lock = threading.Lock()

    def space(key_hash: str) -> Space:
        with lock:
            sp = made.get(key_hash)
            if sp is None:
                sp = made[key_hash] = st.space(name, key_hash, cap=cap)
            return sp

    return space


def shared_cache(url: str) -> Callable[[str, str], SharedCache] | None:
    """``(key_hash, lane) -> SharedCache`` for a Redis ``state`` (the pipeline's shadow caches); None
    for the embedded state, whose shadow caches stay in the process as before."""
    if url == EMBEDDED:
        return None
    st = open_state(url)
    return lambda key_hash, lane: SharedCache(st.space("shadow", key_hash, cap=SHADOW_CAP), lane)


class State:
    """The process's state for one ``state`` setting: a backend and the namespaces opened on it."""

    def __init__(self, url: str = EMBEDDED) -> None:
        problem = check_url(url)
        if problem:
            raise ValueError(problem)
        self.url = url
        self.backend: Backend = Embedded() if url == EMBEDDED else Redis(url)

    def space(self, name: str, key_hash: str, *, cap: int, directory: str | None = None, **kw: Any) -> Space:
        """The namespace ``name`` of API-key hash ``key_hash``, its live entries at most ``cap`` bytes.

        ``directory``: the embedded backend's diskcache directory for ``name`` (default
        :func:`cache_dir`); ignored by Redis.
        """
        return Space(self, name, key_hash, cap=cap, directory=directory, **kw)

    def decisions(self, name: str, shared: tuple[str, ...], *, limit: int, **kw: Any) -> Decisions:
        """A plugin's per-conversation :class:`Decisions` on this state (store ``name``)."""
        return Decisions(self, name, shared, limit=limit, **kw)

    @property
    def lost(self) -> bool:
        """The backend was unreachable at its latest attempt (Redis only)."""
        return self.backend.lost

    def mark(self) -> int:
        """The outages seen so far, for :meth:`lost_since` (a call's start)."""
        return self.backend.losses

    def lost_since(self, mark: int) -> bool:
        """The state was unreachable at some point since :meth:`mark` gave ``mark`` (or is now)."""
        return self.backend.lost or self.backend.losses != mark

    def status(self) -> dict[str, Any]:
        """``{"backend", "lost", "losses"}`` for records and reports (no credentials)."""
        kind = "embedded" if self.url == EMBEDDED else "redis"
        return {"backend": kind, "lost": self.backend.lost, "losses": self.backend.losses}

    def close(self) -> None:
        self.backend.close()


_STATES: dict[str, State] = {}
_STATES_LOCK = threading.Lock()


def open_state(url: str = EMBEDDED) -> State:
    """The process's :class:`State` for ``url`` (one per URL: one connection pool, one set of dirs)."""
    with _STATES_LOCK:
        st = _STATES.get(url)
        if st is None:
            st = _STATES[url] = State(url)
        return st
