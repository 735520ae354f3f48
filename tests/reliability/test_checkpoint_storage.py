"""Storage faults while saving a checkpoint never damage the last good one, and resume picks
the last complete checkpoint: a save killed mid-write (SIGKILL), and a full disk (the
writer's file-size limit, RLIMIT_FSIZE, makes writes fail with EFBIG as on a full volume)."""

import json
import signal
import subprocess
import sys
import textwrap
import time

import torch

from capo_dist.checkpoint import CheckpointManager, read_driver_state

WRITER = textwrap.dedent(
    """
    import resource, signal, sys, time, torch
    from capo_dist.checkpoint import CheckpointManager
    mode, root = sys.argv[1], sys.argv[2]
    if mode == "full_disk":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG like ENOSPC, not a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    manager = CheckpointManager(root, keep=2)
    tmp = manager.begin(2)
    (tmp / "learner").mkdir()
    if mode == "slow":
        with open(tmp / "learner" / "partition.bin", "wb") as f:
            for _ in range(1000):
                f.write(b"x" * 65536); f.flush(); print("writing", flush=True); time.sleep(0.05)
    torch.save({"w": torch.zeros(4 << 20)}, tmp / "learner" / "state.pt")  # 16 MB > 1 MB limit
    manager.commit(tmp, 2, {"step": 2})
    """
)


def good_checkpoint(root):
    manager = CheckpointManager(root, keep=2)
    tmp = manager.begin(1)
    torch.save({"w": torch.arange(10.0)}, tmp / "state.pt")
    return manager.commit(tmp, 1, {"step": 1, "stream": {"epoch": 0, "index": 8}})


def assert_last_good_intact(root, good):
    manager = CheckpointManager(root, keep=2)
    assert manager.latest() == good
    assert read_driver_state(good)["step"] == 1
    assert torch.equal(torch.load(good / "state.pt", weights_only=True)["w"], torch.arange(10.0))
    swept = manager.sweep_partial()
    assert len(swept) == 1 and ".tmp-" in swept[0].name
    assert [p.name for p in root.iterdir()] == [good.name]


def test_killed_mid_save(tmp_path):
    good = good_checkpoint(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, "slow", str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert_last_good_intact(tmp_path, good)


def test_full_disk_during_save(tmp_path):
    good = good_checkpoint(tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", WRITER, "full_disk", str(tmp_path)], capture_output=True, text=True
    )
    assert out.returncode != 0 and "Error" in out.stderr  # the write failed part-way
    assert_last_good_intact(tmp_path, good)


def test_keep_last_n_and_order(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    for step in (1, 2, 3, 10):
        manager.commit(manager.begin(step), step, {"step": step})
    assert [p.name for p in manager.complete()] == ["step_00000003", "step_00000010"]
    assert json.loads((manager.latest() / "driver_state.json").read_text())["step"] == 10
