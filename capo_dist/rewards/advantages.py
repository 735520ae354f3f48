"""Group-normalised advantages from token rewards (DESIGN §1.5).

All estimators normalise within a prompt's group of G responses (rows that
share a `group_id`), vectorised with `index_add`/`scatter_reduce` over groups:

* `group_token` (default): μ, σ over ALL response tokens of all G responses;
  A[i,t] = (R[i,t] − μ) / (σ + ε).
* `group_response` (GRPO-like): μ, σ over the G per-response mean token
  rewards; every token of response i gets (mean_i − μ) / (σ + ε).
* `no_std`: A[i,t] = R[i,t] − μ (μ as in `group_token`).

σ is the POPULATION standard deviation (divide by n, `unbiased=False`): the
group is the whole population being normalised, and it stays defined for a
group of one. A group whose rewards are all equal (σ = 0) gets A = 0 — tested
exactly (max == min), not by comparing a float σ with 0. Per-token work runs
in float32 (or the rewards' dtype if wider), per-group sums in float64.
A is 0 wherever mask is 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _group_sum(values: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """float64 [num_groups]: sums of per-row `values` [B] by group."""
    return values.new_zeros(num_groups, dtype=torch.float64).index_add_(0, group, values.double())


def _group_constant(
    values: torch.Tensor, present: torch.Tensor, group: torch.Tensor, num_groups: int
) -> torch.Tensor:
    """bool [num_groups]: every present value of the group is the same."""
    inf = torch.finfo(values.dtype).max
    hi = torch.where(present, values, -inf)
    lo = torch.where(present, values, inf)
    while hi.dim() > 1:  # reduce token dims first
        hi, lo = hi.amax(-1), lo.amin(-1)
    g_hi = values.new_full((num_groups,), -inf).scatter_reduce_(0, group, hi, "amax")
    g_lo = values.new_full((num_groups,), inf).scatter_reduce_(0, group, lo, "amin")
    return g_hi <= g_lo


def _token_stats(
    rewards: torch.Tensor, mask: torch.Tensor, group: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group population std σ [G] (float64) and the centred rewards R − μ [B, T]."""
    count = _group_sum(mask.sum(1), group, num_groups).clamp(min=1)
    mu = _group_sum((rewards * mask).sum(1), group, num_groups) / count
    centred = (rewards - mu.to(rewards.dtype)[group][:, None]) * mask
    var = _group_sum((centred * centred).sum(1), group, num_groups) / count
    return var.sqrt(), centred


def _group_token(
    rewards: torch.Tensor, mask: torch.Tensor, group: torch.Tensor, num_groups: int, eps: float
) -> torch.Tensor:
    sigma, centred = _token_stats(rewards, mask, group, num_groups)
    const = _group_constant(rewards, mask > 0, group, num_groups)
    scale = torch.where(const, 0.0, 1.0 / (sigma + eps)).to(rewards.dtype)
    return centred * scale[group][:, None]


def _group_response(
    rewards: torch.Tensor, mask: torch.Tensor, group: torch.Tensor, num_groups: int, eps: float
) -> torch.Tensor:
    tokens = mask.sum(1)
    present = tokens > 0  # responses without tokens take no part
    mean = (rewards * mask).sum(1) / tokens.clamp(min=1)
    mean = mean.double()
    pres = present.double()
    n = _group_sum(pres, group, num_groups).clamp(min=1)
    mu = _group_sum(mean * pres, group, num_groups) / n
    centred = (mean - mu[group]) * pres
    sigma = (_group_sum(centred * centred, group, num_groups) / n).sqrt()
    const = _group_constant(mean, present, group, num_groups)
    scale = torch.where(const, 0.0, 1.0 / (sigma + eps))
    return (centred * scale[group]).to(rewards.dtype)[:, None] * mask


def _no_std(
    rewards: torch.Tensor, mask: torch.Tensor, group: torch.Tensor, num_groups: int, eps: float
) -> torch.Tensor:
    return _token_stats(rewards, mask, group, num_groups)[1]


# name → f(rewards [B, T], mask [B, T] (same float dtype), group [B] in [0, G), G, eps) → A [B, T].
ADVANTAGE_ESTIMATORS: dict[
    str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, float], torch.Tensor]
] = {
    "group_token": _group_token,
    "group_response": _group_response,
    "no_std": _no_std,
}


def compute_advantages(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    group_ids: torch.Tensor,
    mode: str = "group_token",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Advantages [B, T] (dtype of `rewards`) of token rewards [B, T] under `mask`
    [B, T], responses grouped by prompt through `group_ids` [B] (any integers)."""
    try:
        estimator = ADVANTAGE_ESTIMATORS[mode]
    except KeyError:
        raise ValueError(
            f"unknown advantage mode {mode!r}; valid modes: {', '.join(ADVANTAGE_ESTIMATORS)}"
        ) from None
    if rewards.shape != mask.shape or rewards.dim() != 2 or group_ids.shape != rewards.shape[:1]:
        raise ValueError(
            f"rewards [B, T], mask [B, T], group_ids [B] expected; got "
            f"{tuple(rewards.shape)}, {tuple(mask.shape)}, {tuple(group_ids.shape)}"
        )
    if rewards.shape[0] == 0:
        return torch.zeros_like(rewards)
    uniq, group = torch.unique(group_ids, return_inverse=True)
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    adv = estimator(rewards.to(dtype), mask.to(dtype), group, int(uniq.numel()), eps)
    return adv.to(rewards.dtype if rewards.is_floating_point() else torch.float32)
