"""Training prompts: JSONL files with configurable field names, or generated arithmetic.

Every row of a file is either used or skipped and counted in `DataStats` by
reason, never silently dropped and never an exception: the shape of a row is
checked by type, not trusted. A row is skipped when its line is over
`MAX_LINE_BYTES` (read in bounded pieces), is not UTF-8, is not JSON (a number
of over 4300 digits included), is not a JSON object, nests deeper than
`MAX_DEPTH` (JSON nested too deep for the parser included), holds a string
that is not valid Unicode anywhere (a lone surrogate such as "\\ud800", which
would kill the rollout tokenizer mid-run), or when its question/answer is
missing, blank, not of the expected type or over `MAX_TEXT_CHARS`, or its gold
answer cannot be extracted or is over `MAX_GOLD_CHARS`. A file with no usable
row is an error that names the file and the keys it looked for.

Problem identity (`Problem.uid`, which groups the responses of one prompt for
the advantage) is unique by construction within a file: a row's `id` (else
`idx`) when it is a string or integer not seen before, otherwise its row
position; each replaced id is counted in `DataStats.replaced_ids` by reason.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from capo_dist.types import Problem

MAX_LINE_BYTES = 1 << 20  # one JSONL line (the longest benchmark row here is 55 kB)
MAX_DEPTH = 32  # nesting of a row's values (benchmark rows nest 2 deep)
MAX_TEXT_CHARS = 65_536  # a question, context, answer or solution (longest here: 12k)
MAX_GOLD_CHARS = 1_000  # an extracted gold answer (longest here: 224)
MAX_ID_CHARS = 200  # a row's own id; a longer one is replaced by the row position


class DataError(ValueError):
    """The dataset cannot feed a run; the message says which file and why."""


@dataclass
class DataStats:
    """How many rows were read, kept, skipped for which reason, and whose id was replaced why."""

    rows: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    replaced_ids: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        text = f"{self.kept}/{self.rows} rows kept (skipped: {why})"
        if self.replaced_ids:
            ids = ", ".join(f"{k}: {v}" for k, v in sorted(self.replaced_ids.items()))
            text += f"; ids replaced by the row position: {ids}"
        return text


def gsm8k_gold(answer: str) -> str | None:
    """The gold answer of a GSM8K solution: the text after the last '#### ', commas removed."""
    if "####" not in answer:
        return None
    gold = answer.rsplit("####", 1)[1].strip().replace(",", "")
    return gold or None


def _lines(f: IO[bytes], limit: int) -> Iterator[bytes | None]:
    """Each line of `f`, or None for one over `limit` bytes (read and dropped in bounded pieces)."""
    while raw := f.readline(limit + 1):
        if len(raw) <= limit or raw.endswith(b"\n"):
            yield raw
            continue
        while (rest := f.readline(limit)) and not rest.endswith(b"\n"):
            pass
        yield None


def _shape_error(row: dict[str, Any]) -> str:
    """Why `row` cannot be used, or "" when every value nests at most `MAX_DEPTH` deep and
    every string (keys too) is valid Unicode (encodable as UTF-8: no lone surrogate).
    Iterative, so it is bounded by the row's size, never by the stack."""
    stack: list[tuple[Any, int]] = [(row, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            texts = [value]
        elif isinstance(value, (dict, list)):
            if depth >= MAX_DEPTH:
                return "too_deeply_nested"
            values = value.values() if isinstance(value, dict) else value
            texts = list(value) if isinstance(value, dict) else []  # keys: always str in JSON
            stack.extend((v, depth + 1) for v in values)
        else:
            continue
        if not all(valid_unicode(t) for t in texts):
            return "invalid_unicode"
    return ""


def valid_unicode(text: str) -> bool:
    """Whether `text` encodes as UTF-8, i.e. holds no lone surrogate (which tokenizers reject)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_row(raw: bytes) -> tuple[dict[str, Any] | None, str]:
    """(the JSON object of one line, "") or (None, why it cannot be a row)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "not_utf8"
    try:
        row = json.loads(text)
    except RecursionError:
        return None, "too_deeply_nested"
    except ValueError:  # JSONDecodeError, or an integer of over 4300 digits
        return None, "bad_json"
    if not isinstance(row, dict):
        return None, "not_an_object"
    error = _shape_error(row)
    return (None, error) if error else (row, "")


def jsonl_objects(path: Path, stats: DataStats) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each usable JSON-object line (see the module doc);
    other non-blank lines are counted in `stats` by reason."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(_lines(f, MAX_LINE_BYTES)):
            if raw is not None and not raw.strip():
                continue
            stats.rows += 1
            row, reason = parse_row(raw) if raw is not None else (None, "line_too_long")
            if row is None:
                stats.skipped[reason] += 1
                continue
            yield lineno, row


def text_field(
    row: dict[str, Any], key: str, max_chars: int = MAX_TEXT_CHARS
) -> tuple[str | None, str]:
    """(the stripped text of `row[key]`, "") or (None, reason): `missing_<key>` (absent, null,
    blank), `<key>_not_text` (another type), `<key>_too_long` (over `max_chars`)."""
    value = row.get(key)
    if value is not None and not isinstance(value, str):
        return None, f"{key}_not_text"
    value = value.strip() if value is not None else ""
    if not value:
        return None, f"missing_{key}"
    if len(value) > max_chars:
        return None, f"{key}_too_long"
    return value, ""


def number_text(value: Any) -> str | None:
    """An int or finite float as text (`27.0` → `27`); None for anything else (bools too)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


class UniqueIds:
    """Unique problem uids for the rows of one file, and a count of the ids it replaced.

    A row's uid is `id_prefix` + its `id` (else `idx`) when that is a string
    (non-blank, at most `MAX_ID_CHARS`) or an integer whose uid no earlier row
    has; otherwise `position_prefix` + its line number (made unique with a
    `~k` suffix in the rare case a row's own id already took that text). The
    reason of each replacement is counted in `stats.replaced_ids`: `null_id`,
    `bad_id` (another type, blank or too long), `duplicate_id`. A file without
    an id column (GSM8K) is identified by row position throughout; that is
    not a replacement and is not counted.
    """

    def __init__(self, stats: DataStats, position_prefix: str, id_prefix: str = ""):
        self.stats, self.position_prefix, self.id_prefix = stats, position_prefix, id_prefix
        self.seen: set[str] = set()

    def assign(self, row: dict[str, Any], lineno: int) -> str:
        """The uid of `row`, read at line `lineno` (0-based) of the file."""
        key = "id" if "id" in row else "idx"
        value = row.get(key)
        text = str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
        if key not in row:
            reason = "no_id"  # identified by position, not counted
        elif value is None:
            reason = "null_id"
        elif not text.strip() or len(text) > MAX_ID_CHARS:
            reason = "bad_id"
        elif (uid := f"{self.id_prefix}{text}") in self.seen:
            reason = "duplicate_id"
        else:
            reason = ""
        if reason:
            if reason != "no_id":
                self.stats.replaced_ids[reason] += 1
            base = uid = f"{self.position_prefix}{lineno}"
            k = 0
            while uid in self.seen:  # at most once per earlier row
                k += 1
                uid = f"{base}~{k}"
        self.seen.add(uid)
        return uid


def load_jsonl(
    path: str | Path,
    question_key: str = "question",
    answer_key: str = "answer",
    answer_format: str = "gsm8k",
    max_rows: int | None = None,
) -> tuple[list[Problem], DataStats]:
    """Read problems from a JSONL file, skipping and counting unusable rows (module doc).

    The answer is a string (a GSM8K solution, or the gold itself for
    `answer_format="plain"`) or, for "plain", a number. Uids: `UniqueIds`,
    the row position written `<file stem>-<line number>`.
    """
    path = Path(path)
    stats = DataStats()
    ids = UniqueIds(stats, position_prefix=f"{path.stem}-")
    problems: list[Problem] = []
    for lineno, row in jsonl_objects(path, stats):
        question, reason = text_field(row, question_key)
        if question is None:
            stats.skipped[reason] += 1
            continue
        value = row.get(answer_key)
        if answer_format != "gsm8k" and number_text(value) is not None:
            answer, reason = number_text(value), ""
        else:
            answer, reason = text_field(row, answer_key)
        if answer is None:
            stats.skipped[reason] += 1
            continue
        gold = gsm8k_gold(answer) if answer_format == "gsm8k" else answer
        if not gold:
            stats.skipped["no_gold_answer"] += 1
            continue
        if len(gold) > MAX_GOLD_CHARS:
            stats.skipped["gold_too_long"] += 1
            continue
        problems.append(Problem(uid=ids.assign(row, lineno), question=question, gold=gold))
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
    """Problems forever, each epoch in a new order; a step never holds the same problem twice.

    Epoch `e` visits every problem exactly once, in the order
    `random.Random(seed * 1_000_003 + e)` shuffles them, except that the
    problems in `deferred` keep their relative order but go to the end. The
    rule: a `take(n)` that crosses from epoch `e` into `e + 1` already holds
    the last `r` problems of epoch `e`; those are epoch `e + 1`'s `deferred`,
    so the `n - r` it then takes from the head of epoch `e + 1` are all other
    problems (there are enough since `n` is at most the number of problems).

    Its position (`epoch`, `index`, `deferred`) is all the state it has, so a
    checkpoint that stores `state()` resumes the exact same sequence (a state
    without `deferred`, written before this rule, reads as none deferred).
    """

    def __init__(
        self,
        problems: list[Problem],
        seed: int,
        epoch: int = 0,
        index: int = 0,
        deferred: Sequence[int] = (),
    ):
        self.problems, self.seed = problems, seed
        self.epoch, self.index, self.deferred = epoch, index, tuple(deferred)
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        order = list(range(len(self.problems)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        last = set(self.deferred)
        return [i for i in order if i not in last] + list(self.deferred)

    def take(self, n: int) -> list[Problem]:
        """The next `n` problems, all different (ValueError if there are fewer than `n`)."""
        if n > len(self.problems):
            raise ValueError(
                f"a step of {n} problems from {len(self.problems)} would repeat a problem"
            )
        out: list[int] = []
        for _ in range(n):
            if self.index == len(self._order):
                self.epoch, self.index, self.deferred = self.epoch + 1, 0, tuple(out)
                self._order = self._epoch_order()
            out.append(self._order[self.index])
            self.index += 1
        return [self.problems[i] for i in out]

    def state(self) -> dict[str, int | list[int]]:
        return {"epoch": self.epoch, "index": self.index, "deferred": list(self.deferred)}
