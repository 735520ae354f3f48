"""Hostile JSONL lines for the property tests of the data loaders (training and benchmark files).

`hostile_lines()` draws one line (bytes, no newline) that a user's file could
hold: usable rows of each format with one or two fields replaced, and rows made
of JSON values of every shape (nested lists/objects, wrong types, nulls, huge
and non-finite numbers, strings with lone surrogates) under the keys the
loaders read, raw bytes, and pathologically deep nesting.
"""

from __future__ import annotations

import json

from hypothesis import strategies as st

# Strings with and without lone surrogates (json.dumps writes those as "\udXXX").
_SURROGATES = st.text(
    st.characters(min_codepoint=0xD7F0, max_codepoint=0xE010, exclude_categories=()),
    min_size=1,
    max_size=5,
)
_TEXT = st.text(max_size=30) | _SURROGATES
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.just(10**4000)
    | st.floats(allow_nan=True, allow_infinity=True)
    | _TEXT
    | st.sampled_from(["#### 7", "so \\boxed{3}", "['$2$', '$3$']", "[[[1]]]", "  ", "7"])
)
JSON_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=12,
)
KEYS = (
    "id",
    "idx",
    "question",
    "answer",
    "problem",
    "solution",
    "final_answer",
    "context",
    "gt",
)


# Usable rows of each loader's formats; `_perturbed` breaks one or two of their fields.
TEMPLATES = (
    {"id": 1, "question": "Q?", "answer": "so #### 7"},  # training file, GSM8K
    {"id": 2, "problem": "Q?", "answer": "7"},  # training file (plain) / benchmark
    {"id": 3, "problem": "Q?", "final_answer": ["$7$"], "context": "C."},  # OlympiadBench
    {"idx": 4, "problem": "Q?", "solution": "so \\boxed{7}"},  # MATH
)


@st.composite
def _rows(draw: st.DrawFn) -> bytes:
    keys = draw(st.lists(st.sampled_from(KEYS), max_size=len(KEYS), unique=True))
    return json.dumps({k: draw(JSON_VALUES) for k in keys}).encode()


@st.composite
def _perturbed(draw: st.DrawFn) -> bytes:
    row = dict(draw(st.sampled_from(TEMPLATES)))
    for key in draw(st.lists(st.sampled_from(sorted(row)), min_size=1, max_size=2, unique=True)):
        action = draw(st.integers(0, 9))
        if action == 0:
            del row[key]
        elif action < 5 and isinstance(row[key], str):  # the same text with a lone surrogate
            at = draw(st.integers(0, len(row[key])))
            row[key] = row[key][:at] + draw(_SURROGATES) + row[key][at:]
        else:
            row[key] = draw(st.one_of(_SURROGATES, _SCALARS, JSON_VALUES))
    return json.dumps(row).encode()


@st.composite
def _deep(draw: st.DrawFn) -> bytes:
    depth = draw(st.sampled_from([31, 33, 2_000, 10_000]))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    key = draw(st.sampled_from(["question", "answer", "final_answer", "id"]))
    inner = opener * depth + "1" + closer * depth
    return f'{{"{key}": {inner}, "question": "q", "answer": "#### 1"}}'.encode()


# An integer of over 4300 digits: Python's json refuses to read it (and to write it).
_HUGE_INT = st.just(b'{"question": "q", "answer": ' + b"9" * 5000 + b', "id": 1}')


def hostile_lines() -> st.SearchStrategy[bytes]:
    """One non-blank line, no newline in it."""
    raw = st.binary(min_size=1, max_size=40).filter(lambda b: b"\n" not in b and b.strip())
    values = JSON_VALUES.map(lambda v: json.dumps(v).encode())
    return st.one_of(_perturbed(), st.one_of(_rows(), _deep(), values, raw, _HUGE_INT))
