"""``tokensaver run -- CMD`` / ``claude`` / ``openclaw``: a real child process through a real proxy subprocess.

The child is a small Python script making Messages calls with the anthropic SDK to
``ANTHROPIC_BASE_URL``; the proxy forwards to the emulator (the launcher's own ``ANTHROPIC_BASE_URL``,
as a user's real upstream would be). ``claude`` and ``openclaw`` are stand-in scripts on ``PATH``
that call the API the way the real CLIs are configured (the real ones run in e2e/agents.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tokensaver.emulator import Emulator
from tokensaver.launch import split_argv
from tokensaver.pricing import PriceTable
from tokensaver.run import list_runs, load_run
from tokensaver.testing import start_proxy_process, stop_proxy_process

TIMEOUT = 120  # one launcher run, proxy start and stop included

# the system prompt repeats over the calls: cache_align's breakpoint makes calls 2 and 3 cache reads
CHILD = r"""
import os, signal, sys, time
import anthropic

if "--wait-for-signal" in sys.argv:
    signal.signal(signal.SIGINT, lambda *a: sys.exit(42))
if "--count-signals" in sys.argv:  # exit 40 + how many SIGINTs came within a second of the first
    got = []
    signal.signal(signal.SIGINT, lambda *a: got.append(1))
client = anthropic.Anthropic(api_key="test-key", max_retries=0)
print("base", os.environ["ANTHROPIC_BASE_URL"], flush=True)
system = " ".join(f"Rule {i}: keep the file layout of module m{i} as it is." for i in range(400))
for i in range(int(os.environ.get("CALLS", "3"))):
    r = client.messages.create(
        model="claude-sonnet-4-6",
        max_tokens=32,
        system=system,
        messages=[{"role": "user", "content": f"question {i}"}],
    )
    print("answer", r.content[0].text[:30], flush=True)
if "--wait-for-signal" in sys.argv or "--count-signals" in sys.argv:
    print("waiting", flush=True)
    for _ in range(600):
        time.sleep(0.1)
        if "--count-signals" in sys.argv and got:
            time.sleep(1.0)
            sys.exit(40 + len(got))
    sys.exit(3)
sys.exit(int(os.environ.get("CHILD_EXIT", "0")))
"""

# Claude Code's way: ANTHROPIC_BASE_URL, ANTHROPIC_CUSTOM_HEADERS and its own session header
FAKE_CLAUDE = r"""#!{python}
import json, os, sys, uuid
import anthropic

headers = dict(line.split(": ", 1) for line in os.environ.get("ANTHROPIC_CUSTOM_HEADERS", "").splitlines() if line)
headers["x-claude-code-session-id"] = str(uuid.uuid4())
client = anthropic.Anthropic(api_key="test-key", max_retries=0, default_headers=headers)
client.messages.create(model="claude-sonnet-4-6", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
print("argv", json.dumps(sys.argv[1:]))
"""

# OpenClaw's way: the anthropic provider of the config at OPENCLAW_CONFIG_PATH ($include resolved,
# sibling keys over it), and a write of its own config file, as OpenClaw does on some commands
FAKE_OPENCLAW = r"""#!{python}
import json, os, sys
from pathlib import Path
import anthropic

path = Path(os.environ["OPENCLAW_CONFIG_PATH"])
top = json.loads(path.read_text())
included = top.pop("$include", None)
if included:
    assert str(Path(included).parent) in os.environ["OPENCLAW_INCLUDE_ROOTS"].split(os.pathsep)
    base = json.loads(Path(included).read_text())
    print("user model", base["agents"]["defaults"]["model"]["primary"])
provider = top["models"]["providers"]["anthropic"]
client = anthropic.Anthropic(
    api_key="test-key", base_url=provider["baseUrl"], max_retries=0, default_headers=provider["headers"]
)
client.messages.create(model="claude-sonnet-4-6", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
path.write_text(json.dumps({**top, "meta": {"lastTouchedVersion": "fake"}}))
print("argv", json.dumps(sys.argv[1:]))
"""


@pytest.fixture
def emu() -> Iterator[Emulator]:
    with Emulator() as e:
        yield e


def _env(emu: Emulator, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "TOKENSAVER_", "OPENCLAW_"))
    }
    bin_dir = tmp_path / "bin"
    return {
        **env,
        "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        "ANTHROPIC_BASE_URL": emu.url,  # the user's real upstream, before the launcher overrides it
        "TOKENSAVER_CACHE_DIR": str(tmp_path / "cache"),
        "HOME": str(tmp_path / "home"),
        **extra,
    }


def _stand_ins(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("claude", FAKE_CLAUDE), ("openclaw", FAKE_OPENCLAW)):
        exe = bin_dir / name
        exe.write_text(text.replace("{python}", sys.executable))
        exe.chmod(0o755)
    (tmp_path / "child.py").write_text(CHILD)
    (tmp_path / "home").mkdir(exist_ok=True)


def launch(
    tmp_path: Path, env: dict[str, str], *args: str, runs: Path | None = None
) -> subprocess.CompletedProcess[str]:
    _stand_ins(tmp_path)
    runs_dir = runs or tmp_path / "runs"
    cmd = [sys.executable, "-m", "tokensaver", args[0], "--runs-dir", str(runs_dir), *args[1:]]
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)


def billed_usd(emu: Emulator) -> float:
    prices = PriceTable()
    return sum(prices.get(str(r.body["model"])).cost(r.usage or {}) for r in emu.requests if r.status == 200)


def test_run_passes_the_exit_code_records_the_calls_and_prints_the_honest_saving(
    emu: Emulator, tmp_path: Path
) -> None:
    env = _env(emu, tmp_path, CHILD_EXIT="7")
    out = launch(tmp_path, env, "run", "--report-format", "json", "--", sys.executable, "child.py")
    assert out.returncode == 7, out.stderr
    assert out.stdout.count("answer ") == 3
    base = out.stdout.splitlines()[0].split()[1]
    assert base.startswith("http://127.0.0.1:") and base != emu.url  # the child talked to the proxy
    assert len([r for r in emu.requests if r.path == "/v1/messages"]) == 3  # ...which forwarded upstream
    report = json.loads(out.stderr[out.stderr.index("{") :])
    totals = report["totals"]
    assert totals["calls"] == 3
    # the report's cost is what the API billed; its saving is against the caller's own requests
    assert totals["cost_usd"] == pytest.approx(billed_usd(emu), rel=1e-6)
    assert totals["saved_usd"] > 0
    assert totals["saved_usd"] == pytest.approx(totals["counterfactual_usd"] - totals["cost_usd"], rel=1e-6)
    (run,) = list_runs(tmp_path / "runs")
    assert run["name"] == report["run"]["name"] and run["name"].startswith("launch-run-")
    assert len(load_run(run["name"], tmp_path / "runs").records()) == 3


def test_run_prints_the_table_report_after_the_command(emu: Emulator, tmp_path: Path) -> None:
    out = launch(tmp_path, _env(emu, tmp_path, CALLS="2"), "run", sys.executable, "child.py")
    assert out.returncode == 0, out.stderr
    assert "3 calls" not in out.stderr and "2 calls" in out.stderr
    assert "saved" in out.stderr and "cost [billed]" in out.stderr
    assert "cost [billed]" not in out.stdout  # the command's own output stays clean


def test_a_running_proxy_is_reused_and_left_running(emu: Emulator, tmp_path: Path) -> None:
    runs = tmp_path / "shared-runs"
    proc, url = start_proxy_process(
        "--upstream", emu.url, env={**_env(emu, tmp_path), "TOKENSAVER_RUNS_DIR": str(runs)}, cwd=tmp_path
    )
    try:
        env = _env(emu, tmp_path, TOKENSAVER_PROXY_URL=url, CALLS="2")
        out = launch(tmp_path, env, "run", "--", sys.executable, "child.py", runs=runs)
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines()[0] == f"base {url}"
        assert "(already running)" in out.stderr
        assert "2 calls" in out.stderr
        assert proc.poll() is None  # not ours to stop
        # the Claude Code stand-in names the launcher's run in its headers: its call lands there
        out = launch(tmp_path, _env(emu, tmp_path), "claude", "--proxy", url, runs=runs)
        assert out.returncode == 0, out.stderr
        launched = [r["name"] for r in list_runs(runs) if r["name"].startswith("launch-claude-")]
        assert len(launched) == 1 and "1 calls" in out.stderr
    finally:
        stop_proxy_process(proc)


def test_claude_gets_its_arguments_and_its_session_lands_in_the_launch_run(
    emu: Emulator, tmp_path: Path
) -> None:
    out = launch(
        tmp_path, _env(emu, tmp_path), "claude", "--report-format", "md", "-p", "fix it", "--run", "x"
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.split("argv ", 1)[1]) == ["-p", "fix it", "--run", "x"]
    names = [r["name"] for r in list_runs(tmp_path / "runs")]
    # one run for the session, not a session-<id> run beside it
    assert len(names) == 1 and names[0].startswith("launch-claude-"), names
    assert f"# tokensaver run {names[0]}" in out.stderr or names[0] in out.stderr


def test_openclaw_leaves_the_users_config_byte_identical(emu: Emulator, tmp_path: Path) -> None:
    user = tmp_path / "home" / ".openclaw" / "openclaw.json"
    user.parent.mkdir(parents=True)
    # the user's own provider URL is the upstream (no ANTHROPIC_BASE_URL here)
    config = {
        "agents": {"defaults": {"model": {"primary": "anthropic/claude-opus-4-6"}}},
        "models": {
            "providers": {"anthropic": {"baseUrl": emu.url, "api": "anthropic-messages", "models": []}}
        },
    }
    user.write_text(json.dumps(config, indent=2) + "\n")
    before = hashlib.sha256(user.read_bytes()).hexdigest()
    stat = user.stat()
    env = {k: v for k, v in _env(emu, tmp_path).items() if k != "ANTHROPIC_BASE_URL"}
    out = launch(tmp_path, env, "openclaw", "agent", "--local", "--message", "hi")
    assert out.returncode == 0, out.stderr
    assert "user model anthropic/claude-opus-4-6" in out.stdout  # the user's config was read
    assert json.loads(out.stdout.split("argv ", 1)[1]) == ["agent", "--local", "--message", "hi"]
    assert hashlib.sha256(user.read_bytes()).hexdigest() == before
    assert user.stat().st_mtime_ns == stat.st_mtime_ns
    assert sorted(p.name for p in user.parent.iterdir()) == ["openclaw.json"]
    names = [r["name"] for r in list_runs(tmp_path / "runs")]
    assert len(names) == 1 and names[0].startswith("launch-openclaw-") and "1 calls" in out.stderr
    assert len(emu.requests) == 1


def test_sigint_is_forwarded_and_the_report_still_printed(emu: Emulator, tmp_path: Path) -> None:
    _stand_ins(tmp_path)
    cmd = [sys.executable, "-m", "tokensaver", "run", "--runs-dir", str(tmp_path / "runs")]
    proc = subprocess.Popen(
        [*cmd, "--", sys.executable, "child.py", "--wait-for-signal"],
        env=_env(emu, tmp_path, CALLS="1"),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and proc.stdout.readline().strip() != "waiting":
            pass
        proc.send_signal(signal.SIGINT)  # to the launcher only, not its process group
        rest, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 42, err  # the child's own SIGINT handler decided the exit code
    assert "1 calls" in err


def test_ctrl_c_at_a_terminal_reaches_the_agent_once(emu: Emulator, tmp_path: Path) -> None:
    """The terminal sends SIGINT to the whole foreground group: the launcher must not send it again."""
    import fcntl
    import pty
    import termios

    _stand_ins(tmp_path)
    master, slave = pty.openpty()

    def controlling_terminal() -> None:  # a session of its own with the pty as its terminal
        fcntl.ioctl(slave, termios.TIOCSCTTY, 0)

    cmd = [sys.executable, "-m", "tokensaver", "run", "--runs-dir", str(tmp_path / "runs")]
    proc = subprocess.Popen(
        [*cmd, "--", sys.executable, "child.py", "--count-signals"],
        env=_env(emu, tmp_path, CALLS="1"),
        cwd=tmp_path,
        stdin=slave,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=controlling_terminal,
    )
    os.close(slave)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and proc.stdout.readline().strip() != "waiting":
            pass
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 41, err  # one SIGINT, not two
    assert "1 calls" in err  # the proxy (its own group) outlived the Ctrl-C and the report printed


def test_a_child_killed_by_a_signal_exits_128_plus_n(emu: Emulator, tmp_path: Path) -> None:
    script = "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"
    out = launch(
        tmp_path, _env(emu, tmp_path), "run", "--report-format", "none", sys.executable, "-c", script
    )
    assert out.returncode == 128 + signal.SIGTERM, out.stderr


def test_missing_agent_and_missing_command_say_what_to_do(emu: Emulator, tmp_path: Path) -> None:
    env: dict[str, Any] = {**_env(emu, tmp_path), "PATH": str(tmp_path / "nowhere")}
    env["PATH"] += os.pathsep + str(Path(sys.executable).parent)
    out = launch(tmp_path, env, "run")
    assert out.returncode == 2 and "tokensaver run -- CMD" in out.stderr
    out = launch(tmp_path, {**env, "PATH": str(Path(sys.executable).parent)}, "claude", "-p", "x")
    assert out.returncode == 2 and "claude not found on PATH" in out.stderr


def test_split_argv_stops_at_the_agents_first_argument() -> None:
    assert split_argv(["claude", "--proxy", "http://h:1", "-p", "hi"]) == (
        ["claude", "--proxy", "http://h:1"],
        ["-p", "hi"],
    )
    assert split_argv(["run", "--run=a", "--", "--help"]) == (["run", "--run=a"], ["--help"])
    assert split_argv(["openclaw", "agent", "--run", "x"]) == (["openclaw"], ["agent", "--run", "x"])
