"""Verifier throughput on the 800 real MATH solutions (../shared/data/solutions).

Times `Verifier.check_many` on all 800 (solution, gold) pairs: cold (a fresh
Verifier, including its worker pool's start) and warm (pool up, result cache
off), and the symbolic path alone (all 800 normalised pairs through the
math-verify workers, as if no fast path existed). Reports agreement with the
reference grader's `score`. Run: `python -m benchmarks.verifier_throughput`.
"""

from __future__ import annotations

import argparse
import ast
import json
import time
from pathlib import Path

from benchmarks._common import report
from capo_dist.rewards.verifier import Verifier, extract_answer, gold_answer

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "solutions"


def load(path: Path) -> tuple[list[str], list[str], list[bool]]:
    responses, golds, scores = [], [], []
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            code = row["code"] if isinstance(row["code"], list) else ast.literal_eval(row["code"])
            responses += code
            golds += [row["gt"]] * len(code)
            scores += [bool(s) for s in row["score"]]
    return responses, golds, scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA / "math_cot_100.jsonl")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=2.0)
    args = ap.parse_args()
    responses, golds, scores = load(args.data)
    n = len(responses)

    t0 = time.perf_counter()
    v = Verifier(timeout_s=args.timeout, num_workers=args.workers, cache_size=0)
    ours = v.check_many(responses, golds)
    cold = time.perf_counter() - t0

    t0 = time.perf_counter()
    v.check_many(responses, golds)
    warm = time.perf_counter() - t0

    pairs = [
        (extract_answer(r) or "", gold_answer(g) or "")
        for r, g in zip(responses, golds, strict=True)
    ]
    t0 = time.perf_counter()
    v._run(pairs)  # every pair through math-verify: the worst case
    symbolic = time.perf_counter() - t0
    stats = v.stats.as_dict()
    v.close()

    agree = sum(a == b for a, b in zip(ours, scores, strict=True)) / n
    rows = [
        ("checks", f"{n} ({stats['fast_path'] // 2} fast path per pass)"),
        ("workers", f"{v.num_workers}, timeout {args.timeout} s"),
        ("cold (with pool start)", f"{cold:.3f} s = {n / cold:,.0f} checks/s"),
        ("warm", f"{warm:.3f} s = {n / warm:,.0f} checks/s"),
        ("symbolic only", f"{symbolic:.3f} s = {n / symbolic:,.0f} checks/s"),
        ("agreement with reference", f"{agree:.2%}"),
        ("timeouts / errors", f"{stats['timeouts']} / {stats['errors']}"),
    ]
    report(
        "verifier_throughput",
        rows,
        {
            "checks_per_s": round(n / warm, 1),
            "seconds": round(warm, 4),
            "cold_seconds": round(cold, 4),
            "symbolic_checks_per_s": round(n / symbolic, 1),
            "agreement": round(agree, 5),
            "checks": n,
            "workers": v.num_workers,
            "timeouts": stats["timeouts"],
            "errors": stats["errors"],
        },
    )


if __name__ == "__main__":
    main()
