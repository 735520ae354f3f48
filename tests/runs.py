"""Helpers for end-to-end runs: compose the real Hydra config of a fast CPU run, or launch a
README command as a user types it; read its metrics."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from capo_dist.config import RunConfig

REPO = Path(__file__).resolve().parents[1]
CONF = str(REPO / "conf")

# Small and fast on 2 cores; everything else is the tiny_cpu default.
FAST = [
    "model.warm_start=false",  # a random tiny policy: no SFT build in the test suite
    "trainer.total_steps=1",
    "rollout.prompts_per_step=4",
    "rollout.samples_per_prompt=2",
    "rollout.max_new_tokens=24",
    "capo.num_critiques=2",
    "judge.max_tokens=16",
]


def compose_run(run_dir: Path, build_dir: Path, *overrides: str) -> RunConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        dcfg = compose("config", overrides=[*FAST, f"model.build_dir={build_dir}", *overrides])
    dcfg.run_dir = str(run_dir)
    return OmegaConf.to_object(dcfg)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def readme_argv(command: str, *quick: str) -> list[str]:
    """The argv of a command shown in README.md, as a shell runs it from the repo root, with
    `quick` arguments appended: `python` is this interpreter (the project's venv), and a
    `make` target takes them as ARGS (the README's `make run ARGS="..."`)."""
    argv = shlex.split(command)
    if argv[0] == "python":
        argv[0] = sys.executable
    if argv[0] == "make":
        return [*argv, f"ARGS={' '.join(quick)}"] if quick else argv
    return [*argv, *quick]


def launch(
    command: str,
    run_dir: Path,
    build_dir: Path,
    *overrides: str,
    timeout: int = 600,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run a README training command (`python -m capo_dist.launch ...` or `make run`) with the
    fast settings appended, into `run_dir`; with `check`, fails the test with the output's
    tail if the command fails."""
    quick = [*FAST, f"model.build_dir={build_dir}", f"hydra.run.dir={run_dir}", *overrides]
    proc = subprocess.run(
        readme_argv(command, *quick), cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    if check:
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc
