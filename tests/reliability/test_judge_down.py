"""A judge that is down for good stops the run with a clear error instead of silently
training GRPO (connection refused on every request, real Ray and DeepSpeed)."""

import pytest

from capo_dist.judge_health import JudgeDownError
from capo_dist.trainer import Trainer
from tests.runs import compose_run, read_metrics
from tests.test_judge_http import ScriptedEndpoint, chat

pytestmark = pytest.mark.slow


def test_dead_endpoint_fails_the_run(tmp_path, model_build_dir, shared_ray):
    """Down by time: each response fails after ~0.5 s (two refused attempts and the backoff
    between), judge.max_concurrency (8) of them at once, so judge.down_after_s=1 (wall
    seconds of failing) declares the judge down after a few rounds of them, long before
    judge.max_consecutive_failures (64); the judge worker checks after every response."""
    cfg = compose_run(
        tmp_path,
        model_build_dir,
        "judge.backend=openai",
        "judge.base_url=http://127.0.0.1:9/v1",  # nothing listens on the discard port
        "judge.model=judge",
        "judge.max_retries=1",
        "judge.down_after_s=1",
        "rollout.backend=hf",
    )
    trainer = Trainer(cfg)
    try:
        with pytest.raises(
            JudgeDownError,
            match=r"'judge' at http://127.0.0.1:9/v1 \(judge.backend=openai\) produced no critique "
            r"for [1-5]?[0-9] responses in a row \(\d\.\d s of failed requests\)",
        ):
            trainer.run()
    finally:
        trainer.close(shutdown_ray=False)  # the cluster is shared_ray's
    assert not (tmp_path / "metrics.jsonl").read_text().strip()  # no step was trained


def test_flaky_endpoint_is_retried_and_counted(tmp_path, model_build_dir, shared_ray):
    """HTTP 500s and a malformed body mid-step: retried with backoff, the step trains, the
    failed attempts are in metrics (a real loopback HTTP server stands in for the 70B judge)."""
    good = (200, chat("Step 0 looks fine.\nWrong step list: [0]", "Wrong step list: []"), 0)
    server = ScriptedEndpoint([(500, b"boom", 0), (200, b"{not json", 0)] + [good] * 40)
    cfg = compose_run(
        tmp_path,
        model_build_dir,
        "judge.backend=openai",
        f"judge.base_url={server.url}",
        "judge.model=judge",
        "judge.max_retries=2",
        "rollout.backend=hf",
    )
    trainer = Trainer(cfg)
    try:
        trainer.run()
    finally:
        trainer.close(shutdown_ray=False)  # the cluster is shared_ray's
        server.close()
    (record,) = read_metrics(tmp_path)
    assert record["judge_request_failures"] == 2.0
    assert record["judge_invalid_rate"] == 0.0  # every response got its critiques in the end
    assert record["judge_invalid_steps"] == 0  # judge health: a usable judge
