"""The plugin boundary, checked when a client is wrapped, from pluggy's own data.

Wrapper impls, misspelled hooks, impls pluggy rejects and plugins that fail to import are a
ConfigError naming the plugin (and its entry point) in ``wrap()``, and only when the plugin is
enabled; a report section hook is called for its own plugin only; declared settings (a
:class:`tokensaver.settings.Schema`) are validated by the core, shown by ``tokensaver plugins`` and
documented in the README from the same declaration.
"""

from __future__ import annotations

import json
import re
import textwrap
import uuid
from dataclasses import fields
from pathlib import Path
from typing import Any

import anthropic
import pytest
from tokensaver_plugins import cache_align

import tokensaver
from tokensaver.emulator import Emulator
from tokensaver.plugins import get_plugin_manager
from tokensaver.testing import TEST_API_KEY, one_plugin_manager, wrap_one

MODEL = "claude-sonnet-4-6"
MSGS = [{"role": "user", "content": "hi"}]
LONG = [{"role": "user", "content": "x " * 3000}]
ROOT = Path(__file__).resolve().parent.parent


def _base(emu: Emulator) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=emu.url, api_key=TEST_API_KEY, max_retries=0, timeout=30)


class Tag:
    @tokensaver.hookimpl
    def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> dict[str, Any]:
        return {**body, "system": "tagged"}


class NewWrapper:
    @tokensaver.hookimpl(wrapper=True)
    def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> Any:
        result = yield
        return result


class OldWrapper:
    @tokensaver.hookimpl(hookwrapper=True)
    def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> Any:
        yield


@pytest.mark.parametrize("wrapper", [NewWrapper, OldWrapper], ids=["wrapper", "hookwrapper"])
def test_wrapper_impls_are_rejected_in_wrap_naming_the_plugin(emu: Emulator, wrapper: type) -> None:
    pm = get_plugin_manager({"timer": wrapper(), "tag": Tag()}, load_entrypoints=False)
    with pytest.raises(
        tokensaver.ConfigError, match=r"plugin 'timer'.*tokensaver_transform_request.*wrapper"
    ):
        tokensaver.wrap(_base(emu), config={"plugins": ["tag", "timer"], "record": False}, plugin_manager=pm)
    assert emu.requests == []
    # installed but not enabled: wrap() works and the call goes through the enabled plugin
    pm = get_plugin_manager({"timer": wrapper(), "tag": Tag()}, load_entrypoints=False)
    client = tokensaver.wrap(_base(emu), config={"plugins": ["tag"], "record": False}, plugin_manager=pm)
    assert client.messages.create(model=MODEL, max_tokens=10, messages=MSGS).content
    assert emu.last.body["system"] == "tagged"
    assert client.tokensaver.records[0]["errors"] == []


# -- plugins installed through entry points --------------------------------------------------


def _install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plugins: dict[str, str]) -> dict[str, str]:
    """A distribution on sys.path whose ``tokensaver`` entry points are ``plugins`` (name -> module
    source); returns name -> its module's (unique) import name."""
    site = tmp_path / "site"
    dist = site / "tokensaver_fake-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tokensaver-fake\nVersion: 0.1\n")
    modules: dict[str, str] = {}
    for name, source in plugins.items():
        module = f"ts_fake_{name}_{uuid.uuid4().hex[:8]}"
        (site / f"{module}.py").write_text(textwrap.dedent(source))
        modules[name] = module
    lines = "".join(f"{name} = {module}\n" for name, module in modules.items())
    (dist / "entry_points.txt").write_text(f"[tokensaver]\n{lines}")
    monkeypatch.syspath_prepend(str(site))
    return modules


TYPO = """
import tokensaver

@tokensaver.hookimpl
def tokensaver_transfrom_request(body, ctx):
    return None
"""
BAD_ARGUMENT = """
import tokensaver

@tokensaver.hookimpl
def tokensaver_transform_request(body, context):
    return None
"""
BROKEN = """
raise ImportError("needs libfoo")
"""


@pytest.mark.parametrize(
    ("source", "why"),
    [
        (
            TYPO,
            r"tokensaver_transfrom_request.*not a tokensaver hook.*did you mean 'tokensaver_transform_request'",
        ),
        (BAD_ARGUMENT, r"context"),
        (BROKEN, r"failed to import.*needs libfoo"),
    ],
    ids=["misspelled-hook", "argument-not-in-spec", "import-fails"],
)
def test_a_broken_installed_plugin_fails_wrap_only_when_enabled(
    emu: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, why: str
) -> None:
    modules = _install(tmp_path, monkeypatch, {"shaky": source})
    monkeypatch.chdir(tmp_path)
    # installed, not enabled: every other plugin still works
    client = tokensaver.wrap(_base(emu), config={"plugins": ["cache_align"], "record": False})
    assert client.messages.create(model=MODEL, max_tokens=10, messages=LONG).content
    assert "cache_control" in json.dumps(emu.last.body)
    # enabled: a ConfigError naming the plugin and its entry point, before any call
    sent = len(emu.requests)
    with pytest.raises(tokensaver.ConfigError) as info:
        tokensaver.wrap(_base(emu), config={"plugins": ["shaky", "cache_align"], "record": False})
    msg = str(info.value)
    assert f"entry point shaky = {modules['shaky']}" in msg and "tokensaver-fake" in msg, msg
    assert re.search(why, msg, re.S), msg
    assert info.value.key == "plugins" and len(emu.requests) == sent


def test_misspelled_hook_of_a_plugin_given_in_code_names_it(emu: Emulator) -> None:
    class Typo:
        @tokensaver.hookimpl
        def tokensaver_observe_respons(self, body: Any, response: Any, ctx: Any) -> None:
            pass

    pm = get_plugin_manager({"typo": Typo(), "tag": Tag()}, load_entrypoints=False)
    with pytest.raises(tokensaver.ConfigError, match=r"'typo'.*tokensaver_observe_respons.*observe_response"):
        tokensaver.wrap(_base(emu), config={"plugins": ["typo"], "record": False}, plugin_manager=pm)
    client = tokensaver.wrap(_base(emu), config={"plugins": ["tag"], "record": False}, plugin_manager=pm)
    assert client.messages.create(model=MODEL, max_tokens=10, messages=MSGS).content


# -- report sections -------------------------------------------------------------------------


class Counting:
    """A section hook that does not check which plugin it is asked about."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    @tokensaver.hookimpl
    def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> None:
        ctx.record(seen=1)

    @tokensaver.hookimpl
    def tokensaver_report_section(self, plugin: str, calls: list[dict[str, Any]]) -> dict[str, Any]:
        self.asked.append(plugin)
        return {"title": f"section of {plugin}", "summary": f"{len(calls)} calls"}


def test_report_section_is_called_for_its_own_plugin_only(emu: Emulator, tmp_path: Path) -> None:
    one, two = Counting(), Counting()
    pm = get_plugin_manager({"one": one, "two": two}, load_entrypoints=False)
    cfg = {"plugins": ["one", "two"], "runs_dir": str(tmp_path)}
    client = tokensaver.wrap(_base(emu), config=cfg, plugin_manager=pm)
    client.messages.create(model=MODEL, max_tokens=10, messages=MSGS)
    sections = client.tokensaver.run.report(pm).to_dict()["sections"]
    assert {s["plugin"]: s["title"] for s in sections} == {"one": "section of one", "two": "section of two"}
    assert one.asked == ["one"] and two.asked == ["two"]
    # a built-in is a plugin like any other: under another name, its section is still its own
    align = wrap_one(_base(emu), cache_align, name="align", runs_dir=tmp_path)
    for _ in range(2):
        align.messages.create(model=MODEL, max_tokens=10, messages=LONG)
    sections = align.tokensaver.run.report(one_plugin_manager(cache_align, "align")).to_dict()["sections"]
    assert [s["plugin"] for s in sections] == ["align"]
    assert "cache reads" in sections[0]["summary"]


# -- declared settings -----------------------------------------------------------------------


def _schema_plugin() -> Any:
    from tokensaver.settings import Schema, boolean, choice, integer, number, strings

    class Declared:
        SETTINGS = Schema(
            "declared",
            {
                "level": integer(3, "how hard to try", min=1, max=9),
                "ratio": number(0.5, "share kept", min=0.0, max=1.0),
                "loud": boolean(False, "say so in the system prompt"),
                "mode": choice("fast", ("fast", "slow"), "which way"),
                "tools": strings([], "tool names left alone", item="tool names"),
            },
        )

        @tokensaver.hookimpl
        def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> dict[str, Any]:
            return {**body, "system": json.dumps(ctx.settings, sort_keys=True)}

    return Declared()


def test_declared_settings_are_validated_by_the_core(emu: Emulator, tmp_path: Path) -> None:
    client = wrap_one(_base(emu), _schema_plugin(), name="declared", settings={"level": 5, "ratio": 1})
    client.messages.create(model=MODEL, max_tokens=10, messages=MSGS)
    got = json.loads(emu.last.body["system"])
    assert got == {"level": 5, "ratio": 1.0, "loud": False, "mode": "fast", "tools": []}
    assert isinstance(got["ratio"], float)
    for table, key, accepted in (
        ({"level": 0}, "level", "an integer between 1 and 9; got 0"),
        ({"level": True}, "level", "an integer between 1 and 9; got True"),
        ({"ratio": 2}, "ratio", "a number between 0.0 and 1.0; got 2"),
        ({"loud": "yes"}, "loud", "true or false; got 'yes'"),
        ({"mode": "medium"}, "mode", "'fast' or 'slow'; got 'medium'"),
        ({"tools": "Read"}, "tools", "a list of tool names; got 'Read'"),
        ({"levle": 1}, "levle", "unknown key 'levle' (did you mean 'level'?)"),
    ):
        path = tmp_path / "ts.toml"
        path.write_text(f'plugins = ["declared"]\n[declared]\n{key} = {json.dumps(table[key])}\n')
        pm = one_plugin_manager(_schema_plugin(), "declared")
        with pytest.raises(tokensaver.ConfigError) as info:
            tokensaver.wrap(_base(emu), config=str(path), plugin_manager=pm)
        msg = str(info.value)
        assert info.value.key == key and str(path) in msg and accepted in msg, msg
        if key != "levle":
            assert msg.startswith(f"declared.{key} must be {accepted}"), msg


def test_builtins_declare_their_settings() -> None:
    from tokensaver.settings import Schema

    pm = get_plugin_manager()
    for name in ("prune", "cache_align", "memoize", "summarize"):
        plugin = pm.get_plugin(name)
        schema = plugin.SETTINGS
        assert isinstance(schema, Schema)
        assert all(s.doc for s in schema.settings.values()), name
        assert set(plugin.DEFAULTS) == set(schema.settings), name
    summarize = pm.get_plugin("summarize")
    assert {f.name for f in fields(summarize.Options)} <= set(summarize.SETTINGS.settings)


def test_readme_settings_example_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(# tokensaver_redact/__init__.py, continued\n.*?)```", readme, re.S)
    assert code, "README lacks the settings example"
    scope: dict[str, Any] = {}
    exec(code.group(1), scope)
    schema = scope["SETTINGS"]
    assert schema.validate({"max_lines": 5}, "t") == {"max_lines": 5, "words": ["DEBUG"], "loud": False}
    with pytest.raises(tokensaver.ConfigError, match=r"redact.max_lines must be a positive integer; got 0"):
        schema.validate({"max_lines": 0}, "pyproject.toml")


def test_plugins_command_shows_each_setting(capsys: Any, tmp_path: Path, monkeypatch: Any) -> None:
    from tokensaver.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tokensaver.toml").write_text('plugins = ["prune"]\n[prune]\nclear_payback = 3\n')
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("clear_payback"))
    assert "= 3.0" in line and "number 0.1..100" in line and "default 2.0" in line, line
    assert "re-write" in out  # the doc of clear_payback
    assert re.search(r"ttl = .*'auto' \| '5m' \| '1h'", out)  # cache_align: disabled, shown with defaults
    main(["plugins", "--json"])
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["plugins"]}
    schema = {s["key"]: s for s in rows["prune"]["schema"]}
    assert schema["clear_payback"]["default"] == 2.0 and schema["clear_payback"]["type"] == "number 0.1..100"


def test_readme_config_reference_is_generated_from_the_schemas() -> None:
    from tokensaver.plugins import settings_reference

    readme = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- settings:start -->\n(.*?)<!-- settings:end -->", readme, re.S)
    assert found, "README lacks the <!-- settings:start --> ... <!-- settings:end --> section"
    expected = settings_reference(get_plugin_manager(), builtin_only=True)
    assert found.group(1) == expected, (
        "README settings reference is stale: run `tokensaver plugins --markdown`"
    )
