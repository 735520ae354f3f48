"""The driver on a multi-node Ray cluster, simulated on this machine: joining through
RAY_ADDRESS, the placement plan (per-node fit, bounded wait, release for the next job of
a sweep) and the refusal to checkpoint into a directory some learner node does not see.

One cluster for the module (`ray.cluster_utils.Cluster`): a head (the driver's node, no
GPU), nodes A and B with 2 logical GPUs each, and node I started by `ray start` inside its
own mount namespace (`unshare -m`) with a tmpfs over `shared_root`, so node I's processes
really do not see what the driver writes there: a node without the shared filesystem.
No model loads: actors only reserve logical GPUs.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.placement_group import placement_group, remove_placement_group

from capo_dist.config import ConfigError
from capo_dist.placement import PlacementError, reserve_roles
from capo_dist.trainer import init_ray, prepare_cluster
from tests.runs import compose_run

pytestmark = pytest.mark.slow

ISOLATED = "isolated_node"  # custom resource naming node I


@dataclass
class SimCluster:
    address: str
    shared_root: Path  # hidden from node I by a tmpfs in its mount namespace


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_isolated_node(address: str, hidden: Path, log: Path) -> subprocess.Popen:
    """`ray start --block` for node I in a new mount namespace with a tmpfs over `hidden`."""
    ray_cli = Path(sys.executable).parent / "ray"
    args = [
        str(ray_cli),
        "start",
        f"--address={address}",
        "--num-cpus=1",
        "--num-gpus=1",
        f"--resources={json.dumps({ISOLATED: 1})}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
        "--disable-usage-stats",
        "--block",
    ]
    script = 'mount -t tmpfs capo-isolated "$0" && exec "$@"'
    return subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(hidden), *args],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("node I needs `unshare -m` and root to mount a tmpfs in its namespace")
    # Our own Ray temp dir: the address file Cluster writes must not make other Ray
    # processes on this machine (ray.init() without an address) join this cluster.
    ray_tmp = tempfile.mkdtemp(prefix="capo-cl-", dir="/tmp")
    saved = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = ray_tmp
    shared_root = tmp_path_factory.mktemp("shared_fs")
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    node_i = None
    try:
        c.add_node(num_cpus=3, num_gpus=2)  # A
        c.add_node(num_cpus=3, num_gpus=2)  # B
        node_i = _start_isolated_node(c.address, shared_root, Path(ray_tmp) / "node_i.log")
        deadline = time.monotonic() + 60
        while not any(
            n["Alive"] and ISOLATED in (n.get("Resources") or {}) for n in _node_table(c)
        ):
            assert node_i.poll() is None, (Path(ray_tmp) / "node_i.log").read_text()
            assert time.monotonic() < deadline, "node I did not join the cluster"
            time.sleep(0.5)
        yield SimCluster(c.address, shared_root)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if node_i is not None:
            node_i.terminate()  # `ray start --block` stops its node's processes
            node_i.wait(timeout=30)
        c.shutdown()
        if saved is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = saved
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _node_table(c: Cluster) -> list[dict]:
    return c.global_state.node_table()


def _eventually(check, timeout_s: float = 10.0) -> bool:
    """Ray's resource view lags a removal by a resource report; poll it."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@contextmanager
def another_job(bundles: list[dict[str, float]], strategy: str):
    """Resources held by someone else on the cluster (a placement group of our own)."""
    group = placement_group(bundles, strategy=strategy)
    ray.get(group.ready(), timeout=30)
    try:
        yield
    finally:
        remove_placement_group(group)


@pytest.fixture
def driver(cluster):
    """The test process connected to the simulated cluster as the driver."""
    if not ray.is_initialized():
        ray.init(address=cluster.address)
    yield cluster
    # every test leaves the cluster as it found it, for the next one
    assert _eventually(lambda: ray.available_resources().get("GPU", 0.0) == 5.0)


def _cfg(run_dir: Path, *overrides: str):
    return compose_run(run_dir, run_dir / "models", "ray.placement_timeout_s=20", *overrides)


def _gpu_roles(*overrides: str) -> list[str]:
    """rollout/judge on GPUs (placement only reads the sizes: no model is loaded)."""
    return ["judge.backend=vllm", "judge.num_gpus_per_worker=1", *overrides]


def test_driver_joins_through_ray_address_and_prints_the_plan(
    cluster, tmp_path, monkeypatch, capsys
):
    """RAY_ADDRESS set, ray.address null (a Slurm script, `ray job submit`): the driver joins;
    every role is reserved before any actor and the plan says where (judge TP=2 on one node)."""
    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    cfg = _cfg(
        tmp_path,
        *_gpu_roles(
            "judge.tensor_parallel_size=2",
            "rollout.num_gpus_per_worker=1",
            "trainer.num_learners=1",
            "trainer.num_gpus_per_learner=1",
        ),
    )
    assert cfg.ray.address is None
    init_ray(cfg)
    assert ray.cluster_resources()["GPU"] == 5.0  # joined ours, not a new local cluster
    plan = prepare_cluster(cfg)
    try:
        out = capsys.readouterr().out
        assert "placement plan (role -> node -> GPUs)" in out
        for role in ("rollout-0", "judge-0", "learner"):
            assert f"  {role}" in out, out
        judge_nodes = plan.nodes_of("judge-0")
        assert len(plan.roles["judge-0"].nodes) == 2 and len(judge_nodes) == 1
        assert judge_nodes[0].gpus == 2.0
        assert f"{judge_nodes[0].label} -> 2 GPUs (bundles 0-1)" in out, out
        opts, engine_kwargs = plan.actor_options("judge-0")
        assert engine_kwargs == {"distributed_executor_backend": "ray"}
        assert (opts["num_gpus"], opts["num_cpus"]) == (0.0, 0.0)
        assert _eventually(lambda: ray.available_resources().get("GPU", 0.0) == 1.0)
    finally:
        plan.release()
    assert _eventually(lambda: ray.available_resources().get("GPU", 0.0) == 5.0)


def test_a_tp_group_must_fit_on_one_node(driver, tmp_path):
    """5 GPUs in all but at most 2 per node: a TP=4 judge fails at once, naming the role,
    what it needs, the largest node and the fix (not a hang, not the sum of GPUs)."""
    cfg = _cfg(tmp_path, *_gpu_roles("judge.tensor_parallel_size=4"))
    t0 = time.monotonic()
    with pytest.raises(PlacementError) as err:
        reserve_roles(cfg)
    msg = str(err.value)
    assert "judge-0 needs 4 GPUs and 4 CPUs on one node" in msg, msg
    assert "has 2 GPUs" in msg and "lower judge.tensor_parallel_size" in msg, msg
    assert time.monotonic() - t0 < 10


def test_a_wait_the_cluster_cannot_meet_is_bounded(driver, tmp_path):
    """Another job holds one GPU on A, one on B and node I's: 2 GPUs are free but on
    different nodes, so the rollout TP=2 group never becomes ready; the driver gives up
    after ray.placement_timeout_s naming the role and the shortfall, holding nothing."""
    cfg = _cfg(
        tmp_path,
        "rollout.tensor_parallel_size=2",
        "rollout.num_gpus_per_worker=1",
        "ray.placement_timeout_s=3",
    )
    with another_job([{"GPU": 1.0}] * 2 + [{"GPU": 1.0, ISOLATED: 1.0}], "STRICT_SPREAD"):
        with pytest.raises(PlacementError) as err:
            reserve_roles(cfg)
        msg = str(err.value)
        assert "within 3s (ray.placement_timeout_s)" in msg, msg
        assert "still waiting for rollout-0" in msg and "rollout-0 needs 2 GPUs" in msg, msg
        assert "the cluster had 2 GPUs and" in msg, msg
        assert _eventually(lambda: ray.available_resources().get("CPU", 0.0) == 8.0)


def test_release_lets_the_next_job_of_a_sweep_place(driver, tmp_path):
    """Two runs in a row on one cluster, each needing both 2-GPU nodes (two TP=2 engines):
    the second places only because the first gave its groups back (what Trainer.close does)."""
    cfg = _cfg(
        tmp_path,
        "rollout.num_workers=2",
        "rollout.tensor_parallel_size=2",
        "rollout.num_gpus_per_worker=1",
        "ray.placement_timeout_s=5",
    )
    first = prepare_cluster(cfg)
    first.release()
    second = prepare_cluster(cfg)
    second.release()
    engines = ("rollout-0", "rollout-1")
    assert len({n.node_id for r in engines for n in second.nodes_of(r)}) == 2


def test_checkpoint_dir_must_be_seen_from_every_learner_node(driver):
    """The learner lands on node I, which does not see the driver's checkpoint_dir (a
    node without the shared filesystem): the run refuses to start, naming the node and
    the fix. On nodes that see it, the same run starts and leaves no probe files."""
    run_dir = driver.shared_root / "run"
    cfg = _cfg(run_dir, "trainer.num_learners=1", "trainer.num_gpus_per_learner=1")
    ckpt = Path(cfg.trainer.checkpoint_dir)
    assert ckpt.is_relative_to(driver.shared_root)
    with another_job([{"GPU": 2.0}] * 2, "STRICT_SPREAD"):  # A and B are busy
        with pytest.raises(ConfigError) as err:
            prepare_cluster(cfg)
    msg = str(err.value)
    assert f"trainer.checkpoint_dir={str(ckpt)!r} is not shared: node" in msg, msg
    assert "(hosts learner ranks)" in msg and "FileNotFoundError" in msg, msg
    assert "a filesystem every node mounts" in msg, msg
    with another_job([{"GPU": 1.0, ISOLATED: 1.0}], "PACK"):  # node I is busy
        plan = prepare_cluster(cfg)
        plan.release()
    assert list(ckpt.iterdir()) == [] and [p.name for p in run_dir.iterdir()] == ["checkpoints"]
