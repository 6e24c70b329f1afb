"""Serving the proxy: a listening socket, a background server (tests, bench), ``tokensaver proxy``.

Only loopback is served without an access token (:func:`check_bind`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import ipaddress
import logging
import os
import signal
import socket
import threading
from typing import Any

import pluggy
from aiohttp import web

from ..config import Config
from ..errors import TokensaverError
from ..pipeline import Pipeline
from ..run import Run
from .app import DEFAULT_UPSTREAM, TokensaverProxy
from .wire import TOKEN_HEADER, ApiErrorServer

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8787


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback name or address (only those are served without a token)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve a non-loopback address without an access token."""
    if not is_loopback(host) and not token:
        raise TokensaverError(
            f"refusing to bind {host}: anyone who can reach it could spend the API keys sent through it; "
            "set an access token with --token or TOKENSAVER_PROXY_TOKEN (clients send it as "
            f"{TOKEN_HEADER}), or bind 127.0.0.1"
        )


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError:
        sock.close()
        raise
    sock.listen(512)
    sock.setblocking(False)
    return sock


async def _start(app: web.Application, sock: socket.socket) -> web.AppRunner:
    # handler_cancellation: a client that disconnects cancels its handler, which closes the upstream call
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=5.0)
    await runner.setup()
    assert runner.server is not None
    runner.server.__class__ = ApiErrorServer  # what aiohttp cannot parse is answered as JSON too
    await web.SockSite(runner, sock).start()
    return runner


class BackgroundApp:
    """An aiohttp application served from a background thread with its own event loop."""

    def __init__(self, app: web.Application, host: str = DEFAULT_HOST, port: int = 0) -> None:
        self.app = app
        self.host = host
        self._sock = _listen(host, port)
        self.port: int = self._sock.getsockname()[1]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://host:port``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> BackgroundApp:
        """Serve in a background thread; returns once the socket accepts requests."""
        if self._thread is not None:
            return self
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._runner = loop.run_until_complete(_start(self.app, self._sock))
        self._thread = threading.Thread(target=loop.run_forever, name="tokensaver-aiohttp", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, run the application's cleanup, close the loop."""
        loop, runner, thread = self._loop, self._runner, self._thread
        if loop is None or runner is None or thread is None:
            self._sock.close()
            return
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()
        self._sock.close()
        self._loop = self._runner = self._thread = None

    def __enter__(self) -> BackgroundApp:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ProxyServer(BackgroundApp):
    """The proxy in a background thread (tests, bench): ``with ProxyServer(cfg, upstream=u) as p: p.url``."""

    def __init__(
        self,
        config: Config | dict[str, Any] | str | None = None,
        *,
        upstream: str = DEFAULT_UPSTREAM,
        host: str = DEFAULT_HOST,
        port: int = 0,
        token: str | None = None,
        run: Run | str | None = None,
        plugin_manager: pluggy.PluginManager | None = None,
        clock: Any = None,
    ) -> None:
        check_bind(host, token)
        self.proxy = TokensaverProxy(
            config, upstream=upstream, token=token, run=run, plugin_manager=plugin_manager, clock=clock
        )
        super().__init__(self.proxy.app(), host, port)

    @property
    def pipeline(self) -> Pipeline:
        """The default run's pipeline (calls without a session)."""
        return self.proxy.default

    def records(self) -> list[dict[str, Any]]:
        """Every call record of this proxy, all runs (grouped by run)."""
        return [r for p in self.proxy.pipelines() for r in p.records]

    def start(self) -> ProxyServer:
        super().start()
        return self

    def __enter__(self) -> ProxyServer:
        return self.start()


# -- the command -------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``tokensaver proxy``."""
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument(
        "--upstream",
        default=os.environ.get("TOKENSAVER_UPSTREAM") or DEFAULT_UPSTREAM,
        help=f"the Messages API to forward to (default $TOKENSAVER_UPSTREAM or {DEFAULT_UPSTREAM})",
    )
    parser.add_argument(
        "--config", metavar="FILE", help="a tokensaver TOML file merged over the config sources"
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("TOKENSAVER_PROXY_TOKEN"),
        help=f"access token clients must send as {TOKEN_HEADER} "
        "(default $TOKENSAVER_PROXY_TOKEN; required to bind a non-loopback address)",
    )
    parser.add_argument("--run", help="name of the run for calls without a session (default: a new run)")


def run(args: argparse.Namespace) -> int:
    """``tokensaver proxy``: serve until interrupted."""
    check_bind(args.host, args.token)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    proxy = TokensaverProxy(args.config, upstream=args.upstream, token=args.token, run=args.run)
    try:
        sock = _listen(args.host, args.port)
    except OSError as exc:
        raise TokensaverError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from exc
    asyncio.run(_serve_forever(proxy, sock, args.host))
    return 0


async def _serve_forever(proxy: TokensaverProxy, sock: socket.socket, host: str) -> None:
    runner = await _start(proxy.app(), sock)
    # what exists now (modules, the SDK's, aiohttp's and the plugins' classes and tables) lives as long
    # as the process: out of the collector's full passes, which would walk all of it again on
    # whichever call triggers one (on a ~200k-token replay: max 236 -> 110 ms, p50 35 -> 28 ms)
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    runs = f"runs in {proxy.config.runs_dir}" if proxy.config.record else "runs not persisted"
    print(
        f"tokensaver proxy on http://{shown}:{port} -> {proxy.upstream} "
        f"(plugins: {', '.join(proxy.config.plugins) or 'none'}; {runs})\n"
        f"  export ANTHROPIC_BASE_URL=http://{shown}:{port}",
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
