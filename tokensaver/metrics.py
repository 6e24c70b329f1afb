"""Metrics a fleet can watch: every finished call record, as OpenTelemetry instruments and Prometheus text.

One place emits them: :func:`emit`, called by the pipeline once per call record, after the record is
written (so the figures are the ledger's: calls, tokens, dollars billed, the counterfactual and what
was saved, per stage the way the report credits it, cache reads and writes, short-circuits, plugin
errors by kind, the pipeline's overhead). Two sinks take the same measurements:

- OpenTelemetry through the API package only (``opentelemetry-api``): instruments of the meter
  ``tokensaver`` on the global meter provider (or the one given to :func:`use_meter_provider`). With
  no SDK configured they are no-ops; install ``opentelemetry-sdk`` and an exporter to send them.
- Prometheus (``prometheus_client``), switched on by :func:`prometheus_registry`: the proxy does at
  start and serves it on ``GET /metrics`` (:func:`scrape_handler`); a ``wrap()`` process can serve
  the same registry with ``prometheus_client.start_http_server(port, registry=...)``.

Labels are ``model`` (as the caller named it), ``door`` (``proxy`` or ``wrap``; replays and the
bench count as ``wrap``), ``status``, ``stage`` / ``plugin``, ``hook`` and ``kind`` (an error's kind
without its detail): never the API key, its hash, a conversation or any prompt text, so the number
of series stays that of models x plugins.

Unsafe: nothing here can fail a call. A sink that raises is logged once and the call goes on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger("tokensaver.metrics")

METER = "tokensaver"
# pipeline overhead per call, seconds: typical calls take 1-100 ms of ours
OVERHEAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class Instrument:
    """One metric: its OpenTelemetry name, kind and unit, its Prometheus name, its labels."""

    name: str  # OpenTelemetry instrument name
    kind: str  # "counter" (monotonic), "updown" (a sum that can fall) or "histogram"
    unit: str
    prom: str  # Prometheus name (counters get "_total" from prometheus_client)
    labels: tuple[str, ...]
    doc: str


_CALL = ("model", "door")
# one row per instrument: OpenTelemetry name, kind, unit, Prometheus name, labels, doc
INSTRUMENTS = tuple(Instrument(*row) for row in (
    ("tokensaver.calls", "counter", "{call}", "tokensaver_calls", (*_CALL, "status"), "Messages call attempts recorded, stored answers included"),
    ("tokensaver.tokens.original", "counter", "{token}", "tokensaver_tokens_original", _CALL, "input tokens of the requests as the caller made them (tokensaver's count)"),
    ("tokensaver.tokens.sent", "counter", "{token}", "tokensaver_tokens_sent", _CALL, "input tokens of the requests as sent, after every stage (tokensaver's count)"),
    ("tokensaver.cost.billed", "counter", "USD", "tokensaver_billed_usd", _CALL, "dollars billed for the calls, plugins' own model calls included"),
    ("tokensaver.cost.counterfactual", "counter", "USD", "tokensaver_counterfactual_usd", _CALL, "dollars the caller's own requests would have been billed without tokensaver"),
    ("tokensaver.cost.saved", "updown", "USD", "tokensaver_saved_usd", _CALL, "counterfactual minus billed dollars (below zero when tokensaver cost more)"),
    ("tokensaver.stage.saved", "updown", "USD", "tokensaver_stage_saved_usd", (*_CALL, "stage"), "dollars each stage saved (its short-circuits included, its own model calls deducted)"),
    ("tokensaver.stage.saved_tokens", "updown", "{token}", "tokensaver_stage_saved_tokens", (*_CALL, "stage"), "input tokens each stage removed (its short-circuits' sent tokens included)"),
    ("tokensaver.cache.read", "counter", "{token}", "tokensaver_cache_read_tokens", _CALL, "prompt-cache read tokens billed (calls that reached the API)"),
    ("tokensaver.cache.write", "counter", "{token}", "tokensaver_cache_write_tokens", _CALL, "prompt-cache write tokens billed (calls that reached the API)"),
    ("tokensaver.short_circuits", "counter", "{call}", "tokensaver_short_circuits", (*_CALL, "plugin"), "calls answered by a plugin without the API (memoized answers)"),
    ("tokensaver.plugin.errors", "counter", "{error}", "tokensaver_plugin_errors", ("door", "plugin", "hook", "kind"), "plugin hook calls discarded (fail open): kind raised, timeout, saturated, mutated_input, invalid_output"),
    ("tokensaver.pipeline.overhead", "histogram", "s", "tokensaver_pipeline_overhead_seconds", _CALL, "time tokensaver's pipeline added to a call (stages, lookup, observers, the record)"),
))  # fmt: skip
(
    CALLS, TOKENS_ORIGINAL, TOKENS_SENT, BILLED, COUNTERFACTUAL, SAVED, STAGE_SAVED, STAGE_SAVED_TOKENS,
    CACHE_READ, CACHE_WRITE, SHORT_CIRCUITS, PLUGIN_ERRORS, OVERHEAD,
) = INSTRUMENTS  # fmt: skip

Measurement = tuple[Instrument, float, dict[str, str]]


def _num(value: Any) -> float:
    """A record's number as it is (token counts stay integers), else 0."""
    return value if isinstance(value, int | float) and not isinstance(value, bool) else 0


def measurements(record: dict[str, Any], door: str) -> Iterator[Measurement]:
    """What one call record adds to each instrument, with its labels (the report's reading of it)."""
    model = str(record.get("model") or "")
    call = {"model": model, "door": door}
    sc = record.get("short_circuit")
    sc = str(sc) if sc else None
    yield CALLS, 1, {**call, "status": str(record.get("status"))}
    yield TOKENS_ORIGINAL, _num(record.get("tokens_original")), call
    yield TOKENS_SENT, _num(record.get("tokens_sent")), call
    yield BILLED, _num(record.get("cost_usd")), call
    yield COUNTERFACTUAL, _num(record.get("counterfactual_usd")), call
    yield SAVED, _num(record.get("saved_usd")), call
    stages: dict[str, list[float]] = {}
    for st in record.get("stages") or []:
        if isinstance(st, dict):
            row = stages.setdefault(str(st.get("plugin") or "?"), [0.0, 0.0])
            row[0] += _num(st.get("saved_usd"))
            row[1] += _num(st.get("saved_tokens"))
    if sc:
        # a stored answer saves the whole call: the report credits it to the plugin that gave it
        row = stages.setdefault(sc, [0.0, 0.0])
        row[0] += _num(
            record["short_circuit_usd"] if "short_circuit_usd" in record else record.get("saved_usd")
        )
        row[1] += _num(record.get("tokens_sent"))
        yield SHORT_CIRCUITS, 1, {**call, "plugin": sc}
    for stage, (usd, tokens) in stages.items():
        yield STAGE_SAVED, usd, {**call, "stage": stage}
        yield STAGE_SAVED_TOKENS, tokens, {**call, "stage": stage}
    usage = record.get("usage")
    if isinstance(usage, dict) and not sc:  # a stored answer's usage was billed once, when it was stored
        yield CACHE_READ, _num(usage.get("cache_read_input_tokens")), call
        yield CACHE_WRITE, _num(usage.get("cache_creation_input_tokens")), call
    for err in record.get("errors") or []:
        if isinstance(err, dict):
            # "invalid_output: <rule>": the rule is detail, not a label (it would multiply the series)
            kind = str(err.get("kind") or "raised").split(":", 1)[0]
            labels = {
                "door": door,
                "plugin": str(err.get("plugin") or "?"),
                "hook": str(err.get("hook") or "?"),
            }
            yield PLUGIN_ERRORS, 1, {**labels, "kind": kind}
    yield OVERHEAD, _num(record.get("overhead_ms")) / 1000.0, call


# -- OpenTelemetry ---------------------------------------------------------------------------------


class _Otel:
    """The instruments of one meter."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry import metrics as otel

        from . import __version__

        meter = otel.get_meter(METER, __version__, meter_provider=provider)
        self.instruments: dict[str, Any] = {}
        for ins in INSTRUMENTS:
            if ins.kind == "counter":
                made: Any = meter.create_counter(ins.name, unit=ins.unit, description=ins.doc)
            elif ins.kind == "updown":
                made = meter.create_up_down_counter(ins.name, unit=ins.unit, description=ins.doc)
            else:
                made = meter.create_histogram(
                    ins.name,
                    unit=ins.unit,
                    description=ins.doc,
                    explicit_bucket_boundaries_advisory=list(OVERHEAD_BUCKETS),
                )
            self.instruments[ins.name] = made

    def apply(self, items: list[Measurement]) -> None:
        for ins, value, labels in items:
            made = self.instruments[ins.name]
            if ins.kind == "histogram":
                made.record(value, labels)
            elif value or ins is CALLS:
                made.add(value, labels)


# -- Prometheus ------------------------------------------------------------------------------------


class _Prometheus:
    """The same instruments in a registry of their own (counters, gauges for sums that can fall)."""

    def __init__(self) -> None:
        import prometheus_client as prom

        self.registry = prom.CollectorRegistry(auto_describe=True)
        self.metrics: dict[str, Any] = {}
        for ins in INSTRUMENTS:
            args = (ins.prom, ins.doc, list(ins.labels))
            if ins.kind == "counter":
                made: Any = prom.Counter(*args, registry=self.registry)
            elif ins.kind == "updown":
                made = prom.Gauge(*args, registry=self.registry)
            else:
                made = prom.Histogram(*args, registry=self.registry, buckets=OVERHEAD_BUCKETS)
            self.metrics[ins.name] = made

    def apply(self, items: list[Measurement]) -> None:
        for ins, value, labels in items:
            made = self.metrics[ins.name].labels(**labels)
            if ins.kind == "histogram":
                made.observe(value)
            else:
                made.inc(value)


_lock = threading.Lock()
_provider: Any = None  # None: OpenTelemetry's global meter provider
_otel: _Otel | None = None
_prom: _Prometheus | None = None
_failed: set[str] = set()


def use_meter_provider(provider: Any = None) -> None:
    """Send tokensaver's OpenTelemetry instruments to ``provider`` (None: the global meter provider)."""
    global _provider, _otel
    with _lock:
        _provider, _otel = provider, None


def prometheus_registry() -> Any:
    """The ``prometheus_client.CollectorRegistry`` holding tokensaver's metrics; counting starts here."""
    global _prom
    with _lock:
        if _prom is None:
            _prom = _Prometheus()
        return _prom.registry


def exposition(accept: str = "") -> tuple[bytes, str]:
    """(tokensaver's metrics in the format an ``Accept`` header asks for, its content type).

    Prometheus text 0.0.4 by default; OpenMetrics when the scraper asks for it.
    """
    from prometheus_client.exposition import choose_encoder

    encode, content_type = choose_encoder(accept)
    return encode(prometheus_registry()), content_type


def emit(record: dict[str, Any], door: str) -> None:
    """Add one finished call record to every sink. Never raises."""
    global _otel
    try:
        items = list(measurements(record, door))
        with _lock:
            if _otel is None:
                _otel = _Otel(_provider)
            sinks: list[_Otel | _Prometheus] = [_otel] if _prom is None else [_otel, _prom]
    except Exception as exc:
        _fail("record", exc)
        return
    for sink in sinks:
        try:
            sink.apply(items)
        except Exception as exc:  # a broken exporter or SDK must not fail a paid call
            _fail(type(sink).__name__.strip("_"), exc)


def _fail(where: str, exc: Exception) -> None:
    if where not in _failed:
        _failed.add(where)
        log.warning("metrics (%s) failed, calls go on: %s: %s", where, type(exc).__name__, exc)


def scrape_handler(allowed: Callable[[web.Request], bool]) -> Callable[[web.Request], Any]:
    """An aiohttp handler for ``GET /metrics``; ``allowed`` is the proxy's access check."""
    from aiohttp import web

    prometheus_registry()  # count from the proxy's start, not from the first scrape

    async def metrics(request: web.Request) -> web.StreamResponse:
        if not allowed(request):
            return web.Response(status=401, text="tokensaver proxy: missing or wrong access token\n")
        body, content_type = exposition(request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})

    return metrics
