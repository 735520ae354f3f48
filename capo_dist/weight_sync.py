"""Learner → rollout weight sync: packing parameters into buckets, and the two transports.

After an update, learner rank 0 ships the full (un-partitioned) parameters to
every rollout engine under their Hugging Face names
(`model.layers.0.self_attn.q_proj.weight`, …). Shipping them one by one costs
one round trip per parameter, so they travel in *buckets*: a `WeightBucket`
holds the names, shapes and dtypes of a run of parameters and ONE flat
contiguous byte tensor with their data back to back.

Bucket boundaries follow one rule, `plan_buckets` (and its streaming twin
`pack_buckets`): parameters join the open bucket in order, and the bucket is
closed as soon as its size *exceeds* `bucket_bytes`. So every bucket but the
last holds more than `bucket_bytes` and at most `bucket_bytes` plus one
parameter. This is exactly the rule vLLM 0.32's packed NCCL receiver uses to
cut its receive buffers from the metadata
(`vllm/distributed/weight_transfer/packed_tensor.py`,
`packed_nccl_broadcast_consumer` / `pack_tensors`), so a stock
`NCCLWeightTransferEngine` with `packed=True, packed_buffer_size_bytes =
bucket_bytes` receives our buckets one broadcast each.

Transports (`WeightTransport`): `ObjectStoreTransport` puts each bucket in the
Ray object store (the default); `CollectiveTransport` broadcasts each
bucket's bytes from rank 0 over a group shared with every engine worker,
received by vLLM's weight-transfer API — NCCL on GPU, gloo on CPU, the same
code otherwise. The learner drives either through the same loop
(`capo_dist.learner.Learner`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import ray
import torch

T = TypeVar("T")


@dataclass(frozen=True)
class ParamSpec:
    """Name, full shape and dtype of one parameter, known without gathering it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class WeightBucket:
    """A run of full parameters packed back to back into one flat byte tensor.

    `flat` is 1-D, contiguous, `torch.uint8`; parameter i occupies
    `nbytes[i]` bytes after the previous ones. Raw bytes (rather than one
    dtype) let a bucket mix dtypes and match vLLM's packed wire format.
    """

    names: list[str]
    shapes: list[tuple[int, ...]]
    dtypes: list[torch.dtype]
    flat: torch.Tensor
    nbytes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.nbytes:
            self.nbytes = [
                math.prod(s) * d.itemsize for s, d in zip(self.shapes, self.dtypes, strict=True)
            ]
        if not (len(self.names) == len(self.shapes) == len(self.dtypes) == len(self.nbytes)):
            raise ValueError("WeightBucket: names, shapes, dtypes and nbytes differ in length")
        if self.flat.dtype != torch.uint8 or self.flat.dim() != 1:
            raise ValueError(
                f"WeightBucket.flat must be 1-D uint8, got {self.flat.dtype} {tuple(self.flat.shape)}"
            )
        if self.flat.numel() != sum(self.nbytes):
            raise ValueError(
                f"WeightBucket.flat has {self.flat.numel()} bytes, metadata says {sum(self.nbytes)}"
            )

    @property
    def specs(self) -> list[ParamSpec]:
        return [
            ParamSpec(n, tuple(s), d)
            for n, s, d in zip(self.names, self.shapes, self.dtypes, strict=True)
        ]

    def __reduce__(self):
        """Pickle `flat` as a numpy array: Ray then moves it out-of-band, zero-copy on read.

        (A torch tensor would go through torch's own serialiser: the profiled
        cost was ~0.15 s per 64 MiB bucket to put and ~0.1 s to get, vs
        ~0.01-0.08 s and ~0.0004 s as numpy.)
        """
        flat = self.flat.detach().cpu().numpy()
        return (_bucket_from_numpy, (self.names, self.shapes, self.dtypes, flat, self.nbytes))

    def to(self, device: torch.device | str) -> WeightBucket:
        """The same bucket with its bytes on `device` (no copy if already there)."""
        return WeightBucket(self.names, self.shapes, self.dtypes, self.flat.to(device), self.nbytes)

    def unpack(self) -> list[tuple[str, torch.Tensor]]:
        """`(name, tensor)` pairs with the original shapes and dtypes, in packing order.

        The tensors are views of `flat` (no copy) unless a parameter starts at
        a byte offset its dtype cannot be viewed at, which is then copied.
        """
        out: list[tuple[str, torch.Tensor]] = []
        offset = 0
        for name, shape, dtype, n in zip(
            self.names, self.shapes, self.dtypes, self.nbytes, strict=True
        ):
            chunk = self.flat[offset : offset + n]
            if offset % dtype.itemsize:
                chunk = chunk.clone()
            out.append((name, chunk.view(dtype).view(shape)))
            offset += n
        return out


def _bucket_from_numpy(names, shapes, dtypes, flat, nbytes) -> WeightBucket:
    """Rebuild a pickled bucket around the received bytes (read-only in Ray's object store:
    the tensors are only ever copied into a model, never written)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return WeightBucket(names, shapes, dtypes, torch.from_numpy(flat), nbytes)


def _cut(items: Iterable[T], size_of: Callable[[T], int], bucket_bytes: int) -> Iterator[list[T]]:
    """Group `items` in order; a group closes once its size exceeds `bucket_bytes` (vLLM's rule)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
    group: list[T] = []
    total = 0
    for item in items:
        group.append(item)
        total += size_of(item)
        if total > bucket_bytes:
            yield group
            group, total = [], 0
    if group:
        yield group


def plan_buckets(specs: Sequence[ParamSpec], bucket_bytes: int) -> list[list[ParamSpec]]:
    """The bucket boundaries for `specs` (in order), computed from metadata alone.

    The learner uses it to gather one bucket's parameters at a time; the
    boundaries equal what `pack_buckets` and vLLM's packed receiver produce.
    """
    return list(_cut(specs, lambda s: s.nbytes, bucket_bytes))


def pack_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[WeightBucket]:
    """Pack `(name, tensor)` pairs into `WeightBucket`s, lazily, one bucket at a time.

    Tensors are consumed from the iterable only as far as the bucket being
    built needs, so a caller that materialises them on the fly holds at most
    one bucket's worth of them. Each bucket's bytes are a fresh copy, on the
    tensors' device.
    """
    for group in _cut(named_tensors, lambda nt: nt[1].numel() * nt[1].element_size(), bucket_bytes):
        flats = [t.detach().contiguous().view(-1).view(torch.uint8) for _, t in group]
        yield WeightBucket(
            names=[name for name, _ in group],
            shapes=[tuple(t.shape) for _, t in group],
            dtypes=[t.dtype for _, t in group],
            flat=torch.cat(flats) if len(flats) > 1 else flats[0].clone(),
        )


class WeightTransport(Protocol):
    """How learner rank 0 hands buckets to the rollout engines.

    `send` is called once per bucket, in plan order; `finish` once after the
    last bucket, and returns whatever the driver needs to complete the sync.
    """

    def send(self, bucket: WeightBucket) -> None: ...

    def finish(self) -> list[ray.ObjectRef] | None: ...


class ObjectStoreTransport:
    """Buckets go into the Ray object store; the driver passes the refs to each engine.

    The CPU path. Each bucket is copied to CPU and `ray.put`; the learner
    process keeps no copy. The object store holds the whole model (in the
    training dtype) until every engine has loaded it and the refs are
    dropped; Ray spills to disk past its memory limit.
    """

    def __init__(self) -> None:
        self._refs: list[ray.ObjectRef] = []

    def send(self, bucket: WeightBucket) -> None:
        self._refs.append(ray.put(bucket.to("cpu")))

    def finish(self) -> list[ray.ObjectRef]:
        refs, self._refs = self._refs, []
        return refs


# What `trainer.sync.transport` names, to the vLLM weight-transfer backend the engines are
# built with: the same collective path, only the communicator differs.
ENGINE_BACKENDS = {"nccl": "nccl", "gloo": "capo_gloo"}


@dataclass(frozen=True)
class CollectiveSyncPlan:
    """What the rollout engines need to receive collective syncs, as vLLM 0.32 payloads.

    `init_infos[i]` is engine i's keyword dict of
    `vllm.distributed.weight_transfer.nccl_common.NCCLWeightTransferInitInfo`
    (for `init_weight_transfer_engine`, once); `update_info` that of
    `vllm.distributed.weight_transfer.nccl_engine.NCCLWeightTransferUpdateInfo`
    (for `update_weights`, every sync, the same for every engine). Plain dicts,
    so they travel through Ray or HTTP unchanged. Both the "nccl" and our
    "capo_gloo" engine read them.

    Ranks: the learner is rank 0; vLLM gives an engine worker the rank
    `dp_rank * TP * PP + rank + rank_offset`
    (`nccl_common.worker_init_process_group`), so engine i's `rank_offset` is
    1 + the worker count of engines 0..i-1, and the ranks of all engines are
    1..world_size-1, each once.
    """

    init_infos: list[dict[str, Any]]
    update_info: dict[str, Any]

    @property
    def world_size(self) -> int:
        return int(self.init_infos[0]["world_size"]) if self.init_infos else 1

    @property
    def master(self) -> tuple[str, int]:
        """(address, port) of the rendezvous, hosted by learner rank 0."""
        info = self.init_infos[0]
        return info["master_address"], int(info["master_port"])


def engine_rank_offsets(engine_world_sizes: Sequence[int]) -> list[int]:
    """Engine i's `rank_offset`: 1 (learner rank 0) + the workers of engines 0..i-1."""
    if any(n < 1 for n in engine_world_sizes):
        raise ValueError(f"every engine has at least one worker, got {list(engine_world_sizes)}")
    offsets, next_rank = [], 1
    for n in engine_world_sizes:
        offsets.append(next_rank)
        next_rank += n
    return offsets


def engines_to_reload(
    versions: Sequence[int], restarted: Sequence[bool], version: int, collective: bool
) -> list[int]:
    """Indices of the rollout engines that need the current weights loaded after a worker loss.

    An engine whose weight version is older than the driver's `version` is behind. On a
    collective transport an engine whose actor Ray restarted is also out of sync, even at
    the current version (killed before the first sync, it holds the base weights, but its
    new process never joined the weight-transfer group): every such engine is loaded
    through the object store, and the run syncs that way from then on.
    """
    return [
        i
        for i, (v, r) in enumerate(zip(versions, restarted, strict=True))
        if v < version or (collective and r)
    ]


class Communicator(Protocol):
    """The one collective the sync needs: broadcast a tensor from `src` to the group."""

    def broadcast(self, tensor: torch.Tensor, src: int) -> None: ...


class GlooCommunicator:
    """A gloo process group of its own (not torch's global one), broadcasting CPU tensors.

    Built with vLLM's `stateless_init_torch_distributed_process_group`, so a
    process can be in it and in its own DeepSpeed or vLLM groups at once.
    Ranks are the group's own (`ProcessGroup.broadcast`, not
    `torch.distributed.broadcast`, which would map global ranks). Used by the
    learner (rank 0) and by `capo_dist.engines.gloo_weight_transfer` (the
    engines' side), so both ends run the same code.
    """

    device = torch.device("cpu")

    def __init__(self, group: Any) -> None:
        self.group = group

    @classmethod
    def connect(
        cls, master_address: str, master_port: int, rank: int, world_size: int, timeout_s: float
    ) -> GlooCommunicator:
        """Join as `rank`; rank 0 hosts the rendezvous. The join and every broadcast fail
        after `timeout_s` without their peers."""
        from datetime import timedelta

        from vllm.distributed.utils import stateless_init_torch_distributed_process_group

        group = stateless_init_torch_distributed_process_group(
            master_address,
            master_port,
            rank,
            world_size,
            backend="gloo",
            timeout=timedelta(seconds=timeout_s),
        )
        return cls(group)

    def broadcast(self, tensor: torch.Tensor, src: int) -> None:
        from torch.distributed import BroadcastOptions

        opts = BroadcastOptions()
        opts.rootRank = src
        self.group.broadcast([tensor], opts).wait()

    def destroy(self) -> None:
        from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group

        stateless_destroy_torch_distributed_process_group(self.group)


class CollectiveTransport:
    """Rank 0 broadcasts each bucket's bytes over a group shared with every engine worker.

    One code path for GPU and CPU; only the communicator differs:
    `backend="nccl"` is vLLM's `PyNcclCommunicator` (`nccl_common.trainer_init`,
    GPU only: written against vLLM 0.32, never run here), `backend="gloo"` a
    `GlooCommunicator` (CPU; what the test suite runs).

    Wire protocol = vLLM 0.32's packed weight transfer
    (`vllm/distributed/weight_transfer/{nccl_common,nccl_engine,packed_tensor}.py`):

    * rendezvous: a group on `master_address:master_port` of `world_size` =
      1 + every engine worker; the learner is rank 0, engine workers take
      the ranks `CollectiveSyncPlan` gives them;
    * per sync, metadata (names, dtype names, shapes, in plan order) goes to
      the engines via Ray as `NCCLWeightTransferUpdateInfo`; the engines
      cut their receive buffers from it with the same rule as
      `plan_buckets` (`packed=True`, `packed_buffer_size_bytes=bucket_bytes`),
      and rank 0 broadcasts each `WeightBucket.flat` (uint8) with `src=0`.

    vLLM's NCCL receiver views every tensor in place in its receive buffer, so
    each parameter's byte offset must be a multiple of its dtype size: true
    when all parameters share one dtype (our bf16/fp32 training), not for
    arbitrary mixes (`WeightBucket.unpack`, used by the gloo receiver, copies
    those; vLLM's would refuse).

    The engines must be inside `update_weights` while rank 0 broadcasts
    (both sides meet inside the same collective calls), so the driver starts
    the engines' receive and the learners' `broadcast_weights` concurrently.
    """

    def __init__(self, communicator: Any, device: torch.device) -> None:
        self._comm = communicator
        self._device = device

    @classmethod
    def connect(
        cls,
        backend: str,
        master_address: str,
        master_port: int,
        world_size: int,
        timeout_s: float,
    ) -> CollectiveTransport:
        """Join the learner↔engines group as rank 0 (blocks until every worker joins).

        `timeout_s` is the gloo group's timeout (the join and every broadcast);
        vLLM's NCCL endpoint takes none.
        """
        if backend == "gloo":
            comm = GlooCommunicator.connect(master_address, master_port, 0, world_size, timeout_s)
            return cls(comm, comm.device)
        if backend == "nccl":
            from vllm.distributed.weight_transfer.nccl_common import trainer_init

            info = {
                "master_address": master_address,
                "master_port": master_port,
                "world_size": world_size,
            }
            comm = trainer_init(info, rank=0)
            return cls(comm, comm.device)
        raise ValueError(
            f"unknown collective backend {backend!r}; choose one of {list(ENGINE_BACKENDS)}"
        )

    @staticmethod
    def plan(
        specs: Sequence[ParamSpec],
        bucket_bytes: int,
        master_address: str,
        master_port: int,
        engine_world_sizes: Sequence[int],
        num_buffers: int = 2,
    ) -> CollectiveSyncPlan:
        """Every engine's init payload and the shared update payload for syncing `specs`.

        `engine_world_sizes[i]` is engine i's worker count (TP x PP x DP).
        """
        world_size = 1 + sum(engine_world_sizes)
        init_infos = [
            {
                "master_address": master_address,
                "master_port": master_port,
                "rank_offset": offset,
                "world_size": world_size,
                "packed": True,
                "packed_buffer_size_bytes": bucket_bytes,
                "packed_num_buffers": num_buffers,
            }
            for offset in engine_rank_offsets(engine_world_sizes)
        ]
        update_info = {
            "names": [s.name for s in specs],
            "dtype_names": [str(s.dtype).removeprefix("torch.") for s in specs],
            "shapes": [list(s.shape) for s in specs],
        }
        return CollectiveSyncPlan(init_infos=init_infos, update_info=update_info)

    def send(self, bucket: WeightBucket) -> None:
        self._comm.broadcast(bucket.flat.to(self._device), src=0)

    def finish(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.current_stream().synchronize()
        return None
