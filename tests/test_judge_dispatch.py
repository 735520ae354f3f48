"""Judge chunks go to the least-loaded judge worker, weighted by its speed
(capo_dist/judge_dispatch.py). The trainer's dispatch on real Ray actors is tested in
tests/engines/test_chat_prompts.py (it shares that module's Ray cluster)."""

import pytest

from capo_dist.judge_dispatch import JudgeDispatch


def test_fewest_in_flight_when_speeds_are_unknown_or_equal():
    d = JudgeDispatch(3)
    assert [d.choose(c) for c in ([0, 0, 0], [1, 0, 0], [1, 1, 0], [2, 1, 1])] == [0, 1, 2, 1]
    for j in range(3):
        d.observe(j, 2.0)
    assert d.choose([3, 1, 2]) == 1


def test_a_slow_judge_gets_fewer_chunks():
    """Judge 1 takes 4x as long per chunk: of 10 chunks submitted at once, it gets 2."""
    d = JudgeDispatch(2)
    d.observe(0, 1.0)
    d.observe(1, 4.0)
    counts = [0, 0]
    for _ in range(10):
        counts[d.choose(counts)] += 1
    assert counts == [8, 2]


def test_a_judge_without_history_counts_as_typical():
    d = JudgeDispatch(2)
    d.observe(0, 3.0)  # judge 1 (restarted, say) has no figure yet: assumed 3.0 too
    assert d.choose([1, 0]) == 1 and d.choose([0, 1]) == 0


def test_speed_is_a_moving_average():
    d = JudgeDispatch(1, smoothing=0.5)
    d.observe(0, 4.0)
    d.observe(0, 2.0)
    assert d.seconds == [3.0]


def test_bad_counts_are_refused():
    with pytest.raises(ValueError, match="2 in-flight counts for 3 judges"):
        JudgeDispatch(3).choose([0, 0])
    with pytest.raises(ValueError, match="need at least one judge"):
        JudgeDispatch(0)
