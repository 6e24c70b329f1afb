"""summarize's pip shape: ``Requirement already satisfied`` lines with their install path once,
every byte of each line still there, through the real SDK over HTTP to the emulator."""

from __future__ import annotations

import re
from typing import Any

import anthropic
from tokensaver_plugins._blocks import request_problems

import tokensaver
from tokensaver.emulator import Emulator

MODEL = "claude-sonnet-4-6"
SITE = "/root/miniconda3/envs/marshmallow__3.13/lib/python3.9/site-packages"
PACKAGES = [
    ("pytest", "", "8.1.1"),
    ("pytz", "", "2024.1"),
    ("mccabe<0.7.0,>=0.6.0", " (from flake8==4.0.1)", "0.6.1"),
]
PACKAGES += [(f"dep{k}>=1.{k}", f" (from pkg{k % 3})", f"2.{k}.0") for k in range(20)]


def pip_log() -> str:
    lines = ["Obtaining file:///repo", "  Installing build dependencies: started"]
    lines += [f"Requirement already satisfied: {spec} in {SITE}{src} ({ver})" for spec, src, ver in PACKAGES]
    lines += ["Installing collected packages: marshmallow", "Successfully installed marshmallow-3.13.0"]
    return "\n".join(lines)


def expand(text: str) -> str:
    """The pip lines back from the shape: each line under a head line gets the head's words around it."""
    out, path = [], None
    for ln in text.split("\n"):
        m = re.match(r"^Requirement already satisfied in (/\S+):$", ln)
        if m:
            path = m.group(1)
            continue
        if path and ln.startswith("  ") and not ln.startswith("  Installing"):
            spec, _, rest = ln[2:].partition(" ")
            out.append(f"Requirement already satisfied: {spec} in {path}{' ' + rest if rest else ''}")
            continue
        path = None
        out.append(ln)
    return "\n".join(out)


def test_pip_requirements_already_satisfied_send_their_path_once(tmp_path: Any) -> None:
    log = pip_log()
    body = {
        "model": MODEL,
        "max_tokens": 64,
        "messages": [
            {"role": "user", "content": "Install the package."},
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "bash",
                        "input": {"command": "pip install -e ."},
                    }
                ],
            },
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": log}]},
        ],
    }
    with Emulator(virtual_clock=True, start_time=1_700_000_000.0) as emu:
        base = anthropic.Anthropic(base_url=emu.url, api_key="k", max_retries=0)
        client = tokensaver.wrap(base, config={"record": False, "runs_dir": str(tmp_path)})
        resp = client.post("/v1/messages", body=body, cast_to=object)
        assert isinstance(resp, dict) and resp["type"] == "message"
        sent = emu.last["body"]
    assert request_problems(sent) == []
    text = sent["messages"][2]["content"][0]["content"]
    assert text.count(SITE) == 1 and len(text) < 0.5 * len(log), text
    assert expand(text) == log
