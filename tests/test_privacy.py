"""Privacy of what tokensaver writes: no prompt text in the ledger, a record never fails a paid call,
every file owner-only (0600 in 0700 folders), and a ledger cut mid-line keeps the next record.

Real HTTP throughout: the anthropic SDK to the emulator, directly through ``wrap()`` and through the
proxy; real files under ``tmp_path``.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest

import tokensaver
from tokensaver.bench.headroom import offline_env
from tokensaver.cli import main as cli_main
from tokensaver.emulator import Emulator
from tokensaver.proxy import ProxyServer
from tokensaver.run import Run, load_run

MODEL = "claude-sonnet-4-6"
FILLER = " ".join(f"Rule {i}: answer politely about topic zanzibar-quokka-{i}." for i in range(60))
# an agent read a .env file, then the file changed: the first differing character comes before the
# key, so a 40-character excerpt of the change would hold "sk-ant-"
ENV_1 = ".env:\nOLD_ANTHROPIC_API_KEY=sk-ant-api03-prod-secret\nPORT=8080\n" + FILLER
ENV_2 = ".env:\nNEW_ANTHROPIC_API_KEY=sk-ant-api03-prod-secret\nPORT=8080\n" + FILLER
PROMPT_MARKS = [
    "sk-ant-",
    "api03",
    "prod-secret",
    "PORT=8080",
    "ANTHROPIC_API_KEY",
    "zanzibar-quokka",
    "deploy",
]


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask, so that a file created without an explicit mode would come out 0644."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def ask(client: Any, system: str, env: str | None = None) -> Any:
    """One call; with ``env``, a conversation whose third message holds the .env file the agent read."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Deploy the service."}]
    if env is not None:
        messages += [
            {"role": "assistant", "content": "I read the .env file."},
            {"role": "user", "content": env},
        ]
    return client.messages.create(model=MODEL, max_tokens=32, system=system, messages=messages)


def assert_no_prompt_text(data: bytes) -> None:
    for mark in PROMPT_MARKS:
        assert mark.encode() not in data, mark


# -- a changed prompt block that holds a key -------------------------------------------------------


def test_wrap_bust_in_a_block_holding_a_key_returns_and_records_structure_only(
    emulator: Emulator, tmp_path: Path
) -> None:
    base = anthropic.Anthropic(base_url=emulator.url, api_key="test-key", max_retries=0)
    client = tokensaver.wrap(
        base, config={"plugins": ["cache_align"], "runs_dir": str(tmp_path / "runs")}, run="bust"
    )
    ask(client, "You are a deploy agent.", ENV_1)
    msg = ask(client, "You are a deploy agent.", ENV_2)  # raised ValueError after the API had answered
    assert msg.content[0].text
    assert len(emulator.requests) == 2
    ledger = tmp_path / "runs" / "bust.jsonl"
    recs = load_run("bust", tmp_path / "runs").records()
    assert [r["status"] for r in recs] == [200, 200]
    bust = recs[1]["plugins"]["cache_align"]["bust"]
    assert bust["at"] == "messages[2].content[0]" and bust["kind"] == "text"
    assert bust["char"] == ENV_1.index("OLD")
    assert bust["was_hash"] != bust["now_hash"] and bust["was_tokens"] > 0 and bust["now_tokens"] > 0
    assert "was" not in bust and "now" not in bust
    assert "redacted" not in recs[1]  # nothing to redact: the diagnosis holds no text
    assert_no_prompt_text(ledger.read_bytes())


def test_moved_volatile_lines_are_recorded_as_counts_not_text(emulator: Emulator, tmp_path: Path) -> None:
    base = anthropic.Anthropic(base_url=emulator.url, api_key="test-key", max_retries=0)
    client = tokensaver.wrap(
        base, config={"plugins": ["cache_align"], "runs_dir": str(tmp_path / "runs")}, run="moved"
    )
    for day in ("01", "02"):
        # a volatile system line (it changes every call) that also holds a key
        ask(client, f"Current time: 2025-01-{day}T10:00:00Z token=sk-ant-api03-moved-secret\n" + FILLER)
    recs = load_run("moved", tmp_path / "runs").records()
    notes = recs[1]["plugins"]["cache_align"]
    assert (
        notes["moved"]["lines"] == 1 and notes["moved"]["chars"] > 0 and notes["moved"]["to"] == "messages[0]"
    )
    assert notes["bust"]["at"] == "system[0]" and notes["bust"]["char"] == 0
    data = (tmp_path / "runs" / "moved.jsonl").read_bytes()
    for mark in ("moved-secret", "2025-01-0", "sk-ant-", "Current time"):
        assert mark.encode() not in data
    report = client.tokensaver.run.report().to_markdown()
    assert "moved-secret" not in report and "1 line" in report


def test_proxy_bust_in_a_block_holding_a_key_answers_200_with_one_upstream_call(
    emulator: Emulator, tmp_path: Path
) -> None:
    config = {"plugins": ["cache_align"], "runs_dir": str(tmp_path / "runs")}
    with ProxyServer(config, upstream=emulator.url, run="proxy-bust") as proxy:
        # the SDK's own retries on: a 500 from the proxy would be retried and paid twice
        client = anthropic.Anthropic(base_url=proxy.url, api_key="test-key", max_retries=2, timeout=30)
        ask(client, "You are a deploy agent.", ENV_1)
        raw = client.messages.with_raw_response.create(
            model=MODEL,
            max_tokens=32,
            system="You are a deploy agent.",
            messages=[
                {"role": "user", "content": "Deploy the service."},
                {"role": "assistant", "content": "I read the .env file."},
                {"role": "user", "content": ENV_2},
            ],
        )
        assert raw.status_code == 200
        assert raw.retries_taken == 0
    assert len(emulator.requests) == 2  # exactly one upstream call per call
    recs = load_run("proxy-bust", tmp_path / "runs").records()
    assert [r["status"] for r in recs] == [200, 200]
    assert "bust" in recs[1]["plugins"]["cache_align"]
    assert_no_prompt_text((tmp_path / "runs" / "proxy-bust.jsonl").read_bytes())


# -- recording never fails the call ----------------------------------------------------------------


class LeakyNote:
    """A third-party plugin that records a note holding a key."""

    @tokensaver.hookimpl
    def tokensaver_transform_request(self, body: dict[str, Any], ctx: Any) -> None:
        ctx.record(note="read .env: sk-ant-api03-LEAKEDVALUE", **{"sk-ant-api03-KEYASKEY": 1}, fine="ok")


def leaky_client(emulator: Emulator, tmp_path: Path, run: str) -> Any:
    pm = tokensaver.get_plugin_manager({"leaky": LeakyNote()}, load_entrypoints=False)
    base = anthropic.Anthropic(base_url=emulator.url, api_key="test-key", max_retries=0)
    return tokensaver.wrap(
        base, config={"plugins": ["leaky"], "runs_dir": str(tmp_path / "runs")}, run=run, plugin_manager=pm
    )


def test_a_plugin_note_with_a_key_is_redacted_not_raised(
    emulator: Emulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = leaky_client(emulator, tmp_path, "leaky")
    with caplog.at_level(logging.WARNING, logger="tokensaver"):
        msg = ask(client, "Be brief.")
    assert msg.content[0].text
    (rec,) = load_run("leaky", tmp_path / "runs").records()
    assert rec["redacted"] is True and rec["status"] == 200
    assert rec["plugins"]["leaky"]["fine"] == "ok"
    data = (tmp_path / "runs" / "leaky.jsonl").read_bytes()
    for secret in ("sk-ant-", "LEAKEDVALUE", "KEYASKEY"):
        assert secret.encode() not in data
        assert secret not in caplog.text
        assert secret not in str(client.tokensaver.records[-1])  # nor in the records kept in memory
    assert "redacted" in caplog.text and "leaky" in caplog.text


def test_a_ledger_that_cannot_be_written_never_fails_the_call(
    emulator: Emulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = leaky_client(emulator, tmp_path, "broken")
    ledger = tmp_path / "runs" / "broken.jsonl"
    ledger.mkdir(parents=True)  # a real I/O error on every write: the ledger path is a folder
    with caplog.at_level(logging.WARNING, logger="tokensaver"):
        msg = ask(client, "Be brief.")
        again = ask(client, "Be brief, again.")
    assert msg.content[0].text and again.content[0].text
    kept = list(client.tokensaver.records)
    assert len(kept) == 2 and all(r["status"] == 200 for r in kept)
    assert all("IsADirectoryError" in r["ledger_error"] for r in kept)
    assert "cannot write" in caplog.text and "sk-ant-" not in caplog.text
    # a new client (or a proxy session) on that run is built all the same, and its call answered
    with caplog.at_level(logging.WARNING, logger="tokensaver"):
        third = ask(leaky_client(emulator, tmp_path, "broken"), "Be brief.")
    assert third.content[0].text


# -- file modes ------------------------------------------------------------------------------------


def test_ledger_is_0600_in_0700_folders(tmp_path: Path, umask_022: None) -> None:
    runs = tmp_path / "state" / "runs"
    run = Run("r", runs_dir=runs)
    run.append({"id": "c-1"})
    assert mode(run.path) == 0o600
    assert mode(runs) == 0o700 and mode(runs.parent) == 0o700


def test_existing_open_runs_dir_and_ledger_are_tightened(tmp_path: Path, umask_022: None) -> None:
    runs = tmp_path / "runs"
    runs.mkdir(mode=0o755)
    old = runs / "old.jsonl"
    old.write_text('{"type":"run","name":"old","created":1,"config":{}}\n')
    old.chmod(0o644)
    Run("old", runs_dir=runs).append({"id": "c-1"})
    assert mode(runs) == 0o700 and mode(old) == 0o600
    assert [r["id"] for r in load_run("old", runs).records()] == ["c-1"]


def test_a_runs_dir_holding_other_files_is_not_chmodded(tmp_path: Path, umask_022: None) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    (shared / "notes.txt").write_text("the user's own file")
    run = Run("r", runs_dir=shared)
    run.append({"id": "c-1"})
    assert mode(shared) == 0o755  # not ours to lock: the user keeps other things here
    assert mode(run.path) == 0o600


def test_report_output_is_0600_and_its_new_folders_0700(tmp_path: Path, umask_022: None) -> None:
    runs = tmp_path / "runs"
    Run("r", runs_dir=runs).append({"id": "c-1", "status": 200})
    out = tmp_path / "reports" / "deep" / "r.md"
    assert cli_main(["report", "r", "--runs-dir", str(runs), "-f", "md", "-o", str(out)]) == 0
    assert out.read_text().strip()
    assert mode(out) == 0o600 and mode(out.parent) == 0o700 and mode(out.parent.parent) == 0o700
    # a report written before (0644) is tightened before the new text goes in
    old = tmp_path / "old.html"
    old.write_text("old")
    old.chmod(0o644)
    assert cli_main(["report", "r", "--runs-dir", str(runs), "-f", "html", "-o", str(old)]) == 0
    assert mode(old) == 0o600 and "<html" in old.read_text().lower()


def test_headroom_workspace_is_private(tmp_path: Path, umask_022: None) -> None:
    env = offline_env(str(tmp_path / "hr"))
    for key in ("TIKTOKEN_CACHE_DIR", "HEADROOM_WORKSPACE_DIR"):
        assert mode(Path(env[key])) == 0o700
    assert mode(tmp_path / "hr") == 0o700
    for f in Path(env["TIKTOKEN_CACHE_DIR"]).iterdir():
        assert mode(f) == 0o600


def test_plugin_stores_are_0600_in_0700(emulator: Emulator, tmp_path: Path, umask_022: None) -> None:
    cache = Path(os.environ["TOKENSAVER_CACHE_DIR"])
    base = anthropic.Anthropic(base_url=emulator.url, api_key="test-key", max_retries=0)
    client = tokensaver.wrap(base, config={"plugins": ["memoize"], "record": False})
    for _ in range(2):
        ask(client, "Be brief.")
    assert len(emulator.requests) == 1  # the second call was served from the store
    found = list(cache.rglob("*"))
    assert any(p.is_file() for p in found)
    for p in found:
        assert mode(p) == (0o700 if p.is_dir() else 0o600), p


# -- a ledger cut mid-line -------------------------------------------------------------------------


def test_a_record_appended_after_a_cut_line_is_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = Run("cut", runs_dir=tmp_path)
    run.append({"id": "c-1"})
    with open(run.path, "a") as f:
        f.write('{"type": "call", "id": "c-2", "tokens_')  # kill -9 in the middle of a write
    again = Run("cut", runs_dir=tmp_path)  # a restart continues the run
    again.append({"id": "c-3"})
    again.append({"id": "c-4"})
    with caplog.at_level(logging.WARNING, logger="tokensaver.run"):
        ids = [r["id"] for r in load_run("cut", tmp_path).records()]
    assert ids == ["c-1", "c-3", "c-4"]
    assert "unreadable line" in caplog.text
