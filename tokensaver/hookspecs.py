"""The hooks a tokensaver plugin can implement, one per phase of a call.

A plugin is a module (or object) with functions marked ``@tokensaver.hookimpl`` and registered
through the ``tokensaver`` entry-point group; the entry-point name is the plugin's name in config.
For every call the core runs the phases in this order:

1. ``tokensaver_transform_request``: each enabled plugin in config order rewrites the body
   (``tryfirst``/``trylast`` move a stage to the front or back, e.g. cache breakpoints go last,
   after pruning has fixed the final prefix). The core measures tokens before and after each stage.
2. ``tokensaver_lookup_response``: a stored answer short-circuits the network call.
3. The network call (upstream API or emulator). Not a hook.
4. ``tokensaver_observe_response``: every enabled plugin sees the final response and its usage.
   When the response asks only for tools named ``tokensaver_*``, ``tokensaver_answer_tool_use``
   answers them and the exchange continues (back to 1) until the model answers the caller.

``tokensaver_configure`` runs once per ``wrap()``; ``tokensaver_report_section`` when a report is
rendered (possibly in another process, from the persisted run).

Plugins see and return plain Messages API JSON (dicts), never SDK objects. Treat the body and its
blocks as immutable: build new dicts/lists for what you change. A plugin that raises is skipped for
that call (fail open) and the error is recorded; ``strict = true`` in config raises instead.
Each plugin's hook is called on its own (timed, bounded, on its own copy of the body, checked
after the call for edits in place; a plugin that sets ``tokensaver_read_only = True`` promises it
never edits what it is given or returned and gets the call's own blocks instead, as the built-ins
do), so
implementations are plain functions: ``wrapper=True`` / ``hookwrapper=True`` are rejected by
``wrap()``, as is an implementation of a hook not listed here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .context import CallContext

hookspec = pluggy.HookspecMarker("tokensaver")
hookimpl = pluggy.HookimplMarker("tokensaver")


# -- configuration phase ---------------------------------------------------------------------


@hookspec
def tokensaver_configure(settings: dict[str, Any], source: str) -> dict[str, Any] | None:
    """Validate and normalize this plugin's own config table.

    Called once per ``wrap()`` (and per proxy/replay/bench configuration) for each enabled plugin,
    with only that plugin's table. A plugin that declares its settings (``SETTINGS``, a
    :class:`tokensaver.settings.Schema`) gets them already checked, defaults filled in; this hook is
    then only for what a schema cannot say.

    :param settings: the plugin's table (``[tool.tokensaver.<name>]``), merged over all sources.
    :param source: where the table came from (file path(s) or ``"wrap(config=...)"``), for errors.
    :return: the settings with defaults filled in (stored as ``ctx.settings``), or None to keep them
        as given. Raise :class:`tokensaver.ConfigError` naming the key and the accepted values to
        reject them.
    """


# -- request phase ---------------------------------------------------------------------------


@hookspec
def tokensaver_transform_request(body: dict[str, Any], ctx: CallContext) -> dict[str, Any] | None:
    """Rewrite the outgoing Messages request.

    Called once per call attempt for each enabled plugin, in config order, with the body as the
    previous stage left it. Must be deterministic for the same conversation content (retries and
    replays must give the same bytes) and must leave a request the API accepts.

    :param body: the request body (Messages API JSON) after the previous stage.
    :param ctx: the call context: this plugin's settings, model facts, token counter, state.
    :return: the new body, or None to leave it unchanged.
    """


@hookspec(firstresult=True)
def tokensaver_lookup_response(body: dict[str, Any], ctx: CallContext) -> dict[str, Any] | None:
    """Answer the call without the network.

    Called after all transforms, before the network call. Stops at first non-None result.
    The core serves the result in the form the caller asked for (JSON, a replayed SSE stream,
    a raw response, sync or async).

    :param body: the final request body.
    :param ctx: the call context.
    :return: a complete Messages API response object (``{"type": "message", ...}``), or None.
    """


# -- response phase --------------------------------------------------------------------------


@hookspec(firstresult=True)
def tokensaver_answer_tool_use(tool_use: dict[str, Any], ctx: CallContext) -> str | list[Any] | None:
    """Answer a tool call the model addressed to a plugin, inside the middleware.

    Tools whose names start with ``tokensaver_`` belong to plugins (a plugin adds its definition in
    ``tokensaver_transform_request``). When a response asks only for such tools, the core calls this
    hook for each ``tool_use`` block, sends the answers back to the model as ``tool_result`` blocks
    (the follow-up goes through the whole pipeline again) and hands the caller the final answer: the
    caller's agent never sees a tool it did not define. Stops at first non-None result.

    :param tool_use: the ``tool_use`` content block (``id``, ``name``, ``input``).
    :param ctx: the call context.
    :return: the ``tool_result`` content (a string or content blocks), or None if not yours.
    """


@hookspec
def tokensaver_observe_response(body: dict[str, Any], response: dict[str, Any], ctx: CallContext) -> None:
    """See the final response of a call that reached the network and completed.

    Called once per successful call, streamed or not (for streams, after ``message_stop`` with the
    message assembled from the events). Not called for error responses or cut-off streams.

    :param body: the request body that was sent.
    :param response: the complete Messages API response object, ``usage`` included (billed).
    :param ctx: the call context (``ctx.usage`` holds the normalized billed usage).
    """


# -- reporting phase -------------------------------------------------------------------------


@hookspec
def tokensaver_report_section(plugin: str, calls: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Contribute a section to the run report.

    Called when a report is rendered, once per plugin that took part in the run, and only on that
    plugin's own implementation (no need to check ``plugin``), with the run's call records (the
    JSON persisted per call; ``record["plugins"][plugin]`` holds what the plugin stored with
    ``ctx.record()``, see :func:`tokensaver.context.plugin_notes`).

    :param plugin: the plugin's name in config (its notes' key in the records).
    :param calls: the run's call records, oldest first.
    :return: ``{"title": str, "summary": str, "rows": [dict, ...]}`` (rows optional), or None.
    """
