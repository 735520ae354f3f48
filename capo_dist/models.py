"""Small real models built locally, for the CPU default run, tests and benchmarks.

There is no model hub on CI or on many clusters' compute nodes, so the default
run builds its policy here: a byte-level BPE tokenizer trained in-process with
`tokenizers` on the run's own text, and a randomly initialised Llama whose
shapes vLLM's CPU backend accepts (head_dim 64). The result is an ordinary
Hugging Face checkpoint directory that both vLLM and `AutoModelForCausalLM`
load. A Llama config is used on purpose: a `qwen2` model_type makes
AutoTokenizer swap in Qwen's own pre-tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>")


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of a locally built Llama (the vocabulary is capped by what the BPE trainer learns)."""

    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike) -> None:
    """Train a byte-level BPE tokenizer on `texts` and save it as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|eos|>",
    )
    fast.save_pretrained(str(out_dir))


def build_tiny_model(
    out_dir: str | os.PathLike, texts: Iterable[str], spec: TinyModelSpec | None = None
) -> Path:
    """Build (or reuse) a tiny Llama checkpoint + tokenizer in `out_dir`.

    The directory is keyed by the spec and a hash of the corpus, so repeated
    calls with the same inputs reuse it; the write goes through a temporary
    directory and a rename, so a crash never leaves a half-written model.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    spec = spec or TinyModelSpec()
    texts = list(texts)
    digest = hashlib.sha256(json.dumps([asdict(spec), texts], sort_keys=True).encode()).hexdigest()[
        :16
    ]
    out = Path(out_dir)
    if (out / "capo_tiny.json").exists():
        if json.loads((out / "capo_tiny.json").read_text()).get("digest") == digest:
            return out
        raise FileExistsError(
            f"{out} holds a different tiny model; delete it or choose another model.build_dir"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out.parent))
    train_tokenizer(texts, spec.vocab_size, tmp)
    tok = AutoTokenizer.from_pretrained(str(tmp))
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(tmp), safe_serialization=True)
    (tmp / "capo_tiny.json").write_text(json.dumps({"digest": digest, "spec": asdict(spec)}))
    try:
        os.rename(tmp, out)
    except OSError:
        # Another process built the same model first: keep theirs.
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out
