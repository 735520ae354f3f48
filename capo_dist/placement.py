"""Where each role runs: reserve every role's resources before any model loads.

The driver asks the cluster for all of a run's placement groups at once,
checks first that each group can fit on the nodes that exist (a
tensor-parallel group must fit on ONE node, not only in the cluster's total),
waits for them with a bounded wait, prints the plan (role -> node -> GPUs) and
only then creates actors inside the reserved bundles. `ClusterPlan.release`
gives every group back, so the next job of a sweep on the same cluster finds
the GPUs free.

Per role:
- a rollout/judge engine on GPUs: TP=t gets t one-GPU bundles, `STRICT_PACK`
  (one node); the actor runs in bundle 0 holding no GPU itself and captures
  its child tasks, so vLLM's Ray executor places its t workers in the group's
  bundles (the way vLLM documents running inside an existing placement group).
  TP=1 gets a single bundle holding the actor's GPU and CPUs;
- a CPU-only engine: no reservation, a plain actor with `num_cpus`;
- the learners: one `PACK` group (on as few nodes as possible), one bundle per rank.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from capo_dist.config import ConfigError, RunConfig, validate_resources

# Ray CPUs of one learner rank (`LearnerConfig.num_cpus_per_learner`'s default).
LEARNER_CPUS = 1.0
LEARNER = "learner"


class PlacementError(ConfigError):
    """The cluster cannot hold a role's reservation; the message names the role and the shortfall."""


@dataclass(frozen=True)
class NodeResources:
    """One alive Ray node and the logical GPUs/CPUs it was started with."""

    node_id: str
    ip: str
    gpus: float
    cpus: float

    @property
    def label(self) -> str:
        return f"{self.ip} (node {self.node_id[:8]})"


@dataclass(frozen=True)
class RoleDemand:
    """What one role asks for: a placement group (`bundles`, `strategy`) or, with no
    bundles, a plain actor; and how its actor sits in bundle 0."""

    role: str  # "rollout-0", "judge-1", "learner"
    key: str  # the config section that sizes it, for messages
    bundles: list[dict[str, float]]
    strategy: str  # "STRICT_PACK": all bundles on one node; "PACK": as few nodes as possible
    actor_cpus: float
    actor_gpus: float
    tensor_parallel_size: int = 1

    @property
    def gpus(self) -> float:
        return sum(b.get("GPU", 0.0) for b in self.bundles)

    @property
    def cpus(self) -> float:
        return sum(b.get("CPU", 0.0) for b in self.bundles)

    def describe(self) -> str:
        shape = " + ".join(_fmt(b) for b in self.bundles)
        where = "on one node" if self.strategy == "STRICT_PACK" else "spread over nodes if needed"
        return f"{len(self.bundles)} bundle(s) [{shape}] {where}"


@dataclass
class RolePlacement:
    """A role's reservation once ready: its group and the node of each bundle."""

    demand: RoleDemand
    group: PlacementGroup | None
    nodes: list[NodeResources] = field(default_factory=list)  # per bundle


@dataclass
class ClusterPlan:
    """Every role's reservation for one run; the Trainer creates its actors from it."""

    roles: dict[str, RolePlacement]

    def actor_options(self, role: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """Ray `.options(...)` for the engine actor of `role` (named after it) and the
        extra engine kwargs it needs."""
        p = self.roles[role]
        d = p.demand
        opts: dict[str, Any] = {"name": role, "num_cpus": d.actor_cpus}
        if p.group is None:
            return opts, {}
        opts["num_gpus"] = d.actor_gpus
        opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=p.group,
            placement_group_bundle_index=0,
            placement_group_capture_child_tasks=d.tensor_parallel_size > 1,
        )
        engine_kwargs = (
            {"distributed_executor_backend": "ray"} if d.tensor_parallel_size > 1 else {}
        )
        return opts, engine_kwargs

    @property
    def learner_group(self) -> PlacementGroup:
        group = self.roles[LEARNER].group
        assert group is not None
        return group

    def nodes_of(self, role: str) -> list[NodeResources]:
        """The distinct nodes holding `role`'s bundles, in bundle order."""
        seen: dict[str, NodeResources] = {}
        for n in self.roles[role].nodes:
            seen.setdefault(n.node_id, n)
        return list(seen.values())

    def describe(self) -> str:
        """The plan as printed before any model loads: role -> node -> GPUs."""
        lines = ["placement plan (role -> node -> GPUs):"]
        for role, p in self.roles.items():
            if p.group is None:
                lines.append(
                    f"  {role:<10} -> any node -> 0 GPUs ({p.demand.actor_cpus:g} CPUs, not reserved)"
                )
                continue
            per_node: dict[str, list[int]] = {}
            for i, n in enumerate(p.nodes):
                per_node.setdefault(n.node_id, []).append(i)
            parts = []
            for idx in per_node.values():
                node = p.nodes[idx[0]]
                gpus = sum(p.demand.bundles[i].get("GPU", 0.0) for i in idx)
                parts.append(f"{node.label} -> {gpus:g} GPUs (bundles {_ranges(idx)})")
            lines.append(f"  {role:<10} -> " + "; ".join(parts))
        return "\n".join(lines)

    def release(self) -> None:
        """Give every reserved group back to the cluster (idempotent)."""
        for p in self.roles.values():
            if p.group is not None:
                remove_placement_group(p.group)


def _fmt(bundle: dict[str, float]) -> str:
    return ", ".join(f"{k}:{v:g}" for k, v in bundle.items())


def _ranges(idx: list[int]) -> str:
    return f"{idx[0]}-{idx[-1]}" if len(idx) > 1 else str(idx[0])


def _engine(role: str, key: str, tp: int, gpus: float, cpus: float) -> RoleDemand:
    if gpus <= 0:
        return RoleDemand(role, key, [], "PACK", cpus, 0.0)
    if tp == 1:
        return RoleDemand(role, key, [{"GPU": gpus, "CPU": cpus}], "STRICT_PACK", cpus, gpus)
    return RoleDemand(role, key, [{"GPU": 1.0, "CPU": 1.0}] * tp, "STRICT_PACK", 0.0, 0.0, tp)


def role_demands(cfg: RunConfig) -> list[RoleDemand]:
    """Every role's reservation for `cfg`: rollout engines, judge engines, the learner group."""
    r, j, t = cfg.rollout, cfg.judge, cfg.trainer
    demands = [
        _engine(
            f"rollout-{i}",
            "rollout",
            r.tensor_parallel_size,
            r.num_gpus_per_worker,
            r.num_cpus_per_worker,
        )
        for i in range(r.num_workers)
    ]
    judge_gpus = j.num_gpus_per_worker if j.backend in ("vllm", "hf") else 0.0
    for i in range(j.num_workers if cfg.capo.w_process > 0 else 0):
        demands.append(_engine(f"judge-{i}", "judge", j.tensor_parallel_size, judge_gpus, 1.0))
    bundle = {"CPU": LEARNER_CPUS}
    if t.num_gpus_per_learner > 0:
        bundle["GPU"] = t.num_gpus_per_learner
    demands.append(
        RoleDemand(LEARNER, "trainer", [dict(bundle) for _ in range(t.num_learners)], "PACK", 0, 0)
    )
    return demands


def alive_nodes() -> list[NodeResources]:
    """The cluster's alive nodes and their logical GPUs/CPUs (`ray.nodes()`)."""
    return [
        NodeResources(
            n["NodeID"],
            n["NodeManagerAddress"],
            float(n["Resources"].get("GPU", 0.0)),
            float(n["Resources"].get("CPU", 0.0)),
        )
        for n in ray.nodes()
        if n["Alive"]
    ]


def _fix(d: RoleDemand) -> str:
    if d.role == LEARNER:
        return "lower trainer.num_gpus_per_learner or add nodes with more GPUs"
    if d.tensor_parallel_size > 1:
        return (
            f"lower {d.key}.tensor_parallel_size to what one node holds, or run on nodes with "
            f">= {d.gpus:g} GPUs (a TP group needs its GPUs on one node)"
        )
    return f"lower {d.key}.num_gpus_per_worker / num_cpus_per_worker, or add a larger node"


def check_nodes(demands: list[RoleDemand], nodes: list[NodeResources]) -> None:
    """Fail (PlacementError) for a role that fits on NO node: a STRICT_PACK group must
    fit whole on one node, each bundle of a PACK group on some node."""
    if not nodes:
        raise PlacementError("the Ray cluster has no alive node")
    big_gpu = max(nodes, key=lambda n: (n.gpus, n.cpus))
    for d in demands:
        pieces = [{"GPU": d.gpus, "CPU": d.cpus}] if d.strategy == "STRICT_PACK" else d.bundles
        for need in pieces:
            g, c = need.get("GPU", 0.0), need.get("CPU", 0.0)
            if not any(n.gpus >= g and n.cpus >= c for n in nodes):
                raise PlacementError(
                    f"{d.role} needs {g:g} GPUs and {c:g} CPUs on one node ({d.describe()}), "
                    f"but the largest node, {big_gpu.label}, has {big_gpu.gpus:g} GPUs and "
                    f"{big_gpu.cpus:g} CPUs ({len(nodes)} nodes, {sum(n.gpus for n in nodes):g} "
                    f"GPUs in all); {_fix(d)}"
                )


def reserve_roles(cfg: RunConfig, timeout_s: float | None = None) -> ClusterPlan:
    """Reserve every role's placement group (after checking they fit, per node), wait at
    most `ray.placement_timeout_s` for all of them, print the plan and return it.

    On failure nothing stays reserved. Call after `ray.init`, before any actor.
    """
    timeout_s = cfg.ray.placement_timeout_s if timeout_s is None else timeout_s
    nodes = alive_nodes()
    validate_resources(cfg, {"GPU": sum(n.gpus for n in nodes), "CPU": sum(n.cpus for n in nodes)})
    demands = role_demands(cfg)
    check_nodes(demands, nodes)
    run = uuid.uuid4().hex[:6]  # names are cluster-wide: two runs must not collide
    groups = {
        d.role: placement_group(d.bundles, strategy=d.strategy, name=f"capo-{run}-{d.role}")
        for d in demands
        if d.bundles
    }
    ready, _ = ray.wait(
        [g.ready() for g in groups.values()], num_returns=len(groups), timeout=timeout_s
    )
    if len(ready) < len(groups):
        waiting = [
            (role, g)
            for role, g in groups.items()
            if placement_group_table(g).get("state") != "CREATED"
        ]
        free = ray.available_resources()
        for g in groups.values():
            remove_placement_group(g)
        by_role = {d.role: d for d in demands}
        names = ", ".join(f"{role} ({by_role[role].describe()})" for role, _ in waiting)
        first = by_role[waiting[0][0]] if waiting else demands[0]
        raise PlacementError(
            f"the cluster did not hold the run's reservations within {timeout_s:g}s "
            f"(ray.placement_timeout_s): still waiting for {names}; {first.role} needs "
            f"{first.gpus:g} GPUs and {first.cpus:g} CPUs, and the cluster had "
            f"{free.get('GPU', 0.0):g} GPUs and {free.get('CPU', 0.0):g} CPUs free after this "
            f"run's other roles were placed (other jobs may hold the rest); free them, {_fix(first)}, "
            "or raise ray.placement_timeout_s"
        )
    by_id = {n.node_id: n for n in alive_nodes()}
    roles: dict[str, RolePlacement] = {}
    for d in demands:
        group = groups.get(d.role)
        placed = []
        if group is not None:
            table = placement_group_table(group)["bundles_to_node_id"]
            placed = [by_id[table[i]] for i in range(len(d.bundles))]
        roles[d.role] = RolePlacement(d, group, placed)
    plan = ClusterPlan(roles)
    print(f"[capo_dist] {plan.describe()}", flush=True)
    return plan
