"""Does process credit help? CAPO against GRPO on generated arithmetic, on CPU.

Every run is the real `Trainer` (vLLM CPU rollouts, the symbolic judge,
2 DeepSpeed ZeRO-3 ranks) starting from the same warm-started tiny policy
(`capo_dist.warmstart`: SFT on step-format solutions, 30 % of them with a
wrong step; built once and cached). The arms differ only in the reward:

* `grpo`            — outcome reward only (`capo.w_process=0`).
* `capo_exact`      — CAPO with the exact step checker as judge. Its critiques
                      are deterministic, so all four votes give the same wrong
                      steps: one critique, one arm.
* `noisy_single`    — CAPO with ONE critique from the noisy checker (each step's
                      verdict flipped with probability `--flip-prob`): no vote.
* `noisy_<vote>`    — CAPO with N=4 noisy critiques combined by `<vote>`
                      (intersection, majority, union, average).

Each arm runs with the same seeds (`trainer.seed`: sampling and data order),
the same steps, batch and learning rate. The live policy is scored before
training and every `--eval-every` steps on held-out problems (a separate
seed; none is in the RL or the SFT set) at three difficulty levels (1, 2 and
3 operations): `--eval-k` samples at temperature 1 per problem, plus a greedy
pass. Per evaluation point this script computes, from the saved responses:

* accuracy       — share of sampled responses whose final answer is right;
* clean_correct  — share that is right AND has every step right (exact checker);
* clean_share    — clean_correct / accuracy: of the right answers, how many
                   were reached by right steps only;
* greedy_accuracy, and accuracy per level.

Outputs in `--out` (default `outputs/capo_vs_grpo/<time>` in the current directory, as a
Hydra run's): `runs/<arm>/seed<k>/`
(each run's own metrics.jsonl and eval/ samples), `results.json` (every
evaluation point of every run), `RESULTS.md` (final figures, mean ± std over
seeds, and the change against GRPO paired by seed), `accuracy.png`,
`clean_correct.png`; the last stdout line is one JSON object. A finished run
is kept (`done.json`) and skipped when the same `--out` is given again, so an
interrupted experiment resumes.

    python -m benchmarks.capo_vs_grpo              # the full experiment (~1 h, 2 cores)
    python -m benchmarks.capo_vs_grpo --quick      # a few minutes: pipeline check

`--quick` builds a smaller warm start and runs 2 arms x 2 seeds x 2 steps: it
checks that the pipeline runs and its figures are sane, not who wins.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks._common import (
    bench_build_dir,
    compose_run_config,
    machine_info,
    quiet_ray_env,
    report,
)

VOTES = ("intersection", "majority", "union", "average")
LEVELS = (1, 2, 3)  # operations per problem
METRICS = ("accuracy", "clean_correct", "clean_share", "greedy_accuracy")


@dataclass(frozen=True)
class Settings:
    """One experiment: what every arm shares."""

    arms: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int
    eval_every: int
    lr: float
    prompts_per_step: int
    samples_per_prompt: int
    flip_prob: float
    heldout_per_level: int
    eval_k: int
    max_new_tokens: int = 96


FULL = Settings(
    arms=("grpo", "capo_exact", "noisy_single", *(f"noisy_{v}" for v in VOTES)),
    seeds=(1, 2, 3),
    steps=60,
    eval_every=20,
    lr=1e-4,
    prompts_per_step=16,
    samples_per_prompt=8,
    flip_prob=0.2,
    heldout_per_level=100,
    eval_k=4,
)
QUICK = replace(
    FULL,
    arms=("grpo", "noisy_majority"),
    seeds=(1, 2),
    steps=2,
    eval_every=1,
    prompts_per_step=4,
    samples_per_prompt=4,
    heldout_per_level=4,
    eval_k=2,
    max_new_tokens=64,
)


def arm_overrides(arm: str, flip_prob: float) -> list[str]:
    """The Hydra overrides that make `arm` (see the module doc)."""
    if arm == "grpo":
        return ["capo.w_process=0"]
    if arm == "capo_exact":
        return ["capo.num_critiques=1", "judge.flip_prob=0"]
    if arm == "noisy_single":
        return ["capo.num_critiques=1", f"judge.flip_prob={flip_prob}"]
    vote = arm.removeprefix("noisy_")
    if arm.startswith("noisy_") and vote in VOTES:
        return ["capo.num_critiques=4", f"capo.vote={vote}", f"judge.flip_prob={flip_prob}"]
    raise ValueError(
        f"unknown arm {arm!r}; arms are grpo, capo_exact, noisy_single, "
        + ", ".join(f"noisy_{v}" for v in VOTES)
    )


# ------------------------------------------------------------------ held-out data


def write_heldout(
    out: Path, per_level: int, exclude: set[str], seed: int = 7_777
) -> dict[str, Path]:
    """One JSONL bench per difficulty level (`ops1`, `ops2`, `ops3`), `per_level`
    problems each, none of whose questions is in `exclude`; name → path."""
    from capo_dist.data import synthetic_arith

    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for ops in LEVELS:
        fresh = [
            a.problem
            for a in synthetic_arith(per_level * 4, seed + ops, ops, ops)
            if a.problem.question not in exclude
        ]
        fresh = list({p.question: p for p in fresh}.values())[:per_level]
        if len(fresh) < per_level:
            raise RuntimeError(f"only {len(fresh)} fresh problems with {ops} operations")
        path = out / f"ops{ops}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for p in fresh:
                f.write(json.dumps({"question": p.question, "answer": p.gold}) + "\n")
        paths[f"ops{ops}"] = path
    return paths


# ------------------------------------------------------------------------- scoring


def score_eval_dir(eval_dir: Path) -> dict[str, float]:
    """The figures of one evaluation point from its `eval_samples.jsonl` (module doc)."""
    from capo_dist.step_checker import solution_is_clean

    n = correct = clean = problems = greedy = 0
    by_level: dict[str, list[int]] = {}
    with open(eval_dir / "eval_samples.jsonl", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            problems += 1
            greedy += bool(rec["greedy"]["correct"])
            level = by_level.setdefault(rec["bench"], [0, 0])
            for s in rec["samples"]:
                n += 1
                correct += bool(s["correct"])
                clean += bool(s["correct"]) and solution_is_clean(s["response"])
                level[0] += bool(s["correct"])
                level[1] += 1
    if not n:
        raise RuntimeError(f"{eval_dir}: no evaluated samples")
    return {
        "accuracy": correct / n,
        "clean_correct": clean / n,
        "clean_share": clean / correct if correct else float("nan"),
        "greedy_accuracy": greedy / problems,
        **{f"accuracy_{name}": c / t for name, (c, t) in sorted(by_level.items())},
        "samples": n,
    }


def run_curve(run_dir: Path) -> list[dict[str, float]]:
    """Every evaluation point of one finished run, by step (step 0 = before training)."""
    points = []
    for eval_dir in sorted((run_dir / "eval").glob("step_*")):
        points.append(
            {"step": int(eval_dir.name.removeprefix("step_")), **score_eval_dir(eval_dir)}
        )
    return points


def train_figures(run_dir: Path) -> dict[str, float]:
    """Means over the run's training steps of what the judge and reward saw."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["step"] > 0]
    keys = ("process_penalty_rate", "judge_invalid_rate", "judge_abstain_rate", "time_step")
    return {f"train_{k}": statistics.fmean(r[k] for r in rows) for k in keys if k in rows[0]}


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); NaNs dropped."""
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(runs: dict[str, dict[int, list[dict]]]) -> dict[str, dict[str, Any]]:
    """Per arm: the final and initial figures, mean ± std over seeds, and the
    final difference to GRPO paired by seed (where GRPO ran)."""
    out: dict[str, dict[str, Any]] = {}
    for arm, by_seed in runs.items():
        final = {s: curve[-1] for s, curve in by_seed.items()}
        first = {s: curve[0] for s, curve in by_seed.items()}
        row: dict[str, Any] = {
            "seeds": sorted(by_seed),
            "final_step": max(c["step"] for c in final.values()),
        }
        for m in METRICS:
            row[m] = mean_std([final[s][m] for s in final])
            row[f"{m}_start"] = mean_std([first[s][m] for s in first])
            if arm != "grpo" and "grpo" in runs:
                paired = [final[s][m] - runs["grpo"][s][-1][m] for s in final if s in runs["grpo"]]
                row[f"{m}_vs_grpo"] = mean_std(paired)
                row[f"{m}_wins"] = sum(d > 0 for d in paired)
        out[arm] = row
    return out


# ------------------------------------------------------------------------- output


def _pm(ms: tuple[float, float], scale: float = 100.0, signed: bool = False) -> str:
    mean, std = ms
    if math.isnan(mean):
        return "n/a"
    fmt = "+.1f" if signed else ".1f"
    return f"{scale * mean:{fmt}} ± {scale * std:.1f}"


def markdown(summary: dict[str, dict[str, Any]], settings: Settings, meta: dict) -> str:
    """The RESULTS.md table: percentages, mean ± std over seeds."""
    s = settings
    lines = [
        "# CAPO vs GRPO on generated arithmetic (CPU)",
        "",
        f"Written by `python -m benchmarks.capo_vs_grpo{' --quick' if meta['quick'] else ''}` "
        f"on {meta['date']} ({meta['machine']['cpu']}, {meta['machine']['cores']} cores; "
        f"wall time {meta['wall_s'] / 60:.0f} min).",
        "",
        f"Policy: warm-started tiny Llama `{meta['policy']}`. Each run: {s.steps} steps of "
        f"{s.prompts_per_step} prompts x {s.samples_per_prompt} samples, lr {s.lr:g}; noisy judge "
        f"flips each step verdict with p = {s.flip_prob:g}. Seeds: {', '.join(map(str, s.seeds))}. "
        f"Held-out: {s.heldout_per_level} problems per level (1, 2, 3 operations), {s.eval_k} "
        "samples each at T = 1 plus a greedy pass.",
        "",
        "Figures in %, mean ± std over seeds, at the last step (start = before training, "
        "same for every arm of a seed). *vs GRPO*: the arm minus GRPO, paired by seed "
        "(mean ± std), and in how many seeds the arm was ahead.",
        "",
        "| arm | accuracy | (start) | clean-correct | (start) | clean share of correct "
        "| greedy accuracy | accuracy vs GRPO | clean-correct vs GRPO |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm, row in summary.items():
        n = len(row["seeds"])
        vs_acc = vs_clean = "—"
        if "accuracy_vs_grpo" in row:
            vs_acc = f"{_pm(row['accuracy_vs_grpo'], signed=True)} ({row['accuracy_wins']}/{n})"
            vs_clean = f"{_pm(row['clean_correct_vs_grpo'], signed=True)} ({row['clean_correct_wins']}/{n})"
        lines.append(
            f"| {arm} | {_pm(row['accuracy'])} | {_pm(row['accuracy_start'])} "
            f"| {_pm(row['clean_correct'])} | {_pm(row['clean_correct_start'])} "
            f"| {_pm(row['clean_share'])} | {_pm(row['greedy_accuracy'])} | {vs_acc} | {vs_clean} |"
        )
    lines += ["", "![accuracy](accuracy.png)", "", "![clean-correct](clean_correct.png)", ""]
    return "\n".join(lines)


def plot(runs: dict[str, dict[int, list[dict]]], metric: str, path: Path) -> None:
    """Mean over seeds of `metric` against step, one line per arm, ±1 std shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for arm, by_seed in runs.items():
        steps = sorted({p["step"] for c in by_seed.values() for p in c})
        means, stds = [], []
        for st in steps:
            m, s = mean_std([p[metric] for c in by_seed.values() for p in c if p["step"] == st])
            means.append(100 * m)
            stds.append(100 * s)
        style = "k--" if arm == "grpo" else "-"
        ax.plot(steps, means, style, marker="o", ms=3, label=arm)
        ax.fill_between(
            steps,
            [m - s for m, s in zip(means, stds, strict=True)],
            [m + s for m, s in zip(means, stds, strict=True)],
            alpha=0.12,
        )
    ax.set_xlabel("training step")
    ax.set_ylabel(f"held-out {metric.replace('_', '-')} (%)")
    ax.set_title(
        f"{metric.replace('_', '-')}: mean ± std over {len(next(iter(runs.values())))} seeds"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------- runs


def run_one(run_dir: Path, overrides: list[str]) -> None:
    """One real training run into `run_dir` (Ray stays up for the next run)."""
    from capo_dist.trainer import Trainer

    cfg = compose_run_config(str(run_dir), overrides)
    trainer = Trainer(cfg)
    try:
        trainer.run()
    finally:
        trainer.close(shutdown_ray=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few minutes: pipeline check")
    parser.add_argument("--out", type=Path, default=None, help="output dir (reused: resumes)")
    parser.add_argument("--arms", default=None, help="comma-separated subset of the arms")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--flip-prob", type=float, default=None)
    args = parser.parse_args(argv)

    settings = QUICK if args.quick else FULL
    if args.arms:
        settings = replace(settings, arms=tuple(args.arms.split(",")))
    if args.seeds:
        settings = replace(settings, seeds=tuple(int(s) for s in args.seeds.split(",")))
    if args.steps:
        settings = replace(settings, steps=args.steps)
    if args.flip_prob is not None:
        settings = replace(settings, flip_prob=args.flip_prob)
    for arm in settings.arms:
        arm_overrides(arm, settings.flip_prob)  # unknown arms fail before anything runs
    # Like a Hydra run's outputs/, relative to the current directory; absolute, since the
    # trainer's actors (other processes, other cwd) write checkpoints under it.
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out = (args.out or Path("outputs", "capo_vs_grpo", stamp)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    quiet_ray_env()
    started = time.perf_counter()

    import ray

    from capo_dist.config import DataConfig
    from capo_dist.data import synthetic_arith
    from capo_dist.warmstart import WarmStartConfig, warm_start

    ws = WarmStartConfig()
    if args.quick:  # a small SFT (seconds): the pipeline, not the policy, is under test
        ws = replace(ws, train_size=600, steps=60, eval_size=8, eval_samples=2)
    policy = warm_start(bench_build_dir(), ws, DataConfig.prompt_template)
    seen = {
        a.problem.question for a in synthetic_arith(ws.train_size, ws.seed, ws.min_ops, ws.max_ops)
    }
    seen |= {
        a.problem.question for a in synthetic_arith(DataConfig.synthetic_size, DataConfig.seed)
    }
    benches = write_heldout(out / "heldout", settings.heldout_per_level, seen)

    s = settings
    common = [
        "name=capo_vs_grpo",
        f"model.path={policy}",
        f"trainer.total_steps={s.steps}",
        f"trainer.lr={s.lr}",
        f"rollout.prompts_per_step={s.prompts_per_step}",
        f"rollout.samples_per_prompt={s.samples_per_prompt}",
        f"rollout.max_new_tokens={s.max_new_tokens}",
        "rollout.num_cpus_per_worker=2",  # sync mode: generation may use both cores
        "trainer.export_hf=false",
        "trainer.keep_checkpoints=1",
        "logging.samples_every=0",
        f"eval.every={s.eval_every}",
        "eval.before_training=true",
        f"eval.k={s.eval_k}",
        "eval.temperature=1.0",
        f"eval.max_new_tokens={s.max_new_tokens}",
        *(f"+eval.benches.{name}={path}" for name, path in benches.items()),
    ]
    runs: dict[str, dict[int, list[dict]]] = {}
    failed: dict[str, str] = {}
    train: dict[str, dict[int, dict]] = {}
    for seed in s.seeds:
        for arm in s.arms:
            run_dir = out / "runs" / arm / f"seed{seed}"
            if not (run_dir / "done.json").exists():
                print(f"[capo_vs_grpo] {arm} seed {seed}", flush=True)
                overrides = [
                    *common,
                    f"trainer.seed={seed}",
                    f"trainer.checkpoint_dir={run_dir / 'checkpoints'}",
                    *arm_overrides(arm, s.flip_prob),
                ]
                try:
                    run_one(run_dir, overrides)
                except Exception as err:  # one failed run is reported, the others still run
                    failed[f"{arm}/seed{seed}"] = f"{type(err).__name__}: {err}"
                    print(f"[capo_vs_grpo] {arm} seed {seed} FAILED: {err}", file=sys.stderr)
                    continue
                (run_dir / "done.json").write_text(json.dumps({"overrides": overrides}, indent=1))
            runs.setdefault(arm, {})[seed] = run_curve(run_dir)
            train.setdefault(arm, {})[seed] = train_figures(run_dir)
    if ray.is_initialized():
        ray.shutdown()

    summary = summarize(runs)
    meta = {
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "quick": args.quick,
        "policy": Path(policy).name,
        "machine": machine_info(),
        "wall_s": time.perf_counter() - started,
        "settings": s.__dict__,
    }
    (out / "results.json").write_text(
        json.dumps(
            {"meta": meta, "summary": summary, "curves": runs, "train": train, "failed": failed},
            indent=1,
            default=str,
        )
    )
    (out / "RESULTS.md").write_text(markdown(summary, s, meta))
    for metric in ("accuracy", "clean_correct"):
        plot(runs, metric, out / f"{metric}.png")

    rows = [
        (
            arm,
            f"acc {_pm(row['accuracy'])}  clean {_pm(row['clean_correct'])}  "
            f"(start {_pm(row['accuracy_start'])} / {_pm(row['clean_correct_start'])})",
        )
        for arm, row in summary.items()
    ]
    rows.append(("written", str(out / "RESULTS.md")))
    report(
        "capo_vs_grpo",
        rows,
        {
            "out": str(out),
            "final": {arm: {m: row[m][0] for m in METRICS} for arm, row in summary.items()},
            "failed": failed,
        },
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
