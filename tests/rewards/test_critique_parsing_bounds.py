"""The bounds and edges of critique parsing (critique.py), each at its limit and one past
it, without any timing (the speed of hostile input is tested in test_critique.py)."""

import pytest

from capo_dist.rewards.critique import MAX_LIST_ITEMS, ParsedCritique, parse_critique


def _wrong(text: str, num_steps: int = 5) -> frozenset[int] | None:
    return parse_critique(text, num_steps).wrong


def test_list_length_limit():
    at_limit = "Wrong step list: [" + ",".join(["0"] * MAX_LIST_ITEMS) + "]"
    assert _wrong(at_limit) == {0}
    over = "Wrong step list: [" + ",".join(["0"] * (MAX_LIST_ITEMS + 1)) + "]"
    assert parse_critique(over, 5) == ParsedCritique(wrong=None, dropped=0)


def test_list_body_length_limit():
    body = MAX_LIST_ITEMS * 16  # characters between the brackets
    assert _wrong("Wrong step list: [" + " " * (body - 1) + "1]") == {1}
    assert _wrong("Wrong step list: [" + " " * body + "1]") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Wrong step list" + ":" * 16 + "[1]", {1}),  # at most 16 decoration characters
        ("Wrong step list" + ":" * 17 + "[1]", None),
        ("Wrong step list:\n" + " " * 8 + "[1]", {1}),  # at most 8 on the next line
        ("Wrong step list:\n" + " " * 9 + "[1]", None),
        ("Wrong step list:\n\n[1]", None),  # one line break only
        ("wrongsteplist [2]", {2}),
        ("WRONG\tSTEPS\tLIST: [2]", {2}),
        ("Wrong step list: [1]\nI was wrong about that.", {1}),  # a later "wrong" is no label
        ("I was wrong.\nWrong step list: [1]\nStill wrong.", {1}),  # nor an earlier one
        ("Wrong step list: [+1]", {1}),
        ("Wrong step list: [step3]", {3}),
        ("Wrong step list: [ , 1]", {1}),
        ("Wrong step list: [,]", frozenset()),
        ("Wrong step list: [[1]]", None),
        ("The wrong step is 2.", None),
    ],
)
def test_label_and_list_forms(text, expected):
    assert _wrong(text) == (None if expected is None else frozenset(expected))


def test_index_digits_limit():
    # nine digits are read as an index; ten are out of range whatever num_steps says
    assert parse_critique("Wrong step list: [123456789]", 10**10) == ParsedCritique(
        frozenset({123456789}), 0
    )
    assert parse_critique("Wrong step list: [1234567890]", 10**10) == ParsedCritique(frozenset(), 1)


def test_range_edges_are_dropped_and_counted():
    assert parse_critique("Wrong step list: [4, 5, -0, 0]", 5) == ParsedCritique(
        frozenset({0, 4}), 2
    )
    assert parse_critique("Wrong step list: []", 0) == ParsedCritique(frozenset(), 0)
    assert parse_critique("", 3) == ParsedCritique(None, 0)
    assert ParsedCritique(frozenset({1})).dropped == 0
