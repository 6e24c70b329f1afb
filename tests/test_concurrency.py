"""Concurrency and upstream faults: many calls at once, cut-off answers, dead connections, bad streams.

Everything runs over real HTTP: the real anthropic SDK, the real proxy (a subprocess where a
deadlock would otherwise hang this process), and a Messages API stand-in (``Upstream``) that
holds, counts and mangles answers on demand. Every wait is bounded, so a regression fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import pytest
from aiohttp import web

import tokensaver
from tokensaver.proxy import BackgroundApp, ProxyServer
from tokensaver.run import load_run
from tokensaver.sse import message_to_sse, sse_error
from tokensaver.testing import start_proxy_process

MODEL = "claude-sonnet-4-6"
SMALL = "claude-haiku-5-5"
SUMMARY = "Release 4.2.0 of libfoo drops Python 3.9."
ANSWER = "Here is the answer."
KW: dict[str, Any] = {
    "model": MODEL,
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "What is the capital of France?"}],
}
TOOLS = [{"name": "fetch", "input_schema": {"type": "object", "properties": {"url": {"type": "string"}}}}]
# as many concurrent calls as a default executor has threads, and then some
N_BLOCKING = min(32, (os.cpu_count() or 1) + 4) + 2
# hooks are bounded far below the waits here: a bounded wait of the core's (a model call, an
# identical call in flight) must not be cut short by it
HOOK_TIMEOUT = 0.5
# summarize's own work on a 5k-token page, before and after its model call, is real CPU: on a loaded
# 2-core machine it can take longer than 0.5 s, which is not what these tests are about
SUMMARY_HOOK_TIMEOUT = 2.0


def _message(text: str, model: str = MODEL) -> dict[str, Any]:
    return {
        "id": "msg_up",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 40, "output_tokens": 6},
    }


class Upstream:
    """A Messages API stand-in: counts calls, holds them, and misbehaves when told.

    ``faults`` is consumed one per caller's (non-summary) call: ``"truncate"`` (a 200 whose body
    is shorter than its Content-Length), ``"garbage"`` (a stream with a data line that is not
    JSON), ``"error_then_stop"`` (an error event, then ``message_stop``), ``"hang"`` (no answer).
    Summary calls (model ``SMALL``) are held until ``hold_summaries`` of them arrived (or 10 s).
    """

    def __init__(self, *, delay: float = 0.0, hold_summaries: int = 0) -> None:
        self.delay = delay
        self.hold_summaries = hold_summaries
        self.faults: deque[str] = deque()
        self.calls: list[dict[str, Any]] = []  # the caller's calls
        self.summaries: list[dict[str, Any]] = []  # the plugins' own calls
        self._lock = threading.Lock()
        self._all_summaries: asyncio.Event | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024**2)
        app.router.add_post("/v1/messages", self._messages)
        return app

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body["model"] == SMALL:
            return await self._summary(body)
        with self._lock:
            self.calls.append(body)
            fault = self.faults.popleft() if self.faults else "ok"
        if self.delay:
            await asyncio.sleep(self.delay)
        if fault == "hang":
            await asyncio.sleep(30)
        message = _message(ANSWER)
        if fault == "truncate":
            raw = json.dumps(message).encode()
            response = web.StreamResponse(headers={"content-type": "application/json"})
            response.content_length = len(raw)
            await response.prepare(request)
            await response.write(raw[: len(raw) // 2])
            assert request.transport is not None
            request.transport.close()  # the connection ends before the promised length
            return response
        if not body.get("stream"):
            return web.json_response(message, headers={"request-id": "req_up"})
        data = message_to_sse(message)
        if fault == "garbage":
            head, sep, rest = data.partition(b"event: content_block_delta")
            data = head + b"event: content_block_delta\ndata: {not json at all\n\n" + sep + rest
        elif fault == "error_then_stop":
            head, sep, rest = data.partition(b"event: message_stop")
            data = head + sse_error("overloaded_error", "Overloaded") + sep + rest
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(data)  # one write: whoever observes the stream sees all of it
        await response.write_eof()
        return response

    async def _summary(self, body: dict[str, Any]) -> web.Response:
        with self._lock:
            self.summaries.append(body)
            if self._all_summaries is None:
                self._all_summaries = asyncio.Event()
            arrived = len(self.summaries)
        if arrived >= self.hold_summaries:
            self._all_summaries.set()
        # every summary call waits for the others: all callers are inside ctx.call_model at once
        await asyncio.wait_for(self._all_summaries.wait(), 30)
        return web.json_response(_message(SUMMARY, SMALL))


@pytest.fixture
def upstream() -> Any:
    up = Upstream()
    with BackgroundApp(up.app()) as server:
        up.url = server.url  # type: ignore[attr-defined]
        yield up


def _page(seed: int) -> str:
    """A long prose tool output (about 5k tokens), different for every seed: each needs a new summary."""
    para = (
        f"The libfoo project (note {seed}) announced today that its next release will change how "
        "configuration files are discovered, and the maintainers explained at length why the old "
        "behaviour was confusing for new users who expected the nearest file to win. "
    )
    return "\n\n".join(f"{para}Paragraph {i} adds more background on the decision." for i in range(90))


def _summary_messages(seed: int) -> list[dict[str, Any]]:
    task = "What changed in libfoo 4.2? " + " ".join(
        f"Constraint {i}: keep answers short." for i in range(300)
    )
    return [
        {"role": "user", "content": task},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_0", "name": "fetch", "input": {"url": "u"}}],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_0", "content": _page(seed)}],
        },
    ]


def _summarize_config(tmp_path: Path) -> dict[str, Any]:
    return {
        "plugins": ["summarize"],
        "runs_dir": str(tmp_path / "runs"),
        "plugin_timeout": SUMMARY_HOOK_TIMEOUT,
        "summarize": {"model_summaries": True, "summary_dir": str(tmp_path / "summaries")},
    }


def _run_bounded(script: str, env: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:  # run() kills the child: a deadlock fails, never hangs
        pytest.fail(f"deadlocked: no answer within {timeout}s\n{exc.stderr!r}")


# -- 3. many calls that each need a plugin's own model call ------------------------------------


def _proxy_process(upstream_url: str, tmp_path: Path) -> tuple[subprocess.Popen[str], str]:
    cfg = tmp_path / "tokensaver.toml"
    cfg.write_text(
        f'plugins = ["summarize"]\nruns_dir = "{tmp_path / "runs"}"\nplugin_timeout = {SUMMARY_HOOK_TIMEOUT}\n'
        f'[summarize]\nmodel_summaries = true\nsummary_dir = "{tmp_path / "summaries"}"\n'
    )
    return start_proxy_process("--upstream", upstream_url, env={**os.environ, "TOKENSAVER_CONFIG": str(cfg)})


def test_the_proxy_answers_every_call_when_each_needs_a_new_summary_at_once(tmp_path: Path) -> None:
    up = Upstream(hold_summaries=N_BLOCKING)
    with BackgroundApp(up.app()) as server:
        proc, url = _proxy_process(server.url, tmp_path)
        try:
            client = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0, timeout=60)

            def ask(i: int) -> str:
                msg = client.messages.create(
                    model=MODEL, max_tokens=64, tools=TOOLS, messages=_summary_messages(i)
                )
                return msg.content[0].text  # type: ignore[union-attr]

            with ThreadPoolExecutor(N_BLOCKING + 1) as pool:
                futures = [pool.submit(ask, i) for i in range(N_BLOCKING)]
                answers = [f.result(timeout=90) for f in futures]
                # and an unrelated call still gets through afterwards
                assert pool.submit(lambda: client.messages.create(**KW)).result(timeout=60)
        finally:
            proc.kill()
            proc.wait(10)
    assert answers == [ANSWER] * N_BLOCKING
    assert len(up.summaries) == N_BLOCKING
    # every call was sent with its summary in place of the page
    results = [c["messages"][2]["content"][0]["content"] for c in up.calls if "tools" in c]
    assert len(results) == N_BLOCKING and all(r.endswith(SUMMARY) for r in results)


ASYNC_SCRIPT = """
import asyncio, json, sys
import anthropic, tokensaver
sys.path.insert(0, {tests!r})
from test_concurrency import MODEL, TOOLS, _summary_messages

async def main():
    base = anthropic.AsyncAnthropic(base_url={url!r}, api_key="k", max_retries=0, timeout=60)
    client = tokensaver.wrap(base, config={config!r})
    msgs = await asyncio.gather(*(
        client.messages.create(model=MODEL, max_tokens=64, tools=TOOLS, messages=_summary_messages(i))
        for i in range({n})
    ))
    print(json.dumps([m.content[0].text for m in msgs]))

asyncio.run(main())
"""


def test_async_wrap_answers_every_call_when_each_needs_a_new_summary_at_once(tmp_path: Path) -> None:
    up = Upstream(hold_summaries=N_BLOCKING)
    with BackgroundApp(up.app()) as server:
        script = ASYNC_SCRIPT.format(
            tests=str(Path(__file__).parent),
            url=server.url,
            config=_summarize_config(tmp_path),
            n=N_BLOCKING,
        )
        done = _run_bounded(textwrap.dedent(script), dict(os.environ))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [ANSWER] * N_BLOCKING
    assert len(up.summaries) == N_BLOCKING


# -- 4. identical calls at once make one upstream call ----------------------------------------


def _memo_config(tmp_path: Path, **memoize: Any) -> dict[str, Any]:
    return {
        "plugins": ["memoize"],
        "runs_dir": str(tmp_path / "runs"),
        "plugin_timeout": HOOK_TIMEOUT,
        "memoize": {"dir": str(tmp_path / "memo"), "wait": 30, **memoize},
    }


N_IDENTICAL = 12


def test_identical_calls_through_the_proxy_make_one_upstream_call(upstream: Upstream, tmp_path: Path) -> None:
    upstream.delay = 1.0  # the first call is still in flight when the others arrive
    with ProxyServer(_memo_config(tmp_path), upstream=upstream.url) as proxy:  # type: ignore[attr-defined]
        client = anthropic.Anthropic(base_url=proxy.url, api_key="k", max_retries=0, timeout=60)
        with ThreadPoolExecutor(N_IDENTICAL) as pool:
            futures = [pool.submit(client.messages.create, **KW) for _ in range(N_IDENTICAL)]
            answers = [f.result(timeout=90).content[0].text for f in futures]
        records = proxy.records()
    assert answers == [ANSWER] * N_IDENTICAL
    assert len(upstream.calls) == 1
    assert sorted(str(r["short_circuit"]) for r in records) == ["None"] + ["memoize"] * (N_IDENTICAL - 1)


def test_identical_calls_through_async_wrap_make_one_upstream_call(
    upstream: Upstream, tmp_path: Path
) -> None:
    upstream.delay = 1.0

    async def main() -> list[str]:
        base = anthropic.AsyncAnthropic(base_url=upstream.url, api_key="k", max_retries=0, timeout=60)  # type: ignore[attr-defined]
        client = tokensaver.wrap(base, config=_memo_config(tmp_path))
        calls = [client.messages.create(**KW) for _ in range(N_IDENTICAL)]
        msgs = await asyncio.wait_for(asyncio.gather(*calls), 90)
        return [m.content[0].text for m in msgs]

    assert asyncio.run(main()) == [ANSWER] * N_IDENTICAL
    assert len(upstream.calls) == 1


def test_identical_calls_from_sync_threads_make_one_upstream_call(upstream: Upstream, tmp_path: Path) -> None:
    upstream.delay = 1.0
    base = anthropic.Anthropic(base_url=upstream.url, api_key="k", max_retries=0, timeout=60)  # type: ignore[attr-defined]
    client = tokensaver.wrap(base, config=_memo_config(tmp_path))
    with ThreadPoolExecutor(N_IDENTICAL) as pool:
        futures = [pool.submit(client.messages.create, **KW) for _ in range(N_IDENTICAL)]
        answers = [f.result(timeout=90).content[0].text for f in futures]
    assert answers == [ANSWER] * N_IDENTICAL
    assert len(upstream.calls) == 1


def test_the_same_async_task_never_waits_on_its_own_unread_stream(upstream: Upstream, tmp_path: Path) -> None:
    """A task that opened a stream and asks the same again must not wait for itself (memoize.wait)."""

    async def main() -> tuple[str, list[dict[str, Any]]]:
        base = anthropic.AsyncAnthropic(base_url=upstream.url, api_key="k", max_retries=0, timeout=20)  # type: ignore[attr-defined]
        # bounded by memoize.wait itself: asyncio.wait_for would run the call in another task
        client = tokensaver.wrap(base, config=_memo_config(tmp_path, wait=20))
        first = await client.messages.create(**KW, stream=True)  # in flight until it is read
        second = await client.messages.create(**KW)
        await first.close()
        return second.content[0].text, list(client.tokensaver.records)  # type: ignore[union-attr, attr-defined]

    text, records = asyncio.run(main())
    assert text == ANSWER
    assert records[0]["plugins"]["memoize"]["single_flight"].startswith("skipped")


# -- 5. a 200 cut short ---------------------------------------------------------------------


def test_a_truncated_answer_is_a_retryable_error_and_the_retry_is_answered_at_once(
    upstream: Upstream, tmp_path: Path
) -> None:
    upstream.faults.append("truncate")
    # memoize.wait far beyond the client's timeout: a claim left behind makes the retry time out
    config = _memo_config(tmp_path, wait=600)
    with ProxyServer(config, upstream=upstream.url, run="trunc") as proxy:  # type: ignore[attr-defined]
        client = anthropic.Anthropic(base_url=proxy.url, api_key="k", max_retries=0, timeout=20)
        with pytest.raises(anthropic.APIStatusError) as info:
            client.messages.create(**KW)
        assert info.value.status_code == 502
        assert info.value.body["error"]["type"] == "api_error"  # type: ignore[index]
        retried = client.messages.create(**KW)  # what the SDK's own retry sends
        assert retried.content[0].text == ANSWER  # type: ignore[union-attr]
        records = proxy.records()
    first, second = records
    assert first["status"] == "incomplete" and first["error"].startswith("upstream truncated")
    assert "single_flight" not in second["plugins"]["memoize"]  # nothing left in flight to wait on
    assert len(upstream.calls) == 2
    ledger = load_run("trunc", runs_dir=str(tmp_path / "runs"))
    assert ledger.records()[0]["error"].startswith("upstream truncated")


def test_the_sdk_retries_a_truncated_answer_through_the_proxy(upstream: Upstream, tmp_path: Path) -> None:
    upstream.faults.append("truncate")
    with ProxyServer(_memo_config(tmp_path, wait=600), upstream=upstream.url) as proxy:  # type: ignore[attr-defined]
        client = anthropic.Anthropic(base_url=proxy.url, api_key="k", max_retries=2, timeout=20)
        assert client.messages.create(**KW).content[0].text == ANSWER  # type: ignore[union-attr]
    assert len(upstream.calls) == 2


# -- 7. wrap() records attempts that never got an answer --------------------------------------


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there now


@pytest.mark.parametrize("fault", ["connection_error", "timeout"])
def test_wrap_records_a_connection_error_or_timeout_and_reraises_it(
    upstream: Upstream, tmp_path: Path, fault: str
) -> None:
    url = _dead_url() if fault == "connection_error" else upstream.url  # type: ignore[attr-defined]
    upstream.faults.extend(["hang", "hang"])
    expected = anthropic.APITimeoutError if fault == "timeout" else anthropic.APIConnectionError
    config = _memo_config(tmp_path, wait=600)

    base = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0, timeout=1)
    client = tokensaver.wrap(base, config=config)
    with pytest.raises(anthropic.APIConnectionError) as info:
        client.messages.create(**KW)
    assert type(info.value) is expected  # the SDK's own exception, untouched

    async def main() -> None:
        abase = anthropic.AsyncAnthropic(base_url=url, api_key="k", max_retries=0, timeout=1)
        aclient = tokensaver.wrap(abase, config=config)
        with pytest.raises(anthropic.APIConnectionError) as ainfo:
            await asyncio.wait_for(aclient.messages.create(**KW), 30)
        assert type(ainfo.value) is expected
        records.extend(aclient.tokensaver.records)

    records = list(client.tokensaver.records)  # type: ignore[attr-defined]
    asyncio.run(main())
    assert [r["status"] for r in records] == [fault, fault]
    for r in records:
        assert r["usage"] is None and r["cost_usd"] == 0
        assert r["error"] == expected.__name__


# -- 9. a stream the SDK refuses is not an answer to keep ---------------------------------------


@pytest.mark.parametrize("fault", ["garbage", "error_then_stop"])
@pytest.mark.parametrize("door", ["wrap", "proxy"])
def test_a_stream_the_sdk_refuses_is_not_memoized(
    upstream: Upstream, tmp_path: Path, fault: str, door: str
) -> None:
    upstream.faults.append(fault)
    config = _memo_config(tmp_path)
    proxy = ProxyServer(config, upstream=upstream.url).start() if door == "proxy" else None  # type: ignore[attr-defined]
    try:
        base_url = proxy.url if proxy is not None else upstream.url  # type: ignore[attr-defined]
        base = anthropic.Anthropic(base_url=base_url, api_key="k", max_retries=0, timeout=20)
        client = tokensaver.wrap(base, config=config) if proxy is None else base
        with pytest.raises(Exception):  # noqa: B017 - JSONDecodeError or APIStatusError, as the SDK raises
            with client.messages.stream(**KW) as s:
                s.get_final_message()
        # the same request again: no stored answer, it goes upstream and is answered
        assert client.messages.create(**KW).content[0].text == ANSWER  # type: ignore[union-attr]
    finally:
        if proxy is not None:
            proxy.stop()
    assert len(upstream.calls) == 2
