"""Where a run's figures go: `metrics.jsonl` (always), wandb (by mode), a live progress bar."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

from omegaconf import OmegaConf
from tqdm import tqdm

from capo_dist.config import RunConfig

# Figures shown on the driver's progress bar.
_BAR_KEYS = (
    "reward_mean",
    "accuracy",
    "process_penalty_rate",
    "zero_variance_group_share",
    "truncated_share",
    "tokens_per_s",
    "time_step",
)


def _jsonable(value: float) -> float | None:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


_STEP_FILE = re.compile(r"^step_(\d+)(?:\.jsonl)?$")


def forget_steps_after(run_dir: Path, step: int) -> int:
    """Make `run_dir` hold what a run stopped right after `step` would have written.

    A run resumed from the checkpoint of `step` re-trains every later step and
    logs it again; without this, the rows of those steps written before the
    crash would stay in `metrics.jsonl` beside the new ones (and a row torn by
    the crash would break every reader). Keeps the rows with `"step" <= step`
    (step 0: the initial evaluation) that parse, in order; the file is
    rewritten beside itself and renamed over it, so a crash here leaves the old
    file or the new one, never a mix. Removes `samples/step_N.jsonl` and
    `eval/step_N/` for N > `step`. Returns how many rows were dropped.
    """
    metrics = run_dir / "metrics.jsonl"
    dropped = 0
    if metrics.is_file():
        kept = []
        for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
                keep = int(row["step"]) <= step
            except (ValueError, TypeError, KeyError):
                keep = False  # a row cut short by the crash
            if keep:
                kept.append(line + "\n")
            else:
                dropped += 1
        if dropped:
            tmp = metrics.with_name(f"metrics.jsonl.tmp-{os.getpid()}")
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(kept)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, metrics)
    for sub in ("samples", "eval"):
        if not (run_dir / sub).is_dir():
            continue
        for path in (run_dir / sub).iterdir():
            m = _STEP_FILE.match(path.name)
            if m and int(m.group(1)) > step:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
    return dropped


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
