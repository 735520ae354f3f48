"""Checkpoints, faults of the whole run and of a learner rank, and exact resume.

The runs learn (a warm-started policy, a noisy judge, a learning rate still warming up),
so every piece of state a resume must restore shows in the figures: learner weights (the
policy that samples step 2 and the loss), optimizer moments (step 2's update, hence step
3), scheduler (`train_lr`), data position (the problems), the judge's RNG (its flips) and
the sampler's seeds. One sequence, against one uninterrupted run of the same seed:

1. `python -m capo_dist.launch`, its whole process tree (driver, Ray, every actor)
   SIGKILLed during step 2, after checkpoint 1;
2. the uninterrupted run (in this process);
3. the killed run resumed with `trainer.resume=auto`: it redoes step 2 from checkpoint 1,
   then a learner rank is SIGKILLed while checkpoint 2 is written: the run stops with a
   message naming checkpoint 1 and how to resume;
4. resumed again: steps 2 and 3.
Real Ray, DeepSpeed ZeRO-3 (2 gloo ranks), vLLM CPU.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from capo_dist.metrics import forget_steps_after
from capo_dist.trainer import LearnerDiedError, Trainer
from tests.runs import FAST, FaultyTrainer, compose_run, learning, read_metrics, run

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
# Wall-clock figures differ run to run; everything else must be identical.
VOLATILE = ("time_", "tokens_per_s", "train_time")


def overrides(policy: Path) -> list[str]:
    return [
        *learning(policy),
        "trainer.total_steps=3",
        "trainer.checkpoint_every=1",
        "trainer.keep_checkpoints=2",
        "trainer.lr=1e-3",
        "trainer.warmup_steps=4",  # the lr differs at every step: a reset scheduler shows
        "rollout.backend=vllm",
        # Refill rounds take extra prompts: the data position a checkpoint holds includes them.
        "trainer.filter_groups=outcome",
        "trainer.filter_max_rounds=1",
    ]


def stable(record: dict) -> dict:
    """A metrics row without its wall-clock figures."""
    return {k: v for k, v in record.items() if not k.startswith(VOLATILE)}


def weights(policy_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(policy_dir.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def launch_and_kill_after_checkpoint_1(run_dir: Path, build_dir: Path, policy: Path) -> None:
    """A real `python -m capo_dist.launch` in its own session, SIGKILLed with its whole
    process tree as soon as checkpoint 1 is committed (step 2 takes seconds to run)."""
    log = run_dir.parent / f"{run_dir.name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "capo_dist.launch",
                *FAST,
                *overrides(policy),
                f"model.build_dir={build_dir}",
                f"hydra.run.dir={run_dir}",
            ],
            cwd=REPO,
            start_new_session=True,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    ckpt = run_dir / "checkpoints" / "step_00000001" / "driver_state.json"
    deadline = time.time() + 600
    try:
        while not ckpt.exists():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint 1 within 10 min"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its Ray cluster, every actor
        proc.wait(60)


def test_killed_runs_resume_exactly(tmp_path, model_build_dir, warm_policy):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    launch_and_kill_after_checkpoint_1(broken, model_build_dir, warm_policy)
    killed_at = read_metrics(broken)
    assert [r["step"] for r in killed_at] in ([1], [1, 2])
    try:
        # One local Ray cluster for the three in-process runs.
        run(Trainer(compose_run(whole, model_build_dir, *overrides(warm_policy))), False)
        expected = {r["step"]: stable(r) for r in read_metrics(whole)}
        assert sorted(expected) == [1, 2, 3]
        for r in expected.values():  # the run learns: the comparisons below can see a change
            assert r["train_grad_norm"] > 0
        assert expected[1]["train_lr"] < expected[2]["train_lr"] < expected[3]["train_lr"]
        assert 0 < expected[1]["process_penalty_rate"] < 1
        # Some step needed a refill round, and every step trained only groups of mixed outcome.
        assert any(r["filter_rounds"] > 0 for r in expected.values())
        assert all(r["groups_trained"] == r["prompts"] >= 1 for r in expected.values())

        resumed = compose_run(
            broken, model_build_dir, *overrides(warm_policy), "trainer.resume=auto"
        )
        trainer = FaultyTrainer(resumed)
        trainer.kill_learner_at = ("save_checkpoint", 2)
        with pytest.raises(
            LearnerDiedError,
            match=r"learner rank died during save_checkpoint at step 2.*step_00000001"
            r".*trainer.resume=auto",
        ):
            run(trainer, False)
        # Resumed after the whole-tree SIGKILL: step 2 exactly as the uninterrupted run's,
        # logged once (a row the killed run wrote of step 2 was dropped at the resume).
        rows = [stable(r) for r in read_metrics(broken)]
        assert [r["step"] for r in rows] == [1, 2]
        assert rows == [expected[1], expected[2]]

        run(Trainer(resumed))  # after the learner died while writing checkpoint 2
    finally:
        ray.shutdown()
    rows = [stable(r) for r in read_metrics(broken)]
    assert [r["step"] for r in rows] == [1, 2, 3], "a step's row is missing or logged twice"
    for got, want in zip(rows, expected.values(), strict=True):
        assert got == want, f"step {got['step']} differs after resume"
    samples = sorted(p.name for p in (broken / "samples").iterdir())
    assert samples == [f"step_{k:06d}.jsonl" for k in (1, 2, 3)]
    # keep-last-N: only the 2 newest checkpoints remain, no partial directory (the one the
    # dead learner left was swept).
    assert sorted(p.name for p in (broken / "checkpoints").iterdir()) == [
        "step_00000002",
        "step_00000003",
    ]
    # The final policy, exported in Hugging Face format, is the uninterrupted run's.
    got, want = weights(broken / "policy"), weights(whole / "policy")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    AutoModelForCausalLM.from_pretrained(broken / "policy")


def test_forget_steps_after_keeps_earlier_rows_and_drops_a_torn_one(tmp_path):
    (tmp_path / "samples").mkdir()
    (tmp_path / "eval" / "step_000003").mkdir(parents=True)
    for k in (1, 2, 3):
        (tmp_path / "samples" / f"step_{k:06d}.jsonl").write_text("{}\n")
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 0, "eval/x": 1}\n{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo'
    )
    assert forget_steps_after(tmp_path, 2) == 2
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [
        "step_000001.jsonl",
        "step_000002.jsonl",
    ]
    assert list((tmp_path / "eval").iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "metrics.jsonl", "samples"]
