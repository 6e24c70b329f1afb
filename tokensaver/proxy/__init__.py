"""``tokensaver proxy``: the Messages API over HTTP, for agents that cannot call ``wrap()``.

Point an agent's Anthropic endpoint at the proxy (``ANTHROPIC_BASE_URL=http://127.0.0.1:8787``) and
every ``POST /v1/messages`` (JSON or SSE, with or without ``?beta=true``) runs through the same
:class:`~tokensaver.pipeline.Pipeline` as ``wrap()``: same plugins, config and run ledger, one code
path (also when the base path repeats the version, ``/v1/v1/messages``: sent on as ``/v1/messages``).
Every other path (``count_tokens``, models, batches, files, the OpenAI-compatible
``/v1/chat/completions``...) is forwarded untouched, with one log line saying it was not optimized.

* Credentials (``x-api-key``, ``authorization``) go upstream as they came; the pipeline only ever
  sees a hash of them (memoized answers are namespaced by it), never the secret.
* Upstream errors come back unchanged (status, body, ``retry-after``, ``request-id``): the
  client's own retries keep working, and each attempt is recorded once.
* Streams pass through chunk by chunk while usage is read on the way; a client that disconnects
  closes its upstream request.
* Tools that plugins add (``tokensaver_*``) are answered here, as ``wrap()`` does: the agent never
  sees them, and a streamed answer keeps streaming across the rounds.
* Calls are grouped into one run per agent session (``X-Claude-Code-Session-Id``, or the session
  in ``metadata.user_id``); calls without one go to the proxy's default run.

Unsafe: anyone who can reach the proxy spends the API key they send through it, and reads
memoized answers of that key. It binds to loopback by default; any other address requires an
access token (``--token`` / ``$TOKENSAVER_PROXY_TOKEN``) that clients send as
``x-tokensaver-proxy-token`` (Claude Code: ``ANTHROPIC_CUSTOM_HEADERS``). The token is checked,
never forwarded.

The package, along its seams: ``app`` (the aiohttp application, a door over
:mod:`tokensaver.exchange`), ``sessions`` (one run per agent session), ``wire`` (headers, paths,
bodies, API-shaped errors), ``server`` (sockets, the background server, ``tokensaver proxy``),
``overhead`` (the time it adds, for the bench) and ``dashboard`` (the live page on ``/``).
"""

from __future__ import annotations

from .app import DEFAULT_UPSTREAM, TokensaverProxy
from .overhead import CANNED_MESSAGE, canned_upstream, measure_proxy_overhead
from .server import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    BackgroundApp,
    ProxyServer,
    add_arguments,
    check_bind,
    is_loopback,
    run,
)
from .sessions import MAX_SESSIONS, RUN_HEADER, SESSION_HEADER, Sessions, session_of, session_run_name
from .wire import MAX_BODY, PARSE_ON_LOOP_BYTES, TOKEN_HEADER

__all__ = [
    "CANNED_MESSAGE",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DEFAULT_UPSTREAM",
    "MAX_BODY",
    "MAX_SESSIONS",
    "PARSE_ON_LOOP_BYTES",
    "RUN_HEADER",
    "SESSION_HEADER",
    "TOKEN_HEADER",
    "BackgroundApp",
    "ProxyServer",
    "Sessions",
    "TokensaverProxy",
    "add_arguments",
    "canned_upstream",
    "check_bind",
    "is_loopback",
    "measure_proxy_overhead",
    "run",
    "session_of",
    "session_run_name",
]
