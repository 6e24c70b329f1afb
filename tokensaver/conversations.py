"""Which conversation a request belongs to: one id for every turn of a conversation, another for
each conversation that only opens the same way (a fleet of agents given one task, a prompt run
again, a side call branched off an old point).

A request's *base* is its model, system prompt (its digits left out, so that a clock line changing
keeps the conversation) and first message: the fallback id, what the id used to be. Its
*chain* is a digest per prefix of its message list (each message's digest, cache_control aside,
chained from the base). Per API-key hash and base, the state keeps, for each request seen, its
chain's id, whether it has a child (a request extending it) and ``cont``: which of its children's
lines went on (a child whose own child was sent).
A request with chain ``c_1..c_k``, ``L`` its longest registered prefix and ``M`` the next:

- nothing registered: a new conversation; the base id if the base is new or the request is as
  long as the base id's latest one (the caller edited its history), else an id seeded from the
  base and the request (every replica derives the same);
- ``L`` is the request (a retry, or parallel identical calls): ``L``'s id, unless the conversation
  went on past it (it has a child): then it is a new run of the same opening (a seeded id), or the
  next call of such a run, alike so far (``M``'s id, when ``M``'s line has not gone on);
- the request extends ``L``: ``L``'s id, and ``L`` marks ``M``'s line as the one going on. Two
  cases fork instead (a seeded id): ``L``'s conversation went on from ``L`` by another child
  already (an old point) and the request is shorter than that conversation's latest one (as long
  or longer: the caller edited its own history, which continues the conversation); or ``M``'s
  other line went on already (two lines of one opening both going on: two agents).

So side calls that extend the latest request (Claude Code's forked calls) share its id and the
main line keeps it; two agents diverging share an id for at most their first diverging call.
Prune's cuts are on our side: the caller's own history grows as a prefix. Compaction gives the
conversation a new first message, so a new base (as before). A plugin-tool round (the core's own
follow-up) is identified as the caller's request it continues (a retry of it).

State: embedded, the pipeline's memory, as its decisions are (an LRU of :data:`MAX_ENTRIES`
entries, lost on restart); on Redis, one Lua script, atomic and one round trip per call, keys under
the API-key hash with a TTL and at most :data:`MAX_REDIS_ENTRIES` entries per key. Lost (a restart, Redis down): the base id,
which every replica gives alike.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any

import xxhash

from .state import DECISIONS_TTL, EMBEDDED, Redis, open_state
from .threads import PLUGIN_TOOL_PREFIX
from .tokens import fast_digest

# requests (and openings, conversation heads) kept: ~240 bytes each in a pipeline's memory (embedded),
# ~200 per API key on Redis (a busy fleet's key sees more calls between two of an idle conversation)
MAX_ENTRIES = 50_000
MAX_REDIS_ENTRIES = 200_000
TTL = DECISIONS_TTL  # seconds an entry outlives its latest use (Redis): as long as the decisions keyed by it

Facts = dict[int, tuple[Any, ...]]  # id(block) -> (block, digest, ...): the pipeline's per-block facts


def _strip_cc(block: Any) -> Any:
    if isinstance(block, dict) and "cache_control" in block:
        return {k: v for k, v in block.items() if k != "cache_control"}
    return block


def _parts(message: Any, facts: Facts | None) -> bytes:
    """What a message's digest is made of: its role and its blocks' digests (cache_control aside)."""
    if not isinstance(message, dict):
        return b"?" + fast_digest(message)
    content = message.get("content")
    role = str(message.get("role", "")).encode()
    if isinstance(content, str):
        blocks: list[Any] = [content]
    elif isinstance(content, list):
        blocks = content
    else:
        return role + b"\1" + fast_digest(content)
    parts = [role, b"\0"]
    get = facts.get if facts is not None else None
    for b in blocks:
        known = get(id(b)) if get is not None else None
        parts.append(known[1] if known is not None and known[0] is b else fast_digest(_strip_cc(b)))
    return b"".join(parts)


def message_digest(message: Any, facts: Facts | None = None) -> bytes:
    """A message's digest from its role and its blocks' digests (cache_control aside)."""
    return xxhash.xxh3_128_digest(_parts(message, facts))


def _block_digest(block: Any, facts: Facts | None) -> bytes:
    known = facts.get(id(block)) if facts is not None else None
    return known[1] if known is not None and known[0] is block else fast_digest(_strip_cc(block))


_NO_DIGITS = str.maketrans("", "", "0123456789")
_SYSTEMS: OrderedDict[bytes, bytes] = OrderedDict()  # a system's block digests -> system_digest
_SYSTEMS_LOCK = threading.Lock()


def system_digest(system: Any, facts: Facts | None = None) -> bytes:
    """The system prompt's digest with its digits left out: a clock or date line that changes keeps
    the conversation (cache_align moves such lines), another prompt (a subagent's) does not."""
    blocks = [system] if isinstance(system, str) else system if isinstance(system, list) else []
    if not blocks:
        return b""
    raw = b"".join(_block_digest(b, facts) for b in blocks)
    found = _SYSTEMS.get(raw)
    if found is None:
        parts = []
        for b in blocks:
            text = b if isinstance(b, str) else b.get("text") if isinstance(b, dict) else None
            if isinstance(text, str) and (isinstance(b, str) or b.get("type") == "text"):
                parts.append(b"t" + text.translate(_NO_DIGITS).encode("utf-8", "surrogatepass"))
            else:
                parts.append(_block_digest(b, facts))
        found = xxhash.xxh3_128_digest(b"\0".join(parts))
        with _SYSTEMS_LOCK:
            _SYSTEMS[raw] = found
            while len(_SYSTEMS) > 4096:
                _SYSTEMS.popitem(last=False)
    return found


def base_of(body: dict[str, Any], first: bytes | None, facts: Facts | None = None) -> str:
    """The base id: model, system prompt (digits aside) and first message (the fallback id, for
    every replica alike)."""
    model = str(body.get("model", "")).encode()
    system = system_digest(body.get("system"), facts)
    return xxhash.xxh3_64_hexdigest(b"conv\0" + model + b"\0" + system + b"\0" + (first or b""))


def chains(base: str, messages: list[Any], facts: Facts | None = None) -> list[bytes]:
    """The chain digest of each prefix of the messages (16 bytes each), from the base."""
    out = []
    c = base.encode()
    xxh = xxhash.xxh3_128_digest
    for m in messages:
        c = xxh(c + _parts(m, facts))
        out.append(c)
    return out


def conversation_id(body: dict[str, Any]) -> str:
    """The base id of a request (model, system prompt and first message), without state."""
    msgs = body.get("messages")
    first = message_digest(msgs[0]) if isinstance(msgs, list) and msgs else None
    return base_of(body, first)


def _calls_plugin_tool(message: Any) -> bool:
    content = message.get("content") if isinstance(message, dict) else None
    return isinstance(content, list) and any(
        isinstance(b, dict)
        and b.get("type") == "tool_use"
        and str(b.get("name", "")).startswith(PLUGIN_TOOL_PREFIX)
        for b in content
    )


def _own_messages(msgs: list[Any]) -> list[Any]:
    """The caller's messages of a request: a plugin-tool round's end before its first plugin tool
    call (the caller never sees those, so no request of its own holds one)."""
    if len(msgs) < 2 or not _calls_plugin_tool(msgs[-2]):  # a round's own call is its last but one
        return msgs
    for i, m in enumerate(msgs):
        if i and _calls_plugin_tool(m):
            return msgs[:i]
    return msgs


def _fork(base: str, seed: str, runs: int) -> str:
    return hashlib.sha1(f"{base}:{seed}:{runs}".encode()).hexdigest()[:16]


class Index:
    """Tells which conversation a request belongs to (the rules of the module doc)."""

    def identify(self, body: dict[str, Any], key_hash: str, facts: Facts | None = None) -> str:
        """The id of the conversation ``body`` belongs to, for API key ``key_hash``.

        ``facts``: the call's per-block digests by identity (the pipeline's, digested once).
        """
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            return conversation_id(body)
        own = _own_messages(msgs)
        base = base_of(body, message_digest(own[0], facts), facts)
        cs = chains(base, own, facts)
        return self.resolve(key_hash[:16], base, cs[-1].hex(), cs)

    def resolve(self, ns: str, base: str, seed: str, cs: list[bytes]) -> str:
        """The id for chains ``cs`` of base ``base`` in namespace ``ns``, the request registered."""
        raise NotImplementedError


class EmbeddedIndex(Index):
    """The conversations one pipeline has seen (an LRU of ``limit`` entries): its decisions are its own."""

    def __init__(self, limit: int = MAX_ENTRIES) -> None:
        self.limit = limit
        # (key hash, kind, key) -> value: "c" chain -> [id, cont, runs]; "b" base -> 1; "h" id -> length
        self._data: OrderedDict[tuple[str, str, Any], Any] = OrderedDict()
        self._lock = threading.Lock()

    def resolve(self, ns: str, base: str, seed: str, cs: list[bytes]) -> str:
        with self._lock:
            data = self._data
            k = len(cs)
            at_l = at_m = None
            for i in range(k - 1, -1, -1):
                if (ns, "c", cs[i]) in data:
                    if at_l is None:
                        at_l = i
                    else:
                        at_m = i
                        break
            runs = 0
            entry = None
            if at_l is None:
                # the opening is known but no prefix of this request: as long as the opening's own
                # conversation's latest request, the caller edited its history (it goes on), else a fork
                known = k > 0 and (ns, "b", base) in data
                cid = _fork(base, seed, 0) if known and k < data.get((ns, "h", base), 0) else base
            else:
                entry = data[(ns, "c", cs[at_l])]
                cid = entry[0]
                if at_l < k - 1:
                    entry[3] = True  # it has a child now
                if at_l == k - 1:
                    if entry[3]:  # the conversation went on past this request: a new run
                        m = data.get((ns, "c", cs[at_m])) if at_m is not None else None
                        if m is not None and m[1] is None:  # ...whose previous request goes on here
                            cid, m[1], runs = m[0], cs[at_l], entry[2]
                        else:
                            runs = entry[2] + 1
                            cid = _fork(base, seed, runs)
                        entry = None
                elif entry[1] is not None:  # an old point of the conversation
                    if k >= data.get((ns, "h", cid), 0):  # as long: the caller edited its history
                        entry[1] = cs[-1]
                    else:
                        cid = _fork(base, seed, 0)
                    entry = None
                else:
                    entry = None
                    if at_m is not None:
                        m = data[(ns, "c", cs[at_m])]
                        if m[1] is None:
                            m[1] = cs[at_l]
                        elif m[1] != cs[at_l] and m[0] == cid:  # the other line went on: two agents
                            cid = _fork(base, seed, 0)
            if k:
                key = (ns, "c", cs[-1])
                if entry is None:
                    data[key] = [cid, None, runs, False]  # id, cont, runs, has a child
                data.move_to_end(key)
                data[(ns, "b", base)] = 1
                data.move_to_end((ns, "b", base))
                data[(ns, "h", cid)] = k
                data.move_to_end((ns, "h", cid))
                while len(data) > self.limit:
                    data.popitem(last=False)
            return cid


# The same rules on Redis, atomically in one round trip.
# KEYS[1]: the namespace's key prefix. ARGV: ttl ms, max entries, base id, seed, chains...
_IDENTIFY = """
local pre = KEYS[1]
local ttl, cap, base, seed = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3], ARGV[4]
local first = 5
local k = #ARGV - first + 1
local function chain(i) return ARGV[first + i - 1] end
local function fork(r) return string.sub(redis.sha1hex(base .. ':' .. seed .. ':' .. r), 1, 16) end
local L, M
for i = k, 1, -1 do
  if redis.call('EXISTS', pre .. 'c:' .. chain(i)) == 1 then
    if not L then L = i else M = i; break end
  end
end
local id
local runs = 0
local keep = false
if not L then
  if k == 0 or redis.call('EXISTS', pre .. 'b:' .. base) == 0 then id = base
  elseif k >= tonumber(redis.call('GET', pre .. 'h:' .. base) or '0') then id = base
  else id = fork(0) end
else
  local lkey = pre .. 'c:' .. chain(L)
  local e = redis.call('HMGET', lkey, 'i', 'k', 'r', 'x')
  id = e[1]
  if L < k then redis.call('HSET', lkey, 'x', '1') end
  if L == k then
    if e[4] then
      local m = {false, false}
      if M then m = redis.call('HMGET', pre .. 'c:' .. chain(M), 'i', 'k') end
      if m[1] and not m[2] then
        id = m[1]
        runs = tonumber(e[3] or '0')
        redis.call('HSET', pre .. 'c:' .. chain(M), 'k', chain(L))
      else
        runs = tonumber(e[3] or '0') + 1
        id = fork(runs)
      end
    else
      keep = true
    end
  elseif e[2] then
    local head = tonumber(redis.call('GET', pre .. 'h:' .. id) or '0')
    if k >= head then redis.call('HSET', lkey, 'k', chain(k)) else id = fork(0) end
  elseif M then
    local mkey = pre .. 'c:' .. chain(M)
    local m = redis.call('HMGET', mkey, 'i', 'k')
    if not m[2] then redis.call('HSET', mkey, 'k', chain(L))
    elseif m[2] ~= chain(L) and m[1] == id then id = fork(0) end
  end
end
if k > 0 then
  local members = {'c:' .. chain(k), 'b:' .. base, 'h:' .. id}
  if not keep then
    redis.call('DEL', pre .. members[1])
    redis.call('HSET', pre .. members[1], 'i', id, 'r', runs)
  end
  redis.call('SET', pre .. members[2], '1')
  redis.call('SET', pre .. members[3], k)
  local seq = redis.call('INCR', pre .. '~seq')
  for _, mem in ipairs(members) do
    redis.call('PEXPIRE', pre .. mem, ttl)
    redis.call('ZADD', pre .. '~order', seq, mem)
  end
  redis.call('PEXPIRE', pre .. '~order', ttl)
  redis.call('PEXPIRE', pre .. '~seq', ttl)
  while redis.call('ZCARD', pre .. '~order') > cap do
    local oldest = redis.call('ZPOPMIN', pre .. '~order')[1]
    redis.call('DEL', pre .. oldest)
  end
end
return id
"""


class RedisIndex(Index):
    """:class:`EmbeddedIndex`'s rules on a Redis state, shared by every replica (fails open: the base id)."""

    def __init__(self, backend: Redis, limit: int = MAX_REDIS_ENTRIES, ttl: float = TTL) -> None:
        self.backend, self.limit, self.ttl = backend, limit, ttl
        self._run = backend.script(_IDENTIFY)

    def resolve(self, ns: str, base: str, seed: str, cs: list[bytes]) -> str:
        args: list[Any] = [int(self.ttl * 1000), self.limit, base, seed, *cs]
        got = self._run([self.backend.namespace("conv", ns)], args, None)
        if isinstance(got, bytes):
            return got.decode()
        return got if isinstance(got, str) else base


_REDIS: dict[str, RedisIndex] = {}
_REDIS_LOCK = threading.Lock()


def conversation_index(url: str = EMBEDDED) -> Index:
    """The conversation index for a pipeline on a ``state`` setting: a new one of its own on the
    embedded state, the process's one for a Redis URL (every replica's calls on one index)."""
    backend = open_state(url).backend
    if not isinstance(backend, Redis):
        return EmbeddedIndex()
    with _REDIS_LOCK:
        found = _REDIS.get(url)
        if found is None:
            found = _REDIS[url] = RedisIndex(backend)
        return found
