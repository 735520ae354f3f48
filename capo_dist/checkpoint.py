"""Checkpoint directories: atomic commit, keep-last-N, and finding the last complete one.

A checkpoint is a directory `step_XXXXXXXX/` holding the learner's DeepSpeed
state (`learner/`), the driver's state (`driver_state.json`: step, data
position, RNG and sampler counters) and the resolved config. It is written
under a temporary name and renamed into place only after every file is
flushed to disk, so a crash or a full disk while saving leaves at worst a
`*.tmp-*` directory that is ignored and swept, never a damaged last-good
checkpoint. Only plain JSON and DeepSpeed's tensor files are written; nothing
is pickled by this module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

_NAME = re.compile(r"^step_(\d{8})$")
DRIVER_STATE = "driver_state.json"


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    """Creates, commits, lists and prunes the checkpoints of one run directory."""

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
        """A fresh temporary directory to write step `step`'s checkpoint into."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f"step_{step:08d}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        return tmp

    def commit(self, tmp: Path, step: int, driver_state: dict[str, Any]) -> Path:
        """Write the driver state last, flush everything, rename into place, prune old ones."""
        (tmp / DRIVER_STATE).write_text(json.dumps(driver_state, indent=1))
        _fsync_tree(tmp)
        final = self.dir / f"step_{step:08d}"
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        for old in self.complete()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def sweep_partial(self) -> list[Path]:
        """Remove directories left by interrupted saves; returns what was removed."""
        if not self.dir.is_dir():
            return []
        partial = [p for p in self.dir.iterdir() if ".tmp-" in p.name]
        for p in partial:
            shutil.rmtree(p, ignore_errors=True)
        return partial


def read_driver_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / DRIVER_STATE).read_text())
