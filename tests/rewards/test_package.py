"""The reward core stays pure and light: no Ray, nothing heavy at import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REWARDS = Path(__file__).resolve().parents[2] / "capo_dist" / "rewards"


def test_no_ray_import_anywhere():
    for path in REWARDS.glob("*.py"):
        for line in path.read_text().splitlines():
            words = line.strip().split()
            if words[:1] in (["import"], ["from"]):
                assert words[1].split(".")[0] != "ray", f"{path.name}: {line}"


def test_light_imports():
    code = (
        "import sys\n"
        "import capo_dist.rewards, capo_dist.rewards.verifier, capo_dist.rewards.critique\n"
        "import capo_dist.rewards.steps, capo_dist.rewards.voting, capo_dist.rewards.critique_parsers\n"
        "heavy = [m for m in ('ray', 'torch', 'math_verify', 'sympy', 'transformers')"
        " if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=REWARDS.parents[1],
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
