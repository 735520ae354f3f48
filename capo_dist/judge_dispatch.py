"""Which judge worker gets the next chunk: the least loaded one, weighted by its speed.

A step's judge calls are all submitted at once (each waits on its rollout ref
inside Ray), so counting chunks alone would split every step evenly, as
round-robin did. The load of a judge is therefore the time it would need to
finish its chunks in flight plus this one: (in flight + 1) x its seconds per
chunk (a moving average of the `judge_seconds` its calls reported). Judges of
equal speed, or with no history yet, reduce to "fewest chunks in flight"
(ties: the lowest index). A slow judge (a smaller model, a shared endpoint, a
busy node) thus gets fewer chunks, in proportion to its speed.

Pure code (no Ray): the trainer counts the refs in flight and reports the seconds.
"""

from __future__ import annotations

from collections.abc import Sequence


class JudgeDispatch:
    """Chooses the judge for each chunk from the chunks in flight and each judge's speed."""

    def __init__(self, num_judges: int, smoothing: float = 0.5):
        if num_judges < 1:
            raise ValueError(f"num_judges={num_judges}; need at least one judge")
        self.seconds: list[float | None] = [None] * num_judges  # per chunk, moving average
        self.smoothing = smoothing

    def observe(self, judge: int, seconds: float) -> None:
        """A chunk on `judge` took `seconds` (its judge call's `judge_seconds`)."""
        old = self.seconds[judge]
        self.seconds[judge] = (
            seconds if old is None else self.smoothing * seconds + (1 - self.smoothing) * old
        )

    def choose(self, in_flight: Sequence[int]) -> int:
        """The judge that would finish one more chunk first; `in_flight[j]` is the
        number of chunks judge j holds now."""
        if len(in_flight) != len(self.seconds):
            raise ValueError(f"{len(in_flight)} in-flight counts for {len(self.seconds)} judges")
        known = [s for s in self.seconds if s is not None]
        typical = sum(known) / len(known) if known else 1.0
        return min(
            range(len(in_flight)),
            key=lambda j: (
                (in_flight[j] + 1) * (self.seconds[j] if self.seconds[j] is not None else typical),
                in_flight[j],
                j,
            ),
        )
