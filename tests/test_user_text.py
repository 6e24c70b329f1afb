"""summarize's user turns: tool output sent as user text (SWE-agent without tools) is rewritten
losslessly, runs of lines an earlier user turn shows become pointers to that turn, prefix-stably,
through the real SDK over HTTP to the emulator."""

from __future__ import annotations

import re
from typing import Any

import anthropic
from tokensaver_plugins._blocks import request_problems

import tokensaver
from tokensaver.emulator import Emulator

MODEL = "claude-sonnet-4-6"
T0 = 1_700_000_000.0
POINTER = re.compile(
    r"^\[tokensaver: (?:lines (\d+)-(\d+) as in|(repeats) lines (\d+)-(\d+) of) (user|assistant) turn (\d+)\]$"
)
STATE = "\n(Open file: /repo/src/fields.py)\n(Current directory: /repo)\nbash-$"


def window(first: int, last: int, edited: int | None = None) -> str:
    """A SWE-agent file window: a header, numbered lines (one of them edited), a footer."""
    lines = ["[File: /repo/src/fields.py (2000 lines total)]", f"({first - 1} more lines above)"]
    for n in range(first, last + 1):
        code = f"        value_{n} = convert(data[{n}], precision={n % 5})"
        lines.append(f"{n}:{code}  # fixed" if n == edited else f"{n}:{code}")
    lines.append(f"({2000 - last} more lines below)")
    return "\n".join(lines)


def conversation(observations: list[str]) -> list[dict[str, Any]]:
    """The task, then per observation the model's command and the observation as the user's text."""
    msgs: list[dict[str, Any]] = [{"role": "user", "content": "Fix the rounding bug in fields.py."}]
    for k, obs in enumerate(observations):
        msgs.append(
            {
                "role": "assistant",
                "content": [{"type": "text", "text": f"Next step {k}.\n```\ngoto {k}\n```"}],
            }
        )
        msgs.append({"role": "user", "content": [{"type": "text", "text": obs}]})
    return msgs


def user_texts(body: dict[str, Any]) -> list[str]:
    out = []
    for m in body["messages"]:
        if m["role"] == "user":
            c = m["content"]
            out.append(
                c if isinstance(c, str) else "\n".join(b["text"] for b in c if b.get("type") == "text")
            )
    return out


def expand(text: str, turns: list[str]) -> str:
    """A sent user text with every pointer replaced by the lines it names (``turns``: as sent, turn 1 first)."""
    out: list[str] = []
    for line in text.split("\n"):
        m = POINTER.match(line)
        if m is None:
            out.append(line)
            continue
        src = turns[int(m.group(7)) - 1].split("\n")
        if m.group(1):
            lo, hi = int(m.group(1)), int(m.group(2))
            picked = [ln for ln in src if re.match(r"^(\d+):", ln) and lo <= int(ln.split(":")[0]) <= hi]
            assert len(picked) == hi - lo + 1, line
            out.extend(picked)
        else:
            lo, hi = int(m.group(4)), int(m.group(5))
            out.extend(src[lo - 1 : hi])
    return "\n".join(out)


def send(client: Any, emu: Emulator, msgs: list[dict[str, Any]]) -> dict[str, Any]:
    resp = client.post(
        "/v1/messages", body={"model": MODEL, "max_tokens": 64, "messages": msgs}, cast_to=object
    )
    assert isinstance(resp, dict) and resp["type"] == "message"
    sent: dict[str, Any] = emu.last["body"]
    assert request_problems(sent) == []
    return sent


def test_a_window_shown_again_as_user_text_points_at_the_earlier_turn(tmp_path: Any) -> None:
    """A file window shown after an edit repeats all but one line of the one shown before it: with
    the default settings the new turn holds the changed line and pointers to the earlier turn,
    every line comes back from them, and each turn keeps its bytes on the later calls."""
    observations = [
        'Found 1 matches for "fields.py" in /repo/src:\n/repo/src/fields.py',
        window(1400, 1500),
        "File updated. Please review the changes.\n" + window(1400, 1500, edited=1450),
        "All 12 tests passed.",
    ]
    with Emulator(virtual_clock=True, start_time=T0) as emu:
        base = anthropic.Anthropic(base_url=emu.url, api_key="k", max_retries=0)
        client = tokensaver.wrap(base, config={"record": False, "runs_dir": str(tmp_path)})
        early = send(client, emu, conversation(observations[:2]))
        late = send(client, emu, conversation(observations))
    turns = user_texts(late)
    assert turns[0] == "Fix the rounding bug in fields.py."
    assert turns[:3] == user_texts(early), "a turn already sent changed its bytes"
    edited = turns[3]
    assert len(edited) < 0.2 * len(observations[2]), edited
    assert sum(bool(POINTER.match(ln)) for ln in edited.split("\n")) == 2, edited
    assert "1450:" in edited and "# fixed" in edited
    assert [expand(t, turns) for t in turns[1:]] == observations


def test_swe_agent_state_lines_in_user_text_become_one_line(tmp_path: Any) -> None:
    """SWE-agent's three state lines after an observation sent as user text become one
    ``[open: F, cwd: D]`` line (as in its tool results); the task turn stays as it came."""
    obs = "\n".join(f"test_{k} passed in {k}.0{k}s" for k in range(30)) + STATE
    msgs = conversation([obs])
    msgs[0]["content"] = "Fix it." + STATE
    with Emulator(virtual_clock=True, start_time=T0) as emu:
        base = anthropic.Anthropic(base_url=emu.url, api_key="k", max_retries=0)
        client = tokensaver.wrap(base, config={"record": False, "runs_dir": str(tmp_path)})
        sent = send(client, emu, msgs)
    turns = user_texts(sent)
    assert turns[0] == "Fix it." + STATE
    # the task names the directory: the observation after it names the file only
    assert turns[1].endswith("\n[open: src/fields.py]")
    assert turns[1].split("\n")[:30] == obs.split("\n")[:30]
    sent = send_alone(tmp_path, conversation([obs]))  # no directory before it: named in full
    assert user_texts(sent)[1].endswith("\n[open: src/fields.py, cwd: /repo]")


def send_alone(tmp_path: Any, msgs: list[dict[str, Any]]) -> dict[str, Any]:
    with Emulator(virtual_clock=True, start_time=T0) as emu:
        base = anthropic.Anthropic(base_url=emu.url, api_key="k", max_retries=0)
        client = tokensaver.wrap(base, config={"record": False, "runs_dir": str(tmp_path)})
        return send(client, emu, msgs)


def test_swe_agent_names_its_directory_once_in_user_texts(tmp_path: Any) -> None:
    """A SWE-agent directory the state line before names goes from the next ones (the file
    stays), named again when it changes and on every 5th in a row; ``[File: ]`` lines name
    their file relative to it; the same bytes on every later call."""

    def obs(k: int, cwd: str = "/repo") -> str:
        return (
            f"[File: /repo/src/f{k}.py (10 lines total)]\n1:x = {k}\n"
            f"(Open file: /repo/src/f{k}.py)\n(Current directory: {cwd})\nbash-$"
        )

    observations = [obs(k, "/repo" if k != 3 else "/repo/src") for k in range(9)]
    sent = send_alone(tmp_path, conversation(observations))
    turns = user_texts(sent)[1:]
    assert turns[0] == "[File: src/f0.py (10 lines total)]\n1:x = 0\n[open: src/f0.py, cwd: /repo]"
    assert turns[1] == "[File: src/f1.py (10 lines total)]\n1:x = 1\n[open: src/f1.py]"
    assert turns[3] == "[File: f3.py (10 lines total)]\n1:x = 3\n[open: f3.py, cwd: /repo/src]"
    full = [t.endswith(", cwd: /repo]") for t in turns]
    assert full == [True, False, False, False, True, False, False, False, False]
    assert turns[8].endswith(", cwd: /repo]") is False and turns[4].startswith("[File: src/f4.py ")
    # a later call resends them: the same bytes
    later = send_alone(tmp_path, conversation([*observations, obs(9)]))
    assert user_texts(later)[1:10] == turns
    assert user_texts(later)[10].endswith(", cwd: /repo]")  # the 5th after the one at turn 4


def test_user_texts_off_sends_them_as_they_came(tmp_path: Any) -> None:
    observations = [window(1400, 1500), window(1400, 1500, edited=1450)]
    with Emulator(virtual_clock=True, start_time=T0) as emu:
        base = anthropic.Anthropic(base_url=emu.url, api_key="k", max_retries=0)
        client = tokensaver.wrap(
            base, config={"record": False, "runs_dir": str(tmp_path), "summarize": {"user_texts": False}}
        )
        sent = send(client, emu, conversation(observations))
    assert user_texts(sent)[1:] == observations


def test_assistant_texts_point_at_what_the_model_quotes_only_when_asked(tmp_path: Any) -> None:
    """With ``assistant_texts`` the model's own text that quotes an earlier turn's lines (here the
    window it was shown) is sent as a pointer to that turn; by default it goes as the model wrote it."""
    shown = window(1400, 1440)
    quote = "\n".join(shown.split("\n")[10:30])
    msgs = conversation([shown, "All 12 tests passed."])
    msgs[3]["content"][0]["text"] = f"The loop is here:\n{quote}\nI will change line 1420."
    for on in (False, True):
        with Emulator(virtual_clock=True, start_time=T0) as emu:
            base = anthropic.Anthropic(base_url=emu.url, api_key="k", max_retries=0)
            config = {"record": False, "runs_dir": str(tmp_path), "summarize": {"assistant_texts": on}}
            sent = send(client=tokensaver.wrap(base, config=config), emu=emu, msgs=msgs)
        said = sent["messages"][3]["content"][0]["text"]
        if not on:
            assert said == msgs[3]["content"][0]["text"]
            continue
        lines = said.split("\n")
        assert lines[0] == "The loop is here:" and lines[-1] == "I will change line 1420."
        assert POINTER.match(lines[1]) and POINTER.match(lines[1]).group(6) == "user", said
        assert expand(said, user_texts(sent)) == msgs[3]["content"][0]["text"]


def test_a_changed_earlier_turn_is_pointed_at_as_it_is_now(tmp_path: Any) -> None:
    """The pass goes on from what the last call left only over the turns that did not change: when
    the client edits an earlier turn, the pointers after it follow the turn as it is now."""
    first = [window(1400, 1500), window(1400, 1500, edited=1450)]
    changed = [window(1300, 1400), window(1300, 1400, edited=1350)]
    with Emulator(virtual_clock=True, start_time=T0) as emu:
        base = anthropic.Anthropic(base_url=emu.url, api_key="k", max_retries=0)
        client = tokensaver.wrap(base, config={"record": False, "runs_dir": str(tmp_path)})
        one = send(client, emu, conversation(first))
        two = send(client, emu, conversation(changed + ["All 12 tests passed."]))
    for sent, observations in ((one, first), (two, [*changed, "All 12 tests passed."])):
        turns = user_texts(sent)
        assert any(POINTER.match(ln) for ln in turns[2].split("\n"))
        assert [expand(t, turns) for t in turns[1:]] == observations


def test_a_request_with_tools_keeps_its_user_texts(tmp_path: Any) -> None:
    """A request that declares tools (Claude Code) sends its user turns as they came: prune's budget
    cut may drop a whole turn that a later pointer would name."""
    observations = [window(1400, 1500), window(1400, 1500, edited=1450)]
    tool = {"name": "bash", "description": "run", "input_schema": {"type": "object", "properties": {}}}
    with Emulator(virtual_clock=True, start_time=T0) as emu:
        base = anthropic.Anthropic(base_url=emu.url, api_key="k", max_retries=0)
        client = tokensaver.wrap(base, config={"record": False, "runs_dir": str(tmp_path)})
        body = {"model": MODEL, "max_tokens": 64, "tools": [tool], "messages": conversation(observations)}
        resp = client.post("/v1/messages", body=body, cast_to=object)
        assert isinstance(resp, dict) and resp["type"] == "message"
        sent = emu.last["body"]
    assert request_problems(sent) == []
    assert user_texts(sent)[1:] == observations
    # the same conversation without tools: the second window points at the first
    with Emulator(virtual_clock=True, start_time=T0) as emu:
        base = anthropic.Anthropic(base_url=emu.url, api_key="k", max_retries=0)
        client = tokensaver.wrap(base, config={"record": False, "runs_dir": str(tmp_path)})
        sent = send(client, emu, conversation(observations))
    assert any(POINTER.match(ln) for ln in user_texts(sent)[2].split("\n"))
