"""summarize's ``self_repeats``: a tool output that repeats a run of its own lines (a chained
traceback's frames again) sends the repeat as a pointer to the lines above, through the real SDK
over HTTP to the emulator."""

from __future__ import annotations

import re
from typing import Any

from strategies import expand_lines, tool_loop
from test_summarize_framing import sent_body

MODEL = "claude-sonnet-4-6"
FRAMES = [
    "  /testbed/django/db/backends/utils.py:84 in _execute",
    "    return self.cursor.execute(sql, params)",
    "  /testbed/django/db/backends/sqlite3/base.py:412 in execute",
    "    return Database.Cursor.execute(self, query, params)",
]
OUTPUT = "\n".join(
    [
        "Traceback (most recent call last):",
        *FRAMES,
        "sqlite3.OperationalError: no such table: app_book",
        "",
        "The above exception was the direct cause of the following exception:",
        "",
        "Traceback (most recent call last):",
        "  /testbed/reproduce.py:37 in <module>",
        "    Book.objects.create(title='x')",
        *FRAMES,
        "django.db.utils.OperationalError: no such table: app_book",
    ]
)
POINTER = re.compile(r"^\[tokensaver: (repeats) lines (\d+)-(\d+) of this output\]$")


def sent(tmp_path: Any, text: str, config: dict[str, Any] | None = None) -> str:
    body = {
        "model": MODEL,
        "max_tokens": 64,
        "messages": tool_loop("Run it.", [("bash", {"command": "python reproduce.py"}, text)]),
    }
    got = sent_body(tmp_path, body, config)
    out: str = got["messages"][2]["content"][0]["content"]
    return out


def test_a_chained_traceback_sends_its_repeated_frames_as_a_pointer(tmp_path: Any) -> None:
    out = sent(tmp_path, OUTPUT)
    lines = out.split("\n")
    assert lines.count("[tokensaver: repeats lines 2-5 of this output]") == 1
    assert expand_lines(out, POINTER, lambda m: lines[int(m.group(2)) - 1 : int(m.group(3))]) == OUTPUT


def test_self_repeats_off_sends_the_output_as_it_came(tmp_path: Any) -> None:
    assert sent(tmp_path, OUTPUT, {"summarize": {"self_repeats": False}}) == OUTPUT
