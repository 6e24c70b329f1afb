"""prune between cuts walks only what is new in a call (its carry): what it sends must be what the
full path sends, call for call, whatever the caller does to the history in between.

Each test replays one sequence of requests twice through prune's hook, each replay with its own
state: memos on (the carry kept per conversation, each call going on from the last) and memos off
(``set_memo_enabled(False)``: every call walks all its messages). The bodies sent and prune's notes
must be the same on every call. The sequences are made so that a carry that missed a change would
send something else: a tool result edited in the history after its copy became a pointer to it,
an old message replaced, a result marked as an error after a later use superseded it, other
settings, a rewind, breakpoints moving every call, a retry, cuts in between.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from strategies import words
from tokensaver_plugins import prune

from tokensaver.context import make_context
from tokensaver.tokens import set_memo_enabled

MODEL = "claude-sonnet-4-6"
T0 = 1_700_000_000.0
# small economic cuts every few turns, so the sequences cross cuts and carry cleared results
CONF = {
    **prune.DEFAULTS,
    "clear_keep_tool_uses": 4,
    "clear_min_tokens": 300,
    "clear_min_fraction": 0.0,
    "clear_keep_quoted": 0,
    "min_result_tokens": 20,
    "keep_last_messages": 4,
}


@pytest.fixture(autouse=True)
def memo_back_on() -> Iterator[None]:
    yield
    set_memo_enabled(True)


def listing(k: int, n: int = 14) -> str:
    """A numbered file listing of ``n`` lines (a re-read repeats its lines: a repeat rewrite)."""
    return "\n".join(f"{i + 1:>6}\tdef function_{k}_{i}(value):  # {words(k * 100 + i, 6)}" for i in range(n))


def history(n_steps: int) -> list[dict[str, Any]]:
    """A task, then tool uses whose results are: new text, an identical copy of an earlier result
    (a dedupe pointer), a re-read of an earlier listing (a repeat rewrite), a re-run (superseded)."""
    msgs: list[dict[str, Any]] = [{"role": "user", "content": "Task: fix the parser"}]
    for k in range(n_steps):
        tid = f"toolu_{k:03d}"
        if k % 5 == 3:  # another command, the same output as two steps before
            name, inp, text = "Bash", {"command": f"rerun {k - 2}"}, words(k - 2, 120)
        elif k % 5 == 4:  # the same read again: superseded, and its lines repeat the earlier ones
            name, inp, text = "Read", {"file_path": f"/src/m{k - 4}.py"}, listing(k - 4)
        elif k % 5 == 0:
            name, inp, text = "Read", {"file_path": f"/src/m{k}.py"}, listing(k)
        else:
            name, inp, text = "Bash", {"command": f"run {k}"}, words(k, 120)
        msgs.append(
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": f"step {k}"},
                    {"type": "tool_use", "id": tid, "name": name, "input": inp},
                ],
            }
        )
        msgs.append(
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tid, "content": text}]}
        )
    return msgs


def with_breakpoint(msgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with a breakpoint on the last block of the last message (it moves every call,
    as Claude Code's does)."""
    out = copy.deepcopy(msgs)
    last = out[-1]
    if isinstance(last["content"], str):
        last["content"] = [{"type": "text", "text": last["content"]}]
    last["content"][-1]["cache_control"] = {"type": "ephemeral"}
    return out


def replay(bodies: list[dict[str, Any]], memos: bool) -> list[tuple[str, dict[str, Any]]]:
    """Each body through prune in order with one state: (the JSON sent, prune's notes) per call
    (a body's ``"//settings"`` entry: prune settings of its own call)."""
    set_memo_enabled(memos)
    states: dict[str, Any] = {}
    out = []
    for n, body in enumerate(bodies):
        conf = {**CONF, **body.get("//settings", {})}
        body = {k: v for k, v in body.items() if k != "//settings"}
        given = copy.deepcopy(body)  # parsed anew each call, as a caller's request is
        ctx = make_context(given, plugin="prune", settings=conf, now=T0 + 30 * n, states=states)
        sent = prune.tokensaver_transform_request(given, ctx)
        out.append(
            (json.dumps(sent if sent is not None else body, sort_keys=True), ctx.notes.get("prune", {}))
        )
    set_memo_enabled(True)
    return out


def assert_same(bodies: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    carried, full = replay(bodies, True), replay(bodies, False)
    for n, (a, b) in enumerate(zip(carried, full, strict=True)):
        assert a[1] == b[1], f"call {n}: notes differ"
        assert a[0] == b[0], f"call {n}: sent bodies differ"
    assert any("cut" in notes for _, notes in carried)  # the sequence crossed cuts
    return carried


def body_of(msgs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 64, "system": "You fix bugs.", "messages": with_breakpoint(msgs)}


def growing(msgs: list[dict[str, Any]], start: int = 3) -> list[dict[str, Any]]:
    return [body_of(msgs[:n]) for n in range(start, len(msgs) + 1, 2)]


def test_same_as_the_full_path_call_for_call_with_moving_breakpoints_and_a_retry() -> None:
    msgs = history(30)
    bodies = growing(msgs)
    bodies.insert(10, bodies[9])  # a retry: the same request again
    out = assert_same(bodies)
    sent = json.loads(out[-1][0])
    texts = [
        b["content"]
        for m in sent["messages"]
        for b in (m["content"] if isinstance(m["content"], list) else [])
        if b.get("type") == "tool_result" and isinstance(b.get("content"), str)
    ]
    # the sequence does what it is for: pointers, repeats and cleared results are all sent
    assert any("identical to the earlier result" in t for t in texts)
    assert any(t.startswith("[tokensaver: earlier tool output cleared") or "superseded" in t for t in texts)


def test_an_edited_tool_result_in_the_history_is_walked_again() -> None:
    msgs = history(30)
    bodies = growing(msgs[:41])
    pointer = re.compile(r"identical to the earlier result of tool_use (toolu_\d+)")
    found = pointer.search(replay(bodies, True)[-1][0])
    assert found
    # the caller edits the result that a later identical copy points to: the copy is sent in full
    # again (a carry that kept the pointer would point it at text that is gone)
    edited = copy.deepcopy(msgs)
    for m in edited:
        for b in m["content"] if isinstance(m["content"], list) else []:
            if b.get("type") == "tool_result" and b["tool_use_id"] == found.group(1):
                b["content"] = b["content"] + "\n(edited)"
    bodies += growing(edited, start=43)
    out = assert_same(bodies)
    assert found.group(0) in out[19][0] and found.group(0) not in out[20][0]


def test_a_replaced_message_a_new_error_other_settings_and_a_rewind_are_walked_again() -> None:
    msgs = history(30)
    bodies = growing(msgs[:31])
    # an old assistant message replaced (its tokens change, its blocks do not)
    replaced = copy.deepcopy(msgs)
    replaced[7]["content"][0]["text"] = "step 3, explained at length: " + words(7, 80)
    bodies += growing(replaced[:41], start=33)
    # the re-read that superseded an earlier read is now marked as failed: nothing supersedes it
    failed = copy.deepcopy(replaced)
    assert failed[39]["content"][1]["input"] == failed[31]["content"][1]["input"]
    failed[40]["content"][0]["is_error"] = True
    bodies += [body_of(failed[:n]) for n in range(43, 52, 2)]
    # other settings from here on (the same spec): identical copies are sent in full
    bodies += [{**body_of(failed[:n]), "//settings": {"dedupe": False}} for n in range(53, 62, 2)]
    # a rewind: the caller goes back twenty messages and on along another line
    other = copy.deepcopy(failed[:41])
    other[-1]["content"][0]["content"] = words(999, 150)
    bodies += [body_of(failed[:31]), body_of(other)]
    assert_same(bodies)


def test_thinking_left_out_at_a_new_user_turn_is_left_out_again_from_the_carry() -> None:
    """On a model with preserved thinking, a cut at a new user turn leaves out the thinking after
    it (spec ``unthink``); the calls after it go on from the carry, which must leave the same
    blocks out (and keep those written since) as a walk of all the messages does."""
    msgs: list[dict[str, Any]] = []
    steps = history(48)
    for part, block in enumerate(steps[1 + 12 * p : 13 + 12 * p] for p in range(8)):
        msgs.append({"role": "user", "content": f"Part {part}: fix the parser"})
        for m in block:
            m = copy.deepcopy(m)
            if m["role"] == "assistant":
                sig = f"sig-{m['content'][1]['id']}"
                m["content"].insert(0, {"type": "thinking", "thinking": f"about {sig}", "signature": sig})
            msgs.append(m)
        msgs.append(
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": f"part {part} done", "signature": f"sig-end-{part}"},
                    {"type": "text", "text": f"Part {part} done."},
                ],
            }
        )
    cheap = {"clear_payback": 0.5}  # cuts at the earlier user turns, with calls after them
    bodies = [
        {**body_of(msgs[:n]), "model": "claude-opus-5-5", "//settings": cheap}
        for n in range(1, len(msgs) + 1)
        if msgs[n - 1]["role"] == "user"
    ]
    carried = assert_same(bodies)
    unthought = [n for n, (_, notes) in enumerate(carried) if notes.get("cut", {}).get("thinking_left_out")]
    assert unthought and unthought[0] < len(bodies) - 5  # a cut left thinking out, calls went on after it
    last = json.loads(carried[-1][0])["messages"]
    signed = [
        b["signature"]
        for m in last
        if m["role"] == "assistant"
        for b in m["content"]
        if b["type"] == "thinking"
    ]
    assert len(signed) < sum(1 for m in msgs if m["role"] == "assistant")
