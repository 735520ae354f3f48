"""Every command README.md shows is run by a test, so a newcomer's copy-paste cannot break
unseen; every test README.md names exists.

The README's commands (the lines of its shell code blocks, and inline `code` that starts
with a command such as `python`, `make`, `export`) must each be in `REGISTRY`: either the
tests that run it — exactly as written, or as written with quick arguments appended, which
`tests.runs.readme_argv` does — or `NotRun` with the reason, so that every gap is listed
here. These checks read README.md and the test files' source; they import no test module.
"""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
from dataclasses import dataclass
from functools import cache

import pytest

from tests.conftest import REPO

README = REPO / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}
# First words that make an inline `code` span a command (after any VAR=value prefixes).
COMMAND_WORDS = {"python", "python3", "make", "bash", "sh", "export", "pip", "ray", "wandb"}
COMMAND_WORDS |= {"sbatch", "srun", "docker", "kubectl", "hf", "git", "cd", "source"}
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=\S*")
TEST_REF = re.compile(r"`(tests/[^`\s]+?\.py)((?:::[^`\s]+)?)`")


@dataclass(frozen=True)
class RunBy:
    """Run by these tests (`path::function` node ids): as written, or as written with quick
    arguments appended (`how` says which); `text` is what the tests' source must contain
    when not the command itself (a README placeholder such as `DIR`)."""

    tests: tuple[str, ...]
    how: str = "as written"
    text: str | None = None


@dataclass(frozen=True)
class NotRun:
    """Shown in the README, run by no test: why, and what tests the nearest thing."""

    reason: str


TRAIN_CPU = "tests/integration/test_train_cpu.py::"
CFG_JOB = "tests/test_config.py::test_cfg_job_prints_without_starting_anything"
REHEARSAL = "tests/integration/test_rehearsal.py::test_every_step_logged_with_a_real_gradient"
MAKE = "tests/test_readme_commands.py::test_make_and_make_lint_run_as_written"

REGISTRY: dict[str, RunBy | NotRun] = {
    "make run": RunBy(
        (TRAIN_CPU + "test_symbolic_judge_vllm_rollout_two_steps_async",),
        'quick: make run ARGS="model.warm_start=false trainer.total_steps=2 ..." (the warm '
        "start takes 3-6 min; tests/test_warmstart.py builds a small one)",
    ),
    'make run ARGS="..."': RunBy(
        (TRAIN_CPU + "test_symbolic_judge_vllm_rollout_two_steps_async",),
        "with the test's overrides as ARGS",
        text="make run",
    ),
    "make test": NotRun("the suite itself: .ci/run runs it"),
    "make": RunBy((MAKE,)),
    "make lint": RunBy((MAKE,)),
    "make bench": RunBy(
        ("tests/test_benchmarks_smoke.py::test_run_all_quick_on_the_cheapest_benchmark",),
        'quick: make bench ARGS="--quick --only reward_pipeline --out <tmp>" (all of it: 8.5 min)',
    ),
    "make rehearse": RunBy(
        (REHEARSAL,),
        "quick: one of its four experiments (EXPERIMENTS=llama3b_intersection), ARGS point its "
        "caches and output at the test's directories",
    ),
    "python -m capo_dist.launch": RunBy(
        (
            TRAIN_CPU + "test_grpo_baseline_skips_the_judge",
            TRAIN_CPU + "test_model_judge_backends",
        ),
        "as the start of the README lines below, with quick overrides appended",
    ),
    "python -m capo_dist.launch trainer.total_steps=10 capo.vote=majority": RunBy(
        (TRAIN_CPU + "test_model_judge_backends",),
        "quick overrides appended (trainer.total_steps=1 wins, a tiny model, a model judge)",
    ),
    "python -m capo_dist.launch capo.w_process=0": RunBy(
        (TRAIN_CPU + "test_grpo_baseline_skips_the_judge",), "quick overrides appended"
    ),
    "python -m capo_dist.launch -m capo.vote=intersection,majority,union,average": RunBy(
        (TRAIN_CPU + "test_sweep_two_vote_modes",),
        "capo.vote=intersection,majority appended (Hydra keeps a key's last value): 2 of its 4 "
        "jobs run, each an end-to-end run the suite's budget has no room for",
    ),
    "python -m capo_dist.launch +experiment=llama3b_intersection --cfg job": RunBy((CFG_JOB,)),
    "python -m capo_dist.launch +experiment=llama3b_intersection +rehearsal=cpu": RunBy(
        (REHEARSAL,),
        "through make rehearse, whose recipe is this line with the test's ARGS appended",
    ),
    "python -m capo_dist.launch +experiment=llama3b_intersection": RunBy(
        (CFG_JOB,),
        "--cfg job appended: the config composes; the run itself needs the 16-GPU cluster",
    ),
    "python -m capo_dist.launch +experiment=llama3b_intersection ray.address=auto": RunBy(
        (CFG_JOB,),
        "--cfg job appended: the config composes; the run itself needs the GPU cluster",
    ),
    "export CAPO_TRAIN_DATA=/data/math/train.jsonl": NotRun(
        "the cluster's storage path, which the experiments read (${oc.env:CAPO_TRAIN_DATA}); "
        "tests/integration/test_rehearsal.py sets the variable for its run"
    ),
    "python -m capo_dist.prepare_data --source /data/raw/MATH/train.jsonl --source "
    "../shared/data/gsm8k/train.jsonl --out $CAPO_TRAIN_DATA": NotRun(
        "reads /data/raw/MATH and writes /data/math, the cluster's paths; "
        "tests/test_prepare_data.py::test_sources_concatenate runs the same form (a MATH-format "
        "--source, then ../shared/data/gsm8k/train.jsonl, --out) in-process"
    ),
    "python -m capo_dist.prepare_data": RunBy(
        ("tests/test_prepare_data.py::test_dataset_id_through_the_hf_cache",),
        "with --source/--out appended",
    ),
    "python -m capo_dist.experiments.arith sft": RunBy(
        ("tests/test_warmstart.py::test_build_is_deterministic",),
        "quick: tiny sizes appended (--steps 3 ...), --out-dir the test's directory",
    ),
    "python -m capo_dist.evaluate --model DIR --backend vllm --bench "
    "gsm8k=../shared/data/gsm8k/test.jsonl --bench ../shared/data/bench/aime24/test.jsonl "
    "--k 4 --temperature 0.6 --max-new-tokens 3000 --out evals/step500": RunBy(
        ("tests/test_evaluate.py::test_cli",),
        "DIR = a tiny model; quick flags appended (--k 2 --max-new-tokens 6 --limit 2, one "
        "more --bench, --out <tmp>, --backend hf: vLLM's start costs ~40 s more)",
    ),
    "python -m capo_dist.judge_eval --backend symbolic --flip-prob 0.2 --num-critiques 4 "
    "--out outputs/judge_eval/symbolic.json": RunBy(
        ("tests/test_judge_eval.py::test_readme_line_runs_as_written",),
        "quick: --size 200 --out <tmp> appended (the README's table: the default 4,000)",
    ),
    "python -m capo_dist.judge_eval --backend vllm --model-path Qwen/Qwen2.5-72B-Instruct "
    "--tensor-parallel-size 4 --data processbench_math.jsonl --num-critiques 4 "
    "--out outputs/judge_eval/qwen72b.json": NotRun(
        "a 72B judge on 4 GPUs and a ProcessBench export; the same evaluator runs in "
        "tests/test_judge_eval.py (symbolic and OpenAI-compatible backends, a ProcessBench "
        "file by path)"
    ),
    "python -m capo_dist.judge_eval --backend openai --base-url http://127.0.0.1:8000/v1 "
    "--model Qwen/Qwen2.5-72B-Instruct --prompt first_error --data processbench_math.jsonl "
    "--num-critiques 4 --out outputs/judge_eval/api.json": NotRun(
        "needs a served judge model and a ProcessBench export; "
        "tests/test_judge_eval.py::test_openai_judge_with_the_json_prompt runs the same "
        "backend against a loopback OpenAI-compatible endpoint on a ProcessBench-format file"
    ),
    "python -m capo_dist.report outputs/<name>/<time>": RunBy(
        ("tests/test_report.py::test_report_page_structure_without_a_browser",),
        "the placeholder = the test's run directory",
    ),
    "python -m benchmarks.capo_vs_grpo": RunBy(
        ("tests/test_capo_vs_grpo.py::test_quick_experiment_runs_and_its_figures_are_sane",),
        "quick: --quick appended (all of it: 76 min)",
    ),
    'pip install -c constraints-gpu.txt torch==2.13.0 -e ".[gpu]"': NotRun(
        "installs the CUDA build (several GB) for GPU nodes; `make check-gpu-deps` resolves it"
    ),
    "make check-gpu-deps": NotRun(
        "resolves the GPU environment against PyPI: network, and ~3.5 GB of wheels where the "
        "index serves no metadata; run by hand (64 s here)"
    ),
    "make mutation": NotRun(
        "mutmut over capo_dist/rewards/: 1,800 mutants, each against tests/rewards/ (~45 min "
        "on 2 cores); outside CI by design, its figure is in the README"
    ),
    "make gpu-constraints": NotRun("as make check-gpu-deps: PyPI, by hand after pyproject edits"),
    "wandb sync": NotRun("uploads to wandb.ai: network and an account"),
    "wandb login": NotRun(
        "needs a wandb.ai account; tests/test_config.py checks that the netrc it writes is found"
    ),
    "ray up": NotRun("starts a cloud cluster; tests/test_launch_files.py checks its YAML"),
    "ray job submit": NotRun(
        "needs a running cluster; tests/test_launch_files.py checks the files"
    ),
    "EXPERIMENT=... sbatch launch/slurm.sbatch": NotRun(
        "needs Slurm; tests/test_launch_files.py checks the script (bash -n, shellcheck, its "
        "launch line)"
    ),
}


def _is_command(span: str) -> bool:
    words = span.split()
    while words and ASSIGNMENT.fullmatch(words[0]):
        words = words[1:]
    return bool(words) and words[0] in COMMAND_WORDS


def readme_commands(markdown: str) -> list[str]:
    """The commands a reader can copy from `markdown`, in order, each once: every line of a
    shell code block (comments dropped), and inline code that starts with a command word."""
    found = []
    for lang, body in FENCE.findall(markdown):
        if lang in SHELL_BLOCKS:
            lines = (re.sub(r"(^|\s)#.*$", "", line).strip() for line in body.splitlines())
            found += [line for line in lines if line]
    for span in re.findall(r"`([^`\n]+)`", FENCE.sub("", markdown)):
        if _is_command(span.strip()):
            found.append(span.strip())
    return list(dict.fromkeys(found))


@cache
def _module(path: str) -> ast.Module:
    return ast.parse((REPO / path).read_text())


def _defines(path: str, name: str) -> bool:
    """Whether the test file at `path` defines `name` (`function` or `Class::method`)."""
    scope: list[ast.stmt] = _module(path).body
    *classes, func = name.split("[", 1)[0].split("::")
    for cls in classes:
        found = [n for n in scope if isinstance(n, ast.ClassDef) and n.name == cls]
        if not found:
            return False
        scope = found[0].body
    return any(
        isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == func for n in scope
    )


def _strings(path: str) -> str:
    """The test file's string constants in source order, joined by spaces: an argv written
    as a list of strings reads as the command line it runs."""
    nodes = [
        n
        for n in ast.walk(_module(path))
        if isinstance(n, ast.Constant) and isinstance(n.value, str)
    ]
    nodes.sort(key=lambda n: (n.lineno, n.col_offset))
    return " ".join(" ".join(n.value.split()) for n in nodes)


def _as_run(command: str) -> str:
    """The command as a test's source holds it: without the leading `python`, which the
    test replaces by its interpreter."""
    words = shlex.split(command)
    return " ".join(words[1:] if words[0] == "python" else words)


def test_every_readme_command_is_registered():
    commands = readme_commands(README.read_text())
    missing = [c for c in commands if c not in REGISTRY]
    assert not missing, (
        f"README.md shows commands no test is registered to run: {missing}. Add each to "
        "REGISTRY in tests/test_readme_commands.py with the tests that run it exactly as "
        "written (quick arguments appended, through tests.runs.readme_argv), or "
        "NotRun('why') if no test can; if the README line is wrong, fix the README."
    )
    stale = [c for c in REGISTRY if c not in commands]
    assert not stale, f"REGISTRY lists commands README.md no longer shows: {stale}; remove them"


@pytest.mark.parametrize(
    "command", [c for c, entry in REGISTRY.items() if isinstance(entry, RunBy)]
)
def test_registered_tests_exist_and_hold_the_command(command):
    entry = REGISTRY[command]
    for node in entry.tests:
        path, name = node.split("::", 1)
        assert (REPO / path).is_file(), f"{node}: no file {path}"
        assert _defines(path, name), f"{node}: {path} defines no {name}"
        text = entry.text or _as_run(command)
        assert text in _strings(path), (
            f"{path} does not hold the README command {command!r} (as {text!r}): run it "
            "through tests.runs.readme_argv(<the command as the README writes it>, ...)"
        )


def test_test_node_ids_named_in_the_readme_exist():
    refs = TEST_REF.findall(README.read_text())
    assert refs, "README.md names no tests/ file: has the reliability table moved?"
    for path, name in refs:
        assert (REPO / path).is_file(), f"README.md names {path}{name}: no such file"
        if name:
            assert _defines(path, name[2:]), (
                f"README.md names {path}{name}: {path} has no {name[2:]}"
            )


def test_the_parser_finds_blocks_and_inline_commands():
    text = (
        "Run `make run` or `EXPERIMENT=x sbatch a.sbatch`; keys like `ray.address=auto` and\n"
        "calls like `torch.load(x)` are not commands.\n\n"
        "```bash\nmake test   # comment\n# only a comment\n\npython -m a b=1\n```\n\n"
        "```\ncapo_dist/  not a shell block\n```\n"
    )
    assert readme_commands(text) == [
        "make test",
        "python -m a b=1",
        "make run",
        "EXPERIMENT=x sbatch a.sbatch",
    ]


def test_make_and_make_lint_run_as_written():
    """`make` (installs what is missing: a no-op on an installed checkout) and `make lint`."""
    if not (REPO / ".venv" / "bin" / "python").exists():
        pytest.skip("no .venv: `make test` creates it (here `make` would install everything)")
    for command in ("make", "make lint"):
        proc = subprocess.run(
            shlex.split(command), cwd=REPO, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, f"{command}: {(proc.stdout + proc.stderr)[-3000:]}"
