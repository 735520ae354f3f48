"""Edges of final-answer extraction (answers.py) and of the gold answer (verifier.py):
each case pins one rule of the extraction with a hand-checked result."""

import pytest

from capo_dist.rewards.answers import MAX_ANSWER_CHARS, extract_answer
from capo_dist.rewards.verifier import gold_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # "the answer is" + a math span: the span only, not what follows it on the line
        ("The answer is $x + 1$ and that is all.", "x+1"),
        ("The answer is \\(x + 1\\) and that is all.", "x+1"),
        ("The answer is \\[x + 1\\] and that is all.", "x+1"),
        ("The answer is $x$ or $y$, I think.", "x"),  # the FIRST closing `$`
        ("The answer is $$ 5.", None),  # an empty span is no answer
        # without a span: up to the end of the sentence, spaces inside kept until normalised
        ("The answer is x + 1.\nThen more.", "x+1"),
        ("The answer is 7\nfoo\nbar", "7"),  # the rest of ITS line only
        # a span that fills the whole window (MAX_ANSWER_CHARS inside two `$`) is kept
        ("The answer is $" + "1" * MAX_ANSWER_CHARS + "$.", "1" * MAX_ANSWER_CHARS),
    ],
)
def test_answer_is_phrases(text, expected):
    assert extract_answer(text) == expected


_LONGEST = "1" * MAX_ANSWER_CHARS


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\\boxed{" + _LONGEST + "}", _LONGEST),  # the longest answer a box may hold
        ("\\boxed " + _LONGEST + " then", _LONGEST),  # the same without braces
        # one longer is no answer; an earlier box is used instead
        ("\\boxed{5} then \\boxed{" + _LONGEST + "1}", "5"),
        ("\\boxed{\\{1}", "\\{1"),  # an escaped brace does not open a group
        ("so \\boxed ", None),  # a box at the very end of the text
        ("so \\boxed", None),
    ],
)
def test_box_edges(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("#### 1\nmore\n#### 2", "2"),  # the LAST `####`
        ("####7", "7"),  # no space needed
        ("#### x + 1\nnext line", "x+1"),  # the whole rest of the line
        ("#### 7\nfoo\nbar", "7"),  # ... and only that line
    ],
)
def test_gsm8k_hashes(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("gold", "expected"),
    [
        ("The result is \\fbox{5}.", "5"),  # a solution boxed with \fbox: extracted
        ("1" * MAX_ANSWER_CHARS, "1" * MAX_ANSWER_CHARS),  # longest plain gold kept
        ("1" * (MAX_ANSWER_CHARS + 1), None),  # one longer: no gold answer
    ],
)
def test_gold_answer_edges(gold, expected):
    assert gold_answer(gold) == expected


def test_an_unbraced_box_longer_than_the_limit_is_refused_not_cut():
    """`\\boxed 111…` of MAX_ANSWER_CHARS + 1 characters is no answer (was cut to the limit,
    a different number); one of exactly the limit is read whole; an earlier box is used."""
    from capo_dist.rewards.answers import MAX_ANSWER_CHARS, extract_answer, last_boxed

    at_limit, past = "1" * MAX_ANSWER_CHARS, "1" * (MAX_ANSWER_CHARS + 1)
    assert last_boxed(f"\\boxed {at_limit}") == at_limit
    assert last_boxed(f"\\boxed {past}") is None
    assert extract_answer(f"\\boxed {past}") is None
    assert last_boxed(f"\\boxed{{7}} then \\boxed {past}") == "7"
