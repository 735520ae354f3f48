"""What a team watching a run sees, from one real CPU run: wandb (offline), Ray custom
metrics on the node's Prometheus endpoint, periodic evaluation of the live policy, the
per-response samples and the credit report rendered from them."""

import json
import socket
import time

import pytest
import requests

from capo_dist import report
from capo_dist.trainer import Trainer
from tests.conftest import SHARED_DATA
from tests.runs import compose_run, learning, read_metrics

pytestmark = pytest.mark.slow
GAUGES = ("capo_rollout_tokens_per_s", "capo_judge_latency_s", "capo_reward_mean", "capo_step_s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_wandb_ray_metrics_eval_and_report(tmp_path, model_build_dir, warm_policy):
    gsm8k = SHARED_DATA / "gsm8k" / "test.jsonl"
    if not gsm8k.is_file():
        pytest.skip(f"{gsm8k} not found")
    port = _free_port()
    cfg = compose_run(
        tmp_path,
        model_build_dir,
        *learning(warm_policy),
        "logging.wandb_mode=offline",
        f"ray.metrics_export_port={port}",
        f"+eval.benches.gsm8k={gsm8k}",
        "eval.limit=3",
        "eval.k=2",
        "eval.max_new_tokens=16",
        "rollout.backend=hf",
    )
    trainer = Trainer(cfg)
    try:
        trainer.run()
        # Ray exports custom metrics periodically: poll the node's Prometheus endpoint.
        deadline, text = time.time() + 90, ""
        while time.time() < deadline and not all(g in text for g in GAUGES):
            time.sleep(2)
            text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    finally:
        trainer.close()
    missing = [g for g in GAUGES if g not in text]
    assert not missing, f"not exported: {missing}"
    assert 'role="rollout-0"' in text and 'role="judge-0"' in text

    (record,) = read_metrics(tmp_path)
    assert record["train_grad_norm"] > 0
    assert {"eval/gsm8k/pass@1", "eval/gsm8k/mean@2"} <= record.keys()
    table = json.loads((tmp_path / "eval" / "step_000001" / "eval.json").read_text())
    assert "gsm8k" in json.dumps(table)

    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))

    samples = (tmp_path / "samples" / "step_000001.jsonl").read_text().splitlines()
    assert len(samples) == cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    page = report.main([str(tmp_path)])
    html = page.read_text()
    first = json.loads(samples[0])
    assert first["uid"] in html and (tmp_path / "curves.png").stat().st_size > 1000
