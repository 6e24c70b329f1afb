"""Which run a proxied call records into: one run per agent session, pipelines kept per session.

Calls are grouped by ``X-Claude-Code-Session-Id``, else the session in ``metadata.user_id``, or an
explicit ``x-tokensaver-run`` header; calls without one go to the proxy's default run. Every session
pipeline shares the default one's plugin state and shadow caches: state is keyed by conversation
and content, and the API's prompt cache is per key, never per session.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import pluggy

from ..config import Config
from ..pipeline import Pipeline
from ..run import Run

RUN_HEADER = "x-tokensaver-run"
SESSION_HEADER = "x-claude-code-session-id"
MAX_SESSIONS = 256  # session pipelines kept open; an evicted session's run continues on its next call
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_USER_ID_SESSION = re.compile(r"session_([0-9A-Za-z][0-9A-Za-z_.-]{3,})")


def session_of(headers: Mapping[str, str], body: Mapping[str, Any]) -> str | None:
    """The agent session a call belongs to: Claude Code's session header, else ``metadata.user_id``.

    ``user_id`` carries it as ``..._session_<uuid>`` (older Claude Code) or as JSON with
    ``session_id`` (newer).
    """
    for name, value in headers.items():
        if name.lower() == SESSION_HEADER and value.strip():
            return value.strip()
    meta = body.get("metadata")
    uid = meta.get("user_id") if isinstance(meta, dict) else None
    if not isinstance(uid, str) or not uid:
        return None
    if uid.lstrip().startswith("{"):
        try:
            parsed = json.loads(uid)
        except ValueError:
            parsed = None
        sid = parsed.get("session_id") if isinstance(parsed, dict) else None
        if isinstance(sid, str) and sid.strip():
            return sid.strip()
    m = _USER_ID_SESSION.search(uid)
    return m.group(1) if m else None


def session_run_name(session: str) -> str:
    """The run name of a session: ``session-<id>`` with characters a run name cannot hold replaced."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "-", session)[:96]
    return f"session-{safe}"


def run_name(headers: Mapping[str, str], body: Mapping[str, Any]) -> str | None:
    """The run a call records into: ``x-tokensaver-run`` (a valid run name), else its session's run."""
    explicit = headers.get(RUN_HEADER, "").strip()
    if explicit and _RUN_NAME.match(explicit):
        return explicit
    session = session_of(headers, body)
    return session_run_name(session) if session else None


class Sessions:
    """The default pipeline (calls without a session) and one pipeline per session, most recent kept."""

    def __init__(
        self, config: Config, pm: pluggy.PluginManager, run: Run | str | None = None, clock: Any = None
    ) -> None:
        self.config, self.pm, self.clock = config, pm, clock
        # the default run also owns the plugin state every session shares
        self.default = Pipeline(config, plugin_manager=pm, run=run, clock=clock)
        self.default.door = "proxy"  # its calls' label in tokensaver.metrics
        self._sessions: OrderedDict[str, Pipeline] = OrderedDict()
        self._lock = threading.Lock()

    def pipeline_for(self, name: str | None) -> Pipeline:
        """The pipeline recording into run ``name`` (``None``: the default run)."""
        if name is None or (self.default.run is not None and name == self.default.run.name):
            return self.default
        with self._lock:
            pipe = self._sessions.get(name)
            if pipe is not None:
                self._sessions.move_to_end(name)
                return pipe
            run = (
                Run(name, runs_dir=self.config.runs_dir, config=self.config.as_dict())
                if self.config.record
                else None
            )
            pipe = Pipeline(self.config, plugin_manager=self.pm, run=run, clock=self.clock)
            pipe.door = "proxy"
            # plugin state lives as long as the proxy: keyed by conversation and content, never by run
            pipe.states = self.default.states
            pipe.shadows = self.default.shadows  # the API's prompt cache is per key, not per session
            pipe.threads = self.default.threads  # so are its message threads
            self._sessions[name] = pipe
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
            return pipe

    def pipelines(self) -> list[Pipeline]:
        """The default pipeline and every session pipeline still open."""
        with self._lock:
            return [self.default, *self._sessions.values()]

    def named(self) -> list[tuple[str | None, Pipeline]]:
        """(run name, pipeline) of the default pipeline (``None``) and every session pipeline still open."""
        with self._lock:
            return [(None, self.default), *self._sessions.items()]
