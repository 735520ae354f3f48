"""End-to-end CAPO steps on CPU with the real components: Ray, DeepSpeed ZeRO-3 (2 ranks,
gloo), vLLM's CPU build and Hugging Face engines, every judge backend."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import requests
import torch
from transformers import AutoModelForCausalLM

from capo_dist.engines import make_engine
from capo_dist.step_checker import solution_is_clean
from capo_dist.trainer import Trainer, load_problems, prepare_policy
from tests.runs import (
    FAST,
    OUTCOME_ONLY,
    compose_run,
    launch,
    learning,
    read_metrics,
    readme_argv,
)

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
# A line vLLM logs, e.g. `INFO 12-01 17:06:48 [core.py:133] Initializing a V1 LLM engine`.
VLLM_LOG_LINE = re.compile(r"(INFO|WARNING) \d\d-\d\d \d\d:\d\d:\d\d \[\w+\.py:\d+\]")
# README commands these tests run, as written, with quick overrides appended.
README_MAKE_RUN = "make run"
README_MAJORITY = "python -m capo_dist.launch trainer.total_steps=10 capo.vote=majority"
README_GRPO = "python -m capo_dist.launch capo.w_process=0"
README_SWEEP = "python -m capo_dist.launch -m capo.vote=intersection,majority,union,average"


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


def check_recipe(record: dict, prompts_per_step: int, samples: int) -> None:
    """trainer.filter_groups=outcome with one refill round, rollout.truncated=mask: the
    batch holds only groups whose outcomes differ, up to prompts_per_step of them; the
    responses masked are exactly those the judge skipped."""
    generated = record["groups"]
    assert generated >= prompts_per_step and record["filter_rounds"] in (0, 1)
    mixed = round(generated * (1 - record["zero_variance_group_share"]))
    assert record["groups_trained"] == min(mixed, prompts_per_step) >= 1
    assert record["prompts"] == record["groups_trained"]
    assert record["responses"] == samples * record["groups_trained"]
    if record["filter_rounds"] == 0:
        assert record["groups_trained"] == prompts_per_step
    truncated = round(record["truncated_share"] * generated * samples)
    assert record["judge_skipped_responses"] == truncated
    assert (record["judge_skipped_tokens"] > 0) == (truncated > 0)


def safetensors_of(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for shard in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def test_symbolic_judge_vllm_rollout_two_steps_async(tmp_path, model_build_dir, warm_policy):
    """Two vLLM engines synced through the collective path (gloo), one step of overlap;
    launched as the README's `make run ARGS="..."`, whose terminal shows the progress bar
    while the engines' own logs go to the run directory. With the recipe options that must
    work with overlap: groups filtered on the outcome (one refill round), truncated
    responses masked (and not judged), a Hugging Face snapshot every step."""
    proc = launch(
        README_MAKE_RUN,
        tmp_path,
        model_build_dir,
        *learning(warm_policy),
        "trainer.total_steps=2",
        "trainer.max_staleness=1",
        "rollout.backend=vllm",
        "rollout.num_workers=2",
        "rollout.kv_cache_space_gib=0.1",
        "trainer.sync.transport=gloo",
        "trainer.filter_groups=outcome",
        "trainer.filter_max_rounds=1",
        "rollout.truncated=mask",
        "trainer.save_hf_every=1",
    )
    terminal = proc.stdout + proc.stderr
    assert "2/2" in terminal and "[capo_dist] done: 2 steps" in terminal  # bar, our messages
    assert not VLLM_LOG_LINE.search(terminal), VLLM_LOG_LINE.search(terminal).group(0)
    assert "(RolloutWorker pid=" not in terminal and "(Learner pid=" not in terminal
    logs = tmp_path / "logs"
    for i in range(2):
        assert VLLM_LOG_LINE.search((logs / f"rollout-{i}.log").read_text())
        assert (logs / f"learner-{i}.log").is_file()
    assert {p.name for p in logs.iterdir()} >= {"judge-0.log", "aggregator.log"}
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        check_step(r)
        check_learns(r)
        assert r["judge_invalid_rate"] == 0.0  # the symbolic judge always answers in format
        check_recipe(r, prompts_per_step=4, samples=2)
    # Step 2 trains on a batch sampled during step 1, one version behind: it is corrected
    # (tests/learner pins the corrected ratio).
    # A refill round of step 2 samples with the current weights: its rows are fresh.
    assert records[0]["train_stale_frac"] == 0.0
    assert records[1]["train_stale_frac"] == 1.0 or records[1]["filter_rounds"] > 0
    # A Hugging Face snapshot of every step; the last one is the exported final policy.
    snapshots = tmp_path / "checkpoints" / "hf"
    assert sorted(p.name for p in snapshots.iterdir()) == ["step_00000001", "step_00000002"]
    last, final = safetensors_of(snapshots / "step_00000002"), safetensors_of(tmp_path / "policy")
    assert last.keys() == final.keys() and all(torch.equal(last[k], final[k]) for k in final)
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


@pytest.mark.parametrize("judge, on_invalid", [("hf", "error"), ("vllm", "warn")])
def test_model_judge_backends(tmp_path, model_build_dir, warm_policy, judge, on_invalid):
    """The policy as its own judge talks arithmetic, not critiques: they are invalid and
    abstain, never crash, and the outcome reward still trains. With every critique invalid for judge.max_invalid_steps=1 step (the
    default is 3, more than this 1-step run), on_invalid=error stops the run after that step
    (its metrics logged) naming the judge; warn says so loudly and goes on. With
    `logging.verbose=true` (the vLLM judge) its engine's logs come back to the terminal.
    The HF judge reads the `json` judge prompt (judge.prompt), and its parser reads the
    critiques."""
    prompt = "json" if judge == "hf" else "capo"
    overrides = (
        *learning(warm_policy),
        *OUTCOME_ONLY,
        f"judge.backend={judge}",
        f"judge.model_path={warm_policy}",
        "capo.num_critiques=1",  # one critique per response: half the judge's generation
        "rollout.backend=hf",
        "judge.max_invalid_steps=1",
        f"judge.on_invalid={on_invalid}",
        f"logging.verbose={judge == 'vllm'}",
        f"judge.prompt={prompt}",
    )
    proc = launch(
        README_MAJORITY, tmp_path, model_build_dir, *overrides, check=on_invalid == "warn"
    )
    out = proc.stdout + proc.stderr
    (record,) = read_metrics(tmp_path)
    if on_invalid == "error":
        assert proc.returncode != 0, out[-3000:]
        assert "JudgeUnusableError" in out, out[-3000:]
        assert "(judge.backend=hf): every critique was" in out, out[-3000:]
    else:
        assert "WARNING (judge.on_invalid=warn)" in out, out[-3000:]
    if judge == "vllm":
        assert VLLM_LOG_LINE.search(out)
        assert not (tmp_path / "logs").exists()
    else:
        assert (tmp_path / "logs" / "judge-0.log").is_file()
    check_step(record)
    check_learns(record)
    assert record["judge_invalid_rate"] == 1.0 and record["judge_invalid_steps"] == 1
    assert record["judge_abstain_rate"] == 1.0
    # Judge token metrics: the engine's own counts; vLLM reports its prefix-cache hits.
    assert record["judge_prompt_tokens"] > 0 and record["judge_completion_tokens"] > 0
    assert record["judge_tokens_per_policy_token"] == pytest.approx(
        (record["judge_prompt_tokens"] + record["judge_completion_tokens"])
        / (record["tokens_per_s"] * record["time_rollout"]),
        rel=1e-6,
    )
    if judge == "vllm":
        assert 0.0 <= record["judge_prefix_cache_hit_rate"] <= 1.0
    else:
        assert "judge_prefix_cache_hit_rate" not in record  # HF has no prefix cache to report
    samples = (tmp_path / "samples" / "step_000001.jsonl").read_text().splitlines()
    sample = json.loads(samples[0])
    assert sample["critique_parser"] == {"json": "json", "capo": "wrong_step_list"}[prompt]
    marker = {"json": '{"wrong_steps": []}', "capo": "Wrong step list: []"}[prompt]
    assert marker in sample["judge_prompt"]  # the exact text the judge model read


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(900)  # ~70 s measured; its launch subprocess is allowed 600 s
def test_openai_judge_against_vllm_server(tmp_path, model_build_dir):
    """The HTTP judge backend against vLLM's own OpenAI-compatible server on loopback.

    The server requires the API key (`--api-key`: a request without it gets 401), so a run
    whose judge requests all succeeded sent it; and the key is nowhere the run leaves text:
    its run directory, its wandb offline files, its Ray session's logs (driver, raylet,
    every worker's stdout/stderr)."""
    cfg = compose_run(tmp_path, model_build_dir)
    model = prepare_policy(cfg, load_problems(cfg)[2])
    port = _free_port()
    key = "sk-test-not-logged"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "CAPO_JUDGE_API_KEY": key}
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
            key,
            "--enable-prompt-tokens-details",  # usage.prompt_tokens_details.cached_tokens
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        # The key is in the environment before Ray starts (its workers inherit it).
        os.environ["CAPO_JUDGE_API_KEY"] = key
        cfg = compose_run(
            tmp_path,
            model_build_dir,
            "judge.backend=openai",
            f"judge.base_url={url}",
            "judge.model=tiny-judge",
            "judge.api=completions",
            "rollout.backend=hf",
            "logging.wandb_mode=offline",
        )
        # The run's roles start while the server loads: nothing calls the judge before the
        # first step.
        trainer = Trainer(cfg)
        session = Path(ray._private.worker._global_node.get_session_dir_path())
        try:
            deadline = time.time() + 240
            while time.time() < deadline:
                try:
                    health = requests.get(f"http://127.0.0.1:{port}/health", timeout=2)
                    if health.status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
                assert server.poll() is None, "vLLM OpenAI server exited"
                time.sleep(1)
            probe = {"model": "tiny-judge", "prompt": "1+1=", "max_tokens": 1}
            assert requests.post(f"{url}/completions", json=probe, timeout=60).status_code == 401
            trainer.run()
        finally:
            trainer.close()
    finally:
        os.environ.pop("CAPO_JUDGE_API_KEY", None)
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:  # a slow stop must not leave the server running
            server.kill()
            server.wait(30)
    (record,) = read_metrics(tmp_path)
    check_step(record)
    # Every judge request was answered (a 401 would count here): the key was sent.
    assert record["judge_request_failures"] == 0.0
    # Judge token metrics from the server's usage, prefix-cache hits included.
    assert record["judge_prompt_tokens"] > 0 and record["judge_completion_tokens"] > 0
    assert record["judge_tokens_per_policy_token"] > 0
    assert 0.0 <= record["judge_prefix_cache_hit_rate"] <= 1.0
    assert record["judge_invalid_rate"] > 0.5  # real texts from a random model: unparsable
    # The key came from the environment only: no file the run, wandb or Ray wrote holds it.
    wandb_files = [p for p in (tmp_path / "wandb").rglob("*") if p.is_file()]
    ray_logs = [p for p in (session / "logs").rglob("*") if p.is_file()]
    assert wandb_files and any(p.name.startswith("worker-") for p in ray_logs)
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and key.encode() in p.read_bytes()]
    leaked += [p for p in ray_logs if key.encode() in p.read_bytes()]
    assert not leaked, f"the API key was written to {leaked}"


def test_grpo_baseline_skips_the_judge(tmp_path, model_build_dir, warm_policy):
    """`capo.w_process=0` is GRPO: no judge runs and no token is penalised, although some
    responses have a step the symbolic judge flags (CAPO would penalise them)."""
    launch(
        README_GRPO,
        tmp_path,
        model_build_dir,
        *learning(warm_policy),
        *OUTCOME_ONLY,
        "rollout.backend=hf",
    )
    (record,) = read_metrics(tmp_path)
    check_step(record)
    check_learns(record)  # mixed outcomes within a group: GRPO's own signal
    assert record["process_penalty_rate"] == 0.0 and record["time_judge"] == 0.0
    samples = [json.loads(x) for x in (tmp_path / "samples" / "step_000001.jsonl").open()]
    flawed = [s for s in samples if not solution_is_clean(s["response"])]
    assert flawed, "no response with a wrong step: the check below would be vacuous"
    for s in samples:  # outcome only: 2 where the answer is right, else 0, on every token
        assert not s["critiques"] and set(s["token_rewards"]) == {2.0 * s["correct"]}


def test_sweep_two_vote_modes(tmp_path, model_build_dir, warm_policy):
    """The README's sweep over the four vote modes with `capo.vote=intersection,majority`
    appended (Hydra keeps a key's last value: two jobs, not four end-to-end runs): one run
    directory with metrics each."""
    out = subprocess.run(
        readme_argv(
            README_SWEEP,
            "capo.vote=intersection,majority",
            "rollout.backend=hf",
            f"model.build_dir={model_build_dir}",
            f"hydra.sweep.dir={tmp_path}",
            *FAST,
            *learning(warm_policy),
        ),
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
