"""The built-ins declare ``tokensaver_read_only``: the core hands them the call's own blocks, uncopied
and unchecked. Property test of the promise: over generated conversations, turn after turn, with one
state per plugin, no built-in edits the body it is given, nor anything it returned on an earlier call.
"""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import conversations, turns
from tokensaver_plugins import cache_align, defer_tools, memoize, prune, route, summarize

from tokensaver.context import make_context

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ORDER = [
    ("summarize", summarize),
    ("prune", prune),
    ("defer_tools", defer_tools),
    ("cache_align", cache_align),
]


def test_every_built_in_declares_it() -> None:
    for module in (summarize, prune, defer_tools, cache_align, route, memoize):
        assert getattr(module, "tokensaver_read_only", False) is True, module.__name__


@SETTINGS
@given(conversations(), st.booleans())
def test_no_built_in_edits_what_it_is_given_or_what_it_returned(conv: dict[str, Any], tight: bool) -> None:
    conf: dict[str, dict[str, Any]] = {
        name: module.tokensaver_configure({}, "test") for name, module in ORDER
    }
    names = [t["name"] for t in conv.get("tools") or []]
    conf["defer_tools"] = defer_tools.tokensaver_configure({"tools": names[1:3]}, "test")
    if tight:  # prune's cuts happen on these small conversations
        conf["prune"] = prune.tokensaver_configure(
            {"max_tokens_budget": 3000, "keep_tool_uses": 2, "keep_last_messages": 2}, "test"
        )
    states: dict[str, dict[str, Any]] = {}
    returned: list[tuple[Any, Any]] = []  # (what a plugin returned, a copy of it then)
    for k, body in enumerate(turns(conv)):
        current = body
        for name, module in ORDER:
            frozen = copy.deepcopy(current)
            ctx = make_context(
                current, plugin=name, settings=conf[name], now=1_700_000_000 + 30 * k, states=states
            )
            out = module.tokensaver_transform_request(current, ctx)
            assert current == frozen, f"{name} edited its input"
            if out is not None:
                returned.append((out, copy.deepcopy(out)))
                current = out
        for out, then in returned:
            assert out == then, "a plugin edited a body it had returned on an earlier call"
