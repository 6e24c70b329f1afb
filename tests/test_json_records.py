"""JSON records as lines and tables (``_json_records``): fewer tokens than compact JSON, and
``parse`` gives every value back; through ``wrap()`` to the emulator once summarize calls it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import tau_reservation
from test_summarize_framing import sent_body
from tokensaver_plugins import _json_records as jr
from tokensaver_plugins._summarize_text import dump, load_json

from tokensaver.tokens import count_text
from tokensaver.traces import load_conversation

MODEL = "claude-sonnet-4-6"
TAU = Path(__file__).resolve().parent.parent / "fixtures" / "tau-bench"

RESERVATION = {k: v for k, v in tau_reservation().items() if k not in ("nonfree_baggages", "price")}
USER = {
    "name": {"first_name": "Mia", "last_name": "Li"},
    "address": {"address1": "975 Sunset Drive", "city": "Austin", "zip": "78750"},
    "payment_methods": {
        "credit_card_4421486": {"source": "credit_card", "last_four": "7447", "id": "credit_card_4421486"},
        "certificate_4856383": {"source": "certificate", "amount": 100, "id": "certificate_4856383"},
    },
    "membership": "gold",
    "reservations": ["NO6JO3", "AIXC49"],
}


def leg(number: str, origin: str, dest: str, dep: str, seats: int, price: int) -> dict[str, Any]:
    return {
        "flight_number": number,
        "origin": origin,
        "destination": dest,
        "scheduled_departure_time_est": dep,
        "status": "available",
        "available_seats": {"economy": seats, "business": seats + 1},
        "prices": {"economy": price, "business": price * 3},
        "date": "2024-05-24",
    }


A, B, C, D = (
    leg("HAT110", "ATL", "LGA", "14:00:00", 9, 105),
    leg("HAT132", "LGA", "PHL", "17:00:00", 8, 190),
    leg("HAT172", "LGA", "PHL", "23:00:00", 2, 102),
    leg("HAT206", "LGA", "PHL", "18:00:00", 19, 145),
)
ONESTOP = [[A, B], [A, C], [A, D]]


def round_trip(value: Any) -> str:
    text: str | None = jr.render(load_json(json.dumps(value)))
    assert text is not None
    assert jr.parse(text) == value, text
    return text


def test_an_object_is_one_line_a_key_and_its_records_a_table() -> None:
    text = round_trip(RESERVATION)
    assert text.split("\n")[:2] == ["reservation_id: HATHAT", "user_id: mia_li_3668"]
    assert (
        "flights (2 records): flight_number|price|origin|destination; every record has date=2024-05-20"
        in text
    )
    assert "\nHAT136|152|JFK|ATL\n" in text
    assert count_text(text) < count_text(dump(load_json(json.dumps(RESERVATION))))


def test_an_object_of_records_keyed_by_their_own_id_is_one_table() -> None:
    text = round_trip(USER)
    assert "name: first_name=Mia, last_name=Li" in text
    assert 'zip="78750"' in text  # a string that reads as a number stays quoted
    assert "payment_methods, keyed by id (2 records): source|last_four|id|amount" in text


def test_itineraries_send_each_leg_once() -> None:
    text = round_trip(ONESTOP)
    assert text.count("HAT110") == 1
    assert text.endswith("3 lists, by record #: [[0,1],[0,2],[0,3]]")
    assert "every record has status=available, date=2024-05-24" in text.split("\n")[0]


def test_lists_of_distinct_legs_keep_a_group_number() -> None:
    text = round_trip([[A, B], [C, D]])
    assert "lists" not in text and text.split("\n")[1].startswith("0|HAT110|")


@pytest.mark.parametrize(
    "value",
    [
        [{"a": "x|y", "b": "1.5"}, {"a": "", "b": None}, {"c": True}],
        [{"a": " lead", "b": "t\nu"}, {"a": "true", "b": '"q"'}, {"a": "[x]", "b": "{y}"}],
        {"k": "a=b", "l": "c, d", "m": {"x": "p=q", "y": 2}, "n": [], "o": {}},
        {"k": [{"x": [1, {"z": "w|v"}], "y": {"p": {"deep": 1}}}, {"x": "-3", "y": -3}]},
        {"k": [{"a": 1, "b": 2}, {"a": 1, "b": 2}]},
        {"unicode": "café ☕", "e": 1e-07, "big": 12345678901234567890},
    ],
)
def test_values_that_read_like_something_else_come_back_the_same(value: Any) -> None:
    round_trip(value)


def test_keys_that_are_not_plain_names_leave_the_json_as_it_was() -> None:
    for value in ({"a b": 1, "c": 2}, [{"x.y": 1}, {"x.y": 2}], {"k": [{"#": 1}, {"#": 2}]}, [1, 2, 3]):
        assert jr.render(load_json(json.dumps(value))) is None


def test_numbers_are_sent_as_written() -> None:
    text = jr.render(load_json('[{"p": 1.50, "q": 1e3}, {"p": 2.0, "q": 0}]'))
    assert text == "2 records: p|q\n1.50|1e3\n2.0|0"


def test_smaller_keeps_the_compact_json_unless_the_tables_count_fewer_tokens() -> None:
    value = load_json('[{"a": "1"}, {"a": "2"}]')
    compact = dump(value)
    assert count_text(jr.render(value) or "") == count_text(compact)
    assert jr.smaller(value, compact) == compact
    big = load_json(json.dumps(ONESTOP))
    assert jr.smaller(big, dump(big)) == jr.render(big)
    assert jr.smaller(big, dump(big), max_rows=3) == dump(big)  # too many records: summarize's own cut


_names = st.sampled_from(["id", "name", "price", "date", "status", "x_1"])
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.sampled_from(["2024-05-01", "1.5", "-0", "a=b", "x, y", "p|q", "true", "", " s"]),
)
_flat = st.dictionaries(_names, _scalars, min_size=1, max_size=4)
_records = st.dictionaries(
    _names, st.one_of(_scalars, _flat, st.lists(_scalars, max_size=2)), min_size=1, max_size=5
)
_values = st.one_of(
    st.lists(_records, min_size=2, max_size=5),
    st.lists(st.lists(_records, min_size=1, max_size=3), min_size=2, max_size=4),
    st.dictionaries(_names, st.one_of(_scalars, _flat, st.lists(_records, max_size=4)), min_size=1),
)


@settings(max_examples=300, deadline=None)
@given(_values)
def test_parse_gives_back_whatever_render_wrote(value: Any) -> None:
    text = jr.render(load_json(json.dumps(value)))
    if text is not None:
        assert jr.parse(text) == json.loads(json.dumps(value)), text


def _tau_results() -> list[str]:
    out = []
    for path in sorted(TAU.glob("*.json")):
        for m in load_conversation(path).calls[-1].body["messages"]:
            for b in m["content"] if isinstance(m["content"], list) else []:
                if b.get("type") == "tool_result" and str(b.get("content"))[:1] in ("[", "{"):
                    out.append(b["content"])
    return out


def test_every_tau_bench_json_result_comes_back_the_same() -> None:
    results = _tau_results()
    assert len(results) >= 10
    for text in results:
        value = load_json(text)
        out = jr.render(value)
        if out is not None:
            assert jr.parse(out) == json.loads(text), out


def test_defaults_send_a_flight_search_as_a_table_and_the_same_bytes_again(tmp_path: Any) -> None:
    result = json.dumps(ONESTOP)
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "Find me a flight from ATL to PHL on 2024-05-24."},
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "search_onestop_flight",
                    "input": {"origin": "ATL", "destination": "PHL", "date": "2024-05-24"},
                }
            ],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": result}]},
    ]
    first = sent_body(tmp_path, {"model": MODEL, "max_tokens": 64, "messages": messages})
    sent = first["messages"][2]["content"][0]["content"]
    assert sent == jr.render(load_json(result)) and jr.parse(sent) == ONESTOP
    later = messages + [
        {"role": "assistant", "content": "Three itineraries, all through LGA."},
        {"role": "user", "content": "The cheapest, please."},
    ]
    second = sent_body(tmp_path, {"model": MODEL, "max_tokens": 64, "messages": later})
    assert second["messages"][2]["content"][0]["content"] == sent
