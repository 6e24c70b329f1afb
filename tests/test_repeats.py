"""prune's repeats: runs of lines an earlier tool result shows become a pointer, losslessly and prefix-stably."""

from __future__ import annotations

import json
import re
from typing import Any

import anthropic
from strategies import expand_lines, tau_reservation, tool_loop
from tokensaver_plugins import prune
from tokensaver_plugins._blocks import request_problems
from tokensaver_plugins._repeats import marker
from tokensaver_plugins._summarize_text import SPARSE_NOTE_START, full_lines

import tokensaver
from tokensaver.context import make_context
from tokensaver.emulator import Emulator
from tokensaver.tokens import count_text

MODEL = "claude-sonnet-4-6"
T0 = 1_700_000_000.0
# prune's pointers in the short form (``_repeats.marker``'s ``short``, as summarize's): numbered
# lines by their numbers (one range: the same numbers; two: new ones, then where they were), other
# lines by their place in the earlier result as sent
POINTER = re.compile(
    r"^\[tokensaver: (?:lines (\d+)-(\d+) as (?:in|lines (\d+)-(\d+) of)|repeats lines (\d+)-(\d+) of) "
    r"the (\S+) result\]$"
)
OBJECT = re.compile(r"^\[tokensaver: as the (\S+) result, with (\d+) of its (\d+) keys now:\]$")
NUMBERED = re.compile(r"^ *(\d+)(→|\t|:)")


def source(n: int, changed: frozenset[int] = frozenset()) -> list[str]:
    return [
        f"    total_{i} = compute(values[{i}], scale={i % 7})  # {'edited' if i in changed else 'step'}"
        for i in range(n)
    ]


def numbered(lines: list[str]) -> str:
    return "\n".join(f"{i + 1}→{ln}" for i, ln in enumerate(lines))


def agent(results: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Task, then one tool use per (tool name, result text)."""
    return tool_loop("Task: fix the bug", [(name, {"k": k}, text) for k, (name, text) in enumerate(results)])


def body_of(messages: list[dict[str, Any]]) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 64, "system": "You fix bugs.", "messages": messages}


def run(body: dict[str, Any], states: dict[str, Any], **conf: Any) -> dict[str, Any]:
    ctx = make_context(body, plugin="prune", settings={**prune.DEFAULTS, **conf}, now=T0, states=states)
    out = prune.tokensaver_transform_request(body, ctx)
    sent = out if out is not None else body
    assert request_problems(sent) == []
    return sent


def results_of(body: dict[str, Any]) -> dict[str, str]:
    return {
        b["tool_use_id"]: b["content"]
        for m in body["messages"]
        if isinstance(m["content"], list)
        for b in m["content"]
        if b.get("type") == "tool_result"
    }


class Num(str):
    """A JSON number as written."""


def compact(v: Any) -> str:
    if isinstance(v, Num):
        return str(v)
    if isinstance(v, dict):
        return "{" + ",".join(json.dumps(k) + ":" + compact(x) for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ",".join(compact(x) for x in v) + "]"
    return json.dumps(v)


def renumbered(line: str, n: re.Match[str], new: int) -> str:
    """A numbered line under a new number, padded to the same width when it was (``nl -ba``)."""
    return (str(new).rjust(n.end(1)) if n.start(1) else str(new)) + line[n.end(1) :]


def expand(text: str, sent: dict[str, str], inputs: dict[str, Any] | None = None) -> str:
    """The text with every pointer replaced by what it names in the earlier result (as sent):
    its lines (renumbered when the pointer gives two ranges), or its JSON object with the values
    the pointer lists; given the tool uses' ``inputs``, each pointer into one too (``expand_inputs``)."""
    head, _, rest = text.partition("\n")
    same = re.match(
        r"^\[tokensaver: identical to the earlier result of tool_use (\S+); see that result above\]$", text
    )
    if same:
        return expand(sent[same.group(1)], sent, inputs)
    m = OBJECT.match(head)
    if m:
        earlier = json.loads(expand(sent[m.group(1)], sent, inputs), parse_float=Num, parse_int=Num)
        changed = json.loads(rest, parse_float=Num, parse_int=Num)
        assert set(changed) <= set(earlier)
        assert len(changed) == int(m.group(2)) and len(earlier) == int(m.group(3))
        return compact({**earlier, **changed})

    def pointed(m: re.Match[str]) -> list[str]:
        a, b, a0, b0, p, q, tid = m.groups()
        if a is None:  # positions in the earlier result as it was sent (its own pointers as lines)
            return expand("\n".join(sent[tid].split("\n")[int(p) - 1 : int(q)]), sent, inputs).split("\n")
        earlier = full_lines(expand(sent[tid], sent, inputs).split("\n"))  # a sparse read's lines numbered
        lo, hi = (int(a0), int(b0)) if a0 else (int(a), int(b))
        picked = [(x, n) for x in earlier if (n := NUMBERED.match(x)) and lo <= int(n.group(1)) <= hi]
        assert len(picked) == int(b) - int(a) + 1
        # the new numbers: the pointer's first range, one line each
        return [renumbered(x, n, int(a) + k) for k, (x, n) in enumerate(picked)]

    out = expand_lines(text, POINTER, pointed)
    return out if inputs is None else expand_inputs(out, inputs)


def unsparse(text: str) -> str:
    """A result sent with sparse line numbers (summarize's default for a Read) as it came: every
    line under its number, the note left out."""
    return "\n".join(ln for ln in full_lines(text.split("\n")) if not ln.startswith(SPARSE_NOTE_START))


def test_a_reread_after_an_edit_points_at_the_unchanged_lines_and_loses_nothing() -> None:
    first = numbered(source(120))
    again = numbered(source(120, changed=frozenset({60})))
    log = "\n".join(
        f"test_case_{i} ... ok  ({i * 3} ms) in module tests/test_mod_{i % 9}.py" for i in range(40)
    )
    rerun = log.replace("test_case_17 ... ok", "test_case_17 ... FAIL")
    msgs = agent(
        [("Read", first), ("Bash", log), ("Edit", "ok"), ("Read", again), ("Bash", rerun), ("Bash", "done")]
    )
    sent = run(body_of(msgs), {})
    out = results_of(sent)
    assert out["toolu_000"] == first and out["toolu_001"] == log  # the first copies go as they came
    assert POINTER.match(out["toolu_003"].split("\n")[0])  # lines 1-60 unchanged: one pointer
    assert "61→    total_60 = compute(values[60], scale=4)  # edited" in out["toolu_003"]
    assert len(out["toolu_003"]) < 0.2 * len(again) and len(out["toolu_004"]) < 0.3 * len(rerun)
    assert "test_case_17 ... FAIL" in out["toolu_004"]
    assert expand(out["toolu_003"], out) == again and expand(out["toolu_004"], out) == rerun  # lossless
    off = results_of(run(body_of(msgs), {}, repeats=False))
    assert off["toolu_003"] == again and off["toolu_004"] == rerun


def test_a_shifted_reread_points_back_with_both_ranges() -> None:
    """A re-read after lines were added above: the same code under new numbers points back, and
    the pointer names both ranges, so every new number is still there (sed -n 150,160p quotes them)."""
    lines = source(80)
    again = numbered(["import os", *lines])
    msgs = agent([("Read", numbered(lines)), ("Read", again)])
    out = results_of(run(body_of(msgs), {}))
    assert out["toolu_001"].split("\n") == [
        "1→import os",
        "[tokensaver: lines 2-81 as lines 1-80 of the toolu_000 result]",
    ]
    assert expand(out["toolu_001"], out) == again


def test_a_shifted_run_stops_where_the_numbering_breaks() -> None:
    """Numbered lines match under a shift only while both copies count up by one: a jump in the
    new copy (two ranges printed together) ends the run, and the rest is matched on its own."""
    lines = source(60)
    first = "\n".join(f"{i + 100}:{ln}" for i, ln in enumerate(lines))  # SWE-agent's "N:" numbering
    # lines 0-19 now at 102-121, then a jump to 300 for lines 20-39 (printed from another range)
    again = "\n".join(
        [f"{i + 102}:{ln}" for i, ln in enumerate(lines[:20])]
        + [f"{i + 300}:{ln}" for i, ln in enumerate(lines[20:40])]
    )
    msgs = agent([("open", first), ("open", again)])
    out = results_of(run(body_of(msgs), {}))
    assert out["toolu_001"].split("\n") == [
        "[tokensaver: lines 102-121 as lines 100-119 of the toolu_000 result]",
        "[tokensaver: lines 300-319 as lines 120-139 of the toolu_000 result]",
    ]
    assert expand(out["toolu_001"], out) == again
    # unnumbered lines between shifted numbered ones are not part of a shifted run
    mixed = "\n".join([f"{i + 101}:{ln}" for i, ln in enumerate(lines[:10])] + ["(file ends)"])
    out = results_of(run(body_of(agent([("open", first), ("open", mixed)])), {}))
    assert expand(out["toolu_001"], out) == mixed and out["toolu_001"].endswith("\n(file ends)")


def record(**changes: Any) -> str:
    rec = tau_reservation(**changes)
    return json.dumps(rec, separators=(",", ":")).replace('"price":1.5}', '"price":1.50}')


def test_an_updated_record_is_sent_as_what_changed() -> None:
    """tau-bench: an update returns the whole record again; only the values that differ are sent,
    after a pointer to the earlier result (numbers as written: 1.50 stays 1.50)."""
    first = record()
    updated = record(cabin="business", payment_history=[{"payment_id": "credit_card_1", "amount": 300}])
    other = record(
        reservation_id="ZZZ999",
        user_id="x",
        origin="A",
        destination="B",
        flights=[],
        cabin="c",
        passengers=[],
        payment_history=[],
        created_at="t",
    )  # most keys differ: sent whole
    msgs = agent(
        [("get_reservation_details", first), ("update_reservation_flights", updated), ("get", other)]
    )
    sent = run(body_of(msgs), {})
    out = results_of(sent)
    head, _, rest = out["toolu_001"].partition("\n")
    assert head == "[tokensaver: as the toolu_000 result, with 2 of its 14 keys now:]"
    assert json.loads(rest) == {
        "cabin": "business",
        "payment_history": [{"payment_id": "credit_card_1", "amount": 300}],
    }
    assert expand(out["toolu_001"], out) == updated  # lossless, byte for byte
    assert out["toolu_000"] == first and out["toolu_002"] == other
    assert len(out["toolu_001"]) < 0.5 * len(updated)
    # prefix-stable: the next call sends the same bytes for every earlier result
    more = agent(
        [
            ("get_reservation_details", first),
            ("update_reservation_flights", updated),
            ("get", other),
            ("get_reservation_details", record(cabin="business")),
        ]
    )
    out2 = results_of(run(body_of(more), {}))
    assert all(out2[t] == out[t] for t in out)
    assert expand(out2["toolu_003"], out2) == record(cabin="business")
    assert out2["toolu_003"].startswith("[tokensaver: as the toolu_000 result, with 1 of")
    # the earlier record cleared by a cut: the update goes whole again
    after = prune.apply_spec(
        msgs, {"cleared": ["toolu_000"], "drop": None}, {**prune.DEFAULTS}, lambda x: 1000
    )
    assert results_of({"messages": after})["toolu_001"] == updated


def test_pointers_are_prefix_stable_and_follow_a_cut() -> None:
    lines = source(100)
    results = [("Read", numbered(lines)), ("Bash", "x" * 50)] + [
        ("Read", numbered(source(100, changed=frozenset({k})))) for k in range(10, 90, 10)
    ]
    msgs = agent(results)
    states: dict[str, Any] = {}
    previous: list[Any] = []
    for n in range(3, len(msgs) + 1, 2):
        sent = run(body_of(msgs[:n]), states, clear_stale=False)["messages"]
        assert sent[: len(previous)] == previous  # every message already sent: the same bytes
        previous = sent
    assert sum("[tokensaver: lines" in json.dumps(m) for m in previous) >= 8  # every re-read points back
    # a cut that clears the first read: nothing points at it any more, the next copy is sent whole
    spec = {"cleared": ["toolu_000"], "drop": None}
    after = prune.apply_spec(msgs, spec, {**prune.DEFAULTS}, lambda x: len(json.dumps(x)) // 4)
    out = results_of({"messages": after})
    assert "toolu_000" not in json.dumps([out[t] for t in out if t != "toolu_000"])
    assert out["toolu_002"] == numbered(source(100, changed=frozenset({10})))
    assert any(POINTER.match(ln) for ln in out["toolu_009"].split("\n"))
    assert expand(out["toolu_009"], out) == numbered(source(100, changed=frozenset({80})))


def sent_through_wrap(msgs: list[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    """The body ``msgs`` reached the emulator as, sent through ``wrap()`` with ``config``."""
    with Emulator(virtual_clock=True, start_time=T0) as emu:
        base = anthropic.Anthropic(base_url=emu.url, api_key="k", max_retries=0)
        client = tokensaver.wrap(base, config=config)
        resp = client.post("/v1/messages", body=body_of(msgs), cast_to=object)
        assert isinstance(resp, dict) and resp["type"] == "message"
        return dict(emu.last["body"])


def test_repeats_through_wrap_to_the_emulator(tmp_path: Any) -> None:
    first = numbered(source(150))
    msgs = agent([("Read", first), ("Bash", "ok"), ("Read", numbered(source(150, changed=frozenset({140}))))])
    sent = sent_through_wrap(
        msgs, {"plugins": ["prune", "cache_align"], "record": False, "runs_dir": str(tmp_path)}
    )
    assert request_problems(sent) == []
    out = results_of(sent)
    assert POINTER.match(out["toolu_002"].split("\n")[0]) and expand(out["toolu_002"], out) == numbered(
        source(150, changed=frozenset({140}))
    )


def test_real_conversations_lose_no_line() -> None:
    """The last call of each recorded SWE-style and tau-bench conversation in fixtures/: every
    pointer expands back to the result as it came (JSON objects to the same values)."""
    from tokensaver.traces import fixtures_dir, load_conversation

    pointers = 0
    for name in ("swe-agent", "mini-swe-agent-gemini3", "tau-bench"):
        for path in sorted((fixtures_dir() / name).glob("*.json")):
            conv = load_conversation(path)
            body = conv.calls[-1].body
            given = results_of(body)
            inputs = {
                b["id"]: b["input"]
                for m in body["messages"]
                if isinstance(m["content"], list)
                for b in m["content"]
                if b.get("type") == "tool_use"
            }
            out = results_of(run(body, {}, clear_stale=False))
            for tid, text in out.items():
                if text == given[tid]:
                    continue
                pointers += bool(OBJECT.match(text.split("\n")[0]))  # tau-bench's updated records
                back = expand(text, out, inputs)  # pointers into a tool use's input too
                if OBJECT.match(text.split("\n")[0]):
                    assert json.loads(back) == json.loads(given[tid]), (path.name, tid)
                else:
                    assert back == given[tid], (path.name, tid)
    assert pointers >= 2


FORMAT_ERROR = (
    "Please always provide EXACTLY ONE action in triple backticks, found 2 actions.\n\n"
    "Please format your action in triple backticks as shown in <response_example>.\n\n"
    "<response_example>\nHere are some thoughts about why you want to perform the action.\n\n"
    "```bash\n<action>\n```\n</response_example>\n\n"
    "If you have completed your assignment, please consult the first message about how to\n"
    "submit your solution (you will not be able to continue working on this task after that)."
)


def test_a_copy_too_small_for_the_identical_pointer_still_points_at_its_lines(tmp_path: Any) -> None:
    """mini-swe-agent's format error (14 lines, under min_result_tokens) sent again and again: the
    copies after the first become one line each, through wrap() to the emulator, losslessly."""
    msgs = agent([("bash", FORMAT_ERROR), ("bash", "ok"), ("bash", FORMAT_ERROR), ("bash", FORMAT_ERROR)])
    sent = sent_through_wrap(
        msgs,
        {
            "plugins": ["prune", "cache_align"],
            "record": False,
            "runs_dir": str(tmp_path),
            "prune": {"min_result_tokens": 120},  # (the error's 99 tokens are under it)
        },
    )
    assert request_problems(sent) == []
    out = results_of(sent)
    assert out["toolu_000"] == FORMAT_ERROR
    for tid in ("toolu_002", "toolu_003"):
        assert POINTER.match(out[tid]), out[tid]
        assert expand(out[tid], out) == FORMAT_ERROR


INPUT_POINTER = re.compile(
    r"^\[tokensaver: (?:lines (\d+)-(\d+) \(as \d+(→|\\t|:)text\) are|(\d+) lines as) "
    r"lines (\d+)-(\d+) of '(\w+)' in the tool_use (\S+) input above\]$"
)


def expand_inputs(text: str, inputs: dict[str, Any]) -> str:
    """The text with each pointer into a tool use's input replaced by the field's lines it names
    (numbered from the pointer's first number when it gives one)."""

    def pointed(m: re.Match[str]) -> list[str]:
        first, _, sep, _, p, q, field, tid = m.groups()
        src = inputs[tid][field].split("\n")[int(p) - 1 : int(q)]
        if first is None:
            return src
        sep = "\t" if sep == "\\t" else sep
        return [f"{int(first) + k}{sep}{ln}" for k, ln in enumerate(src)]

    return expand_lines(text, INPUT_POINTER, pointed)


def test_a_written_file_read_back_points_at_the_write_input(tmp_path: Any) -> None:
    """Claude Code writes a file (Write's ``content``), edits it, then reads it back (``N→text``):
    the lines the Write and the Edit's ``new_string`` hold become pointers to those inputs, through
    wrap() to the emulator; the request stays valid and every line comes back."""
    lines = source(60)
    new = [f"    total_{i} = adjust(values[{i}], scale={i % 5})  # fixed" for i in range(30, 42)]
    after = lines[:30] + new + lines[42:]
    write = {"file_path": "/repo/calc.py", "content": "\n".join(lines)}
    edit = {
        "file_path": "/repo/calc.py",
        "old_string": "\n".join(lines[30:42]),
        "new_string": "\n".join(new),
    }
    read_back = numbered(after)
    msgs = tool_loop(
        "Task: fix the bug",
        [
            ("Write", write, "File created successfully at: /repo/calc.py"),
            ("Edit", edit, "The file /repo/calc.py has been updated."),
            ("Read", {"file_path": "/repo/calc.py"}, read_back),
        ],
    )
    sent = sent_through_wrap(
        msgs,
        {
            "plugins": ["summarize", "prune", "cache_align"],
            "record": False,
            "runs_dir": str(tmp_path),
        },
    )
    assert request_problems(sent) == []
    out = results_of(sent)["toolu_002"]
    pointers = [ln for ln in out.split("\n") if INPUT_POINTER.match(ln)]
    assert len(pointers) == 3 and "'new_string' in the tool_use toolu_001" in pointers[1], out
    assert len(out) < 0.1 * len(read_back)
    assert expand_inputs(out, {"toolu_000": write, "toolu_001": edit}) == read_back  # lossless


def test_a_diff_of_an_edit_points_at_the_edit_input(tmp_path: Any) -> None:
    """``git diff`` after an Edit: its ``-`` and ``+`` lines are the Edit's ``old_string`` and
    ``new_string``, each after its diff character; they become pointers (through wrap() to the
    emulator), and the diff's own lines stay."""
    old = source(40)[10:22]
    new = [f"    total_{i} = adjust(values[{i}], scale={i % 5})  # fixed" for i in range(10, 22)]
    edit = {"file_path": "/repo/calc.py", "old_string": "\n".join(old), "new_string": "\n".join(new)}
    diff = "\n".join(
        [
            "diff --git a/calc.py b/calc.py",
            "index 1111111..2222222 100644",
            "--- a/calc.py",
            "+++ b/calc.py",
            "@@ -11,12 +11,12 @@ def run(values):",
            *("-" + ln for ln in old),
            *("+" + ln for ln in new),
        ]
    )
    msgs = tool_loop(
        "Task: fix the bug",
        [("Edit", edit, "The file /repo/calc.py has been updated."), ("Bash", {"command": "git diff"}, diff)],
    )
    sent = sent_through_wrap(msgs, {"record": False, "runs_dir": str(tmp_path)})
    assert request_problems(sent) == []
    out = results_of(sent)["toolu_001"]
    assert "@@ -11,12 +11,12 @@ def run(values):" in out and len(out) < 0.3 * len(diff)
    pointers = [ln for ln in out.split("\n") if ln.startswith("[tokensaver:")]
    assert len(pointers) == 2, out
    assert pointers[0].endswith("each after '-']") and pointers[1].endswith("each after '+']"), out

    def back(m: re.Match[str]) -> list[str]:
        n, p, q, field, tid, mark = m.groups()
        return [mark + ln for ln in edit[field].split("\n")[int(p) - 1 : int(q)]]

    diff_pointer = re.compile(
        r"^\[tokensaver: (\d+) lines as lines (\d+)-(\d+) of '(\w+)' in the tool_use (\S+) input above, "
        r"each after '(.)'\]$"
    )
    # summarize drops the ---/+++ pair that the diff --git line implies; the rest comes back
    assert expand_lines(out, diff_pointer, back) == diff.replace("--- a/calc.py\n+++ b/calc.py\n", "")


REMINDER = (
    "<system-reminder>\nWhenever you read a file, you should consider whether it would be considered "
    "malware. You CAN and SHOULD provide analysis of malware, what it is doing. But you MUST refuse to "
    "improve or augment the code. You can still analyze existing code, write reports, or answer "
    "questions about the code behavior.\n</system-reminder>\n"
)


def test_claude_codes_read_reminder_is_sent_once(tmp_path: Any) -> None:
    """Claude Code ends every Read result with the same 3-line system reminder (about 70 tokens):
    with the default settings each later copy is one pointer line, through wrap() to the emulator,
    the request valid and every result expanding back to what it was."""
    reads = [numbered(source(30 + 7 * k)) + "\n\n" + REMINDER for k in range(3)]
    msgs = tool_loop(
        "Task: fix the bug",
        [("Read", {"file_path": f"/repo/f{k}.py"}, text) for k, text in enumerate(reads)],
    )
    sent = sent_through_wrap(msgs, {"record": False, "runs_dir": str(tmp_path)})
    assert request_problems(sent) == []
    out = results_of(sent)
    assert out["toolu_000"].endswith(REMINDER)
    for k, tid in enumerate(("toolu_001", "toolu_002")):
        assert "Whenever you read a file" not in out[tid]
        assert POINTER.match(out[tid].rstrip("\n").split("\n")[-1]), out[tid][-300:]
        assert unsparse(expand(out[tid], out)) == reads[k + 1]


LONG_FORM = re.compile(r"tool_use \S+ result|result above|\d+ lines as lines")


def test_prunes_pointers_are_summarizes_short_form(tmp_path: Any) -> None:
    """prune's pointers to an earlier result are in the short form summarize's model turns use
    (``[tokensaver: repeats lines 3-7 of the toolu_001 result]``: no count of lines, no "tool_use",
    no "above"), one form for both: through wrap() to the emulator with the default plugins, a
    re-read, a re-run and a quote of the run's lines in the model's text all name the result the
    same way, fewer tokens than the long form, and every pointer reads back to what it stands for."""
    first = numbered(source(60))
    again = numbered(source(60, changed=frozenset({30})))
    log = "\n".join(
        f"test_case_{i} ... ok  ({i * 3} ms) in module tests/test_mod_{i % 9}.py" for i in range(40)
    )
    rerun = log.replace("test_case_17 ... ok", "test_case_17 ... FAIL")
    quoted = log.split("\n")[20:26]
    thought = "\n".join(["These passed before:", *quoted, "so only the fix changes them."])
    msgs = agent([("Read", first), ("Bash", log), ("Bash", rerun), ("Read", again)])
    msgs[5]["content"].insert(0, {"type": "text", "text": thought})
    sent = sent_through_wrap(msgs, {"record": False, "runs_dir": str(tmp_path)})
    assert request_problems(sent) == []
    out = results_of(sent)
    text = sent["messages"][5]["content"][0]["text"]
    pointers = [
        ln
        for t in (out["toolu_002"], out["toolu_003"], text)
        for ln in t.split("\n")
        if ln.startswith("[tokensaver:")
    ]
    assert len(pointers) >= 4, pointers
    assert all(POINTER.match(ln) and not LONG_FORM.search(ln) for ln in pointers), pointers
    assert "[tokensaver: repeats lines 21-26 of the toolu_001 result]" in text.split("\n"), (
        text
    )  # summarize's
    assert (
        out["toolu_002"].split("\n")[0] == "[tokensaver: repeats lines 1-17 of the toolu_001 result]"
    )  # prune's
    assert out["toolu_003"].split("\n")[0] == "[tokensaver: lines 1-30 as in the toolu_000 result]"
    # fewer tokens than the long form naming the same lines
    for ln in pointers:
        m = POINTER.match(ln)
        assert m is not None
        a, b, a0, b0, p, q, tid = m.groups()
        long = prune_long_marker(tid, (int(a), int(b)) if a else None, (int(a0 or a or p), int(b0 or b or q)))
        assert count_text(ln) < count_text(long), (ln, long)
    # lossless: each pointer reads back to the lines it stands for
    assert expand(out["toolu_002"], out) == rerun and expand(out["toolu_003"], out) == again
    assert expand(text, out) == thought


def prune_long_marker(tid: str, here: tuple[int, int] | None, there: tuple[int, int]) -> str:
    """The long form of a pointer to a result (prune's before it took the short one)."""
    return marker(tid, there[1] - there[0] + 1, here, there)


def test_a_run_of_150_characters_points_back_but_a_moved_one_needs_300(tmp_path: Any) -> None:
    """With the short pointer (~45 characters) a run of 150+ characters pays (repeat_min_chars
    300 -> 150); a run of numbered lines now under other numbers than where it points still needs
    300 (repeat_moved_min_chars: its new numbers are only in the pointer's range, and a few lines
    of common code match by chance in another function). Through wrap() to the emulator: the
    4-line run under its own numbers is one pointer, the 4-line moved run stays as it came, the
    10-line moved run points back with both ranges, and every line reads back."""
    lines = source(60)
    first = numbered(lines)
    view = [(5 + k, lines[4 + k]) for k in range(4)]  # lines 5-8 under their own numbers
    view += [(9 + k, f"    unrelated_{k} = other({k})  # new") for k in range(3)]
    view += [(30 + k, lines[19 + k]) for k in range(4)]  # lines 20-23 as lines 30-33
    view += [(34 + k, f"    another_{k} = other({k})  # new") for k in range(3)]
    view += [(50 + k, lines[39 + k]) for k in range(10)]  # lines 40-49 as lines 50-59
    again = "\n".join(f"{n}→{ln}" for n, ln in view)
    assert 150 <= sum(len(f"{n}→{ln}") + 1 for n, ln in view[:4]) < 300
    assert sum(len(f"{n}→{ln}") + 1 for n, ln in view[7:11]) < 300
    msgs = agent([("Read", first), ("Bash", "ok"), ("Read", again)])
    sent = sent_through_wrap(
        msgs, {"plugins": ["prune", "cache_align"], "record": False, "runs_dir": str(tmp_path)}
    )
    assert request_problems(sent) == []
    out = results_of(sent)
    got = out["toolu_002"].split("\n")
    assert got[0] == "[tokensaver: lines 5-8 as in the toolu_000 result]", got
    assert got[4:8] == [f"{n}→{ln}" for n, ln in view[7:11]]  # the short moved run as it came
    assert got[-1] == "[tokensaver: lines 50-59 as lines 40-49 of the toolu_000 result]", got
    assert len(got) == 1 + 3 + 4 + 3 + 1
    assert expand(out["toolu_002"], out) == again
    # the settings as they were: no pointer for the short run
    old = results_of(run(body_of(msgs), {}, repeat_min_chars=300))["toolu_002"].split("\n")
    assert old[:4] == [f"{n}→{ln}" for n, ln in view[:4]]
