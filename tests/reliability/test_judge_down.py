"""A judge that is down for good stops the run with a clear error instead of silently
training GRPO (connection refused on every request, real Ray and DeepSpeed)."""

import pytest

from capo_dist.judge_worker import JudgeDownError
from capo_dist.trainer import Trainer
from tests.runs import compose_run

pytestmark = pytest.mark.slow


def test_dead_endpoint_fails_the_run(tmp_path, model_build_dir):
    cfg = compose_run(
        tmp_path,
        model_build_dir,
        "judge.backend=openai",
        "judge.base_url=http://127.0.0.1:9/v1",  # nothing listens on the discard port
        "judge.model=judge",
        "judge.max_retries=1",
        "judge.max_consecutive_failures=4",
        "rollout.backend=hf",
    )
    trainer = Trainer(cfg)
    try:
        with pytest.raises(JudgeDownError, match="produced no critique for 4 responses in a row"):
            trainer.run()
    finally:
        trainer.close()
    assert not (tmp_path / "metrics.jsonl").read_text().strip()  # no step was trained
