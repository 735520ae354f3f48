"""make_experience with the batch recipe: truncated responses (mask, soft_penalty), the
all-wrong-group choice, group filtering on the outcome, and the per-step health metrics.
Real tokenizer (byte-level BPE, as the tiny policy's), no Ray."""

from __future__ import annotations

import pytest
import torch

from capo_dist.config import CapoConfig
from capo_dist.experience import BatchRecipe, make_experience
from capo_dist.models import train_tokenizer
from capo_dist.types import Completion, JudgedRollout, Problem, Rollout

RIGHT = "She uses 3 + 4 = 7 eggs.\n\nShe sells 16 - 7 = 9.\n\nThe answer is 9."
WRONG = "She uses 3 + 4 = 8 eggs.\n\nShe sells 16 - 8 = 8.\n\nThe answer is 8."
CLEAN = "Wrong step list: []"
FLAG0 = "Wrong step list: [0]"


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([RIGHT, WRONG] * 8, 400, out)
    return AutoTokenizer.from_pretrained(str(out))


def _rows(tok, spec):
    """spec: (uid, text, correct, critiques, finish_reason) per response, groups in order."""
    judged, correct, index = [], [], {}
    for uid, text, ok, critiques, finish in spec:
        ids = tok(text)["input_ids"]
        g = index[uid] = index.get(uid, -1) + 1
        completion = Completion(ids, text, [0.0] * len(ids), finish)
        judged.append(
            JudgedRollout(Rollout(Problem(uid, "q", "9"), g, [1, 2], completion, 0), critiques)
        )
        correct.append(ok)
    return judged, correct


def _exp(tok, spec, recipe=None, **capo):
    judged, correct = _rows(tok, spec)
    return make_experience(judged, tok, correct, CapoConfig(**capo), 0, recipe=recipe)


def _row_adv(exp, b):
    return exp.batch.advantages[b][exp.batch.loss_mask[b] > 0]


def test_all_wrong_group_keep_pushes_the_cleaner_wrong_answer_outcome_only_does_not(tok):
    spec = [("p", WRONG, False, [FLAG0] * 2, "stop"), ("p", WRONG, False, [CLEAN] * 2, "stop")]
    keep = _exp(tok, spec)
    assert keep.metrics["all_wrong_group_share"] == 1.0
    clean = _row_adv(keep, 1)
    assert torch.all(clean > 0) and torch.all(clean == clean[0])  # every token, the same
    assert keep.metrics["reward_process_mean"] < 0 and keep.metrics["reward_outcome_mean"] == 0
    only = _exp(tok, spec, all_wrong_groups="outcome_only")
    assert torch.equal(only.batch.advantages, torch.zeros_like(only.batch.advantages))
    assert (
        only.metrics["advantage_abs_mean"] == 0.0 and only.metrics["all_wrong_group_share"] == 1.0
    )
    # A group with a right answer keeps its process term under outcome_only.
    mixed = spec + [
        ("q", RIGHT, True, [FLAG0] * 2, "stop"),
        ("q", WRONG, False, [CLEAN] * 2, "stop"),
    ]
    a, b = _exp(tok, mixed), _exp(tok, mixed, all_wrong_groups="outcome_only")
    assert torch.equal(a.batch.advantages[2:], b.batch.advantages[2:])
    assert b.metrics["all_wrong_group_share"] == 0.5


def test_masked_truncated_response_trains_on_nothing_and_leaves_its_group(tok):
    """mask: the cut response gets no loss and no place in the group's mean/std: the other
    two get exactly the advantages of a group without it."""
    pair = [("p", RIGHT, True, [CLEAN] * 2, "stop"), ("p", WRONG, False, [CLEAN] * 2, "stop")]
    cut = [("p", WRONG, False, [], "length")]  # not judged (judge_worker skips it)
    masked = _exp(tok, pair + cut, BatchRecipe(truncated="mask"))
    alone = _exp(tok, pair)
    assert float(masked.batch.loss_mask[2].sum()) == 0.0
    assert torch.equal(masked.batch.advantages[2], torch.zeros_like(masked.batch.advantages[2]))
    for b in (0, 1):
        torch.testing.assert_close(_row_adv(masked, b), _row_adv(alone, b), atol=0, rtol=0)
    assert masked.metrics["truncated_share"] == pytest.approx(1 / 3)
    assert masked.metrics["judge_abstain_rate"] == 0.0  # the skipped one is no abstention
    kept = _exp(tok, pair + cut)  # keep: the cut response is a wrong answer like any other
    assert float(kept.batch.loss_mask[2].sum()) > 0 and float(_row_adv(kept, 2).mean()) < 0
    assert kept.metrics["truncated_share"] == pytest.approx(1 / 3)


def test_soft_penalty_lowers_the_outcome_reward_of_long_responses(tok):
    """DAPO: L = max_new_tokens, buffer C; the cut response (n = L tokens) gets -factor,
    one of n = L - C/2 tokens -factor/2, a short one nothing."""
    n = len(tok(WRONG)["input_ids"])
    spec = [("p", RIGHT, True, [CLEAN] * 2, "stop"), ("p", WRONG, False, [CLEAN] * 2, "length")]
    recipe = BatchRecipe(
        truncated="soft_penalty", max_new_tokens=n, overlong_buffer=4, overlong_penalty=0.5
    )
    exp = _exp(tok, spec, recipe)
    rewards = [s["token_rewards"] for s in exp.samples]
    n_right = len(tok(RIGHT)["input_ids"])
    right_pen = -0.5 * min(max((n_right - (n - 4)) / 4, 0.0), 1.0)
    assert rewards[0] == [pytest.approx(2.0 + right_pen)] * n_right
    assert rewards[1] == [pytest.approx(-0.5)] * n
    assert exp.metrics["reward_overlong_mean"] == pytest.approx((right_pen - 0.5) / 2)
    plain = _exp(tok, spec)
    assert plain.samples[1]["token_rewards"] == [0.0] * n


def test_outcome_filter_packs_the_first_mixed_groups_and_logs_shares(tok):
    r, w = (RIGHT, True, [CLEAN] * 2, "stop"), (WRONG, False, [FLAG0] * 2, "stop")
    spec = [
        ("all-right", *r), ("all-right", *r),
        ("mixed-1", *r), ("mixed-1", *w),
        ("all-wrong", *w), ("all-wrong", *w),
        ("mixed-2", *w), ("mixed-2", *r),
    ]  # fmt: skip
    one = _exp(tok, spec, BatchRecipe(max_groups=1))
    assert [s["uid"] for s in one.samples] == ["mixed-1", "mixed-1"] and len(one.batch) == 2
    assert one.metrics["groups"] == 4 and one.metrics["groups_trained"] == 1
    assert one.metrics["zero_variance_group_share"] == 0.5
    assert one.metrics["all_wrong_group_share"] == 0.25
    everything = _exp(tok, spec)
    torch.testing.assert_close(
        one.batch.advantages, everything.batch.advantages[2:4, : one.batch.advantages.shape[1]]
    )
    two = _exp(tok, spec, BatchRecipe(max_groups=8))
    assert [s["uid"] for s in two.samples] == ["mixed-1"] * 2 + ["mixed-2"] * 2
    none = _exp(tok, spec[:2] + spec[4:6], BatchRecipe(max_groups=4))
    assert len(none.batch) == 0 and none.samples == [] and none.metrics["groups_trained"] == 0
    assert everything.metrics["groups_trained"] == 4 and len(everything.batch) == 8


def test_length_metrics(tok):
    spec = [
        ("p", RIGHT, True, [CLEAN] * 2, "stop"),
        ("p", "The answer is 9.", True, [CLEAN] * 2, "length"),
    ]
    m = _exp(tok, spec).metrics
    lengths = [len(tok(t)["input_ids"]) for t in (RIGHT, "The answer is 9.")]
    assert m["response_length_min"] == min(lengths) and m["response_length_max"] == max(lengths)
    assert m["response_length"] == sum(lengths) / 2 and m["truncated_share"] == 0.5
    assert m["zero_variance_group_share"] == 1.0 and m["all_wrong_group_share"] == 0.0
