"""Hypothesis strategies for valid Messages API conversations, shared by the plugin tests.

``conversations()`` draws a whole agent conversation (tool definitions, a system prompt, messages
ending with a user turn) that obeys the API's rules: roles alternate from the user, every tool_use
(parallel ones too) is answered at the start of the next user message, ids are unique, no empty
blocks, thinking blocks carry signatures, at most 4 cache breakpoints with 1h before 5m. Some tool
outputs repeat (the same file read twice), some results carry images, some system prompts carry a
timestamp, some callers place their own breakpoints or use automatic mode.

``turns(conv)`` expands it into the request of every call, as an agent loop sends them: the same
tools and system, and the messages up to each user message.

``tool_loop(task, steps)`` writes out one fixed agent loop: the task, then one tool use and its result
per step; ``expand_lines(text, pointer, expand)`` undoes a pointer a plugin wrote, line by line.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from hypothesis import strategies as st

MODEL = "claude-sonnet-4-6"  # min cacheable length 1024
TOOL_NAMES = ["read_file", "bash", "grep", "write_file", "list_dir"]
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def words(seed: int, n: int) -> str:
    """Deterministic filler text of about ``n`` tokens."""
    return " ".join(f"w{seed}x{i}" for i in range(n))


def tool_def(name: str, flip: bool) -> dict[str, Any]:
    """A tool definition; ``flip`` writes the schema keys in another order (same meaning)."""
    props = {"path": {"type": "string", "description": f"{name} target"}, "limit": {"type": "integer"}}
    schema: dict[str, Any] = {"type": "object", "properties": props, "required": ["path"]}
    if flip:
        schema = {"required": ["path"], "properties": dict(reversed(list(props.items()))), "type": "object"}
    return {"name": name, "description": words(len(name), 30), "input_schema": schema}


@st.composite
def tool_result_content(draw: Any, pool: list[str]) -> Any:
    kind = draw(st.sampled_from(["pooled", "fresh", "fresh", "list", "image"]))
    if kind == "pooled":
        return draw(st.sampled_from(pool))
    if kind == "fresh":
        return words(draw(st.integers(0, 10**6)), draw(st.integers(1, 400)))
    if kind == "list":
        return [{"type": "text", "text": words(draw(st.integers(0, 10**6)), draw(st.integers(1, 200)))}]
    return [
        {"type": "text", "text": "screenshot"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
    ]


@st.composite
def conversations(draw: Any, max_turns: int = 8) -> dict[str, Any]:
    """A whole valid conversation: ``{"model", "max_tokens", "tools", "system", "messages", ...}``."""
    ids = iter(range(10**6))
    pool = [words(1000 + k, draw(st.integers(120, 500))) for k in range(3)]  # repeated outputs
    names = draw(st.lists(st.sampled_from(TOOL_NAMES), min_size=1, max_size=5, unique=True))
    flip = draw(st.booleans())
    tools = [tool_def(n, flip) for n in names]
    thinking = draw(st.booleans())
    sys_kind = draw(st.sampled_from(["none", "str", "blocks", "volatile", "cached"]))
    system: Any = None
    if sys_kind == "str":
        system = "You are a careful agent.\n" + words(7, draw(st.integers(10, 1500)))
    elif sys_kind == "blocks":
        system = [{"type": "text", "text": words(8, draw(st.integers(10, 1500)))}]
    elif sys_kind == "volatile":
        system = "You are an agent.\nThe current time is 2025-03-04 10:11:12 UTC.\n" + words(9, 1200)
    elif sys_kind == "cached":
        system = [{"type": "text", "text": words(10, 1300), "cache_control": {"type": "ephemeral"}}]
    first: list[dict[str, Any]] = [{"type": "text", "text": "Task: " + words(11, draw(st.integers(5, 800)))}]
    if draw(st.booleans()):
        first.append({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}})
    messages: list[dict[str, Any]] = [{"role": "user", "content": first}]
    for _ in range(draw(st.integers(1, max_turns))):
        content: list[dict[str, Any]] = []
        if thinking:
            content.append(
                {"type": "thinking", "thinking": words(draw(st.integers(0, 10**6)), 30), "signature": "sig"}
            )
        n_tools = draw(st.sampled_from([0, 1, 1, 2, 3, 12, 24]))
        if n_tools == 0 or draw(st.booleans()):
            content.append(
                {"type": "text", "text": words(draw(st.integers(0, 10**6)), draw(st.integers(3, 120)))}
            )
        uses = []
        for _ in range(n_tools):
            tid = f"toolu_{next(ids):06d}"
            name = draw(st.sampled_from(names))
            uses.append(tid)
            content.append({"type": "tool_use", "id": tid, "name": name, "input": {"path": f"/src/{tid}.py"}})
        messages.append({"role": "assistant", "content": content})
        if uses:
            results: list[dict[str, Any]] = []
            for tid in uses:
                r: dict[str, Any] = {
                    "type": "tool_result",
                    "tool_use_id": tid,
                    "content": draw(tool_result_content(pool)),
                }
                if draw(st.integers(0, 9)) == 0:
                    r["is_error"] = True
                results.append(r)
            if draw(st.booleans()):
                results.append({"type": "text", "text": "continue"})
            messages.append({"role": "user", "content": results})
        else:
            text = words(draw(st.integers(0, 10**6)), draw(st.integers(3, 200)))
            messages.append(
                {"role": "user", "content": text if draw(st.booleans()) else [{"type": "text", "text": text}]}
            )
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 1024, "tools": tools, "messages": messages}
    if system is not None:
        body["system"] = system
    if thinking:
        body["thinking"] = {"type": "enabled", "budget_tokens": 1024}
        body["max_tokens"] = 4096
    if draw(st.integers(0, 4)) == 0 and sys_kind != "cached":
        body["cache_control"] = {"type": "ephemeral"}  # automatic mode
    return body


def turns(conv: dict[str, Any]) -> list[dict[str, Any]]:
    """The request body of every call of the conversation (ends at each user message)."""
    out = []
    msgs = conv["messages"]
    for n in range(1, len(msgs) + 1, 2):
        out.append({**conv, "messages": msgs[:n]})
    return out


def tool_loop(
    task: str,
    steps: list[tuple[str, dict[str, Any], str]],
    *,
    errors: frozenset[int] | set[int] = frozenset(),
    narrate: bool = False,
) -> list[dict[str, Any]]:
    """The user's ``task``, then per step (tool name, tool input, result text) an assistant tool use
    (id ``toolu_000``, ``toolu_001``, ...; after a "step k" text block when ``narrate``) and the user's
    tool result (``is_error`` for the steps in ``errors``)."""
    msgs: list[dict[str, Any]] = [{"role": "user", "content": task}]
    for k, (name, tool_input, text) in enumerate(steps):
        tid = f"toolu_{k:03d}"
        use: list[dict[str, Any]] = [{"type": "text", "text": f"step {k}"}] if narrate else []
        use.append({"type": "tool_use", "id": tid, "name": name, "input": tool_input})
        msgs.append({"role": "assistant", "content": use})
        block: dict[str, Any] = {"type": "tool_result", "tool_use_id": tid, "content": text}
        if k in errors:
            block["is_error"] = True
        msgs.append({"role": "user", "content": [block]})
    return msgs


def expand_lines(text: str, pointer: re.Pattern[str], expand: Callable[[re.Match[str]], list[str]]) -> str:
    """``text`` with each line that ``pointer`` matches replaced by the lines ``expand`` gives for it."""
    out: list[str] = []
    for ln in text.split("\n"):
        m = pointer.match(ln)
        out.extend(expand(m) if m else [ln])
    return "\n".join(out)


def tau_reservation(**changes: Any) -> dict[str, Any]:
    """A tau-bench airline reservation record as its get_reservation_details tool returns it."""
    rec: dict[str, Any] = {
        "reservation_id": "HATHAT",
        "user_id": "mia_li_3668",
        "origin": "JFK",
        "destination": "SEA",
        "flight_type": "one_way",
        "cabin": "economy",
        "flights": [
            {
                "flight_number": "HAT136",
                "date": "2024-05-20",
                "price": 152,
                "origin": "JFK",
                "destination": "ATL",
            },
            {
                "flight_number": "HAT039",
                "date": "2024-05-20",
                "price": 103,
                "origin": "ATL",
                "destination": "SEA",
            },
        ],
        "passengers": [{"first_name": "Mia", "last_name": "Li", "dob": "1990-04-05"}],
        "payment_history": [{"payment_id": "certificate_7504069", "amount": 250}],
        "created_at": "2024-05-15T15:00:00",
        "total_baggages": 3,
        "nonfree_baggages": 1,
        "insurance": "no",
        "price": 1.50,
    }
    rec.update(changes)
    return rec
