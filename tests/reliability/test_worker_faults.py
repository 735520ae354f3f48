"""Worker faults with real processes: SIGKILL a rollout worker and a judge worker while a
step is in flight; the step completes on restarted workers with every prompt trained
exactly once. SIGKILL a learner rank: the run stops with a clear message and
`trainer.resume=auto` continues from the last checkpoint."""

import json
import os
import signal
from collections import Counter

import pytest
import ray

from capo_dist.trainer import LearnerDiedError, Trainer
from tests.runs import compose_run, read_metrics

pytestmark = pytest.mark.slow


def pid_of(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


class FaultyTrainer(Trainer):
    """The real Trainer, with processes SIGKILLed at chosen points (fault injection only)."""

    kill_workers_at_collect: int | None = None  # kill when step N's collection is submitted
    kill_learner_at_step: int | None = None  # kill learner-1 before step N trains

    def _collect(self):
        pids = []
        if self.kill_workers_at_collect == self.step + 1:
            pids = [pid_of(self.rollout[0]), pid_of(self.judges[0])]
        pending = super()._collect()
        for pid in pids:  # the chunks are queued or running on these actors now
            os.kill(pid, signal.SIGKILL)
        if pids:
            self.kill_workers_at_collect = None
        return pending

    def _learners(self, method, *args):
        if method == "train_step" and self.kill_learner_at_step == self.step + 1:
            os.kill(pid_of(self.learners.actors[1]), signal.SIGKILL)
        return super()._learners(method, *args)


def run(trainer: Trainer) -> None:
    try:
        trainer.run()
    finally:
        trainer.close()


def test_rollout_and_judge_killed_mid_step(tmp_path, model_build_dir):
    """On the collective path (gloo): a restarted engine is out of the weight-transfer group,
    so the driver loads it through the object store and the run syncs that way from then
    on; both sync paths run (the object store alone is the same recovery minus the switch)."""
    cfg = compose_run(
        tmp_path,
        model_build_dir,
        "trainer.total_steps=2",
        "rollout.prompts_per_step=6",
        "logging.samples_per_step=1000",
        "trainer.sync.transport=gloo",
        "rollout.backend=vllm",
        "rollout.kv_cache_space_gib=0.1",
    )
    trainer = FaultyTrainer(cfg)
    trainer.kill_workers_at_collect = 2
    run(trainer)
    assert trainer.transport == "object_store"
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    assert records[1]["chunks_recovered"] >= 1
    for r in records:
        assert r["prompts"] == 6 and r["responses"] == 6 * cfg.rollout.samples_per_prompt
    # Nothing lost, nothing twice: each prompt of the step appears exactly G times.
    samples = [
        json.loads(x) for x in (tmp_path / "samples" / "step_000002.jsonl").read_text().splitlines()
    ]
    counts = Counter(s["uid"] for s in samples)
    assert len(counts) == 6 and set(counts.values()) == {cfg.rollout.samples_per_prompt}
    assert sorted(Counter((s["uid"], s["group_index"]) for s in samples).values()) == [1] * len(
        samples
    )


def test_learner_killed_stops_clearly_then_resumes(tmp_path, model_build_dir):
    cfg = compose_run(
        tmp_path, model_build_dir, "trainer.total_steps=3", "trainer.checkpoint_every=1"
    )
    trainer = FaultyTrainer(cfg)
    trainer.kill_learner_at_step = 2
    with pytest.raises(
        LearnerDiedError, match=r"learner rank died .* step 2.*step_00000001.*trainer.resume=auto"
    ):
        run(trainer)
    cfg = compose_run(
        tmp_path,
        model_build_dir,
        "trainer.total_steps=3",
        "trainer.checkpoint_every=1",
        "trainer.resume=auto",
    )
    run(Trainer(cfg))
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
