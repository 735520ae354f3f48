"""The judge role (`judge-0`, …): the frozen GenPRM that lists a response's wrong steps.

A Ray actor wrapping one of four backends behind one method: the same vLLM
or Hugging Face engine code as the rollout workers (its own model, tensor
parallel), an OpenAI-compatible endpoint, or the symbolic step checker. Each
response gets N critiques from ONE request (n = N; an endpoint that ignores n
gets N requests, capo_dist.judge_http). A critique that fails or
cannot be produced is None (it abstains); a judge that fails every critique
for `max_consecutive_failures` responses in a row, or for `down_after_s`
seconds of failed requests, raises `JudgeDownError` (capo_dist.judge_health),
so a dead judge stops the run instead of silently turning it into GRPO. The
HTTP backend is checked after every response as it arrives, so a blackholed
endpoint is declared down within `down_after_s + request_deadline_s`. Each call
reports the judge tokens its backend counted (`JudgeTokens`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import ray

from capo_dist import telemetry
from capo_dist.actor_logs import redirect_output
from capo_dist.config import JudgeConfig
from capo_dist.judge_health import DownDetector, judge_label
from capo_dist.judge_prompt import JudgePrompt, load_judge_prompt
from capo_dist.rewards.steps import split_steps
from capo_dist.tokenization import encode_prompt, has_chat_template
from capo_dist.types import JudgedRollout, Rollout, SamplingSpec


@dataclass(frozen=True)
class JudgeRequest:
    """What a judge sees of one response: the problem, the gold answer, the steps."""

    question: str
    reference: str | None
    steps: list[str]


@dataclass(frozen=True)
class JudgeReply:
    """The judge's answer for one response: N critique texts (None = abstained) and its input.

    `prompt` is the exact text the judge model received (decoded from the token
    ids sent, special tokens kept); None where that is not known here (the
    symbolic checker, an HTTP endpoint that applies its own template) or where
    the prompt was not sent (too long for the judge's context).
    """

    critiques: list[str | None]
    prompt: str | None = None


@dataclass(frozen=True)
class JudgeTokens:
    """A backend's judge tokens so far, as its engine or endpoint counted them.

    `prompt` counts each request's prompt once (n critiques of one prompt share
    it); `cached` is the part of `cached_prompt` (the prompt tokens of the requests
    whose engine reported its prefix-cache hits) served from the prefix cache.
    """

    prompt: int = 0
    completion: int = 0
    cached: int = 0
    cached_prompt: int = 0


def judge_token_metrics(stats: Sequence[dict[str, float]], policy_tokens: float) -> dict:
    """A step's judge token figures from its judge calls' stats: prompt and completion
    tokens, judge tokens per policy response token, and the prefix-cache hit rate of
    the prompt tokens whose engine reported it (absent where none did)."""
    prompt = sum(s.get("judge_prompt_tokens", 0.0) for s in stats)
    completion = sum(s.get("judge_completion_tokens", 0.0) for s in stats)
    out = {
        "judge_prompt_tokens": prompt,
        "judge_completion_tokens": completion,
        "judge_tokens_per_policy_token": (prompt + completion) / max(policy_tokens, 1.0),
    }
    reported = sum(s.get("judge_cached_prompt_tokens", 0.0) for s in stats)
    if reported > 0:
        cached = sum(s.get("judge_cached_tokens", 0.0) for s in stats)
        out["judge_prefix_cache_hit_rate"] = cached / reported
    return out


class JudgeBackend(Protocol):
    def critiques(self, requests: Sequence[JudgeRequest], n: int) -> list[JudgeReply]: ...


class StepCheckerBackend:
    """Symbolic arithmetic checker (no model); noisy when `flip_prob` > 0.

    `check_step` never raises and is bounded per step, so no model text can end
    the judge task; a step too long or too big to check is flagged and counted
    in `unchecked_steps` (logged as `judge_unchecked_steps`).
    """

    def __init__(self, flip_prob: float, seed: int):
        self.flip_prob = flip_prob
        self.rng = random.Random(seed)
        self.unchecked_steps = 0

    def critiques(self, requests: Sequence[JudgeRequest], n: int) -> list[JudgeReply]:
        from capo_dist.step_checker import Verdict, check_step, critique_verdicts

        replies = []
        for r in requests:
            verdicts = [check_step(s) for s in r.steps]
            self.unchecked_steps += verdicts.count(Verdict.UNCHECKED)
            replies.append(
                JudgeReply(critique_verdicts(r.steps, verdicts, n, self.flip_prob, self.rng))
            )
        return replies


class HttpBackend:
    """An OpenAI-compatible endpoint: a batch's requests run concurrently
    (`judge.max_concurrency` in flight, `judge.rpm` / `judge.tpm` limits) on one
    event loop (capo_dist.judge_http)."""

    def __init__(self, cfg: JudgeConfig, prompt: JudgePrompt | None = None):
        from capo_dist.judge_http import HttpJudgeClient, HttpJudgeConfig

        self.prompt = prompt or load_judge_prompt(cfg.prompt)

        self.client = HttpJudgeClient(
            HttpJudgeConfig(
                base_url=cfg.base_url or "",
                model=cfg.model or "",
                api=cfg.api,
                api_key_env=cfg.api_key_env,
                timeout_s=cfg.timeout_s,
                request_deadline_s=cfg.request_deadline_s,
                max_retries=cfg.max_retries,
                retry_after_max_s=cfg.retry_after_max_s,
                temperature=cfg.temperature,
                max_tokens=cfg.max_tokens,
                max_concurrency=cfg.max_concurrency,
                rpm=cfg.rpm,
                tpm=cfg.tpm,
                n_per_request=cfg.n_per_request,
            )
        )

    def failed_requests(self) -> int:
        """HTTP attempts that failed so far (each retry counts; giving up does not add one;
        an attempt the rate limits could not start before the deadline counts)."""
        return sum(v for k, v in self.client.failures.items() if k != "gave_up")

    def token_counts(self) -> JudgeTokens:
        """The tokens the endpoint reported so far (its `usage`; a reply without one adds 0)."""
        t = self.client.tokens
        return JudgeTokens(
            t["prompt_tokens"],
            t["completion_tokens"],
            t["cached_tokens"],
            t["cached_prompt_tokens"],
        )

    def critiques(
        self,
        requests: Sequence[JudgeRequest],
        n: int,
        on_reply: Callable[[list[str | None]], None] | None = None,
    ) -> list[JudgeReply]:
        """Replies in the requests' order; `on_reply` sees each one's critiques as it arrives
        (and may raise, which cancels the rest)."""
        prompts = [self.prompt.render(r.question, r.steps, r.reference) for r in requests]
        return [JudgeReply(t) for t in self.client.critique_many(prompts, n, on_reply)]


class EngineBackend:
    """A local generation engine (vLLM or HF) running the judge model."""

    def __init__(
        self,
        cfg: JudgeConfig,
        model_path: str,
        seed: int,
        engine_kwargs: dict,
        prompt: JudgePrompt | None = None,
    ):
        from capo_dist.engines import make_engine

        self.prompt = prompt or load_judge_prompt(cfg.prompt)

        self.engine = make_engine(
            cfg.backend,
            model_path,
            dtype=cfg.dtype,
            tensor_parallel_size=cfg.tensor_parallel_size,
            max_model_len=cfg.max_model_len,
            kv_cache_space_gib=cfg.kv_cache_space_gib,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            seed=seed,
            **engine_kwargs,
        )
        self.cfg = cfg
        self.tokens = JudgeTokens()
        if cfg.max_model_len is None:
            from transformers import AutoConfig

            self.context = int(AutoConfig.from_pretrained(model_path).max_position_embeddings)
        else:
            self.context = cfg.max_model_len

    def token_counts(self) -> JudgeTokens:
        """Prompt tokens sent (once per response), critique tokens generated, prefix-cache hits."""
        return self.tokens

    def critiques(self, requests: Sequence[JudgeRequest], n: int) -> list[JudgeReply]:
        """Critiques from the engine; a judge tokenizer with a chat template gets chat prompts."""
        tok = self.engine.tokenizer()
        chat = has_chat_template(tok)
        prompts = [
            encode_prompt(tok, self.prompt.render(r.question, r.steps, r.reference), chat)
            for r in requests
        ]
        budget = self.context - self.cfg.max_tokens
        fits = [i for i, p in enumerate(prompts) if len(p) <= budget]
        out = [JudgeReply([None] * n) for _ in prompts]
        if fits:
            spec = SamplingSpec(
                n=n, max_tokens=self.cfg.max_tokens, temperature=self.cfg.temperature
            )
            outputs = self.engine.generate([prompts[i] for i in fits], spec)
            sent = sum(len(prompts[i]) for i in fits)
            cached = getattr(self.engine, "last_cached_tokens", None)  # vLLM only
            self.tokens = JudgeTokens(
                self.tokens.prompt + sent,
                self.tokens.completion + sum(len(c.token_ids) for cs in outputs for c in cs),
                self.tokens.cached + (cached or 0),
                self.tokens.cached_prompt + (sent if cached is not None else 0),
            )
            for i, completions in zip(fits, outputs, strict=True):
                out[i] = JudgeReply(
                    [c.text for c in completions],
                    tok.decode(prompts[i], skip_special_tokens=False),
                )
        return out


def critique_all(
    backend: JudgeBackend,
    requests: Sequence[JudgeRequest],
    n: int,
    down: DownDetector,
    batch_size: int | None = None,
) -> list[JudgeReply]:
    """Every request's reply, asked `batch_size` at a time (None: all at once); each
    batch's replies go to `down` as they arrive, which raises `JudgeDownError`.

    The HTTP backend runs all requests concurrently and hands `down` each reply as
    it arrives (`batch_size` unused), with the wall time since the previous one:
    a failing streak's seconds are wall seconds, so a blackholed endpoint is still
    down within `down_after_s + request_deadline_s`."""
    if isinstance(backend, HttpBackend):
        last = [time.monotonic()]

        def record(critiques: list[str | None]) -> None:
            now = time.monotonic()
            down.record([critiques], now - last[0])
            last[0] = now

        return backend.critiques(requests, n, record)
    size = batch_size or max(len(requests), 1)
    replies: list[JudgeReply] = []
    for i in range(0, len(requests), size):
        start = time.monotonic()
        batch = backend.critiques(requests[i : i + size], n)
        down.record([reply.critiques for reply in batch], time.monotonic() - start)
        replies += batch
    return replies


@ray.remote
class JudgeWorker:
    """Critiques rollouts; returns them with N raw critique texts each (None = abstain)."""

    def __init__(
        self,
        cfg: JudgeConfig,
        num_critiques: int,
        policy_model_path: str,
        seed: int,
        engine_kwargs: dict | None = None,
        *,
        log_file: str | None = None,
        prompt: JudgePrompt | None = None,
        skip_truncated: bool = False,
    ):
        """`prompt`: the judge prompt the driver loaded (None: load `cfg.prompt` here).
        `skip_truncated` (rollout.truncated=mask): a response cut at the length limit is
        not judged (it gets no critiques: it trains on nothing), saving the judge its tokens."""
        redirect_output(log_file)  # first: the engine's output goes there (actor_logs)
        self.cfg = cfg
        self.skip_truncated = skip_truncated
        self.n = num_critiques
        if cfg.backend == "symbolic":
            self.backend: JudgeBackend = StepCheckerBackend(cfg.flip_prob, seed)
        elif cfg.backend == "openai":
            self.backend = HttpBackend(cfg, prompt)
        else:
            self.backend = EngineBackend(
                cfg, cfg.model_path or policy_model_path, seed, engine_kwargs or {}, prompt
            )
        self.down = DownDetector(
            cfg.max_consecutive_failures,
            cfg.down_after_s,
            judge_label(cfg, cfg.model_path or policy_model_path),
        )

    def _failed_requests(self) -> int:
        count = getattr(self.backend, "failed_requests", None)
        return count() if count else 0

    def _tokens(self) -> JudgeTokens:
        count = getattr(self.backend, "token_counts", None)
        return count() if count else JudgeTokens()

    def state(self) -> dict:
        """The noisy checker's RNG state (JSON-able), so a resume draws the same flips."""
        rng = getattr(self.backend, "rng", None)
        if rng is None:
            return {}
        version, internal, gauss = rng.getstate()
        return {"rng": [version, list(internal), gauss]}

    def restore(self, state: dict) -> None:
        if "rng" in state:
            version, internal, gauss = state["rng"]
            self.backend.rng.setstate((version, tuple(internal), gauss))

    def judge(self, rollouts: list[Rollout]) -> tuple[list[JudgedRollout], dict[str, float]]:
        """N critiques for each rollout, plus this call's judge timing and counts."""
        start = time.perf_counter()
        skip = [self.skip_truncated and r.completion.finish_reason == "length" for r in rollouts]
        sent = [r for r, s in zip(rollouts, skip, strict=True) if not s]
        requests = []
        for r in sent:
            text = r.completion.text
            requests.append(
                JudgeRequest(
                    question=r.problem.question,
                    reference=r.problem.gold if self.cfg.include_reference else None,
                    steps=[text[s:e] for s, e in split_steps(text)],
                )
            )
        failed_before = self._failed_requests()
        tokens_before = self._tokens()
        unchecked_before = getattr(self.backend, "unchecked_steps", 0)
        replies = critique_all(self.backend, requests, self.n, self.down)
        texts = [reply.critiques for reply in replies]
        answers = iter(replies)
        judged = []
        for r, skipped in zip(rollouts, skip, strict=True):
            if skipped:  # no critiques: make_experience leaves it out (rollout.truncated=mask)
                judged.append(JudgedRollout(rollout=r))
                continue
            reply = next(answers)
            judged.append(JudgedRollout(r, list(reply.critiques), reply.prompt))
        tokens = self._tokens()
        role = ray.get_runtime_context().get_actor_name() or "judge"
        failed = sum(all(c is None for c in cs) for cs in texts)
        telemetry.record("capo_judge_latency_s", time.perf_counter() - start, role)
        telemetry.record("capo_judge_failed_share", failed / max(len(texts), 1), role)
        return judged, {
            "judge_request_failures": float(self._failed_requests() - failed_before),
            "judge_seconds": time.perf_counter() - start,
            "judge_unchecked_steps": float(
                getattr(self.backend, "unchecked_steps", 0) - unchecked_before
            ),
            "judge_prompt_tokens": float(tokens.prompt - tokens_before.prompt),
            "judge_completion_tokens": float(tokens.completion - tokens_before.completion),
            "judge_cached_tokens": float(tokens.cached - tokens_before.cached),
            "judge_cached_prompt_tokens": float(tokens.cached_prompt - tokens_before.cached_prompt),
            # rollout.truncated=mask: responses not sent, and their tokens (the judge's input
            # it was spared, besides the question and its own output).
            "judge_skipped_responses": float(sum(skip)),
            "judge_skipped_tokens": float(
                sum(len(r.completion.token_ids) for r, s in zip(rollouts, skip, strict=True) if s)
            ),
        }
