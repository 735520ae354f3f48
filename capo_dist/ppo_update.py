"""The PPO update one learner rank runs on its shard: micro-batches, log-prob passes, loss, steps.

`PPOUpdate` holds a rank's DeepSpeed engines (policy and optional frozen
reference, both `LogprobModel`s) and does the work of `Learner.train_step`
and `Learner.compute_logprobs`:

* old (and reference) log-probs come from the learner itself, before the
  update (no grad); with a single optimizer step per batch the detached
  current log-probs ARE the old ones and that pass is skipped;
* off-policy correction of stale rows (`capo_dist.rewards.loss`, `stale=`);
* the loss aggregation (`loss_agg`) weighs each token from the GLOBAL token
  and sequence counts of its optimizer step (all ranks, all micro-batches),
  so a step computes the same thing for any world size, micro-batch size or
  packing (`loss_token_weights`);
* micro-batches are `micro_batch_size` padded rows, or token-budget packed
  rows (`max_tokens_per_micro_batch`, `capo_dist.packing`);
* every forward is a ZeRO-3 collective, so all ranks run the same number of
  micro-batches: one with no rows left runs a dummy one (two pad tokens,
  loss mask 0);
* a step whose gradient norm is NaN/inf is skipped (DeepSpeed's ZeRO-3
  optimizer checks the global norm in every precision) and reported.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from capo_dist.packing import pack, plan_micro_batches, unpack
from capo_dist.rewards.loss import loss_token_weights, ppo_clip_loss
from capo_dist.types import TrainBatch

if TYPE_CHECKING:
    from capo_dist.learner import LearnerConfig

_STAT_NAMES = (
    "clip_frac",
    "approx_kl",
    "ratio_mean",
    "kl",
    "tis_mean",
    "pg_loss",
    "stale_frac",
    "entropy",
)


def all_reduce(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    """Reduce a few floats over all ranks in one collective (sum or max)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left and right padding give the same result."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class PPOUpdate:
    """A rank's PPO update over its engines; every method is a collective over the ranks."""

    def __init__(
        self,
        config: LearnerConfig,
        engine: Any,
        ref_engine: Any,
        device: torch.device,
        pad_token_id: int,
        world_size: int,
    ) -> None:
        self.config = config
        self.engine = engine
        self.ref_engine = ref_engine
        self.device = device
        self.pad_token_id = pad_token_id
        self.world_size = world_size

    # ---------------------------------------------------------------- micro-batches

    def _micro_batches(self, batch_mask: torch.Tensor, rows: torch.Tensor) -> list[torch.Tensor]:
        """This rank's micro-batches of `rows` (row indices into a batch with `batch_mask`)."""
        cfg = self.config
        lengths = batch_mask[rows].sum(-1)
        return plan_micro_batches(
            rows, lengths, cfg.micro_batch_size, cfg.max_tokens_per_micro_batch
        )

    def _equalised(self, micro: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
        """Pad every rank's micro-batch lists with empty ones to the largest count over ranks."""
        counts = all_reduce([float(len(m)) for m in micro], self.device, op="max")
        empty = torch.arange(0)
        return [m + [empty] * (int(n) - len(m)) for m, n in zip(micro, counts, strict=True)]

    @staticmethod
    def _indexed(micro: list[list[torch.Tensor]]) -> Iterator[tuple[tuple[int, int], torch.Tensor]]:
        """((mini-batch, micro-batch), rows) for every micro-batch of a step, in training order."""
        for i, mini in enumerate(micro):
            for j, chunk in enumerate(mini):
                yield (i, j), chunk

    def _chunk_counts(
        self, attention_mask: torch.Tensor, micro: list[list[torch.Tensor]]
    ) -> dict[tuple[int, int], int]:
        """LM-head calls per micro-batch, the largest over the ranks (0 when not chunked).

        Each head call gathers the ZeRO-3 head weight, a collective: a rank
        whose micro-batch holds fewer positions pads its calls to this count.
        """
        keys = [key for key, _ in self._indexed(micro)]
        size = self.config.logprob_chunk_size
        if size <= 0:
            return dict.fromkeys(keys, 0)
        need = []
        for _, chunk in self._indexed(micro):
            att = attention_mask[chunk]
            if len(chunk) == 0:
                positions = 1  # the dummy row: two tokens
            elif self.config.max_tokens_per_micro_batch > 0:
                positions = max(int(att.sum()), 2) - 1
            else:
                used = int(att.nonzero()[:, 1].max()) + 1 if att.any() else 1
                positions = len(chunk) * (max(used, 2) - 1)
            need.append(float(math.ceil(positions / size)))
        counts = all_reduce(need, self.device, op="max") if need else []
        return {key: int(n) for key, n in zip(keys, counts, strict=True)}

    # ---------------------------------------------------------------- forward

    def _forward(
        self,
        engine: Any,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        num_chunks: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token (log-probs, entropy) [b, L] (float32) of one micro-batch.

        An empty micro-batch runs a dummy row of two pad tokens instead and
        returns its [1, 2] outputs (the caller gives them loss mask 0), so its
        forward and backward keep step with the other ranks'. `num_chunks`:
        the LM-head calls all ranks make for this micro-batch (`_chunk_counts`).
        """
        b, width = input_ids.shape
        if b == 0:
            ids = torch.full((1, 2), self.pad_token_id, dtype=torch.long, device=self.device)
            pos = torch.arange(2, device=self.device)[None]
            return engine(input_ids=ids, position_ids=pos, num_chunks=num_chunks)
        if self.config.max_tokens_per_micro_batch > 0:
            packed = pack(input_ids, attention_mask)
            ids, pos = packed.input_ids, packed.position_ids
            if ids.shape[1] < 2:  # keep two positions, so the output depends on the logits
                ids = F.pad(ids, (0, 1), value=self.pad_token_id)
                pos = F.pad(pos, (0, 1))
            lp, ent = engine(
                input_ids=ids.to(self.device),
                position_ids=pos.to(self.device),
                num_chunks=num_chunks,
            )
            n = packed.input_ids.shape[1]
            return unpack(lp[:, :n], packed, (b, width)), unpack(ent[:, :n], packed, (b, width))
        # Padded rows: trim the padding columns no row uses; keep two positions at least.
        used = int(attention_mask.nonzero()[:, 1].max()) + 1 if attention_mask.any() else 1
        length = max(used, 2)
        if length > width:
            input_ids = F.pad(input_ids, (0, length - width), value=self.pad_token_id)
            attention_mask = F.pad(attention_mask, (0, length - width))
        ids = input_ids[:, :length].to(self.device)
        mask = attention_mask[:, :length].to(self.device)
        lp, ent = engine(
            input_ids=ids,
            attention_mask=mask,
            position_ids=_position_ids(mask),
            num_chunks=num_chunks,
        )
        if length >= width:
            return lp[:, :width], ent[:, :width]
        return F.pad(lp, (0, width - length)), F.pad(ent, (0, width - length))

    # ---------------------------------------------------------------- training

    def train_step(self, batch: TrainBatch, policy_version: int | None = None) -> dict[str, float]:
        """PPO epochs over this rank's shard; metrics reduced over all ranks (see `Learner.train_step`)."""
        t0 = time.perf_counter()
        cfg = self.config
        engine = self.engine
        n_rows = len(batch)
        rows = torch.arange(n_rows)
        minis = [rows[i :: cfg.mini_batches] for i in range(cfg.mini_batches)]
        has_loss = batch.loss_mask.sum(-1) > 0
        counts = [float(batch.loss_mask[m].sum()) for m in minis]
        counts += [float(has_loss[m].sum()) for m in minis]
        reduced = all_reduce(counts, self.device)
        global_tokens, global_seqs = reduced[: len(minis)], reduced[len(minis) :]
        micro = self._equalised([self._micro_batches(batch.attention_mask, m) for m in minis])
        chunks = self._chunk_counts(batch.attention_mask, micro)
        stale = torch.zeros(n_rows, dtype=torch.bool)
        if policy_version is not None and batch.policy_version is not None:
            stale = batch.policy_version < policy_version

        recompute_old = cfg.ppo_epochs * cfg.mini_batches > 1
        old: dict[tuple[int, int], torch.Tensor] = {}
        ref: dict[tuple[int, int], torch.Tensor] = {}
        with torch.no_grad():
            if recompute_old or self.ref_engine is not None:
                engine.eval()
                for key, chunk in self._indexed(micro):
                    ids, att = batch.input_ids[chunk], batch.attention_mask[chunk]
                    if recompute_old:
                        old[key] = self._forward(engine, ids, att, chunks[key])[0]
                    if self.ref_engine is not None:
                        ref[key] = self._forward(self.ref_engine, ids, att, chunks[key])[0]

        engine.train()
        sums = dict.fromkeys(("loss", *_STAT_NAMES), 0.0)
        steps = skipped = 0
        grad_norm = lr = 0.0
        for _epoch in range(cfg.ppo_epochs):
            for i, mini in enumerate(micro):
                if global_tokens[i] == 0:
                    continue  # nothing to learn from (same on every rank: the count is global)
                lr = float(engine.get_lr()[0])
                loss_sum = 0.0
                for j, chunk in enumerate(mini):
                    ids, att = batch.input_ids[chunk], batch.attention_mask[chunk]
                    lp, ent = self._forward(engine, ids, att, chunks[i, j])
                    if len(chunk) == 0:
                        zeros = torch.zeros_like(lp)
                        mask = adv = samp = zeros
                    else:
                        mask = batch.loss_mask[chunk].to(self.device)
                        adv = batch.advantages[chunk].to(self.device)
                        samp = batch.sampler_logprobs[chunk].to(self.device)
                    old_lp = old[i, j] if recompute_old else lp.detach()
                    weights = loss_token_weights(
                        mask,
                        cfg.loss_agg,
                        global_tokens[i],
                        global_seqs[i],
                        cfg.loss_agg_norm_tokens,
                    )
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
                        stale=stale[chunk].to(self.device) if len(chunk) else None,
                        stale_ratio_cap=cfg.stale_ratio_cap,
                        token_weights=weights,
                    )
                    # ZeRO averages gradients over the W ranks; each rank's loss is
                    # already its share of the global aggregate, so scale by W.
                    engine.backward(loss * self.world_size, scale_wrt_gas=False)
                    loss_sum += float(loss.detach())
                    local_tokens = float(mask.sum())
                    stats["entropy"] = float((ent * mask).sum()) / max(local_tokens, 1.0)
                    for k in _STAT_NAMES:
                        sums[k] += stats[k] * (local_tokens if k != "pg_loss" else 1.0)
                engine.step()
                steps += 1
                sums["loss"] += loss_sum
                grad_norm = float(engine.get_global_grad_norm())  # inf when skipped
                skipped += not engine.was_step_applied()

        keys = list(sums)
        total = all_reduce([sums[k] for k in keys], self.device)
        all_tokens = max(sum(global_tokens), 1.0)
        metrics = {}
        for k, v in zip(keys, total, strict=True):
            if k in ("loss", "pg_loss"):
                metrics[k] = v / max(steps, 1)  # each step's value is a global aggregate
            else:
                metrics[k] = v / (all_tokens * cfg.ppo_epochs)
        (elapsed,) = all_reduce([time.perf_counter() - t0], self.device, op="max")
        metrics.update(
            grad_norm=grad_norm,
            lr=lr,
            tokens=sum(global_tokens),
            steps=float(steps),
            skipped=float(skipped),
            time=elapsed,
        )
        return metrics

    def logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Per-token log-probs [b, L] (float32, CPU) of these rows under the current policy.

        Position t holds log p(token t | tokens < t); position 0 and padding
        hold 0. Collective (see `Learner.compute_logprobs`).
        """
        rows = torch.arange(input_ids.shape[0])
        micro = self._equalised([self._micro_batches(attention_mask, rows)])
        chunks = self._chunk_counts(attention_mask, micro)
        out = torch.zeros(input_ids.shape, dtype=torch.float32)
        self.engine.eval()
        with torch.no_grad():
            for key, chunk in self._indexed(micro):
                ids, att = input_ids[chunk], attention_mask[chunk]
                lp, _ = self._forward(self.engine, ids, att, chunks[key])
                if len(chunk):
                    out[chunk] = (lp * attention_mask[chunk].to(lp.device)).float().cpu()
        return out
