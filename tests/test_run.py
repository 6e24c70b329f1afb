"""The run ledger: append-only JSONL, readable by other processes, never holding an API key."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tokensaver.errors import TokensaverError
from tokensaver.run import Run, latest_run, list_runs, load_run


def call(i: int, **extra) -> dict:
    rec = {
        "id": f"c-{i}",
        "conversation": "a" * 16,
        "model": "claude-sonnet-4-5",
        "tokens_original": 1000 + i,
        "tokens_sent": 800,
        "usage": {"input_tokens": 10 * i, "output_tokens": i},
        "cost_usd": 0.01 * i,
        "counterfactual_usd": 0.02 * i,
        "auto_usd": 0.015 * i,
        "saved_usd": 0.01 * i,
        "overhead_ms": float(i),
    }
    rec.update(extra)
    return rec


def test_header_then_one_line_per_record(tmp_path: Path) -> None:
    run = Run("r1", runs_dir=tmp_path, config={"plugins": ["prune"]})
    assert not run.path.exists()  # nothing is written until the first record
    run.append(call(1))
    run.append(call(2))
    lines = run.path.read_text().splitlines()
    assert len(lines) == 3
    header = json.loads(lines[0])
    assert header["type"] == "run" and header["name"] == "r1"
    assert header["config"] == {"plugins": ["prune"]}
    assert isinstance(header["created"], float)
    assert [json.loads(x)["type"] for x in lines[1:]] == ["call", "call"]
    assert [r["id"] for r in run.records()] == ["c-1", "c-2"]
    assert run.path == tmp_path / "r1.jsonl"
    assert run.meta["name"] == "r1"


def test_append_does_not_mutate_the_callers_record(tmp_path: Path) -> None:
    rec = call(1)
    Run("r", runs_dir=tmp_path).append(rec)
    assert "type" not in rec


def test_default_name_is_timestamped_and_unique(tmp_path: Path) -> None:
    names = {Run(runs_dir=tmp_path).name for _ in range(20)}
    assert len(names) == 20
    for name in names:
        assert re.fullmatch(r"run-\d{8}-\d{6}-[0-9a-f]{8}", name)


def test_run_names_started_in_the_same_second_do_not_meet() -> None:
    """1,000 runs named in one second (a fleet of agents starting at once): no two share a ledger
    (with 4 random hex digits, 1,000 names met with a probability of 99.95%)."""
    from tokensaver.run import new_run_name

    assert len({new_run_name(now=1_700_000_000.0) for _ in range(1000)}) == 1000


def test_default_runs_dir_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TOKENSAVER_RUNS_DIR", str(tmp_path / "elsewhere"))
    run = Run("x")
    run.append(call(1))
    assert (tmp_path / "elsewhere" / "x.jsonl").is_file()
    assert [r["name"] for r in list_runs()] == ["x"]


@pytest.mark.parametrize("bad", ["../escape", "a/b", ".hidden", ""])
def test_run_names_cannot_leave_the_runs_dir(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError):
        Run(bad, runs_dir=tmp_path)


@pytest.mark.parametrize(
    "record",
    [
        call(1, error="bad key sk-ant-api03-abcdef"),
        call(1, plugins={"memoize": {"headers": ["x", {"auth": "sk-ant-api03-zzz"}]}}),
        call(1, plugins={"sk-ant-api03-as-a-key": 1}),
    ],
)
def test_append_redacts_api_keys(tmp_path: Path, record: dict, caplog: pytest.LogCaptureFixture) -> None:
    run = Run("r", runs_dir=tmp_path)
    run.append(call(0))
    with caplog.at_level(logging.WARNING, logger="tokensaver.run"):
        kept = run.append(record)  # never raises: the call it records has been paid for
    assert "sk-ant-" not in caplog.text  # the warning itself must not leak the key
    assert "sk-ant-" not in run.path.read_text() and "sk-ant-" not in str(kept)
    assert [r.get("redacted") for r in run.records()] == [None, True]
    assert "sk-ant-" in str(record)  # the caller's record is left as it was


def test_config_with_an_api_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Run("r", runs_dir=tmp_path, config={"api_key": "sk-ant-api03-secret"})


def test_threads_append_whole_lines(tmp_path: Path) -> None:
    run = Run("t", runs_dir=tmp_path)
    pad = "x" * 5000  # long lines make interleaving visible if writes were not atomic

    def work(k: int) -> None:
        for i in range(50):
            run.append(call(i, id=f"c-{k}-{i}", plugins={"pad": pad}))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = run.path.read_text().splitlines()
    assert sum(json.loads(x)["type"] == "run" for x in lines) == 1
    ids = [r["id"] for r in run.records()]
    assert len(ids) == 400 and len(set(ids)) == 400


def test_truncated_last_line_is_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = Run("cut", runs_dir=tmp_path)
    run.append(call(1))
    run.append(call(2))
    with open(run.path, "a") as f:
        f.write('{"type": "call", "id": "c-3", "tokens_')  # a writer in the middle of a line
    with caplog.at_level(logging.WARNING, logger="tokensaver.run"):
        recs = load_run("cut", tmp_path).records()
    assert [r["id"] for r in recs] == ["c-1", "c-2"]
    assert "truncated" in caplog.text


def test_existing_run_is_continued_not_rewritten(tmp_path: Path) -> None:
    first = Run("same", runs_dir=tmp_path, config={"plugins": ["a"]})
    first.append(call(1))
    again = Run("same", runs_dir=tmp_path, config={"plugins": ["b"]})
    again.append(call(2))
    assert again.meta["config"] == {"plugins": ["a"]}
    assert again.meta["created"] == first.meta["created"]
    assert [r["id"] for r in load_run("same", tmp_path).records()] == ["c-1", "c-2"]


def test_load_run_written_by_another_process(tmp_path: Path) -> None:
    code = (
        "import sys; from tokensaver.run import Run\n"
        "r = Run('other', runs_dir=sys.argv[1], config={'plugins': ['prune']})\n"
        "for i in range(3): r.append({'id': f'c-{i}', 'saved_usd': 0.5})\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    run = load_run("other", runs_dir=tmp_path)
    assert run.meta["config"]["plugins"] == ["prune"]
    assert [r["id"] for r in run.records()] == ["c-0", "c-1", "c-2"]
    assert run.summary()["saved_usd"] == pytest.approx(1.5)


def test_load_run_by_path(tmp_path: Path) -> None:
    Run("p", runs_dir=tmp_path).append(call(1))
    assert load_run(str(tmp_path / "p.jsonl")).name == "p"


def test_missing_run_lists_the_runs_that_exist(tmp_path: Path) -> None:
    Run("alpha", runs_dir=tmp_path).append(call(1))
    Run("beta", runs_dir=tmp_path).append(call(1))
    with pytest.raises(TokensaverError, match="nope") as exc:
        load_run("nope", runs_dir=tmp_path)
    assert "alpha" in str(exc.value) and "beta" in str(exc.value)
    with pytest.raises(TokensaverError, match="no runs"):
        load_run("nope", runs_dir=tmp_path / "empty")


def _write_run(directory: Path, name: str, created: float, saved: list[float]) -> None:
    lines = [{"type": "run", "name": name, "created": created, "config": {}}]
    lines += [{"type": "call", "id": f"c-{i}", "saved_usd": s} for i, s in enumerate(saved)]
    (directory / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_list_runs_newest_first(tmp_path: Path) -> None:
    _write_run(tmp_path, "old", 1000.0, [0.25])
    _write_run(tmp_path, "new", 3000.0, [0.5, 0.25])
    _write_run(tmp_path, "mid", 2000.0, [])
    runs = list_runs(tmp_path)
    assert [r["name"] for r in runs] == ["new", "mid", "old"]
    assert [r["calls"] for r in runs] == [2, 0, 1]
    assert runs[0]["saved_usd"] == pytest.approx(0.75)
    assert runs[0]["created"] == 3000.0
    assert latest_run(tmp_path).name == "new"
    assert list_runs(tmp_path / "missing") == []


def test_summary_totals(tmp_path: Path) -> None:
    run = Run("s", runs_dir=tmp_path)
    recs = [
        call(
            1,
            stages=[
                {
                    "plugin": "prune",
                    "before": 1001,
                    "after": 800,
                    "ms": 1.0,
                    "saved_tokens": 201,
                    "saved_usd": 0.002,
                }
            ],
        ),
        call(2, price_warning="unknown model 'claude-x': priced as claude-sonnet-4-5"),
        call(3, short_circuit="memoize", cost_usd=0.0),
        call(
            4, errors=[{"plugin": "prune", "hook": "tokensaver_observe_response", "error": "KeyError: 'x'"}]
        ),
    ]
    for r in recs:
        run.append(r)
    s = run.summary()
    billed = [r for r in recs if not r.get("short_circuit")]
    assert s["calls"] == 4
    assert s["short_circuited"] == 1
    assert s["tokens_original"] == sum(r["tokens_original"] for r in recs)
    assert s["tokens_sent"] == 800 * 4
    assert s["usage"]["input_tokens"] == sum(r["usage"]["input_tokens"] for r in billed)
    assert s["usage"]["output_tokens"] == sum(r["usage"]["output_tokens"] for r in billed)
    assert s["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in recs))
    assert s["counterfactual_usd"] == pytest.approx(sum(r["counterfactual_usd"] for r in recs))
    assert s["auto_usd"] == pytest.approx(sum(r["auto_usd"] for r in recs))
    assert s["saved_pct"] == pytest.approx(100 * s["saved_usd"] / s["counterfactual_usd"])
    assert s["saved_usd"] == pytest.approx(sum(r["saved_usd"] for r in recs))
    assert s["stages"]["prune"]["saved_tokens"] == 201
    assert s["stages"]["prune"]["saved_usd"] == pytest.approx(0.002)
    assert s["stages"]["prune"]["errors"] == 1
    assert s["stages"]["memoize"]["short_circuits"] == 1
    assert s["plugin_errors"] == 1
    assert s["overhead_p50_ms"] == 2.0 and s["overhead_p95_ms"] == 4.0
    assert s["price_warnings"] == ["unknown model 'claude-x': priced as claude-sonnet-4-5"]


def test_empty_run(tmp_path: Path) -> None:
    run = Run("e", runs_dir=tmp_path)
    assert run.records() == []
    s = run.summary()
    assert s["calls"] == 0 and s["saved_usd"] == 0 and s["overhead_p50_ms"] is None
