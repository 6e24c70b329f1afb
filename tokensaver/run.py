"""The run ledger: one append-only JSONL file per run, readable by any process while it grows.

``<runs_dir>/<name>.jsonl`` holds a header line ``{"type": "run", ...}`` then one line per call
record (schema in ``docs/DESIGN.md``). Lines are appended with a single ``write`` on a file opened
in append mode, so a reader in another process sees whole lines (or, at worst, a truncated last
line, which :meth:`Run.records` skips with a warning; the next append starts on a new line). A
record is never rewritten. The folder is 0700 and the file 0600 (``tokensaver._files``).

Recording never fails the caller's call: :meth:`Run.append` does not raise. A write that fails is
logged and reported back (``ledger_error``) for the record kept in memory.

Unsafe: the ledger stores token counts, dollars and plugin notes, never request text on purpose,
but a plugin's ``ctx.record()`` notes go in as given. As a last line of defence, any string that
looks like an Anthropic API key is replaced (the record is marked ``"redacted": true``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from ._files import open_private, private_dir
from .errors import TokensaverError

if TYPE_CHECKING:
    from .report import Report

log = logging.getLogger("tokensaver.run")

SUFFIX = ".jsonl"
DEFAULT_RUNS_DIR = ".tokensaver/runs"
_KEY_MARK = "sk-ant-"
REDACTED = "[redacted: looks like an API key]"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def default_runs_dir() -> Path:
    """The configured runs directory (config ``runs_dir``, ``$TOKENSAVER_RUNS_DIR``, ``./.tokensaver/runs``)."""
    try:
        from .config import default_runs_dir as configured
    except ImportError as exc:
        # only a missing config module (or function) falls back; a broken one should be seen
        missing = getattr(exc, "name", None) == "tokensaver.config" or "default_runs_dir" in str(exc)
        if not missing:
            raise
        return Path(os.environ.get("TOKENSAVER_RUNS_DIR") or DEFAULT_RUNS_DIR)
    return Path(configured())


def new_run_name(now: float | None = None) -> str:
    """A unique, sortable run name: ``run-YYYYMMDD-HHMMSS-xxxxxxxx`` (local time, 8 random hex: runs
    started in the same second do not meet on one ledger; with 4, 20 at once met 1 time in 330)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if now is None else now))
    return f"run-{stamp}-{secrets.token_hex(4)}"


def resolve_runs_dir(runs_dir: str | Path | None) -> Path:
    """``runs_dir`` as a ``Path``, or the configured default when it is None."""
    return Path(runs_dir) if runs_dir is not None else default_runs_dir()


def _walk_strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, str):
                yield k
            yield from _walk_strings(v)
    elif isinstance(value, list | tuple | set | frozenset):
        for v in value:
            yield from _walk_strings(v)


def _refuse_keys(value: Any, what: str) -> None:
    for s in _walk_strings(value):
        if _KEY_MARK in s:
            # never echo the value: the message itself must not leak the key
            raise ValueError(f"refusing to write {what}: it contains something that looks like an API key")


def redact_text(text: str) -> str:
    """``text`` for a log line: the whole of it replaced when it holds something like an API key."""
    return REDACTED if _KEY_MARK in text else text


def _redacted(value: Any, where: str, found: list[str]) -> Any:
    """``value`` with every string holding a key mark replaced; ``found`` gets where (never what)."""
    if isinstance(value, str):
        if _KEY_MARK in value:
            found.append(where or "(record)")
            return REDACTED
        return value
    if isinstance(value, dict):
        out = {}
        for n, (k, v) in enumerate(value.items()):
            if isinstance(k, str) and _KEY_MARK in k:
                found.append(f"{where}.<key {n}>" if where else f"<key {n}>")
                k = f"{REDACTED} {n}"
            name = k if isinstance(k, str) else repr(k)
            out[k] = _redacted(v, f"{where}.{name}" if where else name, found)
        return out
    if isinstance(value, list | tuple | set | frozenset):
        return [_redacted(v, f"{where}[{i}]", found) for i, v in enumerate(value)]
    return value


_MARK_BYTES = _KEY_MARK.encode()


def _holds_mark(record: dict[str, Any]) -> bool:
    """Whether a key mark is in the record as the ledger writes it: any string, dict key or repr of a
    value JSON cannot hold (one orjson pass; the mark has nothing JSON escapes, so it shows as is)."""
    try:
        raw = orjson.dumps(record, default=_json_default, option=orjson.OPT_NON_STR_KEYS)
    except (TypeError, orjson.JSONEncodeError):
        return any(_KEY_MARK in s for s in _walk_strings(record)) or _KEY_MARK in _dumps(record)
    return _MARK_BYTES in raw


def redact_keys(record: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(the record with key-like strings replaced, where they were); the record itself when clean.

    Values JSON cannot hold are turned into what the ledger would write first (their ``repr`` may
    hold a key too).
    """
    if not _holds_mark(record):
        return record, []
    found: list[str] = []
    clean = _redacted(json.loads(_dumps(record)), "", found)
    clean["redacted"] = True
    return clean, found


def _json_default(value: Any) -> Any:
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=_json_default)


def _read_header(path: Path) -> dict[str, Any] | None:
    """The header line of a ledger file, or None when it has none (yet)."""
    with open(path, encoding="utf-8") as f:
        first = f.readline()
    try:
        obj = json.loads(first)
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) and obj.get("type") == "run" else None


def _read_lines(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Header and call records of a ledger file; bad lines are skipped with a warning."""
    header: dict[str, Any] | None = None
    calls: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    # a complete file ends with "\n", so the last element is "" unless a write was cut short
    last = len(lines) - 1
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            if i == last:
                log.warning("%s: skipping truncated last line (run still being written?)", path)
            else:
                log.warning("%s: skipping unreadable line %d", path, i + 1)
            continue
        if not isinstance(obj, dict):
            log.warning("%s: skipping line %d (not a JSON object)", path, i + 1)
            continue
        kind = obj.get("type", "call")
        if kind == "run":
            if header is None:
                header = obj
        elif kind == "call":
            calls.append(obj)
    return header, calls


class Run:
    """One run: an append-only ledger of call records under ``runs_dir``.

    Opening a ``Run`` with the name of a run that exists continues it (its header is kept).
    The file is created, with its header, on the first :meth:`append`.
    """

    def __init__(
        self,
        name: str | None = None,
        runs_dir: str | Path | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.runs_dir = resolve_runs_dir(runs_dir)
        if name is None:
            name = new_run_name()
            while (self.runs_dir / f"{name}{SUFFIX}").exists():
                name = new_run_name()
        if name.endswith(SUFFIX):
            name = name[: -len(SUFFIX)]
        if not _NAME_RE.match(name):
            raise ValueError(f"invalid run name {name!r}: use letters, digits, '.', '_' and '-'")
        self.name = name
        self.path = self.runs_dir / f"{name}{SUFFIX}"
        self._lock = threading.Lock()
        try:
            header = _read_header(self.path) if self.path.exists() else None
        except (OSError, UnicodeDecodeError) as exc:
            # unreadable now: appends will say so for each record; a call is never failed for it
            log.warning("%s: cannot read the run header: %s", self.path, type(exc).__name__)
            header = None
        self._header_written = header is not None
        self._dir_ready = False
        if header is None:
            header = {"type": "run", "name": name, "created": time.time(), "config": dict(config or {})}
            _refuse_keys(header, "run header")
        self._meta: dict[str, Any] = header

    def __repr__(self) -> str:
        return f"Run(name={self.name!r}, path={str(self.path)!r})"

    @property
    def meta(self) -> dict[str, Any]:
        """The header: ``name``, ``created`` (epoch seconds), ``config`` (with ``plugins``)."""
        return dict(self._meta)

    def _write(self, line: str) -> None:
        data = (line + "\n").encode("utf-8")
        # one write() on an O_APPEND descriptor: concurrent writers never interleave within a line
        fd = open_private(self.path, os.O_RDWR | os.O_APPEND)
        try:
            size = os.fstat(fd).st_size
            if size:
                os.lseek(fd, size - 1, os.SEEK_SET)  # O_APPEND: the write still goes to the end
                if os.read(fd, 1) != b"\n":
                    # a writer died mid-line (kill -9): end that line, or this record would join it
                    data = b"\n" + data
            os.write(fd, data)
        finally:
            os.close(fd)

    def _ensure_header(self) -> None:
        if not self._dir_ready:
            # once per Run: create the folder 0700, or tighten one tokensaver made before
            private_dir(self.runs_dir, tighten=_only_ledgers)
            self._dir_ready = True
        if self._header_written:
            return
        try:
            # exclusive create: if another process made this run first, keep its header
            fd = open_private(self.path, os.O_WRONLY | os.O_EXCL)
        except FileExistsError:
            header = _read_header(self.path)
            if header is not None:
                self._meta = header
            else:
                self._write(_dumps(self._meta))
        else:
            try:
                os.write(fd, (_dumps(self._meta) + "\n").encode("utf-8"))
            finally:
                os.close(fd)
        self._header_written = True

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Persist one call record (a new line, flushed); return the record as kept. Never raises.

        Strings that look like an API key are replaced, and the record is marked ``"redacted":
        true``; a write that fails is logged and the returned record says so (``ledger_error``).
        Thread-safe. The caller's dict is never changed.
        """
        if not isinstance(record, dict):
            raise TypeError(f"a call record is a dict, not {type(record).__name__}")
        rec, found = redact_keys(record)
        rec = dict(rec)
        rec.setdefault("type", "call")
        if found:
            # where, never what: the log must not hold the key either
            log.warning(
                "%s: redacted %d value(s) that look like an API key from call record %s: %s",
                self.path,
                len(found),
                rec.get("id"),
                ", ".join(found[:10]),
            )
        try:
            line = _dumps(rec)
            with self._lock:
                self._ensure_header()
                self._write(line)
        except Exception as exc:  # disk full, permissions, a folder in the way: the call goes on
            problem = f"{type(exc).__name__}: {getattr(exc, 'strerror', None) or exc}"
            log.warning("%s: cannot write call record %s: %s", self.path, rec.get("id"), problem)
            rec["ledger_error"] = problem
        return rec

    def records(self) -> list[dict[str, Any]]:
        """The call records persisted so far, oldest first."""
        if not self.path.exists():
            return []
        return _read_lines(self.path)[1]

    def summary(self) -> dict[str, Any]:
        """Totals over the run's calls (see :func:`tokensaver.report.run_summary`)."""
        from .report import run_summary

        return run_summary(self.records())

    def report(self, plugin_manager: Any = None) -> Report:
        """A :class:`~tokensaver.report.Report` of this run, with sections from the run's plugins."""
        from .report import Report

        return Report.from_run(self, plugin_manager=plugin_manager)


def _only_ledgers(directory: Path) -> bool:
    """True when ``directory`` holds nothing but ledgers: tokensaver's own folder, safe to make 0700."""
    try:
        return all(p.suffix == SUFFIX and p.is_file() for p in directory.iterdir())
    except OSError:
        return False


def _run_files(runs_dir: Path) -> list[Path]:
    if not runs_dir.is_dir():
        return []
    return [p for p in runs_dir.glob(f"*{SUFFIX}") if p.is_file()]


def list_runs(runs_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Runs under ``runs_dir`` as ``{name, created, calls, saved_usd, path}``, newest first."""
    rows = []
    for path in _run_files(resolve_runs_dir(runs_dir)):
        try:
            header, calls = _read_lines(path)
        except OSError as exc:
            log.warning("%s: unreadable: %s", path, exc)
            continue
        created = (header or {}).get("created")
        if not isinstance(created, int | float):
            created = path.stat().st_mtime
        saved = 0.0
        for c in calls:
            try:
                saved += float(c.get("saved_usd") or 0.0)
            except (TypeError, ValueError):
                pass
        rows.append(
            {
                "name": path.stem,
                "created": float(created),
                "calls": len(calls),
                "saved_usd": saved,
                "path": str(path),
            }
        )
    rows.sort(key=lambda r: (r["created"], r["name"]), reverse=True)
    return rows


def load_run(name: str, runs_dir: str | Path | None = None) -> Run:
    """An existing run by name (or path to its ``.jsonl``); raises ``TokensaverError`` listing the runs."""
    as_path = Path(name)
    if name.endswith(SUFFIX) and as_path.is_file():
        return Run(as_path.stem, runs_dir=as_path.parent)
    directory = resolve_runs_dir(runs_dir)
    stem = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name
    if _NAME_RE.match(stem) and (directory / f"{stem}{SUFFIX}").is_file():
        return Run(stem, runs_dir=directory)
    known = [r["name"] for r in list_runs(directory)]
    if not known:
        raise TokensaverError(f"no run named {name!r}: there are no runs in {directory}")
    shown = ", ".join(known[:10]) + (f" (and {len(known) - 10} more)" if len(known) > 10 else "")
    raise TokensaverError(f"no run named {name!r} in {directory}; runs (newest first): {shown}")


def latest_run(runs_dir: str | Path | None = None) -> Run:
    """The newest run under ``runs_dir``; raises ``TokensaverError`` when there is none."""
    directory = resolve_runs_dir(runs_dir)
    runs = list_runs(directory)
    if not runs:
        raise TokensaverError(f"there are no runs in {directory}")
    return Run(runs[0]["name"], runs_dir=directory)
