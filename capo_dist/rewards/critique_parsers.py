"""Critique parsers by name: how a judge's reply becomes the set of steps it calls wrong.

A judge prompt (conf/judge_prompt/*.yaml, `capo_dist.judge_prompt`) names the
parser that reads its replies. A parser is a pure function
`(text, num_steps) -> ParsedCritique`: the flagged step indices, or
`wrong=None` when the reply is not a critique (it abstains in the vote and is
counted as invalid). The reply is model output, so it is untrusted: a parser
never raises, refuses anything that is not a string, and is bounded by
construction (length caps and single passes, never `eval`).

Built in:

| name              | the reply ends with                               | wrong steps            |
| ----------------- | ------------------------------------------------- | ---------------------- |
| `wrong_step_list` | `Wrong step list: [i, j, ...]` (CAPO's format)    | those indices          |
| `first_error`     | `\\boxed{k}`: the first wrong step, or -1 (ProcessBench) | {k}, or {} for -1 |
| `json`            | a JSON list of indices, or an object with `"wrong_steps": [...]` | those indices |

A user adds one in-package with the `register_parser("name")` decorator, or
names any importable function as `package.module:function` in the prompt's
YAML (imported where the critiques are parsed: the driver checks it imports
before any actor starts).
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable

from capo_dist.rewards.answers import last_boxed
from capo_dist.rewards.critique import MAX_LIST_ITEMS, ParsedCritique, parse_critique

Parser = Callable[[object, int], ParsedCritique]

# name -> parser. Extend with `register_parser`.
CRITIQUE_PARSERS: dict[str, Parser] = {}

_INVALID = ParsedCritique(wrong=None, dropped=0)
# The longest JSON value the `json` parser decodes, and its deepest nesting.
MAX_JSON_CHARS = 16_384
MAX_JSON_DEPTH = 4
# A first-error index: an optional sign and at most 9 digits.
_INDEX_RE = re.compile(r"([+-]?)(\d{1,9})")
# What may follow the JSON value: whitespace, a closing code fence, a full stop.
_JSON_TRAILER = " \t\r\n`."


def register_parser(name: str) -> Callable[[Parser], Parser]:
    """Decorator: register `fn` as the critique parser called `name` (a new name only)."""

    def add(fn: Parser) -> Parser:
        if name in CRITIQUE_PARSERS:
            raise ValueError(f"a critique parser named {name!r} is already registered")
        CRITIQUE_PARSERS[name] = fn
        return fn

    return add


def get_parser(name: str) -> Parser:
    """The parser called `name`, or the function `package.module:function` (imported);
    ValueError naming the registered parsers when there is none."""
    if name in CRITIQUE_PARSERS:
        return CRITIQUE_PARSERS[name]
    module, sep, attr = name.partition(":")
    if sep and module and attr:
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"critique parser {name!r} cannot be imported: {err}") from None
        if callable(fn):
            return fn
    raise ValueError(
        f"unknown critique parser {name!r}; registered: {', '.join(CRITIQUE_PARSERS)}, "
        "or give an importable function as package.module:function"
    )


register_parser("wrong_step_list")(parse_critique)


@register_parser("first_error")
def parse_first_error(text: object, num_steps: int) -> ParsedCritique:
    """ProcessBench's answer: the index of the first wrong step in the last `\\boxed{}`,
    or -1 when every step is right.

    `-1` → no step wrong; `k` in `[0, num_steps)` → {k}. Anything else (no box, a
    box that is not one integer, another negative, k past the last step) → invalid:
    a first-error answer that names no step of this solution says nothing about it.
    Linear in `len(text)` (`last_boxed` matches braces in one pass).
    """
    if not isinstance(text, str) or not text:
        return _INVALID
    boxed = last_boxed(text)
    m = _INDEX_RE.fullmatch(boxed.strip()) if boxed is not None else None
    if m is None:
        return _INVALID
    index = int(m.group(2)) * (-1 if m.group(1) == "-" else 1)
    if index == -1:
        return ParsedCritique(wrong=frozenset(), dropped=0)
    if not 0 <= index < num_steps:
        return _INVALID
    return ParsedCritique(wrong=frozenset({index}), dropped=0)


def _json_start(text: str, end: int) -> int | None:
    """Where the JSON array/object that closes at `text[end - 1]` opens, found by one
    backward scan that skips strings (a quote preceded by an odd run of backslashes is
    escaped); None past MAX_JSON_CHARS, MAX_JSON_DEPTH or the text's start."""
    depth = max_depth = 0
    in_string = False
    floor = max(0, end - MAX_JSON_CHARS)
    i = end - 1
    while i >= floor:
        c = text[i]
        if c == '"':
            run = 0
            while i - 1 - run >= floor and text[i - 1 - run] == "\\":
                run += 1
            if run % 2 == 0:
                in_string = not in_string
            i -= run + 1
            continue
        if not in_string:
            if c in "]}":
                depth += 1
                max_depth = max(max_depth, depth)
                if max_depth > MAX_JSON_DEPTH:
                    return None
            elif c in "[{":
                depth -= 1
                if depth == 0:
                    return i
        i -= 1
    return None


def _int_indices(items: object, num_steps: int) -> ParsedCritique:
    """Step indices from a decoded JSON list: every item an int (not a bool); those
    outside `[0, num_steps)` dropped and counted; any other item → invalid."""
    if not isinstance(items, list) or len(items) > MAX_LIST_ITEMS:
        return _INVALID
    wrong: set[int] = set()
    dropped = 0
    for it in items:
        if isinstance(it, bool) or not isinstance(it, int):
            return _INVALID
        if 0 <= it < num_steps:
            wrong.add(it)
        else:
            dropped += 1
    return ParsedCritique(wrong=frozenset(wrong), dropped=dropped)


@register_parser("json")
def parse_json_critique(text: object, num_steps: int) -> ParsedCritique:
    """A reply that ends with a JSON value: a list of wrong step indices, or an object
    whose `"wrong_steps"` is one (other keys ignored). A closing code fence, spaces
    or a full stop may follow it.

    The value is delimited by one backward scan (at most MAX_JSON_CHARS characters,
    nesting at most MAX_JSON_DEPTH: a deeper reply is refused), then decoded with `json.loads` (never `eval`);
    items must be integers (not bools or floats); out-of-range ones are dropped and
    counted. Anything else → invalid.
    """
    if not isinstance(text, str) or not text:
        return _INVALID
    tail = text.rstrip(_JSON_TRAILER)
    if not tail.endswith(("]", "}")):
        return _INVALID
    start = _json_start(tail, len(tail))
    if start is None:
        return _INVALID
    try:
        value = json.loads(tail[start:])
    except ValueError:  # bad JSON, or an integer of over 4300 digits (nesting is capped)
        return _INVALID
    if isinstance(value, dict):
        value = value.get("wrong_steps")
    return _int_indices(value, num_steps)
