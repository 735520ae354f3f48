"""vLLM weight-transfer engine "capo_gloo": vLLM's packed NCCL transfer, over a gloo group.

vLLM 0.32 receives trainer weights through a `WeightTransferEngine` picked by
`WeightTransferConfig(backend=...)` from `WeightTransferEngineFactory`
(`vllm/distributed/weight_transfer/`). Its "nccl" engine needs CUDA; this one
is the same protocol on CPU, so a CPU run drives the very calls a GPU run
does (`LLM.init_weight_transfer_engine`, `start_weight_update`,
`update_weights`, `finish_weight_update`) and only the communicator differs:

* payloads: the same dicts as "nccl" — `NCCLWeightTransferInitInfo`
  (master_address/port, rank_offset, world_size, packed wire params) and
  `NCCLWeightTransferUpdateInfo` (names, dtype_names, shapes);
* rank: `dp_rank * TP * PP + rank + rank_offset`, vLLM's
  `worker_init_process_group` formula, in a gloo group of its own
  (`capo_dist.weight_sync.GlooCommunicator`, the learner's class too);
* buckets: cut from the metadata by `plan_buckets` — the rule of vLLM's
  packed consumer (`packed_tensor.packed_nccl_broadcast_consumer`), which
  needs CUDA streams and so cannot run here — one broadcast each;
* loading: `model.load_weights` inside vLLM's layerwise reload lifecycle
  (`initialize_layerwise_reload` at start, `finalize_layerwise_reload` at
  finish), as the NCCL engine does; at finish, CPU embeddings / tied LM
  heads are re-packed (`_repack_cpu_vocab_layers`, see vllm_worker_ext).

Registered under `BACKEND` by `register()`, which `vllm_worker_ext` calls
on import: vLLM imports that module in every worker process (it is the
engine's `worker_extension_cls`) before `load_model` creates the engine.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.weight_transfer.base import WeightTransferEngine
from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo
from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferUpdateInfo

from capo_dist.weight_sync import GlooCommunicator, ParamSpec, WeightBucket, plan_buckets

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.config.parallel import ParallelConfig
    from vllm.config.weight_transfer import WeightTransferConfig

BACKEND = "capo_gloo"
# A peer missing at the rendezvous or in a broadcast fails the call after this many seconds.
TIMEOUT_ENV = "CAPO_WEIGHT_SYNC_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 1800.0


def register() -> None:
    """Make `WeightTransferConfig(backend="capo_gloo")` resolvable in this process (idempotent)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, __name__, "GlooWeightTransferEngine")


def worker_rank(init_info: NCCLWeightTransferInitInfo, parallel: ParallelConfig) -> int:
    """This worker's rank in the trainer↔workers group (vLLM's `worker_init_process_group`)."""
    return (
        parallel.data_parallel_index * parallel.world_size + parallel.rank + init_info.rank_offset
    )


class GlooWeightTransferEngine(
    WeightTransferEngine[NCCLWeightTransferInitInfo, NCCLWeightTransferUpdateInfo]
):
    """Receives packed weight broadcasts from trainer rank 0 over gloo and loads them."""

    init_info_cls = NCCLWeightTransferInitInfo
    update_info_cls = NCCLWeightTransferUpdateInfo

    def __init__(
        self,
        config: WeightTransferConfig,
        vllm_config: VllmConfig,
        device: torch.device,
        model: torch.nn.Module,
    ) -> None:
        super().__init__(config, vllm_config, device, model)
        self.group: GlooCommunicator | None = None
        self.packed = True
        self.bucket_bytes = 0

    def init_transfer_engine(self, init_info: NCCLWeightTransferInitInfo) -> None:
        """Join the trainer's gloo group at this worker's rank (blocks until all have joined)."""
        if init_info.master_address is None or init_info.master_port is None:
            raise ValueError(
                f"{BACKEND} needs master_address and master_port (a NCCL unique id "
                "cannot set up a gloo group)"
            )
        self.packed = init_info.packed
        self.bucket_bytes = init_info.packed_buffer_size_bytes
        self.group = GlooCommunicator.connect(
            init_info.master_address,
            init_info.master_port,
            worker_rank(init_info, self.parallel_config),
            init_info.world_size,
            timeout_s=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)),
        )

    def start_weight_update(self) -> None:
        """Layers go back to checkpoint format until `finish_weight_update`."""
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        """As the base class, without its `torch.accelerator.synchronize()` (no accelerator)."""
        self.receive_weights(self.parse_update_info(update_info))

    @torch.no_grad()
    def receive_weights(self, update_info: NCCLWeightTransferUpdateInfo) -> None:
        """One broadcast per bucket (or per tensor if not packed); each goes to `load_weights`."""
        if self.group is None:
            raise RuntimeError(f"{BACKEND}: update_weights before init_weight_transfer_engine")
        from vllm.model_executor.model_loader.mtp_validation import (
            disable_mtp_completeness_check,
        )

        specs = [
            ParamSpec(name, tuple(shape), getattr(torch, dtype))
            for name, dtype, shape in zip(
                update_info.names, update_info.dtype_names, update_info.shapes, strict=True
            )
        ]
        # Unpacked = one tensor per broadcast, which a bucket size of 1 byte gives.
        buckets = plan_buckets(specs, self.bucket_bytes if self.packed else 1)
        with disable_mtp_completeness_check():
            for bucket in buckets:
                flat = torch.empty(sum(s.nbytes for s in bucket), dtype=torch.uint8)
                self.group.broadcast(flat, src=0)
                # A fresh buffer per bucket: layerwise reload keeps the views until the
                # layer is complete.
                received = WeightBucket(
                    [s.name for s in bucket],
                    [s.shape for s in bucket],
                    [s.dtype for s in bucket],
                    flat,
                )
                self.model.load_weights(received.unpack())

    def finish_weight_update(self) -> None:
        """Re-process every reloaded layer into kernel format; re-pack CPU vocab layers."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        from capo_dist.engines.vllm_worker_ext import _repack_cpu_vocab_layers

        finalize_layerwise_reload(self.model, self.model_config)
        _repack_cpu_vocab_layers(self.model)

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.destroy()
            self.group = None
