"""Weight updates on a model with tied input/output embeddings (like SmolLM2).

vLLM's CPU backend keeps a prepacked copy of the LM head; a tied head gets no
tensor of its own in an update, so without the worker extension's repack its
log-probs would keep the old embedding (off by ~0.7 nats on this model). Both
update paths are pinned: `load_weights` (object store) and the collective path
(vLLM's weight-transfer API with our "capo_gloo" engine, this process as rank 0).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from capo_dist.engines import make_engine

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tied_model(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny checkpoint re-saved with `tie_word_embeddings=True` (LM head = embedding)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(tmp_path_factory.mktemp("tied")) / "model"
    config = LlamaConfig.from_pretrained(tiny_model)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(str(out))
    return str(out)


@pytest.fixture(scope="module")
def tied_engine(tied_model: str) -> Iterator:
    eng = make_engine(
        "vllm",
        tied_model,
        max_model_len=256,
        kv_cache_space_gib=0.25,
        weight_transfer_backend="capo_gloo",
    )
    yield eng
    eng.close()


def test_tied_lm_head_follows_the_new_embedding(tied_engine, tied_model):
    hf = make_engine("hf", tied_model, max_model_len=256)
    prompt, continuation = list(range(3, 20)), list(range(30, 45))
    gen = torch.Generator().manual_seed(5)
    # what a learner sends: named_parameters() lists the tied tensor once, as the embedding
    new = [
        (name, p.detach() + 0.05 * torch.randn(p.shape, generator=gen))
        for name, p in hf._model.named_parameters()
    ]
    assert "lm_head.weight" not in dict(new)
    before = tied_engine.sequence_logprobs(prompt, continuation)
    tied_engine.load_weights(new)
    hf.load_weights(new)
    after = tied_engine.sequence_logprobs(prompt, continuation)
    assert after == pytest.approx(hf.sequence_logprobs(prompt, continuation), abs=1e-4)
    assert max(abs(a - b) for a, b in zip(after, before, strict=True)) > 1e-2


def test_tied_lm_head_follows_a_collective_update(tied_engine, tied_model):
    """The gloo collective sync, received through vLLM's weight-transfer API, repacks too."""
    import socket
    import threading

    from capo_dist.weight_sync import CollectiveTransport, ParamSpec, pack_buckets

    hf = make_engine("hf", tied_model, max_model_len=256)
    gen = torch.Generator().manual_seed(6)
    new = [
        (name, p.detach() + 0.05 * torch.randn(p.shape, generator=gen))
        for name, p in hf._model.named_parameters()
    ]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    specs = [ParamSpec(n, tuple(t.shape), t.dtype) for n, t in new]
    plan = CollectiveTransport.plan(specs, 32 << 10, "127.0.0.1", port, [1])
    rank0: dict = {}

    def learner_side(work) -> threading.Thread:  # rank 0 runs beside the engine's blocking call
        t = threading.Thread(target=work)
        t.start()
        return t

    t = learner_side(
        lambda: rank0.update(
            transport=CollectiveTransport.connect("gloo", "127.0.0.1", port, plan.world_size, 60)
        )
    )
    tied_engine.init_weight_transfer_engine(plan.init_infos[0])
    t.join()
    prompt, continuation = list(range(3, 20)), list(range(30, 45))
    before = tied_engine.sequence_logprobs(prompt, continuation)
    tied_engine.start_weight_update()
    t = learner_side(
        lambda: [rank0["transport"].send(b) for b in pack_buckets(iter(new), 32 << 10)]
    )
    tied_engine.update_weights(plan.update_info)
    t.join()
    tied_engine.finish_weight_update("1")
    hf.load_weights(new)
    after = tied_engine.sequence_logprobs(prompt, continuation)
    assert after == pytest.approx(hf.sequence_logprobs(prompt, continuation), abs=1e-4)
    assert max(abs(a - b) for a, b in zip(after, before, strict=True)) > 1e-2
