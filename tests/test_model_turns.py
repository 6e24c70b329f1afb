"""summarize's ``model_turns``: a run of lines an earlier turn of the model shows (a script written
again in a heredoc, code quoted again) is sent as a pointer to that turn, the same bytes on every
call, through the real SDK over HTTP to the emulator."""

from __future__ import annotations

import re
from typing import Any

import anthropic
from strategies import expand_lines
from tokensaver_plugins import _assistant
from tokensaver_plugins._blocks import request_problems

import tokensaver
from tokensaver.emulator import Emulator

MODEL = "claude-sonnet-4-6"
SCRIPT = [f"check_{k}(settings, value={k}, expected='case {k}')" for k in range(12)]
FIRST = "cat <<'EOF' > reproduce.py\nimport django\n" + "\n".join(SCRIPT) + "\nprint('done')\nEOF"
# the same script written again with one line changed
SECOND = FIRST.replace("check_6(settings, value=6", "check_6(settings, value=60")
RESULT_POINTER = re.compile(r"^\[tokensaver: (repeats) lines (\d+)-(\d+) of the (toolu_\d+) result\]$")
POINTER = re.compile(
    r"^\[tokensaver: (repeats) lines (\d+)-(\d+) of assistant turn (\d+)'s (command|text)\]$"
)


def turn(k: int, command: str, text: str | None = None) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    content.append(
        {"type": "tool_use", "id": f"toolu_{k:03d}", "name": "bash", "input": {"command": command}}
    )
    return {"role": "assistant", "content": content}


def result(k: int, text: str = "<returncode>0</returncode>\n<output>\n</output>") -> dict[str, Any]:
    return {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": f"toolu_{k:03d}", "content": text}],
    }


def conversation(*turns: dict[str, Any]) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = [{"role": "user", "content": "Fix the bug."}]
    for k, t in enumerate(turns):
        msgs += [t, result(k)]
    return msgs


def send(
    tmp_path: Any, bodies: list[list[dict[str, Any]]], config: dict[str, Any] | None = None
) -> list[Any]:
    """The messages the emulator got for each call (one client: a conversation), each request valid."""
    out = []
    with Emulator(virtual_clock=True, start_time=1_700_000_000.0) as emu:
        base = anthropic.Anthropic(base_url=emu.url, api_key="k", max_retries=0)
        client = tokensaver.wrap(base, config={"record": False, "runs_dir": str(tmp_path), **(config or {})})
        tools = [
            {
                "name": "bash",
                "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}},
            }
        ]
        for messages in bodies:
            body = {"model": MODEL, "max_tokens": 64, "tools": tools, "messages": messages}
            resp = client.post("/v1/messages", body=body, cast_to=object)
            assert isinstance(resp, dict) and resp["type"] == "message"
            sent = emu.last["body"]
            assert request_problems(sent) == []
            out.append(sent["messages"])
    return out


def command(messages: list[Any], i: int) -> str:
    block = [b for b in messages[i]["content"] if b["type"] == "tool_use"][0]
    text: str = block["input"]["command"]
    return text


def expanded(text: str, earlier: dict[tuple[int, str], str]) -> str:
    def lines(m: re.Match[str]) -> list[str]:
        return earlier[(int(m.group(4)), m.group(5))].split("\n")[int(m.group(2)) - 1 : int(m.group(3))]

    return expand_lines(text, POINTER, lines)


def test_a_script_written_again_is_sent_as_a_pointer_and_its_changed_lines(tmp_path: Any) -> None:
    [sent] = send(tmp_path, [conversation(turn(0, FIRST), turn(1, SECOND))])
    assert command(sent, 1) == FIRST  # the first copy as it came
    again = command(sent, 3)
    assert "check_6(settings, value=60, expected='case 6')" in again.split("\n")
    assert len(again) < len(SECOND) / 2
    assert any(POINTER.match(ln) for ln in again.split("\n"))
    assert expanded(again, {(1, "command"): FIRST}) == SECOND  # every line where the pointer says


def test_the_rewrite_is_the_same_bytes_on_every_later_call(tmp_path: Any) -> None:
    msgs = conversation(turn(0, FIRST), turn(1, SECOND), turn(2, "python reproduce.py"), turn(3, "git diff"))
    calls = send(tmp_path, [msgs[:5], msgs[:7], msgs])
    assert calls[0][3] == calls[1][3] == calls[2][3]
    assert command(calls[2], 3) != SECOND


def test_code_the_model_quotes_again_in_its_text_points_at_its_earlier_text(tmp_path: Any) -> None:
    code = "```python\n" + "\n".join(SCRIPT) + "\n```"
    first = turn(0, "ls", f"THOUGHT: the checks are\n{code}")
    second = turn(1, "ls -la", f"THOUGHT: as before,\n{code}\nso the bug is in check_6.")
    [sent] = send(tmp_path, [conversation(first, second)])
    text = sent[3]["content"][0]["text"]
    assert expanded(text, {(1, "text"): first["content"][0]["text"]}) == second["content"][0]["text"]
    assert len(text) < len(second["content"][0]["text"]) / 2


def test_a_turn_with_thinking_and_tool_results_are_left_as_they_came(tmp_path: Any) -> None:
    thinking = turn(1, SECOND)
    thinking["content"].insert(0, {"type": "thinking", "thinking": "the same script", "signature": "c2ln"})
    [sent] = send(tmp_path, [conversation(turn(0, FIRST), thinking)])
    assert command(sent, 3) == SECOND
    # a tool result repeating a command's lines is prune's to point at (to the command), not this
    msgs = conversation(turn(0, FIRST), turn(1, "cat reproduce.py"))
    msgs[4] = result(1, "<returncode>0</returncode>\n<output>\n" + "\n".join(SCRIPT) + "\n</output>")
    [sent] = send(tmp_path, [msgs])
    assert not any(POINTER.match(ln) for ln in str(sent[4]["content"][0]["content"]).split("\n"))


def test_model_turns_off_sends_them_as_they_came(tmp_path: Any) -> None:
    [sent] = send(
        tmp_path, [conversation(turn(0, FIRST), turn(1, SECOND))], {"summarize": {"model_turns": False}}
    )
    assert command(sent, 3) == SECOND


def test_code_the_model_quotes_from_a_tool_result_points_at_the_result(tmp_path: Any) -> None:
    shown = "\n".join(SCRIPT)
    msgs = conversation(
        turn(0, "cat checks.py"), turn(1, "ls", f"THOUGHT: the checks are\n{shown}\nso check_6 fails.")
    )
    msgs[2] = result(0, shown)
    [sent] = send(tmp_path, [msgs])
    assert sent[2]["content"][0]["content"] == shown  # the result as it came
    text = sent[3]["content"][0]["text"]
    lines = text.split("\n")
    assert RESULT_POINTER.match(lines[1]) and lines[1].endswith("of the toolu_000 result]")
    got = expand_lines(
        text, RESULT_POINTER, lambda m: shown.split("\n")[int(m.group(2)) - 1 : int(m.group(3))]
    )
    assert got == msgs[3]["content"][0]["text"]


def quoting_the_last_checks() -> list[dict[str, Any]]:
    """Two reads of checks.py (its first 8 lines, then all of it) and a turn quoting its last lines."""
    quote = "\n".join(SCRIPT[6:])
    return conversation(
        turn(0, "head -8 checks.py"),
        turn(1, "cat checks.py"),
        turn(2, "ls", f"THOUGHT: the last checks are\n{quote}\nso check_6 fails."),
    )


def test_a_result_prune_may_point_from_is_never_pointed_to(tmp_path: Any) -> None:
    # the second result repeats the first's lines: prune sends that run as a pointer, so its lines
    # are not where summarize saw them; the model's quote of its last lines is sent as it came
    msgs = quoting_the_last_checks()
    msgs[2], msgs[4] = result(0, "\n".join(SCRIPT[:8])), result(1, "\n".join(SCRIPT))
    [sent] = send(tmp_path, [msgs])
    assert sent[4]["content"][0]["content"].startswith("[tokensaver: ")  # prune's pointer
    assert sent[5]["content"][0]["text"] == msgs[5]["content"][0]["text"]


def test_a_result_after_a_list_result_it_repeats_is_never_pointed_to(tmp_path: Any) -> None:
    # prune indexes a result sent as text blocks too: a later result repeating its lines is
    # pointed from, so it is no target either
    msgs = quoting_the_last_checks()
    first = {"type": "text", "text": "\n".join(SCRIPT[:8])}
    msgs[2] = {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": "toolu_000", "content": [first]}],
    }
    msgs[4] = result(1, "\n".join(SCRIPT))
    [sent] = send(tmp_path, [msgs])
    assert sent[4]["content"][0]["content"].startswith("[tokensaver: ")  # prune's pointer
    assert sent[5]["content"][0]["text"] == msgs[5]["content"][0]["text"]


def test_lines_the_model_quotes_from_the_task_point_at_the_task(tmp_path: Any) -> None:
    task = "Fix the bug. The checks that fail:\n" + "\n".join(SCRIPT)
    msgs = conversation(turn(0, "ls", "THOUGHT: the failing checks are\n" + "\n".join(SCRIPT[2:10])))
    msgs[0] = {"role": "user", "content": task}
    [sent] = send(tmp_path, [msgs])
    assert [b["text"] for b in sent[0]["content"]] == [task]  # as it came (a block: cache_align's breakpoint)
    assert sent[1]["content"][0]["text"].split("\n")[1] == "[tokensaver: repeats lines 4-11 of the task]"


def test_the_pass_goes_on_from_where_the_last_call_left_it_with_the_same_bytes() -> None:
    # a growing conversation, call after call: the pass resumed from the last call's state (its
    # rewrites re-applied, both repeat indexes resumed) sends what a pass over everything sends
    msgs = conversation(
        turn(0, FIRST),
        turn(1, "python reproduce.py", "THOUGHT: run it.\n" + "\n".join(SCRIPT[3:9])),
        turn(2, SECOND),
        turn(3, "cat reproduce.py"),
        turn(4, FIRST, "THOUGHT: back to the first one.\n" + "\n".join(SCRIPT[2:10])),
    )
    msgs[8] = result(3, "\n".join(SCRIPT))
    state = None
    for n in range(3, len(msgs) + 1, 2):
        full_stats: dict[str, Any] = {}
        full, _ = _assistant.rewrite(msgs[:n], full_stats)
        stats: dict[str, Any] = {}
        resumed, state = _assistant.rewrite(msgs[:n], stats, state=state, same=max(0, n - 2))
        assert resumed == full and stats == full_stats
    assert full is not None and sum(1 for m in full if m not in msgs) >= 2  # it did rewrite turns
