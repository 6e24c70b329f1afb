"""The pipeline one wrap() (or proxy, replay, bench) runs for every Messages call.

Phases: transform stages (measured before/after, fail open), short-circuit lookup, the network call
(done by the caller of this module: SDK middleware or proxy), response observers, then one record
in the run ledger. The pipeline, not the plugins, measures tokens and dollars.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pluggy
import xxhash

from . import metrics
from ._gc import collection_held
from .billing import Estimate, Named, ShadowCaches, block_facts, deferred_tokens, thaw
from .billing import Memo as BillingMemo
from .config import Config, load_config
from .context import CallContext
from .conversations import conversation_index
from .plugins import PluginFault, call_one, get_plugin_manager, hook_runner, ordered, reads_only, strict_error
from .pricing import PriceTable, normalize_usage
from .run import Run, redact_keys, redact_text
from .state import THREADS_CAP, open_state, shared_cache, shared_spaces
from .threads import PLUGIN_TOOL_PREFIX, ThreadLog, ThreadProblem, ThreadView
from .tokens import MESSAGE_OVERHEAD, Memo, TokenCounter, default_counter, memo_enabled
from .validate import (
    Facts,
    Record,
    Scans,
    Sizes,
    facts_like,
    facts_stage_problem,
    message_problem,
    message_record,
    stage_problem,
)

MEMORY_RECORDS = 10_000
MEMORY_RECORDS_BYTES = 16 * 1024 * 1024  # and at most this much of them (each sized as JSON)
SECRET_HEADERS = ("x-api-key", "authorization", "proxy-authorization", "cookie", "x-goog-api-key")
log = logging.getLogger("tokensaver")


def key_hash(secret: str | None) -> str:
    """Namespace for per-key state (memoized answers): a sha256 prefix, never the secret itself."""
    return hashlib.sha256(("tokensaver:" + (secret or "")).encode()).hexdigest()[:24]


def public_headers(headers: dict[str, Any] | None) -> dict[str, str]:
    """Request headers with names lowercased and credentials removed."""
    out: dict[str, str] = {}
    for k, v in (headers or {}).items():
        name = str(k).lower()
        if name in SECRET_HEADERS or not isinstance(v, str):
            continue
        out[name] = v
    return out


def _role_content(m: dict[str, Any]) -> bool:
    """A message of just a plain ``role`` and its ``content`` (the common case the guard inlines)."""
    return len(m) == 2 and "content" in m and "role" in m and not isinstance(m["role"], dict | list)


class _Guard:
    """The copies of a call's blocks that its plugins get, so no plugin can edit a block that is sent.

    A plugin gets its own containers (body, message list, messages, content, system and tools
    lists) holding copies of the blocks (and of the body's other dict and list values): every dict
    and list copied, strings shared, so a copy is a walk, not a copy of the text. Nothing a plugin
    does to them (nor a hung plugin's late thread) reaches the caller's request or what is sent.
    Blocks are to be treated as immutable: :meth:`intact` is False when a plugin edited one in place.

    A block's copy is made once per call and handed to each later plugin while it is found intact
    after a plugin returns; after a plugin that timed out or failed, every copy is dropped (its
    thread may still hold them). :meth:`restore` puts the originals back where a stage returned
    blocks it did not change, so stage outputs share the blocks of their input by identity (and
    per-block counts and digests are found by identity).
    """

    def __init__(self, memo: Memo | None = None) -> None:
        # id(original) -> its copy; ``back`` keeps the original alive while its copy is in ``pool``
        # (so no other object can take its id), and ``origs`` / ``copies`` hold both in the order
        # made, for one list compare in :meth:`intact` (no tuple per block)
        self.pool: dict[int, Any] = {}
        self.back: dict[int, Any] = {}  # id(copy) -> original
        self.origs: list[Any] = []
        self.copies: list[Any] = []
        # the call's token counts by block identity: a copy is counted as its original
        self.memo: Memo = {} if memo is None else memo
        self.counted: list[int] = []  # the ids of the copies entered in ``memo`` (each alive in ``copies``)

    def give(self, body: dict[str, Any]) -> dict[str, Any]:
        """``body`` with its own containers and a copy of each block (the ones made before, if intact).

        The copies made for the call are kept (and checked) until :meth:`drop`: a later stage gets
        the copy an earlier one was given of the same block, so a block is copied once per call.
        """
        pool, back, memo = self.pool, self.back, self.memo
        known = pool.get
        keep_orig, keep_copy, keep_count = self.origs.append, self.copies.append, self.counted.append

        def leaf(value: Any) -> Any:
            if not isinstance(value, dict | list):
                return value
            kept = known(id(value))
            if kept is not None:
                return kept
            own = thaw(value)
            seen = memo.get(id(value))
            if seen is not None and seen[0] is value:
                memo[id(own)] = (own, seen[1])
                keep_count(id(own))
            pool[id(value)] = own
            back[id(own)] = value
            keep_orig(value)
            keep_copy(own)
            return own

        out: dict[str, Any] = {}
        for key, value in body.items():
            if key == "messages" and isinstance(value, list):
                msgs = []
                for m in value:
                    if isinstance(m, dict):
                        mine = dict(m)
                        if _role_content(m):
                            # (inlined: the common case, {role, content}, its blocks copied before)
                            v = m.get("content")
                            if isinstance(v, list):
                                mine["content"] = [
                                    c if (c := known(id(b))) is not None else leaf(b) for b in v
                                ]
                            elif isinstance(v, dict):
                                mine["content"] = leaf(v)
                            msgs.append(mine)
                            continue
                        for k, v in m.items():
                            if k == "content" and isinstance(v, list):
                                mine[k] = [c if (c := known(id(b))) is not None else leaf(b) for b in v]
                            elif isinstance(v, dict | list):
                                mine[k] = leaf(v)
                        msgs.append(mine)
                    else:
                        msgs.append(leaf(m))
                out[key] = msgs
            elif key in ("system", "tools") and isinstance(value, list):
                out[key] = [leaf(b) for b in value]
            else:
                out[key] = leaf(value)
        return out

    def intact(self) -> bool:
        """Every copy handed out still equals its original (strings shared: a cheap compare)."""
        return self.copies == self.origs

    def drop(self) -> None:
        """Forget every copy: the plugin that had them may still be running or may have edited them."""
        # (a copy's id is its own while ``copies`` holds it: what ``memo`` has under it is the copy's)
        pop = self.memo.pop
        for k in self.counted:
            pop(k, None)
        self.pool, self.back, self.origs, self.copies, self.counted = {}, {}, [], [], []

    def restore(self, result: Any) -> None:
        """Make ``result`` (a stage's output, its copies found intact) hold no object of a plugin's.

        In place: where it holds a copy of a block, the original goes back; any other dict or list
        block is replaced by a copy of its own, so that nothing a plugin still holds (its state, a
        copy it was given) is part of what the next stages get and what is sent.
        """
        back = self.back.get
        if not isinstance(result, dict):
            return

        def own(value: Any) -> Any:
            if not isinstance(value, dict | list):
                return value
            orig = back(id(value))
            return orig if orig is not None else thaw(value)

        for key, value in result.items():
            if key == "messages" and isinstance(value, list):
                for i, m in enumerate(value):
                    if isinstance(m, dict):
                        if _role_content(m):
                            # (inlined: the common case, {role, content})
                            v = m.get("content")
                            if isinstance(v, list):
                                v[:] = [o if (o := back(id(b))) is not None else own(b) for b in v]
                            elif isinstance(v, dict):
                                m["content"] = own(v)
                            continue
                        for k, v in m.items():
                            if k == "content" and isinstance(v, list):
                                v[:] = [o if (o := back(id(b))) is not None else own(b) for b in v]
                            elif isinstance(v, dict | list):
                                m[k] = own(v)
                    else:
                        value[i] = own(m)
            elif key in ("system", "tools") and isinstance(value, list):
                value[:] = [own(b) for b in value]
            else:
                result[key] = own(value)


class _Records(deque[dict[str, Any]]):
    """A process's latest records: at most ``maxlen`` and ``max_bytes`` of them (orjson size), oldest out."""

    def __init__(self, maxlen: int, max_bytes: int) -> None:
        super().__init__(maxlen=maxlen)
        self.max_bytes, self.nbytes = max_bytes, 0
        self.sizes: deque[int] = deque()

    def append(self, record: dict[str, Any]) -> None:
        try:
            size = len(orjson.dumps(record, default=str))
        except TypeError:  # not JSON orjson takes: sized by its text
            size = len(str(record))
        if self.maxlen is not None and len(self) == self.maxlen:
            self.nbytes -= self.sizes.popleft()
        super().append(record)
        self.sizes.append(size)
        self.nbytes += size
        while len(self) > 1 and self.nbytes > self.max_bytes:
            super().popleft()
            self.nbytes -= self.sizes.popleft()

    def clear(self) -> None:
        super().clear()
        self.sizes.clear()
        self.nbytes = 0


_BlockFacts = tuple[bytes, int, bool]  # a block's content digest, tokens, image flag
# a message's facts, found by its serialization's digest: its record, serialized size, tokens (framing
# included) and each block's facts
_Known = tuple[Record, int, int, tuple[_BlockFacts, ...]]
KNOWN_BYTES = 16 * 1024 * 1024  # what _MESSAGES keeps in all (each entry sized by a fixed estimate)
_xxh = xxhash.xxh3_128_digest


class _MessageTable:
    """Each message's facts by the digest of its serialization (orjson, xxh3-128), across calls and
    conversations: a conversation's next call repeats its earlier messages, which are then neither
    digested block by block, counted nor checked again. Bounded by ``max_bytes`` (each entry's size
    estimated: 300 bytes, 150 a block, its thinking blocks' text), oldest first out."""

    def __init__(self, max_bytes: int = KNOWN_BYTES) -> None:
        self.data: dict[bytes, tuple[_Known, int]] = {}
        self.max_bytes, self.nbytes = max_bytes, 0
        self.lock = threading.Lock()

    def get(self, key: bytes) -> _Known | None:
        hit = self.data.get(key)
        return None if hit is None else hit[0]

    def put(self, key: bytes, known: _Known) -> None:
        size = 300 + 150 * len(known[3]) + sum(len(str(b)) for b in known[0][3])
        with self.lock:
            data = self.data
            old = data.pop(key, None)
            if old is not None:
                self.nbytes -= old[1]
            data[key] = (known, size)
            self.nbytes += size
            while self.nbytes > self.max_bytes and data:
                self.nbytes -= data.pop(next(iter(data)))[1]


_MESSAGES = _MessageTable()


def _plain(message: Any) -> bool:
    """A message of plain JSON containers down to its blocks (no tuple, no subclass: its record is
    a function of its serialization, so a table entry found by that serialization's digest is its own)."""
    if type(message) is not dict:
        return False
    content = message.get("content")
    return type(content) is str or (type(content) is list and all(type(b) is dict for b in content))


def _content_blocks(message: Any) -> list[Any]:
    content = message.get("content") if isinstance(message, dict) else None
    return [content] if isinstance(content, str) else content if isinstance(content, list) else []


def _digest_blocks(body: dict[str, Any], memo: Memo, facts: BillingMemo) -> Facts:
    """Each block's content digest, token count and image flag, by identity, in one pass, and the
    body's per-message facts (the request rules' records, counts and sizes).

    A message found by its serialization's digest in the bounded per-message table brings its
    blocks' facts; else each block's digest (orjson + xxh3) finds its count in the bounded
    per-content table, so a block the conversation sent before is not serialized canonically nor
    tokenized again; the same facts serve the call's token figures and its shadow-cache billing.
    """
    on = memo_enabled()
    head = 0
    tools, system = body.get("tools"), body.get("system")
    for b in [
        *(tools if isinstance(tools, list) else ()),
        *([system] if isinstance(system, str) else system if isinstance(system, list) else ()),
    ]:
        digest, tokens, image = block_facts(b)
        memo[id(b)] = (b, tokens)
        facts[id(b)] = (b, digest, tokens, image)
        head += tokens
    messages = body.get("messages")
    records: list[Record] = []
    counts: list[int] = []
    sizes: list[int | None] = []
    keys: list[bytes | None] = []
    table = _MESSAGES.data.get  # (a dict read needs no lock)
    for m in messages if isinstance(messages, list) else ():
        try:
            raw: bytes | None = orjson.dumps(m)
        except TypeError:
            raw = None
        key = _xxh(raw) if raw is not None and on else None
        keys.append(key)
        hit = table(key) if key is not None else None
        content = m.get("content") if isinstance(m, dict) else None
        blocks = [content] if isinstance(content, str) else content if isinstance(content, list) else []
        if hit is not None and len(hit[0][3]) == len(blocks):
            known = hit[0]
            for b, (digest, tokens, image) in zip(blocks, known[3], strict=False):  # (same lengths)
                memo[id(b)] = (b, tokens)
                facts[id(b)] = (b, digest, tokens, image)
            records.append(known[0])
            counts.append(known[2])
            sizes.append(known[1])
            continue
        told: list[_BlockFacts] = []
        total = 0
        for b in blocks:
            digest, tokens, image = block_facts(b)
            memo[id(b)] = (b, tokens)
            facts[id(b)] = (b, digest, tokens, image)
            told.append((digest, tokens, image))
            total += tokens
        record = message_record(m)
        count = MESSAGE_OVERHEAD + total if isinstance(m, dict) else 0
        records.append(record)
        counts.append(count)
        sizes.append(None if raw is None else len(raw))
        if key is not None and raw is not None:
            _MESSAGES.put(key, (record, len(raw), count, tuple(told)))
    return Facts(records, counts, sizes, head, digests=keys if on else None)


def _stage_digests(
    body: dict[str, Any], start: dict[str, Any], given: list[bytes | None] | None, named: Named, known: Named
) -> list[bytes | None] | None:
    """Each message's serialization digest in a stage's input ``body``: a message of ``start`` (the
    caller's, digested with ``given``) or one a stage made (``named``, found as its output was
    checked) by identity, else made here (and kept in ``known`` for the stages after). None when the
    core keeps no digests (memo off) or the body has no message list."""
    msgs = body.get("messages")
    if given is None or not isinstance(msgs, list):
        return None
    if not known:
        for m, g in zip(start.get("messages") or (), given, strict=False):
            if g is not None:
                known[id(m)] = (m, g)
    out: list[bytes | None] = []
    add = out.append
    for m in msgs:
        seen = known.get(id(m)) or named.get(id(m))
        if seen is not None and seen[0] is m:
            add(seen[1])
            continue
        try:
            d: bytes | None = _xxh(orjson.dumps(m))
        except TypeError:
            d = None
        if d is not None:
            known[id(m)] = (m, d)
        add(d)
    return out


def _stage_facts(
    result: dict[str, Any],
    current: dict[str, Any],
    given: Facts,
    counter: TokenCounter,
    memo: Memo,
    facts: BillingMemo | None = None,
    named: Named | None = None,
) -> Facts:
    """The facts of a stage's output, from those of its input for the messages it kept; the others
    found by their serialization's digest in the bounded per-message table (a stage's rewrite of a
    message is mostly the one it made on the conversation's previous call), else checked anew and
    counted (by identity in the call's memo, else by content digest) once the output is found valid.
    A block counted here has its digest made once for the call's billing too (``facts``)."""
    on = memo_enabled()
    keys: dict[int, bytes] = {}  # message index -> digest, for the messages not in the table

    def count(b: Any) -> int:
        seen = memo.get(id(b))
        if seen is not None and seen[0] is b:
            return int(seen[1])
        if facts is None:
            n = counter.block(b)
        else:
            digest, n, image = block_facts(b)
            facts[id(b)] = (b, digest, n, image)
        memo[id(b)] = (b, n)
        return n

    like = current.get("messages") or []
    places: dict[int, int] = {}  # id of a message's first block (or string content) -> its place in ``like``

    def moved(m: Any) -> int | None:
        """The place in ``like`` of a message equal to ``m`` that the stage moved (a cut before it)."""
        if not places:
            for i, was in enumerate(like):
                c = was.get("content") if isinstance(was, dict) else None
                places.setdefault(id(c[0]) if isinstance(c, list) and c else id(c), i)
        c = m.get("content") if isinstance(m, dict) else None
        if c is None or (isinstance(c, list) and not c):
            return None
        at = places.get(id(c[0]) if isinstance(c, list) else id(c))
        return at if at is not None and like[at] == m else None

    def fresh(m: Any) -> tuple[Record, int, int | None]:
        i = moved(m)
        if i is not None:  # (its facts are a function of its content: those of its equal in ``like``)
            return given.records[i], given.tokens[i], given.sizes[i]
        try:
            raw: bytes | None = orjson.dumps(m)
        except TypeError:
            raw = None
        if raw is None:
            return message_record(m), -1, None
        if on and facts is not None and _plain(m):
            key = _xxh(raw)
            if named is not None:
                named[id(m)] = (m, key)  # (for the call's billing: a stage's rewrite, found again)
            known = _MESSAGES.get(key)
            blocks = _content_blocks(m)
            if known is not None and len(known[3]) == len(blocks):
                for b, (digest, tokens, image) in zip(blocks, known[3], strict=True):
                    memo[id(b)] = (b, tokens)
                    facts[id(b)] = (b, digest, tokens, image)
                return known[0], known[2], known[1]
            keys[id(m)] = key
        return message_record(m), -1, len(raw)  # counted once the output is found valid

    out = facts_like(result["messages"], like, given, fresh)

    same_head = result.get("tools") == current.get("tools") and result.get("system") == current.get("system")

    def counted() -> None:
        for i, m in enumerate(result["messages"]):
            if out.tokens[i] < 0:
                blocks = _content_blocks(m)
                out.tokens[i] = MESSAGE_OVERHEAD + sum(count(b) for b in blocks) if isinstance(m, dict) else 0
                key = keys.get(id(m))
                size = out.sizes[i]
                if key is not None and facts is not None and size is not None:
                    told = []
                    for b in blocks:
                        f = facts.get(id(b))
                        if f is None or f[0] is not b:
                            break
                        told.append((f[1], f[2], f[3]))
                    else:
                        _MESSAGES.put(key, (out.records[i], size, out.tokens[i], tuple(told)))
        if same_head:
            out.head = given.head
        else:
            tools, system = result.get("tools"), result.get("system")
            out.head = sum(count(t) for t in tools) if isinstance(tools, list) else 0
            out.head += count(system) if isinstance(system, str) else 0
            out.head += sum(count(b) for b in system) if isinstance(system, list) else 0

    out.count = counted
    return out


def _structural_error(exc: BaseException) -> str:
    """What the ledger keeps of a plugin's exception: its class and where it was raised, never its
    message (a plugin's message may quote the prompt). Our own PluginFault messages are structural.
    """
    if isinstance(exc, PluginFault):
        return f"{type(exc).__name__}: {exc}"
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f" at {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}" if tb is not None else ""
    return f"{type(exc).__name__}{where}"


def _tool_answer_problem(answer: Any) -> str | None:
    if isinstance(answer, str) or (
        isinstance(answer, list)
        and all(isinstance(b, dict) and isinstance(b.get("type"), str) for b in answer)
    ):
        return None
    return f"not tool_result content: a {type(answer).__name__}"


@dataclass
class Call:
    """One call in flight: its context, bodies and measurements, until it is recorded."""

    ctx: CallContext
    original: dict[str, Any]
    body: dict[str, Any]
    tokens_original: int
    tokens_sent: int
    stages: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    short_circuit: str | None = None
    response: dict[str, Any] | None = None
    overhead_ms: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    surface: str = "messages"
    attempt: int = 0
    recorded: bool = False
    exact: dict[str, int] | None = None  # count_tokens figures in exact mode
    bodies: list[dict[str, Any]] = field(default_factory=list)  # the body after each stage, for billing
    estimate: Estimate | None = None  # billed through the shadow caches once, when first recorded
    guard: _Guard = field(default_factory=lambda: _Guard())  # the copies its plugins get, its counts
    sizes: Sizes = field(default_factory=dict)  # per-block sizes by identity, for the 32 MB check
    facts: BillingMemo = field(default_factory=dict)  # the caller's blocks' digests and counts, by identity
    digests: list[bytes | None] | None = None  # each message's serialization digest (the caller's request)
    named: Named = field(default_factory=dict)  # the stages' new messages' digests, by identity
    scans: Scans = field(default_factory=dict)  # each stage body's thinking blocks, by identity
    # a message-thread request (tokensaver.threads): the stages get and bill the whole conversation
    thread: ThreadView | None = None
    view: dict[str, Any] | None = None  # the last stage's whole conversation (a continue sends its tail)
    state_mark: int = 0  # the state's outages counted when the call began (a record's state_lost)
    # the API refused a thinking block bound to another prefix: the thinking stripped, sent again
    unbound: dict[str, Any] | None = None


class Pipeline:
    """Built per wrap() from config: a plugin manager, the enabled stages, state, the run."""

    door = "wrap"  # the metrics' label for its calls; the proxy's pipelines say "proxy"

    def __init__(
        self,
        config: Config | dict[str, Any] | str | None = None,
        *,
        plugin_manager: pluggy.PluginManager | None = None,
        run: Run | str | None = None,
        clock: Any = None,
    ) -> None:
        self.pm = plugin_manager or get_plugin_manager()
        self.config = config if isinstance(config, Config) else load_config(config, pm=self.pm)
        self.prices = PriceTable(self.config.prices)
        self.counter = default_counter()
        self.states: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.clock = clock  # callable returning epoch seconds (trace replays drive it); None = time.time
        if isinstance(run, Run):
            self.run: Run | None = run
        elif self.config.record or run is not None:
            self.run = Run(run, runs_dir=self.config.runs_dir, config=self.config.as_dict())
        else:
            self.run = None
        # this process's latest records, also when not persisted; bounded so a long-lived service does
        # not grow without limit (the run ledger on disk keeps every call)
        self.records: deque[dict[str, Any]] = _Records(MEMORY_RECORDS, MEMORY_RECORDS_BYTES)
        # what the caller's own requests would have been billed: shadow prompt caches per key hash
        # (the proxy shares one between its session pipelines, as the API's cache is per key)
        # (on a Redis ``state``, their entries are shared by the replicas, as the API's cache is)
        self.shadows = ShadowCaches(self.prices, shared=shared_cache(self.config.state))
        self._store = open_state(self.config.state)  # a call's record says when it was lost
        # message threads: what each thread's API side holds and the caller's own history, bounded
        self.threads = ThreadLog(shared=shared_spaces(self.config.state, "threads", THREADS_CAP))
        # which conversation each call belongs to (tokensaver.conversations), on the decisions' state
        self.conversations = conversation_index(self.config.state)

    # -- request phase -----------------------------------------------------------------------

    @collection_held
    def begin(
        self,
        body: dict[str, Any],
        *,
        headers: dict[str, Any] | None = None,
        key: str = "",
        stream: bool = False,
        surface: str = "messages",
        attempt: int = 0,
        upstream: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> Call:
        """Run the transform stages and the short-circuit lookup for one call attempt.

        :param upstream: sends a plugin's own Messages body to the caller's API and returns the
            Message (``ctx.call_model()``); None where there is none.
        """
        t0 = time.perf_counter()
        now = self.clock() if self.clock else time.time()
        # a thread continue holds only its new messages: the stages get (and accounting bills) the
        # whole conversation the API rebuilds; what is sent is the continue again (tokensaver.threads)
        thread = self.threads.open(body, key, now)
        start = thread.given if thread is not None else body  # what the first stage gets
        whole = thread.original if thread is not None else body
        # per-block digests and counts by identity for this call: the caller's blocks (each found by
        # its content digest in the bounded per-content tables, else counted), then the blocks each
        # stage adds; the copies plugins get count as their originals
        memo: Memo = {}
        facts: BillingMemo = {}
        whole_facts = _digest_blocks(whole, memo, facts)
        start_facts = whole_facts if start is whole else _digest_blocks(start, memo, facts)
        conversation = self.conversations.identify(whole, key, facts)
        ctx = CallContext(
            model=self.prices.get(str(body.get("model", ""))),
            counter=self.counter.scoped(memo),
            prices=self.prices,
            conversation=conversation,
            key_hash=key,
            call_id="c-" + uuid.uuid4().hex[:12],
            stream=stream,
            headers=public_headers(headers),
            now=now,
            _states=self.states,
            upstream=upstream,
            state_url=self.config.state,
        )
        original = body
        # (the facts count each tool and block as sent; deferred tools and what loads them as billed)
        sent = ctx.counter.block
        tokens_original = whole_facts.head + sum(whole_facts.tokens) + deferred_tokens(whole, sent)
        call = Call(
            ctx=ctx,
            original=original,
            body=body,
            tokens_original=tokens_original,
            tokens_sent=tokens_original,
            surface=surface,
            attempt=attempt,
            guard=_Guard(memo),
            facts=facts,
            digests=whole_facts.digests,
            thread=thread,
            state_mark=self._store.mark(),
        )
        # a continue's stages start from the history as sent (transformed), not the caller's
        current, before = (
            start,
            tokens_original
            if start is whole
            else start_facts.head + sum(start_facts.tokens) + deferred_tokens(start, sent),
        )
        current_facts: Facts | None = start_facts if isinstance(start.get("messages"), list) else None
        hook = "tokensaver_transform_request"
        # a continue of a thread not kept here is sent as it came (its history is unknown)
        stages = [] if thread is not None and thread.opaque else ordered(self.pm, hook, self.config.plugins)
        known: Named = {}  # the digests of the call's messages by identity, as the stages read them
        for name, impl in stages:
            s0 = time.perf_counter()
            error = None
            result_facts: Facts | None = None
            shared = reads_only(self.pm, name)
            given = current if shared else call.guard.give(current)
            # the per-message digests of the body the stage gets (made when first read)
            ctx.message_digests = (
                start_facts.digests
                if current is start
                else lambda body=current: _stage_digests(body, start, start_facts.digests, call.named, known)
            )
            try:
                result = self._call(call, name, hook, impl, body=given)
                if not shared and not call.guard.intact():
                    raise PluginFault("mutated_input", "a block of its input was edited in place")
                if result is not None:
                    if not shared:
                        call.guard.restore(result)
                    if thread is not None:
                        result = self.threads.project(thread, result)  # only the new messages change
                    if result == current:
                        result = None  # the same request: the caller's bytes go out as they came
                    elif (
                        current_facts is not None
                        and isinstance(result, dict)
                        and isinstance(result.get("messages"), list)
                    ):
                        result_facts = _stage_facts(
                            result, current, current_facts, self.counter, memo, call.facts, call.named
                        )
                        problem = facts_stage_problem(
                            result, result_facts, current, current_facts, call.sizes
                        )
                        if problem:
                            raise PluginFault(f"invalid_output: {problem}")
                    else:
                        problem = stage_problem(result, current, call.sizes, call.scans)
                        if problem:
                            raise PluginFault(f"invalid_output: {problem}")
            except ThreadProblem as exc:
                result, error = None, self._plugin_error(call, name, hook, PluginFault("thread", str(exc)))
            except Exception as exc:
                call.guard.drop()  # the plugin may still hold (or have edited) its copies
                result, error = None, self._plugin_error(call, name, hook, exc)
            if result is None:
                after = before
            elif result_facts is not None:
                result_facts.count()
                after = result_facts.head + sum(result_facts.tokens) + deferred_tokens(result, sent)
            else:
                after = self.counter.request(result, memo)
            call.stages.append(
                {
                    "plugin": name,
                    "before": before,
                    "after": after,
                    "ms": round((time.perf_counter() - s0) * 1000, 3),
                    "error": error,
                    "changed": result is not None,
                }
            )
            if result is not None:
                if result.get("model") != current.get("model"):
                    # a stage sent the call to another model (route): later stages and the bill see it
                    ctx.model = self.prices.get(str(result.get("model", "")))
                current, before, current_facts = result, after, result_facts
            call.bodies.append(current)
        ctx.message_digests = None
        call.view = current
        if current is start and not is_follow_up(whole):
            call.body = body  # unchanged: the caller's bytes go out as they came
        elif thread is not None and thread.kind == "continue":
            call.body = self.threads.wire(thread, current)
        else:
            # a plugin-tool round is never the caller's request, even unchanged: its own body is sent
            call.body = current if current is not body else dict(body)
        call.tokens_sent = before
        # a stored answer's id was never stored by the API: a thread's next continue would not find it
        hit_by, hit = (
            (None, None)
            if thread is not None
            else self._run_hook(
                call, "tokensaver_lookup_response", first=True, check=message_problem, body=current
            )
        )
        if hit is not None:
            call.short_circuit = hit_by
            call.response = hit
        # the plugins are done with their copies: they go now, not when the call is recorded (what
        # the call keeps alive until then is what the cyclic collector walks, and promotes, meanwhile)
        call.guard.drop()
        call.overhead_ms = (time.perf_counter() - t0) * 1000
        return call

    def _enter(self, ctx: CallContext, name: str) -> None:
        ctx.plugin = name
        ctx.settings = self.config.plugin_settings.get(name, {})

    def _call(self, call: Call, name: str, hook: str, impl: Any, **kwargs: Any) -> Any:
        """One plugin's hook in a worker thread, bounded by its timeout (raises PluginFault past it)."""
        self._enter(call.ctx, name)
        return hook_runner().call(
            name, self.config.timeout_for(name), call_one, impl=impl, ctx=call.ctx, **kwargs
        )

    def _plugin_error(self, call: Call, name: str, hook: str, exc: BaseException) -> str:
        """Blame ``name`` for a discarded hook call in the record (strict mode: raise TransformError)."""
        if self.config.strict:
            raise strict_error(name, hook, exc) from exc
        kind = exc.kind if isinstance(exc, PluginFault) else "raised"
        error = _structural_error(exc)
        logging.getLogger(f"tokensaver.plugins.{name}").warning(
            "plugin %r failed in %s (skipped, fail open): %s: %s",
            name,
            hook,
            type(exc).__name__,
            redact_text(str(exc)),
        )
        call.errors.append({"plugin": name, "hook": hook, "kind": kind, "error": error})
        return error

    def answer_tool_use(self, call: Call, tool_use: dict[str, Any]) -> Any | None:
        """A plugin's answer to a tool call addressed to it (``tokensaver_*`` tools), or None."""
        return self._run_hook(
            call, "tokensaver_answer_tool_use", first=True, check=_tool_answer_problem, tool_use=tool_use
        )[1]

    def _run_hook(
        self,
        call: Call,
        hook: str,
        *,
        first: bool,
        check: Callable[[Any], str | None] | None = None,
        **kwargs: Any,
    ) -> tuple[str | None, Any]:
        """Call ``hook`` on each enabled plugin in order, bounded in time, failing open (strict: raising).

        With ``first``, stop at the first non-None result that ``check`` finds no problem with and
        return it with its plugin's name. A lookup gets its own copy of the body, as stages do.
        """
        for name, impl in ordered(self.pm, hook, self.config.plugins):
            args, guarded = kwargs, hook == "tokensaver_lookup_response" and not reads_only(self.pm, name)
            if guarded:
                args = {**kwargs, "body": call.guard.give(kwargs["body"])}
            try:
                result = self._call(call, name, hook, impl, **args)
                if guarded and not call.guard.intact():
                    raise PluginFault("mutated_input", "a block of its input was edited in place")
                problem = check(result) if check is not None and result is not None else None
                if problem:
                    raise PluginFault(f"invalid_output: {problem}")
            except Exception as exc:
                if guarded:
                    call.guard.drop()
                self._plugin_error(call, name, hook, exc)
                continue
            if first and result is not None:
                return name, result
        return None, None

    # -- response phase ----------------------------------------------------------------------

    @collection_held
    def finish(
        self,
        call: Call,
        response: dict[str, Any] | None,
        *,
        status: int | str = 200,
        error: str | None = None,
    ) -> dict[str, Any]:
        """Observe a completed response (or record a failure) and write the call's record once."""
        t0 = time.perf_counter()
        ctx = call.ctx
        try:
            if call.short_circuit:
                response = call.response
            elif response is not None and status == 200:
                ctx.usage = normalize_usage(response.get("usage"))
                if call.thread is not None and call.view is not None:
                    self._keep_thread(call, response)
                self._run_hook(
                    call,
                    "tokensaver_observe_response",
                    first=False,
                    body=call.body if call.view is None else call.view,
                    response=response,
                )
            call.overhead_ms += (time.perf_counter() - t0) * 1000
            record = self._record(call, response, status, error)
        finally:
            ctx.end()  # whatever the outcome, nothing a plugin holds for the call (a claim) outlives it
        return record

    def _keep_thread(self, call: Call, response: dict[str, Any]) -> None:
        """Keep the thread at this reply: what the caller was handed (the exchange's answer; none yet
        while a plugin's tool call is being answered) and the conversation as sent."""
        assert call.thread is not None and call.view is not None
        answer = call.ctx.exchange_answer
        if answer is None and not calls_plugin_tool(response):
            answer = response
        try:
            self.threads.commit(call.thread, call.view, response, answer, call.ctx.now)
        except Exception:  # never fail a paid call: the next continue goes untransformed
            log.warning("tokensaver: could not keep a message thread", exc_info=True)

    def _record(
        self, call: Call, response: dict[str, Any] | None, status: int | str, error: str | None
    ) -> dict[str, Any]:
        t0 = time.perf_counter()
        # the call is billed at the model it was sent to, its counterfactual at the one asked for
        ctx, model = call.ctx, call.ctx.model
        usage = normalize_usage((response or {}).get("usage")) if response else None
        ok = status == 200 and response is not None
        # plugins' own model calls (summaries...) are paid whatever became of the call itself
        side = [dict(e) for e in ctx.side_calls]
        side_cost = sum(float(e.get("cost_usd") or 0.0) for e in side)
        sent = ok and usage is not None and not call.short_circuit
        whole = call.thread.original if call.thread is not None else call.original
        follow_up = is_follow_up(whole)
        if call.estimate is None:
            sent_as = (call.bodies[-1] if call.bodies else whole).get("model")
            asked = model if sent_as == whole.get("model") else self.prices.get(str(whole.get("model", "")))
            call.estimate = self.shadows.estimate(
                ctx.key_hash,
                ctx.now,
                asked,
                whole,
                call.bodies,
                usage=usage if ok else None,
                sent=sent,
                caller=not follow_up,
                conversation=ctx.conversation,
                memo=call.facts,
                digests=call.digests,
                named=call.named,
            )
        est = call.estimate
        cost = model.cost(usage) if sent and usage is not None else 0.0
        counterfactual = est.counterfactual_usd
        saved = counterfactual - cost - side_cost
        for k, stage in enumerate(call.stages):
            stage["saved_tokens"] = stage["before"] - stage["after"] if ok else 0
            stage["saved_usd"] = round(est.stage_usd[k] if k < len(est.stage_usd) else 0.0, 8)
        if sent and follow_up and call.stages:
            # a round the caller never asked for (a plugin tool's answer): the stage that offered the
            # tool pays for it
            call.stages[_tool_adder(call)]["saved_usd"] = round(-cost, 8)
        for stage in call.stages:
            paid = sum(float(e.get("cost_usd") or 0.0) for e in side if e["plugin"] == stage["plugin"])
            if paid:
                stage["model_calls_usd"] = round(paid, 8)
                stage["saved_usd"] = round(stage["saved_usd"] - paid, 8)
        call.overhead_ms += (time.perf_counter() - t0) * 1000
        record = {
            "type": "call",
            "id": ctx.call_id,
            "t": ctx.now,
            "conversation": ctx.conversation,
            "model": str(call.original.get("model", "")),
            "priced_as": model.name,
            "price_warning": (
                f"unknown model {model.fallback_from!r} priced as {model.name}"
                if model.fallback_from
                else None
            ),
            "surface": call.surface,
            "stream": ctx.stream,
            "attempt": call.attempt,
            "status": status,
            "error": error,
            "tokens_original": call.tokens_original,
            "tokens_sent": call.tokens_sent,
            "stages": call.stages,
            "short_circuit": call.short_circuit,
            "usage": usage,
            "cost_usd": round(cost + side_cost, 8),
            "counterfactual_usd": round(counterfactual, 8),
            "auto_usd": round(est.auto_usd, 8),
            "estimate_usd": None if est.estimate_usd is None else round(est.estimate_usd, 8),
            "estimate_error_usd": None
            if est.estimate_error_usd is None
            else round(est.estimate_error_usd, 8),
            "saved_usd": round(saved, 8),
            "overhead_ms": round(call.overhead_ms, 3),
            "errors": call.errors,
            "plugins": copy.deepcopy(ctx.notes),
        }
        if call.short_circuit and ok:
            record["short_circuit_usd"] = round(counterfactual, 8)
        if follow_up:
            record["follow_up"] = True
        if call.unbound:
            record["thinking_unbound"] = call.unbound
        if self._store.lost_since(call.state_mark):
            record["state_lost"] = True  # the shared state was unreachable during the call (fail open)
        if side:
            record["model_calls"] = side
        if call.exact:
            record["tokens_original_exact"] = call.exact["tokens_original"]
            record["tokens_sent_exact"] = call.exact["tokens_sent"]
        if response and isinstance(response.get("context_management"), dict):
            edits = response["context_management"].get("applied_edits") or []
            record["server_cleared_tokens"] = sum(int(e.get("cleared_input_tokens") or 0) for e in edits)
        if not call.recorded:
            call.recorded = True
            # the ledger never raises into a paid call; it gives back the record as kept (key-like
            # strings redacted, a failed write noted in "ledger_error"), which memory keeps too
            record = self.run.append(record) if self.run is not None else redact_keys(record)[0]
            with self._lock:
                self.records.append(record)
            metrics.emit(record, self.door)  # OpenTelemetry / Prometheus, from the record as kept
        return record


def is_plugin_tool_use(block: Any) -> bool:
    """Whether a content block calls a tool that plugins answer themselves (``tokensaver_*``)."""
    return (
        isinstance(block, dict)
        and block.get("type") == "tool_use"
        and str(block.get("name", "")).startswith(PLUGIN_TOOL_PREFIX)
    )


def calls_plugin_tool(message: Any) -> bool:
    """Whether a message (an answer, or an assistant turn) calls a plugin's tool."""
    content = message.get("content") if isinstance(message, dict) else None
    return isinstance(content, list) and any(is_plugin_tool_use(b) for b in content)


def is_follow_up(body: dict[str, Any]) -> bool:
    """A plugin-tool follow-up round: its last assistant turn called a plugin's tool.

    The caller never sees plugin tool calls, so no request of its own ends that way.
    """
    msgs = body.get("messages")
    return isinstance(msgs, list) and len(msgs) >= 2 and calls_plugin_tool(msgs[-2])


def plugin_tools(body: dict[str, Any]) -> set[str]:
    """Names of the tools in a request that plugins answer themselves (``tokensaver_*``)."""
    tools = body.get("tools")
    if not isinstance(tools, list):
        return set()
    return {
        t["name"]
        for t in tools
        if isinstance(t, dict) and isinstance(t.get("name"), str) and t["name"].startswith(PLUGIN_TOOL_PREFIX)
    }


def _tool_adder(call: Call) -> int:
    """Index of the stage that added a plugin tool to the request (else the last stage)."""
    had = bool(plugin_tools(call.thread.original if call.thread is not None else call.original))
    for k, body in enumerate(call.bodies):
        has = bool(plugin_tools(body))
        if has and not had:
            return k
        had = has
    return len(call.stages) - 1
