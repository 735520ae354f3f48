"""An actor's output goes to its role's log file: Python prints, C-level writes to fds 1 and
2, and the processes it starts (as vLLM's engine and tensor-parallel workers); a restart
appends; an unwritable directory leaves the output where it was."""

import subprocess
import sys
from pathlib import Path

from capo_dist.actor_logs import role_log_file
from tests.conftest import REPO

CHILD = """
import os, subprocess, sys
from capo_dist.actor_logs import redirect_output
print("before")
sys.stdout.flush()
redirect_output(sys.argv[1])
print("python stdout")
print("python stderr", file=sys.stderr)
os.write(1, b"fd 1\\n")
os.write(2, b"fd 2\\n")
subprocess.run([sys.executable, "-c", "print('a child process')"], check=True)
"""


def _run(log_file: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", CHILD, log_file],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def test_everything_an_actor_writes_lands_in_its_file_and_a_restart_appends(tmp_path: Path):
    log = role_log_file(tmp_path, "rollout-0", verbose=False)
    assert log == str(tmp_path / "logs" / "rollout-0.log")
    for _ in range(2):  # the second run is Ray restarting the actor
        proc = _run(log)
        assert proc.stdout == "before\n" and proc.stderr == ""
    lines = Path(log).read_text().splitlines()
    once = ["python stdout", "python stderr", "fd 1", "fd 2", "a child process"]
    assert sorted(lines) == sorted(once * 2)


def test_verbose_keeps_the_output_and_an_unwritable_dir_is_not_fatal(tmp_path: Path):
    assert role_log_file(tmp_path, "judge-0", verbose=True) is None
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the log directory would go
    proc = _run(str(blocked / "logs" / "judge-0.log"))
    assert "python stdout" in proc.stdout and "a child process" in proc.stdout
    assert "cannot write" in proc.stdout and "python stderr" in proc.stderr
