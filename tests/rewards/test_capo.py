"""CAPO's asymmetric token reward (DESIGN §1.4)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from capo_dist.rewards.capo import token_rewards, token_rewards_batch


@pytest.mark.parametrize(
    ("correct", "weight", "expected"),
    [(True, 0.0, 2.0), (True, 1.0, 1.0), (False, 0.0, 0.0), (False, 1.0, -1.0)],
)
def test_reward_table(correct, weight, expected):
    assert token_rewards(correct, [0, 0], [weight]) == [expected, expected]
    out = token_rewards_batch(
        torch.tensor([correct]), torch.tensor([[0, 0]]), torch.tensor([[weight]]), torch.ones(1, 2)
    )
    assert out.tolist() == [[expected, expected]]


def test_right_but_flawed_beats_wrong_but_clean():
    flawed = token_rewards(True, [0], [1.0])[0]
    clean_wrong = token_rewards(False, [0], [0.0])[0]
    assert flawed > clean_wrong


def test_per_step_weights_and_soft_weights():
    assert token_rewards(True, [0, 1, 1, 2], [0.0, 0.5, 1.0], 2.0, 1.0) == [2.0, 1.5, 1.5, 1.0]
    assert token_rewards(False, [0, 1], [1.0, 0.25], w_outcome=1.0, w_process=0.5) == [-0.5, -0.125]


def test_grpo_is_w_process_zero():
    assert token_rewards(True, [0, 1], [1.0, 1.0], w_process=0.0) == [2.0, 2.0]


def test_no_steps_means_no_penalty_and_bad_index_raises():
    assert token_rewards(True, [0, 0, 0], []) == [2.0] * 3
    with pytest.raises(ValueError):
        token_rewards(True, [3], [0.0, 1.0])


def test_batch_mask_padding_and_penalize_switches():
    correct = torch.tensor([1.0, 0.0])
    steps = torch.tensor([[0, 1, -1], [1, 0, 0]])
    weights = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = token_rewards_batch(correct, steps, weights, mask)
    assert out.tolist() == [[2.0, 1.0, 0.0], [-1.0, -1.0, -1.0]]
    out = token_rewards_batch(correct, steps, weights, mask, penalize_correct=False)
    assert out.tolist() == [[2.0, 2.0, 0.0], [-1.0, -1.0, -1.0]]
    out = token_rewards_batch(correct, steps, weights, mask, penalize_incorrect=False)
    assert out.tolist() == [[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    out = token_rewards_batch(correct.bool(), steps, torch.zeros(2, 0), mask)
    assert out.tolist() == [[2.0, 2.0, 0.0], [0.0, 0.0, 0.0]]


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_batch_equals_scalar(data):
    b = data.draw(st.integers(1, 5))
    s = data.draw(st.integers(1, 6))
    t = data.draw(st.integers(1, 12))
    w_out = data.draw(st.floats(0, 3))
    w_proc = data.draw(st.floats(0, 2))
    rows = []
    for _ in range(b):
        n = data.draw(st.integers(0, t))
        rows.append(
            (
                data.draw(st.booleans()),
                data.draw(st.lists(st.integers(0, s - 1), min_size=n, max_size=n)),
                data.draw(st.lists(st.floats(0, 1), min_size=s, max_size=s)),
            )
        )
    steps = torch.full((b, t), -1, dtype=torch.long)
    mask = torch.zeros(b, t)
    for i, (_, ts, _) in enumerate(rows):
        steps[i, : len(ts)] = torch.tensor(ts, dtype=torch.long)
        mask[i, : len(ts)] = 1
    out = token_rewards_batch(
        torch.tensor([r[0] for r in rows]),
        steps,
        torch.tensor([r[2] for r in rows]),
        mask,
        w_outcome=w_out,
        w_process=w_proc,
    )
    for i, (c, ts, ws) in enumerate(rows):
        ref = token_rewards(c, ts, ws, w_out, w_proc)
        assert out[i, : len(ts)].tolist() == pytest.approx(ref, abs=1e-5)
        assert out[i, len(ts) :].abs().sum() == 0
