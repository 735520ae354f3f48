"""Configuration: the Hydra composition, the contract keys, and bad values failing early."""

import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from capo_dist.config import ConfigError, RunConfig, validate, validate_resources
from capo_dist.placement import NodeResources, check_nodes, role_demands
from tests.runs import REPO, readme_argv

CONF = str(Path(__file__).resolve().parents[1] / "conf")
EXPERIMENTS = [
    "tiny_cpu",
    "llama3b_intersection",
    "llama1b_intersection",
    "qwen1.5b_intersection",
    "qwen7b_majority",
]


def load(*overrides: str) -> RunConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        dcfg = compose("config", overrides=list(overrides))
    dcfg.run_dir = "/tmp/unused"
    return OmegaConf.to_object(dcfg)


def test_default_is_tiny_cpu_and_valid():
    cfg = load()
    assert cfg.name == "tiny_cpu" and cfg.model.path is None
    validate(cfg)
    assert load("+experiment=tiny_cpu") == cfg


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiments_compose(name):
    cfg = load(f"+experiment={name}")
    assert cfg.name == name
    assert cfg.capo.vote in ("intersection", "majority")
    assert cfg.rollout.samples_per_prompt >= 2
    # Every paper policy is an Instruct model: its prompts go through its chat template.
    if name == "tiny_cpu":
        assert cfg.data.chat_template is False
    else:
        assert cfg.data.chat_template is True and cfg.model.path.endswith("-Instruct")
    # A paper run of hundreds of steps checkpoints along the way; the 3-step CPU default and
    # the rehearsal (a mid-run checkpoint would turn off the overlap it checks) at the end only.
    if name == "tiny_cpu":
        assert cfg.trainer.checkpoint_every == 0
    else:
        assert 0 < cfg.trainer.checkpoint_every <= cfg.trainer.total_steps // 10
        assert load(f"+experiment={name}", "+rehearsal=cpu").trainer.checkpoint_every == 0


def test_contract_keys_exist():
    cfg = load(
        "capo.vote=union",
        "capo.num_critiques=8",
        "capo.w_outcome=2",
        "capo.w_process=0",
        "judge.backend=symbolic",
        "rollout.backend=hf",
        "rollout.samples_per_prompt=4",
        "trainer.total_steps=7",
        "trainer.max_staleness=1",
    )
    validate(cfg)
    assert (cfg.capo.vote, cfg.capo.num_critiques, cfg.capo.w_process) == ("union", 8, 0.0)
    assert (cfg.rollout.backend, cfg.trainer.total_steps, cfg.trainer.max_staleness) == ("hf", 7, 1)


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "capo.vote=plurality",
            "capo.vote='plurality' is not valid; choose one of: intersection, majority, union, average",
        ),
        ("rollout.samples_per_prompt=1", "rollout.samples_per_prompt=1 must be >= 2"),
        ("judge.backend=gpt", "judge.backend='gpt' is not valid"),
        (
            "rollout.backend=sglang",
            "rollout.backend='sglang' is not valid; choose one of: vllm, hf",
        ),
        ("model.path=/nonexistent/model", "model.path='/nonexistent/model' does not exist"),
        ("data.path=/nonexistent.jsonl", "data.path='/nonexistent.jsonl' is not a file"),
        ("trainer.max_staleness=3", "trainer.max_staleness=3 is not supported"),
        ("rollout.num_cpus_per_worker=0.5", "rollout.num_cpus_per_worker=0.5 must be >= 1"),
        ("judge.backend=openai", "judge.backend=openai needs judge.base_url"),
        ("trainer.stale_ratio_cap=1.0", "trainer.stale_ratio_cap=1.0 must be > 1"),
        # judge health (capo_dist/judge_health.py)
        (
            "judge.on_invalid=ignore",
            "judge.on_invalid='ignore' is not valid; choose one of: error, warn",
        ),
        ("judge.max_invalid_steps=0", "judge.max_invalid_steps=0 must be >= 1"),
        ("judge.max_consecutive_failures=0", "judge.max_consecutive_failures=0 must be >= 1"),
        ("judge.max_retries=-1", "judge.max_retries=-1 must be >= 0"),
        ("judge.timeout_s=0", "judge.timeout_s=0.0 must be > 0"),
        ("judge.request_deadline_s=-1", "judge.request_deadline_s=-1.0 must be > 0"),
        ("judge.down_after_s=0", "judge.down_after_s=0.0 must be > 0"),
        ("judge.retry_after_max_s=-1", "judge.retry_after_max_s=-1.0 must be >= 0"),
        # the concurrent HTTP judge (capo_dist/judge_http.py)
        (
            "judge.max_concurrency=0",
            "judge.max_concurrency=0 must be >= 1 (HTTP requests in flight; 1 sends them",
        ),
        ("judge.rpm=-1", "judge.rpm=-1.0 must be >= 0 (per minute; 0 = no limit)"),
        ("judge.tpm=-5", "judge.tpm=-5.0 must be >= 0 (per minute; 0 = no limit)"),
        (
            "judge.n_per_request=many",
            "judge.n_per_request='many' is not valid; choose one of: auto, n, one",
        ),
        # judge prompts (capo_dist/judge_prompt.py; bad prompt files: tests/test_judge_prompt.py)
        ("judge.prompt=nope", "is not a file; choose one of: capo, first_error, json"),
        (
            "judge.prompt=first_error",
            "judge.prompt='first_error' reads replies with the 'first_error' parser, "
            "but judge.backend=symbolic always answers 'Wrong step list",
        ),
        (
            "capo.all_wrong_groups=drop",
            "capo.all_wrong_groups='drop' is not valid; choose one of: keep, outcome_only",
        ),
        (
            "rollout.truncated=cut",
            "rollout.truncated='cut' is not valid; choose one of: keep, mask, soft_penalty",
        ),
        (
            "trainer.filter_groups=reward",
            "trainer.filter_groups='reward' is not valid; choose one of: off, outcome",
        ),
        ("trainer.filter_max_rounds=-1", "trainer.filter_max_rounds=-1 must be >= 0"),
        ("trainer.save_hf_every=-2", "trainer.save_hf_every=-2 must be >= 0 (0 = never)"),
        (
            "rollout.truncated=soft_penalty rollout.overlong_buffer=200",
            "rollout.overlong_buffer=200 must be in [1, rollout.max_new_tokens=96]",
        ),
        (
            "rollout.truncated=soft_penalty rollout.overlong_penalty=-1",
            "rollout.overlong_penalty=-1.0 must be >= 0",
        ),
        ("trainer.loss_agg=sum", "trainer.loss_agg='sum' is not valid; choose one of: token_mean"),
        ("trainer.lr_schedule=linear", "trainer.lr_schedule='linear' is not valid; choose one of"),
        (
            "trainer.min_lr_ratio=1.5",
            "trainer.min_lr_ratio=1.5 must be in [0, 1] (the cosine floor",
        ),
        ("trainer.logprob_chunk_size=-1", "trainer.logprob_chunk_size=-1 must be >= 0"),
        (
            "trainer.max_tokens_per_micro_batch=-8",
            "trainer.max_tokens_per_micro_batch=-8 must be >= 0 (tokens per packed micro-batch",
        ),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(load(*override.split()))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.sync.transport=nccl"], "trainer.sync.transport=nccl needs GPUs"),
        (
            ["trainer.sync.transport=gloo", "rollout.backend=hf"],
            "trainer.sync.transport=gloo receives through vLLM's weight-transfer API; "
            "rollout.backend=hf has none",
        ),
        (["trainer.sync.transport=shm"], "trainer.sync.transport='shm' is not valid"),
    ],
)
def test_sync_transport_fits_the_roles(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(load(*overrides))
    validate(load("trainer.sync.transport=gloo"))  # the CPU collective path is valid as is


def test_tensor_parallel_larger_than_the_gpus():
    cfg = load("+experiment=llama3b_intersection")
    with pytest.raises(ConfigError, match="needs 16 GPUs .* has 8"):
        validate_resources(cfg, {"GPU": 8.0, "CPU": 64.0})
    validate_resources(cfg, {"GPU": 16.0})
    with pytest.raises(ConfigError, match="judge.tensor_parallel_size=4 needs GPUs"):
        validate_resources(load("judge.tensor_parallel_size=4"), {"CPU": 2.0})


def test_a_tp_group_must_fit_on_one_node_not_only_in_total():
    """llama3b_intersection (judges TP=4) fits 2 nodes x 8 GPUs, not 16 nodes x 1 GPU."""
    cfg = load("+experiment=llama3b_intersection")
    demands = role_demands(cfg)
    check_nodes(demands, [NodeResources(f"n{i}", "10.0.0.1", 8.0, 64.0) for i in range(2)])
    one_gpu_nodes = [NodeResources(f"n{i:02d}", f"10.0.0.{i}", 1.0, 8.0) for i in range(16)]
    validate_resources(cfg, {"GPU": 16.0})  # the total is enough...
    with pytest.raises(
        ConfigError,
        match=r"judge-0 needs 4 GPUs and 4 CPUs on one node.*"
        r"largest node, 10.0.0.0 \(node n00\), has 1 GPUs",
    ):
        check_nodes(demands, one_gpu_nodes)  # ...but no node holds a TP=4 judge


def test_wandb_online_without_a_key_fails_in_validate(tmp_path, monkeypatch):
    """wandb_mode=online with no key wandb can find (env, .netrc, settings) fails before
    Ray starts, naming the fixes; a key in the environment or the .netrc passes."""
    import wandb
    from wandb.sdk import wandb_setup

    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb"))
    wandb.teardown()  # wandb reads its settings once per process: re-read them here
    cfg = load("logging.wandb_mode=online")
    with pytest.raises(
        ConfigError,
        match=r"online but wandb finds no API key.*WANDB_API_KEY.*"
        r"`wandb login`.*logging.wandb_mode=offline",
    ):
        validate(cfg)
    validate(load("logging.wandb_mode=offline"))
    host = urlparse(wandb_setup.singleton().settings.base_url).hostname
    netrc.write_text(f"machine {host}\n  login user\n  password {'k' * 40}\n")
    validate(cfg)  # what `wandb login` writes
    netrc.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    validate(cfg)
    wandb.teardown()


def _launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "capo_dist.launch", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(CONF).parent,
    )


README_CFG_JOB = "python -m capo_dist.launch +experiment=llama3b_intersection --cfg job"
README_CLUSTER = "python -m capo_dist.launch +experiment=llama3b_intersection ray.address=auto"


def test_cfg_job_prints_without_starting_anything():
    """The README's `--cfg job` line, and its cluster line with `--cfg job` appended (the
    run itself needs the GPU cluster; this shows that it composes)."""
    out = subprocess.run(
        readme_argv(README_CFG_JOB), capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "Qwen/Qwen2.5-72B-Instruct" in out.stdout and "tensor_parallel_size: 4" in out.stdout
    argv = readme_argv(README_CLUSTER, "--cfg", "job")
    out = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "address: auto" in out.stdout and "Llama-3.2-3B-Instruct" in out.stdout


def test_bad_config_fails_before_any_actor(tmp_path):
    out = _launch("capo.vote=plurality", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 2
    assert "ConfigError: capo.vote='plurality' is not valid" in out.stderr
    assert "Started a local Ray instance" not in out.stderr + out.stdout


def test_dashboard_binds_loopback_by_default():
    """With the dashboard on, the default run serves it on 127.0.0.1 only."""
    import ray

    from capo_dist.trainer import init_ray

    cfg = load("ray.dashboard=true", "ray.num_cpus=1")
    assert cfg.ray.dashboard_host == "127.0.0.1"
    init_ray(cfg)
    try:
        url = ray._private.worker.global_worker.node.address_info["webui_url"]
        assert url.startswith("127.0.0.1:"), url
    finally:
        ray.shutdown()


def test_dataset_smaller_than_a_step_fails_before_ray(tmp_path):
    data = tmp_path / "tiny.jsonl"
    data.write_text(
        '{"question": "1+1?", "answer": "#### 2"}\n{"question": "", "answer": "#### 3"}\n'
    )
    out = _launch(
        f"data.path={data}", "rollout.prompts_per_step=4", f"hydra.run.dir={tmp_path / 'run'}"
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert (
        "DataError: the dataset has 1 usable problems (1/2 rows kept (skipped: missing_question: 1))"
        in out.stderr
    )
    assert "rollout.prompts_per_step=4" in out.stderr
    assert "Started a local Ray instance" not in out.stderr + out.stdout
