"""The per-message digests the core hands a stage (``ctx.message_digests``): they are the digests of
the very body the stage gets (xxh3-128 of each message's orjson), only while no stage before it
changed the body, and a plugin that uses them (summarize's prefix check) sends the bytes it sends
when it digests every message itself. Real SDK over HTTP to the emulator.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import anthropic
import orjson
import pytest
import xxhash
from tokensaver_plugins import cache_align, prune, summarize

import tokensaver
from tokensaver import pipeline
from tokensaver.emulator import Emulator

MODEL = "claude-sonnet-4-6"


def _listing(tag: str, n: int = 40) -> str:
    rows = [{"id": j, "name": f"{tag}-{j}", "status": "error" if j % 7 == 0 else "ok"} for j in range(n)]
    return json.dumps(rows, indent=2)


def _turns(turns: int) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = [{"role": "user", "content": [{"type": "text", "text": "List the items."}]}]
    for t in range(turns):
        tid = f"toolu_{t}"
        msgs.append(
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": tid, "name": "ls", "input": {"p": t}}],
            }
        )
        content: Any = _listing(f"v{t}") if t % 2 == 0 else [{"type": "text", "text": _listing(f"v{t}")}]
        msgs.append(
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tid, "content": content}]}
        )
    return msgs


def _calls() -> list[list[dict[str, Any]]]:
    """A conversation's requests: growth, an old result edited by the caller, a breakpoint placed
    and moved, a cut (the caller dropped its oldest turns), growth again."""
    msgs = _turns(8)
    calls = [msgs[:3], msgs[:5], msgs[:7], msgs[:9]]
    edited = copy.deepcopy(msgs[:11])
    edited[4]["content"][0]["content"] = _listing("edited")
    calls.append(edited)
    marked = copy.deepcopy(edited)
    marked[-1]["content"][0]["cache_control"] = {"type": "ephemeral"}
    calls.append(marked)
    moved = copy.deepcopy(msgs[:13])
    moved[-1]["content"][0]["cache_control"] = {"type": "ephemeral"}
    calls.append(moved)
    calls.append([msgs[0], *msgs[5:15]])  # a cut: the same opening, turns 1-2 gone
    calls.append([msgs[0], *msgs[5:17]])
    return calls


def _sent(tmp_path: Any, plugins: list[str]) -> list[bytes]:
    with Emulator(virtual_clock=True) as emu:
        client = tokensaver.wrap(
            anthropic.Anthropic(base_url=emu.url, api_key="k", max_retries=0),
            config={"plugins": plugins, "runs_dir": str(tmp_path), "record": False},
        )
        for msgs in _calls():
            client.messages.create(model=MODEL, max_tokens=20, messages=copy.deepcopy(msgs))
        return [orjson.dumps(r.body) for r in emu.requests]


@pytest.mark.parametrize("plugins", [["summarize"], ["summarize", "prune", "cache_align"]])
def test_summarize_with_the_cores_digests_sends_what_it_sends_without(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, plugins: list[str]
) -> None:
    handed: list[bool] = []
    own = summarize._raw_digests

    def spy(messages: list[Any], given: Any) -> list[Any]:
        handed.append(given is not None)
        if given is not None:  # the core's digests are those of the messages summarize got
            assert given == [xxhash.xxh3_128_digest(orjson.dumps(m)) for m in messages]
        return own(messages, given)

    monkeypatch.setattr(summarize, "_raw_digests", spy)
    with_digests = _sent(tmp_path / "a", plugins)
    assert handed and all(handed)  # summarize, the first stage, got them on every call with an index

    monkeypatch.setattr(summarize, "_raw_digests", lambda messages, given: own(messages, None))
    without = _sent(tmp_path / "b", plugins)
    assert with_digests == without
    assert len(with_digests) == len(_calls())


def test_every_stage_gets_the_digests_of_the_body_it_gets(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stage after one that changed the body gets them too: those of the caller's messages it
    kept, of the earlier stages' rewrites, the rest made for it; each that of the message it holds."""
    seen: list[tuple[str, bool]] = []
    call = pipeline.Pipeline._call

    def spy(self: Any, c: Any, name: str, hook: str, impl: Any, **kwargs: Any) -> Any:
        if hook == "tokensaver_transform_request":
            d = c.ctx.message_digests
            body = kwargs["body"]
            assert d == [xxhash.xxh3_128_digest(orjson.dumps(m)) for m in body["messages"]]
            seen.append((name, body is not c.original))
        return call(self, c, name, hook, impl, **kwargs)

    monkeypatch.setattr(pipeline.Pipeline, "_call", spy)
    _sent(tmp_path, ["summarize", "prune", "cache_align"])
    # summarize rewrites the listings on every call: the later stages get a changed body
    assert {name for name, _ in seen} == {"summarize", "prune", "cache_align"}
    assert any(changed for name, changed in seen if name == "cache_align")


@pytest.mark.parametrize("plugins", [["summarize", "prune"], ["summarize", "prune", "cache_align"]])
def test_prune_with_the_cores_digests_sends_what_it_sends_without(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, plugins: list[str]
) -> None:
    own = prune._digests
    handed: list[bool] = []

    def spy(messages: list[Any], at: int, breakpoints: Any, given: Any = None) -> Any:
        handed.append(given is not None)
        return own(messages, at, breakpoints, given)

    _same_with_and_without(tmp_path, monkeypatch, plugins, prune, "_digests", spy, handed)


def _same_with_and_without(
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
    plugins: list[str],
    module: Any,
    name: str,
    spy: Any,
    handed: list[bool],
) -> None:
    """``module.name`` (spied: it notes in ``handed`` whether it got the core's digests) is handed
    them on every call, and without them (``given`` left out) the same bytes go out."""
    own = getattr(module, name)
    monkeypatch.setattr(module, name, spy)
    with_digests = _sent(tmp_path / "a", plugins)
    assert handed and all(handed)
    monkeypatch.setattr(module, name, lambda *args, given=None: own(*args))
    assert _sent(tmp_path / "b", plugins) == with_digests


def test_cache_align_with_the_cores_digests_sends_what_it_sends_without(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    own = cache_align.digest_prefix
    handed: list[bool] = []

    def spy(body: Any, prev: Any, count: Any, given: Any = None) -> Any:
        handed.append(given is not None and None not in given)
        if given is not None:  # each the digest of the whole message cache_align holds there
            for m, d in zip(body["messages"], given, strict=True):
                assert d is None or d == xxhash.xxh3_128_digest(orjson.dumps(m))
        return own(body, prev, count, given)

    plugins = ["summarize", "prune", "cache_align"]
    _same_with_and_without(tmp_path, monkeypatch, plugins, cache_align, "digest_prefix", spy, handed)
