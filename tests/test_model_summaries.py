"""summarize's opt-in model summaries: long prose condensed by a cheaper model, through ``ctx.call_model``.

Everything runs through the real SDK over HTTP to the emulator, which answers both the caller's
calls and the summary calls (told apart by model).
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
from typing import Any

import anthropic
import pytest

import tokensaver
from tokensaver.emulator import Emulator, EmulatorError
from tokensaver.proxy import ProxyServer

MODEL = "claude-sonnet-4-6"
SMALL = "claude-haiku-5-5"
TOOLS = [{"name": "fetch", "input_schema": {"type": "object", "properties": {"url": {"type": "string"}}}}]
SUMMARY = "Release 4.2.0 of libfoo (2026-10-01) drops Python 3.9; migrate `foo.load()` to `foo.open()`."


def _page(seed: str = "libfoo") -> str:
    """A long prose tool output (about 5k tokens): paragraphs of words, no structure to cut."""
    para = (
        f"The {seed} project announced today that its next release will change how configuration "
        "files are discovered, and the maintainers explained at length why the old behaviour was "
        "confusing for new users who expected the nearest file to win over the global one. "
    )
    return "\n\n".join(f"{para}Paragraph {i} adds more background on the decision." for i in range(90))


def _conv(page: str, turns: int = 1) -> list[dict[str, Any]]:
    task = "What changed in libfoo 4.2? " + " ".join(
        f"Constraint {i}: keep answers short." for i in range(300)
    )
    msgs: list[dict[str, Any]] = [{"role": "user", "content": task}]
    for t in range(turns):
        msgs.append(
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": f"toolu_{t}", "name": "fetch", "input": {"url": f"u{t}"}}
                ],
            }
        )
        content = page if t == 0 else f"short result {t}"
        msgs.append(
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": f"toolu_{t}", "content": content}],
            }
        )
        if t < turns - 1:
            msgs.append({"role": "assistant", "content": f"Noted step {t}."})
            msgs.append({"role": "user", "content": f"go on {t}"})
    return msgs


def _replies(emu: Emulator, summary: str = SUMMARY) -> list[dict[str, Any]]:
    """Script the emulator: summary calls get ``summary``, the caller's calls an answer."""
    seen: list[dict[str, Any]] = []

    def answer(body: dict[str, Any]) -> Any:
        seen.append(body)
        return summary if body["model"] == SMALL else "Here is the answer."

    emu.default_reply = answer  # type: ignore[assignment]
    return seen


def _client(
    emu: Emulator,
    tmp_path: Any,
    asynchronous: bool = False,
    key: str = "k1",
    plugins: tuple[str, ...] = ("summarize",),
    **summarize: Any,
) -> Any:
    cls = anthropic.AsyncAnthropic if asynchronous else anthropic.Anthropic
    base = cls(base_url=emu.url, api_key=key, max_retries=0)
    cfg = {"model_summaries": True, "summary_dir": str(tmp_path / "summaries"), **summarize}
    return tokensaver.wrap(
        base, config={"plugins": list(plugins), "runs_dir": str(tmp_path), "summarize": cfg}
    )


def _auth(rec: Any) -> str:
    """The credential a request carried (the SDK sends the key as x-api-key or authorization)."""
    return str(rec.headers.get("x-api-key") or rec.headers.get("authorization") or "")


def _sent_result(body: dict[str, Any]) -> Any:
    return body["messages"][2]["content"][0]["content"]


def test_prose_is_condensed_by_the_cheaper_model_and_paid_from_the_savings(
    emu: Emulator, tmp_path: Any
) -> None:
    seen = _replies(emu)
    client = _client(emu, tmp_path)
    page = _page()
    msg = client.messages.create(model=MODEL, max_tokens=200, tools=TOOLS, messages=_conv(page))
    assert msg.content[0].text == "Here is the answer."
    assert [b["model"] for b in seen] == [SMALL, MODEL]
    side, main = emu.requests
    # the summary call: the caller's key, the cheaper model, the page, not streamed, no tools
    assert _auth(side) == _auth(main) != ""  # the same key (the emulator records a hash of it)
    assert "tools" not in side.body and not side.body.get("stream")
    assert page in side.body["messages"][0]["content"]
    sent = _sent_result(main.body)
    assert sent.startswith("[tokensaver: condensed by claude-haiku-5-5") and sent.endswith(SUMMARY)
    rec = client.tokensaver.records[-1]
    (mc,) = rec["model_calls"]
    assert mc["plugin"] == "summarize" and mc["model"] == SMALL and mc["cost_usd"] > 0
    assert mc["usage"]["input_tokens"] == side.usage["input_tokens"]
    stage = rec["stages"][0]
    assert stage["model_calls_usd"] == mc["cost_usd"]
    assert stage["saved_tokens"] > 3000
    # the stage's dollars are net of the summary it paid for; the call's cost includes it
    main_cost = tokensaver.Pipeline({"plugins": []}).prices.get(MODEL).cost(main.usage)
    assert rec["cost_usd"] == pytest.approx(main_cost + mc["cost_usd"], abs=1e-7)
    assert rec["plugins"]["summarize"]["model_summaries"] == 1
    # every rendering of the run shows what the stage paid for its model calls
    report = client.tokensaver.run.report()
    (row,) = [s for s in report.to_dict()["stages"] if s["plugin"] == "summarize"]
    assert row["model_calls_usd"] == pytest.approx(mc["cost_usd"])
    paid = f"${mc['cost_usd']:.4f}"
    assert paid in report.to_table() and paid in report.to_markdown() and paid in report.to_html()


def test_the_same_block_keeps_its_bytes_on_later_turns_and_after_a_restart(
    emu: Emulator, tmp_path: Any
) -> None:
    seen = _replies(emu)
    page = _page()
    both = ("summarize", "cache_align")
    client = _client(emu, tmp_path, plugins=both)
    client.messages.create(model=MODEL, max_tokens=200, tools=TOOLS, messages=_conv(page))
    first = _sent_result(emu.requests[-1].body)
    written = emu.requests[-1].usage["cache_creation_input_tokens"]
    client.messages.create(model=MODEL, max_tokens=200, tools=TOOLS, messages=_conv(page, turns=3))
    assert _sent_result(emu.requests[-1].body) == first
    # the later turn read what the first wrote (the condensed block included) from the cache
    assert written > 0 and emu.requests[-1].usage["cache_read_input_tokens"] >= written
    # a new process (a new wrap) with the same store: the same bytes, no new summary
    other = _client(emu, tmp_path, plugins=both)
    other.messages.create(model=MODEL, max_tokens=200, tools=TOOLS, messages=_conv(page, turns=3))
    assert _sent_result(emu.requests[-1].body) == first
    assert emu.requests[-1].usage["cache_read_input_tokens"] >= written
    assert [b["model"] for b in seen] == [SMALL, MODEL, MODEL, MODEL]
    store = tmp_path / "summaries"
    assert stat.S_IMODE(store.stat().st_mode) == 0o700
    for f in store.rglob("*"):
        assert stat.S_IMODE(f.stat().st_mode) == (0o700 if f.is_dir() else 0o600)
        if f.is_file():
            assert b"k1" not in f.read_bytes()  # the key is only hashed into entry names


def test_a_block_first_seen_in_history_is_never_condensed(emu: Emulator, tmp_path: Any) -> None:
    seen = _replies(emu)
    client = _client(emu, tmp_path)
    page = _page()
    client.messages.create(model=MODEL, max_tokens=200, tools=TOOLS, messages=_conv(page, turns=2))
    assert [b["model"] for b in seen] == [MODEL]
    assert _sent_result(emu.requests[-1].body) == page


def test_a_failed_summary_leaves_the_call_alone_for_good(emu: Emulator, tmp_path: Any) -> None:
    emu.reply(EmulatorError(529, "overloaded_error", "Overloaded"), "Answer one.", "Answer two.")
    client = _client(emu, tmp_path)
    page = _page()
    msg = client.messages.create(model=MODEL, max_tokens=200, tools=TOOLS, messages=_conv(page))
    assert msg.content[0].text == "Answer one."
    assert _sent_result(emu.requests[-1].body) == page
    rec = client.tokensaver.records[-1]
    assert "529" in rec["model_calls"][0]["error"] and "cost_usd" not in rec["model_calls"][0]
    assert "summary_error" in rec["plugins"]["summarize"]
    client.messages.create(model=MODEL, max_tokens=200, tools=TOOLS, messages=_conv(page, turns=2))
    assert _sent_result(emu.requests[-1].body) == page  # not condensed later: the cache holds it as sent
    assert len(emu.requests) == 3


def test_keys_do_not_share_summaries(emu: Emulator, tmp_path: Any) -> None:
    seen = _replies(emu)
    page = _page()
    _client(emu, tmp_path, key="k1").messages.create(
        model=MODEL, max_tokens=200, tools=TOOLS, messages=_conv(page)
    )
    _client(emu, tmp_path, key="k2").messages.create(
        model=MODEL, max_tokens=200, tools=TOOLS, messages=_conv(page)
    )
    assert [b["model"] for b in seen] == [SMALL, MODEL, SMALL, MODEL]


@pytest.mark.parametrize(
    "content",
    [
        json.dumps([{"id": i, "name": f"row {i}", "note": "a b c d e f g h i j"} for i in range(400)]),
        "\n".join(f"{i:>6}\tdef function_{i}(x):  # returns x plus {i}" for i in range(1, 900)),
    ],
    ids=["json", "numbered-code"],
)
def test_structured_outputs_never_go_to_the_model(emu: Emulator, tmp_path: Any, content: str) -> None:
    seen = _replies(emu)
    _client(emu, tmp_path).messages.create(model=MODEL, max_tokens=200, tools=TOOLS, messages=_conv(content))
    assert [b["model"] for b in seen] == [MODEL]


def test_no_summary_when_it_does_not_pay(emu: Emulator, tmp_path: Any) -> None:
    seen = _replies(emu)
    page = _page()
    client = _client(emu, tmp_path, summary_model="claude-opus-4-1")  # pricier than the caller's model
    client.messages.create(model=MODEL, max_tokens=200, tools=TOOLS, messages=_conv(page))
    assert [b["model"] for b in seen] == [MODEL]
    assert client.tokensaver.records[-1]["plugins"]["summarize"]["summaries_not_worth_it"] == 1
    # the caller already uses the summary model: nothing to gain
    client2 = _client(emu, tmp_path)
    client2.messages.create(model=SMALL, max_tokens=200, tools=TOOLS, messages=_conv(page))
    assert [b["model"] for b in seen] == [MODEL, SMALL]


def test_async_and_streamed_calls_get_the_summary_too(emu: Emulator, tmp_path: Any) -> None:
    seen = _replies(emu)
    page = _page("async")

    async def go() -> Any:
        client = _client(emu, tmp_path, asynchronous=True)
        async with client.messages.stream(
            model=MODEL, max_tokens=200, tools=TOOLS, messages=_conv(page)
        ) as s:
            return await s.get_final_message()

    msg = asyncio.run(go())
    assert msg.content[0].text == "Here is the answer."
    assert [b["model"] for b in seen] == [SMALL, MODEL]
    assert emu.requests[-1].stream and not emu.requests[0].stream
    assert _sent_result(emu.requests[-1].body).endswith(SUMMARY)


def test_the_proxy_makes_the_summary_call_with_the_callers_key(emu: Emulator, tmp_path: Any) -> None:
    seen = _replies(emu)
    cfg = {
        "plugins": ["summarize"],
        "runs_dir": str(tmp_path),
        "summarize": {"model_summaries": True, "summary_dir": str(tmp_path / "s")},
    }
    with ProxyServer(cfg, upstream=emu.url) as proxy:
        client = anthropic.Anthropic(base_url=proxy.url, api_key="proxy-key", max_retries=0)
        msg = client.messages.create(model=MODEL, max_tokens=200, tools=TOOLS, messages=_conv(_page("proxy")))
        records = proxy.records()
    assert msg.content[0].text == "Here is the answer."
    assert [b["model"] for b in seen] == [SMALL, MODEL]
    assert _auth(emu.requests[0]) == _auth(emu.requests[1]) != ""
    assert records[-1]["model_calls"][0]["cost_usd"] > 0
    assert _sent_result(emu.requests[-1].body).endswith(SUMMARY)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("model_summaries", "yes", "true or false"),
        ("summary_model", "", "model name"),
        ("summary_payback", 0, "between 0.1 and 100"),
        ("summary_words", -3, "positive integer"),
        ("summary_dir", 5, "directory path"),
    ],
)
def test_bad_settings_name_the_key(key: str, value: Any, message: str) -> None:
    with pytest.raises(tokensaver.ConfigError, match=message) as info:
        tokensaver.load_config({"plugins": ["summarize"], "summarize": {key: value}})
    assert info.value.key == key


def test_no_upstream_means_no_summary_and_no_error(tmp_path: Any) -> None:
    """A hook called directly (no wrap, no proxy) has no upstream: the text goes as it is."""
    from tokensaver_plugins import summarize

    from tokensaver.context import make_context

    settings = summarize.tokensaver_configure(
        {"model_summaries": True, "summary_dir": str(tmp_path / "s")}, "test"
    )
    body = {"model": MODEL, "max_tokens": 10, "messages": _conv(_page())}
    ctx = make_context(body, plugin="summarize", settings=settings)
    out = summarize.tokensaver_transform_request(body, ctx)
    assert out is None or _sent_result(out) == _page()
    assert "no upstream" in ctx.notes["summarize"]["summary_error"]
    assert os.path.isdir(tmp_path / "s")


def test_a_refused_summary_request_turns_summaries_off_for_the_client(emu: Emulator, tmp_path: Any) -> None:
    emu.reply(EmulatorError(400, "invalid_request_error", "thinking cannot be disabled"), "One.", "Two.")
    client = _client(emu, tmp_path)
    client.messages.create(model=MODEL, max_tokens=200, tools=TOOLS, messages=_conv(_page("a")))
    # a new prose output in a later call: no second summary request, the API said no for good
    client.messages.create(model=MODEL, max_tokens=200, tools=TOOLS, messages=_conv(_page("b")))
    assert [r.body["model"] for r in emu.requests] == [SMALL, MODEL, MODEL]
    assert _sent_result(emu.requests[-1].body) == _page("b")
