"""summarize: per content type on real tool outputs (size before/after, facts kept), determinism, hooks."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import expand_lines
from tokensaver_plugins import _json_records, _summarize_text, summarize
from tokensaver_plugins._summarize_text import Options, compact_frames, parse_json, shrink

from tokensaver.context import make_context
from tokensaver.errors import ConfigError
from tokensaver.tokens import count_text

DATA = Path(__file__).parent / "data" / "summarize"
TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
if not TRACES.exists():
    TRACES = Path("/work/shared/traces")

# identifiers, numbers, paths and quoted strings (the "facts" an agent quotes back)
FACT_RE = re.compile(
    r"\"([^\"\n]{2,80})\"|'([^'\n]{2,80})'|`([^`\n]{2,80})`|"
    r"([A-Za-z_][\w.]*(?:/[\w.-]+)+|(?:[\w.-]*/)+[\w.-]+|[A-Za-z_]\w*(?:\.\w+)+|[A-Za-z_]*\d[\w.:-]*|"
    r"[A-Za-z]+_\w+|[a-z]+[A-Z]\w*|[A-Z][a-z]+[A-Z]\w*|\d+(?:\.\d+)?)"
)


def facts(text: str) -> set[str]:
    out = set()
    for m in FACT_RE.finditer(text):
        f = next(g for g in m.groups() if g).strip(".:,")
        if len(f) >= 2:
            out.add(f)
    return out


def used_facts(text: str, next_reply: str) -> set[str]:
    """Facts in the tool output that the agent's next reply used."""
    return facts(text) & facts(next_reply)


def sample(name: str) -> dict:
    return json.loads((DATA / f"{name}.json").read_text())


# -- per content type, on real outputs (tests/data, copied from shared/traces) ----------------

CASES = [
    # name, expected kind, lossless?, minimum token saving
    ("json_tau_flights", "json", True, 0.40),
    ("grep_django", "grep", True, 0.15),
    ("log_mix_compile", "log", False, 0.25),
    ("log_repetitive_django", "log", False, 0.30),
    ("blob_exunit_session", "blob", False, 0.03),
]


@pytest.mark.parametrize("name, kind, lossless, min_saving", CASES)
def test_real_outputs_shrink_and_keep_the_facts_the_agent_used(name, kind, lossless, min_saving):
    s = sample(name)
    res = shrink(s["text"], Options())
    before, after = count_text(s["text"]), count_text(res.text)
    print(f"{name}: {len(s['text'])} -> {len(res.text)} chars, {before} -> {after} tokens ({res.kind})")
    assert res.kind == kind
    assert res.lossy is (not lossless)
    assert after <= (1 - min_saving) * before
    needed = used_facts(s["text"], s["next"])
    assert all(f in res.text for f in needed), needed - {f for f in needed if f in res.text}


NUMBERED_LINE = re.compile(r"^ *(\d+)(→|\t)(.*)$")


def numbered(text: str) -> list[tuple[str, str, str]]:
    """(line number, separator, content) of every numbered line; other lines as ("", "", line)."""
    out = []
    for ln in text.split("\n"):
        m = NUMBERED_LINE.match(ln)
        out.append(m.groups() if m else ("", "", ln))
    return out


def claude_code_read(start: int, n: int) -> str:
    """A Claude Code Read result of the versions in the shared sessions: ``%6d→`` before each line."""
    body = [f"{start + i:>6}→    value_{start + i} = compute(x, {i})  # step" for i in range(n)]
    return "\n".join([*body, "", "<system-reminder>Whenever you read a file, ...</system-reminder>"])


def test_numbered_source_keeps_every_line_and_number():
    s = sample("code_numbered_django")
    res = shrink(s["text"] * 3, Options())
    assert res.kind == "code" and not res.lossy
    assert numbered(res.text) == numbered(s["text"] * 3)  # every number and every content byte
    assert shrink(s["text"] * 3, Options(line_numbers="keep")).text == s["text"] * 3


@pytest.mark.parametrize(
    "text",
    [sample("code_numbered_django")["text"], claude_code_read(1, 300), claude_code_read(995, 40)],
    ids=["cat -n (tab)", "Claude Code Read (arrow)", "Read from line 995"],
)
def test_padded_line_numbers_become_compact_and_every_number_stays(text):
    # the numbered lines alone (the cat -n sample is a mini-swe-agent observation: its tags aside)
    res = shrink(text, Options(shapes=tuple(s for s in Options().shapes if s != "returncode")))
    assert res.kind == "code" and not res.lossy
    assert numbered(res.text) == numbered(text)
    assert not re.search(r"^ +\d+(→|\t)", res.text, re.MULTILINE)  # no padding left
    assert count_text(res.text) <= 0.93 * count_text(text)
    assert shrink(res.text, Options(shapes=())).text == res.text  # already compact: unchanged


def test_pip_log_keeps_its_facts():
    s = sample("log_pip_install")
    res = shrink(s["text"], Options())
    assert used_facts(s["text"], s["next"]) <= {f for f in facts(s["text"]) if f in res.text}
    assert len(res.text) <= len(s["text"])


def test_json_table_is_lossless():
    s = sample("json_tau_flights")
    res = shrink(s["text"], Options())
    value = json.loads(s["text"])
    # every scalar of the original is in the table, exactly as written
    scalars: list[str] = []

    def walk(v):
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        else:
            scalars.append(v if isinstance(v, str) else json.dumps(v))

    walk(value)
    assert all(x in res.text for x in scalars)
    header = res.text.split("\n")[0]
    assert re.match(r"\d+ records: #\|flight_number\|", header) and "prices.economy" in header
    assert _json_records.parse(res.text) == value  # each leg once, the itineraries as their numbers


# -- synthetic content types ------------------------------------------------------------------


def test_json_numbers_are_kept_as_written_and_ambiguous_strings_quoted():
    rows = [
        {"id": i, "price": "1.50" if i == 0 else 2.50, "note": None if i else "", "ok": True}
        for i in range(40)
    ]
    text = json.dumps(rows, indent=2).replace("2.5", "2.50")
    res = shrink(text, Options())
    assert res.kind == "json" and not res.lossy
    lines = res.text.split("\n")
    assert lines[0] == "40 records: id|price|note; every record has ok=true"
    assert lines[1] == '0|"1.50"|""'
    assert lines[2] == "1|2.50|null"


def test_non_tabular_json_is_compacted_with_key_order_kept():
    doc = {"z": 1, "a": {"nested": [1, 2, {"k": "v"}]}, "text": "x" * 3000}
    res = shrink(json.dumps(doc, indent=4), Options())
    assert res.kind == "json" and res.text == json.dumps(doc, separators=(",", ":"))


def test_nested_record_lists_become_referenced_tables():
    doc = {"total": 3, "results": [{"id": f"r{i}", "tags": ["a", "b"], "err": None} for i in range(60)]}
    res = shrink(json.dumps(doc, indent=2), Options())
    assert res.text.startswith(
        'total: 3\nresults (60 records): id|tags; every record has err=null\nr0|["a","b"]\n'
    )


def test_huge_record_lists_keep_head_tail_and_error_rows():
    rows = [{"i": i, "status": "ok"} for i in range(2000)]
    rows[1000]["status"] = "ERROR: disk full"
    res = shrink(json.dumps(rows), Options(max_rows=100))
    assert res.lossy and "ERROR: disk full" in res.text and "1999|ok" in res.text
    assert "records elided" in res.text
    assert not shrink(json.dumps(rows), Options(max_rows=100, lossy=False)).lossy


def test_jsonl_is_tabled():
    text = "\n".join(json.dumps({"ts": i, "level": "info", "msg": f"event {i}"}) for i in range(80))
    res = shrink(text, Options())
    assert res.kind == "json" and res.text.startswith("80 records: ts|msg; every record has level=info")


def test_ansi_and_progress_redraws_are_removed():
    text = (
        "".join(f"\x1b[32mDownloading\x1b[0m {i}%\r" for i in range(100))
        + "done\n"
        + "\x1b[1mok\x1b[0m line\n" * 2
    )
    res = shrink(text * 3, Options(min_chars=10))
    assert "\x1b" not in res.text and "\r" not in res.text and "done" in res.text


def test_repetitive_log_keeps_errors_head_tail_and_counts():
    lines = [f"2024-01-01 10:00:{i % 60:02d} INFO processed batch {i} in {i * 3} ms" for i in range(500)]
    lines[250] = "2024-01-01 10:04:10 ERROR batch 250 failed: /srv/app/worker.py line 88"
    lines += [
        "Traceback (most recent call last):",
        '  File "/srv/app/main.py", line 12, in <module>',
        "ValueError: bad",
    ]
    res = shrink("\n".join(lines), Options())
    assert res.kind == "log" and res.lossy
    for must in (
        lines[0],
        lines[249],
        lines[250],
        lines[251],
        lines[499],
        "ValueError: bad",
        '"/srv/app/main.py", line 12',
    ):
        assert must in res.text
    assert "similar lines (differing only in numbers)" in res.text
    assert len(res.text) < 0.1 * len("\n".join(lines))


def test_exact_repeats_collapse_with_a_count():
    text = "start\n" + "same warning-free line\n" * 200 + "end\n"
    res = shrink(text, Options())
    assert res.text == "start\nsame warning-free line\n[previous line repeated 199 more times]\nend\n"


def test_long_log_is_capped_but_keeps_unseen_paths_and_errors():
    lines = [f"step {chr(97 + i % 26)}{chr(97 + i // 26 % 26)} compiled" for i in range(1200)]
    lines[600] = "compiling lib/app/special_module.ex"
    lines[700] = "warning: variable x is unused"
    res = shrink("\n".join(lines), Options())
    assert "lib/app/special_module.ex" in res.text and "warning: variable x is unused" in res.text
    assert "lines elided" in res.text and res.lossy


def test_markdown_documents_are_not_cut():
    doc = "\n".join(["# Title", "## Section", "### Sub"] + [f"- item {i}: see `cfg_{i}`" for i in range(900)])
    res = shrink(doc, Options())
    assert all(f"cfg_{i}" in res.text for i in range(900))


def test_ls_listing_drops_repeated_owner_columns():
    rows = [f"-rw-r--r--  1 alice staff  {100 + i:5d} Mar  3 12:{i % 60:02d} file_{i}.py" for i in range(60)]
    res = shrink("total 240\n" + "\n".join(rows), Options())
    assert res.kind == "listing" and "alice" in res.text.split("\n")[0] and res.text.count("alice") == 1
    assert all(f"file_{i}.py" in res.text for i in range(60))


def test_web_page_becomes_text_with_links():
    page = (
        "<!DOCTYPE html><html><head><title>Docs &amp; API</title><style>body{color:red}</style>"
        "<script>var x = 1;</script></head><body><h1>Install</h1><p>Run <code>pip install foo</code>.</p>"
        '<a href="https://example.com/guide">the guide</a>'
        + "<div class='pad'>&nbsp;</div>" * 300
        + "</body></html>"
    )
    res = shrink(page, Options())
    assert res.kind == "html"
    assert res.text.startswith("Title: Docs & API\nInstall")
    assert "pip install foo" in res.text and "the guide (https://example.com/guide)" in res.text
    assert "color:red" not in res.text and "var x" not in res.text
    assert shrink(page, Options(html=False)).kind != "html"


def test_base64_blob_elided_binary_described():
    blob = "aGVsbG8gd29ybGQ" * 100 + "Zm9vYmFy1234=="
    res = shrink(
        f"Uploaded image:\ndata:image/png;base64,{blob}\nsaved as out.png\n" + "x " * 1000, Options()
    )
    assert "[base64 data:" in res.text and "saved as out.png" in res.text and blob not in res.text
    binary = "".join(chr(i % 32) for i in range(3000)) + "ELF-header-string"
    res = shrink(binary, Options())
    assert res.kind == "binary" and "ELF-header-string" in res.text


def test_source_code_is_not_elided_even_when_long_and_repetitive():
    code = "\n".join(f"def handler_{i}(x):\n    return x + {i}\n" for i in range(400))
    res = shrink(code, Options())
    assert res.text == code


def test_small_results_are_left_alone():
    text = "ERROR " * 100
    assert shrink(text, Options()).text == text


@settings(max_examples=60, deadline=None)
@given(st.text(min_size=0, max_size=5000))
def test_shrink_is_a_pure_function_and_never_grows(text):
    a = shrink(text, Options(min_chars=50))
    b = shrink(text, Options(min_chars=50))
    assert a == b and len(a.text) <= len(text)


@settings(max_examples=40, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda c: st.lists(c, max_size=6) | st.dictionaries(st.text(max_size=8), c, max_size=6),
        max_leaves=60,
    )
)
def test_compact_json_round_trips(value):
    text = json.dumps(value, indent=3)
    res = shrink(text, Options(min_chars=1))
    tables = res.text.startswith("table1:") or "\ntable" in res.text
    if res.kind == "json" and res.text[:1] in "{[" and not tables:
        assert json.loads(res.text) == json.loads(text)
    elif res.kind == "json" and isinstance(value, dict) and not tables:
        # records as `key: value` lines (`_json_records`): every top-level key is still there
        assert all(str(k) in res.text for k in value)
    if isinstance(value, (list, dict)):
        assert parse_json(text) is not None


# -- hooks ------------------------------------------------------------------------------------


def conversation(tool_text: str) -> dict:
    return {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1000,
        "messages": [
            {"role": "user", "content": "find flights"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t1", "name": "search", "input": {}}],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "t1",
                        "content": tool_text,
                        "cache_control": {"type": "ephemeral"},
                    },
                    {"type": "text", "text": tool_text},
                ],
            },
        ],
    }


def run_hook(body, states=None, **settings_):
    ctx = make_context(
        body,
        plugin="summarize",
        settings=summarize.tokensaver_configure(settings_, "test"),
        states=states if states is not None else {},
    )
    return summarize.tokensaver_transform_request(body, ctx), ctx


def test_transform_rewrites_only_tool_results_and_never_mutates():
    text = sample("json_tau_flights")["text"]
    body = conversation(text)
    frozen = copy.deepcopy(body)
    out, ctx = run_hook(body)
    assert body == frozen
    block = out["messages"][2]["content"][0]
    assert block["content"].startswith("9 records: #|") and block["cache_control"] == {"type": "ephemeral"}
    assert out["messages"][2]["content"][1]["text"] == text  # a user's own text is not a tool result
    assert out["messages"][:2] == body["messages"][:2]
    kinds = ctx.notes["summarize"]["kinds"]
    assert kinds["json"]["blocks"] == 1 and kinds["json"]["chars_after"] < kinds["json"]["chars_before"]


def test_list_content_text_blocks_are_rewritten_images_kept():
    text = sample("grep_django")["text"]
    img = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
    body = conversation("x")
    body["messages"][2]["content"][0]["content"] = [{"type": "text", "text": text}, img]
    out, _ = run_hook(body)
    inner = out["messages"][2]["content"][0]["content"]
    assert inner[1] == img and inner[0]["text"] != text and len(inner[0]["text"]) < len(text)


def test_same_block_gives_same_bytes_on_every_turn_and_across_clients():
    text = sample("log_mix_compile")["text"]
    states: dict = {}
    first, _ = run_hook(conversation(text), states)
    # later turn: the same result, now deeper in a longer conversation, same client state
    later = conversation(text)
    later["messages"] += [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t2", "name": "search", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t2", "content": "short"}]},
    ]
    second, _ = run_hook(later, states)
    fresh, _ = run_hook(conversation(text), {})
    assert first["messages"][2] == second["messages"][2] == fresh["messages"][2]
    assert json.dumps(first["messages"][2]).encode() == json.dumps(fresh["messages"][2]).encode()


def test_nothing_to_do_returns_none():
    out, ctx = run_hook(conversation("short result"))
    assert out is None and "summarize" not in ctx.notes


def test_lossless_only_setting_and_keep_originals():
    text = sample("log_repetitive_django")["text"]
    out, _ = run_hook(conversation(text), lossy=False)
    # no lossy cut (the log itself says "elided")
    assert out is None or "lines elided …]" not in json.dumps(out, ensure_ascii=False)
    states: dict = {}
    out, ctx = run_hook(conversation(text), states, keep_originals=True)
    assert text in states["summarize"]["originals"].values() and ctx.notes["summarize"]["lossy_blocks"] == 1


@pytest.mark.parametrize(
    "table, key",
    [
        ({"min_chars": 0}, "min_chars"),
        ({"lossy": "no"}, "lossy"),
        ({"foo": 1}, "foo"),
        ({"min_run": 2}, "min_run"),
        ({"head_lines": 500}, "max_lines"),
    ],
)
def test_configure_rejects_bad_values(table, key):
    with pytest.raises(ConfigError) as e:
        summarize.tokensaver_configure(table, "tokensaver.toml")
    assert e.value.key == key and "tokensaver.toml" in str(e.value)


def test_report_section_counts_each_conversation_once():
    note = {"kinds": {"json": {"blocks": 1, "chars_before": 1000, "chars_after": 300}}}
    bigger = {"kinds": {"json": {"blocks": 2, "chars_before": 2000, "chars_after": 600}}, "lossy_blocks": 1}
    calls = [
        {"id": "c1", "conversation": "a", "plugins": {"summarize": note}},
        {"id": "c2", "conversation": "a", "plugins": {"summarize": bigger}},
        {"id": "c3", "conversation": "b", "plugins": {}},
    ]
    sec = summarize.tokensaver_report_section("summarize", calls)
    assert sec["rows"] == [
        {"kind": "json", "blocks": 2, "chars_before": 2000, "chars_after": 600, "saved_pct": 70.0}
    ]
    assert "1 with lossy" in sec["summary"]


# -- the whole corpus (slow; skipped without /work/shared/traces) -----------------------------


def _tool_results(path: Path):
    conv = json.loads(path.read_text())
    for seg in conv["segments"]:
        msgs = seg["request"]["messages"]
        for i, m in enumerate(msgs[:-1]):
            if m["role"] != "user" or isinstance(m["content"], str):
                continue
            nxt = msgs[i + 1]["content"]
            reply = nxt if isinstance(nxt, str) else json.dumps(nxt, ensure_ascii=False)
            for b in m["content"]:
                if b.get("type") == "tool_result" and isinstance(b.get("content"), str):
                    yield b["content"], reply


@pytest.mark.slow
@pytest.mark.skipif(not TRACES.exists(), reason="shared traces not present")
def test_default_settings_keep_995_percent_of_used_facts_over_the_traces():
    total = kept = before = after = 0
    for folder in ("tau-bench", "swe-agent", "mini-swe-agent-gemini3", "claude-code-spotter"):
        for path in sorted((TRACES / folder).glob("*.json")):
            for text, reply in _tool_results(path):
                res = shrink(text, Options())
                needed = used_facts(text, reply)
                total += len(needed)
                kept += sum(1 for f in needed if f in res.text)
                before += len(text)
                after += len(res.text)
    print(f"facts kept {kept}/{total}; chars {before} -> {after}")
    assert total > 1000
    assert kept >= 0.995 * total
    assert after < 0.99 * before


# -- end to end: wrap() against the emulator --------------------------------------------------


def test_e2e_turn_k_plus_1_starts_with_the_bytes_of_turn_k(tmp_path):
    anthropic = pytest.importorskip("anthropic")
    emulator = pytest.importorskip("tokensaver.emulator")
    import tokensaver

    text = sample("json_tau_flights")["text"]
    turn1 = conversation(text)["messages"][:2] + [
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": text}]}
    ]
    turn2 = turn1 + [
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "t2", "name": "search", "input": {"d": 2}}],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "t2", "content": text.replace("HAT", "HAX")}],
        },
    ]
    with emulator.Emulator(virtual_clock=True) as emu:
        client = tokensaver.wrap(
            anthropic.Anthropic(base_url=emu.url, api_key="k", max_retries=0),
            config={"plugins": ["summarize"], "runs_dir": str(tmp_path)},
        )
        for msgs in (turn1, turn2):
            client.messages.create(model="claude-sonnet-4-6", max_tokens=20, messages=msgs)
        sent = [r.body["messages"] for r in emu.requests]
    assert sent[0][2]["content"][0]["content"].startswith("9 records: #|")
    assert json.dumps(sent[1][: len(sent[0])]) == json.dumps(sent[0])
    assert len(json.dumps(sent[1])) < 0.5 * len(json.dumps(turn2))


def test_kept_originals_are_bounded_in_memory_and_all_on_disk(tmp_path):
    from tokensaver.context import make_context

    settings = summarize.tokensaver_configure(
        {"keep_originals": True, "summary_dir": str(tmp_path / "s")}, "t"
    )
    states: dict = {}
    ctx = make_context({"model": "claude-sonnet-4-6", "messages": []}, plugin="summarize", states=states)
    texts = [f"original output number {i}" for i in range(summarize.MEMORY_ORIGINALS + 44)]
    refs = [summarize.keep_original(t, ctx, settings) for t in texts]
    assert len(states["summarize"]["originals"]) == summarize.MEMORY_ORIGINALS
    assert refs[0] not in states["summarize"]["originals"]  # the oldest left memory ...
    assert [summarize.find_original(r, ctx, settings) for r in refs] == texts  # ... not the disk
    other = make_context({"model": "claude-sonnet-4-6", "messages": []}, plugin="summarize", key_hash="other")
    assert summarize.find_original(refs[0], other, settings) is None  # per API key


def test_line_numbers_setting_is_validated():
    assert summarize.tokensaver_configure({"line_numbers": "keep"}, "t")["line_numbers"] == "keep"
    with pytest.raises(ConfigError, match="line_numbers"):
        summarize.tokensaver_configure({"line_numbers": "strip"}, "t")


# -- formats recognized by their shape: grep with context, go test -v -------------------------

ABS = "/Users/dev/Work/proj/cli/cmd/proj/cli/checkpoint/temporary.go"
REL = "cmd/proj/cli/checkpoint/temporary.go"


def grep_with_context() -> str:
    """Claude Code's Grep with ``-n -C``: matches as ``path:N:``, context as ``path-N-``; ripgrep
    names the file relative on match lines and absolute on context lines; ``--`` between hunks."""
    out = []
    for hunk in range(6):
        base = 40 + 30 * hunk
        for i in range(4):
            out.append(f"{ABS}-{base + i}-\tif err := step{hunk}_{i}(opts); err != nil {{")
        out.append(f"{REL}:{base + 4}:\tshadowBranchName := ShadowBranchNameForCommit(opts.BaseCommit{hunk})")
        for i in range(5, 9):
            out.append(f'{ABS}-{base + i}-\t\treturn fmt.Errorf("failed {hunk}.{i}: %w", err)')
        out.append("--")
    out.append("cmd/proj/cli/other.go:12:func ShadowBranchNameForCommit(c string) string {")
    out.append("/Users/dev/Work/proj/cli/cmd/proj/cli/other.go-13-\treturn c[:7]")
    return "\n".join(out)


GREP_LINE = re.compile(r"^(?P<path>.+?\.go)(?:(?P<sep>[:-])(?P<num>\d+)[:-])(?P<text>.*)$")


def test_grep_with_context_groups_every_line_under_its_file_and_keeps_each_path_spelling():
    text = grep_with_context()
    res = shrink(text, Options())
    print(f"{count_text(text)} -> {count_text(res.text)} tokens")
    assert res.kind == "grep" and not res.lossy
    assert count_text(res.text) <= 0.6 * count_text(text)
    for path in (ABS, REL, "cmd/proj/cli/other.go", "/Users/dev/Work/proj/cli/cmd/proj/cli/other.go"):
        assert re.search(rf"(?<![\w/]){re.escape(path)}(?![\w/])", res.text), path  # a whole word
    # every line's number, kind (':' match, '-' context) and text, in order
    want = [(m["num"], m["sep"], m["text"]) for ln in text.split("\n") if (m := GREP_LINE.match(ln))]
    got = [
        (m.group(1), m.group(2), m.group(3))
        for ln in res.text.split("\n")
        if (m := re.match(r"^  (\d+)([:-])(.*)$", ln))
    ]
    assert got == want
    assert res.text.count("--") == text.count("--")  # hunk separators stay
    assert shrink(res.text, Options()).text == res.text  # already grouped: unchanged


def lossless(text: str, kind: str) -> Any:
    """``text`` shrunk with the default options, recognised as ``kind`` and nothing lost."""
    res = shrink(text, Options())
    print(f"{count_text(text)} -> {count_text(res.text)} tokens\n{res.text}")
    assert res.kind == kind and not res.lossy
    return res


def go_test_verbose() -> str:
    out = ["Exit code 1"]
    names = [f"TestIsTrivialLine/case_{i}" for i in range(12)]
    for n in names:
        out += [f"=== RUN   {n}", f"=== PAUSE {n}"]
    out.append("=== RUN   TestHangs")  # never finished: its RUN line is all there is
    for n in names:
        out.append(f"=== CONT  {n}")
    out += [
        "=== RUN   TestIsTrivialLine/case_0/nested",
        "    content_overlap_test.go:702: nested case ran",
        "=== NAME  TestIsTrivialLine/case_3",
        '    content_overlap_test.go:751: isTrivialLine("}") = false, want true',
        "=== NAME  TestIsTrivialLine/case_4",
    ]
    out.append("--- FAIL: TestIsTrivialLine (0.00s)")
    for n in names:
        out.append(f"    --- {'FAIL' if n.endswith('_3') else 'PASS'}: {n} (0.00s)")
    out.append("        --- PASS: TestIsTrivialLine/case_0/nested (0.00s)")
    out += ["FAIL", "FAIL\tgithub.com/proj/cli/cmd/proj/cli/strategy\t0.412s", "FAIL"]
    return "\n".join(out)


def test_go_test_verbose_drops_run_pause_cont_lines_of_tests_that_report_a_result():
    text = go_test_verbose()
    res = lossless(text, "test")
    assert count_text(res.text) <= 0.7 * count_text(text)
    assert not re.search(r"^=== (RUN|PAUSE|CONT) +TestIsTrivialLine/case_\d+$", res.text, re.MULTILINE)
    assert "=== RUN   TestHangs" in res.text  # no result line: kept
    # a step line that output follows stays: it says whose output that is
    assert "=== RUN   TestIsTrivialLine/case_0/nested\n    content_overlap_test.go:702:" in res.text
    # the output attributed to a test keeps its NAME line; a NAME line with no output goes
    assert "=== NAME  TestIsTrivialLine/case_3\n    content_overlap_test.go:751:" in res.text
    assert "=== NAME  TestIsTrivialLine/case_4" not in res.text
    kept = [ln for ln in text.split("\n") if not ln.startswith("===")]
    assert [ln for ln in res.text.split("\n") if not ln.startswith("===")] == kept  # every other line
    assert facts(text) == facts(res.text)
    assert shrink(res.text, Options()).text == res.text


def test_go_test_package_lines_fold_runs_of_cached_and_untested_packages():
    mod = "github.com/proj/cli/cmd/proj/cli"
    pkgs = ["agent", "agent/claudecode", "checkpoint", "checkpoint/id", "logging", "paths", "session"]
    lines = ["[test:ci] $ go test -tags=integration -race ./..."]
    lines += [f"?   \t{mod}/{p}util\t[no test files]" for p in pkgs[:4]]
    lines.append(f"ok  \t{mod}\t22.279s")
    lines += [f"ok  \t{mod}/{p}\t(cached)" for p in pkgs]
    lines += ["--- FAIL: TestShadowBranch (0.41s)", f"FAIL\t{mod}/strategy\t0.412s", "FAIL"]
    text = "\n".join(lines)
    res = lossless(text, "test")
    assert count_text(res.text) <= 0.85 * count_text(text)
    assert facts(text) == facts(res.text)
    assert f"ok  \t{mod}\t22.279s" in res.text and f"FAIL\t{mod}/strategy\t0.412s" in res.text
    # each package once, whole, in its order, under the status it had
    got = [ln.strip() for ln in res.text.split("\n") if ln.startswith("  ")]
    assert got == [f"{mod}/{p}util" for p in pkgs[:4]] + [f"{mod}/{p}" for p in pkgs]
    assert shrink(res.text, Options()).text == res.text


def actions_log() -> str:
    """``gh run view --log-failed``: job, step and a timestamp before every line."""
    out = []
    for i in range(30):
        step = "Run E2E tests" if i < 24 else "Post Run actions/checkout@v4"
        out.append(
            f'E2E Tests\t{step}\t2026-02-21T21:32:{i:02d}.60779{i:02d}Z [WebServer]   reqId: "req-{40 + i}"'
        )
    out.insert(10, "E2E Tests\tRun E2E tests\t2026-02-21T21:32:09.9000000Z Error: expect(received).toBe(200)")
    return "\n".join(out)


def test_github_actions_log_names_job_step_and_date_once_per_run_of_lines():
    text = actions_log()
    res = lossless(text, "ci")
    assert count_text(res.text) <= 0.75 * count_text(text)
    # lossless: every line rebuilds from the header above it (job, step, date) and its time and text
    rebuilt, head = [], ""
    for ln in res.text.split("\n"):
        if ln.endswith(":") and ln.count("\t") == 2:
            head = ln[:-1]
        else:
            rebuilt.append(f"{head}T{ln}")
    assert rebuilt == text.split("\n")
    assert res.text.count("Run E2E tests") == 1 and res.text.count("Post Run actions/checkout@v4") == 1
    assert shrink(res.text, Options()).text == res.text


def unified_diff() -> str:
    out = []
    for f in ("cmd/proj/cli/agent/agent.go", "cmd/proj/cli/agent/agent_test.go", "docs/notes.md"):
        out += [f"diff --git a/{f} b/{f}", "index 385357be..53749450 100644", f"--- a/{f}", f"+++ b/{f}"]
        out += ["@@ -42,6 +42,8 @@ type Agent interface {", "\tExtractAgentSessionID(id string) string", ""]
        out += ["+\t// ProtectedDirs returns repo-root-relative directories", "+\tProtectedDirs() []string"]
        out += [" \t// GetSessionDir returns where agent stores session data", "-\tOld() error"]
    out += ["diff --git a/new.go b/new.go", "new file mode 100644", "index 0000000..e69de29", "--- /dev/null"]
    out += ["+++ b/new.go", "@@ -0,0 +1 @@", "+package x"]
    return "\n".join(out)


def test_git_diff_drops_only_the_file_lines_its_diff_line_already_names():
    text = unified_diff()
    res = lossless(text, "diff")
    assert "--- a/" not in res.text and "+++ b/cmd" not in res.text
    assert "--- /dev/null\n+++ b/new.go" in res.text  # not implied by the diff line: kept
    assert [ln for ln in text.split("\n") if not ln.startswith(("--- a/", "+++ b/cmd", "+++ b/docs"))] == (
        res.text.split("\n")
    )
    assert facts(text) == facts(res.text)
    assert shrink(res.text, Options()).text == res.text


def test_shapes_setting_turns_each_recognizer_off_and_is_validated():
    texts = {
        "grep": grep_with_context(),
        "test": go_test_verbose(),
        "ci": actions_log(),
        "diff": unified_diff(),
    }
    for name, text in texts.items():
        assert shrink(text, Options()).kind == name
        others = tuple(n for n in texts if n != name)
        assert shrink(text, Options(shapes=others)).kind != name
    # without "grep", hits are still grouped the older way (no context lines, one spelling a group)
    hits = "\n".join(f"src/app/mod{i // 14}.py:{i}:    value_{i} = compute(x)" for i in range(40))
    assert shrink(hits, Options(shapes=())).kind == "grep"
    assert summarize.tokensaver_configure({"shapes": ["grep"]}, "t")["shapes"] == ("grep",)
    assert summarize.options({"shapes": ["ci", "diff"]}).shapes == ("ci", "diff")
    with pytest.raises(ConfigError, match="shapes"):
        summarize.tokensaver_configure({"shapes": ["pytest"]}, "t")
    with pytest.raises(ConfigError, match="shapes"):
        summarize.tokensaver_configure({"shapes": "grep"}, "t")


# -- an edit's echo: numbered lines its own tool use's input holds ------------------------------

ECHO = re.compile(
    r"^\[tokensaver: lines (\d+)-(\d+) \(as \d+(→|\\t|:)text\) are lines (\d+)-(\d+) of '(\w+)' "
    r"in this tool use's input\]$"
)


def unecho(text: str, tool_input: dict) -> str:
    """The result with each echo pointer replaced by the input lines it names, numbered as it says."""

    def echoed(m: re.Match[str]) -> list[str]:
        a, b, sep, p, q, field = m.groups()
        src = tool_input[field].split("\n")[int(p) - 1 : int(q)]
        assert len(src) == int(b) - int(a) + 1
        return [f"{int(a) + k}{chr(9) if sep == chr(92) + 't' else sep}{x}" for k, x in enumerate(src)]

    return expand_lines(text, ECHO, echoed)


def edit_conversation(tool_input: dict, text: str, name: str = "edit") -> dict:
    body = conversation(text)
    body["messages"][1]["content"][0].update(name=name, input=tool_input)
    body["messages"][2]["content"] = [body["messages"][2]["content"][0]]
    return body


def claude_code_edit() -> tuple[dict, str]:
    new = [
        f'\tif err := step{i}(ctx, state); err != nil {{ return fmt.Errorf("step {i}: %w", err) }}'
        for i in range(8)
    ]
    tool_input = {"file_path": "/repo/state.go", "old_string": "\treturn nil", "new_string": "\n".join(new)}
    shown = [
        "}",
        "",
        "func (s *Store) Save(ctx context.Context, state *State) error {",
        *new,
        "\treturn nil",
        "}",
    ]
    text = (
        "The file /repo/state.go has been updated. Here's the result of running `cat -n` on a snippet of the "
        "edited file:\n" + "\n".join(f"{i + 40:6d}→{ln}" for i, ln in enumerate(shown))
    )
    return tool_input, text


def test_an_edit_echo_points_at_its_own_tool_use_input_and_loses_no_line():
    """SWE-agent's edit prints the edited window numbered (a real result, from shared/traces);
    Claude Code's Edit prints cat -n of the snippet: the lines the input holds become one pointer."""
    real = json.loads((DATA / "echo_edits.json").read_text())[0]
    cc_input, cc_text = claude_code_edit()
    for tool_input, text, name in ((real["input"], real["text"], real["tool"]), (cc_input, cc_text, "Edit")):
        out, ctx = run_hook(edit_conversation(tool_input, text, name))
        sent = out["messages"][2]["content"][0]["content"]
        assert sum(bool(ECHO.match(ln)) for ln in sent.split("\n")) == 1
        assert len(sent) < 0.75 * len(text)
        # lossless: the pointer gives back every line (Claude Code's number padding is compacted,
        # as summarize does for every numbered file line)
        expected = shrink(text, Options()).text  # (and SWE-agent's state lines are one line)
        assert unecho(sent, tool_input) == expected
        # every fact is still there to read: in the result, in the input, or a line number a pointer's range covers
        ranges = [range(int(m.group(1)), int(m.group(2)) + 1) for m in map(ECHO.match, sent.split("\n")) if m]

        def covered(n: str, ranges: list[range] = ranges) -> bool:
            return n.isdigit() and any(int(n) in r for r in ranges)

        assert all(
            f in sent
            or f in unfile(sent)  # a [File: ] path is relative to the directory its state line names
            or f in json.dumps(tool_input)
            or covered(f)
            or (covered(f.split(":")[0]) and f.split(":", 1)[1] in json.dumps(tool_input))  # "4:td_field"
            for f in facts(text)
        )
        assert "echo" in "".join(ctx.notes["summarize"]["kinds"])
    # a line that differs from the input (the edit did something else) is not pointed at
    changed = real["text"].replace("4:td_field", "4:td_field2")
    out, _ = run_hook(edit_conversation(real["input"], changed, real["tool"]))
    sent = (out or edit_conversation(real["input"], changed))["messages"][2]["content"][0]["content"]
    assert "4:td_field2 = " in sent and unecho(sent, real["input"]) == shrink(changed, Options()).text


def test_an_edit_echo_is_prefix_stable_and_accepted_by_the_api(tmp_path):
    anthropic = pytest.importorskip("anthropic")
    emulator = pytest.importorskip("tokensaver.emulator")
    import tokensaver

    real = json.loads((DATA / "echo_edits.json").read_text())[0]
    turn1 = edit_conversation(real["input"], real["text"], real["tool"])["messages"]
    turn2 = turn1 + [
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "t2", "name": "edit", "input": {"command": "ls"}}],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "t2", "content": "reproduce.py\nsetup.py"}],
        },
    ]
    with emulator.Emulator(virtual_clock=True) as emu:
        client = tokensaver.wrap(
            anthropic.Anthropic(base_url=emu.url, api_key="k", max_retries=0),
            config={"plugins": ["summarize", "prune", "cache_align"], "runs_dir": str(tmp_path)},
        )
        for msgs in (turn1, turn2):
            resp = client.messages.create(model="claude-sonnet-4-6", max_tokens=20, messages=msgs)
            assert resp.type == "message"
        sent = [r.body["messages"] for r in emu.requests]
    assert "in this tool use's input]" in json.dumps(sent[0][2])
    first = [
        {**m, "content": [{k: v for k, v in b.items() if k != "cache_control"} for b in m["content"]]}
        if isinstance(m["content"], list)
        else m
        for m in sent[0]
    ]
    again = [
        {**m, "content": [{k: v for k, v in b.items() if k != "cache_control"} for b in m["content"]]}
        if isinstance(m["content"], list)
        else m
        for m in sent[1][: len(sent[0])]
    ]
    assert json.dumps(again) == json.dumps(first)  # the earlier messages: the same bytes


# -- mini-swe-agent's observation tags -------------------------------------------------------


def unframe(text: str, cwd: str | None = None) -> str:
    """A traceback's short frame lines ``  P:N in F`` back as Python wrote them (``P`` under
    ``cwd`` when relative and ``cwd`` is given)."""
    if "Traceback (most recent call last):" not in text:
        return text

    def back(m: re.Match[str]) -> str:
        path = m.group(2)
        if cwd and not path.startswith(("/", "<")):
            path = f"{cwd.rstrip('/')}/{path}"
        return f'{m.group(1)}File "{path}", line {m.group(3)}, in {m.group(4)}'

    return re.sub(r"^( +)([^\s:\"][^:\"\n]*):(\d+) in ([^\n]*)$", back, text, flags=re.M)


def test_mini_swe_agent_observation_tags_become_one_line_at_any_size():
    """Every observation of the recorded mini-swe-agent run (fixtures/): the exit status on one line,
    the output after it byte for byte (itself shrunk by what it is), small results too."""
    from tokensaver.traces import fixtures_dir, load_conversation

    body = (
        load_conversation(fixtures_dir() / "mini-swe-agent-gemini3" / "django__django-16527.json")
        .calls[-1]
        .body
    )
    results = [
        b["content"]
        for m in body["messages"]
        if isinstance(m["content"], list)
        for b in m["content"]
        if b.get("type") == "tool_result"
    ]
    exact = 0
    for text in results:
        status, output = re.match(
            r"<returncode>(-?\d+)</returncode>\n<output>\n(.*)</output>$", text, re.S
        ).groups()
        res = shrink(text, Options())
        assert res.text.startswith(f"[returncode {status}]\n") and not res.lossy
        inner = shrink(output, Options())
        assert res.text == f"[returncode {status}]\n{compact_frames(inner.text)}"
        if inner.text == output:  # nothing else to shrink: the tags (and frames) come back exactly
            exact += 1
            back = (
                re.sub(r"^\[returncode (-?\d+)\]\n", r"<returncode>\1</returncode>\n<output>\n", res.text)
                + "</output>"
            )
            assert unframe(back) == text
        assert count_text(res.text) <= count_text(text) - 6
    assert exact >= 10
    # a look-alike is left as it came; so is every observation with the shape turned off
    for odd in (
        "<returncode>0</returncode>\n<output>\na</output>\n<output>\nb</output>",
        "<returncode>x</returncode>\n",
    ):
        assert shrink(odd, Options()).text == odd
    off = Options(shapes=tuple(s for s in Options().shapes if s != "returncode"))
    assert shrink(results[2], off).text == results[2]
    out, ctx = run_hook(conversation(results[2]))
    assert out["messages"][2]["content"][0]["content"] == "[returncode 0]\n"
    assert ctx.notes["summarize"]["kinds"]["returncode"]["blocks"] == 1


# -- SWE-agent's state lines -------------------------------------------------------------------


def unfile(text: str, cwd: str | None = None) -> str:
    """The observation with each relative ``[File: P (N lines total)]`` path back under the
    directory (``cwd``, else the one its ``[open: F, cwd: D]`` line names)."""
    if cwd is None:
        m = re.search(r"\[open: .*, cwd: (.*)\]\Z", text)
        if m is None:
            return text
        cwd = m.group(1)
    return re.sub(
        r"^\[File: ([^/\n][^\n]*) \((\d+) lines total\)\]$",
        lambda m: f"[File: {cwd.rstrip('/')}/{m.group(1)} ({m.group(2)} lines total)]",
        text,
        flags=re.M,
    )


def unstate(text: str, cwd: str | None = None) -> str:
    """The observation with its ``[open: F, cwd: D]`` line back as SWE-agent's three state lines
    (``[open: F]``: the directory ``cwd`` an earlier observation named), its ``[File: ]`` and
    traceback frame paths absolute."""
    text = unfile(text, cwd)
    head, sep, last = text.rpartition("\n")
    m = re.fullmatch(r"\[open: (.*), cwd: (.*)\]", last)
    if m is None and cwd is not None:
        m = re.fullmatch(r"\[open: (.*)()\]", last)
    assert m is not None
    file, cwd = m.group(1), m.group(2) or cwd
    if not (file.startswith("/") or file == "n/a"):
        file = f"{cwd.rstrip('/')}/{file}"
    return f"{unframe(head, cwd)}{sep}(Open file: {file})\n(Current directory: {cwd})\nbash-$"


def test_swe_agent_state_lines_become_one_line_at_any_size():
    """Every observation of the recorded SWE-agent run (fixtures/): its open file, directory and
    prompt as one line, the open file relative to the directory; everything comes back."""
    from tokensaver.traces import fixtures_dir, load_conversation

    body = load_conversation(fixtures_dir() / "swe-agent" / "crypto__BabyEncryption.json").calls[-1].body
    results = [
        b["content"]
        for m in body["messages"]
        if isinstance(m["content"], list)
        for b in m["content"]
        if b.get("type") == "tool_result" and b["content"].endswith("bash-$")
    ]
    assert len(results) >= 5
    for text in results:
        res = shrink(text, Options())
        assert not res.lossy and res.text.split("\n")[-1].startswith("[open: ")
        assert count_text(res.text) < count_text(text)
        if shrink(text[: text.rindex("(Open file: ")].rstrip("\n"), Options()).kind in (
            "small",
            "code",
            "text",
        ):
            assert unstate(res.text) == text
    # a relative open file would read as one under the directory: left as it came
    odd = "ok\n(Open file: src/a.py)\n(Current directory: /repo)\nbash-$"
    assert shrink(odd, Options()).text == odd
    small = "344\n\n(Open file: /m/reproduce.py)\n(Current directory: /m)\nbash-$"
    out, ctx = run_hook(conversation(small))
    assert out["messages"][2]["content"][0]["content"] == "344\n\n[open: reproduce.py, cwd: /m]"
    assert unstate("344\n\n[open: reproduce.py, cwd: /m]") == small
    off = Options(shapes=tuple(s for s in Options().shapes if s != "state"))
    assert shrink(small, off).text == small


_OLD_CODE_LINE = re.compile(_summarize_text.CODE_LINE_RE.pattern.replace("^\\s*+", "^\\s*", 1))


@settings(max_examples=400, deadline=None)
@given(line=st.text(alphabet=" \t;{}x:if()def@", max_size=30))
def test_the_code_line_check_takes_its_indent_once_and_finds_what_it_found(line: str) -> None:
    """The code-line pattern takes a line's indent possessively (no retry from inside a long run of
    spaces, which was quadratic in it): the same lines match as with the indent given back."""
    assert bool(_summarize_text.CODE_LINE_RE.match(line)) == bool(_OLD_CODE_LINE.match(line))
