"""Every hook exercised for real (a ``test_hook_<hook>`` each: a plugin, a wrapped SDK client, HTTP to the
emulator) and the meta-tests that hold the plugin API's shape, as datasette's: a hook without its
``test_hook_<hook>`` here fails, a hook whose section in docs/plugin-hooks.md does not carry the hookspec's
exact signature fails, and every section's snippet runs as written.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import pytest

import tokensaver
from tokensaver import hookspecs
from tokensaver.emulator import Emulator, EmulatorError
from tokensaver.plugins import get_plugin_manager
from tokensaver.run import load_run
from tokensaver.testing import one_plugin_client, one_plugin_manager, stored_message, wrap_one

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "plugin-hooks.md"
MODEL = "claude-sonnet-4-6"
HI = {"model": MODEL, "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
SNIPPET_TIMEOUT = 60  # seconds: a snippet that hangs fails instead of stalling CI


def _hook_functions() -> dict[str, Callable[..., Any]]:
    """The hooks as pluggy knows them (its HookRelay), each with its spec function."""
    relay = get_plugin_manager(load_entrypoints=False).hook
    hooks = {}
    for name in dir(relay):
        spec = getattr(getattr(relay, name), "spec", None)
        if name.startswith("tokensaver_") and spec is not None:
            hooks[name] = spec.function
    return hooks


HOOKS = _hook_functions()


def signature(fn: Callable[..., Any]) -> str:
    """``name(param: type, ...) -> type`` from the function's own annotations, as written in its source."""
    params = inspect.signature(fn).parameters
    annotations = fn.__annotations__
    missing = [p for p in [*params, "return"] if p not in annotations]
    assert not missing, f"{fn.__name__} leaves {missing} unannotated: its signature cannot be documented"
    args = ", ".join(f"{p}: {annotations[p]}" for p in params)
    return f"{fn.__name__}({args}) -> {annotations['return']}"


def documented() -> dict[str, tuple[str, str]]:
    """Hook name -> (the signature in its ``## `...` `` heading, the section's text)."""
    sections: dict[str, tuple[str, str]] = {}
    for section in re.split(r"^## ", DOCS.read_text(), flags=re.M)[1:]:
        heading, _, text = section.partition("\n")
        match = re.fullmatch(r"`((tokensaver_\w+)\(.*\) -> .*)`", heading.strip())
        assert match, f"a section heading of {DOCS.name} is not a hook signature: {heading!r}"
        sections[match.group(2)] = (match.group(1), text)
    return sections


# -- meta-tests ------------------------------------------------------------------------------


def test_hooks_found() -> None:
    in_module = {
        n for n, _ in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("tokensaver_")
    }
    assert len(HOOKS) >= 6 and set(HOOKS) == in_module


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_every_hook_has_its_test(hook: str) -> None:
    assert callable(globals().get(f"test_hook_{hook}")), f"tests/test_hooks.py has no test_hook_{hook}"


def test_every_hook_test_names_a_hook() -> None:
    stale = [n for n in globals() if n.startswith("test_hook_") and n[len("test_hook_") :] not in HOOKS]
    assert not stale, f"tests for hooks that do not exist: {stale}"


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_every_hook_is_documented_with_its_exact_signature(hook: str) -> None:
    docs = documented()
    assert hook in docs, f"{DOCS.name} has no section for {hook}"
    assert docs[hook][0] == signature(HOOKS[hook]), f"{DOCS.name} documents another signature for {hook}"
    assert "```python\n" in docs[hook][1], f"the {hook} section has no snippet"


def test_the_docs_document_only_hooks() -> None:
    assert list(documented()) == [h for h in documented() if h in HOOKS] and set(documented()) == set(HOOKS)


def test_a_changed_signature_is_told_apart() -> None:
    """The signature check compares types and the return too, not only the parameter names."""

    def tokensaver_configure(settings: dict[str, Any], source: str) -> dict[str, Any]: ...

    assert signature(tokensaver_configure) != documented()["tokensaver_configure"][0]
    assert signature(HOOKS["tokensaver_configure"]) == documented()["tokensaver_configure"][0]


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_the_snippet_of_each_hook_runs(hook: str) -> None:
    """Each snippet runs as a program would (its own namespace, its own emulator), bounded in time."""
    (code,) = re.findall(r"```python\n(.*?)```", documented()[hook][1], re.S)
    assert hook in code  # the snippet shows the hook it documents
    program = compile(code, f"{DOCS.name}:{hook}", "exec")
    failure: list[BaseException] = []

    def run() -> None:
        try:
            exec(program, {"__name__": "__main__"})
        except BaseException as exc:  # handed to the test thread below
            failure.append(exc)

    thread = threading.Thread(target=run, name=f"snippet-{hook}", daemon=True)
    thread.start()
    thread.join(SNIPPET_TIMEOUT)
    assert not thread.is_alive(), f"the {hook} snippet did not finish in {SNIPPET_TIMEOUT} s"
    if failure:
        raise failure[0]


# -- one test per hook, over HTTP to the emulator --------------------------------------------


class Limits:
    """configure fills a default and rejects a bad value; transform applies the normalized settings."""

    def __init__(self) -> None:
        self.configured: list[tuple[dict[str, Any], str]] = []

    @tokensaver.hookimpl
    def tokensaver_configure(self, settings: dict[str, Any], source: str) -> dict[str, Any]:
        self.configured.append((dict(settings), source))
        if "boom" in settings:
            raise RuntimeError("not a ConfigError")
        limit = settings.get("limit", 32)
        if not isinstance(limit, int) or limit < 1:
            raise tokensaver.ConfigError(
                "limits.limit must be a positive integer", key="limit", source=source
            )
        return {"limit": limit, "mode": "cap"}

    @tokensaver.hookimpl
    def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> dict[str, Any]:
        assert ctx.settings == {"limit": ctx.settings["limit"], "mode": "cap"}
        return {**body, "max_tokens": min(body["max_tokens"], ctx.settings["limit"])}


def test_hook_tokensaver_configure(emu: Emulator) -> None:
    plugin = Limits()
    client = one_plugin_client(emu, plugin, name="limits")  # no table: the default is filled in
    for _ in range(2):
        client.messages.create(**{**HI, "max_tokens": 500})
    assert emu.last.body["max_tokens"] == 32 and len(emu.requests) == 2
    assert [settings for settings, _ in plugin.configured] == [{}]  # once per wrap(), not per call

    client = one_plugin_client(emu, plugin, name="limits", settings={"limit": 7})
    client.messages.create(**{**HI, "max_tokens": 500})
    assert emu.last.body["max_tokens"] == 7 and plugin.configured[-1] == ({"limit": 7}, "wrap(config=...)")

    with pytest.raises(tokensaver.ConfigError, match="limit") as bad:
        one_plugin_client(emu, plugin, name="limits", settings={"limit": 0})
    assert bad.value.key == "limit"
    with pytest.raises(tokensaver.ConfigError, match="'limits'"):  # any other error names the plugin
        one_plugin_client(emu, plugin, name="limits", settings={"boom": 1})
    assert len(emu.requests) == 3  # a refused configuration sends nothing


class Shorten:
    """Keeps only the last message; the second call's body is left as it came (None)."""

    @tokensaver.hookimpl
    def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> dict[str, Any] | None:
        if len(body["messages"]) < 3:
            return None
        return {**body, "messages": body["messages"][-1:]}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_hook_tokensaver_transform_request(emu: Emulator, stream: bool) -> None:
    client = one_plugin_client(emu, Shorten(), name="shorten")
    long_history = [
        {"role": "user", "content": "an earlier question " * 50},
        {"role": "assistant", "content": "an earlier answer " * 50},
        {"role": "user", "content": "and now?"},
    ]
    for messages in (long_history, HI["messages"]):
        kw = {**HI, "messages": messages}
        if stream:
            with client.messages.stream(**kw) as s:
                s.get_final_message()
        else:
            client.messages.create(**kw)
    first, second = (r.body["messages"] for r in emu.requests)
    assert first == [{"role": "user", "content": "and now?"}] and second == HI["messages"]
    cut, kept = (r["stages"][0] for r in client.tokensaver.records)
    assert cut["plugin"] == kept["plugin"] == "shorten"
    assert cut["after"] < cut["before"] and kept["after"] == kept["before"]


STORED = stored_message(MODEL, "from memory", usage={"input_tokens": 0, "output_tokens": 0})


class Remember:
    @tokensaver.hookimpl
    def tokensaver_lookup_response(self, body: dict[str, Any], ctx: Any) -> dict[str, Any] | None:
        return {**STORED, "model": body["model"]} if body["messages"][-1]["content"] == "again?" else None


@pytest.mark.parametrize("mode", ["create", "stream", "async"])
def test_hook_tokensaver_lookup_response(emu: Emulator, mode: str) -> None:
    kw = {**HI, "messages": [{"role": "user", "content": "again?"}]}
    if mode == "async":

        async def go() -> Any:
            client = one_plugin_client(emu, Remember(), name="remember", asynchronous=True)
            return await client.messages.create(**kw), client

        message, client = asyncio.run(asyncio.wait_for(go(), 60))
    else:
        client = one_plugin_client(emu, Remember(), name="remember")
        if mode == "stream":
            with client.messages.stream(**kw) as s:
                message = s.get_final_message()
        else:
            message = client.messages.create(**kw)
    assert message.id == "msg_stored" and message.content[0].text == "from memory"
    assert emu.requests == []  # served without the network
    if mode != "async":
        assert client.messages.create(**HI).content[0].text != "from memory"  # None: the network answers
        assert len(emu.requests) == 1


class Dice:
    """A plugin tool the caller never sees: answers with a string, or with content blocks."""

    TOOL = {"name": "tokensaver_dice", "input_schema": {"type": "object", "properties": {}}}

    def __init__(self) -> None:
        self.asked: list[dict[str, Any]] = []

    @tokensaver.hookimpl
    def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> dict[str, Any]:
        tools = [t for t in body.get("tools") or [] if t["name"] != "tokensaver_dice"]
        return {**body, "tools": [*tools, self.TOOL]}

    @tokensaver.hookimpl
    def tokensaver_answer_tool_use(self, tool_use: dict[str, Any], ctx: Any) -> str | list[Any] | None:
        if tool_use["name"] != "tokensaver_dice":
            return None
        self.asked.append(tool_use)
        return "4" if tool_use["input"].get("as") != "blocks" else [{"type": "text", "text": "6"}]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_hook_tokensaver_answer_tool_use(emu: Emulator, stream: bool) -> None:
    plugin = Dice()
    emu.reply(
        [
            {"type": "tool_use", "id": "toolu_a", "name": "tokensaver_dice", "input": {}},
            {"type": "tool_use", "id": "toolu_b", "name": "tokensaver_dice", "input": {"as": "blocks"}},
        ],
        "You rolled 4 and 6.",
    )
    client = one_plugin_client(emu, plugin, name="dice")
    kw = {**HI, "messages": [{"role": "user", "content": "roll twice"}]}
    if stream:
        with client.messages.stream(**kw) as s:
            message = s.get_final_message()
    else:
        message = client.messages.create(**kw)
    assert [b.type for b in message.content] == ["text"] and message.content[0].text == "You rolled 4 and 6."
    assert [t["id"] for t in plugin.asked] == ["toolu_a", "toolu_b"]
    assert len(emu.requests) == 2
    assert emu.last.body["messages"][-1]["content"] == [
        {"type": "tool_result", "tool_use_id": "toolu_a", "content": "4"},
        {"type": "tool_result", "tool_use_id": "toolu_b", "content": [{"type": "text", "text": "6"}]},
    ]


class Watch:
    def __init__(self) -> None:
        self.seen: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = []

    @tokensaver.hookimpl
    def tokensaver_observe_response(self, body: dict[str, Any], response: dict[str, Any], ctx: Any) -> None:
        self.seen.append((body, response, dict(ctx.usage)))


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_hook_tokensaver_observe_response(emu: Emulator, stream: bool) -> None:
    plugin = Watch()
    client = one_plugin_client(emu, plugin, name="watch")
    emu.reply("Hello there.")
    if stream:
        with client.messages.stream(**HI) as s:
            message = s.get_final_message()
    else:
        message = client.messages.create(**HI)
    ((body, response, usage),) = plugin.seen
    assert body == emu.last.body  # the body that was sent
    assert response["id"] == message.id and response["content"] == [{"type": "text", "text": "Hello there."}]
    assert (
        response["usage"]["output_tokens"] == message.usage.output_tokens > 0
    )  # billed, also when assembled
    assert usage["input_tokens"] == message.usage.input_tokens

    emu.reply(EmulatorError(400, "invalid_request_error", "no"))
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(**HI)
    assert len(plugin.seen) == 1  # not called for an error response


class Tally:
    @tokensaver.hookimpl
    def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> None:
        ctx.record(chars=len(str(body["messages"])))

    @tokensaver.hookimpl
    def tokensaver_report_section(self, plugin: str, calls: list[dict[str, Any]]) -> dict[str, Any]:
        chars = [c["plugins"][plugin]["chars"] for c in calls if plugin in (c.get("plugins") or {})]
        return {
            "title": f"{plugin} tally",
            "summary": f"{sum(chars)} chars in {len(chars)} calls",
            "rows": [{"chars": n} for n in chars],
        }


def test_hook_tokensaver_report_section(emu: Emulator, tmp_path: Path) -> None:
    client = one_plugin_client(emu, Tally(), name="tally", runs_dir=tmp_path)
    client.messages.create(**HI)
    client.messages.create(**{**HI, "messages": [{"role": "user", "content": "hello again"}]})
    name = client.tokensaver.run.name
    # rendered later from the persisted run, as `tokensaver report` does in another process
    report = load_run(name, tmp_path).report(one_plugin_manager(Tally(), "tally"))
    (section,) = [s for s in report.to_dict()["sections"] if s["plugin"] == "tally"]
    expected = len(str(HI["messages"])) + len(str([{"role": "user", "content": "hello again"}]))
    assert section["title"] == "tally tally" and section["summary"] == f"{expected} chars in 2 calls"
    assert [r["chars"] for r in section["rows"]] == [
        len(str(HI["messages"])),
        expected - len(str(HI["messages"])),
    ]
    assert "tally tally" in report.to_markdown() and f"{expected} chars" in report.to_html()


def test_wrap_one_enables_only_that_plugin(emu: Emulator) -> None:
    """The one-plugin helper: a plugin manager with nothing but the plugin, no installed plugin running."""
    base = anthropic.Anthropic(base_url=emu.url, api_key="test-key", max_retries=0)
    client = wrap_one(base, Shorten(), name="shorten")
    assert client.tokensaver.pm.list_name_plugin() == [
        ("shorten", client.tokensaver.pm.get_plugin("shorten"))
    ]
    assert client.tokensaver.config.plugins == ["shorten"] and client.tokensaver.run is None
    client.messages.create(**HI)
    assert [s["plugin"] for s in client.tokensaver.records[0]["stages"]] == ["shorten"]
