"""Misbehaving plugins for the fault suite: they hang, raise, emit invalid requests, mutate their input,
or answer a lookup with junk. Each acts only on requests whose nonce text carries its marker, so
unrelated calls through the same pipeline show whether one bad plugin holds up the others.

Registered with ``tokensaver.get_plugin_manager({name: plugin})`` (an in-process proxy or
``wrap()``): the proxy command has no way to load a module that is not an installed entry point.
"""

from __future__ import annotations

import threading
from typing import Any

from fault_upstream import nonce_text

import tokensaver

HANG = "[hang]"
RAISE = "[raise]"
ORPHAN = "[orphan]"
BREAKPOINTS = "[six-breakpoints]"
HUGE = "[huge]"
MUTATE = "[mutate]"
HUGE_BYTES = 42 * 1024 * 1024  # the API takes 32 MB


def _marked(body: dict[str, Any], marker: str) -> bool:
    return marker in nonce_text(body)[1]


class Hang:
    """Blocks in its transform (until released, at most ``hold`` seconds) on marked requests."""

    def __init__(self, hold: float = 30.0) -> None:
        self.release = threading.Event()
        self.hold = hold
        self.entered = 0

    @tokensaver.hookimpl
    def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> dict[str, Any] | None:
        if _marked(body, HANG):
            self.entered += 1
            self.release.wait(self.hold)
        return None


class Raise:
    """Raises in its transform and in its observer on marked requests."""

    @tokensaver.hookimpl
    def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> dict[str, Any] | None:
        if _marked(body, RAISE):
            raise RuntimeError("fault-suite plugin raised on purpose")
        return None

    @tokensaver.hookimpl
    def tokensaver_observe_response(self, body: dict[str, Any], response: Any, ctx: Any) -> None:
        if _marked(body, RAISE):
            raise RuntimeError("fault-suite observer raised on purpose")


class Invalid:
    """Returns a request the API rejects: an orphaned tool_result, 6 breakpoints, or a 42 MB body."""

    @tokensaver.hookimpl
    def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> dict[str, Any] | None:
        msgs = body["messages"]
        last = msgs[-1]
        if _marked(body, ORPHAN):
            orphan = {"type": "tool_result", "tool_use_id": "toolu_nobody_asked", "content": "stale"}
            return {**body, "messages": [*msgs[:-1], {**last, "content": [orphan, *last["content"]]}]}
        if _marked(body, BREAKPOINTS):
            cc = {"type": "ephemeral"}
            system = [{"type": "text", "text": f"part {i}", "cache_control": cc} for i in range(5)]
            content = [{**b, "cache_control": cc} for b in last["content"]]
            return {**body, "system": system, "messages": [*msgs[:-1], {**last, "content": content}]}
        if _marked(body, HUGE):
            image = {
                "type": "image",
                "source": {"type": "base64", "media_type": "image/png", "data": "A" * HUGE_BYTES},
            }
            return {**body, "messages": [*msgs[:-1], {**last, "content": [image, *last["content"]]}]}
        return None


class MutateThenRaise:
    """Edits the caller's text block in place (blocks are immutable by contract), then raises."""

    @tokensaver.hookimpl
    def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> dict[str, Any] | None:
        if _marked(body, MUTATE):
            for block in body["messages"][-1]["content"]:
                if isinstance(block, dict) and block.get("type") == "text":
                    block["text"] = "MUTATED " + block["text"].replace("Say", "Shout")
            raise RuntimeError("fault-suite plugin mutated its input, then raised")
        return None


JUNK_VALUES: list[tuple[str, Any]] = [
    ("a dict without content", {"junk": True}),
    ("a string", "not a message"),
    ("a message with content null", {"type": "message", "role": "assistant", "content": None}),
]


def junk_marker(i: int) -> str:
    """The marker that makes :class:`JunkLookup` answer with ``JUNK_VALUES[i]``."""
    return f"[junk{i}]"


class JunkLookup:
    """A lookup hook that answers marked requests with something that is not a Message."""

    @tokensaver.hookimpl
    def tokensaver_lookup_response(self, body: dict[str, Any], ctx: Any) -> Any:
        for i, (_, junk) in enumerate(JUNK_VALUES):
            if _marked(body, junk_marker(i)):
                return junk
        return None
