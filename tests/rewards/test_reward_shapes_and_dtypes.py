"""Contracts of the reward tensors at their edges (capo.py, voting.py): index checks at the
boundary, padding that holds any value, output dtypes whatever the input dtypes, empty
batches."""

import numpy as np
import pytest
import torch

from capo_dist.rewards.capo import token_rewards, token_rewards_batch
from capo_dist.rewards.voting import stack_critiques, vote, vote_batch


def test_step_index_must_lie_in_range():
    with pytest.raises(ValueError, match=r"token step 2 outside \[0, 2\)"):
        token_rewards(True, [0, 2], [0.0, 1.0])  # one past the last step
    with pytest.raises(ValueError, match=r"token step -1 outside \[0, 2\)"):
        token_rewards(False, [-1], [0.0, 1.0])
    assert token_rewards(False, [1], [0.0, 1.0]) == [-1.0]  # the last step itself


def test_batch_padding_may_hold_any_step_value():
    """Where mask is 0 the step index is never read: -1 and far out of range are fine."""
    steps = torch.tensor([[0, 99, -1], [1, 0, 1000]])
    mask = torch.tensor([[1, 0, 0], [1, 1, 0]])
    out = token_rewards_batch(
        torch.tensor([True, False]), steps, torch.tensor([[0.5, 1.0], [0.25, 1.0]]), mask
    )
    assert out.tolist() == [[1.5, 0.0, 0.0], [-1.0, -0.25, 0.0]]


def test_batch_rewards_are_float32_whatever_the_inputs():
    steps = torch.tensor([[0, 1]])
    for correct, weights, mask in [
        (torch.tensor([1.0], dtype=torch.float64), torch.tensor([[0.5, 0.0]]), torch.ones(1, 2)),
        (torch.tensor([True]), torch.tensor([[0.5, 0.0]], dtype=torch.float64), torch.ones(1, 2)),
        (torch.tensor([1]), torch.tensor([[0.5, 0.0]]), torch.ones(1, 2, dtype=torch.float64)),
        (torch.tensor([True]), torch.tensor([[0.5, 0.0]]), torch.ones(1, 2, dtype=torch.long)),
    ]:
        out = token_rewards_batch(correct, steps, weights, mask)
        assert out.dtype == torch.float32
        assert out.tolist() == [[1.5, 2.0]]


def test_stack_critiques_of_no_responses():
    flags, valid = stack_critiques([])
    assert flags.shape == (0, 0, 1) and valid.shape == (0, 0)
    flags, valid = stack_critiques([[], []], num_steps=3)
    assert flags.shape == (2, 0, 3) and valid.shape == (2, 0)
    assert vote_batch(flags, valid, "average").tolist() == [[0.0] * 3, [0.0] * 3]
    flags, valid = stack_critiques([[None, frozenset({2})]])
    assert flags.shape == (1, 2, 3) and valid.tolist() == [[False, True]]
    assert np.array_equal(flags[0, 1], [False, False, True])


def test_stack_critiques_drops_out_of_range_steps_and_returns_bools():
    flags, valid = stack_critiques([[frozenset({0, 3, 5, -1})]], num_steps=3)
    assert flags.dtype == bool and valid.dtype == bool
    assert flags.tolist() == [[[True, False, False]]] and valid.tolist() == [[True]]


def test_vote_batch_reads_booleans_and_checks_shapes():
    # any non-zero flag is one flag, any non-zero valid one valid critique
    assert vote_batch(np.array([[[3, 0]]]), np.array([[2]]), "average").tolist() == [[1.0, 0.0]]
    two = vote_batch(np.array([[[1], [0]]]), np.array([[2, 1]]), "average")
    assert two.tolist() == [[0.5]]  # one flag among two valid critiques
    shapes = r"flags \[B, N, S\] and valid \[B, N\] expected"
    with pytest.raises(ValueError, match=shapes):
        vote_batch(np.zeros((1, 2, 3), bool), np.zeros((1, 3), bool), "union")
    with pytest.raises(ValueError, match=shapes):
        vote_batch(np.zeros((1, 2), bool), np.zeros((1, 2), bool), "union")


def test_vote_ignores_steps_out_of_range_and_names_the_modes():
    assert vote([frozenset({3, 0})], "union", 3) == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="valid modes: intersection, majority, union, average"):
        vote([], "mean", 2)
