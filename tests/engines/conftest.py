"""Fixtures for the engine tests: one tiny Llama checkpoint per session, and weight sets.

The checkpoint is `capo_dist.models.build_tiny_model` on a small arithmetic
corpus (fp32, head_dim 64, ~0.3 M parameters with this vocabulary). The
weight sets are lists of (HF name, tensor) pairs, the form `load_weights`
takes.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from capo_dist.models import build_tiny_model


def _arithmetic_corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        texts.append(
            f"Question: what is {a} + {b}?\n\nStep 1: {a} + {b} = {a + b}.\n\n"
            f"The answer is \\boxed{{{a + b}}}."
        )
    return texts


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of the tiny Llama checkpoint + tokenizer (built once per session)."""
    out = tmp_path_factory.mktemp("engines") / "tiny"
    return str(build_tiny_model(out, _arithmetic_corpus()))


@pytest.fixture(scope="session")
def base_weights(tiny_model: str) -> dict[str, torch.Tensor]:
    """The checkpoint's own tensors, by HF name (to restore an engine after a test)."""
    return load_file(str(Path(tiny_model) / "model.safetensors"))


@pytest.fixture(scope="session")
def perturbed_weights(base_weights: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """Every tensor plus N(0, 0.05²) noise: a different model of the same shape."""
    gen = torch.Generator().manual_seed(1234)
    return [
        (name, t + 0.05 * torch.randn(t.shape, generator=gen)) for name, t in base_weights.items()
    ]


@pytest.fixture(scope="session")
def eos_weights(
    tiny_model: str, base_weights: dict[str, torch.Tensor]
) -> list[tuple[str, torch.Tensor]]:
    """Two tensors that make EOS likely (~10 % per step) after any context.

    Embedding dimension 0 is set to 10 for every token, so the final normed
    hidden state has a large positive component 0 whatever the context; the
    LM-head row of EOS then reads it with weight 0.35, which puts EOS about
    4 nats above the other (near-uniform) logits.
    """
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(tiny_model).eos_token_id
    emb = base_weights["model.embed_tokens.weight"].clone()
    emb[:, 0] = 10.0
    head = base_weights["lm_head.weight"].clone()
    head[eos, 0] = 0.35
    return [("model.embed_tokens.weight", emb), ("lm_head.weight", head)]


@pytest.fixture(scope="session")
def prompts(tiny_model: str) -> list[list[int]]:
    """Three prompts of different lengths (so batches are left-padded)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    texts = [
        "Question: what is 3 + 4?\n\n",
        "Question: what is 12 + 40?\n\nStep 1:",
        "Question",
    ]
    return [tok(t)["input_ids"] for t in texts]
