"""What every benchmark script shares: single-core pinning and the report format."""

from __future__ import annotations

import json
import os


def pin_one_core() -> int | None:
    """Run this process (and its BLAS/OpenMP pools) on ONE core; returns that core."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    try:
        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        return core
    except (AttributeError, OSError):  # not Linux: threads are still limited
        return None


def report(name: str, rows: list[tuple[str, str]], payload: dict) -> None:
    """Print a two-column human table, then ONE line of JSON (always the last line)."""
    width = max(len(k) for k, _ in rows)
    print(f"== {name}")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    print(json.dumps({"benchmark": name, **payload}, sort_keys=False))
