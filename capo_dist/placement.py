"""Where an engine actor runs: CPU, one GPU, or a tensor-parallel placement group.

A TP=t engine gets a placement group of t one-GPU bundles packed on one node;
the actor runs in bundle 0 holding no GPU itself and captures its child tasks,
so vLLM's Ray executor places its t workers in the group's bundles (the way
vLLM documents running inside an existing placement group).
"""

from __future__ import annotations

from typing import Any

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


def engine_actor_options(
    name: str, tensor_parallel_size: int, gpus_per_shard: float, num_cpus: float = 1.0
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Ray `.options(...)` for an engine actor (`num_cpus` Ray CPUs unless it is a
    TP group, whose bundles hold them) and the extra engine kwargs it needs."""
    if gpus_per_shard <= 0:
        return {"name": name, "num_cpus": num_cpus}, {}
    if tensor_parallel_size == 1:
        return {"name": name, "num_cpus": num_cpus, "num_gpus": gpus_per_shard}, {}
    pg = placement_group([{"GPU": 1, "CPU": 1}] * tensor_parallel_size, strategy="STRICT_PACK")
    ray.get(pg.ready())
    options = {
        "name": name,
        "num_cpus": 0,
        "num_gpus": 0,
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=pg,
            placement_group_bundle_index=0,
            placement_group_capture_child_tasks=True,
        ),
    }
    return options, {"distributed_executor_backend": "ray"}
