"""Critique parsers by name (capo_dist.rewards.critique_parsers): the first-error index and
JSON parsers on hand-written replies, hostile ones included, and the registry."""

from __future__ import annotations

import time

import pytest

from capo_dist.rewards.critique import MAX_LIST_ITEMS, ParsedCritique, parse_critique
from capo_dist.rewards.critique_parsers import (
    CRITIQUE_PARSERS,
    MAX_JSON_CHARS,
    get_parser,
    parse_first_error,
    parse_json_critique,
    register_parser,
)

INVALID = ParsedCritique(wrong=None, dropped=0)


def ok(*wrong: int, dropped: int = 0) -> ParsedCritique:
    return ParsedCritique(wrong=frozenset(wrong), dropped=dropped)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Paragraph 2 adds wrongly.\n\nFinal answer: \\boxed{2}", ok(2)),
        ("All correct. \\boxed{-1}", ok()),
        ("\\boxed{ 0 }", ok(0)),
        ("\\boxed{+3}", ok(3)),
        ("first \\boxed{1}, on reflection \\boxed{3}", ok(3)),  # the last box counts
        ("\\boxed{4}", INVALID),  # no step 4 of 4
        ("\\boxed{-2}", INVALID),
        ("\\boxed{1.5}", INVALID),
        ("\\boxed{1, 2}", INVALID),
        ("\\boxed{step 1}", INVALID),
        ("\\boxed{}", INVALID),
        ("The first error is in paragraph 1.", INVALID),  # no box
        ("\\boxed{1234567890}", INVALID),  # over 9 digits: never converted
        ("\\boxed{" + "9" * 5000 + "}", INVALID),
        ("\\boxed{\\boxed{1}}", ok(1)),  # the inner box is the last one
        ("", INVALID),
        (None, INVALID),
        (b"\\boxed{1}", INVALID),
        (["\\boxed{1}"], INVALID),
        (1, INVALID),
    ],
)
def test_first_error(text, expected):
    assert parse_first_error(text, 4) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('Looks off.\n{"wrong_steps": [1, 3]}', ok(1, 3)),
        ('```json\n{"wrong_steps": [2]}\n```', ok(2)),
        ('{"reasoning": "step 0 is fine", "wrong_steps": []}', ok()),
        ("[0, 2]", ok(0, 2)),
        ("The list: [1].", ok(1)),  # a full stop after it
        ('{"wrong_steps": [1, 7, -1]}', ok(1, dropped=2)),
        ('{\n  "wrong_steps": [\n    0,\n    1\n  ]\n}', ok(0, 1)),
        ('{"note": "a \\"quoted\\" ] brace", "wrong_steps": [3]}', ok(3)),
        ('{"note": "ends in a backslash \\\\", "wrong_steps": [0]}', ok(0)),
        ('{"note": "say \\" ]", "wrong_steps": [3]}', ok(3)),  # one escaped quote
        ('{"wrong_steps": [1], "x": [[]]}', ok(1)),  # nesting 3
        ('{"wrong_steps": [1], "x": [[[[]]]]}', INVALID),  # nesting 5 > MAX_JSON_DEPTH
        ('{"wrong_steps": [], "right_steps": [0, 1, 2, 3]}', ok()),  # the outer object counts
        ('[1] first, then {"wrong_steps": [2]}', ok(2)),  # the last value counts
        ('{"wrong_steps": [true]}', INVALID),  # bools are not indices
        ('{"wrong_steps": [1.0]}', INVALID),
        ('{"wrong_steps": ["1"]}', INVALID),
        ('{"wrong_steps": 1}', INVALID),
        ('{"wrong": [1]}', INVALID),
        ('{"wrong_steps": [1, 2}', INVALID),
        ("[1, 2", INVALID),
        ('{"wrong_steps": [1]} and that is all', INVALID),  # prose after the value
        ("Wrong step list: [1]", ok(1)),  # ends with a JSON list
        ("", INVALID),
        ("]", INVALID),
        (None, INVALID),
        (b"[1]", INVALID),
        ({"wrong_steps": [1]}, INVALID),  # a decoded object is not a reply
    ],
)
def test_json(text, expected):
    assert parse_json_critique(text, 4) == expected


def test_json_is_bounded_on_hostile_replies():
    """Huge, deep and pathological replies are refused in bounded time, never raised on."""
    cases = {
        "deep": "[" * 100_000 + "]" * 100_000,
        "deep_inside_string_free": '{"wrong_steps": ' + "[" * 5 + "1" + "]" * 5 + "}",
        "long_list": "[" + ", ".join(["1"] * (MAX_LIST_ITEMS + 1)) + "]",
        "over_size_cap": "[" + " " * MAX_JSON_CHARS + "1]",
        "big_int": "[" + "9" * 5000 + "]",
        "quotes": '"' * 200_000 + "]",
        "backslashes": "[" + '\\"' * 100_000 + "]",
        "closing": "]" * 400_000,
        "unclosed_items": "[1," * 100_000 + "]",
        "deep_within_the_size_cap": "[" * 5000 + "]" * 5000,
        "megabytes_of_text": "x" * 5_000_000 + "[1]",
    }
    for name, text in cases.items():
        start = time.process_time()
        got = parse_json_critique(text, 4)
        took = time.process_time() - start
        assert took < 1.0, (name, took)  # each measured at a few ms at most
        if name == "megabytes_of_text":
            assert got == ok(1)
        else:
            assert got == INVALID, name
    assert parse_json_critique("[" * 4 + "1" + "]" * 4, 4) == INVALID  # nested lists


def test_first_error_is_bounded_on_hostile_replies():
    for text in ("\\boxed{" * 200_000, "{" * 500_000 + "\\boxed{1}", "\\boxed{1}" + "}" * 500_000):
        start = time.process_time()
        got = parse_first_error(text, 4)
        assert time.process_time() - start < 1.0
        assert got.wrong is None or got == ok(1)


def test_registry():
    assert CRITIQUE_PARSERS["wrong_step_list"] is parse_critique
    assert get_parser("first_error") is parse_first_error
    assert get_parser("json") is parse_json_critique
    # any importable function, as package.module:function
    assert get_parser("capo_dist.rewards.critique:parse_critique") is parse_critique
    for bad in ("nope", "capo_dist.rewards.critique:nothing", "no_such_module:f", ":"):
        with pytest.raises(ValueError, match="critique parser"):
            get_parser(bad)
    with pytest.raises(ValueError, match="already registered"):
        register_parser("json")(parse_critique)


def test_a_registered_parser_is_used_by_name():
    @register_parser("test_all_wrong")
    def all_wrong(text: object, num_steps: int) -> ParsedCritique:
        return ParsedCritique(frozenset(range(num_steps))) if text == "bad" else INVALID

    try:
        assert get_parser("test_all_wrong")("bad", 3) == ok(0, 1, 2)
    finally:
        del CRITIQUE_PARSERS["test_all_wrong"]
