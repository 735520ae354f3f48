"""HFEngine on the tiny Llama: sampling, raw-logit log-probs, EOS, seeds, strict weight loading."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from capo_dist.engines import GenerationEngine, make_engine
from capo_dist.engines.hf_engine import HFEngine
from capo_dist.types import SamplingSpec

ATOL = 1e-4
MAX_MODEL_LEN = 512


@pytest.fixture()
def engine(tiny_model: str) -> HFEngine:
    """A fresh engine per test (cheap), so weight changes never leak between tests."""
    eng = make_engine("hf", tiny_model, seed=0, max_model_len=MAX_MODEL_LEN)
    assert isinstance(eng, HFEngine)
    return eng


def test_generate_n_completions_with_valid_logprobs(engine, prompts):
    spec = SamplingSpec(n=3, max_tokens=10, seed=7)
    out = engine.generate(prompts, spec)
    assert isinstance(engine, GenerationEngine)
    assert len(out) == len(prompts)
    tok = engine.tokenizer()
    for completions in out:
        assert len(completions) == 3
        for c in completions:
            assert 1 <= len(c.token_ids) <= 10
            assert len(c.logprobs) == len(c.token_ids)
            assert all(math.isfinite(lp) and lp <= 0 for lp in c.logprobs)
            assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
            assert c.finish_reason in ("stop", "length")


def test_seed_reproducible_and_seeds_differ(engine, prompts):
    spec = SamplingSpec(n=2, max_tokens=8, seed=11)
    a = engine.generate(prompts, spec)
    b = engine.generate(prompts, spec)
    c = engine.generate(prompts, SamplingSpec(n=2, max_tokens=8, seed=12))
    ids = lambda out: [x.token_ids for group in out for x in group]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)
    assert [x.logprobs for g in a for x in g] == [x.logprobs for g in b for x in g]


def test_unseeded_calls_follow_the_engine_seed(tiny_model, prompts):
    spec = SamplingSpec(n=2, max_tokens=6)
    e1 = make_engine("hf", tiny_model, seed=3)
    e2 = make_engine("hf", tiny_model, seed=3)
    first = [x.token_ids for g in e1.generate(prompts, spec) for x in g]
    assert first == [x.token_ids for g in e2.generate(prompts, spec) for x in g]
    assert first != [x.token_ids for g in e1.generate(prompts, spec) for x in g]


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.6, 0.9)])
def test_sampler_logprobs_are_raw_and_equal_sequence_logprobs(engine, prompts, temperature, top_p):
    """Left-padded batched sampling returns log p under the unscaled model, for any temperature."""
    spec = SamplingSpec(n=2, max_tokens=12, temperature=temperature, top_p=top_p, seed=5)
    for prompt, completions in zip(prompts, engine.generate(prompts, spec), strict=True):
        for c in completions:
            ref = engine.sequence_logprobs(prompt, c.token_ids)
            assert ref == pytest.approx(c.logprobs, abs=ATOL)


def test_greedy_returns_n_copies_of_the_argmax_path(engine, prompts):
    out = engine.generate(prompts[:1], SamplingSpec(n=3, max_tokens=6, temperature=0.0))
    first = out[0][0]
    assert all(c.token_ids == first.token_ids for c in out[0])
    # each greedy token is the most likely one: its log-prob is the max of the row
    model = engine._model
    ids = torch.tensor([prompts[0] + first.token_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompts[0]) - 1 : -1]
    assert logits.argmax(-1).tolist() == first.token_ids


def test_eos_stops_generation(engine, prompts, eos_weights):
    engine.load_weights(eos_weights)
    eos = engine.tokenizer().eos_token_id
    out = engine.generate(prompts, SamplingSpec(n=8, max_tokens=16, seed=0))
    flat = [c for g in out for c in g]
    stopped = [c for c in flat if c.finish_reason == "stop"]
    assert stopped, "EOS-heavy weights should stop some samples"
    for c in stopped:
        assert c.token_ids[-1] == eos and eos not in c.token_ids[:-1]
        assert len(c.logprobs) == len(c.token_ids)
    for c in flat:
        if c.finish_reason == "length":
            assert len(c.token_ids) == 16 and eos not in c.token_ids


def test_max_tokens_capped_by_max_model_len(tiny_model, prompts):
    eng = make_engine("hf", tiny_model, max_model_len=len(prompts[0]) + 4)
    (group,) = eng.generate(prompts[:1], SamplingSpec(n=1, max_tokens=50, seed=0))
    assert len(group[0].token_ids) <= 4


def test_load_weights_changes_the_model_exactly(engine, tiny_model, prompts, perturbed_weights):
    continuation = list(range(5, 25))
    before = engine.sequence_logprobs(prompts[0], continuation)
    engine.load_weights(perturbed_weights)
    after = engine.sequence_logprobs(prompts[0], continuation)
    assert max(abs(a - b) for a, b in zip(before, after, strict=True)) > 1e-2

    ref = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    ref.load_state_dict(dict(perturbed_weights))
    ids = torch.tensor([prompts[0] + continuation])
    with torch.no_grad():
        logits = ref(input_ids=ids).logits[0, len(prompts[0]) - 1 : -1]
    expected = torch.log_softmax(logits, -1).gather(1, ids[0, len(prompts[0]) :, None])[:, 0]
    assert after == pytest.approx(expected.tolist(), abs=ATOL)


def test_load_weights_accepts_a_subset(engine, prompts, perturbed_weights, base_weights):
    continuation = list(range(5, 15))
    before = engine.sequence_logprobs(prompts[0], continuation)
    subset = [(n, t) for n, t in perturbed_weights if ".layers.1." in n]
    engine.load_weights(subset)
    assert engine.sequence_logprobs(prompts[0], continuation) != before
    engine.load_weights((n, base_weights[n]) for n, _ in subset)
    assert engine.sequence_logprobs(prompts[0], continuation) == pytest.approx(before, abs=1e-6)


def test_load_weights_is_strict(engine):
    with pytest.raises(KeyError, match="not a parameter"):
        engine.load_weights([("model.layers.9.mlp.up_proj.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="shape"):
        engine.load_weights([("model.norm.weight", torch.zeros(3))])


def test_make_engine_options(tiny_model):
    # vLLM-only memory knobs are accepted and ignored; TP > 1 and unknown backends are not
    eng = make_engine("hf", tiny_model, kv_cache_space_gib=1.0, gpu_memory_utilization=0.5)
    assert isinstance(eng, HFEngine)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        make_engine("hf", tiny_model, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="unknown engine backend"):
        make_engine("sglang", tiny_model)  # type: ignore[arg-type]
