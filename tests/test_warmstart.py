"""Warm start: flawed SFT solutions, a deterministic cached build, the prompt-free loss mask."""

import json
import random
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from capo_dist import warmstart
from capo_dist.config import DataConfig
from capo_dist.data import synthetic_arith
from capo_dist.models import TinyModelSpec
from capo_dist.step_checker import step_is_correct
from capo_dist.warmstart import WarmStartConfig, corrupt_solution, encode_example, warm_start
from tests.runs import REPO, readme_argv

PROBLEMS = synthetic_arith(400, seed=11, min_ops=1, max_ops=3)
# A budget of seconds: one 64-wide layer, a few steps, two eval problems.
TINY = WarmStartConfig(
    train_size=48,
    steps=3,
    batch_size=8,
    warmup_steps=1,
    eval_size=2,
    eval_samples=2,
    eval_max_new_tokens=8,
    spec=TinyModelSpec(
        vocab_size=400,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
    ),
)


def _answer(steps: list[str]) -> str:
    m = re.fullmatch(r"The answer is (\d+)\.", steps[-1])
    assert m, steps[-1]
    return m.group(1)


def test_no_flaw_rate_gives_the_reference():
    rng = random.Random(0)
    for ap in PROBLEMS[:50]:
        assert corrupt_solution(ap, rng, flaw_rate=0.0) == (list(ap.steps), True)


@pytest.mark.parametrize("lucky_share", [0.0, 1.0])
def test_flawed_solutions_have_a_failing_step(lucky_share):
    rng = random.Random(1)
    for ap in PROBLEMS:
        steps, clean = corrupt_solution(ap, rng, flaw_rate=1.0, lucky_share=lucky_share)
        verdicts = [step_is_correct(s) for s in steps]
        assert not clean and not all(verdicts), steps
        assert verdicts[-1] and len(steps) == len(ap.steps)
        if lucky_share == 1.0:  # right by luck: the gold survives
            assert _answer(steps) == ap.problem.gold
            assert verdicts.count(False) <= 2  # the slip, and maybe its compensation
        else:  # carried forward: one wrong step, every later step computes from it
            assert _answer(steps) != ap.problem.gold
            assert verdicts.count(False) == 1
            results = [s.split(" = ")[1].split(",")[0] for s in steps[:-1]]
            for prev, step in zip(results, steps[1:-1], strict=False):
                assert step.startswith(prev + " ")
            assert results[-1] == _answer(steps)


def test_rates_are_respected():
    rng = random.Random(2)
    flawed = lucky = 0
    for ap in PROBLEMS * 10:
        steps, clean = corrupt_solution(ap, rng, flaw_rate=0.3, lucky_share=0.4)
        assert clean == all(step_is_correct(s) for s in steps)
        flawed += not clean
        lucky += not clean and _answer(steps) == ap.problem.gold
    assert abs(flawed / 4000 - 0.3) < 0.025
    assert abs(lucky / flawed - 0.4) < 0.05


def test_corruption_is_deterministic_for_a_seeded_rng():
    def draw(seed: int) -> list[tuple[list[str], bool]]:
        rng = random.Random(seed)
        return [corrupt_solution(ap, rng, 0.5, 0.5) for ap in PROBLEMS]

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


README_SFT = "python -m capo_dist.experiments.arith sft"


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    """One tiny warm-started policy (a few SFT steps) shared by the build tests, built by the
    README's command with TINY's sizes appended (test_build_is_deterministic checks that the
    in-process build of TINY is the same policy)."""
    quick = ["--out-dir", str(tmp_path_factory.mktemp("a"))]
    for prefix, fields, defaults in (
        ("", TINY, WarmStartConfig()),
        ("model-", TINY.spec, WarmStartConfig().spec),
    ):
        for name, value in vars(fields).items():  # the sizes TINY changes
            if isinstance(value, int | float | str) and value != getattr(defaults, name):
                quick += [f"--{prefix}{name.replace('_', '-')}", str(value)]
    argv = readme_argv(README_SFT, *quick)
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return Path(json.loads(proc.stdout[proc.stdout.index("{") :])["model"])


def test_build_is_deterministic(tiny_policy, tmp_path):
    other = warm_start(tmp_path, TINY)
    assert other.name == tiny_policy.name and other != tiny_policy
    a, b = (load_file(str(d / "model.safetensors")) for d in (tiny_policy, other))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tiny_policy / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()
    meta = warmstart.json.loads((tiny_policy / warmstart.META_FILE).read_text())
    assert meta["config"]["steps"] == 3 and meta["train"]["examples"] == 48
    assert set(meta["eval"]) >= {"accuracy", "clean_correct", "wrong_step", "mean_tokens"}
    assert [p.name for p in tiny_policy.parent.iterdir()] == [tiny_policy.name]  # no staging left


def test_second_call_is_cached(tiny_policy, monkeypatch):
    weights = tiny_policy / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("a cached policy was rebuilt")

    monkeypatch.setattr(warmstart, "_build", no_training)
    assert warm_start(tiny_policy.parent, TINY) == tiny_policy
    assert weights.stat().st_mtime_ns == mtime
    # Another configuration or template is another policy.
    with pytest.raises(AssertionError, match="rebuilt"):
        warm_start(tiny_policy.parent, WarmStartConfig(**{**TINY.__dict__, "seed": 2}))
    with pytest.raises(AssertionError, match="rebuilt"):
        warm_start(tiny_policy.parent, TINY, "Q: {question}\n\n")


def test_loss_mask_excludes_the_prompt(tiny_policy):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_policy))
    ap = PROBLEMS[0]
    prompt = DataConfig.prompt_template.format(question=ap.problem.question)
    ids, labels = encode_example(tok, prompt, ap.solution)
    n_prompt = len(tok(prompt)["input_ids"])
    assert len(ids) == len(labels) and ids[:n_prompt] == tok(prompt)["input_ids"]
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and labels[-1] == tok.eos_token_id
    assert tok.decode(labels[n_prompt:-1]) == ap.solution
