"""The learner role (`learner-0`, `learner-1`, …): DeepSpeed ZeRO-3 ranks doing token-level PPO-clip.

W ranks, one Ray actor each, form one DeepSpeed data-parallel group (NCCL on
GPU, gloo on CPU — DeepSpeed picks its accelerator and backend itself). Each
rank trains on its shard of a `TrainBatch` (rows rank::W):

* old log-probs come from the learner itself, before the update (no grad);
  a frozen reference model (ZeRO-3 too, no optimizer) gives the k3 KL term
  when `kl_coef > 0`;
* off-policy correction: a row sampled by an older policy version than the
  learner's (`trainer.max_staleness=1`: the next batch is generated while
  this one trains) takes its PPO ratio against the engine's sampling
  log-probs (the behaviour policy), with the importance weight old/behaviour
  capped at `stale_ratio_cap` (`capo_dist.rewards.loss`); fresh rows use the
  sampler's log-probs only for the optional truncated IS weight (`tis_cap`);
* the loss is a token mean over the GLOBAL number of loss tokens of each
  optimizer step (all ranks, all micro-batches), so a step computes the same
  thing for any W and any micro-batch size;
* a step whose gradient norm is NaN/inf is skipped (DeepSpeed's ZeRO-3
  optimizer checks the global norm in every precision) and reported.

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
from pathlib import Path
from typing import Any

import ray
import torch
import torch.nn.functional as F

from capo_dist.actor_logs import redirect_output
from capo_dist.checkpoint import fsync_tree
from capo_dist.deepspeed_setup import (
    deepspeed_config,
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
from capo_dist.rewards.loss import ppo_clip_loss, token_logprobs
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
    is constant after a linear warmup of `warmup_steps` optimizer steps.
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

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"LearnerConfig.dtype={self.dtype!r}; choose one of {sorted(_DTYPES)}")
        for key in ("ppo_epochs", "mini_batches", "micro_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"LearnerConfig.{key}={getattr(self, key)} must be >= 1")


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left and right padding give the same result."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


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

    # ---------------------------------------------------------------- set-up

    def setup(self) -> dict[str, float]:
        """Join the process group, build the ZeRO-3 policy (+ reference) engine; returns timings."""
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
        warmup = cfg.warmup_steps

        def schedule(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
            # Constant after a linear warmup: update k (0-based) uses lr * min(1, (k+1)/warmup).
            return torch.optim.lr_scheduler.LambdaLR(
                opt, lambda k: min(1.0, (k + 1) / warmup) if warmup > 0 else 1.0
            )

        self.engine, *_ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config
        )
        self.engine.checkpoint_engine = weights_only_checkpoint_engine()
        if cfg.kl_coef > 0:
            ref_ds = reference_deepspeed_config(cfg)
            ref = self._build_model(cfg.ref_model_path or cfg.model_path, ref_ds)
            ref.requires_grad_(False)
            self.ref_engine, *_ = deepspeed.initialize(model=ref, config=ref_ds)
            self.ref_engine.eval()
        n_params = sum(math.prod(s.shape) for s in self.weight_specs())
        return {
            "time_init_distributed": t_dist - t0,
            "time_build": time.perf_counter() - t_dist,
            "num_parameters": float(n_params),
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
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return t.tolist()

    def _micro_batches(self, rows: torch.Tensor, num: int) -> list[torch.Tensor]:
        """Split row indices into exactly `num` micro-batches; the ones past the data are empty."""
        mbs = self.config.micro_batch_size
        chunks = [rows[i : i + mbs] for i in range(0, len(rows), mbs)]
        return chunks + [rows[:0] for _ in range(num - len(chunks))]

    def _forward_logprobs(
        self, engine: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Per-token log-probs [b, L] (float32) of one micro-batch; an empty one runs a dummy row.

        Under ZeRO-3 every forward gathers parameters collectively, so a rank
        with no rows left still runs a forward and backward (of two pad
        tokens, whose loss mask is 0) to keep step with the others.
        """
        width = input_ids.shape[1]
        if input_ids.shape[0] == 0:
            input_ids = torch.full((1, 2), self.pad_token_id, dtype=torch.long)
            attention_mask = torch.ones_like(input_ids)
        # Trim the padding columns no row uses; keep two positions at least, so the
        # log-probs (position 0 is a constant) and hence the loss depend on the logits.
        used = int(attention_mask.nonzero()[:, 1].max()) + 1 if attention_mask.any() else 1
        length = max(used, 2)
        if length > input_ids.shape[1]:
            extra = length - input_ids.shape[1]
            input_ids = F.pad(input_ids, (0, extra), value=self.pad_token_id)
            attention_mask = F.pad(attention_mask, (0, extra))
        ids = input_ids[:, :length].to(self.device)
        mask = attention_mask[:, :length].to(self.device)
        logits = engine(
            input_ids=ids, attention_mask=mask, position_ids=_position_ids(mask), use_cache=False
        ).logits
        lp = token_logprobs(logits, ids)
        return lp[:, :width] if length >= width else F.pad(lp, (0, width - length))

    @staticmethod
    def _indexed(micro: list[list[torch.Tensor]]) -> Iterator[tuple[tuple[int, int], torch.Tensor]]:
        """((mini-batch, micro-batch), rows) for every micro-batch of a step, in training order."""
        for i, mini in enumerate(micro):
            for j, chunk in enumerate(mini):
                yield (i, j), chunk

    # ---------------------------------------------------------------- training

    def train_step(self, batch: TrainBatch, policy_version: int | None = None) -> dict[str, float]:
        """PPO epochs over this rank's shard; returns metrics reduced over all ranks.

        `policy_version` is the version of the weights this learner holds (the
        driver's sync count). Rows with `batch.policy_version` below it were
        sampled by an older policy: their ratio is taken against the engine's
        sampling log-probs, the importance weight capped at
        `stale_ratio_cap` (`ppo_clip_loss`, `stale=`). Without either version
        every row counts as fresh.

        Metrics: `loss` and `pg_loss` (global token-mean loss, averaged over
        optimizer steps), token-weighted global means of `clip_frac`,
        `approx_kl`, `ratio_mean`, `kl`, `tis_mean`, `stale_frac`; `grad_norm` (global,
        before clipping, of the last step; inf if it was skipped), `lr` (of the last step), `tokens`
        (loss tokens in the whole batch, all ranks), `steps` (optimizer
        steps), `skipped` (steps skipped for a non-finite gradient norm),
        `time` (seconds, slowest rank).
        """
        t0 = time.perf_counter()
        cfg = self.config
        engine = self.engine
        n_rows = len(batch)
        rows = torch.arange(n_rows)
        minis = [rows[i :: cfg.mini_batches] for i in range(cfg.mini_batches)]
        mbs = cfg.micro_batch_size
        counts = [float(math.ceil(len(m) / mbs)) for m in minis]
        tokens = [float(batch.loss_mask[m].sum()) for m in minis]
        reduced = self._all_reduce(counts, op="max")
        num_micro = [int(c) for c in reduced]
        global_tokens = self._all_reduce(tokens)
        micro = [self._micro_batches(m, n) for m, n in zip(minis, num_micro, strict=True)]
        stale = torch.zeros(n_rows, dtype=torch.bool)
        if policy_version is not None and batch.policy_version is not None:
            stale = batch.policy_version < policy_version

        # Old (and reference) log-probs, before any update. With a single
        # optimizer step per batch the policy has not moved when the loss is
        # computed, so the detached current log-probs ARE the old ones and the
        # extra forward is skipped.
        recompute_old = cfg.ppo_epochs * cfg.mini_batches > 1
        old: dict[tuple[int, int], torch.Tensor] = {}
        ref: dict[tuple[int, int], torch.Tensor] = {}
        with torch.no_grad():
            if recompute_old or self.ref_engine is not None:
                engine.eval()
                for key, chunk in self._indexed(micro):
                    ids, att = batch.input_ids[chunk], batch.attention_mask[chunk]
                    if recompute_old:
                        old[key] = self._forward_logprobs(engine, ids, att)
                    if self.ref_engine is not None:
                        ref[key] = self._forward_logprobs(self.ref_engine, ids, att)

        engine.train()
        stat_names = (
            "clip_frac",
            "approx_kl",
            "ratio_mean",
            "kl",
            "tis_mean",
            "pg_loss",
            "stale_frac",
        )
        sums = dict.fromkeys(("loss", *stat_names), 0.0)
        steps = skipped = 0
        grad_norm = lr = 0.0
        for _epoch in range(cfg.ppo_epochs):
            for i, (mini, n_tok) in enumerate(zip(micro, global_tokens, strict=True)):
                if n_tok == 0:
                    continue  # nothing to learn from (same on every rank: the count is global)
                lr = float(engine.get_lr()[0])
                loss_sum = 0.0
                for j, chunk in enumerate(mini):
                    ids, att = batch.input_ids[chunk], batch.attention_mask[chunk]
                    lp = self._forward_logprobs(engine, ids, att)
                    if len(chunk) == 0:
                        zeros = torch.zeros_like(lp)
                        mask = adv = samp = zeros
                    else:
                        mask = batch.loss_mask[chunk].to(self.device)
                        adv = batch.advantages[chunk].to(self.device)
                        samp = batch.sampler_logprobs[chunk].to(self.device)
                    old_lp = old[i, j] if recompute_old else lp.detach()
                    loss, stats = ppo_clip_loss(
                        lp,
                        old_lp,
                        adv,
                        mask,
                        clip_low=cfg.clip_low,
                        clip_high=cfg.clip_high,
                        ref_logprobs=ref.get((i, j)),
                        kl_coef=cfg.kl_coef,
                        sampler_logprobs=samp,
                        tis_cap=cfg.tis_cap,
                        num_tokens=max(n_tok, 1.0),
                        stale=stale[chunk].to(self.device) if len(chunk) else None,
                        stale_ratio_cap=cfg.stale_ratio_cap,
                    )
                    # ZeRO averages gradients over the W ranks; each rank's loss is
                    # already its share of the global token mean, so scale by W.
                    engine.backward(loss * self.world_size, scale_wrt_gas=False)
                    loss_sum += float(loss.detach())
                    local_tokens = float(mask.sum())
                    for k in stat_names:
                        sums[k] += stats[k] * (local_tokens if k != "pg_loss" else 1.0)
                engine.step()
                steps += 1
                sums["loss"] += loss_sum
                grad_norm = float(engine.get_global_grad_norm())  # inf when skipped
                skipped += not engine.was_step_applied()
        self.step += steps - skipped

        keys = list(sums)
        total = self._all_reduce([sums[k] for k in keys])
        all_tokens = max(sum(global_tokens), 1.0)
        metrics = {}
        for k, v in zip(keys, total, strict=True):
            if k in ("loss", "pg_loss"):
                metrics[k] = v / max(steps, 1)  # each step's value is a global token mean
            else:
                metrics[k] = v / (all_tokens * cfg.ppo_epochs)
        (elapsed,) = self._all_reduce([time.perf_counter() - t0], op="max")
        metrics.update(
            grad_norm=grad_norm,
            lr=lr,
            tokens=sum(global_tokens),
            steps=float(steps),
            skipped=float(skipped),
            time=elapsed,
        )
        return metrics

    def compute_logprobs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Per-token log-probs [b, L] (float32, CPU) of these rows under the current policy.

        Position t holds log p(token t | tokens < t); position 0 and padding
        hold 0. Collective: every rank calls it (with its own rows, possibly
        none) the same number of times.
        """
        rows = torch.arange(input_ids.shape[0])
        (num,) = self._all_reduce(
            [float(math.ceil(len(rows) / self.config.micro_batch_size))], "max"
        )
        out = []
        self.engine.eval()
        with torch.no_grad():
            for chunk in self._micro_batches(rows, int(num)):
                lp = self._forward_logprobs(self.engine, input_ids[chunk], attention_mask[chunk])
                if len(chunk):
                    out.append((lp * attention_mask[chunk].to(lp.device)).cpu())
        if not out:
            return torch.zeros(input_ids.shape, dtype=torch.float32)
        return torch.cat(out)

    # ---------------------------------------------------------------- weights

    def _named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The policy's parameters under their HF names (tied weights once)."""
        return list(self.engine.module.named_parameters())

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
