"""Meta-tests: every hook is documented (docstring with :param:, README table); its own test and its section in
docs/plugin-hooks.md are held by tests/test_hooks.py."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from tokensaver import hookspecs

ROOT = Path(__file__).resolve().parent.parent
HOOKS = [
    name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("tokensaver_")
]


def test_hooks_found() -> None:
    assert len(HOOKS) >= 5


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented(hook: str) -> None:
    fn = getattr(hookspecs, hook)
    doc = inspect.getdoc(fn) or ""
    for param in inspect.signature(fn).parameters:
        assert f":param {param}:" in doc, f"{hook} does not document {param}"
    assert f"`{hook}(" in (ROOT / "README.md").read_text(), f"{hook} missing from the README hook table"


def test_readme_commands_present() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "tokensaver demo" in readme and "python -m pytest" in readme
    assert "python -m pytest" in (ROOT / ".ci" / "run").read_text()
