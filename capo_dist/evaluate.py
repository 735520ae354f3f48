"""Benchmark evaluation of a policy: pass@1 and mean@k per benchmark, scored by the verifier.

`python -m capo_dist.evaluate --model DIR --bench NAME=PATH ... --out DIR` scores a
checkpoint; `evaluate_engine` does the same with a live `GenerationEngine`, so the
trainer can call it every few steps with the rollout engine's current weights.

Benchmark files are JSONL, one problem per line, read by path. The format is
recognised per row:

* question: `problem`, else `question` (a non-null `context`, as in
  OlympiadBench, is put before it);
* gold answer, the first of these keys present:
  - `final_answer`: a list of answers (OlympiadBench), or a string holding the
    repr of one (`"['$2n$']"`, read with `json`/`ast.literal_eval`, never
    `eval`), or a plain string; several answers are joined with ", ";
  - `answer`: a GSM8K solution (`... #### 18` → `18`), a solution with a
    `\\boxed{}` (its last box), a number (AMC: `27.0` → `27`) or a plain
    string (AIME: `025`);
  - `solution`: the last `\\boxed{...}` of the worked solution (Minerva, MATH).

A row that cannot be used (bad JSON, no question, no gold, a gold that cannot be
extracted, and every shape check of `capo_dist.data`: line length, nesting, field
types and lengths, lone surrogates) is skipped and counted by reason
(`DataStats`), never silently dropped and never an exception. Uids are unique
within a file (null, missing and duplicate ids replaced by the row position,
counted).

Metrics per benchmark, every response scored by `Verifier.check_many` (the
trainer's outcome reward):

* `pass@1`: accuracy of the greedy (temperature 0) completion, one per problem;
* `mean@k`: mean accuracy over k completions sampled at `temperature` (the
  unbiased estimate of pass@1 at that temperature);
* `pass@k`: share of problems with at least one correct sample among the k;
* `no_answer`: share of sampled completions with no extractable final answer;
* `truncated`: share of sampled completions cut at `max_new_tokens`.

At temperature 0 the k samples are the greedy completion, so no extra pass runs.
`eval.json` and `eval.md` hold one table per run; `eval_samples.jsonl` every response.
"""

from __future__ import annotations

import argparse
import ast
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from capo_dist.data import (
    MAX_GOLD_CHARS,
    MAX_TEXT_CHARS,
    DataStats,
    UniqueIds,
    gsm8k_gold,
    jsonl_objects,
    number_text,
    text_field,
    valid_unicode,
)
from capo_dist.engines.base import GenerationEngine
from capo_dist.rewards.answers import extract_answer
from capo_dist.rewards.verifier import Verifier, default_verifier
from capo_dist.tokenization import policy_prompt_ids, require_chat_template
from capo_dist.types import Completion, Problem, SamplingSpec

DEFAULT_PROMPT_TEMPLATE = (
    "{question}\nPlease reason step by step, separate steps with a blank line, "
    "and put your final answer within \\boxed{{}}.\n"
)


# ---------------------------------------------------------------- loading


def _scalar_gold(value: Any) -> str | None:
    """A string, int or finite float gold as text (integral floats without '.0')."""
    if isinstance(value, str):
        return value.strip() or None
    return number_text(value)


def _format_gold(value: Any) -> str | None:
    """A gold value as text: a scalar (`_scalar_gold`) or a flat list of them joined with ', '."""
    if isinstance(value, list):
        parts = [_scalar_gold(v) for v in value]  # a nested list is no gold: None
        if not parts or any(p is None for p in parts):
            return None
        return ", ".join(p for p in parts if p is not None)
    return _scalar_gold(value)


def _final_answer_gold(value: Any) -> str | None:
    """OlympiadBench `final_answer`: a list, a string repr of a list, or a plain string.

    A string over `MAX_GOLD_CHARS` is no gold (so the parse below is bounded);
    a repr that does not parse as a literal is no gold either.
    """
    if isinstance(value, str) and len(value) > MAX_GOLD_CHARS:
        return None
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            try:
                value = ast.literal_eval(value)  # literals only; never eval
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                return None
        if not isinstance(value, list):
            return None
    return _format_gold(value)


def _row_gold(row: dict[str, Any]) -> tuple[str | None, str]:
    """(gold answer or None, skip reason) of one benchmark row; every text it reads is a
    string of at most `MAX_TEXT_CHARS` (checked by type before any scan)."""
    if "final_answer" in row:
        return _final_answer_gold(row["final_answer"]), "bad_final_answer"
    if "answer" in row:
        answer = row["answer"]
        if isinstance(answer, str) and len(answer) > MAX_TEXT_CHARS:
            return None, "answer_too_long"
        if isinstance(answer, str) and "####" in answer:
            return gsm8k_gold(answer), "no_gsm8k_answer"
        if isinstance(answer, str) and ("\\boxed" in answer or "\\fbox" in answer):
            return extract_answer(answer), "no_boxed_answer"
        return _format_gold(answer), "bad_answer"
    if "solution" in row:
        solution = row["solution"]
        if isinstance(solution, list):  # several reference solutions: the first
            solution = solution[0] if solution else None
        if not isinstance(solution, str):
            return None, "bad_solution"
        if len(solution) > MAX_TEXT_CHARS:
            return None, "solution_too_long"
        return extract_answer(solution), "no_boxed_in_solution"
    return None, "no_gold_key"


def _bench_question(row: dict[str, Any]) -> tuple[str | None, str]:
    """(the question, "") or (None, skip reason): `problem`, else `question`, after `context`."""
    question, reason = text_field(row, "problem")
    if question is None:
        question, fallback = text_field(row, "question")
        reason = fallback if reason == "missing_problem" else reason
    if question is None:
        return None, "no_question" if reason == "missing_question" else reason
    context, reason = text_field(row, "context")
    if context is None and reason != "missing_context":  # not text, or too long
        return None, reason
    return (f"{context}\n\n{question}" if context else question), ""


def load_bench(path: str | Path, name: str) -> tuple[list[Problem], DataStats]:
    """The problems of a benchmark JSONL file (formats: module doc), and the skip counts.

    Every row is used or skipped and counted (`capo_dist.data`: bounded, typed
    checks). Uids are `<name>-<id>` (the row's `id`/`idx`), else `<name>-<line
    number>`: unique by construction (`capo_dist.data.UniqueIds`), the
    replaced ids counted in `DataStats.replaced_ids`.
    """
    path = Path(path)
    stats = DataStats()
    ids = UniqueIds(stats, position_prefix=f"{name}-", id_prefix=f"{name}-")
    problems: list[Problem] = []
    for lineno, row in jsonl_objects(path, stats):
        question, reason = _bench_question(row)
        if question is None:
            stats.skipped[reason] += 1
            continue
        gold, reason = _row_gold(row)
        if not gold:
            stats.skipped[reason] += 1
            continue
        if len(gold) > MAX_GOLD_CHARS:
            stats.skipped["gold_too_long"] += 1
            continue
        if not valid_unicode(gold):  # a final_answer repr can spell a lone surrogate
            stats.skipped["invalid_unicode"] += 1
            continue
        problems.append(Problem(uid=ids.assign(row, lineno), question=question, gold=gold))
        stats.kept += 1
    return problems, stats


# ---------------------------------------------------------------- scoring


@dataclass(frozen=True)
class BenchScore:
    """The scores of one benchmark (rates in [0, 1]; see the module doc for each)."""

    name: str
    problems: int
    k: int
    pass_at_1: float
    mean_at_k: float
    pass_at_k: float
    no_answer: float
    truncated: float
    mean_tokens: float
    seconds: float


@dataclass
class EvalResult:
    """One evaluation: the settings, a score per benchmark, and every response.

    `skipped` maps a benchmark to its load-time skip counts and `replaced_ids` to
    its counts of row ids replaced by the row position (`DataStats`; both filled
    by whoever loaded the files); `samples` holds one JSON-ready record per problem.
    """

    k: int
    temperature: float
    max_new_tokens: int
    prompt_template: str
    seed: int
    scores: list[BenchScore]
    chat_template: bool = False
    model: str = ""
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)
    replaced_ids: dict[str, dict[str, int]] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)

    def average(self) -> dict[str, float]:
        """Unweighted mean over benchmarks of pass@1, mean@k and pass@k."""
        if not self.scores:
            return {}
        n = len(self.scores)
        return {
            "pass_at_1": sum(s.pass_at_1 for s in self.scores) / n,
            "mean_at_k": sum(s.mean_at_k for s in self.scores) / n,
            "pass_at_k": sum(s.pass_at_k for s in self.scores) / n,
        }

    def as_metrics(self) -> dict[str, float]:
        """Flat figures for `metrics.jsonl`/wandb: `eval/<bench>/pass@1`, `.../mean@k`."""
        out: dict[str, float] = {}
        for s in self.scores:
            out[f"eval/{s.name}/pass@1"] = s.pass_at_1
            out[f"eval/{s.name}/mean@{s.k}"] = s.mean_at_k
            out[f"eval/{s.name}/pass@{s.k}"] = s.pass_at_k
        return out

    def to_json(self) -> dict[str, Any]:
        """The table as a JSON object (what `eval.json` holds)."""
        return {
            "model": self.model,
            "settings": {
                "k": self.k,
                "temperature": self.temperature,
                "max_new_tokens": self.max_new_tokens,
                "prompt_template": self.prompt_template,
                "chat_template": self.chat_template,
                "seed": self.seed,
                "pass@1": "greedy (temperature 0), one completion per problem",
                "mean@k": "mean accuracy over k samples at `temperature`",
            },
            "benches": [asdict(s) for s in self.scores],
            "average": self.average(),
            "skipped": self.skipped,
            "replaced_ids": self.replaced_ids,
        }

    def to_markdown(self) -> str:
        """The table as Markdown (what `eval.md` holds), percentages with one decimal."""
        k = self.k
        lines = [
            f"# Evaluation of `{self.model or 'policy'}`",
            "",
            f"pass@1: greedy; mean@{k} / pass@{k}: {k} samples at temperature "
            f"{self.temperature:g}; max_new_tokens {self.max_new_tokens}; seed {self.seed}.",
            "",
            f"| bench | problems | pass@1 | mean@{k} | pass@{k} | no answer | truncated "
            "| mean tokens | skipped rows |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s in self.scores:
            skipped = sum(self.skipped.get(s.name, {}).values())
            lines.append(
                f"| {s.name} | {s.problems} | {_pct(s.pass_at_1)} | {_pct(s.mean_at_k)} "
                f"| {_pct(s.pass_at_k)} | {_pct(s.no_answer)} | {_pct(s.truncated)} "
                f"| {s.mean_tokens:.0f} | {skipped} |"
            )
        if len(self.scores) > 1:
            avg = self.average()
            lines.append(
                f"| **average** | | {_pct(avg['pass_at_1'])} | {_pct(avg['mean_at_k'])} "
                f"| {_pct(avg['pass_at_k'])} | | | | |"
            )
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str | Path) -> Path:
        """Write `eval.json`, `eval.md` and `eval_samples.jsonl` into `out_dir`."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(self.to_json(), indent=2) + "\n")
        (out / "eval.md").write_text(self.to_markdown())
        with open(out / "eval_samples.jsonl", "w", encoding="utf-8") as f:
            for record in self.samples:
                f.write(json.dumps(record) + "\n")
        return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _generate(
    engine: GenerationEngine, prompts: list[list[int]], spec: SamplingSpec, batch_size: int
) -> list[list[Completion]]:
    out: list[list[Completion]] = []
    for i in range(0, len(prompts), batch_size):
        out.extend(engine.generate(prompts[i : i + batch_size], spec))
    return out


def evaluate_engine(
    engine: GenerationEngine,
    benches: dict[str, Sequence[Problem]],
    k: int = 4,
    temperature: float = 0.6,
    max_new_tokens: int = 1024,
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
    *,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
    verifier: Verifier | None = None,
    chat_template: bool = False,
) -> EvalResult:
    """Score `engine` on every benchmark: a greedy pass (pass@1) and k samples (mean@k).

    Prompts are `prompt_template.format(question=...)` tokenised by the engine's
    tokenizer, as one user message through its chat template when `chat_template`
    (the rollout workers' recipe: `policy_prompt_ids`). `batch_size` prompts go to the engine
    per call. `verifier` defaults to the shared one (a script using it needs an
    `if __name__ == "__main__":` guard: its worker pool is forkserver).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    verifier = verifier or default_verifier()
    tok = engine.tokenizer()
    scores: list[BenchScore] = []
    records: list[dict[str, Any]] = []
    for b, (name, problems) in enumerate(benches.items()):
        start = time.perf_counter()
        problems = list(problems)
        prompts = [
            policy_prompt_ids(tok, prompt_template, p.question, chat_template) for p in problems
        ]
        sample_seed = seed * 1_000_003 + 2 * b
        sampled = _generate(
            engine,
            prompts,
            SamplingSpec(
                n=k,
                max_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=sample_seed,
            ),
            batch_size,
        )
        if temperature == 0:
            greedy = [c[0] for c in sampled]
        else:
            spec = SamplingSpec(
                n=1, max_tokens=max_new_tokens, temperature=0.0, seed=sample_seed + 1
            )
            greedy = [c[0] for c in _generate(engine, prompts, spec, batch_size)]
        texts = [c.text for c in greedy] + [c.text for cs in sampled for c in cs]
        golds = [p.gold for p in problems] + [p.gold for p in problems for _ in range(k)]
        verdicts = verifier.check_many(texts, golds)
        greedy_ok, sample_ok = verdicts[: len(problems)], verdicts[len(problems) :]
        flat = [c for cs in sampled for c in cs]
        n, m = max(len(problems), 1), max(len(flat), 1)
        scores.append(
            BenchScore(
                name=name,
                problems=len(problems),
                k=k,
                pass_at_1=sum(greedy_ok) / n,
                mean_at_k=sum(sample_ok) / m,
                pass_at_k=sum(any(sample_ok[i * k : (i + 1) * k]) for i in range(len(problems)))
                / n,
                no_answer=sum(extract_answer(c.text) is None for c in flat) / m,
                truncated=sum(c.finish_reason == "length" for c in flat) / m,
                mean_tokens=sum(len(c.token_ids) for c in flat) / m,
                seconds=time.perf_counter() - start,
            )
        )
        for i, p in enumerate(problems):
            records.append(
                {
                    "bench": name,
                    "uid": p.uid,
                    "question": p.question,
                    "gold": p.gold,
                    "prompt": tok.decode(prompts[i], skip_special_tokens=False),
                    "greedy": {"response": greedy[i].text, "correct": greedy_ok[i]},
                    "samples": [
                        {"response": c.text, "correct": sample_ok[i * k + j]}
                        for j, c in enumerate(sampled[i])
                    ],
                }
            )
    return EvalResult(
        k=k,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        prompt_template=prompt_template,
        seed=seed,
        scores=scores,
        chat_template=chat_template,
        samples=records,
    )


# ---------------------------------------------------------------- CLI


def _bench_arg(value: str) -> tuple[str, Path]:
    """`NAME=PATH`, or a bare PATH named after its folder (`bench/aime24/test.jsonl` → aime24)."""
    name, sep, path = value.partition("=")
    if not sep:
        p = Path(value)
        return (p.parent.name if p.stem in ("test", "train", "validation") else p.stem), p
    if not name or not path:
        raise argparse.ArgumentTypeError(f"--bench expects NAME=PATH, got {value!r}")
    return name, Path(path)


def main(argv: Sequence[str] | None = None) -> EvalResult:
    """The CLI: load the model and the benchmark files, score, write the tables."""
    parser = argparse.ArgumentParser(
        prog="python -m capo_dist.evaluate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", required=True, help="HF checkpoint directory (or hub id)")
    parser.add_argument("--backend", choices=("vllm", "hf"), default="vllm")
    parser.add_argument(
        "--bench",
        type=_bench_arg,
        action="append",
        required=True,
        metavar="NAME=PATH",
        help="a benchmark JSONL file (repeatable)",
    )
    parser.add_argument("--k", type=int, default=4, help="samples per problem for mean@k")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--limit", type=int, default=None, help="first N problems per bench")
    parser.add_argument("--prompt-template", default=DEFAULT_PROMPT_TEMPLATE)
    parser.add_argument(
        "--chat-template",
        action="store_true",
        help="send each prompt as one user message through the model's chat template "
        "(instruct models; the training run's data.chat_template)",
    )
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=256, help="prompts per engine call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, type=Path, help="directory for eval.json/eval.md")
    args = parser.parse_args(argv)

    benches: dict[str, list[Problem]] = {}
    skipped: dict[str, dict[str, int]] = {}
    replaced_ids: dict[str, dict[str, int]] = {}
    for name, path in args.bench:
        problems, stats = load_bench(path, name)
        print(f"[evaluate] {name}: {stats.summary()}")
        if not problems:
            parser.error(f"{path} has no usable rows ({stats.summary()})")
        benches[name] = problems[: args.limit] if args.limit else problems
        skipped[name] = dict(stats.skipped)
        replaced_ids[name] = dict(stats.replaced_ids)

    import torch

    from capo_dist.engines import make_engine

    if args.chat_template:  # before the engine loads the model
        from transformers import AutoTokenizer

        require_chat_template(
            AutoTokenizer.from_pretrained(args.model), args.model, "--chat-template"
        )
    dtype = args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    engine = make_engine(
        args.backend,
        args.model,
        dtype=dtype,
        seed=args.seed,
        tensor_parallel_size=args.tensor_parallel_size,
        max_model_len=args.max_model_len,
    )
    with Verifier() as verifier:
        result = evaluate_engine(
            engine,
            benches,
            k=args.k,
            temperature=args.temperature,
            max_new_tokens=args.max_new_tokens,
            prompt_template=args.prompt_template,
            chat_template=args.chat_template,
            top_p=args.top_p,
            seed=args.seed,
            batch_size=args.batch_size,
            verifier=verifier,
        )
    result.model = args.model
    result.skipped = skipped
    result.replaced_ids = replaced_ids
    out = result.write(args.out)
    print(result.to_markdown())
    print(f"[evaluate] wrote {out / 'eval.json'} and {out / 'eval.md'}")
    return result


if __name__ == "__main__":
    main()
