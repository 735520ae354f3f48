"""Storage faults while saving a checkpoint never damage the last good one, and resume picks
the last complete checkpoint: a save killed mid-write (SIGKILL), a full disk (the
writer's file-size limit, RLIMIT_FSIZE, makes writes fail with EFBIG as on a full volume),
a re-save or a pruning killed at each point between its durable steps (the module's
test-only `fault_hook`, set in a child process that SIGKILLs itself there), and every file
and directory written is fsynced (os.fsync spied)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from capo_dist import checkpoint
from capo_dist.checkpoint import CheckpointManager, read_driver_state

REPO = Path(__file__).resolve().parents[2]

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
    swept = manager.recover()
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


# ----------------------------------------------------- a re-save or a pruning killed mid-way

# Saves step `step` (a nested tree like DeepSpeed's, tagged `content`) with keep=`keep`, and
# SIGKILLs itself at fault point `point`. At "removing" it first deletes all but
# driver_state.json of the directory being removed: a deletion cut short.
KILLED_SAVER = textwrap.dedent(
    """
    import os, signal, sys
    from capo_dist import checkpoint
    root, step, keep, content, point = sys.argv[1:]

    def hook(name, path):
        if name != point:
            return
        if name == "removing":
            for f in sorted(path.rglob("*"), reverse=True):
                if f.is_file() and f.name != checkpoint.DRIVER_STATE:
                    f.unlink()
        os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.fault_hook = hook
    manager = checkpoint.CheckpointManager(root, keep=int(keep))
    tmp = manager.begin(int(step))
    (tmp / "learner" / "step9").mkdir(parents=True)
    (tmp / "learner" / "step9" / "shard.pt").write_text(content)
    (tmp / "learner" / "latest").write_text("step9")
    manager.commit(tmp, int(step), {"step": int(step), "content": content})
    print("finished")
    """
)


def save(root: Path, step: int, content: str, keep: int = 2) -> Path:
    manager = CheckpointManager(root, keep=keep)
    tmp = manager.begin(step)
    (tmp / "learner" / "step9").mkdir(parents=True)
    (tmp / "learner" / "step9" / "shard.pt").write_text(content)
    return manager.commit(tmp, step, {"step": step, "content": content})


def save_killed_at(root: Path, step: int, content: str, point: str, keep: int = 2) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_SAVER, str(root), str(step), str(keep), content, point],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)


def resumed(root: Path, keep: int = 2) -> tuple[list[str], str]:
    """What a resume sees: the complete checkpoints after recovery, and the one it loads."""
    manager = CheckpointManager(root, keep=keep)
    chosen = manager.resume_from("auto")
    assert chosen is not None
    state = read_driver_state(chosen)
    assert (chosen / "learner" / "step9" / "shard.pt").read_text() == state["content"]
    assert sorted(p.name for p in root.iterdir()) == [p.name for p in manager.complete()]
    return [p.name for p in manager.complete()], state["content"]


@pytest.mark.parametrize(
    ("point", "survivor"),
    [
        ("staged", "old"),  # the new one written, nothing renamed yet
        ("set_aside", "old"),  # between the two renames: only the aside holds step 1
        ("committed", "new"),  # the new one in place, the aside not yet deleted
        ("removing", "new"),  # the aside half-deleted
    ],
)
def test_resave_killed_at_every_point_keeps_a_complete_checkpoint(tmp_path, point, survivor):
    save(tmp_path, 1, "old")
    save_killed_at(tmp_path, 1, "new", point)
    if point == "set_aside":  # the crash left no directory named step_00000001
        assert CheckpointManager(tmp_path).complete() == []
    assert resumed(tmp_path) == (["step_00000001"], survivor)


def test_pruning_killed_mid_delete_leaves_nothing_that_looks_complete(tmp_path):
    save(tmp_path, 1, "one", keep=1)
    save_killed_at(tmp_path, 2, "two", "removing", keep=1)
    # step 1's deletion was cut short with its driver_state.json still there: not listed
    assert [p.name for p in CheckpointManager(tmp_path, keep=1).complete()] == ["step_00000002"]
    assert resumed(tmp_path, keep=1) == (["step_00000002"], "two")


# ------------------------------------------------------------------------------- fsync


def test_every_file_and_directory_is_fsynced_and_the_parent_after_each_rename(
    tmp_path, monkeypatch
):
    """os.fsync spied: every file and directory of the staged tree is fsynced before the
    rename into place, and the checkpoint directory after every rename of a re-save."""
    events: list[tuple[str, str]] = []
    fsync, rename, rmtree = os.fsync, os.rename, shutil.rmtree

    def spy_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def spy_rename(src, dst):
        events.append(("rename", str(dst)))
        return rename(src, dst)

    def spy_rmtree(path, *args, **kwargs):
        events.append(("rmtree", str(path)))
        return rmtree(path, *args, **kwargs)

    root = tmp_path / "ckpts"
    save(root, 1, "old")
    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "rename", spy_rename)
    monkeypatch.setattr(shutil, "rmtree", spy_rmtree)
    manager = CheckpointManager(root, keep=2)
    tmp = manager.begin(1)
    (tmp / "learner" / "step9").mkdir(parents=True)
    (tmp / "learner" / "step9" / "shard.pt").write_text("new")
    (tmp / "learner" / "latest").write_text("step9")
    manager.commit(tmp, 1, {"step": 1})

    renames = [i for i, (kind, _) in enumerate(events) if kind == "rename"]
    assert [events[i][1] for i in renames] == [
        str(root / "step_00000001.replaced"),
        str(root / "step_00000001"),
    ]
    staged = {Path(p) for kind, p in events[: renames[0]] if kind == "fsync"}
    written = {  # as named while staged
        tmp,
        tmp / "learner",
        tmp / "learner" / "step9",
        tmp / "learner" / "step9" / "shard.pt",
        tmp / "learner" / "latest",
        tmp / checkpoint.DRIVER_STATE,
    }
    final = root / "step_00000001"
    assert {tmp, *(tmp / p.relative_to(final) for p in final.rglob("*"))} == written
    assert written <= staged, f"not fsynced before the rename: {written - staged}"
    for i in renames:  # the parent is fsynced after each rename, before anything else moves
        assert events[i + 1] == ("fsync", str(root)), events[i:]
    assert events[-2:] == [  # then the aside is deleted, and the parent fsynced again
        ("rmtree", str(root / "step_00000001.replaced")),
        ("fsync", str(root)),
    ]
    # A checkpoint directory created by the first save: every new directory's parent too.
    events.clear()
    CheckpointManager(tmp_path / "run" / "checkpoints").begin(1)
    assert {("fsync", str(tmp_path)), ("fsync", str(tmp_path / "run"))} <= set(events)


def test_complete_ignores_staging_aside_and_pruned_names(tmp_path):
    save(tmp_path, 3, "three")
    for name in ("step_00000004.tmp-1", "step_00000005.replaced", "step_00000006.pruned"):
        (tmp_path / name).mkdir()
        (tmp_path / name / checkpoint.DRIVER_STATE).write_text("{}")
    assert [p.name for p in CheckpointManager(tmp_path).complete()] == ["step_00000003"]


# ------------------------------------------------------------------ resume=auto finds nothing


def test_resume_auto_with_no_checkpoint_warns_naming_the_directory(tmp_path, capsys):
    manager = CheckpointManager(tmp_path / "run" / "checkpoints")
    assert manager.resume_from("auto") is None
    err = capsys.readouterr().err
    assert "WARNING" in err and str(manager.dir) in err and "trainer.checkpoint_dir" in err
    assert manager.resume_from("none") is None
    assert capsys.readouterr().err == ""  # resume=none starting fresh is no surprise
    save(manager.dir, 2, "two")
    assert manager.resume_from("auto") == manager.dir / "step_00000002"
    assert capsys.readouterr().err == ""


HF_WRITER = textwrap.dedent(
    """
    import sys, time
    from capo_dist.checkpoint import hf_snapshots, save_hf_snapshot

    def write(d):  # the learner's export_hf, cut short
        (d / "config.json").write_text("{}")
        (d / "model-00001-of-00002.safetensors").write_bytes(b"x" * 4096)
        print("written", flush=True)
        time.sleep(600)  # SIGKILLed here: files written, not yet renamed into place

    save_hf_snapshot(hf_snapshots(sys.argv[1]), 3, write)
    """
)


def test_hf_snapshot_killed_mid_save_is_never_a_checkpoint_and_a_whole_one_loads(tmp_path):
    """trainer.save_hf_every: a writer SIGKILLed after writing model files but before the
    rename leaves no `step_` directory (only a staging one, swept by recover); a complete
    save is `hf/step_00000003` and loads in transformers."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from capo_dist.checkpoint import hf_snapshots, save_hf_snapshot

    proc = subprocess.Popen(
        [sys.executable, "-c", HF_WRITER, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    for line in proc.stdout:  # (a library may print a warning first)
        if line.strip() == "written":
            break
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    hf = tmp_path / "hf"
    (staged,) = hf.iterdir()
    assert ".tmp-" in staged.name and (staged / "config.json").is_file()  # really half-done
    snapshots = hf_snapshots(tmp_path)
    assert snapshots.complete() == [] and snapshots.latest() is None
    assert snapshots.recover() == [staged] and list(hf.iterdir()) == []
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    save_hf_snapshot(snapshots, 3, model.save_pretrained)
    assert [p.name for p in hf.iterdir()] == ["step_00000003"]
    assert snapshots.latest() == hf / "step_00000003"
    loaded = AutoModelForCausalLM.from_pretrained(hf / "step_00000003")
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
