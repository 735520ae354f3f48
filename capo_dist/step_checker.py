"""A symbolic judge for arithmetic word problems: checks each step's equations exactly.

It reads equations such as `12 + 7 = 19`, `2^3 = 8` or GSM8K's `<<16-3-4=9>>` in a
step, evaluates both sides with its own small parser over exact Fractions (+ - * /,
`^`/`**` with integer exponents, parentheses; model text is never passed to eval or
sympify) and gives the step one of three verdicts (`check_step`):

* `Verdict.WRONG`: an equation is false, or arithmetically impossible (a division
  by zero, or zero to a negative power, on either side).
* `Verdict.UNCHECKED`: the step holds arithmetic beyond what the checker reads
  within its caps, so it cannot vouch for it: a step longer than MAX_STEP_CHARS;
  an equation whose left side is longer than MAX_EQUATION_CHARS, holds more than
  MAX_TOKENS tokens or nests deeper than MAX_DEPTH; a side with a number of
  more than MAX_LITERAL_DIGITS digits; a value past MAX_VALUE_BITS
  bits (`10^10^10`); or any other error the step's text could cause (caught once,
  in `check_step`). An unchecked step is FLAGGED like a wrong one, never passed as
  correct: a policy cannot hide a wrong step behind arithmetic too big to check,
  and real solutions stay far below the caps (in GSM8K's train and test
  solutions the longest left side read is 33 characters, the longest number 10
  digits). The symbolic judge counts these steps (`judge_unchecked_steps` in
  the run's metrics).
* `Verdict.CORRECT`: every checkable equation holds; a step with none (prose,
  `x = 5` restatements, names, functions) is correct.

Every cap bounds the work per step by construction: the step is at most
MAX_STEP_CHARS characters, the regexes look at a bounded window around each `=`,
and evaluation stops before any number outgrows MAX_VALUE_BITS.

Its output is a critique in the judge's own format (`Wrong step list: [...]`), so
it flows through the same parser and vote as an LLM judge. With `flip_prob > 0`
each step's verdict is flipped at random per critique: a noisy judge, used to
measure what voting buys under judge noise.
"""

from __future__ import annotations

import enum
import random
import re
from collections.abc import Callable, Sequence
from fractions import Fraction

from capo_dist.rewards.steps import split_steps

# A longer step is not read (UNCHECKED): bounds every scan below.
MAX_STEP_CHARS = 4096
# The longest left side read (a longer arithmetic run before `=` is UNCHECKED).
MAX_EQUATION_CHARS = 200
# Tokens of one side (numbers, operators, parentheses).
MAX_TOKENS = 256
# Parenthesis/unary-minus/power nesting (bounds the recursive parser's depth).
MAX_DEPTH = 32
# Characters of one number (digits and its decimal point; thousands commas dropped).
MAX_LITERAL_DIGITS = 100
# Bits of any numerator or denominator during evaluation (~600 decimal digits).
MAX_VALUE_BITS = 2048


class Verdict(enum.Enum):
    """The checker's verdict on one step (see the module docstring)."""

    CORRECT = "correct"
    WRONG = "wrong"
    UNCHECKED = "unchecked"


# The characters of an arithmetic side: numbers, + - * / ^ x × ÷, parentheses, spaces, '$', ','.
_SIDE_CHARS = r"[\d\s.,$+\-*/×÷x()^]"
_EQUATION = re.compile(
    rf"(?P<lhs>[\d$(.]{_SIDE_CHARS}{{0,{MAX_EQUATION_CHARS}}}?)\s*=\s*\$?"
    r"(?P<rhs>-?(?:\d++(?:,|\d++)*(?:\.\d++)?|\.\d++)(?:/\d++)?)"
    # Not `5A` / `5.x` (no ASCII letter or digit in the word run that follows), not a
    # mixed number `1 1/2`. Possessive wherever giving characters back could never
    # succeed (the rhs only ever backs off to just before a comma): no part of the
    # match re-reads what follows it, so each `=` costs one window of the left side.
    r"(?!(?:(?![A-Za-z\d])[\w/.])*+[A-Za-z\d])(?!\s++(?:and\s++)?\d++/\d)"
    r"(?!\\(?!text|mbox|mathrm)[A-Za-z])"  # nor `36\pi`, `2\sqrt{3}`: LaTeX juxtaposition
)
# A LaTeX operator just before a left side: it starts mid-expression (`\pi\cdot 4^2 = …`).
_LATEX_OPERATOR_BEFORE = re.compile(r"\\(?:cdot|times|div)\s*$")
_SIDE_CHAR = re.compile(_SIDE_CHARS)
_ANNOTATION = re.compile(r"<<([^<>]{0,200})>>")
_ARITHMETIC = re.compile(r"\d\s*[-+*/×÷x(^]|\)")
_TOKEN = re.compile(r"\s*(?:(?P<num>\d+(?:\.\d+)?|\.\d+)|(?P<op>\*\*|[-+*/()^]))")


class _Unparsable(ValueError):
    """Not arithmetic the checker reads (names, stray symbols): nothing to check."""


class TooBigToCheck(ValueError):
    """Arithmetic beyond the checker's caps (length, depth, digits, magnitude)."""


def _tokenize(expr: str) -> list[str]:
    expr = expr.replace("$", "").replace(",", "").replace("×", "*").replace("÷", "/")
    expr = re.sub(r"(?<=[\d)])\s*x\s*(?=[\d(])", "*", expr)
    tokens: list[str] = []
    pos = 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None or m.end() == pos:
            if expr[pos:].strip() == "":
                break
            raise _Unparsable(expr[:50])
        tok = m.group("num") or m.group("op")
        if len(tok) > MAX_LITERAL_DIGITS:
            raise TooBigToCheck(f"a number of {len(tok)} digits")
        tokens.append(tok)
        pos = m.end()
        if len(tokens) > MAX_TOKENS:
            raise TooBigToCheck(f"more than {MAX_TOKENS} tokens")
    return tokens


def _bounded(value: Fraction) -> Fraction:
    if max(value.numerator.bit_length(), value.denominator.bit_length()) > MAX_VALUE_BITS:
        raise TooBigToCheck(f"a value past {MAX_VALUE_BITS} bits")
    return value


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    """`base ** exponent` for an integer exponent, refused before it outgrows the caps."""
    if exponent.denominator != 1:
        raise _Unparsable("non-integer exponent")  # roots: outside the checker's language
    e = abs(exponent.numerator)
    bits = max(base.numerator.bit_length(), base.denominator.bit_length())
    if e > MAX_VALUE_BITS or (bits - 1) * e > MAX_VALUE_BITS:  # |base| ≤ 1 stays small
        raise TooBigToCheck(f"a power past {MAX_VALUE_BITS} bits")
    if base == 0 and exponent < 0:
        raise ZeroDivisionError("zero to a negative power")
    return _bounded(base**exponent)


def evaluate(expr: str) -> Fraction:
    """Exact value of an arithmetic expression: + - * /, `^`/`**`, unary minus, parentheses.

    Raises `ZeroDivisionError` for a division by zero (or zero to a negative
    power), `TooBigToCheck` (a ValueError) past the caps (MAX_TOKENS,
    MAX_DEPTH, MAX_LITERAL_DIGITS, MAX_VALUE_BITS) and ValueError for anything
    else (names, calls, non-integer exponents, unbalanced parentheses), so
    untrusted text can only ever be a number. Work is bounded by the caps.
    """
    tokens = _tokenize(expr)
    pos = 0
    depth = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def nested(parse: Callable[[], Fraction]) -> Fraction:
        nonlocal depth
        depth += 1
        if depth > MAX_DEPTH:
            raise TooBigToCheck(f"nesting deeper than {MAX_DEPTH}")
        try:
            return parse()
        finally:
            depth -= 1

    def atom() -> Fraction:
        tok = peek()
        if tok is None:
            raise _Unparsable("empty")
        if tok == "(":
            take()
            value = nested(sum_)
            if peek() != ")":
                raise _Unparsable("unbalanced")
            take()
            return value
        if tok[0].isdigit() or tok[0] == ".":
            take()
            return Fraction(tok)
        raise _Unparsable(tok)

    def unary() -> Fraction:
        if peek() == "-":
            take()
            return -nested(unary)
        return power()

    def power() -> Fraction:  # right-associative: 2^3^2 = 2^9; -2^2 = -(2^2)
        base = atom()
        if peek() in ("^", "**"):
            take()
            return _power(base, nested(unary))
        return base

    def product() -> Fraction:
        value = unary()
        while peek() in ("*", "/"):
            op, rhs = take(), unary()
            if op == "/" and rhs == 0:
                raise ZeroDivisionError("division by zero")
            value = _bounded(value * rhs if op == "*" else value / rhs)
        return value

    def sum_() -> Fraction:
        value = product()
        while peek() in ("+", "-"):
            op, rhs = take(), product()
            value = _bounded(value + rhs if op == "+" else value - rhs)
        return value

    result = sum_()
    if pos != len(tokens):
        raise _Unparsable("trailing tokens")
    return result


def _left_run_start(text: str, end: int, floor: int) -> int:
    """Start of the run of arithmetic characters ending at `end` (not before `floor`)."""
    i = end
    while i > floor and _SIDE_CHAR.match(text, i - 1):
        i -= 1
    return i


def _last_char_before(text: str, end: int, floor: int) -> str:
    """The last non-whitespace character of text[floor:end] ("" if none); linear in the
    whitespace it skips, which for successive equations lies in disjoint stretches."""
    i = end
    while i > floor and text[i - 1].isspace():
        i -= 1
    return text[i - 1] if i > floor else ""


def _check_text(text: str) -> Verdict:
    """Verdict on the equations of one text (a step, or one calculator annotation)."""
    unchecked = False
    last_end = 0
    for m in _EQUATION.finditer(text):
        start = m.start("lhs")
        # The regex reads at most MAX_EQUATION_CHARS of the left side: a longer
        # arithmetic run before `=` is a left side too long to check. (Runs before
        # successive `=` are disjoint: the scans are linear in the text.)
        prev_end, last_end = last_end, m.end()
        full = text[_left_run_start(text, start, prev_end) : m.end("lhs")]
        try:
            rhs = evaluate(m.group("rhs"))
        except ZeroDivisionError:
            return Verdict.WRONG  # `… = 3/0`
        except TooBigToCheck:
            unchecked = True  # `… = 99…9` past MAX_LITERAL_DIGITS
            continue
        if len(full.strip()) > MAX_EQUATION_CHARS and _ARITHMETIC.search(full):
            unchecked = True
            continue
        lhs = m.group("lhs").strip()
        if not _ARITHMETIC.search(lhs):
            continue  # `x = 5` style restatement: nothing to check
        if _last_char_before(text, start, prev_end) in ("-", "+", "*", "/", "×", "÷", "x", "^"):
            continue  # the left side starts mid-expression (`60 students x 2/3 = 40`)
        if _LATEX_OPERATOR_BEFORE.search(text, max(prev_end, start - 16), start):
            continue
        try:
            value = evaluate(lhs)
        except ZeroDivisionError:
            return Verdict.WRONG
        except TooBigToCheck:
            unchecked = True
            continue
        except ValueError:
            continue
        if value != rhs:
            return Verdict.WRONG
    return Verdict.UNCHECKED if unchecked else Verdict.CORRECT


def check_step(step: str) -> Verdict:
    """The verdict on one step (see the module docstring). Never raises; bounded work."""
    try:
        if len(step) > MAX_STEP_CHARS:
            return Verdict.UNCHECKED
        # GSM8K writes `16 - 3 - 4 = <<16-3-4=9>>9`: where calculator annotations are
        # present they are the step's equations; otherwise read the prose.
        verdicts = [_check_text(t) for t in _ANNOTATION.findall(step) or [step]]
    except Exception:  # the one boundary: whatever the text causes, the step is unchecked
        return Verdict.UNCHECKED
    if Verdict.WRONG in verdicts:
        return Verdict.WRONG
    return Verdict.UNCHECKED if Verdict.UNCHECKED in verdicts else Verdict.CORRECT


def step_is_correct(step: str) -> bool:
    """True iff `check_step` says CORRECT (a wrong or unchecked step is not)."""
    return check_step(step) is Verdict.CORRECT


def solution_is_clean(response: str) -> bool:
    """True iff every step of `response` (split as CAPO splits it) passes `step_is_correct`."""
    return all(step_is_correct(response[s:e]) for s, e in split_steps(response))


def format_critique(steps: Sequence[str], wrong: Sequence[bool]) -> str:
    """A critique in the GenPRM's output format, one verdict line per step."""
    lines = [f"Step {i}: {'incorrect' if bad else 'correct'}." for i, bad in enumerate(wrong)]
    flagged = ", ".join(str(i) for i, bad in enumerate(wrong) if bad)
    lines.append(f"Wrong step list: [{flagged}]")
    return "\n".join(lines)


def critique_verdicts(
    steps: Sequence[str],
    verdicts: Sequence[Verdict],
    n: int,
    flip_prob: float = 0.0,
    rng: random.Random | None = None,
) -> list[str]:
    """`n` critiques flagging every step not CORRECT, each flag flipped with `flip_prob`."""
    truth = [v is not Verdict.CORRECT for v in verdicts]
    if flip_prob <= 0.0:
        return [format_critique(steps, truth)] * n
    rng = rng or random.Random()
    return [
        format_critique(steps, [bad != (rng.random() < flip_prob) for bad in truth])
        for _ in range(n)
    ]


def critique_steps(
    steps: Sequence[str], n: int, flip_prob: float = 0.0, rng: random.Random | None = None
) -> list[str]:
    """`n` critiques of one response: exact verdicts, each flipped with `flip_prob`."""
    return critique_verdicts(steps, [check_step(s) for s in steps], n, flip_prob, rng)
