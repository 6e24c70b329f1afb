"""Pytest fixtures and helpers for tokensaver and its plugins (``pytest_plugins = ["tokensaver.testing"]``).

pytest is a test dependency only: this module imports without it (the fixtures are then absent).

Fixtures:
    ``emulator``               a started ``Emulator(virtual_clock=True)``, stopped after the test
    ``emulator_client``        ``anthropic.Anthropic`` pointed at it (``max_retries=0``)
    ``async_emulator_client``  ``anthropic.AsyncAnthropic`` pointed at it (use inside ``asyncio.run``)
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tokensaver.emulator import Emulator

TEST_API_KEY = "test-key"


def emulator_clients(emu: Emulator, **kwargs: Any) -> tuple[Any, Any]:
    """(sync, async) anthropic clients for ``emu``; kwargs go to both constructors."""
    import anthropic

    opts: dict[str, Any] = {"base_url": emu.url, "api_key": TEST_API_KEY, "max_retries": 0, **kwargs}
    return anthropic.Anthropic(**opts), anthropic.AsyncAnthropic(**opts)


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


def stop_proxy_process(proc: subprocess.Popen[str]) -> None:
    """Terminate a proxy started by :func:`start_proxy_process`, killing it if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


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
