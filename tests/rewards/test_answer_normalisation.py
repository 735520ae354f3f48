"""Answer normalisation, the exact numeric fast path and the nesting guard (answers.py):
one case per rule, each result worked out by hand from the rule."""

from fractions import Fraction

import pytest

from capo_dist.rewards.answers import nesting_depth, normalize_answer, parse_number


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("\\tfrac{1}{2}", "\\frac{1}{2}"),
        ("\\dfrac12", "\\frac12"),
        ("1{,}234{,}567", "1234567"),
        ("\\$5", "5"),
        ("\\left[ 1, 2 \\right)", "[1,2)"),
        ("\\displaystyle \\frac{1}{2}", "\\frac{1}{2}"),
        ("1\\!2", "12"),  # every LaTeX space goes, as all whitespace does
        ("a\\,b\\;c\\:d\\ e~f\\quad g\\qquad h", "abcdefgh"),
        ("45°", "45"),
        ("45^ { \\circ }", "45"),
        ("50%", "50"),
        ("\\mbox{(B)}", "(B)"),  # a text block alone is the answer
        ("\\textit{yes}", "yes"),
        ("\\mathrm{e}", "e"),
        ("\\mathbf{v}", "v"),
        ("\\operatorname{lcm}", "lcm"),
        ("3 \\textbf{ meters}", "3"),  # a text block after a number is a unit: dropped
        ("(2) \\text{ cm}^{2}", "(2)"),  # ... with its power
        ("\\text{cm} 3", "cm3"),  # a text block BEFORE the number is kept
        ("5 \\text{cm", "5\\text{cm"),  # an unclosed text block is left as it is
        ("5\\text{cm}\\text{zz}", "5"),  # two units in a row: both dropped
        ("3 \\text{ zz}", "3"),  # any text after a number is a unit or remark
        ("x \\text{ and } y", "xandy"),  # text after a letter is part of the answer
        ("\\text{a}" * 65, "a" * 64 + "\\text{a}"),  # at most 64 text blocks handled
        ("\\alpha = 3", "3"),
        ("x_1 = 4", "4"),
        ("y_{12} = 4", "4"),
        ("x = ", "x="),  # nothing on the right: not a left-hand side
        ("7 . ", "7"),
        ("1,000.", "1000"),  # the trailing period goes before thousands are read
        (".5", ".5"),  # only TRAILING periods go
        ("MAX", "MAX"),
        ("5.\t.", "5"),  # a period left bare by removing whitespace goes too
        ("5 square feet", "5"),
        ("5 sq ft", "5"),
        ("5 m^2", "5"),
        ("12 eggs.", "12"),
        ("12 people per day", "12peopleperday"),  # words after the units: kept
        ("1,234.5", "1234.5"),
        ("-12,345", "-12345"),
        ("12,34", "12,34"),  # not groups of three: a list, kept
        ("1,000,00", "1,000,00"),
        ("", ""),
    ],
)
def test_normalize_answer_rules(raw, expected):
    assert normalize_answer(raw) == expected


_WHOLE = "1" * 400
_NUM_395 = "1" * 395
_DEN_396 = "1" * 396
_LONGEST_FRAC = _WHOLE + "\\frac{" + _NUM_395 + "}{" + _DEN_396 + "}"  # 1200 = 3 * 400 chars


@pytest.mark.parametrize(
    ("s", "value"),
    [
        ("+3", Fraction(3)),
        ("-0", Fraction(0)),
        ("1.", Fraction(1)),
        ("-.5", Fraction(-1, 2)),
        ("+3/4", Fraction(3, 4)),
        ("-3/4", Fraction(-3, 4)),
        ("3/0", None),
        ("6/1", Fraction(6)),
        ("\\frac{3}{1}", Fraction(3)),
        ("2\\frac{0}{3}", Fraction(2)),  # a zero fraction still makes a mixed number
        ("\\frac{3}{0}", None),
        ("\\frac{3}{0.0}", None),
        ("\\frac{1}{2.5}", Fraction(2, 5)),
        ("\\frac{+1}{.5}", Fraction(2)),
        ("-\\frac{-1}{2}", Fraction(1, 2)),
        ("+\\frac{1}{2}", Fraction(1, 2)),
        ("2\\frac12", Fraction(5, 2)),
        ("2 \\frac{1}{4}", Fraction(9, 4)),
        ("1\\frac{-1}{2}", None),  # a mixed number with a negative fraction is not one
        ("-2\\frac{1}{4}", Fraction(-9, 4)),
        ("\\frac{1}{2}{3}", None),
        ("1/2/3", None),
        ("3/4.5", None),
        ("1 000", None),
        ("9" * 400, Fraction(int("9" * 400))),  # the most digits read
        ("9" * 401, None),
        (_LONGEST_FRAC, int(_WHOLE) + Fraction(int(_NUM_395), int(_DEN_396))),
        (_WHOLE + "\\frac{" + _NUM_395 + "1}{" + _DEN_396 + "}", None),  # 1201 chars
    ],
)
def test_parse_number_cases(s, value):
    assert len(_LONGEST_FRAC) == 1200
    assert parse_number(s) == value


@pytest.mark.parametrize(
    ("s", "depth"),
    [
        ("", 0),
        ("x+1", 0),
        ("(a)", 1),
        ("[a]", 1),
        ("{a}", 1),
        ("(a[b]{c})", 2),
        ("f(g(h[x]))", 3),
        ("()(())", 2),
        (")(", 1),  # a closer with nothing open does not go below zero
        ("))((", 2),
        ("(]", 1),
        ("(X(", 2),  # only brackets count
        ("X(", 1),
        ("(()((", 3),
    ],
)
def test_nesting_depth(s, depth):
    assert nesting_depth(s) == depth
