"""What the Messages API accepts per Claude model: the rules the emulator enforces and the route plugin fits to.

One place for these facts, so the emulator's validation and a plugin that changes the model of a
request (``plugins/route.py``) cannot disagree. No I/O; model ids are parsed, not looked up.
"""

from __future__ import annotations

import re

_MODEL_RE = re.compile(
    # a minor version has one or two digits: claude-sonnet-4-20250514 is Sonnet 4 (dated), not 4.20
    r"claude-(?:(?P<fam>[a-z]+)-(?P<maj>\d+)(?:-(?P<min>\d{1,2})(?!\d))?|(?P<omaj>\d+)(?:-(?P<omin>\d))?-(?P<ofam>[a-z]+))"
)


def model_version(model: str) -> tuple[str, int, int]:
    """(family, major, minor) of a Claude model id; ("", 0, 0) when it does not parse."""
    m = _MODEL_RE.search(model.lower())
    if not m:
        return ("", 0, 0)
    if m.group("fam"):
        return (m.group("fam"), int(m.group("maj")), int(m.group("min") or 0))
    return (m.group("ofam"), int(m.group("omaj")), int(m.group("omin") or 0))


def refuses_prefill(model: str) -> bool:
    """A trailing assistant message answers 400 on every Claude 4.6 and later model (migration guide)."""
    _, major, minor = model_version(model)
    return (major, minor) >= (4, 6)


def refuses_sampling(model: str) -> bool:
    """``temperature``, ``top_p`` and ``top_k`` answer 400 ("... is deprecated for this model.") on Opus 4.7+."""
    fam, major, minor = model_version(model)
    return major >= 5 or (fam == "opus" and (major, minor) >= (4, 7))


def refuses_temperature_with_top_p(model: str) -> bool:
    """Both samplers at once answer 400 from Opus 4.1 through the 4.6 models (Sonnet 4 still takes both)."""
    _, major, minor = model_version(model)
    return major == 4 and 1 <= minor <= 6


def refuses_budget_thinking(model: str) -> bool:
    """``thinking: {"type": "enabled", "budget_tokens": N}`` answers 400 on Opus 4.7 and 4.8 (adaptive only)."""
    fam, major, minor = model_version(model)
    return fam == "opus" and major == 4 and minor >= 7


def supports_adaptive_thinking(model: str) -> bool:
    """``thinking: {"type": "adaptive"}`` came with the 4.6 models; earlier ones answer 400."""
    _, major, minor = model_version(model)
    return (major, minor) >= (4, 6)
