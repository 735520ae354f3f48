"""Training prompts: JSONL files with configurable field names, or generated arithmetic.

A row that cannot be used (bad JSON, non-UTF-8 bytes, a missing or empty
question/answer, a gold answer that cannot be extracted) is skipped and
counted in `DataStats`, never silently dropped; a file with no usable row is
an error that names the file and the keys it looked for.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from capo_dist.types import Problem


class DataError(ValueError):
    """The dataset cannot feed a run; the message says which file and why."""


@dataclass
class DataStats:
    """How many rows were read, kept, and skipped for which reason."""

    rows: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"{self.kept}/{self.rows} rows kept (skipped: {why})"


def gsm8k_gold(answer: str) -> str | None:
    """The gold answer of a GSM8K solution: the text after the last '#### ', commas removed."""
    if "####" not in answer:
        return None
    gold = answer.rsplit("####", 1)[1].strip().replace(",", "")
    return gold or None


def jsonl_objects(path: Path, stats: DataStats) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each JSON-object line; other non-blank lines are counted in `stats`."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f):
            if not raw.strip():
                continue
            stats.rows += 1
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                stats.skipped["not_utf8"] += 1
                continue
            except json.JSONDecodeError:
                stats.skipped["bad_json"] += 1
                continue
            if not isinstance(row, dict):
                stats.skipped["not_an_object"] += 1
                continue
            yield lineno, row


def load_jsonl(
    path: str | Path,
    question_key: str = "question",
    answer_key: str = "answer",
    answer_format: str = "gsm8k",
    max_rows: int | None = None,
) -> tuple[list[Problem], DataStats]:
    """Read problems from a JSONL file, skipping and counting unusable rows."""
    path = Path(path)
    stats = DataStats()
    problems: list[Problem] = []
    for lineno, row in jsonl_objects(path, stats):
        question, answer = row.get(question_key), row.get(answer_key)
        if not isinstance(question, str) or not question.strip():
            stats.skipped[f"missing_{question_key}"] += 1
            continue
        if answer is None or (isinstance(answer, str) and not answer.strip()):
            stats.skipped[f"missing_{answer_key}"] += 1
            continue
        answer = str(answer)
        gold = gsm8k_gold(answer) if answer_format == "gsm8k" else answer.strip()
        if not gold:
            stats.skipped["no_gold_answer"] += 1
            continue
        uid = str(row.get("id", row.get("idx", f"{path.stem}-{lineno}")))
        problems.append(Problem(uid=uid, question=question.strip(), gold=gold))
        stats.kept += 1
        if max_rows is not None and stats.kept >= max_rows:
            break
    if not problems:
        raise DataError(
            f"{path} has no usable rows ({stats.summary()}); check data.question_key={question_key!r}, "
            f"data.answer_key={answer_key!r} and data.answer_format={answer_format!r}"
        )
    return problems, stats


# ---------------------------------------------------------------- synthetic

_NAMES = ("Ava", "Ben", "Cleo", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jo")
_ITEMS = ("apples", "marbles", "stickers", "coins", "books", "shells", "cards", "pens")


@dataclass(frozen=True)
class ArithProblem:
    """A generated word problem with its step-format reference solution."""

    problem: Problem
    steps: tuple[str, ...]

    @property
    def solution(self) -> str:
        return "\n\n".join(self.steps)


def make_arith_problem(rng: random.Random, index: int, num_ops: int) -> ArithProblem:
    """One multi-step word problem; every step is one checkable equation."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    value = rng.randint(2, 30)
    sentences = [f"{name} has {value} {item}."]
    steps = []
    for _ in range(num_ops):
        ops = ["buy", "double", "share"] if value % 2 == 0 else ["buy", "triple"]
        if value > 1:
            ops.append("give")
        op = rng.choice(ops)
        if op == "buy":
            k = rng.randint(1, 20)
            sentences.append(f"Then {name} gets {k} more.")
            new, eq = value + k, f"{value} + {k} = {value + k}"
        elif op == "give":
            k = rng.randint(1, value - 1)
            sentences.append(f"Then {name} gives away {k}.")
            new, eq = value - k, f"{value} - {k} = {value - k}"
        elif op == "double":
            sentences.append(f"Then the number of {item} doubles.")
            new, eq = value * 2, f"{value} * 2 = {value * 2}"
        elif op == "triple":
            sentences.append(f"Then the number of {item} triples.")
            new, eq = value * 3, f"{value} * 3 = {value * 3}"
        else:
            sentences.append(f"Then {name} shares them equally with a friend and keeps one half.")
            new, eq = value // 2, f"{value} / 2 = {value // 2}"
        steps.append(f"{eq}, so {name} has {new} {item}.")
        value = new
    sentences.append(f"How many {item} does {name} have now?")
    steps.append(f"The answer is {value}.")
    problem = Problem(uid=f"arith-{index}", question=" ".join(sentences), gold=str(value))
    return ArithProblem(problem=problem, steps=tuple(steps))


def synthetic_arith(size: int, seed: int, min_ops: int = 1, max_ops: int = 3) -> list[ArithProblem]:
    """`size` problems with 1..3 operations each, deterministic in `seed`."""
    rng = random.Random(seed)
    return [make_arith_problem(rng, i, rng.randint(min_ops, max_ops)) for i in range(size)]


class ProblemStream:
    """Problems forever, reshuffled each epoch from `seed` and the epoch number.

    Its position (`epoch`, `index`) is all the state it has, so a checkpoint
    that stores `state()` resumes the exact same sequence.
    """

    def __init__(self, problems: list[Problem], seed: int, epoch: int = 0, index: int = 0):
        self.problems, self.seed = problems, seed
        self.epoch, self.index = epoch, index
        self._order = self._shuffled(epoch)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.problems)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[Problem]:
        """The next `n` problems."""
        out = []
        for _ in range(n):
            if self.index == len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._shuffled(self.epoch)
            out.append(self.problems[self._order[self.index]])
            self.index += 1
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}
