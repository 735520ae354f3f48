"""The CAPO judge prompt (conf/judge_prompt/capo.yaml) and critique parsing (DESIGN §1.2)."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capo_dist.judge_prompt import load_judge_prompt
from capo_dist.rewards.critique import (
    MAX_LIST_ITEMS,
    ParsedCritique,
    parse_critique,
    parse_wrong_steps,
)

build_critique_prompt = load_judge_prompt("capo").render


def test_prompt_contents():
    p = build_critique_prompt("What is 2+2?", ["2+2 = 5.", "So 5."], reference_answer="4")
    assert "What is 2+2?" in p
    assert "Step 0: 2+2 = 5." in p and "Step 1: So 5." in p
    assert "Reference answer" in p and "\n4\n" in p
    assert "Wrong step list: [i, j, ...]" in p and "Wrong step list: []" in p
    assert "ON ITS OWN CORRECTNESS" in p
    assert p.index("Step 0:") < p.index("Step 1:")


def test_prompt_without_reference():
    p = build_critique_prompt("Q?", ["a"], reference_answer=None)
    assert "Reference answer" not in p and "Step 0: a" in p


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Wrong step list: [1, 3]", {1, 3}),
        ("Wrong step list: [1,3]", {1, 3}),
        ("Wrong step list: []", set()),
        ("Wrong step list: [ ]", set()),
        ("wrong STEP list:[2]", {2}),
        ("**Wrong step list:** [0, 2]", {0, 2}),
        ("**Wrong step list**: [0]", {0}),
        ("Wrong step list: `[1, 2]`", {1, 2}),
        ("Wrong steps list: [Step 1, step 2]", {1, 2}),
        ("Wrong step list: [1, 3,]", {1, 3}),
        ("Wrong step list:\n[2]", {2}),
        ("Wrong step list: [1, 1, 1]", {1}),
        ("Step 1 ok.\nWrong step list: [0]\nOn reflection...\nWrong step list: [3]", {3}),
    ],
)
def test_parse_lenient_forms(text, expected):
    assert parse_wrong_steps(text, 5) == frozenset(expected)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "All steps are fine.",
        "Wrong step list: none",
        "Wrong step list: [a, b]",
        "Wrong step list: [1.5]",
        "Wrong step list: [1; 2]",
        "Wrong step list: [1, [2]]",
        "Wrong step list: [1, 2",
        "Wrong step list: [0]\nWrong step list: see above",  # the LAST one counts
        "Wrong step list: [__import__('os').system('echo hi')]",
    ],
)
def test_parse_invalid(text):
    assert parse_wrong_steps(text, 5) is None
    assert parse_critique(text, 5) == ParsedCritique(wrong=None, dropped=0)


def test_parse_none_is_invalid():
    assert parse_critique(None, 3).wrong is None


def test_out_of_range_and_negative_are_dropped_and_counted():
    pc = parse_critique("Wrong step list: [0, 2, 5, -1, 99999999999999]", 3)
    assert pc.wrong == frozenset({0, 2}) and pc.dropped == 3
    assert parse_critique("Wrong step list: [0]", 0) == ParsedCritique(frozenset(), 1)


def test_hostile_inputs_are_fast():
    big = "blah " * 200_000 + "Wrong step list: [1, 2]"
    t = time.perf_counter()
    assert parse_wrong_steps(big, 3) == frozenset({1, 2})
    many = "Wrong step list: [" + ", ".join(["1"] * 1_000_000) + "]"
    assert parse_wrong_steps(many, 3) is None
    labels = "Wrong step list: " * 60_000 + "[0]"
    assert parse_wrong_steps(labels, 3) == {0}  # only the last label counts
    brackets = "Wrong step list: " + "[" * 1_000_000
    assert parse_wrong_steps(brackets, 3) is None
    assert parse_wrong_steps("wrong " * 200_000, 3) is None
    # ~0.3 s measured; a scan quadratic in these ~1 MB inputs would take hours
    assert time.perf_counter() - t < 10.0
    just_ok = "Wrong step list: [" + ",".join(["0"] * MAX_LIST_ITEMS) + "]"
    assert parse_wrong_steps(just_ok, 3) == {0}


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(-5, 30), max_size=12),
    st.integers(0, 20),
    st.sampled_from(["Wrong step list: ", "**Wrong Step List:** ", "wrong step list:"]),
    st.sampled_from([", ", ",", " , "]),
    st.text(alphabet="abc .\n", max_size=40),
)
def test_parse_roundtrip(indices, num_steps, label, sep, preamble):
    text = preamble + "\n" + label + "[" + sep.join(map(str, indices)) + "]\n"
    pc = parse_critique(text, num_steps)
    assert pc.wrong == frozenset(i for i in indices if 0 <= i < num_steps)
    assert pc.dropped == sum(1 for i in indices if not 0 <= i < num_steps)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300), st.integers(0, 10))
def test_parse_never_raises(text, num_steps):
    pc = parse_critique(text, num_steps)
    assert pc.wrong is None or all(0 <= i < num_steps for i in pc.wrong)
