"""route: send what a cheaper Claude can do to a cheaper Claude, by the caller's own rules (opt-in).

Off by default: routing changes who answers. Each rule names a target model and a ``when`` table of
conditions over what the request shows (all must hold; an empty ``when`` matches every request):

- ``model``: glob patterns of the model asked for (``"claude-opus-*"``);
- ``system`` / ``text``: substrings of the system prompt / of the last user turn (any of them);
- ``tools_any`` / ``tools_absent``: tool names of which one is offered / none is offered;
- ``max_tools``: at most this many tools offered (0: none);
- ``min_tokens`` / ``max_tokens``: the request's size (estimated input tokens);
- ``max_output``: the request's ``max_tokens`` is at most this;
- ``thinking``: thinking is on (``enabled``/``adaptive``) or off;
- ``first``: the conversation's first request (one user message), or a later one.

The first matching rule wins. **A conversation stays on one model**: its first call decides (the
first matching rule's target, else the model asked for), and the decision is kept per conversation
(``ctx.store``: every replica of a shared state decides alike). A later call moves it only when a rule
with ``switch = true`` matches it and the switch pays: the move throws the prompt cache away, so the
whole prefix is written again on the new model; the switch is made only when what the calls still to
come save (estimated: as many as came so far, at most ``max_future_calls``) is at least
``switch_payback`` times that write's extra cost. A switch is kept as the message count it happened
at, so a replayed conversation is routed the same way call by call.

The request is made valid for the target (:func:`fit`): thinking (adaptive vs budget, per model),
``output_config.effort`` where the target has none, sampling parameters the target refuses,
``max_tokens`` past the target's output limit, ``clear_thinking`` edits once thinking is off. A
request the target cannot take is not routed (:func:`refusal`; the record and the report say why):
an assistant prefill on a model that refuses one, a prompt larger than its context window (the price
table's), a message thread or a tool search tool on a model without them, an advisor tool whose model
the target cannot pair with (``tokensaver.model_rules``). No hard limit on the number or size of tool
definitions per model is documented; none is applied. The response is the target's: its ``model``
field names the model that answered.

Message threads (the SDK's tool runner): a continue holds only new messages and the API rebuilds the
conversation from the thread its create made; the stages get that whole conversation, so a continue is
decided like the rest of its conversation, but never switched (nor moved when its create was not
routed here): it keeps the model the conversation is on. Whether the API takes a continue naming
another model than its create is not documented (the SDK treats only ``system`` and ``tools`` as fixed
by the create, and says the server stores no turn a fallback model wrote); tokensaver does not try.

Accounting stays honest without help from here: the core bills the counterfactual at the model the
caller asked for and the call at the model it was sent to (``tokensaver.billing.ShadowCaches``).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import threading
from collections.abc import Mapping
from typing import Any

from tokensaver import model_rules as rules
from tokensaver.context import plugin_notes
from tokensaver.hookspecs import hookimpl
from tokensaver.settings import Schema, Setting, _Bad, integer, number, size
from tokensaver.threads import thread_of

from ._lru import SizedLRU

PLUGIN = "route"
DECISION_TTL = 7 * 86_400.0  # a conversation idle for a week starts afresh
MAX_SWITCHES = 4  # switches kept per conversation (the decision's size stays small)

# the longest output (max_tokens) each model takes, from Anthropic's model pages ("Max output"; the
# 5.x rows from the comparison table on each page); a model not listed keeps the caller's max_tokens
MAX_OUTPUT = {
    "claude-fable-5-1": 128_000,
    "claude-opus-5-5": 128_000,
    "claude-sonnet-5-5": 128_000,
    "claude-haiku-5-5": 128_000,
    "claude-haiku-4-5": 64_000,
    "claude-3-5-haiku": 8_192,
    "claude-3-haiku": 4_096,
    "claude-sonnet-4-6": 128_000,
    "claude-sonnet-4-5": 64_000,
    "claude-sonnet-4": 64_000,
    "claude-3-7-sonnet": 64_000,
    "claude-opus-4-6": 128_000,
    "claude-opus-4-5": 64_000,
    "claude-opus-4-1": 32_000,
    "claude-opus-4": 32_000,
}

WHEN_KEYS = {
    "model": list,
    "system": list,
    "text": list,
    "tools_any": list,
    "tools_absent": list,
    "max_tools": int,
    "min_tokens": int,
    "max_tokens": int,
    "max_output": int,
    "thinking": bool,
    "first": bool,
}
RULE_KEYS = {"name", "when", "model", "switch"}


class _Rules(Setting):
    """A list of rule tables (``{name, when, model, switch}``), checked key by key."""

    def accepted(self) -> str:
        return "a list of tables {name, when = {...}, model, switch}"

    def type_label(self) -> str:
        return "list of rule tables"

    def normalize(self, value: Any) -> Any:
        if not isinstance(value, list | tuple):
            raise _Bad()
        return [_rule(i, r) for i, r in enumerate(value)]


def _rule(i: int, rule: Any) -> dict[str, Any]:
    if not isinstance(rule, Mapping):
        raise _Bad(f"rule {i + 1} is not a table")
    extra = set(rule) - RULE_KEYS
    if extra:
        raise _Bad(
            f"rule {i + 1}: unknown key {sorted(extra)[0]!r} (accepted: {', '.join(sorted(RULE_KEYS))})"
        )
    target = rule.get("model")
    if not isinstance(target, str) or not target.strip():
        raise _Bad(f"rule {i + 1}: model (the target) must be a model name")
    when = rule.get("when", {})
    if not isinstance(when, Mapping):
        raise _Bad(f"rule {i + 1}: when must be a table")
    out_when: dict[str, Any] = {}
    for key, value in when.items():
        kind = WHEN_KEYS.get(key)
        if kind is None:
            raise _Bad(f"rule {i + 1}: unknown condition {key!r} (accepted: {', '.join(sorted(WHEN_KEYS))})")
        if kind is list:
            value = [value] if isinstance(value, str) else value
            if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
                raise _Bad(f"rule {i + 1}: when.{key} must be a string or a list of strings")
            value = list(value)
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise _Bad(f"rule {i + 1}: when.{key} must be a non-negative integer")
        elif not isinstance(value, bool):
            raise _Bad(f"rule {i + 1}: when.{key} must be true or false")
        out_when[key] = value
    switch = rule.get("switch", False)
    if not isinstance(switch, bool):
        raise _Bad(f"rule {i + 1}: switch must be true or false")
    name = rule.get("name", f"rule {i + 1}")
    if not isinstance(name, str) or not name.strip():
        raise _Bad(f"rule {i + 1}: name must be a non-empty string")
    return {"name": name, "when": out_when, "model": target.strip(), "switch": switch}


def _unique_names(settings: dict[str, Any]) -> tuple[str, str] | None:
    names = [r["name"] for r in settings["rules"]]
    dup = next((n for n in names if names.count(n) > 1), None)
    return ("rules", f"names each rule once; {dup!r} is given twice") if dup else None


SETTINGS = Schema(
    PLUGIN,
    {
        "rules": _Rules(
            "list",
            [],
            "tables {name, when = {conditions}, model = target, switch}: the first whose conditions all "
            "hold names the model (README: Routing)",
        ),
        "switch_payback": number(
            2.0,
            "a switch mid-conversation must save this many times the cache re-write it costs",
            min=0.1,
            max=100,
        ),
        "max_future_calls": integer(
            20,
            "cap on the calls still to come (estimated: the calls so far)",
            min=1,
            max=10_000,
            unit="calls",
        ),
        "max_bytes": size(
            16 * 1024**2, "cap on the per-conversation decisions kept (in the state and in memory)"
        ),
    },
    checks=(_unique_names,),
)
DEFAULTS: dict[str, Any] = SETTINGS.defaults()
# it never edits a body or block it is given or returned: the core hands it the call's own blocks
tokensaver_read_only = True


@hookimpl
def tokensaver_configure(settings: dict[str, Any], source: str) -> dict[str, Any]:
    """The ``route`` table checked against ``SETTINGS``; ``rules_id`` names the rule set in the store."""
    out = SETTINGS.validate(settings, source)
    # decisions kept in the state belong to one rule set and its switch settings
    kept = [out["rules"], out["switch_payback"], out["max_future_calls"]]
    blob = json.dumps(kept, sort_keys=True).encode()
    out["rules_id"] = hashlib.sha256(blob).hexdigest()[:12]
    return out


# -- what a request shows --------------------------------------------------------------------------


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(
            b.get("text", "") for b in value if isinstance(b, dict) and isinstance(b.get("text"), str)
        )
    return ""


def _last_user_text(body: dict[str, Any]) -> str:
    """The text of the last user turn: the user messages after the last assistant one (the API takes
    consecutive user messages as one turn; OpenClaw sends its heartbeat prompt and its internal context
    as two)."""
    texts: list[str] = []
    for m in reversed(body.get("messages") or []):
        user = isinstance(m, dict) and m.get("role") == "user"
        if user:
            texts.append(_text(m.get("content")))
        elif texts:
            break  # an assistant prefill after the turn is skipped, the turn before it is not
    return "\n".join(reversed(texts))


def thinking_on(body: dict[str, Any]) -> bool:
    th = body.get("thinking")
    return isinstance(th, dict) and th.get("type") in ("enabled", "adaptive")


def is_first(body: dict[str, Any]) -> bool:
    """The conversation's first request: one message, the user's."""
    msgs = body.get("messages") or []
    return len(msgs) == 1


def matches(when: dict[str, Any], body: dict[str, Any], tokens: Any) -> bool:
    """Whether every condition of ``when`` holds on ``body`` (``tokens()``: its input tokens, counted once)."""
    asked = str(body.get("model", ""))
    tools = [t.get("name") for t in body.get("tools") or [] if isinstance(t, dict)]
    for key, want in when.items():
        if key == "model":
            ok = any(fnmatch.fnmatchcase(asked, p) for p in want)
        elif key == "system":
            system = _text(body.get("system"))
            ok = any(s in system for s in want)
        elif key == "text":
            last = _last_user_text(body)
            ok = any(s in last for s in want)
        elif key == "tools_any":
            ok = any(n in tools for n in want)
        elif key == "tools_absent":
            ok = not any(n in tools for n in want)
        elif key == "max_tools":
            ok = len(tools) <= want
        elif key == "min_tokens":
            ok = tokens() >= want
        elif key == "max_tokens":
            ok = tokens() <= want
        elif key == "max_output":
            ok = int(body.get("max_tokens") or 0) <= want
        elif key == "thinking":
            ok = thinking_on(body) == want
        else:  # first
            ok = is_first(body) == want
        if not ok:
            return False
    return True


# -- a request valid on the target -----------------------------------------------------------------


def max_output(model: str) -> int | None:
    """The target's output limit (``MAX_OUTPUT``, dated ids by their prefix), or None when unknown."""
    name = model.lower()
    for known in sorted(MAX_OUTPUT, key=len, reverse=True):
        if name.startswith(known):
            return MAX_OUTPUT[known]
    return None


def supports_effort(model: str) -> bool:
    """``output_config.effort``: Opus 4.5, every 4.6 model and later; not Haiku 4.5 nor older models."""
    fam, major, minor = rules.model_version(model)
    return (major, minor) >= (4, 6) or (fam == "opus" and (major, minor) >= (4, 5))


TOOL_SEARCH_TYPES = ("tool_search_tool_regex_", "tool_search_tool_bm25_")


def refusal(body: dict[str, Any], target: str, tokens: Any = None, window: int | None = None) -> str | None:
    """Why ``body`` cannot go to ``target`` at all (it is kept on its model), or None.

    ``tokens()`` counts the request's input tokens, ``window`` is the target's context window (the price
    table's ``context_window``); both are only consulted when the rest passes.
    """
    msgs = body.get("messages") or []
    if (
        msgs
        and isinstance(msgs[-1], dict)
        and msgs[-1].get("role") == "assistant"
        and rules.refuses_prefill(target)
    ):
        return "prefill"  # the caller's prefill shapes the answer: dropping it would change what they asked
    if thread_of(body) is not None and not rules.supports_message_threads(target):
        return "message threads"  # the target answers 400 thread_unsupported_request
    for tool in body.get("tools") or []:
        kind = str(tool.get("type") or "") if isinstance(tool, dict) else ""
        if kind.startswith(TOOL_SEARCH_TYPES) and not rules.supports_tool_search(target):
            return "tool search"
        if kind.startswith("advisor_") and rules.advisor_pair_problem(target, str(tool.get("model") or "")):
            return "advisor pair"
    if tokens is not None and window is not None and tokens() > window:
        return "context window"
    return None


def signed_turn(body: dict[str, Any]) -> bool:
    """The last assistant turn holds thinking blocks: signed by the model that wrote them, which a
    tool loop in progress must send back to it (no switch there)."""
    for m in reversed(body.get("messages") or []):
        if isinstance(m, dict) and m.get("role") == "assistant":
            content = m.get("content")
            return isinstance(content, list) and any(
                isinstance(b, dict) and b.get("type") in ("thinking", "redacted_thinking") for b in content
            )
    return False


def fit(body: dict[str, Any], target: str) -> dict[str, Any]:
    """``body`` sent to ``target``, with what the target would refuse adjusted (a new dict)."""
    out = {**body, "model": target}
    limit = max_output(target)
    if limit is not None and int(out.get("max_tokens") or 0) > limit:
        out["max_tokens"] = limit
    th = out.get("thinking")
    if isinstance(th, dict) and th.get("type") in ("enabled", "adaptive"):
        max_tokens = int(out.get("max_tokens") or 0)
        if th["type"] == "adaptive" and not rules.supports_adaptive_thinking(target):
            budget = min(max(1024, max_tokens // 2), max_tokens - 1)
            out["thinking"] = (
                {"type": "enabled", "budget_tokens": budget} if budget >= 1024 else {"type": "disabled"}
            )
        elif th["type"] == "enabled" and rules.refuses_budget_thinking(target):
            out["thinking"] = {"type": "adaptive"}
        elif th["type"] == "enabled" and int(th.get("budget_tokens") or 0) >= max_tokens:
            budget = max_tokens - 1
            out["thinking"] = {**th, "budget_tokens": budget} if budget >= 1024 else {"type": "disabled"}
    oc = out.get("output_config")
    if isinstance(oc, dict) and "effort" in oc and not supports_effort(target):
        rest = {k: v for k, v in oc.items() if k != "effort"}
        if rest:
            out["output_config"] = rest
        else:
            del out["output_config"]
    samplers = [p for p in ("temperature", "top_p", "top_k") if out.get(p) is not None]
    if samplers and rules.refuses_sampling(target):
        for p in samplers:
            del out[p]
    if (
        out.get("temperature") is not None
        and out.get("top_p") is not None
        and rules.refuses_temperature_with_top_p(target)
    ):
        del out["top_p"]
    if thinking_on(out):
        if out.get("temperature") not in (None, 1):
            del out["temperature"]
        out.pop("top_k", None)
    elif isinstance(cm := out.get("context_management"), dict):
        edits = cm.get("edits")
        if isinstance(edits, list) and any(
            isinstance(e, dict) and str(e.get("type", "")).startswith("clear_thinking") for e in edits
        ):
            kept = [
                e
                for e in edits
                if not (isinstance(e, dict) and str(e.get("type", "")).startswith("clear_thinking"))
            ]
            if kept:
                out["context_management"] = {**cm, "edits": kept}
            else:
                out.pop("context_management")
    return out


# -- per-conversation decisions ---------------------------------------------------------------------


DECISION_BYTES = 512  # what one decision takes at most: two model names, a rule's, four switches
SHARED = ("model", "rule", "switches", "from")


class _Memory:
    """This process's output sizes per conversation (byte-capped): what a switch would save."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.outputs: SizedLRU[str, tuple[int, int]] = SizedLRU()


def _memory(ctx: Any) -> _Memory:
    memory: _Memory = ctx.shared_state(memory=_Memory)["memory"]
    return memory


def _decisions(ctx: Any, settings: dict[str, Any]) -> Any:
    """The per-conversation decisions (``tokensaver.state.Decisions``): in this process's memory on
    the embedded state, shared by every replica on Redis; at most ``max_bytes`` either way."""
    made: dict[tuple[str, int], Any] = ctx.shared_state(decisions=dict)["decisions"]
    where = (str(getattr(ctx, "state_url", "")), settings["max_bytes"])
    found = made.get(where)
    if found is None:
        found = made[where] = ctx.store.decisions(
            PLUGIN,
            SHARED,
            limit=max(16, settings["max_bytes"] // DECISION_BYTES),
            cap=settings["max_bytes"],
            ttl=DECISION_TTL,
        )
    return found


def _key(ctx: Any, settings: dict[str, Any], asked: str) -> str:
    return hashlib.sha256(f"{settings['rules_id']}\n{ctx.conversation}\n{asked}".encode()).hexdigest()[:32]


def load_decision(ctx: Any, settings: dict[str, Any], key: str) -> dict[str, Any] | None:
    """The conversation's decision (the newest any replica made on a shared state), or None."""
    try:
        conv = _decisions(ctx, settings).get(ctx.key_hash, key, dict)
    except Exception:  # an unusable state: decided afresh (fail open)
        return None
    return dict(conv) if isinstance(conv.get("model"), str) else None


def save_decision(ctx: Any, settings: dict[str, Any], key: str, decision: dict[str, Any]) -> None:
    try:
        decisions = _decisions(ctx, settings)
        conv = decisions.get(ctx.key_hash, key, dict)
        conv.clear()
        conv.update(decision)
        decisions.put(ctx.key_hash, key, conv)
    except Exception:  # not kept: the next call decides again, alike for a conversation's first rule
        pass


def model_at(decision: dict[str, Any], n_messages: int) -> tuple[str, str | None]:
    """The model (and rule) of the conversation for a request of ``n_messages`` messages."""
    model, rule = decision["model"], decision.get("rule")
    for at, m, r in decision.get("switches") or []:
        if n_messages >= at:
            model, rule = m, r
    return model, rule


def switch_pays(
    ctx: Any,
    settings: dict[str, Any],
    tokens: int,
    current: str,
    target: str,
    calls_so_far: int,
    out_tokens: float,
) -> tuple[bool, dict[str, Any]]:
    """Whether moving the conversation from ``current`` to ``target`` now pays for its cache re-write."""
    cur, new = ctx.prices.get(current), ctx.prices.get(target)
    # this call: the whole prefix written on the new model instead of read on the one it is cached on
    extra = tokens * (new.cache_write_5m - cur.cache_read) / 1e6
    per_call = (tokens * (cur.cache_read - new.cache_read) + out_tokens * (cur.output - new.output)) / 1e6
    future = max(1, min(settings["max_future_calls"], calls_so_far))
    saving = future * per_call
    pays = per_call > 0 and saving >= settings["switch_payback"] * max(extra, 0.0)
    return pays, {
        "write_tokens": tokens,
        "write_usd": round(tokens * new.cache_write_5m / 1e6, 8),
        "extra_usd": round(extra, 8),
        "saving_usd": round(saving, 8),
    }


# -- the hooks --------------------------------------------------------------------------------------


@hookimpl
def tokensaver_transform_request(body: dict[str, Any], ctx: Any) -> dict[str, Any] | None:
    """Send the request to its conversation's model, decided by the rules (see the module doc)."""
    settings = ctx.settings or DEFAULTS
    rules = settings.get("rules") or []
    if not rules or not isinstance(body.get("messages"), list):
        return None
    if "rules_id" not in settings:
        settings = tokensaver_configure(settings, "route")
    asked = str(body.get("model", ""))
    n = len(body["messages"])
    counted: list[int] = []

    def tokens() -> int:
        if not counted:
            counted.append(ctx.count(body))
        return counted[0]

    rule = next((r for r in rules if matches(r["when"], body, tokens)), None)
    key = _key(ctx, settings, asked)
    decision = load_decision(ctx, settings, key)
    switch: dict[str, Any] | None = None
    # a message-thread continue (the stages get the whole conversation; tokensaver.threads): the API holds
    # the thread as its create was sent, so the continue keeps the model the conversation is on, no switch
    continuing = (thread_of(body) or {}).get("type") == "continue"
    if decision is None:
        first = rule["model"] if rule else asked
        decision = {"model": first, "rule": rule["name"] if rule else None, "switches": [], "from": n}
        if continuing and first != asked:
            # its create was not routed here (or the decision is gone): the thread is on the model asked for
            ctx.record(kept="thread continue", rule=rule["name"] if rule else None, target=first)
            decision = {"model": asked, "rule": None, "switches": [], "from": n}
        elif n > 1 and first != asked:
            # seen first mid-way (the plugin enabled in a running conversation, a decision expired):
            # the conversation is cached on the model asked for, so moving it is a switch like any other
            pays, switch = switch_pays(ctx, settings, tokens(), asked, first, n // 2, _out_tokens(ctx, key))
            if signed_turn(body):
                pays, switch = False, {"why": "thinking in the last turn"}
            if not pays:
                decision = {"model": asked, "rule": None, "switches": [], "from": n}
                ctx.record(kept="switch does not pay", rule=rule["name"] if rule else None, **switch)
                switch = None
        save_decision(ctx, settings, key, decision)
    model, rule_name = model_at(decision, n)
    wants_switch = rule is not None and rule["switch"] and rule["model"] != model
    if wants_switch and continuing:
        assert rule is not None
        ctx.record(kept="thread continue", rule=rule["name"], target=rule["model"])
    elif wants_switch and rule is not None and n > int(decision.get("from", 1)):
        switches = decision.get("switches") or []
        last_at = switches[-1][0] if switches else 0
        if n > last_at and len(switches) < MAX_SWITCHES and not signed_turn(body):
            pays, facts = switch_pays(
                ctx, settings, tokens(), model, rule["model"], n // 2, _out_tokens(ctx, key)
            )
            if pays:
                decision = {**decision, "switches": [*switches, [n, rule["model"], rule["name"]]]}
                save_decision(ctx, settings, key, decision)
                model, rule_name, switch = rule["model"], rule["name"], facts
            else:
                ctx.record(kept="switch does not pay", rule=rule["name"], **facts)
    if model == asked:
        return None
    window = ctx.prices.get(model).context_window
    why = refusal(body, model, tokens, window)
    if why is not None:
        facts = {"tokens": tokens(), "window": window} if why == "context window" else {}
        ctx.record(kept=why, rule=rule_name, target=model, **facts)
        return None
    notes: dict[str, Any] = {"rule": rule_name, "asked": asked, "target": model}
    if switch is not None:
        notes["switch"] = switch
    ctx.record(**notes)
    return fit(body, model)


def _out_tokens(ctx: Any, key: str) -> float:
    """The conversation's mean output tokens so far in this process (500 when none was seen)."""
    memory = _memory(ctx)
    with memory.lock:
        seen = memory.outputs.get(key)
    return seen[0] / seen[1] if seen and seen[1] else 500.0


@hookimpl
def tokensaver_observe_response(body: dict[str, Any], response: dict[str, Any], ctx: Any) -> None:
    """Keep the conversation's output sizes: what a switch would save on the calls to come."""
    settings = ctx.settings or DEFAULTS
    if not settings.get("rules") or "rules_id" not in settings:
        return
    notes = ctx.notes.get(PLUGIN) or {}
    asked = str(notes.get("asked") or body.get("model", ""))
    key = _key(ctx, settings, asked)
    out = int((ctx.usage or {}).get("output_tokens") or 0)
    memory = _memory(ctx)
    with memory.lock:
        total, calls = memory.outputs.get(key) or (0, 0)
        memory.outputs.put(key, (total + out, calls + 1), 100, 1_000_000, settings["max_bytes"] // 4)


@hookimpl
def tokensaver_report_section(plugin: str, calls: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Calls routed per rule, the switches and their cache writes, and what the routed calls saved."""
    notes = plugin_notes(calls, plugin)
    if not notes:
        return None
    per: dict[str, dict[str, Any]] = {}
    kept: dict[str, int] = {}
    for call, n in notes:
        if n.get("kept"):  # a call kept on its model (it may still be routed: a switch not made)
            kept[n["kept"]] = kept.get(n["kept"], 0) + 1
        if not n.get("asked") or not n.get("target"):
            continue
        row = per.setdefault(
            str(n.get("rule")),
            {
                "rule": str(n.get("rule")),
                "to": n["target"],
                "calls": 0,
                "conversations": set(),
                "switches": 0,
                "switch_write_tokens": 0,
                "cost_usd": 0.0,
                "asked_usd": 0.0,
                "saved_usd": 0.0,
            },
        )
        row["calls"] += 1
        row["conversations"].add(call.get("conversation"))
        sw = n.get("switch") or {}
        if sw:
            row["switches"] += 1
            row["switch_write_tokens"] += int(sw.get("write_tokens") or 0)
        row["cost_usd"] += float(call.get("cost_usd") or 0.0)
        row["asked_usd"] += float(call.get("counterfactual_usd") or 0.0)
        row["saved_usd"] += float(call.get("saved_usd") or 0.0)
    rows = []
    for row in per.values():
        rows.append(
            {
                **row,
                "conversations": len(row["conversations"]),
                "cost_usd": round(row["cost_usd"], 6),
                "asked_usd": round(row["asked_usd"], 6),
                "saved_usd": round(row["saved_usd"], 6),
            }
        )
    routed = sum(r["calls"] for r in rows)
    saved = sum(r["saved_usd"] for r in rows)
    kept_text = ", ".join(f"{v} kept ({k})" for k, v in sorted(kept.items()))
    summary = (
        f"{routed} calls routed by {len(rows)} rules, ${saved:.4f} saved on them against the models asked for "
        f"(billed at the same cache model)" + (f"; {kept_text}" if kept_text else "")
    )
    return {"title": "Routing", "summary": summary, "rows": rows}
