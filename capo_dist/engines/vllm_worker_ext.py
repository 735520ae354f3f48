"""vLLM worker extension: load Hugging Face-named tensors into a running vLLM model.

vLLM mixes this class into its worker (GPU `Worker` or `CPUWorker`) when the
engine is built with `worker_extension_cls=WORKER_EXTENSION`; the engine calls
its methods on every worker (every TP rank) through `LLM.collective_rpc`.
Method names carry a `capo_` prefix because vLLM refuses an extension whose
attribute names collide with the worker's (`vllm/v1/worker/worker_base.py`).

Why not `model.load_weights` alone: vLLM processes weights after loading
into a kernel format, and on CPU that format drops the parameter outright
(`dispatch_cpu_unquantized_gemm(..., remove_weight=True)` in
`vllm/model_executor/layers/utils.py` prepacks each linear weight for
oneDNN and leaves a 0-element `weight`), so a plain `load_weights` after
start-up fails. vLLM 0.32's own in-place reload path
(`vllm/model_executor/model_loader/reload/layerwise.py`, used by
`reload_weights` and by the NCCL weight-transfer engine) restores each layer
to checkpoint format, buffers incoming tensors until the layer is complete,
then re-runs the layer's post-load processing and copies the result into the
original kernel tensors. This extension drives that same lifecycle, with one
update *session* spanning any number of buckets:

* `capo_load_hf_weights(bucket)` opens the session on first use and feeds
  the bucket to `model.load_weights` (HF names; vLLM maps them, shards them
  for TP, and fuses q/k/v and gate/up itself);
* `capo_finish_weight_update()` closes it: layers that received nothing keep
  their old weights, every other layer now holds the new ones.

A layer takes its tensors once per session, so a bucket that repeats a name
already received closes the session and opens a new one (the later tensor
wins, as it would with plain copies).

A fused vLLM parameter (q/k/v → `qkv_proj`, gate/up → `gate_up_proj`, from the
model's `packed_modules_mapping`) only reaches the model once all its HF
parts have arrived in the session; a session that ends with some parts
missing leaves that parameter untouched and raises, instead of letting vLLM
process a half-filled layer (its unloaded rows would be uninitialised memory).

Importing this module also registers our CPU weight-transfer engine
("capo_gloo", `gloo_weight_transfer.py`) with vLLM: vLLM imports the
extension in every worker process before `load_model` creates the worker's
weight-transfer engine, so the backend resolves there too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

from capo_dist.engines.gloo_weight_transfer import register as _register_gloo_transfer

WORKER_EXTENSION = "capo_dist.engines.vllm_worker_ext.CapoWorkerExtension"

_register_gloo_transfer()


class CapoWorkerExtension:
    """Mixed into vLLM's worker class; `self` is the worker (`model_runner`, `model_config`, ...)."""

    @torch.no_grad()
    def capo_load_hf_weights(self, weights: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Load one bucket of full HF-named tensors into the open update session."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        model = self.model_runner.get_model()
        if getattr(self, "_capo_session_open", False) and any(
            name in self._capo_received for name, _ in weights
        ):
            # A layer takes its weights once per session (then it is processed
            # back into kernel format): a repeated name starts a new session.
            self.capo_finish_weight_update()
        if not getattr(self, "_capo_session_open", False):
            with set_current_vllm_config(self.vllm_config):
                initialize_layerwise_reload(model)
            self._capo_session_open = True
            self._capo_received: set[str] = set()
            self._capo_pending: dict[str, dict[str, torch.Tensor]] = {}
        packed = getattr(model, "packed_modules_mapping", {})
        ready: list[tuple[str, torch.Tensor]] = []
        for name, tensor in weights:
            self._capo_received.add(name)
            group = _fused_group(name, packed)
            if group is None:
                ready.append((name, tensor))
                continue
            key, members = group
            parts = self._capo_pending.setdefault(key, {})
            parts[name] = tensor
            if all(m in parts for m in members):
                ready.extend((m, parts[m]) for m in members)
                del self._capo_pending[key]
        if ready:
            with set_current_vllm_config(self.vllm_config):
                model.load_weights(weights=ready)

    @torch.no_grad()
    def capo_finish_weight_update(self) -> None:
        """Close the session: process and install every layer that received weights."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        if not getattr(self, "_capo_session_open", False):
            return
        model = self.model_runner.get_model()
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(model, self.model_config)
            _repack_cpu_vocab_layers(model)
        self._capo_session_open = False
        pending, self._capo_pending = self._capo_pending, {}
        if pending:
            missing = sorted(
                f"{key} (got {sorted(parts)})" for key, parts in pending.items() if parts
            )
            raise ValueError(
                "weight update ended with fused parameters only partly loaded; they keep "
                "their old values. Send every part (q/k/v, gate/up) within one update: "
                + "; ".join(missing)
            )


def _repack_cpu_vocab_layers(model: torch.nn.Module) -> None:
    """On CPU, rebuild the packed GEMM weights of every embedding / LM head from `weight`.

    The CPU backend keeps a prepacked copy of the LM head for its matmul
    (`UnquantizedEmbeddingMethod.process_weights_after_loading`). A tied LM
    head shares `weight` with the embedding but receives no tensor of its
    own, so the layerwise reload restores it untouched and its packed copy
    would keep the OLD embedding (measured: log-probs off by ~0.7 on a tied
    tiny Llama). Embedding layers keep their full `weight`, so re-running
    their processing is exact and cheap. No-op off CPU, where a tied head
    reads the shared tensor directly.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    for module in model.modules():
        if isinstance(module, VocabParallelEmbedding):
            module.quant_method.process_weights_after_loading(module)


def _fused_group(name: str, packed: Mapping[str, Sequence[str]]) -> tuple[str, list[str]] | None:
    """For an HF name that is one part of a fused vLLM parameter: (fused key, all part names).

    `packed` is the vLLM model's `packed_modules_mapping`, e.g.
    {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}: then
    "model.layers.0.self_attn.k_proj.weight" belongs to
    "model.layers.0.self_attn.qkv_proj.weight" with parts q/k/v_proj.weight.
    """
    parts = name.split(".")
    for i, part in enumerate(parts):
        for fused, members in packed.items():
            if part in members and len(members) > 1:
                head, tail = parts[:i], parts[i + 1 :]
                key = ".".join([*head, fused, *tail])
                return key, [".".join([*head, m, *tail]) for m in members]
    return None
