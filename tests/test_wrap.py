"""wrap() on every Messages surface, sync and async, streamed and not, against the emulator over HTTP.

Assertions are on what reached the wire (the emulator's recorded bodies) and what the caller got.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import anthropic
import pytest

import tokensaver
from tokensaver.emulator import Emulator
from tokensaver.testing import (
    FULL_USAGE,
    SURFACES,
    ResponseObserver,
    SystemTagger,
    async_surface_text,
    stored_message,
    surface_text,
)

MODEL = "claude-sonnet-4-6"
MSGS = [{"role": "user", "content": "What is the capital of France?"}]


class Tagger(SystemTagger):
    """A third-party-style plugin: appends a marker to the system prompt and adds a report section."""

    @tokensaver.hookimpl
    def tokensaver_report_section(self, plugin: str, calls: list[dict[str, Any]]) -> dict[str, Any]:
        return {"title": "Tagger", "summary": f"tagged {len(calls)} calls"}


class Canned:
    """Short-circuits every call whose last user text is 'canned?'."""

    def __init__(self) -> None:
        self.lookups = 0

    @tokensaver.hookimpl
    def tokensaver_lookup_response(self, body: dict[str, Any], ctx: Any) -> dict[str, Any] | None:
        self.lookups += 1
        if body["messages"][-1]["content"] != "canned?":
            return None
        ctx.response_headers["x-canned"] = "yes"
        return stored_message(
            body["model"],
            "from the can",
            tool_input={"a": [1, 2]},
            usage=dict(FULL_USAGE),
            message_id="msg_canned",
        )


def _wrap(client: Any, tmp_path: Any, plugins: dict[str, Any], run: str = "t") -> Any:
    pm = tokensaver.get_plugin_manager(plugins, load_entrypoints=False)
    return tokensaver.wrap(
        client, config={"plugins": list(plugins), "runs_dir": str(tmp_path)}, plugin_manager=pm, run=run
    )


def _clients(emu: Emulator, **kw: Any) -> tuple[anthropic.Anthropic, anthropic.AsyncAnthropic]:
    opts = {"base_url": emu.url, "api_key": "sk-test-key", "max_retries": 0, **kw}
    return anthropic.Anthropic(**opts), anthropic.AsyncAnthropic(**opts)


class TestSync:
    def test_same_class_and_caller_client_untouched(self, emu: Emulator, tmp_path: Any) -> None:
        base, _ = _clients(emu)
        wrapped = _wrap(base, tmp_path, {"tagger": Tagger()})
        assert isinstance(wrapped, anthropic.Anthropic) and wrapped is not base
        base.messages.create(model=MODEL, max_tokens=50, messages=MSGS)
        assert "system" not in emu.last.body  # the caller's own client is not wrapped

    @pytest.mark.parametrize("mode", SURFACES)
    def test_surfaces_transform_and_record(self, emu: Emulator, tmp_path: Any, mode: str) -> None:
        base, _ = _clients(emu)
        client = _wrap(base, tmp_path, {"tagger": Tagger()})
        emu.reply("Paris.")
        kw: dict[str, Any] = {"model": MODEL, "max_tokens": 50, "messages": MSGS}
        text = surface_text(client, mode, **kw)
        assert text == "Paris."
        assert emu.last.body["system"] == " [tagged]"  # the transformed body reached the wire
        records = client.tokensaver.records
        assert len(records) == 1 and records[0]["status"] == 200
        assert records[0]["usage"]["input_tokens"] == emu.last["usage"]["input_tokens"]
        assert records[0]["stages"][0]["plugin"] == "tagger"
        assert records[0]["surface"] == ("beta" if mode == "beta" else "messages")

    @pytest.mark.parametrize(
        "mode", ["create", "create_stream", "stream_helper", "raw", "streaming_response"]
    )
    def test_short_circuit_never_reaches_network(self, emu: Emulator, tmp_path: Any, mode: str) -> None:
        base, _ = _clients(emu)
        client = _wrap(base, tmp_path, {"canned": Canned()})
        kw: dict[str, Any] = {
            "model": MODEL,
            "max_tokens": 50,
            "messages": [{"role": "user", "content": "canned?"}],
        }
        if mode == "create":
            msg = client.messages.create(**kw)
        elif mode == "create_stream":
            stream = client.messages.create(**kw, stream=True)
            types = [e.type for e in stream]
            assert types[0] == "message_start" and types[-1] == "message_stop"
            with client.messages.stream(**kw) as s:
                msg = s.get_final_message()
        elif mode == "stream_helper":
            with client.messages.stream(**kw) as s:
                msg = s.get_final_message()
        elif mode == "raw":
            raw = client.messages.with_raw_response.create(**kw)
            assert raw.headers["x-canned"] == "yes"
            assert raw.headers["x-tokensaver-short-circuit"] == "canned"
            msg = raw.parse()
        else:
            with client.messages.with_streaming_response.create(**kw) as resp:
                msg = resp.parse()
        assert emu.requests == []  # no network call at all
        assert msg.content[0].text == "from the can"
        assert msg.content[1].input == {"a": [1, 2]}
        assert msg.usage.input_tokens == 100
        rec = client.tokensaver.records[-1]
        assert rec["short_circuit"] == "canned" and rec["cost_usd"] == 0 and rec["saved_usd"] > 0

    def test_with_options_copy_keeps_pipeline(self, emu: Emulator, tmp_path: Any) -> None:
        base, _ = _clients(emu)
        client = _wrap(base, tmp_path, {"tagger": Tagger()})
        copy = client.with_options(timeout=30, api_key="sk-other-key")
        copy.messages.create(model=MODEL, max_tokens=50, messages=MSGS)
        assert emu.last.body["system"] == " [tagged]"
        assert copy.tokensaver is client.tokensaver
        # the copy's middleware is bound to the copy's own key
        mw_copy = [m for m in copy.middleware if isinstance(m, tokensaver.middleware.TokensaverMiddleware)]
        mw_orig = [m for m in client.middleware if isinstance(m, tokensaver.middleware.TokensaverMiddleware)]
        assert len(mw_copy) == 1 and mw_copy[0].secret_hash != mw_orig[0].secret_hash

    def test_other_endpoints_pass_through(self, emu: Emulator, tmp_path: Any) -> None:
        base, _ = _clients(emu)
        client = _wrap(base, tmp_path, {"tagger": Tagger()})
        n = client.messages.count_tokens(model=MODEL, messages=MSGS)
        assert n.input_tokens > 0
        assert "system" not in emu.last.body
        assert list(client.tokensaver.records) == []

    def test_api_errors_pass_through_and_are_recorded(self, emu: Emulator, tmp_path: Any) -> None:
        from tokensaver.emulator import EmulatorError

        base, _ = _clients(emu)
        client = _wrap(base, tmp_path, {"tagger": Tagger()})
        emu.reply(EmulatorError.overloaded(retry_after=0))
        with pytest.raises(anthropic.APIStatusError) as info:
            client.messages.create(model=MODEL, max_tokens=50, messages=MSGS)
        assert info.value.status_code == 529
        rec = client.tokensaver.records[-1]
        assert rec["status"] == 529 and rec["saved_usd"] == 0

    def test_retry_runs_pipeline_per_attempt_records_each_once(self, emu: Emulator, tmp_path: Any) -> None:
        from tokensaver.emulator import EmulatorError

        base, _ = _clients(emu, max_retries=1)
        client = _wrap(base, tmp_path, {"tagger": Tagger()})
        emu.reply(EmulatorError.overloaded(retry_after=0), "ok")
        msg = client.messages.create(model=MODEL, max_tokens=50, messages=MSGS)
        assert msg.content[0].text == "ok"
        # the same transformed bytes were sent on both attempts (idempotent transforms)
        assert emu.requests[0].body == emu.requests[1].body
        statuses = [(r["attempt"], r["status"]) for r in client.tokensaver.records]
        assert statuses == [(0, 529), (1, 200)]

    def test_run_persisted_and_loadable(self, emu: Emulator, tmp_path: Any) -> None:
        base, _ = _clients(emu)
        client = _wrap(base, tmp_path, {"tagger": Tagger()}, run="nightly")
        client.messages.create(model=MODEL, max_tokens=50, messages=MSGS)
        run = tokensaver.load_run("nightly", runs_dir=tmp_path)
        assert len(run.records()) == 1
        text = (tmp_path / "nightly.jsonl").read_text()
        assert "sk-test-key" not in text
        md = run.report(
            tokensaver.get_plugin_manager({"tagger": Tagger()}, load_entrypoints=False)
        ).to_markdown()
        assert "tagger" in md and "tagged 1 calls" in md


class TestAsync:
    @pytest.mark.parametrize("mode", ["create", "create_stream", "stream_helper", "raw", "beta"])
    def test_surfaces(self, emu: Emulator, tmp_path: Any, mode: str) -> None:
        async def main() -> str:
            _, base = _clients(emu)
            client = _wrap(base, tmp_path, {"tagger": Tagger()})
            emu.reply("Paris.")
            kw: dict[str, Any] = {"model": MODEL, "max_tokens": 50, "messages": MSGS}
            return await async_surface_text(client, mode, **kw)

        assert asyncio.run(main()) == "Paris."
        assert emu.last.body["system"] == " [tagged]"

    @pytest.mark.parametrize("stream", [False, True])
    def test_short_circuit(self, emu: Emulator, tmp_path: Any, stream: bool) -> None:
        async def main() -> Any:
            _, base = _clients(emu)
            client = _wrap(base, tmp_path, {"canned": Canned()})
            kw: dict[str, Any] = {
                "model": MODEL,
                "max_tokens": 50,
                "messages": [{"role": "user", "content": "canned?"}],
            }
            if stream:
                async with client.messages.stream(**kw) as s:
                    return await s.get_final_message()
            return await client.messages.create(**kw)

        msg = asyncio.run(main())
        assert emu.requests == []
        assert msg.content[0].text == "from the can"


def test_stream_record_has_billed_usage_from_events(emu: Emulator, tmp_path: Any) -> None:
    base, _ = _clients(emu)
    client = _wrap(base, tmp_path, {"tagger": Tagger()})
    big = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "word " * 3000, "cache_control": {"type": "ephemeral"}}],
        }
    ]
    for _ in range(2):
        with client.messages.stream(model=MODEL, max_tokens=50, messages=big) as s:
            s.get_final_message()
    first, second = client.tokensaver.records
    assert first["usage"]["cache_creation_input_tokens"] > 0
    assert second["usage"]["cache_read_input_tokens"] == first["usage"]["cache_creation_input_tokens"]
    assert json.dumps(second)  # JSON-serializable


def test_exact_token_count_mode_uses_count_tokens_endpoint(emu: Emulator, tmp_path: Any) -> None:
    base, _ = _clients(emu)
    pm = tokensaver.get_plugin_manager({"tagger": Tagger()}, load_entrypoints=False)
    client = tokensaver.wrap(
        base,
        config={"plugins": ["tagger"], "runs_dir": str(tmp_path), "token_count": "exact"},
        plugin_manager=pm,
    )
    client.messages.create(model=MODEL, max_tokens=50, messages=MSGS)
    paths = [r["path"] for r in emu.requests]
    assert paths.count("/v1/messages/count_tokens") == 2 and paths[-1] == "/v1/messages"
    rec = client.tokensaver.records[-1]
    assert rec["tokens_sent_exact"] == emu.last["usage"]["input_tokens"]
    assert rec["tokens_original_exact"] < rec["tokens_sent_exact"]  # the tagger added a system prompt


def test_stream_closed_early_is_recorded_incomplete_not_observed(emu: Emulator, tmp_path: Any) -> None:
    observer = ResponseObserver()
    observed = observer.observed
    base, _ = _clients(emu)
    client = _wrap(base, tmp_path, {"observer": observer})
    emu.reply("a long answer " * 200)
    stream = client.messages.create(model=MODEL, max_tokens=50, messages=MSGS, stream=True)
    for event in stream:
        if event.type == "content_block_start":
            break
    stream.close()
    assert observed == []
    assert client.tokensaver.records[-1]["status"] == "incomplete"
    # a complete stream is observed with the assembled message
    emu.reply("short")
    list(client.messages.create(model=MODEL, max_tokens=50, messages=MSGS, stream=True))
    assert observed[-1]["content"][0]["text"] == "short" and observed[-1]["usage"]["output_tokens"] > 0


def test_in_memory_records_are_bounded_but_the_ledger_keeps_every_call(
    emu: Emulator, tmp_path: Any, monkeypatch: Any
) -> None:
    import tokensaver.pipeline

    monkeypatch.setattr(tokensaver.pipeline, "MEMORY_RECORDS", 3)
    base, _ = _clients(emu)
    client = _wrap(base, tmp_path, {"tagger": Tagger()}, run="bounded")
    for _ in range(5):
        client.messages.create(model=MODEL, max_tokens=10, messages=MSGS)
    assert len(client.tokensaver.records) == 3
    assert len(tokensaver.load_run("bounded", runs_dir=tmp_path).records()) == 5
