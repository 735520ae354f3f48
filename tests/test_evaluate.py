"""Benchmark evaluation: loading the shared benchmark files, scoring, and the tables written.

Scoring is checked for correctness, not only plumbing: gold solutions fed to the
verifier as responses must score 100 %, mismatched ones (each response against
the next problem's gold) near 0 %, and a scripted engine with a known pattern of
right and wrong samples must give exactly the expected pass@1 / mean@k / pass@k.
A real tiny Llama behind the Hugging Face engine runs the whole path, CLI included.
"""

from __future__ import annotations

import json
import random
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capo_dist.data import MAX_GOLD_CHARS, MAX_TEXT_CHARS, valid_unicode
from capo_dist.evaluate import evaluate_engine, load_bench
from capo_dist.models import build_tiny_model
from capo_dist.rewards.verifier import Verifier
from capo_dist.types import Completion, Problem, SamplingSpec
from tests.json_rows import hostile_lines
from tests.runs import REPO, readme_argv

BENCHES = {  # name: (path under shared/data, rows: all usable)
    "aime24": ("bench/aime24/test.jsonl", 30),
    "amc23": ("bench/amc23/test.jsonl", 40),
    "minerva_math": ("bench/minerva_math/test.jsonl", 272),
    "olympiadbench": ("bench/olympiadbench/test.jsonl", 675),
    "gsm8k": ("gsm8k/test.jsonl", 1319),
}


@pytest.fixture(scope="module")
def verifier():
    with Verifier(timeout_s=2.0) as v:
        yield v


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("name", list(BENCHES))
def test_load_bench_counts_and_golds(shared_data: Path, name: str):
    rel, count = BENCHES[name]
    problems, stats = load_bench(shared_data / rel, name)
    assert (stats.rows, stats.kept, sum(stats.skipped.values())) == (count, count, 0)
    assert len(problems) == count and len({p.uid for p in problems}) == count
    assert all(p.question and p.gold and p.uid.startswith(f"{name}-") for p in problems)


def test_load_bench_known_golds(shared_data: Path):
    golds = {
        name: [p.gold for p in load_bench(shared_data / rel, name)[0][:3]]
        for name, (rel, _) in BENCHES.items()
    }
    assert golds["aime24"] == ["204", "113", "371"]
    assert golds["amc23"] == ["27", "36", "45"]  # 27.0 in the file
    assert golds["minerva_math"] == ["1.6", "4.5e33", "41.8"]  # from the solution's \boxed{}
    assert golds["olympiadbench"] == ["2", "$\\frac{1}{2 n+2}$", "$2^{1009}$"]  # final_answer[0]
    assert golds["gsm8k"] == ["18", "3", "70000"]  # after '####'


def test_load_bench_formats_and_bad_rows(tmp_path: Path):
    rows = [
        {"id": 1, "question": "Q1", "final_answer": "['$3$', '$4$']"},  # string repr of a list
        {"id": 2, "question": "Q2", "final_answer": '["7"]'},  # JSON list as a string
        {
            "id": 3,
            "question": "Q3",
            "final_answer": "['__import__(\"os\")' + 'x']",
        },  # not a literal
        {"id": 4, "problem": "Q4", "answer": "She has 2.\n#### 1,000"},
        {"id": 5, "problem": "Q5", "solution": "So $x=\\boxed{\\frac{1}{2}}$."},
        {"id": 6, "problem": "Q6", "solution": "No box here."},
        {"id": 7, "problem": "", "answer": "1"},
        {"id": 8, "problem": "Q8"},
        {"id": 9, "problem": "Q9", "answer": 2.5, "context": "Context first."},
        "not an object",
    ]
    path = tmp_path / "b.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n\n")
    problems, stats = load_bench(path, "b")
    assert [(p.uid, p.gold) for p in problems] == [
        ("b-1", "$3$, $4$"),
        ("b-2", "7"),
        ("b-4", "1000"),
        ("b-5", "\\frac{1}{2}"),
        ("b-9", "2.5"),
    ]
    assert problems[-1].question == "Context first.\n\nQ9"
    assert stats.rows == 11 and stats.kept == 5
    assert dict(stats.skipped) == {
        "bad_final_answer": 1,
        "no_boxed_in_solution": 1,
        "no_question": 1,
        "no_gold_key": 1,
        "not_an_object": 1,
        "bad_json": 1,
    }


BENCH_HOSTILE = {
    "nested_10000_deep": (
        b'{"problem": "q", "final_answer": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
        "too_deeply_nested",
    ),
    "repr_nested_5000_deep": (  # json.loads of the repr recursed past the limit
        json.dumps({"problem": "q", "final_answer": "[" * 5000}).encode(),
        "bad_final_answer",
    ),
    "repr_of_a_nested_list": (
        json.dumps({"problem": "q", "final_answer": '[[["7"]]]'}).encode(),
        "bad_final_answer",
    ),
    "repr_of_a_lone_surrogate": (
        json.dumps({"problem": "q", "final_answer": "['\\ud800']"}).encode(),
        "invalid_unicode",
    ),
    "lone_surrogate_in_problem": (
        b'{"problem": "a\\udc00", "answer": "3"}',
        "invalid_unicode",
    ),
    "huge_integer_answer": (b'{"problem": "q", "answer": ' + b"9" * 5000 + b"}", "bad_json"),
    "problem_is_an_object": (b'{"problem": {"t": "q"}, "answer": "3"}', "problem_not_text"),
    "question_is_a_list": (b'{"question": ["q"], "answer": "3"}', "question_not_text"),
    "context_is_an_object": (
        b'{"problem": "q", "context": {"c": 1}, "answer": "3"}',
        "context_not_text",
    ),
    "nested_list_answer": (b'{"problem": "q", "answer": [[3]]}', "bad_answer"),
    "solution_too_long": (
        json.dumps({"problem": "q", "solution": "\\boxed{1}" * MAX_TEXT_CHARS}).encode(),
        "solution_too_long",
    ),
    "gold_too_long": (
        json.dumps({"problem": "q", "answer": "7" * (MAX_GOLD_CHARS + 1)}).encode(),
        "gold_too_long",
    ),
}


@pytest.mark.parametrize("name", list(BENCH_HOSTILE))
def test_load_bench_skips_a_hostile_row_with_its_reason(tmp_path: Path, name: str):
    line, reason = BENCH_HOSTILE[name]
    good = json.dumps({"id": 1, "problem": "ok?", "answer": "3"}).encode()
    path = tmp_path / "b.jsonl"
    path.write_bytes(b"\n".join([good, line, good]) + b"\n")
    problems, stats = load_bench(path, "b")
    assert [p.uid for p in problems] == ["b-1", "b-2"]  # the second id 1 is a duplicate
    assert stats.rows == 3 and stats.kept == 2 and dict(stats.skipped) == {reason: 1}
    assert dict(stats.replaced_ids) == {"duplicate_id": 1}


def test_load_bench_uids_are_unique(tmp_path: Path):
    rows = [
        {"id": None, "problem": "a", "answer": "1"},
        {"id": None, "problem": "b", "answer": "1"},
        {"id": 0, "problem": "c", "answer": "1"},  # the position uid of row 0
        {"problem": "d", "answer": "1"},
        {"idx": 3, "problem": "e", "answer": "1"},  # row 3's position uid
        {"id": {"x": 1}, "problem": "f", "answer": "1"},
    ]
    path = tmp_path / "b.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    problems, stats = load_bench(path, "b")
    assert [p.uid for p in problems] == ["b-0", "b-1", "b-2", "b-3", "b-4", "b-5"]
    assert dict(stats.replaced_ids) == {"null_id": 2, "duplicate_id": 2, "bad_id": 1}


@settings(max_examples=150, deadline=None)
@given(st.lists(hostile_lines(), min_size=1, max_size=6))
def test_any_bench_file_with_one_good_row_loads_and_counts_every_row(tmp_path_factory, lines):
    path = tmp_path_factory.getbasetemp() / "property_bench.jsonl"
    good = json.dumps({"problem": "ok?", "final_answer": ["$3$"]}).encode()
    path.write_bytes(b"\n".join([*lines, good]) + b"\n")
    problems, stats = load_bench(path, "b")
    assert stats.rows == len(lines) + 1
    assert stats.kept + sum(stats.skipped.values()) == stats.rows == len(lines) + 1
    assert (problems[-1].question, problems[-1].gold) == ("ok?", "$3$")
    assert len({p.uid for p in problems}) == len(problems) == stats.kept
    for p in problems:
        assert all(
            isinstance(t, str) and t and valid_unicode(t) for t in (p.uid, p.question, p.gold)
        )
        assert len(p.gold) <= MAX_GOLD_CHARS


def test_gold_solutions_score_100_percent(shared_data: Path, verifier: Verifier):
    """The datasets' own solutions, scored as responses, are all right; shuffled, nearly none."""
    for rel, key in (("gsm8k/test.jsonl", "answer"), ("bench/minerva_math/test.jsonl", "solution")):
        problems, _ = load_bench(shared_data / rel, "x")
        responses = [r[key] for r in _rows(shared_data / rel)]
        golds = [p.gold for p in problems]
        assert all(verifier.check_many(responses, golds)), rel
        if key == "answer":  # numbers only: decided in-process, fast (Minerva's go to sympy)
            shifted = verifier.check_many(responses, golds[1:] + golds[:1])
            assert sum(shifted) / len(shifted) < 0.02  # only coincidentally equal answers
    for name in ("aime24", "amc23", "olympiadbench"):
        problems, _ = load_bench(shared_data / BENCHES[name][0], name)
        responses = [f"Step one.\n\nSo the answer is $\\boxed{{{p.gold}}}$." for p in problems]
        assert all(verifier.check_many(responses, [p.gold for p in problems])), name
    # Equivalent forms of the same answer count: AIME '025' vs 25, AMC 27.0 vs '27'.
    assert verifier.check_many(["\\boxed{25}", "The answer is 27.0."], ["025", "27"]) == [
        True,
        True,
    ]


class _CharTokenizer:
    """Characters as token ids: enough of a tokenizer for the scripted engine."""

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return "".join(map(chr, ids))


class _ScriptedEngine:
    """A `GenerationEngine` that answers from a script: sample j of problem i is right iff
    `pattern(i, j)`; the greedy answer (temperature 0) is right iff i is even. Completion j
    has j + 1 tokens; problem 0's completions are cut at the length limit."""

    def __init__(self, problems: Sequence[Problem], pattern) -> None:
        self.by_question = {p.question: (i, p) for i, p in enumerate(problems)}
        self.pattern = pattern
        self.calls: list[tuple[int, SamplingSpec]] = []

    def tokenizer(self) -> _CharTokenizer:
        return _CharTokenizer()

    def generate(self, prompts, spec: SamplingSpec) -> list[list[Completion]]:
        self.calls.append((len(prompts), spec))
        out = []
        for ids in prompts:
            question = "".join(map(chr, ids)).removeprefix("Q: ")
            i, p = self.by_question[question]
            if spec.temperature == 0:  # greedy: n copies, as the real engines do
                right = [i % 2 == 0] * spec.n
            else:
                right = [self.pattern(i, j) for j in range(spec.n)]
            answers = [p.gold if ok else f"{p.gold}1" for ok in right]
            finish = "length" if i == 0 else "stop"
            out.append(
                [
                    Completion([1] * (j + 1), f"So \\boxed{{{a}}}.", [], finish)
                    for j, a in enumerate(answers)
                ]
            )
        return out


def test_scores_are_exact_on_a_scripted_engine(shared_data: Path, verifier: Verifier):
    problems = load_bench(shared_data / "gsm8k/test.jsonl", "gsm8k")[0][:6]
    engine = _ScriptedEngine(problems, pattern=lambda i, j: j < i % 4)  # 0,1,2,3,0,1 of 3 right
    result = evaluate_engine(
        engine,
        {"gsm8k": problems},
        k=3,
        temperature=0.7,
        max_new_tokens=64,
        prompt_template="Q: {question}",
        batch_size=4,
        verifier=verifier,
    )
    (s,) = result.scores
    assert (s.problems, s.k) == (6, 3)
    assert s.pass_at_1 == pytest.approx(3 / 6)  # greedy right on even i
    assert s.mean_at_k == pytest.approx((0 + 1 + 2 + 3 + 0 + 1) / 18)
    assert s.pass_at_k == pytest.approx(4 / 6)
    assert s.truncated == pytest.approx(1 / 6) and s.no_answer == 0
    assert s.mean_tokens == pytest.approx(2.0)  # samples have 1, 2, 3 tokens
    # Two passes (sampled, greedy), each in batches of at most 4 prompts.
    assert [(n, sp.n, sp.temperature) for n, sp in engine.calls] == [
        (4, 3, 0.7),
        (2, 3, 0.7),
        (4, 1, 0.0),
        (2, 1, 0.0),
    ]
    assert result.as_metrics() == {
        "eval/gsm8k/pass@1": s.pass_at_1,
        "eval/gsm8k/mean@3": s.mean_at_k,
        "eval/gsm8k/pass@3": s.pass_at_k,
    }
    assert [r["greedy"]["correct"] for r in result.samples] == [True, False] * 3
    # At temperature 0 the k samples are the greedy completion: one pass only.
    engine.calls.clear()
    result = evaluate_engine(
        engine,
        {"g": problems},
        k=2,
        temperature=0.0,
        prompt_template="Q: {question}",
        verifier=verifier,
    )
    assert len(engine.calls) == 1 and result.scores[0].pass_at_1 == 0.5


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model runs fastest on one thread (and does not fight other tests for cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    rng = random.Random(0)
    corpus = []
    for _ in range(200):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        corpus.append(
            f"What is {a} + {b}?\n\n{a} + {b} = {a + b}.\n\nThe answer is \\boxed{{{a + b}}}."
        )
    return str(build_tiny_model(tmp_path_factory.mktemp("eval") / "tiny", corpus))


def test_evaluate_engine_with_hf_engine_writes_tables(
    shared_data: Path, tiny_model: str, tmp_path: Path, verifier: Verifier
):
    from capo_dist.engines import make_engine

    engine = make_engine("hf", tiny_model, seed=0)
    benches = {
        "gsm8k": load_bench(shared_data / "gsm8k/test.jsonl", "gsm8k")[0][:3],
        "amc23": load_bench(shared_data / "bench/amc23/test.jsonl", "amc23")[0][:2],
    }
    result = evaluate_engine(
        engine, benches, k=2, temperature=1.0, max_new_tokens=12, verifier=verifier
    )
    result.model = tiny_model
    result.write(tmp_path)
    table = json.loads((tmp_path / "eval.json").read_text())
    assert [b["name"] for b in table["benches"]] == ["gsm8k", "amc23"]
    for b in table["benches"]:
        assert b["k"] == 2 and 0 <= b["mean_at_k"] <= b["pass_at_k"] <= 1
        assert 0 < b["mean_tokens"] <= 12
    assert table["settings"]["temperature"] == 1.0 and set(table["average"]) == {
        "pass_at_1",
        "mean_at_k",
        "pass_at_k",
    }
    md = (tmp_path / "eval.md").read_text().splitlines()
    assert md[4].startswith("| bench | problems | pass@1 | mean@2 | pass@2 |")
    assert md[6].startswith("| gsm8k | 3 |") and md[7].startswith("| amc23 | 2 |")
    assert md[8].startswith("| **average** |")
    samples = [json.loads(x) for x in (tmp_path / "eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 5 and all(len(s["samples"]) == 2 for s in samples)


README_EVAL = (
    "python -m capo_dist.evaluate --model DIR --backend vllm --bench "
    "gsm8k=../shared/data/gsm8k/test.jsonl --bench ../shared/data/bench/aime24/test.jsonl "
    "--k 4 --temperature 0.6 --max-new-tokens 3000 --out evals/step500"
)


def test_cli(shared_data: Path, tiny_model: str, tmp_path: Path):
    """The README's evaluation command (DIR = a tiny model), from the repo root, with quick
    flags appended and one more bench holding a row without a gold answer. `--backend hf`
    among them: vLLM's engine start costs ~40 s more here (tests/engines test that engine)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "What is 1 + 1?", "answer": 2}\n{"problem": "no gold"}\n')
    out = tmp_path / "out"
    quick = ["--k", "2", "--max-new-tokens", "6", "--limit", "2", "--out", str(out)]
    quick += ["--backend", "hf"]
    argv = readme_argv(README_EVAL.replace("DIR", tiny_model), "--bench", f"tiny={bad}", *quick)
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    table = json.loads((out / "eval.json").read_text())
    # aime24 is named after its folder
    assert table["skipped"] == {"gsm8k": {}, "aime24": {}, "tiny": {"no_gold_key": 1}}
    assert table["model"] == tiny_model and table["settings"]["temperature"] == 0.6
    md = (out / "eval.md").read_text()
    assert "| gsm8k | 2 |" in md and "| aime24 | 2 |" in md and "| tiny | 1 |" in md
