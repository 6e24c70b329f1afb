"""``tokensaver bench --load``, tiny: a handful of requests through 1 proxy and through 3 behind round-robin.

Real parts: ``tokensaver proxy`` subprocesses sharing a real ``redis-server`` (``$TOKENSAVER_TEST_REDIS_URL``
as ``.ci/run`` exports it, else one started here; without either the test skips saying why, unless
``TOKENSAVER_REQUIRE_REDIS=1``), the bench's own command line and renderings. No timing assertions:
every request answered, the table's structure, and the bodies the three replicas sent upstream for
each conversation's turns byte-identical to the single proxy's.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tokensaver.bench import main as bench_main
from tokensaver.bench.load import LOAD_HEADERS
from tokensaver.bench.render import render
from tokensaver.testing import redis_url_for_test
from tokensaver.traces import fixtures_dir


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    with redis_url_for_test(tmp_path) as url:
        yield url


def _keys(url: str) -> int:
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        return sum(1 for _ in client.scan_iter("tokensaver:*", count=1000))
    finally:
        client.close()


def test_bench_load_answers_every_request_and_replicas_send_the_same_bytes(
    redis_url: str, tmp_path: Path
) -> None:
    parser = argparse.ArgumentParser()
    bench_main.add_arguments(parser)
    out = tmp_path / "load.json"
    fx = fixtures_dir()
    assert fx is not None
    args = parser.parse_args(
        [str(fx), "--load", "--load-requests", "6", "--load-clients", "2", "--load-seconds", "120"]
        + ["--load-redis", redis_url, "-f", "json", "-o", str(out), "-q"]
    )
    keys_before = _keys(redis_url)
    assert bench_main.run(args) == 0  # exit 1 when a request went unanswered
    data = json.loads(out.read_text())
    load = data["load"]

    assert [r["setup"] for r in load["rows"]] == ["direct", "1 proxy", "3 proxies, round-robin"]
    assert [r["proxies"] for r in load["rows"]] == [0, 1, 3]
    for row in load["rows"]:
        assert row["requests"] == 6 and row["answered"] == 6, row
        assert row["errors"] == 0 and row["not_sent"] == 0, row
        assert row["clients"] == 2 and row["rps"] > 0
        assert row["p50_ms"] <= row["p95_ms"]
        assert {"added_p50_ms", "added_p95_ms"} <= set(row)
        if row["proxies"]:  # the proxies' ledgers: the pipeline's own time per call
            assert row["pipeline_p50_ms"] is not None and row["pipeline_p50_ms"] <= row["pipeline_p95_ms"]
    assert load["conversations"] >= 2 and set(load["body_tokens"]) == {"10k", "50k"}

    # the proxies did their work on the way (cache_align, prune...), and Redis held their state
    assert load["transformed"] >= 1
    assert _keys(redis_url) > keys_before
    # every turn of every conversation reached the upstream through the replicas as through one proxy
    assert load["bodies"]["3_vs_1"] == {"compared": 6, "identical": 6, "differ": []}

    table = render(data, "table")
    assert "3 proxies, round-robin" in table and "added p50" in table
    md = render(data, "md")
    assert "| " + " | ".join(LOAD_HEADERS) + " |" in md
    assert md.count("\n| ") == 1 + 3  # the header and a row per setup (the separator starts with |-)
