"""Worker faults with real processes: SIGKILL one of two rollout workers and one of two judge
workers while a step is in flight; the step completes on restarted workers, which re-run
exactly the killed workers' chunks, sample with the learner's current weights (checked
right after the reload, before they resample), and every prompt is trained exactly once.
(A learner rank killed: tests/integration/test_resume.py.)"""

import json
from collections import Counter

import pytest

from tests.runs import FaultyTrainer, compose_run, learning, read_metrics, run

pytestmark = pytest.mark.slow


def test_rollout_and_judge_killed_mid_step(tmp_path, model_build_dir, warm_policy, shared_ray):
    """On the collective path (gloo): a restarted engine is out of the weight-transfer group,
    so the driver loads it through the object store and the run syncs that way from then
    on; both sync paths run (the object store alone is the same recovery minus the switch)."""
    cfg = compose_run(
        tmp_path,
        model_build_dir,
        *learning(warm_policy),
        "trainer.total_steps=2",
        "rollout.prompts_per_step=6",
        "rollout.num_workers=2",
        "judge.num_workers=2",
        "logging.samples_per_step=1000",
        "trainer.sync.transport=gloo",
        "trainer.sync.verify=true",
        "trainer.lr=1e-3",  # the policy moves well beyond verify_tol in one step
        "rollout.backend=vllm",
        "rollout.kv_cache_space_gib=0.1",
    )
    trainer = FaultyTrainer(cfg)
    trainer.kill_workers_at_collect = 2
    trainer.kill_worker_index = 1  # rollout-1 and judge-1: chunks 1 and 3 of 4
    run(trainer, shutdown_ray=False)  # the cluster is shared_ray's
    assert trainer.transport == "object_store"
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert r["prompts"] == 6 and r["responses"] == 6 * cfg.rollout.samples_per_prompt
        assert r["train_grad_norm"] > 0
        assert r["sync_max_logprob_diff"] <= cfg.trainer.sync.verify_tol
    # Exactly the killed workers' chunks were run again: chunk i samples on rollout worker
    # i % 2 (chunks 1 and 3), and the least-loaded dispatch chose each chunk's judge.
    assert records[0]["chunks_recovered"] == 0
    assert trainer.killed_chunks >= {1, 3}
    assert records[1]["chunks_recovered"] == len(trainer.killed_chunks)
    # The restarted engine was reloaded with the policy trained in step 1 before it resampled:
    # it matches the learner, and that policy is measurably not the one it started with.
    assert records[1]["sync_recovery_max_logprob_diff"] <= cfg.trainer.sync.verify_tol
    assert records[0]["sync_policy_moved"] > 20 * cfg.trainer.sync.verify_tol
    # Every row trained was sampled by the current policy (none by a stale engine).
    assert records[1]["train_stale_frac"] == 0.0
    # Nothing lost, nothing twice: each prompt of the step appears exactly G times.
    samples = [
        json.loads(x) for x in (tmp_path / "samples" / "step_000002.jsonl").read_text().splitlines()
    ]
    counts = Counter(s["uid"] for s in samples)
    assert len(counts) == 6 and set(counts.values()) == {cfg.rollout.samples_per_prompt}
    assert sorted(Counter((s["uid"], s["group_index"]) for s in samples).values()) == [1] * len(
        samples
    )
