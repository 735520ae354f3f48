"""The rollout role (`rollout-0`, …): samples G responses per prompt with the current policy.

A Ray actor around one generation engine (vLLM, or Hugging Face generate).
It formats prompts with the run's template (through the policy's chat template
when `data.chat_template` is on; `capo_dist.tokenization`), returns typed
`Rollout`s tagged with the policy version that produced them, and loads new
weights bucket by bucket from the learner.
"""

from __future__ import annotations

import time

import ray

from capo_dist import telemetry
from capo_dist.actor_logs import redirect_output
from capo_dist.config import RolloutConfig
from capo_dist.tokenization import policy_prompt_ids, require_chat_template
from capo_dist.types import Problem, Rollout, SamplingSpec


@ray.remote
class RolloutWorker:
    """Policy sampling for one engine; `version` counts the weight syncs it has loaded."""

    def __init__(
        self,
        cfg: RolloutConfig,
        model_path: str,
        dtype: str,
        prompt_template: str,
        seed: int,
        engine_kwargs: dict | None = None,
        chat_template: bool = False,
        log_file: str | None = None,
    ):
        """`chat_template` (data.chat_template): prompts go through the policy's chat template;
        `log_file`: where this actor's output goes (capo_dist.actor_logs)."""
        redirect_output(log_file)
        from capo_dist.engines import make_engine

        if chat_template:  # before the engine loads the model
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(model_path)
            require_chat_template(tok, model_path, "data.chat_template")
        self.chat_template = chat_template
        if cfg.num_gpus_per_worker <= 0:
            # Ray pins an actor's OMP/torch threads to floor(num_cpus), set here
            # explicitly so it holds whatever imported torch first.
            import torch

            torch.set_num_threads(max(1, int(cfg.num_cpus_per_worker)))
        self.cfg = cfg
        self.template = prompt_template
        self.seed = seed
        self.engine = make_engine(
            cfg.backend,
            model_path,
            dtype=dtype,
            tensor_parallel_size=cfg.tensor_parallel_size,
            max_model_len=cfg.max_model_len,
            kv_cache_space_gib=cfg.kv_cache_space_gib,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            seed=seed,
            **(engine_kwargs or {}),
        )
        self.version = 0
        self.calls = 0
        self.verifier = None
        self.role = ray.get_runtime_context().get_actor_name() or "rollout"

    def generate(self, problems: list[Problem]) -> tuple[list[Rollout], dict[str, float]]:
        """`samples_per_prompt` rollouts per problem, grouped by problem, plus timing."""
        start = time.perf_counter()
        tok = self.engine.tokenizer()
        prompts = [
            policy_prompt_ids(tok, self.template, p.question, self.chat_template) for p in problems
        ]
        spec = SamplingSpec(
            n=self.cfg.samples_per_prompt,
            max_tokens=self.cfg.max_new_tokens,
            temperature=self.cfg.temperature,
            top_p=self.cfg.top_p,
            seed=self.seed * 100_003 + self.calls,
        )
        self.calls += 1
        outputs = self.engine.generate(prompts, spec)
        rollouts = [
            Rollout(
                problem=p,
                group_index=g,
                prompt_token_ids=list(ids),
                completion=c,
                policy_version=self.version,
            )
            for p, ids, completions in zip(problems, prompts, outputs, strict=True)
            for g, c in enumerate(completions)
        ]
        seconds = time.perf_counter() - start
        tokens = sum(len(r.completion.token_ids) for r in rollouts)
        telemetry.record("capo_rollout_tokens_per_s", tokens / max(seconds, 1e-9), self.role)
        return rollouts, {"rollout_seconds": seconds, "rollout_tokens": float(tokens)}

    def load_weights(self, bucket_refs: list[ray.ObjectRef], version: int) -> float:
        """Load every bucket (HF parameter names) into the engine; returns seconds spent."""
        start = time.perf_counter()
        for ref in bucket_refs:
            self.engine.load_weights(ray.get(ref).unpack())
        self.version = version
        return time.perf_counter() - start

    def evaluate(
        self, benches: dict[str, list[Problem]], k: int, temperature: float, max_new_tokens: int
    ):
        """Score the current policy on `benches` (pass@1 greedy, mean@k); an `EvalResult`."""
        from capo_dist.evaluate import evaluate_engine

        if self.verifier is None:
            from capo_dist.rewards.verifier import Verifier

            self.verifier = Verifier()
        return evaluate_engine(
            self.engine,
            benches,
            k,
            temperature,
            max_new_tokens,
            self.template,
            seed=self.seed,
            verifier=self.verifier,
            chat_template=self.chat_template,
        )

    def init_weight_transfer(self, init_info: dict) -> None:
        """Join the learner's weight-sync group (vLLM weight transfer; `CollectiveSyncPlan`)."""
        self.engine.init_weight_transfer_engine(init_info)

    def receive_weights(self, update_info: dict, version: int) -> float:
        """Receive every parameter from learner rank 0's broadcast; returns seconds spent.

        The learners' `broadcast_weights` must run meanwhile (collective sync).
        """
        start = time.perf_counter()
        self.engine.start_weight_update()
        self.engine.update_weights(update_info)
        self.engine.finish_weight_update(str(version))
        self.version = version
        return time.perf_counter() - start

    def state(self) -> dict[str, int]:
        """Counters a checkpoint needs to resume sampling with the same seeds."""
        return {"calls": self.calls, "version": self.version}

    def restarted(self) -> bool:
        """True in an actor process Ray started again after the first one died."""
        return ray.get_runtime_context().was_current_actor_reconstructed

    def restore(self, state: dict[str, int]) -> None:
        self.calls = state["calls"]

    def sequence_logprobs(self, prompt: list[int], continuation: list[int]) -> list[float]:
        """Log-probs of `continuation` under the engine's current weights (sync checks)."""
        return self.engine.sequence_logprobs(prompt, continuation)
