"""Metrics: what the proxy's ``GET /metrics`` and an OpenTelemetry reader show equals the run ledgers.

A real ``tokensaver proxy`` process in front of the emulator, calls through the anthropic SDK (a
memoized repeat, a plugin that raises, one that overruns its timeout, a session run next to the
default one), then a Prometheus scrape over HTTP; and ``wrap()`` clients with the OpenTelemetry
SDK's in-memory reader. Every figure (calls, tokens, billed, counterfactual and saved dollars, each
stage's saving, cache reads and writes, short-circuits, plugin errors by kind, overhead) is checked
against the sums of the ledgers' records.
"""

from __future__ import annotations

import os
import textwrap
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest
from opentelemetry import metrics as otel_metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from prometheus_client.parser import text_string_to_metric_families

import tokensaver
from tokensaver.config import DEFAULT_PLUGINS
from tokensaver.emulator import Emulator
from tokensaver.plugins import get_plugin_manager
from tokensaver.report import summarize
from tokensaver.run import load_run
from tokensaver.testing import TEST_API_KEY, start_proxy_process, stop_proxy_process

MODEL = "claude-sonnet-4-5"
SYSTEM = "You are a careful assistant who answers in one short sentence. " * 300  # long enough to cache
BOUND = 30.0

BOOM = """
import tokensaver

@tokensaver.hookimpl
def tokensaver_transform_request(body, ctx):
    raise RuntimeError("boom")
"""
SLOW = """
import time
import tokensaver

_first = [True]

@tokensaver.hookimpl
def tokensaver_transform_request(body, ctx):
    if _first:  # only the first call overruns: one timeout, and no plugin left saturated
        _first.clear()
        time.sleep(1.5)
    return None
"""

# (OpenTelemetry instrument, Prometheus sample name): the names dashboards are built on
SUMS = {
    "tokensaver.calls": "tokensaver_calls_total",
    "tokensaver.tokens.original": "tokensaver_tokens_original_total",
    "tokensaver.tokens.sent": "tokensaver_tokens_sent_total",
    "tokensaver.cost.billed": "tokensaver_billed_usd_total",
    "tokensaver.cost.counterfactual": "tokensaver_counterfactual_usd_total",
    "tokensaver.cost.saved": "tokensaver_saved_usd",
    "tokensaver.stage.saved": "tokensaver_stage_saved_usd",
    "tokensaver.stage.saved_tokens": "tokensaver_stage_saved_tokens",
    "tokensaver.cache.read": "tokensaver_cache_read_tokens_total",
    "tokensaver.cache.write": "tokensaver_cache_write_tokens_total",
    "tokensaver.short_circuits": "tokensaver_short_circuits_total",
    "tokensaver.plugin.errors": "tokensaver_plugin_errors_total",
}
OVERHEAD = ("tokensaver.pipeline.overhead", "tokensaver_pipeline_overhead_seconds")

Figures = dict[str, dict[frozenset[tuple[str, str]], float]]


def _config(tmp_path: Path) -> dict[str, Any]:
    return {
        "plugins": [*DEFAULT_PLUGINS, "memoize", "boom", "slow"],
        "runs_dir": str(tmp_path / "runs"),
        "plugin_timeouts": {"slow": 0.3},
        "memoize": {"dir": str(tmp_path / "memo")},
    }


def _toml(cfg: dict[str, Any]) -> str:
    return textwrap.dedent(
        f"""\
        plugins = {cfg["plugins"]!r}
        runs_dir = {cfg["runs_dir"]!r}
        [plugin_timeouts]
        slow = 0.3
        [memoize]
        dir = {cfg["memoize"]["dir"]!r}
        """
    ).replace("'", '"')


def _install(tmp_path: Path) -> Path:
    """A distribution whose ``tokensaver`` entry points are the plugins ``boom`` and ``slow``."""
    site = tmp_path / "site"
    dist = site / "tokensaver_metrics_fake-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tokensaver-metrics-fake\nVersion: 0.1\n")
    tag = uuid.uuid4().hex[:8]
    (site / f"ts_boom_{tag}.py").write_text(BOOM)
    (site / f"ts_slow_{tag}.py").write_text(SLOW)
    (dist / "entry_points.txt").write_text(f"[tokensaver]\nboom = ts_boom_{tag}\nslow = ts_slow_{tag}\n")
    return site


def _module(source: str, name: str) -> Any:
    namespace: dict[str, Any] = {}
    exec(compile(source, name, "exec"), namespace)
    return type(
        name, (), {"tokensaver_transform_request": staticmethod(namespace["tokensaver_transform_request"])}
    )


def _conversation(client: Any) -> None:
    """Three questions, the first again (memoized), and one streamed."""
    for q in ("What is 2 + 2?", "Name a colour.", "What is 3 + 3?", "What is 2 + 2?"):
        client.messages.create(
            model=MODEL, max_tokens=32, system=SYSTEM, messages=[{"role": "user", "content": q}]
        )
    with client.messages.stream(
        model=MODEL, max_tokens=32, system=SYSTEM, messages=[{"role": "user", "content": "And 4 + 4?"}]
    ) as stream:
        stream.get_final_message()


def _expected(records: list[dict[str, Any]], door: str) -> tuple[Figures, tuple[int, float]]:
    """What the metrics must say, summed from the ledgers' records (per stage as the report sums it)."""
    call = frozenset({"model": MODEL, "door": door}.items())
    out: Figures = {name: {} for name in SUMS}

    def add(name: str, labels: frozenset[tuple[str, str]], value: float) -> None:
        out[name][labels] = out[name].get(labels, 0.0) + value

    for r in records:
        assert r["model"] == MODEL
        add("tokensaver.calls", frozenset({**dict(call), "status": str(r["status"])}.items()), 1)
        add("tokensaver.tokens.original", call, r["tokens_original"])
        add("tokensaver.tokens.sent", call, r["tokens_sent"])
        add("tokensaver.cost.billed", call, r["cost_usd"])
        add("tokensaver.cost.counterfactual", call, r["counterfactual_usd"])
        add("tokensaver.cost.saved", call, r["saved_usd"])
        if r["short_circuit"]:
            add(
                "tokensaver.short_circuits",
                frozenset({**dict(call), "plugin": r["short_circuit"]}.items()),
                1,
            )
        else:
            add("tokensaver.cache.read", call, r["usage"]["cache_read_input_tokens"])
            add("tokensaver.cache.write", call, r["usage"]["cache_creation_input_tokens"])
        for e in r["errors"]:
            kind = e["kind"].split(":", 1)[0]
            labels = {"door": door, "plugin": e["plugin"], "hook": e["hook"], "kind": kind}
            add("tokensaver.plugin.errors", frozenset(labels.items()), 1)
    for st in summarize(records)["stages"]:
        labels = frozenset({**dict(call), "stage": st["plugin"]}.items())
        add("tokensaver.stage.saved", labels, st["saved_usd"])
        add("tokensaver.stage.saved_tokens", labels, st["saved_tokens"])
    overhead = (len(records), sum(r["overhead_ms"] for r in records) / 1000)
    return out, overhead


def _check(got: Figures, overhead: tuple[int, float], records: list[dict[str, Any]], door: str) -> None:
    want, want_overhead = _expected(records, door)
    for name in SUMS:
        # a series that stayed at 0 may be left out by a sink
        have = {k: v for k, v in got.get(name, {}).items() if v}
        expect = {k: v for k, v in want[name].items() if v}
        assert have.keys() == expect.keys(), name
        for labels, value in expect.items():
            assert have[labels] == pytest.approx(value, rel=1e-9, abs=1e-9), (name, dict(labels))
    assert overhead[0] == want_overhead[0]
    assert overhead[1] == pytest.approx(want_overhead[1], rel=1e-6, abs=1e-6)
    # what this scenario must have produced, whatever the ledger says
    kinds = Counter((e["plugin"], e["kind"]) for r in records for e in r["errors"])
    assert kinds[("boom", "raised")] == len(records)
    assert kinds[("slow", "timeout")] == 1
    assert sum(1 for r in records if r["short_circuit"] == "memoize") >= 1
    assert sum(r["saved_usd"] for r in records) != 0
    assert sum(r["usage"]["cache_read_input_tokens"] for r in records if not r["short_circuit"]) > 0


# -- the proxy: Prometheus over HTTP ----------------------------------------------------------------


def _scrape(url: str) -> tuple[Figures, tuple[int, float], str]:
    with urllib.request.urlopen(url + "/metrics", timeout=BOUND) as resp:
        assert resp.status == 200
        content_type = resp.headers["Content-Type"]
        text = resp.read().decode()
    by_sample = {prom: name for name, prom in SUMS.items()}
    got: Figures = {}
    count, total = 0, 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in by_sample:
                series = got.setdefault(by_sample[s.name], {})
                key = frozenset(s.labels.items())
                series[key] = series.get(key, 0.0) + s.value
            elif s.name == OVERHEAD[1] + "_count":
                count += int(s.value)
            elif s.name == OVERHEAD[1] + "_sum":
                total += s.value
    return got, (count, total), content_type


def test_proxy_metrics_scrape_equals_the_ledgers(emu: Emulator, tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    (tmp_path / "tokensaver.toml").write_text(_toml(cfg))
    site = _install(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    proc, url = start_proxy_process(
        "--upstream", emu.url, "--run", "metrics-default", "--config", str(tmp_path / "tokensaver.toml"),
        env=env, cwd=tmp_path,
    )  # fmt: skip
    try:
        for headers in ({}, {"x-tokensaver-run": "metrics-session"}):
            client = anthropic.Anthropic(
                base_url=url, api_key=TEST_API_KEY, max_retries=0, timeout=BOUND, default_headers=headers
            )
            with client:
                _conversation(client)
        got, overhead, content_type = _scrape(url)
    finally:
        stop_proxy_process(proc)
    runs = Path(cfg["runs_dir"])
    records = [*load_run("metrics-default", runs).records(), *load_run("metrics-session", runs).records()]
    assert len(records) == 10
    assert content_type.startswith("text/plain; version=0.0.4")
    _check(got, overhead, records, "proxy")


# -- wrap(): OpenTelemetry's in-memory reader --------------------------------------------------------


@pytest.fixture(scope="module")
def global_reader() -> Iterator[InMemoryMetricReader]:
    """An in-memory reader on OpenTelemetry's global meter provider (settable once per process)."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    otel_metrics.set_meter_provider(provider)
    if otel_metrics.get_meter_provider() is not provider:
        pytest.fail("another global meter provider was set in this process before this test's")
    yield reader


def _read(reader: InMemoryMetricReader) -> tuple[Figures, tuple[int, float]]:
    """Cumulative figures of the ``tokensaver`` meter."""
    got: Figures = {}
    count, total = 0, 0.0
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            if sm.scope.name != "tokensaver":
                continue
            for m in sm.metrics:
                for p in m.data.data_points:
                    if isinstance(p, HistogramDataPoint):
                        assert m.name == OVERHEAD[0]
                        count, total = count + p.count, total + p.sum
                    else:
                        key = frozenset((k, str(v)) for k, v in (p.attributes or {}).items())
                        got.setdefault(m.name, {})[key] = float(p.value)
    return got, (count, total)


def _minus(after: tuple[Figures, tuple[int, float]], before: tuple[Figures, tuple[int, float]]) -> Any:
    figures = {
        name: {k: v - before[0].get(name, {}).get(k, 0.0) for k, v in series.items()}
        for name, series in after[0].items()
    }
    return figures, (after[1][0] - before[1][0], after[1][1] - before[1][1])


def _wrapped(emu: Emulator, tmp_path: Path, asynchronous: bool = False) -> Any:
    pm = get_plugin_manager({"boom": _module(BOOM, "boom"), "slow": _module(SLOW, "slow")})
    cls = anthropic.AsyncAnthropic if asynchronous else anthropic.Anthropic
    base = cls(base_url=emu.url, api_key=TEST_API_KEY, max_retries=0, timeout=BOUND)
    return tokensaver.wrap(base, config=_config(tmp_path), plugin_manager=pm, run="metrics-wrap")


def test_wrap_metrics_reach_the_global_meter_provider(
    emu: Emulator, tmp_path: Path, global_reader: InMemoryMetricReader
) -> None:
    before = _read(global_reader)
    client = _wrapped(emu, tmp_path)
    with client:
        _conversation(client)
    got, overhead = _minus(_read(global_reader), before)
    records = client.tokensaver.run.records()
    assert len(records) == 5
    _check(got, overhead, records, "wrap")


def test_wrap_metrics_to_a_meter_provider_of_their_own(
    emu: Emulator, tmp_path: Path, global_reader: InMemoryMetricReader
) -> None:
    import asyncio

    from tokensaver import metrics

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    global_before = _read(global_reader)
    metrics.use_meter_provider(provider)
    try:
        client = _wrapped(emu, tmp_path, asynchronous=True)

        async def scenario() -> None:
            async with client:
                for q in ("What is 2 + 2?", "Name a colour.", "What is 3 + 3?", "What is 2 + 2?"):
                    await client.messages.create(
                        model=MODEL, max_tokens=32, system=SYSTEM, messages=[{"role": "user", "content": q}]
                    )
                async with client.messages.stream(
                    model=MODEL,
                    max_tokens=32,
                    system=SYSTEM,
                    messages=[{"role": "user", "content": "And 4 + 4?"}],
                ) as stream:
                    await stream.get_final_message()

        asyncio.run(asyncio.wait_for(scenario(), BOUND * 4))
    finally:
        metrics.use_meter_provider(None)
        provider.shutdown()
    records = client.tokensaver.run.records()
    assert len(records) == 5
    got, overhead = _read(reader)
    _check(got, overhead, records, "wrap")
    # and nothing of it went to the global provider
    moved, _ = _minus(_read(global_reader), global_before)
    assert not any(v for series in moved.values() for v in series.values())


# -- the endpoint itself -----------------------------------------------------------------------------


def test_metrics_endpoint_is_the_proxys_own_behind_its_token(emu: Emulator, tmp_path: Path) -> None:
    import httpx2

    from tokensaver.proxy import ProxyServer

    cfg = {"runs_dir": str(tmp_path / "runs"), "record": False}
    with ProxyServer(cfg, upstream=emu.url, token="t0ken") as p, httpx2.Client(timeout=BOUND) as http:
        client = anthropic.Anthropic(
            base_url=p.url, api_key=TEST_API_KEY, max_retries=0, timeout=BOUND,
            default_headers={"x-tokensaver-proxy-token": "t0ken"},
        )  # fmt: skip
        with client:
            client.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}])
        assert http.get(p.url + "/metrics").status_code == 401
        assert http.get(p.url + "/metrics", auth=("prometheus", "wrong")).status_code == 401
        for ok in (
            http.get(p.url + "/metrics", auth=("prometheus", "t0ken")),
            http.get(p.url + "/metrics", headers={"x-tokensaver-proxy-token": "t0ken"}),
        ):
            assert ok.status_code == 200
            assert 'tokensaver_calls_total{door="proxy",model="claude-sonnet-4-5",status="200"}' in ok.text
        openmetrics = http.get(
            p.url + "/metrics",
            headers={
                "x-tokensaver-proxy-token": "t0ken",
                "Accept": "application/openmetrics-text; version=1.0.0",
            },
        )
        assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
        assert openmetrics.text.rstrip().endswith("# EOF")
    # answered by the proxy: the API never saw a request for it
    assert [r.path for r in emu.requests] == ["/v1/messages"]
