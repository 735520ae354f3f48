"""The parsing of CAPO's critiques (DESIGN §1.2): the `wrong_step_list` parser.

The judge reads the whole response once, shown step by step (the prompt is
conf/judge_prompt/capo.yaml, `capo_dist.judge_prompt`), and ends its critique
with one line `Wrong step list: [i, j, …]`. `parse_critique` reads the
LAST such line: indices outside the step range are dropped and counted, and a
critique without a parsable list is invalid (`wrong is None`, it abstains in
the vote). Parsing is regex-only (never `eval`) and bounded on hostile input.
"""

from __future__ import annotations

import re
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
