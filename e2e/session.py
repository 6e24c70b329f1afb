"""A scripted model that drives a real coding agent through a multi-turn session with its own tools.

``SessionScript`` is the emulator's reply for every request. It walks ``PLAN`` (23 tool calls in the
repository of :mod:`session_repo`: a listing, ten reads, searches, test runs, two edits, re-reads of
the edited files, a new test file, the tests again, a diff and a status) one tool call per turn,
then answers with a final text carrying ``FINAL_MARK`` and the last test run's summary.

Each step is expressed with the tools the agent sends (``tools`` of the request, matched by name and
input schema: Claude Code's ``Read``/``Edit``/``Write``/``Bash``, OpenClaw's ``read``/``edit``/
``write``/``exec``); a step whose kind of tool the agent does not offer runs through its shell tool
instead. The step is tracked in the ``tool_use`` id (``toolu_e2e_<step>``), so the script keeps no
conversation state and a request whose older turns were rewritten still finds its place. Every
step's result is checked the first time it comes back as the newest result (what the model would
read): it must hold the facts the step expects, so a session passes only when the agent really ran
each tool and the facts reached the model (through tokensaver too).
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from session_repo import BUG, BULK_FUNCTION, BULK_TEST, FIX, PRICING_ANCHOR

FINAL_MARK = "tokensaver-e2e-session-done"
PROMPT = (
    "This is an offline integration test of a coding session. In this repository, find and fix the "
    "failing test, add pricing.bulk_discount with tests, and show the diff. Use your tools exactly as "
    "the assistant proposes, one call at a time, then report the result."
)
TEST_CMD = "python3 -m unittest discover -s tests -v 2>&1"
SHELL_NAMES = ("bash", "exec", "shell", "run_command", "terminal", "execute_command")
READ_NAMES = ("read", "read_file", "view_file", "view")
GREP_NAMES = ("grep", "search", "search_files", "rg")
EDIT_NAMES = ("edit", "edit_file", "str_replace", "replace")
WRITE_NAMES = ("write", "write_file", "create_file")
ID_RE = re.compile(r"^toolu_e2e_(\d+)")


@dataclass(frozen=True)
class Step:
    """One tool call of the session; ``expect`` must all be in its result, ``forbid`` none."""

    kind: str  # shell | read | grep | edit | write
    say: str
    path: str = ""  # relative to the repository
    command: str = ""  # shell: the command; grep: the pattern
    old: str = ""
    new: str = ""
    expect: tuple[str, ...] = ()
    forbid: tuple[str, ...] = ()
    fails: bool = False  # the command exits non-zero (a failing test run): a tool error is expected


READS = [
    ("README.md", "stockroom-readme-v1"),
    ("pyproject.toml", "stockroom-pyproject-v1"),
    ("stockroom/__init__.py", "stockroom-init-v1"),
    ("stockroom/models.py", "stockroom-models-v1"),
    ("stockroom/store.py", "stockroom-store-v1"),
    ("stockroom/pricing.py", "stockroom-pricing-v1"),
    ("stockroom/io.py", "stockroom-io-v1"),
    ("stockroom/report.py", "stockroom-report-v1"),
    ("tests/test_store.py", "stockroom-test-store-v1"),
    ("tests/test_pricing.py", "stockroom-test-pricing-v1"),
]

PLAN: list[Step] = [
    Step(
        "shell",
        "Let me look at the repository layout first.",
        command="find . -type f -not -path './.git/*' | sort",
        expect=("./stockroom/store.py", "./tests/test_io.py"),
    ),
    *(Step("read", f"Reading {p}.", path=p, expect=(marker,)) for p, marker in READS),
    Step(
        "grep",
        "Where is total_value used?",
        path=".",
        command="total_value",
        expect=("report.py", "store.py"),
    ),
    Step(
        "shell",
        "Running the test suite.",
        command=TEST_CMD,
        expect=("FAILED (failures=1)", "Decimal('4.35') != Decimal('33.30')", "Ran 14 tests"),
        fails=True,
    ),
    Step(
        "grep",
        "The total ignores the quantity; let me confirm in store.py.",
        path="stockroom/store.py",
        command="unit_price",
        expect=("unit_price for item",),
    ),
    Step("edit", "Fixing Store.total_value.", path="stockroom/store.py", old=BUG, new=FIX),
    Step(
        "read",
        "Re-reading store.py after the edit.",
        path="stockroom/store.py",
        expect=("item.unit_price * item.quantity",),
        forbid=("(item.unit_price for item",),
    ),
    Step(
        "shell",
        "Running the tests again.",
        command=TEST_CMD,
        expect=("Ran 14 tests", "OK"),
        forbid=("FAILED",),
    ),
    Step(
        "edit",
        "Adding bulk_discount to pricing.py.",
        path="stockroom/pricing.py",
        old=PRICING_ANCHOR,
        new=BULK_FUNCTION + PRICING_ANCHOR,
    ),
    Step(
        "read",
        "Re-reading pricing.py.",
        path="stockroom/pricing.py",
        expect=("bulk-discount-v1", "def apply_tax"),
    ),
    Step("write", "Writing tests for bulk_discount.", path="tests/test_bulk.py", new=BULK_TEST),
    Step(
        "shell",
        "Running the whole suite with the new tests.",
        command=TEST_CMD,
        expect=("Ran 18 tests", "test_fifty_units_get_ten_percent", "OK"),
        forbid=("FAILED",),
    ),
    Step(
        "shell",
        "The diff of the session.",
        command="git diff",
        expect=("+def bulk_discount", "+        return sum((item.unit_price * item.quantity"),
    ),
    Step("shell", "And the new file.", command="git status --short", expect=("?? tests/test_bulk.py",)),
]


def _strings(value: Any) -> list[str]:
    """Every string in a JSON value (texts, tool results, tool calls' inputs), in order."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _strings(v)]
    if isinstance(value, list):
        return [t for v in value for t in _strings(v)]
    return []


def _shown(expected: str, result: str, seen: str) -> bool:
    """``expected`` is in what the model reads: the result's own text, or (the result carrying a
    tokensaver pointer) what was sent before it; a diff line (``+x``) also as the pointed-at ``x``
    when the pointer says its lines each follow that ``+`` (``..., each after '+'``)."""
    if expected in seen:
        return True
    mark = expected[:1]
    return mark in ("+", "-") and f"each after {mark!r}" in result and expected[1:] in seen


def text_of(content: Any) -> str:
    """The text of a tool result's content (a string or a list of blocks)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(text_of(b.get("text") or b.get("content")) for b in content if isinstance(b, dict))
    return ""


def _props(tool: dict[str, Any]) -> dict[str, Any]:
    return (tool.get("input_schema") or {}).get("properties") or {}


def _key(props: dict[str, Any], *names: str) -> str | None:
    return next((n for n in names if n in props), None)


def _find(
    tools: dict[str, dict[str, Any]], names: tuple[str, ...], *need: tuple[str, ...]
) -> dict[str, Any] | None:
    """The first tool named like ``names`` whose schema has a key of each group in ``need``."""
    for name in names:
        tool = tools.get(name)
        if tool is not None and all(_key(_props(tool), *group) for group in need):
            return tool
    return None


PATH_KEYS = ("file_path", "path", "filename", "file")


class SessionScript:
    """The emulator's reply: the next step of ``PLAN`` as a tool call of the agent's own tools."""

    def __init__(self, repo: Path, plan: list[Step] | None = None) -> None:
        self.repo = repo
        self.plan = plan or PLAN
        self.seen: list[dict[str, Any]] = []  # one summary per request
        self.verdicts: dict[int, str] = {}  # step -> "ok" or what was wrong with its result
        self.used: dict[int, str] = {}  # step -> tool name the agent was asked to call
        self.final: str | None = None
        self.last_ran = ""  # the last "Ran N tests" line a test run showed

    # -- what to call -------------------------------------------------------------------------
    def _abs(self, rel: str) -> str:
        return str(self.repo) if rel in ("", ".") else str(self.repo / rel)

    def _shell(self, tool: dict[str, Any], command: str, why: str) -> dict[str, Any]:
        props = _props(tool)
        out: dict[str, Any] = {
            _key(props, "command", "cmd", "script") or "command": f"cd {self.repo} && {command}"
        }
        for extra in ("description", "title"):
            if extra in props:
                out[extra] = why[:100]
        return out

    def call_for(self, step: Step, tools: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
        """(tool name, input) for ``step`` with these tools; the shell when no tool fits."""
        shell = _find(tools, SHELL_NAMES, ("command", "cmd", "script"))
        if shell is None:
            raise LookupError("no shell tool")
        path = self._abs(step.path)
        if step.kind == "read":
            tool = _find(tools, READ_NAMES, PATH_KEYS)
            if tool:
                return tool["name"], {_key(_props(tool), *PATH_KEYS): path}
            return shell["name"], self._shell(shell, f"cat -n {shlex.quote(step.path)}", step.say)
        if step.kind == "grep":
            tool = _find(tools, GREP_NAMES, ("pattern", "query", "regex"))
            if tool:
                props = _props(tool)
                inp: dict[str, Any] = {_key(props, "pattern", "query", "regex"): step.command}
                if (k := _key(props, "path", "directory", "dir")) is not None:
                    inp[k] = path
                if "output_mode" in props:
                    inp["output_mode"] = "content"
                if "-n" in props:
                    inp["-n"] = True
                return tool["name"], inp
            cmd = f"grep -rn {shlex.quote(step.command)} {shlex.quote(step.path)}"
            return shell["name"], self._shell(shell, cmd, step.say)
        if step.kind == "edit":
            tool = _find(tools, EDIT_NAMES, PATH_KEYS)
            if tool:
                props = _props(tool)
                path_key = _key(props, *PATH_KEYS)
                if "edits" in props:  # OpenClaw: {path, edits: [{oldText, newText}]}
                    item = ((props["edits"].get("items") or {}).get("properties")) or {}
                    old_k = _key(item, "oldText", "old_string", "old_str", "old") or "oldText"
                    new_k = _key(item, "newText", "new_string", "new_str", "new") or "newText"
                    return tool["name"], {path_key: path, "edits": [{old_k: step.old, new_k: step.new}]}
                old_k2 = _key(props, "old_string", "oldText", "old_str", "old")
                new_k2 = _key(props, "new_string", "newText", "new_str", "new")
                if old_k2 and new_k2:
                    return tool["name"], {path_key: path, old_k2: step.old, new_k2: step.new}
            code = (
                "import pathlib,sys; p=pathlib.Path(sys.argv[1]); t=p.read_text(); "
                "assert t.count(sys.argv[2])==1; p.write_text(t.replace(sys.argv[2],sys.argv[3]))"
            )
            cmd = " ".join(shlex.quote(a) for a in ("python3", "-c", code, step.path, step.old, step.new))
            return shell["name"], self._shell(shell, cmd + " && echo edited", step.say)
        if step.kind == "write":
            tool = _find(tools, WRITE_NAMES, PATH_KEYS, ("content", "contents", "text"))
            if tool:
                props = _props(tool)
                return tool["name"], {
                    _key(props, *PATH_KEYS): path,
                    _key(props, "content", "contents", "text"): step.new,
                }
            cmd = f"cat > {shlex.quote(step.path)} <<'TOKENSAVER_E2E_EOF'\n{step.new}TOKENSAVER_E2E_EOF\necho written"
            return shell["name"], self._shell(shell, cmd, step.say)
        return shell["name"], self._shell(shell, step.command, step.say)

    # -- checking what came back --------------------------------------------------------------
    def _judge(self, step: int, result: str, is_error: bool, earlier: str = "") -> str:
        spec = self.plan[step]
        ran = [ln.strip() for ln in result.splitlines() if ln.startswith("Ran ")]
        if ran:
            self.last_ran = ran[-1]
        # a result whose lines tokensaver sent as a pointer to earlier content (a result or a tool
        # call's input above) still shows the model what they point at: what was sent before it
        # counts, as the bench's facts check counts it
        seen = result + "\n" + earlier if "[tokensaver: " in result else result
        problems = [f"missing {e!r}" for e in spec.expect if not _shown(e, result, seen)]
        problems += [f"has {f!r}" for f in spec.forbid if f in result]
        if is_error and not spec.fails:
            problems.insert(0, "tool error")
        if not problems:
            return "ok"
        return "; ".join(problems) + f" in {result.strip()[:300]!r}"

    def _step_of(self, tool_use_id: Any) -> int | None:
        m = ID_RE.match(str(tool_use_id or ""))
        return int(m.group(1)) if m else None

    # -- the reply ----------------------------------------------------------------------------
    def __call__(self, body: dict[str, Any]) -> Any:
        """The next step's reply, after the thinking block a thinking model writes first (the
        emulator signs it and binds it to this request, as a model with preserved thinking does)."""
        reply = self._reply(body)
        th = body.get("thinking")
        if not isinstance(th, dict) or th.get("type") not in ("adaptive", "enabled"):
            return reply
        text = "" if th.get("display") == "omitted" else "Following the plan: the next step."
        blocks = [{"type": "text", "text": reply}] if isinstance(reply, str) else list(reply)
        return [{"type": "thinking", "thinking": text}, *blocks]

    def _reply(self, body: dict[str, Any]) -> Any:
        tools_list = [t for t in body.get("tools") or [] if isinstance(t, dict)]
        messages = body.get("messages") or []
        self.seen.append(
            {
                "model": body.get("model"),
                "stream": bool(body.get("stream")),
                "tools": len(tools_list),
                "messages": len(messages),
                "chars": len(json.dumps(body)),
            }
        )
        tools = {str(t.get("name", "")).lower(): t for t in tools_list}
        if _find(tools, SHELL_NAMES, ("command", "cmd", "script")) is None:
            return "OK."  # side requests (titles, summaries): no tools, a plain answer
        asked: list[int] = []
        results: dict[int, tuple[str, bool]] = {}
        last_assistant = -1
        for i, m in enumerate(messages):
            content = m.get("content") if isinstance(m, dict) else None
            if not isinstance(content, list):
                continue
            if m.get("role") == "assistant":
                last_assistant = i
            for b in content:
                if not isinstance(b, dict):
                    continue
                if b.get("type") == "tool_use" and (s := self._step_of(b.get("id"))) is not None:
                    asked.append(s)
                elif (
                    b.get("type") == "tool_result" and (s := self._step_of(b.get("tool_use_id"))) is not None
                ):
                    if i > last_assistant:  # the newest results: what this turn of the model reads
                        results[s] = (text_of(b.get("content")), bool(b.get("is_error")))
        earlier = "\n".join(_strings(messages[: last_assistant + 1]))
        for s, (text, err) in results.items():
            if 0 <= s < len(self.plan) and s not in self.verdicts:
                self.verdicts[s] = self._judge(s, text, err, earlier)
        nxt = max(asked) + 1 if asked else 0
        if nxt >= len(self.plan):
            self.final = (
                f"{FINAL_MARK}: fixed Store.total_value (it ignored the quantity), added "
                f"pricing.bulk_discount and tests/test_bulk.py; {self.last_ran or 'tests run'}, OK."
            )
            return self.final
        step = self.plan[nxt]
        name, inp = self.call_for(step, tools)
        self.used[nxt] = name
        return [
            {"type": "text", "text": step.say},
            {"type": "tool_use", "id": f"toolu_e2e_{nxt:02d}", "name": name, "input": inp},
        ]

    def problems(self) -> list[str]:
        """Steps that came back without what they should show, and the steps that never came back."""
        out = []
        for s in range(len(self.plan)):
            v = self.verdicts.get(s)
            if v is not None and v != "ok":
                step = self.plan[s]
                out.append(f"step {s} ({step.kind} {step.path or step.command[:40]}): {v}")
        missing = [s for s in range(len(self.plan)) if s not in self.verdicts]
        if missing:
            first = self.plan[missing[0]]
            out.append(
                f"{len(missing)} of {len(self.plan)} steps never came back, from step {missing[0]} "
                f"({first.kind} {first.path or first.command[:40]})"
            )
        return out
