"""Entry point: `python -m capo_dist.launch [+experiment=NAME] [key=value ...]`.

With no arguments it runs the `tiny_cpu` default: a locally built policy, the
symbolic judge, 2 DeepSpeed ZeRO-3 ranks on gloo, a few steps on a laptop-size
CPU. `+experiment=llama3b_intersection` (and siblings in conf/experiment/)
describe the paper's GPU-cluster runs; `--cfg job` prints a composed config
without starting anything; `-m capo.vote=intersection,majority` sweeps.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from capo_dist.config import ConfigError, RunConfig
from capo_dist.data import DataError


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    cfg: RunConfig = OmegaConf.to_object(dcfg)
    from capo_dist.trainer import Trainer

    try:
        trainer = Trainer(cfg)
    except (ConfigError, DataError) as err:
        print(f"[capo_dist] {type(err).__name__}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        run_dir = trainer.run()
    finally:
        trainer.close()
    print(
        f"[capo_dist] done: {cfg.trainer.total_steps} steps of {cfg.name}; metrics in {run_dir / 'metrics.jsonl'}"
    )


if __name__ == "__main__":
    main()
