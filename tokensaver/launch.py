"""``tokensaver claude``, ``tokensaver openclaw`` and ``tokensaver run -- CMD``: an agent through the proxy.

Each starts ``tokensaver proxy`` on a free loopback port (or uses the one at ``--proxy URL`` /
``$TOKENSAVER_PROXY_URL``), runs the agent pointed at it, and when the agent exits prints that
session's report (to stderr, so the agent's own output stays clean) and exits with the agent's code.

* Claude Code and any other command get ``ANTHROPIC_BASE_URL``; ``ANTHROPIC_CUSTOM_HEADERS`` (read by
  Claude Code) names the session's run, so every call of the session, subagents included, lands in it.
* OpenClaw reads its provider from its config file: it gets a temporary one
  (``OPENCLAW_CONFIG_PATH``) that ``$include``-s the user's own (read-only, through
  ``OPENCLAW_INCLUDE_ROOTS``) and overrides only ``models.providers.anthropic.baseUrl`` and its
  headers. The user's file is never written, so there is nothing to restore.
* The proxy forwards to the caller's real upstream: ``--upstream``, ``$TOKENSAVER_UPSTREAM``,
  (OpenClaw) the ``baseUrl`` of the user's config when it is plain JSON, the ``ANTHROPIC_BASE_URL``
  the launcher was started with, else the Anthropic API.
* Ctrl-C reaches the agent from the terminal (same process group); the proxy runs in its own group,
  so it outlives the agent long enough to record the last call. SIGTERM, SIGHUP and a SIGINT not from
  the terminal are forwarded to the agent.

Unsafe: the proxy binds loopback only, without a token, for as long as the agent runs: any local
process can spend the API key it sends through it meanwhile (the same as ``tokensaver proxy``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import TokensaverError

PROXY_ENV = "TOKENSAVER_PROXY_URL"
DEFAULT_UPSTREAM = "https://api.anthropic.com"
RUN_HEADER = "x-tokensaver-run"
TOKEN_HEADER = "x-tokensaver-proxy-token"
PROXY_START_TIMEOUT = 60.0
PROXY_STOP_TIMEOUT = 30.0
REPORT_FORMATS = ("table", "md", "json", "none")
# launcher options (before the agent's own arguments); those taking a value
_VALUE_OPTIONS = ("--proxy", "--upstream", "--config", "--runs-dir", "--report-format", "--run")
_FLAG_OPTIONS = ("-h", "--help")
COMMANDS = ("claude", "openclaw", "run")
BASE_URL_ALIASES = ("ANTHROPIC_API_URL", "ANTHROPIC_API_BASE")


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """``[command, launcher options...]`` and the agent's arguments (after them, or after ``--``)."""
    own, i = [argv[0]], 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return own, list(argv[i + 1 :])
        name = arg.split("=", 1)[0]
        if arg in _FLAG_OPTIONS or (name in _VALUE_OPTIONS and "=" in arg):
            own.append(arg)
            i += 1
        elif arg in _VALUE_OPTIONS:
            own += argv[i : i + 2]
            i += 2
        else:
            break
    return own, list(argv[i:])


def _add_common(parser: argparse.ArgumentParser, agent: str) -> None:
    parser.add_argument(
        "--proxy",
        metavar="URL",
        default=os.environ.get(PROXY_ENV),
        help=f"use this running tokensaver proxy instead of starting one (default ${PROXY_ENV})",
    )
    parser.add_argument(
        "--upstream",
        metavar="URL",
        help="the Messages API the started proxy forwards to (default $TOKENSAVER_UPSTREAM, "
        f"else $ANTHROPIC_BASE_URL as it was, else {DEFAULT_UPSTREAM})",
    )
    parser.add_argument("--config", metavar="FILE", help="a tokensaver TOML file for the started proxy")
    parser.add_argument(
        "--runs-dir", metavar="DIR", help="where runs are recorded (default: config runs_dir)"
    )
    parser.add_argument("--run", metavar="NAME", help="the session's run name (default: a new one)")
    parser.add_argument(
        "--report-format",
        choices=REPORT_FORMATS,
        default="table",
        help="how the session report is printed to stderr when the agent exits (default table)",
    )
    parser.epilog = (
        f"Launcher options come first; everything after them (or after --) goes to {agent}. "
        f"Example: tokensaver {parser.prog.split()[-1]} --report-format md -- --help"
    )
    parser.set_defaults(agent_args=[])


def add_claude_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``tokensaver claude``."""
    _add_common(parser, "claude")
    parser.set_defaults(func=run_claude)


def add_openclaw_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``tokensaver openclaw``."""
    _add_common(parser, "openclaw")
    parser.set_defaults(func=run_openclaw)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``tokensaver run``."""
    _add_common(parser, "the command")
    parser.set_defaults(func=run_command)


def run_claude(args: argparse.Namespace) -> int:
    """``tokensaver claude``: Claude Code through the proxy."""
    return launch(["claude", *args.agent_args], args, kind="claude")


def run_openclaw(args: argparse.Namespace) -> int:
    """``tokensaver openclaw``: OpenClaw through the proxy (a temporary config over the user's)."""
    return launch(["openclaw", *args.agent_args], args, kind="openclaw")


def run_command(args: argparse.Namespace) -> int:
    """``tokensaver run -- CMD...``: any command with ``ANTHROPIC_BASE_URL`` pointed at the proxy."""
    if not args.agent_args:
        raise TokensaverError("tokensaver run needs a command: tokensaver run -- CMD [ARGS...]")
    return launch(list(args.agent_args), args, kind="run")


# -- the proxy ------------------------------------------------------------------------------------


@dataclass
class Proxy:
    """A proxy the session uses: started here (``proc`` set) or found running."""

    url: str
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    owned: bool = field(default=False)

    def stop(self) -> int | None:
        """Stop a proxy started here (SIGTERM, then SIGKILL); its exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=PROXY_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def upstream_of(args: argparse.Namespace, env: dict[str, str], kind: str = "run") -> str:
    """Where the started proxy forwards: the caller's own upstream, never the proxy itself."""
    aliases = [env.get(a) for a in BASE_URL_ALIASES]
    configured = openclaw_base_url(openclaw_config_path(env)) if kind == "openclaw" else None
    found = [
        args.upstream,
        env.get("TOKENSAVER_UPSTREAM"),
        configured,
        env.get("ANTHROPIC_BASE_URL"),
        *aliases,
    ]
    return next((u for u in found if u), DEFAULT_UPSTREAM)


def _reachable(url: str, timeout: float = 5.0) -> bool:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def _die_with_parent() -> None:
    """Linux: the proxy gets SIGTERM if the launcher dies without stopping it (``kill -9``)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_proxy(upstream: str, run: str, work: Path, config: str | None, env: dict[str, str]) -> Proxy:
    """``tokensaver proxy --port 0`` in its own process group; returns once it listens."""
    log_path = work / "proxy.log"
    cmd = [sys.executable, "-m", "tokensaver", "proxy", "--port", "0", "--upstream", upstream, "--run", run]
    if config:
        cmd += ["--config", config]
    with open(log_path, "wb") as log:
        # its own session: the terminal's Ctrl-C goes to the agent, not to the proxy recording it
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    proxy = Proxy("", proc, log_path, owned=True)
    deadline = time.monotonic() + PROXY_START_TIMEOUT
    while time.monotonic() < deadline:
        for line in log_path.read_text(errors="replace").splitlines():
            if line.startswith("tokensaver proxy on http://"):
                proxy.url = line.split()[3]
                return proxy
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proxy.stop()
    raise TokensaverError(f"the tokensaver proxy did not start:\n{proxy.log_tail()}")


# -- the agent's environment ---------------------------------------------------------------------


def _with_header(existing: str | None, name: str, value: str) -> str:
    """``ANTHROPIC_CUSTOM_HEADERS`` (``Name: value`` lines) with ``name`` set to ``value``."""
    lines = [ln for ln in (existing or "").splitlines() if ln.split(":", 1)[0].strip().lower() != name]
    return "\n".join([*lines, f"{name}: {value}"])


def agent_env(env: dict[str, str], proxy_url: str, run: str) -> dict[str, str]:
    """The agent's environment: the proxy as its base URL, the session's run named in a header."""
    out = dict(env)
    out["ANTHROPIC_BASE_URL"] = proxy_url
    for alias in BASE_URL_ALIASES:  # read before ANTHROPIC_BASE_URL by LangChain / LiteLLM when set
        if out.get(alias):
            out[alias] = proxy_url
    out[PROXY_ENV] = proxy_url  # a nested launcher uses the same proxy
    out["ANTHROPIC_CUSTOM_HEADERS"] = _with_header(out.get("ANTHROPIC_CUSTOM_HEADERS"), RUN_HEADER, run)
    token = env.get("TOKENSAVER_PROXY_TOKEN")
    if token:
        out["ANTHROPIC_CUSTOM_HEADERS"] = _with_header(out["ANTHROPIC_CUSTOM_HEADERS"], TOKEN_HEADER, token)
    return out


def openclaw_config_path(env: dict[str, str]) -> Path:
    """The config file OpenClaw would read with this environment."""
    if env.get("OPENCLAW_CONFIG_PATH"):
        return Path(env["OPENCLAW_CONFIG_PATH"]).expanduser()
    if env.get("OPENCLAW_STATE_DIR"):
        return Path(env["OPENCLAW_STATE_DIR"]).expanduser() / "openclaw.json"
    home = Path(env.get("OPENCLAW_HOME") or env.get("HOME") or Path.home()).expanduser()
    profile = env.get("OPENCLAW_PROFILE")
    return (
        home / (f".openclaw-{profile}" if profile and profile != "default" else ".openclaw") / "openclaw.json"
    )


def openclaw_base_url(path: Path) -> str | None:
    """``models.providers.anthropic.baseUrl`` of an OpenClaw config written as plain JSON, else None.

    A JSON5 file (comments, unquoted keys) is not parsed here: pass ``--upstream`` if it sets one.
    """
    try:
        config = json.loads(path.read_text())
        url = config["models"]["providers"]["anthropic"]["baseUrl"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return url if isinstance(url, str) and url.startswith(("http://", "https://")) else None


def openclaw_env(env: dict[str, str], proxy_url: str, run: str, work: Path) -> dict[str, str]:
    """OpenClaw's environment: a temporary config that includes the user's and overrides the provider."""
    user = openclaw_config_path(env).resolve()
    provider: dict[str, Any] = {"baseUrl": proxy_url, "headers": {RUN_HEADER: run}}
    token = env.get("TOKENSAVER_PROXY_TOKEN")
    if token:
        provider["headers"][TOKEN_HEADER] = token
    config: dict[str, Any] = {"models": {"providers": {"anthropic": provider}}}
    out = agent_env(env, proxy_url, run)
    if user.is_file():
        # sibling keys override the included file; OpenClaw never writes an include outside its config dir
        config = {"$include": str(user), **config}
        roots = [r for r in (env.get("OPENCLAW_INCLUDE_ROOTS") or "").split(os.pathsep) if r]
        out["OPENCLAW_INCLUDE_ROOTS"] = os.pathsep.join([*roots, str(user.parent)])
    path = work / "openclaw" / "openclaw.json"
    path.parent.mkdir(mode=0o700)
    path.write_text(json.dumps(config, indent=2) + "\n")
    path.chmod(0o600)
    out["OPENCLAW_CONFIG_PATH"] = str(path)
    return out


# -- running ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _forwarding(children: list[subprocess.Popen[bytes]]) -> Iterator[None]:
    """Forward termination signals to the child while it runs (SIGINT only when not from the terminal).

    Installed before the child starts (``children`` is filled in then), so no signal falls between.
    """

    def from_terminal() -> bool:
        try:
            return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
        except (OSError, ValueError, AttributeError):
            return False

    def forward(signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and from_terminal():
            return  # the terminal sent it to the whole foreground group: the agent has it already
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    wanted = [
        signal.SIGINT,
        signal.SIGTERM,
        getattr(signal, "SIGHUP", None),
        getattr(signal, "SIGQUIT", None),
    ]
    old = {}
    for sig in wanted:
        if sig is not None:
            old[sig] = signal.signal(sig, forward)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _exit_code(returncode: int) -> int:
    """The shell's convention: a child killed by signal N exits 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def session_run_name(kind: str) -> str:
    """``launch-<agent>-YYYYMMDD-HHMMSS-xxxxxxxx``."""
    return f"launch-{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"


def session_report(runs_dir: Path, run: str, since: float, fmt: str) -> str:
    """The session's report: its run, or, when a reused proxy put its calls elsewhere, the calls since it began."""
    from .report import Report
    from .run import list_runs, load_run

    if (runs_dir / f"{run}.jsonl").is_file():
        report = load_run(run, runs_dir).report()
    else:
        meta: dict[str, Any] = {"name": run, "created": since}
        records = []
        for row in list_runs(runs_dir):
            for rec in load_run(row["name"], runs_dir).records():
                if float(rec.get("t") or 0) >= since:
                    records.append(rec)
                    meta.setdefault("config", load_run(row["name"], runs_dir).meta.get("config") or {})
        if not records:
            return (
                f"tokensaver: no calls recorded for this session in {runs_dir} (does the agent's own "
                "config set its API base URL? a reused proxy records where its own config says)"
            )
        report = Report(meta, records)
    if fmt == "md":
        return report.to_markdown()
    if fmt == "json":
        return report.to_json()
    return report.to_table()


def _runs_dir(args: argparse.Namespace) -> Path:
    if args.runs_dir:
        return Path(args.runs_dir)
    from .config import load_config

    config = load_config(args.config)
    if not config.record:
        raise TokensaverError("record is false in the config: there would be no session report")
    return Path(config.runs_dir)


def launch(cmd: list[str], args: argparse.Namespace, kind: str) -> int:
    """Run ``cmd`` through a proxy, print the session's report, return its exit code."""
    env = dict(os.environ)
    if args.runs_dir:
        env["TOKENSAVER_RUNS_DIR"] = str(Path(args.runs_dir).resolve())
    runs_dir = _runs_dir(args).resolve()
    exe = shutil.which(cmd[0], path=env.get("PATH"))
    if exe is None:
        hint = {
            "claude": " (npm install -g @anthropic-ai/claude-code)",
            "openclaw": " (npm install -g openclaw)",
        }
        raise TokensaverError(f"{cmd[0]} not found on PATH{hint.get(kind, '')}")
    run = args.run or session_run_name(kind)
    since = time.time()
    with tempfile.TemporaryDirectory(prefix="tokensaver-launch-") as tmp:
        work = Path(tmp)
        if args.proxy:
            if not _reachable(args.proxy):
                raise TokensaverError(f"no proxy answers at {args.proxy} (--proxy / ${PROXY_ENV})")
            proxy = Proxy(args.proxy.rstrip("/"))
        else:
            proxy = start_proxy(upstream_of(args, env, kind), run, work, args.config, env)
        try:
            child_env = (
                openclaw_env(env, proxy.url, run, work)
                if kind == "openclaw"
                else agent_env(env, proxy.url, run)
            )
            reused = "" if proxy.owned else " (already running)"
            print(
                f"tokensaver: {cmd[0]} through the proxy at {proxy.url}{reused}; run {run}", file=sys.stderr
            )
            children: list[subprocess.Popen[bytes]] = []
            with _forwarding(children):
                children.append(subprocess.Popen([exe, *cmd[1:]], env=child_env))
                returncode = children[0].wait()
        finally:
            stopped = proxy.stop()
        if proxy.owned and stopped not in (0, -signal.SIGTERM, None):
            print(f"tokensaver: the proxy exited {stopped}:\n{proxy.log_tail()}", file=sys.stderr)
    if args.report_format != "none":
        text = session_report(runs_dir, run, since, args.report_format)
        sys.stderr.write(text if text.endswith("\n") else text + "\n")
        sys.stderr.flush()
    return _exit_code(returncode)
