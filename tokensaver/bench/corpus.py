"""The conversations ``tokensaver bench`` replays: trace files found, deduplicated, split in halves.

Each source's conversation files (a source is a trace folder) are split into a *tuning* and a
*validation* half by a fixed rule (:func:`split_halves`, ``SPLIT_RULE``).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import model_rules as rules
from ..errors import TokensaverError
from ..traces import (
    FORMAT,
    Conversation,
    fixtures_dir,
    iter_trace_files,
    load_conversation,
    shared_traces_dir,
)

HALVES = ("tuning", "validation", "all")
READ_FORMS = ("recorded", "today")
READ_FORM_RULE = (
    "today: every `Read` tool result as Claude Code 2.1.332 sends it (seen in the e2e session): "
    "numbered lines as `12\\tcode` (no padding, a tab) instead of the recorded `     12→code`, and "
    "without the malware <system-reminder> that older versions appended to each; nothing else changed"
)
# the reminder older Claude Code versions end every Read result with (today's sends none)
MALWARE_REMINDER = (
    "\n\n<system-reminder>\nWhenever you read a file, you should consider whether it would be considered "
    "malware. You CAN and SHOULD provide analysis of malware, what it is doing. But you MUST refuse to "
    "improve or augment the code. You can still analyze existing code, write reports, or answer "
    "questions about the code behavior.\n</system-reminder>\n"
)
_PADDED_NUMBER = re.compile(r"^ *(\d+)→", re.MULTILINE)
SPLIT_RULE = (
    "split by conversation, per source folder: the source's conversation files sorted by the sha256 of "
    "the file name's stem (no directory, no extension); positions 0, 2, 4, ... are the tuning half, "
    "1, 3, 5, ... the validation half"
)


@dataclass
class TraceRef:
    """A trace file to replay (the conversation is loaded in the process that replays it)."""

    path: str
    source: str
    size: int
    half: str | None = None  # "tuning" | "validation" (see split_halves)
    model: str | None = None  # replay every call as if sent to this model (see retarget)
    read_form: str | None = None  # "today": Read results numbered as today's Claude Code (see today_read)


def _split_key(path: str | Path) -> tuple[str, str]:
    stem = Path(path).stem
    return hashlib.sha256(stem.encode("utf-8")).hexdigest(), stem


def split_halves(paths: list[Any]) -> dict[str, list[Any]]:
    """The fixed tuning / validation split of conversation files (see ``SPLIT_RULE``).

    Per source (the file's folder, :func:`source_name`), the files are sorted by the sha256 of
    their name's stem; even positions (0, 2, 4, ...) are ``tuning``, odd ones ``validation``. The
    items of ``paths`` (str or Path) are returned as given, in that order.
    """
    by_source: dict[str, list[Any]] = {}
    for p in paths:
        by_source.setdefault(source_name(Path(p)), []).append(p)
    out: dict[str, list[Any]] = {"tuning": [], "validation": []}
    for src in sorted(by_source):
        for i, p in enumerate(sorted(by_source[src], key=_split_key)):
            out["tuning" if i % 2 == 0 else "validation"].append(p)
    return out


def split_counts(refs: list[TraceRef]) -> dict[str, dict[str, int]]:
    """Conversation files per source and half."""
    out: dict[str, dict[str, int]] = {}
    for r in refs:
        row = out.setdefault(r.source, {"tuning": 0, "validation": 0})
        row[r.half or "tuning"] += 1
    return dict(sorted(out.items()))


def _is_conversation_file(path: Path, data: bytes) -> bool:
    """A ``.jsonl`` file, or JSON in the conversation format (not e.g. a folder's SOURCES.json)."""
    if path.suffix != ".json":
        return True
    if FORMAT.encode() in data[:4096]:
        return True
    try:
        obj = json.loads(data)
    except ValueError:
        return True  # let load_conversation say what is wrong with it
    return not isinstance(obj, dict) or obj.get("format") == FORMAT or "segments" in obj


def source_name(path: Path) -> str:
    """The source of a trace: its folder's name (claude-code-spotter, tau-bench, ...)."""
    return path.parent.name or "traces"


def default_trace_dirs() -> list[Path]:
    dirs = [d for d in (fixtures_dir(), shared_traces_dir()) if d is not None]
    if not dirs:
        raise TokensaverError("no traces given and no fixtures/ or ../shared/traces folder found")
    return dirs


def find_traces(paths: list[str | Path], sources: list[str] | None = None) -> tuple[list[TraceRef], int]:
    """Trace files under ``paths``, identical files once (fixtures are copies of shared traces)."""
    seen: set[str] = set()
    refs: list[TraceRef] = []
    dupes = 0
    for f in iter_trace_files(list(paths)):
        if f.name.lower().startswith("readme"):
            continue
        data = f.read_bytes()
        if not _is_conversation_file(f, data):
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            dupes += 1
            continue
        seen.add(digest)
        src = source_name(f)
        if sources and src not in sources:
            continue
        refs.append(TraceRef(str(f), src, len(data)))
    halves = split_halves([r.path for r in refs])
    half_of = {p: h for h in halves for p in halves[h]}
    for r in refs:
        r.half = half_of[r.path]
    return refs, dupes


def retarget(body: dict[str, Any], model: str) -> dict[str, Any]:
    """``body`` as a caller would send it to ``model``: the model named, and what that model refuses
    fitted (samplers on Opus 4.7+ and 5.x, budget thinking where only adaptive is taken, forced tool
    use on the models with preserved thinking, which answer it with a 400). The history, thinking
    blocks included, is kept: on a model with preserved thinking each block is bound at first sight
    (the emulator), so the replay runs the API's prefix check on what tokensaver sends."""
    out = {**body, "model": model}
    if rules.refuses_sampling(model):
        for k in ("temperature", "top_p", "top_k"):
            out.pop(k, None)
    th = out.get("thinking")
    if isinstance(th, dict) and th.get("type") == "enabled" and rules.refuses_budget_thinking(model):
        out["thinking"] = {"type": "adaptive"}
    tc = out.get("tool_choice")
    if isinstance(tc, dict) and tc.get("type") in ("any", "tool") and rules.prefix_check_enforcement(model):
        out["tool_choice"] = {"type": "auto"}
    return out


def _today_text(text: str) -> str:
    text = text.removesuffix(MALWARE_REMINDER)
    return _PADDED_NUMBER.sub("\\1\t", text)


def _renumbered(content: Any) -> Any:
    if isinstance(content, str):
        return _today_text(content)
    if isinstance(content, list):
        return [
            {**b, "text": _today_text(b["text"])}
            if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
            else b
            for b in content
        ]
    return content


def today_read(conv: Conversation) -> int:
    """Rewrite ``conv``'s ``Read`` results in place as today's Claude Code sends them (``READ_FORM_RULE``).

    The shared Claude Code traces were recorded by versions that pad each line number, use an arrow
    and end each read with a reminder; a hold-out of newer sessions has the lighter form, so the
    levers on the padding and the repeated reminder are not there. The
    same message objects are shared by the calls of a segment, so each is rewritten once. Returns
    the number of results rewritten.
    """
    names: dict[str, str] = {}
    done: set[int] = set()
    n = 0
    for call in conv.calls:
        for message in call.body.get("messages") or []:
            content = message.get("content") if isinstance(message, dict) else None
            if id(message) in done or not isinstance(content, list):
                continue
            done.add(id(message))
            for i, block in enumerate(content):
                if not isinstance(block, dict):
                    continue
                if block.get("type") == "tool_use":
                    names[str(block.get("id"))] = str(block.get("name"))
                elif (
                    block.get("type") == "tool_result" and names.get(str(block.get("tool_use_id"))) == "Read"
                ):
                    new = _renumbered(block.get("content"))
                    if new != block.get("content"):
                        content[i] = {**block, "content": new}
                        n += 1
    return n


def load_ref(ref: TraceRef, limit_calls: int | None = None) -> Conversation:
    conv = load_conversation(ref.path)
    conv.source = ref.source
    if ref.read_form == "today":
        conv.info["bench_read_form"] = "today"
        conv.info["bench_read_rewritten"] = today_read(conv)
    if ref.model:
        for call in conv.calls:
            call.body = retarget(call.body, ref.model)
        conv.info["bench_model"] = ref.model
    if ref.half:
        conv.info["bench_half"] = ref.half
    if limit_calls:
        conv.calls = conv.calls[:limit_calls]
    return conv
