"""Final-answer extraction, normalisation and the exact numeric fast path.

Everything here is pure, in-process string work with bounded cost: it never
evaluates model text. `extract_answer` finds the final answer of a response
(last `\\boxed{…}`/`\\fbox{…}`, else GSM8K `#### x`, else "the answer is x") and
returns it normalised (`normalize_answer`); `parse_number` reads a normalised
answer as an exact `Fraction` when it is a plain number, fraction or mixed
number, which decides most checks without the symbolic (math-verify) path.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

# An extracted answer longer than this is not an answer (MATH/GSM8K golds are
# < 200 characters); it is treated as no answer, which also bounds all later work.
MAX_ANSWER_CHARS = 1000
# Deeper bracket nesting than this never goes to the symbolic parser.
MAX_NESTING = 48
# Longest digit string the numeric fast path reads (bounds Fraction sizes).
_MAX_DIGITS = 400
# Only the last MAX_SCAN_CHARS characters of a text are searched for its answer
# (a final answer sits at the end; every scan below is linear in this window).
MAX_SCAN_CHARS = 1 << 20

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\b")
# What brace matching reads: a brace, or an escape pair that hides a brace or a
# backslash (`\\{`, `\\}`, `\\\\`); other pairs (`\\b`) cannot change a brace's reading.
_BRACE_OR_ESCAPE_RE = re.compile(r"\\[\\{}]|[{}]")
_ANSWER_IS_RE = re.compile(r"answer\s+is\s*:?\s*", re.IGNORECASE)


def _balanced_group(text: str, start: int) -> int | None:
    """End index (exclusive) of the `{…}` group opening at text[start] == '{'.

    Escaped braces (`\\{`, `\\}`) do not count. Gives up (None) when the group
    is unbalanced or longer than MAX_ANSWER_CHARS, so the scan is bounded.
    """
    depth = 0
    i = start
    stop = min(len(text), start + MAX_ANSWER_CHARS + 2)
    while i < stop:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _closing_braces(text: str) -> dict[int, int]:
    """For each `{` of `text` that is closed, the index of its matching `}`.

    One pass over the braces and escape pairs, as `_balanced_group` reads them
    (a `{` that follows no backslash is read identically from the text's start
    or from itself), so every group of the text costs O(1) afterwards.
    """
    close: dict[int, int] = {}
    open_at: list[int] = []
    for m in _BRACE_OR_ESCAPE_RE.finditer(text):
        i = m.start()
        c = text[i]
        if c == "{":
            open_at.append(i)
        elif c == "}" and open_at:
            close[open_at.pop()] = i
    return close


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{…}` / `\\fbox{…}` (or `\\boxed x`), raw.

    A box whose group is unbalanced or longer than MAX_ANSWER_CHARS is skipped
    for an earlier one. Linear in `len(text)`: braces are matched in one pass.
    """
    close: dict[int, int] | None = None
    for m in reversed(list(_BOX_RE.finditer(text))):
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            if close is None:
                close = _closing_braces(text)
            end = close.get(i)
            if end is not None and end - i <= MAX_ANSWER_CHARS + 1:
                return text[i + 1 : end]
            continue  # unbalanced or huge: look at an earlier box
        # `\boxed 5` form: up to the next `$` or whitespace; longer than MAX_ANSWER_CHARS
        # is skipped like a huge braced group (never cut to a shorter, different answer).
        tail = re.match(rf"[^\s$]{{1,{MAX_ANSWER_CHARS + 1}}}", text[i : i + MAX_ANSWER_CHARS + 2])
        if tail and len(tail.group(0)) <= MAX_ANSWER_CHARS:
            return tail.group(0)
    return None


def _after_hashes(text: str) -> str | None:
    """GSM8K style: the rest of the line after the last `####`."""
    pos = text.rfind("####")
    if pos < 0:
        return None
    line = text[pos + 4 :].split("\n", 1)[0]
    return line.strip() or None


def _answer_is(text: str) -> str | None:
    """The phrase after the last "answer is" (a `$…$` span, or up to the sentence end)."""
    last = None
    for last in _ANSWER_IS_RE.finditer(text):  # noqa: B007 - we want the last match
        pass
    if last is None:
        return None
    rest = text[last.end() : last.end() + MAX_ANSWER_CHARS + 2].split("\n", 1)[0].strip()
    for opener, closer in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if rest.startswith(opener):
            end = rest.find(closer, len(opener))
            if end > 0:
                return rest[len(opener) : end]
    m = re.match(r"(.*?)(?:\.\s|\.$|$)", rest)
    return m.group(1) if m and m.group(1) else None


def extract_answer(text: str) -> str | None:
    """The normalised final answer of `text`, or None when it states none.

    Order: last `\\boxed{…}`/`\\fbox{…}` (balanced braces), else the last GSM8K
    `#### x`, else the last "the answer is x". Answers longer than
    MAX_ANSWER_CHARS count as no answer; only the last MAX_SCAN_CHARS characters
    of `text` are read. Linear time in that window.
    """
    text = text[-MAX_SCAN_CHARS:]
    for finder in (last_boxed, _after_hashes, _answer_is):
        raw = finder(text)
        if raw is not None:
            if len(raw) > MAX_ANSWER_CHARS:
                return None
            ans = normalize_answer(raw)
            return ans or None
    return None


_UNIT_WORDS = (
    r"(?:dollars?|cents?|units?|square|sq|cubic|feet|foot|ft|inch(?:es)?|in|"
    r"yards?|miles?|meters?|metres?|m|cm|mm|km|kg|g|grams?|pounds?|lbs?|ounces?|oz|"
    r"degrees?|hours?|hrs?|minutes?|mins?|seconds?|secs?|days?|weeks?|months?|years?|"
    r"people|students|cookies|apples|mph|liters?|litres?|l|ml|gallons?|percent|points?|"
    r"times|ways|pages|books|marbles|tickets|eggs)"
)
_TRAILING_UNITS_RE = re.compile(r"^(.*?\d)\s*(?:" + _UNIT_WORDS + r"(?:\^?\d)?\b\.?\s*)+$", re.I)
_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|mbox|mathrm|mathbf|operatorname)\s*\{")
_UNIT_POWER_RE = re.compile(r"\s*\^\s*(?:\d|\{\d\})")
_THOUSANDS_RE = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_LHS_RE = re.compile(r"^(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\{?\w+\}?)?\s*=\s*(?=\S)")


def _strip_text_commands(s: str) -> str:
    """Drop `\\text{…}`-like blocks that follow other content (units); unwrap the rest."""
    out: list[str] = []
    i = 0
    for _ in range(64):  # bounded: at most 64 text blocks are handled
        m = _TEXT_CMD_RE.search(s, i)
        if m is None:
            break
        end = _balanced_group(s, m.end() - 1)
        if end is None:
            break
        before = s[i : m.start()]
        inner = s[m.end() : end - 1]
        out.append(before)
        head = "".join(out).strip()
        # A text block after a number/expression is a unit or a remark: drop it.
        # A text block on its own (e.g. `\text{(A)}`, `\text{Monday}`) is the answer.
        if not (head and re.search(r"[\d}).]$", head)):
            out.append(inner)
        else:  # a unit: drop its power too (`\text{cm}^2`)
            power = _UNIT_POWER_RE.match(s, end)
            end = power.end() if power else end
        i = end
    out.append(s[i:])
    return "".join(out)


def normalize_answer(answer: str) -> str:
    """Canonical string form of a final answer, for exact and fast comparison.

    Removes what does not change the value: `$`, `\\left`/`\\right`, LaTeX
    spacing, `\\dfrac`/`\\tfrac` (→ `\\frac`), degree signs, `%`, a leading
    `x =`, unit words/`\\text{ units}` after a number, thousands separators
    (`1,000`, `10{,}000`), trailing periods and all whitespace.
    """
    s = answer.strip()
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("{,}", ",").replace("\\$", "").replace("$", "")
    for cmd in ("\\left", "\\right", "\\displaystyle"):
        s = s.replace(cmd, "")
    for sp in ("\\!", "\\,", "\\;", "\\:", "\\ ", "~", "\\quad", "\\qquad"):
        s = s.replace(sp, " ")
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?|°", "", s)
    s = s.replace("\\%", "").replace("%", "")
    s = _strip_text_commands(s).strip()
    s = _LHS_RE.sub("", s, count=1)
    s = s.rstrip(" .")
    m = _TRAILING_UNITS_RE.match(s)
    if m:
        s = m.group(1)
    s = re.sub(r"\s+", "", s)
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    s = s.rstrip(".")
    return s


_INT = rf"\d{{1,{_MAX_DIGITS}}}"
_DEC = rf"(?:\d{{1,{_MAX_DIGITS}}}(?:\.\d{{0,{_MAX_DIGITS}}})?|\.\d{{1,{_MAX_DIGITS}}})"
_DECIMAL_RE = re.compile(r"^([+-]?)(" + _DEC + r")$")
_SLASH_RE = re.compile(r"^([+-]?)(" + _INT + r")/(" + _INT + r")$")
_FRAC_RE = re.compile(
    r"^([+-]?)(?:(" + _INT + r")\s*)?\\frac(?:\{([+-]?" + _DEC + r")\}\{([+-]?" + _DEC + r")\}"
    r"|(\d)(\d))$"
)


def parse_number(s: str) -> Fraction | None:
    """The exact value of a normalised plain number (`-3`, `0.25`, `3/4`, `\\frac{3}{4}`,
    `1\\frac{1}{2}`), or None when `s` is anything else. Strict regex → Decimal/
    Fraction: model text is never evaluated."""
    if len(s) > 3 * _MAX_DIGITS:
        return None
    try:
        m = _DECIMAL_RE.match(s)
        if m:
            v = Fraction(Decimal(m.group(2)))
            return -v if m.group(1) == "-" else v
        m = _SLASH_RE.match(s)
        if m:
            den = int(m.group(3))
            if den == 0:
                return None
            v = Fraction(int(m.group(2)), den)
            return -v if m.group(1) == "-" else v
        m = _FRAC_RE.match(s)
        if m:
            sign, whole, num, den, n1, d1 = m.groups()
            num_v = Fraction(Decimal(num if num is not None else n1))
            den_v = Fraction(Decimal(den if den is not None else d1))
            if den_v == 0:
                return None
            v = num_v / den_v
            if whole is not None:  # mixed number: 1\frac{1}{2} = 3/2
                if v < 0:
                    return None
                v += int(whole)
            return -v if sign == "-" else v
    except (InvalidOperation, ValueError, ZeroDivisionError):
        return None
    return None


def nesting_depth(s: str) -> int:
    """Deepest nesting of (), [] and {} in `s` (for the symbolic-path guard)."""
    depth = best = 0
    for c in s:
        if c in "([{":
            depth += 1
            best = max(best, depth)
        elif c in ")]}":
            depth = max(depth - 1, 0)
    return best
