"""A create's answer that shows the new file again as a diff's added lines (OpenHands' str_replace_editor
``create``) points at the tool use's ``file_text`` instead: through wrap() to the emulator, lossless."""

from __future__ import annotations

import json
import re
from typing import Any

import anthropic
from tokensaver_plugins import _echo

import tokensaver
from tokensaver.emulator import Emulator

FILE = "\n".join(
    [
        "import random",
        "",
        "",
        "class Board:",
        "    def __init__(self, size: int = 4) -> None:",
        "        self.size = size",
        "        self.cells = [[0] * size for _ in range(size)]",
        "",
        "    def spawn(self) -> None:",
        "        empty = [(r, c) for r in range(self.size) for c in range(self.size) if not self.cells[r][c]]",
        "        r, c = random.choice(empty)",
        "        self.cells[r][c] = 2 if random.random() < 0.9 else 4",
    ]
)
RESULT = "--- /workspace/game.py\n+++ /workspace/game.py\n@@ -0,0 +1,12 @@\n" + "\n".join(
    "+" + ln for ln in FILE.split("\n")
)
POINTER = re.compile(
    r"^\[tokensaver: (\d+) added lines \(as \+text\) are lines (\d+)-(\d+) of '(\w+)' in this tool use's input\]$"
)


def _conversation(result: str) -> list[dict[str, Any]]:
    use = {"command": "create", "path": "/workspace/game.py", "file_text": FILE}
    return [
        {"role": "user", "content": "Please create a simple 2048 game."},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "t1", "name": "str_replace_editor", "input": use}],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": result}]},
    ]


def _unecho(text: str, tool_input: dict[str, Any]) -> str:
    out = []
    for line in text.split("\n"):
        m = POINTER.match(line)
        if m:
            lines = tool_input[m.group(4)].split("\n")[int(m.group(2)) - 1 : int(m.group(3))]
            assert len(lines) == int(m.group(1))
            out.extend("+" + ln for ln in lines)
        else:
            out.append(line)
    return "\n".join(out)


def test_a_creates_diff_of_its_own_file_text_is_a_pointer_and_loses_no_line(tmp_path: Any) -> None:
    with Emulator(virtual_clock=True) as emu:
        client = tokensaver.wrap(
            anthropic.Anthropic(base_url=emu.url, api_key="k-echo", max_retries=0),
            config={"runs_dir": str(tmp_path)},
        )
        turn1 = _conversation(RESULT)
        turn2 = [
            *turn1,
            {"role": "assistant", "content": [{"type": "text", "text": "Created it."}]},
            {"role": "user", "content": "Thanks."},
        ]
        for msgs in (turn1, turn2):
            emu.reply("ok")
            client.messages.create(model="claude-sonnet-4-6", max_tokens=20, messages=msgs)
        sent = [r.body["messages"] for r in emu.requests]
    content = sent[0][2]["content"][0]["content"]
    text = content if isinstance(content, str) else "".join(b["text"] for b in content)
    assert sum(bool(POINTER.match(ln)) for ln in text.split("\n")) == 1
    assert len(text) < 0.5 * len(RESULT)
    assert _unecho(text, turn1[1]["content"][0]["input"]) == RESULT
    # the same bytes on the next call (breakpoints aside)
    strip = lambda m: json.dumps(m).replace(', "cache_control": {"type": "ephemeral"}', "")  # noqa: E731
    assert [strip(m) for m in sent[1][:3]] == [strip(m) for m in sent[0][:3]]


def test_added_lines_that_differ_from_the_input_stay() -> None:
    changed = RESULT.replace("+        self.size = size", "+        self.size = size + 1")
    out = _echo.rewrite(changed, {"file_text": FILE})
    assert "+        self.size = size + 1" in out
    assert _unecho(out, {"file_text": FILE}) == changed


def test_a_line_of_spaces_the_diff_shows_as_a_bare_plus_does_not_break_the_run() -> None:
    """A diff tool shows a line of only spaces as ``+``: the lines are compared right-stripped, so
    the file's indented blank lines keep the run whole (the pointer gives them as the input has them)."""
    spaced = FILE.replace("\n\n    def spawn", "\n    \n    def spawn")
    shown = "--- /workspace/game.py\n+++ /workspace/game.py\n@@ -0,0 +1,12 @@\n" + "\n".join(
        "+" + ln.rstrip() for ln in spaced.split("\n")
    )
    out = _echo.rewrite(shown, {"file_text": spaced})
    pointers = [ln for ln in out.split("\n") if POINTER.match(ln)]
    assert len(pointers) == 1 and POINTER.match(pointers[0]).group(1) == "12"  # type: ignore[union-attr]
    back = _unecho(out, {"file_text": spaced})
    assert [ln.rstrip() for ln in back.split("\n")] == shown.split("\n")
