"""Driver-side handle of the learner ranks: creates them and fans every call out to all.

Every learner method that touches parameters is a ZeRO-3 collective, so the
driver calls it on ALL ranks at once; `LearnerGroup` does exactly that (and
shards / reassembles rows where that applies), failing as soon as any rank
fails instead of hanging in a collective.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import ray
import torch
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from capo_dist.learner import Learner, LearnerConfig
from capo_dist.types import TrainBatch
from capo_dist.weight_sync import CollectiveSyncPlan, CollectiveTransport, ParamSpec


@ray.remote(num_cpus=0)
def _master_endpoint() -> tuple[str, int]:
    """The address of this node and a free TCP port on it (run in rank 0's bundle)."""
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return ray.util.get_node_ip_address(), port


def get_all(
    refs: dict[Any, ray.ObjectRef] | list[ray.ObjectRef],
    timeout_s: float | None = None,
    what: str = "",
) -> list[Any]:
    """Results of all calls (in order), failing as soon as ANY fails or `timeout_s` passes.

    A plain `ray.get(refs)` would block on rank 0, which waits forever inside a
    collective for a peer that has died; this surfaces the dead rank's error.
    With `refs` a dict, a timeout names the keys (e.g. actors) still running.
    """
    named = refs if isinstance(refs, dict) else dict(enumerate(refs))
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    pending = list(named.values())
    while pending:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, pending = ray.wait(pending, num_returns=1, timeout=left)
        if not done:
            late = [str(k) for k, r in named.items() if r in pending]
            raise TimeoutError(
                f"{what or 'waiting for Ray calls'}: {', '.join(late)} did not finish within "
                f"{timeout_s:g}s; see their actor logs (a peer that never joined or died)"
            )
        ray.get(done)  # raises the failed call's error at once
    return ray.get(list(named.values()))


class LearnerGroup:
    """Driver-side handle of the W learner ranks: creates them and fans every call out to all.

    The ranks live in one placement group (`PACK`: on as few nodes as
    possible), one bundle each; rank 0's node hosts the process-group
    rendezvous. Construction runs `setup()` on every rank.
    """

    def __init__(
        self,
        config: LearnerConfig,
        num_learners: int = 1,
        name: str = "learner",
        group: PlacementGroup | None = None,
        log_dir: str | None = None,
    ) -> None:
        """`group`: a placement group already reserved for the ranks (one bundle each,
        as `capo_dist.placement` makes it); None reserves one here. `log_dir`: rank i
        writes its output to `log_dir/<name>-<i>.log` (None: to Ray, as usual)."""
        self.config = config
        self.world_size = num_learners
        if group is None:
            bundle = {"CPU": config.num_cpus_per_learner}
            if config.num_gpus_per_learner > 0:
                bundle["GPU"] = config.num_gpus_per_learner
            group = placement_group([dict(bundle) for _ in range(num_learners)], strategy="PACK")
        self.placement_group = group
        ray.get(self.placement_group.ready())

        addr, port = ray.get(_master_endpoint.options(scheduling_strategy=self._bundle(0)).remote())
        self.actors = [
            Learner.options(
                name=f"{name}-{i}",
                num_cpus=config.num_cpus_per_learner,
                num_gpus=config.num_gpus_per_learner,
                scheduling_strategy=self._bundle(i),
            ).remote(
                config,
                i,
                num_learners,
                addr,
                port,
                log_file=f"{log_dir}/{name}-{i}.log" if log_dir else None,
            )
            for i in range(num_learners)
        ]
        try:
            self.setup_info = self._all("setup")[0]
        except Exception:
            self.shutdown()
            raise

    def _bundle(self, i: int) -> PlacementGroupSchedulingStrategy:
        """Scheduling into rank i's bundle of the placement group."""
        return PlacementGroupSchedulingStrategy(
            placement_group=self.placement_group, placement_group_bundle_index=i
        )

    def _all(self, method: str, *args: Any) -> list[Any]:
        """Call `method(*args)` on every rank at once and wait for all results."""
        return get_all([getattr(a, method).remote(*args) for a in self.actors])

    def train_step(self, batch: TrainBatch, policy_version: int | None = None) -> dict[str, float]:
        """One PPO update on `batch` (rank r trains rows r::W); metrics reduced over ranks.

        `policy_version`: the version of the weights the learner holds now (the
        driver's sync count); rows sampled by an older one are corrected for
        staleness (`Learner.train_step`).
        """
        refs = [
            a.train_step.remote(batch.shard(r, self.world_size), policy_version)
            for r, a in enumerate(self.actors)
        ]
        return get_all(refs)[0]

    def compute_logprobs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Per-token log-probs [B, L] under the current policy, rows spread over all ranks."""
        w = self.world_size
        refs = [
            a.compute_logprobs.remote(input_ids[r::w], attention_mask[r::w])
            for r, a in enumerate(self.actors)
        ]
        out = torch.zeros(input_ids.shape, dtype=torch.float32)
        for r, lp in enumerate(get_all(refs)):
            out[r::w] = lp
        return out

    def weight_specs(self) -> list[ParamSpec]:
        """Name, shape and dtype of every parameter, in sync order (from rank 0)."""
        return ray.get(self.actors[0].weight_specs.remote())

    def gather_weight_buckets(self, bucket_bytes: int) -> list[ray.ObjectRef]:
        """The full weights as `WeightBucket` refs in the object store (HF names, sync order)."""
        return self._all("gather_weight_buckets", bucket_bytes)[0]

    def collective_sync_plan(
        self, bucket_bytes: int, engine_world_sizes: list[int]
    ) -> CollectiveSyncPlan:
        """A rendezvous on rank 0's node and every engine's vLLM payloads for collective sync.

        `engine_world_sizes[i]` is rollout engine i's worker count (TP x PP);
        the group is all those workers plus learner rank 0.
        """
        addr, port = ray.get(_master_endpoint.options(scheduling_strategy=self._bundle(0)).remote())
        return CollectiveTransport.plan(
            self.weight_specs(), bucket_bytes, addr, port, engine_world_sizes
        )

    def init_weight_sync(
        self, plan: CollectiveSyncPlan, backend: str, timeout_s: float
    ) -> ray.ObjectRef:
        """Start rank 0 joining the sync group; wait on the ref after starting the engines'
        `init_weight_transfer_engine(plan.init_infos[i])` (all meet in the rendezvous)."""
        addr, port = plan.master
        return self.actors[0].init_weight_sync.remote(
            backend, addr, port, plan.world_size, timeout_s
        )

    def broadcast_weights(self, bucket_bytes: int) -> list[ray.ObjectRef]:
        """Start the bucketed broadcast on all ranks; wait on the refs (with the engines'
        `update_weights(plan.update_info)`, started first)."""
        return [a.broadcast_weights.remote(bucket_bytes) for a in self.actors]

    def save_checkpoint(self, directory: str) -> None:
        """DeepSpeed checkpoint of every rank's partition into `directory`."""
        self._all("save_checkpoint", directory)

    def load_checkpoint(self, directory: str) -> int:
        """Restore the latest checkpoint in `directory`; returns its step."""
        return self._all("load_checkpoint", directory)[0]

    def export_hf(self, directory: str) -> None:
        """Write a Hugging Face checkpoint of the current policy into `directory`."""
        self._all("export_hf", directory)

    def shutdown(self) -> None:
        """Kill the ranks and release their placement group."""
        for a in self.actors:
            ray.kill(a)
        remove_placement_group(self.placement_group)
