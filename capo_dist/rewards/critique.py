"""The GenPRM judge's prompt and the parsing of its critiques (DESIGN §1.2).

The judge reads the whole response once, shown step by step, and ends its
critique with one line `Wrong step list: [i, j, …]`. `parse_critique` reads the
LAST such line: indices outside the step range are dropped and counted, and a
critique without a parsable list is invalid (`wrong is None`, it abstains in
the vote). Parsing is regex-only (never `eval`) and bounded on hostile input.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

# The most indices one list may hold; a longer list is not a critique.
MAX_LIST_ITEMS = 1024
# Digits of one index; longer numbers are out of range (dropped, counted).
_MAX_INDEX_DIGITS = 9

_LABEL_RE = re.compile(r"wrong[ \t]*steps?[ \t]*list")  # matched on lowercased text
# After the label: markdown/colon decoration, then a bracketed list (bounded length).
_LIST_RE = re.compile(
    rf"[ \t*_:`]{{0,16}}\n?[ \t*_`]{{0,8}}\[([^\[\]]{{0,{MAX_LIST_ITEMS * 16}}})\]",
)
_ITEM_RE = re.compile(r"(?:step[ \t]*)?([+-]?)(\d+)")

_PROMPT = """\
You are a meticulous math teacher. Below is a problem{ref_clause} and a student's \
solution split into numbered steps. Check each step ON ITS OWN CORRECTNESS: a step \
is wrong if it contains a calculation error, a logical error, a false statement or \
an unjustified claim. Do not mark a step wrong only because an earlier step was \
wrong; judge whether the step itself is correct given what precedes it.

## Problem
{problem}
{ref_block}
## Solution
{steps}

Briefly examine the steps one by one. Then end your reply with exactly one line of \
the form
Wrong step list: [i, j, ...]
listing the numbers of all wrong steps, or
Wrong step list: []
when every step is correct."""


def build_critique_prompt(
    problem: str, steps: Sequence[str], reference_answer: str | None = None
) -> str:
    """The judge's prompt: problem, optional reference answer, the steps as
    `Step 0: …` lines, and the instruction to end with `Wrong step list: [...]`."""
    shown = "\n\n".join(f"Step {i}: {s.strip()}" for i, s in enumerate(steps))
    if reference_answer is None:
        ref_clause, ref_block = "", ""
    else:
        ref_clause = " with its reference final answer"
        ref_block = f"\n## Reference answer\n{reference_answer.strip()}\n"
    return _PROMPT.format(
        ref_clause=ref_clause,
        problem=problem.strip(),
        ref_block=ref_block,
        steps=shown or "(empty solution)",
    )


@dataclass(frozen=True)
class ParsedCritique:
    """One parsed critique: the flagged step indices (None = invalid, abstains)
    and how many listed indices were dropped as out of range or negative."""

    wrong: frozenset[int] | None
    dropped: int = 0


_INVALID = ParsedCritique(wrong=None, dropped=0)


def parse_critique(text: str | None, num_steps: int) -> ParsedCritique:
    """Parse the last `Wrong step list: [...]` line of a critique.

    Lenient on case, whitespace, markdown bold/code around the label and the
    list (`**Wrong step list:** [1,3]`), and on `Step 1` items; `[]` means
    every step is right. Indices outside `[0, num_steps)` are dropped and
    counted. No label, a last label without a bracketed list, a non-integer
    item, or more than MAX_LIST_ITEMS items → invalid. `None` (the judge
    failed) → invalid, as is anything that is not a string (a reply of the
    wrong shape). Linear time in `len(text)` (regexes bounded or anchored);
    never raises.
    """
    if not isinstance(text, str) or not text:
        return _INVALID
    low = text.lower()  # everything below reads the lowercased text
    pos = low.rfind("wrong")
    label = None
    while pos >= 0:  # from the end: the first label found is the last one
        label = _LABEL_RE.match(low, pos)
        if label is not None:
            break
        pos = low.rfind("wrong", 0, pos)
    if label is None:
        return _INVALID
    m = _LIST_RE.match(low, label.end())
    if m is None:
        return _INVALID
    body = m.group(1).strip()
    if not body:
        return ParsedCritique(wrong=frozenset(), dropped=0)
    items = [it.strip() for it in body.split(",")]
    items = [it for it in items if it]  # tolerate "[1, 3,]"
    if len(items) > MAX_LIST_ITEMS:
        return _INVALID
    wrong: set[int] = set()
    dropped = 0
    for it in items:
        im = _ITEM_RE.fullmatch(it)
        if im is None:
            return _INVALID
        sign, digits = im.groups()
        if sign == "-" or len(digits) > _MAX_INDEX_DIGITS:
            dropped += 1
            continue
        idx = int(digits)
        if idx >= num_steps:
            dropped += 1
            continue
        wrong.add(idx)
    return ParsedCritique(wrong=frozenset(wrong), dropped=dropped)


def parse_wrong_steps(text: str, num_steps: int) -> frozenset[int] | None:
    """The set of wrong steps named by a critique, or None when it is invalid."""
    return parse_critique(text, num_steps).wrong
