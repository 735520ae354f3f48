"""Group outcome facts, the all-wrong-group gate and DAPO's overlong penalty (pure)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from capo_dist.rewards.advantages import compute_advantages
from capo_dist.rewards.capo import token_rewards_batch
from capo_dist.rewards.groups import first_mixed_rows, group_outcomes, process_gate
from capo_dist.rewards.overlong import overlong_penalty


def _advantages(correct, steps, weights, uids, mode):
    """The make_experience path: group facts → gate → token rewards → group_token advantages."""
    correct = torch.tensor(correct, dtype=torch.bool)
    mask = torch.ones(steps.shape)
    groups = group_outcomes(uids, correct, torch.ones(len(uids), dtype=torch.bool))
    gate = process_gate(groups, mode)
    rewards = token_rewards_batch(correct, steps, weights * gate[:, None], mask)
    return compute_advantages(rewards, mask, groups.group)


def test_two_wrong_responses_keep_ranks_them_outcome_only_zeroes_them():
    """Both wrong; A's first step (2 of its 4 tokens) is flagged, B is clean. keep: token
    rewards A [-1,-1,0,0], B [0,0,0,0]: mu = -1/4, sigma = sqrt(3)/4, so B gets +1/sqrt(3)
    = +0.577 on every token (a "cleaner" wrong answer is pushed up); outcome_only: 0."""
    steps = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]])
    weights = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    keep = _advantages([False, False], steps, weights, ["p", "p"], "keep")
    third = 1 / math.sqrt(3)
    want = torch.tensor([[-3 * third, -3 * third, third, third], [third] * 4])
    torch.testing.assert_close(keep, want, atol=1e-5, rtol=0)
    assert keep[1, 0] == pytest.approx(0.577, abs=1e-3)
    only = _advantages([False, False], steps, weights, ["p", "p"], "outcome_only")
    assert torch.equal(only, torch.zeros(2, 4))


def test_group_outcomes_by_hand():
    uids = ["a", "a", "b", "b", "c", "c", "d", "d"]
    correct = torch.tensor([1, 0, 0, 0, 1, 1, 0, 1], dtype=torch.bool)
    counted = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0], dtype=torch.bool)  # d's right one masked
    g = group_outcomes(uids, correct, counted)
    assert g.group.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert g.constant.tolist() == [False, True, True, True]
    assert g.all_wrong.tolist() == [False, True, False, True]
    nobody = group_outcomes(["x", "x"], torch.tensor([True, False]), torch.zeros(2, dtype=bool))
    assert nobody.constant.tolist() == [True] and nobody.all_wrong.tolist() == [False]
    assert process_gate(g, "outcome_only").tolist() == [1, 1, 0, 0, 1, 1, 0, 0]
    assert process_gate(g, "keep").tolist() == [1.0] * 8
    with pytest.raises(ValueError, match="capo.all_wrong_groups='drop'"):
        process_gate(g, "drop")


def test_first_mixed_rows_keeps_the_first_groups_in_order():
    uids = ["a", "a", "b", "b", "c", "c", "e", "e"]
    correct = torch.tensor([1, 1, 0, 1, 0, 0, 1, 0], dtype=torch.bool)  # b and e are mixed
    g = group_outcomes(uids, correct, torch.ones(8, dtype=torch.bool))
    assert first_mixed_rows(g, 1).tolist() == [2, 3]
    assert first_mixed_rows(g, 5).tolist() == [2, 3, 6, 7]
    same = group_outcomes(["a", "a"], torch.tensor([False, False]), torch.ones(2, dtype=bool))
    assert first_mixed_rows(same, 4).tolist() == []


def test_overlong_penalty_by_hand():
    """L = 10, C = 4: no penalty up to 6 tokens, then -factor/4 per token, -factor at 10."""
    got = overlong_penalty(torch.tensor([1, 6, 7, 8, 9, 10, 12]), 10, 4, 0.5)
    want = torch.tensor([0.0, 0.0, -0.125, -0.25, -0.375, -0.5, -0.5])
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    with pytest.raises(ValueError, match="overlong buffer 0"):
        overlong_penalty(torch.tensor([1]), 10, 0, 1.0)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.booleans(), st.integers(1, 5), st.integers(0, 2)),
        min_size=1,
        max_size=10,
    ),
    st.sampled_from(["group_token", "group_response", "no_std"]),
)
def test_outcome_only_zeroes_all_wrong_groups_and_changes_nothing_else(rows, mode):
    """Any groups, lengths and flags: under outcome_only every token of an all-wrong group
    has advantage 0, and every other group's advantages are exactly keep's."""
    B = len(rows)
    uids = [f"p{g}" for g, _, _, _ in rows]
    correct = torch.tensor([ok for _, ok, _, _ in rows])
    T = max(n for _, _, n, _ in rows)
    mask = torch.zeros(B, T)
    steps = torch.zeros(B, T, dtype=torch.long)
    weights = torch.zeros(B, 2)
    for b, (_, _, n, flagged) in enumerate(rows):
        mask[b, :n] = 1
        steps[b, :n] = torch.arange(n) % 2
        weights[b, : min(flagged, 2)] = 1.0
    counted = torch.ones(B, dtype=torch.bool)
    groups = group_outcomes(uids, correct, counted)
    out = {}
    for how in ("keep", "outcome_only"):
        gate = process_gate(groups, how)
        rewards = token_rewards_batch(correct, steps, weights * gate[:, None], mask)
        out[how] = compute_advantages(rewards, mask, groups.group, mode)
    wrong_rows = groups.all_wrong[groups.group]
    assert torch.equal(out["outcome_only"][wrong_rows], torch.zeros_like(out["keep"][wrong_rows]))
    assert torch.equal(out["outcome_only"][~wrong_rows], out["keep"][~wrong_rows])
