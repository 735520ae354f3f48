"""Entry point: `python -m capo_dist.launch [+experiment=NAME] [key=value ...]`.

With no arguments it runs the `tiny_cpu` default: a locally built policy, the
symbolic judge, 2 DeepSpeed ZeRO-3 ranks on gloo, a few steps on a laptop-size
CPU. `+experiment=llama3b_intersection` (and siblings in conf/experiment/)
describe the paper's GPU-cluster runs; `--cfg job` prints a composed config
without starting anything; `-m capo.vote=intersection,majority` sweeps;
`+experiment=NAME +rehearsal=cpu` rehearses an experiment on one CPU machine
through its cluster code paths (capo_dist.rehearsal).
"""

from __future__ import annotations

import sys
from contextlib import ExitStack

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from capo_dist.config import ConfigError, RunConfig
from capo_dist.data import DataError


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    cfg: RunConfig = OmegaConf.to_object(dcfg)
    _check_rehearsal_order(HydraConfig.get().overrides.task)
    with ExitStack() as stack:
        try:
            if cfg.rehearsal.enabled:
                from capo_dist.rehearsal import Rehearsal

                stack.enter_context(Rehearsal(cfg))
            from capo_dist.trainer import Trainer

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


def _check_rehearsal_order(overrides: list[str]) -> None:
    """`+rehearsal=cpu` must come after `+experiment=...`: Hydra applies config groups added on
    the command line in order, so the other order would let the experiment undo the rehearsal."""
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    if (
        "rehearsal" in keys
        and "experiment" in keys
        and keys.index("rehearsal") < keys.index("experiment")
    ):
        print(
            "[capo_dist] ConfigError: put +rehearsal=cpu after +experiment=NAME on the command line "
            "(e.g. +experiment=llama3b_intersection +rehearsal=cpu)",
            file=sys.stderr,
        )
        raise SystemExit(2)


if __name__ == "__main__":
    main()
