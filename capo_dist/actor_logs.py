"""Where the roles' own output goes, so the driver's terminal stays readable.

Each role's process writes a lot that is not ours: vLLM's INFO/WARNING lines, DeepSpeed's
banners, Ray worker messages. Left alone, Ray forwards all of it to the driver and it
buries the progress bar. Instead each actor sends its stdout and stderr, at the file
descriptor level (so C++ code and the processes an engine starts are covered too), to
`<run_dir>/logs/<role>.log`, and the driver starts Ray without forwarding worker output.
`logging.verbose=true` keeps today's behaviour: everything on the terminal.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

LOG_DIR = "logs"


def role_log_file(run_dir: str | Path, role: str, verbose: bool) -> str | None:
    """The file an actor of `role` (e.g. `rollout-0`) writes its output to; None when
    `verbose` (its output goes to the driver's terminal, through Ray)."""
    return None if verbose else str(Path(run_dir) / LOG_DIR / f"{role}.log")


def redirect_output(log_file: str | None) -> None:
    """Point this process's stdout and stderr (fds 1 and 2, appending) at `log_file`.

    The first thing an actor does, before any engine starts, so the processes it
    spawns inherit the file. A restarted actor appends to the same file. If the file
    cannot be opened (the run directory is not visible from this node), the output
    stays in Ray's session logs, where Ray puts it by default.
    """
    if log_file is None:
        return
    try:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as err:
        print(f"[capo_dist] cannot write {log_file} ({err}); output stays in Ray's logs")
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
