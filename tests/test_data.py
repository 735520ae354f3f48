"""Data loading: field mapping, skip-and-count of bad rows, clear errors, generated problems,
unique problem ids, and a stream whose steps never repeat a problem."""

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capo_dist.data import (
    MAX_GOLD_CHARS,
    MAX_LINE_BYTES,
    MAX_TEXT_CHARS,
    DataError,
    ProblemStream,
    gsm8k_gold,
    load_jsonl,
    synthetic_arith,
    valid_unicode,
)
from tests.json_rows import hostile_lines

GOOD = json.dumps({"question": "ok?", "answer": "so #### 3"}).encode()


def test_gsm8k_test_split_loads_whole(shared_data):
    problems, stats = load_jsonl(shared_data / "gsm8k" / "test.jsonl")
    assert len(problems) == stats.kept == stats.rows == 1319
    assert problems[0].gold == "18"


def test_bench_file_maps_fields(shared_data):
    problems, _ = load_jsonl(
        shared_data / "bench" / "aime24" / "test.jsonl", "problem", "answer", "plain"
    )
    assert len(problems) == 30 and problems[0].gold == "204"


def test_bad_rows_are_skipped_and_counted(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [
        json.dumps({"question": "ok?", "answer": "so #### 3"}).encode(),
        json.dumps({"answer": "#### 1"}).encode(),
        json.dumps({"question": "  ", "answer": "#### 1"}).encode(),
        json.dumps({"question": "no gold", "answer": "forty"}).encode(),
        b"{not json",
        b"\xff\xfe\x00 bad bytes",
        json.dumps([1, 2]).encode(),
        b"",
        json.dumps({"question": "fine", "answer": "#### 1,000"}).encode(),
    ]
    path.write_bytes(b"\n".join(rows))
    problems, stats = load_jsonl(path)
    assert [p.gold for p in problems] == ["3", "1000"]
    assert stats.rows == 8 and stats.kept == 2
    assert stats.skipped == {
        "missing_question": 2,
        "no_gold_answer": 1,
        "bad_json": 1,
        "not_utf8": 1,
        "not_an_object": 1,
    }


def test_empty_file_is_a_clear_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match="no usable rows.*question_key"):
        load_jsonl(path)


def test_gsm8k_gold():
    assert gsm8k_gold("a\n#### 1,234") == "1234"
    assert gsm8k_gold("no marker") is None


def test_synthetic_is_deterministic_and_varied():
    a, b = synthetic_arith(50, seed=3), synthetic_arith(50, seed=3)
    assert a == b and a != synthetic_arith(50, seed=4)
    assert len({len(x.steps) for x in a}) > 1
    assert all(x.steps[-1] == f"The answer is {x.problem.gold}." for x in a)


def test_stream_visits_every_problem_once_per_epoch_and_resumes_exactly():
    problems = [x.problem for x in synthetic_arith(7, seed=0)]
    stream = ProblemStream(problems, seed=1)
    first, second = stream.take(7), stream.take(7)
    assert sorted(p.uid for p in first) == sorted(p.uid for p in problems)
    assert sorted(p.uid for p in second) == sorted(p.uid for p in problems)
    assert first != second
    stream.take(3)
    resumed = ProblemStream(problems, seed=1, **stream.state())
    assert [resumed.take(5) for _ in range(4)] == [stream.take(5) for _ in range(4)]


# ---------------------------------------------------------------- hostile rows


def _load(tmp_path, *lines: bytes, **kwargs):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return load_jsonl(path, **kwargs)


HOSTILE = {
    "nested_10000_deep": (
        b'{"question": ' + b"[" * 10_000 + b"]" * 10_000 + b', "answer": "#### 1"}',
        "too_deeply_nested",
    ),
    "nested_object_10000_deep": (
        b'{"question": "q", "answer": "#### 1", "meta": '
        + b'{"a":' * 10_000
        + b"1"
        + b"}" * 10_000
        + b"}",
        "too_deeply_nested",
    ),
    "nested_33_deep": (  # parses, but deeper than any real row
        b'{"question": "q", "answer": "#### 1", "x": ' + b"[" * 33 + b"]" * 33 + b"}",
        "too_deeply_nested",
    ),
    "question_is_an_object": (
        b'{"question": {"text": "q"}, "answer": "#### 1"}',
        "question_not_text",
    ),
    "question_is_a_list": (b'{"question": ["q"], "answer": "#### 1"}', "question_not_text"),
    "question_is_a_number": (b'{"question": 12, "answer": "#### 1"}', "question_not_text"),
    "question_is_null": (b'{"question": null, "answer": "#### 1"}', "missing_question"),
    "answer_is_an_object": (b'{"question": "q", "answer": {"a": "#### 1"}}', "answer_not_text"),
    "answer_is_a_bool": (b'{"question": "q", "answer": true}', "answer_not_text"),
    "lone_surrogate_in_question": (
        b'{"question": "a\\ud800b", "answer": "#### 1"}',
        "invalid_unicode",
    ),
    "lone_low_surrogate_in_answer": (
        b'{"question": "q", "answer": "#### 1\\udfff"}',
        "invalid_unicode",
    ),
    "lone_surrogate_in_a_key": (
        b'{"question": "q", "answer": "#### 1", "\\ud83d": 1}',
        "invalid_unicode",
    ),
    "surrogate_bytes_in_utf8": (b'{"question": "a\xed\xa0\x80", "answer": "#### 1"}', "not_utf8"),
    "huge_integer": (b'{"question": "q", "answer": ' + b"9" * 5000 + b"}", "bad_json"),
    "question_too_long": (
        json.dumps({"question": "x" * (MAX_TEXT_CHARS + 1), "answer": "#### 1"}).encode(),
        "question_too_long",
    ),
    "gold_too_long": (
        json.dumps({"question": "q", "answer": "#### " + "1" * (MAX_GOLD_CHARS + 1)}).encode(),
        "gold_too_long",
    ),
    "line_too_long": (
        json.dumps({"question": "x" * MAX_LINE_BYTES, "answer": "#### 1"}).encode(),
        "line_too_long",
    ),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_row_is_skipped_with_its_reason(tmp_path, name):
    line, reason = HOSTILE[name]
    problems, stats = _load(tmp_path, GOOD, line, GOOD)
    assert [p.uid for p in problems] == ["rows-0", "rows-2"]  # the rows around it still read
    assert stats.rows == 3 and stats.kept == 2 and dict(stats.skipped) == {reason: 1}
    assert f"{reason}: 1" in stats.summary()


def test_plain_answers_must_be_text_or_a_finite_number(tmp_path):
    rows = [
        {"question": "a", "answer": 12},
        {"question": "b", "answer": 2.5},
        {"question": "c", "answer": 27.0},
        {"question": "d", "answer": {"v": 1}},
        {"question": "e", "answer": [1]},
        {"question": "f", "answer": False},
        {"question": "g", "answer": float("inf")},
        {"question": "h", "answer": " 7 "},
    ]
    problems, stats = _load(
        tmp_path, *(json.dumps(r).encode() for r in rows), answer_format="plain"
    )
    assert [(p.question, p.gold) for p in problems] == [
        ("a", "12"),
        ("b", "2.5"),
        ("c", "27"),
        ("h", "7"),
    ]
    assert dict(stats.skipped) == {"answer_not_text": 4}


def test_null_and_duplicate_ids_get_unique_uids_by_row_position(tmp_path):
    rows = [
        {"id": None, "question": "a", "answer": "#### 1"},
        {"id": None, "question": "b", "answer": "#### 1"},
        {"id": 7, "question": "c", "answer": "#### 1"},
        {"id": "7", "question": "d", "answer": "#### 1"},  # the same uid as 7
        {"question": "e", "answer": "#### 1"},
        {"id": "rows-0", "question": "f", "answer": "#### 1"},  # row 0's position uid
        {"id": "rows-7", "question": "g", "answer": "#### 1"},  # takes row 7's position...
        {"id": ["x"], "question": "h", "answer": "#### 1"},  # ...so row 7 gets rows-7~1
        {"idx": 3, "question": "i", "answer": "#### 1"},
        {"id": True, "question": "j", "answer": "#### 1"},
        {"id": "  ", "question": "k", "answer": "#### 1"},
        {"id": "x" * 201, "question": "l", "answer": "#### 1"},
        {"id": 10**300, "question": "m", "answer": "#### 1"},  # too long as a uid
    ]
    problems, stats = _load(tmp_path, *(json.dumps(r).encode() for r in rows))
    assert [p.uid for p in problems] == [
        "rows-0",
        "rows-1",
        "7",
        "rows-3",
        "rows-4",
        "rows-5",
        "rows-7",
        "rows-7~1",
        "3",
        "rows-9",
        "rows-10",
        "rows-11",
        "rows-12",
    ]
    assert dict(stats.replaced_ids) == {"null_id": 2, "duplicate_id": 2, "bad_id": 5}
    assert "ids replaced by the row position: bad_id: 5, duplicate_id: 2" in stats.summary()


def test_a_step_across_an_epoch_boundary_never_repeats_a_problem():
    for size in range(1, 9):
        problems = [x.problem for x in synthetic_arith(size, seed=size)]
        for n in range(1, size + 1):
            stream = ProblemStream(problems, seed=n)
            steps = []
            for _ in range(3 * size):
                # every step resumes exactly from the state a checkpoint stores (as JSON)
                state = json.loads(json.dumps(stream.state()))
                step = stream.take(n)
                assert ProblemStream(problems, seed=n, **state).take(n) == step
                steps.append(step)
            assert all(len({p.uid for p in s}) == n for s in steps), (size, n)
            flat = [p.uid for s in steps for p in s]
            for e in range(len(flat) // size):  # each epoch still visits every problem once
                assert sorted(flat[e * size : (e + 1) * size]) == sorted(p.uid for p in problems)


def test_a_state_written_before_deferral_resumes_the_old_order():
    problems = [x.problem for x in synthetic_arith(5, seed=0)]
    order = list(range(5))
    random.Random(2 * 1_000_003 + 3).shuffle(order)
    stream = ProblemStream(problems, seed=2, **{"epoch": 3, "index": 2})  # no "deferred"
    assert stream.take(3) == [problems[i] for i in order[2:]]


def test_a_step_larger_than_the_data_is_refused():
    problems = [x.problem for x in synthetic_arith(3, seed=0)]
    with pytest.raises(ValueError, match="4 problems from 3 would repeat"):
        ProblemStream(problems, seed=0).take(4)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(hostile_lines(), min_size=1, max_size=6),
    st.sampled_from([("question", "gsm8k"), ("question", "plain"), ("problem", "plain")]),
)
def test_any_file_with_one_good_row_loads_and_counts_every_row(tmp_path_factory, lines, keys):
    question_key, fmt = keys
    path = tmp_path_factory.getbasetemp() / "property_rows.jsonl"
    good = json.dumps({question_key: "ok?", "answer": "#### 3"}).encode()
    path.write_bytes(b"\n".join([*lines, good]) + b"\n")
    problems, stats = load_jsonl(path, question_key, answer_format=fmt)
    assert stats.rows == len(lines) + 1
    assert stats.kept + sum(stats.skipped.values()) == stats.rows
    assert problems[-1].question == "ok?" and len(problems) == stats.kept
    assert len({p.uid for p in problems}) == len(problems)
    for p in problems:
        assert all(
            isinstance(t, str) and t and valid_unicode(t) for t in (p.uid, p.question, p.gold)
        )
        assert len(p.question) <= MAX_TEXT_CHARS and len(p.gold) <= MAX_GOLD_CHARS
