"""GRPO throughput: capo_dist (`capo.w_process=0`) vs TRL's `GRPOTrainer`, on CPU.

Same policy (the tiny_cpu Llama of `capo_dist.models`, built once: ~0.6 M
parameters with the vocabulary its BPE trainer reaches on the corpus), same data
(the generated arithmetic problems of `capo_dist.data.synthetic_arith`, seed
0, in the run's prompt template), same reward (1 if
`capo_dist.rewards.verifier` judges the completion's final answer equal to
the gold, else 0), same group size G, prompts per step P, completion length,
temperature 1, learning rate (constant), 1 PPO epoch = 1 optimizer step per
batch, no KL term, token-mean loss (TRL `loss_type="dapo"`), group-normalised
advantages (capo `group_response`, TRL `scale_rewards="group"`), fp32, no
gradient checkpointing, and the same number of optimizer steps. Each side
keeps its own batching for the update (capo: micro-batches of
`trainer.micro_batch_size` rows per rank, or token-budget packed rows with
`--pack-tokens N`; TRL: the whole batch in one pass)
and its own use of the cores (capo: the rollout actor generates on
`--rollout-cpus` threads, all cores by default in synchronous mode, where the
learners wait for it, 1 with `--staleness 1`, where they overlap; TRL: one
process with `torch.set_num_threads(all cores)`, `--trl-threads` to change).

* capo_dist: the real `Trainer` (Ray, 1 vLLM CPU rollout worker, the reward
  aggregator, 2 DeepSpeed ZeRO-3 learner ranks on gloo, object-store weight
  sync), synchronous (`max_staleness=0`, on-policy like TRL); `--staleness 1`
  runs it one step off-policy.
* TRL 1.16 in its own virtualenv `.venv-trl` (created here on first use with
  pinned versions: `pip install -c constraints.txt torch==2.13.0 trl==...`),
  one process, generation with Hugging Face `generate` (TRL's vLLM modes
  need a GPU server or colocated GPU vLLM).

samples/s = samples (P × G per step) / wall seconds of the steady-state
loop: from the end of step 1 to the end of step N (step 1 carries one-off
warm-up on both sides). The end-to-end figure (start-up included: Ray,
actors, DeepSpeed, vLLM vs. loading the model into TRL) is printed beside it.
JSON: `capo_dist_samples_per_s`, `trl_samples_per_s`, `ratio` (capo / TRL,
goal ≥ 1.0). Run: `python -m benchmarks.vs_trl` (`--quick` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks._common import REPO, last_json_line, mean, report

TRL_VENV = os.path.join(REPO, ".venv-trl")
TRL_PINS = [
    "torch==2.13.0",
    "trl==1.16.0",
    "accelerate==1.15.0",
    "datasets==5.2.0",
    "math-verify==0.9.0",
    "sympy==1.14.0",
]


def trl_python() -> str:
    """The `.venv-trl` interpreter, creating/installing the venv first if it is missing."""
    py = os.path.join(TRL_VENV, "bin", "python")
    stamp = os.path.join(TRL_VENV, ".installed-" + "-".join(p.replace("==", "") for p in TRL_PINS))
    if os.path.exists(stamp):
        return py
    print(f"[vs_trl] creating {TRL_VENV} ({' '.join(TRL_PINS)}) ...", flush=True)
    if not os.path.exists(py):
        subprocess.run([sys.executable, "-m", "venv", TRL_VENV], check=True)
    subprocess.run(
        [
            py,
            "-m",
            "pip",
            "install",
            "--quiet",
            "-c",
            os.path.join(REPO, "constraints.txt"),
            *TRL_PINS,
        ],
        check=True,
    )
    subprocess.run(
        [py, "-c", "import trl, torch; print('trl', trl.__version__, 'torch', torch.__version__)"],
        check=True,
    )
    open(stamp, "w").close()
    return py


# ------------------------------------------------------------------ the TRL side (.venv-trl)


def _timed(fn, sink: list[float]):
    """`fn`, appending the seconds of each call to `sink` (observation only)."""

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            sink.append(time.perf_counter() - t0)

    return wrapper


def trl_child(args) -> None:
    """Runs inside .venv-trl: TRL GRPOTrainer for `args.steps` steps; prints one JSON line."""
    t_begin = time.perf_counter()
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from capo_dist.data import synthetic_arith
    from capo_dist.rewards.verifier import is_correct

    threads = args.trl_threads or (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    )
    torch.set_num_threads(threads)
    problems = [a.problem for a in synthetic_arith(args.data_size, args.seed)]
    rows = [{"prompt": args.template.format(question=p.question), "gold": p.gold} for p in problems]
    dataset = Dataset.from_list(rows)
    calls = {"n": 0, "correct": 0}

    def outcome_reward(completions, gold, **_):
        out = [1.0 if is_correct(c, g) else 0.0 for c, g in zip(completions, gold, strict=True)]
        calls["n"] += len(out)
        calls["correct"] += int(sum(out))
        return out

    ends: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *a, **k):
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory(prefix="capo-bench-trl-") as out_dir:
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(args.model)
        config = GRPOConfig(
            output_dir=out_dir,
            per_device_train_batch_size=args.prompts * args.group,
            gradient_accumulation_steps=1,
            num_generations=args.group,
            max_completion_length=args.max_tokens,
            temperature=1.0,
            top_p=1.0,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            beta=0.0,
            num_iterations=1,
            loss_type="dapo",
            scale_rewards="group",
            max_steps=args.steps,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            bf16=False,
            gradient_checkpointing=False,
            max_grad_norm=1.0,
            seed=args.seed,
            disable_tqdm=True,
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=outcome_reward,
            args=config,
            train_dataset=dataset,
            processing_class=tok,
            callbacks=[Stamp()],
        )
        timings: dict[str, list[float]] = {}
        for name in ("_generate", "_calculate_rewards", "_generate_and_score_completions"):
            setattr(trainer, name, _timed(getattr(trainer, name), timings.setdefault(name, [])))
        t_ready = time.perf_counter()
        trainer.train()
        t_done = time.perf_counter()
    print(
        json.dumps(
            {
                "step_ends": ends,
                "t0": t0,
                "loop_start": t_ready,
                "start_s": t_ready - t0,
                "import_s": t0 - t_begin,
                "total_s": t_done - t0,
                "rewards": calls,
                "timings": timings,
                "threads": torch.get_num_threads(),
                "trl": __import__("trl").__version__,
            }
        ),
        flush=True,
    )


# ------------------------------------------------------------------ driver


def steady_samples_per_s(ends: list[float], samples_per_step: int) -> float:
    """Samples per second from the end of step 1 to the end of the last step."""
    if len(ends) < 2:
        return float("nan")
    return (len(ends) - 1) * samples_per_step / (ends[-1] - ends[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps on each side")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step (P)")
    ap.add_argument("--group", type=int, default=4, help="samples per prompt (G)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--staleness", type=int, default=0, choices=[0, 1])
    ap.add_argument(
        "--trl-threads", type=int, default=0, help="torch threads of the TRL process (0: all cores)"
    )
    ap.add_argument(
        "--rollout-cpus",
        type=int,
        default=0,
        help="rollout.num_cpus_per_worker (0: all cores with --staleness 0, else 1)",
    )
    ap.add_argument(
        "--pack-tokens",
        type=int,
        default=0,
        help="capo trainer.max_tokens_per_micro_batch (0: padded micro-batches of micro_batch_size rows)",
    )
    ap.add_argument("--quick", action="store_true", help="3 steps, short completions")
    ap.add_argument("--trl-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--template", help=argparse.SUPPRESS)
    ap.add_argument("--data-size", type=int, default=512, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trl_child:
        trl_child(args)
        return
    if args.quick:
        args.steps, args.max_tokens = 3, 32

    from benchmarks._common import compose_run_config, quiet_ray_env, run_trainer, steady_step_walls
    from capo_dist.trainer import load_problems, prepare_policy

    quiet_ray_env()
    py = trl_python()
    samples_per_step = args.prompts * args.group
    rollout_cpus = args.rollout_cpus or ((os.cpu_count() or 1) if args.staleness == 0 else 1)
    overrides = [
        f"rollout.num_cpus_per_worker={rollout_cpus}",
        "capo.w_process=0",
        "capo.advantage=group_response",
        "rollout.backend=vllm",
        f"rollout.prompts_per_step={args.prompts}",
        f"rollout.samples_per_prompt={args.group}",
        f"rollout.max_new_tokens={args.max_tokens}",
        "rollout.temperature=1.0",
        f"trainer.total_steps={args.steps}",
        f"trainer.max_staleness={args.staleness}",
        f"trainer.lr={args.lr}",
        "trainer.ppo_epochs=1",
        "trainer.kl_coef=0.0",
        "trainer.export_hf=false",
        f"trainer.max_tokens_per_micro_batch={args.pack_tokens}",
        "data.synthetic_size=512",
        "data.seed=0",
    ]
    with tempfile.TemporaryDirectory(prefix="capo-bench-vs-trl-") as tmp:
        cfg = compose_run_config(tmp, overrides)
        model = prepare_policy(cfg, load_problems(cfg)[2])  # built (or reused) once, both sides
        print(f"[vs_trl] capo_dist GRPO: {args.steps} steps ...", flush=True)
        capo = run_trainer(cfg)

    print(f"[vs_trl] TRL GRPOTrainer: {args.steps} steps ...", flush=True)
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("VIRTUAL_ENV", None)
    cmd = [
        py, "-m", "benchmarks.vs_trl", "--trl-child", "--model", model,
        "--template", cfg.data.prompt_template, "--steps", str(args.steps),
        "--prompts", str(args.prompts), "--group", str(args.group),
        "--max-tokens", str(args.max_tokens), "--lr", str(args.lr),
        "--trl-threads", str(args.trl_threads),
    ]  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    trl = last_json_line(out.stdout)
    if out.returncode != 0 or trl is None:
        raise SystemExit(f"TRL side failed (exit {out.returncode}):\n{out.stderr[-4000:]}")

    capo_sps = steady_samples_per_s(capo["step_ends"], samples_per_step)
    trl_sps = steady_samples_per_s(trl["step_ends"], samples_per_step)
    # End-to-end: from building the trainer (capo: Ray, actors, DeepSpeed, vLLM; TRL: loading
    # the model) to the end of the last step.
    capo_e2e = args.steps * samples_per_step / capo["to_last_step_s"]
    trl_e2e = args.steps * samples_per_step / (trl["step_ends"][-1] - trl["t0"])
    ratio = capo_sps / trl_sps
    recs = capo["records"][1:]
    stage = {
        "rollout": mean(r["time_rollout"] for r in recs),
        "reward": mean(r.get("time_reward", 0.0) for r in recs),
        "train (in learner)": mean(r["train_time"] for r in recs),
        "train (driver)": mean(r["time_train"] for r in recs),
        "sync": mean(r["time_sync"] for r in recs),
    }
    capo_step = mean(steady_step_walls(capo))
    trl_walls = [b - a for a, b in zip(trl["step_ends"], trl["step_ends"][1:], strict=False)]
    trl_step = mean(trl_walls)
    other = capo_step - (
        stage["rollout"] + stage["reward"] + stage["train (driver)"] + stage["sync"]
    )
    tt = {k: v[1:] or v for k, v in trl.get("timings", {}).items()}  # step 1 is warm-up
    trl_stage = {
        "generate": mean(tt.get("_generate", [])),
        "reward": mean(tt.get("_calculate_rewards", [])),
        "train": trl_step - mean(tt.get("_generate_and_score_completions", [])),
    }
    trl_stage["other"] = trl_step - sum(trl_stage.values())
    # Where capo_dist's step loses (or wins) against TRL's, largest first.
    deltas = {
        "generation (vLLM in the rollout actor vs HF generate in-process)": stage["rollout"]
        - trl_stage["generate"],
        "training (2 ZeRO-3 ranks on gloo, via Ray, vs one plain process)": stage["train (driver)"]
        - trl_stage["train"],
        "reward (verifier in the aggregator actor vs in-process)": stage["reward"]
        - trl_stage["reward"],
        "weight sync (TRL samples from the model it trains: none)": stage["sync"],
        "other (driver, Ray hops, logging)": other - trl_stage["other"],
    }

    rows = [
        (
            "setup",
            f"tiny_cpu policy, P={args.prompts} prompts × G={args.group}, "
            f"{args.max_tokens} new tokens, {args.steps} optimizer steps, "
            f"capo max_staleness={args.staleness}, rollout on {rollout_cpus} thread(s)",
        ),
        ("capo_dist steady", f"{capo_sps:7.2f} samples/s  ({capo_step:.2f} s/step)"),
        (
            "TRL steady",
            f"{trl_sps:7.2f} samples/s  ({trl_step:.2f} s/step; {trl['threads']} torch threads, "
            f"{trl['rewards']['n']} completions scored = {args.steps} × {samples_per_step})",
        ),
        ("ratio capo/TRL", f"{ratio:.2f}x  (goal ≥ 1.0)"),
        (
            "end-to-end",
            f"capo {capo_e2e:.2f} samples/s (start-up {capo['start_s']:.1f} s), "
            f"TRL {trl_e2e:.2f} samples/s (start-up {trl['start_s']:.1f} s)",
        ),
        (
            "capo step, seconds",
            "  ".join(f"{k} {v:.2f}" for k, v in stage.items()) + f"  other {other:.2f}",
        ),
    ]
    rows.append(
        (
            "TRL step, seconds",
            "  ".join(f"{k} {v:.2f}" for k, v in trl_stage.items()),
        )
    )
    gen_why = (
        f"the rollout actor's vLLM generates on {rollout_cpus} thread(s) "
        f"({stage['rollout']:.2f} s) while TRL's HF generate uses "
        f"{trl.get('threads')} threads of its one process ({trl_stage['generate']:.2f} s); "
        "on a model this small vLLM's per-step scheduling and sampling in Python outweigh "
        "its batching (benchmarks.generation shows the crossover with model size)"
    )
    if args.staleness == 0:
        rows.append(
            (
                "capo − TRL per step",
                "; ".join(
                    f"{k}: {v:+.2f} s" for k, v in sorted(deltas.items(), key=lambda kv: -kv[1])
                ),
            )
        )
    if ratio < 1.0:
        if args.staleness == 0:
            worst, lost = max(deltas.items(), key=lambda kv: kv[1])
            why = (
                f"capo_dist's step is {capo_step - trl_step:.2f} s longer; most of it is "
                f"{worst} ({lost:+.2f} s)"
            )
            if worst.startswith("generation"):
                why += ": " + gen_why
            if stage["rollout"] > stage["train (driver)"]:
                why += "; in synchronous mode the learners' core idles while the rollout generates"
        else:
            why = (
                f"with max_staleness=1 generation overlaps training, so capo's step "
                f"({capo_step:.2f} s) is bounded by its generation lane: " + gen_why
            )
        rows.append(("why slower", why))
    rows.append(
        (
            "start-up amortisation",
            f"capo pays {capo['start_s']:.0f} s once (Ray, actors, DeepSpeed, vLLM); "
            f"TRL {trl['start_s']:.0f} s — not in the steady figure",
        )
    )
    report(
        "vs_trl",
        rows,
        {
            "capo_dist_samples_per_s": round(capo_sps, 3),
            "trl_samples_per_s": round(trl_sps, 3),
            "ratio": round(ratio, 3),
            "capo_dist_e2e_samples_per_s": round(capo_e2e, 3),
            "trl_e2e_samples_per_s": round(trl_e2e, 3),
            "capo_dist_start_s": round(capo["start_s"], 2),
            "trl_start_s": round(trl["start_s"], 2),
            "capo_dist_step_s": round(capo_step, 4),
            "trl_step_s": round(trl_step, 4),
            "capo_dist_stages_s": {k: round(v, 4) for k, v in stage.items()},
            "trl_stages_s": {k: round(v, 4) for k, v in trl_stage.items()},
            "steps": args.steps,
            "prompts": args.prompts,
            "group": args.group,
            "max_tokens": args.max_tokens,
            "staleness": args.staleness,
            "pack_tokens": args.pack_tokens,
            "rollout_threads": rollout_cpus,
            "trl_version": trl.get("trl"),
            "trl_threads": trl.get("threads"),
            "goal_ratio": 1.0,
            "quick": args.quick,
        },
    )


if __name__ == "__main__":
    main()
