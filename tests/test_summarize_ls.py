"""summarize: an ``ls -l`` listing says the date most of its entries share once, in its header, and
leaves it out of their lines (a checkout's files all have the date it was made); every other
date, and every name, size and mode, as it came. Through the real SDK over HTTP to the emulator."""

from __future__ import annotations

from typing import Any

from strategies import tool_loop
from test_summarize_framing import sent_body

MODEL = "claude-sonnet-4-6"
NAMES = [
    "AUTHORS",
    "CONTRIBUTING.rst",
    "INSTALL",
    "LICENSE",
    "MANIFEST.in",
    "README.rst",
    "setup.cfg",
    "setup.py",
]
LISTING = "\n".join(
    [
        "total 188",
        "drwxrwxrwx  1 root root  4096 Oct 24  2024 .",
        "drwxr-xr-x  1 root root  4096 Nov 18 23:49 ..",
        *(f"-rw-r--r--  1 root root {100 + 37 * k:5d} Oct 24  2024 {n}" for k, n in enumerate(NAMES)),
        "drwxrwxrwx 18 root root  4096 Oct 24  2024 django",
    ]
)


def sent(tmp_path: Any, text: str) -> str:
    body = {
        "model": MODEL,
        "max_tokens": 64,
        "messages": tool_loop("List the files.", [("bash", {"command": "ls -la"}, text)]),
    }
    got = sent_body(tmp_path, body)
    out: str = got["messages"][2]["content"][0]["content"]
    return out


def test_the_date_most_entries_share_is_said_once(tmp_path: Any) -> None:
    out = sent(tmp_path, LISTING).split("\n")
    assert out[0] == (
        "[ls -l; owner root, group root on every entry; columns: mode links size date name; "
        "date Oct 24 2024 where none is shown]"
    )
    assert out[1:4] == ["total 188", "drwxrwxrwx 1 4096 .", "drwxr-xr-x 1 4096 Nov 18 23:49 .."]
    assert out[4:] == [
        *(f"-rw-r--r-- 1 {100 + 37 * k} {n}" for k, n in enumerate(NAMES)),
        "drwxrwxrwx 18 4096 django",
    ]


def test_a_name_that_starts_like_a_date_keeps_every_date(tmp_path: Any) -> None:
    text = LISTING + "\n-rw-r--r--  1 root root   120 Oct 24  2024 Oct 24 2024 notes.txt"
    out = sent(tmp_path, text).split("\n")
    assert out[0].endswith("columns: mode links size date name]")
    assert "-rw-r--r-- 1 100 Oct 24 2024 AUTHORS" in out
