"""summarize's ``line_numbers = "sparse"``: long runs of numbered lines keep every 10th number and their ends.

The other lines lose only their ``N→``/``N<tab>``, every byte after it kept (the model copies them
into an edit's ``old_string``); one note line says so. Pointers into a sparse result (prune's
repeats, self-repeats, an edit's echo) still name lines that can be found, and the bench's fact
tracker counts a dropped line number as lost."""

from __future__ import annotations

import json
import re
from typing import Any

import anthropic
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tokensaver_plugins import _self_repeats, prune, summarize
from tokensaver_plugins._summarize_text import (
    SPARSE_NOTE_START,
    full_lines,
    sparse_line_numbers,
    sparse_note,
)

import tokensaver
from tokensaver.bench.facts import FactTracker
from tokensaver.context import make_context
from tokensaver.emulator import Emulator

MODEL = "claude-sonnet-4-6"
NOTE = sparse_note(10)
NUMBERED = re.compile(r"^(\d+)(→|\t)")


def read(start: int, n: int, sep: str = "\t", body: Any = None) -> list[str]:
    """A file read numbered as today's Claude Code sends it (``12<tab>code``) or with ``→``."""
    body = body or (lambda i: f"    value_{i} = compute(x, {i})  # step")
    return [f"{start + i}{sep}{body(start + i)}" for i in range(n)]


def shown(lines: list[str]) -> list[int]:
    return [int(m.group(1)) for ln in lines if (m := NUMBERED.match(ln))]


@pytest.mark.parametrize("sep", ["\t", "→"])
def test_a_long_run_keeps_its_ends_and_every_tenth_number_and_each_lines_bytes(sep: str) -> None:
    lines = read(7, 60, sep)
    out = sparse_line_numbers(lines, 10, 20)
    assert out[0] == NOTE and out[0].startswith(SPARSE_NOTE_START)
    assert shown(out) == [7, 10, 20, 30, 40, 50, 60, 66]
    for ln, got in zip(lines, out[1:], strict=True):
        assert got in (ln, ln.split(sep, 1)[1])  # the whole line, or exactly what follows its number
    assert full_lines(out)[1:] == lines  # every number can be counted back


def test_runs_with_gaps_each_keep_their_ends_under_one_note() -> None:
    lines = ["File: a.py", *read(1, 25), "", "...", *read(101, 30), "<system-reminder>x</system-reminder>"]
    out = sparse_line_numbers(lines, 10, 20)
    assert out.count(NOTE) == 1 and out.index(NOTE) == 1  # before the first run, after its header
    assert shown(out) == [1, 10, 20, 25, 101, 110, 120, 130]
    assert out[0] == "File: a.py" and out[-1] == lines[-1]
    assert full_lines(out)[:1] + full_lines(out)[2:] == lines


def test_a_step_of_its_own_and_runs_too_short_to_pay_are_left_alone() -> None:
    short = ["intro", *read(1, 19), "", *read(40, 5)]
    assert sparse_line_numbers(short, 10, 20) == short
    assert full_lines(short) is short
    out = sparse_line_numbers(read(1, 30), 5, 20)
    assert shown(out) == [1, 5, 10, 15, 20, 25, 30] and out[0] == sparse_note(5)


def test_the_bytes_after_the_separator_are_kept_exactly() -> None:
    odd = {
        3: "",
        4: "\tindented with a tab  ",
        5: "    trailing spaces   ",
        6: "ünïcødé → arrows\tand tabs",
        7: "12\tlooks like a numbered line",  # would read as line 12: keeps its own number
        8: "  42→ also",
        9: "[bracketed] like a note",
        11: "3: grep-like",
    }
    lines = read(1, 30, body=lambda i: odd.get(i, f"x = {i}"))
    out = sparse_line_numbers(lines, 10, 20)
    body = out[1:]
    assert body[2] == "" and body[3] == "\tindented with a tab  " and body[4] == "    trailing spaces   "
    assert body[5] == "ünïcødé → arrows\tand tabs"
    for i in (7, 8, 9, 11):
        assert body[i - 1] == lines[i - 1]  # ambiguous text: the number stays
    assert full_lines(out)[1:] == lines


@given(
    st.lists(
        st.tuples(st.integers(1, 5000), st.integers(1, 60), st.sampled_from(["\t", "→"])),
        min_size=1,
        max_size=4,
    ),
    st.lists(st.text(alphabet=st.characters(blacklist_characters="\n\r"), max_size=12), max_size=60),
    st.integers(2, 12),
    st.integers(3, 30),
)
def test_sparse_is_deterministic_and_counts_back_to_the_original(
    runs: list[tuple[int, int, str]], texts: list[str], step: int, min_run: int
) -> None:
    lines: list[str] = []
    for start, n, sep in runs:
        lines += [f"{start + i}{sep}{texts[i % len(texts)] if texts else 'x'}" for i in range(n)]
        lines.append("--")
    out = sparse_line_numbers(lines, step, min_run)
    assert out == sparse_line_numbers(list(lines), step, min_run)  # same input, same bytes
    if out == lines:
        return
    assert out.count(sparse_note(step)) == 1
    k = out.index(sparse_note(step))
    assert full_lines(out)[:k] + full_lines(out)[k + 1 :] == lines


# -- through the summarize hook and prune ---------------------------------------------------------


def conversation(
    results: list[str], inputs: list[dict[str, Any]] | None = None, name: str = "Read"
) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = [{"role": "user", "content": "Fix the bug in a.py"}]
    for k, text in enumerate(results):
        tool_input = (inputs or [{}] * len(results))[k] or {"file_path": "/w/a.py"}
        msgs.append(
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": f"t{k}", "name": name, "input": tool_input}],
            }
        )
        msgs.append(
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": f"t{k}", "content": text}]}
        )
    return msgs


def summarized(msgs: list[dict[str, Any]], **settings: Any) -> list[dict[str, Any]]:
    body = {"model": MODEL, "max_tokens": 64, "messages": msgs, "tools": [{"name": "Read"}]}
    conf = summarize.tokensaver_configure({"line_numbers": "sparse", **settings}, "t")
    ctx = make_context(body, plugin="summarize", settings=conf, states={})
    out = summarize.tokensaver_transform_request(body, ctx)
    return (out or body)["messages"]


def results(msgs: list[dict[str, Any]]) -> list[str]:
    return [
        b["content"]
        for m in msgs
        if isinstance(m["content"], list)
        for b in m["content"]
        if b.get("type") == "tool_result"
    ]


def test_summarize_sends_a_read_sparse_only_when_asked_and_the_same_bytes_each_time() -> None:
    text = "\n".join([*read(1, 200), "", "<system-reminder>careful</system-reminder>"])
    sent = results(summarized(conversation([text])))[0]
    assert sent.split("\n")[0] == NOTE and len(sent) < 0.95 * len(text)
    assert full_lines(sent.split("\n"))[1:] == text.split("\n")
    assert results(summarized(conversation([text])))[0] == sent
    assert results(summarized(conversation([text]), line_numbers="compact"))[0] == text
    # off by default: the model cites the numbers of the lines between (facts kept fell under 99.5%)
    body = {"model": MODEL, "max_tokens": 64, "messages": conversation([text]), "tools": [{"name": "Read"}]}
    conf = summarize.tokensaver_configure({}, "t")
    ctx = make_context(body, plugin="summarize", settings=conf, states={})
    assert results((summarize.tokensaver_transform_request(body, ctx) or body)["messages"])[0] == text
    # a step and a run length of their own
    five = results(summarized(conversation([text]), line_number_step=50, sparse_min_lines=300))[0]
    assert five == text
    # only Read's results by default: an agent that edits by line number (sed -n, nl -ba) quotes them
    bash = conversation([text], [{"command": "cat -n a.py"}], name="Bash")
    assert results(summarized(bash))[0] == text
    assert results(summarized(bash, sparse_tools=[]))[0] == sent
    assert results(summarized(bash, sparse_tools=["Bash"]))[0] == sent


POINTER = re.compile(
    r"^\[tokensaver: lines (\d+)-(\d+) as (?:in|lines (\d+)-(\d+) of) the (?:tool_use )?(\S+) result(?: above)?\]$"
)


def expand(text: str, sent: dict[str, str]) -> list[str]:
    """A result as the model can read it back: each pointer as the numbered lines it names (their
    numbers the pointer's first range), every sparse line under its number."""
    out: list[str] = []
    for ln in full_lines(text.split("\n")):
        m = POINTER.match(ln)
        if m is None:
            out.append(ln)
            continue
        a, b, a0, b0, tid = m.groups()
        lo = int(a0) if a0 else int(a)
        earlier = {int(x.group(1)): x for e in expand(sent[tid], sent) if (x := NUMBERED.match(e))}
        for k in range(int(b) - int(a) + 1):
            line = earlier[lo + k].string
            out.append(f"{int(a) + k}{line[earlier[lo + k].end(1) :]}")
    return [ln for ln in out if ln != NOTE]


def test_a_reread_of_part_of_a_sparse_read_points_at_lines_that_count_back() -> None:
    first = "\n".join(read(1, 150))
    edited = read(41, 80)
    edited[30] = "71\t    value_71 = compute(y, 71)  # edited"  # one changed line in the middle
    edited[47] = "88\t    value_88 = compute(y, 88)  # edited"
    again = "\n".join(edited)
    msgs = summarized(conversation([first, again]))
    body = {"model": MODEL, "max_tokens": 64, "messages": msgs}
    ctx = make_context(body, plugin="prune", settings=dict(prune.DEFAULTS), states={})
    pruned = prune.tokensaver_transform_request(body, ctx) or body
    sent = dict(zip(["t0", "t1"], results(pruned["messages"]), strict=True))
    lines = sent["t1"].split("\n")
    assert sum(bool(POINTER.match(ln)) for ln in lines) >= 2  # the unchanged stretches point back
    assert len(sent["t1"]) < 0.4 * len(again)
    assert expand(sent["t1"], sent) == edited  # every line, under its number, byte for byte
    # each line left between pointers still counts: a gap's ends carry their numbers
    for k, ln in enumerate(lines):
        if POINTER.match(ln):
            for near in (lines[k - 1 : k], lines[k + 1 : k + 2]):
                assert all(NUMBERED.match(x) or POINTER.match(x) or x == NOTE for x in near), near


def test_the_same_code_twice_in_a_sparse_file_is_not_taken_for_a_self_repeat() -> None:
    block = [
        "    if not user.is_active:",
        "        raise PermissionDenied(user.name)",
        "    return handler(request)",
    ]
    text = "\n".join(read(1, 60, body=lambda i: block[i % 3]))
    sent = results(summarized(conversation([text])))[0]
    assert "[tokensaver: repeats" not in sent and full_lines(sent.split("\n"))[1:] == text.split("\n")
    # a second listing of the same numbered lines is one, and the lines after the pointer still count
    later = read(
        1, 30, body=lambda i: f"    changed_{i}()" if i > 25 else f"    value_{i} = compute(x, {i})  # step"
    )
    twice = [
        NOTE,
        *sparse_line_numbers(read(1, 40), 10, 20)[1:],
        "--",
        *sparse_line_numbers(later, 10, 20)[1:],
    ]
    out = _self_repeats.rewrite("\n".join(twice), short=True).split("\n")
    assert out[out.index("--") + 1 :] == [
        "[tokensaver: repeats lines 2-26 of this output]",
        "26\t    changed_26()",  # its number back: the line above it is a pointer now
        "    changed_27()",
        "    changed_28()",
        "    changed_29()",
        "30\t    changed_30()",
    ]
    assert out[:42] == twice[:42]


def test_an_edits_echo_still_points_at_its_input() -> None:
    new = "\n".join(f"    line_{i} = transform(data, {i})" for i in range(40))
    snippet = "\n".join(f"{100 + i}\t{ln}" for i, ln in enumerate(new.split("\n")))
    text = (
        "The file /w/a.py has been updated. Here's the result of running `cat -n` on a snippet:\n" + snippet
    )
    sent = results(
        summarized(conversation([text], [{"file_path": "/w/a.py", "old_string": "x", "new_string": new}]))
    )[0]
    assert "are lines 1-40 of 'new_string' in this tool use's input" in sent and len(sent) < 200


def test_a_cleared_sparse_reads_outline_keeps_its_line_numbers() -> None:
    code = {i: "    pass" for i in range(1, 80)}
    code[23], code[57] = "def handler(request):", "class Resource:"
    sparse = sparse_line_numbers(read(1, 79, body=lambda i: code[i]), 10, 20)
    assert "def handler(request):" in sparse and "class Resource:" in sparse  # sent without numbers
    assert prune.outline("\n".join(sparse)) == ["23\tdef handler(request):", "57\tclass Resource:"]


def test_the_fact_tracker_counts_a_dropped_line_number_as_lost_and_a_kept_one_as_kept() -> None:
    text = "\n".join(read(100, 60, body=lambda i: "    total = compute(value_123, x)"))
    original = {"messages": conversation([text])}
    sent = {"messages": summarized(conversation([text]))}
    facts = FactTracker()
    reply = [{"type": "text", "text": "The bug is on line 123; compare line 130 and value_123."}]
    used = facts.used(original, reply)
    assert {"123", "130", "value_123"} <= used
    kept, lost = facts.lost_results(used, original, sent)
    assert kept == len(used) - 1 and list(lost) == ["t0"]  # 123 went with its prefix; 130 is shown


# -- end to end: the real SDK to the emulator -----------------------------------------------------


def test_a_read_result_goes_sparse_through_wrap_and_the_next_call_starts_with_the_same_bytes(
    tmp_path: Any,
) -> None:
    text = "\n".join([*read(1, 120), "", "<system-reminder>careful</system-reminder>"])
    turn1 = conversation([text])
    turn2 = [
        *turn1,
        {"role": "assistant", "content": [{"type": "text", "text": "Found it."}]},
        {"role": "user", "content": "Thanks."},
    ]
    with Emulator(virtual_clock=True) as emu:
        client = tokensaver.wrap(
            anthropic.Anthropic(base_url=emu.url, api_key="k-sparse", max_retries=0),
            config={"runs_dir": str(tmp_path), "summarize": {"line_numbers": "sparse"}},
        )
        for msgs in (turn1, turn2):
            emu.reply("ok")
            client.messages.create(model=MODEL, max_tokens=20, messages=msgs)
        sent = [r.body["messages"] for r in emu.requests]
    content = sent[0][2]["content"][0]["content"]
    got = content if isinstance(content, str) else "".join(b["text"] for b in content)
    lines = got.split("\n")
    assert lines[0] == NOTE and shown(lines) == [1, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120]
    assert full_lines(lines)[1:] == text.split("\n")
    strip = lambda m: json.dumps(m).replace(', "cache_control": {"type": "ephemeral"}', "")  # noqa: E731
    assert [strip(m) for m in sent[1][:3]] == [strip(m) for m in sent[0][:3]]
