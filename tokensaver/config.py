"""Configuration: sources, merging and validation.

Sources, later wins: built-in defaults, ``[tool.tokensaver]`` in ``./pyproject.toml``,
``./tokensaver.toml``, the file named by ``$TOKENSAVER_CONFIG``, environment variables
(``TOKENSAVER_PLUGINS``, ``TOKENSAVER_STRICT``, ``TOKENSAVER_RUNS_DIR``), then
``wrap(config=dict or path)``. Each plugin has its own table named after it. Unknown keys, unknown
plugins and wrong types are errors naming the key, the file and the accepted values.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy

from .errors import ConfigError
from .plugins import check_enabled, configure, get_plugin_manager, installed
from .state import check_url as check_state_url

DEFAULT_PLUGINS = ["summarize", "prune", "defer_tools", "cache_align"]
DEFAULT_RUNS_DIR = ".tokensaver/runs"
# a plugin hook that takes longer is abandoned (fail open): long enough for real work at 200k
# tokens on a loaded machine, short enough that a hung plugin never stalls its caller
DEFAULT_PLUGIN_TIMEOUT = 2.0
MAX_PLUGIN_TIMEOUT = 3600.0

# top-level keys: name -> (accepted type(s), description used in error messages)
CORE_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "plugins": ((list,), "a list of plugin names, in pipeline order"),
    "strict": ((bool,), "true or false"),
    "runs_dir": ((str,), "a directory path"),
    "record": ((bool,), "true or false (persist runs as JSONL)"),
    "token_count": ((str,), "'estimate' or 'exact'"),
    "plugin_timeout": ((int, float), "seconds a plugin hook may take, more than 0 and at most 3600"),
    "plugin_timeouts": ((dict,), "a table of plugin name -> seconds, overriding plugin_timeout"),
    "state": ((str,), "'embedded' (the default) or a redis:// URL shared by every replica"),
    "prices": (
        (dict,),
        "a table of model -> {input, output, cache_write_5m, cache_write_1h, cache_read, ...}",
    ),
}
TOKEN_COUNT_MODES = ("estimate", "exact")
PRICE_KEYS = {
    "input",
    "output",
    "cache_write_5m",
    "cache_write_1h",
    "cache_read",
    "min_cache",
    "context_window",
    "family",
}


@dataclass
class Config:
    """The merged, validated configuration of one wrap() / proxy / replay."""

    plugins: list[str] = field(default_factory=lambda: list(DEFAULT_PLUGINS))
    strict: bool = False
    runs_dir: str = DEFAULT_RUNS_DIR
    record: bool = True
    token_count: str = "estimate"
    state: str = "embedded"  # where plugins keep state across calls (tokensaver.state)
    prices: dict[str, dict[str, Any]] = field(default_factory=dict)
    plugin_timeout: float = DEFAULT_PLUGIN_TIMEOUT
    plugin_timeouts: dict[str, float] = field(default_factory=dict)
    plugin_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    # where each key came from: "plugins" -> "pyproject.toml", "prune" -> "tokensaver.toml", ...
    origin: dict[str, str] = field(default_factory=dict)

    def timeout_for(self, plugin: str) -> float:
        """Seconds each hook call of ``plugin`` may take before it is abandoned."""
        return self.plugin_timeouts.get(plugin, self.plugin_timeout)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able view (for run headers and `tokensaver plugins`)."""
        return {
            "plugins": list(self.plugins),
            "strict": self.strict,
            "runs_dir": self.runs_dir,
            "record": self.record,
            "token_count": self.token_count,
            "state": "redis" if self.state.startswith(("redis", "unix")) else self.state,
            "plugin_timeout": self.plugin_timeout,
            "plugin_timeouts": dict(self.plugin_timeouts),
            "settings": {k: v for k, v in self.plugin_settings.items() if k in self.plugins},
            "sources": list(self.sources),
        }


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML: {exc}", source=str(path)) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc}", source=str(path)) from exc


def _file_sources(cwd: Path) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    pyproject = cwd / "pyproject.toml"
    if pyproject.is_file():
        table = _read_toml(pyproject).get("tool", {}).get("tokensaver")
        if table is not None:
            out.append((f"{pyproject} [tool.tokensaver]", table))
    own = cwd / "tokensaver.toml"
    if own.is_file():
        out.append((str(own), _unwrap(_read_toml(own))))
    env_file = os.environ.get("TOKENSAVER_CONFIG")
    if env_file:
        path = Path(env_file)
        if not path.is_file():
            raise ConfigError(
                f"TOKENSAVER_CONFIG names a file that does not exist: {path}", source="environment"
            )
        out.append((str(path), _unwrap(_read_toml(path))))
    return out


def _unwrap(table: dict[str, Any]) -> dict[str, Any]:
    # tokensaver.toml may be written flat or with a [tool.tokensaver] / [tokensaver] table
    if "tool" in table and isinstance(table["tool"], dict) and "tokensaver" in table["tool"]:
        inner: dict[str, Any] = table["tool"]["tokensaver"]
        return inner
    if set(table) == {"tokensaver"} and isinstance(table["tokensaver"], dict):
        return table["tokensaver"]
    return table


def _env_source() -> tuple[str, dict[str, Any]] | None:
    table: dict[str, Any] = {}
    if "TOKENSAVER_PLUGINS" in os.environ:
        raw = os.environ["TOKENSAVER_PLUGINS"].strip()
        table["plugins"] = [p.strip() for p in raw.split(",") if p.strip()]
    if "TOKENSAVER_STRICT" in os.environ:
        value = os.environ["TOKENSAVER_STRICT"].strip().lower()
        if value not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ConfigError(
                f"TOKENSAVER_STRICT={value!r} is not a boolean; use 1/0/true/false", source="environment"
            )
        table["strict"] = value in ("1", "true", "yes", "on")
    if "TOKENSAVER_RUNS_DIR" in os.environ:
        table["runs_dir"] = os.environ["TOKENSAVER_RUNS_DIR"]
    return ("environment (TOKENSAVER_*)", table) if table else None


def load_config(
    config: dict[str, Any] | str | os.PathLike[str] | None = None,
    *,
    pm: pluggy.PluginManager | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> Config:
    """Merge every source, validate core keys, enabled plugin names and each plugin's table."""
    base = Path(cwd) if cwd else Path.cwd()
    layers = _file_sources(base)
    env = _env_source()
    if env:
        layers.append(env)
    if isinstance(config, dict):
        layers.append(("wrap(config=...)", config))
    elif config is not None:
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"config file does not exist: {path}", source="wrap(config=...)")
        layers.append((str(path), _unwrap(_read_toml(path))))

    if pm is None:
        pm = get_plugin_manager()
    known_plugins = set(installed(pm))
    cfg = Config()
    raw_plugin_tables: dict[str, dict[str, Any]] = {}
    for source, table in layers:
        if not isinstance(table, dict):
            raise ConfigError("config must be a table/dict", source=source)
        cfg.sources.append(source)
        for key, raw_value in table.items():
            value: Any = raw_value
            if key in CORE_KEYS:
                types, accepted = CORE_KEYS[key]
                if not isinstance(raw_value, types):
                    raise ConfigError(
                        f"wrong type for {key!r}: got {type(value).__name__}, expected {accepted}",
                        key=key,
                        source=source,
                    )
                if key == "plugins":
                    if not all(isinstance(p, str) for p in value):
                        raise ConfigError(
                            "'plugins' must list plugin names (strings)", key=key, source=source
                        )
                    if len(set(value)) != len(value):
                        raise ConfigError("a plugin is listed twice in 'plugins'", key=key, source=source)
                if key == "state" and check_state_url(value):
                    raise ConfigError(check_state_url(value) or "", key=key, source=source)
                if key == "token_count" and value not in TOKEN_COUNT_MODES:
                    raise ConfigError(
                        f"token_count must be one of {', '.join(TOKEN_COUNT_MODES)}, not {value!r}",
                        key=key,
                        source=source,
                    )
                if key == "plugin_timeout":
                    value = _check_timeout(key, value, source)
                if key == "plugin_timeouts":
                    for name, seconds in value.items():
                        _known(name, known_plugins, "plugin_timeouts names {!r}, which is not an installed plugin", f"plugin_timeouts.{name}", source)  # fmt: skip
                        cfg.plugin_timeouts[name] = _check_timeout(f"plugin_timeouts.{name}", seconds, source)
                elif key == "prices":
                    _check_prices(value, source)
                    for model, fields in value.items():
                        cfg.prices.setdefault(model, {}).update(fields)
                else:
                    setattr(cfg, key, list(value) if key == "plugins" else value)
                cfg.origin[key] = source
            elif key in known_plugins:
                if not isinstance(value, dict):
                    raise ConfigError(
                        f"settings for plugin {key!r} must be a table, got {type(value).__name__}",
                        key=key,
                        source=source,
                    )
                raw_plugin_tables.setdefault(key, {}).update(value)
                cfg.origin[key] = source
            else:
                names = sorted(CORE_KEYS) + sorted(known_plugins)
                raise ConfigError(
                    f"unknown config key {key!r}; accepted keys: {', '.join(names)}",
                    key=key,
                    source=source,
                )
    check_enabled(pm, cfg.plugins, cfg.origin.get("plugins", "defaults"))
    for name in cfg.plugins:
        table = raw_plugin_tables.get(name, {})
        cfg.plugin_settings[name] = configure(pm, name, table, cfg.origin.get(name, "defaults"))
    return cfg


def _known(name: str, known: Collection[str], message: str, key: str, source: str) -> None:
    """Refuse ``name`` unless it is one of ``known``: ``message`` with ``{!r}`` for the name, at ``key``."""
    if name not in known:
        raise ConfigError(message.format(name), key=key, source=source)


def _check_timeout(key: str, value: Any, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_PLUGIN_TIMEOUT:
        raise ConfigError(
            f"{key} must be a number of seconds, more than 0 and at most {MAX_PLUGIN_TIMEOUT:g}, not {value!r}",
            key=key,
            source=source,
        )
    return float(value)


def _check_prices(value: dict[str, Any], source: str) -> None:
    for model, fields in value.items():
        if not isinstance(fields, dict):
            raise ConfigError(f"prices.{model} must be a table", key=f"prices.{model}", source=source)
        for k, v in fields.items():
            _known(k, PRICE_KEYS, f"unknown price field {{!r}}; accepted: {', '.join(sorted(PRICE_KEYS))}", f"prices.{model}.{k}", source)  # fmt: skip
            if k != "family" and not isinstance(v, (int, float)):
                raise ConfigError(
                    f"price must be a number, got {v!r}", key=f"prices.{model}.{k}", source=source
                )


def default_runs_dir() -> Path:
    """The configured runs directory (files and env only; cheap, never fails on a bad plugin table)."""
    env = os.environ.get("TOKENSAVER_RUNS_DIR")
    if env:
        return Path(env)
    try:
        for _source, table in reversed(_file_sources(Path.cwd())):
            if isinstance(table.get("runs_dir"), str):
                return Path(table["runs_dir"])
    except ConfigError:
        pass
    return Path(DEFAULT_RUNS_DIR)
