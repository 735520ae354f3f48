"""Judge health: when a judge is down, and when it is up but writes nothing usable.

Two ways a judge silently turns CAPO into GRPO, each with its own stop:

- **Down** (`JudgeDownError`, raised in the judge worker): no critique came back
  (connection refused, timeouts, HTTP errors, malformed bodies) for
  `judge.max_consecutive_failures` responses in a row, or the failed responses in
  a row took `judge.down_after_s` seconds in all. Each HTTP response takes at
  most `judge.request_deadline_s`, so a blackholed endpoint is declared down at
  most `down_after_s + request_deadline_s` after its first failed request,
  whatever `max_retries`, the backoff or `timeout_s` are.
- **Unusable** (`JudgeUnusableError`, raised by the driver): the judge answers,
  but every critique of a step was invalid (unparsable, or no answer) for
  `judge.max_invalid_steps` steps in a row. `judge.on_invalid=warn` logs it
  loudly every such step instead and goes on.

Pure code (no Ray): the driver and the judge worker call it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from capo_dist.config import JudgeConfig


class JudgeDownError(RuntimeError):
    """The judge failed every critique for too many responses, or too long, in a row."""


class JudgeUnusableError(RuntimeError):
    """The judge answered, but none of its critiques was usable for too many steps in a row."""


def judge_label(cfg: JudgeConfig, policy_path: str) -> str:
    """The judge as a person would name it in an error message."""
    if cfg.backend == "openai":
        return f"{cfg.model!r} at {cfg.base_url} (judge.backend=openai)"
    if cfg.backend == "symbolic":
        return "the symbolic step checker (judge.backend=symbolic)"
    return f"{cfg.model_path or policy_path} (judge.backend={cfg.backend})"


@dataclass
class DownDetector:
    """Counts the responses in a row that got no critique at all, and the seconds they took.

    `record` is called after each batch of replies (one HTTP response, or one
    engine batch) and raises `JudgeDownError` once the streak reaches
    `max_failures` responses or `down_after_s` seconds of failing. Seconds are
    those spent waiting on failed replies, not wall time, so the learner's time
    between steps never counts toward a judge being down.
    """

    max_failures: int
    down_after_s: float
    judge: str
    failures: int = 0
    failing_s: float = 0.0

    def record(self, critiques: Sequence[Sequence[str | None]], seconds: float) -> None:
        """One batch of replies (N critiques each, None = failed) that took `seconds`."""
        for cs in critiques:
            if any(c is not None for c in cs):
                self.failures, self.failing_s = 0, 0.0
            else:
                self.failures += 1
        if critiques and self.failures:
            self.failing_s += seconds
        if self.failures >= self.max_failures or (
            self.failures and self.failing_s >= self.down_after_s
        ):
            raise JudgeDownError(
                f"judge {self.judge} produced no critique for {self.failures} responses in a row "
                f"({self.failing_s:.1f} s of failed requests); check the judge (endpoint, model, "
                "prompt length, the worker's log for the failure reasons) or raise "
                f"judge.max_consecutive_failures={self.max_failures} / "
                f"judge.down_after_s={self.down_after_s:g}"
            )


def invalid_streak_check(
    streak: int, invalid_rate: float, max_invalid_steps: int, judge: str
) -> tuple[int, str | None]:
    """After one step: the new count of steps in a row whose critiques were ALL invalid
    (`invalid_rate` 1.0: unparsable, or no answer), and, once that count reaches
    `max_invalid_steps`, the message saying what is wrong and how to fix it."""
    streak = streak + 1 if invalid_rate >= 1.0 else 0
    if streak < max_invalid_steps:
        return streak, None
    return streak, (
        f"judge {judge}: every critique was invalid (judge_invalid_rate "
        f"{invalid_rate:.0%}) for {streak} steps in a row, so CAPO has no process reward and "
        "this run is training plain GRPO. See the critiques it wrote in "
        "<run_dir>/samples/. Fix: a critique prompt/parser that this judge follows, a bigger "
        "judge model, or judge.on_invalid=warn to go on anyway "
        f"(judge.max_invalid_steps={max_invalid_steps})."
    )
