"""Refuse to start when a directory the learners write is not shared by every node.

Each learner rank writes its ZeRO-3 shards into `trainer.checkpoint_dir` on
its own node, and the driver commits the checkpoint there; without a shared
filesystem a checkpoint would land split over nodes and look complete on the
driver's. So before any model loads the driver writes a nonce file into each
such directory and runs one task pinned to every node concerned, which must
read the nonce and write a reply beside it that the driver then reads back.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from capo_dist.config import ConfigError


@dataclass(frozen=True)
class SharedDir:
    """A directory every learner node must see as the driver does, and the key that sets it."""

    key: str  # e.g. "trainer.checkpoint_dir"
    path: str


@ray.remote(num_cpus=0)
def _probe(files: list[tuple[str, str]], node_tag: str) -> list[str | None]:
    """On one node: read each nonce file and write `<file>.<node_tag>` beside it;
    per file None, or why it failed."""
    problems: list[str | None] = []
    for path, nonce in files:
        try:
            if Path(path).read_text() != nonce:
                problems.append(f"{path} holds another run's nonce")
                continue
            Path(f"{path}.{node_tag}").write_text(nonce)
            problems.append(None)
        except OSError as err:
            problems.append(f"{type(err).__name__}: {err}")
    return problems


def require_shared(dirs: list[SharedDir], nodes: dict[str, str]) -> None:
    """Check every directory in `dirs` is the same directory on every node in `nodes`
    (node id -> a label naming it and why it matters); raise ConfigError naming the
    node and the fix."""
    nonce = uuid.uuid4().hex
    files = []
    for d in dirs:
        os.makedirs(d.path, exist_ok=True)
        f = Path(d.path) / f".capo-shared-check-{nonce}"
        f.write_text(nonce)
        files.append((d, f))
    try:
        ids = list(nodes)
        results = ray.get(
            [
                _probe.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
                ).remote([(str(f), nonce) for _, f in files], node_id[:12])
                for node_id in ids
            ]
        )
        for node_id, problems in zip(ids, results, strict=True):
            for (d, f), problem in zip(files, problems, strict=True):
                reply = Path(f"{f}.{node_id[:12]}")
                if problem is None and not reply.is_file():
                    problem = f"what it wrote as {reply} is not visible from the driver"
                if problem:
                    raise ConfigError(
                        f"{d.key}={d.path!r} is not shared: node {nodes[node_id]} "
                        f"does not see the directory the driver wrote ({problem}). Every learner "
                        "rank writes its ZeRO-3 shards there and the driver commits the checkpoint, "
                        f"so it would land split over nodes; put {d.key} on a filesystem every "
                        "node mounts at the same path (NFS, Lustre, a cloud file store)"
                    )
    finally:
        for _, f in files:
            for leftover in Path(f.parent).glob(f"{f.name}*"):
                leftover.unlink(missing_ok=True)
