"""Errors tokensaver raises itself. Errors from the API are never wrapped: they pass through."""

from __future__ import annotations


class TokensaverError(Exception):
    """Base class for every error raised by tokensaver itself."""


class ConfigError(TokensaverError, ValueError):
    """Misconfiguration, raised by ``wrap()``: names the key, the file and what is accepted."""

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None) -> None:
        where = f" (key {key!r} in {source})" if key and source else (f" (in {source})" if source else "")
        super().__init__(f"{message}{where}")
        self.key = key
        self.source = source


class UnknownPluginError(ConfigError):
    """A plugin named in config is not installed; the message lists the installed ones."""


class TransformError(TokensaverError):
    """A plugin raised in strict mode; names the plugin and the hook."""

    def __init__(self, plugin: str, hook: str, cause: BaseException) -> None:
        super().__init__(f"plugin {plugin!r} failed in {hook}: {type(cause).__name__}: {cause}")
        self.plugin = plugin
        self.hook = hook
        self.__cause__ = cause


class ModelCallError(TokensaverError):
    """A plugin's own model call (``ctx.call_model()``) could not be made, or the API refused it.

    ``status`` is the API's HTTP status when it answered with an error (None otherwise).
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TraceFormatError(TokensaverError, ValueError):
    """A trace file is not in a format tokensaver can replay."""
