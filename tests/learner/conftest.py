"""Shared fixtures of the learner tests: one tiny Llama checkpoint per session."""

from __future__ import annotations

import random

import pytest

from capo_dist.models import build_tiny_model


def arithmetic_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Short step-by-step arithmetic texts, the kind of text the policy is trained on."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        a, b, c = rng.randint(1, 99), rng.randint(1, 99), rng.randint(2, 9)
        texts.append(
            f"Question: what is ({a} + {b}) * {c}?\n\n"
            f"First, {a} + {b} = {a + b}.\n\nThen {a + b} * {c} = {(a + b) * c}.\n\n"
            f"The answer is {(a + b) * c}."
        )
    return texts


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A ~1 M-parameter fp32 Llama + tokenizer, built once per test session."""
    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", arithmetic_corpus()))
