"""A caller that edits its own message objects in place between calls is measured as it sent them.

The pipeline and the shadow caches compare each request with the conversation's previous one to
count and hash only what is new; a block the caller edited in place is the same object as last
time, so that comparison must be against a copy of its own. Real HTTP to the emulator.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import anthropic

from tokensaver.emulator import Emulator
from tokensaver.pipeline import Pipeline
from tokensaver.tokens import default_counter

MODEL = "claude-sonnet-4-6"
CC: dict[str, Any] = {"type": "ephemeral"}
SYSTEM = "You are a careful coding agent. " + " ".join(f"rule{i} applies" for i in range(900))


def _log(tag: str) -> str:
    return "LOG:" + " ".join(f"{tag}{i} ok" for i in range(800))


def test_a_block_edited_in_place_between_calls_is_counted_and_billed_as_sent(tmp_path: Path) -> None:
    # through the Pipeline itself (replays, benches, other doors): it gets the caller's own objects
    pipe = Pipeline({"plugins": [], "runs_dir": str(tmp_path / "runs"), "record": False})
    page: dict[str, Any] = {"type": "text", "text": _log("first")}
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "text", "text": "Fix the build."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Here is the log."}]},
        {"role": "user", "content": [page]},
    ]
    kw: dict[str, Any] = {"model": MODEL, "max_tokens": 64, "system": SYSTEM, "cache_control": CC}
    records = []
    with Emulator(virtual_clock=True) as emu:
        client = anthropic.Anthropic(base_url=emu.url, api_key="test-key", max_retries=0, timeout=30)
        for _ in range(2):
            body = {**kw, "messages": list(messages)}
            call = pipe.begin(body, key="k")
            answer = client.messages.create(**copy.deepcopy(call.body)).model_dump()
            records.append(pipe.finish(call, answer))
            # the caller shortens the log in place (the same dict) and goes on with the conversation
            page["text"] = _log("second")[:3000]
            messages += [
                {"role": "assistant", "content": [{"type": "text", "text": "Noted."}]},
                {"role": "user", "content": [{"type": "text", "text": "Go on."}]},
            ]
    sent = copy.deepcopy(body)
    assert records[-1]["tokens_original"] == default_counter().request(sent)
    # the shadow of what was sent bills it as the emulator did: the edited block is no cache hit
    assert records[-1]["usage"]["cache_read_input_tokens"] == 0
    assert records[-1]["estimate_error_usd"] == 0.0
