"""Recorded agent conversations: the ``tokensaver-conversation/1`` format and plain JSONL bodies.

A conversation file holds segments; within a segment every call resends the same model,
max_tokens, system and tools, and the first ``n_messages`` messages. What the model answered at
call k is ``messages[n_messages]`` when the next call holds it, else the call's ``response``.
A JSONL file holds one request body per line (one conversation, answers unknown).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import TraceFormatError

FORMAT = "tokensaver-conversation/1"


@dataclass
class TraceCall:
    """One recorded call: the body as sent, when, what was billed, and what the model answered."""

    body: dict[str, Any]
    t: float | None = None
    usage: dict[str, Any] | None = None
    reply: list[dict[str, Any]] | None = None

    def message(self, msg_id: str = "msg_replay") -> dict[str, Any]:
        """The Message this call got (its recorded reply and usage), as the pipeline observes it."""
        return {
            "id": msg_id,
            "type": "message",
            "role": "assistant",
            "model": str(self.body.get("model", "")),
            "content": self.reply or [{"type": "text", "text": "OK."}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": dict(self.usage or {"input_tokens": 1, "output_tokens": 1}),
        }


@dataclass
class Conversation:
    """A recorded conversation, expanded into its calls."""

    id: str
    source: str
    calls: list[TraceCall] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def _epoch(value: Any) -> float | None:
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value:
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def load_conversation(path: str | Path) -> Conversation:
    """Read one trace file (conversation JSON or JSONL of bodies)."""
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".jsonl":
        return _from_jsonl(p, text)
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise TraceFormatError(f"{p}: not JSON ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise TraceFormatError(f"{p}: not a {FORMAT} file (and not .jsonl)")
    conv = Conversation(id=str(data.get("id") or p.stem), source=str(p), info=dict(data.get("info") or {}))
    for seg in data.get("segments") or []:
        request = seg.get("request") or {}
        messages = request.get("messages") or []
        for call in seg.get("calls") or []:
            n = int(call["n_messages"])
            body = {**request, "messages": messages[:n]}
            reply = None
            if n < len(messages) and messages[n].get("role") == "assistant":
                content = messages[n].get("content")
                reply = [{"type": "text", "text": content}] if isinstance(content, str) else content
            elif call.get("response"):
                reply = call["response"]
            conv.calls.append(
                TraceCall(body=body, t=_epoch(call.get("t")), usage=call.get("usage"), reply=reply)
            )
    if not conv.calls:
        raise TraceFormatError(f"{p}: no calls")
    return conv


def _from_jsonl(p: Path, text: str) -> Conversation:
    conv = Conversation(id=p.stem, source=str(p))
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            body = json.loads(line)
        except ValueError as exc:
            raise TraceFormatError(f"{p}:{i}: not JSON ({exc})") from exc
        if not isinstance(body, dict) or "messages" not in body:
            raise TraceFormatError(f"{p}:{i}: not a Messages request body")
        conv.calls.append(TraceCall(body=body))
    # the answer at call k is the assistant message the next call adds, when it does
    for cur, nxt in zip(conv.calls, conv.calls[1:], strict=False):
        n = len(cur.body["messages"])
        msgs = nxt.body["messages"]
        if len(msgs) > n and msgs[n].get("role") == "assistant":
            content = msgs[n]["content"]
            cur.reply = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not conv.calls:
        raise TraceFormatError(f"{p}: no request bodies")
    return conv


def iter_trace_files(paths: list[str | Path]) -> Iterator[Path]:
    """Expand files and directories (recursively, sorted) into trace files."""
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            for f in sorted(p.rglob("*")):
                if f.suffix in (".json", ".jsonl") and f.is_file():
                    yield f
        elif p.is_file():
            yield p
        else:
            raise TraceFormatError(f"no such trace file or directory: {p}")


def load_conversations(paths: list[str | Path]) -> list[Conversation]:
    """Every conversation under ``paths``."""
    return [load_conversation(f) for f in iter_trace_files(paths)]


def fixtures_dir() -> Path | None:
    """The bundled ``fixtures/`` folder (source checkout), or None."""
    here = Path(__file__).resolve().parent.parent / "fixtures"
    for cand in (here, Path.cwd() / "fixtures"):
        if cand.is_dir():
            return cand
    return None


def shared_traces_dir() -> Path | None:
    """``../shared/traces`` beside the checkout, when present."""
    root = Path(__file__).resolve().parent.parent
    for cand in (root.parent / "shared" / "traces", Path.cwd().parent / "shared" / "traces"):
        if cand.is_dir():
            return cand
    return None
