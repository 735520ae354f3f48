"""Typed records that cross a boundary between roles (driver, rollout, judge, aggregator, learner).

Each is a plain dataclass so it pickles cheaply through Ray and reads the same
on both sides. Tensors travel only inside `TrainBatch`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Problem:
    """One training prompt: the question, its gold final answer, and a stable id."""

    uid: str
    question: str
    gold: str


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample: `n` completions per prompt, each up to `max_tokens` new tokens."""

    n: int = 1
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class Completion:
    """One sampled completion: its token ids, decoded text and the sampler's log-probs."""

    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str = "stop"


@dataclass
class Rollout:
    """One response to one problem, as the rollout worker hands it on."""

    problem: Problem
    group_index: int
    prompt_token_ids: list[int]
    completion: Completion
    policy_version: int


@dataclass
class JudgedRollout:
    """A rollout plus the raw critique texts of the judge (None = the judge failed).

    `judge_prompt` is the exact text the judge model received for it (decoded
    from the token ids sent, special tokens kept), or None where not known
    (no judge, the symbolic checker, an HTTP endpoint) or not sent.
    """

    rollout: Rollout
    critiques: list[str | None] = field(default_factory=list)
    judge_prompt: str | None = None


@dataclass
class TrainBatch:
    """Padded token-level training data for the learner (one shard per rank).

    Shapes: `[B, L]` for every tensor but `policy_version`; `loss_mask` is 1
    on response tokens. `advantages` and `sampler_logprobs` are zero where
    `loss_mask` is 0. `policy_version` ([B], long) is the weight version that
    sampled each row (`Rollout.policy_version`); None = unknown, treated as
    current (no off-policy correction).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    advantages: torch.Tensor
    sampler_logprobs: torch.Tensor
    policy_version: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def shard(self, rank: int, world_size: int) -> TrainBatch:
        """Rows rank::world_size, so every rank gets a near-equal share."""
        idx = torch.arange(rank, len(self), world_size)
        return TrainBatch(*(t[idx] for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The fields in constructor order (`policy_version` only when known)."""
        fields = (
            self.input_ids,
            self.attention_mask,
            self.loss_mask,
            self.advantages,
            self.sampler_logprobs,
        )
        return fields if self.policy_version is None else (*fields, self.policy_version)
