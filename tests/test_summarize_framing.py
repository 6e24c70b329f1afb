"""summarize: mini-swe-agent's ``<returncode>``/``<output>`` tags and SWE-agent's state lines go at any
size, as documented (a large output that saves under 2% otherwise kept them), through the real SDK
over HTTP to the emulator."""

from __future__ import annotations

from typing import Any

import anthropic
from strategies import tool_loop
from tokensaver_plugins._blocks import request_problems

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
    with Emulator(virtual_clock=True, start_time=1_700_000_000.0) as emu:
        base = anthropic.Anthropic(base_url=emu.url, api_key="k", max_retries=0)
        client = tokensaver.wrap(base, config={"record": False, "runs_dir": str(tmp_path)})
        resp = client.post("/v1/messages", body=body, cast_to=object)
        assert isinstance(resp, dict) and resp["type"] == "message"
        sent = emu.last["body"]
    assert request_problems(sent) == []
    out: str = sent["messages"][2]["content"][0]["content"]
    return out


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
        with Emulator(virtual_clock=True, start_time=1_700_000_000.0) as emu:
            base = anthropic.Anthropic(base_url=emu.url, api_key="k", max_retries=0)
            client = tokensaver.wrap(base, config={"record": False, "runs_dir": str(tmp_path)})
            client.post("/v1/messages", body=body, cast_to=object)
            sent = emu.last["body"]
        assert request_problems(sent) == []
        return [b["content"] for m in sent["messages"][1:] if m["role"] == "user" for b in m["content"]]

    results = send(6)
    assert results[0] == "[File: app/v0.py (3 lines total)]\n1:a = 0\n[open: app/v0.py, cwd: /repo]"
    assert results[1] == "[File: app/v1.py (3 lines total)]\n1:a = 1\n[open: app/v1.py]"
    assert [r.endswith(", cwd: /repo]") for r in results] == [True, False, False, False, False, True]
    assert send(7)[:6] == results
