"""Pytest fixtures and helpers for tokensaver and its plugins (``pytest_plugins = ["tokensaver.testing"]``).

pytest is a test dependency only: this module imports without it (the fixtures are then absent).

Fixtures:
    ``emulator``               a started ``Emulator(virtual_clock=True)``, stopped after the test
    ``emulator_client``        ``anthropic.Anthropic`` pointed at it (``max_retries=0``)
    ``async_emulator_client``  ``anthropic.AsyncAnthropic`` pointed at it (use inside ``asyncio.run``)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from tokensaver.emulator import Emulator

TEST_API_KEY = "test-key"


def emulator_clients(emu: Emulator, **kwargs: Any) -> tuple[Any, Any]:
    """(sync, async) anthropic clients for ``emu``; kwargs go to both constructors."""
    import anthropic

    opts: dict[str, Any] = {"base_url": emu.url, "api_key": TEST_API_KEY, "max_retries": 0, **kwargs}
    return anthropic.Anthropic(**opts), anthropic.AsyncAnthropic(**opts)


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
