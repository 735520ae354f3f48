"""Hugging Face `generate` behind the `GenerationEngine` interface.

The fallback engine (no vLLM needed) and the reference the vLLM engine is
checked against: log-probs come from the raw logits of the same forward pass
that sampled the token (see `capo_dist.engines.base` for the exact quantity).
Runs on CPU, or on CUDA when there is one.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from capo_dist.tokenization import pad_token_id
from capo_dist.types import Completion, SamplingSpec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class HFEngineConfig:
    """Options of `HFEngine`.

    `device` "auto" picks CUDA when available, else CPU. `max_model_len`
    bounds prompt + completion (None: the model's `max_position_embeddings`).
    `seed` seeds the engine's own generator, which draws a seed for every
    `generate` call whose spec has none, so a run is reproducible end to end.
    """

    dtype: str = "float32"
    device: str = "auto"
    seed: int = 0
    max_model_len: int | None = None


class HFEngine:
    """`AutoModelForCausalLM.generate` with left-padded batches and raw-logit log-probs."""

    def __init__(self, model_path: str, config: HFEngineConfig | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config or HFEngineConfig()
        if self.config.device == "auto":
            self._device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self._device = torch.device(self.config.device)
        self._tok = AutoTokenizer.from_pretrained(model_path)
        self._model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=getattr(torch, self.config.dtype)
        ).to(self._device)
        self._model.eval()
        self._max_len = self.config.max_model_len or self._model.config.max_position_embeddings
        self._eos_ids = _eos_token_ids(self._tok, self._model.generation_config.eos_token_id)
        self._pad_id = pad_token_id(self._tok.pad_token_id, sorted(self._eos_ids))
        self._seeds = torch.Generator().manual_seed(self.config.seed)
        self._params = dict(self._model.named_parameters(remove_duplicate=False))

    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._tok

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[Sequence[int]], spec: SamplingSpec
    ) -> list[list[Completion]]:
        """`spec.n` completions per prompt; `temperature == 0` is greedy (n copies)."""
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        width = max(len(p) for p in prompts)
        max_new = min(spec.max_tokens, self._max_len - width)
        if max_new <= 0:
            raise ValueError(
                f"a prompt of {width} tokens leaves no room under max_model_len={self._max_len}"
            )
        input_ids = torch.full((len(prompts), width), self._pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            attention_mask[i, width - len(p) :] = 1

        greedy = spec.temperature == 0
        sampling = (
            {} if greedy else {"temperature": spec.temperature, "top_p": spec.top_p, "top_k": 0}
        )
        seed = spec.seed
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=self._seeds))
        devices = [self._device] if self._device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = self._model.generate(
                input_ids=input_ids.to(self._device),
                attention_mask=attention_mask.to(self._device),
                do_sample=not greedy,
                max_new_tokens=max_new,
                num_return_sequences=1 if greedy else spec.n,
                eos_token_id=sorted(self._eos_ids),
                pad_token_id=self._pad_id,
                output_logits=True,
                return_dict_in_generate=True,
                **sampling,
            )
        new = out.sequences[:, width:]
        logprobs = torch.stack(
            [
                torch.log_softmax(step.float(), dim=-1).gather(
                    1, new[:, t : t + 1].to(step.device)
                )[:, 0]
                for t, step in enumerate(out.logits)
            ],
            dim=1,
        ).cpu()
        rows = [self._completion(new[r].tolist(), logprobs[r].tolist()) for r in range(len(new))]
        if greedy:
            return [[copy.deepcopy(rows[i]) for _ in range(spec.n)] for i in range(len(prompts))]
        return [rows[i * spec.n : (i + 1) * spec.n] for i in range(len(prompts))]

    def _completion(self, token_ids: list[int], logprobs: list[float]) -> Completion:
        """Cut one generated row at its first EOS (kept) and decode it."""
        end = next((t + 1 for t, tok in enumerate(token_ids) if tok in self._eos_ids), None)
        finish = "stop" if end is not None else "length"
        token_ids, logprobs = token_ids[:end], logprobs[:end]
        text = self._tok.decode(token_ids, skip_special_tokens=True)
        return Completion(token_ids=token_ids, text=text, logprobs=logprobs, finish_reason=finish)

    @torch.no_grad()
    def sequence_logprobs(self, prompt: Sequence[int], continuation: Sequence[int]) -> list[float]:
        if not prompt:
            raise ValueError("sequence_logprobs needs a non-empty prompt")
        if not continuation:
            return []
        ids = torch.tensor([list(prompt) + list(continuation)], device=self._device)
        logits = self._model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        target = ids[0, len(prompt) :].unsqueeze(1)
        return torch.log_softmax(logits, dim=-1).gather(1, target)[:, 0].tolist()

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy each tensor into the parameter of that name; unknown names/shapes raise.

        Tensors are copied as they come, so a failure part-way leaves the
        earlier ones loaded.
        """
        for name, tensor in named_tensors:
            param = self._params.get(name)
            if param is None:
                raise KeyError(
                    f"load_weights: {name!r} is not a parameter of this model "
                    f"(e.g. {next(iter(self._params))!r})"
                )
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(
                    f"load_weights: {name!r} has shape {tuple(tensor.shape)}, "
                    f"the model's is {tuple(param.shape)}"
                )
            param.copy_(tensor.to(device=param.device, dtype=param.dtype))


def _eos_token_ids(tok: PreTrainedTokenizerBase, config_eos: int | list[int] | None) -> set[int]:
    """The tokenizer's EOS plus the generation config's (vLLM stops on both too)."""
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    if isinstance(config_eos, int):
        ids.add(config_eos)
    elif config_eos:
        ids.update(config_eos)
    if not ids:
        raise ValueError("the model has no EOS token (tokenizer and generation config)")
    return ids
