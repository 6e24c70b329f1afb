"""The e2e coding session's scripted model (e2e/session.py), driven by a small agent loop written here.

The real agents run it in CI through npm (e2e/agents.py); this checks the script itself without them:
the SDK against the emulator, the tools run for real in a temporary repository, once with
OpenClaw-like tools (read/edit/write/exec) and once with a shell tool only (every step through the
fallback), plus an agent whose reads lose the end of the file, which the script must catch.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import anthropic
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "e2e"))

from session import FINAL_MARK, PLAN, SessionScript  # noqa: E402
from session_repo import FIX, make_repo  # noqa: E402

from tokensaver.emulator import Emulator  # noqa: E402


def _schema(*keys: str) -> dict[str, Any]:
    return {"type": "object", "properties": {k: {"type": "string"} for k in keys}, "required": list(keys)}


SHELL = {"name": "exec", "description": "Run a shell command", "input_schema": _schema("command")}
OPENCLAW_LIKE = [
    {"name": "read", "description": "Read a file", "input_schema": _schema("path")},
    {"name": "write", "description": "Write a file", "input_schema": _schema("path", "content")},
    {
        "name": "edit",
        "description": "Replace text",
        "input_schema": {
            "type": "object",
            "properties": {
                "path": {"type": "string"},
                "edits": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"oldText": {"type": "string"}, "newText": {"type": "string"}},
                    },
                },
            },
        },
    },
    SHELL,
]


def run_tool(name: str, inp: dict[str, Any], lossy_reads: bool) -> tuple[str, bool]:
    """What an agent's tool returns: (text, is_error)."""
    if name == "exec":
        out = subprocess.run(["bash", "-c", inp["command"]], capture_output=True, text=True, timeout=60)
        return out.stdout + out.stderr, out.returncode != 0
    path = Path(inp["path"])
    if name == "read":
        text = path.read_text()
        return (text[: len(text) // 2] if lossy_reads else text), False
    if name == "write":
        path.write_text(inp["content"])
        return f"wrote {path}", False
    text = path.read_text()
    for e in inp["edits"]:
        assert text.count(e["oldText"]) == 1
        text = text.replace(e["oldText"], e["newText"])
    path.write_text(text)
    return f"edited {path}", False


def agent_loop(url: str, tools: list[dict[str, Any]], lossy_reads: bool = False) -> str:
    """A minimal coding agent: call the model, run the tools it asks for, until it answers in text."""
    client = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0, timeout=30)
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Do the session."}]
    for _ in range(len(PLAN) + 3):
        msg = client.messages.create(
            model="claude-sonnet-4-6", max_tokens=1024, tools=tools, messages=messages
        )
        content = [b.model_dump() for b in msg.content]
        messages.append({"role": "assistant", "content": content})
        uses = [b for b in content if b["type"] == "tool_use"]
        if not uses:
            return "".join(b.get("text", "") for b in content)
        results = []
        for b in uses:
            text, err = run_tool(b["name"], b["input"], lossy_reads)
            results.append({"type": "tool_result", "tool_use_id": b["id"], "content": text, "is_error": err})
        messages.append({"role": "user", "content": results})
    raise AssertionError("the session did not end")


@pytest.mark.parametrize("tools", [OPENCLAW_LIKE, [SHELL]], ids=["own-tools", "shell-only"])
def test_session_runs_every_step_with_the_tools_offered(tmp_path: Path, tools: list[dict[str, Any]]) -> None:
    repo = tmp_path / "repo"
    make_repo(repo)
    script = SessionScript(repo)
    with Emulator(default_reply=script) as emu:  # type: ignore[arg-type]
        final = agent_loop(emu.url, tools)
        assert all(r.status == 200 for r in emu.requests)
    assert FINAL_MARK in final and "Ran 18 tests" in final
    assert script.problems() == []
    assert len(script.verdicts) == len(PLAN) >= 20
    expected = {"read", "edit", "write", "exec"} if len(tools) > 1 else {"exec"}
    assert set(script.used.values()) == expected
    assert FIX in (repo / "stockroom" / "store.py").read_text()
    assert (repo / "tests" / "test_bulk.py").is_file()


def test_a_result_that_lost_facts_is_caught(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    make_repo(repo)
    script = SessionScript(repo)
    with Emulator(default_reply=script) as emu:  # type: ignore[arg-type]
        agent_loop(emu.url, OPENCLAW_LIKE, lossy_reads=True)
    problems = script.problems()
    # the re-read of pricing.py lost the new function: the script names the step and the missing fact
    assert any("read stockroom/pricing.py" in p and "bulk-discount-v1" in p for p in problems)
