"""Gates on the tests' own shape: the shared fixtures of tokensaver.testing are used, not copied."""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent

# a fixture whose whole body is the shared ``emulator`` / ``emu`` fixture of tokensaver.testing
COPY = re.compile(
    r"@pytest\.fixture\s*\ndef (\w+)\([^)]*\)[^:\n]*:\n"
    r"(?:\s*\"\"\"[^\n]*\"\"\"\n)?"
    r"\s*(?:\w+ = pytest\.importorskip\([^\n]*\)\n\s*)?"
    r"with (?:\w+\.)?Emulator\(virtual_clock=True\) as (\w+):\n\s*yield \2\n"
)


def copies(text: str) -> list[str]:
    """Names of the fixtures in ``text`` that copy the shared emulator fixture."""
    return [m.group(1) for m in COPY.finditer(text)]


def test_the_pattern_finds_a_copy() -> None:
    copy = (
        "@pytest.fixture\ndef emu() -> Any:\n    with Emulator(virtual_clock=True) as e:\n        yield e\n"
    )
    assert copies(copy) == ["emu"]
    own = "@pytest.fixture\ndef emu() -> Any:\n    with Emulator(virtual_clock=True, start_time=1) as e:\n        yield e\n"
    assert copies(own) == []  # an emulator set up differently is its own fixture


def test_no_test_file_copies_the_shared_emulator_fixture() -> None:
    found = {p.name: names for p in sorted(TESTS.glob("*.py")) if (names := copies(p.read_text()))}
    assert not found, f"use the shared `emu` fixture of tokensaver.testing instead of a copy: {found}"
