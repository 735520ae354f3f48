"""How often does a judge + vote flag the steps that are really wrong, and the ones that are not?

    python -m capo_dist.judge_eval [--data PROCESSBENCH.jsonl] [--num-critiques 4]
        [--backend symbolic|vllm|hf|openai] [--prompt capo] [--flip-prob 0.2] ...
        [--out results.json]

Runs one judge backend of `capo_dist.judge_worker` in this process (no Ray
cluster) with N critiques per solution on step-labelled data, parses them with
the judge prompt's parser, and scores every vote mode of
`capo_dist.rewards.voting`. A step counts as voted wrong when its vote weight
is at least 0.5: for intersection, majority (strictly more than half of the
valid critiques) and union the weight is 0 or 1, so that is the vote itself;
for `average` (weight = the share of valid critiques flagging the step) it is
"at least half flag it" — majority with ties counted as wrong; in training the
average vote penalises by the share itself.

Figures per vote mode:

- step level, over the labelled steps: precision, recall (true positive rate)
  and F1 of "wrong", and the false positive rate;
- ProcessBench's first-error metric: the predicted first error is the smallest
  voted-wrong step (-1 if none); accuracy on the erroneous solutions (it equals
  the labelled first error), on the correct ones (it is -1), and their harmonic
  mean (ProcessBench's F1).

Per judge: the invalid rate (critiques the parser could not read, or that the
judge failed to produce), the abstain rate (solutions with no valid critique:
nothing is voted wrong there, as in training, and they stay in every figure),
and judge tokens per solution (where the backend counts them; symbolic: 0).

Data: with `--data`, a ProcessBench-format JSONL (`problem`, `steps`: a list of
strings, `label`: the index of the first wrong step, or -1), read by
`capo_dist.data`'s bounded reader (bad rows skipped and counted). Only the first
error is labelled there: the steps after it are excluded from the step-level
figures (the output says how many). Without `--data`, generated arithmetic
problems (`capo_dist.data.synthetic_arith`) with solutions corrupted at known
places (`capo_dist.warmstart.corrupt_solution`) and every step labelled exactly
by the step checker (`capo_dist.step_checker.check_step`: wrong unless CORRECT).
Output: a Markdown table on stdout, the figures as JSON in `--out`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capo_dist.config import ConfigError, JudgeConfig, RunConfig, validate
from capo_dist.data import MAX_TEXT_CHARS, DataStats, jsonl_objects, synthetic_arith, text_field
from capo_dist.judge_health import DownDetector, JudgeDownError, judge_label
from capo_dist.judge_prompt import JudgePrompt, load_judge_prompt
from capo_dist.judge_worker import (
    EngineBackend,
    HttpBackend,
    JudgeBackend,
    JudgeRequest,
    StepCheckerBackend,
    critique_all,
)
from capo_dist.rewards.critique import ParsedCritique
from capo_dist.rewards.critique_parsers import get_parser
from capo_dist.rewards.voting import VOTE_MODES, vote
from capo_dist.step_checker import Verdict, check_step

# A vote weight at or above this marks a step voted wrong (see the module doc).
WRONG_AT = 0.5
# The most steps of one ProcessBench row (its longest solutions have ~60).
MAX_STEPS = 256
# Solutions whose critiques the JSON output shows.
EXAMPLES = 3


@dataclass(frozen=True)
class LabelledSolution:
    """A solution with per-step labels: True wrong, False right, None not labelled
    (ProcessBench labels nothing after the first error); `first_error` -1: none."""

    problem: str
    reference: str | None
    steps: list[str]
    labels: list[bool | None]
    first_error: int


def generated_solutions(size: int, seed: int, flaw_rate: float = 0.5) -> list[LabelledSolution]:
    """`size` generated arithmetic solutions, a share `flaw_rate` of them with a wrong step
    injected (`corrupt_solution`), each step labelled by the step checker."""
    from capo_dist.warmstart import corrupt_solution

    rng = random.Random(seed)
    out = []
    for ap in synthetic_arith(size, seed, min_ops=1, max_ops=4):
        steps, _ = corrupt_solution(ap, rng, flaw_rate=flaw_rate)
        labels = [check_step(s) is not Verdict.CORRECT for s in steps]
        first = labels.index(True) if True in labels else -1
        out.append(LabelledSolution(ap.problem.question, ap.problem.gold, steps, labels, first))
    return out


def _processbench_row(row: dict[str, Any]) -> tuple[LabelledSolution | None, str]:
    problem, why = text_field(row, "problem")
    if problem is None:
        return None, why
    steps, label = row.get("steps"), row.get("label")
    if not isinstance(steps, list) or not steps:
        return None, "steps_not_a_list"
    if len(steps) > MAX_STEPS:
        return None, "too_many_steps"
    if not all(isinstance(s, str) and len(s) <= MAX_TEXT_CHARS for s in steps):
        return None, "step_not_text"
    if isinstance(label, bool) or not isinstance(label, int):
        return None, "label_not_an_integer"
    if not -1 <= label < len(steps):
        return None, "label_out_of_range"
    labels: list[bool | None] = [
        False if label == -1 or i < label else (True if i == label else None)
        for i in range(len(steps))
    ]
    return LabelledSolution(problem, None, list(steps), labels, label), ""


def load_processbench(path: Path, stats: DataStats) -> list[LabelledSolution]:
    """The usable rows of a ProcessBench-format JSONL; the others counted in `stats`."""
    out = []
    for _, row in jsonl_objects(path, stats):
        sol, why = _processbench_row(row)
        if sol is None:
            stats.skipped[why] += 1
            continue
        stats.kept += 1
        out.append(sol)
    return out


@dataclass
class VoteScores:
    """One vote mode's figures (None: undefined, e.g. precision with nothing flagged)."""

    precision: float | None
    recall: float | None
    f1: float | None
    false_positive_rate: float | None
    first_error_acc_erroneous: float | None
    first_error_acc_correct: float | None
    processbench_f1: float | None
    counts: dict[str, int] = field(default_factory=dict)


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _harmonic(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return 2 * a * b / (a + b) if a + b else 0.0


def score_vote(
    solutions: Sequence[LabelledSolution],
    parsed: Sequence[Sequence[frozenset[int] | None]],
    mode: str,
) -> VoteScores:
    """The figures of vote `mode` over the parsed critiques (`parsed[i]`: solution i's)."""
    tp = fp = fn = tn = 0
    hit_err = n_err = hit_ok = n_ok = 0
    for sol, crits in zip(solutions, parsed, strict=True):
        weights = vote(crits, mode, len(sol.steps))
        flagged = [w >= WRONG_AT for w in weights]
        for label, f in zip(sol.labels, flagged, strict=True):
            if label is None:
                continue
            tp += label and f
            fn += label and not f
            fp += (not label) and f
            tn += not label and not f
        predicted = flagged.index(True) if True in flagged else -1
        if sol.first_error >= 0:
            n_err += 1
            hit_err += predicted == sol.first_error
        else:
            n_ok += 1
            hit_ok += predicted == -1
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    acc_err, acc_ok = _ratio(hit_err, n_err), _ratio(hit_ok, n_ok)
    return VoteScores(
        precision=precision,
        recall=recall,
        f1=_harmonic(precision, recall),
        false_positive_rate=_ratio(fp, fp + tn),
        first_error_acc_erroneous=acc_err,
        first_error_acc_correct=acc_ok,
        processbench_f1=_harmonic(acc_err, acc_ok),
        counts={"tp": tp, "fp": fp, "fn": fn, "tn": tn, "erroneous": n_err, "correct": n_ok},
    )


def expected_rates(mode: str, n: int, p: float) -> tuple[float, float]:
    """(recall, false positive rate) of vote `mode` over `n` critiques of the noisy
    symbolic judge, each verdict flipped with probability `p` independently: a step
    is voted wrong when at least `need` of the n critiques flag it."""
    need = {"intersection": n, "union": 1, "majority": n // 2 + 1, "average": math.ceil(n / 2)}[
        mode
    ]

    def at_least(q: float) -> float:  # P(Binomial(n, q) >= need)
        return sum(math.comb(n, k) * q**k * (1 - q) ** (n - k) for k in range(need, n + 1))

    return at_least(1 - p), at_least(p)


@dataclass
class EvalReport:
    """Everything `judge_eval` measured, JSON-ready through `dataclasses.asdict`."""

    judge: dict[str, Any]
    data: dict[str, Any]
    invalid_rate: float
    abstain_rate: float
    dropped_indices: int
    judge_tokens_per_solution: float | None
    seconds: float
    votes: dict[str, VoteScores]
    examples: list[dict[str, Any]]


def _tokens(backend: JudgeBackend) -> int | None:
    """Judge tokens (prompt + completion) the backend counted so far; None if it does not
    count them (a backend with `token_counts()`: capo_dist.judge_worker)."""
    if isinstance(backend, StepCheckerBackend):
        return 0
    counts = getattr(backend, "token_counts", None)
    if counts is None:
        return None
    t = counts()
    return int(t.prompt + t.completion)


def _clip(text: str | None, limit: int = 2000) -> str | None:
    return text if text is None or len(text) <= limit else text[:limit] + "…"


def evaluate(
    backend: JudgeBackend,
    prompt: JudgePrompt,
    solutions: Sequence[LabelledSolution],
    num_critiques: int,
    down: DownDetector,
    votes: Sequence[str] = tuple(VOTE_MODES),
    batch_size: int | None = 64,
) -> dict[str, Any]:
    """Ask `backend` for `num_critiques` critiques of every solution and score them: the
    judge-level figures, every vote mode's `VoteScores` in `"votes"`, and the first
    solutions' critiques in `"examples"` (to see what an invalid critique looks like)."""
    start = time.perf_counter()
    tokens_before = _tokens(backend)
    requests = [JudgeRequest(s.problem, s.reference, s.steps) for s in solutions]
    replies = critique_all(backend, requests, num_critiques, down, batch_size)
    tokens_after = _tokens(backend)
    parse = get_parser(prompt.parser)
    raw = [list(r.critiques) for r in replies]
    parsed: list[list[frozenset[int] | None]] = []
    invalid = dropped = abstained = total = 0
    for sol, crits in zip(solutions, raw, strict=True):
        results: list[ParsedCritique] = [parse(c, len(sol.steps)) for c in crits]
        total += len(results)
        invalid += sum(r.wrong is None for r in results)
        dropped += sum(r.dropped for r in results)
        abstained += all(r.wrong is None for r in results)
        parsed.append([r.wrong for r in results])
    n = max(len(solutions), 1)
    tokens = (
        None
        if tokens_before is None or tokens_after is None
        else (tokens_after - tokens_before) / n
    )
    return {
        "invalid_rate": invalid / max(total, 1),
        "abstain_rate": abstained / n,
        "dropped_indices": dropped,
        "judge_tokens_per_solution": tokens,
        "seconds": time.perf_counter() - start,
        "votes": {mode: score_vote(solutions, parsed, mode) for mode in votes},
        "examples": [
            {"steps": len(s.steps), "labels": s.labels, "critiques": [_clip(c) for c in crits]}
            for s, crits in zip(solutions[:EXAMPLES], raw, strict=False)
        ],
    }


def _fmt(x: float | None, pct: bool = True) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.1f}" if pct else f"{x:g}"


def markdown(report: EvalReport) -> str:
    """The report as Markdown: a header of what was run and a table per vote mode."""
    j, d = report.judge, report.data
    noisy = j["backend"] == "symbolic" and j["flip_prob"] > 0
    lines = [
        f"judge: {j['label']}, prompt `{j['prompt']}` (parser `{j['parser']}`), "
        f"N = {j['num_critiques']} critiques"
        + (f", flip_prob = {j['flip_prob']:g}" if j["backend"] == "symbolic" else ""),
        f"data: {d['source']}: {d['solutions']} solutions ({d['erroneous']} with a wrong step), "
        f"{d['labelled_steps']} labelled steps ({d['wrong_steps']} wrong)"
        + (
            f"; {d['unlabelled_steps']} steps after a first error are unlabelled and left out "
            "of the step-level figures"
            if d["unlabelled_steps"]
            else ""
        )
        + (f"; rows skipped: {d['skipped']}" if d.get("skipped") else ""),
        f"invalid critiques: {_fmt(report.invalid_rate)} %, abstaining solutions: "
        f"{_fmt(report.abstain_rate)} %, judge tokens per solution: "
        + (
            "not counted by this backend"
            if report.judge_tokens_per_solution is None
            else f"{report.judge_tokens_per_solution:.0f}"
        ),
        "",
        "| vote | step precision | step recall | step F1 | step FPR "
        + ("| expected recall / FPR " if noisy else "")
        + "| first error: acc. erroneous | acc. correct | ProcessBench F1 |",
        "|---|---:|---:|---:|---:|" + ("---:|" if noisy else "") + "---:|---:|---:|",
    ]
    for mode, s in report.votes.items():
        expected = ""
        if noisy:
            r, f = expected_rates(mode, j["num_critiques"], j["flip_prob"])
            expected = f"| {100 * r:.1f} / {100 * f:.1f} "
        lines.append(
            f"| {mode} | {_fmt(s.precision)} | {_fmt(s.recall)} | {_fmt(s.f1)} "
            f"| {_fmt(s.false_positive_rate)} {expected}| {_fmt(s.first_error_acc_erroneous)} "
            f"| {_fmt(s.first_error_acc_correct)} | {_fmt(s.processbench_f1)} |"
        )
    lines += [
        "",
        "Figures in %. A step is voted wrong at vote weight >= 0.5 (average: at least half "
        "of the valid critiques flag it). First error: the smallest voted-wrong step, -1 if none.",
    ]
    return "\n".join(lines)


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


# JudgeConfig fields that default to None, and their type.
_OPTIONAL = {"model_path": str, "base_url": str, "model": str, "max_model_len": int}


def _judge_options(parser: argparse.ArgumentParser) -> None:
    """One `--field-name` option per scalar field of JudgeConfig (its default, its type)."""
    group = parser.add_argument_group("judge (the judge.* keys of a run; defaults as there)")
    for f in dataclasses.fields(JudgeConfig):
        default = getattr(JudgeConfig(), f.name)
        if f.name in ("num_workers", "num_gpus_per_worker", "max_invalid_steps", "on_invalid"):
            continue  # one backend in this process; the training-only judge-health keys
        kind = _OPTIONAL.get(f.name) or (_bool if isinstance(default, bool) else type(default))
        group.add_argument(
            "--" + f.name.replace("_", "-"), type=kind, default=default, help=f"judge.{f.name}"
        )


def judge_config(args: argparse.Namespace) -> JudgeConfig:
    """The JudgeConfig the options describe."""
    names = {f.name for f in dataclasses.fields(JudgeConfig)}
    return JudgeConfig(**{k: v for k, v in vars(args).items() if k in names})


def make_backend(cfg: JudgeConfig, prompt: JudgePrompt, seed: int) -> JudgeBackend:
    """The judge_worker backend `cfg.backend`, built in this process."""
    if cfg.backend == "symbolic":
        return StepCheckerBackend(cfg.flip_prob, seed)
    if cfg.backend == "openai":
        return HttpBackend(cfg, prompt)
    return EngineBackend(cfg, cfg.model_path or "", seed, {}, prompt)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, evaluate the judge, print the table, write `--out`; the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m capo_dist.judge_eval",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", type=Path, default=None, help="ProcessBench-format JSONL")
    parser.add_argument("--size", type=int, default=4000, help="generated solutions (no --data)")
    parser.add_argument("--flaw-rate", type=float, default=0.5, help="generated: share flawed")
    parser.add_argument("--limit", type=int, default=None, help="first N rows of --data")
    parser.add_argument("--num-critiques", type=int, default=4, help="N critiques per solution")
    parser.add_argument("--votes", default=",".join(VOTE_MODES), help="vote modes to score")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64, help="solutions per judge call")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    _judge_options(parser)
    args = parser.parse_args(argv)
    cfg = judge_config(args)
    votes = [v for v in args.votes.split(",") if v]
    try:
        run = RunConfig()
        run.judge = cfg
        validate(run)
        bad = [v for v in votes if v not in VOTE_MODES]
        if bad or not votes:
            raise ConfigError(f"--votes {args.votes!r}: choose from {', '.join(VOTE_MODES)}")
        if args.num_critiques < 1 or args.size < 1 or args.batch_size < 1:
            raise ConfigError("--num-critiques, --size and --batch-size must be >= 1")
        if cfg.backend in ("vllm", "hf") and not cfg.model_path:
            raise ConfigError(f"--backend {cfg.backend} needs --model-path (the judge model)")
        if args.data is not None and not args.data.is_file():
            raise ConfigError(f"--data {str(args.data)!r} is not a file (a ProcessBench JSONL)")
        prompt = load_judge_prompt(cfg.prompt)
    except ConfigError as err:
        print(f"[judge_eval] ConfigError: {err}", file=sys.stderr)
        return 2

    stats = DataStats()
    if args.data is not None:
        solutions = load_processbench(args.data, stats)[: args.limit]
        source = str(args.data)
        if not solutions:
            print(
                f"[judge_eval] {args.data} has no usable rows ({stats.summary()}); a row needs "
                "problem (text), steps (a list of strings) and label (first wrong step, or -1)",
                file=sys.stderr,
            )
            return 2
    else:
        solutions = generated_solutions(args.size, args.seed, args.flaw_rate)
        source = f"generated arithmetic (size {args.size}, seed {args.seed})"

    backend = make_backend(cfg, prompt, args.seed)
    label = judge_label(cfg, cfg.model_path or "")
    down = DownDetector(cfg.max_consecutive_failures, cfg.down_after_s, label)
    try:
        figures = evaluate(
            backend, prompt, solutions, args.num_critiques, down, votes, args.batch_size
        )
    except JudgeDownError as err:
        print(f"[judge_eval] JudgeDownError: {err}", file=sys.stderr)
        return 1
    labels = [lab for s in solutions for lab in s.labels]
    report = EvalReport(
        judge={
            "label": label,
            "backend": cfg.backend,
            "prompt": cfg.prompt,
            "parser": prompt.parser,
            "num_critiques": args.num_critiques,
            "flip_prob": cfg.flip_prob,
            "model_path": cfg.model_path,
            "model": cfg.model,
            "temperature": cfg.temperature,
            "max_tokens": cfg.max_tokens,
        },
        data={
            "source": source,
            "solutions": len(solutions),
            "erroneous": sum(s.first_error >= 0 for s in solutions),
            "labelled_steps": sum(lab is not None for lab in labels),
            "wrong_steps": sum(lab is True for lab in labels),
            "unlabelled_steps": sum(lab is None for lab in labels),
            "rows": stats.rows,
            "skipped": dict(stats.skipped),
        },
        **figures,
    )
    print(markdown(report))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dataclasses.asdict(report), indent=2) + "\n")
        print(f"[judge_eval] figures: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
