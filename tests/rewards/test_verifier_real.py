"""The verifier on real data: agreement with a reference grader, GSM8K gold answers."""

from __future__ import annotations

import ast
import json

from capo_dist.rewards.answers import normalize_answer
from capo_dist.rewards.verifier import Verifier, extract_answer, is_correct

# (problem idx, sample index) → why our verdict differs from the reference grader's.
ACCEPTED_DISAGREEMENTS = {
    (72, 7): "gold '10{,}000', answer \\boxed{10000}: a correct solution; the reference "
    "grader cannot read the LaTeX thousands separator {,} and marks it wrong",
}


def _solutions(shared_data):
    rows = []
    with open(shared_data / "solutions" / "math_cot_100.jsonl") as f:
        for line in f:
            row = json.loads(line)
            code = row["code"]
            if isinstance(code, str):  # some dumps store the list as its repr
                code = ast.literal_eval(code)
            rows.append((row["idx"], code, row["gt"], row["score"]))
    return rows


def test_agreement_with_reference_grader(shared_data):
    rows = _solutions(shared_data)
    responses = [c for _, codes, _, _ in rows for c in codes]
    golds = [gt for _, codes, gt, _ in rows for _ in codes]
    keys = [(idx, j) for idx, codes, _, _ in rows for j in range(len(codes))]
    reference = [bool(s) for _, _, _, scores in rows for s in scores]
    assert len(responses) == 800 and len(reference) == 800
    with Verifier(timeout_s=3.0) as v:
        ours = v.check_many(responses, golds)
        stats = v.stats
    disagreements = {k for k, a, b in zip(keys, ours, reference, strict=True) if a != b}
    agreement = 1 - len(disagreements) / len(keys)
    assert disagreements <= set(ACCEPTED_DISAGREEMENTS), sorted(
        disagreements - set(ACCEPTED_DISAGREEMENTS)
    )
    assert agreement >= 0.995
    assert stats.timeouts == 0 and stats.errors == 0


def _gsm8k_test(shared_data):
    with open(shared_data / "gsm8k" / "test.jsonl") as f:
        return [json.loads(line)["answer"] for line in f]


def test_gsm8k_gold_answers_extract_and_verify(shared_data):
    answers = _gsm8k_test(shared_data)
    assert len(answers) == 1319
    golds = []
    for a in answers:
        after = a.split("####")[-1].strip()
        assert extract_answer(a) == normalize_answer(after), a[-80:]
        golds.append(after)
    assert all(is_correct(a, g) for a, g in zip(answers, golds, strict=True))
    with Verifier(timeout_s=3.0) as v:
        assert all(v.check_many(answers, golds))
        assert v.stats.fast_path == len(answers)  # plain numbers: no parser involved
    # and a wrong number is rejected
    with Verifier(timeout_s=3.0) as v:
        off_by_one = [str(int(float(g.replace(",", ""))) + 1) for g in golds]
        assert not any(v.check_many(answers, off_by_one))
