"""The configurations ``tokensaver bench`` compares, and its cache scopes.

``none`` (the bodies as recorded), ``auto`` (the API's automatic caching alone), one per installed
plugin alone, ``defaults``, ``all``, ``headroom`` and TOML config files: :func:`build_specs` turns
their names into :class:`ConfigSpec` (picklable: sent to worker processes).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import _unwrap
from ..errors import TokensaverError
from ..plugins import get_plugin_manager, installed

BUILTIN_PLUGINS = ("summarize", "prune", "memoize", "cache_align")
DEFAULT_CONFIGS = (
    "none",
    "auto",
    "summarize",
    "prune",
    "cache_align",
    "memoize",
    "defaults",
    "all",
    "headroom",
)
SCOPES = ("source", "conversation")
DEFAULT_GAP_SECONDS = 30.0


@dataclass
class ConfigSpec:
    """One configuration of the bench (picklable: sent to worker processes)."""

    name: str
    label: str
    kind: str  # "baseline" | "tokensaver" | "headroom"
    auto_cache: bool = False
    config: dict[str, Any] | None = None
    memo: bool = False
    note: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": self.label,
            "kind": self.kind,
            "auto_cache": self.auto_cache,
            "config": self.config,
            "note": self.note,
        }


def installed_plugins() -> list[str]:
    return list(installed(get_plugin_manager()))


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            table = _unwrap(tomllib.load(fh))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TokensaverError(f"cannot read config file {path}: {exc}") from exc
    return dict(table)


# Core settings of every tokensaver configuration the bench replays: no ledger, and a plugin hook
# timeout far above any hook's time. The 2 s default is fault containment for live calls; on a loaded
# machine it cut prune off now and then (fail open: that call unpruned), so the same replay billed
# differently from one run to the next. A config file's own plugin_timeout is kept.
BENCH_CORE: dict[str, Any] = {"record": False, "plugin_timeout": 600.0}


def build_specs(names: list[str], plugins: list[str]) -> list[ConfigSpec]:
    """ConfigSpecs for configuration names (see module doc) and TOML config file paths."""
    specs: list[ConfigSpec] = []
    for name in names:
        if name == "none":
            specs.append(ConfigSpec("none", "no tokensaver, no caching", "baseline"))
        elif name == "auto":
            specs.append(ConfigSpec("auto", "API automatic caching alone", "baseline", auto_cache=True))
        elif name in BUILTIN_PLUGINS:
            if name not in plugins:
                continue
            specs.append(
                ConfigSpec(
                    name,
                    f"{name} alone",
                    "tokensaver",
                    config={"plugins": [name], **BENCH_CORE},
                    memo=name == "memoize",
                    note=None if name == "cache_align" else "no cache_control at all (plugin alone)",
                )
            )
        elif name == "defaults":
            specs.append(ConfigSpec("defaults", "tokensaver defaults", "tokensaver", config=dict(BENCH_CORE)))
        elif name == "all":
            enabled = [p for p in BUILTIN_PLUGINS if p in plugins]
            specs.append(
                ConfigSpec(
                    "all",
                    "all plugins (" + ", ".join(enabled) + ")",
                    "tokensaver",
                    config={"plugins": enabled, **BENCH_CORE},
                    memo="memoize" in enabled,
                )
            )
        elif name == "headroom":
            specs.append(ConfigSpec("headroom", "headroom-ai compress + automatic caching", "headroom"))
        elif name.endswith(".toml") or Path(name).is_file():
            path = Path(name)
            if not path.is_file():
                raise TokensaverError(f"config file does not exist: {path}")
            table = _read_config_file(path)
            table = {**BENCH_CORE, **table, "record": False}
            wanted = table.get("plugins")
            memo = "memoize" in (wanted if isinstance(wanted, list) else [])
            specs.append(ConfigSpec(path.stem, f"config {path.name}", "tokensaver", config=table, memo=memo))
        else:
            raise TokensaverError(
                f"unknown configuration {name!r}; accepted: {', '.join(DEFAULT_CONFIGS)} or a TOML file"
            )
    seen: set[str] = set()
    for s in specs:
        if s.name in seen:
            raise TokensaverError(f"configuration {s.name!r} given twice")
        seen.add(s.name)
    return specs


def scope_note(scope: str, gap_seconds: float = DEFAULT_GAP_SECONDS) -> str:
    """One sentence on what the cache scope means (said in every rendering)."""
    if scope == "source":
        return (
            "Cache scope 'source': the conversations of each source are replayed back to back, per "
            "configuration, on one prompt cache that is not reset between them (and one memoize store), on "
            "a continuous clock (recorded times kept, shifted forward only where they would go back; "
            f"conversations without times start {gap_seconds:g} s after the previous one's last call), as a "
            "deployment sending them one after another is billed: a breakpoint at the end of tools + system "
            "lets a new conversation read that prefix."
        )
    return (
        "Cache scope 'conversation': each conversation is replayed alone from a cold prompt cache (and an "
        "empty memoize store), so nothing is shared between conversations."
    )
