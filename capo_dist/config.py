"""Typed schema of a capo_dist run and its validation.

Hydra composes `conf/` on top of these dataclasses (registered in the
ConfigStore as `capo_schema`), so every key has a type and a default and a
typo fails at composition. `validate` then checks the values that a type
cannot (vote names, group sizes, paths, GPU counts) and fails with a message
that names the key, the bad value and what would be accepted — before Ray
or any actor starts.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore

from capo_dist.deepspeed_setup import LR_SCHEDULES
from capo_dist.rewards.loss import LOSS_AGG_MODES

VOTE_MODES = ("intersection", "majority", "union", "average")
ADVANTAGE_MODES = ("group_token", "group_response", "no_std")
JUDGE_BACKENDS = ("vllm", "hf", "openai", "symbolic")
ROLLOUT_BACKENDS = ("vllm", "hf")
SYNC_TRANSPORTS = ("object_store", "nccl", "gloo")
WANDB_MODES = ("disabled", "offline", "online")
ALL_WRONG_MODES = ("keep", "outcome_only")
TRUNCATED_MODES = ("keep", "mask", "soft_penalty")
FILTER_MODES = ("off", "outcome")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names key, value and fix."""


@dataclass
class TinyModelConfig:
    """Shape of the policy built locally when `model.path` is null (CPU default)."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    vocab_size: int = 2048


@dataclass
class ModelConfig:
    """The policy. `path`: a local HF checkpoint dir or a hub id; null builds a tiny one."""

    path: str | None = None
    dtype: str = "float32"
    build_dir: str = "${oc.env:HOME,/tmp}/.cache/capo_dist/models"
    # With path null: SFT-warm-start the tiny policy on step-format arithmetic solutions
    # (some with a wrong step) so it makes outcome and process errors (capo_dist.warmstart;
    # ~3-6 min once, then cached). false: a randomly initialised tiny model (tests).
    warm_start: bool = True
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class DataConfig:
    """Training prompts: a JSONL file (GSM8K-style), or generated arithmetic problems."""

    path: str | None = None
    question_key: str = "question"
    answer_key: str = "answer"
    # "gsm8k": the gold is the text after '#### '; "plain": the field is the gold answer.
    answer_format: str = "gsm8k"
    prompt_template: str = "Question: {question}\nAnswer step by step, one step per paragraph, and end with 'The answer is N.'\n\n"
    # true: the filled-in prompt_template goes to the policy as one user message through
    # its tokenizer's chat template, generation prompt added (Instruct models); rollouts
    # and evaluation alike. A tokenizer without a chat template is an error at worker start.
    chat_template: bool = False
    max_rows: int | None = None
    synthetic_size: int = 512
    seed: int = 0


@dataclass
class RolloutConfig:
    """Policy sampling workers (`rollout-0`, …)."""

    backend: str = "vllm"
    num_workers: int = 1
    samples_per_prompt: int = 4
    prompts_per_step: int = 8
    max_new_tokens: int = 96
    temperature: float = 1.0
    top_p: float = 1.0
    tensor_parallel_size: int = 1
    num_gpus_per_worker: float = 0.0
    # Ray CPUs per rollout actor. On CPU it is also the engine's torch threads
    # (Ray would pin a 1-CPU actor to one thread): 2 on a 2-core machine lets
    # generation use both cores while the learners wait (trainer.max_staleness=0).
    num_cpus_per_worker: float = 1.0
    kv_cache_space_gib: float = 1.0
    gpu_memory_utilization: float = 0.85
    max_model_len: int = 1024
    chunks_per_worker: int = 2
    # A response cut at max_new_tokens (the engine stopped on length): keep (scored like
    # any other), mask (no loss, no part in its group's statistics, not sent to the judge)
    # or soft_penalty (DAPO's overlong reward shaping: from max_new_tokens - overlong_buffer
    # tokens on, the outcome reward falls linearly, to -overlong_penalty at max_new_tokens).
    truncated: str = "keep"
    overlong_buffer: int = 16
    overlong_penalty: float = 1.0


@dataclass
class JudgeConfig:
    """The frozen GenPRM that lists wrong steps (`judge-0`, …)."""

    backend: str = "symbolic"
    num_workers: int = 1
    model_path: str | None = None
    dtype: str = "float32"
    tensor_parallel_size: int = 1
    num_gpus_per_worker: float = 0.0
    kv_cache_space_gib: float = 1.0
    gpu_memory_utilization: float = 0.85
    max_model_len: int | None = None  # null: the judge model's own context length
    temperature: float = 0.7
    max_tokens: int = 512
    include_reference: bool = True
    # The judge's prompt and the parser of its replies: a name in conf/judge_prompt/
    # (capo, first_error, json) or the path of a .yaml file (fields: capo_dist.judge_prompt).
    prompt: str = "capo"
    # OpenAI-compatible endpoint (judge.backend=openai).
    base_url: str | None = None
    model: str | None = None
    api_key_env: str = "CAPO_JUDGE_API_KEY"
    api: str = "chat"
    # One HTTP attempt, connect to last byte (a total deadline, not per socket read).
    timeout_s: float = 60.0
    # One response: all its attempts and the waits between them (capo_dist.judge_http).
    request_deadline_s: float = 180.0
    max_retries: int = 3
    # The longest wait a 429/503's Retry-After can ask for (never past the deadline).
    retry_after_max_s: float = 60.0
    # HTTP requests in flight at once; requests and estimated tokens (prompt bytes / 4 +
    # max_tokens per critique asked) started per minute, 0 = no limit (capo_dist.judge_http).
    max_concurrency: int = 8
    rpm: float = 0.0
    tpm: float = 0.0
    # n=N critiques in one request (n), N requests of n=1 (one), or n until a reply
    # brings fewer choices than asked, then one (auto).
    n_per_request: str = "auto"
    # A judge whose every critique fails this many responses in a row, or for this many
    # seconds of failed requests, is down: the run stops with an error instead of silently
    # training GRPO. A blackholed endpoint is down within down_after_s + request_deadline_s
    # (capo_dist.judge_health).
    max_consecutive_failures: int = 64
    down_after_s: float = 300.0
    # A judge whose critiques were ALL invalid (unparsable, or no answer) for this many
    # steps in a row: on_invalid=error stops the run naming the judge and the fix;
    # warn logs it loudly every such step and goes on.
    max_invalid_steps: int = 3
    on_invalid: str = "error"
    # Symbolic checker noise (each step verdict flipped with this probability).
    flip_prob: float = 0.0


@dataclass
class CapoConfig:
    """The CAPO reward: vote, critique count, asymmetric weights, advantage mode."""

    vote: str = "intersection"
    num_critiques: int = 4
    w_outcome: float = 2.0
    w_process: float = 1.0
    penalize_correct: bool = True
    penalize_incorrect: bool = True
    advantage: str = "group_token"
    adv_eps: float = 1e-6
    # A group whose responses are all wrong: keep (the process penalty still ranks them, so
    # the wrong response with fewer flagged steps gets a positive advantage) or outcome_only
    # (the process term is dropped in that group: every advantage in it is 0).
    all_wrong_groups: str = "keep"


@dataclass
class SyncConfig:
    """How updated weights reach the rollout engines.

    `transport`: object_store (learner rank 0 puts buckets in Ray's object
    store, each engine loads them), or the collective path — learner rank 0
    broadcasts each bucket to every engine worker through vLLM's
    weight-transfer API — over `nccl` (GPU) or `gloo` (CPU; the same code,
    only the communicator differs). `timeout_s` (collective only): how long
    the learner and the driver wait for the others — to form the group, and in
    each broadcast, which also waits for a generation in flight on the engines
    to end. The engines' side reads `CAPO_WEIGHT_SYNC_TIMEOUT_S` (same
    default; `capo_dist.engines.gloo_weight_transfer`).
    """

    transport: str = "object_store"
    bucket_mb: int = 64
    timeout_s: float = 1800.0
    # After every sync, score one of the step's responses on every engine and on the
    # learner and log the largest log-prob difference (`sync_max_logprob_diff`); a
    # difference above `verify_tol` stops the run (an engine that did not take the weights).
    verify: bool = False
    verify_tol: float = 1e-3


@dataclass
class TrainerConfig:
    """The learner group and the outer loop."""

    total_steps: int = 3
    max_staleness: int = 0
    num_learners: int = 2
    num_gpus_per_learner: float = 0.0
    lr: float = 1e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ppo_epochs: int = 1
    micro_batch_size: int = 8
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    tis_cap: float | None = None
    # Off-policy correction of rows sampled one policy version behind (max_staleness=1):
    # their PPO ratio is taken against the engine's sampling log-probs, the importance
    # weight old/behaviour capped at this (> 1). See capo_dist.rewards.loss.
    stale_ratio_cap: float = 2.0
    # Loss aggregation (capo_dist.rewards.loss): token_mean (all loss tokens of an optimizer
    # step weigh the same) | seq_mean_token_mean (each response's token mean, then the mean
    # over responses) | seq_mean_token_sum_norm (Dr. GRPO: each response's token sum divided
    # by rollout.max_new_tokens, then the mean over responses).
    loss_agg: str = "token_mean"
    # Learning rate after the warm-up: constant | cosine (down to min_lr_ratio x lr at the
    # last optimizer step, total_steps x ppo_epochs optimizer steps in all).
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.0
    # Learner memory for long responses: activation checkpointing of the decoder layers;
    # the LM head + log-softmax run over chunks of this many positions (0 = all at once,
    # keeping the [batch, length, vocab] logits for backward); micro-batches of at most
    # this many tokens, packed into one row without padding (0 = micro_batch_size padded rows).
    gradient_checkpointing: bool = False
    logprob_chunk_size: int = 0
    max_tokens_per_micro_batch: int = 0
    seed: int = 0
    sync: SyncConfig = field(default_factory=SyncConfig)
    # Checkpoints: every N steps (0 = only at the end), the last `keep_checkpoints`
    # kept, in `checkpoint_dir`. `resume`: none | auto (the last complete checkpoint
    # in checkpoint_dir; none there: a WARNING naming the directory, then step 0) | a
    # checkpoint directory. The default checkpoint_dir is inside this launch's new
    # run_dir: a re-launch that should continue sets it to a fixed path.
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    checkpoint_dir: str = "${run_dir}/checkpoints"
    resume: str = "none"
    # Write the final policy as a Hugging Face checkpoint to <run_dir>/policy.
    export_hf: bool = True
    # A rollout or judge chunk whose worker died is re-run this many times.
    max_chunk_retries: int = 3
    # off | outcome: drop groups whose responses all have the same outcome (all right or
    # all wrong) and generate rollout.prompts_per_step more prompts, at most
    # filter_max_rounds extra times, until rollout.prompts_per_step groups are kept (DAPO's
    # dynamic sampling). At the bound the step trains on what was kept; nothing kept: the
    # update is skipped with a WARNING (capo_dist.trainer `_fill_batch`).
    filter_groups: str = "off"
    filter_max_rounds: int = 3
    # Every N steps (0 = never) write the policy as a Hugging Face checkpoint to
    # <checkpoint_dir>/hf/step_XXXXXXXX (staged, fsynced, renamed into place; all kept).
    save_hf_every: int = 0


@dataclass
class EvalConfig:
    """Periodic evaluation of the live policy on benchmark files (see capo_dist.evaluate)."""

    every: int = 0  # steps; 0 = never. The final step is always evaluated when benches are set.
    before_training: bool = False  # also score the initial policy (logged as step 0)
    benches: dict[str, str] = field(default_factory=dict)  # name -> JSONL path
    k: int = 4
    temperature: float = 0.6
    max_new_tokens: int = 256
    limit: int | None = None  # first N problems of each bench


@dataclass
class LoggingConfig:
    """Where metrics go: `metrics.jsonl` always, wandb by mode."""

    wandb_mode: str = "disabled"
    wandb_project: str = "capo_dist"
    run_name: str | None = None
    # Per-response records (`samples/step_XXXXXX.jsonl`) every this many steps; 0 = never.
    samples_every: int = 1
    samples_per_step: int = 16
    # false: the roles' output (vLLM, DeepSpeed, Ray workers) goes to <run_dir>/logs/<role>.log
    # and the terminal shows the progress bar and capo_dist's messages; true: all on the terminal.
    verbose: bool = False


@dataclass
class RayConfig:
    """How to reach Ray: `address` (else the RAY_ADDRESS environment variable, as set by
    Slurm scripts and `ray job submit`) joins that cluster; neither starts a local one."""

    address: str | None = None
    num_cpus: int | None = None
    dashboard: bool = False
    dashboard_host: str = "127.0.0.1"
    # Port of the node's Prometheus endpoint for `ray.util.metrics` (null: Ray picks one).
    # Only for a cluster this run starts: joining one uses the cluster's own.
    metrics_export_port: int | None = None
    # How long the driver waits for the cluster to hold every role's placement group
    # before it fails naming the role it could not place (capo_dist.placement).
    placement_timeout_s: float = 300.0


@dataclass
class RehearsalConfig:
    """A CPU rehearsal of a cluster experiment (`+experiment=NAME +rehearsal=cpu`).

    Everything about the experiment is kept except the size of the models and
    the kind of device: the run starts a Ray cluster of `nodes` simulated nodes
    on this machine, each with `gpus_per_node` *logical* GPUs (placement groups,
    per-node packing and resource checks run as on a cluster; the processes
    compute on the CPU), joins it through `RAY_ADDRESS`, and resolves the
    experiment's hub ids offline (`HF_HUB_OFFLINE=1`) from a Hugging Face cache
    in `hf_home` filled with real small models (capo_dist.rehearsal).
    """

    enabled: bool = False
    nodes: int = 2
    gpus_per_node: int = 4
    cpus_per_node: int = 8
    # Hugging Face cache the rehearsal fills and the run reads (HF_HOME).
    hf_home: str = "${oc.env:HOME,/tmp}/.cache/capo_dist/rehearsal_hf"
    # The policy under the experiment's hub id: "shrunk" (SmolLM2's architecture,
    # tokenizer and chat template at a fraction of its size) or "full" (the real
    # SmolLM2-135M-Instruct). The judge is always the real SmolLM2-135M-Instruct.
    policy: str = "shrunk"
    # Training problems prepared into `data.path` when that file does not exist:
    # a GSM8K-format JSONL (null: ../shared/data/gsm8k/train.jsonl beside the repo).
    data_source: str | None = None
    # Problems prepared (and the shrunk policy tuned on: tune_steps full-batch steps).
    data_limit: int = 16
    tune_steps: int = 80


@dataclass
class RunConfig:
    """The whole run."""

    name: str = "tiny_cpu"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    capo: CapoConfig = field(default_factory=CapoConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    rehearsal: RehearsalConfig = field(default_factory=RehearsalConfig)
    run_dir: str = "."


ConfigStore.instance().store(name="capo_schema", node=RunConfig)


def _one_of(key: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(valid)}")


def _at_least(key: str, value: float, low: float, why: str = "") -> None:
    if value < low:
        raise ConfigError(f"{key}={value} must be >= {low}{why}")


def _missing_checkpoint(p: str) -> bool:
    """True if `p` is neither an existing directory nor shaped like a hub id (org/name)."""
    if Path(os.path.expanduser(p)).is_dir():
        return False
    return p.startswith(("/", ".", "~")) or re.fullmatch(r"[\w.-]+/[\w.-]+", p) is None


def _wandb_key_found() -> bool:
    """Whether `wandb.init(mode="online")` would find credentials, looked up the way
    wandb 0.31 does (wbauth.authenticate._use_system_auth): the WANDB_API_KEY or
    WANDB_IDENTITY_TOKEN_FILE environment variable, the .netrc entry for the wandb
    host (`wandb login` writes it; NETRC moves the file), or `api_key` in settings."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    from wandb.errors import AuthenticationError
    from wandb.sdk import wandb_setup
    from wandb.sdk.lib import wbauth

    settings = wandb_setup.singleton().settings
    if settings.api_key:
        return True
    try:
        return wbauth.read_netrc_auth(host=settings.base_url) is not None
    except AuthenticationError as err:
        raise ConfigError(
            f"logging.wandb_mode=online: the .netrc wandb entry is invalid: {err}"
        ) from None


def _validate_judge_prompt(judge: JudgeConfig) -> None:
    """`judge.prompt` loads (file, placeholders, parser); the symbolic judge writes
    `Wrong step list: [...]` whatever it is asked, so it needs that parser."""
    from capo_dist.judge_prompt import load_judge_prompt

    prompt = load_judge_prompt(judge.prompt)
    if judge.backend == "symbolic" and prompt.parser != "wrong_step_list":
        raise ConfigError(
            f"judge.prompt={judge.prompt!r} reads replies with the {prompt.parser!r} parser, "
            "but judge.backend=symbolic always answers 'Wrong step list: [...]': use "
            "judge.prompt=capo with the symbolic judge, or a model judge with this prompt"
        )


def validate(cfg: RunConfig) -> None:
    """Check every value a type cannot; raise ConfigError naming key, value and fix."""
    _one_of("capo.vote", cfg.capo.vote, VOTE_MODES)
    _one_of("capo.advantage", cfg.capo.advantage, ADVANTAGE_MODES)
    _one_of("judge.backend", cfg.judge.backend, JUDGE_BACKENDS)
    _one_of("rollout.backend", cfg.rollout.backend, ROLLOUT_BACKENDS)
    _one_of("trainer.sync.transport", cfg.trainer.sync.transport, SYNC_TRANSPORTS)
    _one_of("logging.wandb_mode", cfg.logging.wandb_mode, WANDB_MODES)
    _one_of("data.answer_format", cfg.data.answer_format, ("gsm8k", "plain"))
    _at_least(
        "rollout.samples_per_prompt",
        cfg.rollout.samples_per_prompt,
        2,
        " (group-normalised advantages need at least 2 responses per prompt)",
    )
    _at_least("capo.num_critiques", cfg.capo.num_critiques, 1)
    if cfg.capo.w_process < 0 or cfg.capo.w_outcome < 0:
        raise ConfigError("capo.w_outcome and capo.w_process must be >= 0 (w_process=0 is GRPO)")
    for key in ("rollout.num_workers", "judge.num_workers", "trainer.num_learners"):
        section, name = key.split(".")
        _at_least(key, getattr(getattr(cfg, section), name), 1)
    _at_least("trainer.total_steps", cfg.trainer.total_steps, 1)
    _at_least("trainer.checkpoint_every", cfg.trainer.checkpoint_every, 0)
    _at_least("trainer.keep_checkpoints", cfg.trainer.keep_checkpoints, 1)
    if cfg.trainer.resume not in ("none", "auto") and not Path(cfg.trainer.resume).is_dir():
        raise ConfigError(
            f"trainer.resume={cfg.trainer.resume!r}: use none, auto, or an existing checkpoint directory"
        )
    _at_least("trainer.max_staleness", cfg.trainer.max_staleness, 0)
    if cfg.trainer.max_staleness > 1:
        raise ConfigError(
            f"trainer.max_staleness={cfg.trainer.max_staleness} is not supported; use 0 (synchronous) or 1 (generate the next batch while training)"
        )
    _at_least("rollout.prompts_per_step", cfg.rollout.prompts_per_step, 1)
    _at_least("rollout.tensor_parallel_size", cfg.rollout.tensor_parallel_size, 1)
    _at_least("rollout.num_cpus_per_worker", cfg.rollout.num_cpus_per_worker, 1)
    _at_least("judge.tensor_parallel_size", cfg.judge.tensor_parallel_size, 1)
    if cfg.model.path is not None and _missing_checkpoint(cfg.model.path):
        raise ConfigError(
            f"model.path={cfg.model.path!r} does not exist; give a local Hugging Face checkpoint directory, a hub id, or null to build the tiny CPU model"
        )
    if cfg.judge.backend in ("vllm", "hf") and not cfg.judge.model_path:
        if cfg.model.path is not None:
            raise ConfigError(
                f"judge.model_path is missing for judge.backend={cfg.judge.backend}; set it to the judge checkpoint (e.g. Qwen/Qwen2.5-72B-Instruct)"
            )
    if cfg.judge.model_path and _missing_checkpoint(cfg.judge.model_path):
        raise ConfigError(
            f"judge.model_path={cfg.judge.model_path!r} does not exist; give a local checkpoint directory or a hub id"
        )
    _one_of("judge.on_invalid", cfg.judge.on_invalid, ("error", "warn"))
    for key in ("max_consecutive_failures", "max_invalid_steps"):
        _at_least(f"judge.{key}", getattr(cfg.judge, key), 1)
    _at_least("judge.max_retries", cfg.judge.max_retries, 0)
    _at_least("judge.retry_after_max_s", cfg.judge.retry_after_max_s, 0)
    _at_least(
        "judge.max_concurrency",
        cfg.judge.max_concurrency,
        1,
        " (HTTP requests in flight; 1 sends them one after another)",
    )
    for key in ("rpm", "tpm"):
        if not getattr(cfg.judge, key) >= 0:
            raise ConfigError(
                f"judge.{key}={getattr(cfg.judge, key)} must be >= 0 (per minute; 0 = no limit)"
            )
    _one_of("judge.n_per_request", cfg.judge.n_per_request, ("auto", "n", "one"))
    for key in ("timeout_s", "request_deadline_s", "down_after_s"):
        if not getattr(cfg.judge, key) > 0:
            raise ConfigError(f"judge.{key}={getattr(cfg.judge, key)} must be > 0 (seconds)")
    if cfg.judge.backend == "openai":
        if not cfg.judge.base_url or not cfg.judge.model:
            raise ConfigError(
                "judge.backend=openai needs judge.base_url (e.g. http://127.0.0.1:8000/v1) and judge.model"
            )
    for name, path in cfg.eval.benches.items():
        if not Path(path).is_file():
            raise ConfigError(
                f"eval.benches.{name}={path!r} is not a file; give a benchmark JSONL path"
            )
    _validate_judge_prompt(cfg.judge)
    if not 0.0 <= cfg.judge.flip_prob <= 1.0:
        raise ConfigError(f"judge.flip_prob={cfg.judge.flip_prob} must be in [0, 1]")
    if cfg.data.path is not None and not Path(cfg.data.path).is_file():
        raise ConfigError(
            f"data.path={cfg.data.path!r} is not a file; give a JSONL file or null to generate arithmetic problems"
        )
    if cfg.logging.wandb_mode == "online" and not _wandb_key_found():
        raise ConfigError(
            "logging.wandb_mode=online but wandb finds no API key (WANDB_API_KEY, "
            "WANDB_IDENTITY_TOKEN_FILE, a ~/.netrc entry for the wandb host, or its settings file); "
            "export WANDB_API_KEY=..., run `wandb login` once on the driver's machine, "
            "or use logging.wandb_mode=offline (and `wandb sync` later)"
        )
    _at_least("ray.placement_timeout_s", cfg.ray.placement_timeout_s, 1)
    transport = cfg.trainer.sync.transport
    if transport == "nccl" and (
        cfg.trainer.num_gpus_per_learner <= 0 or cfg.rollout.num_gpus_per_worker <= 0
    ):
        raise ConfigError(
            "trainer.sync.transport=nccl needs GPUs (trainer.num_gpus_per_learner > 0 and "
            "rollout.num_gpus_per_worker > 0); use gloo (the same collective path) or object_store on CPU"
        )
    if transport in ("nccl", "gloo") and cfg.rollout.backend != "vllm":
        raise ConfigError(
            f"trainer.sync.transport={transport} receives through vLLM's weight-transfer API; "
            f"rollout.backend={cfg.rollout.backend} has none: use rollout.backend=vllm or "
            "trainer.sync.transport=object_store"
        )
    _at_least("trainer.sync.timeout_s", cfg.trainer.sync.timeout_s, 1)
    _check_recipe(cfg)
    if cfg.trainer.stale_ratio_cap <= 1.0:
        raise ConfigError(
            f"trainer.stale_ratio_cap={cfg.trainer.stale_ratio_cap} must be > 1 (it caps the "
            "importance weight of stale rows; 2.0 is the default)"
        )
    _validate_learner_memory_and_loss(cfg.trainer)


def _validate_learner_memory_and_loss(t: TrainerConfig) -> None:
    """The trainer keys of the loss aggregation, the lr schedule and the learner's memory."""
    _one_of("trainer.loss_agg", t.loss_agg, LOSS_AGG_MODES)
    _one_of("trainer.lr_schedule", t.lr_schedule, LR_SCHEDULES)
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise ConfigError(
            f"trainer.min_lr_ratio={t.min_lr_ratio} must be in [0, 1] (the cosine floor as a share of trainer.lr)"
        )
    _at_least(
        "trainer.logprob_chunk_size",
        t.logprob_chunk_size,
        0,
        " (positions per chunk of the LM head; 0 = all at once)",
    )
    _at_least(
        "trainer.max_tokens_per_micro_batch",
        t.max_tokens_per_micro_batch,
        0,
        " (tokens per packed micro-batch; 0 = padded micro-batches of trainer.micro_batch_size rows)",
    )


def _check_recipe(cfg: RunConfig) -> None:
    """Group filtering, truncated responses, all-wrong groups, Hugging Face saves."""
    _one_of("capo.all_wrong_groups", cfg.capo.all_wrong_groups, ALL_WRONG_MODES)
    _one_of("rollout.truncated", cfg.rollout.truncated, TRUNCATED_MODES)
    _one_of("trainer.filter_groups", cfg.trainer.filter_groups, FILTER_MODES)
    _at_least("trainer.filter_max_rounds", cfg.trainer.filter_max_rounds, 0)
    _at_least("trainer.save_hf_every", cfg.trainer.save_hf_every, 0, " (0 = never)")
    r = cfg.rollout
    if r.truncated == "soft_penalty":
        if not 1 <= r.overlong_buffer <= r.max_new_tokens:
            raise ConfigError(
                f"rollout.overlong_buffer={r.overlong_buffer} must be in [1, "
                f"rollout.max_new_tokens={r.max_new_tokens}]: the penalty ramps over the last "
                "overlong_buffer tokens before max_new_tokens"
            )
        if r.overlong_penalty < 0:
            raise ConfigError(
                f"rollout.overlong_penalty={r.overlong_penalty} must be >= 0 (the reward "
                "subtracted at max_new_tokens; DAPO uses 1.0)"
            )


def gpus_needed(cfg: RunConfig) -> float:
    """GPUs the run asks for: rollout and judge engines (TP bundles) plus learners."""
    rollout = (
        cfg.rollout.num_workers * cfg.rollout.tensor_parallel_size * cfg.rollout.num_gpus_per_worker
    )
    judge = 0.0
    if cfg.judge.backend in ("vllm", "hf"):
        judge = (
            cfg.judge.num_workers * cfg.judge.tensor_parallel_size * cfg.judge.num_gpus_per_worker
        )
    return rollout + judge + cfg.trainer.num_learners * cfg.trainer.num_gpus_per_learner


def validate_resources(cfg: RunConfig, cluster: dict[str, float]) -> None:
    """Check the run fits the cluster's GPUs (call after ray.init, before any actor)."""
    have = float(cluster.get("GPU", 0.0))
    need = gpus_needed(cfg)
    if need > have:
        raise ConfigError(
            f"the run needs {need:g} GPUs (rollout.num_workers x rollout.tensor_parallel_size, "
            f"judge.num_workers x judge.tensor_parallel_size, trainer.num_learners) but the Ray cluster has {have:g}; "
            "lower the tensor_parallel_size / worker counts or add GPUs"
        )
    for key, tp, per in (
        (
            "rollout.tensor_parallel_size",
            cfg.rollout.tensor_parallel_size,
            cfg.rollout.num_gpus_per_worker,
        ),
        (
            "judge.tensor_parallel_size",
            cfg.judge.tensor_parallel_size,
            cfg.judge.num_gpus_per_worker,
        ),
    ):
        if tp > 1 and per <= 0:
            raise ConfigError(
                f"{key}={tp} needs GPUs; set the matching num_gpus_per_worker > 0 or use 1 on CPU"
            )
        if tp * per > have:
            raise ConfigError(f"{key}={tp} is larger than the cluster's {have:g} GPUs")
