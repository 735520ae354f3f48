"""The learner role (`learner-0`, `learner-1`, …): the DeepSpeed ZeRO-3 rank actor.

W ranks, one Ray actor each, form one DeepSpeed data-parallel group (NCCL on
GPU, gloo on CPU — DeepSpeed picks its accelerator and backend itself). Each
rank trains on its shard of a `TrainBatch` (rows rank::W). This file is the
actor: set-up (policy engine, optional frozen reference for the k3 KL term,
optimizer and learning-rate schedule), weight gathering for sync and export,
checkpoints. The PPO update itself (micro-batches, old/reference log-prob
passes, loss aggregation, off-policy correction, skipped steps) is
`capo_dist.ppo_update`; the engines' module is `capo_dist.logprob_model`'s
`LogprobModel` (log-probs and entropy, optionally chunked over positions).

Every method that touches parameters is a ZeRO-3 collective, so the driver
calls it on ALL ranks at once; `LearnerGroup` (learner_group.py) is the driver-side handle that
does exactly that (and shards / reassembles rows where that applies).

CPU notes (DeepSpeed 0.19.8): the process group comes up without any JIT op
build — `Learner.setup` marks DeepSpeed's shared-memory all-reduce op
(`deepspeed_shm_comm`, only used by DeepSpeed-Inference's
`inference_all_reduce`, never by ZeRO training) as unavailable, which saves a
~40 s C++ build on a fresh machine. The optimizer is `torch.optim.AdamW` as
DeepSpeed's client optimizer with `fused=True`: no op build (DeepSpeedCPUAdam
and DeepSpeed's CPU FusedAdam are JIT-compiled, ~110 s on 2 cores) and the
same speed on CPU (10 M parameters: 0.0106 s per step vs 0.0102 s for
DeepSpeedCPUAdam, vs 0.096 s for the unfused torch AdamW); on GPU it is
torch's fused CUDA kernel.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import ray
import torch

from capo_dist.actor_logs import redirect_output
from capo_dist.checkpoint import fsync_tree
from capo_dist.deepspeed_setup import (
    LR_SCHEDULES,
    deepspeed_config,
    lr_multiplier,
    quiet_deepspeed,
    reference_deepspeed_config,
    skip_shm_comm_op,
    weights_only_checkpoint_engine,
)
from capo_dist.hf_checkpoint import (
    copy_side_files,
    load_checkpoint_weights,
    resolve_checkpoint_dir,
)
from capo_dist.logprob_model import LogprobModel
from capo_dist.ppo_update import PPOUpdate, all_reduce
from capo_dist.rewards.loss import LOSS_AGG_MODES
from capo_dist.tokenization import pad_token_id
from capo_dist.types import TrainBatch
from capo_dist.weight_sync import (
    CollectiveTransport,
    ObjectStoreTransport,
    ParamSpec,
    WeightTransport,
    pack_buckets,
    plan_buckets,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class LearnerConfig:
    """What every learner rank needs: the model, the optimizer and the PPO loss.

    `micro_batch_size` rows go through one forward/backward; every optimizer
    step accumulates gradients over all micro-batches of its mini-batch.
    Each PPO epoch is `mini_batches` optimizer steps over the rank's shard.
    `dtype` is the training precision of the weights ("float32" or
    "bfloat16"; ZeRO-3 keeps fp32 master weights for bf16). The learning rate
    follows `lr_schedule` after a linear warmup of `warmup_steps` optimizer
    steps: "constant", or "cosine" down to `min_lr_ratio`·lr at
    `total_optimizer_steps` (`deepspeed_setup.lr_multiplier`).
    `loss_agg` (`capo_dist.rewards.loss.LOSS_AGG_MODES`) aggregates the token
    losses; `loss_agg_norm_tokens` is Dr. GRPO's constant (the response
    length budget). Memory for long responses: `gradient_checkpointing`
    (HF, non-reentrant), `logprob_chunk_size` (positions per chunk of the LM
    head + log-softmax, 0 = all at once; `capo_dist.logprob_model`),
    `max_tokens_per_micro_batch` (token-budget micro-batches of packed rows
    without padding, 0 = `micro_batch_size` padded rows; `capo_dist.packing`).
    `stale_ratio_cap` caps the behaviour importance weight of stale rows
    (see `train_step`).
    `ref_model_path` (default: `model_path`) is loaded only when
    `kl_coef > 0`.
    """

    model_path: str
    dtype: str = "float32"
    lr: float = 1e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    ppo_epochs: int = 1
    mini_batches: int = 1
    micro_batch_size: int = 8
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    ref_model_path: str | None = None
    tis_cap: float | None = None
    stale_ratio_cap: float = 2.0
    seed: int = 0
    num_gpus_per_learner: float = 0.0
    num_cpus_per_learner: float = 1.0
    loss_agg: str = "token_mean"
    loss_agg_norm_tokens: int = 0
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.0
    total_optimizer_steps: int = 0
    gradient_checkpointing: bool = False
    logprob_chunk_size: int = 0
    max_tokens_per_micro_batch: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"LearnerConfig.dtype={self.dtype!r}; choose one of {sorted(_DTYPES)}")
        for key in ("ppo_epochs", "mini_batches", "micro_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"LearnerConfig.{key}={getattr(self, key)} must be >= 1")
        if self.loss_agg not in LOSS_AGG_MODES:
            raise ValueError(
                f"LearnerConfig.loss_agg={self.loss_agg!r}; choose one of {list(LOSS_AGG_MODES)}"
            )
        if self.loss_agg == "seq_mean_token_sum_norm" and self.loss_agg_norm_tokens < 1:
            raise ValueError("LearnerConfig.loss_agg_norm_tokens must be >= 1 for Dr. GRPO")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"LearnerConfig.lr_schedule={self.lr_schedule!r}; choose one of {list(LR_SCHEDULES)}"
            )
        for key in ("logprob_chunk_size", "max_tokens_per_micro_batch", "total_optimizer_steps"):
            if getattr(self, key) < 0:
                raise ValueError(f"LearnerConfig.{key}={getattr(self, key)} must be >= 0")


@ray.remote
class Learner:
    """One DeepSpeed ZeRO-3 rank: trains its shard, answers log-prob queries, ships weights.

    Created by `LearnerGroup`; `setup()` must run on all ranks before
    anything else, and every method except `weight_specs` is a collective
    that all ranks must enter together.
    """

    def __init__(
        self,
        config: LearnerConfig,
        rank: int,
        world_size: int,
        master_addr: str,
        master_port: int,
        log_file: str | None = None,
    ) -> None:
        redirect_output(log_file)  # first: DeepSpeed's output goes there (actor_logs)
        self.config = config
        self.rank = rank
        self.world_size = world_size
        # DeepSpeed reads these in init_distributed; without LOCAL_RANK it tries MPI
        # discovery. Ray gives each actor only its own GPU, so the local device is 0.
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK="0",
        )
        self.engine: Any = None
        self.ref_engine: Any = None
        self.hf_config: Any = None
        self.pad_token_id = 0
        self.step = 0
        self._collective: CollectiveTransport | None = None
        self.update: PPOUpdate | None = None

    # ---------------------------------------------------------------- set-up

    def setup(self) -> dict[str, float]:
        """Join the process group, build the ZeRO-3 policy (+ reference) engine.

        Returns timings, the parameter count and whether gradient
        checkpointing is on (1.0) in the built policy.
        """
        t0 = time.perf_counter()
        import deepspeed

        quiet_deepspeed()
        skip_shm_comm_op()
        torch.manual_seed(self.config.seed)
        if torch.cuda.is_available():
            torch.cuda.set_device(0)
        deepspeed.init_distributed()
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        t_dist = time.perf_counter()

        cfg = self.config
        ds_config = deepspeed_config(cfg)
        model = self._build_model(cfg.model_path, ds_config)
        optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=cfg.lr,
            betas=cfg.adam_betas,
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
            fused=True,
        )
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )

        def schedule(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
            return torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_multiplier, config=cfg))

        self.engine, *_ = deepspeed.initialize(
            model=LogprobModel(model, cfg.logprob_chunk_size),
            optimizer=optimizer,
            lr_scheduler=schedule,
            config=ds_config,
        )
        self.engine.checkpoint_engine = weights_only_checkpoint_engine()
        if cfg.kl_coef > 0:
            ref_ds = reference_deepspeed_config(cfg)
            ref = self._build_model(cfg.ref_model_path or cfg.model_path, ref_ds)
            ref.requires_grad_(False)
            self.ref_engine, *_ = deepspeed.initialize(
                model=LogprobModel(ref, cfg.logprob_chunk_size), config=ref_ds
            )
            self.ref_engine.eval()
        self.update = PPOUpdate(
            cfg, self.engine, self.ref_engine, self.device, self.pad_token_id, self.world_size
        )
        n_params = sum(math.prod(s.shape) for s in self.weight_specs())
        return {
            "time_init_distributed": t_dist - t0,
            "time_build": time.perf_counter() - t_dist,
            "num_parameters": float(n_params),
            "gradient_checkpointing": float(model.is_gradient_checkpointing),
        }

    def _build_model(self, path: str, ds_config: dict[str, Any]) -> torch.nn.Module:
        """A HF causal LM built under `deepspeed.zero.Init` (partitioned at construction) and loaded.

        `path` is a checkpoint directory or a hub id (resolved through the HF
        cache: `resolve_checkpoint_dir`).
        """
        import deepspeed
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        dtype = _DTYPES[self.config.dtype]
        local = resolve_checkpoint_dir(path)
        hf_config = AutoConfig.from_pretrained(str(local))
        # Random init would run on already-partitioned (empty) tensors; the weights are
        # loaded right after, as transformers' own ZeRO-3 path does. zero.Init takes its
        # dtype from the config's bf16 flag: an explicit `dtype=` is ignored on CPU
        # (DeepSpeed 0.19.8 `Init._set_dtype` then picks bf16 whatever is passed).
        with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        # no_init_weights() disables PreTrainedModel.init_weights, which is also where
        # post_init ties the weights: without this call a tie_word_embeddings model keeps
        # a separate (never loaded) lm_head. transformers' own ZeRO-3 path calls it too.
        model.tie_weights()
        load_checkpoint_weights(model, local, self.rank)
        if self.hf_config is None:
            self.hf_config = hf_config
            # Llama-3 tokenizers have no pad token: any id does for padding the
            # learner masks out itself.
            self.pad_token_id = pad_token_id(hf_config.pad_token_id, hf_config.eos_token_id)
        return model

    # ---------------------------------------------------------------- helpers

    def _all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Reduce a few floats over all ranks in one collective."""
        return all_reduce(values, self.device, op)

    # ---------------------------------------------------------------- training

    def train_step(self, batch: TrainBatch, policy_version: int | None = None) -> dict[str, float]:
        """PPO epochs over this rank's shard (`PPOUpdate.train_step`); metrics reduced over all ranks.

        `policy_version` is the version of the weights this learner holds (the
        driver's sync count). Rows with `batch.policy_version` below it were
        sampled by an older policy: their ratio is taken against the engine's
        sampling log-probs, the importance weight capped at
        `stale_ratio_cap` (`ppo_clip_loss`, `stale=`). Without either version
        every row counts as fresh.

        Metrics: `loss` and `pg_loss` (the global `loss_agg` aggregate,
        averaged over optimizer steps), token-weighted global means of
        `clip_frac`, `approx_kl`, `ratio_mean`, `kl`, `tis_mean`, `stale_frac`,
        `entropy` (the policy's entropy over loss tokens, from the training
        forward's logits); `grad_norm` (global, before clipping, of the last
        step; inf if it was skipped), `lr` (of the last step), `tokens`
        (loss tokens in the whole batch, all ranks), `steps` (optimizer
        steps), `skipped` (steps skipped for a non-finite gradient norm),
        `time` (seconds, slowest rank).
        """
        metrics = self.update.train_step(batch, policy_version)
        self.step += int(metrics["steps"] - metrics["skipped"])
        return metrics

    def compute_logprobs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Per-token log-probs [b, L] (float32, CPU) of these rows under the current policy.

        Position t holds log p(token t | tokens < t); position 0 and padding
        hold 0. Collective: every rank calls it (with its own rows, possibly
        none) the same number of times.
        """
        return self.update.logprobs(input_ids, attention_mask)

    # ---------------------------------------------------------------- weights

    def _named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The policy's parameters under their HF names (tied weights once)."""
        return list(self.engine.module.policy.named_parameters())

    def weight_specs(self) -> list[ParamSpec]:
        """Name, full shape and dtype of every policy parameter, in sync order (no gather)."""
        return [
            ParamSpec(name, tuple(getattr(p, "ds_shape", p.shape)), p.dtype)
            for name, p in self._named_parameters()
        ]

    def _gathered(self, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]] | None]:
        """Full parameters, one planned bucket's worth at a time (collective on all ranks).

        Yields, for each bucket of `plan_buckets(weight_specs(), bucket_bytes)`,
        the `(name, full tensor)` pairs on rank 0 (None elsewhere) while they
        are gathered; they are released when the consumer asks for the next
        bucket. So rank 0 holds at most one bucket of gathered parameters
        (≤ bucket_bytes + the largest parameter) beyond its own partition,
        plus whatever the consumer copies out of them (one packed bucket).
        One all-gather per bucket, not per parameter.
        """
        import deepspeed

        params = dict(self._named_parameters())
        with torch.no_grad():
            for group in plan_buckets(self.weight_specs(), bucket_bytes):
                group_params = [params[s.name] for s in group]
                with deepspeed.zero.GatheredParameters(group_params):
                    if self.rank == 0:
                        yield [(s.name, p.data) for s, p in zip(group, group_params, strict=True)]
                    else:
                        yield None

    def _sync_weights(self, transport: WeightTransport | None, bucket_bytes: int) -> Any:
        """Gather bucket by bucket; rank 0 packs each bucket and hands it to `transport`."""
        for named in self._gathered(bucket_bytes):
            if named is not None and transport is not None:
                for bucket in pack_buckets(named, bucket_bytes):
                    transport.send(bucket)
        return transport.finish() if transport is not None else None

    def gather_weight_buckets(self, bucket_bytes: int) -> list[ray.ObjectRef] | None:
        """Put the full weights in the object store as `WeightBucket`s; rank 0 returns the refs.

        Collective (every rank must call it); the other ranks return None.
        The refs are owned by rank 0's actor, so they stay valid while it lives.
        """
        transport = ObjectStoreTransport() if self.rank == 0 else None
        return self._sync_weights(transport, bucket_bytes)

    def init_weight_sync(
        self,
        backend: str,
        master_address: str,
        master_port: int,
        world_size: int,
        timeout_s: float,
    ) -> None:
        """Rank 0 joins the learner↔engines group as its rank 0 (other ranks: no-op).

        `backend`: "nccl" (GPU) or "gloo" (CPU). The engines must join at the
        same time (vLLM's `init_weight_transfer_engine` with
        `CollectiveSyncPlan.init_infos`). gloo: `timeout_s` bounds the join and
        every later broadcast; NCCL has no such timeout (the driver bounds the join).
        """
        if self.rank == 0:
            self._collective = CollectiveTransport.connect(
                backend, master_address, master_port, world_size, timeout_s
            )

    def broadcast_weights(self, bucket_bytes: int) -> None:
        """Gather bucket by bucket and broadcast each from rank 0 over the sync group.

        Collective over the learner ranks; the engines must be inside their
        `update_weights` (with `CollectiveSyncPlan.update_info`) meanwhile.
        """
        # Decided on every rank, so a missing group fails everywhere instead of hanging.
        (missing,) = self._all_reduce([float(self.rank == 0 and self._collective is None)])
        if missing:
            raise RuntimeError("broadcast_weights before init_weight_sync")
        self._sync_weights(self._collective, bucket_bytes)

    # ---------------------------------------------------------------- checkpoints

    def save_checkpoint(self, directory: str) -> None:
        """DeepSpeed checkpoint (partitioned weights, optimizer, scheduler, step) in `directory`.

        Collective; `directory` must be visible to every rank (shared
        filesystem on a multi-node cluster).
        """
        self.engine.save_checkpoint(
            directory,
            tag=f"step{self.step}",
            client_state={"step": self.step, "learner_config": asdict(self.config)},
        )
        # Every rank flushes what it wrote (DeepSpeed's save ends with a barrier): on a
        # shared filesystem only the writing node's fsync makes its shard durable.
        fsync_tree(Path(directory))

    def load_checkpoint(self, directory: str) -> int:
        """Restore the latest checkpoint in `directory`; returns its step. Collective."""
        path, client_state = self.engine.load_checkpoint(directory)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {directory}")
        self.step = int(client_state["step"])
        return self.step

    def export_hf(self, directory: str, shard_bytes: int = 2 << 30) -> None:
        """Write a Hugging Face checkpoint (config, sharded safetensors, tokenizer) of the policy.

        Collective: all ranks gather, rank 0 writes one safetensors shard per
        gathered bucket, so memory stays bounded as in weight sync. The
        result loads with `AutoModelForCausalLM.from_pretrained(directory)`.
        """
        from safetensors.torch import save_file

        out = Path(directory)
        plan = plan_buckets(self.weight_specs(), shard_bytes)
        weight_map: dict[str, str] = {}
        total = 0
        for i, named in enumerate(self._gathered(shard_bytes)):
            if named is None:
                continue
            out.mkdir(parents=True, exist_ok=True)
            fname = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
            save_file(
                {n: t.detach().cpu().contiguous() for n, t in named},
                str(out / fname),
                metadata={"format": "pt"},
            )
            weight_map.update(dict.fromkeys((n for n, _ in named), fname))
            total += sum(t.numel() * t.element_size() for _, t in named)
        if self.rank != 0:
            return
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        self.hf_config.save_pretrained(str(out))
        copy_side_files(resolve_checkpoint_dir(self.config.model_path), out)
