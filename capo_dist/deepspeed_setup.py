"""DeepSpeed set-up for the learner ranks: the ZeRO-3 engine configs and three process fixes.

* `deepspeed_config` / `reference_deepspeed_config`: the ZeRO-3 engine of the
  policy (caller-owned gradient accumulation) and of the frozen reference.
* `lr_multiplier`: the learning-rate schedule (warm-up, then constant or cosine).
* `skip_shm_comm_op`: mark DeepSpeed's shared-memory all-reduce op as
  unavailable before `init_distributed`, which saves a ~40 s C++ build on a
  fresh CPU machine (the op only serves DeepSpeed-Inference).
* `quiet_deepspeed`: keep DeepSpeed's per-step chatter out of the actor logs.
* `weights_only_checkpoint_engine`: load DeepSpeed checkpoints with
  `torch.load(weights_only=True)`, never by full unpickling.

Kept out of the actor class on purpose: Ray pickles actor methods by value,
while these module-level functions travel by reference.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from capo_dist.learner import LearnerConfig


def deepspeed_config(config: LearnerConfig) -> dict[str, Any]:
    """The DeepSpeed config of the policy engine (ZeRO-3, caller-owned gradient accumulation).

    `managed_gradient_accumulation: false` makes every `engine.step()` the
    accumulation boundary, so an optimizer step may cover any number of
    micro-batches (the batch size varies from step to step).
    """
    return {
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": config.grad_clip,
        "bf16": {"enabled": config.dtype == "bfloat16"},
        "zero_optimization": {
            "stage": 3,
            "overlap_comm": torch.cuda.is_available(),
            "contiguous_gradients": True,
            "stage3_gather_16bit_weights_on_model_save": False,
        },
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


LR_SCHEDULES = ("constant", "cosine")


def lr_multiplier(step: int, config: LearnerConfig) -> float:
    """The factor on `config.lr` of optimizer update `step` (0-based).

    Linear warm-up: update k < warmup_steps uses (k+1)/warmup_steps. Then
    "constant": 1; "cosine": from 1 down to `min_lr_ratio` at
    `total_optimizer_steps` (and `min_lr_ratio` past it):
    r + (1 − r)·(1 + cos(π·p))/2 with p = (k − warmup)/(total − warmup).
    """
    warmup = config.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if config.lr_schedule == "constant":
        return 1.0
    span = max(config.total_optimizer_steps - warmup, 1)
    progress = min((step - warmup) / span, 1.0)
    floor = config.min_lr_ratio
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def reference_deepspeed_config(config: LearnerConfig) -> dict[str, Any]:
    """The frozen reference model's engine: ZeRO-3 parameters, no optimizer."""
    ds = deepspeed_config(config)
    ds.pop("gradient_clipping")
    return ds


def skip_shm_comm_op() -> None:
    """Tell DeepSpeed its shared-memory all-reduce op cannot be built, before init_distributed.

    `TorchBackend.__init__` JIT-builds `deepspeed_shm_comm` (~40 s of C++ on
    a fresh CPU machine) when `deepspeed.ops.__compatible_ops__` says it can;
    the op only serves DeepSpeed-Inference's `inference_all_reduce`, which
    ZeRO training never calls. That dict is DeepSpeed's per-process probe
    cache, so editing it is all it takes. (Kept out of the actor's methods:
    Ray pickles those by value, and cloudpickle would try to pickle
    `torch.ops` for a function that mentions both `torch` and `.ops`.)
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def quiet_deepspeed() -> None:
    """Keep DeepSpeed's per-step chatter out of the actor logs (warnings and errors still show).

    DeepSpeed 0.19.8 calls `torch.distributed.all_gather_into_tensor` and
    `reduce_scatter_tensor`, which torch 2.13 deprecates with a FutureWarning
    on every call.
    """
    import logging
    import warnings

    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning
    )


def weights_only_checkpoint_engine():
    """DeepSpeed's torch checkpoint engine, but loading with `torch.load(weights_only=True)`.

    DeepSpeed 0.19.8 loads its own checkpoint files with `weights_only=False`,
    i.e. full unpickling: a tampered checkpoint could run code. This loads
    tensors and plain containers only, plus the few DeepSpeed state classes
    its optimizer files hold (named here, nothing else).
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    allowed = [ZeroStageEnum, LossScaler, DynamicLossScaler]

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)

    return WeightsOnlyCheckpointEngine()
