"""The fault suite's machinery: scenario tallies, request bodies, client calls, proxy processes.

Every wait here has a timeout and every loop a bound, so a hanging proxy turns into "lost"
requests instead of a hanging suite. Only loopback addresses are used.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
from fault_upstream import FaultUpstream

MODEL = "claude-sonnet-4-6"
# realistic-looking keys: the ledger refuses anything with this prefix, so a leak cannot go unnoticed
KEY_A = "sk-ant-api03-faultsuite-key-A-0000000000000000000000"
KEY_B = "sk-ant-api03-faultsuite-key-B-1111111111111111111111"
KINDS = ("correct", "failed_api", "lost", "wrong")
LABELS = {
    "correct": "answered correctly",
    "failed_api": "failed as the API would",
    "lost": "lost",
    "wrong": "wrong",
}


# -- tallies ------------------------------------------------------------------------------------


@dataclass
class Scenario:
    """One scenario: what correct means, and how each request it sent came out."""

    group: str
    name: str
    means: str
    counts: Counter[str] = field(default_factory=Counter)
    notes: Counter[str] = field(default_factory=Counter)
    facts: list[str] = field(default_factory=list)  # measured along the way (memory, fds, calls made)
    seconds: float = 0.0

    @property
    def sent(self) -> int:
        return sum(self.counts.values())

    def add(self, kind: str, note: str | None = None) -> None:
        """Count one request as ``kind`` (a note says what a lost or wrong one got)."""
        assert kind in KINDS, kind
        self.counts[kind] += 1
        if note and kind in ("lost", "wrong"):
            self.notes[f"{kind}: {note}"] += 1

    def demote(self, n: int, kind: str, note: str) -> None:
        """A check after the fact failed for ``n`` requests: move them from correct/failed to ``kind``."""
        for _ in range(max(0, n)):
            for src in ("correct", "failed_api"):
                if self.counts[src] > 0:
                    self.counts[src] -= 1
                    break
            else:
                return
            self.counts[kind] += 1
            self.notes[f"{kind}: {note}"] += 1

    @property
    def ok(self) -> bool:
        return self.counts["lost"] == 0 and self.counts["wrong"] == 0


# -- request bodies -------------------------------------------------------------------------------


BASH_TOOL = {
    "name": "bash",
    "description": "Run a shell command and return its output.",
    "input_schema": {"type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]},
}
SYSTEM = "You are a coding agent working in a Linux checkout. Be brief."


def build_log(seed: str, tokens: int) -> str:
    """A deterministic build log of about ``tokens`` tokens (distinct lines, like real output)."""
    lines = []
    for k in range(max(1, tokens // 44)):
        h = (k * 7919 + sum(map(ord, seed)) * 104729) % 65536
        lines.append(
            f"2026-12-01T10:{k // 60 % 60:02d}:{k % 60:02d}Z {seed} worker-{k % 8} cc -O2 -c src/mod_{k}.c "
            f"-o build/mod_{k}.o ok {h} ms"
        )
    return "\n".join(lines)


_WORDS = (
    "service request cache latency budget deploy review owner migration schema index queue worker "
    "release rollback metric alert window region replica storage quota config policy token retry"
).split()


def build_prose(seed: str, tokens: int) -> str:
    """A deterministic report of about ``tokens`` tokens: paragraphs of plain sentences (prose, not a log)."""
    n = sum(map(ord, seed))
    sentences = []
    for k in range(max(1, tokens // 16)):
        w = [_WORDS[(n + k * j * 7 + j) % len(_WORDS)] for j in range(1, 12)]
        sentences.append(
            f"The {w[0]} team found that the {w[1]} {w[2]} grew after the {w[3]} {w[4]}, so the {w[5]} "
            f"was moved behind the {w[6]} {w[7]} until the {w[8]} review in week {(n + k) % 50}."
        )
    return "\n\n".join(" ".join(sentences[i : i + 5]) for i in range(0, len(sentences), 5))


def agent_body(
    nonce: str,
    *,
    session: str = "s0",
    turns: int = 1,
    first_tokens: int = 600,
    turn_tokens: int = 600,
    stream: bool = False,
    system: Any = SYSTEM,
    question: str = "What failed, and what should I change?",
    output: Any = None,
) -> tuple[dict[str, Any], str]:
    """An agent's request after ``turns`` tool calls with large outputs, and the text carrying the nonce.

    The conversation of a session grows turn by turn (earlier outputs unchanged), as an agent's does.
    """
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": f"Session {session}: fix the failing build."}
    ]
    text = f"{question} [nonce:{nonce}]"
    for t in range(max(1, turns)):
        tid = f"toolu_{session}_{t}"
        messages.append(
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": tid, "name": "bash", "input": {"cmd": f"make step{t}"}}
                ],
            }
        )
        size = first_tokens if t == 0 else turn_tokens
        make = output or build_log
        result = {"type": "tool_result", "tool_use_id": tid, "content": make(f"{session}-{t}", size)}
        content: list[dict[str, Any]] = [result]
        if t == turns - 1:
            content.append({"type": "text", "text": text})
        messages.append({"role": "user", "content": content})
    body: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 256,
        "system": system,
        "tools": [BASH_TOOL],
        "messages": messages,
    }
    if stream:
        body["stream"] = True
    return body, text


def small_body(nonce: str, *, stream: bool = False, marker: str = "") -> tuple[dict[str, Any], str]:
    """A one-message request (plugin and fault scenarios: cheap, nonce in its only text)."""
    text = f"Say something short. {marker}[nonce:{nonce}]"
    body: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 128,
        "system": SYSTEM,
        "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}],
    }
    if stream:
        body["stream"] = True
    return body, text


# -- client calls ---------------------------------------------------------------------------------


@dataclass
class Got:
    """What a client got: a message (as JSON), an exception, or nothing in time."""

    message: dict[str, Any] | None = None
    error: BaseException | None = None
    timed_out: bool = False
    seconds: float = 0.0

    def describe(self) -> str:
        if self.timed_out:
            return f"no answer in {self.seconds:.0f} s"
        if self.error is not None:
            return signature(self.error)
        return "an answer"


def async_client(base_url: str, key: str, timeout: float = 60.0) -> anthropic.AsyncAnthropic:
    """An SDK client with no retries (the suite sees every first outcome)."""
    return anthropic.AsyncAnthropic(base_url=base_url, api_key=key, max_retries=0, timeout=timeout)


def sync_client(base_url: str, key: str, timeout: float = 60.0) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=base_url, api_key=key, max_retries=0, timeout=timeout)


async def ask(
    client: anthropic.AsyncAnthropic,
    body: dict[str, Any],
    *,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Got:
    """One Messages call through the SDK (streamed when the body says so), bounded by ``timeout``."""
    t0 = time.monotonic()
    args = {k: v for k, v in body.items() if k != "stream"}
    try:
        async with asyncio.timeout(timeout):
            if body.get("stream"):
                async with client.messages.stream(**args, extra_headers=headers or {}) as s:
                    msg = await s.get_final_message()
            else:
                msg = await client.messages.create(**args, extra_headers=headers or {})
    except TimeoutError:
        return Got(timed_out=True, seconds=time.monotonic() - t0)
    except Exception as exc:  # every failure is an outcome to classify
        return Got(error=exc, seconds=time.monotonic() - t0)
    return Got(message=msg.model_dump(mode="json"), seconds=time.monotonic() - t0)


def ask_sync(client: Any, body: dict[str, Any], headers: dict[str, str] | None = None) -> Got:
    """The same with a sync (possibly wrapped) client; the caller bounds it (a thread and a timeout)."""
    t0 = time.monotonic()
    args = {k: v for k, v in body.items() if k != "stream"}
    try:
        if body.get("stream"):
            with client.messages.stream(**args, extra_headers=headers or {}) as s:
                msg = s.get_final_message()
        else:
            msg = client.messages.create(**args, extra_headers=headers or {})
    except Exception as exc:
        return Got(error=exc, seconds=time.monotonic() - t0)
    return Got(message=msg.model_dump(mode="json"), seconds=time.monotonic() - t0)


async def in_thread(fn: Any, *args: Any, timeout: float) -> Got:
    """Run a blocking call in a daemon thread; a call still running after ``timeout`` is left behind."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Got] = loop.create_future()
    t0 = time.monotonic()

    def target() -> None:
        try:
            got = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - reported as the outcome
            got = Got(error=exc)

        def settle() -> None:
            if not fut.done():
                fut.set_result(got)

        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the suite's loop is gone: nobody waits for this call any more
            pass

    threading.Thread(target=target, daemon=True, name="fault-suite-sync").start()
    try:
        return await asyncio.wait_for(asyncio.shield(fut), timeout)
    except TimeoutError:
        return Got(timed_out=True, seconds=time.monotonic() - t0)


def signature(exc: BaseException) -> str:
    """How a failure looks to the caller: exception class, HTTP status, error type, retry-after."""
    parts = [type(exc).__name__]
    status = getattr(exc, "status_code", None)
    if status is not None:
        parts.append(str(status))
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error")
        parts.append(str(err.get("type")) if isinstance(err, dict) else "non-API JSON")
    elif body is not None:
        parts.append("non-JSON body")
    response = getattr(exc, "response", None)
    if response is not None and status is not None:
        retry_after = response.headers.get("retry-after")
        if retry_after:
            parts.append(f"retry-after {retry_after}")
    return " ".join(parts)


def retryable(exc: BaseException) -> bool:
    """Whether the SDK's own retry logic would retry this failure."""
    if isinstance(exc, anthropic.APIConnectionError):
        return True
    if isinstance(exc, anthropic.APIStatusError):
        should = exc.response.headers.get("x-should-retry")
        if should in ("true", "false"):
            return should == "true"
        return exc.status_code in (408, 409, 429) or exc.status_code >= 500
    return False


def api_shaped(exc: BaseException) -> bool:
    """A status error whose body is the API's JSON error shape (connection errors have none)."""
    if isinstance(exc, anthropic.APIStatusError):
        body = exc.body
        return isinstance(body, dict) and body.get("type") == "error" and isinstance(body.get("error"), dict)
    return isinstance(exc, anthropic.APIConnectionError)


def _label(label: str | None, note: str) -> str:
    return f"{label}: {note}" if label else note


def expect_answer(
    sc: Scenario, up: FaultUpstream, got: Got, nonce: str, key: str, text: str, label: str | None = None
) -> str | None:
    """Count a request that must be answered: correct when it is this key's answer to this request."""
    if got.message is None:
        sc.add("lost", _label(label, got.describe()))
        return got.describe()
    why = up.check(got.message, nonce, key, text)
    if why is not None:
        sc.add("wrong", _label(label, why))
        return why
    sc.add("correct")
    return None


def expect_failure(sc: Scenario, got: Got, reference: Got, label: str | None = None) -> None:
    """Count a request the API fails: it must fail the way ``reference`` (the direct call) failed."""
    if got.timed_out:
        sc.add("lost", _label(label, got.describe()))
    elif got.error is None:
        sc.add("wrong", _label(label, f"answered, while the API fails it with {reference.describe()}"))
    elif reference.error is not None and signature(got.error) == signature(reference.error):
        sc.add("failed_api")
    else:
        sc.add("wrong", _label(label, f"{signature(got.error)} instead of {reference.describe()}"))


def expect_retryable(sc: Scenario, got: Got, label: str | None = None) -> None:
    """Count a request whose upstream connection broke: a failure the SDK retries, in the API's shape."""
    if got.timed_out:
        sc.add("lost", _label(label, got.describe()))
    elif got.error is None:
        sc.add("wrong", _label(label, "answered although the upstream answer never arrived"))
    elif not retryable(got.error):
        sc.add("wrong", _label(label, f"{signature(got.error)}: the SDK would not retry it"))
    elif not api_shaped(got.error):
        sc.add("wrong", _label(label, f"{signature(got.error)}: not the API's JSON error shape"))
    else:
        sc.add("failed_api")


# -- raw HTTP (bad input the SDK cannot send) -----------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes


async def raw_request(
    base: str,
    method: str,
    target: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
    host_header: str | None = None,
) -> RawResponse | None:
    """Send exactly ``target`` on the request line (no client-side normalization); None on no answer."""
    host, port = _host_port(base)
    head = [f"{method} {target} HTTP/1.1", f"Host: {host_header or f'{host}:{port}'}", "Connection: close"]
    hdrs = {
        "content-type": "application/json",
        "x-api-key": KEY_A,
        "anthropic-version": "2023-06-01",
        **(headers or {}),
    }
    head += [f"{k}: {v}" for k, v in hdrs.items()]
    head.append(f"Content-Length: {len(body)}")
    return await raw_exchange(base, ("\r\n".join(head) + "\r\n\r\n").encode(), body, timeout)


def _host_port(base: str) -> tuple[str, int]:
    m = re.match(r"http://([^:/]+):(\d+)", base)
    assert m, base
    return m.group(1), int(m.group(2))


async def raw_exchange(
    base: str, head: bytes, body: bytes = b"", timeout: float = 30.0
) -> RawResponse | None:
    """Write these exact bytes to ``base``, read until the server closes; the first response, or None."""
    host, port = _host_port(base)
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:

                async def send() -> None:
                    try:
                        writer.write(head)
                        for i in range(0, len(body), 1 << 20):
                            writer.write(body[i : i + (1 << 20)])
                            await writer.drain()
                        await writer.drain()
                    except ConnectionError:
                        pass  # the server answered early and closed: read what it said

                sender = asyncio.create_task(send())
                raw = await reader.read()
                sender.cancel()
            finally:
                writer.close()
    except (TimeoutError, ConnectionError, OSError):
        return None
    head_b, _, rest = raw.partition(b"\r\n\r\n")
    lines = head_b.decode("latin-1").split("\r\n")
    if not lines or not lines[0].startswith("HTTP/"):
        return None
    status = int(lines[0].split()[1])
    out_headers: dict[str, str] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        out_headers[k.strip().lower()] = v.strip()
    if out_headers.get("transfer-encoding", "").lower() == "chunked":
        rest = _dechunk(rest)
    return RawResponse(status, out_headers, rest)


def _dechunk(data: bytes) -> bytes:
    out = b""
    for _ in range(100_000):
        size_line, _, data = data.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0] or b"0", 16)
        except ValueError:
            break
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return out


def api_error_of(resp: RawResponse | None) -> str | None:
    """``status error.type`` when ``resp`` is an API-shaped JSON error, else None."""
    if resp is None or "json" not in resp.headers.get("content-type", ""):
        return None
    try:
        payload = json.loads(resp.body)
    except ValueError:
        return None
    if (
        isinstance(payload, dict)
        and payload.get("type") == "error"
        and isinstance(payload.get("error"), dict)
    ):
        return f"{resp.status} {payload['error'].get('type')}"
    return None


def describe_raw(resp: RawResponse | None) -> str:
    if resp is None:
        return "no answer"
    return f"{resp.status} {resp.headers.get('content-type', 'no content-type').split(';')[0]}"


# -- tokensaver proxy processes -------------------------------------------------------------------


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def write_toml(path: Path, config: dict[str, Any]) -> None:
    """A tokensaver config file (top-level keys, then one table per plugin)."""
    top = [f"{k} = {toml_value(v)}" for k, v in config.items() if not isinstance(v, dict)]
    tables = [
        f"\n[{k}]\n" + "\n".join(f"{kk} = {toml_value(vv)}" for kk, vv in v.items())
        for k, v in config.items()
        if isinstance(v, dict)
    ]
    path.write_text("\n".join(top) + "\n" + "\n".join(tables) + "\n")


class ProxyProcess:
    """``tokensaver proxy`` as a subprocess on a free loopback port (its own cwd, config and log)."""

    def __init__(self, root: Path, name: str, upstream: str, config: dict[str, Any], cache_dir: Path) -> None:
        self.root = root
        self.name = name
        self.upstream = upstream
        self.dir = root / f"proxy-{name}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.dir / "tokensaver-config.toml"
        write_toml(self.config_path, config)
        self.cache_dir = cache_dir
        self.log_path = self.dir / "proxy.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.starts = 0

    def start(self, timeout: float = 60.0) -> ProxyProcess:
        """Start it and wait (bounded) for the line that names its port."""
        env = {**os.environ, "TOKENSAVER_CACHE_DIR": str(self.cache_dir), "PYTHONUNBUFFERED": "1"}
        for var in ("TOKENSAVER_CONFIG", "TOKENSAVER_PLUGINS", "TOKENSAVER_STRICT", "TOKENSAVER_RUNS_DIR"):
            env.pop(var, None)
        cmd = [
            sys.executable, "-m", "tokensaver", "proxy", "--host", "127.0.0.1", "--port", "0",
            "--upstream", self.upstream, "--config", str(self.config_path), "--run", f"{self.name}-default",
        ]  # fmt: skip
        self.starts += 1
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(cmd, cwd=self.dir, env=env, stdout=subprocess.PIPE, stderr=log)
        log.close()
        assert self.proc.stdout is not None
        found: list[str] = []

        def read() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in iter(self.proc.stdout.readline, b""):
                m = re.search(rb"tokensaver proxy on (http://127\.0\.0\.1:\d+)", line)
                if m and not found:
                    found.append(m.group(1).decode())

        threading.Thread(target=read, daemon=True, name=f"proxy-{self.name}-stdout").start()
        deadline = time.monotonic() + timeout
        while not found and time.monotonic() < deadline and self.proc.poll() is None:
            time.sleep(0.05)
        if not found:
            self.stop()
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"tokensaver proxy {self.name} did not start in {timeout:.0f} s:\n{tail}")
        self.url = found[0]
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        """SIGKILL, as a crash or the OOM killer would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill9()

    def fds(self) -> tuple[int, int] | None:
        """Open file descriptors of the process (Linux): (sockets, everything else), or None."""
        if self.proc is None:
            return None
        where = f"/proc/{self.proc.pid}/fd"
        sockets = other = 0
        try:
            for fd in os.listdir(where):
                try:
                    target = os.readlink(f"{where}/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:"):
                    sockets += 1
                else:
                    other += 1
        except OSError:
            return None
        return sockets, other

    def rss_mb(self) -> float | None:
        """Resident memory of the process in MB (Linux), or None."""
        try:
            assert self.proc is not None
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except (OSError, AssertionError, ValueError):
            return None
        return None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def wait_until(predicate: Any, timeout: float, step: float = 0.05) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)


async def await_until(predicate: Any, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(step)


def modes_problems(*roots: Path) -> list[str]:
    """Files under ``roots`` that are not 0600 and folders that are not 0700 (owner-only)."""
    problems = []
    for root in roots:
        if not root.exists():
            continue
        for path in [root, *root.rglob("*")]:
            mode = path.stat().st_mode & 0o777
            want = 0o700 if path.is_dir() else 0o600
            if mode & ~want & 0o077:
                problems.append(f"{path.relative_to(root.parent)} is {mode:04o}")
    return problems
