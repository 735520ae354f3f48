"""Smoke test of the benchmark runner: it runs, parses the last JSON line and writes the report.

No timing is asserted anywhere: benchmarks measure, tests only check that they work.
"""

import json
import subprocess
from pathlib import Path

from benchmarks._common import last_json_line, machine_info
from benchmarks.run_all import BENCHMARKS, goals, headline
from tests.runs import readme_argv

REPO = Path(__file__).resolve().parents[1]


def test_last_json_line_takes_the_last_object():
    text = 'table\n{"a": 1}\nmore text\n{"benchmark": "x", "v": 2}\n'
    assert last_json_line(text) == {"benchmark": "x", "v": 2}
    assert last_json_line("no json here\n{broken") is None


def test_machine_info_names_the_versions():
    info = machine_info()
    assert info["cores"] >= 1
    assert "torch" in info["versions"]


def test_every_benchmark_has_a_main_guard():
    for name in BENCHMARKS:
        src = (REPO / "benchmarks" / f"{name}.py").read_text()
        assert 'if __name__ == "__main__":' in src, name


def test_goals_and_headlines_read_the_json_shapes():
    fig = {
        "sync_step_s": 3.0,
        "async_step_s": 2.0,
        "speedup": 1.5,
        "overhead_fraction": 0.05,
    }
    assert all(ok for _, ok in goals("pipeline_overlap", fig))
    assert "1.50x" in headline("pipeline_overlap", fig)
    ws = {
        "bytes_per_s": {"10M": 2**20},
        "ratio": {"10M": 0.5},
        "not_measured": {"500M": "skipped"},
    }
    assert [ok for _, ok in goals("weight_sync", ws)] == [False, False]
    trl = {"capo_dist_samples_per_s": 2.0, "trl_samples_per_s": 1.0, "ratio": 2.0}
    assert goals("vs_trl", trl) == [("capo_dist/TRL samples/s ≥ 1.0", True)]
    judge = {
        "n_request_critiques_per_s": 5.0,
        "separate_critiques_per_s": 2.0,
        "n_vs_separate": 2.5,
        "http_c16_critiques_per_s": 6.0,
        "http_c1_critiques_per_s": 2.0,
        "http_c16_vs_c1": 3.0,
    }
    assert [ok for _, ok in goals("judge_throughput", judge)] == [True, False]
    assert "(2.50x)" in headline("judge_throughput", judge)
    assert "(3.00x)" in headline("judge_throughput", judge)
    engine_only = {k: v for k, v in judge.items() if not k.startswith("http")}
    assert [ok for _, ok in goals("judge_throughput", engine_only)] == [True]  # --only engine
    assert "HTTP" not in headline("judge_throughput", engine_only)
    by = {
        "today": {"peak_mib": 100.0, "mem_ratio": 1.0, "speed_ratio": 1.0},
        "all": {"peak_mib": 45.0, "mem_ratio": 0.45, "speed_ratio": 1.2},
    }
    lm = {"results": {"1024": by}, "all_mem_ratio": 0.45, "all_speed_ratio": 1.2}
    assert [ok for _, ok in goals("learner_memory", lm)] == [False, True]
    assert "45 vs today 100 MiB (0.45x), 1.20x tokens/s" in headline("learner_memory", lm)


README_BENCH = "make bench"


def test_run_all_quick_on_the_cheapest_benchmark(tmp_path):
    """The README's `make bench`, with smoke sizes of its cheapest benchmark as ARGS."""
    out = tmp_path / "RESULTS.md"
    argv = readme_argv(README_BENCH, "--quick", "--only", "reward_pipeline", "--out", str(out))
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "## reward_pipeline" in text and "torch" in text
    figures = json.loads(text.split("```json\n", 1)[1].split("\n```", 1)[0])
    assert figures["benchmark"] == "reward_pipeline"
    assert figures["responses"] == 512
