"""Pytest fixtures and helpers for tokensaver and its plugins (``pytest_plugins = ["tokensaver.testing"]``).

pytest is a test dependency only: this module imports without it (the fixtures are then absent).

Test a plugin alone: :func:`one_plugin_manager` (a plugin manager with only that plugin), :func:`wrap_one`
(a client wrapped with only that plugin enabled), :func:`one_plugin_client` (the same against the emulator).

Fixtures:
    ``emulator``               a started ``Emulator(virtual_clock=True)``, stopped after the test
    ``emu``                    the same emulator, under the short name the tests use
    ``emulator_client``        ``anthropic.Anthropic`` pointed at it (``max_retries=0``)
    ``async_emulator_client``  ``anthropic.AsyncAnthropic`` pointed at it (use inside ``asyncio.run``)
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import anthropic
import pluggy

from tokensaver.emulator import Emulator
from tokensaver.hookspecs import hookimpl
from tokensaver.middleware import wrap
from tokensaver.plugins import get_plugin_manager

C = TypeVar("C")

TEST_API_KEY = "test-key"
# usage of a stored answer that names every counter (none of them cached)
FULL_USAGE = {
    "input_tokens": 100,
    "output_tokens": 20,
    "cache_creation_input_tokens": 0,
    "cache_read_input_tokens": 0,
}


def emulator_clients(emu: Emulator, **kwargs: Any) -> tuple[Any, Any]:
    """(sync, async) anthropic clients for ``emu``; kwargs go to both constructors."""
    opts: dict[str, Any] = {"base_url": emu.url, "api_key": TEST_API_KEY, "max_retries": 0, **kwargs}
    return anthropic.Anthropic(**opts), anthropic.AsyncAnthropic(**opts)


def stored_message(
    model: str,
    text: str,
    *,
    tool_input: dict[str, Any] | None = None,
    usage: dict[str, int] | None = None,
    message_id: str = "msg_stored",
) -> dict[str, Any]:
    """A Messages API answer as a lookup hook serves it: one text block, then a ``tool_use`` block
    (id ``toolu_1``, name ``t``) taking ``tool_input`` when given; ``usage`` defaults to 5 in, 1 out."""
    content: list[dict[str, Any]] = [{"type": "text", "text": text}]
    if tool_input is not None:
        content.append({"type": "tool_use", "id": "toolu_1", "name": "t", "input": tool_input})
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": "end_turn" if tool_input is None else "tool_use",
        "stop_sequence": None,
        "usage": usage if usage is not None else {"input_tokens": 5, "output_tokens": 1},
    }


# every Messages surface a wrapped client answers on, as :func:`surface_text` names them
SURFACES = ["create", "create_stream", "stream_helper", "raw", "streaming_response", "beta"]


def surface_text(client: Any, mode: str, **kw: Any) -> str:
    """The answer's text through one of a sync client's Messages surfaces (one of :data:`SURFACES`)."""
    if mode == "create":
        return str(client.messages.create(**kw).content[0].text)
    if mode == "create_stream":
        events = list(client.messages.create(**kw, stream=True))
        return "".join(e.delta.text for e in events if e.type == "content_block_delta")
    if mode == "stream_helper":
        with client.messages.stream(**kw) as s:
            return str(s.get_final_message().content[0].text)
    if mode == "raw":
        raw = client.messages.with_raw_response.create(**kw)
        assert raw.http_response.status_code == 200
        return str(raw.parse().content[0].text)
    if mode == "streaming_response":
        with client.messages.with_streaming_response.create(**kw) as resp:
            return str(resp.parse().content[0].text)
    return str(client.beta.messages.create(**kw).content[0].text)


async def async_surface_text(client: Any, mode: str, **kw: Any) -> str:
    """The answer's text through one of an async client's Messages surfaces (one of :data:`SURFACES`)."""
    if mode == "create":
        return str((await client.messages.create(**kw)).content[0].text)
    if mode == "create_stream":
        stream = await client.messages.create(**kw, stream=True)
        return "".join([e.delta.text async for e in stream if e.type == "content_block_delta"])
    if mode == "stream_helper":
        async with client.messages.stream(**kw) as s:
            return str((await s.get_final_message()).content[0].text)
    if mode == "raw":
        raw = await client.messages.with_raw_response.create(**kw)
        assert raw.http_response.status_code == 200
        return str((await raw.parse()).content[0].text)
    if mode == "streaming_response":
        async with client.messages.with_streaming_response.create(**kw) as resp:
            return str((await resp.parse()).content[0].text)
    return str((await client.beta.messages.create(**kw)).content[0].text)


class SystemTagger:
    """A plugin that appends " [tagged]" to the system prompt: proof on the wire that the pipeline ran."""

    @hookimpl
    def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> dict[str, Any]:
        return {**body, "system": (body.get("system") or "") + " [tagged]"}


class ResponseObserver:
    """A plugin that keeps every response its observe hook is shown, in order, in ``observed``."""

    def __init__(self) -> None:
        self.observed: list[dict[str, Any]] = []

    @hookimpl
    def tokensaver_observe_response(self, body: dict[str, Any], response: dict[str, Any], ctx: Any) -> None:
        self.observed.append(response)


def one_plugin_manager(plugin: object, name: str = "plugin") -> pluggy.PluginManager:
    """A plugin manager holding only ``plugin`` (registered as ``name``): no installed plugin is loaded."""
    return get_plugin_manager({name: plugin}, load_entrypoints=False)


def wrap_one(
    client: C,
    plugin: object,
    *,
    name: str = "plugin",
    settings: dict[str, Any] | None = None,
    runs_dir: str | Path | None = None,
    **config: Any,
) -> C:
    """``client`` wrapped with only ``plugin`` enabled (as ``name``, its table ``settings``).

    The run is recorded under ``runs_dir`` when given, else kept in memory only (``record = false``);
    ``config`` adds core keys (``strict``, ``plugin_timeout``, ...).
    """
    cfg: dict[str, Any] = {"plugins": [name], **config}
    if settings is not None:
        cfg[name] = settings
    if runs_dir is not None:
        cfg["runs_dir"] = str(runs_dir)
    else:
        cfg.setdefault("record", False)
    return wrap(client, config=cfg, plugin_manager=one_plugin_manager(plugin, name))


def one_plugin_client(emu: Emulator, plugin: object, *, asynchronous: bool = False, **kwargs: Any) -> Any:
    """An ``anthropic`` client (``AsyncAnthropic`` when ``asynchronous``) for ``emu``, wrapped by
    :func:`wrap_one` with only ``plugin``; ``kwargs`` go to :func:`wrap_one`."""
    cls = anthropic.AsyncAnthropic if asynchronous else anthropic.Anthropic
    base = cls(base_url=emu.url, api_key=TEST_API_KEY, max_retries=0)
    return wrap_one(base, plugin, **kwargs)


def start_proxy_process(
    *args: str, env: dict[str, str] | None = None, cwd: str | Path | None = None
) -> tuple[subprocess.Popen[str], str]:
    """``tokensaver proxy --port 0 ARGS`` in a subprocess: (the process, its URL) once it listens.

    Its log (stderr) goes to a temporary file, never a pipe nobody reads (a pipe that fills up would
    stall the proxy); a proxy that does not start raises with what it logged.
    """
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokensaver", "proxy", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env=env,
        cwd=cwd,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "tokensaver proxy on http://127.0.0.1:PORT -> ..."
    if not line.startswith("tokensaver proxy on http://127.0.0.1:"):
        stop_proxy_process(proc)
        log.seek(0)
        raise RuntimeError(f"tokensaver proxy did not start: {line!r}\n{log.read()}")
    log.close()  # the process keeps its own descriptor
    return proc, line.split()[3]


def stop_process(proc: subprocess.Popen[Any], grace: float = 30) -> None:
    """Terminate ``proc``, killing it if it lingers more than ``grace`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def stop_proxy_process(proc: subprocess.Popen[str]) -> None:
    """Terminate a proxy started by :func:`start_proxy_process`, killing it if it lingers."""
    stop_process(proc)


def free_port() -> int:
    """A loopback TCP port free at the time of asking."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A ``redis-server`` on a free loopback port, nothing persisted (its files under ``workdir``):
    :meth:`start` waits until it answers PING (RuntimeError when it cannot), :meth:`stop` kills it,
    and a stopped one may be started again on the same port."""

    def __init__(self, workdir: str | Path) -> None:
        self.port = free_port()
        self.workdir = Path(workdir)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if not binary:
            raise RuntimeError("no redis-server on PATH (apt-get install redis-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            + ["--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


def no_redis(why: str) -> None:
    """Skip the calling test for want of Redis, or fail it where ``TOKENSAVER_REQUIRE_REDIS=1`` (CI)."""
    import pytest

    if os.environ.get("TOKENSAVER_REQUIRE_REDIS") == "1":
        pytest.fail(f"redis is required here (TOKENSAVER_REQUIRE_REDIS=1): {why}")
    pytest.skip(why)


@contextmanager
def redis_url_for_test(workdir: str | Path) -> Iterator[str]:
    """The URL of a Redis for a test: ``$TOKENSAVER_TEST_REDIS_URL``, else a :class:`RedisServer` started
    under ``workdir`` and stopped on leaving; with neither, the test skips (see :func:`no_redis`)."""
    url = os.environ.get("TOKENSAVER_TEST_REDIS_URL")
    if url:
        yield url
        return
    if not shutil.which("redis-server"):
        no_redis("no redis-server on PATH and TOKENSAVER_TEST_REDIS_URL unset (apt-get install redis-server)")
    server = RedisServer(workdir)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


try:
    import pytest
except ImportError:  # pragma: no cover - pytest is a test dependency only
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture
    def emulator() -> Iterator[Emulator]:
        """A started offline Messages API with a virtual clock (``emulator.clock.advance(301)``)."""
        with Emulator(virtual_clock=True) as emu:
            yield emu

    @pytest.fixture
    def emu(emulator: Emulator) -> Emulator:
        """The ``emulator`` fixture under its short name."""
        return emulator

    @pytest.fixture
    def emulator_client(emulator: Emulator) -> Iterator[Any]:
        """A sync ``anthropic.Anthropic`` client talking to the ``emulator`` fixture."""
        client, _ = emulator_clients(emulator)
        yield client
        client.close()

    @pytest.fixture
    def async_emulator_client(emulator: Emulator) -> Any:
        """An ``anthropic.AsyncAnthropic`` client talking to the ``emulator`` fixture."""
        _, client = emulator_clients(emulator)
        return client
