"""Exact values at the edges of the advantage estimators and the PPO loss (advantages.py,
loss.py): the ε in σ + ε, exact zeros of a constant group in float64, the defaults of
the loss (no KL, stale cap 2) and its output dtype."""

import math

import pytest
import torch

from capo_dist.rewards.advantages import compute_advantages
from capo_dist.rewards.loss import ppo_clip_loss


@pytest.mark.parametrize("mode", ["group_token", "group_response"])
def test_constant_group_is_exactly_zero_in_float64(mode):
    # (0.1 + 0.1 + 0.1) / 3 != 0.1 in float64: the centred rewards are ~1e-17, not 0;
    # the masked last token holds another value, which must not make the group look varied
    rewards = torch.tensor([[0.1, 0.1, 7.0]] * 3, dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0]] * 3, dtype=torch.float64)
    adv = compute_advantages(rewards, mask, torch.zeros(3), mode=mode)
    assert adv.dtype == torch.float64 and torch.all(adv == 0)


@pytest.mark.parametrize("mode", ["group_token", "group_response"])
def test_scale_is_one_over_sigma_plus_eps(mode):
    # two responses, rewards 0 and 1 on every token: μ = 0.5, σ = 0.5
    rewards = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    adv = compute_advantages(
        rewards, torch.ones_like(rewards), torch.tensor([4, 4]), mode=mode, eps=1e-3
    )
    a = 0.5 / 0.501
    assert adv.flatten().tolist() == pytest.approx([-a, -a, a, a], abs=1e-12)


def test_loss_defaults_apply_no_kl():
    lp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-0.5, -2.5]])
    loss, m = ppo_clip_loss(lp, lp, torch.tensor([[1.0, -1.0]]), torch.ones(1, 2), ref_logprobs=ref)
    assert m["kl"] > 0.1  # the KL is measured ...
    assert loss.item() == m["pg_loss"] == 0.0  # ... but kl_coef defaults to 0


def test_loss_default_stale_cap_is_two():
    # the stale sampler drew the token e^2 times less often than old: capped at 2
    old = torch.tensor([[-1.0]])
    _, m = ppo_clip_loss(
        old,
        old,
        torch.zeros(1, 1),
        torch.ones(1, 1),
        sampler_logprobs=torch.tensor([[-3.0]]),
        stale=torch.tensor([True]),
    )
    assert m["ratio_mean"] == pytest.approx(2.0, rel=1e-6)
    assert m["ratio_mean"] != pytest.approx(math.e**2, rel=1e-2)


def test_loss_has_the_logprobs_dtype_whatever_the_mask_dtype():
    lp = torch.tensor([[-1.0, -2.0]])
    adv = torch.tensor([[1.0, -1.0]])
    for mask in (torch.ones(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.long)):
        loss, _ = ppo_clip_loss(lp, lp, adv, mask)
        assert loss.dtype == torch.float32 and loss.item() == 0.0


def test_loss_and_metrics_by_hand_with_a_masked_token():
    """Two live tokens and one masked (with values that would show if it counted)."""
    lp = torch.tensor([[-1.0, -2.0, -3.0]])
    old = torch.tensor([[-1.5, -2.0, -9.0]])
    ref = torch.tensor([[-1.0, -2.5, 0.0]])
    sampler = torch.tensor([[-1.5, -1.0, 0.0]])
    adv = torch.tensor([[1.0, 1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, m = ppo_clip_loss(
        lp, old, adv, mask, ref_logprobs=ref, kl_coef=1.0, sampler_logprobs=sampler, tis_cap=10.0
    )
    r1 = math.exp(0.5)  # token 1: ratio e^0.5, clipped to 1.2; token 2: ratio 1
    tis2 = math.exp(-1.0)  # token 2: exp(old - sampler); token 1: 1
    pg = (-1.2 * 1.0 + -1.0 * tis2) / 2
    kl2 = math.exp(-0.5) + 0.5 - 1.0  # token 2: d = ref - lp = -0.5; token 1: d = 0
    expected = {
        "clip_frac": 0.5,
        "approx_kl": (r1 - 1.0 - 0.5) / 2,
        "ratio_mean": (r1 + 1.0) / 2,
        "kl": kl2 / 2,
        "tis_mean": (1.0 + tis2) / 2,
        "pg_loss": pg,
        "stale_frac": 0.0,
    }
    assert m == pytest.approx(expected, rel=1e-6)
    assert loss.item() == pytest.approx(pg + kl2 / 2, rel=1e-6)  # kl_coef = 1 counts


def test_stale_rows_given_as_zero_one():
    lp = torch.tensor([[-1.0], [-1.0]])
    _, m = ppo_clip_loss(
        lp, lp, torch.zeros(2, 1), torch.ones(2, 1), sampler_logprobs=lp, stale=torch.tensor([1, 0])
    )
    assert m["stale_frac"] == 0.5 and m["ratio_mean"] == 1.0


def test_advantage_dtypes():
    ones = torch.ones(2, 2)
    # integer rewards: computed and returned in float32
    adv = compute_advantages(torch.tensor([[2, 0], [0, 0]]), ones, torch.zeros(2), mode="no_std")
    assert adv.dtype == torch.float32 and adv.tolist() == [[1.5, -0.5], [-0.5, -0.5]]
    # bfloat16 rewards: computed in float32, returned in bfloat16
    r = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.bfloat16)
    adv = compute_advantages(r, ones, torch.zeros(2), mode="no_std")
    assert adv.dtype == torch.bfloat16 and adv.float().tolist() == [[0.75, -0.25], [-0.25, -0.25]]


def test_advantage_argument_errors_name_the_problem():
    with pytest.raises(ValueError, match="valid modes: group_token, group_response, no_std"):
        compute_advantages(torch.zeros(1, 1), torch.ones(1, 1), torch.zeros(1), mode="ppo")
    shapes = (
        r"rewards \[B, T\], mask \[B, T\], group_ids \[B\] expected; got \(2, 3\), \(2, 3\), \(3,\)"
    )
    with pytest.raises(ValueError, match=shapes):
        compute_advantages(torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(3))
