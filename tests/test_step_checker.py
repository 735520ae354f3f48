"""The symbolic step checker: exact verdicts on real GSM8K steps, safety on hostile text."""

import json
import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capo_dist.data import synthetic_arith
from capo_dist.rewards.critique import parse_wrong_steps
from capo_dist.step_checker import (
    TooBigToCheck,
    critique_steps,
    evaluate,
    solution_is_clean,
    step_is_correct,
)


@pytest.mark.parametrize(
    "step, ok",
    [
        ("12 + 7 = 19, so Ava has 19 apples.", True),
        ("12 + 7 = 20, so Ava has 20 apples.", False),
        ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.", True),
        ("Janet sells 16 - 3 - 4 = <<16-3-4=8>>8 duck eggs a day.", False),
        ("She makes 9 * 2 = $<<9*2=18>>18 every day.", True),
        ("1/2 * 1/2 = 1/4", True),
        ("3 * 1/4 = 3/5", False),
        ("(2 + 3) x 4 = 20", True),
        ("x = 5, and the total is 5.", True),  # nothing to check
        ("10 / 0 = 3", False),
        ("So it cost 192*100=$1920", False),  # a real error in GSM8K's train split
        ("There are 60 students x 2/3 = 40 students.", True),  # partial left side: skipped
        ("3^2 + 4^2 = 25", True),
        ("2**10 = 1000", False),
        ("$\\pi\\cdot 6^2-\\pi\\cdot 4^2=36\\pi-16\\pi$", True),  # `\cdot 4^2`: partial
        ("(2\\cdot (3\\cdot 4)) \\cdot (5+1) = 144", True),
        ("So 2 + 2 = 4\\text{ apples}", True),
        ("So 2 + 2 = 5\\text{ apples}", False),
    ],
)
def test_step_verdicts(step, ok):
    assert step_is_correct(step) is ok


def test_evaluate_is_exact_and_refuses_non_arithmetic():
    assert evaluate("(1+2)*3/4") == evaluate("9/4")
    assert (
        evaluate("2^3^2") == 512 and evaluate("-2**2") == -4 and evaluate("2^-2") == evaluate(".25")
    )
    for hostile in ["__import__('os')", "9**9**9", "4^(1/2)", "a+1", "((1)", "1 2", "9" * 101]:
        with pytest.raises(ValueError):
            evaluate(hostile)
    for too_big in ["1+" * 300 + "1", "2^4096", "10^10^10", "(" * 40 + "1" + ")" * 40, "9" * 101]:
        with pytest.raises(TooBigToCheck):
            evaluate(too_big)
    for impossible in ["1/0", "1/(2-2)", "0^-1"]:
        with pytest.raises(ZeroDivisionError):
            evaluate(impossible)


def test_generated_solutions_are_all_correct():
    arith = synthetic_arith(2000, seed=0)
    assert all(step_is_correct(s) for a in arith for s in a.steps)


def test_solution_is_clean_needs_every_step():
    a = synthetic_arith(50, seed=3)
    multi = next(x for x in a if len(x.steps) >= 3)
    text = "\n\n".join(multi.steps)
    assert solution_is_clean(text)
    first = multi.steps[0]
    lhs, rest = first.split(" = ", 1)
    value = int(rest.split(",", 1)[0])
    bad = f"{lhs} = {value + 1}," + rest.split(",", 1)[1]
    assert not solution_is_clean("\n\n".join([bad, *multi.steps[1:]]))
    assert solution_is_clean("The answer is 7.")  # nothing to check


def test_gsm8k_gold_steps_mostly_correct(shared_data):
    """On real GSM8K gold solutions the checker flags < 0.5% of lines (some are real errors)."""
    lines = [
        step
        for row in (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()
        for step in json.loads(row)["answer"].split("\n")[:-1]
    ]
    flagged = sum(not step_is_correct(s) for s in lines)
    assert len(lines) > 20000 and flagged / len(lines) < 0.005


def test_critique_round_trips_through_the_parser():
    steps = ["1 + 1 = 2", "2 * 3 = 7", "The answer is 7."]
    (text,) = critique_steps(steps, 1)
    assert parse_wrong_steps(text, len(steps)) == frozenset({1})


def test_noisy_critiques_flip_at_the_given_rate():
    steps = ["1 + 1 = 2"] * 50
    texts = critique_steps(steps, 40, flip_prob=0.2, rng=random.Random(0))
    flips = sum(len(parse_wrong_steps(t, 50)) for t in texts) / (50 * 40)
    assert 0.15 < flips < 0.25
    assert len(set(texts)) > 1


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_any_text_is_judged_quickly_without_error(text):
    start = time.perf_counter()
    assert isinstance(step_is_correct(text), bool)
    assert time.perf_counter() - start < 0.5


def test_huge_step_is_bounded():
    start = time.perf_counter()
    step_is_correct("1+" * 200_000 + "1 = 3 " + "(" * 10_000)
    # 2.1-2.5 s measured on 2 loaded cores (linear, ~10 us a character): the bound only
    # separates bounded from quadratic (hours on this 410 KB input)
    assert time.perf_counter() - start < 30
