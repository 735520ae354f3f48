"""The learner's learning-rate schedule (`deepspeed_setup.lr_multiplier`), by hand."""

from __future__ import annotations

import math

import pytest

from capo_dist.deepspeed_setup import lr_multiplier
from capo_dist.learner import LearnerConfig


def test_constant_after_warmup():
    cfg = LearnerConfig(model_path="m", warmup_steps=4)
    assert [lr_multiplier(k, cfg) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_multiplier(0, LearnerConfig(model_path="m")) == 1.0


def test_cosine_with_warmup_down_to_the_floor():
    """warmup 2, total 6, floor 0.1: steps 2..6 follow 0.1 + 0.9·(1 + cos(π·(k−2)/4))/2."""
    cfg = LearnerConfig(
        model_path="m",
        warmup_steps=2,
        lr_schedule="cosine",
        total_optimizer_steps=6,
        min_lr_ratio=0.1,
    )
    got = [lr_multiplier(k, cfg) for k in range(8)]
    half = 0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2  # k = 3
    want = [0.5, 1.0, 1.0, half, 0.55, 0.1 + 0.9 * (1 + math.cos(3 * math.pi / 4)) / 2, 0.1, 0.1]
    assert got == pytest.approx(want)


def test_bad_learner_values_name_the_field():
    with pytest.raises(ValueError, match="lr_schedule='linear'; choose one of"):
        LearnerConfig(model_path="m", lr_schedule="linear")
    with pytest.raises(ValueError, match="loss_agg='sum'; choose one of"):
        LearnerConfig(model_path="m", loss_agg="sum")
    with pytest.raises(ValueError, match="loss_agg_norm_tokens must be >= 1"):
        LearnerConfig(model_path="m", loss_agg="seq_mean_token_sum_norm")
