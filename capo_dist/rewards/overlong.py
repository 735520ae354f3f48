"""DAPO's soft overlong penalty (`rollout.truncated=soft_penalty`).

With L = `max_new_tokens` and a buffer of C tokens, a response of n tokens gets

    0                      if n <= L − C
    −factor · (n − (L − C)) / C   if L − C < n <= L

added to its outcome reward: the penalty grows linearly over the last C
tokens, to −factor at L (a response cut at max_new_tokens). Lengths above L
(not produced by the engine) get −factor.
"""

from __future__ import annotations

import torch


def overlong_penalty(
    lengths: torch.Tensor, max_new_tokens: int, buffer: int, factor: float
) -> torch.Tensor:
    """float32 [B] (each <= 0) of response lengths [B] in tokens."""
    if not 1 <= buffer <= max_new_tokens:
        raise ValueError(f"overlong buffer {buffer} must be in [1, {max_new_tokens}]")
    over = (lengths.to(torch.float32) - (max_new_tokens - buffer)) / buffer
    return -factor * over.clamp(0.0, 1.0)
