"""Where a run's figures go: `metrics.jsonl` (always), wandb (by mode), a live progress bar."""

from __future__ import annotations

import json
import math
from pathlib import Path

from omegaconf import OmegaConf
from tqdm import tqdm

from capo_dist.config import RunConfig

# Figures shown on the driver's progress bar.
_BAR_KEYS = ("reward_mean", "accuracy", "process_penalty_rate", "tokens_per_s", "time_step")


def _jsonable(value: float) -> float | None:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


class MetricsLogger:
    """Appends one JSON object per step to `<run_dir>/metrics.jsonl` and mirrors it to wandb."""

    def __init__(self, run_dir: Path, cfg: RunConfig):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self.file = open(self.path, "a", encoding="utf-8")
        label = "grpo" if cfg.capo.w_process == 0 else f"capo[{cfg.capo.vote}]"
        self.bar = tqdm(total=cfg.trainer.total_steps, desc=label, unit="step")
        self.wandb = None
        if cfg.logging.wandb_mode != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=cfg.logging.wandb_project,
                name=cfg.logging.run_name or cfg.name,
                mode=cfg.logging.wandb_mode,
                dir=str(run_dir),
                config=OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True),
            )

    def log(self, record: dict[str, float]) -> None:
        clean = {k: _jsonable(v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(
                {k: v for k, v in clean.items() if v is not None}, step=int(record["step"])
            )
        self.bar.set_postfix({k: f"{record[k]:.3g}" for k in _BAR_KEYS if k in record})
        if record["step"] > 0:  # step 0: the initial policy's evaluation, no training
            self.bar.update(1)

    def write_samples(self, step: int, samples: list[dict]) -> None:
        """Per-response records of one step, for the credit report."""
        out = self.path.parent / "samples"
        out.mkdir(exist_ok=True)
        with open(out / f"step_{step:06d}.jsonl", "w", encoding="utf-8") as f:
            for record in samples:
                f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.bar.close()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
