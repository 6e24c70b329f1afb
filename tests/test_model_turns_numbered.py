"""summarize's ``model_turns``: code the model read with ``nl -ba`` (each line after its number and
a tab) and quotes without the numbers, in its text or a command, is sent as a pointer to those
lines of the result, its numbers left out. Through the real SDK over HTTP to the emulator."""

from __future__ import annotations

import re
from typing import Any

from strategies import expand_lines
from test_model_turns import SCRIPT, conversation, result, send, turn

NUMBERED = "\n".join(f"{100 + k:6d}\t    {line}" for k, line in enumerate(SCRIPT))
POINTER = re.compile(
    r"^\[tokensaver: (repeats) lines (\d+)-(\d+) of the (toolu_\d+) result without its line numbers\]$"
)


def quoting(quote: str) -> list[dict[str, Any]]:
    msgs = conversation(
        turn(0, "nl -ba checks.py | sed -n '100,111p'"),
        turn(1, "ls", f"THOUGHT: the checks are\n{quote}\nso check_6 fails."),
    )
    msgs[2] = result(0, f"<returncode>0</returncode>\n<output>\n{NUMBERED}\n</output>")
    return msgs


def test_code_quoted_without_its_line_numbers_points_at_the_numbered_lines(tmp_path: Any) -> None:
    quote = "\n".join(f"    {line}" for line in SCRIPT[2:10])
    msgs = quoting(quote)
    [sent] = send(tmp_path, [msgs])
    shown = sent[2]["content"][0]["content"]
    assert shown.startswith("[returncode 0]\n100\t    check_0(")  # the result as summarize sends it
    text = sent[3]["content"][0]["text"]
    lines = text.split("\n")
    assert POINTER.match(lines[1]) and lines[1].startswith("[tokensaver: repeats lines 4-11 of")
    bare = [re.sub(r"^ *\d+\t", "", ln) for ln in shown.split("\n")]
    got = expand_lines(text, POINTER, lambda m: bare[int(m.group(2)) - 1 : int(m.group(3))])
    assert got == msgs[3]["content"][0]["text"]
    assert len(text) < len(msgs[3]["content"][0]["text"]) / 2


def test_lines_quoted_with_other_indentation_go_as_they_came(tmp_path: Any) -> None:
    quote = "\n".join(SCRIPT[2:10])  # not as the file has them: no pointer
    [sent] = send(tmp_path, [quoting(quote)])
    assert sent[3]["content"][0]["text"] == f"THOUGHT: the checks are\n{quote}\nso check_6 fails."
