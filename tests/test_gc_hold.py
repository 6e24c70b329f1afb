"""Cyclic garbage collection is held off while the pipeline works on a call, and only then."""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator
from typing import Any

import anthropic
import pytest

import tokensaver
from tokensaver import _gc
from tokensaver.emulator import Emulator


class Watcher:
    """Notes whether collection was on while its hooks ran."""

    def __init__(self) -> None:
        self.seen: list[bool] = []

    @tokensaver.hookimpl
    def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> None:
        self.seen.append(gc.isenabled())

    @tokensaver.hookimpl
    def tokensaver_observe_response(self, body: dict[str, Any], response: dict[str, Any], ctx: Any) -> None:
        self.seen.append(gc.isenabled())


@pytest.fixture
def collection_on() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    (gc.enable if was else gc.disable)()


def _client(emu: Emulator, watcher: Watcher, tmp_path: Any) -> Any:
    pm = tokensaver.get_plugin_manager({"watch": watcher}, load_entrypoints=False)
    base = anthropic.Anthropic(base_url=emu.url, api_key="sk-ant-gc", max_retries=0)
    return tokensaver.wrap(
        base, config={"plugins": ["watch"], "record": False, "runs_dir": str(tmp_path)}, plugin_manager=pm
    )


def test_off_during_the_pipeline_on_again_after(emu: Emulator, tmp_path: Any, collection_on: None) -> None:
    watcher = Watcher()
    client = _client(emu, watcher, tmp_path)
    client.messages.create(
        model="claude-sonnet-4-6", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
    )
    assert watcher.seen == [False, False]  # the transform and the observer ran with it off
    assert gc.isenabled()


def test_a_caller_that_turned_it_off_keeps_it_off(emu: Emulator, tmp_path: Any, collection_on: None) -> None:
    watcher = Watcher()
    client = _client(emu, watcher, tmp_path)
    gc.disable()
    client.messages.create(
        model="claude-sonnet-4-6", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
    )
    assert watcher.seen == [False, False]
    assert not gc.isenabled()


@contextlib.contextmanager
def _held_in_a_thread() -> Iterator[None]:
    """A phase running in another thread for the block's duration."""
    inside, release = threading.Event(), threading.Event()

    @_gc.collection_held
    def slow() -> None:
        inside.set()
        release.wait(10)

    t = threading.Thread(target=slow)
    t.start()
    inside.wait(10)
    try:
        yield
    finally:
        release.set()
        t.join(10)


def test_overlapping_phases_turn_it_on_when_the_last_ends(collection_on: None) -> None:
    with _held_in_a_thread():
        _gc.collection_held(lambda: None)()  # a phase that begins and ends inside the other
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_long_hold_still_collects_the_young_generations(
    monkeypatch: pytest.MonkeyPatch, collection_on: None
) -> None:
    monkeypatch.setattr(_gc, "YOUNG_EVERY", 0.0)
    with _held_in_a_thread():
        before = gc.get_stats()[1]["collections"]
        _gc.collection_held(lambda: None)()
        assert gc.get_stats()[1]["collections"] > before
