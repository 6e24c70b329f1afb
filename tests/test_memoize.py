"""memoize: key canonicalization, storage safety, single-flight, and (when the core exists) end to end."""

from __future__ import annotations

import copy
import logging
import os
import stat
import threading

import pytest
from tokensaver_plugins import memoize

from tokensaver.context import make_context
from tokensaver.errors import ConfigError

BODY = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 1024,
    "system": [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}],
    "messages": [{"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]}],
    "temperature": 0.7,
}

ANSWER = {
    "id": "msg_01abc",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5",
    "content": [{"type": "text", "text": "4"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 20, "output_tokens": 2, "cache_read_input_tokens": 0},
}


def settings(tmp_path, **over):
    return memoize.tokensaver_configure({"dir": str(tmp_path / "memo"), **over}, "test")


def ctx_for(body, tmp_path, *, states=None, key_hash="kh-aaaa", headers=None, now=None, **over):
    ctx = make_context(
        body,
        plugin="memoize",
        settings=settings(tmp_path, **over),
        states=states if states is not None else {},
        key_hash=key_hash,
        now=now,
    )
    ctx.headers = dict(headers or {})
    return ctx


def roundtrip(body, tmp_path, states, answer=ANSWER, **kw):
    """A miss then observe: the call the network would have answered."""
    ctx = ctx_for(body, tmp_path, states=states, **kw)
    assert memoize.tokensaver_lookup_response(body, ctx) is None
    memoize.tokensaver_observe_response(body, answer, ctx)
    return ctx


# -- configuration ----------------------------------------------------------------------------


def test_configure_fills_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("TOKENSAVER_CACHE_DIR", raising=False)
    s = memoize.tokensaver_configure({}, "test")
    assert s["dir"] == str(tmp_path / "xdg" / "tokensaver" / "memo")
    assert s["ttl"] == 86_400.0 and s["size_limit"] == 512 * 1024**2 and s["store_refusals"] is False


@pytest.mark.parametrize(
    "table, key",
    [
        ({"ttl": -1}, "ttl"),
        ({"ttl": "1d"}, "ttl"),
        ({"size_limit": "lots"}, "size_limit"),
        ({"size_limit": True}, "size_limit"),
        ({"wait": 0}, "wait"),
        ({"dir": 3}, "dir"),
        ({"tll": 5}, "tll"),
        ({"store_refusals": "yes"}, "store_refusals"),
    ],
)
def test_configure_rejects_bad_values_naming_the_key(table, key):
    with pytest.raises(ConfigError) as e:
        memoize.tokensaver_configure(table, "pyproject.toml")
    assert e.value.key == key and "pyproject.toml" in str(e.value)


def test_configure_parses_sizes_and_no_expiry():
    s = memoize.tokensaver_configure({"size_limit": "2GB", "ttl": None, "dir": "/x"}, "t")
    assert s["size_limit"] == 2 * 1024**3 and s["ttl"] is None


# -- the key ----------------------------------------------------------------------------------


def key(body, headers=None, kh="kh-aaaa"):
    return memoize.cache_key(body, headers, kh)


def test_stream_and_cache_control_do_not_change_the_key():
    plain = copy.deepcopy(BODY)
    plain["system"] = [{"type": "text", "text": "You are terse."}]
    streamed = {**copy.deepcopy(BODY), "stream": True}
    streamed["messages"][0]["content"][0]["cache_control"] = {"type": "ephemeral", "ttl": "1h"}
    assert key(BODY) == key(plain) == key(streamed)


@pytest.mark.parametrize(
    "change",
    [
        lambda b: b.update(model="claude-haiku-4-5"),
        lambda b: b.update(temperature=0.0),
        lambda b: b.update(max_tokens=1025),
        lambda b: b.update(tool_choice={"type": "any"}),
        lambda b: b.update(thinking={"type": "enabled", "budget_tokens": 2048}),
        lambda b: b.update(service_tier="standard_only"),
        lambda b: b.update(metadata={"user_id": "u2"}),
        lambda b: b.update(stop_sequences=["\n"]),
        lambda b: b.update(tools=[{"name": "t", "input_schema": {"type": "object"}}]),
        lambda b: b["messages"][0]["content"][0].update(text="What is 2+3?"),
        lambda b: b["system"][0].update(text="You are verbose."),
    ],
)
def test_every_parameter_is_in_the_key(change):
    other = copy.deepcopy(BODY)
    change(other)
    assert key(other) != key(BODY)


def test_cache_control_inside_a_tool_input_is_data_and_stays_in_the_key():
    def with_input(v):
        return {
            **BODY,
            "messages": [
                {"role": "user", "content": "go"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "x", "input": v}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]},
            ],
        }

    assert key(with_input({"cache_control": 1})) != key(with_input({}))


def test_betas_and_version_are_in_the_key_order_insensitive_other_headers_not():
    a = key(BODY, {"anthropic-beta": "a-1,b-2"})
    assert a == key(BODY, {"anthropic-beta": "b-2, a-1", "x-stainless-retry-count": "3"})
    assert a != key(BODY)
    assert key(BODY, {"anthropic-version": "2023-06-01"}) != key(BODY)


def test_key_is_namespaced_by_api_key_hash_and_never_contains_a_secret():
    assert key(BODY, kh="kh-aaaa") != key(BODY, kh="kh-bbbb")
    assert "sk-ant" not in key(BODY, {"x-api-key": "sk-ant-secret"})


# -- store, hit, miss -------------------------------------------------------------------------


def test_miss_then_hit_returns_the_stored_message_with_original_usage(tmp_path):
    states: dict = {}
    roundtrip(BODY, tmp_path, states)
    ctx = ctx_for({**BODY, "stream": True}, tmp_path, states=states)
    hit = memoize.tokensaver_lookup_response({**BODY, "stream": True}, ctx)
    assert hit == ANSWER
    assert ctx.response_headers["x-tokensaver-cache"] == "hit"
    assert ctx.notes["memoize"]["hit"] is True and ctx.notes["memoize"]["usage"] == ANSWER["usage"]
    hit["content"].append({"type": "text", "text": "mutated"})  # caller's copy, not the store's
    again = memoize.tokensaver_lookup_response(BODY, ctx_for(BODY, tmp_path, states=states))
    assert again == ANSWER


def test_miss_header_and_record(tmp_path):
    ctx = ctx_for(BODY, tmp_path)
    assert memoize.tokensaver_lookup_response(BODY, ctx) is None
    assert ctx.response_headers["x-tokensaver-cache"] == "miss"
    assert ctx.notes["memoize"]["hit"] is False


def test_other_key_and_other_model_miss(tmp_path):
    states: dict = {}
    roundtrip(BODY, tmp_path, states)
    assert (
        memoize.tokensaver_lookup_response(BODY, ctx_for(BODY, tmp_path, states={}, key_hash="kh-bbbb"))
        is None
    )
    other = {**BODY, "model": "claude-opus-4-5"}
    assert memoize.tokensaver_lookup_response(other, ctx_for(other, tmp_path, states=states)) is None


def test_store_survives_a_new_client_state(tmp_path):
    roundtrip(BODY, tmp_path, {})
    assert memoize.tokensaver_lookup_response(BODY, ctx_for(BODY, tmp_path, states={})) == ANSWER


def test_ttl_expires_entries_by_call_clock(tmp_path):
    states: dict = {}
    roundtrip(BODY, tmp_path, states, now=1000.0, ttl=60)
    assert memoize.tokensaver_lookup_response(
        BODY, ctx_for(BODY, tmp_path, states=states, now=1059.0, ttl=60)
    )
    assert (
        memoize.tokensaver_lookup_response(BODY, ctx_for(BODY, tmp_path, states=states, now=1061.0, ttl=60))
        is None
    )


@pytest.mark.parametrize(
    "bad",
    [
        {**ANSWER, "stop_reason": None},
        {**ANSWER, "stop_reason": "refusal"},
        {"type": "error", "error": {"type": "overloaded_error", "message": "x"}},
        {**ANSWER, "content": None},
    ],
)
def test_incomplete_error_and_refusal_answers_are_not_stored(tmp_path, bad):
    states: dict = {}
    ctx = roundtrip(BODY, tmp_path, states, answer=bad)
    assert ctx.notes["memoize"]["stored"] is False
    assert memoize.tokensaver_lookup_response(BODY, ctx_for(BODY, tmp_path, states=states)) is None


def test_refusals_can_be_stored_when_asked(tmp_path):
    states: dict = {}
    refusal = {**ANSWER, "stop_reason": "refusal"}
    roundtrip(BODY, tmp_path, states, answer=refusal, store_refusals=True)
    assert memoize.tokensaver_lookup_response(BODY, ctx_for(BODY, tmp_path, states=states)) == refusal


@pytest.mark.parametrize("value", ["off", "OFF", "false"])
def test_opt_out_header_skips_lookup_and_store(tmp_path, value):
    states: dict = {}
    roundtrip(BODY, tmp_path, states)
    ctx = ctx_for(BODY, tmp_path, states=states, headers={"x-tokensaver-memoize": value})
    assert memoize.tokensaver_lookup_response(BODY, ctx) is None
    assert ctx.response_headers["x-tokensaver-cache"] == "off"
    other = {**BODY, "max_tokens": 7}
    c2 = ctx_for(other, tmp_path, states=states, headers={"x-tokensaver-memoize": "off"})
    memoize.tokensaver_observe_response(other, ANSWER, c2)
    assert memoize.tokensaver_lookup_response(other, ctx_for(other, tmp_path, states=states)) is None


def test_refresh_header_skips_lookup_but_stores_the_new_answer(tmp_path):
    states: dict = {}
    roundtrip(BODY, tmp_path, states)
    fresh = {**ANSWER, "id": "msg_02", "content": [{"type": "text", "text": "four"}]}
    ctx = ctx_for(BODY, tmp_path, states=states, headers={"x-tokensaver-memoize": "refresh"})
    assert memoize.tokensaver_lookup_response(BODY, ctx) is None
    memoize.tokensaver_observe_response(BODY, fresh, ctx)
    assert memoize.tokensaver_lookup_response(BODY, ctx_for(BODY, tmp_path, states=states)) == fresh


# -- corruption and privacy -------------------------------------------------------------------


def test_entry_checksum_and_key_are_verified():
    raw = memoize.encode_entry("k1", ANSWER, 1.0)
    assert memoize.decode_entry("k1", raw) == (ANSWER, 1.0)
    with pytest.raises(memoize.CorruptEntry):
        memoize.decode_entry("k2", raw)
    flipped = raw.replace(b'"4"', b'"5"')
    with pytest.raises(memoize.CorruptEntry, match="checksum"):
        memoize.decode_entry("k1", flipped)
    for junk in (b"", b"garbage", "text", 42, memoize.ENTRY_MAGIC + b"nonewline"):
        with pytest.raises(memoize.CorruptEntry):
            memoize.decode_entry("k1", junk)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda raw: raw.replace(b'"4"', b'"5"'),  # a flipped answer: must never be served
        lambda raw: raw[:-10],  # truncated
        lambda raw: b"\x80\x04pickle",  # not ours
    ],
)
def test_corrupt_entry_is_a_miss_with_a_warning_and_is_deleted(tmp_path, caplog, corrupt):
    states: dict = {}
    roundtrip(BODY, tmp_path, states)
    store = states["memoize"]["stores"][str(tmp_path / "memo")]
    k = memoize.cache_key(BODY, {}, "kh-aaaa")
    store.cache.set(k, corrupt(store.get(k)))
    ctx = ctx_for(BODY, tmp_path, states=states)
    with caplog.at_level(logging.WARNING, logger="tokensaver.plugins.memoize"):
        assert memoize.tokensaver_lookup_response(BODY, ctx) is None
    assert "corrupt" in caplog.text
    assert "corrupt" in ctx.notes["memoize"]["warning"]
    assert store.get(k) is None


def test_unopenable_directory_disables_without_crashing(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    ctx = make_context(
        BODY, plugin="memoize", settings=memoize.tokensaver_configure({"dir": str(blocker / "memo")}, "t")
    )
    with caplog.at_level(logging.WARNING, logger="tokensaver.plugins.memoize"):
        assert memoize.tokensaver_lookup_response(BODY, ctx) is None
        memoize.tokensaver_observe_response(BODY, ANSWER, ctx)
    assert "memoize disabled" in caplog.text


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX permissions")
def test_directory_and_files_are_private_and_hold_no_api_key(tmp_path):
    d = tmp_path / "memo"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    states: dict = {}
    secret = "sk-ant-api03-very-secret"
    roundtrip(BODY, tmp_path, states, headers={"x-api-key": secret, "authorization": f"Bearer {secret}"})
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    files = [p for p in d.rglob("*") if p.is_file()]
    assert files
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, p
        assert secret.encode() not in p.read_bytes()


# -- single flight ----------------------------------------------------------------------------


def test_concurrent_identical_requests_make_one_upstream_call(tmp_path):
    states: dict = {}
    first = ctx_for(BODY, tmp_path, states=states)
    assert memoize.tokensaver_lookup_response(BODY, first) is None  # the owner, now in flight
    results: list = []
    waiting = threading.Barrier(4)

    def waiter():
        ctx = ctx_for(BODY, tmp_path, states=states)
        waiting.wait()
        results.append(memoize.tokensaver_lookup_response(BODY, ctx))

    threads = [threading.Thread(target=waiter) for _ in range(3)]
    for t in threads:
        t.start()
    waiting.wait()
    # the waiters are blocked on the owner's flight until it is observed
    memoize.tokensaver_observe_response(BODY, ANSWER, first)
    for t in threads:
        t.join(30)
    assert results == [ANSWER, ANSWER, ANSWER]
    assert states["memoize"]["inflight"] == {}


def test_waiters_go_to_the_network_when_the_first_call_fails(tmp_path):
    states: dict = {}
    first = ctx_for(BODY, tmp_path, states=states)
    assert memoize.tokensaver_lookup_response(BODY, first) is None
    results: list = []
    started = threading.Event()

    def waiter():
        ctx = ctx_for(BODY, tmp_path, states=states)
        started.set()
        results.append(memoize.tokensaver_lookup_response(BODY, ctx))

    t = threading.Thread(target=waiter)
    t.start()
    started.wait()
    del first  # the failed call's context is dropped: observe never runs, the claim is released
    t.join(30)
    assert not t.is_alive() and results == [None]


def test_same_thread_never_waits_on_itself(tmp_path):
    states: dict = {}
    a = ctx_for(BODY, tmp_path, states=states, wait=600)
    b = ctx_for(BODY, tmp_path, states=states, wait=600)
    assert memoize.tokensaver_lookup_response(BODY, a) is None
    assert memoize.tokensaver_lookup_response(BODY, b) is None  # returns at once, no deadlock
    assert "skipped" in b.notes["memoize"]["single_flight"]


def test_event_loop_thread_never_blocks(tmp_path):
    import asyncio

    states: dict = {}
    owner = ctx_for(BODY, tmp_path, states=states, wait=600)
    t = threading.Thread(target=memoize.tokensaver_lookup_response, args=(BODY, owner))
    t.start()
    t.join()

    async def main():
        return memoize.tokensaver_lookup_response(BODY, ctx_for(BODY, tmp_path, states=states, wait=600))

    assert asyncio.run(main()) is None
    del owner


# -- report -----------------------------------------------------------------------------------


def test_report_section_counts_hits_and_avoided_cost():
    calls = [
        {"id": "c1", "model": "m", "saved_usd": 0.0, "plugins": {"memoize": {"hit": False, "stored": True}}},
        {
            "id": "c2",
            "model": "m",
            "saved_usd": 0.25,
            "plugins": {"memoize": {"hit": True, "usage": ANSWER["usage"]}},
        },
        {"id": "c3", "model": "m", "saved_usd": 0.0, "plugins": {}},
    ]
    sec = memoize.tokensaver_report_section("memoize", calls)
    assert sec is not None
    assert "1 hit(s), 1 miss(es), 1 answer(s) stored" in sec["summary"] and "$0.2500" in sec["summary"]
    assert sec["rows"] == [
        {"call": "c2", "model": "m", "input_tokens": 20, "output_tokens": 2, "saved_usd": 0.25}
    ]
    assert memoize.tokensaver_report_section("memoize", [calls[2]]) is None


# -- end to end: wrap() against the emulator --------------------------------------------------


def _e2e_clients(emu, tmp_path, key="sk-test-key"):
    import anthropic

    import tokensaver

    opts = {"base_url": emu.url, "api_key": key, "max_retries": 0}
    config = {
        "plugins": ["memoize"],
        "memoize": {"dir": str(tmp_path / "memo")},
        "runs_dir": str(tmp_path / "runs"),
    }
    return (
        tokensaver.wrap(anthropic.Anthropic(**opts), config=config),
        tokensaver.wrap(anthropic.AsyncAnthropic(**opts), config=config),
    )


KW = {
    "model": "claude-sonnet-4-6",
    "max_tokens": 50,
    "messages": [{"role": "user", "content": "Capital of France?"}],
}


def _answer(client, mode):
    if mode == "create":
        return client.messages.create(**KW).model_dump()
    if mode == "create_stream":
        events = list(client.messages.create(**KW, stream=True))
        return "".join(e.delta.text for e in events if e.type == "content_block_delta")
    if mode == "stream_helper":
        with client.messages.stream(**KW) as s:
            return s.get_final_message().model_dump()
    raw = client.messages.with_raw_response.create(**KW)
    return raw.headers.get("x-tokensaver-cache"), raw.parse().model_dump()


def test_e2e_second_identical_request_never_reaches_the_network_in_any_mode(emu, tmp_path):
    sync, _ = _e2e_clients(emu, tmp_path)
    emu.reply("Paris.")
    first = sync.messages.create(**KW).model_dump()
    assert len(emu.requests) == 1
    assert _answer(sync, "create") == first
    assert _answer(sync, "create_stream") == "Paris."
    assert _answer(sync, "stream_helper") == first
    header, parsed = _answer(sync, "raw")
    assert header == "hit" and parsed == first
    assert len(emu.requests) == 1
    rec = sync.tokensaver.records[-1]
    assert rec["short_circuit"] == "memoize" and rec["cost_usd"] == 0
    assert rec["plugins"]["memoize"]["usage"]["input_tokens"] == first["usage"]["input_tokens"]


def test_e2e_streamed_first_call_is_stored_for_a_plain_one(emu, tmp_path):
    sync, _ = _e2e_clients(emu, tmp_path)
    emu.reply("Paris.")
    with sync.messages.stream(**KW) as s:
        first = s.get_final_message().model_dump()
    assert sync.messages.create(**KW).model_dump() == first
    assert len(emu.requests) == 1


def test_e2e_async_client_hits(emu, tmp_path):
    import asyncio

    _, aclient = _e2e_clients(emu, tmp_path)
    emu.reply("Paris.")

    async def main():
        a = (await aclient.messages.create(**KW)).model_dump()
        b = (await aclient.messages.create(**KW)).model_dump()
        return a, b

    a, b = asyncio.run(main())
    assert a == b and len(emu.requests) == 1


def test_e2e_other_key_model_or_parameter_is_a_miss_and_opt_out_works(emu, tmp_path):
    sync, _ = _e2e_clients(emu, tmp_path)
    other_key, _ = _e2e_clients(emu, tmp_path, key="sk-other-key")
    emu.reply("Paris.")
    sync.messages.create(**KW)
    other_key.messages.create(**KW)
    sync.messages.create(**{**KW, "model": "claude-haiku-4-5"})
    sync.messages.create(**{**KW, "max_tokens": 51})
    sync.messages.create(**KW, extra_headers={"x-tokensaver-memoize": "off"})
    assert len(emu.requests) == 5
    assert "x-tokensaver-memoize" not in {k.lower() for k in emu.last.headers}
    sync.messages.create(**KW)
    assert len(emu.requests) == 5


def test_e2e_concurrent_identical_requests_make_one_upstream_call(emu, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    sync, _ = _e2e_clients(emu, tmp_path)
    emu.reply("Paris.")
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: sync.messages.create(**KW).content[0].text, range(6)))
    assert answers == ["Paris."] * 6
    assert len(emu.requests) == 1
