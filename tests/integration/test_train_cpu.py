"""End-to-end CAPO steps on CPU with the real components: Ray, DeepSpeed ZeRO-3 (2 ranks,
gloo), vLLM's CPU build and Hugging Face engines, every judge backend."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import torch
from transformers import AutoModelForCausalLM

from capo_dist.engines import make_engine
from capo_dist.step_checker import solution_is_clean
from capo_dist.trainer import Trainer, load_problems, prepare_policy
from tests.runs import FAST, OUTCOME_ONLY, compose_run, learning, read_metrics

pytestmark = pytest.mark.slow

CONTRACT_METRICS = {
    "step",
    "reward_mean",
    "accuracy",
    "process_penalty_rate",
    "judge_invalid_rate",
    "tokens_per_s",
    "time_rollout",
    "time_judge",
    "time_train",
    "time_sync",
}


def train(tmp_path: Path, build_dir: Path, *overrides: str) -> list[dict]:
    cfg = compose_run(tmp_path, build_dir, *overrides)
    trainer = Trainer(cfg)
    try:
        trainer.run()
    finally:
        trainer.close()
    return read_metrics(tmp_path)


def check_step(record: dict) -> None:
    assert CONTRACT_METRICS <= record.keys()
    assert 0.0 <= record["accuracy"] <= 1.0
    assert 0.0 <= record["process_penalty_rate"] <= 1.0
    assert 0.0 <= record["judge_invalid_rate"] <= 1.0
    assert record["tokens_per_s"] > 0 and record["time_train"] > 0 and record["time_sync"] > 0
    assert record["policy_version"] == record["step"]


def check_learns(record: dict) -> None:
    """The step trained on something: a non-zero gradient (a policy that earns rewards)."""
    assert record["train_grad_norm"] > 0 and record["advantage_abs_mean"] > 0


def test_symbolic_judge_vllm_rollout_two_steps_async(tmp_path, model_build_dir, warm_policy):
    """Two vLLM engines synced through the collective path (gloo), one step of overlap."""
    records = train(
        tmp_path,
        model_build_dir,
        *learning(warm_policy),
        "trainer.total_steps=2",
        "trainer.max_staleness=1",
        "rollout.backend=vllm",
        "rollout.num_workers=2",
        "rollout.kv_cache_space_gib=0.1",
        "trainer.sync.transport=gloo",
    )
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        check_step(r)
        check_learns(r)
        assert r["judge_invalid_rate"] == 0.0  # the symbolic judge always answers in format
    # Step 2 trains on a batch sampled during step 1, one version behind: it is corrected
    # (tests/learner pins the corrected ratio).
    assert records[0]["train_stale_frac"] == 0.0 and records[1]["train_stale_frac"] == 1.0
    # The exported final policy loads in vLLM and in transformers, with the same log-probs.
    policy = str(tmp_path / "policy")
    hf = AutoModelForCausalLM.from_pretrained(policy)
    engine = make_engine("vllm", policy, max_model_len=256, kv_cache_space_gib=0.25)
    try:
        prompt, cont = list(range(5, 20)), list(range(30, 50))
        got = torch.tensor(engine.sequence_logprobs(prompt, cont))
    finally:
        engine.close()
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + cont])).logits[0, len(prompt) - 1 : -1]
    want = torch.log_softmax(logits, -1).gather(1, torch.tensor(cont)[:, None])[:, 0]
    torch.testing.assert_close(got, want, atol=2e-4, rtol=0)


@pytest.mark.parametrize("judge", ["hf", "vllm"])
def test_model_judge_backends(tmp_path, model_build_dir, warm_policy, judge):
    """The policy as its own judge talks arithmetic, not critiques: they are invalid and
    abstain, never crash; the outcome reward still trains."""
    (record,) = train(
        tmp_path,
        model_build_dir,
        *learning(warm_policy),
        *OUTCOME_ONLY,
        f"judge.backend={judge}",
        f"judge.model_path={warm_policy}",
        "capo.num_critiques=1",  # one critique per response: half the judge's generation
        "rollout.backend=hf",
    )
    check_step(record)
    check_learns(record)
    assert record["judge_invalid_rate"] > 0.5
    assert record["judge_abstain_rate"] > 0.5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_judge_against_vllm_server(tmp_path, model_build_dir):
    """The HTTP judge backend against vLLM's own OpenAI-compatible server on loopback."""
    cfg = compose_run(tmp_path, model_build_dir)
    model = prepare_policy(cfg, load_problems(cfg)[2])
    port = _free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "CAPO_JUDGE_API_KEY": "sk-test-not-logged"}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--max-model-len",
            "1024",
            "--served-model-name",
            "tiny-judge",
            "--api-key",
            "sk-test-not-logged",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert server.poll() is None, "vLLM OpenAI server exited"
            time.sleep(2)
        os.environ["CAPO_JUDGE_API_KEY"] = "sk-test-not-logged"
        (record,) = train(
            tmp_path,
            model_build_dir,
            "judge.backend=openai",
            f"judge.base_url=http://127.0.0.1:{port}/v1",
            "judge.model=tiny-judge",
            "judge.api=completions",
            "rollout.backend=hf",
        )
    finally:
        os.environ.pop("CAPO_JUDGE_API_KEY", None)
        server.terminate()
        server.wait(30)
    check_step(record)
    assert record["judge_invalid_rate"] > 0.5  # real texts from a random model: unparsable
    # The key came from the environment only: no file the run wrote contains it.
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and not any(b"sk-test-not-logged" in p.read_bytes() for p in written)


def test_grpo_baseline_skips_the_judge(tmp_path, model_build_dir, warm_policy):
    """`capo.w_process=0` is GRPO: no judge runs and no token is penalised, although some
    responses have a step the symbolic judge flags (CAPO would penalise them)."""
    (record,) = train(
        tmp_path,
        model_build_dir,
        *learning(warm_policy),
        *OUTCOME_ONLY,
        "capo.w_process=0",
        "rollout.backend=hf",
    )
    check_step(record)
    check_learns(record)  # mixed outcomes within a group: GRPO's own signal
    assert record["process_penalty_rate"] == 0.0 and record["time_judge"] == 0.0
    samples = [json.loads(x) for x in (tmp_path / "samples" / "step_000001.jsonl").open()]
    flawed = [s for s in samples if not solution_is_clean(s["response"])]
    assert flawed, "no response with a wrong step: the check below would be vacuous"
    for s in samples:  # outcome only: 2 where the answer is right, else 0, on every token
        assert not s["critiques"] and set(s["token_rewards"]) == {2.0 * s["correct"]}


def test_sweep_two_vote_modes(tmp_path, model_build_dir, warm_policy):
    """`-m capo.vote=intersection,majority`: one run directory with metrics each."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "capo_dist.launch",
            "-m",
            "capo.vote=intersection,majority",
            "rollout.backend=hf",
            f"model.build_dir={model_build_dir}",
            f"hydra.sweep.dir={tmp_path}",
            *FAST,
            *learning(warm_policy),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 0, out.stderr[-3000:]
    runs = sorted(p.parent for p in tmp_path.glob("*/metrics.jsonl"))
    assert len(runs) == 2
    assert "capo.vote=intersection" in runs[0].name and "capo.vote=majority" in runs[1].name
    for run in runs:
        (record,) = read_metrics(run)
        check_step(record)
        check_learns(record)
