"""summarize: an ``ls -R`` listing goes as a tree, one line per directory with its entries after
the colon, an indented directory named relative to the one above it; every name kept and the
listing read back exactly. Through the real SDK over HTTP to the emulator."""

from __future__ import annotations

from typing import Any

from strategies import tool_loop
from test_summarize_framing import sent_body
from tokensaver_plugins import _ls_tree

from tokensaver.tokens import count_text

MODEL = "claude-sonnet-4-6"
LOCALES = ["af", "ar", "ast", "az", "be", "bg", "bn", "br", "bs", "ca", "cs", "cy", "da", "de"]
BLOCKS = [
    (".", ["AUTHORS", "LICENSE", "README.rst", "django", "setup.py", "tests"]),
    ("./django", ["__init__.py", "apps", "conf", "shortcuts.py"]),
    ("./django/apps", ["__init__.py", "config.py", "registry.py"]),
    ("./django/conf", ["__init__.py", "global_settings.py", "locale"]),
    ("./django/conf/locale", ["__init__.py", *LOCALES]),
    *(
        block
        for name in LOCALES
        for block in (
            (f"./django/conf/locale/{name}", ["LC_MESSAGES", "__init__.py", "formats.py"]),
            (f"./django/conf/locale/{name}/LC_MESSAGES", ["django.mo", "django.po"]),
        )
    ),
    ("./tests", ["runtests.py", "urls.py"]),
]
LISTING = "\n\n".join("\n".join([f"{path}:", *entries]) for path, entries in BLOCKS) + "\n"


def sent(tmp_path: Any, text: str) -> str:
    body = {
        "model": MODEL,
        "max_tokens": 64,
        "messages": tool_loop("List the files.", [("bash", {"command": "ls -R"}, text)]),
    }
    out: str = sent_body(tmp_path, body)["messages"][2]["content"][0]["content"]
    return out


def test_a_recursive_listing_goes_as_a_tree(tmp_path: Any) -> None:
    out = sent(tmp_path, f"<returncode>0</returncode>\n<output>\n{LISTING}</output>")
    lines = out.split("\n")
    assert lines[:8] == [
        "[returncode 0]",
        _ls_tree.MARKER,
        ".: AUTHORS LICENSE README.rst django setup.py tests",
        " django: __init__.py apps conf shortcuts.py",
        "  apps: __init__.py config.py registry.py",
        "  conf: __init__.py global_settings.py locale",
        "   locale: __init__.py " + " ".join(LOCALES),
        "    af: LC_MESSAGES{django.mo django.po} __init__.py formats.py",  # its one directory in its line
    ]
    assert lines[8] == "    ar: LC_MESSAGES{django.mo django.po} __init__.py formats.py"
    assert lines[-2:] == [" tests: runtests.py urls.py", ""]
    assert "\n".join(_ls_tree.expand(lines[2:-1])) + "\n" == LISTING
    assert count_text(out) < 0.75 * count_text(LISTING)


def test_the_agents_cut_head_and_tail_each_go_as_a_tree(tmp_path: Any) -> None:
    """mini-swe-agent's too-long output: the head ends inside a name, the tail starts inside one
    and under a directory it does not show; the lines around each run as they came."""
    head, tail = LISTING[:1500], LISTING[-1200:]
    text = (
        "<returncode>0</returncode>\n<warning>\nThe output of your last command was too long.\n</warning>"
        f"<output_head>\n{head}\n</output_head>\n<elided_chars>\n9000 characters elided\n</elided_chars>\n"
        f"<output_tail>\n{tail}</output_tail>"
    )
    out = sent(tmp_path, text)
    assert out.count(_ls_tree.MARKER) == 2
    assert out.split(_ls_tree.MARKER)[0].endswith("</warning><output_head>\n")
    assert "\n</output_head>\n<elided_chars>\n9000 characters elided\n</elided_chars>\n" in out
    assert out.endswith("\n./tests: runtests.py urls.py\n</output_tail>")  # not under the tail's first one
    cut = head.rsplit("\n", 1)[1]  # the head's last line, cut inside a name: read as one
    assert f"\n    cs: {cut}\n</output_head>" in out
    assert count_text(out) < 0.85 * count_text(text)


def test_a_name_with_a_space_keeps_its_directory_as_it_came(tmp_path: Any) -> None:
    text = LISTING.replace("registry.py", "my registry.py")
    out = sent(tmp_path, f"<returncode>0</returncode>\n<output>\n{text}</output>")
    assert out.startswith(
        "[returncode 0]\n.:\nAUTHORS\nLICENSE\nREADME.rst\ndjango\nsetup.py\ntests\n\n./django:\n"
    )
    assert "./django/apps:\n__init__.py\nconfig.py\nmy registry.py\n\n" + _ls_tree.MARKER in out
    assert f"{_ls_tree.MARKER}\n./django/conf: __init__.py global_settings.py locale\n locale: " in out
