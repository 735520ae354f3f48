"""Make the training file the experiments read: one `{"problem", "answer"}` object per line.

`python -m capo_dist.prepare_data --source SRC [--source SRC ...] --out /data/math/train.jsonl`

The paper experiments read `data.path` with `question_key=problem`,
`answer_key=answer`, `answer_format=plain` (the field is the gold answer). This
command produces that file from:

* MATH-style rows: a question and a worked solution whose LAST `\\boxed{...}`
  (balanced braces, `capo_dist.rewards.answers.last_boxed`) holds the answer;
* GSM8K-style rows: a question and a solution ending `#### <answer>`
  (`capo_dist.data.gsm8k_gold`).

`--format auto` (the default) decides per row: a solution with `####` is GSM8K,
one with a box is MATH. The question is `--question-key`, else `problem`, else
`question`; the solution is `--solution-key`, else `solution` (MATH, auto when
present), else `answer`.

A source is a JSONL file, a directory of them, or a Hugging Face dataset id
(`ORG/NAME`, optionally `ORG/NAME/SUBDIR` to pick one subset) resolved through
the Hugging Face cache with `huggingface_hub.snapshot_download` (which honours
`HF_HUB_OFFLINE=1`: then only the cache is read). In a directory or dataset the
files of `--split` are read: those named `<split>.jsonl`, `<split>-*.jsonl`, or
under a folder named `<split>`. Parquet files are not supported: this package
does not depend on pyarrow (convert them to JSONL first).

Unusable rows are skipped and counted per reason (with the shape checks of
`capo_dist.data`: line length, nesting, field types and lengths, lone
surrogates; a row never raises); the counts are printed. The
output is written to a temporary file beside `--out` and renamed into place, so
a crash never leaves a half-written training file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from capo_dist.data import (
    MAX_GOLD_CHARS,
    DataError,
    DataStats,
    gsm8k_gold,
    jsonl_objects,
    text_field,
)
from capo_dist.rewards.answers import last_boxed

FORMATS = ("auto", "math", "gsm8k")
DATA_SUFFIXES = (".jsonl", ".parquet")
_DATASET_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w./-]+)?$")


@dataclass(frozen=True)
class PreparedRow:
    """One training problem as the experiments read it."""

    problem: str
    answer: str


@dataclass(frozen=True)
class RowFormat:
    """How to read a source's rows: the answer convention and the field names (None: default)."""

    format: str = "auto"
    question_key: str | None = None
    solution_key: str | None = None


def _question(row: dict, key: str | None) -> tuple[str | None, str]:
    """(the question, "") or (None, skip reason): `key`, else `problem`, else `question`."""
    unusable = ""  # the first field present but not usable text (wrong type, too long)
    for k in (key,) if key else ("problem", "question"):
        value, why = text_field(row, k)
        if value is not None:
            return value, ""
        if not unusable and not why.startswith("missing_"):
            unusable = why
    return None, unusable or f"no_{key or 'problem_or_question'}"


def _solution_key(row: dict, fmt: RowFormat) -> str:
    if fmt.solution_key:
        return fmt.solution_key
    if fmt.format == "gsm8k":
        return "answer"
    if fmt.format == "math" or "solution" in row:
        return "solution"
    return "answer"


def prepare_row(row: dict, fmt: RowFormat) -> tuple[PreparedRow | None, str]:
    """(the row as a training problem, "") or (None, why it was skipped)."""
    question, reason = _question(row, fmt.question_key)
    if question is None:
        return None, reason
    key = _solution_key(row, fmt)
    if key not in row and not fmt.solution_key and fmt.format == "auto":
        return None, "no_solution_or_answer"
    solution, reason = text_field(row, key)
    if solution is None:
        return None, f"no_{key}" if reason == f"missing_{key}" else reason
    kind = fmt.format
    if kind == "auto":
        if "####" in solution:
            kind = "gsm8k"
        elif "\\boxed" in solution or "\\fbox" in solution:
            kind = "math"
        else:
            return None, "no_boxed_or_gsm8k_answer"
    if kind == "gsm8k":
        answer = gsm8k_gold(solution)
        reason = "no_gsm8k_answer"
    else:
        answer = last_boxed(solution)
        reason = "no_boxed_answer"
    answer = answer.strip() if answer else None
    if not answer:
        return None, reason
    if len(answer) > MAX_GOLD_CHARS:
        return None, "answer_too_long"
    return PreparedRow(problem=question, answer=answer), ""


# ---------------------------------------------------------------- sources


def _split_files(root: Path, split: str) -> list[Path]:
    """The data files of `split` under `root` (one folder's shards; several folders: error)."""
    found = sorted(p for p in root.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file())
    if not found:
        raise DataError(f"{root} holds no {' or '.join(DATA_SUFFIXES)} file")

    def of_split(p: Path) -> bool:
        stem = p.name.split(".")[0]
        return (
            stem == split or stem.startswith(f"{split}-") or split in p.relative_to(root).parts[:-1]
        )

    files = [p for p in found if of_split(p)]
    if not files:
        names = ", ".join(str(p.relative_to(root)) for p in found[:10])
        raise DataError(f"{root} has no file of split {split!r} (found: {names}); set --split")
    folders = sorted({str(p.parent.relative_to(root)) for p in files})
    if len(folders) > 1:
        raise DataError(
            f"{root} has split {split!r} in several subsets ({', '.join(folders)}); name one, "
            f"e.g. --source {root}/{folders[0]} (or ORG/NAME/{folders[0]} for a dataset id)"
        )
    return files


def _dataset_dir(source: str) -> Path:
    """The cached snapshot of dataset `ORG/NAME[/SUBDIR]` (downloaded unless HF_HUB_OFFLINE=1)."""
    from huggingface_hub import snapshot_download

    org, name, *sub = source.split("/")
    repo_id = f"{org}/{name}"
    try:
        root = Path(snapshot_download(repo_id, repo_type="dataset"))
    except (OSError, ValueError) as e:
        raise DataError(
            f"dataset {repo_id!r} could not be resolved through the Hugging Face cache "
            f"({type(e).__name__}: {str(e).splitlines()[0]}); download it first "
            f"(`hf download {repo_id} --repo-type dataset`, without HF_HUB_OFFLINE=1), or pass "
            "a file path"
        ) from e
    path = root.joinpath(*sub)
    if not path.exists():
        raise DataError(f"dataset {repo_id!r} has no {'/'.join(sub)!r} (snapshot {root})")
    return path


def source_files(source: str, split: str) -> list[Path]:
    """The files a `--source` stands for: a file, a directory's split, a dataset id's split."""
    path = Path(source)
    if not path.exists():
        if not _DATASET_ID.match(source):
            raise DataError(f"--source {source!r} is neither a file, a directory nor ORG/NAME")
        path = _dataset_dir(source)
    files = [path] if path.is_file() else _split_files(path, split)
    for f in files:
        if f.suffix == ".parquet":
            raise DataError(
                f"{f} is parquet, which is not supported (this package does not depend on "
                "pyarrow); convert it to JSONL first, e.g. with pandas: "
                "pd.read_parquet(f).to_json(out, orient='records', lines=True)"
            )
    return files


def read_source(files: Sequence[Path], fmt: RowFormat, stats: DataStats) -> Iterator[PreparedRow]:
    """The usable rows of `files`, in order; the others counted in `stats` by reason."""
    for path in files:
        for _, row in jsonl_objects(path, stats):
            prepared, reason = prepare_row(row, fmt)
            if prepared is None:
                stats.skipped[reason] += 1
                continue
            stats.kept += 1
            yield prepared


def write_jsonl_atomic(rows: Sequence[PreparedRow], out: Path) -> None:
    """Write `rows` to `out` through a temporary file in the same folder and a rename."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps({"problem": r.problem, "answer": r.answer}) + "\n")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; returns the number of problems written."""
    parser = argparse.ArgumentParser(
        prog="python -m capo_dist.prepare_data", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--source",
        action="append",
        required=True,
        help="a JSONL file, a directory, or a dataset id ORG/NAME[/SUBDIR] (repeatable)",
    )
    parser.add_argument("--format", choices=FORMATS, default="auto", help="answer convention")
    parser.add_argument("--split", default="train", help="split read from directories and ids")
    parser.add_argument("--question-key", default=None, help="default: problem, else question")
    parser.add_argument(
        "--solution-key", default=None, help="default: solution (MATH), else answer (GSM8K)"
    )
    parser.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    parser.add_argument("--limit", type=int, default=None, help="write at most N problems")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")

    fmt = RowFormat(args.format, args.question_key, args.solution_key)
    rows: list[PreparedRow] = []
    try:
        for source in args.source:
            stats = DataStats()
            files = source_files(source, args.split)
            for row in read_source(files, fmt, stats):
                rows.append(row)
                if args.limit is not None and len(rows) >= args.limit:
                    break
            print(f"[prepare_data] {source}: {stats.summary()}")
            if args.limit is not None and len(rows) >= args.limit:
                break
    except DataError as e:
        parser.exit(2, f"prepare_data: error: {e}\n")
    if not rows:
        parser.exit(
            2,
            "prepare_data: error: no usable rows; check --format, --question-key and "
            "--solution-key against the source's fields\n",
        )
    write_jsonl_atomic(rows, args.out)
    print(f"[prepare_data] wrote {len(rows)} problems to {args.out}")
    return len(rows)


if __name__ == "__main__":
    main()
