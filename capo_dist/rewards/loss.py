"""Token-level PPO-clip policy loss and per-token log-probs (DESIGN §1.5).

    ratio_t = exp(logp_t − old_t)
    ℓ_t     = −min(ratio_t·A_t, clip(ratio_t, 1−clip_low, 1+clip_high)·A_t) · tis_t
              + kl_coef · k3_t,     k3_t = exp(ref_t − logp_t) − (ref_t − logp_t) − 1
    loss    = Σ_t mask_t·ℓ_t / num_tokens

Token-mean aggregation: `num_tokens` defaults to this call's `mask.sum()`, but
a learner that splits a step over data-parallel ranks and micro-batches MUST
pass the GLOBAL number of response tokens of the whole step (all ranks, all
micro-batches), so that every token weighs the same and gradient accumulation
+ all-reduce(mean over ranks, then × world size or sum) gives the true token
mean. tis_t = min(exp(old_t − sampler_t), tis_cap), detached: the truncated
importance weight correcting for the sampler (vLLM) differing from the learner.

Stale rows (off-policy correction). A row sampled by an OLDER policy than the
one that gives `old_logprobs` (with `trainer.max_staleness=1` the next batch is
generated while the learner trains, so it trains one policy version behind)
was drawn from the behaviour policy μ = the engine's sampling log-probs
(`sampler_t`, raw log-probs under the weights the engine held), not from
`old`. For those rows the ratio is taken against μ, with μ's importance
weight capped (truncated IS, as in decoupled PPO, `old` being the proximal
policy):

    behaviour_t = max(sampler_t, old_t − log stale_ratio_cap)
    ratio_t     = exp(logp_t − behaviour_t)
                = exp(logp_t − old_t) · min(exp(old_t − sampler_t), stale_ratio_cap)

so a token the stale sampler drew much less often than `old` would
(old/μ > cap) weighs at most `stale_ratio_cap` times, and PPO's clip range
then applies around the behaviour policy. TIS is not applied to stale rows
(tis_t = 1 there): the sampler gap it corrects is already in the ratio. Fresh
rows are unchanged (ratio exp(logp − old), exactly 1 before the first
optimizer step).
"""

from __future__ import annotations

import math

import torch

LOSS_AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def loss_token_weights(
    mask: torch.Tensor,
    mode: str,
    global_tokens: float,
    global_seqs: float,
    norm_tokens: float = 0.0,
) -> torch.Tensor:
    """Each token's weight in the loss (loss = Σ_t w_t·ℓ_t), [B, T] like `mask`.

    `global_tokens` / `global_seqs`: loss tokens / rows with at least one loss
    token over the whole optimizer step (all ranks, all micro-batches);
    `norm_tokens`: Dr. GRPO's constant (`seq_mean_token_sum_norm`). Masked
    tokens weigh 0. See the module doc for the formulas.
    """
    m = mask.to(torch.float32)
    if mode == "token_mean":
        return m / max(global_tokens, 1.0)
    if mode == "seq_mean_token_mean":
        per_row = m.sum(-1, keepdim=True).clamp(min=1.0)
        return m / (per_row * max(global_seqs, 1.0))
    if mode == "seq_mean_token_sum_norm":
        if norm_tokens <= 0:
            raise ValueError(f"seq_mean_token_sum_norm needs norm_tokens > 0, got {norm_tokens}")
        return m / (norm_tokens * max(global_seqs, 1.0))
    raise ValueError(f"loss_agg={mode!r}; choose one of {list(LOSS_AGG_MODES)}")


def logprobs_and_entropy(
    logits: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and the entropy of p = softmax(logits) at each position, in float32.

    logits [..., V], targets [...]: returns two [...] tensors; the log-probs
    are differentiable, the entropy (a metric) is not.
    """
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1)
    lp = z.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1) - lse
    with torch.no_grad():
        ent = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
    return lp, ent


def token_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, chunk_rows: int = 1
) -> torch.Tensor:
    """log p(input_ids[:, t] | input_ids[:, :t]) at position t ([B, L]; position 0 is 0).

    logits [B, L, V] are the model outputs for input_ids [B, L] (logits[:, t]
    predicts token t+1). Computed as gathered logit − logsumexp, `chunk_rows`
    rows at a time in float32, so the float32 copy never exceeds
    chunk_rows × L × V; differentiable.
    """
    b, length, _ = logits.shape
    out = logits.new_zeros((b, length), dtype=torch.float32)
    if length < 2:
        return out
    rows = []
    for start in range(0, b, max(1, chunk_rows)):
        lg = logits[start : start + chunk_rows, :-1].float()
        tgt = input_ids[start : start + chunk_rows, 1:].long()
        picked = lg.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(lg, dim=-1))
    return torch.cat([out[:, :1], torch.cat(rows, 0)], dim=1)


def ppo_clip_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    sampler_logprobs: torch.Tensor | None = None,
    tis_cap: float | None = None,
    num_tokens: float | None = None,
    stale: torch.Tensor | None = None,
    stale_ratio_cap: float = 2.0,
    token_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-level PPO-clip loss (scalar tensor) and metrics; all inputs [B, T].

    `num_tokens`: the token-mean normaliser (see module doc; global count in
    distributed training). `token_weights` ([B, T], from
    `loss_token_weights`) replaces the token mean: loss = Σ_t w_t·ℓ_t. `stale` ([B] bool): rows sampled by an older policy
    than `old_logprobs`'s, whose ratio is taken against `sampler_logprobs`
    (required then) with the importance weight capped at `stale_ratio_cap`
    (> 1; see module doc). Metrics are masked means over THIS call's tokens:
    `clip_frac` (tokens whose clipped term is active), `approx_kl`
    (k3 estimate of KL(old‖new)), `ratio_mean`, `kl` (k3 to the reference, 0
    without one), `tis_mean` (1 without TIS), `pg_loss` (the policy term's
    contribution to the loss), `stale_frac` (tokens of stale rows).
    """
    m = mask.to(logprobs.dtype)
    denom = float(num_tokens) if num_tokens is not None else m.sum().clamp(min=1.0)
    # Per-token weight of the loss (mask included): token mean by default.
    w = token_weights.to(logprobs.dtype) if token_weights is not None else m / denom
    stale_tok = torch.zeros_like(m, dtype=torch.bool)
    behaviour = old_logprobs
    if stale is not None and bool(stale.any()):
        if sampler_logprobs is None:
            raise ValueError("stale rows need sampler_logprobs (the behaviour policy)")
        if stale_ratio_cap <= 1.0:
            raise ValueError(f"stale_ratio_cap must be > 1, got {stale_ratio_cap}")
        stale_tok = stale.to(torch.bool)[:, None].expand_as(m)
        capped = torch.maximum(sampler_logprobs, old_logprobs - math.log(stale_ratio_cap))
        behaviour = torch.where(stale_tok, capped.detach(), old_logprobs)
    log_ratio = logprobs - behaviour
    ratio = torch.exp(log_ratio)
    pg1 = ratio * advantages
    pg2 = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    per_token = -torch.minimum(pg1, pg2)
    if sampler_logprobs is not None and tis_cap is not None:
        tis = torch.exp(old_logprobs - sampler_logprobs).clamp(max=tis_cap).detach()
        tis = torch.where(stale_tok, torch.ones_like(tis), tis)
        per_token = per_token * tis
    else:
        tis = torch.ones_like(per_token)
    pg_loss = (per_token * w).sum()
    loss = pg_loss
    kl_tok = torch.zeros_like(per_token)
    if ref_logprobs is not None:
        d = ref_logprobs - logprobs
        kl_tok = torch.exp(d) - d - 1.0
        if kl_coef != 0.0:
            loss = loss + kl_coef * (kl_tok * w).sum()
    with torch.no_grad():
        n = m.sum().clamp(min=1.0)
        clipped = (pg2 < pg1).to(m.dtype)
        approx_kl = ratio - 1.0 - log_ratio  # k3 estimate of KL(old || new), x ~ old
        stats = torch.stack(
            [
                (clipped * m).sum() / n,
                (approx_kl * m).sum() / n,
                (ratio * m).sum() / n,
                (kl_tok * m).sum() / n,
                (tis * m).sum() / n,
                pg_loss.detach(),
                (stale_tok.to(m.dtype) * m).sum() / n,
            ]
        ).tolist()
    names = ("clip_frac", "approx_kl", "ratio_mean", "kl", "tis_mean", "pg_loss", "stale_frac")
    return loss, dict(zip(names, stats, strict=True))
