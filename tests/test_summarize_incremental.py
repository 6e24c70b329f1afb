"""summarize's per-conversation index: a call re-applies the rewrites decided for the prefix the last
call sent and rewrites only the new messages. Whatever would change an earlier message's rewrite (an
edited old result, a fork, other settings, a moved breakpoint, a reused tool-use id) must give the
bytes a fresh process gives: each call here is compared with the same call on an empty state.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from tokensaver_plugins import summarize

from tokensaver.context import make_context

MODEL = "claude-sonnet-4-6"


def _listing(tag: str, n: int = 40) -> str:
    """A JSON list of records (summarize sends it as a table)."""
    rows = [{"id": j, "name": f"{tag}-{j}", "status": "error" if j % 7 == 0 else "ok"} for j in range(n)]
    return json.dumps(rows, indent=2)


def _conversation(turns: int, tag: str = "v1") -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = [{"role": "user", "content": [{"type": "text", "text": "List the items."}]}]
    for t in range(turns):
        tid = f"toolu_{tag}_{t}"
        msgs.append(
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": tid, "name": "list", "input": {"p": t}}],
            }
        )
        # string content and a list of text blocks, in turn
        content: Any = (
            _listing(f"{tag}-{t}") if t % 2 == 0 else [{"type": "text", "text": _listing(f"{tag}-{t}")}]
        )
        msgs.append(
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tid, "content": content}]}
        )
    return msgs


def _send(
    messages: list[dict[str, Any]], states: dict[str, Any], settings: dict[str, Any] | None = None
) -> tuple[dict[str, Any], Any]:
    """The body summarize sends (and its notes), the messages parsed anew as from the wire."""
    body = {"model": MODEL, "max_tokens": 64, "messages": copy.deepcopy(messages)}
    table = summarize.tokensaver_configure(settings or {}, "test")
    ctx = make_context(body, plugin="summarize", settings=table, states=states)
    out = summarize.tokensaver_transform_request(body, ctx)
    return (out if out is not None else body), ctx.notes.get("summarize")


def _fresh(
    messages: list[dict[str, Any]], settings: dict[str, Any] | None = None
) -> tuple[dict[str, Any], Any]:
    return _send(messages, {}, settings)


def _indexes(states: dict[str, Any]) -> list[Any]:
    return [entry[0] for entry in states["summarize"]["indexes"].data.values()]


def _text(body: dict[str, Any], i: int) -> str:
    content = body["messages"][i]["content"][0]["content"]
    return content if isinstance(content, str) else content[0]["text"]


def test_index_follows_growth_edits_breakpoints_and_forks() -> None:
    states: dict[str, Any] = {}
    msgs = _conversation(6)
    for shown in (3, 5, 9, 13):
        assert _send(msgs[:shown], states) == _fresh(msgs[:shown])
    (index,) = _indexes(states)
    assert len(index.digests) == 13 and index.edited  # one entry per message, rewrites kept
    assert _text(_fresh(msgs)[0], 2) != _text({"messages": msgs}, 2)  # the results are rewritten

    # the caller edits an old result (string content), then an old text block (list content)
    edited = copy.deepcopy(msgs)
    edited[2]["content"][0]["content"] = _listing("changed")
    got = _send(edited, states)
    assert got == _fresh(edited)
    assert "changed-3" in _text(got[0], 2) and "v1-0-3" not in _text(got[0], 2)
    edited[4]["content"][0]["content"][0]["text"] = _listing("inner")
    got = _send(edited, states)
    assert got == _fresh(edited) and "inner-5" in _text(got[0], 4)

    # a breakpoint placed on an old message: the rewrite stays, the breakpoint is the call's own
    marked = copy.deepcopy(edited)
    marked[4]["content"][0]["content"][0]["cache_control"] = {"type": "ephemeral"}
    got = _send(marked, states)
    assert got == _fresh(marked)
    assert got[0]["messages"][4]["content"][0]["content"][0]["cache_control"] == {"type": "ephemeral"}
    got = _send(edited, states)  # and moved away again
    assert got == _fresh(edited) and "cache_control" not in json.dumps(got[0])

    # a fork after the first tool round, then back on the first thread
    fork = msgs[:3] + _conversation(3, "fork")[1:]
    got = _send(fork, states)
    assert got == _fresh(fork) and "fork-0-4" in _text(got[0], 4)
    assert _send(msgs, states) == _fresh(msgs)
    assert _send(msgs[:7], states) == _fresh(msgs[:7])  # a cut: fewer messages than last time


def test_other_settings_never_reuse_the_index() -> None:
    states: dict[str, Any] = {}
    msgs = _conversation(4)
    default = _send(msgs, states)
    assert default[0]["messages"] != msgs  # rewritten
    off = {"min_chars": 1_000_000}  # nothing is large enough
    got = _send(msgs, states, off)
    assert got == _fresh(msgs, off) and got[0]["messages"] == msgs
    assert _send(msgs, states) == default
    assert len(_indexes(states)) == 2  # one per settings


def test_a_reused_tool_use_id_rewrites_the_earlier_results_it_names() -> None:
    """A new tool use under an id an earlier result carries changes that result's rewrite (here: an
    original the model asked back is never shortened): the full path decides, not the index."""
    states: dict[str, Any] = {}
    msgs = _conversation(4)
    _send(msgs, states)
    first = msgs[2]["content"][0]["tool_use_id"]
    asked = [
        *msgs,
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": first, "name": summarize.RETRIEVE_TOOL, "input": {"ref": "r"}}
            ],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": first, "content": "original"}]},
    ]
    got = _send(asked, states)
    assert got == _fresh(asked)
    assert _text(got[0], 2) == msgs[2]["content"][0]["content"]  # as it came
    assert len(_indexes(states)) == 1


def test_rewrites_past_the_text_cap_are_recomputed_and_indexes_are_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(summarize, "INDEX_TEXT_BYTES", 3_000)  # about two rewritten results
    monkeypatch.setattr(summarize, "INDEX_CONVERSATIONS", 3)
    states: dict[str, Any] = {}
    msgs = _conversation(8)
    for shown in (5, 9, 13, 17):
        assert _send(msgs[:shown], states) == _fresh(msgs[:shown])
    (index,) = _indexes(states)
    kept = [t for i in index.edited for _, texts in index.entries[i].edits for _, t, _ in texts]
    assert None in kept and any(kept)  # some texts kept, the rest recomputed
    assert index.text_bytes <= 3_000
    assert _send(msgs, states) == _fresh(msgs)
    for c in range(5):  # other conversations (another first message): the oldest indexes dropped
        other = copy.deepcopy(msgs)
        other[0]["content"][0]["text"] = f"task {c}"
        _send(other, states)
    assert len(_indexes(states)) == 3
    assert states["summarize"]["indexes"].nbytes == sum(i.nbytes() for i in _indexes(states))
