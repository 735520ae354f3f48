"""The aggregator role (`aggregator`): verifier + critique parsing + vote + rewards + advantages.

A Ray actor so the verifier's worker pool and the tokenizer are built once and
the CPU work of scoring runs beside generation and training, not in the
driver. The math itself is `capo_dist.experience.make_experience` (pure).
"""

from __future__ import annotations

import time

import ray

from capo_dist import telemetry
from capo_dist.actor_logs import redirect_output
from capo_dist.config import CapoConfig
from capo_dist.experience import BatchRecipe, Experience, make_experience
from capo_dist.tokenization import pad_token_id
from capo_dist.types import JudgedRollout, Rollout


@ray.remote
class RewardAggregator:
    """Turns whole groups of judged rollouts into an `Experience` for the learner."""

    def __init__(
        self,
        cfg: CapoConfig,
        tokenizer_path: str,
        verifier_timeout_s: float = 3.0,
        log_file: str | None = None,
        critique_parser: str = "wrong_step_list",
        recipe: BatchRecipe | None = None,
    ):
        """`critique_parser`: the judge prompt's parser (capo_dist.rewards.critique_parsers);
        `recipe`: truncated responses and group filtering (`BatchRecipe`; None: neither)."""
        redirect_output(log_file)  # first (capo_dist.actor_logs)
        from transformers import AutoTokenizer

        from capo_dist.rewards.verifier import Verifier

        self.cfg = cfg
        self.critique_parser = critique_parser
        self.recipe = recipe
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        # Llama-3 tokenizers define no pad token.
        self.pad_token_id = pad_token_id(self.tokenizer.pad_token_id, self.tokenizer.eos_token_id)
        self.verifier = Verifier(timeout_s=verifier_timeout_s)

    def score_parts(self, *parts: list[JudgedRollout] | list[Rollout]) -> Experience:
        """Score the concatenation of `parts` (chunks of whole groups, judged or not)."""
        judged = [
            r if isinstance(r, JudgedRollout) else JudgedRollout(rollout=r, critiques=[])
            for part in parts
            for r in part
        ]
        return self.score(judged)

    def score(self, judged: list[JudgedRollout]) -> Experience:
        """Verify, vote, reward and pack one step's rollouts."""
        start = time.perf_counter()
        correct = self.verifier.check_many(
            [j.rollout.completion.text for j in judged], [j.rollout.problem.gold for j in judged]
        )
        exp = make_experience(
            judged,
            self.tokenizer,
            correct,
            self.cfg,
            self.pad_token_id,
            critique_parser=self.critique_parser,
            recipe=self.recipe,
        )
        exp.metrics["time_reward"] = time.perf_counter() - start
        for key in ("judge_invalid_rate", "reward_mean", "accuracy", "process_penalty_rate"):
            telemetry.record(f"capo_{key}", exp.metrics[key], "aggregator")
        return exp
