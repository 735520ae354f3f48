"""The rule-based verifier (DESIGN §1.6): extraction, equivalence, hostile input."""

from __future__ import annotations

import os
import signal
import time
from fractions import Fraction

import pytest

from capo_dist.rewards.answers import normalize_answer, parse_number
from capo_dist.rewards.verifier import Verifier, extract_answer, gold_answer, is_correct

# Time a check may take beyond the verifier's hard limit (`timeout_s`: the worker is killed
# then). Measured: ~0.05 s; generous for a loaded 2-core machine. A check that ignored the
# limit (a quadratic scan, a hung worker never killed) takes far longer.
SLACK_S = 5.0


@pytest.fixture(scope="module")
def verifier():
    v = Verifier(timeout_s=2.0, num_workers=2)
    assert v.check("so \\boxed{2\\sqrt{2}}", "\\sqrt{8}")  # start + warm the pool
    yield v
    v.close()


# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}} then \\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}"),  # the last box
        ("\\boxed{\\{1, 2\\}}", "\\{1,2\\}"),  # escaped braces do not count
        ("\\fbox{7}", "7"),
        ("\\boxed 5$", "5"),
        ("\\boxed{3} and later \\boxed{12", "3"),  # unbalanced last box: earlier one
        ("blah\n#### 1,000\n", "1000"),
        ("#### -3", "-3"),
        ("So the answer is 42.", "42"),
        ("Thus, the final answer is $\\frac{3}{4}$. Done", "\\frac{3}{4}"),
        ("The answer is: 18 dollars.", "18"),
        ("no answer here", None),
        ("\\boxed{}", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("$5$", "5"),
        ("5.", "5"),
        ("12 \\text{ cm}", "12"),
        ("12\\text{cm}^2", "12"),
        ("18 dollars", "18"),
        ("\\$18.50", "18.50"),
        ("10{,}000", "10000"),
        ("900,000,000", "900000000"),
        ("1,2,3", "1,2,3"),  # not a thousands-separated number
        ("x = 5", "5"),
        ("k=\\frac{1}{2}", "\\frac{1}{2}"),
        ("90^\\circ", "90"),
        ("90^{\\circ}", "90"),
        ("25\\%", "25"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("\\text{(A)}", "(A)"),
        ("\\textbf{Monday}", "Monday"),
        ("4t", "4t"),  # a variable, not a unit
        ("\\dfrac{3}{4}", "\\frac{3}{4}"),
        ("4:30p..", "4:30p"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    ("s", "value"),
    [
        ("42", Fraction(42)),
        ("-0.25", Fraction(-1, 4)),
        (".5", Fraction(1, 2)),
        ("3/4", Fraction(3, 4)),
        ("-\\frac{3}{4}", Fraction(-3, 4)),
        ("\\frac{-3}{4}", Fraction(-3, 4)),
        ("\\frac12", Fraction(1, 2)),
        ("12\\frac{3}{5}", Fraction(63, 5)),
        ("-1\\frac{1}{2}", Fraction(-3, 2)),
        ("\\frac{1.5}{3}", Fraction(1, 2)),
        ("1/0", None),
        ("2^3", None),
        ("\\sqrt{2}", None),
        ("1e5", None),
        ("9" * 2000, None),  # too many digits for the fast path
    ],
)
def test_parse_number(s, value):
    assert parse_number(s) == value


def test_gold_answer_accepts_solutions_and_answers():
    assert gold_answer("Work.\n#### 1,234") == "1234"
    assert gold_answer("so \\boxed{\\dfrac{1}{2}}") == "\\frac{1}{2}"
    assert gold_answer(" 3,250 ") == "3250"


# --------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize(
    ("response", "gold", "expected"),
    [
        ("\\boxed{0.5}", "\\frac{1}{2}", True),
        ("\\boxed{1/2}", "0.5", True),
        ("\\boxed{3}", "4", False),
        ("\\boxed{420.0}", "420", True),
        ("\\boxed{25\\%}", "25", True),
        ("#### 1,000", "1000", True),
        ("The answer is 18 dollars.", "18", True),
        ("\\boxed{12 \\text{ cm}}", "12", True),
        ("\\boxed{1\\frac{1}{10}}", "\\frac{11}{10}", True),
        ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", True),
        ("\\boxed{\\dfrac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", True),
        ("\\boxed{\\{2, 1\\}}", "\\{1,2\\}", True),
        ("\\boxed{(1, 2)}", "(1,2)", True),
        ("\\boxed{(2, 1)}", "(1,2)", False),
        ("\\boxed{[1, 2)}", "[1,2)", True),
        ("\\boxed{(1, 2]}", "[1,2]", False),
        ("\\boxed{x^2+2x+1}", "(x+1)^2", True),
        ("\\boxed{x^2+2x}", "(x+1)^2", False),
        ("\\boxed{4t}", "4t", True),
        ("\\boxed{4}", "4t", False),
        ("\\boxed{\\pi}", "\\pi", True),
        ("\\boxed{7\\pi}", "7\\pi", True),
        ("\\boxed{\\text{(C)}}", "\\text{(A)}", False),
        ("no final answer", "3", False),
    ],
)
def test_equivalence(verifier, response, gold, expected):
    assert verifier.check(response, gold) is expected


def test_check_many_stats_dedup_and_cache(verifier):
    before = verifier.stats.as_dict()
    responses = ["\\boxed{2}", "\\boxed{x+1}", "\\boxed{1+x}", "\\boxed{1+x}", "nothing", "#### 7"]
    golds = ["2", "1+x", "x+1", "x+1", "1", "7"]
    assert verifier.check_many(responses, golds) == [True, True, True, True, False, True]
    after = verifier.stats.as_dict()
    delta = {k: after[k] - before[k] for k in after}
    assert delta["checks"] == 6 and delta["no_answer"] == 1
    assert delta["fast_path"] == 2  # "2" and "7": exact numbers, in-process
    assert delta["symbolic"] == 2  # (x+1 | 1+x) once, (1+x | x+1) once for two rows
    assert verifier.check("\\boxed{1+x}", "x+1")
    assert verifier.stats.cache_hits == after["cache_hits"] + 1
    with pytest.raises(ValueError):
        verifier.check_many(["a"], [])


def test_module_level_is_correct():
    assert is_correct("Thus \\boxed{\\frac{6}{8}}.", "0.75")
    assert not is_correct("Thus \\boxed{\\frac{5}{8}}.", "0.75")


# --------------------------------------------------------------------------- hostile input


def _hostile(marker: str) -> dict[str, str]:
    code = f"__import__('os').system('touch {marker}')"
    return {
        "code_boxed": "\\boxed{" + code + "}",
        "code_answer_is": "The answer is " + code,
        "code_hashes": "#### " + code,
        "code_eval_expr": "\\boxed{eval(\"open('" + marker + "', 'w')\")}",
        "tower": "\\boxed{9^{9^{9^9}}}",
        "tower_parens": "\\boxed{9^(9^(9^9))}",
        "factorial": "\\boxed{(10^{10^{10}})!}",
        "deep_braces": "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
        "deep_parens": "\\boxed{" + "(" * 10_000 + "1" + ")" * 10_000 + "}",
        "deep_frac": "\\boxed{" + "\\frac{1}{" * 10_000 + "1" + "}" * 10_000 + "}",
        "deep_short": "\\boxed{" + "(" * 300 + "1" + ")" * 300 + "}",
        "one_mb_answer": "\\boxed{" + "1+" * 500_000 + "1}",
        "one_mb_unclosed": "\\boxed{" + "x" * 1_000_000,
        "one_mb_text": "word " * 200_000,
    }


@pytest.mark.parametrize("name", list(_hostile("M")))
def test_hostile_answers_false_fast_and_harmless(verifier, tmp_path, name):
    marker = tmp_path / "pwned"
    response = _hostile(str(marker))[name]
    start = time.perf_counter()
    assert verifier.check(response, "3") is False
    assert time.perf_counter() - start < verifier.timeout_s + SLACK_S
    # hostile text as the gold answer is handled the same way
    start = time.perf_counter()
    assert verifier.check("\\boxed{3}", response) is False
    assert time.perf_counter() - start < verifier.timeout_s + SLACK_S
    assert not marker.exists()


def test_hung_worker_is_killed_at_the_hard_limit(verifier):
    """A worker that hangs beyond reach of signals (SIGSTOP) is killed and replaced."""
    before = verifier.stats.as_dict()
    for w in verifier._workers:
        os.kill(w.proc.pid, signal.SIGSTOP)
    start = time.perf_counter()
    assert verifier.check("\\boxed{y+2}", "2+y") is False  # would be True: it timed out
    assert time.perf_counter() - start < verifier.timeout_s + SLACK_S
    assert verifier.stats.timeouts == before["timeouts"] + 1
    assert verifier.stats.restarts >= before["restarts"] + 1
    for w in verifier._workers:  # the other one may still be stopped
        os.kill(w.proc.pid, signal.SIGCONT)
    assert verifier.check("\\boxed{y+3}", "3+y") is True  # pool works again


def test_crashed_worker_is_replaced(verifier):
    for w in verifier._workers:
        os.kill(w.proc.pid, signal.SIGKILL)
        w.proc.join(5)
    assert verifier.check("\\boxed{z+4}", "4+z") is True
    assert verifier.stats.errors >= 1
