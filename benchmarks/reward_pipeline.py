"""Reward-pipeline benchmark: one step's CPU reward math on ONE core.

4,096 responses (groups of 8) × 8 critiques × 512 tokens, timed per stage:
critique parsing (realistic critique texts, fixed seed) → packing the parsed
critiques into flags → vote_batch → token_rewards_batch → compute_advantages.
Goal: the whole pipeline in ≤ 1 s. Run: `python -m benchmarks.reward_pipeline`.

Reported beside it, NOT in the goal: the per-response token → step map
(split_steps + token_char_offsets + token_steps) on real MATH solutions cut to
512 tokens of an in-process byte-level BPE tokenizer (`--no-token-map` skips it).
"""

from __future__ import annotations

import argparse
import random
import time

from benchmarks._common import pin_one_core, report

CORE = pin_one_core()  # before numpy/torch create their thread pools

import numpy as np  # noqa: E402
import torch  # noqa: E402

from capo_dist.rewards.advantages import compute_advantages  # noqa: E402
from capo_dist.rewards.capo import token_rewards_batch  # noqa: E402
from capo_dist.rewards.critique import parse_critique  # noqa: E402
from capo_dist.rewards.steps import split_steps, token_char_offsets, token_steps  # noqa: E402
from capo_dist.rewards.voting import stack_critiques, vote_batch  # noqa: E402

_VERDICT_OK = [
    "This is correct.",
    "The arithmetic checks out.",
    "Correct: the substitution is valid.",
    "This step follows from the previous one.",
]
_VERDICT_BAD = [
    "This is wrong: 3 × 4 is 12, not 14.",
    "Incorrect — the sign of the second term is flipped.",
    "This step divides by zero when x = 2, so it is invalid.",
    "Wrong: the claim does not follow from Step {p}.",
]
_LABELS = ["Wrong step list: ", "**Wrong step list:** ", "Wrong Step List: ", "wrong step list:"]


def make_critique(rng: random.Random, num_steps: int) -> str:
    """A realistic judge critique of a response with `num_steps` steps."""
    wrong = sorted(rng.sample(range(num_steps), k=min(num_steps, rng.choice([0, 0, 1, 1, 2, 3]))))
    lines = ["Let me check the solution step by step.", ""]
    for s in range(num_steps):
        verdict = rng.choice(_VERDICT_BAD if s in wrong else _VERDICT_OK)
        lines.append(f"Step {s}: {verdict.format(p=max(s - 1, 0))}")
    lines.append("")
    roll = rng.random()
    if roll < 0.03:  # invalid: no list at all
        lines.append("Overall the solution has some problems.")
        return "\n".join(lines)
    if roll < 0.05:  # an out-of-range index, dropped and counted
        wrong = [*wrong, num_steps + 3]
    sep = rng.choice([", ", ","])
    lines.append(rng.choice(_LABELS) + "[" + sep.join(map(str, wrong)) + "]")
    return "\n".join(lines)


def build_inputs(b: int, n: int, t: int, group: int, seed: int):
    rng = random.Random(seed)
    num_steps = [rng.randint(3, 16) for _ in range(b)]
    critiques = [[make_critique(rng, s) for _ in range(n)] for s in num_steps]
    lengths = torch.tensor([rng.randint(t // 2, t) for _ in range(b)])
    mask = (torch.arange(t)[None, :] < lengths[:, None]).float()
    g = torch.Generator().manual_seed(seed)
    s_max = max(num_steps)
    # Each token's step: sorted uniform positions in [0, S_b); -1 on padding.
    u = torch.rand(b, t, generator=g).sort(dim=1).values
    token_steps = (u * torch.tensor(num_steps)[:, None]).long()
    token_steps = torch.where(mask > 0, token_steps, -1)
    correct = torch.rand(b, generator=g) < 0.5
    group_ids = torch.arange(b) // group
    return num_steps, s_max, critiques, token_steps, mask, correct, group_ids


def run_once(inputs) -> tuple[dict[str, float], dict[str, float]]:
    num_steps, s_max, critiques, token_steps, mask, correct, group_ids = inputs
    t = {}
    t0 = time.perf_counter()
    parsed = [
        [parse_critique(c, s) for c in crits] for crits, s in zip(critiques, num_steps, strict=True)
    ]
    t["parse"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    flags, valid = stack_critiques([[p.wrong for p in row] for row in parsed], num_steps=s_max)
    t["pack"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    weights = vote_batch(flags, valid, "majority")
    t["vote_batch"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rewards = token_rewards_batch(correct, token_steps, torch.from_numpy(weights), mask)
    t["token_rewards_batch"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    adv = compute_advantages(rewards, mask, group_ids, mode="group_token")
    t["compute_advantages"] = time.perf_counter() - t0

    facts = {
        "invalid_rate": float(1 - valid.mean()),
        "dropped": float(sum(p.dropped for row in parsed for p in row)),
        "penalised_token_rate": float(((rewards < 2 * correct[:, None]) * mask).sum() / mask.sum()),
        "adv_abs_mean": float((adv.abs() * mask).sum() / mask.sum()),
    }
    return t, facts


def time_token_map(b: int, t: int) -> float | None:
    """Seconds to map b responses of t generated tokens to their steps."""
    import json
    import tempfile
    from pathlib import Path

    from transformers import AutoTokenizer

    from capo_dist.models import train_tokenizer

    path = Path(__file__).resolve().parents[1].parent / "shared/data/solutions/math_cot_100.jsonl"
    if not path.exists():
        return None
    texts = [s for line in path.open() for s in json.loads(line)["code"]]
    with tempfile.TemporaryDirectory() as d:
        train_tokenizer(texts, 4096, d)
        tok = AutoTokenizer.from_pretrained(d)
    ids = [tok.encode(s, add_special_tokens=False)[: t - 1] + [tok.eos_token_id] for s in texts]
    ids = [ids[i % len(ids)] for i in range(b)]
    decoded = [tok.decode(x, skip_special_tokens=True) for x in ids]  # the sampler's text
    t0 = time.perf_counter()
    for x, text in zip(ids, decoded, strict=True):
        token_steps(token_char_offsets(tok, x), split_steps(text))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--responses", type=int, default=4096)
    ap.add_argument("--critiques", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-token-map", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)

    inputs = build_inputs(args.responses, args.critiques, args.tokens, args.group, args.seed)
    runs = [run_once(inputs) for _ in range(args.repeats)]
    stages = list(runs[0][0])
    best = {k: min(r[0][k] for r in runs) for k in stages}  # best of `repeats`
    total = sum(best.values())
    facts = runs[0][1]
    token_map = None if args.no_token_map else time_token_map(args.responses, args.tokens)
    chars = sum(len(c) for crits in inputs[2] for c in crits)

    rows = [
        (
            "shape",
            f"{args.responses} responses × {args.critiques} critiques × {args.tokens} tokens",
        ),
        ("core", f"{CORE} (torch threads {torch.get_num_threads()}), best of {args.repeats}"),
        ("critique text", f"{chars / 1e6:.1f} MB, {facts['invalid_rate']:.1%} invalid"),
    ]
    rows += [(k, f"{v * 1e3:8.1f} ms") for k, v in best.items()]
    rows += [
        ("total", f"{total * 1e3:8.1f} ms  (goal ≤ 1000 ms)"),
        ("responses/s", f"{args.responses / total:,.0f}"),
    ]
    if token_map is not None:
        rows.append(("token→step map (extra)", f"{token_map * 1e3:8.1f} ms  (not in the goal)"))
    report(
        "reward_pipeline",
        rows,
        {
            "responses_per_s": round(args.responses / total, 1),
            "seconds": round(total, 4),
            "goal_seconds": 1.0,
            **{f"{k}_s": round(v, 4) for k, v in best.items()},
            "token_map_extra_s": None if token_map is None else round(token_map, 4),
            "responses": args.responses,
            "critiques": args.critiques,
            "tokens": args.tokens,
            "threads": 1,
            "numpy": np.__version__,
            "torch": torch.__version__,
        },
    )


if __name__ == "__main__":
    main()
