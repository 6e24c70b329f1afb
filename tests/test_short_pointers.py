"""summarize's ``short_pointers``: the pointers of ``model_turns``, ``user_texts`` and
``self_repeats`` without the words their ranges imply (``[tokensaver: repeats lines 3-14 of
assistant turn 1's command]``), every line still where the pointer says; through the real SDK over
HTTP to the emulator, and the pointer forms read back line for line."""

from __future__ import annotations

import re
from typing import Any

from strategies import expand_lines
from test_model_turns import FIRST, SECOND, command, conversation, send, turn
from tokensaver_plugins import _self_repeats
from tokensaver_plugins._repeats import RepeatIndex, marker

from tokensaver.tokens import count_text

SHORT = re.compile(r"^\[tokensaver: repeats lines (\d+)-(\d+) of assistant turn (\d+)'s command\]$")
LONG = re.compile(
    r"^\[tokensaver: (\d+) lines as lines (\d+)-(\d+) of assistant turn (\d+)'s command above\]$"
)


def test_a_script_written_again_points_at_the_first_copy_in_fewer_tokens(tmp_path: Any) -> None:
    msgs = conversation(turn(0, FIRST), turn(1, SECOND))
    [short] = send(tmp_path / "short", [msgs])
    [long] = send(tmp_path / "long", [msgs], {"summarize": {"short_pointers": False}})
    assert command(short, 1) == command(long, 1) == FIRST  # the first copy as it came
    got, was = command(short, 3), command(long, 3)
    pointers = [ln for ln in got.split("\n") if ln.startswith("[tokensaver:")]
    assert pointers and all(SHORT.match(ln) for ln in pointers), got
    assert all(LONG.match(ln) for ln in was.split("\n") if ln.startswith("[tokensaver:")), was
    assert count_text(got) < count_text(was)
    first = FIRST.split("\n")
    # every line where the pointer says: the range alone names them
    assert expand_lines(got, SHORT, lambda m: first[int(m.group(1)) - 1 : int(m.group(2))]) == SECOND
    assert expand_lines(was, LONG, lambda m: first[int(m.group(2)) - 1 : int(m.group(3))]) == SECOND


def test_the_short_pointer_forms_name_the_same_lines() -> None:
    assert (
        marker("toolu_1", 7, None, (8, 14))
        == "[tokensaver: 7 lines as lines 8-14 of the tool_use toolu_1 result above]"
    )
    assert (
        marker("toolu_1", 7, None, (8, 14), short=True)
        == "[tokensaver: repeats lines 8-14 of the tool_use toolu_1 result]"
    )
    assert marker("t", 5, (20, 24), (20, 24), "{}", short=True) == "[tokensaver: lines 20-24 as in t]"
    assert (
        marker("t", 5, (21, 25), (20, 24), "{}", short=True)
        == "[tokensaver: lines 21-25 as lines 20-24 of t]"
    )
    text = "\n".join(
        ["head", *(f"frame {k} of a long chained traceback line" for k in range(5)), "again"] * 2
    )
    out = _self_repeats.rewrite(text, short=True)
    assert "[tokensaver: repeats lines 1-7 of this output]" in out.split("\n")
    lines = out.split("\n")
    back = expand_lines(
        out,
        re.compile(r"^\[tokensaver: repeats lines (\d+)-(\d+) of this output\]$"),
        lambda m: lines[int(m.group(1)) - 1 : int(m.group(2))],
    )
    assert back == text


def test_short_and_long_indexes_keep_their_own_rewrites() -> None:
    """A rewrite kept across calls under one form is never handed to an index of the other."""
    block = "\n".join(f"line {k} of a script the model writes twice, long enough" for k in range(6))
    long, short = RepeatIndex(3, 50, "{}"), RepeatIndex(3, 50, "{}", short=True)
    for index in (long, short):
        index.add_text("assistant turn 1's command", block)
    assert long.rewrite("assistant turn 2's command", block) == (
        "[tokensaver: 6 lines as lines 1-6 of assistant turn 1's command above]"
    )
    assert short.rewrite("assistant turn 2's command", block) == (
        "[tokensaver: repeats lines 1-6 of assistant turn 1's command]"
    )


def test_a_run_of_100_to_150_characters_pays_for_its_short_pointer(tmp_path: Any) -> None:
    """3 lines, 100-150 characters: a pointer since the short form (MIN_CHARS 150 -> 100)."""
    lines = [
        "import django, os; os.environ['DJANGO_SETTINGS_MODULE'] = 'app.settings'",
        "django.setup()",
        "from app.models import Book, Author",
        "print(Book.objects.count())",
    ]
    script = "python - <<'EOF'\n" + "\n".join(lines) + "\nEOF"
    again = script.replace("count()", "all()")
    assert 100 <= sum(len(ln) + 1 for ln in lines[:3]) < 150
    [sent] = send(tmp_path, [conversation(turn(0, script), turn(1, again))])
    got = command(sent, 3)
    first = script.split("\n")
    assert got.split("\n")[0] == "[tokensaver: repeats lines 1-4 of assistant turn 1's command]", got
    assert expand_lines(got, SHORT, lambda m: first[int(m.group(1)) - 1 : int(m.group(2))]) == again
    frames = [
        f"  /repo/app/models/{name}.py:{n} in {name}_{n}"
        for name, n in (("save", 12), ("execute", 40), ("run", 51))
    ]
    text = "\n".join(
        ["Traceback (most recent call last):", *frames, "ValueError: a", "", "Traceback:", *frames, "E"]
    )
    assert 100 <= sum(len(ln) + 1 for ln in frames) < 150
    out = _self_repeats.rewrite(text, short=True)
    assert "[tokensaver: repeats lines 2-4 of this output]" in out.split("\n"), out


BLOCK = [f"    assert check_{k}(settings, value={k}) == 'case {k}'" for k in range(4)]
TAIL = [f"    report_{k}(settings, level={k}, verbose=True)" for k in range(4)]
OWN = re.compile(r"^\[tokensaver: repeats lines (\d+)-(\d+) of this (text|command)\]$")


def test_code_a_turn_quotes_twice_points_at_its_first_copy_in_that_turn(tmp_path: Any) -> None:
    text = "\n".join(["THOUGHT: the checks are", *BLOCK, "and after the fix still", *BLOCK, "then", *TAIL])
    later = "THOUGHT: the reports\n" + "\n".join(TAIL) + "\nare unchanged."
    msgs = conversation(turn(0, "ls", text), turn(1, "ls", later))
    [sent] = send(tmp_path / "on", [msgs])
    got = sent[1]["content"][0]["text"]
    lines = got.split("\n")
    assert lines[6] == "[tokensaver: repeats lines 2-5 of this text]", got
    assert expand_lines(got, OWN, lambda m: lines[int(m.group(1)) - 1 : int(m.group(2))]) == text
    # a later turn's pointer into it counts its lines as sent (the pointer one line)
    again = sent[3]["content"][0]["text"]
    assert again.split("\n")[1] == "[tokensaver: repeats lines 9-12 of assistant turn 1's text]", again
    assert expand_lines(again, SHORT_TEXT, lambda m: lines[int(m.group(1)) - 1 : int(m.group(2))]) == later
    [off] = send(tmp_path / "off", [msgs], {"summarize": {"self_repeats": False}})
    assert off[1]["content"][0]["text"] == text


SHORT_TEXT = re.compile(r"^\[tokensaver: repeats lines (\d+)-(\d+) of assistant turn 1's text\]$")


def test_a_command_that_repeats_its_own_lines_names_this_command(tmp_path: Any) -> None:
    script = "\n".join(["python - <<'EOF'", *BLOCK, "print('again')", *BLOCK, "EOF"])
    [sent] = send(tmp_path, [conversation(turn(0, script))])
    got = command(sent, 1)
    lines = got.split("\n")
    assert lines[6] == "[tokensaver: repeats lines 2-5 of this command]", got
    assert expand_lines(got, OWN, lambda m: lines[int(m.group(1)) - 1 : int(m.group(2))]) == script
