"""The vote (DESIGN §1.3): modes, the reference case, k = 0, batch == scalar."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capo_dist.rewards.voting import VOTE_MODES, stack_critiques, vote, vote_batch

REFERENCE = [frozenset({1, 3}), frozenset({1, 2, 3}), frozenset({1, 3}), frozenset({2, 3})]


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("majority", [0, 1, 0, 1]),
        ("intersection", [0, 0, 0, 1]),
        ("union", [0, 1, 1, 1]),
        ("average", [0, 0.75, 0.5, 1.0]),
    ],
)
def test_reference_case(mode, expected):
    assert vote(REFERENCE, mode, 4) == pytest.approx(expected)
    flags, valid = stack_critiques([REFERENCE], num_steps=4)
    assert vote_batch(flags, valid, mode)[0].tolist() == pytest.approx(expected)


def test_majority_is_strict():
    crits = [frozenset({0}), frozenset({0}), frozenset(), frozenset()]
    assert vote(crits, "majority", 1) == [0.0]  # 2 of 4 is not > 2
    assert vote(crits[:3], "majority", 1) == [1.0]  # 2 of 3 is


def test_invalid_critiques_abstain_and_k0_is_all_zero():
    crits = [None, frozenset({1}), None]
    for mode in VOTE_MODES:
        assert vote(crits, mode, 3) == [0.0, 1.0, 0.0]
        assert vote([None, None], mode, 3) == [0.0, 0.0, 0.0]
        assert vote([], mode, 2) == [0.0, 0.0]


def test_unknown_mode():
    with pytest.raises(ValueError, match="intersection.*majority.*union.*average"):
        vote(REFERENCE, "mean", 4)
    with pytest.raises(ValueError, match="valid modes"):
        vote_batch(np.zeros((1, 1, 1), bool), np.zeros((1, 1), bool), "nope")


def test_out_of_range_indices_ignored():
    assert vote([frozenset({0, 7})], "union", 2) == [1.0, 0.0]


critique_st = st.one_of(st.none(), st.frozensets(st.integers(0, 5), max_size=6))


@settings(max_examples=200, deadline=None)
@given(st.lists(critique_st, max_size=8))
def test_mode_ordering_properties(crits):
    s = 6
    inter = np.array(vote(crits, "intersection", s))
    maj = np.array(vote(crits, "majority", s))
    uni = np.array(vote(crits, "union", s))
    avg = np.array(vote(crits, "average", s))
    assert np.all(inter <= maj) and np.all(maj <= uni)  # intersection ⊆ majority ⊆ union
    assert np.all((avg >= 0) & (avg <= 1))
    assert np.all(inter <= avg) and np.all(avg <= uni)
    assert np.all((avg > 0.5) == (maj > 0))
    valid = [c for c in crits if c is not None]
    # naive reference
    for step in range(s):
        c = sum(step in v for v in valid)
        k = len(valid)
        assert inter[step] == (1.0 if k and c == k else 0.0)
        assert uni[step] == (1.0 if c else 0.0)
        assert maj[step] == (1.0 if 2 * c > k else 0.0)
        assert avg[step] == pytest.approx(c / k if k else 0.0)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(critique_st, max_size=6), min_size=1, max_size=6))
def test_vote_batch_equals_scalar(batch):
    flags, valid = stack_critiques(batch, num_steps=6)
    assert flags.shape[0] == len(batch) and flags.shape[2] == 6
    for mode in VOTE_MODES:
        out = vote_batch(flags, valid, mode)
        assert out.dtype == np.float32 and out.shape == (len(batch), 6)
        for b, crits in enumerate(batch):
            assert out[b].tolist() == pytest.approx(vote(crits, mode, 6))


@settings(max_examples=100, deadline=None)
@given(st.lists(critique_st, max_size=8), st.data())
def test_adding_a_flag_never_lowers_union_or_average(crits, data):
    valid_idx = [i for i, c in enumerate(crits) if c is not None]
    if not valid_idx:
        return
    i = data.draw(st.sampled_from(valid_idx))
    step = data.draw(st.integers(0, 5))
    more = list(crits)
    more[i] = crits[i] | {step}
    for mode in VOTE_MODES:  # every mode is monotone in the flags
        assert np.all(np.array(vote(more, mode, 6)) >= np.array(vote(crits, mode, 6)))


def test_stack_critiques_shapes_and_padding():
    flags, valid = stack_critiques([[frozenset({2})], [None, frozenset(), frozenset({0})]])
    assert flags.shape == (2, 3, 3) and valid.tolist() == [
        [True, False, False],
        [False, True, True],
    ]
    assert flags[0, 0].tolist() == [False, False, True]
    flags, valid = stack_critiques([[], []])
    assert flags.shape == (2, 0, 1) and vote_batch(flags, valid, "average").tolist() == [[0.0]] * 2
