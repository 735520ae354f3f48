"""A symbolic judge for arithmetic word problems: checks each step's equations exactly.

It reads equations such as `12 + 7 = 19` or GSM8K's `<<16-3-4=9>>` in a step,
evaluates the left side with its own small parser over sympy Rationals (model
text is never passed to eval or sympify) and flags the step if any equation is
false. Its output is a critique in the judge's own format
(`Wrong step list: [...]`) so it flows through the same parser and vote as an
LLM judge. With `flip_prob > 0` each step's verdict is flipped at random per
critique: a noisy judge, used to measure what voting buys under judge noise.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

import sympy

from capo_dist.rewards.steps import split_steps

# An arithmetic left side: numbers, + - * / x × ÷, parentheses, spaces, '$' and ','.
_EQUATION = re.compile(
    r"(?P<lhs>[\d$(.][\d\s.,$+\-*/×÷x()]{0,200}?)\s*=\s*\$?"
    r"(?P<rhs>-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:/\d+)?)"
    r"(?![\w/.]*[A-Za-z\d])(?!\s+(?:and\s+)?\d+/\d)"  # not `5A`, not a mixed number `1 1/2`
)
_ANNOTATION = re.compile(r"<<([^<>]{0,200})>>")
_TOKEN = re.compile(r"\s*(?:(?P<num>\d+(?:\.\d+)?|\.\d+)|(?P<op>[-+*/()]))")
MAX_TOKENS = 64


class _Unparsable(ValueError):
    pass


def _tokenize(expr: str) -> list[str]:
    expr = expr.replace("$", "").replace(",", "").replace("×", "*").replace("÷", "/")
    expr = re.sub(r"(?<=[\d)])\s*x\s*(?=[\d(])", "*", expr)
    tokens, pos = [], 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None or m.end() == pos:
            if expr[pos:].strip() == "":
                break
            raise _Unparsable(expr)
        tokens.append(m.group("num") or m.group("op"))
        pos = m.end()
        if len(tokens) > MAX_TOKENS:
            raise _Unparsable("too long")
    return tokens


def evaluate(expr: str) -> sympy.Rational:
    """Exact value of an arithmetic expression with + - * / and parentheses.

    Raises ValueError for anything else (names, powers, calls, unbalanced
    parentheses, division by zero), so untrusted text can only ever be a number.
    """
    tokens = _tokenize(expr)
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def atom() -> sympy.Rational:
        tok = peek()
        if tok is None:
            raise _Unparsable("empty")
        if tok == "(":
            take()
            value = sum_()
            if peek() != ")":
                raise _Unparsable("unbalanced")
            take()
            return value
        if tok == "-":
            take()
            return -atom()
        if tok[0].isdigit() or tok[0] == ".":
            take()
            return sympy.Rational(tok)
        raise _Unparsable(tok)

    def product() -> sympy.Rational:
        value = atom()
        while peek() in ("*", "/"):
            op, rhs = take(), atom()
            if op == "/" and rhs == 0:
                raise ZeroDivisionError("division by zero")
            value = value * rhs if op == "*" else value / rhs
        return value

    def sum_() -> sympy.Rational:
        value = product()
        while peek() in ("+", "-"):
            op, rhs = take(), product()
            value = value + rhs if op == "+" else value - rhs
        return value

    result = sum_()
    if pos != len(tokens):
        raise _Unparsable("trailing tokens")
    return result


def step_is_correct(step: str) -> bool:
    """False if any checkable equation in `step` is false; steps with none are correct."""
    # GSM8K writes `16 - 3 - 4 = <<16-3-4=9>>9`: where calculator annotations are
    # present they are the step's equations; otherwise read the prose.
    annotations = _ANNOTATION.findall(step)
    texts = annotations or [step]
    for m in (eq for text in texts for eq in _EQUATION.finditer(text)):
        lhs = m.group("lhs").strip()
        if not re.search(r"\d\s*[-+*/×÷x(]|\)", lhs):
            continue  # `x = 5` style restatement: nothing to check
        if re.search(r"[-+*/×÷x]\s*$", m.string[: m.start("lhs")]):
            continue  # the left side starts mid-expression (`60 students x 2/3 = 40`)
        try:
            value = evaluate(lhs)
        except ZeroDivisionError:
            return False
        except ValueError:
            continue
        if value != evaluate(m.group("rhs")):
            return False
    return True


def solution_is_clean(response: str) -> bool:
    """True iff every step of `response` (split as CAPO splits it) passes `step_is_correct`."""
    return all(step_is_correct(response[s:e]) for s, e in split_steps(response))


def format_critique(steps: Sequence[str], wrong: Sequence[bool]) -> str:
    """A critique in the GenPRM's output format, one verdict line per step."""
    lines = [f"Step {i}: {'incorrect' if bad else 'correct'}." for i, bad in enumerate(wrong)]
    flagged = ", ".join(str(i) for i, bad in enumerate(wrong) if bad)
    lines.append(f"Wrong step list: [{flagged}]")
    return "\n".join(lines)


def critique_steps(
    steps: Sequence[str], n: int, flip_prob: float = 0.0, rng: random.Random | None = None
) -> list[str]:
    """`n` critiques of one response: exact verdicts, each flipped with `flip_prob`."""
    truth = [not step_is_correct(s) for s in steps]
    if flip_prob <= 0.0:
        return [format_critique(steps, truth)] * n
    rng = rng or random.Random()
    return [
        format_critique(steps, [bad != (rng.random() < flip_prob) for bad in truth])
        for _ in range(n)
    ]
