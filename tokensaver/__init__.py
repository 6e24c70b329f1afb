"""tokensaver: cut what Claude calls cost, and prove it in dollars.

``tokensaver.wrap(client)`` returns a client of the same class whose Messages calls pass through a
pluggy pipeline of transforms (prompt-cache alignment, pruning, memoization, tool-result
summarization, third-party plugins), recording per-stage savings into a run you can report on.

Names are imported lazily (PEP 562): ``import tokensaver`` stays cheap for plugins and the CLI,
and the anthropic SDK is only imported when ``wrap`` is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, ModelCallError, TokensaverError, TransformError, UnknownPluginError
from .hookspecs import hookimpl, hookspec

if TYPE_CHECKING:
    from .config import Config, load_config
    from .middleware import wrap
    from .pipeline import Pipeline
    from .plugins import get_plugin_manager
    from .run import Run, list_runs, load_run

__version__ = "0.1.0"

_LAZY = {
    "Config": "config",
    "load_config": "config",
    "wrap": "middleware",
    "middleware": "middleware",
    "Pipeline": "pipeline",
    "get_plugin_manager": "plugins",
    "Run": "run",
    "list_runs": "run",
    "load_run": "run",
}

__all__ = [
    "Config",
    "ConfigError",
    "ModelCallError",
    "Pipeline",
    "Run",
    "TokensaverError",
    "TransformError",
    "UnknownPluginError",
    "get_plugin_manager",
    "hookimpl",
    "hookspec",
    "list_runs",
    "load_config",
    "load_run",
    "wrap",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tokensaver' has no attribute {name!r}")
    mod = importlib.import_module(f".{module}", __name__)
    value = mod if name == module else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
