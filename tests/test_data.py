"""Data loading: field mapping, skip-and-count of bad rows, clear errors, generated problems."""

import json

import pytest

from capo_dist.data import DataError, ProblemStream, gsm8k_gold, load_jsonl, synthetic_arith


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
    assert resumed.take(20) == stream.take(20)
