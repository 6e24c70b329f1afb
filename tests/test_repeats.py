"""prune's repeats: runs of lines an earlier tool result shows become a pointer, losslessly and prefix-stably."""

from __future__ import annotations

import json
import re
from typing import Any

import anthropic
from tokensaver_plugins import prune
from tokensaver_plugins._blocks import request_problems

import tokensaver
from tokensaver.context import make_context
from tokensaver.emulator import Emulator

MODEL = "claude-sonnet-4-6"
T0 = 1_700_000_000.0
POINTER = re.compile(
    r"^\[tokensaver: (?:lines (\d+)-(\d+) as (?:in|lines (\d+)-(\d+) of)|(\d+) lines as lines (\d+)-(\d+) of) "
    r"the tool_use (\S+) result above\]$"
)


def source(n: int, changed: frozenset[int] = frozenset()) -> list[str]:
    return [
        f"    total_{i} = compute(values[{i}], scale={i % 7})  # {'edited' if i in changed else 'step'}"
        for i in range(n)
    ]


def numbered(lines: list[str]) -> str:
    return "\n".join(f"{i + 1}→{ln}" for i, ln in enumerate(lines))


def agent(results: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Task, then one tool use per (tool name, result text)."""
    msgs: list[dict[str, Any]] = [{"role": "user", "content": "Task: fix the bug"}]
    for k, (name, text) in enumerate(results):
        tid = f"toolu_{k:03d}"
        msgs.append(
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": tid, "name": name, "input": {"k": k}}],
            }
        )
        msgs.append(
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tid, "content": text}]}
        )
    return msgs


def body_of(messages: list[dict[str, Any]]) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 64, "system": "You fix bugs.", "messages": messages}


def run(body: dict[str, Any], states: dict[str, Any], **conf: Any) -> dict[str, Any]:
    ctx = make_context(body, plugin="prune", settings={**prune.DEFAULTS, **conf}, now=T0, states=states)
    out = prune.tokensaver_transform_request(body, ctx)
    sent = out if out is not None else body
    assert request_problems(sent) == []
    return sent


def results_of(body: dict[str, Any]) -> dict[str, str]:
    return {
        b["tool_use_id"]: b["content"]
        for m in body["messages"]
        if isinstance(m["content"], list)
        for b in m["content"]
        if b.get("type") == "tool_result"
    }


def expand(text: str, sent: dict[str, str]) -> str:
    """The text with every pointer replaced by the lines it names in the earlier result (as sent)."""
    out: list[str] = []
    for ln in text.split("\n"):
        m = POINTER.match(ln)
        if not m:
            out.append(ln)
            continue
        a, b, a0, b0, _, p, q, tid = m.groups()
        earlier = expand(sent[tid], sent).split("\n")
        if a is not None:
            lo, hi = (int(a0), int(b0)) if a0 else (int(a), int(b))
            picked = [x for x in earlier if re.match(r"^(\d+)→", x) and lo <= int(x.split("→")[0]) <= hi]
            assert len(picked) == int(b) - int(a) + 1
            out.extend(picked)
        else:
            out.extend(earlier[int(p) - 1 : int(q)])
    return "\n".join(out)


def test_a_reread_after_an_edit_points_at_the_unchanged_lines_and_loses_nothing() -> None:
    first = numbered(source(120))
    again = numbered(source(120, changed=frozenset({60})))
    log = "\n".join(
        f"test_case_{i} ... ok  ({i * 3} ms) in module tests/test_mod_{i % 9}.py" for i in range(40)
    )
    rerun = log.replace("test_case_17 ... ok", "test_case_17 ... FAIL")
    msgs = agent(
        [("Read", first), ("Bash", log), ("Edit", "ok"), ("Read", again), ("Bash", rerun), ("Bash", "done")]
    )
    sent = run(body_of(msgs), {})
    out = results_of(sent)
    assert out["toolu_000"] == first and out["toolu_001"] == log  # the first copies go as they came
    assert POINTER.match(out["toolu_003"].split("\n")[0])  # lines 1-60 unchanged: one pointer
    assert "61→    total_60 = compute(values[60], scale=4)  # edited" in out["toolu_003"]
    assert len(out["toolu_003"]) < 0.2 * len(again) and len(out["toolu_004"]) < 0.3 * len(rerun)
    assert "test_case_17 ... FAIL" in out["toolu_004"]
    assert expand(out["toolu_003"], out) == again and expand(out["toolu_004"], out) == rerun  # lossless
    off = results_of(run(body_of(msgs), {}, repeats=False))
    assert off["toolu_003"] == again and off["toolu_004"] == rerun


def test_a_shifted_reread_keeps_its_new_line_numbers() -> None:
    """A line moved to another number is not a repeat: the model quotes the numbers (sed -n 150,160p)."""
    lines = source(80)
    msgs = agent([("Read", numbered(lines)), ("Read", numbered(["import os", *lines]))])
    out = results_of(run(body_of(msgs), {}))
    assert out["toolu_001"] == numbered(["import os", *lines])


def test_pointers_are_prefix_stable_and_follow_a_cut() -> None:
    lines = source(100)
    results = [("Read", numbered(lines)), ("Bash", "x" * 50)] + [
        ("Read", numbered(source(100, changed=frozenset({k})))) for k in range(10, 90, 10)
    ]
    msgs = agent(results)
    states: dict[str, Any] = {}
    previous: list[Any] = []
    for n in range(3, len(msgs) + 1, 2):
        sent = run(body_of(msgs[:n]), states, clear_stale=False)["messages"]
        assert sent[: len(previous)] == previous  # every message already sent: the same bytes
        previous = sent
    assert sum("[tokensaver: lines" in json.dumps(m) for m in previous) >= 8  # every re-read points back
    # a cut that clears the first read: nothing points at it any more, the next copy is sent whole
    spec = {"cleared": ["toolu_000"], "drop": None}
    after = prune.apply_spec(msgs, spec, {**prune.DEFAULTS}, lambda x: len(json.dumps(x)) // 4)
    out = results_of({"messages": after})
    assert "toolu_000" not in json.dumps([out[t] for t in out if t != "toolu_000"])
    assert out["toolu_002"] == numbered(source(100, changed=frozenset({10})))
    assert any(POINTER.match(ln) for ln in out["toolu_009"].split("\n"))
    assert expand(out["toolu_009"], out) == numbered(source(100, changed=frozenset({80})))


def test_repeats_through_wrap_to_the_emulator(tmp_path: Any) -> None:
    first = numbered(source(150))
    msgs = agent([("Read", first), ("Bash", "ok"), ("Read", numbered(source(150, changed=frozenset({140}))))])
    with Emulator(virtual_clock=True, start_time=T0) as emu:
        base = anthropic.Anthropic(base_url=emu.url, api_key="k", max_retries=0)
        client = tokensaver.wrap(
            base, config={"plugins": ["prune", "cache_align"], "record": False, "runs_dir": str(tmp_path)}
        )
        resp = client.post("/v1/messages", body=body_of(msgs), cast_to=object)
        assert isinstance(resp, dict) and resp["type"] == "message"
        sent = emu.last["body"]
    assert request_problems(sent) == []
    out = results_of(sent)
    assert POINTER.match(out["toolu_002"].split("\n")[0]) and expand(out["toolu_002"], out) == numbered(
        source(150, changed=frozenset({140}))
    )
