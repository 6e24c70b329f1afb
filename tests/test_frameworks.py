"""Frameworks: ``wrap(ChatAnthropic(...))`` and every README "Use with ..." snippet, run against the emulator.

Each framework is an optional install (``pip install -e ".[frameworks]"``); a test whose framework is
not importable is skipped with the package to install. The README snippets run as written in a
subprocess whose environment points the SDKs at the emulator (``ANTHROPIC_BASE_URL``), directly for
``wrap()`` recipes and through ``tokensaver run`` for the proxy ones, as the README says to.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tokensaver
from tokensaver.emulator import Emulator
from tokensaver.run import list_runs, load_run

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 240  # a snippet, its proxy and (Claude Agent SDK) the Claude Code CLI it starts
FRAMEWORKS = {
    "LangChain": "langchain_anthropic",
    "pydantic-ai": "pydantic_ai",
    "LiteLLM": "litellm",
    "the Claude Agent SDK": "claude_agent_sdk",
}


def needs(module: str) -> Any:
    missing = importlib.util.find_spec(module) is None
    return pytest.mark.skipif(missing, reason=f'{module} is not installed (pip install -e ".[frameworks]")')


def readme_section(framework: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^### Use with {re.escape(framework)}\n(.*?)(?=^##)", text, re.S | re.M)
    assert match, f'README has no "### Use with {framework}" section'
    return match.group(1)


def blocks(section: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)


@pytest.fixture
def emu() -> Iterator[Emulator]:
    with Emulator(strict_roles=False) as e:
        yield e


def snippet_env(emu: Emulator, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "TOKENSAVER_", "CLAUDE_"))}
    (tmp_path / "home").mkdir(exist_ok=True)
    return {
        **env,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "ANTHROPIC_BASE_URL": emu.url,
        "ANTHROPIC_API_KEY": "test-key",
        "TOKENSAVER_RUNS_DIR": str(tmp_path / "runs"),
        "TOKENSAVER_CACHE_DIR": str(tmp_path / "cache"),
        "HOME": str(tmp_path / "home"),  # the Claude Code CLI's config and sessions stay in the test
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # offline: LiteLLM's bundled price map, no download
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
    }


def run_snippet(
    emu: Emulator, tmp_path: Path, framework: str
) -> tuple[subprocess.CompletedProcess[str], str]:
    section = readme_section(framework)
    (python,) = blocks(section, "python")
    (tmp_path / "app.py").write_text(python)
    shell = blocks(section, "bash")
    cmd = shell[0].strip() if shell else "python app.py"
    out = subprocess.run(
        ["bash", "-c", cmd],
        cwd=tmp_path,
        env=snippet_env(emu, tmp_path),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, f"{cmd}\n{out.stdout}\n{out.stderr}"
    return out, cmd


def recorded(tmp_path: Path) -> list[dict[str, Any]]:
    return [
        rec for r in list_runs(tmp_path / "runs") for rec in load_run(r["name"], tmp_path / "runs").records()
    ]


def messages_calls(emu: Emulator) -> int:
    return sum(1 for r in emu.requests if r.path.startswith("/v1/messages") and r.status == 200)


@pytest.mark.parametrize(
    "framework",
    [pytest.param(name, marks=needs(module), id=module) for name, module in FRAMEWORKS.items()],
)
def test_readme_snippet_runs_through_tokensaver(emu: Emulator, tmp_path: Path, framework: str) -> None:
    out, cmd = run_snippet(emu, tmp_path, framework)
    assert "This is a reply from the tokensaver emulator" in out.stdout  # the framework got the answer
    calls = recorded(tmp_path)
    assert calls and messages_calls(emu) == len(calls)  # every call went through tokensaver, and upstream
    assert all(rec.get("stages") for rec in calls)
    if cmd.startswith("tokensaver run"):
        assert "cost [billed]" in out.stderr  # the launcher printed the session's report


def test_readme_has_a_use_with_section_per_framework() -> None:
    for framework in FRAMEWORKS:
        assert blocks(readme_section(framework), "python"), framework


def test_wrap_of_something_else_says_what_to_do() -> None:
    with pytest.raises(TypeError) as info:
        tokensaver.wrap(object())  # type: ignore[type-var]
    message = str(info.value)
    assert "got object" in message
    for hint in ("ChatAnthropic", "pydantic-ai", "tokensaver run", "tokensaver proxy", "Use with"):
        assert hint in message


@needs("langchain_anthropic")
def test_wrap_chat_anthropic_covers_sync_async_streams_and_tool_loops(emu: Emulator, tmp_path: Path) -> None:
    from langchain_anthropic import ChatAnthropic
    from langchain_core.messages import HumanMessage, ToolMessage

    model = ChatAnthropic(model="claude-sonnet-4-6", base_url=emu.url, api_key="test-key", max_retries=0)  # type: ignore[call-arg]
    llm = tokensaver.wrap(model, config={"runs_dir": str(tmp_path / "runs")})
    assert type(llm) is type(model) and llm is not model
    assert (
        model._client.middleware == () and model._async_client.middleware == ()
    )  # the caller's is untouched
    assert llm.invoke("hello").content
    assert "".join(str(c.content) for c in llm.stream("hello again"))

    async def both() -> None:
        assert (await llm.ainvoke("async hello")).content
        assert [c async for c in llm.astream("async stream")]

    asyncio.run(both())
    tool = {
        "name": "get_weather",
        "description": "Weather in a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
    use = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
    emu.replies.append({"role": "assistant", "content": [use]})  # the next call's answer
    bound = llm.bind_tools([tool])
    first = bound.invoke([HumanMessage("weather in Paris?")])
    assert first.tool_calls[0]["name"] == "get_weather"  # type: ignore[attr-defined]
    final = bound.invoke(
        [HumanMessage("weather in Paris?"), first, ToolMessage("sunny, 21 C", tool_call_id="toolu_1")]
    )
    assert final.content
    (run,) = list_runs(tmp_path / "runs")
    assert run["calls"] == 6 == messages_calls(emu)  # sync, stream, async, async stream, two tool rounds
    # the two clients share one pipeline and one run
    assert llm._client.tokensaver is llm._async_client.tokensaver is llm.tokensaver
