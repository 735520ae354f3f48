"""Weight sync is exact: after a sync the rollout engine scores a fixed sequence exactly as
the learner does, and differently from before the update (real Ray, DeepSpeed ZeRO-3 on 2
gloo ranks, vLLM's CPU build)."""

import pytest
import ray
import torch

from capo_dist.learner import LearnerConfig
from capo_dist.learner_group import LearnerGroup
from capo_dist.rollout_worker import RolloutWorker
from capo_dist.trainer import load_problems, prepare_policy
from capo_dist.types import TrainBatch
from tests.runs import compose_run

pytestmark = pytest.mark.slow


def test_sync_makes_engine_match_learner(tmp_path, model_build_dir):
    # vLLM here; HF's load_weights is pinned against plain transformers in tests/engines.
    cfg = compose_run(
        tmp_path, model_build_dir, "rollout.backend=vllm", "rollout.num_cpus_per_worker=2"
    )
    model = prepare_policy(cfg, load_problems(cfg)[2])
    ray.init(num_cpus=6, include_dashboard=False)
    try:
        learners = LearnerGroup(
            LearnerConfig(model_path=model, lr=3e-3, micro_batch_size=4), num_learners=2
        )
        engine = RolloutWorker.options(name="rollout-0").remote(
            cfg.rollout, model, "float32", cfg.data.prompt_template, 0
        )
        # Ray alone would pin this actor's torch to 1 thread (OMP_NUM_THREADS=1).
        threads = ray.get(engine.__ray_call__.remote(lambda _: torch.get_num_threads()))
        assert threads == 2
        prompt, cont = list(range(5, 25)), list(range(100, 140))
        ids = torch.tensor([prompt + cont])
        before = torch.tensor(ray.get(engine.sequence_logprobs.remote(prompt, cont)))
        learner_before = learners.compute_logprobs(ids, torch.ones_like(ids))[0, len(prompt) :]
        torch.testing.assert_close(before, learner_before, atol=2e-4, rtol=0)

        # One real PPO update on random data moves the learner's weights.
        g = torch.Generator().manual_seed(0)
        B, L = 8, 48
        batch = TrainBatch(
            input_ids=torch.randint(3, 500, (B, L), generator=g),
            attention_mask=torch.ones(B, L, dtype=torch.long),
            loss_mask=torch.cat([torch.zeros(B, 8), torch.ones(B, L - 8)], 1),
            advantages=torch.randn(B, L, generator=g),
            sampler_logprobs=torch.zeros(B, L),
        )
        metrics = learners.train_step(batch)
        assert metrics["skipped"] == 0.0
        learner_after = learners.compute_logprobs(ids, torch.ones_like(ids))[0, len(prompt) :]
        assert (learner_after - learner_before).abs().max() > 1e-3

        stale = torch.tensor(ray.get(engine.sequence_logprobs.remote(prompt, cont)))
        torch.testing.assert_close(stale, before)  # nothing reached the engine yet

        refs = learners.gather_weight_buckets(256 << 10)  # small buckets: several of them
        assert len(refs) > 1
        ray.get(engine.load_weights.remote(refs, 1))
        after = torch.tensor(ray.get(engine.sequence_logprobs.remote(prompt, cont)))
        torch.testing.assert_close(after, learner_after, atol=2e-4, rtol=0)
        assert (after - before).abs().max() > 1e-3
        learners.shutdown()
    finally:
        ray.shutdown()
