"""summarize: shrink large tool results by what they are (JSON, logs, grep, listings, HTML, blobs).

Saves the tokens of bulky tool output that agents resend on every later turn. Results under
``min_chars`` (default 400) are left alone. Lossless rewrites come first (ANSI codes, progress redraws, trailing
whitespace, compact JSON and record tables, grep hits and context lines grouped by file, repeated
ls -l columns; by ``shapes``: go test runs without the step lines of tests that report a result,
GitHub Actions logs with job, step and date once per run of lines, git diffs without the file lines
their ``diff --git`` line implies, mini-swe-agent's ``<returncode>``/``<output>`` tags as one
``[returncode N]`` line at any size, SWE-agent's three state lines as one ``[open: F, cwd: D]``
line at any size (in the observations of both, a Python traceback's frame lines
``File "P", line N, in F`` as ``P:N in F``; SWE-agent's review note after an edit, once an
earlier observation shows it, as a pointer to it), pip's ``Requirement already satisfied`` lines
with their install path once (3 or more in a row), an ``ls -R`` listing as a tree (a directory
per line, its entries after the colon: ``_ls_tree``); an edit's echo of its own tool use's input as a pointer to it);
lossy ones only for clearly repetitive logs (runs differing only in numbers, very long logs cut to
head + tail + every error/warning/trace line and every line with a path not shown elsewhere), long
base64 blobs, binary output and fetched web pages (to text). Source code and numbered file
contents are never elided; ``line_numbers = "compact"`` (default) only drops the padding before
their line numbers (``     12→code`` to ``12→code``: every number and every byte of the line kept),
``"keep"`` sends them as they came. ``"sparse"`` (off by default) compacts them too and, in a result
of a tool named in ``sparse_tools`` (Claude Code's ``Read``), in a run of at least
``sparse_min_lines`` (20) consecutive numbered lines (``12→code`` or today's ``12<tab>code``), drops
the number of every line but the run's first and last and those whose number is a multiple of
``line_number_step`` (10), every byte after the separator kept (the model copies them into an
edit); one note line before the first such run says how to count them. Pointers into such a result
(``_repeats``, ``_self_repeats``) read its lines under their numbers (``_summarize_text.full_lines``)
and give a line a pointer left without its neighbours its number back. Why not the default: the
model cites line numbers from the lines between (a fact the bench counts as lost), so facts kept
fall under the 99.5% line: tuning half, net of lost facts, claude-code-entire 28.4% -> 29.0% in
today's ``12<tab>`` form (33.4% -> 34.8% as recorded) with facts kept 99.5% -> 99.1% (lost results
21 -> 53), spotter 13.8% -> 15.3%; validation half claude-code-entire 26.3% -> 26.8% (facts kept
99.6% -> 99.4%) and recorded spotter 36.2% -> 33.6%; for every tool (``sparse_tools = []``)
mini-swe-agent, which edits by line number, 17.6% -> 12.5%.

``user_texts`` (default on): tool output an agent sends as the text of a user turn (SWE-agent
without tools) gets the repeat pointers too, to earlier user turns (``_user_text``); with
``assistant_texts`` (opt-in) the model's own text is pointed from as well.

``self_repeats`` (default on): a run of lines a tool output repeats from its own lines above (a
chained traceback's second half, the same failure printed per case) as a pointer to them
(``_self_repeats``).

``model_turns`` (default on): in the model's own turns (its text, its tool uses' ``command``), a
run of lines an earlier turn of the model or a tool result shows (a script written again in a
heredoc, code it read quoted in its reasoning) becomes a pointer to it (``_assistant``; only
results prune sends as they are, a turn with thinking is never rewritten).

``short_pointers`` (default on): the pointers of user_texts, self_repeats and model_turns without
the words their line range already says (the count of lines, "above", "tool_use"):
``[tokensaver: repeats lines 8-14 of the toolu_X result]`` for ``[tokensaver: 7 lines as lines
8-14 of the tool_use toolu_X result above]``, ~20% fewer tokens a pointer (prune's repeat pointers
are in that form too, always: ``_repeats.marker``'s ``short`` and ``SHORT_RESULT``). mini-swe-agent
tuning half, net of lost facts: 16.4% -> 16.9%.

Unsafe when the model needs bytes that a lossy rewrite dropped (a number in the middle of a long
repetitive log, an HTML attribute of a fetched page): set ``lossy = false`` to keep only the
lossless rewrites. Every rewrite is a pure function of the block's text and the settings, so the
same tool result gives the same bytes on every turn and prompt-cache prefixes stay valid.

``retrieval = true`` (opt-in) keeps each original that a lossy rewrite shortened, ends the rewrite
with a line naming its ``ref``, and adds a ``tokensaver_retrieve`` tool (always, so the tool list
stays byte-stable); when the model calls it, the middleware answers with the original itself and
the caller's agent only sees the final answer. Originals are kept per API key: the newest 256 in
memory, all of them in the plugin's private disk store (``summary_dir``), so a restarted process
still answers a ref and a long-lived one does not grow without bound.

``model_summaries = true`` (opt-in) condenses long prose (``summary_min_tokens``, default 2000)
with a cheaper model (``summary_model``, default ``claude-haiku-5-5``) through ``ctx.call_model``,
when it pays ``summary_payback`` times for itself; the summary's cost is charged to this stage. Each
output is decided once, when it is new, and the decision is kept (memory and ``summary_dir``), so
later turns give the same bytes; see ``_model_summary``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, fields
from typing import Any, NamedTuple, TypeVar

import orjson
import xxhash

from tokensaver.context import strip_cache_control
from tokensaver.hookspecs import hookimpl
from tokensaver.settings import Schema, boolean, choice, integer, number, path, strings, text
from tokensaver.tokens import canonical_json, fast_digest, memo_enabled

from . import _assistant, _echo, _model_summary, _self_repeats, _user_text
from ._lru import SizedLRU
from ._store import encode_entry
from ._summarize_text import SHAPE_NAMES, Options, Result, is_prose, shrink, sparse_line_numbers

_T = TypeVar("_T")
log = logging.getLogger("tokensaver.plugins.summarize")

SETTINGS = Schema(
    "summarize",
    {
        "min_chars": integer(
            Options.min_chars, "tool results shorter than this are left alone", min=1, unit="characters"
        ),
        "max_lines": integer(
            Options.max_lines,
            "a longer repetitive log is cut to head + tail + the lines that matter",
            min=1,
            unit="lines",
        ),
        "head_lines": integer(
            Options.head_lines, "lines kept at the start of a cut log", min=1, unit="lines"
        ),
        "tail_lines": integer(Options.tail_lines, "lines kept at the end of a cut log", min=1, unit="lines"),
        "min_run": integer(
            Options.min_run,
            "shortest run of lines differing only in numbers that is collapsed",
            min=3,
            unit="lines",
        ),
        "max_rows": integer(
            Options.max_rows,
            "a longer JSON table keeps its first and last rows and every row naming an error",
            min=1,
            unit="rows",
        ),
        "html": boolean(Options.html, "fetched web pages sent as text"),
        "lossy": boolean(Options.lossy, "lossy rewrites too (false: only the lossless ones)"),
        "line_numbers": choice(
            Options.line_numbers,
            ("compact", "sparse", "keep"),
            "numbered file lines: compact drops the padding before the numbers; sparse also keeps, in "
            "a run of sparse_min_lines or more, only the numbers of its first and last lines and of "
            "every line_number_step-th line (the others lose only their N→/N<tab>, one note line "
            "says so; off by default: the model cites the numbers between, and facts kept fall); keep "
            "sends them as they came",
        ),
        "line_number_step": integer(
            Options.line_number_step,
            "with line_numbers = sparse: the lines whose number is a multiple of this keep it",
            min=2,
            unit="lines",
        ),
        "sparse_min_lines": integer(
            Options.sparse_min_lines,
            "with line_numbers = sparse: the shortest run of numbered lines made sparse",
            min=3,
            unit="lines",
        ),
        "sparse_tools": strings(
            Options.sparse_tools,
            "with line_numbers = sparse: the tools whose results are made sparse (empty: every tool); "
            "Claude Code's Read, whose lines the model edits by their text: an agent that edits by "
            "line number (sed -n, nl -ba) quotes the numbers back",
            item="a tool name",
        ),
        "shapes": strings(Options.shapes, "formats recognized by their shape", choices=SHAPE_NAMES),
        "user_texts": boolean(
            True,
            "user turns after the first too (tool output sent as text): runs of lines an earlier "
            "turn's text shows as pointers to it, SWE-agent's state lines as one line",
        ),
        "assistant_texts": boolean(
            False,
            "the model's own text too: runs of lines an earlier turn's text shows (code it quotes, "
            "a file it writes again) as pointers to that turn",
        ),
        "self_repeats": boolean(
            True,
            "a run of lines (3+, 100+ characters) a tool output repeats from its own lines above (a "
            "chained traceback's frames again) as a pointer to them; with model_turns, in a model's "
            "text or command too (code it quotes twice in one turn)",
        ),
        "model_turns": boolean(
            True,
            "the model's own turns: runs of lines (3+, 100+ characters) an earlier turn of the model or "
            "a tool result shows, in its text or a tool use's command (a script written again, code it "
            "read), as pointers to it",
        ),
        "short_pointers": boolean(
            True,
            "the pointers of user_texts, self_repeats and model_turns without the words their line "
            "ranges imply (the count of lines, 'above', 'tool_use'): [tokensaver: repeats lines 8-14 "
            "of the toolu_X result]",
        ),
        "keep_originals": boolean(
            False,
            "keep the original of each block a lossy rewrite shortened (as retrieval does), without the tool",
        ),
        "retrieval": boolean(
            False, "keep originals and add a tokensaver_retrieve tool the model can call to get one back"
        ),
        "memo_entries": integer(
            20_000, "rewrites remembered per process (and kept originals per key)", min=1
        ),
        "model_summaries": boolean(False, "long prose condensed by a cheaper model when it pays for itself"),
        "summary_model": text("claude-haiku-5-5", "the model that writes the summaries", item="a model name"),
        "summary_min_tokens": integer(2000, "shortest prose summarized by the model", min=1, unit="tokens"),
        "summary_words": integer(400, "length asked of a summary", min=1, unit="words"),
        "summary_payback": number(2.0, "a summary must save this many times its own cost", min=0.1, max=100),
        "summary_dir": path(
            None,
            "where originals and summary decisions are stored",
            optional=True,
            none_means="$TOKENSAVER_CACHE_DIR/summaries or ~/.cache/tokensaver/summaries",
        ),
    },
    checks=[
        lambda s: (
            ("max_lines", "must be at least head_lines + tail_lines")
            if s["head_lines"] + s["tail_lines"] > s["max_lines"]
            else None
        )
    ],
    passthrough=("enabled",),
)
DEFAULTS: dict[str, Any] = SETTINGS.defaults()
# it never edits a body or block it is given or returned: the core hands it the call's own blocks
tokensaver_read_only = True
ORIGINAL_MAGIC = b"tsorig1\n"
MEMORY_ORIGINALS = 256  # the newest kept originals also stay in memory (all of them go to disk)
RETRIEVE_TOOL = "tokensaver_retrieve"
RETRIEVE_DEFINITION: dict[str, Any] = {
    "name": RETRIEVE_TOOL,
    "description": (
        "Return the full original of a tool output that tokensaver shortened. Call it only when the "
        "shortened output lacks something you need; pass the ref shown at the end of that output."
    ),
    "input_schema": {
        "type": "object",
        "properties": {"ref": {"type": "string", "description": "the ref named in the shortened output"}},
        "required": ["ref"],
    },
}


@hookimpl
def tokensaver_configure(settings: dict[str, Any], source: str) -> dict[str, Any]:
    """The ``summarize`` table checked against ``SETTINGS``, defaults filled in."""
    return SETTINGS.validate(settings, source)


def _settings(ctx: Any) -> dict[str, Any]:
    """This stage's settings, normalized (defaults when a hook is called directly)."""
    s = ctx.settings
    return s if s and "min_chars" in s else tokensaver_configure(s, "defaults")


def options(settings: dict[str, Any] | None) -> Options:
    """The text-transform options from a (normalized or partial) settings table."""
    s = {**DEFAULTS, **(settings or {})}
    s["shapes"] = tuple(s["shapes"])
    s["sparse_tools"] = tuple(s["sparse_tools"])
    return Options(**{f.name: s[f.name] for f in fields(Options)})


MEMO_BYTES = 16 * 1024 * 1024  # each of the plugin's two memos: the sum of its kept texts' lengths


_Memo = SizedLRU  # results kept by key within memo_entries and MEMO_BYTES


def _memoized(
    ctx: Any, slot: str, key: Any, compute: Callable[[], _T], size: Callable[[_T], int], limit: int
) -> _T:
    """``compute()`` kept in the plugin state's ``_Memo`` named ``slot`` under ``key`` (``size``: its bytes)."""
    state = ctx.shared_state(**{slot: _Memo}, lock=threading.Lock)
    memo, lock = state[slot], state["lock"]
    with lock:
        hit = memo.get(key)
        if hit is not None:
            return hit  # type: ignore[no-any-return]
    value = compute()
    with lock:
        memo.put(key, value, size(value), limit, MEMO_BYTES)
    return value


@functools.lru_cache(maxsize=64)
def _options_key(opts: Options) -> bytes:
    """The options' part of a memo key, made once per options (not once per block)."""
    return fast_digest(canonical_json(asdict(opts)))


def shrink_cached(text: str, opts: Options, ctx: Any, limit: int) -> Result:
    """``shrink`` memoized per content digest and options in the plugin state (same input, same bytes)."""
    if len(text) < opts.min_chars and not (
        (text[:12] == "<returncode>" and "returncode" in opts.shapes)
        or (text.endswith("bash-$") and "state" in opts.shapes)
    ):
        return Result(text, "small", False)
    key = (_options_key(opts), fast_digest(text))
    return _memoized(ctx, "memo", key, lambda: shrink(text, opts), lambda res: len(res.text), limit)


def _rewrite(
    text: str,
    opts: Options,
    ctx: Any,
    settings: dict[str, Any],
    stats: dict[str, Any],
    newest: bool,
    tool_input: Any = None,
    tool_name: Any = None,
) -> tuple[str, bool]:
    """One tool-output text as it is sent (the same object when unchanged), and whether a lossy
    rewrite made it: shrunk by content type, then perhaps condensed by a model; numbered lines its
    own tool use's input holds (an edit's echo) become a pointer (``_echo``)."""
    res = shrink_cached(text, opts, ctx, settings.get("memo_entries", DEFAULTS["memo_entries"]))
    # about 2 characters a token at the least: a cheap test before counting
    if settings.get("model_summaries") and len(res.text) >= 2 * settings["summary_min_tokens"]:
        condensed = _condensed(res, ctx, settings, stats, newest)
        if condensed is not None:
            res = Result(condensed, "model_summary", True)
    if tool_input and not res.lossy:
        echoed = _echoed(res.text, tool_input, ctx, settings.get("memo_entries", DEFAULTS["memo_entries"]))
        if echoed != res.text:
            res = Result(
                echoed,
                "echo" if res.kind in ("small", "kept") or ":" in res.kind else res.kind + "+echo",
                False,
            )
    if (
        opts.line_numbers == "sparse"
        and "\n" in res.text
        and (not opts.sparse_tools or tool_name in opts.sparse_tools)
    ):
        # after the echo's pointers (they name numbers), before the self-repeats (they name lines
        # of the text as sent, the note line counted)
        sparse = _sparse(res.text, opts.line_number_step, opts.sparse_min_lines)
        if sparse is not res.text:
            res = Result(sparse, res.kind + "+sparse", res.lossy)
    if not res.lossy and settings.get("self_repeats", True):
        within = _self_repeats.rewrite(res.text, short=bool(settings.get("short_pointers", True)))
        if within is not res.text:
            res = Result(within, res.kind + "+self_repeats", False)
    _tally(stats, text, res, ctx, settings)
    return (_with_ref(res, text, ctx, settings), res.lossy) if res.text != text else (text, False)


def _sparse(text: str, step: int, min_run: int) -> str:
    """``text`` with its long runs of numbered lines sparse (``sparse_line_numbers``), else ``text``."""
    if text.count("\n") < min_run - 1:
        return text
    lines = text.split("\n")
    out = sparse_line_numbers(lines, step, min_run)
    return text if len(out) == len(lines) else "\n".join(out)


def _echoed(text: str, tool_input: Any, ctx: Any, limit: int) -> str:
    """``_echo.rewrite`` memoized per (input, text) in the plugin state: an edit's result is
    scanned once, not on every later call that resends it."""
    if not _echo.has_lines(tool_input):
        return text
    key = (fast_digest(tool_input), fast_digest(text))
    return _memoized(ctx, "echo_memo", key, lambda: _echo.rewrite(text, tool_input), len, limit)


def _condensed(
    res: Result, ctx: Any, settings: dict[str, Any], stats: dict[str, Any], newest: bool
) -> str | None:
    """The model summary for prose (decided once per content, see ``_model_summary``), else None."""
    if res.kind.split(":")[0] not in ("text", "html") or not is_prose(res.text.split("\n")):
        return None
    decision = _model_summary.known(res.text, ctx, settings)
    if decision is not None:
        return decision.get("summary")
    if not newest:
        _model_summary.keep(res.text, ctx, settings)  # already sent as it is: it stays so
        return None
    if ctx.model.name == ctx.prices.get(settings["summary_model"]).name or _model_summary.off(ctx):
        return None
    tokens = ctx.count(res.text)
    if tokens < settings["summary_min_tokens"]:
        return None
    if not _model_summary.worth_it(tokens, ctx, settings, stats.get("calls_so_far", 0)):
        stats["summaries_not_worth_it"] = stats.get("summaries_not_worth_it", 0) + 1
        return None
    summary = _model_summary.summarize_text(res.text, tokens, ctx, settings)
    stats["model_summaries"] = stats.get("model_summaries", 0) + (summary is not None)
    return summary


def original_ref(original: str) -> str:
    """The ref under which a shortened output's original is kept (a content hash prefix)."""
    return hashlib.sha256(original.encode()).hexdigest()[:16]


def _original_key(ctx: Any, ref: str) -> str:
    # per API key: a ref never hands one key's tool output to another
    return hashlib.sha256(f"original\0{ctx.key_hash}\0{ref}".encode()).hexdigest()


def keep_original(original: str, ctx: Any, settings: dict[str, Any]) -> str:
    """Keep an original that a lossy rewrite shortened; return its ref.

    The newest ``MEMORY_ORIGINALS`` stay in memory; every one goes to the plugin's private disk
    store (``summary_dir``), written once, so memory stays bounded in a long-lived process and a
    restarted one still answers a ref.
    """
    ref = original_ref(original)
    state = ctx.shared_state(originals=OrderedDict, stored_refs=OrderedDict, lock=threading.Lock)
    with state["lock"]:
        originals, stored = state["originals"], state["stored_refs"]
        originals[ref] = original
        originals.move_to_end(ref)
        while len(originals) > MEMORY_ORIGINALS:
            originals.popitem(last=False)
        fresh = ref not in stored
        stored[ref] = None
        while len(stored) > settings.get("memo_entries", DEFAULTS["memo_entries"]):
            stored.popitem(last=False)
    store = _model_summary.disk_store(ctx, settings) if fresh else None
    if store is not None:
        key = _original_key(ctx, ref)
        try:
            if store.get(key) is None:
                store.set(key, encode_entry(ORIGINAL_MAGIC, key, {"text": original}, ctx.now), None)
        except Exception as e:  # memory still has it; the disk copy is a convenience
            log.warning("summarize: cannot store an original: %s: %s", type(e).__name__, e)
    return ref


def find_original(ref: str, ctx: Any, settings: dict[str, Any]) -> str | None:
    """The original kept under ``ref`` for this API key (memory, then disk), else None."""
    state = ctx.shared_state(originals=OrderedDict, stored_refs=OrderedDict, lock=threading.Lock)
    with state["lock"]:
        hit = state["originals"].get(ref)
    if hit is not None:
        return hit  # type: ignore[no-any-return]
    store = _model_summary.disk_store(ctx, settings)
    if store is None:
        return None
    value, _, problem = store.read(ORIGINAL_MAGIC, _original_key(ctx, ref))
    if problem:
        ctx.record(warning=problem)
    text = (value or {}).get("text")
    return text if isinstance(text, str) else None


def _with_ref(res: Result, original: str, ctx: Any, settings: dict[str, Any]) -> str:
    """The rewritten text, with the ref line when retrieval is on and the rewrite dropped something."""
    if not (settings.get("retrieval") and res.lossy):
        return res.text
    ref = keep_original(original, ctx, settings)
    return f"{res.text}\n[tokensaver: shortened; call {RETRIEVE_TOOL} with ref {ref} for the full output]"


def _tally(stats: dict[str, Any], original: str, res: Result, ctx: Any, settings: dict[str, Any]) -> None:
    if res.text == original:
        return
    kinds = stats.setdefault("kinds", {})
    k = kinds.setdefault(res.kind, {"blocks": 0, "chars_before": 0, "chars_after": 0})
    k["blocks"] += 1
    k["chars_before"] += len(original)
    k["chars_after"] += len(res.text)
    if res.lossy:
        stats["lossy_blocks"] = stats.get("lossy_blocks", 0) + 1
        if settings.get("keep_originals"):
            keep_original(original, ctx, settings)


# -- the per-conversation index: what was decided for each message already sent --------------------
#
# A conversation resends its earlier messages on every call. The index keeps, per message, its
# digest and the rewrites chosen for it (positions and rewritten texts, never the originals), so a
# call digests each message once, finds the prefix the last call sent with one comparison, re-applies
# the prefix's rewrites and runs the full path only on the messages after it. The rewrites are pure
# functions of a message's text, its tool use's input and the settings (which key the index), so the
# bytes are those the full path gives; tool-use ids that would change an earlier message's rewrite
# (an id reused) send the call through the full path.

INDEX_BYTES = 8 * 1024 * 1024  # all conversations' indexes: their entries and kept rewritten texts
INDEX_CONVERSATIONS = 256
INDEX_TEXT_BYTES = 512 * 1024  # rewritten texts kept per conversation; past it, recomputed (memo)
_ENTRY_BYTES = 200  # one message's entry without its texts, about
_CC = b'"cache_control"'
_xxh = xxhash.xxh3_128_digest

# one tool_result's rewritten texts: (block, ((text index or -1 for a string content, text or None
# when not kept, lossy), ...))
_Edits = tuple[tuple[int, tuple[tuple[int, str | None, bool], ...]], ...]


class _Entry(NamedTuple):
    """What the index keeps of one message."""

    digest: Any
    edits: _Edits
    kinds: tuple[tuple[str, int, int, int], ...]  # per kind rewritten: blocks, chars before, after
    lossy: int  # texts a lossy rewrite shortened
    uses: tuple[tuple[Any, int, bool], ...]  # its tool uses: (id, block, one of ours to retrieve)
    results: tuple[Any, ...]  # its tool results' tool_use_ids
    assistant: bool


class _Index:
    """One conversation's entries, in order, and what they add up to."""

    def __init__(self, entries: list[_Entry] | None = None) -> None:
        self.entries: list[_Entry] = []
        self.digests: list[Any] = []  # the entries' digests, for the prefix check
        self.inputs: dict[Any, tuple[int, int]] = {}  # tool use id -> (message, block)
        self.answered: set[Any] = set()  # our retrieve tool uses' ids
        self.results: set[Any] = set()
        self.kinds: dict[str, dict[str, int]] = {}
        self.lossy = 0
        self.assistants = 0
        self.text_bytes = 0
        self.edited: list[int] = []  # messages with rewrites
        self.user_state: _user_text.State | None = None  # where the user turns' pass left off
        self.turns_state: _assistant.State | None = None  # where the model turns' pass left off
        for e in entries or ():
            self.add(e)

    def add(self, e: _Entry) -> None:
        i = len(self.entries)
        self.entries.append(e)
        self.digests.append(e.digest)
        for uid, bi, ours in e.uses:
            self.inputs[uid] = (i, bi)
            if ours:
                self.answered.add(uid)
        self.results.update(e.results)
        for kind, blocks, before, after in e.kinds:
            k = self.kinds.setdefault(kind, {"blocks": 0, "chars_before": 0, "chars_after": 0})
            k["blocks"] += blocks
            k["chars_before"] += before
            k["chars_after"] += after
        self.lossy += e.lossy
        self.assistants += e.assistant
        if e.edits:
            self.edited.append(i)
            self.text_bytes += sum(len(t or "") for _, texts in e.edits for _, t, _ in texts)

    def cut(self, k: int) -> _Index:
        """The index of the first ``k`` messages (itself when it has no more)."""
        return self if k >= len(self.entries) else _Index(self.entries[:k])

    def nbytes(self) -> int:
        user = self.user_state.nbytes() if self.user_state is not None else 0
        turns = self.turns_state.nbytes() if self.turns_state is not None else 0
        return _ENTRY_BYTES * len(self.entries) + self.text_bytes + user + turns


def _raw_digest(m: Any) -> Any:
    """A message's digest as it came (equal to its ``_message_digest`` when it has no breakpoint)."""
    try:
        return _xxh(orjson.dumps(m))
    except TypeError:  # not JSON orjson takes: equal to nothing, so always rewritten afresh
        return object()


def _raw_digests(messages: list[Any], given: list[bytes | None] | None) -> list[Any]:
    """Each message's ``_raw_digest``: the core's digests of them when it handed them over (the same
    function of the same bytes), else one serialization each."""
    if given is not None and len(given) == len(messages):
        return [d if d is not None else object() for d in given]
    return [_raw_digest(m) for m in messages]


def _message_digest(m: Any) -> Any:
    """A message's digest, ``cache_control`` aside (a breakpoint moved is not an edit)."""
    try:
        raw = orjson.dumps(m)
        if _CC in raw:
            raw = orjson.dumps(strip_cache_control(m))
    except TypeError:  # not JSON orjson takes: equal to nothing, so always rewritten afresh
        return object()
    return _xxh(raw)


def _uses(m: Any) -> tuple[tuple[tuple[Any, int, bool], ...], tuple[Any, ...], bool]:
    """A message's tool uses (id, block, ours to retrieve), tool results' ids, and if it is the model's."""
    if not isinstance(m, dict) or not isinstance(m.get("content"), list):
        return (), (), isinstance(m, dict) and m.get("role") == "assistant"
    if m.get("role") == "assistant":
        uses = tuple(
            (b.get("id"), bi, b.get("name") == RETRIEVE_TOOL)
            for bi, b in enumerate(m["content"])
            if isinstance(b, dict) and b.get("type") == "tool_use"
        )
        return uses, (), True
    results = tuple(
        b.get("tool_use_id") for b in m["content"] if isinstance(b, dict) and b.get("type") == "tool_result"
    )
    return (), results, False


class _Call:
    """One call's rewriting: the settings, the conversation's tool uses, the stats it records."""

    def __init__(
        self, ctx: Any, settings: dict[str, Any], key: bytes, messages: list[Any], index: _Index
    ) -> None:
        self.ctx, self.settings, self.key, self.messages, self.index = ctx, settings, key, messages, index
        self.inputs = dict(index.inputs)  # every tool use of the call, the new ones too
        self.answered = set(index.answered)
        self.keeping = bool(settings.get("retrieval") or settings.get("keep_originals"))
        self.extra: dict[str, Any] = {}  # per-call stats besides the tallies (model summaries)
        self.calls_so_far = 0

    def tool_use(self, tool_use_id: Any) -> dict[str, Any]:
        at = self.inputs.get(tool_use_id)
        if at is None:
            return {}
        return self.messages[at[0]]["content"][at[1]]  # type: ignore[no-any-return]

    def rewrite(self, text: str, stats: dict[str, Any], newest: bool, tool_use_id: Any) -> tuple[str, bool]:
        use = self.tool_use(tool_use_id)
        return _rewrite(
            text,
            _options_for(self.key, self.settings),
            self.ctx,
            self.settings,
            stats,
            newest,
            tool_input=use.get("input"),
            tool_name=use.get("name"),
        )

    def fresh(self, i: int, digest: Any, uses: Any, results: Any, assistant: bool) -> tuple[Any, _Entry]:
        """Message ``i`` rewritten by the full path, and its entry."""
        m = self.messages[i]
        edits: list[tuple[int, tuple[tuple[int, str | None, bool], ...]]] = []
        stats: dict[str, Any] = {"calls_so_far": self.calls_so_far}
        if (
            not assistant
            and isinstance(m, dict)
            and m.get("role") == "user"
            and isinstance(m.get("content"), list)
        ):
            newest = i == len(self.messages) - 1
            blocks = list(m["content"])
            budget = INDEX_TEXT_BYTES - self.index.text_bytes
            for bi, b in enumerate(blocks):
                if not isinstance(b, dict) or b.get("tool_use_id") in self.answered:
                    continue  # an original we handed back on request: never shorten it again
                if b.get("type") != "tool_result" or "content" not in b:
                    continue
                texts = []
                c = b["content"]
                if isinstance(c, str):
                    new, lossy = self.rewrite(c, stats, newest, b.get("tool_use_id"))
                    new = self.in_context(new, c, i, bi)
                    if new is not c:
                        blocks[bi] = {**b, "content": new}
                        texts.append((-1, new, lossy))
                elif isinstance(c, list):
                    inner = list(c)
                    for ii, t in enumerate(c):
                        if isinstance(t, dict) and t.get("type") == "text" and isinstance(t.get("text"), str):
                            new, lossy = self.rewrite(t["text"], stats, newest, b.get("tool_use_id"))
                            if new is not t["text"]:
                                inner[ii] = {**t, "text": new}
                                texts.append((ii, new, lossy))
                    if texts:
                        blocks[bi] = {**b, "content": inner}
                if texts:
                    kept = []
                    for ii, new, lossy in texts:
                        budget -= len(new)
                        kept.append((ii, new if budget >= 0 else None, lossy))
                    edits.append((bi, tuple(kept)))
            if edits:
                m = {**m, "content": blocks}
        kinds = tuple(
            (kind, k["blocks"], k["chars_before"], k["chars_after"])
            for kind, k in stats.get("kinds", {}).items()
        )
        for key, value in stats.items():
            if key not in ("kinds", "lossy_blocks", "calls_so_far"):
                self.extra[key] = self.extra.get(key, 0) + value
        entry = _Entry(digest, tuple(edits), kinds, stats.get("lossy_blocks", 0), uses, results, assistant)
        return m, entry

    def again(self, i: int, edits: _Edits) -> Any:
        """Message ``i`` of the prefix with its rewrites re-applied (one not kept: recomputed)."""
        m = self.messages[i]
        blocks = list(m["content"])
        for bi, texts in edits:
            b = blocks[bi]
            c = b["content"]
            if isinstance(c, str):
                blocks[bi] = {**b, "content": self.text(c, texts[0], b, (i, bi))}
            else:
                c = list(c)
                for item in texts:
                    c[item[0]] = {**c[item[0]], "text": self.text(c[item[0]]["text"], item, b, (i, bi))}
                blocks[bi] = {**b, "content": c}
        return {**m, "content": blocks}

    def in_context(self, new: str, original: str, i: int, bi: int) -> str:
        """``new`` without what an earlier SWE-agent observation already says: the directory of
        its state line, the review note after an edit (``_user_text.in_context``: a function of
        the messages before the block)."""
        if new is original or not original.endswith("bash-$"):
            return new
        return _user_text.in_context(new, self.messages, i, bi, original)

    def text(
        self, original: str, item: tuple[int, str | None, bool], block: dict[str, Any], at: tuple[int, int]
    ) -> str:
        _, new, lossy = item
        if new is None:
            new = self.rewrite(original, {}, False, block.get("tool_use_id"))[0]
            return self.in_context(new, original, *at) if item[0] < 0 else new
        if lossy and self.keeping:  # as the full path: the original kept (memory order, disk once)
            keep_original(original, self.ctx, self.settings)
        return new


_OPTIONS: dict[bytes, Options] = {}


def _options_for(key: bytes, settings: dict[str, Any]) -> Options:
    """``options(settings)``, made once per settings (``key``: their digest), when a text is rewritten."""
    opts = _OPTIONS.get(key)
    if opts is None:
        if len(_OPTIONS) >= 64:
            _OPTIONS.clear()
        opts = _OPTIONS[key] = options(settings)
    return opts


def _claim(ctx: Any, key: Any) -> _Index | None:
    """This conversation's index, taken out of the shared table (a parallel call gets none)."""
    state = ctx.shared_state(indexes=SizedLRU, index_lock=threading.Lock)
    with state["index_lock"]:
        hit = state["indexes"].data.pop(key, None)
        if hit is None:
            return None
        state["indexes"].nbytes -= hit[1]
        return hit[0]  # type: ignore[no-any-return]


def _put(ctx: Any, key: Any, index: _Index) -> None:
    state = ctx.shared_state(indexes=SizedLRU, index_lock=threading.Lock)
    with state["index_lock"]:
        state["indexes"].put(key, index, index.nbytes(), INDEX_CONVERSATIONS, INDEX_BYTES)


def _rewrite_messages(
    messages: list[Any], ctx: Any, settings: dict[str, Any], tools: bool = False
) -> tuple[list[Any] | None, dict[str, Any]]:
    """The messages with their tool results rewritten (None: unchanged), and the call's stats."""
    on = memo_enabled()
    settings_key = fast_digest(settings)
    key = (getattr(ctx, "conversation", ""), ctx.key_hash, ctx.model.name, settings_key)
    index = (_claim(ctx, key) if on else None) or _Index()
    # one serialization per message; only a message that differs from the index's digest is looked
    # at without its breakpoints (the last call's newest messages carried them)
    seen = index.digests
    raws = _raw_digests(messages, getattr(ctx, "message_digests", None)) if seen else []
    k = len(seen) if raws[: len(seen)] == seen else _common(seen, raws, messages)
    if settings.get("model_summaries"):
        k = min(k, max(0, len(messages) - 1))  # the newest message is decided anew (a summary may be asked)
    user_state, turns_state = index.user_state, index.turns_state
    index = index.cut(k)
    found = [_uses(m) for m in messages[k:]]
    if any(uid in index.inputs or uid in index.results for uses, _, _ in found for uid, _, _ in uses):
        # a tool-use id the prefix already holds: an earlier result's rewrite may change
        k, index, found = 0, _Index(), [_uses(m) for m in messages]
    prev = index.entries
    call = _Call(ctx, settings, settings_key, messages, index)
    # every tool use of the call, the new ones included, before any result is rewritten
    for j, (uses, _, _) in enumerate(found):
        for uid, bi, ours in uses:
            call.inputs[uid] = (k + j, bi)
            if ours:
                call.answered.add(uid)
    call.calls_so_far = index.assistants + sum(a for _, _, a in found)
    out: list[Any] | None = None
    for i in index.edited:
        out = out if out is not None else list(messages)
        out[i] = call.again(i, prev[i].edits)
    for j, (uses, results, assistant) in enumerate(found):
        digest = _message_digest(messages[k + j]) if on else None
        m, entry = call.fresh(k + j, digest, uses, results, assistant)
        index.add(entry)
        if entry.edits:
            out = out if out is not None else list(messages)
            out[k + j] = m
    stats: dict[str, Any] = {}
    if index.kinds:
        stats["kinds"] = {kind: dict(k) for kind, k in index.kinds.items()}
    if index.lossy:
        stats["lossy_blocks"] = index.lossy
    stats.update(call.extra)
    # only where no tools are declared: in a tool loop (Claude Code) prune's budget cut drops whole
    # old turns, and a later turn's pointer into a dropped one would name lines no longer sent
    users = bool(settings.get("user_texts", True)) and not tools
    if users or settings.get("assistant_texts"):
        # the user turns' pass goes on from where the last call's left it, kept in the same index
        texts, index.user_state = _user_text.rewrite(
            out if out is not None else messages,
            stats,
            bool(settings.get("assistant_texts")),
            user_state if k > 0 else None,
            k,
            users,
            bool(settings.get("short_pointers", True)),
        )
        out = texts if texts is not None else out
    if settings.get("model_turns", True):
        # last: the model's turns as the passes before left them (assistant_texts' pointers kept),
        # going on from where the last call's pass left them, as the user turns' pass does
        turns, index.turns_state = _assistant.rewrite(
            out if out is not None else messages,
            stats,
            state=turns_state if k > 0 else None,
            same=k,
            short=bool(settings.get("short_pointers", True)),
            own=bool(settings.get("self_repeats", True)),
        )
        out = turns if turns is not None else out
    if on:
        _put(ctx, key, index)
    return out, stats


def _common(seen: list[Any], raws: list[Any], messages: list[Any]) -> int:
    """How many leading messages are as the index has them (``cache_control`` aside)."""
    k = 0
    for e, d, m in zip(seen, raws, messages, strict=False):
        if e != d and e != _message_digest(m):
            break
        k += 1
    return k


@hookimpl
def tokensaver_transform_request(body: dict[str, Any], ctx: Any) -> dict[str, Any] | None:
    """Shrink every large tool_result in the conversation (the same block always to the same bytes)."""
    settings = _settings(ctx)
    messages = body.get("messages")
    if not isinstance(messages, list):
        return None
    new_messages, stats = _rewrite_messages(messages, ctx, settings, bool(body.get("tools")))
    if stats:
        ctx.record(**stats)
    out = {**body, "messages": new_messages} if new_messages is not None else body
    if settings.get("retrieval"):
        tools: list[Any] = out["tools"] if isinstance(out.get("tools"), list) else []
        if not any(isinstance(t, dict) and t.get("name") == RETRIEVE_TOOL for t in tools):
            out = {**out, "tools": [*tools, RETRIEVE_DEFINITION]}
    return out if out is not body else None


@hookimpl
def tokensaver_answer_tool_use(tool_use: dict[str, Any], ctx: Any) -> str | None:
    """The original output behind a ref, when the model calls ``tokensaver_retrieve``."""
    if tool_use.get("name") != RETRIEVE_TOOL:
        return None
    ref = str((tool_use.get("input") or {}).get("ref", ""))
    original = find_original(ref, ctx, _settings(ctx))
    ctx.record(retrieved=ref, found=original is not None)
    return original if original is not None else f"no original is kept under ref {ref!r}"


@hookimpl
def tokensaver_report_section(plugin: str, calls: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Per content kind: blocks rewritten and characters before/after, over the last call of each conversation."""
    # every turn resends earlier tool results; count each conversation once, at its largest call
    last: dict[str, dict[str, Any]] = {}
    for c in calls:
        n = (c.get("plugins") or {}).get(plugin)
        if not isinstance(n, dict) or not n.get("kinds"):
            continue
        conv = str(c.get("conversation") or c.get("id"))
        prev = last.get(conv)
        total = sum(k["chars_before"] for k in n["kinds"].values())
        if prev is None or total >= sum(k["chars_before"] for k in prev["kinds"].values()):
            last[conv] = n
    if not last:
        return None
    agg: dict[str, dict[str, int]] = {}
    lossy = 0
    for n in last.values():
        lossy += int(n.get("lossy_blocks", 0))
        for kind, k in n["kinds"].items():
            a = agg.setdefault(kind, {"blocks": 0, "chars_before": 0, "chars_after": 0})
            for f in a:
                a[f] += int(k.get(f, 0))
    rows: list[dict[str, Any]] = [
        {
            "kind": kind,
            "blocks": a["blocks"],
            "chars_before": a["chars_before"],
            "chars_after": a["chars_after"],
            "saved_pct": round(100 * (1 - a["chars_after"] / a["chars_before"]), 1)
            if a["chars_before"]
            else 0.0,
        }
        for kind, a in sorted(agg.items())
    ]
    before = sum(r["chars_before"] for r in rows)
    after = sum(r["chars_after"] for r in rows)
    return {
        "title": "summarize: large tool results rewritten by content type",
        "summary": f"{sum(r['blocks'] for r in rows)} tool results in {len(last)} conversation(s): "
        f"{before} → {after} chars ({lossy} with lossy elisions)",
        "rows": rows,
    }
