"""`python -m capo_dist.prepare_data`: the experiments' training file from MATH/GSM8K-style sources.

The real files of ../shared/data go through it (GSM8K train, 100 MATH problems
with their reference answers, Minerva's worked solutions), and what it writes
is read back with the experiments' own data settings
(`load_jsonl(path, "problem", "answer", "plain")`). A dataset id is resolved
through a Hugging Face cache filled by hand (hub layout, `HF_HUB_OFFLINE=1`) by
the CLI in a subprocess, as a user runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capo_dist.data import MAX_GOLD_CHARS, MAX_TEXT_CHARS, DataStats, load_jsonl, valid_unicode
from capo_dist.evaluate import load_bench
from capo_dist.prepare_data import RowFormat, main, read_source
from capo_dist.rewards.answers import normalize_answer
from tests.json_rows import hostile_lines

REPO = Path(__file__).resolve().parents[1]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _experiment_load(path: Path):
    """The training file read as the paper experiments read it."""
    return load_jsonl(path, "problem", "answer", "plain")[0]


def test_gsm8k_train(shared_data: Path, tmp_path: Path, capsys):
    src = shared_data / "gsm8k/train.jsonl"
    out = tmp_path / "math" / "train.jsonl"
    assert main(["--source", str(src), "--out", str(out)]) == 7473
    assert "7473/7473 rows kept" in capsys.readouterr().out
    written = _rows(out)
    assert all(set(r) == {"problem", "answer"} for r in written)
    problems = _experiment_load(out)
    reference = load_jsonl(src, "question", "answer", "gsm8k")[0]  # the GSM8K recipe
    assert [(p.question, p.gold) for p in problems] == [(p.question, p.gold) for p in reference]
    assert problems[0].gold == "72"  # "... #### 72"


def test_math_solutions_give_the_reference_answers(shared_data: Path, tmp_path: Path):
    src = shared_data / "solutions/math_cot_100.jsonl"
    out = tmp_path / "train.jsonl"
    assert main(["--source", str(src), "--format", "math", "--out", str(out)]) == 100
    rows = _rows(src)
    problems = _experiment_load(out)
    # The last \boxed{} of each MATH solution is exactly the dataset's own answer field.
    assert [p.gold for p in problems] == [r["answer"] for r in rows]
    assert [p.question for p in problems] == [r["question"].strip() for r in rows]


def test_minerva_solutions_and_limit(shared_data: Path, tmp_path: Path):
    src = shared_data / "bench/minerva_math/test.jsonl"
    out = tmp_path / "train.jsonl"
    assert main(["--source", str(src), "--out", str(out), "--limit", "50"]) == 50
    golds = [p.gold for p in load_bench(src, "minerva")[0][:50]]  # normalised last box
    assert [normalize_answer(p.gold) for p in _experiment_load(out)] == golds


def test_sources_concatenate(shared_data: Path, tmp_path: Path):
    out = tmp_path / "train.jsonl"
    n = main(
        [
            "--source",
            str(shared_data / "solutions/math_cot_100.jsonl"),
            "--source",
            str(shared_data / "gsm8k/train.jsonl"),
            "--out",
            str(out),
            "--limit",
            "130",
        ]
    )
    assert n == 130 and len(_experiment_load(out)) == 130
    assert _rows(out)[100]["answer"] == "72"  # the first GSM8K row follows the 100 MATH rows


def test_bad_rows_are_counted_per_reason(tmp_path: Path, capsys):
    src = tmp_path / "mixed.jsonl"
    lines = [
        {"problem": "Half of 1?", "solution": "It is $\\boxed{\\frac{1}{2}}$."},
        {"problem": "Last box?", "solution": "Not \\boxed{3} but \\boxed{4}."},
        {"question": "Sum?", "answer": "2 + 2 = 4\n#### 1,000"},
        {"problem": "No answer", "solution": "I do not know."},
        {"problem": "Unbalanced", "solution": "so \\boxed{\\frac{1}{2}"},
        {"solution": "\\boxed{1}"},
        {"problem": "  ", "solution": "\\boxed{1}"},
        {"problem": "No solution"},
        {"question": "Hash only", "answer": "####"},
        ["not", "an", "object"],
    ]
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n{bad json\n")
    out = tmp_path / "train.jsonl"
    assert main(["--source", str(src), "--out", str(out)]) == 3
    assert _rows(out) == [
        {"problem": "Half of 1?", "answer": "\\frac{1}{2}"},
        {"problem": "Last box?", "answer": "4"},
        {"problem": "Sum?", "answer": "1000"},
    ]
    summary = capsys.readouterr().out
    assert "3/11 rows kept" in summary
    for reason in (
        "bad_json: 1",
        "no_boxed_answer: 1",  # unbalanced braces
        "no_boxed_or_gsm8k_answer: 1",
        "no_gsm8k_answer: 1",
        "no_problem_or_question: 2",
        "no_solution_or_answer: 1",
        "not_an_object: 1",
    ):
        assert reason in summary
    # Explicit keys and format: the GSM8K row only.
    n = main(
        ["--source", str(src), "--format", "gsm8k", "--question-key", "question", "--out", str(out)]
    )
    assert n == 1 and _rows(out) == [{"problem": "Sum?", "answer": "1000"}]


def test_hostile_rows_are_counted_and_never_written(tmp_path: Path, capsys):
    src = tmp_path / "hostile.jsonl"
    lines = [
        json.dumps({"problem": "Fine?", "solution": "so \\boxed{2}"}).encode(),
        b'{"problem": ' + b"[" * 10_000 + b"]" * 10_000 + b', "solution": "\\\\boxed{1}"}',
        b'{"problem": "a\\ud800", "solution": "\\\\boxed{1}"}',  # a lone surrogate
        b'{"problem": "q", "solution": "\\\\boxed{1}", "n": ' + b"9" * 5000 + b"}",
        b'{"problem": {"text": "q"}, "solution": "\\\\boxed{1}"}',
        b'{"problem": "q", "solution": ["\\\\boxed{1}"]}',
        json.dumps({"problem": "x" * (MAX_TEXT_CHARS + 1), "solution": "\\boxed{1}"}).encode(),
        json.dumps(
            {"problem": "q", "solution": "\\boxed{" + "1" * (MAX_GOLD_CHARS + 1) + "}"}
        ).encode(),
        json.dumps({"question": "q", "answer": "#### " + "1" * (MAX_GOLD_CHARS + 1)}).encode(),
    ]
    src.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "train.jsonl"
    assert main(["--source", str(src), "--out", str(out)]) == 1
    assert _rows(out) == [{"problem": "Fine?", "answer": "2"}]
    summary = capsys.readouterr().out
    assert "1/9 rows kept" in summary
    for reason in (
        "too_deeply_nested: 1",
        "invalid_unicode: 1",
        "bad_json: 1",
        "problem_not_text: 1",
        "solution_not_text: 1",
        "problem_too_long: 1",
        "no_boxed_answer: 1",  # a box longer than an answer can be is no box
        "answer_too_long: 1",
    ):
        assert reason in summary


@settings(max_examples=100, deadline=None)
@given(st.lists(hostile_lines(), min_size=1, max_size=6))
def test_any_source_with_one_good_row_reads_and_counts_every_row(tmp_path_factory, lines):
    path = tmp_path_factory.getbasetemp() / "property_source.jsonl"
    good = json.dumps({"question": "ok?", "answer": "#### 3"}).encode()
    path.write_bytes(b"\n".join([*lines, good]) + b"\n")
    stats = DataStats()
    rows = list(read_source([path], RowFormat(), stats))
    assert stats.kept + sum(stats.skipped.values()) == stats.rows == len(lines) + 1
    assert rows[-1].problem == "ok?" and rows[-1].answer == "3" and len(rows) == stats.kept
    for r in rows:
        assert valid_unicode(r.problem) and valid_unicode(r.answer)
        assert len(r.problem) <= MAX_TEXT_CHARS and 0 < len(r.answer) <= MAX_GOLD_CHARS


def test_errors_leave_no_file(tmp_path: Path, capsys):
    out = tmp_path / "train.jsonl"
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"problem": "x", "solution": "no answer"}\n')
    with pytest.raises(SystemExit) as e:
        main(["--source", str(empty), "--out", str(out)])
    assert e.value.code == 2 and "no usable rows" in capsys.readouterr().err
    parquet = tmp_path / "train-00000-of-00001.parquet"
    parquet.write_bytes(b"PAR1")
    with pytest.raises(SystemExit):
        main(["--source", str(parquet), "--out", str(out)])
    err = capsys.readouterr().err
    assert "parquet, which is not supported" in err and "JSONL" in err
    with pytest.raises(SystemExit):
        main(["--source", "not a path", "--out", str(out)])
    assert "neither a file, a directory nor ORG/NAME" in capsys.readouterr().err
    assert os.listdir(tmp_path) == sorted(["empty.jsonl", parquet.name])  # nothing written


# ---------------------------------------------------------------- dataset ids


def _cache_dataset(hf_home: Path, repo_id: str, files: dict[str, str]) -> Path:
    """A dataset snapshot in the hub cache layout, as `hf download` leaves it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / f"datasets--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for name, text in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_text(text)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def _cli(hf_home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
    }
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run(
        [sys.executable, "-m", "capo_dist.prepare_data", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_dataset_id_through_the_hf_cache(shared_data: Path, tmp_path: Path, capsys):
    hf_home = tmp_path / "hf"
    gsm8k = (shared_data / "gsm8k/train.jsonl").read_text().splitlines()
    math_rows = (shared_data / "solutions/math_cot_100.jsonl").read_text().splitlines()
    snapshot = _cache_dataset(
        hf_home,
        "someorg/math-mix",
        {
            "README.md": "# a dataset card\n",
            "main/train-00000-of-00002.jsonl": "\n".join(gsm8k[:20]) + "\n",
            "main/train-00001-of-00002.jsonl": "\n".join(math_rows[:10]) + "\n",
            "main/test-00000-of-00001.jsonl": "\n".join(gsm8k[20:25]) + "\n",
            "other/train.jsonl": "\n".join(gsm8k[25:27]) + "\n",
        },
    )
    out = tmp_path / "data" / "train.jsonl"
    ok = _cli(hf_home, "--source", "someorg/math-mix/main", "--out", str(out))
    assert ok.returncode == 0, ok.stderr
    assert "30/30 rows kept" in ok.stdout
    problems = _experiment_load(out)
    assert len(problems) == 30 and problems[0].gold == "72" and problems[20].gold == "420"
    missing = _cli(hf_home, "--source", "someorg/not-cached", "--out", str(out))
    assert missing.returncode == 2
    assert "'someorg/not-cached' could not be resolved through the Hugging Face cache" in (
        missing.stderr
    )
    assert len(_experiment_load(out)) == 30  # the failed run left the file as it was
    # Splits and subsets of a snapshot (the same rules for any directory), in-process.
    assert main(["--source", str(snapshot / "main"), "--split", "test", "--out", str(out)]) == 5
    with pytest.raises(SystemExit) as e:
        main(["--source", str(snapshot), "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "split 'train' in several subsets (main, other)" in err and "ORG/NAME/main" in err
