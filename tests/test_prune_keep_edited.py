"""prune's economic cuts: a read of a file the agent is still editing stays (``edit_quiet_tool_uses``),
command output goes stale sooner than file reads (``clear_keep_output_uses``). Through the real SDK
over HTTP to the emulator."""

from __future__ import annotations

from typing import Any

import anthropic
from strategies import words
from tokensaver_plugins import prune

import tokensaver
from tokensaver.emulator import Emulator

MODEL = "claude-sonnet-4-6"
T0 = 1_700_000_000.0
EASY = {"clear_min_tokens": 0, "clear_min_fraction": 0.0, "clear_payback": 0.1, "keep_last_messages": 2}
OFF = {"edit_quiet_tool_uses": 0, "clear_keep_output_uses": 0}


def _edit(path: str) -> tuple[str, dict[str, Any]]:
    return "Edit", {"file_path": path, "old_string": "a", "new_string": "b", "replace_all": False}


def session() -> list[dict[str, Any]]:
    """Read /src/app.py and /src/lib.py, edit both, then 26 commands; /src/app.py is edited again
    every 5 tool uses (the file the agent works on), /src/lib.py never named again."""
    steps: list[tuple[str, dict[str, Any]]] = [
        ("Read", {"file_path": "/src/app.py"}),
        ("Read", {"file_path": "/src/lib.py"}),
        _edit("/src/app.py"),
        _edit("/src/lib.py"),
    ]
    for k in range(4, 30):
        steps.append(_edit("/src/app.py") if k % 5 == 0 else ("Bash", {"command": f"make step{k}"}))
    msgs: list[dict[str, Any]] = [{"role": "user", "content": "Task: fix the bug"}]
    for k, (name, inp) in enumerate(steps):
        tid = f"toolu_{k:03d}"
        msgs.append(
            {"role": "assistant", "content": [{"type": "tool_use", "id": tid, "name": name, "input": inp}]}
        )
        out = "ok" if name == "Edit" else words(k, 300)
        msgs.append(
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tid, "content": out}]}
        )
    return msgs


def replay(tmp_path: Any, conf: dict[str, Any]) -> dict[str, Any]:
    """Every call of :func:`session` through prune + cache_align to the emulator; the last body sent."""
    msgs = session()
    with Emulator(virtual_clock=True, start_time=T0) as emu:
        base = anthropic.Anthropic(base_url=emu.url, api_key="k", max_retries=0)
        client = tokensaver.wrap(
            base,
            config={
                "plugins": ["prune", "cache_align"],
                "record": False,
                "runs_dir": str(tmp_path),
                "prune": {**EASY, **conf},
            },
            clock=emu.clock.now,
        )
        for n in range(3, len(msgs) + 1, 2):
            emu.clock.advance(10)
            body = {"model": MODEL, "max_tokens": 64, "system": "You fix bugs.", "messages": msgs[:n]}
            client.post("/v1/messages", body=body, cast_to=object)
        sent = emu.last["body"]
    return {
        b["tool_use_id"]: b["content"] if isinstance(b["content"], str) else b["content"][0]["text"]
        for m in sent["messages"]
        if isinstance(m["content"], list)
        for b in m["content"]
        if b.get("type") == "tool_result"
    }


def test_the_read_of_a_file_still_being_edited_stays_and_old_command_output_goes(tmp_path: Any) -> None:
    assert prune.DEFAULTS["edit_quiet_tool_uses"] == 8 and prune.DEFAULTS["clear_keep_output_uses"] == 16
    now = replay(tmp_path, {})
    before = replay(tmp_path, OFF)
    # /src/app.py, edited 4 tool uses ago: its read is sent in full; before, the first edit superseded it
    assert now["toolu_000"] == words(0, 300)
    assert before["toolu_000"].startswith("[tokensaver: superseded by a later edit (Edit) of /src/app.py")
    # /src/lib.py, not named for 26 tool uses: superseded by its edit as before
    assert now["toolu_001"] == before["toolu_001"]
    assert now["toolu_001"].startswith("[tokensaver: superseded by a later edit (Edit) of /src/lib.py")
    # command output older than the last 16 tool uses is cleared; before, the last 32 were all kept
    for k in range(4, 30):
        tid = f"toolu_{k:03d}"
        if k % 5 == 0:
            continue
        assert before[tid] == words(k, 300)
        if k < 30 - 16:
            assert now[tid].startswith("[tokensaver: earlier tool output cleared (")
        else:
            assert now[tid] == before[tid]  # the same bytes where neither rule applies
