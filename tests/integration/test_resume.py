"""Checkpoints and exact resume: a run killed (SIGKILL, whole process tree) after step k and
resumed with `trainer.resume=auto` logs the same metrics from step k+1 on as a run that was
never interrupted, with the same seed. Real Ray, DeepSpeed ZeRO-3 (2 gloo ranks), vLLM CPU."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from tests.runs import FAST, read_metrics

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
# Wall-clock figures differ run to run; everything else must be identical.
VOLATILE = ("time_", "tokens_per_s", "train_time")


class Run:
    """A real `python -m capo_dist.launch` process in its own session, output in a log file."""

    def __init__(self, run_dir: Path, build_dir: Path, *extra: str):
        args = [
            *FAST,
            "trainer.total_steps=3",
            "trainer.checkpoint_every=1",
            "trainer.keep_checkpoints=2",
        ]
        self.log = run_dir.parent / f"{run_dir.name}-{time.monotonic_ns()}.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "capo_dist.launch",
                    *args,
                    f"model.build_dir={build_dir}",
                    f"hydra.run.dir={run_dir}",
                    *extra,
                ],
                cwd=REPO,
                start_new_session=True,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def finish(self) -> str:
        code = self.proc.wait(900)
        text = self.log.read_text()
        assert code == 0, text[-3000:]
        return text

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # the driver, its Ray cluster, every actor
        self.proc.wait(60)


def stable(records: list[dict]) -> dict[int, dict]:
    """The last record of each step, without wall-clock figures."""
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in records}


def test_killed_run_resumes_exactly(tmp_path, model_build_dir):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    Run(whole, model_build_dir).finish()

    run = Run(broken, model_build_dir)
    ckpt = broken / "checkpoints" / "step_00000001" / "driver_state.json"
    deadline = time.time() + 600
    while not ckpt.exists():
        assert run.proc.poll() is None, run.log.read_text()[-3000:]
        assert time.time() < deadline
        time.sleep(0.1)
    run.kill()
    assert max(r["step"] for r in read_metrics(broken)) < 3

    out = Run(broken, model_build_dir, "trainer.resume=auto").finish()
    assert "resumed from" in out

    expected, got = stable(read_metrics(whole)), stable(read_metrics(broken))
    assert sorted(got) == [1, 2, 3]
    for step in (2, 3):
        assert got[step] == expected[step], f"step {step} differs after resume"
    state = json.loads((broken / "checkpoints" / "step_00000003" / "driver_state.json").read_text())
    assert state["step"] == 3
    # keep-last-N: only the 2 newest checkpoints remain, and no partial directory.
    assert sorted(p.name for p in (broken / "checkpoints").iterdir()) == [
        "step_00000002",
        "step_00000003",
    ]
    # The final policy is exported in Hugging Face format.
    AutoModelForCausalLM.from_pretrained(broken / "policy")
