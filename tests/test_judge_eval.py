"""`python -m capo_dist.judge_eval`: checked against arithmetic truth (the noisy symbolic
judge's rates are known in closed form), on a ProcessBench-format file by path, through an
OpenAI-compatible endpoint with the JSON prompt, and the README's line as written."""

from __future__ import annotations

import json
import math
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from capo_dist.judge_eval import evaluate, expected_rates, generated_solutions, main
from capo_dist.judge_health import DownDetector
from capo_dist.judge_prompt import load_judge_prompt
from capo_dist.judge_worker import HttpBackend, StepCheckerBackend
from tests.runs import REPO, readme_argv

README_JUDGE_EVAL = "python -m capo_dist.judge_eval --backend symbolic --flip-prob 0.2 --num-critiques 4 --out outputs/judge_eval/symbolic.json"


def _binomial_tail(n: int, q: float, k_min: int) -> float:
    """P(Binomial(n, q) >= k_min)."""
    return sum(math.comb(n, k) * q**k * (1 - q) ** (n - k) for k in range(k_min, n + 1))


def test_noisy_symbolic_judge_matches_the_binomial_formulas():
    """Each of the N critiques flips each step's verdict with probability p independently,
    so a wrong step is flagged by Binomial(N, 1-p) critiques and a right one by
    Binomial(N, p). Intersection: recall (1-p)^N, FPR p^N; union: 1-p^N, 1-(1-p)^N;
    majority (voting.py: strictly more than half of the valid critiques, a tie is not
    wrong): the tail from N//2+1; average at weight >= 0.5: the tail from ceil(N/2) (a tie
    is wrong). Every measured rate is within 4 standard errors of its formula."""
    p = 0.3
    solutions = generated_solutions(3000, seed=1, flaw_rate=1.0)
    prompt = load_judge_prompt("capo")
    closed_form = {
        "intersection": lambda n: ((1 - p) ** n, p**n),
        "union": lambda n: (1 - p**n, 1 - (1 - p) ** n),
        "majority": lambda n: (
            _binomial_tail(n, 1 - p, n // 2 + 1),
            _binomial_tail(n, p, n // 2 + 1),
        ),
        "average": lambda n: (
            _binomial_tail(n, 1 - p, math.ceil(n / 2)),
            _binomial_tail(n, p, math.ceil(n / 2)),
        ),
    }
    for n in (1, 3, 4):
        figures = evaluate(
            StepCheckerBackend(p, seed=n), prompt, solutions, n, DownDetector(64, 300, "test")
        )
        assert figures["invalid_rate"] == 0 and figures["abstain_rate"] == 0
        for mode, scores in figures["votes"].items():
            c = scores.counts
            recall, fpr = closed_form[mode](n)
            assert expected_rates(mode, n, p) == pytest.approx((recall, fpr))
            assert c["tp"] + c["fn"] > 3000 and c["fp"] + c["tn"] > 6000  # the sample
            for measured, expected, size in (
                (scores.recall, recall, c["tp"] + c["fn"]),
                (scores.false_positive_rate, fpr, c["fp"] + c["tn"]),
            ):
                bound = 4 * math.sqrt(expected * (1 - expected) / size) + 1e-9
                assert abs(measured - expected) <= bound, (mode, n, measured, expected, bound)


def _write_processbench(path: Path) -> None:
    """Hand-labelled rows in ProcessBench's format, and rows that must be skipped."""
    rows = [
        # first error at step 1 (4 * 3 is 12); step 2 follows from it: unlabelled
        {
            "problem": "Ava has 2 + 2 apples and gets three times as many. Minus 1?",
            "steps": ["2 + 2 = 4.", "4 * 3 = 13.", "13 - 1 = 12."],
            "label": 1,
        },
        {"problem": "What is 3 * 3?", "steps": ["3 * 3 = 9.", "The answer is 9."], "label": -1},
        # a wrong step the arithmetic checker cannot see (a misread problem); step 1 unlabelled
        {
            "problem": "Ben has 5 pens and loses 2. How many?",
            "steps": ["Ben has 5 pens and gains 2.", "5 + 2 = 7."],
            "label": 0,
        },
        # two wrong steps: the first error is the first of them
        {"problem": "What is 2 + 2 + 1?", "steps": ["2 + 2 = 5.", "5 + 1 = 7."], "label": 0},
        {"problem": "p", "steps": ["1 + 1 = 2."], "label": 1},  # label past the last step
        {"problem": "p", "steps": "1 + 1 = 2.", "label": -1},  # steps not a list
        {"problem": "p", "steps": ["1 + 1 = 2."], "label": True},  # a bool is not a label
        {"steps": ["1 + 1 = 2."], "label": -1},  # no problem
        {"problem": "p", "steps": [1], "label": -1},  # a step that is not text
    ]
    text = "\n".join(json.dumps(r) for r in rows) + '\n{"problem": "cut off\n[1, 2]\n'
    path.write_text(text)


def test_processbench_file_by_path(tmp_path: Path, capsys):
    data = tmp_path / "processbench.jsonl"
    _write_processbench(data)
    out = tmp_path / "figures.json"
    assert main(["--data", str(data), "--num-critiques", "2", "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["data"]["solutions"] == 4 and got["data"]["erroneous"] == 3
    assert got["data"]["labelled_steps"] == 6 and got["data"]["unlabelled_steps"] == 3
    assert got["data"]["skipped"] == {
        "label_out_of_range": 1,
        "steps_not_a_list": 1,
        "label_not_an_integer": 1,
        "missing_problem": 1,
        "step_not_text": 1,
        "bad_json": 1,
        "not_an_object": 1,
    }
    for mode, s in got["votes"].items():  # an exact judge: every vote is the same
        assert s["counts"] == {"tp": 2, "fp": 0, "fn": 1, "tn": 3, "erroneous": 3, "correct": 1}
        assert (s["precision"], s["recall"], s["false_positive_rate"]) == (1.0, 2 / 3, 0.0)
        assert s["first_error_acc_erroneous"] == 2 / 3 and s["first_error_acc_correct"] == 1.0
        assert s["processbench_f1"] == pytest.approx(0.8), mode
    table = capsys.readouterr().out
    assert "3 steps after a first error are unlabelled and left out" in table
    assert "| intersection | 100.0 | 66.7 | 80.0 | 0.0 | 66.7 | 100.0 | 80.0 |" in table


class _JsonJudge:
    """A loopback OpenAI-compatible chat endpoint: every critique says step 1 is wrong, as a
    JSON object, and the usage counts 100 prompt and 10 completion tokens per choice."""

    def __init__(self):
        self.prompts: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.prompts.append(body["messages"][-1]["content"])
                n = int(body.get("n", 1))
                reply = {
                    "choices": [
                        {"index": i, "message": {"content": 'Step 1 is off.\n{"wrong_steps": [1]}'}}
                        for i in range(n)
                    ],
                    "usage": {"prompt_tokens": 100, "completion_tokens": 10 * n},
                }
                payload = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()


def test_openai_judge_with_the_json_prompt(tmp_path: Path):
    """The configured prompt is what the endpoint reads, and its parser reads the replies."""
    data = tmp_path / "processbench.jsonl"
    _write_processbench(data)
    out = tmp_path / "figures.json"
    judge = _JsonJudge()
    try:
        argv = ["--data", str(data), "--backend", "openai", "--base-url", judge.url]
        argv += ["--model", "judge", "--prompt", "json", "--num-critiques", "3", "--out", str(out)]
        assert main(argv) == 0
    finally:
        judge.server.shutdown()
    assert len(judge.prompts) == 4  # one request of n=3 per solution
    # Requests run concurrently (judge.max_concurrency): their arrival order is not the rows'.
    assert all('{"wrong_steps": []}' in p for p in judge.prompts)
    assert any("Step 1: 4 * 3 = 13." in p for p in judge.prompts)
    got = json.loads(out.read_text())
    assert got["invalid_rate"] == 0.0 and got["judge"]["parser"] == "json"
    # step 1 flagged everywhere: wrong in row 0, right in row 1, unlabelled in rows 2 and 3
    assert got["votes"]["majority"]["counts"] == {
        "tp": 1,
        "fp": 1,
        "fn": 2,
        "tn": 2,
        "erroneous": 3,
        "correct": 1,
    }
    if hasattr(HttpBackend, "token_counts"):  # backends that count the endpoint's usage
        assert got["judge_tokens_per_solution"] == 100 + 3 * 10
    else:
        assert got["judge_tokens_per_solution"] is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--prompt", "first_error"], "judge.backend=symbolic always answers"),
        (["--prompt", "nope"], "judge.prompt='nope'"),
        (["--data", "/nonexistent.jsonl"], "is not a file (a ProcessBench JSONL)"),
        (["--votes", "plurality"], "--votes 'plurality'"),
        (["--backend", "hf"], "--backend hf needs --model-path"),
        (["--flip-prob", "2"], "judge.flip_prob=2.0 must be in [0, 1]"),
    ],
)
def test_bad_options_fail_before_the_judge_starts(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_readme_line_runs_as_written(tmp_path: Path):
    """The README's judge_eval line on generated arithmetic, a smaller set and --out in the
    test's directory appended (a later --out wins)."""
    out = tmp_path / "symbolic.json"
    argv = readme_argv(README_JUDGE_EVAL, "--size", "200", "--out", str(out))
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert set(got["votes"]) == {"intersection", "majority", "union", "average"}
    assert got["judge"]["num_critiques"] == 4 and got["judge"]["flip_prob"] == 0.2
    assert got["judge_tokens_per_solution"] == 0
    assert "| vote | step precision | step recall |" in proc.stdout
