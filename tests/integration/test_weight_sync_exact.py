"""Weight sync is exact: after a sync every rollout engine scores a fixed sequence exactly as
the learner does, and differently from before the update (real Ray, DeepSpeed ZeRO-3 on 2
gloo ranks, vLLM's CPU build).

Two paths: the object store (`load_weights`), and the collective path of
`trainer.sync.transport=gloo` — learner rank 0 broadcasting into TWO engines through
vLLM's weight-transfer API, our "capo_gloo" engine standing in for vLLM's "nccl" one."""

import dataclasses
import time

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

PROMPT, CONT = list(range(5, 25)), list(range(100, 140))
IDS = torch.tensor([PROMPT + CONT])
BUCKET_BYTES = 256 << 10  # small buckets: several of them


def ppo_batch() -> TrainBatch:
    """Random rows and advantages: one real PPO update on them moves the weights."""
    g = torch.Generator().manual_seed(0)
    B, L = 8, 48
    return TrainBatch(
        input_ids=torch.randint(3, 500, (B, L), generator=g),
        attention_mask=torch.ones(B, L, dtype=torch.long),
        loss_mask=torch.cat([torch.zeros(B, 8), torch.ones(B, L - 8)], 1),
        advantages=torch.randn(B, L, generator=g),
        sampler_logprobs=torch.zeros(B, L),
    )


def learner_logprobs(learners: LearnerGroup) -> torch.Tensor:
    return learners.compute_logprobs(IDS, torch.ones_like(IDS))[0, len(PROMPT) :]


def engine_logprobs(engine) -> torch.Tensor:
    return torch.tensor(ray.get(engine.sequence_logprobs.remote(PROMPT, CONT)))


def wait_all(refs: list, timeout_s: float) -> list:
    """All results, or an error once `timeout_s` passes (a broken rendezvous hangs otherwise)."""
    done, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if pending:
        raise TimeoutError(f"{len(pending)} of {len(refs)} calls still running after {timeout_s}s")
    return ray.get(refs)


def stop(learners: LearnerGroup, engines: list) -> None:
    """End the test's actors: the Ray cluster (`shared_ray`) goes on to the next test."""
    learners.shutdown()
    for engine in engines:
        ray.kill(engine, no_restart=True)


def vllm_run_and_model(tmp_path, model_build_dir):
    """The run config of the collective tests (small vLLM engines) and its tiny policy."""
    cfg = compose_run(
        tmp_path,
        model_build_dir,
        "rollout.backend=vllm",
        "rollout.kv_cache_space_gib=0.1",
        "rollout.max_model_len=256",
    )
    return cfg, prepare_policy(cfg, load_problems(cfg)[2])


def join_train_sync_check(learners: LearnerGroup, engines: list, plan) -> None:
    """Form the group, take one PPO step, sync collectively; every engine then matches."""
    refs = [e.init_weight_transfer.remote(i) for e, i in zip(engines, plan.init_infos, strict=True)]
    refs.append(learners.init_weight_sync(plan, "gloo", 60.0))
    wait_all(refs, timeout_s=120)

    before = [engine_logprobs(e) for e in engines]
    learner_before = learner_logprobs(learners)
    for b in before:
        torch.testing.assert_close(b, learner_before, atol=2e-4, rtol=0)

    assert learners.train_step(ppo_batch())["skipped"] == 0.0
    learner_after = learner_logprobs(learners)
    assert (learner_after - learner_before).abs().max() > 1e-3

    # The driver's order: engines enter their receive, learners broadcast, wait for all.
    receives = [e.receive_weights.remote(plan.update_info, 1) for e in engines]
    sends = learners.broadcast_weights(BUCKET_BYTES)
    wait_all(receives + sends, timeout_s=120)
    for e, b in zip(engines, before, strict=True):
        after = engine_logprobs(e)
        torch.testing.assert_close(after, learner_after, atol=2e-4, rtol=0)
        assert (after - b).abs().max() > 1e-3
    assert ray.get([e.state.remote() for e in engines]) == [{"calls": 0, "version": 1}] * len(
        engines
    )


def test_sync_makes_engine_match_learner(tmp_path, model_build_dir, shared_ray):
    # vLLM here; HF's load_weights is pinned against plain transformers in tests/engines.
    cfg = compose_run(
        tmp_path, model_build_dir, "rollout.backend=vllm", "rollout.num_cpus_per_worker=2"
    )
    model = prepare_policy(cfg, load_problems(cfg)[2])
    learners = LearnerGroup(
        LearnerConfig(model_path=model, lr=3e-3, micro_batch_size=4), num_learners=2
    )
    engine = RolloutWorker.options(name="rollout-0").remote(
        cfg.rollout, model, "float32", cfg.data.prompt_template, 0
    )
    try:
        # Ray alone would pin this actor's torch to 1 thread (OMP_NUM_THREADS=1).
        threads = ray.get(engine.__ray_call__.remote(lambda _: torch.get_num_threads()))
        assert threads == 2
        before = engine_logprobs(engine)
        learner_before = learner_logprobs(learners)
        torch.testing.assert_close(before, learner_before, atol=2e-4, rtol=0)

        metrics = learners.train_step(ppo_batch())
        assert metrics["skipped"] == 0.0
        learner_after = learner_logprobs(learners)
        assert (learner_after - learner_before).abs().max() > 1e-3

        stale = engine_logprobs(engine)
        torch.testing.assert_close(stale, before)  # nothing reached the engine yet

        refs = learners.gather_weight_buckets(BUCKET_BYTES)
        assert len(refs) > 1
        ray.get(engine.load_weights.remote(refs, 1))
        after = engine_logprobs(engine)
        torch.testing.assert_close(after, learner_after, atol=2e-4, rtol=0)
        assert (after - before).abs().max() > 1e-3
    finally:
        stop(learners, [engine])


def test_gloo_collective_sync_reaches_two_engines(tmp_path, model_build_dir, shared_ray):
    """The `trainer.sync.transport=gloo` path with 2 learner ranks and 2 vLLM engines (TP=1).

    First a plan whose engines all claim rank_offset 1 (bug 2): the group
    cannot form and every side fails within its timeout instead of hanging.
    Then the real plan: the same engines join, and one PPO update reaches both.
    """
    cfg, model = vllm_run_and_model(tmp_path, model_build_dir)
    learners = LearnerGroup(
        LearnerConfig(model_path=model, lr=3e-3, micro_batch_size=4), num_learners=2
    )
    engines = [
        RolloutWorker.options(
            name=f"rollout-{i}",
            runtime_env={"env_vars": {"CAPO_WEIGHT_SYNC_TIMEOUT_S": "20"}},
        ).remote(
            cfg.rollout,
            model,
            "float32",
            cfg.data.prompt_template,
            i,
            {"weight_transfer_backend": "capo_gloo"},
        )
        for i in range(2)
    ]
    try:
        ray.get([e.state.remote() for e in engines])  # both engines up before any rendezvous
        # Bug 2: every engine at rank_offset 1 (two workers claim rank 1, rank 2 never comes).
        broken = learners.collective_sync_plan(BUCKET_BYTES, [1, 1])
        broken = dataclasses.replace(
            broken, init_infos=[{**info, "rank_offset": 1} for info in broken.init_infos]
        )
        start = time.monotonic()
        refs = [
            e.init_weight_transfer.remote(i)
            for e, i in zip(engines, broken.init_infos, strict=True)
        ]
        refs.append(learners.init_weight_sync(broken, "gloo", 20.0))
        with pytest.raises(Exception):  # noqa: B017 - the first side to time out
            wait_all(refs, timeout_s=90)
        for ref in refs:  # every side gave up waiting for rank 2, none is left hanging
            with pytest.raises(Exception, match=r"wait timeout .*keys: \S*/2\b"):
                ray.get(ref, timeout=90)
        assert time.monotonic() - start < 150

        plan = learners.collective_sync_plan(BUCKET_BYTES, [1, 1])
        assert [i["rank_offset"] for i in plan.init_infos] == [1, 2] and plan.world_size == 3
        join_train_sync_check(learners, engines, plan)
    finally:
        stop(learners, engines)


def test_gloo_collective_sync_reaches_a_tensor_parallel_engine(
    tmp_path, model_build_dir, shared_ray
):
    """A TP=2 vLLM CPU engine (two worker processes, ranks 1-2) beside a TP=1 one (rank 3).

    vLLM's CPU build runs TP with the mp executor; its automatic thread
    binding wants one NUMA node per worker, so the cores are given by hand
    (`VLLM_CPU_OMP_THREADS_BIND`, one list per TP rank).
    """
    cfg, model = vllm_run_and_model(tmp_path, model_build_dir)
    learners = LearnerGroup(
        LearnerConfig(model_path=model, lr=3e-3, micro_batch_size=4), num_learners=2
    )
    engines = []
    for i, tp in enumerate((2, 1)):
        kwargs = {"weight_transfer_backend": "capo_gloo"}
        if tp > 1:
            kwargs["distributed_executor_backend"] = "mp"
        engines.append(
            RolloutWorker.options(
                name=f"rollout-{i}",
                runtime_env={"env_vars": {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}},
            ).remote(
                dataclasses.replace(cfg.rollout, tensor_parallel_size=tp),
                model,
                "float32",
                cfg.data.prompt_template,
                i,
                kwargs,
            )
        )
    try:
        ray.get([e.state.remote() for e in engines])
        plan = learners.collective_sync_plan(BUCKET_BYTES, [2, 1])
        assert [i["rank_offset"] for i in plan.init_infos] == [1, 3] and plan.world_size == 4
        join_train_sync_check(learners, engines, plan)
    finally:
        stop(learners, engines)
