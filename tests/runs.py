"""Helpers for end-to-end runs: compose the real Hydra config of a fast CPU run, or launch a
README command as a user types it; read its metrics."""

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import ray
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from capo_dist.config import RunConfig
from capo_dist.models import TinyModelSpec
from capo_dist.trainer import Trainer
from capo_dist.warmstart import WarmStartConfig

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

# The policy of the runs that must learn something (tests/conftest.py `warm_policy`): the
# tiny policy SFT-warm-started briefly (capo_dist.warmstart), so it writes step-format
# solutions, gets some answers right and some steps wrong. A random policy never answers:
# every reward, advantage and gradient is zero and a test cannot tell trained from untrained
# weights. Build: ~50 s of CPU on one thread, no held-out evaluation. Measured on 96 of the
# tests' problems, 2 samples each, 48 new tokens: accuracy 0.20, 23 % of 2-sample groups
# mixed, 79 % of responses with a wrong step, 4 % cut off (300 steps: accuracy 0.14; the
# 1800-step default: 0.37 but ~3 min).
WARM_START = WarmStartConfig(train_size=2000, steps=500, eval_size=0, spec=TinyModelSpec())


def learning(policy: Path) -> list[str]:
    """Overrides (after FAST) of a run that trains with a non-zero gradient: the warm-started
    `policy`, room to finish an answer, and a noisy symbolic judge (its verdicts flipped at
    random: the judge's RNG is part of the run's state, and penalties vary within a group)."""
    return [f"model.path={policy}", "rollout.max_new_tokens=48", "judge.flip_prob=0.2"]


# Outcome reward alone (GRPO, or a judge that abstains): enough groups of enough samples
# that one holds a right and a wrong answer (the policy answers ~20 % right at 48 tokens:
# a group of 4 is mixed with p ~0.6, one of 6 such groups with p > 0.99).
OUTCOME_ONLY = ["rollout.prompts_per_step=6", "rollout.samples_per_prompt=4"]


def compose_run(run_dir: Path, build_dir: Path, *overrides: str) -> RunConfig:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        dcfg = compose("config", overrides=[*FAST, f"model.build_dir={build_dir}", *overrides])
    dcfg.run_dir = str(run_dir)
    return OmegaConf.to_object(dcfg)


def read_metrics(run_dir: Path) -> list[dict]:
    """Every row of `metrics.jsonl`, in order (a step logged twice appears twice)."""
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


def pid_of(actor) -> int:
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


class FaultyTrainer(Trainer):
    """The real Trainer, with processes SIGKILLed at chosen points (fault injection only)."""

    kill_workers_at_collect: int | None = None  # kill when step N's collection is submitted
    kill_worker_index: int = 0  # which rollout and judge worker (index modulo their count)
    killed_chunks: set[int] | None = None  # the chunks in flight on the killed workers
    # Kill learner rank 1 when the driver calls this learner-group method in step N
    # (save_checkpoint: after step N's row is logged, while checkpoint N is written).
    kill_learner_at: tuple[str, int] | None = None

    def _collect(self):
        pids = []
        if self.kill_workers_at_collect == self.step + 1:
            i = self.kill_worker_index
            pids = [pid_of(self.rollout[i % len(self.rollout)])]
            pids += [pid_of(self.judges[i % len(self.judges)])] if self.judges else []
        pending = super()._collect()
        for pid in pids:  # the chunks are queued or running on these actors now
            os.kill(pid, signal.SIGKILL)
        if pids:
            self.kill_workers_at_collect = None
            # The chunks the kill loses: those sampled by the killed rollout worker (chunk i
            # on worker i % count) and those sent to the killed judge (least-loaded dispatch).
            i = self.kill_worker_index
            self.killed_chunks = {
                k
                for k, chunk in enumerate(pending.chunks)
                if k % len(self.rollout) == i % len(self.rollout)
                or (self.judges and chunk.judge == i % len(self.judges))
            }
        return pending

    def _learners(self, method, *args):
        if self.kill_learner_at is not None:
            name, step = self.kill_learner_at
            # save_checkpoint runs after the step counter moved on; train_step before.
            at = self.step if name == "save_checkpoint" else self.step + 1
            if method == name and at == step:
                os.kill(pid_of(self.learners.actors[1]), signal.SIGKILL)
        return super()._learners(method, *args)


def run(trainer: Trainer, shutdown_ray: bool = True) -> None:
    """`trainer.run()`, then close it whatever happened (the local Ray cluster is kept for
    the next in-process run when not `shutdown_ray`)."""
    try:
        trainer.run()
    finally:
        trainer.close(shutdown_ray=shutdown_ray)
