"""Token-level PPO-clip loss and per-token log-probs (DESIGN §1.5)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from capo_dist.rewards.loss import (
    logprobs_and_entropy,
    loss_token_weights,
    ppo_clip_loss,
    token_logprobs,
)


def _naive_loss(lp, old, adv, mask, cl, ch, ref, kl_coef, sampler, cap, num_tokens):
    total, n = 0.0, 0.0
    for b in range(len(lp)):
        for t in range(len(lp[0])):
            if not mask[b][t]:
                continue
            n += 1
            ratio = math.exp(lp[b][t] - old[b][t])
            a = adv[b][t]
            term = -min(ratio * a, min(max(ratio, 1 - cl), 1 + ch) * a)
            if sampler is not None and cap is not None:
                term *= min(math.exp(old[b][t] - sampler[b][t]), cap)
            if ref is not None:
                d = ref[b][t] - lp[b][t]
                term += kl_coef * (math.exp(d) - d - 1)
            total += term
    return total / (num_tokens if num_tokens is not None else max(n, 1.0))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(1, 6),
    st.integers(0, 10_000),
    st.booleans(),
    st.booleans(),
    st.sampled_from([None, 37.0]),
)
def test_loss_equals_naive(b, t, seed, use_ref, use_tis, num_tokens):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    old = lp + (torch.rand(b, t, generator=g, dtype=torch.float64) - 0.5) * 0.8
    adv = torch.randn(b, t, generator=g, dtype=torch.float64)
    mask = (torch.rand(b, t, generator=g) > 0.3).double()
    ref = lp + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.2 if use_ref else None
    sampler = old + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.3 if use_tis else None
    cap = 2.0 if use_tis else None
    loss, metrics = ppo_clip_loss(
        lp, old, adv, mask, 0.2, 0.28, ref, 0.05, sampler, cap, num_tokens=num_tokens
    )
    expected = _naive_loss(
        lp.tolist(),
        old.tolist(),
        adv.tolist(),
        mask.tolist(),
        0.2,
        0.28,
        ref.tolist() if ref is not None else None,
        0.05,
        sampler.tolist() if sampler is not None else None,
        cap,
        num_tokens,
    )
    assert loss.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert 0.0 <= metrics["clip_frac"] <= 1.0


def test_clipping_and_gradient():
    old = torch.zeros(1, 4)
    lp = torch.log(torch.tensor([[1.5, 0.5, 1.5, 0.5]])).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    loss, m = ppo_clip_loss(lp, old, adv, torch.ones(1, 4))
    # token 0: A>0, ratio 1.5 > 1.2 → clipped (no grad); token 3: A<0, ratio 0.5 < 0.8 → clipped.
    assert m["clip_frac"] == pytest.approx(0.5)
    loss.backward()
    assert lp.grad[0, 0] == 0 and lp.grad[0, 3] == 0
    assert lp.grad[0, 1] < 0 and lp.grad[0, 2] > 0  # gradient descent raises/lowers them
    assert loss.item() == pytest.approx(-(1.2 + 0.5 - 1.5 - 0.8) / 4)


def test_asymmetric_clip_high():
    old = torch.zeros(1, 1)
    lp = torch.log(torch.tensor([[1.25]]))
    loss, _ = ppo_clip_loss(lp, old, torch.ones(1, 1), torch.ones(1, 1), clip_high=0.28)
    assert loss.item() == pytest.approx(-1.25)  # 1.25 < 1.28: not clipped


def test_metrics_at_ratio_one_and_kl():
    lp = torch.full((2, 3), -1.0)
    loss, m = ppo_clip_loss(
        lp, lp.clone(), torch.ones(2, 3), torch.ones(2, 3), ref_logprobs=lp - 0.1, kl_coef=0.5
    )
    k3 = math.exp(-0.1) + 0.1 - 1
    assert m["ratio_mean"] == pytest.approx(1.0) and m["approx_kl"] == pytest.approx(0.0)
    assert m["kl"] == pytest.approx(k3, rel=1e-4) and m["clip_frac"] == 0.0 and m["tis_mean"] == 1.0
    assert loss.item() == pytest.approx(-1.0 + 0.5 * k3, rel=1e-6)


def test_tis_weight_is_capped_and_detached():
    lp = torch.zeros(1, 2, requires_grad=True)
    old = torch.zeros(1, 2)
    sampler = torch.tensor([[-3.0, 0.5]])  # exp(3) → capped at 2; exp(-0.5) kept
    loss, m = ppo_clip_loss(
        lp, old, torch.ones(1, 2), torch.ones(1, 2), sampler_logprobs=sampler, tis_cap=2.0
    )
    assert m["tis_mean"] == pytest.approx((2.0 + math.exp(-0.5)) / 2)
    loss.backward()
    assert torch.allclose(lp.grad, -torch.tensor([[2.0, math.exp(-0.5)]]) / 2)


def test_global_token_normaliser_splits_exactly():
    g = torch.Generator().manual_seed(0)
    lp, old, adv = (torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(3))
    mask = (torch.rand(4, 5, generator=g) > 0.4).double()
    full, _ = ppo_clip_loss(lp, old, adv, mask)
    n = mask.sum().item()
    rows = [slice(i, i + 1) for i in range(4)]
    parts = sum(ppo_clip_loss(lp[r], old[r], adv[r], mask[r], num_tokens=n)[0] for r in rows)
    assert parts.item() == pytest.approx(full.item())


def test_token_logprobs_alignment_and_values():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 11, generator=g)
    ids = torch.randint(0, 11, (3, 6), generator=g)
    out = token_logprobs(logits, ids, chunk_rows=2)
    ref = torch.log_softmax(logits, -1)
    assert out.shape == (3, 6) and torch.all(out[:, 0] == 0)
    for b in range(3):
        for t in range(1, 6):
            assert out[b][t].item() == pytest.approx(ref[b, t - 1, ids[b][t]].item(), abs=1e-5)


def test_token_logprobs_bf16_and_grad():
    logits = torch.randn(2, 4, 7, dtype=torch.bfloat16, requires_grad=True)
    ids = torch.randint(0, 7, (2, 4))
    out = token_logprobs(logits, ids)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert logits.grad is not None and logits.grad.shape == logits.shape


def test_stale_rows_take_the_ratio_against_the_capped_sampler():
    """Row 0 was sampled one policy version ago: its ratio is against the engine's log-probs μ,
    with old/μ capped at 1.5; row 1 is fresh: ratio exp(lp − old) = 1, whatever μ says."""
    old = torch.full((2, 3), math.log(0.5))
    lp = old.clone().requires_grad_()  # the first optimizer step: current = old
    sampler = torch.log(torch.tensor([[0.25, 0.4, 1.0], [0.1, 0.9, 0.3]]))
    adv = torch.ones(2, 3)
    loss, m = ppo_clip_loss(
        lp,
        old,
        adv,
        torch.ones(2, 3),
        sampler_logprobs=sampler,
        tis_cap=None,
        stale=torch.tensor([True, False]),
        stale_ratio_cap=1.5,
    )
    # Row 0, by hand: old/μ = 2 → capped 1.5, clipped to 1.2 (A > 0); 1.25 → clipped 1.2;
    # 0.5 → unclipped 0.5. Row 1: ratio 1 on every token.
    assert loss.item() == pytest.approx(-(1.2 + 1.2 + 0.5 + 3 * 1.0) / 6, rel=1e-6)
    assert m["ratio_mean"] == pytest.approx((1.5 + 1.25 + 0.5 + 3.0) / 6, rel=1e-6)
    assert m["clip_frac"] == pytest.approx(2 / 6) and m["stale_frac"] == pytest.approx(0.5)
    loss.backward()
    # Clipped tokens carry no gradient; the unclipped stale one is weighted by its ratio 0.5.
    assert lp.grad[0, 0] == 0 and lp.grad[0, 1] == 0
    assert lp.grad[0, 2].item() == pytest.approx(-0.5 / 6, rel=1e-6)
    torch.testing.assert_close(lp.grad[1], torch.full((3,), -1.0 / 6))


def test_stale_rows_skip_tis_and_fresh_rows_keep_it():
    old = torch.zeros(2, 1)
    sampler = torch.tensor([[-0.5], [-0.5]])  # old/μ = e^0.5 on both rows
    _, m = ppo_clip_loss(
        old.clone(),
        old,
        torch.ones(2, 1),
        torch.ones(2, 1),
        sampler_logprobs=sampler,
        tis_cap=10.0,
        stale=torch.tensor([True, False]),
        stale_ratio_cap=10.0,
    )
    assert m["tis_mean"] == pytest.approx((1.0 + math.exp(0.5)) / 2, rel=1e-6)
    assert m["ratio_mean"] == pytest.approx((math.exp(0.5) + 1.0) / 2, rel=1e-6)


def test_stale_rows_need_the_behaviour_policy_and_a_cap_above_one():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="stale rows need sampler_logprobs"):
        ppo_clip_loss(x, x, x, torch.ones(1, 2), stale=torch.tensor([True]))
    with pytest.raises(ValueError, match="stale_ratio_cap must be > 1"):
        ppo_clip_loss(
            x,
            x,
            x,
            torch.ones(1, 2),
            sampler_logprobs=x,
            stale=torch.tensor([True]),
            stale_ratio_cap=1.0,
        )


def test_loss_token_weights_by_hand():
    """Two rows of 2 and 1 loss tokens; the step holds 6 tokens in 3 sequences overall."""
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    tok = loss_token_weights(mask, "token_mean", global_tokens=6, global_seqs=3)
    torch.testing.assert_close(tok, torch.tensor([[0, 1 / 6, 1 / 6, 0], [0, 0, 1 / 6, 0]]))
    seq = loss_token_weights(mask, "seq_mean_token_mean", global_tokens=6, global_seqs=3)
    torch.testing.assert_close(seq, torch.tensor([[0, 1 / 6, 1 / 6, 0], [0, 0, 1 / 3, 0]]))
    dr = loss_token_weights(mask, "seq_mean_token_sum_norm", 6, 3, norm_tokens=8)
    torch.testing.assert_close(dr, torch.tensor([[0, 1 / 24, 1 / 24, 0], [0, 0, 1 / 24, 0]]))
    with pytest.raises(ValueError, match="norm_tokens > 0"):
        loss_token_weights(mask, "seq_mean_token_sum_norm", 6, 3)
    with pytest.raises(ValueError, match="loss_agg='mean'; choose one of"):
        loss_token_weights(mask, "mean", 6, 3)


def test_token_weights_aggregate_the_loss():
    """loss = Σ w_t·ℓ_t: seq-mean of token-means (ratio 1, so ℓ_t = −A_t) by hand."""
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([[1.0, 3.0, 0.0], [-4.0, 0.0, 0.0]])
    lp = torch.zeros(2, 3)
    w = loss_token_weights(mask, "seq_mean_token_mean", global_tokens=3, global_seqs=2)
    loss, _ = ppo_clip_loss(lp, lp, adv, mask, token_weights=w)
    assert float(loss) == pytest.approx(-((1 + 3) / 2 + -4 / 1) / 2)  # = 1.0
    w = loss_token_weights(mask, "seq_mean_token_sum_norm", 3, 2, norm_tokens=4)
    loss, _ = ppo_clip_loss(lp, lp, adv, mask, token_weights=w)
    assert float(loss) == pytest.approx(-((1 + 3) / 4 + -4 / 4) / 2)  # = 0.0
    w = loss_token_weights(mask, "token_mean", 3, 2)
    loss, _ = ppo_clip_loss(lp, lp, adv, mask, token_weights=w)
    assert float(loss) == pytest.approx(-(1 + 3 - 4) / 3)


def test_entropy_by_hand():
    """Uniform over 4 tokens: entropy log 4; one-hot-ish: about 0; log-probs match."""
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [50.0, 0.0, 0.0, 0.0]])
    lp, ent = logprobs_and_entropy(logits, torch.tensor([2, 0]))
    assert lp.tolist() == pytest.approx([-math.log(4), 0.0], abs=1e-6)
    assert ent.tolist() == pytest.approx([math.log(4), 0.0], abs=1e-6)
