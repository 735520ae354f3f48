"""The CAPO-vs-GRPO experiment (benchmarks/capo_vs_grpo.py): its --quick mode runs the real
pipeline end to end and its figures are sane. Who wins is not tested."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks._common import last_json_line
from benchmarks.capo_vs_grpo import FULL, arm_overrides, mean_std, summarize

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def test_every_arm_differs_only_in_the_reward():
    assert arm_overrides("grpo", 0.2) == ["capo.w_process=0"]
    assert "judge.flip_prob=0" in arm_overrides("capo_exact", 0.2)
    assert arm_overrides("noisy_union", 0.3) == [
        "capo.num_critiques=4",
        "capo.vote=union",
        "judge.flip_prob=0.3",
    ]
    assert len(FULL.arms) == 7 and len(FULL.seeds) >= 3
    with pytest.raises(ValueError, match="unknown arm 'noisy_mean'"):
        arm_overrides("noisy_mean", 0.2)


def test_summary_pairs_each_arm_with_grpo_by_seed():
    def curve(start, end):
        return [
            {
                "step": 0,
                "accuracy": start,
                "clean_correct": 0.1,
                "clean_share": 0.5,
                "greedy_accuracy": 0.2,
            },
            {
                "step": 5,
                "accuracy": end,
                "clean_correct": 0.2,
                "clean_share": 0.6,
                "greedy_accuracy": 0.3,
            },
        ]

    runs = {
        "grpo": {1: curve(0.3, 0.4), 2: curve(0.3, 0.5)},
        "capo_exact": {1: curve(0.3, 0.5), 2: curve(0.3, 0.45)},
    }
    s = summarize(runs)
    assert s["capo_exact"]["accuracy"] == pytest.approx(mean_std([0.5, 0.45]))
    diff, std = s["capo_exact"]["accuracy_vs_grpo"]
    assert diff == pytest.approx(0.025) and std == pytest.approx(math.sqrt(2 * 0.075**2))
    assert s["capo_exact"]["accuracy_wins"] == 1
    assert "accuracy_vs_grpo" not in s["grpo"]


README_QUICK = "python -m benchmarks.capo_vs_grpo --quick"  # as the README shows it


def _quick(cwd: Path, timeout: int, *extra: str) -> subprocess.CompletedProcess:
    """The README's command, run in `cwd` (this checkout importable through PYTHONPATH)."""
    assert f"`{README_QUICK.removesuffix(' --quick')}` (`--quick`" in README.read_text()
    python, *args = README_QUICK.split()
    assert python == "python"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, *args, *extra],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~130 s measured; its two calls are allowed 1200 + 300 s
def test_quick_experiment_runs_and_its_figures_are_sane(tmp_path):
    """The README command exactly (no --out): it writes under ./outputs/capo_vs_grpo/, here
    the test's temporary directory."""
    proc = _quick(tmp_path, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    figures = last_json_line(proc.stdout)
    assert figures["benchmark"] == "capo_vs_grpo" and figures["failed"] == {}
    out = Path(figures["out"])
    assert out.parent == tmp_path / "outputs" / "capo_vs_grpo"
    results = json.loads((out / "results.json").read_text())
    curves, train = results["curves"], results["train"]
    assert set(curves) == {"grpo", "noisy_majority"}
    for arm, by_seed in curves.items():
        assert set(by_seed) == {"1", "2"}
        for seed, curve in by_seed.items():
            assert [p["step"] for p in curve] == [0, 1, 2], (arm, seed)
            for p in curve:
                assert p["samples"] == 3 * 4 * 2  # 3 levels x 4 problems x k=2
                assert 0.0 <= p["clean_correct"] <= p["accuracy"] <= 1.0
                assert 0.0 <= p["greedy_accuracy"] <= 1.0
                assert {"accuracy_ops1", "accuracy_ops2", "accuracy_ops3"} <= set(p)
    # Same seed, same start: the arms evaluate the same initial policy with the same seed.
    for seed in ("1", "2"):
        assert curves["grpo"][seed][0] == curves["noisy_majority"][seed][0]
    # The arms differ in the reward: GRPO's is never penalised, the noisy judge's is.
    for seed in ("1", "2"):
        assert train["grpo"][seed]["train_process_penalty_rate"] == 0.0
        assert train["noisy_majority"][seed]["train_process_penalty_rate"] > 0.0
    summary = results["summary"]
    assert summary["noisy_majority"]["seeds"] == [1, 2]
    assert "accuracy_vs_grpo" in summary["noisy_majority"]
    table = (out / "RESULTS.md").read_text()
    assert "| grpo |" in table and "| noisy_majority |" in table and "±" in table
    for png in ("accuracy.png", "clean_correct.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A second call with the same --out reuses the finished runs instead of re-training.
    again = _quick(tmp_path, 300, "--out", str(out.relative_to(tmp_path)))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[capo_vs_grpo] grpo seed 1" not in again.stdout
    assert json.loads((out / "results.json").read_text())["curves"] == curves
