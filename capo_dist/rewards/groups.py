"""Outcome facts of a step's groups: which hold only one outcome, which are all wrong.

A group is the responses to one prompt. Only *counted* responses take part
(`rollout.truncated=mask` leaves truncated ones out). These facts drive two
choices about groups whose outcomes carry no signal:

* `capo.all_wrong_groups=outcome_only` drops the process term inside an
  all-wrong group (`process_gate`), so its advantages are all 0;
* `trainer.filter_groups=outcome` trains only on groups whose outcomes differ
  (`first_mixed_rows`), looking at the verifier's outcome, never at the shaped
  reward (a shaped reward would let all-wrong groups through).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GroupOutcomes:
    """`group` [B] long: each response's group in [0, G), groups numbered in order of first
    appearance; `constant` [G] bool: every counted response of the group has the same
    outcome (true of a group with none counted); `all_wrong` [G] bool: at least one counted
    response and none of them right."""

    group: torch.Tensor
    constant: torch.Tensor
    all_wrong: torch.Tensor


def group_outcomes(
    uids: Sequence[str], correct: torch.Tensor, counted: torch.Tensor
) -> GroupOutcomes:
    """The groups of responses with problem ids `uids` [B], outcomes `correct` [B] bool and
    `counted` [B] bool (False: left out of every group statistic)."""
    order = {u: i for i, u in enumerate(dict.fromkeys(uids))}
    group = torch.tensor([order[u] for u in uids], dtype=torch.long)
    g = len(order)
    right = torch.zeros(g, dtype=torch.long).index_add_(0, group, (correct & counted).long())
    present = torch.zeros(g, dtype=torch.long).index_add_(0, group, counted.long())
    return GroupOutcomes(
        group=group,
        constant=(right == 0) | (right == present),
        all_wrong=(present > 0) & (right == 0),
    )


def process_gate(outcomes: GroupOutcomes, all_wrong_groups: str) -> torch.Tensor:
    """float32 [B]: 1 where the process penalty applies, 0 in an all-wrong group under
    `outcome_only` (`keep`: 1 everywhere)."""
    if all_wrong_groups == "keep":
        return torch.ones(outcomes.group.shape, dtype=torch.float32)
    if all_wrong_groups == "outcome_only":
        return (~outcomes.all_wrong[outcomes.group]).float()
    raise ValueError(
        f"capo.all_wrong_groups={all_wrong_groups!r}: choose one of keep, outcome_only"
    )


def first_mixed_rows(outcomes: GroupOutcomes, max_groups: int) -> torch.Tensor:
    """long [K]: the rows, in order, of the first `max_groups` groups whose outcomes differ."""
    mixed = torch.nonzero(~outcomes.constant).flatten()[:max_groups]
    keep = torch.zeros_like(outcomes.constant)
    keep[mixed] = True
    return torch.nonzero(keep[outcomes.group]).flatten()
