"""The learner's log-prob module in one process: chunked, packed and checkpointed paths
give the plain padded computation's log-probs, entropy and gradients (tiny Llama, CPU)."""

from __future__ import annotations

import pytest
import torch

from capo_dist.logprob_model import LogprobModel
from capo_dist.packing import pack, plan_micro_batches, unpack
from capo_dist.rewards.loss import token_logprobs


@pytest.fixture(scope="module")
def policy(tiny_model_path: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)


def _rows(policy: torch.nn.Module, lengths: list[int], seed: int = 0):
    """Right-padded random rows of these lengths: (input_ids, attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    att = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.randint(3, policy.config.vocab_size, (n,), generator=g)
        att[r, :n] = 1
    return ids, att


def _padded(model: LogprobModel, ids: torch.Tensor, att: torch.Tensor, num_chunks: int = 0):
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    lp, ent = model(input_ids=ids, position_ids=pos, attention_mask=att, num_chunks=num_chunks)
    return lp * att, ent * att


def _grads(policy: torch.nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    policy.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in policy.named_parameters()}


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    p = torch.softmax(logits.float(), -1)
    return -(p * torch.log_softmax(logits.float(), -1)).sum(-1)


def test_chunked_logprobs_equal_the_full_ones_with_gradients(policy) -> None:
    ids, att = _rows(policy, [9, 14, 5])
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(1)) * att
    full, chunked = LogprobModel(policy, 0), LogprobModel(policy, 4)
    lp_full, ent_full = _padded(full, ids, att)
    lp_chunk, ent_chunk = _padded(chunked, ids, att)
    with torch.no_grad():
        logits = policy(input_ids=ids, attention_mask=att).logits
        want_lp = token_logprobs(logits, ids) * att
        want_ent = torch.cat([torch.zeros(3, 1), _entropy(logits[:, :-1])], 1) * att
    torch.testing.assert_close(lp_full, want_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp_chunk, want_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent_full, want_ent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent_chunk, want_ent, atol=1e-5, rtol=1e-5)
    g_full = _grads(policy, (lp_full * weights).sum())
    g_chunk = _grads(policy, (lp_chunk * weights).sum())
    for name, g in g_full.items():
        torch.testing.assert_close(g_chunk[name], g, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("chunk", [0, 5])
def test_packed_row_equals_the_padded_rows(policy, chunk: int) -> None:
    """Sequences packed end to end in one row (positions restarting, attention kept inside
    each sequence) give the padded rows' log-probs, entropy and gradients."""
    ids, att = _rows(policy, [7, 12, 1, 4], seed=2)
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(3)) * att
    model = LogprobModel(policy, chunk)
    lp_pad, ent_pad = _padded(model, ids, att)
    packed = pack(ids, att)
    assert packed.input_ids.shape == (1, int(att.sum()))
    assert packed.position_ids[0].tolist() == [*range(7), *range(12), 0, *range(4)]
    lp, ent = model(input_ids=packed.input_ids, position_ids=packed.position_ids)
    lp_packed, ent_packed = unpack(lp, packed, ids.shape), unpack(ent, packed, ids.shape)
    torch.testing.assert_close(lp_packed, lp_pad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent_packed, ent_pad, atol=1e-5, rtol=1e-5)
    g_pad = _grads(policy, (lp_pad * weights).sum())
    g_packed = _grads(policy, (lp_packed * weights).sum())
    for name, g in g_pad.items():
        torch.testing.assert_close(g_packed[name], g, atol=1e-6, rtol=1e-4, msg=name)


def test_packing_needs_restarting_positions_and_no_mask(policy) -> None:
    """The two ways a packed row goes wrong are visible: positions that run on across
    sequences, or an all-ones mask that lets attention cross them."""
    ids, att = _rows(policy, [6, 8], seed=4)
    model = LogprobModel(policy, 0)
    lp_pad, _ = _padded(model, ids, att)
    packed = pack(ids, att)
    running = torch.arange(14)[None]
    lp, _ = model(input_ids=packed.input_ids, position_ids=running)
    assert not torch.allclose(unpack(lp, packed, ids.shape)[1], lp_pad[1], atol=1e-3)
    ones = torch.ones_like(packed.input_ids)
    lp, _ = model(input_ids=packed.input_ids, position_ids=packed.position_ids, attention_mask=ones)
    assert not torch.allclose(unpack(lp, packed, ids.shape)[1], lp_pad[1], atol=1e-3)


def test_gradient_checkpointing_gives_the_same_gradient(policy) -> None:
    ids, att = _rows(policy, [10, 6], seed=5)
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(6)) * att
    model = LogprobModel(policy, 4)
    policy.train()
    want = _grads(policy, (_padded(model, ids, att)[0] * weights).sum())
    policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        assert policy.is_gradient_checkpointing
        got = _grads(policy, (_padded(model, ids, att)[0] * weights).sum())
    finally:
        policy.gradient_checkpointing_disable()
        policy.eval()
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, atol=1e-6, rtol=1e-4, msg=name)


def test_token_budget_micro_batches() -> None:
    rows = torch.arange(10, 16)
    lengths = torch.tensor([5, 9, 3, 12, 4, 2])
    plan = plan_micro_batches(rows, lengths, micro_batch_size=2, max_tokens=10)
    assert sorted(int(r) for m in plan for r in m) == rows.tolist()
    per_bin = [int(lengths[m - 10].sum()) for m in plan]
    assert per_bin == [12, 9, 5 + 4, 3 + 2]  # the 12-token row alone; first fit, longest first
    padded = plan_micro_batches(rows, lengths, micro_batch_size=4, max_tokens=0)
    assert [m.tolist() for m in padded] == [[10, 11, 12, 13], [14, 15]]


def test_padded_chunk_count_calls_the_head_that_often_and_changes_nothing(policy) -> None:
    """Every rank must call the (ZeRO-3 gathered) head equally often: extra calls up to
    `num_chunks` run in forward and backward but leave values and gradients alone."""
    ids, att = _rows(policy, [9, 4], seed=7)  # 2 x 8 positions: 4 chunks of 4
    weights = torch.randn(ids.shape, generator=torch.Generator().manual_seed(8)) * att
    model = LogprobModel(policy, 4)
    calls = {"forward": 0, "backward": 0}
    head = policy.get_output_embeddings()
    hooks = [
        head.register_forward_hook(lambda *_: calls.__setitem__("forward", calls["forward"] + 1)),
        head.register_full_backward_hook(
            lambda *_: calls.__setitem__("backward", calls["backward"] + 1)
        ),
    ]
    try:
        lp, ent = _padded(model, ids, att)
        want = _grads(policy, (lp * weights).sum())
        assert calls == {"forward": 4 * 2, "backward": 4}  # forward + recompute
        calls.update(forward=0, backward=0)
        lp7, ent7 = _padded(model, ids, att, num_chunks=7)
        got = _grads(policy, (lp7 * weights).sum())
        assert calls == {"forward": 7 * 2, "backward": 7}
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(lp7, lp)
    torch.testing.assert_close(ent7, ent)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, msg=name)
