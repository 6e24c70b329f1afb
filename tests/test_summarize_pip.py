"""summarize's pip shape: ``Requirement already satisfied`` lines with their install path once,
every byte of each line still there, through the real SDK over HTTP to the emulator."""

from __future__ import annotations

import re
from typing import Any

from test_summarize_framing import sent_result

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
    text = sent_result(tmp_path, log, task="Install the package.", command="pip install -e .")
    assert text.count(SITE) == 1 and len(text) < 0.5 * len(log), text
    assert expand(text) == log
