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


# -- features only some models take (each from the feature's page: its ``supportedModels``) --------------------


def supports_message_threads(model: str) -> bool:
    """The message threads beta (``thread`` field): every Claude 4.5 and later model; Sonnet 4, Opus 4.1 and
    the 3.x models answer 400 ``thread_unsupported_request`` (message-threads page, supportedModels)."""
    _, major, minor = model_version(model)
    return (major, minor) >= (4, 5)


def supports_tool_search(model: str) -> bool:
    """The tool search tools (``tool_search_tool_regex_20251119`` / ``_bm25_20251119``): every Claude 4.5 and
    later model, Haiku 4.5 included (tool-search-tool page, supportedModels)."""
    _, major, minor = model_version(model)
    return (major, minor) >= (4, 5)


_RANK = {"haiku": 0, "sonnet": 1, "opus": 2, "fable": 3, "mythos": 3}


def advisor_pair_problem(executor: str, advisor: str) -> str | None:
    """Why ``executor`` (the request's model) cannot call the advisor tool (``advisor_20260301``) with
    ``advisor`` as its model, or None when the pair is one the docs accept.

    The accepted pairs (Claude Code's advisor page, "Choose an advisor model"): the advisor is at least as
    capable as the executor; Haiku 4.5 and Sonnet 4.6 take a Sonnet, Opus or Fable advisor; Opus 4.6 and later
    take Fable or an Opus of their version or later; Fable 5 takes Fable only; Haiku is never an advisor. An
    executor the table does not list is reported as unknown (not assumed to work)."""
    efam, emaj, emin = model_version(executor)
    afam, amaj, amin = model_version(advisor)
    if afam not in _RANK or afam == "haiku":
        return f"{advisor} cannot be an advisor"
    if (efam, emaj, emin) in (("haiku", 4, 5), ("sonnet", 4, 6)):
        return None if _RANK[afam] >= 1 else f"{advisor} is below {executor}"
    if efam == "opus" and (emaj, emin) >= (4, 6):
        if _RANK[afam] == 3 or (afam == "opus" and (amaj, amin) >= (emaj, emin)):
            return None
        return f"{executor} takes a Fable advisor or an Opus of its version or later, not {advisor}"
    if efam in ("fable", "mythos"):
        return None if _RANK[afam] == 3 else f"{executor} takes a Fable advisor only"
    return f"the advisor tool's pairs do not list {executor} as an executor"


def prefix_check_enforcement(model: str) -> str | None:
    """Whether ``model`` runs the preserved-thinking prefix check on thinking blocks sent back, and where it
    enforces it when the request leaves ``thinking.block_binding.prefix_mismatch_behavior`` unset:

    * ``"all_accounts"``: a failing block answers 400 on every account (Claude Fable 5.2 and Mythos 5.2, "the
      prefix check applies to every account"; Mythos 5.1 "already returns this error on every account";
      later models, "Later models will enforce the prefix check for all accounts");
    * ``"new_accounts"``: 400 for accounts created on or after 2026-08-31 00:00 UTC; older accounts run the check
      but let failing blocks through (Claude Fable 5.1 and Opus 5.5; Sonnet 5.5 and Haiku 5.5 are taken to
      follow Opus 5.5: the docs list them as running the check without an outcome this module could confirm);
    * ``None``: no prefix check (every earlier model, Fable 5 and Opus 5 included).

    Sources: preserved-thinking page and its prefix-checks subpage (supportedModels), What's new in Claude
    Fable 5.2 and 5.1; /work/notes/preserved-thinking.md has the quotes."""
    fam, major, minor = model_version(model)
    if (major, minor) > (5, 5) or (fam in ("fable", "mythos") and (major, minor) >= (5, 2)):
        return "all_accounts"
    if fam == "mythos" and (major, minor) == (5, 1):
        return "all_accounts"
    if fam == "fable" and (major, minor) == (5, 1):
        return "new_accounts"
    if fam in ("opus", "sonnet", "haiku") and (major, minor) == (5, 5):
        return "new_accounts"
    return None


def reads_thinking_of(reader: str, producer: str) -> bool:
    """Whether ``reader`` can read a thinking block ``producer`` wrote (the model check of preserved
    thinking: an unreadable block is dropped from the request without an error, on every account).

    Documented cases only ("Switching models mid-conversation", What's new in Claude Fable 5.2, the Bedrock
    preserved-thinking page); any other pair is taken as readable:

    * Fable / Mythos 5.1 blocks: Fable / Mythos 5.1 and later Fable / Mythos only (no earlier model, not Opus 5.5);
    * Fable / Mythos 5.2 blocks: Fable / Mythos 5.2 and later only;
    * Opus 5.5 blocks: Opus 5.5 and Fable / Mythos 5.1 and later ("no other model does");
    * Haiku 5.5 blocks are not locked to their model (every model reads them), and Haiku 5.5 reads its own only.
    """
    rf, rmaj, rmin = model_version(reader)
    pf, pmaj, pmin = model_version(producer)
    if (rf, rmaj, rmin) == (pf, pmaj, pmin):
        return True
    if (pf, pmaj, pmin) == ("haiku", 5, 5):
        return True
    if (rf, rmaj, rmin) == ("haiku", 5, 5):
        return False
    reader_fable = rf in ("fable", "mythos")
    if pf in ("fable", "mythos") and (pmaj, pmin) >= (5, 1):
        return reader_fable and (rmaj, rmin) >= (pmaj, pmin)
    if (pf, pmaj, pmin) == ("opus", 5, 5):
        return reader_fable and (rmaj, rmin) >= (5, 1)
    return True
