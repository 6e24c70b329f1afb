"""defer_tools: keep the tools an agent rarely calls out of the prompt until it asks for one (opt-in).

An agent sends every tool definition on every call; the ones it seldom uses are read from the cache
on each call all the same (Claude Code's eager tools are ~40% of a short session's input bill). The API
takes ``defer_loading: true`` on a tool: its definition is then not part of the prompt until a
``tool_reference`` block naming it loads it, inline where the block sits, so the cache before it holds.

This stage marks the tools named in ``tools`` (never one the caller marked for caching, a server tool,
one ``tool_choice`` names, nor a plugin's) as deferred and adds one tool of its own,
``tokensaver_load_tools``, whose description lists each deferred tool's name and the first sentence of
its description. When the model calls it, tokensaver answers inside the middleware (the caller never sees
that tool): the answer is the ``tool_reference`` blocks of the names asked for, and the model goes on
with the tools loaded. The decision is a function of the request's tools and the settings alone, the
same on every call of a conversation (no state to lose), so the prefix never moves.

The loading round the caller never saw is put back on its later calls, where it was sent: the answer
the caller got is kept (by its tool calls' ids, bounded) with the round before it, and the round is
inserted before that assistant turn again (the same bytes as when the model wrote it; the model's
thinking stays bound to what it saw). A turn that calls a deferred tool no loading round is known for
(a restart lost it, or a replayed transcript) gets a round made for it, recorded as ``made_loads``:
the bench prices each one as the extra round the agent would have made (one call reading the cached
prefix). On a model with the preserved-thinking prefix check a turn that thinks gets no made round:
its thinking is bound to the tools loaded before it, so a round put before it would have the API
refuse the block; it is sent as the model wrote it (``unloaded_calls``).

With ``profiles`` (the default) the seldom called tools of a known harness are deferred without being
named: Claude Code's and OpenClaw's (:data:`PROFILES`, which says why those tools). With ``directories``
too, OpenClaw's own list of the tools its Tool Search defers (in its system prompt, on every call)
gives each tool by its first sentence, as the loader lists tokensaver's (:func:`short_directory`), and
its list of skills (an XML element per skill) is written one skill a line, losing nothing.

Only on models with tool search (Claude 4.5 and later); elsewhere the stage stands aside.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from tokensaver import model_rules as rules
from tokensaver.billing import THINKING_TYPES, tool_references
from tokensaver.context import plugin_notes
from tokensaver.hookspecs import hookimpl
from tokensaver.settings import Schema, boolean, integer, number, size, strings
from tokensaver.threads import PLUGIN_TOOL_PREFIX

from ._lru import SizedLRU

PLUGIN = "defer_tools"
LOAD_TOOL = "tokensaver_load_tools"
MADE_ID = "toolu_tsload_"  # the id prefix of a loading round made for a turn (not one the model made)
SUMMARY_CHARS = 160  # what the loader's description says of each deferred tool
# it never edits a body or block it is given or returned: the core hands it the call's own blocks
tokensaver_read_only = True

# the tools a known agent harness offers on every call and seldom calls: deferred (with ``profiles``)
# when the request offers every tool of the harness's fingerprint.
#
# Claude Code (2.1.2xx-2.1.3xx) keeps these four eager beside the ones it defers itself behind its own
# ToolSearch; no shared Claude Code session's tuning half calls them, nor does the end-to-end session.
#
# OpenClaw (2026.9): its own Tool Search keeps most tools in a catalogue and sends eagerly its "core coding
# surface" (read, write, edit, apply_patch, ls, exec, process: isCoreCodingSurfaceToolName), the search
# controls (tool_search, tool_describe, tool_call) and its ``direct-only`` tools, which stay eager because
# their structured results (screenshots, images, a yield) cannot cross the catalogue's bridge, not because
# a turn needs them: computer (desktop and paired-node control, 1.5k tokens), openclaw (gateway setup and
# repair; its docs keep it out of the minimal, coding and messaging tool profiles), sessions_yield (wait
# for subagents, which only a sessions_spawn through the catalogue starts) and view_image (look at an image
# file). Those four are deferred; the core coding tools and the search controls never are. With Tool
# Search off (``tools.toolSearch: false``) OpenClaw sends its whole catalogue eagerly: then the tools its
# own ``coding`` tool profile leaves out (docs: gateway/config-tools/tool-policy) are deferred too, except
# ``message`` and ``heartbeat_respond``, which a run's delivery may need, and of the optional plugin
# tools it bundles (which that profile does not select) the ones for paired devices, voice calls and
# meetings.
OPENCLAW_DIRECT_ONLY = ("computer", "openclaw", "sessions_yield", "view_image")
OPENCLAW_NOT_CODING = (
    "agents_list",
    "browser",
    "canvas",
    "dashboard",
    "nodes",
    "pdf",
    "plugins",
    "portal",
    "screen",
    "show_widget",
    "terminal",
    "tts",
    # bundled plugins' tools (2026.9.6 with tools.toolSearch = false)
    "dir_fetch",
    "dir_list",
    "file_fetch",
    "file_write",
    "mobile_ui",
    "node_inference",
    "talk_voice",
    "transcripts",
)
PROFILES: dict[str, tuple[frozenset[str], tuple[str, ...]]] = {
    "claude-code": (
        frozenset({"Agent", "Bash", "Edit", "Read", "Write", "ToolSearch"}),
        ("ListAgents", "ReportFindings", "ScheduleWakeup", "Workflow"),
    ),
    "openclaw": (
        frozenset({"exec", "process", "read", "write", "edit"}),
        OPENCLAW_DIRECT_ONLY + OPENCLAW_NOT_CODING,
    ),
}

SETTINGS = Schema(
    PLUGIN,
    {
        "tools": strings(
            [], "names of the tools to defer (the ones the agent seldom calls)", item="tool name"
        ),
        "profiles": boolean(
            True,
            "also defer the tools a known agent harness seldom calls, when the request offers that "
            "harness's tools: Claude Code's ListAgents, ReportFindings, ScheduleWakeup and Workflow "
            "(beside its Agent, Bash, Edit, Read, Write and ToolSearch); OpenClaw's computer, openclaw, "
            "sessions_yield and view_image, and the tools its coding tool profile leaves out (beside its "
            "exec, process, read, write and edit)",
        ),
        "directories": boolean(
            True,
            "with profiles: a harness's own list of the tools it defers, in its system prompt (OpenClaw's "
            "Deferred Tool Schemas), gives each tool's first sentence, as tokensaver's loader lists its "
            "own (the rest stays in the harness's tool search); its list of skills (OpenClaw's "
            "<available_skills>) is sent one skill a line, every name, description and location kept",
        ),
        "auto": boolean(
            False,
            "also defer the tools this API key's earlier conversations with the same tool set seldom "
            "called (learned as they come; decided at a conversation's first call)",
        ),
        "max_use_rate": number(
            0.2,
            "auto: defer a tool called in at most this share of the earlier conversations",
            min=0.0,
            max=1.0,
        ),
        "min_conversations": integer(
            10, "auto: earlier conversations of a tool set before any is deferred", min=1
        ),
        "keep_top": integer(5, "auto: the tool set's most called tools, never deferred", min=0),
        "min_tools": integer(2, "defer only when the request offers at least this many tools", min=1),
        "max_rounds": integer(2048, "loading rounds kept to put back on later calls", min=1),
        "max_bytes": size(8 * 1024 * 1024, "bytes of kept loading rounds"),
    },
)


@hookimpl
def tokensaver_configure(settings: dict[str, Any], source: str) -> dict[str, Any]:
    """The ``defer_tools`` table checked against ``SETTINGS``, defaults filled in."""
    return SETTINGS.validate(settings, source)


def _settings(ctx: Any) -> dict[str, Any]:
    s = ctx.settings
    return s if s and "min_tools" in s else tokensaver_configure(s or {}, "defaults")


def deferrable(tool: Any, body: dict[str, Any]) -> bool:
    """Whether the API takes ``tool`` deferred and tokensaver may defer it."""
    if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
        return False
    name = tool["name"]
    if (
        name.startswith(PLUGIN_TOOL_PREFIX) or "cache_control" in tool
    ):  # (a deferred tool's breakpoint is a 400)
        return False
    if tool.get("type") not in (None, "custom"):  # a server or client-defined tool type
        return False
    choice = body.get("tool_choice")
    return not (isinstance(choice, dict) and choice.get("name") == name)


def _summary(tool: dict[str, Any]) -> str:
    text = " ".join(str(tool.get("description") or "").split())
    first = text.split(". ")[0]
    return first if len(first) <= SUMMARY_CHARS else first[: SUMMARY_CHARS - 1] + "…"


def loader(deferred: list[dict[str, Any]]) -> dict[str, Any]:
    """``tokensaver_load_tools``: its description names each deferred tool (the same bytes for the same tools)."""
    lines = "\n".join(f"- {t['name']}: {_summary(t)}" for t in deferred)
    return {
        "name": LOAD_TOOL,
        "description": (
            "Load the full definitions of tools that are available but not shown yet, then call them as "
            "any other tool. Available:\n" + lines
        ),
        "input_schema": {
            "type": "object",
            "properties": {
                "names": {"type": "array", "items": {"type": "string"}, "description": "tool names to load"}
            },
            "required": ["names"],
        },
    }


def _referenced(content: Any) -> list[str]:
    """The tools the tool_reference blocks of a message's content name (billing's rule, block by block)."""
    if not isinstance(content, list):
        return []
    return [n for b in content for n in tool_references(b) or ()]


def turn_key(message: Any) -> str | None:
    """An assistant turn's key: its tool calls' ids (as the caller echoes them), else its texts' digest."""
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return None
    ids = [str(b.get("id")) for b in content if isinstance(b, dict) and b.get("type") == "tool_use"]
    if ids:
        return "u:" + ",".join(ids)
    texts = [str(b.get("text", "")) for b in content if isinstance(b, dict) and b.get("type") == "text"]
    return "t:" + hashlib.sha256("\0".join(texts).encode()).hexdigest()[:32] if texts else None


def _calls_loader(message: Any) -> bool:
    content = message.get("content") if isinstance(message, dict) else None
    return isinstance(content, list) and any(
        isinstance(b, dict) and b.get("type") == "tool_use" and b.get("name") == LOAD_TOOL for b in content
    )


def _made_round(turn: dict[str, Any], names: list[str]) -> list[dict[str, Any]]:
    """A loading round for ``turn`` (which calls ``names`` unloaded): the same bytes for the same turn."""
    tid = MADE_ID + hashlib.sha256((turn_key(turn) or "").encode()).hexdigest()[:24]
    return [
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": tid, "name": LOAD_TOOL, "input": {"names": names}}],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": tid,
                    "content": [{"type": "tool_reference", "tool_name": n} for n in names],
                }
            ],
        },
    ]


def _thinks(turn: dict[str, Any]) -> bool:
    """Whether an assistant turn carries a thinking block. On a model with the preserved-thinking prefix
    check the block is bound to the tools loaded before it: a round made before a turn that called a
    deferred tool no round loaded (the model called it directly, or a restart lost the round) would
    have the API refuse the block (400, "bound to a different conversation"), so such a turn is sent
    as the model wrote it, with no round before it."""
    content = turn.get("content")
    return isinstance(content, list) and any(
        isinstance(b, dict) and b.get("type") in THINKING_TYPES for b in content
    )


def _note_deferred(ctx: Any, names: frozenset[str] | None = None) -> frozenset[str] | None:
    """Keep the tools this call deferred (``names``), or read them back: the loader's answer, which
    sees no body, loads only those. By call id, the latest calls' (one lock: hooks run in threads)."""
    state = ctx.shared_state(deferred_lock=threading.Lock, deferred_now=SizedLRU)
    table: SizedLRU[str, frozenset[str]] = state["deferred_now"]
    with state["deferred_lock"]:
        if names is None:
            return table.get(ctx.call_id)
        table.put(ctx.call_id, names, 1, MAX_CONVERSATIONS, MAX_CONVERSATIONS)
        return names


def _rounds(ctx: Any) -> SizedLRU[tuple[str, str], list[dict[str, Any]]]:
    return ctx.shared_state(rounds=SizedLRU)["rounds"]  # type: ignore[no-any-return]


MAX_TOOLSETS = 256  # tool sets whose use rates are kept (per process)
MAX_CONVERSATIONS = 8192  # conversations whose deferred set and called tools are kept


@dataclass
class _Usage:
    """A tool set's conversations so far and, per tool, how many of them called it."""

    conversations: int = 0
    called: dict[str, int] = field(default_factory=dict)


@dataclass
class _Conversation:
    toolset: tuple[str, str]
    deferred: frozenset[str]
    called: set[str] = field(default_factory=set)


def _offered(tools: list[Any]) -> list[str]:
    return [
        str(t.get("name"))
        for t in tools
        if isinstance(t, dict) and not str(t.get("name")).startswith(PLUGIN_TOOL_PREFIX)
    ]


def toolset(ctx: Any, tools: list[Any]) -> tuple[str, str]:
    """(key hash, digest of the agent's tool names): the rates are learned per API key and tool set."""
    return ctx.key_hash, hashlib.sha256("\0".join(sorted(_offered(tools))).encode()).hexdigest()[:24]


def seldom_called(usage: _Usage | None, names: list[str], settings: dict[str, Any]) -> set[str]:
    """The tools of ``names`` the tool set's earlier conversations called in at most ``max_use_rate`` of
    them (none before ``min_conversations``), the ``keep_top`` most called kept."""
    if usage is None or usage.conversations < settings["min_conversations"]:
        return set()
    ranked = sorted(names, key=lambda n: (-usage.called.get(n, 0), n))
    top = set(ranked[: settings["keep_top"]])
    limit = settings["max_use_rate"] * usage.conversations
    return {n for n in names if n not in top and usage.called.get(n, 0) <= limit}


def _learned(ctx: Any) -> dict[str, Any]:
    return ctx.shared_state(lock=threading.Lock, usage=SizedLRU, conversations=SizedLRU)  # type: ignore[no-any-return]


def profile_names(tools: Any) -> set[str]:
    """The tools :data:`PROFILES` defers among ``tools`` (a request's): those of each harness whose
    fingerprint the request offers whole."""
    offered = {t.get("name") for t in tools if isinstance(t, dict)} if isinstance(tools, list) else set()
    out: set[str] = set()
    for fingerprint, seldom in PROFILES.values():
        if fingerprint <= offered:
            out.update(n for n in seldom if n in offered)
    return out


def deferred_names(ctx: Any, body: dict[str, Any], settings: dict[str, Any]) -> set[str]:
    """The tools this conversation defers: the named ones, a known harness's seldom called ones (with
    ``profiles``), and with ``auto`` the ones learned as seldom called, decided at the conversation's
    first call and kept for it (the prefix never moves)."""
    names = set(settings["tools"])
    if settings["profiles"]:
        names |= profile_names(body.get("tools"))
    if not settings["auto"]:
        return names
    learned = _learned(ctx)
    key = (ctx.key_hash, ctx.conversation)
    with learned["lock"]:
        conv: _Conversation | None = learned["conversations"].get(key)
        if conv is None:
            tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
            if not tools:
                return names
            fp = toolset(ctx, tools)
            usage: _Usage | None = learned["usage"].get(fp)
            conv = _Conversation(fp, frozenset(names | seldom_called(usage, _offered(tools), settings)))
            learned["conversations"].put(key, conv, 1, MAX_CONVERSATIONS, MAX_CONVERSATIONS)
            if usage is None:
                usage = _Usage()
                learned["usage"].put(fp, usage, 1, MAX_TOOLSETS, MAX_TOOLSETS)
            usage.conversations += 1
    return set(conv.deferred)


def _learn(ctx: Any, response: dict[str, Any]) -> None:
    """Count the tools the answer calls, once per conversation, in its tool set's rates."""
    learned = _learned(ctx)
    with learned["lock"]:
        conv: _Conversation | None = learned["conversations"].get((ctx.key_hash, ctx.conversation))
        usage: _Usage | None = learned["usage"].get(conv.toolset) if conv is not None else None
        if conv is None or usage is None:
            return
        for b in response.get("content") or []:
            name = b.get("name") if isinstance(b, dict) and b.get("type") == "tool_use" else None
            if isinstance(name, str) and not name.startswith(PLUGIN_TOOL_PREFIX) and name not in conv.called:
                conv.called.add(name)
                usage.called[name] = usage.called.get(name, 0) + 1


# OpenClaw's directory of the tools its Tool Search defers ("- name (source): description" lines under
# this heading, at the end of the system prompt's Tooling section): each description as OpenClaw wrote
# it (up to ~180 characters), on every call. Each is cut to its first sentence, the rule the loader lists
# tokensaver's own deferred tools by; OpenClaw shortens these descriptions itself when its prompt budget
# is tight, and its tool_search and tool_describe give the whole description and schema.
DIRECTORY_HEADING = "### Deferred Tool Schemas"
_DIRECTORY_ENTRY = re.compile(r"- (\S+) (\([^()\n]*\)): (.+)")


@lru_cache(maxsize=256)  # the same system prompt on every call of a conversation
def short_directory(text: str) -> str | None:
    """``text`` with the entries of OpenClaw's deferred-tool directory cut to their first sentence
    and its skills one a line (:func:`_one_line_skills`), or None when nothing changes (a function of
    the text alone)."""
    skills = _one_line_skills(text) if "<available_skills>" in text else text
    cut = _short_tool_directory(skills)
    out = skills if cut is None else cut
    return out if out != text else None


def _short_tool_directory(text: str) -> str | None:
    """``text`` with the entries of OpenClaw's deferred-tool directory cut to their first sentence, or
    None when it holds no such directory or nothing is cut."""
    at = text.find(DIRECTORY_HEADING + "\n")
    if at < 0:
        return None
    lines = text[at:].split("\n")
    entries = False
    for i in range(1, len(lines)):
        m = _DIRECTORY_ENTRY.fullmatch(lines[i])
        if m is None:
            if entries:
                break
            if i > 2 or not lines[i].strip():  # the one line before the entries ("Available ...:")
                return None
            continue
        entries = True
        short = _summary({"description": m.group(3)})
        if short != m.group(3):
            lines[i] = f"- {m.group(1)} {m.group(2)}: {short}"
    out = text[:at] + "\n".join(lines)
    return out if out != text else None


# OpenClaw's list of its skills (the system prompt's Skills section, on every call): an XML element
# per skill, its name, description and location each on a line of their own. The same three as one
# line per skill, ``- name: description <location>path</location>`` inside the same
# ``<available_skills>`` tags the section's instructions name: lossless, about a third fewer tokens.
_SKILLS = re.compile(r"<available_skills>\n(.*?)\n?</available_skills>", re.DOTALL)
_SKILL = re.compile(
    r"[ \t]*<skill>\s*<name>([^<>\n]+)</name>\s*<description>([^<>]*)</description>"
    r"\s*<location>([^<>\n]+)</location>\s*</skill>[ \t]*"
)


def _one_line_skills(text: str) -> str:
    """``text`` with each ``<available_skills>`` list whose every element is a plain skill (name,
    description, location) written one skill a line; the others as they are."""

    def lines(m: re.Match[str]) -> str:
        body = m.group(1)
        rows, at = [], 0
        for e in _SKILL.finditer(body):
            if body[at : e.start()].strip():
                return m.group(0)  # something else between the skills: left as it is
            name, desc, where = e.group(1), " ".join(e.group(2).split()), e.group(3)
            rows.append(f"- {name}: {desc} <location>{where}</location>")
            at = e.end()
        if not rows or body[at:].strip():
            return m.group(0)
        return "<available_skills>\n" + "\n".join(rows) + "\n</available_skills>"

    return _SKILLS.sub(lines, text)


def short_directories(system: Any) -> Any | None:
    """The system prompt (a string or text blocks) with :func:`short_directory` applied, or None."""
    if isinstance(system, str):
        return short_directory(system)
    if not isinstance(system, list):
        return None
    out, changed = [], False
    for b in system:
        text = b.get("text") if isinstance(b, dict) and b.get("type") == "text" else None
        new = short_directory(text) if isinstance(text, str) else None
        out.append(b if new is None else {**b, "text": new})
        changed = changed or new is not None
    return out if changed else None


def _text_chars(system: Any) -> int:
    if isinstance(system, str):
        return len(system)
    return (
        sum(len(b.get("text") or "") for b in system if isinstance(b, dict))
        if isinstance(system, list)
        else 0
    )


def _offers(tools: Any, harness: str) -> bool:
    offered = {t.get("name") for t in tools if isinstance(t, dict)} if isinstance(tools, list) else set()
    return PROFILES[harness][0] <= offered


@hookimpl
def tokensaver_transform_request(body: dict[str, Any], ctx: Any) -> dict[str, Any] | None:
    """Defer the configured tools, add the loader, put loading rounds back where they were sent; with
    ``profiles`` and ``directories``, shorten OpenClaw's own directory of its deferred tools."""
    settings = _settings(ctx)
    out = _defer(body, ctx, settings)
    if settings["profiles"] and settings["directories"] and _offers(body.get("tools"), "openclaw"):
        system = short_directories(body.get("system"))
        if system is not None:
            ctx.record(directory_chars=_text_chars(body.get("system")) - _text_chars(system))
            out = {**(out or body), "system": system}
    return out


def _defer(body: dict[str, Any], ctx: Any, settings: dict[str, Any]) -> dict[str, Any] | None:
    """Defer the configured tools, add the loader, put loading rounds back where they were sent."""
    tools, messages = body.get("tools"), body.get("messages")
    if not isinstance(tools, list) or not isinstance(messages, list):
        return None
    names = deferred_names(ctx, body, settings)
    if not names:
        return None
    if not rules.supports_tool_search(str(body.get("model", ""))) or len(tools) < settings["min_tools"]:
        ctx.record(stood_aside="model" if len(tools) >= settings["min_tools"] else "few_tools")
        return None
    picked = [t for t in tools if isinstance(t, dict) and t.get("name") in names and deferrable(t, body)]
    if not picked or any(isinstance(t, dict) and t.get("name") == LOAD_TOOL for t in tools):
        return None
    deferred = {t["name"] for t in picked}
    # what the loader may load on this call's rounds (its answer sees no body)
    _note_deferred(ctx, frozenset(deferred))
    new_tools = [{**t, "defer_loading": True} if t in picked else t for t in tools]
    new_tools.append(loader(picked))
    kept = _rounds(ctx)
    bound = rules.prefix_check_enforcement(str(body.get("model", ""))) is not None
    unloaded = 0
    out: list[Any] = []
    loaded: set[str] = set()
    made = 0
    last = len(messages) - 1
    for i, m in enumerate(messages):
        if isinstance(m, dict) and m.get("role") == "assistant" and not _calls_loader(m):
            key = turn_key(m)
            previous = out[-1] if out else None
            behind = isinstance(previous, dict) and _referenced(previous.get("content"))
            wanted = [
                str(b.get("name"))
                for b in m.get("content") or []
                if isinstance(b, dict) and b.get("type") == "tool_use" and b.get("name") in deferred
            ]
            missing = sorted({n for n in wanted if n not in loaded})
            # the round the model made before this turn goes back whatever it loaded (what was sent);
            # else one is made when the turn calls a tool nothing loaded yet
            round_ = kept.get((ctx.key_hash, key)) if key is not None and not behind else None
            if round_ is None and missing and not behind:
                if bound and _thinks(m):
                    unloaded += i >= last - 1  # sent as it is: a round before it would unbind it
                else:
                    round_ = _made_round(m, missing)
                    made += i >= last - 1  # (priced once: when the turn is new in the call)
            if round_ is not None:
                out.extend(round_)
                for r in round_:
                    loaded.update(_referenced(r.get("content")))
        if isinstance(m, dict) and m.get("role") == "user":
            loaded.update(_referenced(m.get("content")))
        out.append(m)
    ctx.record(deferred=len(picked), made_loads=made, extra_rounds=made)
    if unloaded:
        ctx.record(unloaded_calls=unloaded)
    return {**body, "tools": new_tools, "messages": out}


@hookimpl
def tokensaver_answer_tool_use(tool_use: dict[str, Any], ctx: Any) -> list[Any] | str | None:
    """The ``tool_reference`` blocks of the deferred tools the model asked for."""
    if tool_use.get("name") != LOAD_TOOL:
        return None
    asked = (tool_use.get("input") or {}).get("names")
    names = [str(n) for n in asked] if isinstance(asked, list) else []
    known = _note_deferred(ctx)
    if known is None:
        known = frozenset(deferred_names(ctx, {}, _settings(ctx)))
    found = [n for n in names if n in known]
    ctx.record(loads=len(found))
    if not found:
        return f"none of {json.dumps(names)} can be loaded; the ones that can are listed in this tool's description"
    return [{"type": "tool_reference", "tool_name": n} for n in found]


@hookimpl
def tokensaver_observe_response(body: dict[str, Any], response: dict[str, Any], ctx: Any) -> None:
    """Keep the loading round(s) behind the answer the caller gets, to put back on its next calls;
    with ``auto``, count the tools the answer calls."""
    if _settings(ctx)["auto"]:
        _learn(ctx, response)
    messages = body.get("messages")
    if not isinstance(messages, list) or not any(_calls_loader(m) for m in messages[-4:]):
        return
    start = len(messages)
    while start >= 2 and _calls_loader(messages[start - 2]) and messages[start - 1].get("role") == "user":
        start -= 2
    if start == len(messages):
        return
    round_ = messages[start:]
    key = turn_key(response)
    if key is None:
        return
    settings = _settings(ctx)
    size = len(json.dumps(round_, default=str))
    _rounds(ctx).put((ctx.key_hash, key), round_, size, settings["max_rounds"], settings["max_bytes"])


@hookimpl
def tokensaver_report_section(plugin: str, calls: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Calls with tools deferred, loads answered, loading rounds made for replayed turns."""
    notes = [n for _, n in plugin_notes(calls, plugin)]
    if not notes:
        return None
    deferring = sum(1 for n in notes if n.get("deferred"))
    loads = sum(int(n.get("loads") or 0) for n in notes)
    made = sum(int(n.get("made_loads") or 0) for n in notes)
    unloaded = sum(int(n.get("unloaded_calls") or 0) for n in notes)
    also = (
        f" {unloaded} thinking turns called a deferred tool unloaded on a preserved-thinking model (sent as written)."
        if unloaded
        else ""
    )
    return {
        "title": "Deferred tools",
        "summary": (
            f"{deferring} of {len(notes)} calls sent tools deferred; {loads} tool loads answered; "
            f"{made} loading rounds made for turns that called a deferred tool no round was kept for." + also
        ),
    }
