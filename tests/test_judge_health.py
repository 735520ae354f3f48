"""Judge health (capo_dist.judge_health): when a judge is down, when it is unusable, and the
judge keys' validation. Pure functions; the end-to-end stops are in
tests/reliability/test_judge_down.py and tests/integration/test_train_cpu.py."""

import pytest

from capo_dist.config import JudgeConfig
from capo_dist.judge_health import DownDetector, JudgeDownError, invalid_streak_check, judge_label


def test_all_invalid_steps_in_a_row_stop_at_the_limit():
    streak, message = 0, None
    for rate in (1.0, 1.0):
        streak, message = invalid_streak_check(streak, rate, 3, "J")
        assert message is None
    streak, message = invalid_streak_check(streak, 1.0, 3, "J")
    assert streak == 3
    assert "judge J: every critique was invalid (judge_invalid_rate 100%) for 3 steps" in message
    assert "judge.on_invalid=warn" in message and "bigger judge model" in message


def test_one_usable_critique_resets_the_streak():
    streak, _ = invalid_streak_check(2, 1.0, 3, "J")
    assert invalid_streak_check(streak, 0.99, 3, "J") == (0, None)
    assert invalid_streak_check(0, 0.0, 1, "J") == (0, None)
    assert invalid_streak_check(0, 1.0, 1, "J")[1] is not None


def test_down_after_responses_or_seconds_of_failure_in_a_row():
    down = DownDetector(max_failures=3, down_after_s=100.0, judge="J")
    down.record([[None, None], [None, None]], 1.0)
    down.record([["Wrong step list: []", None]], 1.0)  # one critique: the judge is up
    assert (down.failures, down.failing_s) == (0, 0.0)
    down.record([[None]] * 2, 1.0)
    with pytest.raises(JudgeDownError, match=r"judge J produced no critique for 3 responses"):
        down.record([[None]], 1.0)
    timed = DownDetector(max_failures=1000, down_after_s=10.0, judge="J")
    timed.record([[None]], 6.0)
    with pytest.raises(JudgeDownError, match=r"2 responses in a row \(12.0 s of failed requests\)"):
        timed.record([[None]], 6.0)
    # Seconds spent on a batch that ended in a success do not count.
    ok = DownDetector(max_failures=1000, down_after_s=10.0, judge="J")
    ok.record([[None], ["x"]], 60.0)
    assert ok.failing_s == 0.0


def test_judge_label_names_the_judge():
    cfg = JudgeConfig(backend="openai", model="m", base_url="http://h/v1")
    assert judge_label(cfg, "policy") == "'m' at http://h/v1 (judge.backend=openai)"
    assert judge_label(JudgeConfig(backend="vllm"), "policy") == "policy (judge.backend=vllm)"
