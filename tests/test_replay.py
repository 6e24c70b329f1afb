"""Trace formats, replay through the emulator, and the demo command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tokensaver.errors import TraceFormatError
from tokensaver.replay import auto_cache, replay, strip_thinking
from tokensaver.traces import fixtures_dir, load_conversation, load_conversations

FIXTURES = fixtures_dir()


def _conversation_file(tmp_path: Path) -> Path:
    tool = {
        "name": "lookup",
        "description": "Look up a record",
        "input_schema": {"type": "object", "properties": {}},
    }
    messages = [
        {"role": "user", "content": "Find record 42."},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_a", "name": "lookup", "input": {"id": 42}}],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_a", "content": '{"id": 42, "name": "Ada"}'}
            ],
        },
        {"role": "assistant", "content": "Record 42 is Ada."},
        {"role": "user", "content": "Thanks."},
    ]
    conv = {
        "format": "tokensaver-conversation/1",
        "id": "t1",
        "segments": [
            {
                "request": {
                    "model": "claude-sonnet-4-6",
                    "max_tokens": 512,
                    "system": "Be brief.",
                    "tools": [tool],
                    "messages": messages,
                },
                "calls": [
                    {"n_messages": 1, "t": "2026-02-10T12:00:00Z"},
                    {"n_messages": 3, "t": "2026-02-10T12:00:09Z"},
                    {"n_messages": 5, "response": [{"type": "text", "text": "You're welcome."}]},
                ],
            }
        ],
    }
    path = tmp_path / "t1.json"
    path.write_text(json.dumps(conv))
    return path


def test_conversation_format_expands_calls_replies_and_times(tmp_path: Path) -> None:
    conv = load_conversation(_conversation_file(tmp_path))
    assert [len(c.body["messages"]) for c in conv.calls] == [1, 3, 5]
    assert conv.calls[0].reply[0]["type"] == "tool_use"  # type: ignore[index]
    assert conv.calls[1].reply == [{"type": "text", "text": "Record 42 is Ada."}]
    assert conv.calls[2].reply == [{"type": "text", "text": "You're welcome."}]
    assert (
        conv.calls[1].t is not None and conv.calls[0].t is not None and conv.calls[1].t - conv.calls[0].t == 9
    )


def test_jsonl_of_bodies(tmp_path: Path) -> None:
    conv = load_conversation(_conversation_file(tmp_path))
    path = tmp_path / "bodies.jsonl"
    path.write_text("\n".join(json.dumps(c.body) for c in conv.calls) + "\n")
    again = load_conversation(path)
    assert [c.body for c in again.calls] == [c.body for c in conv.calls]
    assert again.calls[0].reply == conv.calls[0].reply and again.calls[2].reply is None
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"model": "x"}\n')
    with pytest.raises(TraceFormatError, match="bad.jsonl:1"):
        load_conversation(bad)


def test_replay_sends_recorded_answers_and_bills(tmp_path: Path) -> None:
    conv = load_conversation(_conversation_file(tmp_path))
    result = replay([conv], config={"plugins": [], "runs_dir": str(tmp_path)}, keep_bodies=True)
    assert result.rejected == [] and len(result.billed) == 3
    assert len(result.records) == 3
    # what the emulator received is the recorded body (no plugins)
    assert result.sent[1]["messages"] == conv.calls[1].body["messages"]
    assert result.totals()["output_tokens"] > 0


def test_replay_baseline_auto_cache_and_strip_thinking() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "x"},
                    {"type": "text", "text": "a"},
                ],
            },
        ],
    }
    assert auto_cache(body)["cache_control"] == {"type": "ephemeral"}
    assert strip_thinking(body)["messages"][1]["content"] == [{"type": "text", "text": "a"}]


@pytest.mark.skipif(FIXTURES is None, reason="no fixtures folder")
def test_fixtures_all_replay_without_rejection_under_defaults(tmp_path: Path) -> None:
    conversations = load_conversations([FIXTURES])  # type: ignore[list-item]
    for conv in conversations:
        conv.calls = conv.calls[:4]
    result = replay(conversations, config={"runs_dir": str(tmp_path)})
    assert result.rejected == []
    assert {r["status"] for r in result.records} == {200}


@pytest.mark.skipif(FIXTURES is None, reason="no fixtures folder")
def test_demo_command_prints_report_and_comparison(capsys: Any, tmp_path: Path, monkeypatch: Any) -> None:
    from tokensaver.cli import main

    monkeypatch.setenv("TOKENSAVER_RUNS_DIR", str(tmp_path))
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "API automatic caching alone" in out and "with tokensaver" in out
    for plugin in ("summarize", "prune", "cache_align"):
        assert plugin in out
    assert list(tmp_path.glob("*.jsonl"))
