"""Group-normalised advantages (DESIGN §1.5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from capo_dist.rewards.advantages import ADVANTAGE_ESTIMATORS, compute_advantages


def _naive(rewards, mask, groups, mode, eps=1e-6):
    """Loop reference, one group at a time (population std)."""
    r, m = rewards.double().numpy(), mask.double().numpy()
    out = np.zeros_like(r)
    for g in set(groups.tolist()):
        rows = [i for i, x in enumerate(groups.tolist()) if x == g]
        if mode in ("group_token", "no_std"):
            vals = np.concatenate([r[i][m[i] > 0] for i in rows])
            if vals.size == 0:
                continue
            mu, sd = vals.mean(), vals.std()
            for i in rows:
                if mode == "no_std":
                    out[i] = (r[i] - mu) * m[i]
                elif np.all(vals == vals[0]):
                    out[i] = 0.0
                else:
                    out[i] = (r[i] - mu) / (sd + eps) * m[i]
        else:
            present = [i for i in rows if m[i].sum() > 0]
            means = np.array([(r[i] * m[i]).sum() / m[i].sum() for i in present])
            if means.size == 0 or np.all(means == means[0]):
                continue
            mu, sd = means.mean(), means.std()
            for i, mean in zip(present, means, strict=True):
                out[i] = (mean - mu) / (sd + eps) * m[i]
    return torch.from_numpy(out)


@st.composite
def batches(draw):
    g = draw(st.integers(1, 4))
    size = draw(st.integers(1, 4))
    t = draw(st.integers(1, 8))
    b = g * size
    vals = draw(
        st.lists(st.sampled_from([-1.0, 0.0, 0.5, 1.0, 1.25, 2.0]), min_size=b * t, max_size=b * t)
    )
    lens = draw(st.lists(st.integers(0, t), min_size=b, max_size=b))
    rewards = torch.tensor(vals, dtype=torch.float32).view(b, t)
    mask = (torch.arange(t)[None, :] < torch.tensor(lens)[:, None]).float()
    perm = draw(st.permutations(list(range(b))))
    groups = torch.tensor([10 * (i // size) + 3 for i in perm])  # arbitrary ids, interleaved
    return rewards * mask, mask, groups


@settings(max_examples=150, deadline=None)
@given(batches(), st.sampled_from(list(ADVANTAGE_ESTIMATORS)))
def test_equals_naive_reference(batch, mode):
    rewards, mask, groups = batch
    adv = compute_advantages(rewards, mask, groups, mode=mode)
    assert adv.dtype == torch.float32
    assert torch.allclose(adv.double(), _naive(rewards, mask, groups, mode), atol=1e-4)
    assert torch.all(adv[mask == 0] == 0)


@settings(max_examples=150, deadline=None)
@given(batches())
def test_group_token_zero_mean_unit_std_per_group(batch):
    rewards, mask, groups = batch
    adv = compute_advantages(rewards, mask, groups).double()
    for g in groups.unique():
        sel = (groups == g)[:, None] & (mask > 0)
        vals = adv[sel]
        if vals.numel():
            assert abs(vals.mean().item()) < 1e-5
            sd = vals.std(unbiased=False).item()
            assert sd == 0.0 or abs(sd - 1.0) < 1e-3


def test_sigma_zero_gives_zero():
    rewards = torch.full((4, 5), 2.0)
    mask = torch.ones(4, 5)
    groups = torch.tensor([0, 0, 1, 1])
    for mode in ADVANTAGE_ESTIMATORS:
        assert torch.all(compute_advantages(rewards, mask, groups, mode=mode) == 0)
    # float-inexact constant (0.1 is not exact in binary) still gives exactly 0
    assert torch.all(
        compute_advantages(torch.full((3, 7), 0.1), torch.ones(3, 7), torch.zeros(3)) == 0
    )


def test_group_token_hand_example():
    # group of 2: tokens [2, 2] and [1, 0, 0(masked)] → values 2,2,1,0: μ=1.25, σ=sqrt(0.6875)
    rewards = torch.tensor([[2.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]]).float()
    adv = compute_advantages(rewards, mask, torch.tensor([7, 7]))
    sd = np.sqrt(0.6875)
    expected = torch.tensor([[0.75 / sd, 0.75 / sd, 0], [-0.25 / sd, -1.25 / sd, 0]])
    assert torch.allclose(adv, expected.float(), atol=1e-5)


def test_group_response_is_grpo_like():
    rewards = torch.tensor([[2.0, 2.0], [0.0, 0.0], [2.0, 0.0]])
    mask = torch.ones(3, 2)
    adv = compute_advantages(rewards, mask, torch.tensor([0, 0, 0]), mode="group_response")
    means = np.array([2.0, 0.0, 1.0])
    z = (means - means.mean()) / (means.std() + 1e-6)
    assert torch.allclose(
        adv, torch.tensor(z, dtype=torch.float32)[:, None].expand(3, 2), atol=1e-5
    )


def test_unknown_mode_and_shapes():
    with pytest.raises(ValueError, match="group_token.*group_response.*no_std"):
        compute_advantages(torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1), mode="ppo")
    with pytest.raises(ValueError):
        compute_advantages(torch.zeros(2, 3), torch.ones(2, 2), torch.zeros(2))
    assert compute_advantages(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0)).shape == (0, 3)
