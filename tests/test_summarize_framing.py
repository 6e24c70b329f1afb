"""summarize: mini-swe-agent's ``<returncode>``/``<output>`` tags and SWE-agent's state lines go at any
size, as documented (a large output that saves under 2% otherwise kept them), through the real SDK
over HTTP to the emulator."""

from __future__ import annotations

from typing import Any

import anthropic
from strategies import tool_loop
from tokensaver_plugins._blocks import request_problems
from tokensaver_plugins._user_text import NOTE_POINTER, REVIEW_NOTE

import tokensaver
from tokensaver.emulator import Emulator

MODEL = "claude-sonnet-4-6"
# prose-like lines no other rewrite shortens (no numbers to collapse, no blob, no listing)
LINES = [
    f"The view {w} renders the {v} template with its context." for w in "abcdefghij" for v in "klmnopqrstu"
]
OUTPUT = "\n".join(LINES) + "\n"


def sent_result(
    tmp_path: Any, text: str, task: str = "Find the view.", command: str = "python run.py"
) -> str:
    """What the defaults send of ``text``, the result of one bash ``command`` after ``task``, through
    ``wrap()`` to the emulator (the request checked valid)."""
    body = {
        "model": MODEL,
        "max_tokens": 64,
        "messages": tool_loop(task, [("bash", {"command": command}, text)]),
    }
    out: str = sent_body(tmp_path, body)["messages"][2]["content"][0]["content"]
    return out


def sent_body(tmp_path: Any, body: dict[str, Any], config: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the defaults (and ``config``) send of ``body`` through ``wrap()`` to the emulator (checked valid)."""
    with Emulator(virtual_clock=True, start_time=1_700_000_000.0) as emu:
        base = anthropic.Anthropic(base_url=emu.url, api_key="k", max_retries=0)
        client = tokensaver.wrap(base, config={"record": False, "runs_dir": str(tmp_path), **(config or {})})
        resp = client.post("/v1/messages", body=body, cast_to=object)
        assert isinstance(resp, dict) and resp["type"] == "message"
        sent: dict[str, Any] = emu.last["body"]
    assert request_problems(sent) == []
    return sent


def test_a_large_mini_swe_agent_output_loses_its_tags(tmp_path: Any) -> None:
    assert len(OUTPUT) > 5000
    text = f"<returncode>1</returncode>\n<output>\n{OUTPUT}</output>"
    assert sent_result(tmp_path, text) == f"[returncode 1]\n{OUTPUT}"


def test_a_large_swe_agent_output_sends_its_state_as_one_line(tmp_path: Any) -> None:
    text = OUTPUT + "(Open file: /repo/app/views.py)\n(Current directory: /repo)\nbash-$"
    assert sent_result(tmp_path, text) == OUTPUT + "[open: app/views.py, cwd: /repo]"


def test_swe_agent_tool_results_name_their_directory_once(tmp_path: Any) -> None:
    """In tool results too: the directory an earlier state line names goes from the next ones
    (every 5th in a row names it again), ``[File: ]`` paths relative to it; a later call resends
    the same bytes."""

    def obs(k: int) -> str:
        return (
            f"[File: /repo/app/v{k}.py (3 lines total)]\n1:a = {k}\n"
            f"(Open file: /repo/app/v{k}.py)\n(Current directory: /repo)\nbash-$"
        )

    def send(n: int) -> list[str]:
        body = {
            "model": MODEL,
            "max_tokens": 64,
            "messages": tool_loop(
                "Fix it.", [("bash", {"command": f"open v{k}.py"}, obs(k)) for k in range(n)]
            ),
        }
        sent = sent_body(tmp_path, body)
        return [b["content"] for m in sent["messages"][1:] if m["role"] == "user" for b in m["content"]]

    results = send(6)
    assert results[0] == "[File: app/v0.py (3 lines total)]\n1:a = 0\n[open: app/v0.py, cwd: /repo]"
    assert results[1] == "[File: app/v1.py (3 lines total)]\n1:a = 1\n[open: app/v1.py]"
    assert [r.endswith(", cwd: /repo]") for r in results] == [True, False, False, False, False, True]
    assert send(7)[:6] == results


# a traceback as Python prints it (from a recorded mini-swe-agent run), and as it is sent
TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "/testbed/reproduce_issue.py", line 30, in <module>\n'
    "    django.setup()\n"
    '  File "/testbed/django/apps/registry.py", line 91, in populate\n'
    "    app_config = AppConfig.create(entry)\n"
    '  File "/testbed/django/apps/config.py", line 193, in create\n'
    "    import_module(entry)\n"
    '  File "<frozen importlib._bootstrap>", line 1030, in _gcd_import\n'
    "ModuleNotFoundError: No module named 'reproduce_app'\n"
)
SHORT = (
    "Traceback (most recent call last):\n"
    "  /testbed/reproduce_issue.py:30 in <module>\n"
    "    django.setup()\n"
    "  /testbed/django/apps/registry.py:91 in populate\n"
    "    app_config = AppConfig.create(entry)\n"
    "  /testbed/django/apps/config.py:193 in create\n"
    "    import_module(entry)\n"
    "  <frozen importlib._bootstrap>:1030 in _gcd_import\n"
    "ModuleNotFoundError: No module named 'reproduce_app'\n"
)
STATE = "(Open file: /testbed/app/views.py)\n(Current directory: /testbed)\nbash-$"


def test_a_mini_swe_agent_traceback_sends_its_frame_lines_short(tmp_path: Any) -> None:
    """Each frame's file, line and function on one short line, the code line under it as it is;
    a traceback in a tool result of no agent format keeps its bytes."""
    sent = sent_result(tmp_path, f"<returncode>1</returncode>\n<output>\n{TRACEBACK}</output>")
    assert sent == f"[returncode 1]\n{SHORT}"
    for fact in ("/testbed/django/apps/registry.py", "91", "populate", "<frozen importlib._bootstrap>"):
        assert fact in sent
    plain = TRACEBACK + OUTPUT
    assert sent_result(tmp_path, plain) == plain


def test_a_swe_agent_traceback_names_its_files_under_the_directory(tmp_path: Any) -> None:
    """As its ``[File: ]`` lines: frame paths under the directory the state line names relative to it."""
    sent = sent_result(tmp_path, TRACEBACK + STATE)
    assert sent == (SHORT.replace("/testbed/", "") + "[open: app/views.py, cwd: /testbed]")


def test_swe_agent_review_note_is_sent_in_full_once(tmp_path: Any) -> None:
    """The note after every edit: in full in the first result (and every 5th), a pointer to it in
    the others, in tool results and in user turns (SWE-agent without tools); a later call resends
    the same bytes; a result of no agent format keeps it."""

    def obs(k: int) -> str:
        return f"[File: /testbed/a{k}.py (1 lines total)]\n1:a = {k}\n{REVIEW_NOTE}\n\n{STATE}"

    def send(n: int, tools: bool) -> list[str]:
        if tools:
            messages = tool_loop("Fix it.", [("bash", {"command": f"edit {k}"}, obs(k)) for k in range(n)])
        else:
            messages = [{"role": "user", "content": "Fix it."}]
            for k in range(n):
                messages.append({"role": "assistant", "content": f"edit {k}"})
                messages.append({"role": "user", "content": obs(k)})
        body = {"model": MODEL, "max_tokens": 64, "messages": messages}
        sent = sent_body(tmp_path, body)
        out = []
        for m in sent["messages"][1:]:
            if m["role"] == "user":
                c = m["content"]
                c = c if isinstance(c, str) else c[0].get("content", c[0].get("text"))
                out.append(c)
        return out

    for tools in (True, False):
        results = send(6, tools)
        assert [REVIEW_NOTE in r for r in results] == [True, False, False, False, False, not tools]
        if tools:  # the 6th in full is a run of 150+ characters the first shows: prune's repeat pointer
            assert results[5].endswith("\n[tokensaver: repeats lines 3-5 of the toolu_000 result]")
        assert all(NOTE_POINTER in r for r in results[1:5])
        assert results[1] == f"[File: a1.py (1 lines total)]\n1:a = 1\n{NOTE_POINTER}\n\n[open: app/views.py]"
        assert send(7, tools)[:6] == results
    plain = f"{REVIEW_NOTE}\n{OUTPUT}"
    assert sent_result(tmp_path, plain) == plain
