"""Pipeline ordering, fail-open and strict mode, config sources and their errors, core isolation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import anthropic
import pytest

import tokensaver
from tokensaver.emulator import Emulator
from tokensaver.plugins import get_plugin_manager

MODEL = "claude-sonnet-4-6"
MSGS = [{"role": "user", "content": "hi"}]


def appender(tag: str, **marks: Any) -> Any:
    class P:
        @tokensaver.hookimpl(**marks)
        def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> dict[str, Any]:
            return {**body, "system": (body.get("system") or "") + tag}

    return P()


class Boom:
    @tokensaver.hookimpl
    def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> dict[str, Any]:
        body["messages"].append({"role": "user", "content": "garbage"})  # mutates its copy, then fails
        raise RuntimeError("kaput")


def _client(emu: Emulator, tmp_path: Path, plugins: dict[str, Any], order: list[str], **cfg: Any) -> Any:
    pm = get_plugin_manager(plugins, load_entrypoints=False)
    base = anthropic.Anthropic(base_url=emu.url, api_key="k", max_retries=0)
    return tokensaver.wrap(
        base, config={"plugins": order, "runs_dir": str(tmp_path), **cfg}, plugin_manager=pm
    )


def test_config_order_is_pipeline_order_and_trylast_goes_last(emu: Emulator, tmp_path: Path) -> None:
    plugins = {
        "a": appender("A"),
        "b": appender("B"),
        "z": appender("Z", trylast=True),
        "f": appender("F", tryfirst=True),
    }
    client = _client(emu, tmp_path, plugins, ["z", "b", "a", "f"])
    client.messages.create(model=MODEL, max_tokens=10, messages=MSGS)
    assert emu.last.body["system"] == "FBAZ"
    assert [s["plugin"] for s in client.tokensaver.records[0]["stages"]] == ["f", "b", "a", "z"]


def test_failing_plugin_fails_open_and_is_reported(emu: Emulator, tmp_path: Path) -> None:
    client = _client(emu, tmp_path, {"boom": Boom(), "a": appender("A")}, ["boom", "a"])
    msg = client.messages.create(model=MODEL, max_tokens=10, messages=MSGS)
    assert msg.content
    assert emu.last.body["messages"] == MSGS  # the failing stage's partial edits were discarded
    assert emu.last.body["system"] == "A"
    rec = client.tokensaver.records[0]
    # the record names the plugin, the exception class and where it was raised, never the
    # exception's message: a plugin's message may quote the prompt
    assert rec["errors"][0]["plugin"] == "boom" and rec["errors"][0]["kind"] == "raised"
    assert rec["errors"][0]["error"].startswith("RuntimeError at test_pipeline_config.py:")
    assert rec["stages"][0]["error"] == rec["errors"][0]["error"]
    assert "kaput" not in client.tokensaver.run.path.read_text()
    report = client.tokensaver.run.report(get_plugin_manager({"boom": Boom()}, load_entrypoints=False))
    assert "boom" in report.to_markdown() and "RuntimeError" in report.to_markdown()


def test_strict_mode_raises_transform_error_naming_plugin(emu: Emulator, tmp_path: Path) -> None:
    client = _client(emu, tmp_path, {"boom": Boom()}, ["boom"], strict=True)
    with pytest.raises(tokensaver.TransformError, match="boom"):
        client.messages.create(model=MODEL, max_tokens=10, messages=MSGS)
    assert emu.requests == []


def test_unknown_plugin_lists_installed(tmp_path: Path) -> None:
    pm = get_plugin_manager({"a": appender("A")}, load_entrypoints=False)
    with pytest.raises(tokensaver.UnknownPluginError, match=r"unknown plugin 'nope'.*installed plugins: a"):
        tokensaver.wrap(anthropic.Anthropic(api_key="k"), config={"plugins": ["nope"]}, plugin_manager=pm)


def test_builtin_plugins_load_through_entry_points() -> None:
    pm = get_plugin_manager()
    names = {n for n, _ in pm.list_name_plugin()}
    assert {"cache_align", "prune", "memoize", "summarize"} <= names
    assert pm.get_plugin("prune").__name__ == "tokensaver_plugins.prune"


def test_config_sources_later_wins_and_errors_name_key_and_file(tmp_path: Path, monkeypatch: Any) -> None:
    pm = get_plugin_manager({"a": appender("A"), "b": appender("B")}, load_entrypoints=False)
    (tmp_path / "pyproject.toml").write_text('[tool.tokensaver]\nplugins = ["a"]\nstrict = true\n')
    cfg = tokensaver.load_config(pm=pm, cwd=tmp_path)
    assert cfg.plugins == ["a"] and cfg.strict is True
    (tmp_path / "tokensaver.toml").write_text('plugins = ["b"]\n')
    assert tokensaver.load_config(pm=pm, cwd=tmp_path).plugins == ["b"]
    env_file = tmp_path / "env.toml"
    env_file.write_text('plugins = ["a", "b"]\n[a]\nx = 1\n')
    monkeypatch.setenv("TOKENSAVER_CONFIG", str(env_file))
    cfg = tokensaver.load_config(pm=pm, cwd=tmp_path)
    assert cfg.plugins == ["a", "b"] and cfg.plugin_settings["a"] == {"x": 1}
    cfg = tokensaver.load_config({"strict": False}, pm=pm, cwd=tmp_path)
    assert cfg.strict is False and cfg.plugins == ["a", "b"]
    monkeypatch.setenv("TOKENSAVER_PLUGINS", "b")
    assert tokensaver.load_config(pm=pm, cwd=tmp_path).plugins == ["b"]
    # errors name the key, the file and the accepted values
    (tmp_path / "tokensaver.toml").write_text('plugins = ["b"]\nstrickt = true\n')
    with pytest.raises(tokensaver.ConfigError) as info:
        tokensaver.load_config(pm=pm, cwd=tmp_path)
    msg = str(info.value)
    assert "strickt" in msg and "tokensaver.toml" in msg and "strict" in msg
    (tmp_path / "tokensaver.toml").write_text('strict = "yes"\n')
    with pytest.raises(tokensaver.ConfigError, match=r"wrong type for 'strict'.*true or false"):
        tokensaver.load_config(pm=pm, cwd=tmp_path)


def test_builtin_plugin_settings_are_validated(tmp_path: Path) -> None:
    with pytest.raises(tokensaver.ConfigError) as info:
        tokensaver.load_config({"plugins": ["prune"], "prune": {"no_such_setting": 1}}, cwd=tmp_path)
    assert "no_such_setting" in str(info.value)
    # from the declared schema: the key, the file, the accepted values (and a near key)
    (tmp_path / "tokensaver.toml").write_text('[prune]\nclear_paybak = 3\n[cache_align]\nttl = "2h"\n')
    with pytest.raises(tokensaver.ConfigError) as info:
        tokensaver.load_config(cwd=tmp_path)
    msg = str(info.value)
    assert (
        info.value.key == "clear_paybak"
        and "tokensaver.toml" in msg
        and "did you mean 'clear_payback'" in msg
    )
    (tmp_path / "tokensaver.toml").write_text('[cache_align]\nttl = "2h"\n')
    with pytest.raises(
        tokensaver.ConfigError, match=r"cache_align.ttl must be 'auto', '5m' or '1h'; got '2h'"
    ):
        tokensaver.load_config(cwd=tmp_path)
    cfg = tokensaver.load_config({"prune": {"clear_payback": 3}}, cwd=tmp_path / "none")
    assert cfg.plugin_settings["prune"]["clear_payback"] == 3.0
    assert isinstance(cfg.plugin_settings["prune"]["clear_payback"], float)


def test_importing_core_does_not_import_plugins() -> None:
    code = (
        "import sys, tokensaver, tokensaver.emulator, tokensaver.report, tokensaver.cli; "
        "bad = [m for m in sys.modules if m.startswith(('tokensaver_plugins', 'plugins'))]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_core_sources_never_import_plugins() -> None:
    root = Path(tokensaver.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "import tokensaver_plugins" not in text and "from tokensaver_plugins" not in text, path


class Configurable:
    """A plugin validating its own table: fills a default, rejects an unknown key naming the file."""

    @tokensaver.hookimpl
    def tokensaver_configure(self, settings: dict[str, Any], source: str) -> dict[str, Any]:
        unknown = set(settings) - {"level"}
        if unknown:
            raise tokensaver.ConfigError(
                f"unknown key {sorted(unknown)[0]!r}; accepted: level", key="conf", source=source
            )
        return {"level": 3, **settings}

    @tokensaver.hookimpl
    def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> dict[str, Any]:
        return {**body, "system": f"level {ctx.settings['level']}"}


def test_plugin_configure_normalizes_and_rejects(emu: Emulator, tmp_path: Path) -> None:
    client = _client(emu, tmp_path, {"conf": Configurable()}, ["conf"])
    client.messages.create(model=MODEL, max_tokens=10, messages=MSGS)
    assert emu.last.body["system"] == "level 3"
    client = _client(emu, tmp_path, {"conf": Configurable()}, ["conf"], conf={"level": 5})
    client.messages.create(model=MODEL, max_tokens=10, messages=MSGS)
    assert emu.last.body["system"] == "level 5"
    cfg_file = tmp_path / "ts.toml"
    cfg_file.write_text('plugins = ["conf"]\n[conf]\nlevle = 1\n')
    pm = get_plugin_manager({"conf": Configurable()}, load_entrypoints=False)
    with pytest.raises(tokensaver.ConfigError, match=r"levle.*ts\.toml"):
        tokensaver.wrap(anthropic.Anthropic(api_key="k"), config=str(cfg_file), plugin_manager=pm)


def test_plugins_command_lists_installed_enabled_and_settings(
    capsys: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    from tokensaver.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tokensaver.toml").write_text('plugins = ["prune", "cache_align"]\n')
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "prune -> cache_align" in out
    assert "memoize" in out and "[1]" in out and "[ ]" in out


class BrokenLookupAndObserver:
    @tokensaver.hookimpl
    def tokensaver_lookup_response(self, body: dict[str, Any], ctx: Any) -> dict[str, Any] | None:
        raise KeyError("index gone")

    @tokensaver.hookimpl
    def tokensaver_observe_response(self, body: dict[str, Any], response: dict[str, Any], ctx: Any) -> None:
        raise OSError("disk full")


def test_failing_lookup_and_observer_fail_open(emu: Emulator, tmp_path: Path) -> None:
    client = _client(emu, tmp_path, {"broken": BrokenLookupAndObserver()}, ["broken"])
    emu.reply("still answered")
    msg = client.messages.create(model=MODEL, max_tokens=10, messages=MSGS)
    assert msg.content[0].text == "still answered" and len(emu.requests) == 1
    hooks = [e["hook"] for e in client.tokensaver.records[0]["errors"]]
    assert hooks == ["tokensaver_lookup_response", "tokensaver_observe_response"]
    strict = _client(emu, tmp_path, {"broken": BrokenLookupAndObserver()}, ["broken"], strict=True)
    with pytest.raises(tokensaver.TransformError, match="broken.*tokensaver_lookup_response"):
        strict.messages.create(model=MODEL, max_tokens=10, messages=MSGS)


def test_shared_state_is_made_once_even_with_calls_in_parallel() -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from tokensaver.context import make_context

    made: list[int] = []
    barrier = threading.Barrier(8)
    states: dict[str, dict] = {}

    def table() -> dict:
        made.append(1)
        return {}

    def get(_: int) -> int:
        ctx = make_context({"model": "claude-sonnet-4-6", "messages": []}, plugin="p", states=states)
        barrier.wait()
        return id(ctx.shared_state(table=table, lock=threading.Lock)["table"])

    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(get, range(8)))
    assert len(ids) == 1 and made == [1]
    assert set(states["p"]) == {"table", "lock"}
