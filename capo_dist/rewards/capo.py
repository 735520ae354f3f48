"""CAPO's asymmetric token reward (DESIGN §1.4).

R[t] = W_outcome · r − W_process · w[step(t)], with r ∈ {0, 1} the verifier's
outcome and w the voted per-step penalty weights. With the defaults
(W_outcome = 2, W_process = 1): correct+clean +2, correct+voted-wrong +1,
wrong+clean 0, wrong+voted-wrong −1 — "right but flawed" stays above "wrong but
clean". `W_process = 0` is GRPO (the judge off).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def token_rewards(
    correct: bool,
    token_steps: Sequence[int],
    step_weights: Sequence[float],
    w_outcome: float = 2.0,
    w_process: float = 1.0,
) -> list[float]:
    """One reward per token of one response: `w_outcome*r − w_process*w[step]`.

    An empty `step_weights` (a response without steps) means no process
    penalty; otherwise every step index must lie in `[0, len(step_weights))`.
    """
    base = w_outcome * float(bool(correct))
    if len(step_weights) == 0:
        return [base] * len(token_steps)
    out = []
    for s in token_steps:
        if not 0 <= s < len(step_weights):
            raise ValueError(f"token step {s} outside [0, {len(step_weights)})")
        out.append(base - w_process * float(step_weights[s]))
    return out


def token_rewards_batch(
    correct: torch.Tensor,
    token_steps: torch.Tensor,
    step_weights: torch.Tensor,
    mask: torch.Tensor,
    w_outcome: float = 2.0,
    w_process: float = 1.0,
    penalize_correct: bool = True,
    penalize_incorrect: bool = True,
) -> torch.Tensor:
    """Vectorised `token_rewards` over a padded batch.

    correct [B] (bool or 0/1 float), token_steps long [B, T] (any value where
    mask is 0, e.g. -1), step_weights [B, S] (zero-padded; a response without
    steps has an all-zero row), mask [B, T] → rewards float32 [B, T], 0 where
    mask is 0. `penalize_correct`/`penalize_incorrect` switch the process
    penalty off for correct/incorrect responses.
    """
    r = correct.to(torch.float32)
    m = mask.to(torch.float32)
    if step_weights.shape[1] == 0:  # no response has steps: no penalty anywhere
        penalty = torch.zeros_like(m)
    else:
        idx = torch.where(m > 0, token_steps.long(), 0).clamp(min=0)
        penalty = torch.gather(step_weights.to(torch.float32), 1, idx)  # [B, T]
    gate = torch.where(r > 0, float(penalize_correct), float(penalize_incorrect))
    per_response = (w_outcome * r)[:, None]
    return (per_response - (w_process * gate)[:, None] * penalty) * m
