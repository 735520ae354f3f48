"""The learner on a real 2-rank DeepSpeed ZeRO-3 group (gloo, CPU) under Ray.

Every check compares against plain single-process torch on the same Hugging
Face model: the same batch, the same `ppo_clip_loss`, the same AdamW and
schedule, each mini-batch as one padded forward in one process. Three groups
share one Ray cluster: `learners` (the default PPO configuration: token-mean
loss, padded micro-batches), `ppo_learners` (two PPO epochs, KL to a frozen
reference, truncated IS, cosine schedule after warmup, weight decay, and the
long-response options: seq-mean-token-mean loss, packed token-budget
micro-batches, chunked log-probs, gradient checkpointing) and `bf16_learners`
(bf16 weights, Dr. GRPO's constant-normalised loss). Each group saves a checkpoint right
after start-up, and tests that need the initial state load it first, so the
tests do not depend on their order (and exercise optimizer/scheduler
restore).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import ray
import torch

from capo_dist.deepspeed_setup import lr_multiplier
from capo_dist.learner import LearnerConfig
from capo_dist.learner_group import LearnerGroup
from capo_dist.packing import plan_micro_batches
from capo_dist.rewards.loss import loss_token_weights, ppo_clip_loss, token_logprobs
from capo_dist.types import TrainBatch
from capo_dist.weight_sync import WeightBucket, plan_buckets

pytestmark = pytest.mark.slow

BUCKET_BYTES = 64 << 10  # many buckets even for the tiny model
PACK_TOKENS = 24  # ppo_learners' token budget per micro-batch


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster for this module (logical CPUs, so 4 actors fit on 2 cores)."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


class Group:
    """A learner group plus the checkpoint of its initial state."""

    def __init__(self, group: LearnerGroup, initial: Path) -> None:
        self.group = group
        self.initial = initial
        group.save_checkpoint(str(initial))

    def reset(self) -> None:
        assert self.group.load_checkpoint(str(self.initial)) == 0


def _group(config: LearnerConfig, name: str, tmp: Path) -> Group:
    return Group(LearnerGroup(config, num_learners=2, name=name), tmp / f"{name}-initial")


@pytest.fixture(scope="module")
def learners(ray_cluster, tiny_model_path: str, tmp_path_factory: pytest.TempPathFactory):
    cfg = LearnerConfig(model_path=tiny_model_path, lr=1e-3, micro_batch_size=2, grad_clip=1.0)
    g = _group(cfg, "learner", tmp_path_factory.mktemp("ckpt"))
    yield g
    g.group.shutdown()


@pytest.fixture(scope="module")
def ppo_learners(ray_cluster, tiny_model_path: str, tmp_path_factory: pytest.TempPathFactory):
    cfg = LearnerConfig(
        model_path=tiny_model_path,
        lr=2e-3,
        warmup_steps=2,
        lr_schedule="cosine",
        total_optimizer_steps=5,
        min_lr_ratio=0.25,
        weight_decay=0.01,
        grad_clip=0.5,
        ppo_epochs=2,
        mini_batches=2,
        micro_batch_size=1,
        clip_low=0.1,
        clip_high=0.3,
        kl_coef=0.2,
        tis_cap=2.0,
        loss_agg="seq_mean_token_mean",
        max_tokens_per_micro_batch=PACK_TOKENS,
        logprob_chunk_size=7,
        gradient_checkpointing=True,
    )
    g = _group(cfg, "ppo-learner", tmp_path_factory.mktemp("ckpt"))
    yield g
    g.group.shutdown()


@pytest.fixture(scope="module")
def bf16_learners(ray_cluster, tiny_model_path: str, tmp_path_factory: pytest.TempPathFactory):
    cfg = LearnerConfig(
        model_path=tiny_model_path,
        dtype="bfloat16",
        lr=1e-3,
        micro_batch_size=2,
        grad_clip=1.0,
        loss_agg="seq_mean_token_sum_norm",
        loss_agg_norm_tokens=16,
    )
    g = _group(cfg, "bf16-learner", tmp_path_factory.mktemp("ckpt"))
    yield g
    g.group.shutdown()


# ---------------------------------------------------------------- plain-torch reference


def hf_model(path: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_logprobs(model: torch.nn.Module, ids: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
    """Plain HF forward on right-padded rows, then the shared `token_logprobs`."""
    return token_logprobs(model(input_ids=ids, attention_mask=att).logits, ids)


def hf_entropy_sum(model: torch.nn.Module, batch: TrainBatch) -> float:
    """Σ over loss tokens of the policy's entropy at the position predicting them."""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logp = torch.log_softmax(logits[:, :-1].float(), -1)
        ent = -(logp.exp() * logp).sum(-1)
    return float((ent * batch.loss_mask[:, 1:]).sum())


def gathered(group: LearnerGroup) -> dict[str, torch.Tensor]:
    """The learner's full weights, through the weight-sync path."""
    refs = group.gather_weight_buckets(BUCKET_BYTES)
    return {n: t.clone() for b in ray.get(refs) for n, t in b.unpack()}


def model_with(path: str, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = hf_model(path)
    model.load_state_dict(weights, strict=True)
    return model


def make_batch(model: torch.nn.Module, rows: int, seed: int) -> TrainBatch:
    """Right-padded rows of varied prompt/response lengths; sampler log-probs = policy + noise."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    plen = torch.randint(3, 7, (rows,), generator=g)
    rlen = torch.randint(4, 13, (rows,), generator=g)
    width = int((plen + rlen).max())
    ids = torch.full((rows, width), model.config.pad_token_id, dtype=torch.long)
    att = torch.zeros(rows, width, dtype=torch.long)
    loss_mask = torch.zeros(rows, width)
    for r in range(rows):
        n = int(plen[r] + rlen[r])
        ids[r, :n] = torch.randint(3, vocab, (n,), generator=g)
        att[r, :n] = 1
        loss_mask[r, int(plen[r]) : n] = 1
    adv = torch.randn(rows, width, generator=g) * loss_mask
    with torch.no_grad():
        sampler = (
            hf_logprobs(model, ids, att) + 0.3 * torch.randn(rows, width, generator=g)
        ) * loss_mask
    return TrainBatch(ids, att, loss_mask, adv, sampler)


def mini_batch_rows(rows: int, world_size: int, mini_batches: int) -> list[torch.Tensor]:
    """The global rows of each mini-batch: rank r trains rows r::W, its mini-batch i is i::M of those."""
    shards = [torch.arange(r, rows, world_size) for r in range(world_size)]
    return [torch.cat([s[i::mini_batches] for s in shards]) for i in range(mini_batches)]


def packed_plans(batch: TrainBatch, world_size: int, mini_batches: int) -> list[list[list]]:
    """[mini-batch][rank] -> the token-budget micro-batches (row lists) that rank plans."""
    lengths = batch.attention_mask.sum(-1)
    plans = []
    for i in range(mini_batches):
        per_rank = []
        for r in range(world_size):
            rows = torch.arange(r, len(batch), world_size)[i::mini_batches]
            per_rank.append(plan_micro_batches(rows, lengths[rows], 1, PACK_TOKENS))
        plans.append(per_rank)
    return plans


def reference_update(
    model: torch.nn.Module, batch: TrainBatch, cfg: LearnerConfig, world_size: int = 2
) -> dict[str, float]:
    """The learner's PPO update in one process, each mini-batch as ONE forward; its metrics."""
    ref_model = copy.deepcopy(model) if cfg.kl_coef > 0 else None
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.lr,
        betas=cfg.adam_betas,
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_multiplier(k, cfg))
    with torch.no_grad():
        old = hf_logprobs(model, batch.input_ids, batch.attention_mask)
        ref = hf_logprobs(ref_model, batch.input_ids, batch.attention_mask) if ref_model else None
    keys = ("clip_frac", "approx_kl", "kl")
    losses, sums = [], dict.fromkeys((*keys, "entropy"), 0.0)
    model.train()
    for _ in range(cfg.ppo_epochs):
        for rows in mini_batch_rows(len(batch), world_size, cfg.mini_batches):
            mb = TrainBatch(*(t[rows] for t in batch.tensors()))
            lr = opt.param_groups[0]["lr"]
            n_tokens = float(mb.loss_mask.sum())
            n_seqs = float((mb.loss_mask.sum(-1) > 0).sum())
            weights = loss_token_weights(
                mb.loss_mask, cfg.loss_agg, n_tokens, n_seqs, cfg.loss_agg_norm_tokens
            )
            sums["entropy"] += hf_entropy_sum(model, mb)
            loss, st = ppo_clip_loss(
                hf_logprobs(model, mb.input_ids, mb.attention_mask),
                old[rows],
                mb.advantages,
                mb.loss_mask,
                clip_low=cfg.clip_low,
                clip_high=cfg.clip_high,
                ref_logprobs=ref[rows] if ref is not None else None,
                kl_coef=cfg.kl_coef,
                sampler_logprobs=mb.sampler_logprobs,
                tis_cap=cfg.tis_cap,
                token_weights=weights,
            )
            opt.zero_grad()
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            for k in keys:
                sums[k] += st[k] * n_tokens
    model.eval()
    total = float(batch.loss_mask.sum()) * cfg.ppo_epochs
    return {
        "loss": sum(losses) / len(losses),
        "grad_norm": grad_norm,
        "lr": lr,
        "steps": float(len(losses)),
        **{k: v / total for k, v in sums.items()},
    }


def assert_weights_close(got: dict[str, torch.Tensor], model: torch.nn.Module, atol: float) -> None:
    want = dict(model.named_parameters())
    assert list(got) == list(want)
    for name, t in got.items():
        torch.testing.assert_close(t, want[name].detach(), atol=atol, rtol=1e-4, msg=name)


# ---------------------------------------------------------------- tests


def test_actors_are_named_ranks(learners: Group) -> None:
    assert ray.get_actor("learner-0") is not None and ray.get_actor("learner-1") is not None
    assert learners.group.setup_info["num_parameters"] > 0
    assert learners.group.setup_info["gradient_checkpointing"] == 0.0


def test_gather_weight_buckets_returns_the_checkpoint(
    learners: Group, tiny_model_path: str
) -> None:
    learners.reset()
    specs = learners.group.weight_specs()
    refs = learners.group.gather_weight_buckets(BUCKET_BYTES)
    plan = plan_buckets(specs, BUCKET_BYTES)
    assert len(refs) == len(plan) > 2
    buckets: list[WeightBucket] = ray.get(refs)
    assert [b.specs for b in buckets] == plan
    got = {n: t for b in buckets for n, t in b.unpack()}
    want = dict(hf_model(tiny_model_path).named_parameters())
    assert list(got) == list(want)  # HF names, in named_parameters order
    for name, t in got.items():
        assert torch.equal(t, want[name].detach()), name


def test_train_step_matches_single_process_reference(learners: Group, tiny_model_path: str) -> None:
    learners.reset()
    cfg = learners.group.config
    model = hf_model(tiny_model_path)
    batch = make_batch(model, rows=7, seed=1)  # ranks get 4 and 3 rows: 2 micro-batches each
    metrics = learners.group.train_step(batch)
    ref = reference_update(model, batch, cfg)
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), metrics
    assert metrics["skipped"] == 0 and metrics["steps"] == 1
    assert metrics["tokens"] == float(batch.loss_mask.sum())
    assert metrics["loss"] == pytest.approx(ref["loss"], rel=1e-5, abs=1e-6)
    assert metrics["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
    assert metrics["lr"] == pytest.approx(cfg.lr)
    assert metrics["entropy"] == pytest.approx(ref["entropy"], rel=1e-5)
    after = gathered(learners.group)
    assert_weights_close(after, model, atol=2e-5)
    initial = dict(hf_model(tiny_model_path).named_parameters())
    assert any(not torch.equal(after[n], initial[n].detach()) for n in after)


def test_stale_rows_take_the_ratio_against_the_sampler(
    learners: Group, tiny_model_path: str
) -> None:
    """One optimizer step: a fresh batch has ratio exactly 1 (old = current); the same batch
    sampled one version behind the learner has ratio min(π/μ, cap) against the engine's μ."""
    model = hf_model(tiny_model_path)
    batch = make_batch(model, rows=6, seed=7)
    batch.policy_version = torch.zeros(len(batch), dtype=torch.long)
    learners.reset()
    fresh = learners.group.train_step(batch, 0)
    assert fresh["ratio_mean"] == 1.0 and fresh["stale_frac"] == 0.0
    learners.reset()
    stale = learners.group.train_step(batch, 1)
    with torch.no_grad():
        lp = hf_logprobs(model, batch.input_ids, batch.attention_mask)
    cap = learners.group.config.stale_ratio_cap
    ratio = torch.exp(lp - batch.sampler_logprobs).clamp(max=cap)
    mask = batch.loss_mask
    assert stale["stale_frac"] == 1.0
    assert stale["ratio_mean"] == pytest.approx(float((ratio * mask).sum() / mask.sum()), rel=1e-4)
    assert abs(stale["ratio_mean"] - 1.0) > 1e-3
    assert stale["loss"] != pytest.approx(fresh["loss"], rel=1e-3)


def test_ppo_epochs_mini_batches_kl_and_tis_match_reference(
    ppo_learners: Group, tiny_model_path: str
) -> None:
    ppo_learners.reset()
    cfg = ppo_learners.group.config
    model = hf_model(tiny_model_path)
    # Ranks get 4 and 3 rows, split into 2 mini-batches packed into micro-batches of
    # at most PACK_TOKENS tokens: the plan below (what each rank computes) holds a
    # micro-batch of two packed sequences, and a rank that runs a dummy micro-batch.
    batch = make_batch(model, rows=7, seed=2)
    plans = packed_plans(batch, world_size=2, mini_batches=2)
    assert any(len(mb) == 2 for plan in plans for rank in plan for mb in rank)
    assert any(len(plan[0]) != len(plan[1]) for plan in plans)
    assert ppo_learners.group.setup_info["gradient_checkpointing"] == 1.0
    metrics = ppo_learners.group.train_step(batch)
    ref = reference_update(model, batch, cfg)
    assert metrics["steps"] == ref["steps"] == 4 and metrics["skipped"] == 0
    assert metrics["loss"] == pytest.approx(ref["loss"], rel=1e-4, abs=1e-6)
    assert metrics["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
    # cosine after 2 warm-up updates, down to 0.25·lr at update 5: update k=3 is 1/3 down
    assert metrics["lr"] == pytest.approx(ref["lr"]) == pytest.approx(cfg.lr * 0.8125)
    for key in ("clip_frac", "approx_kl", "kl", "entropy"):
        assert metrics[key] == pytest.approx(ref[key], rel=1e-3, abs=1e-6), key
    assert metrics["kl"] > 0 and metrics["approx_kl"] > 0 and metrics["clip_frac"] > 0
    assert_weights_close(gathered(ppo_learners.group), model, atol=5e-5)


def test_bf16_step_follows_the_fp32_reference(bf16_learners: Group, tiny_model_path: str) -> None:
    """bf16 weights, fp32 master weights: the update goes where the fp32 one goes."""
    bf16_learners.reset()
    initial = {n: p.detach().clone() for n, p in hf_model(tiny_model_path).named_parameters()}
    model = hf_model(tiny_model_path)
    batch = make_batch(model, rows=6, seed=6)
    metrics = bf16_learners.group.train_step(batch)
    ref = reference_update(model, batch, bf16_learners.group.config)
    assert metrics["skipped"] == 0
    assert metrics["loss"] == pytest.approx(ref["loss"], rel=2e-2, abs=1e-3)
    assert metrics["grad_norm"] == pytest.approx(ref["grad_norm"], rel=5e-2)
    after = gathered(bf16_learners.group)
    assert all(t.dtype == torch.bfloat16 for t in after.values())
    got = torch.cat([(after[n].float() - initial[n].bfloat16().float()).flatten() for n in after])
    want = torch.cat([(p.detach() - initial[n]).flatten() for n, p in model.named_parameters()])
    assert got.abs().sum() > 0
    assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.9


def test_compute_logprobs_matches_hf(learners: Group, tiny_model_path: str) -> None:
    model = model_with(tiny_model_path, gathered(learners.group))
    batch = make_batch(model, rows=5, seed=3)
    got = learners.group.compute_logprobs(batch.input_ids, batch.attention_mask)
    with torch.no_grad():
        want = hf_logprobs(model, batch.input_ids, batch.attention_mask) * batch.attention_mask
    assert got.shape == batch.input_ids.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_nan_advantages_skip_the_update(learners: Group, tiny_model_path: str) -> None:
    before = gathered(learners.group)
    batch = make_batch(hf_model(tiny_model_path), rows=4, seed=4)
    batch.advantages[1, batch.loss_mask[1].bool()] = float("nan")
    metrics = learners.group.train_step(batch)
    assert metrics["skipped"] == 1
    after = gathered(learners.group)
    assert all(torch.equal(after[n], before[n]) for n in before)
    batch.advantages.nan_to_num_(0.5)
    metrics = learners.group.train_step(batch)
    assert metrics["skipped"] == 0 and torch.isfinite(torch.tensor(metrics["grad_norm"]))
    after = gathered(learners.group)
    assert all(torch.isfinite(t).all() for t in after.values())
    assert any(not torch.equal(after[n], before[n]) for n in before)


def test_checkpoint_round_trip(learners: Group, tiny_model_path: str, tmp_path: Path) -> None:
    batch = make_batch(hf_model(tiny_model_path), rows=4, seed=5)
    learners.group.train_step(batch)
    saved = gathered(learners.group)
    learners.group.save_checkpoint(str(tmp_path / "ckpt"))
    learners.group.train_step(batch)
    moved = gathered(learners.group)
    assert any(not torch.equal(moved[n], saved[n]) for n in saved)
    restored_step = learners.group.load_checkpoint(str(tmp_path / "ckpt"))
    assert restored_step >= 1
    restored = gathered(learners.group)
    assert all(torch.equal(restored[n], saved[n]) for n in saved)
    # The optimizer state came back too: the same step from the same state lands on the same weights.
    learners.group.train_step(batch)
    again = gathered(learners.group)
    assert all(torch.equal(again[n], moved[n]) for n in moved)


def test_export_hf_reloads_with_auto_model(learners: Group, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weights = gathered(learners.group)
    out = tmp_path / "hf"
    learners.group.export_hf(str(out))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(weights)
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert dict(model.named_parameters()).keys() == weights.keys()
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), weights[name]), name
    assert AutoTokenizer.from_pretrained(str(out)).pad_token == "<|pad|>"


class _Payload:
    """A pickle that runs a command when unpickled (what a tampered checkpoint would hold)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_tampered_checkpoint_is_refused_without_running_code(
    learners: Group, tmp_path: Path
) -> None:
    """Checkpoints load with torch.load(weights_only=True): a pickled payload is refused."""
    learners.group.save_checkpoint(str(tmp_path / "ckpt"))
    marker = tmp_path / "pwned"
    optim_files = list((tmp_path / "ckpt").glob("*/*optim_states.pt"))
    assert len(optim_files) == 2  # one per rank: tamper both, so no rank waits on the other
    for path in optim_files:
        torch.save({"optimizer_state_dict": _Payload(str(marker))}, path)
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        learners.group.load_checkpoint(str(tmp_path / "ckpt"))
    assert not marker.exists()
