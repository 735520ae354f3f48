"""Checkpoint directories: atomic commit and re-save, keep-last-N, and finding the last complete one.

A checkpoint is a directory `step_XXXXXXXX/` holding the learner's DeepSpeed
state (`learner/`), the driver's state (`driver_state.json`: step, data
position, RNG and sampler counters) and the resolved config. Only a directory
with exactly that name counts (`complete`); every other name in the checkpoint
directory is a step of a save or a deletion that a crash may have interrupted,
and `recover` settles it:

* `step_XXXXXXXX.tmp-PID/`: a checkpoint being written (staging). Every file
  and directory in it is fsynced before it is renamed into place, so a crash
  or a full disk while saving leaves at worst this, which is swept.
* `step_XXXXXXXX.replaced/`: while re-saving a step that already has a
  checkpoint (e.g. after a resume), the old one is renamed aside to this name
  before the new one is renamed in, and deleted after. A crash between the two
  renames leaves only this: `recover` renames it back, so the previous
  checkpoint survives; once the new one is in place it is deleted.
* `step_XXXXXXXX.pruned/`: an old checkpoint beyond `keep` is renamed to this
  before it is deleted, so a deletion cut short never leaves a half-deleted
  directory that still looks complete; swept.

The parent directory is fsynced after each rename, so each of these states is
durable before the next begins. Only plain JSON and DeepSpeed's tensor files
are written; nothing is pickled by this module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

_NAME = re.compile(r"^step_(\d{8})$")
DRIVER_STATE = "driver_state.json"
STAGING = ".tmp-"
REPLACED = ".replaced"
PRUNED = ".pruned"

# TEST-ONLY fault injection: when set, `commit` calls it with the name of each point
# between two durable steps ("staged", "set_aside", "committed") and `_remove` with
# "removing" and the directory it is about to delete. Tests set it in a child process
# that SIGKILLs itself there; it is None in every real run.
fault_hook: Callable[[str, Path], None] | None = None


def _fault_point(name: str, path: Path) -> None:
    if fault_hook is not None:
        fault_hook(name, path)


def fsync_dir(path: Path) -> None:
    """Make `path`'s entries (files created, renamed or removed in it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and every directory under `root` (bottom-up), `root` included."""
    for here, _subdirs, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(here, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(here))


class CheckpointManager:
    """Creates, commits, lists, prunes and recovers the checkpoints of one run directory."""

    def __init__(self, directory: str | Path, keep: int = 2):
        if keep < 1:
            raise ValueError(f"keep={keep}: keep at least one checkpoint")
        self.dir = Path(directory)
        self.keep = keep

    def complete(self) -> list[Path]:
        """Committed checkpoints, oldest first (a directory counts only once renamed into place)."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if p.is_dir() and _NAME.match(p.name)]
        return sorted(p for p in found if (p / DRIVER_STATE).is_file())

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def begin(self, step: int) -> Path:
        """A fresh staging directory to write step `step`'s checkpoint into."""
        created = [d for d in (self.dir, *self.dir.parents) if not d.exists()]
        self.dir.mkdir(parents=True, exist_ok=True)
        for d in created:  # each new directory's entry in its parent
            fsync_dir(d.parent)
        tmp = self.dir / f"step_{step:08d}{STAGING}{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        return tmp

    def commit(self, tmp: Path, step: int, driver_state: dict[str, Any]) -> Path:
        """Write the driver state last, fsync everything, rename into place, prune old ones.

        Re-saving a step: the old checkpoint is renamed aside (`.replaced`), the
        new one renamed in, then the aside deleted; a crash at any point leaves
        a state `recover` turns into one complete checkpoint of that step.
        """
        (tmp / DRIVER_STATE).write_text(json.dumps(driver_state, indent=1))
        fsync_tree(tmp)
        fsync_dir(self.dir)
        _fault_point("staged", tmp)
        final = self.dir / f"step_{step:08d}"
        aside = final.with_name(final.name + REPLACED)
        if aside.exists():  # left by an earlier crash and not recovered yet: settle it first
            self._settle_aside(aside, final)
        if final.exists():
            os.rename(final, aside)
            fsync_dir(self.dir)
            _fault_point("set_aside", aside)
        os.rename(tmp, final)
        fsync_dir(self.dir)
        _fault_point("committed", final)
        if aside.exists():
            self._remove(aside)
        for old in self.complete()[: -self.keep]:
            pruned = old.with_name(old.name + PRUNED)
            os.rename(old, pruned)
            fsync_dir(self.dir)
            self._remove(pruned)
        return final

    def recover(self) -> list[Path]:
        """Settle what interrupted saves and deletions left; returns the paths acted on.

        Staging and pruned directories are removed; a `.replaced` one is renamed
        back when its step has no committed checkpoint (the crash hit between the
        two renames of a re-save), else removed.
        """
        if not self.dir.is_dir():
            return []
        found = sorted(p for p in self.dir.iterdir() if p.name.startswith("step_"))
        acted = []
        for p in found:
            if p.name.endswith(REPLACED):
                self._settle_aside(p, p.with_name(p.name[: -len(REPLACED)]))
            elif STAGING in p.name or p.name.endswith(PRUNED):
                self._remove(p)
            else:
                continue
            acted.append(p)
        return acted

    def resume_from(self, resume: str) -> Path | None:
        """The checkpoint `trainer.resume` asks for (none | auto | a directory), after `recover`.

        `auto` with no complete checkpoint starts from step 0, with a warning on
        stderr naming the directory searched: Hydra gives every launch a new
        run_dir, so a re-launch only finds the previous run's checkpoints when
        `trainer.checkpoint_dir` points at them.
        """
        self.recover()
        if resume == "none":
            return None
        if resume != "auto":
            return Path(resume)
        latest = self.latest()
        if latest is None:
            print(
                f"[capo_dist] WARNING: trainer.resume=auto found no complete checkpoint in "
                f"{self.dir}; starting from step 0. Every launch gets a new run_dir, so to "
                "continue an earlier run set trainer.checkpoint_dir to that run's checkpoint "
                "directory (or give every launch the same fixed trainer.checkpoint_dir).",
                file=sys.stderr,
                flush=True,
            )
        return latest

    def _settle_aside(self, aside: Path, final: Path) -> None:
        if final.exists():
            self._remove(aside)
        else:
            os.rename(aside, final)
            fsync_dir(self.dir)

    def _remove(self, path: Path) -> None:
        """Delete a directory already renamed out of the committed names."""
        _fault_point("removing", path)
        shutil.rmtree(path, ignore_errors=True)
        fsync_dir(self.dir)


def read_driver_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / DRIVER_STATE).read_text())


# Hugging Face snapshots of the policy (trainer.save_hf_every), beside the DeepSpeed
# checkpoints: <checkpoint_dir>/hf/step_XXXXXXXX, every one kept.
HF_SNAPSHOTS = "hf"


def hf_snapshots(checkpoint_dir: str | Path) -> CheckpointManager:
    """The manager of `<checkpoint_dir>/hf`: the same staging, fsync and rename as a
    checkpoint, nothing pruned; `recover` it once before saving into it."""
    return CheckpointManager(Path(checkpoint_dir) / HF_SNAPSHOTS, keep=sys.maxsize)


def save_hf_snapshot(
    snapshots: CheckpointManager, step: int, write: Callable[[Path], None]
) -> Path:
    """`write(staging_dir)` a Hugging Face checkpoint, then commit it as `step_XXXXXXXX`.

    Until the rename, the files sit under a staging name that no reader takes
    for a checkpoint (and `recover` sweeps): a writer killed half-way leaves no
    directory named for the step. A `driver_state.json` holding the step is
    written beside the model files (what marks a directory complete).
    """
    staging = snapshots.begin(step)
    write(staging)
    return snapshots.commit(staging, step, {"step": step})
