"""The ``tokensaver`` command: ``runs``, ``report``, and dispatch to the other modules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from tokensaver import cli
from tokensaver.report import fmt_usd


def write_run(directory: Path, name: str, created: float, saved: list[float]) -> None:
    lines = [{"type": "run", "name": name, "created": created, "config": {"plugins": []}}]
    for i, s in enumerate(saved):
        lines.append(
            {
                "type": "call",
                "id": f"c-{i}",
                "conversation": "c" * 16,
                "model": "claude-sonnet-4-5",
                "tokens_original": 1000,
                "tokens_sent": 600,
                "usage": {"input_tokens": 600, "output_tokens": 50},
                "cost_usd": 0.25,
                "baseline_usd": 0.25 + s,
                "saved_usd": s,
                "overhead_ms": 1.0,
            }
        )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    d = tmp_path / "runs"
    write_run(d, "older", 1000.0, [0.5])
    write_run(d, "newer", 2000.0, [0.125, 0.125])
    return d


def test_runs_lists_newest_first(runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["runs", "--runs-dir", str(runs)]) == 0
    out = capsys.readouterr().out
    assert out.index("newer") < out.index("older")
    newer = next(x for x in out.splitlines() if x.startswith("newer"))
    assert fmt_usd(0.25) in newer and " 2 " in newer


def test_runs_json(runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["runs", "--runs-dir", str(runs), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in data] == ["newer", "older"]


def test_runs_when_there_are_none(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["runs", "--runs-dir", str(tmp_path / "none")]) == 0
    assert "no runs" in capsys.readouterr().out


def test_report_defaults_to_the_newest_run(runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["report", "--runs-dir", str(runs), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["run"]["name"] == "newer"
    assert data["totals"]["calls"] == 2
    assert data["totals"]["saved_usd"] == pytest.approx(0.25)


@pytest.mark.parametrize(
    "fmt,marker", [("table", "Totals"), ("md", "# tokensaver run"), ("html", "<!DOCTYPE html>")]
)
def test_report_formats(runs: Path, capsys: pytest.CaptureFixture[str], fmt: str, marker: str) -> None:
    assert cli.main(["report", "older", "--runs-dir", str(runs), "--format", fmt]) == 0
    out = capsys.readouterr().out
    assert marker in out and "older" in out
    assert fmt_usd(0.5) in out


def test_report_to_file(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "out" / "r.html"
    assert cli.main(["report", "older", "--runs-dir", str(runs), "--format", "html", "-o", str(target)]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert str(target) in captured.err
    assert target.read_text().startswith("<!DOCTYPE html>")


def test_missing_run_is_one_clean_line(runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["report", "nope", "--runs-dir", str(runs)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "nope" in err and "newer" in err and "older" in err
    assert "Traceback" not in err


def test_report_without_any_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["report", "--runs-dir", str(tmp_path)]) == 2
    assert "no runs" in capsys.readouterr().err


def test_no_subcommand_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "report" in capsys.readouterr().err


def test_unavailable_module_only_breaks_its_own_subcommand(
    monkeypatch: pytest.MonkeyPatch, runs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(cli.SUBCOMMANDS, "ghost", ("tokensaver._no_such_module", "add", "run", "a ghost"))
    assert cli.main(["ghost", "--any", "args", "-x"]) == 2
    err = capsys.readouterr().err
    assert "tokensaver ghost is unavailable" in err and "_no_such_module" in err
    assert cli.main(["runs", "--runs-dir", str(runs)]) == 0


def test_dispatch_to_a_module(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    mod = types.ModuleType("fake_tokensaver_cmd")

    def add_arguments(parser):  # type: ignore[no-untyped-def]
        parser.add_argument("--times", type=int, default=1)

    def run(args):  # type: ignore[no-untyped-def]
        print("hi " * args.times)
        return 7

    mod.add_arguments = add_arguments  # type: ignore[attr-defined]
    mod.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_tokensaver_cmd", mod)
    monkeypatch.setitem(cli.SUBCOMMANDS, "fake", ("fake_tokensaver_cmd", "add_arguments", "run", "fake"))
    assert cli.main(["fake", "--times", "2"]) == 7
    assert capsys.readouterr().out.strip() == "hi hi"
    with pytest.raises(SystemExit):  # an available subcommand still rejects unknown options
        cli.main(["fake", "--nope"])


def test_tokensaver_errors_from_subcommands_are_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tokensaver.errors import ConfigError

    mod = types.ModuleType("fake_failing_cmd")
    mod.add = lambda parser: None  # type: ignore[attr-defined]

    def run(args):  # type: ignore[no-untyped-def]
        raise ConfigError("bad value", key="prune.keep", source="pyproject.toml")

    mod.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_failing_cmd", mod)
    monkeypatch.setitem(cli.SUBCOMMANDS, "failing", ("fake_failing_cmd", "add", "run", "fails"))
    assert cli.main(["failing"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "tokensaver: error: bad value (key 'prune.keep' in pyproject.toml)"


def test_every_subcommand_is_registered() -> None:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == {"runs", "report", *cli.SUBCOMMANDS}  # type: ignore[attr-defined]


def test_python_dash_m(runs: Path, tmp_path: Path) -> None:
    env = {**os.environ, "TOKENSAVER_RUNS_DIR": str(runs)}
    ok = subprocess.run(
        [sys.executable, "-m", "tokensaver", "report", "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["run"]["name"] == "newer"
    missing = subprocess.run(
        [sys.executable, "-m", "tokensaver", "report", "nope"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert missing.returncode == 2
    assert "Traceback" not in missing.stderr and "no run named 'nope'" in missing.stderr


def test_emulator_subcommand_is_available() -> None:
    import tokensaver.cli as cli_module

    parser = cli_module.build_parser()
    args = parser.parse_args(["emulator", "--port", "0", "--loose-roles"])
    assert args.port == 0 and args.loose_roles is True
    assert "unavailable" not in repr(args)


def test_a_subcommand_imports_only_its_own_module() -> None:
    """``tokensaver proxy`` starts without the anthropic SDK, the bench or the emulator (start-up time)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from tokensaver.cli import main\n"
        "try:\n"
        "    main(['proxy', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in ('anthropic', 'tokensaver.bench', 'tokensaver.emulator', 'tokensaver.replay')"
        " if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert "--port" in out.stdout
