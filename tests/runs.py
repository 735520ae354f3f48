"""Helpers for end-to-end runs: compose the real Hydra config of a fast CPU run, read its metrics."""

import json
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from capo_dist.config import RunConfig

CONF = str(Path(__file__).resolve().parents[1] / "conf")

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
