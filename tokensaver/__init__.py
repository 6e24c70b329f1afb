"""tokensaver: cut what Claude calls cost, and prove it in dollars.

``tokensaver.wrap(client)`` returns a client of the same class whose Messages calls pass through a
pluggy pipeline of transforms (prompt-cache alignment, pruning, memoization, tool-result
summarization, third-party plugins), recording per-stage savings into a run you can report on.
"""

from __future__ import annotations

from .config import Config, load_config
from .errors import ConfigError, TokensaverError, TransformError, UnknownPluginError
from .hookspecs import hookimpl, hookspec
from .middleware import wrap
from .pipeline import Pipeline
from .plugins import get_plugin_manager
from .run import Run, list_runs, load_run

__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
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
